//! DoRA (weight-decomposed LoRA): LoRA plus a learned magnitude per output,
//! as PEFT's `LoraConfig(use_dora=True)` computes it (`lora.dora.DoraLinearLayer`).
//!
//! The maths, PEFT's keys and an example are on [`DoraAdapter`].

use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Module, Result as CandleResult, Tensor, Var};

use crate::error::{PeftError, Result};
use crate::kinds::lora::{LoraAdapter, PEFT_TYPE};
use crate::layer::{adapter_identity, Adapter, Composition, ForwardContext, LayerWeights};

/// PEFT's key for the magnitude vector in `adapter_model.safetensors`
/// (its in-memory parameter is `lora_magnitude_vector.<adapter>.weight`;
/// PEFT drops the `.weight` when saving).
pub const MAGNITUDE_KEY: &str = "lora_magnitude_vector";

/// DoRA (weight-decomposed LoRA): LoRA plus a learned magnitude per output,
/// as PEFT's `LoraConfig(use_dora=True)` computes it (`lora.dora.DoraLinearLayer`).
///
/// With the base weight `W` `[out, in]`, LoRA's `A` `[r, in]`, `B` `[out, r]`
/// and scaling `s`, and the trainable magnitude `m` `[out]`:
///
/// - `n = ‖W + s·B·A‖`, the L2 norm of each row (over the input dimension),
///   treated as a constant: no gradient flows through it (DoRA paper, §4.3);
/// - forward: `y = base(x) + (m/n − 1)·(base(x) − bias) + (m/n)·s·B(A(x))`,
///   that is `(m/n)·(W + s·B·A)·x + bias`;
/// - merge: `W' = (m/n)·(W + s·B·A)`, bias unchanged; unmerge divides by the
///   `m/n` of merge time (kept by the adapter) and subtracts `s·B·A`;
/// - `m` starts as `n` itself, so a fresh adapter computes what LoRA would
///   (with the default init, `B = 0`: exactly the base layer).
///
/// The forward pass takes `n` from the base weight without other adapters;
/// [`DoraAdapter::merge_with_base`] merges on top of adapters merged before
/// it with that same `n`, as PEFT 0.21 does, while [`Adapter::merge`]
/// takes `n` from the weights it is given.
///
/// In training mode with dropout, PEFT applies the base weight to the
/// dropped-out input in the correction term: `y = base(x) + (m/n − 1)·W·d(x) +
/// (m/n)·s·B(A(d(x)))` with `d` the dropout; so does this adapter.
///
/// Saved tensors: `lora_A.weight`, `lora_B.weight` and `lora_magnitude_vector`
/// (`[out]`), as in PEFT's `adapter_model.safetensors`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use peft_core::{Adapter, DoraAdapter, LayerWeights, Linear, LoraAdapter};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // W = [[3, 4], [0, 2]]: row norms n = [5, 2] (B = 0, so W + s·B·A = W).
/// let weight = Tensor::new(&[[3f32, 4.], [0., 2.]], &dev)?;
/// let a = Var::from_tensor(&Tensor::new(&[[1f32, 0.]], &dev)?)?;
/// let b = Var::zeros((2, 1), DType::F32, &dev)?;
/// let lora = LoraAdapter::new(a, b, 2.0, 0.0)?;
///
/// // A fresh adapter starts with m = n: the output is the base layer's.
/// let fresh = DoraAdapter::from_weight(lora.clone(), &weight)?;
/// assert_eq!(fresh.magnitude().to_vec1::<f32>()?, [5.0, 2.0]);
/// let x = Tensor::new(&[[1f32, 1.]], &dev)?;
/// let mut layer = Linear::new(weight.clone(), None);
/// layer.add_adapter("default", Box::new(fresh))?;
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[7.0, 2.0]]); // W x
///
/// // m = [10, 1]: m / n = [2, 0.5], so y = [2, 0.5] · W x.
/// let m = Var::from_tensor(&Tensor::new(&[10f32, 1.], &dev)?)?;
/// let dora = DoraAdapter::new(lora, m)?;
/// layer.remove_adapter("default")?;
/// layer.add_adapter("default", Box::new(dora.clone()))?;
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[14.0, 1.0]]);
///
/// // Merging scales the rows of W + s·B·A by m / n; unmerging undoes it.
/// let merged = dora.merge(&LayerWeights { weight, bias: None })?;
/// assert_eq!(merged.weight.to_vec2::<f32>()?, [[6.0, 8.0], [0.0, 1.0]]);
/// let restored = dora.unmerge(&merged)?;
/// assert_eq!(restored.weight.to_vec2::<f32>()?, [[3.0, 4.0], [0.0, 2.0]]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DoraAdapter {
    lora: LoraAdapter,
    magnitude: Var,
    /// The `m / n` used by the last merge, as a column `[out, 1]`, so that
    /// unmerge divides by exactly what merge multiplied by (PEFT caches the
    /// weight norm for the same reason: it cannot be recomputed from the
    /// merged weight).
    merge_factor: Mutex<Option<Tensor>>,
}

impl Clone for DoraAdapter {
    fn clone(&self) -> Self {
        Self {
            lora: self.lora.clone(),
            magnitude: self.magnitude.clone(),
            merge_factor: Mutex::new(self.cached_factor()),
        }
    }
}

impl DoraAdapter {
    /// An adapter from LoRA's `A`, `B`, scaling and dropout and a magnitude
    /// `m` `[out]` (as loaded from a file).
    pub fn new(lora: LoraAdapter, magnitude: Var) -> CandleResult<Self> {
        let out = lora.b().dims()[0];
        if magnitude.dims() != [out] {
            candle_core::bail!(
                "DoRA magnitude has shape {:?}, expected [{out}] (lora_B is {:?})",
                magnitude.dims(),
                lora.b().dims()
            );
        }
        Ok(Self {
            lora,
            magnitude,
            merge_factor: Mutex::new(None),
        })
    }

    /// A fresh adapter for a layer with base weight `weight` `[out, in]`: the
    /// magnitude starts as `‖W + s·B·A‖` row-wise, as PEFT's `dora_init`, so
    /// the output is at first what plain LoRA gives.
    pub fn from_weight(lora: LoraAdapter, weight: &Tensor) -> CandleResult<Self> {
        let norm = weight_norm(&lora, weight)?;
        let magnitude = Var::from_tensor(&norm.to_dtype(weight.dtype())?)?;
        Self::new(lora, magnitude)
    }

    /// The LoRA part: `A`, `B`, scaling and dropout.
    pub fn lora(&self) -> &LoraAdapter {
        &self.lora
    }

    /// The magnitude `m`, `[out]`.
    pub fn magnitude(&self) -> &Var {
        &self.magnitude
    }

    /// `n = ‖W + s·B·A‖` for each row of `weight` `[out, in]`: `[out]`, in
    /// `weight`'s dtype, detached from autograd.
    pub fn weight_norm(&self, weight: &Tensor) -> CandleResult<Tensor> {
        weight_norm(&self.lora, weight)?.to_dtype(weight.dtype())
    }

    /// `m / n` for the base weight `weight`, `[out]`; gradients reach `m`
    /// only.
    fn scale(&self, weight: &Tensor) -> CandleResult<Tensor> {
        let norm = self.weight_norm(weight)?;
        self.magnitude.as_tensor().to_dtype(weight.dtype())?.div(&norm)
    }

    /// Merges this adapter into `current`, the layer's weights with the
    /// adapters merged before it, taking `n` from `unmerged`, the weights
    /// with no adapter merged: `W' = (m/n)·(current + s·B·A)` with
    /// `n = ‖unmerged + s·B·A‖`. The forward pass takes `n` from the
    /// unmerged base too, so this keeps merged and unmerged outputs equal
    /// when another adapter was merged first (PEFT 0.21 does the same, with
    /// `_unmerged_base_weight`). [`Adapter::merge`] is
    /// `merge_with_base(base, base)`.
    pub fn merge_with_base(&self, current: &LayerWeights, unmerged: &LayerWeights) -> CandleResult<LayerWeights> {
        let dtype = current.weight.dtype();
        let full = (&current.weight + self.lora.delta_weight(dtype)?)?;
        let factor = self.scale(&unmerged.weight)?.detach().unsqueeze(1)?;
        let weight = full.broadcast_mul(&factor.to_dtype(dtype)?)?;
        *self.merge_factor.lock().unwrap_or_else(PoisonError::into_inner) = Some(factor);
        Ok(LayerWeights {
            weight,
            bias: current.bias.clone(),
        })
    }

    fn cached_factor(&self) -> Option<Tensor> {
        self.merge_factor.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// `‖W + s·B·A‖` row-wise, `[out]`, detached. Half-precision weights are
/// summed in f32, so squares of large entries do not overflow.
fn weight_norm(lora: &LoraAdapter, weight: &Tensor) -> CandleResult<Tensor> {
    let dtype = match weight.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    let delta = lora.delta_weight(dtype)?.detach();
    let full = (weight.detach().to_dtype(dtype)? + delta)?;
    full.sqr()?.sum(1)?.sqrt()
}

impl Adapter for DoraAdapter {
    adapter_identity!(PEFT_TYPE, Composition::ReadsBaseWeight);

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let weight = cx.weight()?;
        let scale = self.scale(weight)?;
        let (x, base_result) = if cx.training() && self.lora.dropout() > 0.0 {
            // As PEFT: the correction term sees the dropped-out input too.
            let x = self.lora.dropout_input(x, true)?;
            let base = candle_nn::Linear::new(weight.clone(), None).forward(&x)?;
            (x, base)
        } else {
            let base = match cx.bias() {
                Some(bias) => base_output.broadcast_sub(bias)?,
                None => base_output.clone(),
            };
            (x.clone(), base)
        };
        let lora = self.lora.lora_output(&x)?;
        let correction = base_result.broadcast_mul(&(&scale - 1.0)?)?;
        let update = (correction + lora.broadcast_mul(&scale)?)?;
        Ok((base_output + update)?)
    }

    fn merge(&self, base: &LayerWeights) -> Result<LayerWeights> {
        Ok(self.merge_with_base(base, base)?)
    }

    fn merge_onto(&self, current: &LayerWeights, unmerged: &LayerWeights) -> Result<LayerWeights> {
        Ok(self.merge_with_base(current, unmerged)?)
    }

    fn unmerge(&self, merged: &LayerWeights) -> Result<LayerWeights> {
        let Some(factor) = self.cached_factor() else {
            return Err(PeftError::Candle(candle_core::Error::Msg(
                "DoRA unmerge: this adapter was never merged, so its merge-time weight norm is unknown".to_owned(),
            )));
        };
        let dtype = merged.weight.dtype();
        let full = merged.weight.broadcast_div(&factor.to_dtype(dtype)?)?;
        Ok(LayerWeights {
            weight: (full - self.lora.delta_weight(dtype)?)?,
            bias: merged.bias.clone(),
        })
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        let mut vars = self.lora.trainable_vars();
        vars.push((MAGNITUDE_KEY, self.magnitude.clone()));
        vars
    }

    fn state_dict_key(&self, key: &str, adapter: &str) -> String {
        if key == MAGNITUDE_KEY {
            // PEFT keeps the magnitude in a ParameterDict of modules with a `weight`.
            return format!("{key}.{adapter}.weight");
        }
        self.lora.state_dict_key(key, adapter)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{DoraAdapter, MAGNITUDE_KEY};
    use crate::kinds::lora::LoraAdapter;
    use crate::layer::Adapter;

    #[test]
    fn adapter_name_goes_before_the_last_segment() {
        let dev = Device::Cpu;
        let a = Var::zeros((1, 2), DType::F32, &dev).unwrap();
        let b = Var::zeros((2, 1), DType::F32, &dev).unwrap();
        let lora = LoraAdapter::new(a, b, 1.0, 0.0).unwrap();
        // The contract's default.
        assert_eq!(lora.state_dict_key("lora_A.weight", "default"), "lora_A.default.weight");
        assert_eq!(lora.state_dict_key("ia3_l", "x"), "ia3_l.x");
        // DoRA's magnitude, as PEFT keeps it (a ParameterDict of modules).
        let weight = Tensor::ones((2, 2), DType::F32, &dev).unwrap();
        let dora = DoraAdapter::from_weight(lora, &weight).unwrap();
        assert_eq!(
            dora.state_dict_key(MAGNITUDE_KEY, "default"),
            "lora_magnitude_vector.default.weight"
        );
        assert_eq!(dora.state_dict_key("lora_B.weight", "default"), "lora_B.default.weight");
    }
}
