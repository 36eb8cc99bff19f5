//! The contract every adapter kind implements to live in a [`Layer`](super::Layer) slot.
//!
//! The slot knows this contract and nothing of any kind: what an adapter
//! computes, how it merges and under which keys its tensors are saved are
//! all asked of the adapter.

use std::fmt;

use candle_core::{DType, Tensor, Var};

use crate::error::{PeftError, Result};
use crate::kernels::block::LowRankFactors;
use crate::layer::base::{Base, LayerWeights};

/// How an adapter's change composes with the base layer and with the other
/// adapters of the same layer. The slot uses it to order merges and to
/// refuse combinations whose merged and unmerged outputs would differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Composition {
    /// Adds a change computed from the input alone (LoRA, LoHa, LoKr).
    /// Such adapters commute with each other and with merging, so they may
    /// stay unmerged while other adapters of the layer are merged.
    Additive,
    /// Changes the input the base weight sees (IA³ on a feed-forward
    /// layer, through [`Adapter::transform_input`]). Acts on the base weight
    /// alone, so it is merged before the others and unmerged after them.
    TransformsInput,
    /// Changes the output in a way that depends on it (IA³ scaling the
    /// output of other layers). The default: the safe answer for an adapter
    /// that scales or reads what came before it.
    ScalesOutput,
    /// Its change depends on the base weight (DoRA's norm of `W + ΔW`).
    /// It may follow only additive or input-transforming adapters on a
    /// layer, and may not join a layer with merged adapters.
    ReadsBaseWeight,
    /// Computes the layer's output in place of the base: a whole trainable
    /// copy of the layer (PEFT's `modules_to_save`). It must answer
    /// [`Adapter::forward_with_base`]. It shares a layer only with other
    /// copies (one per adapter name; the first active one computes), and
    /// merging it replaces the base weights with the copy's.
    ReplacesBase,
    /// Replaces a few rows of the weight (PEFT's trainable tokens: the
    /// embedding rows of chosen tokens, or the matching output columns of
    /// an output head tied to that embedding) with the adapter's own. The
    /// output at those rows does not depend on the base, so it shares a
    /// layer only with adapters of this same composition (each replacing
    /// its rows in turn, in the order they were added). Merging writes the
    /// rows into the base weight and unmerging puts the original rows back.
    ReplacesRows,
}

/// What an adapter sees of its layer during a forward pass.
///
/// A struct rather than loose arguments so that more can be offered later
/// without breaking adapter implementations.
#[derive(Debug, Clone, Copy)]
pub struct ForwardContext<'a> {
    pub(crate) base: &'a Base,
    pub(crate) training: bool,
}

impl<'a> ForwardContext<'a> {
    /// The base weight, `[out, in]` (dequantized, once, for a quantized
    /// layer: the only case that can fail).
    pub fn weight(&self) -> Result<&'a Tensor> {
        Ok(self.base.weight()?)
    }
    /// The base bias, `[out]`.
    pub fn bias(&self) -> Option<&'a Tensor> {
        self.base.bias()
    }
    /// Whether the model is in training mode (dropout active).
    pub fn training(&self) -> bool {
        self.training
    }

    /// The base weight and bias when the base is a plain dense layer (not
    /// quantized, an embedding or a convolution): what the fused kernels of
    /// [`crate::fused`] take.
    pub fn dense(&self) -> Option<(&'a Tensor, Option<&'a Tensor>)> {
        self.base.dense()
    }
}

/// An adapter attached to a layer slot: LoRA, DoRA, IA³, LoHa, LoKr or a
/// kind defined outside this crate.
///
/// Adapters own their trainable weights as candle [`Var`]s and never touch the
/// base weight except through [`merge`](Self::merge) and
/// [`unmerge`](Self::unmerge), which return new weights. The slot sees every
/// base (dense, quantized, embedding, convolution) as a linear map with a
/// weight `[out, in]`, and so does the adapter.
pub trait Adapter: CloneAdapter + fmt::Debug + Send + Sync {
    /// PEFT's name for the kind (`"LORA"`).
    fn peft_type(&self) -> &'static str;

    /// How this adapter composes with the others on its layer; the default,
    /// [`Composition::ScalesOutput`], is the safe answer.
    fn composition(&self) -> Composition {
        Composition::ScalesOutput
    }

    /// Changes the input the base weight sees (IA³ scales the input of
    /// feed-forward layers); `None` leaves it as it is. Asked only of
    /// adapters whose composition is [`Composition::TransformsInput`].
    /// Every adapter's [`forward`](Self::forward) still receives the
    /// original input.
    fn transform_input(&self, _x: &Tensor, _cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        Ok(None)
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

    /// When this adapter's forward pass in `cx` is exactly
    /// `base(x) + scale · (x Aᵀ) Bᵀ` (LoRA with no dropout active), its
    /// factors: what a kernel fusing several layers computes itself
    /// ([`crate::block`]). `None` (the default) for anything else.
    fn low_rank(&self, _cx: ForwardContext<'_>) -> Option<LowRankFactors<'_>> {
        None
    }

    /// The change `ΔW` `[out, in]` an additive adapter adds to the weight,
    /// in `dtype`; `None` (the default) for an adapter that is not a plain
    /// addition. The default [`merge`](Self::merge) and
    /// [`unmerge`](Self::unmerge) add and subtract it.
    fn delta_weight(&self, _dtype: DType) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The layer's weights with this adapter folded in. The default adds
    /// [`delta_weight`](Self::delta_weight).
    fn merge(&self, base: &LayerWeights) -> Result<LayerWeights> {
        base.plus(&required_delta(self, base)?)
    }

    /// [`merge`](Self::merge) on a layer that may hold merged adapters already:
    /// `current` holds the adapters merged before this one, `unmerged` none.
    /// An adapter whose change depends on the base weight (DoRA's row norm)
    /// reads it from `unmerged`, as its forward pass sees it; the default
    /// ignores `unmerged`.
    fn merge_onto(&self, current: &LayerWeights, unmerged: &LayerWeights) -> Result<LayerWeights> {
        let _ = unmerged;
        self.merge(current)
    }

    /// Inverse of [`merge`](Self::merge): the weights with this adapter taken
    /// out. The default subtracts [`delta_weight`](Self::delta_weight).
    fn unmerge(&self, merged: &LayerWeights) -> Result<LayerWeights> {
        merged.minus(&required_delta(self, merged)?)
    }

    /// An upper bound on the magnitude of any value this adapter's
    /// [`merge`](Self::merge) adds to the weight (and
    /// [`unmerge`](Self::unmerge) takes out), for an adapter whose merge adds
    /// a change to the weight, leaves the bias as it is and cannot overflow
    /// its own dtype on the way; `None` (the default) when it cannot say.
    ///
    /// A model-wide merge must change every layer or none. With a bound for
    /// every adapter a layer's merge involves, it knows from the weight's
    /// largest value that the new weights are finite and computes them once;
    /// without one, it computes them twice (a dry run before the first layer
    /// changes). The layer keeps the bound it proved on its new weight, so
    /// the next merge or unmerge need not read the weight either.
    fn merge_bound(&self) -> Result<Option<f64>> {
        Ok(None)
    }

    /// The trainable tensors, each with its key relative to the module as PEFT
    /// saves it (`lora_A.weight`), in a fixed order.
    fn trainable_vars(&self) -> Vec<(&'static str, Var)>;

    /// The adapter to attach, under the same name, to a layer whose weight
    /// is this layer's weight (an output head tied to the input embedding
    /// this adapter sits on), sharing this adapter's trainable tensors so
    /// that they train once and both layers see the same change. `None`
    /// (the default): the kind does not follow tied weights.
    fn tied(&self) -> Option<Box<dyn Adapter>> {
        None
    }

    /// Whether this adapter was made by [`tied`](Self::tied) for a layer
    /// sharing another layer's weight: it is not a target of its own, so a
    /// saved config leaves its module out of `target_modules`.
    fn follows_tied_weight(&self) -> bool {
        false
    }

    /// The key of a trainable tensor in PEFT's in-memory state dict, given
    /// its file key `key` (from [`trainable_vars`](Self::trainable_vars)) and
    /// the adapter's name: by default the name goes before the last segment
    /// (`lora_A.weight` → `lora_A.default.weight`).
    fn state_dict_key(&self, key: &str, adapter: &str) -> String {
        match key.rsplit_once('.') {
            Some((head, tail)) => format!("{head}.{adapter}.{tail}"),
            None => format!("{key}.{adapter}"),
        }
    }
}

/// The two methods that say what an adapter is, written once for every
/// `impl Adapter` of this crate: `adapter_identity!(PEFT_TYPE, Composition::Additive);`
/// gives `peft_type()` and `composition()`.
macro_rules! adapter_identity {
    ($peft_type:expr, $composition:expr) => {
        fn peft_type(&self) -> &'static str {
            $peft_type
        }

        fn composition(&self) -> $crate::layer::Composition {
            $composition
        }
    };
}
pub(crate) use adapter_identity;

/// [`Adapter::delta_weight`] in the dtype of `weights`, or an error naming
/// the kind when the adapter has none (it must then implement `merge` and
/// `unmerge` itself).
fn required_delta<A: Adapter + ?Sized>(adapter: &A, weights: &LayerWeights) -> Result<Tensor> {
    adapter.delta_weight(weights.weight.dtype())?.ok_or_else(|| {
        PeftError::Candle(candle_core::Error::Msg(format!(
            "{} adapter: merge and unmerge need `delta_weight` or their own implementation",
            adapter.peft_type()
        )))
    })
}

/// `clone_box` for every adapter that is [`Clone`]: a copy sharing the same
/// trainable tensors (as cloning a candle layer does). Implemented for you.
pub trait CloneAdapter {
    /// A boxed copy of `self`.
    fn clone_box(&self) -> Box<dyn Adapter>;
}

impl<T: Adapter + Clone + 'static> CloneAdapter for T {
    fn clone_box(&self) -> Box<dyn Adapter> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn Adapter> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}
