//! `peft combine`: LoRA adapters combined into a new adapter, PEFT's
//! `add_weighted_adapter` with no base model
//! ([`peft_models::combine::combine_adapters`]).

use std::io::Write;
use std::path::PathBuf;

use peft_core::{Combination, CombineOptions, MajoritySign};
use peft_models::combine::combine_adapters;
use serde_json::json;

use crate::CliResult;

/// `peft combine`'s flags.
#[derive(clap::Args)]
#[command(after_long_help = "\
The combination types are PEFT's (add_weighted_adapter): linear, ties, dare_linear, dare_ties and \
magnitude_prune combine A and B (all adapters of one rank); cat stacks them (exact, rank the sum); \
svd, ties_svd, dare_linear_svd, dare_ties_svd and magnitude_prune_svd combine each module's change \
ΔW and factor it by SVD (any ranks, --svd-rank, default the largest). The new adapter has the first \
adapter's config with r = lora_alpha = the new rank. DARE's random masks come from --seed's \
generator, not torch's: the same seed gives the same adapter, but not PEFT's.

Examples:
  peft combine --adapter tests/fixtures/weighted_adapters/adapters/a \\
      --adapter tests/fixtures/weighted_adapters/adapters/b --weights 0.7,0.3 \\
      --combination ties --density 0.5 --out /tmp/ties
  peft combine --adapter A --adapter B --adapter C --weights 1,1,-0.5 --combination svd --svd-rank 8 --out /tmp/svd")]
pub struct CombineArgs {
    /// A PEFT LoRA adapter folder or Hub id (org/name); repeat for each
    /// adapter to combine, in the order of --weights. Messages name them
    /// adapter0, adapter1, ... in this order.
    #[arg(long = "adapter", value_name = "DIR|ORG/NAME", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter (negative subtracts).
    #[arg(
        long,
        value_name = "W1,W2,...",
        value_delimiter = ',',
        required = true,
        allow_negative_numbers = true
    )]
    pub weights: Vec<f64>,
    /// PEFT's combination_type.
    #[arg(long, value_name = "TYPE", default_value = "svd", value_parser = parse_combination)]
    pub combination: Combination,
    /// The fraction of entries pruning keeps, in (0, 1]; required by ties*,
    /// dare_* and magnitude_prune*.
    #[arg(long)]
    pub density: Option<f64>,
    /// How TIES elects each entry's sign: total or frequency.
    #[arg(long, value_name = "METHOD", default_value = "total", value_parser = parse_sign)]
    pub majority_sign: MajoritySign,
    /// The new rank of an SVD type [default: the largest adapter rank].
    #[arg(long, value_name = "N")]
    pub svd_rank: Option<usize>,
    /// Clamp the SVD factors to ± this quantile of their entries, in [0, 1].
    #[arg(long, value_name = "Q")]
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's random masks (random without one).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// The output folder, a PEFT LoRA adapter. Written under a hidden name
    /// beside it and renamed when complete.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_combination(text: &str) -> Result<Combination, String> {
    text.parse().map_err(|e: peft_core::PeftError| e.to_string())
}

fn parse_sign(text: &str) -> Result<MajoritySign, String> {
    text.parse().map_err(|e: peft_core::PeftError| e.to_string())
}

/// `peft combine`.
pub fn combine_command(args: CombineArgs) -> CliResult {
    let adapters = args
        .adapters
        .iter()
        .map(|dir| crate::adapter_dir(dir))
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = CombineOptions::new(args.combination).majority_sign(args.majority_sign);
    options.density = args.density;
    options.svd_rank = args.svd_rank;
    options.svd_clamp = args.svd_clamp;
    let report = combine_adapters(&adapters, &args.weights, &options, args.seed, &args.out, args.force)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let summary = json!({
            "out": report.out, "combination": report.combination.as_str(), "r": report.r,
            "lora_alpha": report.r, "modules": report.modules, "parameters": report.parameters,
            "adapters": adapters.len(), "weights": args.weights,
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(
            out,
            "combined {} adapter(s) ({}): r = lora_alpha = {}, {} modules, {} values, written to {}",
            adapters.len(),
            report.combination,
            report.r,
            report.modules.len(),
            report.parameters,
            report.out.display()
        )?;
    }
    Ok(())
}
