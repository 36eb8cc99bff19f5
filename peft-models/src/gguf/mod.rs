//! A PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF, the file
//! `llama-cli -m base.gguf --lora adapter.gguf` loads.
//!
//! [`export_lora_gguf`] writes what llama.cpp's own `convert_lora_to_gguf.py`
//! writes for the same adapter folder and base `config.json`: the same
//! metadata keys, value types and order, the same tensors (`blk.N.attn_q.weight.lora_a`,
//! `.lora_b`, ...) in the same order, layout, dtype (F32: the script keeps
//! every LoRA tensor in F32 whatever its `--outtype`, since their names do
//! not end in `.weight`) and values, including the rows of q_proj's and
//! k_proj's LoRA B that the script permutes for Llama and Mistral (llama.cpp
//! rotates interleaved pairs where transformers rotates halves). On the
//! fixtures in `tests/fixtures/gguf_export/` the files are byte-for-byte the
//! script's.
//!
//! Where the script writes a file llama.cpp would apply wrongly or refuse,
//! this module differs, on purpose:
//!
//! - GPT-2: the script transposes the LoRA factors as it transposes the
//!   base's `Conv1D` weights, swapping A and B; but PEFT stores GPT-2's LoRA
//!   factors as for a linear layer already, so llama.cpp refuses
//!   `attn_qkv` ("incorrect shape") and applies the transpose of the update
//!   to the square layers. Here A and B are written as PEFT stores them.
//! - rsLoRA, an `alpha_pattern` that changes alpha, `lora_alpha` 0, LoRA
//!   biases, and LoRA initialisations that change the base weights (PiSSA,
//!   OLoRA, CorDA, LoftQ) are refused: llama.cpp scales every pair by
//!   `adapter.lora.alpha / rank` and adds nothing else, so the script's file
//!   would not compute what PEFT computes. `rank_pattern` is fine: llama.cpp
//!   reads each pair's rank from its tensors.
//! - Tensors other than LoRA factors (full weights from `modules_to_save`,
//!   norms) are refused: llama.cpp ignores them when it loads the adapter.
//! - Shapes are checked against the base's `config.json` (the script leaves
//!   that to llama.cpp at load time).
//!
//! LoHa, LoKr, DoRA and IA³ adapters are refused with
//! [`ModelError::ExportKind`]: llama.cpp loads plain LoRA only.
//!
//! The file is written with candle's GGUF writer
//! ([`gguf_file::write`]), which stamps GGUF version 2; gguf-py writes
//! version 3, which only added big-endian files, so for these little-endian
//! files the layout is the same and the version field is set to 3 after
//! candle writes the file.

// The parts: `adapter` reads and checks the PEFT adapter (its settings, its
// LoRA pairs), `arch` maps the base's `config.json` to llama.cpp's
// architecture, tensor names and shapes (and permutes q/k), `metadata`
// gathers the GGUF metadata as gguf-py's `Metadata` does, `naming` holds
// gguf-py's heuristics for model ids and folder names, `model_card` reads
// `README.md`'s front matter; this file holds the API and the writer.
mod adapter;
mod arch;
mod metadata;
mod model_card;
mod naming;

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

use adapter::{check_pair, pair_lora_tensors, AdapterSettings, ADAPTER_WEIGHTS};
use arch::BaseModel;
use metadata::gguf_metadata;

/// The `model_type`s whose adapters [`export_lora_gguf`] exports.
pub const GGUF_MODEL_TYPES: &[&str] = &["gemma2", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3"];

/// The GGUF version gguf-py writes (candle's writer stamps 2).
const GGUF_VERSION: u32 = 3;

/// How [`export_lora_gguf`] treats an existing output file.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Replace an existing output file (otherwise it is refused with
    /// [`ModelError::OutputExists`]).
    pub force: bool,
}

/// What [`export_lora_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufReport {
    /// The GGUF file.
    pub path: PathBuf,
    /// The base's `model_type` (`mistral`, ...).
    pub model_type: String,
    /// llama.cpp's architecture name, `general.architecture` (`llama` for
    /// Mistral too).
    pub architecture: &'static str,
    /// `adapter.lora.alpha`: llama.cpp scales each pair by alpha / rank.
    pub alpha: f32,
    /// The metadata, in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensors, in file order.
    pub tensors: Vec<GgufTensor>,
    /// The file's size in bytes.
    pub bytes: u64,
    /// Things worth knowing that did not stop the export: adapter tensors
    /// skipped as the script skips them, model-card fields not read.
    pub notes: Vec<String>,
}

/// One tensor of the GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Its GGUF name (`blk.0.attn_q.weight.lora_b`).
    pub name: String,
    /// Its shape, rows first as in PyTorch (GGUF lists the dimensions the
    /// other way round: `[32, 4]` here is `{4, 32}` in `gguf-dump`).
    pub shape: Vec<usize>,
    /// Its GGUF dtype (always F32, as the script writes LoRA tensors).
    pub dtype: GgmlDType,
    /// The adapter tensor it was made from.
    pub source: String,
    /// Whether its rows were permuted for llama.cpp's rotary embedding
    /// (LoRA B of q_proj and k_proj in Llama and Mistral).
    pub permuted: bool,
}

/// Writes the PEFT LoRA adapter in `adapter_dir` (`adapter_config.json`,
/// `adapter_model.safetensors`, and `README.md` for the metadata) as
/// llama.cpp's LoRA adapter GGUF at `out`, for the base model whose
/// `config.json` is in `model_dir` (only the config is read).
///
/// The file is written to a temporary file beside `out` and renamed into
/// place, so `out` is either the old file or the whole new one. An existing
/// `out` is refused unless `options.force` is set.
///
/// Errors name what is at fault: [`ModelError::ExportKind`] for adapters
/// that are not plain LoRA (checked first, whatever the base),
/// [`ModelError::ExportSetting`] for a config field the export cannot
/// honour, [`ModelError::ExportTensor`] and [`ModelError::ExportShape`] for
/// a tensor that does not fit the base, [`ModelError::UnknownModelType`]
/// for a base it does not know.
pub fn export_lora_gguf(
    adapter_dir: &Path,
    model_dir: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<GgufReport> {
    let settings = AdapterSettings::read(adapter_dir)?;
    let weights_path = adapter_dir.join(ADAPTER_WEIGHTS);
    if !weights_path.is_file() {
        return Err(ModelError::MissingFile {
            path: weights_path,
            what: "the adapter's weights (adapter_model.safetensors; a pickled adapter_model.bin is not read)",
        });
    }
    let bytes = std::fs::read(&weights_path).map_err(|cause| ModelError::Io {
        path: weights_path.clone(),
        cause,
    })?;
    let safetensors_error = |error: safetensors::SafeTensorError| ModelError::Safetensors {
        path: weights_path.clone(),
        message: error.to_string(),
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(safetensors_error)?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(safetensors_error)?;
    // The order load_file gives the script: by offset in the file.
    let keys = header.offset_keys();
    let mut notes = Vec::new();
    let pairs = pair_lora_tensors(&weights_path, &keys, &mut notes)?;

    let base = BaseModel::read(model_dir)?;
    let mut tensors = Vec::with_capacity(2 * pairs.len());
    let mut report_tensors = Vec::with_capacity(2 * pairs.len());
    // The script's parameter count (negative: it marks a LoRA adapter),
    // which its metadata heuristics use to read size labels.
    let mut total_params: i64 = 0;
    for pair in &pairs {
        let target = base.target(&weights_path, pair)?;
        let load = |key: &str| -> Result<Tensor> {
            let view = file.tensor(key).map_err(safetensors_error)?;
            // Exact for f16 and bf16, as the script's float32 conversion.
            Ok(view.load(&Device::Cpu)?.to_dtype(DType::F32)?)
        };
        let a = load(&pair.a)?;
        let b = load(&pair.b)?;
        check_pair(&weights_path, pair, &a, &b, target.expected)?;
        let (a, b, permuted) = target.transform(&weights_path, pair, a, b)?;
        let (a_dims, b_dims) = (a.dims().to_vec(), b.dims().to_vec());
        total_params += (b_dims[0] * a_dims[1]) as i64;
        for (suffix, tensor, source, dims, permuted) in [
            ("lora_a", a, &pair.a, a_dims, false),
            ("lora_b", b, &pair.b, b_dims, permuted),
        ] {
            let name = format!("{}.{suffix}", target.name);
            tensors.push((name.clone(), QTensor::quantize(&tensor, GgmlDType::F32)?));
            report_tensors.push(GgufTensor {
                name,
                shape: dims,
                dtype: GgmlDType::F32,
                source: source.clone(),
                permuted,
            });
        }
    }
    let metadata = gguf_metadata(adapter_dir, model_dir, &base, &settings, -total_params, &mut notes);

    if out.exists() && !options.force {
        return Err(ModelError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let written = write_atomically(out, &metadata, &tensors)?;
    Ok(GgufReport {
        path: out.to_path_buf(),
        model_type: base.model_type.clone(),
        architecture: base.arch.gguf_name(),
        alpha: settings.alpha as f32,
        metadata,
        tensors: report_tensors,
        bytes: written,
        notes,
    })
}

/// Checks `adapter_dir`'s `adapter_config.json` as [`export_lora_gguf`]
/// does first: its kind (plain LoRA) and the settings llama.cpp cannot
/// apply. A command can call it before it fetches the base model.
pub fn check_lora_adapter(adapter_dir: &Path) -> Result<()> {
    AdapterSettings::read(adapter_dir).map(|_| ())
}

// ---------------------------------------------------------------------------
// Writing

/// Writes the GGUF to a temporary file beside `out`, then renames it into
/// place; the size in bytes.
fn write_atomically(out: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<u64> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| ModelError::Io { path, cause }
    };
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<u64> {
        let file = File::create(&temp).map_err(io_error(&temp))?;
        let mut writer = BufWriter::new(file);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut writer, &metadata, &tensors)?;
        let bytes = writer.stream_position().map_err(io_error(&temp))?;
        // candle stamps version 2; v3 differs only for big-endian files.
        writer.seek(SeekFrom::Start(4)).map_err(io_error(&temp))?;
        writer.write_all(&GGUF_VERSION.to_le_bytes()).map_err(io_error(&temp))?;
        let file = writer.into_inner().map_err(|e| ModelError::Io {
            path: temp.clone(),
            cause: e.into_error(),
        })?;
        file.sync_all().map_err(io_error(&temp))?;
        std::fs::rename(&temp, out).map_err(io_error(out))?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
