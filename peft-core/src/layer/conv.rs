//! [`Conv1d`] and [`Conv2d`]: drop-ins for candle-nn's convolutions that can
//! hold adapters.
//!
//! A convolution is a linear map of each input patch, so the slot is a
//! [`Layer`] whose weight is the kernel flattened to `[out, in·k...]` (a
//! view): targets, several adapters, merging and the file format are shared
//! with linear layers. `all_linear()` leaves convolutions alone; select them
//! by name or regex. LoRA for convolutions (PEFT's `lora.Conv1d` /
//! `lora.Conv2d`) is [`LoraConvAdapter`](crate::LoraConvAdapter).
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use peft_core::Conv1d;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // 1 channel in, 1 out, kernel 2: y[t] = x[t] + x[t+1]
//! let weight = Tensor::ones((1, 1, 2), DType::F32, &dev)?;
//! let conv = Conv1d::new(weight, None, Default::default())?;
//! let x = Tensor::new(&[[[1f32, 2., 4.]]], &dev)?;
//! assert_eq!(conv.forward(&x)?.to_vec3::<f32>()?, [[[3.0, 6.0]]]);
//! // The slot sees the kernel as a linear map [out = 1, in·k = 2].
//! assert_eq!((conv.layer().out_features(), conv.layer().in_features()), (1, 2));
//! # Ok(())
//! # }
//! ```

use candle_core::{Module, Result as CandleResult, Tensor};

use crate::layer::slot::Layer;
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
        let (spatial_dims, padding, stride, dilation) = match self {
            ConvLayer::D1(conv) => (1, conv.config().padding, conv.config().stride, conv.config().dilation),
            ConvLayer::D2(conv) => (2, conv.config().padding, conv.config().stride, conv.config().dilation),
        };
        ConvGeometry {
            spatial_dims,
            padding,
            stride,
            dilation,
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
            layer: Layer,
            /// `[out, in, k...]`, to give the kernel back its shape.
            kernel_shape: Vec<usize>,
            geometry: ConvGeometry,
        }

        impl $name {
            /// A slot for `weight` `[out, in, k...]`, `bias` `[out]` and `config`.
            pub fn new(weight: Tensor, bias: Option<Tensor>, config: $config) -> CandleResult<Self> {
                let conv = ConvLayer::$variant(<$candle>::new(weight, bias, config));
                Ok(Self {
                    kernel_shape: conv.kernel().dims().to_vec(),
                    geometry: conv.geometry(),
                    layer: Layer::conv(conv)?,
                })
            }

            /// The kernel `[out, in, k...]` (with merged adapters folded in).
            pub fn weight(&self) -> CandleResult<Tensor> {
                match self.layer.conv_layer() {
                    Some(conv) => Ok(conv.kernel().clone()),
                    // A layer put in through `layer_mut`: its weight is `[out, in·k...]`.
                    None => self.layer.weight()?.reshape(self.kernel_shape.as_slice()),
                }
            }

            /// Stride, padding and dilation.
            pub fn geometry(&self) -> ConvGeometry {
                self.geometry
            }

            /// The slot as the linear map it is on each patch (weight
            /// `[out, in·k...]`): adapters, merging, activity.
            pub fn layer(&self) -> &Layer {
                &self.layer
            }

            /// Mutable [`layer`](Self::layer).
            pub fn layer_mut(&mut self) -> &mut Layer {
                &mut self.layer
            }
        }

        impl TryFrom<$candle> for $name {
            type Error = candle_core::Error;

            /// Fails when the kernel has fewer than 3 dimensions.
            fn try_from(conv: $candle) -> CandleResult<Self> {
                Self::new(conv.weight().clone(), conv.bias().cloned(), *conv.config())
            }
        }

        impl Module for $name {
            fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
                self.layer.forward(x)
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
            $candle_ctor(in_channels, out_channels, kernel_size, config, vb).and_then($name::try_from)
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
