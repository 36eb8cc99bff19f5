//! `peft train`: flags (or a YAML/JSON file of them) to an adapter config,
//! data sets and a [`TrainConfig`], then [`peft_models::train::train`] with
//! a progress bar or log lines.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::prelude::*;
use peft_core::{modules, regex, Ia3Config, LohaConfig, LokrConfig, Targets, WithLycoris, WithMetadata};
use peft_models::tokenizer::Tokenizer;
use peft_models::train::data::{data_files, DataOptions, Dataset};
use peft_models::train::optim::Schedule;
use peft_models::train::{train, EvalMetrics, StepMetrics, TrainConfig, TrainObserver, TrainRun};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{load, model_dir, CliResult, ModelArgs};

/// Set by Ctrl-C: the run ends after the current step with a checkpoint.
static STOP: AtomicBool = AtomicBool::new(false);

/// `peft train`'s flags. Every training flag can also come from `--config`
/// (a YAML or JSON file whose keys are the flags' names, `batch-size` or
/// `batch_size`); a flag on the command line wins over the file.
#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The output folder: checkpoint-STEP/ folders, metrics.jsonl, and the
    /// trained adapter in PEFT's format.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Continue from a checkpoint-STEP/ folder of a run with the same
    /// settings (the result is the same bytes as a run never stopped).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Go on training this PEFT adapter folder or Hub id (any kind peft
    /// loads) instead of a fresh one; the adapter flags (--kind, --rank,
    /// ...) then do not apply.
    #[arg(long, value_name = "DIR|ORG/NAME", conflicts_with_all = ["kind", "rank", "alpha", "dropout", "targets", "exclude", "rslora"])]
    pub adapter: Option<PathBuf>,
    /// Print one JSON object per step, evaluation and checkpoint, and a
    /// summary, instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub options: TrainOptions,
}

/// The flags a `--config` file may also set. `None` (or `false`) means not
/// given; `train_config` and `add_adapter` fill in the defaults.
#[derive(clap::Args, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainOptions {
    /// A YAML or JSON file of flags (keys as the flags' names).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A folder with train.jsonl and, optionally, valid.jsonl. Each line is
    /// {"text": ...}, {"prompt": ..., "completion": ...} or
    /// {"messages": [{"role": ..., "content": ...}, ...]}.
    #[arg(long, value_name = "DIR", conflicts_with = "train")]
    pub data: Option<PathBuf>,
    /// The training file (instead of --data).
    #[arg(long, value_name = "FILE")]
    pub train: Option<PathBuf>,
    /// The validation file (instead of --data's valid.jsonl).
    #[arg(long, value_name = "FILE")]
    pub valid: Option<PathBuf>,
    /// The adapter kind [default: lora].
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// Rank (LoRA, DoRA, LoHa, LoKr) [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// Alpha: the update is scaled by alpha / rank [default: 2 x rank].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input (LoRA, DoRA) or of its rank (LoHa,
    /// LoKr) while training [default: 0].
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Which layers: all-linear (every linear layer but the head), a comma
    /// list of names (q_proj,v_proj: suffixes of module paths), or a regex
    /// over the whole path [default: all-linear].
    #[arg(long, value_name = "TARGETS")]
    pub targets: Option<String>,
    /// Layers to leave out: a comma list of names or a regex.
    #[arg(long, value_name = "NAMES|REGEX")]
    pub exclude: Option<String>,
    /// rsLoRA: scale by alpha / sqrt(rank).
    #[arg(long)]
    #[serde(default)]
    pub rslora: bool,
    /// Examples a micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches an optimizer step [default: 1].
    #[arg(long)]
    pub grad_accumulation: Option<usize>,
    /// Optimizer steps (or give --epochs).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the training set [default: 1 when --steps is not given].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate [default: 1e-4].
    #[arg(long, alias = "lr")]
    pub learning_rate: Option<f64>,
    /// AdamW's beta1 [default: 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW's beta2 [default: 0.999].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// AdamW's epsilon [default: 1e-8].
    #[arg(long)]
    pub eps: Option<f64>,
    /// AdamW's decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// The learning-rate schedule after warm-up [default: constant].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// Steps of linear warm-up from 0 [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Clip the gradients' global norm (0: no clipping) [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seeds the adapter's initialisation, the data order and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Count only completion / assistant tokens in the loss.
    #[arg(long)]
    #[serde(default)]
    pub mask_prompt: bool,
    /// Cut examples to this many tokens [default: 2048, at most the model's positions].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Evaluate on the validation set every N steps (and at the end).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Write OUT/checkpoint-STEP/ every N steps.
    #[arg(long, value_name = "N")]
    pub save_every: Option<usize>,
    /// Print a log line every N steps when not on a terminal [default: 10].
    #[arg(long, value_name = "N")]
    pub log_every: Option<usize>,
}

/// The adapter kinds `peft train` makes.
#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Lora,
    Dora,
    Ia3,
    Loha,
    Lokr,
}

/// `--schedule`.
#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

impl TrainOptions {
    /// The command line over the `--config` file.
    fn merged(self) -> Result<TrainOptions, Box<dyn std::error::Error>> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        };
        let Value::Object(file) = file else {
            return Err(format!("{}: expected a mapping of flag names to values", path.display()).into());
        };
        // Keys as flag names: `batch_size` and `batch-size` alike.
        let mut merged: Map<String, Value> = file.into_iter().map(|(k, v)| (k.replace('_', "-"), v)).collect();
        let Value::Object(given) = serde_json::to_value(&self)? else {
            unreachable!("a struct serializes to an object")
        };
        for (key, value) in given {
            if !(value.is_null() || value == Value::Bool(false)) {
                merged.insert(key, value);
            }
        }
        let mut options: TrainOptions =
            serde_json::from_value(Value::Object(merged)).map_err(|e| format!("{}: {e}", path.display()))?;
        options.config = Some(path);
        Ok(options)
    }

    fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::Lora)
    }

    /// The training settings, defaults filled in.
    fn train_config(&self) -> TrainConfig {
        let defaults = TrainConfig::default();
        TrainConfig {
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            grad_accumulation: self.grad_accumulation.unwrap_or(defaults.grad_accumulation),
            steps: self.steps,
            epochs: self.epochs.unwrap_or(defaults.epochs),
            learning_rate: self.learning_rate.unwrap_or(defaults.learning_rate),
            beta1: self.beta1.unwrap_or(defaults.beta1),
            beta2: self.beta2.unwrap_or(defaults.beta2),
            eps: self.eps.unwrap_or(defaults.eps),
            weight_decay: self.weight_decay.unwrap_or(defaults.weight_decay),
            schedule: match self.schedule {
                None | Some(ScheduleArg::Constant) => Schedule::Constant,
                Some(ScheduleArg::Linear) => Schedule::Linear,
                Some(ScheduleArg::Cosine) => Schedule::Cosine,
            },
            warmup_steps: self.warmup_steps.unwrap_or(defaults.warmup_steps),
            max_grad_norm: self.max_grad_norm.unwrap_or(defaults.max_grad_norm),
            seed: self.seed.unwrap_or(defaults.seed),
            eval_every: self.eval_every,
            save_every: self.save_every,
        }
    }

    /// `--targets` and `--exclude` as PEFT reads `target_modules` and
    /// `exclude_modules`: a list matches path suffixes, a string is a regex.
    fn targets(&self) -> Result<Targets, Box<dyn std::error::Error>> {
        let spec = self.targets.as_deref().unwrap_or("all-linear");
        let mut targets = if spec == "all-linear" {
            all_linear()
        } else if is_name_list(spec) {
            modules(spec.split(',').map(str::trim).filter(|s| !s.is_empty()))
        } else {
            regex(spec)
        };
        if let Some(exclude) = &self.exclude {
            targets = if is_name_list(exclude) {
                targets.exclude(exclude.split(',').map(str::trim).filter(|s| !s.is_empty()))
            } else {
                targets.exclude_regex(exclude)
            };
        }
        Ok(targets)
    }

    /// Adds the adapter the flags describe as `"default"`.
    fn add_adapter(&self, model: &mut peft_models::AutoModel, base_model: &str) -> CliResult {
        let targets = self.targets()?;
        let rank = self.rank.unwrap_or(8);
        let alpha = self.alpha.unwrap_or(2.0 * rank as f64);
        let dropout = self.dropout.unwrap_or(0.0);
        let seed = self.seed.unwrap_or(0);
        let kind = self.kind();
        if kind == Kind::Ia3 && (self.rank.is_some() || self.alpha.is_some() || self.dropout.is_some() || self.rslora) {
            return Err("--kind ia3 has no rank, alpha, dropout or rslora".into());
        }
        if matches!(kind, Kind::Loha | Kind::Lokr) && self.rslora {
            return Err("--rslora is a LoRA option".into());
        }
        peft_core::random::with_seed(seed, || -> CliResult {
            match kind {
                Kind::Lora | Kind::Dora => {
                    let config = LoraConfig::from(targets)
                        .rank(rank)
                        .alpha(alpha)
                        .dropout(dropout)
                        .rslora(self.rslora)
                        .dora(kind == Kind::Dora)
                        .task_type("CAUSAL_LM")
                        .base_model(base_model);
                    model.add_adapter(peft_models::train::ADAPTER, &config)?
                }
                Kind::Ia3 => {
                    // PEFT's rule for decoders: the MLP's output projection is feed-forward.
                    let config = Ia3Config::from(targets)
                        .feedforward_regex(r".*\.(down_proj|mlp\.c_proj|fc2|w2)")
                        .task_type("CAUSAL_LM")
                        .base_model(base_model);
                    model.add_adapter(peft_models::train::ADAPTER, &config)?
                }
                Kind::Loha => {
                    let config = LohaConfig::from(targets)
                        .rank(rank)
                        .alpha(alpha)
                        .rank_dropout(dropout)
                        .task_type("CAUSAL_LM")
                        .base_model(base_model);
                    model.add_adapter(peft_models::train::ADAPTER, &config)?
                }
                Kind::Lokr => {
                    let config = LokrConfig::from(targets)
                        .rank(rank)
                        .alpha(alpha)
                        .rank_dropout(dropout)
                        .task_type("CAUSAL_LM")
                        .base_model(base_model);
                    model.add_adapter(peft_models::train::ADAPTER, &config)?
                }
            }
            Ok(())
        })
    }
}

/// `q_proj,v_proj` or `q_proj`: names, not a regex.
fn is_name_list(spec: &str) -> bool {
    spec.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | '.' | ' '))
}

/// The progress bar on a terminal, log lines elsewhere, JSON with `--json`.
struct Progress {
    bar: Option<ProgressBar>,
    json: bool,
    log_every: usize,
}

impl Progress {
    fn new(json: bool, log_every: usize, done: usize, total: usize) -> Self {
        let bar = (!json && std::io::stdout().is_terminal()).then(|| {
            let bar = ProgressBar::new(total as u64).with_position(done as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                    .expect("the template is valid"),
            );
            bar
        });
        Self { bar, json, log_every }
    }

    fn line(&self, value: Value, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if self.json => println!("{value}"),
            None => println!("{text}"),
        }
    }
}

impl TrainObserver for Progress {
    fn on_step(&mut self, m: &StepMetrics) {
        let text = format!(
            "loss {:.4}  lr {:.2e}  {:.0} tokens/s",
            m.loss, m.learning_rate, m.tokens_per_second
        );
        if let Some(bar) = &self.bar {
            bar.set_position(m.step as u64);
            bar.set_message(text);
            return;
        }
        if m.step == 1 || m.step == m.total_steps || m.step.is_multiple_of(self.log_every) {
            let value = json!({"event": "step", "step": m.step, "total_steps": m.total_steps, "loss": m.loss,
                "learning_rate": m.learning_rate, "grad_norm": m.grad_norm, "tokens_per_second": m.tokens_per_second});
            self.line(value, format!("step {}/{}  {text}", m.step, m.total_steps));
        }
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        let value = json!({"event": "eval", "step": m.step, "val_loss": m.val_loss,
            "val_perplexity": m.val_perplexity, "val_tokens": m.val_tokens});
        let text = format!(
            "step {}: validation loss {:.4}, perplexity {:.3} ({} tokens)",
            m.step, m.val_loss, m.val_perplexity, m.val_tokens
        );
        self.line(value, text);
    }

    fn on_checkpoint(&mut self, dir: &Path) {
        let value = json!({"event": "checkpoint", "dir": dir});
        self.line(value, format!("checkpoint written: {}", dir.display()));
    }
}

/// Reads one data file, warning on stderr about lines it had to cut or leave out.
fn read_data(path: &Path, tokenizer: &Tokenizer, options: &DataOptions) -> Result<Dataset, peft_models::ModelError> {
    let data = Dataset::from_jsonl(path, tokenizer, options)?;
    if data.truncated() > 0 {
        eprintln!(
            "warning: {}: {} examples cut to --max-seq-len {}",
            path.display(),
            data.truncated(),
            options.max_seq_len
        );
    }
    if !data.skipped_lines().is_empty() {
        eprintln!(
            "warning: {}: lines {:?} left out: nothing to predict within --max-seq-len {}",
            path.display(),
            data.skipped_lines(),
            options.max_seq_len
        );
    }
    Ok(data)
}

/// `peft train`.
pub fn train_command(args: TrainArgs) -> CliResult {
    let options = args.options.merged()?;
    let (train_path, valid_path) = match (&options.data, &options.train) {
        (Some(dir), None) => {
            let (train, valid) = data_files(dir)?;
            (train, options.valid.clone().or(valid))
        }
        (None, Some(train)) => (train.clone(), options.valid.clone()),
        _ => return Err("give --data DIR (train.jsonl, valid.jsonl) or --train FILE".into()),
    };
    let dir = model_dir(&args.model)?;
    let mut model = load(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let max_positions = model.max_positions().unwrap_or(usize::MAX);
    let data_options = DataOptions {
        mask_prompt: options.mask_prompt,
        max_seq_len: options.max_seq_len.unwrap_or(2048).min(max_positions),
    };
    let train_set = read_data(&train_path, &tokenizer, &data_options)?;
    let valid_set = valid_path
        .map(|path| read_data(&path, &tokenizer, &data_options))
        .transpose()?;
    match &args.adapter {
        Some(adapter) => model.load_adapter(crate::adapter_dir(adapter)?, peft_models::train::ADAPTER)?,
        None => options.add_adapter(&mut model, &args.model.model)?,
    }
    let config = options.train_config();
    let total = config.total_steps(&train_set);
    if !args.json {
        println!(
            "{} ({}): {} on {} layers, {}",
            args.model.model,
            model.model_type(),
            match &args.adapter {
                Some(dir) => format!("the adapter in {}", dir.display()),
                None => format!("{:?}", options.kind()).to_lowercase(),
            },
            model.adapted_modules().len(),
            model.num_parameters()
        );
        println!(
            "{} training examples, {} validation; {total} steps of {} x {} examples",
            train_set.len(),
            valid_set.as_ref().map_or(0, Dataset::len),
            config.batch_size,
            config.grad_accumulation
        );
    }
    std::fs::create_dir_all(&args.out)?;
    // What the run was made with, beside its results.
    let mut record = serde_json::to_value(&options)?;
    record["model"] = json!(args.model.model);
    std::fs::write(args.out.join("train_args.json"), serde_json::to_string_pretty(&record)?)?;

    // The first Ctrl-C finishes the step and writes a checkpoint; a second one quits.
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit now)");
    })?;
    let done = match &args.resume {
        Some(dir) => peft_models::train::checkpoint_step(dir)?,
        None => 0,
    };
    let mut progress = Progress::new(args.json, options.log_every.unwrap_or(10).max(1), done, total);
    let run = TrainRun {
        train: &train_set,
        valid: valid_set.as_ref(),
        config: &config,
        out: &args.out,
        resume: args.resume.as_deref(),
        stop: Some(&STOP),
    };
    let report = train(&mut model, &run, &mut progress);
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    let report = report?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let summary = json!({"event": "done", "steps": report.steps, "interrupted": report.interrupted,
            "loss": report.last_loss, "val_loss": report.last_eval.map(|e| e.val_loss),
            "adapter": report.adapter_dir, "compute_seconds": report.compute_seconds,
            "overhead_seconds": report.overhead_seconds});
        writeln!(out, "{summary}")?;
    } else if report.interrupted {
        writeln!(
            out,
            "stopped at step {}; resume with --resume {}",
            report.steps,
            report.adapter_dir.display()
        )?;
    } else {
        writeln!(
            out,
            "trained {} steps; the adapter (PEFT's format) is in {}",
            report.steps,
            report.adapter_dir.display()
        )?;
    }
    Ok(())
}
