//! Building blocks shared by the architectures, for writing a model of your
//! own the same way: a causal mask, masked attention, and differentiable
//! norms. candle-nn 0.11's fused `RmsNorm::forward`, `LayerNorm::forward`
//! (with bias), `ops::softmax_last_dim` and `rotary_emb::rope` have no
//! backward pass and would silently stop the gradient before it reaches the
//! adapters, so the models use [`peft_core::ops`] (fused kernels with a
//! backward pass) and `candle_nn::ops::layer_norm_slow` through these.

use candle_core::{Device, Result, Tensor};

/// The additive causal mask `[t, t]`: 0 where key `j <= i`, `-inf` above the
/// diagonal. Broadcasts over `[batch, heads, t, t]` attention scores.
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    causal_mask_after(0, t, device)
}

/// The additive causal mask `[t, seen + t]` of `t` new positions that follow
/// `seen` cached ones: new position `i` sees keys `j <= seen + i`.
pub fn causal_mask_after(seen: usize, t: usize, device: &Device) -> Result<Tensor> {
    let keys = seen + t;
    let mask: Vec<f32> = (0..t * keys)
        .map(|n| {
            if n % keys > seen + n / keys {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, keys), device)
}

/// `softmax(scores + mask) @ v` over the last dimension, differentiably.
///
/// `scores` is `[batch, heads, t, keys]` (already scaled), `mask` `[t, keys]`,
/// `v` `[batch, heads, keys, head_dim]`.
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
