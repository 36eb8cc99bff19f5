//! Mistral, Qwen2 and Qwen3 checkpoints made with transformers 5.24 and
//! PEFT 0.21.2 (`tests/fixtures/<arch>_lora_all_linear/`, see each
//! `CASE.md`), loaded by `AutoModel`: the same logits, the same modules
//! targeted by `all-linear`, PEFT's adapter giving PEFT's logits, and the
//! same greedy continuations as `model.generate(do_sample=False)`.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use peft_core::prelude::*;
use peft_models::generate::{generate, GenerateOptions};
use peft_models::llama::KvCache;
use peft_models::AutoModel;

mod support;
use support::{assert_close, fixture_io, fixture_path, read_json};

/// A correct float32 implementation lands within a few 1e-6.
const LOGITS_TOL: f32 = 1e-5;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `prompt` `[1, p]` continued greedily to `total` tokens by `generate`,
/// through the KV cache (and, for Mistral, past the sliding window).
fn greedy(model: &AutoModel, prompt: &Tensor, total: usize) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let mut ids: Vec<u32> = prompt.i(0)?.to_vec1()?;
    let options = GenerateOptions {
        max_new_tokens: total - ids.len(),
        ..GenerateOptions::default()
    };
    let generated = generate(model, &ids, &options, |_| {})?;
    ids.extend(generated.tokens);
    Ok(ids)
}

fn ids(tensor: &Tensor) -> Vec<u32> {
    tensor.to_dtype(DType::U32).unwrap().i(0).unwrap().to_vec1().unwrap()
}

/// Where the case has them (Gemma 2, whose random model repeats one token),
/// the logits of each generation step through the KV cache, as
/// transformers' `generate` computed them (`generate_step_logits_<which>`).
fn check_step_logits(model: &AutoModel, io: &HashMap<String, Tensor>, which: &str) -> TestResult {
    let Some(expected) = io.get(&format!("generate_step_logits_{which}")) else {
        return Ok(());
    };
    let generated = ids(&io[&format!("generate_{which}")]);
    let prompt_len = io["generate_prompt"].dim(1)?;
    let mut cache = KvCache::default();
    let mut steps = Vec::new();
    let mut input = generated[..prompt_len].to_vec();
    for &next in &generated[prompt_len..] {
        let ids = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward_with_cache(&ids, &mut cache)?;
        steps.push(logits.i((.., logits.dim(1)? - 1..))?);
        input = vec![next];
    }
    assert_close(
        &format!("step logits ({which})"),
        &Tensor::cat(&steps, 1)?,
        expected,
        LOGITS_TOL,
    )?;
    Ok(())
}

/// Every check of one case.
fn check_case(case: &str, model_type: &str) -> TestResult {
    let dir = fixture_path(case);
    let io = fixture_io(case);
    let input_ids = io["input_ids"].to_dtype(DType::U32)?;
    let mut model = AutoModel::from_dir(&dir, DType::F32, &Device::Cpu)?;
    assert_eq!(model.model_type(), model_type);

    eprintln!("{case}:");
    assert_close(
        "logits_base",
        &model.forward(&input_ids)?,
        &io["logits_base"],
        LOGITS_TOL,
    )?;
    let prompt = io["generate_prompt"].to_dtype(DType::U32)?;
    let expected = ids(&io["generate_base"]);
    assert_eq!(greedy(&model, &prompt, expected.len())?, expected, "{case}: greedy ids");
    check_step_logits(&model, &io, "base")?;

    let targets: Vec<String> = serde_json::from_value(read_json(dir.join("targets.json"))["targets"].clone())?;
    assert_eq!(model.targeted_modules(&all_linear())?, targets, "{case}: all-linear");
    model.load_adapter(dir.join("adapter"), "default")?;
    assert_eq!(model.adapted_modules(), targets, "{case}: adapted modules");
    assert_close(
        "logits_adapted",
        &model.forward(&input_ids)?,
        &io["logits_adapted"],
        LOGITS_TOL,
    )?;
    let expected = ids(&io["generate_adapted"]);
    assert_eq!(
        greedy(&model, &prompt, expected.len())?,
        expected,
        "{case}: adapted greedy ids"
    );
    check_step_logits(&model, &io, "adapted")?;

    // Merged, the model computes what it did unmerged.
    let unmerged = model.forward(&input_ids)?;
    model.merge()?;
    assert_close("merged", &model.forward(&input_ids)?, &unmerged, LOGITS_TOL)?;
    Ok(())
}

#[test]
fn mistral_with_a_window_shorter_than_the_sequence() -> TestResult {
    check_case("mistral_lora_all_linear", "mistral")
}

#[test]
fn qwen2_with_qkv_biases_and_a_tied_head() -> TestResult {
    check_case("qwen2_lora_all_linear", "qwen2")
}

#[test]
fn qwen3_with_qk_norms_and_a_wider_head_dim() -> TestResult {
    check_case("qwen3_lora_all_linear", "qwen3")
}

#[test]
fn gemma2_with_soft_caps_four_norms_and_sliding_layers() -> TestResult {
    check_case("gemma2_lora_all_linear", "gemma2")
}

#[test]
fn phi3_with_fused_qkv_and_gate_up_projections() -> TestResult {
    check_case("phi3_lora_all_linear", "phi3")
}

/// Llama with RoPE scaling (`tests/fixtures/llama_rope_scaling/<type>/`):
/// 12 positions where the original context is 8, so the scaling shows.
#[test]
fn llama_rope_scaling_linear_dynamic_and_llama3() -> TestResult {
    for kind in ["linear", "dynamic", "llama3"] {
        let case = format!("llama_rope_scaling/{kind}");
        let io = fixture_io(&case);
        let model = AutoModel::from_dir(fixture_path(&case), DType::F32, &Device::Cpu)?;
        let input_ids = io["input_ids"].to_dtype(DType::U32)?;
        assert_close(&case, &model.forward(&input_ids)?, &io["logits_base"], LOGITS_TOL)?;
        let prompt = io["generate_prompt"].to_dtype(DType::U32)?;
        // Through the KV cache, as transformers' generate.
        let expected = ids(&io["generate_base"]);
        assert_eq!(greedy(&model, &prompt, expected.len())?, expected, "{case}: cached");
        // Recomputing the whole sequence each step: for dynamic, every
        // position then takes the frequencies of the sequence's length.
        let expected = ids(&io["generate_base_nocache"]);
        let mut sequence: Vec<u32> = prompt.i(0)?.to_vec1()?;
        while sequence.len() < expected.len() {
            let logits = model.forward(&Tensor::new(sequence.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
            let last = logits.i((0, sequence.len() - 1))?;
            sequence.push(last.argmax(candle_core::D::Minus1)?.to_scalar::<u32>()?);
        }
        assert_eq!(sequence, expected, "{case}: without a cache");
    }
    Ok(())
}
