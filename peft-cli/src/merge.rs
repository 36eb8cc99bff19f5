//! `peft merge`: adapters merged into a checkpoint on disk, streaming
//! ([`peft_models::merge::merge_checkpoint`]).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use peft_models::merge::{merge_checkpoint, MergeOptions, WeightedAdapter};
use serde_json::json;

use crate::{model_dir, CliResult, Dtype};

/// `peft merge`'s flags.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base checkpoint: a folder (model.safetensors or shards with
    /// model.safetensors.index.json; any architecture whose tensor names
    /// the adapter addresses) or a Hub id.
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub model: String,
    /// The revision of a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// A PEFT adapter folder or Hub id (org/name); repeat to merge several,
    /// in order.
    #[arg(long = "adapter", value_name = "DIR|ORG/NAME", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One factor per adapter scaling its change (LoRA, LoHa and LoKr only);
    /// default 1 each.
    #[arg(long, value_name = "W1,W2,...", value_delimiter = ',')]
    pub weights: Vec<f64>,
    /// The output folder: the checkpoint's files with the merged weights,
    /// the same shards and index; loadable by transformers.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write the weights in this dtype [default: as stored].
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `peft merge`.
pub fn merge_command(args: MergeArgs) -> CliResult {
    if !args.weights.is_empty() && args.weights.len() != args.adapters.len() {
        return Err(format!(
            "--weights gives {} factors for {} adapters",
            args.weights.len(),
            args.adapters.len()
        )
        .into());
    }
    let adapters = args
        .adapters
        .iter()
        .enumerate()
        .map(|(i, dir)| WeightedAdapter::read(crate::adapter_dir(dir)?, args.weights.get(i).copied().unwrap_or(1.0)))
        .collect::<Result<Vec<_>, _>>()?;
    let dir = model_dir(&crate::ModelArgs {
        model: args.model.clone(),
        revision: args.revision.clone(),
        dtype: Dtype::F32,
        quantize: None,
    })?;
    let options = MergeOptions {
        dtype: args.dtype.map(Dtype::candle),
        force: args.force,
    };
    let bar = (!args.json && std::io::stdout().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} tensors, shard {msg} [{elapsed_precise}]")
                .expect("the template is valid"),
        );
        bar
    });
    let report = merge_checkpoint(&dir, &adapters, &args.out, &options, &mut |progress| {
        if let Some(bar) = &bar {
            bar.set_length(progress.tensors_total as u64);
            bar.set_position(progress.tensors_done as u64);
            bar.set_message(format!("{}/{}", progress.shard + 1, progress.shards));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let summary = json!({
            "out": report.out, "shards": report.shards, "tensors": report.tensors,
            "merged_modules": report.merged_modules, "copied": report.copied,
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(
            out,
            "merged {} adapter(s) into {} modules: {} tensors in {} file(s) written to {}",
            adapters.len(),
            report.merged_modules.len(),
            report.tensors,
            report.shards,
            report.out.display()
        )?;
        if !report.copied.is_empty() {
            writeln!(out, "copied: {}", report.copied.join(", "))?;
        }
    }
    Ok(())
}
