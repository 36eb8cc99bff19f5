//! Quickstart: LoRA on every linear layer of a small transformer, trained on
//! CPU in a few seconds, then merged.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The model is written as plain structs with `#[derive(Adaptable)]`; the
//! output head is marked `#[output_head]`, so `all_linear()` adapts every
//! other linear layer, as PEFT's `target_modules="all-linear"` does.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use peft_core::prelude::*;

const VOCAB: usize = 64;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const LAYERS: usize = 2;
const SEQ: usize = 24;
const BATCH: usize = 16;
const STEPS: usize = 150;

#[derive(Adaptable)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[derive(Adaptable)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Adaptable)]
struct Block {
    input_layernorm: candle_nn::RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: candle_nn::RmsNorm,
    mlp: Mlp,
}

#[derive(Adaptable)]
struct Model {
    embed_tokens: candle_nn::Embedding,
    layers: Vec<Block>,
    norm: candle_nn::RmsNorm,
    #[output_head]
    lm_head: Linear,
}

impl Attention {
    fn load(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q_proj: linear_no_bias(HIDDEN, HIDDEN, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(HIDDEN, HIDDEN, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(HIDDEN, HIDDEN, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(HIDDEN, HIDDEN, vb.pp("o_proj"))?,
        })
    }

    /// Causal multi-head self-attention over `x` `[batch, seq, hidden]`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let head_dim = HIDDEN / HEADS;
        let split = |y: Tensor| y.reshape((b, t, HEADS, head_dim))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?.broadcast_add(mask)?;
        let out = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        self.o_proj.forward(&out.transpose(1, 2)?.reshape((b, t, HIDDEN))?)
    }
}

impl Mlp {
    fn load(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            gate_proj: linear_no_bias(HIDDEN, 2 * HIDDEN, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(HIDDEN, 2 * HIDDEN, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(2 * HIDDEN, HIDDEN, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

impl Model {
    /// Builds the model from a `VarBuilder`, exactly as for plain candle-nn.
    fn load(vb: VarBuilder) -> candle_core::Result<Self> {
        let layers = (0..LAYERS)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(Block {
                    input_layernorm: candle_nn::rms_norm(HIDDEN, 1e-6, vb.pp("input_layernorm"))?,
                    self_attn: Attention::load(vb.pp("self_attn"))?,
                    post_attention_layernorm: candle_nn::rms_norm(HIDDEN, 1e-6, vb.pp("post_attention_layernorm"))?,
                    mlp: Mlp::load(vb.pp("mlp"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            embed_tokens: candle_nn::embedding(VOCAB, HIDDEN, vb.pp("embed_tokens"))?,
            layers,
            norm: candle_nn::rms_norm(HIDDEN, 1e-6, vb.pp("norm"))?,
            lm_head: linear_no_bias(HIDDEN, VOCAB, vb.pp("lm_head"))?,
        })
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    ///
    /// Training needs differentiable ops all the way down: candle-nn's fused
    /// `RmsNorm::forward` and `softmax_last_dim` have no backward pass and
    /// would silently stop the gradient, so this uses `forward_diff` and
    /// `softmax`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let t = ids.dim(1)?;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), ids.device())?;
        let mut x = self.embed_tokens.forward(ids)?;
        for block in &self.layers {
            x = (&x
                + block
                    .self_attn
                    .forward(&block.input_layernorm.forward_diff(&x)?, &mask)?)?;
            x = (&x + block.mlp.forward(&block.post_attention_layernorm.forward_diff(&x)?)?)?;
        }
        self.lm_head.forward(&self.norm.forward_diff(&x)?)
    }
}

/// A synthetic language: each sequence counts upward by its own stride
/// (mod VOCAB), so the next token follows from the two before it.
fn batch(step: usize, device: &Device) -> candle_core::Result<Tensor> {
    let ids: Vec<u32> = (0..BATCH)
        .flat_map(|row| {
            let seed = step * BATCH + row;
            let start = (seed * 7919) % VOCAB;
            let stride = 1 + (seed * 31) % 3;
            (0..SEQ).map(move |i| ((start + i * stride) % VOCAB) as u32)
        })
        .collect();
    Tensor::from_vec(ids, (BATCH, SEQ), device)
}

fn next_token_loss(model: &Model, ids: &Tensor) -> candle_core::Result<Tensor> {
    let inputs = ids.narrow(1, 0, SEQ - 1)?;
    let targets = ids.narrow(1, 1, SEQ - 1)?;
    let logits = model.forward(&inputs)?;
    candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    // A random "pretrained" base; with a checkpoint this would be
    // `VarBuilder::from_mmaped_safetensors(&files, DType::F32, &device)`.
    let varmap = VarMap::new();
    let mut model = Model::load(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;

    let config = LoraConfig::from(all_linear()).rank(8).alpha(16.0);
    let started = Instant::now();
    model.apply_lora(config)?;
    println!(
        "applied LoRA in {:.2?} to {} modules:",
        started.elapsed(),
        model.adapted_modules().len()
    );
    for path in model.adapted_modules() {
        println!("  {path}");
    }
    println!("{}", model.num_parameters());

    let mut optimizer = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    model.set_training(true);
    let started = Instant::now();
    let mut first_loss = None;
    let mut last_loss = 0.0;
    for step in 0..STEPS {
        let ids = batch(step, &device)?;
        let loss = next_token_loss(&model, &ids)?;
        let grads = loss.backward()?;
        if step == 0 {
            // B starts at zero, so only B's gradients are known to be non-zero yet.
            let missing: Vec<String> = model
                .missing_gradients(&grads)?
                .into_iter()
                .filter(|name| name.contains("lora_B"))
                .collect();
            if !missing.is_empty() {
                return Err(format!("no gradient reached {missing:?}").into());
            }
        }
        optimizer.step(&grads)?;
        last_loss = loss.to_scalar::<f32>()?;
        first_loss.get_or_insert(last_loss);
        if step % 15 == 0 || step + 1 == STEPS {
            println!(
                "step {:>4}/{STEPS}  loss {last_loss:.4}  ({:.1} steps/s)",
                step + 1,
                (step + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    model.set_training(false);
    let first_loss = first_loss.unwrap_or(last_loss);
    println!(
        "trained in {:.2?}: loss {first_loss:.4} -> {last_loss:.4}",
        started.elapsed()
    );

    // Held-out batch: accuracy of the next-token prediction.
    let ids = batch(STEPS + 1000, &device)?;
    let unmerged = model.forward(&ids.narrow(1, 0, SEQ - 1)?)?;
    let predictions = unmerged.argmax(D::Minus1)?;
    let correct = predictions
        .eq(&ids.narrow(1, 1, SEQ - 1)?)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    println!("held-out next-token accuracy: {:.1}%", 100.0 * correct);

    model.merge()?;
    let merged = model.forward(&ids.narrow(1, 0, SEQ - 1)?)?;
    let diff = (&merged - &unmerged)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = unmerged.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    println!("merged vs unmerged logits: max abs diff {diff:.2e} (logits up to {scale:.1})");
    if diff > 1e-5 * scale.max(1.0) {
        return Err(format!("merged logits differ from unmerged ones by {diff}").into());
    }
    model.unmerge()?;
    println!(
        "unmerged again; {} adapter(s): {:?}",
        model.adapter_names().len(),
        model.adapter_names()
    );
    Ok(())
}
