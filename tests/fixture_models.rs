//! The models of `peft-models` (and the custom `TinyLM` in `tests/support`) against the reference cases made
//! by Python transformers + PEFT (`tests/fixtures/<case>/`, see each
//! `CASE.md`).
//!
//! For each case:
//! - `targeted_modules(&all_linear())` is exactly the list PEFT wrapped
//!   (`targets.json`);
//! - the base model's logits match transformers' / torch's;
//! - with PEFT's adapter folder loaded by `load_adapter`, the adapted logits,
//!   the next-token loss, the gradient of every adapter tensor and the merged
//!   logits match PEFT's;
//! - the adapter saved back from Rust has PEFT's tensor keys, shapes and
//!   values and PEFT's config fields, and loads back to the same logits.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use peft_core::prelude::*;
use peft_models::{gpt2, llama};
use support::tiny_lm;

mod support;
use support::{
    assert_close, fixture_io, fixture_path, max_abs, max_abs_diff_or_nan, next_token_loss, read_json, scratch,
};

/// Logits: a correct float32 implementation lands within ~3e-6.
const LOGITS_TOL: f32 = 1e-5;
/// Gradients: max abs difference relative to the largest expected entry.
const GRAD_REL_TOL: f32 = 1e-4;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A model that maps token ids `[batch, seq]` to logits `[batch, seq, vocab]`.
trait CausalLm: PeftModel {
    fn logits(&self, input_ids: &Tensor) -> candle_core::Result<Tensor>;
}

impl CausalLm for llama::LlamaForCausalLM {
    fn logits(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(input_ids)
    }
}

impl CausalLm for gpt2::Gpt2LmHeadModel {
    fn logits(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(input_ids)
    }
}

impl CausalLm for tiny_lm::TinyLm {
    fn logits(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(input_ids)
    }
}

fn weights(case: &str) -> candle_core::Result<VarBuilder<'static>> {
    let path = fixture_path(case).join("model.safetensors");
    // SAFETY: the fixture files are not modified while the test runs.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }
}

fn load_llama() -> Result<llama::LlamaForCausalLM, Box<dyn std::error::Error>> {
    let case = "llama_lora_all_linear";
    let cfg = llama::Config::from_file(fixture_path(case).join("config.json"))?;
    Ok(llama::LlamaForCausalLM::load(weights(case)?, &cfg)?)
}

fn load_gpt2() -> Result<gpt2::Gpt2LmHeadModel, Box<dyn std::error::Error>> {
    let case = "gpt2_lora_conv1d";
    let cfg = gpt2::Config::from_file(fixture_path(case).join("config.json"))?;
    Ok(gpt2::Gpt2LmHeadModel::load(weights(case)?, &cfg)?)
}

fn load_tiny_lm() -> Result<tiny_lm::TinyLm, Box<dyn std::error::Error>> {
    Ok(tiny_lm::TinyLm::load(weights("custom_lora_exclude_head")?)?)
}

/// `input_ids` (i64 in the file) as u32, for embedding lookups and the loss.
fn input_ids(io: &HashMap<String, Tensor>) -> candle_core::Result<Tensor> {
    io["input_ids"].to_dtype(DType::U32)
}

/// The key of an in-memory adapter tensor in PEFT's `adapter_model.safetensors`:
/// `model.layers.0.q_proj.lora_A.default.weight` ->
/// `base_model.model.model.layers.0.q_proj.lora_A.weight`.
fn file_key(name: &str) -> String {
    format!("base_model.model.{}", name.replacen(".default.", ".", 1))
}

/// `targeted_modules(&all_linear())` equals PEFT's sorted `targets`.
fn check_targets<M: PeftModel>(case: &str, model: &M) -> TestResult {
    let expected: Vec<String> =
        serde_json::from_value(read_json(fixture_path(case).join("targets.json"))["targets"].clone())?;
    assert!(expected.is_sorted());
    assert_eq!(model.targeted_modules(&all_linear())?, expected, "{case}");
    Ok(())
}

fn check_base_logits<M: CausalLm>(case: &str, model: &M) -> TestResult {
    eprintln!("{case}:");
    let io = fixture_io(case);
    let logits = model.logits(&input_ids(&io)?)?;
    assert_close("logits_base", &logits, &io["logits_base"], LOGITS_TOL)?;
    Ok(())
}

/// Loads PEFT's adapter folder, checks adapted logits, loss, gradients and
/// merged logits, then saves the adapter from Rust and compares the files
/// with PEFT's.
fn check_lora<M: CausalLm>(case: &str, load: impl Fn() -> Result<M, Box<dyn std::error::Error>>) -> TestResult {
    let dir = fixture_path(case);
    let mut model = load()?;
    model.load_adapter(dir.join("adapter"), "default")?;

    eprintln!("{case} (LoRA):");
    let io = fixture_io(case);
    let ids = input_ids(&io)?;
    let logits = model.logits(&ids)?;
    assert_close("logits_adapted", &logits, &io["logits_adapted"], LOGITS_TOL)?;

    let loss = next_token_loss(&logits, &ids)?;
    assert_close("loss", &loss.reshape(1)?, &io["loss"], LOGITS_TOL)?;

    let grads = loss.backward()?;
    let vars = model.named_trainable_vars();
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let key = format!("grad.{}", file_key(name));
        let expected = &io[&key];
        let got = grads.get(var).ok_or_else(|| format!("no gradient reached {name}"))?;
        let rel = max_abs_diff_or_nan(got, expected)? / max_abs(expected);
        if rel.is_nan() || rel > GRAD_REL_TOL {
            return Err(format!("{case}: {key}: relative error {rel:.3e} > {GRAD_REL_TOL:.0e}").into());
        }
        if rel >= worst.0 {
            worst = (rel, key);
        }
    }
    assert_eq!(
        vars.len(),
        io.keys().filter(|k| k.starts_with("grad.")).count(),
        "{case}: one gradient per adapter tensor"
    );
    eprintln!(
        "  gradients ({}): worst relative error {:.3e} ({})",
        vars.len(),
        worst.0,
        worst.1
    );

    // Save from Rust and compare with PEFT's own files.
    let saved = scratch("fixture_models", case);
    model.save_adapter(&saved, "default")?;
    check_saved_files(case, &saved)?;
    let mut reloaded = load()?;
    reloaded.load_adapter(&saved, "default")?;
    assert_close(
        "logits after a Rust save and load",
        &reloaded.logits(&ids)?,
        &logits,
        0.0,
    )?;

    model.merge()?;
    let merged = model.logits(&ids)?;
    assert_close("logits_merged", &merged, &io["logits_merged"], LOGITS_TOL)?;
    Ok(())
}

/// The files Rust saved in `saved` against PEFT's in the case's `adapter/`.
fn check_saved_files(case: &str, saved: &std::path::Path) -> TestResult {
    let peft_dir = fixture_path(case).join("adapter");
    let theirs = candle_core::safetensors::load(peft_dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    let ours = candle_core::safetensors::load(saved.join("adapter_model.safetensors"), &Device::Cpu)?;
    let mut their_keys: Vec<&String> = theirs.keys().collect();
    let mut our_keys: Vec<&String> = ours.keys().collect();
    their_keys.sort();
    our_keys.sort();
    assert_eq!(our_keys, their_keys, "{case}: tensor keys");
    for (key, tensor) in &theirs {
        assert_eq!(ours[key].dims(), tensor.dims(), "{case}: {key}");
        assert_eq!(max_abs_diff_or_nan(&ours[key], tensor)?, 0.0, "{case}: {key}");
    }

    let theirs = read_json(peft_dir.join("adapter_config.json"));
    let ours = read_json(saved.join("adapter_config.json"));
    for field in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "exclude_modules",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "bias",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    ] {
        assert_eq!(ours[field], theirs[field], "{case}: config field {field}");
    }
    // PEFT saves target_modules as an unordered set, resolved before
    // exclusion (the custom case lists `head`, kept out by exclude_modules);
    // Rust saves the modules the adapter really sits on.
    let set = |value: &serde_json::Value| -> std::collections::BTreeSet<String> {
        serde_json::from_value(value.clone()).unwrap_or_default()
    };
    let excluded = set(&theirs["exclude_modules"]);
    let expected: std::collections::BTreeSet<String> = set(&theirs["target_modules"])
        .into_iter()
        .filter(|m| !excluded.iter().any(|e| peft_core::name_matches(m, e)))
        .collect();
    assert_eq!(set(&ours["target_modules"]), expected, "{case}: target_modules");
    Ok(())
}

// ---- llama_lora_all_linear --------------------------------------------------

#[test]
fn llama_targets() -> TestResult {
    check_targets("llama_lora_all_linear", &load_llama()?)
}

#[test]
fn llama_base_logits() -> TestResult {
    check_base_logits("llama_lora_all_linear", &load_llama()?)
}

#[test]
fn llama_lora() -> TestResult {
    check_lora("llama_lora_all_linear", load_llama)
}

// ---- gpt2_lora_conv1d -------------------------------------------------------

#[test]
fn gpt2_targets() -> TestResult {
    check_targets("gpt2_lora_conv1d", &load_gpt2()?)
}

#[test]
fn gpt2_base_logits() -> TestResult {
    check_base_logits("gpt2_lora_conv1d", &load_gpt2()?)
}

/// PEFT saved `fan_in_fan_out: true` for the Conv1D layers; with the weights
/// transposed at load, its `lora_A` `[r, in]` / `lora_B` `[out, r]` go into the
/// ordinary LoRA slots and merge without any special case, and the config
/// Rust saves says `fan_in_fan_out: true` too.
#[test]
fn gpt2_lora() -> TestResult {
    let config = read_json(fixture_path("gpt2_lora_conv1d").join("adapter/adapter_config.json"));
    assert_eq!(config["fan_in_fan_out"], true);
    check_lora("gpt2_lora_conv1d", load_gpt2)
}

/// The head is tied: one tensor, counted once.
#[test]
fn gpt2_tied_head_is_counted_once() -> TestResult {
    let model = load_gpt2()?;
    let expected: usize =
        candle_core::safetensors::load(fixture_path("gpt2_lora_conv1d").join("model.safetensors"), &Device::Cpu)?
            .values()
            .map(Tensor::elem_count)
            .sum();
    assert_eq!(model.num_parameters().total, expected);
    Ok(())
}

// ---- custom_lora_exclude_head -----------------------------------------------

/// PEFT needed `exclude_modules=["head"]` here (on a non-transformers model
/// its all-linear keeps the head); `#[output_head]` does it with plain
/// `all_linear()`.
#[test]
fn tiny_lm_targets() -> TestResult {
    let case = "custom_lora_exclude_head";
    let model = load_tiny_lm()?;
    check_targets(case, &model)?;
    let config = read_json(fixture_path(case).join("adapter/adapter_config.json"));
    assert_eq!(config["exclude_modules"], serde_json::json!(["head"]));
    // Exclusion by name, as PEFT's config says, selects the same layers.
    assert_eq!(
        model.targeted_modules(&modules(["q", "k", "v", "o", "up", "down", "head"]).exclude(["head"]))?,
        model.targeted_modules(&all_linear())?
    );
    Ok(())
}

#[test]
fn tiny_lm_base_logits() -> TestResult {
    check_base_logits("custom_lora_exclude_head", &load_tiny_lm()?)
}

#[test]
fn tiny_lm_lora() -> TestResult {
    check_lora("custom_lora_exclude_head", load_tiny_lm)
}
