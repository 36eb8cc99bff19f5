//! PEFT's file format, and only the format: `adapter_config.json` and
//! `adapter_model.safetensors` as `PeftModel.save_pretrained` writes them and
//! `PeftModel.from_pretrained` reads them, turned into (config, tensors) and
//! back; `adapter_model.bin` (PyTorch's pickle, PEFT's default before 0.7)
//! is read too when a folder has no safetensors file, without executing
//! anything in it ([`pickle`]). Which tensor goes to which layer is the model's business
//! ([`crate::model`]).
//!
//! - Tensor keys: `base_model.model.<module path>.<key>` with the adapter's own
//!   key (`lora_A.weight`), no adapter name; metadata `{"format": "pt"}`.
//! - The config: PEFT's field names, keys sorted, indented by two spaces.
//!   `target_modules` is the list of the modules the adapter sits on.
//!
//! Writing puts both files in temporary files in the same folder, syncs
//! them, and only then renames them over the old ones (and syncs the
//! folder), so a save that fails or is killed leaves the previous adapter
//! whole. Reading checks each tensor's header entry on its own first, so a
//! message can name the tensor at fault.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use crate::error::{PeftError, Result};
use crate::kinds::{parse_config, AdapterConfig};

mod pickle;

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensor file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The tensor file PEFT wrote before 0.7 (`safe_serialization=False`):
/// `torch.save` of the dict of tensors. Read when a folder has no
/// [`WEIGHTS_FILE`], never written.
pub const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// The prefix PEFT puts before module paths in tensor keys.
pub(crate) const KEY_PREFIX: &str = "base_model.model.";

/// The two files of a saved adapter, already read, with the paths errors name.
pub(crate) struct AdapterFiles<'a> {
    /// The text of `adapter_config.json`.
    pub config: &'a str,
    /// Where it came from.
    pub config_path: &'a Path,
    /// The bytes of `adapter_model.safetensors`.
    pub weights: &'a [u8],
    /// Where they came from.
    pub weights_path: &'a Path,
}

/// A saved adapter as read: its config and its tensors by file key.
pub(crate) struct DecodedAdapter {
    pub config: Box<dyn AdapterConfig>,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads the two files of the adapter in `dir` and hands them to `read`.
pub(crate) fn with_adapter_files<T>(dir: &Path, read: impl FnOnce(AdapterFiles<'_>) -> Result<T>) -> Result<T> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(|cause| PeftError::Io {
        path: config_path.clone(),
        cause,
    })?;
    let weights_path = adapter_weights_file(dir);
    let bytes = fs::read(&weights_path).map_err(|cause| PeftError::Io {
        path: weights_path.clone(),
        cause,
    })?;
    read(AdapterFiles {
        config: &text,
        config_path: &config_path,
        weights: &bytes,
        weights_path: &weights_path,
    })
}

/// The tensor file of the adapter folder `dir`, as PEFT's
/// `load_peft_weights` picks it: `adapter_model.safetensors` when it is
/// there, else `adapter_model.bin` when that is there, else
/// `adapter_model.safetensors` (for the error naming the missing file).
pub fn adapter_weights_file(dir: &Path) -> PathBuf {
    let safetensors = dir.join(WEIGHTS_FILE);
    let pickle = dir.join(PICKLE_WEIGHTS_FILE);
    if !safetensors.exists() && pickle.is_file() {
        pickle
    } else {
        safetensors
    }
}

/// Whether the tensor bytes read from `path` are PyTorch's pickle rather
/// than safetensors: the file is named `*.bin`, or the bytes are a zip
/// archive (`PK\x03\x04`; a safetensors file starts with its header's
/// length, which would then be over 67 million bytes).
pub(crate) fn is_pickle(path: &Path, bytes: &[u8]) -> bool {
    path.extension().is_some_and(|e| e == "bin") || bytes.starts_with(b"PK\x03\x04")
}

/// The tensors of PyTorch's `adapter_model.bin` (`bytes`, read from
/// `path`), by key, on the CPU: `torch.save` of a flat dict of tensors,
/// read without executing anything. Anything else is refused with
/// [`PeftError::Pickle`] naming the key; integer tensors with
/// [`PeftError::WrongDtype`].
pub fn read_pickled_tensors(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    pickle::read_tensors(bytes, path, &Device::Cpu)
}

/// Parses the config (dispatching on its `peft_type`) and the tensors (on
/// `device`), checking what the format alone can tell: valid JSON of a
/// known kind, a sound safetensors header (or a PyTorch file holding a
/// dict of tensors), floating-point tensors.
pub(crate) fn decode(files: AdapterFiles<'_>, device: &Device) -> Result<DecodedAdapter> {
    let config = parse_config(files.config, files.config_path)?;
    config.validate()?;
    let weights_path = files.weights_path;
    if is_pickle(weights_path, files.weights) {
        // Bytes handed in memory under the safetensors name are named as
        // the file they are.
        let path = if weights_path.file_name().is_some_and(|n| n == WEIGHTS_FILE) {
            weights_path.with_file_name(PICKLE_WEIGHTS_FILE)
        } else {
            weights_path.to_path_buf()
        };
        let tensors = pickle::read_tensors(files.weights, &path, device)?;
        return Ok(DecodedAdapter { config, tensors });
    }
    if let Some((key, problem)) = header_problem(files.weights) {
        return Err(PeftError::TensorHeader {
            path: weights_path.to_path_buf(),
            key,
            problem,
        });
    }
    // The safetensors crate checks the header against the buffer (length,
    // offsets inside the file, shape × dtype = byte count) before candle
    // makes a tensor of it.
    let tensors = candle_core::safetensors::load_buffer(files.weights, device).map_err(|e| PeftError::Safetensors {
        path: weights_path.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some((key, tensor)) = tensors.iter().find(|(_, t)| !t.dtype().is_float()) {
        return Err(PeftError::WrongDtype {
            key: key.clone(),
            found: tensor.dtype().as_str().to_owned(),
        });
    }
    Ok(DecodedAdapter {
        config,
        tensors: tensors.into_iter().collect(),
    })
}

/// Writes an adapter into `dir` (created if needed): `config` (PEFT's
/// fields, `target_modules` included) and `tensors` (by file key).
pub(crate) fn write_adapter(dir: &Path, mut config: Map<String, Value>, tensors: &[(String, Tensor)]) -> Result<()> {
    fs::create_dir_all(dir).map_err(|cause| PeftError::Io {
        path: dir.to_path_buf(),
        cause,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata)).map_err(|e| {
            PeftError::Safetensors {
                path: weights_path.clone(),
                message: e.to_string(),
            }
        })?;
    let config_path = dir.join(CONFIG_FILE);
    // PEFT writes the top-level keys sorted. The patterns inside
    // rank_pattern / alpha_pattern keep their order: the first match wins.
    config.sort_keys();
    let mut json = serde_json::to_string_pretty(&Value::Object(config)).map_err(|cause| PeftError::Json {
        path: config_path.clone(),
        field: None,
        cause,
    })?;
    json.push('\n');

    // Both files are written and synced under temporary names before either
    // replaces the old one: a failure or a crash while writing leaves the
    // previous adapter whole. Tensors are renamed first, so a reader that
    // finds the new config finds the tensors that go with it.
    let weights = StagedFile::write(&weights_path, &bytes)?;
    let config = StagedFile::write(&config_path, json.as_bytes())?;
    weights.commit()?;
    config.commit()?;
    sync_dir(dir)
}

/// A file written and synced under a temporary name beside `path`, waiting
/// to be renamed over it; dropped uncommitted, it removes itself.
struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Writes and syncs `bytes` to `.<name>.tmp-<pid>-<n>` beside `path`.
    fn write(path: &Path, bytes: &[u8]) -> Result<StagedFile> {
        use std::io::Write;
        use std::sync::atomic::{AtomicU64, Ordering};
        // Unique per process and per save, so concurrent saves never share one.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("adapter");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let staged = StagedFile {
            tmp: path.with_file_name(format!(".{file_name}.tmp-{}-{n}", std::process::id())),
            path: path.to_path_buf(),
            committed: false,
        };
        let io_error = |cause| PeftError::Io {
            path: staged.tmp.clone(),
            cause,
        };
        let mut file = fs::File::create(&staged.tmp).map_err(io_error)?;
        file.write_all(bytes).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        Ok(staged)
    }

    /// Renames the file over its final path.
    fn commit(mut self) -> Result<()> {
        fs::rename(&self.tmp, &self.path).map_err(|cause| PeftError::Io {
            path: self.path.clone(),
            cause,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Makes the renames in `dir` durable (a rename lives in the folder's entry,
/// which `sync_all` on the files does not write). Unix only: other systems
/// cannot open a folder as a file.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|folder| folder.sync_all())
        .map_err(|cause| PeftError::Io {
            path: dir.to_path_buf(),
            cause,
        })?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

// ---- header checks ---------------------------------------------------------

/// The first tensor entry of a safetensors header that is wrong on its own:
/// named twice, a shape whose byte count differs from what its offsets hold,
/// offsets past the end of the data. Returns the key and the problem.
///
/// The safetensors crate checks the same (and that the tensors cover the
/// data exactly) but its errors do not say which tensor; and it reads the
/// header into a map, where a second entry silently replaces the first.
/// `None` when every entry is sound or the header itself cannot be read
/// (the safetensors crate then reports what is wrong with it).
fn header_problem(bytes: &[u8]) -> Option<(String, String)> {
    use safetensors::tensor::TensorInfo;
    use serde::de::{Deserializer, MapAccess, Visitor};

    struct FirstProblem {
        data_length: usize,
    }
    impl<'de> Visitor<'de> for FirstProblem {
        type Value = Option<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a safetensors header object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> ::core::result::Result<Self::Value, A::Error> {
            let (mut seen, mut first) = (std::collections::HashSet::new(), None);
            // Read to the end: serde_json refuses a map left half read.
            while let Some(key) = map.next_key::<String>()? {
                let entry: Value = map.next_value()?;
                if first.is_some() || key == "__metadata__" {
                    continue;
                }
                let problem = if !seen.insert(key.clone()) {
                    Some("appears twice in the header".to_owned())
                } else {
                    match serde_json::from_value::<TensorInfo>(entry) {
                        Ok(info) => entry_problem(&info, self.data_length),
                        Err(e) => Some(format!("header entry is not {{dtype, shape, data_offsets}}: {e}")),
                    }
                };
                first = problem.map(|problem| (key, problem));
            }
            Ok(first)
        }
    }

    let length = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(length).ok()?.checked_add(8)?;
    let header = bytes.get(8..end)?;
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(FirstProblem {
            data_length: bytes.len() - end,
        })
        .ok()
        .flatten()
}

/// What is wrong with one tensor's header entry, given the data's length.
pub(crate) fn entry_problem(info: &safetensors::tensor::TensorInfo, data_length: usize) -> Option<String> {
    let (start, end) = info.data_offsets;
    let needed = info
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(info.dtype.bitsize()))
        .map(|bits| bits.div_ceil(8));
    let Some(needed) = needed else {
        return Some(format!("shape {:?} has more values than can be addressed", info.shape));
    };
    if end < start || end > data_length {
        return Some(format!(
            "offsets [{start}, {end}] lie outside the data ({data_length} bytes)"
        ));
    }
    if end - start != needed {
        return Some(format!(
            "shape {:?} of {:?} needs {needed} bytes, but its offsets [{start}, {end}] hold {}",
            info.shape,
            info.dtype,
            end - start
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::header_problem;

    /// A safetensors buffer: `header` and 16 bytes of data.
    fn with_header(header: &str) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 16]);
        bytes
    }

    fn problem(header: &str) -> Option<(String, String)> {
        header_problem(&with_header(header))
    }

    const A: &str = r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    const B: &str = r#""b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}"#;

    #[test]
    fn sound_headers_pass() {
        assert_eq!(
            problem(&format!(r#"{{{A},{B},"__metadata__":{{"format":"pt"}}}}"#)),
            None
        );
    }

    #[test]
    fn the_first_entry_at_fault_is_named() {
        let twice = problem(&format!("{{{A},{B},{A}}}")).unwrap();
        assert_eq!(twice, ("a".into(), "appears twice in the header".into()));
        let short = problem(&format!(
            r#"{{{A},"b":{{"dtype":"F32","shape":[3],"data_offsets":[8,16]}}}}"#
        ))
        .unwrap();
        assert_eq!(short.0, "b");
        assert!(
            short.1.contains("needs 12 bytes") && short.1.contains("hold 8"),
            "{}",
            short.1
        );
        let outside = problem(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,99]}}"#).unwrap();
        assert!(outside.1.contains("outside the data (16 bytes)"), "{}", outside.1);
        let huge = problem(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#).unwrap();
        assert!(huge.1.contains("more values"), "{}", huge.1);
        let odd = problem(r#"{"a":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}}"#).unwrap();
        assert!(odd.1.contains("not {dtype, shape, data_offsets}"), "{}", odd.1);
    }

    #[test]
    fn unreadable_headers_are_left_to_the_safetensors_crate() {
        assert_eq!(problem("{"), None);
        assert_eq!(header_problem(&[1, 2]), None);
        assert_eq!(header_problem(&u64::MAX.to_le_bytes()), None);
    }
}
