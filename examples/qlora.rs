//! QLoRA on a Hugging Face checkpoint: the base quantized at load to 4 bits,
//! LoRA trained on top in f32.
//!
//! ```text
//! cargo run --release --example qlora
//! cargo run --release --example qlora -- --model <dir> --data <file.jsonl> --quantize q4k --steps 200
//! ```
//!
//! 1. Loads a checkpoint folder with `peft_models::AutoModel` (any supported
//!    architecture) and quantizes every linear layer but the head
//!    (`AutoModel::quantize`, candle's GGML formats), printing the memory
//!    the linear weights take before and after.
//! 2. Reads a jsonl data set (`{"text": ...}` a line) with the checkpoint's
//!    tokenizer and measures the loss (`peft_models::eval`).
//! 3. Puts LoRA on every linear layer but the head (`all_linear()`) and
//!    trains it with AdamW: only the adapters train, and the gradient
//!    reaches the first layers through the quantized products above them.
//! 4. Measures the loss again, saves the adapter in PEFT's format, loads it
//!    into a freshly quantized model and checks that model gives the same
//!    logits.
//!
//! `--model` defaults to the tiny Llama made with transformers in
//! `tests/fixtures/llama_with_tokenizer`, `--data` to its `eval.jsonl`: the
//! demo trains and measures on the same few lines, so the loss it prints
//! shows the adapters learn, not that they generalise.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use peft_core::prelude::*;
use peft_models::eval::{evaluate, read_texts};
use peft_models::tokenizer::Tokenizer;
use peft_models::AutoModel;

struct Args {
    model: PathBuf,
    data: PathBuf,
    quantize: GgmlDType,
    steps: usize,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_with_tokenizer");
    let mut args = Args {
        data: fixture.join("eval.jsonl"),
        model: fixture,
        quantize: GgmlDType::Q4_0,
        steps: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--data" => args.data = value.into(),
            "--steps" => args.steps = value.parse()?,
            "--quantize" => {
                args.quantize = match value.as_str() {
                    "q8_0" => GgmlDType::Q8_0,
                    "q4_0" => GgmlDType::Q4_0,
                    "q4k" => GgmlDType::Q4K,
                    other => return Err(format!("--quantize {other}: expected q8_0, q4_0 or q4k").into()),
                }
            }
            other => return Err(format!("unknown flag {other} (--model, --data, --quantize, --steps)").into()),
        }
    }
    Ok(args)
}

/// Loads the checkpoint in f32 and quantizes its hidden linear layers.
fn load_quantized(args: &Args) -> Result<AutoModel, Box<dyn std::error::Error>> {
    let mut model = AutoModel::from_dir(&args.model, DType::F32, &Device::Cpu)?;
    model.quantize(args.quantize)?;
    Ok(model)
}

/// Bytes of the quantized linear weights, and what they took in f32.
fn quantized_bytes(model: &AutoModel) -> (usize, usize) {
    model
        .layers()
        .iter()
        .filter_map(|layer| layer.layer.quantized_weight())
        .map(|weight| (weight.size_in_bytes(), weight.shape().elem_count() * 4))
        .fold((0, 0), |(q, d), (a, b)| (q + a, d + b))
}

/// The next-token cross entropy of one sequence.
fn sequence_loss(model: &AutoModel, ids: &[u32]) -> candle_core::Result<Tensor> {
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)?.unsqueeze(0)?;
    let targets = Tensor::new(&ids[1..], &Device::Cpu)?;
    let logits = model.forward(&input)?.i(0)?;
    candle_nn::loss::cross_entropy(&logits, &targets)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let mut model = load_quantized(&args)?;
    let (quantized, dense) = quantized_bytes(&model);
    println!(
        "{} ({}): linear weights {:.1} KiB as {:?} against {:.1} KiB in f32 ({:.1} x smaller)",
        args.model.display(),
        model.model_type(),
        quantized as f64 / 1024.0,
        args.quantize,
        dense as f64 / 1024.0,
        dense as f64 / quantized as f64
    );

    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let texts = read_texts(&args.data)?;
    let sequences = texts
        .iter()
        .map(|text| tokenizer.encode(text, true))
        .collect::<Result<Vec<_>, _>>()?;
    let sequences: Vec<Vec<u32>> = sequences.into_iter().filter(|ids| ids.len() >= 2).collect();
    if sequences.is_empty() {
        return Err(format!("{}: no line has two tokens to learn from", args.data.display()).into());
    }
    let before = evaluate(&model, &tokenizer, &texts)?;
    println!(
        "base: loss {:.4}, perplexity {:.2} over {} tokens",
        before.loss, before.perplexity, before.tokens
    );

    model.apply_lora(LoraConfig::from(all_linear()).rank(8).alpha(16.0))?;
    println!("{}", model.num_parameters());
    let mut optimizer = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )?;
    model.set_training(true);
    let started = Instant::now();
    for step in 0..args.steps {
        let loss = sequence_loss(&model, &sequences[step % sequences.len()])?;
        let grads = loss.backward()?;
        if step == 0 {
            // lora_A's gradient is zero while lora_B is (PEFT's init); every
            // lora_B, first layer included, must get one.
            let missing = model.missing_gradients(&grads)?;
            if missing.iter().any(|name| name.contains("lora_B")) {
                return Err(format!("no gradient reached {missing:?}").into());
            }
        }
        optimizer.step(&grads)?;
        if step % 20 == 0 || step + 1 == args.steps {
            println!(
                "step {:>4}/{}  loss {:.4}",
                step + 1,
                args.steps,
                loss.to_scalar::<f32>()?
            );
        }
    }
    model.set_training(false);
    let after = evaluate(&model, &tokenizer, &texts)?;
    println!(
        "trained {} steps in {:.2?}: loss {:.4} -> {:.4}, perplexity {:.2} -> {:.2}",
        args.steps,
        started.elapsed(),
        before.loss,
        after.loss,
        before.perplexity,
        after.perplexity
    );
    if after.loss >= before.loss {
        return Err("the loss did not fall".into());
    }

    let adapter_dir = std::env::temp_dir().join(format!("peft-qlora-{}", std::process::id()));
    model.save_adapter(&adapter_dir, "default")?;
    let mut reloaded = load_quantized(&args)?;
    reloaded.load_adapter(&adapter_dir, "default")?;
    let probe = Tensor::new(sequences[0].as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let difference = (model.forward(&probe)? - reloaded.forward(&probe)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "saved in PEFT's format to {}; reloaded on a fresh {:?} base: largest logit difference {difference:e}",
        adapter_dir.display(),
        args.quantize
    );
    if difference > 1e-5 {
        return Err("the reloaded adapter gives other logits".into());
    }
    if let Err(error) = model.merge() {
        println!("merge refused, as designed (requantizing would lose the adapter): {error}");
    }
    std::fs::remove_dir_all(&adapter_dir)?;
    Ok(())
}
