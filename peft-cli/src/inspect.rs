//! `peft inspect`: what an adapter folder holds and everything wrong with
//! it, without the base model ([`peft_models::inspect::inspect_adapter`]).

use std::io::Write;
use std::path::PathBuf;

use peft_models::inspect::{inspect_adapter, InspectReport, NormSummary, NormsOf};
use serde_json::{json, Value};

use crate::CliResult;

/// How many modules the report lists by norm.
const TOP: usize = 10;
/// The bins of the norms' histogram.
const BINS: usize = 8;

/// `peft inspect`'s flags.
#[derive(clap::Args)]
#[command(after_long_help = "\
What it prints: the kind (peft_type, use_dora, use_rslora), the PEFT fields that are set (r, alpha, \
target_modules, rank_pattern, ...), the base model the config names, the number of modules and of \
values (PEFT's trainable parameters), the dtypes, and for LoRA, LoHa and LoKr the norm ‖ΔW‖_F of each \
module's change: the 10 largest, the quartiles and a histogram. DoRA's norms are of its LoRA part \
s·B·A; IA³'s change depends on the base weights and is not measured.

Then every problem loading the adapter would meet, all of them: the config not parsing or invalid, \
a damaged safetensors header, tensors that are not floating point, a module missing one of its \
tensors, ranks that differ from r / rank_pattern, tensors of another kind, keys that name no module, \
modules the config's targets do not select. With problems the exit status is 1.

Examples:
  peft inspect tests/fixtures/merge_cases/loha/adapter
  peft inspect tests/fixtures/llama_lora_all_linear/adapter --json")]
pub struct InspectArgs {
    /// The adapter folder (adapter_config.json and adapter_model.safetensors).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `peft inspect`: the report, then an error counting the problems, if any
/// (exit status 1).
pub fn inspect_command(args: InspectArgs) -> CliResult {
    let report = inspect_adapter(&args.dir);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", to_json(&report))?;
    } else {
        print_text(&mut out, &report)?;
    }
    out.flush()?;
    match report.problems.len() {
        0 => Ok(()),
        n => Err(format!("{n} problem(s) in {}", args.dir.display()).into()),
    }
}

fn to_json(report: &InspectReport) -> Value {
    let summary = report.norm_summary(BINS).map(|s| {
        let histogram: Vec<Value> = s
            .histogram
            .iter()
            .map(|(from, to, n)| json!({"from": from, "to": to, "modules": n}))
            .collect();
        json!({
            "count": s.count, "min": s.min, "q1": s.q1, "median": s.median, "q3": s.q3, "max": s.max,
            "histogram": histogram,
        })
    });
    let (norms_of, norm_note) = match &report.norms_of {
        NormsOf::Delta => ("delta", None),
        NormsOf::LoraPart => ("lora_part", None),
        NormsOf::NotComputed(why) => ("none", Some(why.as_str())),
    };
    let list = |items: Vec<Value>| Value::Array(items);
    json!({
        "dir": report.dir,
        "peft_type": report.peft_type,
        "use_dora": report.use_dora,
        "use_rslora": report.use_rslora,
        "fields": report.fields.iter().cloned().collect::<serde_json::Map<String, Value>>(),
        "base_model_name_or_path": report.base_model,
        "revision": report.revision,
        "task_type": report.task_type,
        "modules": report.modules.len(),
        "parameters": report.parameters,
        "dtypes": report.dtypes,
        "saved_base_weights": list(
            report.saved_base_weights.iter().map(|(key, shape)| json!({"key": key, "shape": shape})).collect()
        ),
        "copied_modules": list(
            report.copied_modules.iter().map(|(key, shape)| json!({"key": key, "shape": shape})).collect()
        ),
        "norms_of": norms_of,
        "norm_note": norm_note,
        "norm_summary": summary,
        "top_modules": list(
            report.top_modules(TOP).iter().map(|m| json!({"module": m.module, "norm": m.delta_norm})).collect()
        ),
        "module_norms": list(
            report
                .modules
                .iter()
                .map(|m| json!({"module": m.module, "parameters": m.parameters, "norm": m.delta_norm}))
                .collect()
        ),
        "problems": list(report.problems.iter().map(|p| json!({"at": p.at, "message": p.message})).collect()),
    })
}

fn print_text(out: &mut impl Write, report: &InspectReport) -> std::io::Result<()> {
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".to_owned());
    writeln!(out, "adapter:     {}", report.dir.display())?;
    writeln!(
        out,
        "kind:        {} (use_dora: {}, use_rslora: {})",
        or_none(&report.peft_type),
        report.use_dora,
        report.use_rslora
    )?;
    writeln!(
        out,
        "base model:  {} (revision {}, task_type {})",
        or_none(&report.base_model),
        or_none(&report.revision),
        or_none(&report.task_type)
    )?;
    for (name, value) in &report.fields {
        writeln!(out, "  {name}: {}", field_text(value))?;
    }
    writeln!(
        out,
        "modules:     {}, {} values (trainable parameters), dtype {}",
        report.modules.len(),
        report.parameters,
        if report.dtypes.is_empty() {
            "-".to_owned()
        } else {
            report.dtypes.join(", ")
        }
    )?;
    for (key, shape) in &report.saved_base_weights {
        writeln!(out, "  saved base weight (not counted): {key} {shape:?}")?;
    }
    for (key, shape) in &report.copied_modules {
        writeln!(out, "  kept whole (modules_to_save, not counted): {key} {shape:?}")?;
    }
    match &report.norms_of {
        NormsOf::NotComputed(why) => writeln!(out, "norms:       not computed: {why}")?,
        norms_of => {
            let what = if *norms_of == NormsOf::LoraPart {
                "‖s·B·A‖_F, DoRA's LoRA part (its magnitudes rescale the base's rows, which needs the base)"
            } else {
                "‖ΔW‖_F"
            };
            writeln!(out, "norms:       {what}")?;
            if let Some(summary) = report.norm_summary(BINS) {
                print_summary(out, report, &summary)?;
            }
        }
    }
    if report.problems.is_empty() {
        writeln!(out, "problems:    none")?;
    } else {
        writeln!(out, "problems:    {}", report.problems.len())?;
        for problem in &report.problems {
            writeln!(out, "  - [{}] {}", problem.at, problem.message)?;
        }
    }
    Ok(())
}

fn print_summary(out: &mut impl Write, report: &InspectReport, s: &NormSummary) -> std::io::Result<()> {
    writeln!(
        out,
        "  {} modules: min {}, q1 {}, median {}, q3 {}, max {}",
        s.count,
        number(s.min),
        number(s.q1),
        number(s.median),
        number(s.q3),
        number(s.max)
    )?;
    let largest = s.histogram.iter().map(|(_, _, n)| *n).max().unwrap_or(0).max(1);
    for (from, to, n) in &s.histogram {
        let bar = "#".repeat((n * 30).div_ceil(largest));
        writeln!(out, "  {:>10} to {:>10} {n:>5} {bar}", number(*from), number(*to))?;
    }
    let top = report.top_modules(TOP);
    writeln!(out, "  largest {}:", top.len())?;
    let width = top.iter().map(|m| m.module.len()).max().unwrap_or(0);
    for m in top {
        writeln!(out, "    {:width$}  {}", m.module, number(m.delta_norm.unwrap_or(0.0)))?;
    }
    Ok(())
}

/// `x` with 4 decimals, or in scientific notation when far from 1.
pub(crate) fn number(x: f64) -> String {
    if x == 0.0 || (1e-3..1e4).contains(&x.abs()) {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

/// A config value on one line: a long list by its first items and its length.
fn field_text(value: &Value) -> String {
    const SHOWN: usize = 4;
    match value.as_array() {
        Some(items) if items.len() > SHOWN => {
            let first: Vec<String> = items[..SHOWN].iter().map(Value::to_string).collect();
            format!("[{}, ... ({} in all)]", first.join(", "), items.len())
        }
        _ => value.to_string(),
    }
}
