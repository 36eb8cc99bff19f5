//! [`Conv1d`] and [`Conv2d`]: drop-ins for candle-nn's convolutions that can
//! hold adapters, and LoRA for convolutions as PEFT's `lora.Conv1d` /
//! `lora.Conv2d`.
//!
//! A convolution is a linear map of each input patch, so the slot is a
//! [`Linear`] whose weight is the kernel flattened to `[out, in·k...]` (a
//! view): targets, several adapters, merging and the file format are shared
//! with linear layers. `all_linear()` leaves convolutions alone; select them
//! by name or regex.
//!
//! LoRA on a convolution: `A` is a convolution with the base's kernel size,
//! stride, padding and dilation (`lora_A.weight` `[r, in, k...]`), `B` a 1x1
//! convolution (`lora_B.weight` `[out, r, 1...]`),
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
//! conv.add_adapter("default", LoraConvAdapter::new(a, b, 0.5, 0.0, conv.geometry())?)?;
//! let x = Tensor::new(&[[[1f32, 2., 4.]]], &dev)?;
//! // [3, 6] + 0.5·2·[-1, -2]
//! assert_eq!(conv.forward(&x)?.to_vec3::<f32>()?, [[[2.0, 4.0]]]);
//! conv.layer_mut().merge()?;
//! assert_eq!(conv.forward(&x)?.to_vec3::<f32>()?, [[[2.0, 4.0]]]);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Module, Result as CandleResult, Tensor, Var};

use crate::adaptable::{Adaptable, Role, Visitor, VisitorMut};
use crate::adapter::{ForwardContext, LinearAdapter, LinearWeights};
use crate::error::Result;
use crate::linear::Linear;
use crate::path::ModulePath;

/// Stride, padding and dilation of a convolution, and whether it is 1-D or 2-D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// 1 or 2 spatial dimensions.
    pub spatial_dims: usize,
    /// Padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
}

impl ConvGeometry {
    /// `x` convolved with `kernel` (`[out, in, k...]`) with this geometry.
    pub fn conv(&self, x: &Tensor, kernel: &Tensor) -> CandleResult<Tensor> {
        match self.spatial_dims {
            1 => conv1d_via_2d(x, kernel, self.padding, self.stride, self.dilation, 1),
            _ => x.conv2d(kernel, self.padding, self.stride, self.dilation, 1),
        }
    }

    /// `x` convolved with a 1x1 `kernel` (`[out, in, 1...]`).
    pub fn pointwise(&self, x: &Tensor, kernel: &Tensor) -> CandleResult<Tensor> {
        match self.spatial_dims {
            1 => conv1d_via_2d(x, kernel, 0, 1, 1, 1),
            _ => x.conv2d(kernel, 0, 1, 1, 1),
        }
    }
}

/// A 1-D convolution computed as a 2-D one of height 1. candle 0.11.1's
/// `conv1d` computes the right output but wrong gradients for the kernel
/// (and, without padding, for the input); its `conv2d` gets them right, so
/// the gradients match PyTorch's (`tests/conv.rs`).
fn conv1d_via_2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> CandleResult<Tensor> {
    let x = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
    } else {
        x.clone()
    };
    x.unsqueeze(2)?
        .conv2d(&kernel.unsqueeze(2)?, 0, stride, dilation, groups)?
        .squeeze(2)
}

/// A convolution of either dimension, as the base of a convolution slot.
#[derive(Debug, Clone)]
pub(crate) enum ConvLayer {
    D1(candle_nn::Conv1d),
    D2(candle_nn::Conv2d),
}

impl ConvLayer {
    pub(crate) fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        match self {
            ConvLayer::D1(conv) => {
                let c = conv.config();
                let y = conv1d_via_2d(x, conv.weight(), c.padding, c.stride, c.dilation, c.groups)?;
                match conv.bias() {
                    Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1))?),
                    None => Ok(y),
                }
            }
            ConvLayer::D2(conv) => conv.forward(x),
        }
    }

    pub(crate) fn kernel(&self) -> &Tensor {
        match self {
            ConvLayer::D1(conv) => conv.weight(),
            ConvLayer::D2(conv) => conv.weight(),
        }
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        match self {
            ConvLayer::D1(conv) => conv.bias(),
            ConvLayer::D2(conv) => conv.bias(),
        }
    }

    /// The same convolution with a new kernel and bias.
    pub(crate) fn with(&self, kernel: Tensor, bias: Option<Tensor>) -> ConvLayer {
        match self {
            ConvLayer::D1(conv) => ConvLayer::D1(candle_nn::Conv1d::new(kernel, bias, *conv.config())),
            ConvLayer::D2(conv) => ConvLayer::D2(candle_nn::Conv2d::new(kernel, bias, *conv.config())),
        }
    }

    pub(crate) fn geometry(&self) -> ConvGeometry {
        match self {
            ConvLayer::D1(conv) => {
                let c = conv.config();
                ConvGeometry {
                    spatial_dims: 1,
                    padding: c.padding,
                    stride: c.stride,
                    dilation: c.dilation,
                }
            }
            ConvLayer::D2(conv) => {
                let c = conv.config();
                ConvGeometry {
                    spatial_dims: 2,
                    padding: c.padding,
                    stride: c.stride,
                    dilation: c.dilation,
                }
            }
        }
    }

    pub(crate) fn groups(&self) -> usize {
        match self {
            ConvLayer::D1(conv) => conv.config().groups,
            ConvLayer::D2(conv) => conv.config().groups,
        }
    }
}

macro_rules! conv_slot {
    ($name:ident, $candle:ty, $config:ty, $variant:ident, $ctor:ident, $candle_ctor:path, $dims:literal) => {
        #[doc = concat!("A ", $dims, "-D convolution that adapters can be attached to; without adapters it computes what `", stringify!($candle), "` computes (1-D ones through a 2-D convolution, whose gradients candle gets right).")]
        #[derive(Debug, Clone)]
        pub struct $name {
            layer: Linear,
        }

        impl $name {
            /// A slot for `weight` `[out, in, k...]`, `bias` `[out]` and `config`.
            pub fn new(weight: Tensor, bias: Option<Tensor>, config: $config) -> CandleResult<Self> {
                Ok(Self {
                    layer: Linear::conv(ConvLayer::$variant(<$candle>::new(weight, bias, config)))?,
                })
            }

            /// The kernel `[out, in, k...]` (with merged adapters folded in).
            pub fn weight(&self) -> Tensor {
                self.layer.conv_kernel().expect("a convolution slot holds a convolution")
            }

            /// Stride, padding and dilation.
            pub fn geometry(&self) -> ConvGeometry {
                self.layer.conv_geometry().expect("a convolution slot holds a convolution")
            }

            /// The slot as the linear map it is on each patch (weight
            /// `[out, in·k...]`): adapters, merging, activity.
            pub fn layer(&self) -> &Linear {
                &self.layer
            }

            /// Mutable [`layer`](Self::layer).
            pub fn layer_mut(&mut self) -> &mut Linear {
                &mut self.layer
            }

            /// Attaches an adapter under `name`, active.
            pub fn add_adapter(&mut self, name: &str, adapter: impl LinearAdapter + 'static) -> Result<()> {
                self.layer.add_adapter(name, Box::new(adapter))
            }
        }

        impl From<$candle> for $name {
            fn from(conv: $candle) -> Self {
                Self {
                    layer: Linear::conv(ConvLayer::$variant(conv)).expect("a candle-nn kernel has at least 3 dimensions"),
                }
            }
        }

        impl Module for $name {
            fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
                self.layer.forward(x)
            }
        }

        /// Reported to visitors as a layer of kind [`LayerKind::Conv`](crate::LayerKind).
        impl Adaptable for $name {
            fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
                visitor.visit_linear(path, Role::Hidden, &self.layer);
            }
            fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
                visitor.visit_linear_mut(path, Role::Hidden, &mut self.layer);
            }
        }

        #[doc = concat!("Creates or loads a convolution as [`", stringify!($candle_ctor), "`] does.")]
        pub fn $ctor(
            in_channels: usize,
            out_channels: usize,
            kernel_size: usize,
            config: $config,
            vb: candle_nn::VarBuilder,
        ) -> CandleResult<$name> {
            $candle_ctor(in_channels, out_channels, kernel_size, config, vb).map($name::from)
        }
    };
}

conv_slot!(
    Conv1d,
    candle_nn::Conv1d,
    candle_nn::Conv1dConfig,
    D1,
    conv1d,
    candle_nn::conv1d,
    1
);
conv_slot!(
    Conv2d,
    candle_nn::Conv2d,
    candle_nn::Conv2dConfig,
    D2,
    conv2d,
    candle_nn::conv2d,
    2
);

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
    fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        let (r, out) = (self.a.dim(0)?, self.b.dim(0)?);
        let a = self.a.as_tensor().reshape((r, ()))?;
        let b = self.b.as_tensor().reshape((out, r))?;
        (b.matmul(&a)? * self.scale)?.to_dtype(dtype)
    }
}

impl LinearAdapter for LoraConvAdapter {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> CandleResult<Tensor> {
        let x = if cx.training() && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        let down = (self.geometry.conv(&x, self.a.as_tensor())? * self.scale)?;
        base_output + self.geometry.pointwise(&down, self.b.as_tensor())?
    }

    fn merge(&self, base: &LinearWeights) -> CandleResult<LinearWeights> {
        base.plus(&self.delta_weight(base.weight.dtype())?)
    }

    fn unmerge(&self, merged: &LinearWeights) -> CandleResult<LinearWeights> {
        merged.minus(&self.delta_weight(merged.weight.dtype())?)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("lora_A.weight", self.a.clone()), ("lora_B.weight", self.b.clone())]
    }

    fn clone_box(&self) -> Box<dyn LinearAdapter> {
        Box::new(self.clone())
    }
}
