//! A model of candle-transformers, whose layers are private
//! `candle_nn::Linear`s no derive can reach, serves a PEFT adapter through
//! `peft_models::merge::merged_var_builder`: its greedy continuation equals
//! peft-models' own Llama with the adapter loaded (what `peft generate
//! --adapter` runs).

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use peft_core::PeftModel;
use peft_models::generate::{generate, GenerateOptions};
use peft_models::merge::{merged_var_builder, WeightedAdapter};
use peft_models::AutoModel;

mod support;
use support::{fixture_io, fixture_path};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn candle_transformers_llama_generates_as_peft_generate_with_the_adapter() -> TestResult {
    let case = "llama_lora_all_linear";
    let dir = fixture_path(case);
    let prompt: Vec<u32> = fixture_io(case)["input_ids"].to_dtype(DType::U32)?.i(0)?.to_vec1()?;
    let new_tokens = 10;

    // Ours: the adapter loaded unmerged.
    let mut ours = AutoModel::from_dir(&dir, DType::F32, &Device::Cpu)?;
    ours.load_adapter(dir.join("adapter"), "default")?;
    let options = GenerateOptions {
        max_new_tokens: new_tokens,
        ..GenerateOptions::default()
    };
    let expected = generate(&ours, &prompt, &options, |_| {})?.tokens;

    // candle-transformers' Llama over a VarBuilder that merges as it loads.
    let config: LlamaConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let config = config.into_config(false);
    let adapters = vec![WeightedAdapter::read(dir.join("adapter"), 1.0)?];
    let vb = merged_var_builder(&dir, adapters, DType::F32, &Device::Cpu)?;
    let model = Llama::load(vb, &config)?;
    let mut cache = Cache::new(true, DType::F32, &config, &Device::Cpu)?;
    let mut tokens = prompt.clone();
    let mut position = 0;
    let mut generated = Vec::new();
    for _ in 0..new_tokens {
        let input = Tensor::new(&tokens[position..], &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input, position, &mut cache)?.squeeze(0)?;
        position = tokens.len();
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        tokens.push(next);
        generated.push(next);
    }
    assert_eq!(generated, expected);

    // Without the adapter the continuation differs: the merge did something.
    let plain = Llama::load(merged_var_builder(&dir, Vec::new(), DType::F32, &Device::Cpu)?, &config)?;
    let mut cache = Cache::new(false, DType::F32, &config, &Device::Cpu)?;
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let adapted = Llama::load(
        merged_var_builder(
            &dir,
            vec![WeightedAdapter::read(dir.join("adapter"), 1.0)?],
            DType::F32,
            &Device::Cpu,
        )?,
        &config,
    )?;
    let difference = (plain.forward(&input, 0, &mut cache)?
        - adapted.forward(&input, 0, &mut Cache::new(false, DType::F32, &config, &Device::Cpu)?)?)?
    .abs()?
    .max_all()?
    .to_scalar::<f32>()?;
    assert!(difference > 1e-3, "{difference}");
    Ok(())
}
