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
use peft_core::ops;
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
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let head_dim = HIDDEN / HEADS;
        // Heads stay in [batch, seq, heads, head_dim]: no transposes needed.
        let heads = |y: Tensor| y.reshape((b, t, HEADS, head_dim));
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let out = ops::causal_attention(&q, &k, &v, 1.0 / (head_dim as f64).sqrt())?;
        self.o_proj.forward(&out.reshape((b, t, HIDDEN))?)
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
        let hidden = ops::silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&hidden)
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
    /// would silently stop the gradient. `peft_core::ops` has fused kernels
    /// with a backward pass for RMSNorm, attention, SwiGLU and the loss.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let norm = |n: &candle_nn::RmsNorm, x: &Tensor| ops::rms_norm(x, n.weight(), n.eps());
        let mut x = self.embed_tokens.forward(ids)?;
        for block in &self.layers {
            x = (&x + block.self_attn.forward(&norm(&block.input_layernorm, &x)?)?)?;
            x = (&x + block.mlp.forward(&norm(&block.post_attention_layernorm, &x)?)?)?;
        }
        self.lm_head.forward(&norm(&self.norm, &x)?)
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
    ops::cross_entropy(&model.forward(&inputs)?, &targets)
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
