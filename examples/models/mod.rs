//! Three small models written with `#[derive(Adaptable)]`, each an exact
//! re-implementation of a reference case made with Python transformers and
//! PEFT (`tests/fixtures/<case>/`, checked by `tests/fixture_models.rs`):
//!
//! | file | model | module paths |
//! | --- | --- | --- |
//! | [`llama`] | transformers `LlamaForCausalLM` (GQA, RoPE, RMSNorm) | `model.layers.0.self_attn.q_proj`, ... |
//! | [`gpt2`] | transformers `GPT2LMHeadModel` (Conv1D layers, tied head) | `transformer.h.0.attn.c_attn`, ... |
//! | [`tiny_lm`] | a plain torch module, `TinyLM` | `blocks.0.q`, ... |
//!
//! Each has a `load` constructor taking candle's `VarBuilder` (for example
//! from `VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &dev)`),
//! with the model's `Config` for the transformers models (`Config::from_file`
//! reads transformers' `config.json`), and `forward(&input_ids)` returning
//! logits `[batch, seq, vocab]`:
//!
//! ```ignore
//! let cfg = llama::Config::from_file(dir.join("config.json"))?;
//! let vb = VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)?;
//! let mut model = llama::LlamaForCausalLM::load(vb, &cfg)?;
//! model.apply_lora(LoraConfig::from(all_linear()).rank(4).alpha(8.0))?;
//! let logits = model.forward(&input_ids)?;
//! ```
//!
//! The struct fields are named after the checkpoint's modules, so the dotted
//! paths the derive gives the linear layers are exactly the names PEFT uses
//! (`targeted_modules`, `named_trainable_vars`).
//!
//! Every forward pass is differentiable: candle-nn 0.11's fused
//! `RmsNorm::forward`, `LayerNorm::forward` (with bias),
//! `ops::softmax_last_dim` and `rotary_emb::rope` have no backward pass and
//! would silently stop the gradient before it reaches the adapters, so these
//! models use `peft_core::ops` ([`rms_norm`], `softmax_last_dim`, `rope`,
//! `silu_mul`: fused kernels with a backward pass) and [`layer_norm`]
//! (`candle_nn::ops::layer_norm_slow`).

pub mod gpt2;
pub mod llama;
pub mod tiny_lm;

use candle_core::{Device, Result, Tensor};

/// The additive causal mask `[t, t]`: 0 where key `j <= i`, `-inf` above the
/// diagonal. Broadcasts over `[batch, heads, t, t]` attention scores.
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// `softmax(scores + mask) @ v` over the last dimension, differentiably.
///
/// `scores` is `[batch, heads, t, t]` (already scaled), `v` `[batch, heads, t, head_dim]`.
pub fn masked_attention(scores: &Tensor, mask: &Tensor, v: &Tensor) -> Result<Tensor> {
    let probs = peft_core::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?;
    probs.matmul(v)
}

/// candle-nn's `RmsNorm` through [`peft_core::ops::rms_norm`], which has a
/// backward pass (`RmsNorm::forward` has none).
pub fn rms_norm(norm: &candle_nn::RmsNorm, x: &Tensor) -> Result<Tensor> {
    peft_core::ops::rms_norm(x, norm.weight(), norm.eps())
}

/// A LayerNorm with a bias, through a differentiable path
/// (`candle_nn::LayerNorm::forward` takes a fused kernel without a backward
/// pass when the input is contiguous).
pub fn layer_norm(norm: &candle_nn::LayerNorm, eps: f64, x: &Tensor) -> Result<Tensor> {
    let Some(bias) = norm.bias() else {
        candle_core::bail!("layer_norm: this LayerNorm has no bias")
    };
    candle_nn::ops::layer_norm_slow(x, norm.weight(), bias, eps as f32)
}

/// Splits `[batch, t, heads * head_dim]` into heads: `[batch, heads, t, head_dim]`.
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    x.reshape((b, t, heads, head_dim))?.transpose(1, 2)?.contiguous()
}

/// Merges heads back: `[batch, heads, t, head_dim]` -> `[batch, t, heads * head_dim]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}
