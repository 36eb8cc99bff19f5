//! QLoRA: LoRA trained on top of a 4-bit base model.
//!
//! ```text
//! cargo run --release --example qlora
//! ```
//!
//! 1. Makes a small random "pretrained" model and writes its linear weights
//!    to a GGUF file, quantized to Q4_0 with candle (the embedding in f32).
//! 2. Loads it back with the linear weights still quantized
//!    (`Linear::from_qtensor`) and compares their memory with f32.
//! 3. Puts LoRA on every linear layer but the head (`all_linear()`), trains it
//!    with AdamW on a synthetic task, printing progress: only the adapters
//!    train, and the gradient reaches the first block through the quantized
//!    layers above it.
//! 4. Saves the adapter in PEFT's format.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use peft_core::prelude::*;

const VOCAB: usize = 128;
const HIDDEN: usize = 256;
const INNER: usize = 512;
const BLOCKS: usize = 2;
const STEPS: usize = 120;

#[derive(Adaptable)]
struct Mlp {
    up: Linear,
    down: Linear,
}

#[derive(Adaptable)]
struct Model {
    embed: candle_nn::Embedding,
    blocks: Vec<Mlp>,
    #[output_head]
    head: Linear,
}

impl Model {
    /// Reads the model from a GGUF file; linear weights stay quantized.
    fn from_gguf(path: &Path, device: &Device) -> candle_core::Result<Self> {
        let mut reader = BufReader::new(File::open(path)?);
        let content = gguf_file::Content::read(&mut reader)?;
        let mut tensor = |name: &str| content.tensor(&mut reader, name, device);
        let embed = tensor("embed.weight")?.dequantize(device)?;
        let mut blocks = Vec::with_capacity(BLOCKS);
        for i in 0..BLOCKS {
            blocks.push(Mlp {
                up: Linear::from_qtensor(tensor(&format!("blocks.{i}.up.weight"))?, None)?,
                down: Linear::from_qtensor(tensor(&format!("blocks.{i}.down.weight"))?, None)?,
            });
        }
        Ok(Self {
            embed: candle_nn::Embedding::new(embed, HIDDEN),
            blocks,
            head: Linear::from_qtensor(tensor("head.weight")?, None)?,
        })
    }

    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.embed.forward(ids)?;
        for block in &self.blocks {
            x = (&x + block.down.forward(&block.up.forward(&x)?.gelu()?)?)?;
        }
        self.head.forward(&x)
    }
}

/// Writes a random model to `path`: linear weights in Q4_0, the embedding in f32.
fn write_random_model(path: &Path, device: &Device) -> candle_core::Result<()> {
    let randn = |out: usize, inp: usize| Tensor::randn(0f32, (1.0 / inp as f64).sqrt() as f32, (out, inp), device);
    let mut tensors: Vec<(String, QTensor)> = vec![(
        "embed.weight".into(),
        QTensor::quantize(&Tensor::randn(0f32, 1.0, (VOCAB, HIDDEN), device)?, GgmlDType::F32)?,
    )];
    for i in 0..BLOCKS {
        tensors.push((
            format!("blocks.{i}.up.weight"),
            QTensor::quantize(&randn(INNER, HIDDEN)?, GgmlDType::Q4_0)?,
        ));
        tensors.push((
            format!("blocks.{i}.down.weight"),
            QTensor::quantize(&randn(HIDDEN, INNER)?, GgmlDType::Q4_0)?,
        ));
    }
    tensors.push((
        "head.weight".into(),
        QTensor::quantize(&randn(VOCAB, HIDDEN)?, GgmlDType::Q4_0)?,
    ));
    let architecture = gguf_file::Value::String("peft-qlora-demo".into());
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(
        &mut BufWriter::new(File::create(path)?),
        &[("general.architecture", &architecture)],
        &refs,
    )
}

/// The synthetic task: every token is followed by `(3·t + 1) mod VOCAB`.
fn batch(step: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let inputs: Vec<u32> = (0..64).map(|i| ((step * 64 + i) * 37 % VOCAB) as u32).collect();
    let targets: Vec<u32> = inputs.iter().map(|&t| (3 * t + 1) % VOCAB as u32).collect();
    Ok((Tensor::new(inputs, device)?, Tensor::new(targets, device)?))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let dir = std::env::temp_dir().join("peft-qlora-demo");
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join("model.gguf");
    write_random_model(&gguf, &device)?;
    println!("wrote {} ({} bytes)", gguf.display(), std::fs::metadata(&gguf)?.len());

    let mut model = Model::from_gguf(&gguf, &device)?;
    let (quantized, dense): (usize, usize) = model
        .layers()
        .iter()
        .filter_map(|l| l.layer.quantized_weight())
        .map(|w| (w.size_in_bytes(), w.shape().elem_count() * 4))
        .fold((0, 0), |(q, d), (a, b)| (q + a, d + b));
    println!(
        "linear base weights: {:.1} KiB as Q4_0 vs {:.1} KiB in f32 ({:.1}x smaller)",
        quantized as f64 / 1024.0,
        dense as f64 / 1024.0,
        dense as f64 / quantized as f64
    );

    model.apply_lora(LoraConfig::from(all_linear()).rank(16).alpha(32.0))?;
    println!("LoRA on {:?}", model.adapted_modules());
    println!("{}", model.num_parameters());

    let mut optimizer = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    model.set_training(true);
    let started = Instant::now();
    let mut losses = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        let (inputs, targets) = batch(step, &device)?;
        let loss = candle_nn::loss::cross_entropy(&model.forward(&inputs)?, &targets)?;
        let grads = loss.backward()?;
        if step == 0 {
            let missing = model.missing_gradients(&grads)?;
            if missing.iter().any(|name| name.contains("lora_B")) {
                return Err(format!("no gradient reached {missing:?}").into());
            }
        }
        optimizer.step(&grads)?;
        losses.push(loss.to_scalar::<f32>()?);
        if step % 20 == 0 || step + 1 == STEPS {
            println!(
                "step {:>4}/{STEPS}  loss {:.4}  ({:.1} steps/s)",
                step + 1,
                losses[step],
                (step + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    model.set_training(false);
    let (first, last) = (losses[0], losses[STEPS - 1]);
    println!("trained in {:.2?}: loss {first:.4} -> {last:.4}", started.elapsed());
    if last >= first {
        return Err("the loss did not fall".into());
    }

    let adapter_dir = dir.join("adapter");
    model.save_adapter(&adapter_dir, "default")?;
    println!("saved the adapter in PEFT's format to {}", adapter_dir.display());
    if let Err(error) = model.merge() {
        println!("merge refused, as designed: {error}");
    }
    Ok(())
}
