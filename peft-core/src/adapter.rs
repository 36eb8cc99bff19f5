//! The interface every adapter kind implements to live in a layer slot.

use std::fmt;

use candle_core::{Result, Tensor, Var};

/// The frozen weights of a linear layer, `weight` stored `[out, in]` as in
/// `candle_nn::Linear` and PyTorch.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, if the layer has a bias.
    pub bias: Option<Tensor>,
}

impl LinearWeights {
    /// These weights with `delta` (`[out, in]`) added to the weight, the bias
    /// kept: how an additive adapter (LoRA, LoHa, LoKr) merges.
    pub fn plus(&self, delta: &Tensor) -> Result<LinearWeights> {
        Ok(LinearWeights {
            weight: (&self.weight + delta)?,
            bias: self.bias.clone(),
        })
    }

    /// These weights with `delta` taken out of the weight: the inverse of
    /// [`plus`](Self::plus), up to float rounding.
    pub fn minus(&self, delta: &Tensor) -> Result<LinearWeights> {
        Ok(LinearWeights {
            weight: (&self.weight - delta)?,
            bias: self.bias.clone(),
        })
    }

    /// Whether every value of the weight and bias is finite (no NaN, no
    /// infinity): merging refuses weights that are not, as PEFT's
    /// `safe_merge` does.
    pub fn all_finite(&self) -> Result<bool> {
        // 0 · x is 0 for every finite x and NaN for NaN and ±∞, so the sum is
        // NaN exactly when some value is not finite.
        let finite = |t: &Tensor| -> Result<bool> {
            let sum = t.affine(0.0, 0.0)?.sum_all()?.to_dtype(candle_core::DType::F64)?;
            Ok(sum.to_scalar::<f64>()?.is_finite())
        };
        Ok(finite(&self.weight)? && self.bias.as_ref().map_or(Ok(true), finite)?)
    }
}

/// What an adapter sees of its layer during a forward pass.
///
/// A struct rather than loose arguments so that more can be offered later
/// (a quantized base, say) without breaking adapter implementations.
#[derive(Debug, Clone, Copy)]
pub struct ForwardContext<'a> {
    pub(crate) base: &'a crate::linear::Base,
    pub(crate) training: bool,
}

impl<'a> ForwardContext<'a> {
    /// The base weight, `[out, in]` (dequantized, once, for a quantized
    /// layer: the only case that can fail).
    pub fn weight(&self) -> Result<&'a Tensor> {
        self.base.weight()
    }
    /// The base bias, `[out]`.
    pub fn bias(&self) -> Option<&'a Tensor> {
        self.base.bias()
    }
    /// Whether the model is in training mode (dropout active).
    pub fn training(&self) -> bool {
        self.training
    }

    /// The base when it is a plain dense layer (not quantized, an embedding
    /// or a convolution): what the fused kernels of [`crate::fused`] take.
    pub(crate) fn dense(&self) -> Option<&'a candle_nn::Linear> {
        match self.base {
            crate::linear::Base::Dense(linear) => Some(linear),
            _ => None,
        }
    }
}

/// An adapter attached to a linear layer: LoRA, and later DoRA, IA³, LoHa,
/// LoKr or a kind defined outside this crate.
///
/// Adapters own their trainable weights as candle [`Var`]s and never touch the
/// base weight except through [`merge`](Self::merge) and
/// [`unmerge`](Self::unmerge), which return new weights.
pub trait LinearAdapter: fmt::Debug + Send + Sync {
    /// PEFT's name for the kind (`"LORA"`).
    fn peft_type(&self) -> &'static str;

    /// Changes the input the base weight sees (IA³ scales the input of
    /// feed-forward layers); `None` leaves it as it is. Every adapter's
    /// [`forward`](Self::forward) still receives the original input.
    fn transform_input(&self, _x: &Tensor, _cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether [`transform_input`](Self::transform_input) changes the input.
    /// Such adapters act on the base weight alone, so they are merged before
    /// the others (and unmerged after them).
    fn transforms_input(&self) -> bool {
        false
    }

    /// Whether [`forward`](Self::forward) only adds a change computed from
    /// the input alone (LoRA, LoHa, LoKr). Such adapters commute with each
    /// other and with merging, so they may stay unmerged while other
    /// adapters of the layer are merged. The default, `false`, is the safe
    /// answer for an adapter that scales or reads what came before it.
    fn is_additive(&self) -> bool {
        false
    }

    /// Whether this adapter's change depends on the base weight (DoRA's
    /// norm of `W + ΔW`). Such an adapter may follow only additive or
    /// input-transforming adapters on a layer, and may not be attached to a
    /// layer with merged adapters: either would make the merged and the
    /// unmerged outputs differ.
    fn reads_base_weight(&self) -> bool {
        false
    }

    /// The base output and this adapter's change in one pass, `None` (the
    /// default) to have the layer run the base and then
    /// [`forward`](Self::forward). Asked only of the first adapter applied to
    /// a layer whose input no adapter transforms; LoRA answers with the fused
    /// kernel of [`crate::fused::lora_linear`] on a dense base.
    fn forward_with_base(&self, _x: &Tensor, _cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Turns the base output `base_output = base(x)` into the adapted output.
    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor>;

    /// The layer's weights with this adapter folded in.
    fn merge(&self, base: &LinearWeights) -> Result<LinearWeights>;

    /// [`merge`](Self::merge) on a layer that may hold merged adapters already:
    /// `current` holds the adapters merged before this one, `unmerged` none.
    /// An adapter whose change depends on the base weight (DoRA's row norm)
    /// reads it from `unmerged`, as its forward pass sees it; the default
    /// ignores `unmerged`.
    fn merge_onto(&self, current: &LinearWeights, unmerged: &LinearWeights) -> Result<LinearWeights> {
        let _ = unmerged;
        self.merge(current)
    }

    /// Inverse of [`merge`](Self::merge): the weights with this adapter taken out.
    fn unmerge(&self, merged: &LinearWeights) -> Result<LinearWeights>;

    /// The trainable tensors, each with its key relative to the module as PEFT
    /// saves it (`lora_A.weight`), in a fixed order.
    fn trainable_vars(&self) -> Vec<(&'static str, Var)>;

    /// A copy sharing the same trainable tensors (as cloning a candle layer does).
    fn clone_box(&self) -> Box<dyn LinearAdapter>;
}

impl Clone for Box<dyn LinearAdapter> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}
