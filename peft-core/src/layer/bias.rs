//! The base bias trained beside the adapters (PEFT's `bias = "all" |
//! "lora_only"`): a [`Var`] the base computes with, kept through the base
//! being rebuilt (detached on the first attach, merged, rewritten).

use candle_core::{Result as CandleResult, Tensor, Var};

use crate::layer::adapter::Composition;
use crate::layer::slot::Layer;

impl Layer {
    /// The base bias as a trainable variable, once an adapter config asked
    /// for it (PEFT's `bias = "all" | "lora_only"`). It belongs to the base,
    /// not to one adapter, as in PEFT: every adapter of the layer and the
    /// layer with adapters disabled compute with it, and it stays trainable
    /// until [`PeftModel::merge_and_unload`](crate::PeftModel::merge_and_unload).
    pub fn trainable_bias(&self) -> Option<&Var> {
        self.trainable_bias.as_ref()
    }

    /// Whether a whole copy of the layer (`modules_to_save`) is attached.
    pub(crate) fn holds_copy(&self) -> bool {
        self.adapters
            .iter()
            .any(|a| a.adapter.composition() == Composition::ReplacesBase)
    }

    /// The key of the trainable bias relative to this module, as PEFT's
    /// state dict names it: `base_layer.bias` once an adapter wraps the layer
    /// (a module copy does not), `bias` otherwise.
    pub(crate) fn bias_key(&self) -> &'static str {
        if !self.adapters.is_empty() && !self.holds_copy() {
            "base_layer.bias"
        } else {
            "bias"
        }
    }

    /// A variable for training the base bias, holding `value` (read from an
    /// adapter file, of the bias's shape: the caller checks it, naming the
    /// file's key) or else the bias the base has (the variable already
    /// trained, if there is one). `None` when the layer has no bias.
    /// Installed by [`train_bias`](Self::train_bias); the layer is
    /// unchanged until then.
    pub(crate) fn bias_var(&self, value: Option<&Tensor>) -> CandleResult<Option<Var>> {
        let Some(bias) = self.base.bias() else {
            return Ok(None);
        };
        let var = match (value, &self.trainable_bias) {
            (None, Some(var)) => var.clone(),
            (None, None) => Var::from_tensor(&bias.detach().copy()?)?,
            (Some(value), _) => Var::from_tensor(&value.to_dtype(bias.dtype())?.copy()?)?,
        };
        Ok(Some(var))
    }

    /// Makes the base compute with `var` as its bias, trained from now on.
    pub(crate) fn train_bias(&mut self, var: Var) {
        self.trainable_bias = Some(var);
        self.reinstall_trainable_bias();
    }

    /// Puts the trainable bias back into a base that was rebuilt (detached,
    /// merged), so it keeps receiving gradients.
    pub(super) fn reinstall_trainable_bias(&mut self) {
        if let Some(var) = &self.trainable_bias {
            if let Some(base) = self.base.with_bias(var.as_tensor().clone()) {
                self.base = base;
            }
        }
    }
}
