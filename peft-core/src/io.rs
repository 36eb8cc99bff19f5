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
//! Saving writes each file to a temporary file in the same folder and renames
//! it over the old one, so an interrupted save never leaves a half-written file.
//! Loading checks everything (config, targets, every tensor's presence and
//! shape) before it changes the model.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::de::{self, Deserializer, MapAccess, Visitor as SerdeVisitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::adapter::LinearAdapter;
use crate::config::AdapterConfig;
use crate::error::{InModule, PeftError, Result};
use crate::lora::{LoraConfig, LoraInit};
use crate::model::{PeftModel, DEFAULT_ADAPTER};
use crate::targets::{all_linear, modules, regex};

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensor file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module paths in tensor keys.
const KEY_PREFIX: &str = "base_model.model.";

/// Where PEFT saves adapter `name` under `dir`: `dir` itself for `"default"`,
/// `dir/<name>` otherwise.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == DEFAULT_ADAPTER {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

// ---- saving -------------------------------------------------------------------

/// Writes adapter `name` of `model` into `dir` (created if needed).
pub(crate) fn save_adapter<M: PeftModel + ?Sized>(model: &M, dir: &Path, name: &str) -> Result<()> {
    let layers = model.linear_layers();
    let adapted: Vec<_> = layers.iter().filter(|l| l.layer.has_adapter(name)).collect();
    let Some(first) = adapted.first() else {
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
    let mut target_modules: Vec<&str> = adapted.iter().map(|l| l.path.as_str()).collect();
    target_modules.sort_unstable();
    config.insert("target_modules".into(), Value::from(target_modules));
    if adapted.iter().any(|l| l.layer.is_fan_in_fan_out()) {
        // PEFT forces this for Conv1D layers too.
        config.insert("fan_in_fan_out".into(), Value::Bool(true));
    }

    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for layer in &adapted {
        let adapter = layer.layer.adapter(name).expect("filtered on has_adapter");
        for (key, var) in adapter.trainable_vars() {
            tensors.push((format!("{KEY_PREFIX}{}.{key}", layer.path), var.as_tensor().clone()));
        }
    }

    let dir = adapter_dir(dir, name);
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
    // Tensors first, config last: a reader that finds the new config finds
    // the tensors that go with it.
    write_atomically(&weights_path, &bytes)?;
    let mut json = serde_json::to_string_pretty(&Value::Object(config)).expect("a JSON map serializes");
    json.push('\n');
    write_atomically(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("adapter");
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PeftError::Io { path, source }
    };
    let result = (|| {
        use std::io::Write;
        let mut file = fs::File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(bytes).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
        fs::rename(&tmp, path).map_err(io_error(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// PEFT's `adapter_config.json` fields for a LoRA config, except `target_modules`.
pub(crate) fn lora_config_json(config: &LoraConfig) -> Map<String, Value> {
    let init = match config.init_lora_weights {
        LoraInit::Default => Value::Bool(true),
        LoraInit::Random => Value::Bool(false),
        LoraInit::Gaussian => Value::from("gaussian"),
    };
    let pattern = |entries: Vec<(String, Value)>| Value::Object(entries.into_iter().collect());
    let optional = |value: &Option<String>| value.as_deref().map_or(Value::Null, Value::from);
    let fields = [
        ("peft_type", Value::from("LORA")),
        ("r", Value::from(config.r)),
        ("lora_alpha", number(config.lora_alpha)),
        ("lora_dropout", float(f64::from(config.lora_dropout))),
        ("use_rslora", Value::Bool(config.use_rslora)),
        ("use_dora", Value::Bool(false)),
        ("fan_in_fan_out", Value::Bool(config.fan_in_fan_out)),
        ("bias", Value::from("none")),
        ("init_lora_weights", init),
        ("exclude_modules", config.target_modules.exclude_modules_json()),
        // target_modules is saved as the exact list of adapted modules, so a
        // layer filter has nothing left to do (and PEFT's own index rule
        // differs from ours): these are saved as null.
        ("layers_to_transform", Value::Null),
        ("layers_pattern", Value::Null),
        (
            "rank_pattern",
            pattern(
                config
                    .rank_pattern
                    .iter()
                    .map(|(k, r)| (k.clone(), Value::from(*r)))
                    .collect(),
            ),
        ),
        (
            "alpha_pattern",
            pattern(
                config
                    .alpha_pattern
                    .iter()
                    .map(|(k, a)| (k.clone(), number(*a)))
                    .collect(),
            ),
        ),
        ("modules_to_save", Value::Null),
        ("task_type", optional(&config.task_type)),
        ("base_model_name_or_path", optional(&config.base_model_name_or_path)),
        ("revision", optional(&config.revision)),
        ("inference_mode", Value::Bool(true)),
    ];
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// An integral value as a JSON integer (PEFT writes `lora_alpha: 8`), any
/// other as a float.
fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        Value::from(value as i64)
    } else {
        float(value)
    }
}

/// A float as JSON; values that came from an `f32` (dropout) print as their
/// shortest decimal, `0.05`, not `0.05000000074505806`.
fn float(value: f64) -> Value {
    let single = value as f32;
    let value = if f64::from(single) == value {
        single.to_string().parse().unwrap_or(value)
    } else {
        value
    };
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

// ---- loading ------------------------------------------------------------------

/// Reads the adapter in `dir` and adds it to `model` under `name`.
pub(crate) fn load_adapter<M: PeftModel + ?Sized>(model: &mut M, dir: &Path, name: &str) -> Result<()> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(|source| PeftError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config = parse_config(&text, &config_path)?;
    config.validate()?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&weights_path).map_err(|source| PeftError::Io {
        path: weights_path.clone(),
        source,
    })?;
    let device = model
        .linear_layers()
        .first()
        .map_or(Device::Cpu, |l| l.layer.weight().device().clone());
    let tensors = candle_core::safetensors::load_buffer(&bytes, &device).map_err(|e| PeftError::Safetensors {
        path: weights_path.clone(),
        message: e.to_string(),
    })?;

    let adapters = {
        let layers = model.linear_layers();
        let chosen = config
            .target_modules
            .resolve(layers.iter().map(|l| (l.path.as_str(), l.role)))?;
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
            let adapter = config.linear_adapter(&layer.path, layer.layer).in_module(&layer.path)?;
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

/// Adapter kinds `load_adapter` can read, by PEFT's `peft_type`.
const SUPPORTED_TYPES: &[&str] = &["LORA"];

/// Parses `adapter_config.json` into a config, refusing what it cannot honour.
fn parse_config(text: &str, path: &Path) -> Result<LoraConfig> {
    let json_error = |source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    };
    #[derive(Deserialize)]
    struct PeftType {
        peft_type: Option<String>,
    }
    let kind: PeftType = serde_json::from_str(text).map_err(json_error)?;
    let found = kind.peft_type.unwrap_or_default();
    if !SUPPORTED_TYPES.contains(&found.as_str()) {
        return Err(PeftError::UnsupportedPeftType {
            found,
            supported: SUPPORTED_TYPES.join(", "),
        });
    }
    let file: LoraConfigFile = serde_json::from_str(text).map_err(json_error)?;
    file.into_config()
}

/// `adapter_config.json` of a LoRA adapter, as PEFT writes it.
#[derive(Deserialize)]
struct LoraConfigFile {
    #[serde(default = "default_rank")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f32,
    #[serde(default)]
    target_modules: Option<OneOrMany<String>>,
    #[serde(default)]
    exclude_modules: Option<OneOrMany<String>>,
    #[serde(default)]
    layers_to_transform: Option<OneOrMany<usize>>,
    #[serde(default)]
    layers_pattern: Option<OneOrMany<String>>,
    #[serde(default, deserialize_with = "ordered_map")]
    rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered_map")]
    alpha_pattern: Vec<(String, f64)>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    init_lora_weights: Option<Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    revision: Option<String>,
    /// Every other field: PEFT has many options; any that is set to something
    /// other than its "off" value is refused.
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

fn default_rank() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

/// Fields that describe the file rather than the computation.
const METADATA_FIELDS: &[&str] = &[
    "peft_type",
    "peft_version",
    "auto_mapping",
    "inference_mode",
    "megatron_core",
    "qalora_group_size",
];

impl LoraConfigFile {
    fn into_config(self) -> Result<LoraConfig> {
        let unsupported = |field: &str, value: String, reason| {
            Err(PeftError::UnsupportedOption {
                field: field.to_owned(),
                value,
                reason,
            })
        };
        if self.use_dora {
            return unsupported("use_dora", "true".into(), "DoRA is not implemented yet");
        }
        if let Some(bias) = self.bias.as_deref().filter(|b| *b != "none") {
            return unsupported("bias", format!("{bias:?}"), "only bias = \"none\" is implemented");
        }
        if let Some(modules) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return unsupported(
                "modules_to_save",
                format!("{modules:?}"),
                "modules_to_save is not implemented yet",
            );
        }
        let init =
            match &self.init_lora_weights {
                None | Some(Value::Bool(true)) => LoraInit::Default,
                Some(Value::Bool(false)) => LoraInit::Random,
                Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
                Some(other) => return unsupported(
                    "init_lora_weights",
                    other.to_string(),
                    "this initialisation changes the base weights (PiSSA, OLoRA, LoftQ, ...) and is not implemented",
                ),
            };
        for (field, value) in &self.other {
            let off = match value {
                Value::Null | Value::Bool(false) => true,
                Value::Array(items) => items.is_empty(),
                Value::Object(fields) => fields.is_empty(),
                _ => false,
            };
            if !off && !METADATA_FIELDS.contains(&field.as_str()) {
                return unsupported(field, value.to_string(), "this PEFT option is not implemented");
            }
        }

        let mut targets = match self.target_modules {
            None => {
                return unsupported(
                    "target_modules",
                    "null".into(),
                    "PEFT's per-architecture default targets are not known here; list the modules",
                )
            }
            Some(OneOrMany::One(s)) if s == "all-linear" => all_linear(),
            Some(OneOrMany::One(pattern)) => regex(&pattern),
            Some(OneOrMany::Many(names)) => modules(names),
        };
        match self.exclude_modules {
            None => {}
            Some(OneOrMany::One(pattern)) => targets = targets.exclude_regex(&pattern),
            Some(OneOrMany::Many(names)) => targets = targets.exclude(names),
        }
        if let Some(layers) = self.layers_to_transform {
            targets = targets.layers(layers.into_vec());
            if let Some(patterns) = self.layers_pattern {
                targets = targets.layers_pattern(patterns.into_vec());
            }
        }

        let mut config = LoraConfig::from(targets)
            .rank(self.r)
            .alpha(self.lora_alpha)
            .dropout(self.lora_dropout)
            .rslora(self.use_rslora)
            .init(init)
            .fan_in_fan_out(self.fan_in_fan_out);
        config.rank_pattern = self.rank_pattern;
        config.alpha_pattern = self.alpha_pattern;
        config.task_type = self.task_type;
        config.base_model_name_or_path = self.base_model_name_or_path;
        config.revision = self.revision;
        Ok(config)
    }
}

/// A JSON value that PEFT accepts as one item or a list (`target_modules`,
/// `layers_to_transform`, ...).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(item) => vec![item],
            OneOrMany::Many(items) => items,
        }
    }
}

/// A JSON object (or null) as a list of entries in file order: PEFT picks the
/// first matching `rank_pattern` key in that order.
fn ordered_map<'de, D, V>(deserializer: D) -> ::core::result::Result<Vec<(String, V)>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> SerdeVisitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E: de::Error>(self) -> ::core::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> ::core::result::Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_any(Entries(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::{float, number};

    #[test]
    fn numbers_print_as_python_does() {
        assert_eq!(number(8.0).to_string(), "8");
        assert_eq!(number(2.5).to_string(), "2.5");
        assert_eq!(float(f64::from(0.05f32)).to_string(), "0.05");
        assert_eq!(float(0.0).to_string(), "0.0");
        assert_eq!(float(0.1).to_string(), "0.1");
    }
}
