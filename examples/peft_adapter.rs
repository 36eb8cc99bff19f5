//! Serve a LoRA adapter trained with Python PEFT: load a Llama base model and
//! PEFT's adapter folder, compare greedy continuations with and without the
//! adapter, then merge it and check the merged model agrees.
//!
//! ```text
//! cargo run --release --example peft_adapter
//! cargo run --release --example peft_adapter -- --model <dir> --adapter <dir> --prompt 1,5,9
//! ```
//!
//! `--model` is a folder with transformers' `config.json` and the weights as
//! `*.safetensors` (one file or shards); `--adapter` is what
//! `PeftModel.save_pretrained` wrote (`adapter_config.json`,
//! `adapter_model.safetensors`). Both default to the tiny Llama fixture made
//! with transformers and PEFT in `tests/fixtures/llama_lora_all_linear`.
//! The prompt is token ids (no tokenizer here).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use peft_core::prelude::*;
use peft_models::llama::{Config, LlamaForCausalLM};

struct Args {
    model: PathBuf,
    adapter: PathBuf,
    prompt: Vec<u32>,
    new_tokens: usize,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_lora_all_linear");
    let mut args = Args {
        adapter: fixture.join("adapter"),
        model: fixture,
        prompt: vec![1, 17, 33, 8],
        new_tokens: 12,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--adapter" => args.adapter = value()?.into(),
            "--prompt" => {
                args.prompt = value()?
                    .split(',')
                    .map(|t| t.trim().parse())
                    .collect::<Result<_, _>>()?;
            }
            "--new-tokens" => args.new_tokens = value()?.parse()?,
            other => return Err(format!("unknown flag {other}; see the top of examples/peft_adapter.rs").into()),
        }
    }
    Ok(args)
}

/// Greedy decoding: append the most likely next token `n` times.
fn generate(model: &LlamaForCausalLM, prompt: &[u32], n: usize) -> candle_core::Result<Vec<u32>> {
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        let ids = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&ids)?;
        let last = logits.squeeze(0)?.get(tokens.len() - 1)?;
        tokens.push(last.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    Ok(tokens[prompt.len()..].to_vec())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let cfg = Config::from_file(args.model.join("config.json"))?;
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&args.model)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !p.ends_with("io.safetensors"))
        .collect();
    shards.sort();
    // SAFETY: the weight files are not modified while the model is loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&shards, DType::F32, &Device::Cpu)? };
    let mut model = LlamaForCausalLM::load(vb, &cfg)?;
    println!("base model: {} ({})", args.model.display(), model.num_parameters());

    let base = generate(&model, &args.prompt, args.new_tokens)?;

    let started = Instant::now();
    model.load_adapter(&args.adapter, "default")?;
    println!(
        "loaded PEFT adapter {} in {:.2?}: {} modules",
        args.adapter.display(),
        started.elapsed(),
        model.adapted_modules().len()
    );
    println!("{}", model.num_parameters());
    let adapted = generate(&model, &args.prompt, args.new_tokens)?;

    model.merge()?;
    let merged = generate(&model, &args.prompt, args.new_tokens)?;

    println!("prompt:         {:?}", args.prompt);
    println!("base:           {base:?}");
    println!("with adapter:   {adapted:?}");
    println!("merged adapter: {merged:?}");
    if adapted != merged {
        return Err("the merged model generates differently from the unmerged one".into());
    }
    println!("merged and unmerged continuations agree");
    Ok(())
}
