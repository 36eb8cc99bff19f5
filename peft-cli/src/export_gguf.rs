//! `peft export-gguf`: a PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF
//! ([`peft_models::gguf::export_lora_gguf`]).

use std::io::Write;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value;
use peft_models::gguf::{check_lora_adapter, export_lora_gguf, ExportOptions};
use serde_json::{json, Value as Json};

use crate::{model_dir, CliResult, Dtype, ModelArgs};

/// What `peft export-gguf --help` says after the flags.
const AFTER_HELP: &str = "\
The file is the one llama.cpp's own convert_lora_to_gguf.py writes for the
adapter: the same metadata, tensor names and order, F32 values, and the q/k
row permutation of Llama and Mistral. llama.cpp applies it on top of a GGUF
of the same base model (from convert_hf_to_gguf.py, any quantization):

  llama-cli -m base.gguf --lora adapter.gguf
  llama-cli -m base.gguf --lora-scaled adapter.gguf 0.5

Architectures: llama, mistral, qwen2, qwen3, gemma2, phi3, gpt2. GPT-2's
factors are written as PEFT stores them (the Python script swaps and
transposes them, which llama.cpp refuses).

Refused, with the reason:
  LoHa, LoKr, DoRA, IA3   llama.cpp applies plain LoRA only; make a LoRA first:
                          peft convert --adapter DIR --to lora --rank R --out DIR2
  rsLoRA, alpha_pattern   llama.cpp scales every pair by one alpha / rank
  modules_to_save         full weights: llama.cpp loads lora_a/lora_b pairs only
  a module or shape the base's config.json does not have";

/// `peft export-gguf`'s flags.
#[derive(clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct ExportGgufArgs {
    /// The PEFT LoRA adapter folder (adapter_config.json and
    /// adapter_model.safetensors; README.md's model card gives the
    /// general.* metadata, as the Python script reads it), or a Hub id
    /// (org/name).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub adapter: PathBuf,
    /// The base model: a checkpoint folder (config.json alone will do) or a
    /// Hub id (org/name; one not in the Hugging Face cache is downloaded as
    /// the other commands download it, weights included). Only config.json
    /// is read: the architecture (model_type), the head counts for the q/k
    /// permutation, the sizes the adapter's shapes are checked against.
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub model: String,
    /// The revision of a Hub id: a branch, a tag or a commit hash.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The GGUF file to write (written beside and renamed into place).
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object: the file, its metadata (key, type, value) and
    /// its tensors (name, dtype, shape, the adapter tensor it came from).
    #[arg(long)]
    pub json: bool,
}

/// `peft export-gguf`.
pub fn export_gguf_command(args: ExportGgufArgs) -> CliResult {
    // The adapter first: no base model is fetched for an adapter that is refused.
    let adapter = crate::adapter_dir(&args.adapter)?;
    check_lora_adapter(&adapter)?;
    let dir = model_dir(&ModelArgs {
        model: args.model.clone(),
        revision: args.revision.clone(),
        dtype: Dtype::F32,
        quantize: None,
    })?;
    let options = ExportOptions { force: args.force };
    let report = export_lora_gguf(&adapter, &dir, &args.out, &options)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let metadata: Vec<Json> = report
            .metadata
            .iter()
            .map(|(key, value)| json!({ "key": key, "type": type_name(value), "value": to_json(value) }))
            .collect();
        let tensors: Vec<Json> = report
            .tensors
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "dtype": format!("{:?}", t.dtype),
                    "shape": t.shape,
                    "source": t.source,
                    "permuted": t.permuted,
                })
            })
            .collect();
        let object = json!({
            "out": report.path,
            "bytes": report.bytes,
            "model_type": report.model_type,
            "architecture": report.architecture,
            "alpha": report.alpha,
            "metadata": metadata,
            "tensors": tensors,
            "notes": report.notes,
        });
        writeln!(out, "{object}")?;
        return Ok(());
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    writeln!(
        out,
        "wrote {} ({} bytes): a {} LoRA adapter for llama.cpp (general.architecture {}, alpha {}), {} tensors in F32",
        report.path.display(),
        report.bytes,
        report.model_type,
        report.architecture,
        report.alpha,
        report.tensors.len()
    )?;
    let width = report.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &report.tensors {
        // GGUF lists dimensions innermost first, as gguf-dump and the script print them.
        let dims: Vec<String> = t.shape.iter().rev().map(usize::to_string).collect();
        let mark = if t.permuted {
            " (rows permuted for llama.cpp's RoPE)"
        } else {
            ""
        };
        writeln!(
            out,
            "  {:width$}  {{{}}}  <- {}{mark}",
            t.name,
            dims.join(", "),
            t.source
        )?;
    }
    writeln!(out, "use it: llama-cli -m BASE.gguf --lora {}", report.path.display())?;
    Ok(())
}

/// gguf-py's name for a metadata value's type.
fn type_name(value: &Value) -> String {
    match value {
        Value::U8(_) => "uint8".to_owned(),
        Value::I8(_) => "int8".to_owned(),
        Value::U16(_) => "uint16".to_owned(),
        Value::I16(_) => "int16".to_owned(),
        Value::U32(_) => "uint32".to_owned(),
        Value::I32(_) => "int32".to_owned(),
        Value::U64(_) => "uint64".to_owned(),
        Value::I64(_) => "int64".to_owned(),
        Value::F32(_) => "float32".to_owned(),
        Value::F64(_) => "float64".to_owned(),
        Value::Bool(_) => "bool".to_owned(),
        Value::String(_) => "string".to_owned(),
        Value::Array(items) => format!(
            "array[{}]",
            items.first().map_or_else(|| "uint32".to_owned(), type_name)
        ),
    }
}

fn to_json(value: &Value) -> Json {
    match value {
        Value::U8(v) => json!(v),
        Value::I8(v) => json!(v),
        Value::U16(v) => json!(v),
        Value::I16(v) => json!(v),
        Value::U32(v) => json!(v),
        Value::I32(v) => json!(v),
        Value::U64(v) => json!(v),
        Value::I64(v) => json!(v),
        Value::F32(v) => json!(v),
        Value::F64(v) => json!(v),
        Value::Bool(v) => json!(v),
        Value::String(v) => json!(v),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
    }
}
