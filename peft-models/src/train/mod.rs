//! Training an adapter: the loop transformers' `Trainer` and mlx-lm's LoRA
//! trainer run, as library code for any adaptable model that yields logits
//! (your own structs included: implement [`CausalLm`]).
//!
//! ```text
//! data (jsonl) ─ Dataset ─ Batch ─┐
//!                                 ├─ train(): micro-batches → masked loss → backward (accumulated)
//! model + adapter "default" ──────┘   → clip → AdamW at the schedule's rate → metrics, eval, checkpoints
//! ```
//!
//! The model comes with its adapter already added (`apply_lora`,
//! `add_adapter`) under the name `"default"`; [`train`] trains that
//! adapter's variables, writes `checkpoint-STEP/` folders and the final
//! adapter into the output folder, each in PEFT's format.
//!
//! # Exact resume
//!
//! Nothing random is left to chance: the data order of epoch `e` is a
//! shuffle seeded by `(seed, e)`, each micro-batch's dropout masks come
//! from [`peft_core::random::with_seed`] seeded by `(seed, step, micro)`,
//! and a checkpoint holds the adapter, AdamW's moments and the step (from
//! which the data position and the schedule follow). So a run resumed from
//! `checkpoint-10` of a 20-step run ends with the same bytes as the run
//! that was not stopped (`tests/train.rs`).

pub mod data;
pub mod optim;
mod runtime;

pub use runtime::tune_runtime;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use peft_core::{Adaptable, PeftModel};
use serde::{Deserialize, Serialize};

use crate::auto::AutoModel;
use crate::error::{ModelError, Result};
use data::{Batch, Dataset};
use optim::{clip_grad_norm, AdamW, AdamWParams, Schedule};

/// The adapter name the trainer trains.
pub const ADAPTER: &str = "default";
/// The checkpoint file of the trainer's position and settings.
pub const STATE_FILE: &str = "trainer_state.json";
/// The checkpoint file of AdamW's moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The metrics log in the output folder, one JSON object a line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A model that gives next-token logits `[batch, t, vocab]` for token ids
/// `[batch, t]`, with causal attention (the trainer pads on the right and
/// relies on it: see [`data`]).
pub trait CausalLm {
    /// The logits.
    fn logits(&self, input_ids: &Tensor) -> candle_core::Result<Tensor>;
}

impl CausalLm for AutoModel {
    fn logits(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(input_ids)
    }
}

/// The settings of a run (transformers' `TrainingArguments` where they
/// overlap, mlx-lm's names where not). A checkpoint records them; resuming
/// with other values of the fields that change the result is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Examples a micro-batch.
    pub batch_size: usize,
    /// Micro-batches an optimizer step.
    pub grad_accumulation: usize,
    /// Optimizer steps; when `None`, `epochs` decides.
    pub steps: Option<usize>,
    /// Passes over the training set (used when `steps` is `None`).
    pub epochs: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW's β₁.
    pub beta1: f64,
    /// AdamW's β₂.
    pub beta2: f64,
    /// AdamW's ε.
    pub eps: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// The learning-rate schedule after warm-up.
    pub schedule: Schedule,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// Clip the gradients' global norm to this (0 turns clipping off).
    pub max_grad_norm: f64,
    /// Seeds the data order and dropout (the adapter's initialisation is
    /// the caller's: see [`peft_core::random::with_seed`]).
    pub seed: u64,
    /// Evaluate on the validation set every this many steps (and at the end).
    pub eval_every: Option<usize>,
    /// Write `checkpoint-STEP/` every this many steps.
    pub save_every: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let adamw = AdamWParams::default();
        Self {
            batch_size: 4,
            grad_accumulation: 1,
            steps: None,
            epochs: 1,
            learning_rate: adamw.lr,
            beta1: adamw.beta1,
            beta2: adamw.beta2,
            eps: adamw.eps,
            weight_decay: adamw.weight_decay,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            seed: 0,
            eval_every: None,
            save_every: None,
        }
    }
}

impl TrainConfig {
    /// AdamW's parameters.
    pub fn adamw(&self) -> AdamWParams {
        AdamWParams {
            lr: self.learning_rate,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Optimizer steps of the run on `train`.
    pub fn total_steps(&self, train: &Dataset) -> usize {
        self.steps.unwrap_or_else(|| {
            (self.epochs * train.batches_per_epoch(self.batch_size)).div_ceil(self.grad_accumulation.max(1))
        })
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(ModelError::Train { reason });
        if self.batch_size == 0 || self.grad_accumulation == 0 {
            return bad("batch_size and grad_accumulation must be at least 1".to_owned());
        }
        if self.steps == Some(0) || (self.steps.is_none() && self.epochs == 0) {
            return bad("nothing to do: steps (or epochs) is 0".to_owned());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("learning_rate {} is not a positive number", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!(
                "beta1 {} and beta2 {} must be in [0, 1)",
                self.beta1, self.beta2
            ));
        }
        if self.eval_every == Some(0) || self.save_every == Some(0) {
            return bad("eval_every and save_every must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The first field that changes the result and differs from `other`.
    fn differing_field(&self, other: &TrainConfig) -> Option<String> {
        let (a, b) = (serde_json::to_value(self).ok()?, serde_json::to_value(other).ok()?);
        let (a, b) = (a.as_object()?, b.as_object()?);
        a.iter()
            .filter(|(key, _)| !matches!(key.as_str(), "eval_every" | "save_every"))
            .find(|(key, value)| b.get(*key) != Some(value))
            .map(|(key, value)| {
                let theirs = b.get(key).unwrap_or(&serde_json::Value::Null);
                format!("`{key}` is {value} here and {theirs} in the checkpoint")
            })
    }
}

/// Where the trainer is: what a checkpoint records besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Of how many.
    pub total_steps: usize,
    /// The epoch the next micro-batch comes from.
    pub epoch: usize,
    /// The batch of that epoch it is.
    pub batch_in_epoch: usize,
    /// Predicted tokens trained on so far.
    pub tokens: usize,
    /// The settings of the run.
    pub config: TrainConfig,
}

/// One optimizer step's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepMetrics {
    /// The step just done (from 1).
    pub step: usize,
    /// Of how many.
    pub total_steps: usize,
    /// Mean loss over the step's predicted tokens.
    pub loss: f64,
    /// The rate this step used.
    pub learning_rate: f64,
    /// The gradients' global norm before clipping.
    pub grad_norm: f64,
    /// Predicted tokens in this step.
    pub tokens: usize,
    /// Predicted tokens a second over this step.
    pub tokens_per_second: f64,
    /// Seconds since the run (or the resumed part) started.
    pub elapsed: f64,
}

/// A validation pass's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalMetrics {
    /// The step after which it ran.
    pub step: usize,
    /// Mean loss over the validation set's predicted tokens.
    pub val_loss: f64,
    /// `exp(val_loss)`.
    pub val_perplexity: f64,
    /// How many tokens were predicted.
    pub val_tokens: usize,
}

/// What [`train`] tells as it goes: a progress bar, log lines, or nothing.
pub trait TrainObserver {
    /// After each optimizer step.
    fn on_step(&mut self, _metrics: &StepMetrics) {}
    /// After each validation pass.
    fn on_eval(&mut self, _metrics: &EvalMetrics) {}
    /// After a checkpoint folder is written.
    fn on_checkpoint(&mut self, _dir: &Path) {}
}

/// Observes nothing.
impl TrainObserver for () {}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Steps done in all (counting those before a resume).
    pub steps: usize,
    /// Whether `stop` ended it before the last step.
    pub interrupted: bool,
    /// The last step's loss.
    pub last_loss: Option<f64>,
    /// The last validation pass, if any ran.
    pub last_eval: Option<EvalMetrics>,
    /// Where the adapter was written: the output folder, or the checkpoint
    /// of an interrupted run.
    pub adapter_dir: PathBuf,
    /// Seconds in the model's forward and backward passes, clipping and
    /// the optimizer (this run's steps).
    pub compute_seconds: f64,
    /// Seconds of the trainer's own work besides that in the same steps:
    /// batching, metrics, the observer (evaluation and checkpoints, which
    /// the settings ask for, are not counted).
    pub overhead_seconds: f64,
}

/// A training run's inputs besides the model.
pub struct TrainRun<'a> {
    /// The training examples.
    pub train: &'a Dataset,
    /// Validation examples, evaluated every `eval_every` steps and at the end.
    pub valid: Option<&'a Dataset>,
    /// The settings.
    pub config: &'a TrainConfig,
    /// The output folder: checkpoints, metrics and the final adapter.
    pub out: &'a Path,
    /// A checkpoint folder to continue from.
    pub resume: Option<&'a Path>,
    /// Set (by a Ctrl-C handler, say) to end the run after the current step
    /// with a checkpoint.
    pub stop: Option<&'a AtomicBool>,
}

/// Trains adapter `"default"` of `model` (see the module docs); the model
/// must hold it, in f32 (or the dtype it was made in) and trainable.
///
/// On return the output folder holds the trained adapter in PEFT's format
/// (or, when `stop` ended the run early, a checkpoint to resume from), and
/// `metrics.jsonl`.
pub fn train<M>(model: &mut M, run: &TrainRun<'_>, observer: &mut dyn TrainObserver) -> Result<TrainReport>
where
    M: Adaptable + CausalLm,
{
    let config = run.config;
    config.check()?;
    if !model.adapter_names().iter().any(|name| name == ADAPTER) {
        return Err(ModelError::Train {
            reason: format!("the model has no adapter named `{ADAPTER}` to train (add one first)"),
        });
    }
    std::fs::create_dir_all(run.out).map_err(|cause| ModelError::Io {
        path: run.out.to_path_buf(),
        cause,
    })?;
    let total_steps = config.total_steps(run.train);
    let mut state = TrainerState {
        step: 0,
        total_steps,
        epoch: 0,
        batch_in_epoch: 0,
        tokens: 0,
        config: config.clone(),
    };
    let mut restored_moments = None;
    if let Some(dir) = run.resume {
        let (saved, moments) = read_checkpoint(model, dir, config, total_steps)?;
        state = saved;
        restored_moments = Some(moments);
    }
    let vars = model.named_trainable_vars();
    if vars.is_empty() {
        return Err(ModelError::Train {
            reason: format!("adapter `{ADAPTER}` has no trainable variable"),
        });
    }
    let mut optimizer = AdamW::new(vars.clone(), config.adamw())?;
    if let Some(moments) = restored_moments {
        optimizer
            .restore(&moments, state.step)
            .map_err(|reason| ModelError::Resume {
                path: run.resume.unwrap_or(run.out).to_path_buf(),
                reason: format!("{OPTIMIZER_FILE}: {reason}"),
            })?;
    }
    let mut metrics = MetricsLog::open(run.out)?;
    let device = vars[0].1.device().clone();
    let started = Instant::now();
    let mut report = TrainReport {
        steps: state.step,
        interrupted: false,
        last_loss: None,
        last_eval: None,
        adapter_dir: run.out.to_path_buf(),
        compute_seconds: 0.0,
        overhead_seconds: 0.0,
    };
    model.set_training(true);
    let outcome = (|| -> Result<()> {
        while state.step < total_steps {
            let step_started = Instant::now();
            let batches = next_batches(run.train, &mut state, &device)?;
            let compute_started = Instant::now();
            let learning_rate =
                config
                    .schedule
                    .learning_rate(config.learning_rate, state.step, config.warmup_steps, total_steps);
            let seed = step_seed(config.seed, state.step);
            let (loss, mut grads) = accumulated_gradients(model, &batches, seed)?;
            let grad_norm = clip_grad_norm(&vars, &mut grads, config.max_grad_norm)?;
            optimizer.set_learning_rate(learning_rate);
            optimizer.step(&grads)?;
            let compute = compute_started.elapsed().as_secs_f64();
            state.step += 1;
            let tokens: usize = batches.iter().map(|b| b.tokens).sum();
            state.tokens += tokens;
            let step_metrics = StepMetrics {
                step: state.step,
                total_steps,
                loss,
                learning_rate,
                grad_norm,
                tokens,
                tokens_per_second: tokens as f64 / step_started.elapsed().as_secs_f64(),
                elapsed: started.elapsed().as_secs_f64(),
            };
            report.steps = state.step;
            report.last_loss = Some(loss);
            metrics.write(&step_metrics)?;
            observer.on_step(&step_metrics);
            report.compute_seconds += compute;
            report.overhead_seconds += step_started.elapsed().as_secs_f64() - compute;
            let last = state.step == total_steps;
            if let Some(valid) = run.valid {
                if last || config.eval_every.is_some_and(|every| state.step.is_multiple_of(every)) {
                    model.set_training(false);
                    let eval = evaluate_dataset(model, valid, config.batch_size, &device, state.step);
                    model.set_training(true);
                    let eval = eval?;
                    metrics.write(&eval)?;
                    observer.on_eval(&eval);
                    report.last_eval = Some(eval);
                }
            }
            let stopping = !last && run.stop.is_some_and(|stop| stop.load(Ordering::SeqCst));
            if stopping || config.save_every.is_some_and(|every| state.step.is_multiple_of(every)) {
                let dir = write_checkpoint(model, &optimizer, &state, run.out)?;
                observer.on_checkpoint(&dir);
                if stopping {
                    report.interrupted = true;
                    report.adapter_dir = dir;
                    return Ok(());
                }
            }
        }
        model.save_adapter(run.out, ADAPTER)?;
        Ok(())
    })();
    model.set_training(false);
    outcome?;
    Ok(report)
}

/// The micro-batches of the next optimizer step, moving the data position.
fn next_batches(train: &Dataset, state: &mut TrainerState, device: &Device) -> Result<Vec<Batch>> {
    let config = &state.config;
    let per_epoch = train.batches_per_epoch(config.batch_size);
    let mut batches = Vec::with_capacity(config.grad_accumulation);
    for _ in 0..config.grad_accumulation {
        let indices = train.batch_indices(config.seed, state.epoch, state.batch_in_epoch, config.batch_size);
        let examples: Vec<_> = indices.iter().map(|&i| &train.examples()[i]).collect();
        batches.push(Batch::new(&examples, device)?);
        state.batch_in_epoch += 1;
        if state.batch_in_epoch == per_epoch {
            state.batch_in_epoch = 0;
            state.epoch += 1;
        }
    }
    Ok(batches)
}

/// The seed of step `step`'s dropout masks.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The mean loss over the predicted tokens of `batches` taken together, and
/// its gradients, summed micro-batch by micro-batch: each micro-batch's
/// loss is its token sum over the step's token count, so accumulating 4
/// micro-batches of 1 gives the gradients of one batch of 4. Dropout masks
/// are drawn from `seed`.
pub fn accumulated_gradients<M>(model: &M, batches: &[Batch], seed: u64) -> Result<(f64, GradStore)>
where
    M: Adaptable + CausalLm,
{
    let total: usize = batches.iter().map(|b| b.tokens).sum();
    if total == 0 {
        return Err(ModelError::Train {
            reason: "a step's batches predict no token".to_owned(),
        });
    }
    let vars = model.trainable_vars();
    let mut summed: Option<GradStore> = None;
    let mut loss_sum = 0f64;
    for (micro, batch) in batches.iter().enumerate() {
        if batch.tokens == 0 {
            continue;
        }
        let loss = peft_core::random::with_seed(seed ^ micro as u64, || -> candle_core::Result<Tensor> {
            let logits = model.logits(&batch.inputs)?;
            (masked_mean_loss(&logits, batch)? * (batch.tokens as f64 / total as f64))?.to_dtype(DType::F32)
        })?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        summed = Some(match summed {
            None => grads,
            Some(mut sum) => {
                for var in &vars {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        let next = match sum.get(var.as_tensor()) {
                            Some(s) => (s + g)?,
                            None => g.clone(),
                        };
                        sum.insert(var.as_tensor(), next);
                    }
                }
                sum
            }
        });
    }
    let grads = summed.expect("a batch with tokens was seen");
    Ok((loss_sum, grads))
}

/// Mean cross entropy over the positions `batch.weights` counts.
fn masked_mean_loss(logits: &Tensor, batch: &Batch) -> candle_core::Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    if batch.tokens == batch.positions {
        return peft_core::ops::cross_entropy(logits, &batch.targets);
    }
    let weights: Vec<f32> = batch.weights.flatten_all()?.to_vec1()?;
    let rows: Vec<u32> = (0..b * t).filter(|&i| weights[i] > 0.0).map(|i| i as u32).collect();
    let rows = Tensor::new(rows.as_slice(), logits.device())?;
    let logits = logits.reshape((b * t, vocab))?.index_select(&rows, 0)?;
    let targets = batch.targets.flatten_all()?.index_select(&rows, 0)?;
    peft_core::ops::cross_entropy(&logits, &targets)
}

/// The mean loss over every predicted token of `data`, in batches.
pub fn evaluate_dataset<M: CausalLm>(
    model: &M,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
    step: usize,
) -> Result<EvalMetrics> {
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in data.examples().chunks(batch_size.max(1)) {
        let batch = Batch::new(&chunk.iter().collect::<Vec<_>>(), device)?;
        let logits = model.logits(&batch.inputs)?;
        let mean = masked_mean_loss(&logits, &batch)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        sum += mean * batch.tokens as f64;
        tokens += batch.tokens;
    }
    let val_loss = sum / tokens.max(1) as f64;
    Ok(EvalMetrics {
        step,
        val_loss,
        val_perplexity: val_loss.exp(),
        val_tokens: tokens,
    })
}

/// `metrics.jsonl`, appended line by line.
struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    fn open(out: &Path) -> Result<Self> {
        let path = out.join(METRICS_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|cause| ModelError::Io {
                path: path.clone(),
                cause,
            })?;
        Ok(Self { path, file })
    }

    fn write(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record).expect("metrics serialize");
        writeln!(self.file, "{line}").map_err(|cause| ModelError::Io {
            path: self.path.clone(),
            cause,
        })
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// The step a checkpoint folder was written after (its `trainer_state.json`).
pub fn checkpoint_step(dir: &Path) -> Result<usize> {
    Ok(read_state(dir)?.step)
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let bad = |reason: String| ModelError::Resume {
        path: dir.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))
}

/// Writes `OUT/checkpoint-STEP/` (adapter, optimizer moments, state) into a
/// hidden folder first and renames it into place, so an interrupted write
/// never leaves a half checkpoint under a checkpoint's name.
fn write_checkpoint<M: Adaptable>(model: &M, optimizer: &AdamW, state: &TrainerState, out: &Path) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{}", state.step));
    let partial = out.join(format!(".checkpoint-{}.partial", state.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_error(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io_error(&partial))?;
    model.save_adapter(&partial, ADAPTER)?;
    let optimizer_path = partial.join(OPTIMIZER_FILE);
    candle_core::safetensors::save(&optimizer.state_tensors()?, &optimizer_path)?;
    let state_path = partial.join(STATE_FILE);
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(state).expect("state serializes"),
    )
    .map_err(io_error(&state_path))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
    }
    std::fs::rename(&partial, &dir).map_err(io_error(&dir))?;
    Ok(dir)
}

/// Reads a checkpoint: checks its settings against `config`, replaces the
/// model's adapter with the checkpoint's, and returns the state and
/// AdamW's moments. On error the model is as it was.
fn read_checkpoint<M: Adaptable>(
    model: &mut M,
    dir: &Path,
    config: &TrainConfig,
    total_steps: usize,
) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let bad = |reason: String| ModelError::Resume {
        path: dir.to_path_buf(),
        reason,
    };
    let state = read_state(dir)?;
    if let Some(difference) = config.differing_field(&state.config) {
        return Err(bad(format!(
            "the checkpoint was made with other settings: {difference}"
        )));
    }
    if state.total_steps != total_steps || state.step > total_steps {
        return Err(bad(format!(
            "the checkpoint is at step {} of {}, this run has {total_steps} steps",
            state.step, state.total_steps
        )));
    }
    let moments = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &Device::Cpu)
        .map_err(|e| bad(format!("{OPTIMIZER_FILE}: {e}")))?;
    // Load beside the current adapter first, so a bad file changes nothing.
    let incoming = "resumed";
    model.load_adapter(dir, incoming).map_err(|e| bad(e.to_string()))?;
    let copied = copy_adapter(model, incoming);
    model.delete_adapter(incoming)?;
    copied?;
    Ok((state, moments))
}

/// Sets adapter `"default"`'s variables to adapter `from`'s values (the same
/// layers, shapes and order: both were made for this model).
fn copy_adapter<M: Adaptable>(model: &mut M, from: &str) -> Result<()> {
    model.set_active_adapters(&[from])?;
    let source: Vec<(String, Var)> = model.named_trainable_vars();
    model.set_active_adapters(&[ADAPTER])?;
    let target = model.named_trainable_vars();
    let rename = |name: &str| name.replace(&format!(".{from}."), &format!(".{ADAPTER}."));
    if source.len() != target.len() {
        return Err(ModelError::Train {
            reason: format!(
                "the checkpoint's adapter has {} tensors, the model's {}",
                source.len(),
                target.len()
            ),
        });
    }
    for ((source_name, source), (target_name, target)) in source.iter().zip(&target) {
        if rename(source_name) != *target_name || source.dims() != target.dims() {
            return Err(ModelError::Train {
                reason: format!(
                    "the checkpoint's `{source_name}` {:?} does not match the model's `{target_name}` {:?}",
                    source.dims(),
                    target.dims()
                ),
            });
        }
    }
    for ((_, source), (_, target)) in source.iter().zip(&target) {
        target.set(source.as_tensor())?;
    }
    Ok(())
}
