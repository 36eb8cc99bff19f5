//! PEFT's file format: `adapter_config.json` and `adapter_model.safetensors`,
//! as `PeftModel.save_pretrained` writes them and `PeftModel.from_pretrained`
//! reads them.
//!
//! - Tensor keys: `base_model.model.<module path>.<key>` with the adapter's own
//!   key (`lora_A.weight`), no adapter name; metadata `{"format": "pt"}`.
//! - The config: PEFT's field names, keys sorted, indented by two spaces.
//!   `target_modules` is the list of the modules the adapter sits on.
//! - An adapter other than `"default"` is saved in a subfolder named after it.
//!
//! Saving writes both files to temporary files in the same folder, syncs
//! them, and only then renames them over the old ones (and syncs the
//! folder), so a save that fails or is killed leaves the previous adapter
//! whole.
//! Loading checks everything (config, targets, every tensor's presence and
//! shape) before it changes the model.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use crate::adapter::LinearAdapter;
use crate::error::{InModule, PeftError, Result};
use crate::model::{PeftModel, DEFAULT_ADAPTER};

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensor file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module paths in tensor keys.
const KEY_PREFIX: &str = "base_model.model.";

/// Where PEFT saves adapter `name` under `dir`: `dir` itself for `"default"`,
/// `dir/<name>` otherwise. A name that would not stay one folder below `dir`
/// (see [`check_adapter_name`]) is an error.
pub fn adapter_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    check_adapter_name(name)?;
    Ok(if name == DEFAULT_ADAPTER {
        dir.to_path_buf()
    } else {
        dir.join(name)
    })
}

/// Refuses adapter names that cannot be a single folder name below the folder
/// adapters are saved in: empty, `.` or `..`, with a path separator (`/`, or
/// `\` as Windows reads it; an absolute path has one too) or a control
/// character. [`PeftModel::add_adapter`], `load_adapter` and `save_adapter`
/// check this first. PEFT uses the name as a subfolder the same way but does
/// not check it.
pub fn check_adapter_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name == "." || name == ".." {
        "it names a folder itself or its parent, not a subfolder"
    } else if name.contains(['/', '\\']) {
        "it contains a path separator, so it would not be one folder below the one given"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(PeftError::InvalidAdapterName {
        name: name.to_owned(),
        reason,
    })
}

// ---- saving -------------------------------------------------------------------

/// Writes adapter `name` of `model` into `dir` (created if needed).
pub(crate) fn save_adapter<M: PeftModel + ?Sized>(model: &M, dir: &Path, name: &str) -> Result<()> {
    check_adapter_name(name)?;
    let layers = model.linear_layers();
    let adapted: Vec<_> = layers
        .iter()
        .filter_map(|l| l.layer.adapter(name).map(|adapter| (l, adapter)))
        .collect();
    let Some((first, _)) = adapted.first() else {
        return Err(PeftError::UnknownAdapter {
            adapter: name.to_owned(),
            known: model.adapter_names().join(", "),
        });
    };
    let mut config = match first.layer.adapter_config(name) {
        Some(config) => Map::clone(config),
        None => {
            return Err(PeftError::UnsupportedOption {
                field: "config".into(),
                value: format!("{name:?}"),
                reason: "the adapter was attached by hand with Linear::add_adapter, so its config is unknown; \
                         add it with PeftModel::add_adapter to save it",
            })
        }
    };
    let mut target_modules: Vec<&str> = adapted.iter().map(|(l, _)| l.path.as_str()).collect();
    target_modules.sort_unstable();
    config.insert("target_modules".into(), Value::from(target_modules));
    if adapted.iter().any(|(l, _)| l.layer.is_fan_in_fan_out()) {
        // PEFT forces this for Conv1D layers too.
        config.insert("fan_in_fan_out".into(), Value::Bool(true));
    }

    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (layer, adapter) in &adapted {
        for (key, var) in adapter.trainable_vars() {
            tensors.push((format!("{KEY_PREFIX}{}.{key}", layer.path), var.as_tensor().clone()));
        }
    }

    let dir = adapter_dir(dir, name)?;
    fs::create_dir_all(&dir).map_err(|source| PeftError::Io {
        path: dir.clone(),
        source,
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
    let mut json = serde_json::to_string_pretty(&Value::Object(config)).map_err(|source| PeftError::Json {
        path: config_path.clone(),
        field: None,
        source,
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
    sync_dir(&dir)
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
        let io_error = |source| PeftError::Io {
            path: staged.tmp.clone(),
            source,
        };
        let mut file = fs::File::create(&staged.tmp).map_err(io_error)?;
        file.write_all(bytes).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        Ok(staged)
    }

    /// Renames the file over its final path.
    fn commit(mut self) -> Result<()> {
        fs::rename(&self.tmp, &self.path).map_err(|source| PeftError::Io {
            path: self.path.clone(),
            source,
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
        .map_err(|source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

// ---- loading ------------------------------------------------------------------

/// Reads the adapter in `dir` and adds it to `model` under `name`.
pub(crate) fn load_adapter<M: PeftModel + ?Sized>(model: &mut M, dir: &Path, name: &str) -> Result<()> {
    check_adapter_name(name)?;
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(|source| PeftError::Io {
        path: config_path.clone(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&weights_path).map_err(|source| PeftError::Io {
        path: weights_path.clone(),
        source,
    })?;
    let files = AdapterFiles {
        config: &text,
        config_path: &config_path,
        weights: &bytes,
        weights_path: &weights_path,
    };
    load_adapter_from(model, files, name)
}

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

/// Adds the adapter in `files` to `model` under `name`, checking everything
/// before the model changes.
pub(crate) fn load_adapter_from<M: PeftModel + ?Sized>(
    model: &mut M,
    files: AdapterFiles<'_>,
    name: &str,
) -> Result<()> {
    check_adapter_name(name)?;
    crate::model::check_new_name(model, name)?;
    let config = crate::config_file::parse_config(files.config, files.config_path)?;
    config.validate()?;

    let weights_path = files.weights_path;
    let device = model.linear_layers().first().map_or(Device::Cpu, |l| l.layer.device());
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
    let tensors =
        candle_core::safetensors::load_buffer(files.weights, &device).map_err(|e| PeftError::Safetensors {
            path: weights_path.to_path_buf(),
            message: e.to_string(),
        })?;
    if let Some((key, tensor)) = tensors.iter().find(|(_, t)| !t.dtype().is_float()) {
        return Err(PeftError::WrongDtype {
            key: key.clone(),
            found: tensor.dtype().as_str().to_owned(),
        });
    }

    let adapters = {
        let layers = model.linear_layers();
        let chosen = config
            .targets()
            .resolve(layers.iter().map(|l| (l.path.as_str(), l.role, l.layer.kind())))?;
        let mut unused: BTreeMap<&str, &Tensor> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut adapters: Vec<(usize, Box<dyn LinearAdapter>)> = Vec::with_capacity(chosen.len());
        for i in chosen {
            let layer = &layers[i];
            if layer.layer.has_adapter(name) {
                return Err(PeftError::AdapterExists {
                    module: layer.path.clone(),
                    adapter: name.to_owned(),
                });
            }
            let prefix = format!("{KEY_PREFIX}{}.", layer.path);
            let file_values = unused
                .iter()
                .filter(|(key, _)| key.starts_with(&prefix))
                .map(|(_, tensor)| tensor.elem_count())
                .sum();
            config.check_layer(&layer.path, layer.layer, Some(file_values))?;
            let adapter = config.linear_adapter(&layer.path, layer.layer).in_module(&layer.path)?;
            layer
                .layer
                .check_attach(name, &*adapter)
                .map_err(|e| crate::model::relocate(e, &layer.path))?;
            for (key, var) in adapter.trainable_vars() {
                let file_key = format!("{KEY_PREFIX}{}.{key}", layer.path);
                let Some(tensor) = unused.remove(file_key.as_str()) else {
                    return Err(PeftError::MissingTensor {
                        module: layer.path.clone(),
                        key: file_key,
                    });
                };
                if tensor.dims() != var.dims() {
                    return Err(PeftError::ShapeMismatch {
                        key: file_key,
                        expected: var.dims().to_vec(),
                        found: tensor.dims().to_vec(),
                    });
                }
                // f16/bf16 files load into the model's dtype.
                var.set(&tensor.to_dtype(var.dtype()).in_module(&layer.path)?)
                    .in_module(&layer.path)?;
            }
            adapters.push((i, adapter));
        }
        if !unused.is_empty() {
            return Err(PeftError::UnexpectedTensors {
                keys: unused.keys().map(|k| k.to_string()).collect(),
            });
        }
        adapters
    };

    let saved = std::sync::Arc::new(config.to_peft_config());
    let mut layers = model.linear_layers_mut();
    for (i, adapter) in adapters {
        layers[i].layer.insert_adapter(name, adapter, Some(saved.clone()));
    }
    Ok(())
}

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
fn entry_problem(info: &safetensors::tensor::TensorInfo, data_length: usize) -> Option<String> {
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
