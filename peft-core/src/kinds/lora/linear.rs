//! LoRA on a linear layer, as PEFT's `lora.Linear`: `y = base(x) + s · B(A(dropout(x)))`.

use candle_core::{DType, Module, Result as CandleResult, Tensor, Var};

use crate::error::Result;
use crate::kernels::fused::lora_linear;
use crate::kinds::lora::PEFT_TYPE;
use crate::layer::{adapter_identity, Adapter, Composition, ForwardContext};

/// A LoRA adapter on one linear layer: trainable `A` `[r, in]` and `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
}

impl LoraAdapter {
    /// An adapter from its tensors; `a` is `[r, in]`, `b` is `[out, r]`.
    pub fn new(a: Var, b: Var, scale: f64, dropout: f32) -> CandleResult<Self> {
        let (r, _) = a.dims2()?;
        let (_, r_b) = b.dims2()?;
        if r != r_b {
            candle_core::bail!(
                "LoRA rank mismatch: lora_A is {:?} and lora_B is {:?}",
                a.dims(),
                b.dims()
            );
        }
        Ok(Self { a, b, scale, dropout })
    }

    /// `A`, `[r, in]`.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// `B`, `[out, r]`.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    /// The scaling `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// The dropout probability on the adapter's input in training mode.
    pub fn dropout(&self) -> f32 {
        self.dropout
    }

    /// `dropout(x)` when `training` and the probability is positive, else `x`.
    pub(crate) fn dropout_input(&self, x: &Tensor, training: bool) -> CandleResult<Tensor> {
        if training && self.dropout > 0.0 {
            crate::kernels::random::dropout(x, self.dropout)
        } else {
            Ok(x.clone())
        }
    }

    /// `s · B(A(x))`, with no dropout.
    pub(crate) fn lora_output(&self, x: &Tensor) -> CandleResult<Tensor> {
        // candle_nn::Linear keeps its fast reshape-to-2D matmul path; the
        // scale is applied on the narrow [.., r] activation.
        let down = candle_nn::Linear::new(self.a.as_tensor().clone(), None).forward(x)?;
        candle_nn::Linear::new(self.b.as_tensor().clone(), None).forward(&(down * self.scale)?)
    }

    /// `s · B A`, `[out, in]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        (self.b.matmul(self.a.as_tensor())? * self.scale)?.to_dtype(dtype)
    }
}

impl Adapter for LoraAdapter {
    adapter_identity!(PEFT_TYPE, Composition::Additive);

    fn forward_with_base(&self, x: &Tensor, cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        // With dropout active the adapter sees another input than the base.
        let dropout_active = cx.training() && self.dropout > 0.0;
        match cx.dense() {
            Some((weight, bias)) if !dropout_active => {
                let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
                Ok(Some(lora_linear(x, weight, bias, a, b, self.scale)?))
            }
            _ => Ok(None),
        }
    }

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let x = self.dropout_input(x, cx.training())?;
        Ok((base_output + self.lora_output(&x)?)?)
    }

    fn delta_weight(&self, dtype: DType) -> Result<Option<Tensor>> {
        Ok(Some(LoraAdapter::delta_weight(self, dtype)?))
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("lora_A.weight", self.a.clone()), ("lora_B.weight", self.b.clone())]
    }
}
