//! PEFT's `modules_to_save`: a whole trainable copy of a layer, per adapter.
//!
//! PEFT wraps each module named in `modules_to_save` in a
//! `ModulesToSaveWrapper` that keeps the original and one deep copy per
//! adapter; the active adapter's copy computes the output, and it is saved
//! whole under the module's own keys (`base_model.model.score.weight`).
//! Here the copy is an adapter of the layer's slot, [`ModuleCopy`], so it
//! is switched, saved, loaded, counted and merged with the adapter it
//! belongs to, by the same code as every other adapter. A sequence
//! classification adapter's `score` or `classifier` head comes this way.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use peft_core::{Adaptable, Linear, PeftModel, modules};
//!
//! #[derive(Adaptable)]
//! struct Classifier {
//!     proj: Linear,
//!     score: Linear,
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! let mut model = Classifier {
//!     proj: Linear::new(Tensor::eye(2, candle_core::DType::F32, &device)?, None),
//!     score: Linear::new(Tensor::new(&[[1f32, 2.]], &device)?, None),
//! };
//! model.apply_lora(modules(["proj"]).modules_to_save(["score"]))?;
//! assert_eq!(model.adapted_modules(), ["proj", "score"]);
//! // The copy trains in place of the head: change it, the output follows.
//! let (_, copy) = model.named_trainable_vars().into_iter()
//!     .find(|(name, _)| name == "score.modules_to_save.default.weight").unwrap();
//! copy.set(&Tensor::new(&[[3f32, 4.]], &device)?)?;
//! let x = Tensor::new(&[[1f32, 1.]], &device)?;
//! assert_eq!(model.score.forward(&x)?.to_vec2::<f32>()?, [[7.]]);
//! // Without adapters, the original head computes.
//! let y = model.with_adapters_disabled(|m| m.score.forward(&x))??;
//! assert_eq!(y.to_vec2::<f32>()?, [[3.]]);
//! # Ok(())
//! # }
//! ```

use candle_core::{Tensor, Var};

use crate::error::{PeftError, Result};
use crate::layer::base::{Base, TrainableBase};
use crate::layer::{Adapter, Composition, ForwardContext, Layer, LayerWeights};

/// The name of the copy in PEFT's in-memory state dict (`score.modules_to_save.default.weight`).
const STATE_DICT_SEGMENT: &str = "modules_to_save";

/// A whole trainable copy of a layer (dense, embedding or convolution),
/// computing the layer's output in place of its base while its adapter is
/// active: PEFT's `modules_to_save`.
///
/// Made by [`PeftModel::add_adapter`](crate::PeftModel::add_adapter) and
/// loading for every layer that a config's
/// [`modules_to_save`](crate::Targets::modules_to_save) names. Its tensors
/// are saved as the module's own (`weight`, `bias`); merging replaces the
/// base weights with them, and unmerging puts the originals back.
#[derive(Debug, Clone)]
pub struct ModuleCopy {
    copy: Base,
    vars: Vec<(&'static str, Var)>,
    /// The base this copy was made from, for unmerging.
    original: LayerWeights,
}

impl ModuleCopy {
    /// A copy of `layer`'s base, at `module` for messages. A quantized base
    /// cannot be copied for training, and a weight stored `[in, out]`
    /// (GPT-2's `Conv1D`) would be saved transposed: both are refused.
    pub fn new(module: &str, layer: &Layer) -> Result<Self> {
        let refuse = |reason: &'static str| PeftError::UnsupportedOption {
            field: "modules_to_save".into(),
            value: format!("{module:?}"),
            reason,
        };
        if layer.is_fan_in_fan_out() {
            return Err(refuse(
                "this layer's checkpoint stores its weight [in, out] (a Conv1D); copying it whole is not implemented",
            ));
        }
        let Some(TrainableBase { base: copy, vars }) = layer.trainable_base_copy()? else {
            return Err(refuse(
                "this layer is quantized; a whole trainable copy needs a dense weight (load the base unquantized)",
            ));
        };
        Ok(Self {
            copy,
            vars,
            original: layer.base_weights()?,
        })
    }

    fn weights(&self) -> Result<LayerWeights> {
        Ok(LayerWeights {
            weight: self.copy.weight()?.clone(),
            bias: self.copy.bias().cloned(),
        })
    }
}

impl Adapter for ModuleCopy {
    fn peft_type(&self) -> &'static str {
        "MODULES_TO_SAVE"
    }

    fn composition(&self) -> Composition {
        Composition::ReplacesBase
    }

    fn forward_with_base(&self, x: &Tensor, _cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        Ok(Some(self.copy.forward(x)?))
    }

    fn forward(&self, x: &Tensor, _base_output: Tensor, _cx: ForwardContext<'_>) -> Result<Tensor> {
        Ok(self.copy.forward(x)?)
    }

    fn merge(&self, _base: &LayerWeights) -> Result<LayerWeights> {
        self.weights()
    }

    fn unmerge(&self, _merged: &LayerWeights) -> Result<LayerWeights> {
        Ok(self.original.clone())
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        self.vars.clone()
    }

    fn state_dict_key(&self, key: &str, adapter: &str) -> String {
        format!("{STATE_DICT_SEGMENT}.{adapter}.{key}")
    }
}
