//! `peft convert`: any adapter as a plain LoRA adapter, by a truncated SVD
//! of each module's change ([`peft_models::convert::convert_to_lora`]).

use std::io::Write;
use std::path::PathBuf;

use peft_models::convert::{convert_to_lora, ConvertOptions, ModuleLayout};
use serde_json::json;

use crate::{model_dir, CliResult, Dtype};

/// `peft convert`'s flags.
#[derive(clap::Args)]
#[command(after_long_help = "\
How it works: for each module the adapter holds tensors for, its change ΔW (what merging adds to the \
base weight) is computed with the merge code, then factored by a truncated SVD ΔW = U S Vᵀ: \
lora_B = U_R S_R, lora_A = V_Rᵀ, r = lora_alpha = R, so the scaling is 1. The relative error \
‖ΔW − B·A‖_F / ‖ΔW‖_F of each module is measured on the written files; it is 0 (to float precision) \
once R reaches ΔW's rank, printed as \"ΔW rank\".

Examples:
  peft convert --adapter tests/fixtures/merge_cases/loha/adapter --to lora --rank 8 --out /tmp/loha-as-lora
  peft convert --adapter tests/fixtures/merge_cases/dora/adapter --to lora --rank 16 \\
      --model tests/fixtures/merge_cases/llama --out /tmp/dora-as-lora --json")]
pub struct ConvertArgs {
    /// The adapter folder to convert (adapter_config.json and
    /// adapter_model.safetensors): LoRA, rsLoRA, DoRA, IA³, LoHa, LoKr, LoRA
    /// on embeddings and convolutions; or a Hub id (org/name).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub adapter: PathBuf,
    /// The kind to convert to.
    #[arg(long, value_enum, value_name = "KIND")]
    pub to: Target,
    /// The rank R of the LoRA adapter written (at least 1). A module whose
    /// change has fewer rows or columns keeps them all (rank_pattern says so).
    #[arg(long, value_name = "R")]
    pub rank: usize,
    /// The output folder, a PEFT LoRA adapter (PeftModel.from_pretrained,
    /// peft generate --adapter, peft merge). Written under a hidden name
    /// beside it and renamed when complete.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The base checkpoint, a folder or a Hub id. Needed for DoRA and IA³,
    /// whose change depends on the base weights; for the other kinds it only
    /// gives the layers' shapes, which the adapter's tensors give too.
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub model: Option<String>,
    /// The revision of a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `peft convert` converts to.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Target {
    /// A plain LoRA adapter (no DoRA, no rsLoRA).
    Lora,
}

/// `peft convert`.
pub fn convert_command(args: ConvertArgs) -> CliResult {
    let Target::Lora = args.to;
    let model = match &args.model {
        Some(model) => Some(model_dir(&crate::ModelArgs {
            model: model.clone(),
            revision: args.revision.clone(),
            dtype: Dtype::F32,
            quantize: None,
        })?),
        None => None,
    };
    let options = ConvertOptions {
        rank: args.rank,
        model,
        force: args.force,
    };
    let report = convert_to_lora(&crate::adapter_dir(&args.adapter)?, &args.out, &options)?;
    let mut out = std::io::stdout().lock();
    let worst = report.modules.iter().map(|m| m.relative_error).fold(0.0, f64::max);
    if args.json {
        let modules: Vec<_> = report
            .modules
            .iter()
            .map(|m| {
                json!({
                    "module": m.module,
                    "layer": layer_name(&m.layout),
                    "shape": matrix_shape(&m.layout),
                    "rank": m.rank,
                    "delta_rank": m.delta_rank,
                    "delta_norm": m.delta_norm,
                    "relative_error": m.relative_error,
                })
            })
            .collect();
        let summary = json!({
            "out": report.out,
            "from": report.source_kind,
            "to": "LORA",
            "rank": report.rank,
            "r": report.r,
            "lora_alpha": report.r,
            "parameters": report.parameters,
            "max_relative_error": worst,
            "modules": modules,
        });
        writeln!(out, "{summary}")?;
        return Ok(());
    }
    writeln!(
        out,
        "converted {} to LoRA: r = lora_alpha = {} (scaling 1), {} modules, {} values, written to {}",
        report.source_kind,
        report.r,
        report.modules.len(),
        report.parameters,
        report.out.display()
    )?;
    let width = report.modules.iter().map(|m| m.module.len()).max().unwrap_or(6).max(6);
    writeln!(
        out,
        "{:width$}  {:>9}  {:>12}  {:>4}  {:>7}  {:>10}  {:>10}",
        "module", "layer", "ΔW shape", "rank", "ΔW rank", "‖ΔW‖", "rel. error"
    )?;
    for m in &report.modules {
        let (rows, cols) = m.layout.matrix_dims();
        writeln!(
            out,
            "{:width$}  {:>9}  {:>12}  {:>4}  {:>7}  {:>10}  {:>10.3e}",
            m.module,
            layer_name(&m.layout),
            format!("[{rows}, {cols}]"),
            m.rank,
            m.delta_rank,
            crate::inspect::number(m.delta_norm),
            m.relative_error
        )?;
    }
    writeln!(out, "largest relative error: {worst:.3e}")?;
    Ok(())
}

fn layer_name(layout: &ModuleLayout) -> &'static str {
    match layout {
        ModuleLayout::Linear { .. } => "linear",
        ModuleLayout::Embedding { .. } => "embedding",
        ModuleLayout::Conv { .. } => "conv",
    }
}

fn matrix_shape(layout: &ModuleLayout) -> [usize; 2] {
    let (rows, cols) = layout.matrix_dims();
    [rows, cols]
}
