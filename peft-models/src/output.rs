//! Output folders written whole or not at all (`peft merge`, `peft
//! convert`, `peft combine`): the files go into a hidden folder beside the output, which is
//! renamed into place once every file is complete, so a failure part way
//! never leaves a folder that looks finished.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A fresh hidden folder beside `out` (`.NAME.partial-PID`) to write into.
pub(crate) fn partial_dir(out: &Path) -> Result<PathBuf> {
    let Some(name) = out.file_name() else {
        return Err(ModelError::Io {
            path: out.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the output path names no folder"),
        });
    };
    let partial = out.with_file_name(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    let io = |cause| ModelError::Io {
        path: partial.clone(),
        cause,
    };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io)?;
    }
    std::fs::create_dir_all(&partial).map_err(io)?;
    Ok(partial)
}

/// Renames the finished folder into place; an existing `out` (allowed by
/// `--force`) is moved aside first and removed after.
fn put_in_place(partial: &Path, out: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| ModelError::Io { path, cause }
    };
    if out.exists() {
        let old = partial.with_extension("old");
        std::fs::rename(out, &old).map_err(io(out))?;
        std::fs::rename(partial, out).map_err(io(out))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(partial, out).map_err(io(out))?;
    }
    Ok(())
}

/// The end of writing into `partial`: when `written` succeeded, the folder
/// is put in place as `out`; otherwise it is removed, and the error returned.
pub(crate) fn finish<T>(partial: &Path, out: &Path, written: Result<T>) -> Result<T> {
    match written {
        Ok(value) => {
            put_in_place(partial, out)?;
            Ok(value)
        }
        Err(error) => {
            let _ = std::fs::remove_dir_all(partial);
            Err(error)
        }
    }
}

/// Whether `a` and `b` are the same existing folder.
pub(crate) fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
