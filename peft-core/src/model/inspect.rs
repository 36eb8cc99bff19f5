//! Reading an adapter file that may be damaged, for a report of everything
//! wrong with it: where loading stops at the first problem, these helpers
//! check each tensor on its own, collect every problem and keep the sound
//! tensors, so a tool can go on to check the modules.

use std::collections::HashSet;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::PeftError;
use crate::io::KEY_PREFIX;

/// One tensor entry of an adapter's `adapter_model.safetensors`, read on its own.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The key, as written.
    pub key: String,
    /// The dtype, as the header writes it (`F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The shape, as the header writes it (empty when the entry is unreadable).
    pub shape: Vec<usize>,
    /// The tensor, on the CPU, when its entry is sound and floating point
    /// (what the loader accepts).
    pub tensor: Option<Tensor>,
}

/// Every tensor entry of the safetensors bytes `bytes` (read from `path`,
/// named in errors), each checked on its own as the loader checks them,
/// and every problem found: the header unreadable
/// ([`PeftError::Safetensors`]), an entry named twice, malformed, with a
/// shape and dtype whose byte count differs from what its offsets hold or
/// offsets outside the data ([`PeftError::TensorHeader`]), a tensor that is
/// not floating point ([`PeftError::WrongDtype`]), and what the
/// `safetensors` crate refuses in the file as a whole (gaps or overlaps
/// between tensors) when no entry explains it.
///
/// PyTorch's `adapter_model.bin` (a `*.bin` path or zip bytes) is read
/// whole as loading reads it ([`crate::read_pickled_tensors`]): its first
/// problem is the one listed.
pub fn read_tensor_entries(bytes: &[u8], path: &Path) -> (Vec<TensorEntry>, Vec<PeftError>) {
    if crate::io::is_pickle(path, bytes) {
        return match crate::io::read_pickled_tensors(bytes, path) {
            Ok(tensors) => (
                tensors
                    .into_iter()
                    .map(|(key, tensor)| TensorEntry {
                        key,
                        dtype: format!("{:?}", tensor.dtype()).to_uppercase(),
                        shape: tensor.dims().to_vec(),
                        tensor: Some(tensor),
                    })
                    .collect(),
                Vec::new(),
            ),
            Err(problem) => (Vec::new(), vec![problem]),
        };
    }
    let file_error = |message: String| PeftError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let Some(length) = bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) else {
        return (
            Vec::new(),
            vec![file_error(format!(
                "{} bytes: too short for a safetensors file (8 bytes of header length first)",
                bytes.len()
            ))],
        );
    };
    let header_end = usize::try_from(length).ok().and_then(|n| n.checked_add(8));
    let Some(header) = header_end.and_then(|end| bytes.get(8..end)) else {
        return (
            Vec::new(),
            vec![file_error(format!(
                "the header length {length} runs past the end of the file ({} bytes)",
                bytes.len()
            ))],
        );
    };
    let data = &bytes[8 + header.len()..];
    let raw = match serde_json::from_slice::<Entries>(header) {
        Ok(Entries(raw)) => raw,
        Err(e) => {
            return (
                Vec::new(),
                vec![file_error(format!("the header is not a JSON object: {e}"))],
            )
        }
    };

    let (mut entries, mut problems, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    for (key, value) in raw {
        if key == "__metadata__" {
            continue;
        }
        let header_problem = |problem: String| PeftError::TensorHeader {
            path: path.to_path_buf(),
            key: key.clone(),
            problem,
        };
        if !seen.insert(key.clone()) {
            problems.push(header_problem("appears twice in the header".to_owned()));
            continue;
        }
        let info = match serde_json::from_value::<safetensors::tensor::TensorInfo>(value.clone()) {
            Ok(info) => info,
            Err(e) => {
                problems.push(header_problem(format!(
                    "header entry is not {{dtype, shape, data_offsets}}: {e}"
                )));
                entries.push(TensorEntry {
                    dtype: value.get("dtype").and_then(Value::as_str).unwrap_or("?").to_owned(),
                    key,
                    shape: Vec::new(),
                    tensor: None,
                });
                continue;
            }
        };
        let mut entry = TensorEntry {
            key: key.clone(),
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            tensor: None,
        };
        match entry_bytes(&info, data) {
            Err(problem) => problems.push(header_problem(problem)),
            Ok(slice) => {
                let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), slice);
                match view
                    .map_err(|e| e.to_string())
                    .and_then(|v| v.load(&Device::Cpu).map_err(|e| e.to_string()))
                {
                    Ok(tensor) if tensor.dtype().is_float() => entry.tensor = Some(tensor),
                    Ok(tensor) => problems.push(PeftError::WrongDtype {
                        key: key.clone(),
                        found: tensor.dtype().as_str().to_owned(),
                    }),
                    Err(_) => problems.push(PeftError::WrongDtype {
                        key: key.clone(),
                        found: entry.dtype.clone(),
                    }),
                }
            }
        }
        entries.push(entry);
    }
    if problems.is_empty() {
        // What only the whole file shows: data not covered exactly.
        if let Err(e) = safetensors::SafeTensors::deserialize(bytes) {
            problems.push(file_error(e.to_string()));
        }
    }
    (entries, problems)
}

/// The bytes of one tensor, or why its entry is wrong on its own (the
/// check loading makes, `io::entry_problem`).
fn entry_bytes<'a>(info: &safetensors::tensor::TensorInfo, data: &'a [u8]) -> std::result::Result<&'a [u8], String> {
    match crate::io::entry_problem(info, data.len()) {
        Some(problem) => Err(problem),
        None => Ok(&data[info.data_offsets.0..info.data_offsets.1]),
    }
}

/// A JSON object's entries in file order, a key named twice kept twice
/// (a map would keep one of them silently).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// The module a tensor key of an adapter file belongs to and the adapter
/// tensor's name in it, by the loader's rule: `base_model.model.<module>.<name>`
/// where `<name>` starts at the first segment naming an adapter tensor
/// (`lora_A.weight`, `lora_magnitude_vector`, `ia3_l`, `hada_w1_a`,
/// `lokr_w1`, `base_layer.weight`). `None` for a key that names no module.
///
/// ```
/// use peft_core::split_adapter_key;
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
/// assert_eq!(split_adapter_key(key), Some(("model.layers.0.self_attn.q_proj", "lora_A.weight")));
/// assert_eq!(split_adapter_key("model.layers.0.q_proj.lora_A.weight"), None);
/// ```
pub fn split_adapter_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let mut offset = 0;
    for segment in rest.split('.') {
        let adapter_segment = segment == "base_layer"
            || ["lora_", "ia3_", "hada_", "lokr_"]
                .iter()
                .any(|prefix| segment.starts_with(prefix));
        if adapter_segment {
            return (offset > 0).then(|| (&rest[..offset - 1], &rest[offset..]));
        }
        offset += segment.len() + 1;
    }
    None
}
