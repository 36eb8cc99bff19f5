//! LoRA on a convolution, as PEFT's `lora.Conv1d` / `lora.Conv2d` (see
//! [`Conv1d`](crate::Conv1d) for the slot).
//!
//! `A` is a convolution with the base's kernel size, stride, padding and
//! dilation (`lora_A.weight` `[r, in, k...]`), `B` a 1x1 convolution
//! (`lora_B.weight` `[out, r, 1...]`),
//! `y = conv(x, W) + s·conv₁ₓ₁(conv(dropout(x), A), B)`; merging adds
//! `s·B·A` (flattened) to the kernel.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor, Var};
//! use peft_core::{Conv1d, LoraConvAdapter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // 1 channel in, 1 out, kernel 2: y[t] = x[t] + x[t+1]
//! let weight = Tensor::ones((1, 1, 2), DType::F32, &dev)?;
//! let mut conv = Conv1d::new(weight, None, Default::default())?;
//! // r = 1: A = [[[1, -1]]] (x[t] - x[t+1]), B = [[[2]]], scale 0.5
//! let a = Var::from_tensor(&Tensor::new(&[[[1f32, -1.]]], &dev)?)?;
//! let b = Var::from_tensor(&Tensor::new(&[[[2f32]]], &dev)?)?;
//! let lora = LoraConvAdapter::new(a, b, 0.5, 0.0, conv.geometry())?;
//! conv.layer_mut().add_adapter("default", Box::new(lora))?;
//! let x = Tensor::new(&[[[1f32, 2., 4.]]], &dev)?;
//! // [3, 6] + 0.5·2·[-1, -2]
//! assert_eq!(conv.forward(&x)?.to_vec3::<f32>()?, [[[2.0, 4.0]]]);
//! conv.layer_mut().merge()?;
//! assert_eq!(conv.forward(&x)?.to_vec3::<f32>()?, [[[2.0, 4.0]]]);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Result as CandleResult, Tensor, Var};

use crate::error::Result;
use crate::kinds::lora::PEFT_TYPE;
use crate::layer::{adapter_identity, Adapter, Composition, ConvGeometry, ForwardContext};

/// LoRA on a convolution, as PEFT's `lora.Conv1d` / `lora.Conv2d`.
#[derive(Debug, Clone)]
pub struct LoraConvAdapter {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    geometry: ConvGeometry,
}

impl LoraConvAdapter {
    /// An adapter from `a` `[r, in, k...]` (a convolution with the base's
    /// geometry) and `b` `[out, r, 1...]` (a 1x1 convolution).
    pub fn new(a: Var, b: Var, scale: f64, dropout: f32, geometry: ConvGeometry) -> CandleResult<Self> {
        let (r, r_b) = (a.dim(0)?, b.dim(1)?);
        if r != r_b || a.rank() != geometry.spatial_dims + 2 || b.rank() != a.rank() {
            candle_core::bail!(
                "LoRA conv shapes do not fit: lora_A {:?}, lora_B {:?}",
                a.dims(),
                b.dims()
            );
        }
        Ok(Self {
            a,
            b,
            scale,
            dropout,
            geometry,
        })
    }

    /// `s · B · A` flattened to `[out, in·k...]`, in `dtype`.
    fn flat_delta(&self, dtype: DType) -> CandleResult<Tensor> {
        let (r, out) = (self.a.dim(0)?, self.b.dim(0)?);
        let a = self.a.as_tensor().reshape((r, ()))?;
        let b = self.b.as_tensor().reshape((out, r))?;
        (b.matmul(&a)? * self.scale)?.to_dtype(dtype)
    }
}

impl Adapter for LoraConvAdapter {
    adapter_identity!(PEFT_TYPE, Composition::Additive);

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let x = if cx.training() && self.dropout > 0.0 {
            crate::kernels::random::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        let down = (self.geometry.conv(&x, self.a.as_tensor())? * self.scale)?;
        Ok((base_output + self.geometry.pointwise(&down, self.b.as_tensor())?)?)
    }

    fn delta_weight(&self, dtype: DType) -> Result<Option<Tensor>> {
        Ok(Some(self.flat_delta(dtype)?))
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("lora_A.weight", self.a.clone()), ("lora_B.weight", self.b.clone())]
    }
}
