//! Where a model is: a checkpoint folder, or a Hub id (`org/name`, with a
//! revision) found in the local Hugging Face cache, the layout
//! `huggingface_hub` and transformers write
//! (`models--org--name/refs/<revision>`, `snapshots/<commit>/`), read with
//! the `hf-hub` crate.
//!
//! The cache folder is `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, as in Python. peft does not download: a
//! Hub id missing from the cache is an error naming the id, the revision
//! and the folder looked in (fetch it with `huggingface-cli download`, or
//! `hf download`, first). Downloading, and `HF_HUB_OFFLINE`, come with a
//! network client.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::CONFIG_FILE;
use crate::error::{ModelError, Result};

/// The cache folder of the Hugging Face Hub on this machine.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The checkpoint folder `model` names: the folder itself when it is one,
/// else the snapshot of the Hub id `model` at `revision` (default `main`)
/// in [`cache_dir`].
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_in(model, revision, &cache_dir())
}

/// [`resolve`] with the cache folder given.
pub fn resolve_in(model: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: "checkpoint folder (or a Hub id org/name)",
        });
    }
    let revision = revision.unwrap_or("main");
    let repo = Repo::with_revision(model.to_owned(), RepoType::Model, revision.to_owned());
    // A branch or tag goes through refs/<revision> (hf-hub); a commit hash
    // names its snapshot directly, as huggingface_hub allows.
    let by_commit = is_commit(revision)
        .then(|| cache.join(repo.folder_name()).join("snapshots").join(revision))
        .filter(|dir| dir.join(CONFIG_FILE).is_file());
    let by_ref = || Cache::new(cache.to_path_buf()).repo(repo.clone()).get(CONFIG_FILE);
    match by_commit.or_else(|| by_ref().and_then(|config| config.parent().map(Path::to_path_buf))) {
        Some(snapshot) => Ok(snapshot),
        None => Err(ModelError::NotInCache {
            repo: model.to_owned(),
            revision: revision.to_owned(),
            cache: cache.to_path_buf(),
        }),
    }
}

/// A full commit hash: 40 hexadecimal digits.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// `org/name`: two non-empty parts of letters, digits, `-`, `_` and `.`.
fn is_hub_id(model: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(model.split_once('/'), Some((org, name)) if valid(org) && valid(name))
}

#[cfg(test)]
mod tests {
    use super::is_hub_id;

    #[test]
    fn hub_ids_are_org_slash_name() {
        assert!(is_hub_id("Qwen/Qwen3-0.6B"));
        assert!(is_hub_id("meta-llama/Llama-3.2-1B"));
        for not_an_id in ["gpt2", "a/b/c", "/abs", "org/", "../x", "org/na me"] {
            assert!(!is_hub_id(not_an_id), "{not_an_id}");
        }
    }
}
