//! [`Linear`]: the drop-in for `candle_nn::Linear` that can hold adapters.
//!
//! `Linear` is the [`Layer`] slot over a dense (or quantized) weight: every
//! slot operation (`add_adapter`, `merge`, `weight`, ...) is called on it.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use peft_core::Linear;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! // weight [out = 2, in = 3], bias [2]: y = x Wᵀ + b
//! let weight = Tensor::new(&[[1f32, 0., 2.], [0., 1., -1.]], &device)?;
//! let bias = Tensor::new(&[0.5f32, -0.5], &device)?;
//! let layer = Linear::new(weight, Some(bias));
//! let x = Tensor::new(&[[1f32, 2., 3.]], &device)?;
//! assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[7.5, -1.5]]);
//! assert_eq!((layer.in_features(), layer.out_features()), (3, 2));
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Result as CandleResult, Tensor};

use crate::kernels::block::DenseLowRank;
use crate::layer::adapter::{Composition, ForwardContext};
use crate::layer::quantized::QuantizedWeight;
use crate::layer::slot::Layer;

/// A linear layer `y = x Wᵀ + b` (weight stored `[out, in]`) that adapters can
/// be attached to: with no adapter, its forward pass is exactly
/// `candle_nn::Linear`'s.
///
/// `Linear` is the [`Layer`] slot itself, named for how a model uses it: a
/// field of type `Linear` is a dense (or quantized) layer, the one kind
/// `all_linear()` adapts. The slots inside [`Embedding`](crate::Embedding)
/// and the convolutions are the same type, made by their own constructors.
pub type Linear = Layer;

impl Layer {
    /// A layer with `weight` `[out, in]` and an optional `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::dense(weight, bias)
    }

    /// A layer from a checkpoint that stores the weight `[in, out]`, as
    /// GPT-2's `Conv1D` does (PEFT's `fan_in_fan_out`). The weight is
    /// transposed once, here, so the forward pass and every adapter work as
    /// for any linear layer; the layer remembers the layout so that a saved
    /// adapter config says `fan_in_fan_out: true`, as PEFT's does.
    pub fn from_fan_in_fan_out(weight_in_out: Tensor, bias: Option<Tensor>) -> CandleResult<Self> {
        let mut layer = Self::dense(weight_in_out.t()?.contiguous()?, bias);
        layer.set_fan_in_fan_out();
        Ok(layer)
    }

    /// A layer whose weight `[out, in]` stays quantized (QLoRA): the forward
    /// pass multiplies by the quantized weight, adapters train on top, and
    /// gradients flow back through it to earlier layers. Merging into it is
    /// refused (see [`Layer::merge`]).
    pub fn from_qtensor(weight: impl Into<Arc<QTensor>>, bias: Option<Tensor>) -> CandleResult<Self> {
        Ok(Self::quantized(QuantizedWeight::new(weight)?, bias))
    }

    /// What [`forward_t(x, train)`](Self::forward_t) computes, when it is a
    /// dense product plus at most one low-rank change (a LoRA adapter
    /// without active dropout, or none): the operands, for a kernel that
    /// fuses several layers ([`crate::block`]). `None` for anything else (a
    /// quantized or non-dense base, a trained bias, other adapter kinds,
    /// several adapters, a mixed batch).
    pub fn dense_low_rank(&self, train: bool) -> Option<DenseLowRank<'_>> {
        if self.batch_adapters.is_some() || self.trainable_bias.is_some() {
            return None;
        }
        let (weight, bias) = self.base.dense()?;
        let cx = ForwardContext {
            base: &self.base,
            training: train,
        };
        let mut applied = self
            .adapters
            .iter()
            .filter(|a| self.adapters_enabled && a.active && !a.merged);
        let low_rank = match (applied.next(), applied.next()) {
            (None, _) => None,
            (Some(only), None) if only.adapter.composition() == Composition::Additive => {
                Some(only.adapter.low_rank(cx)?)
            }
            _ => return None,
        };
        Some(DenseLowRank { weight, bias, low_rank })
    }
}

impl From<candle_nn::Linear> for Layer {
    fn from(linear: candle_nn::Linear) -> Self {
        Self::dense(linear.weight().clone(), linear.bias().cloned())
    }
}

/// Creates or loads a linear layer with bias, as [`candle_nn::linear()`] does
/// (tensors `weight` `[out, in]` and `bias` `[out]`).
pub fn linear(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// Creates or loads a linear layer without bias, as [`candle_nn::linear_no_bias`] does.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
}

/// Loads a layer whose checkpoint stores the weight `[in, out]` (GPT-2's
/// `Conv1D`: tensors `weight` `[in, out]` and `bias` `[out]`); see
/// [`Linear::from_fan_in_fan_out`].
pub fn linear_fan_in_fan_out(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    let weight = vb.get((in_dim, out_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::from_fan_in_fan_out(weight, Some(bias))
}

/// [`linear`] or [`linear_no_bias`] depending on `bias`, as [`candle_nn::linear_b`] does.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb).map(Linear::from)
}
