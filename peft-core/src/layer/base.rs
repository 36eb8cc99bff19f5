//! The frozen base of a layer slot, and what targeting and merging see of it.
//!
//! Every base is a linear map to adapters: a dense layer, a quantized weight
//! (QLoRA), an embedding table (a linear map on one-hot inputs, weight
//! `[dim, vocab]`) or a convolution (a linear map of each input patch,
//! weight `[out, in·k...]`).

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, Var};

use crate::error::Result;
use crate::layer::conv::{ConvGeometry, ConvLayer};
use crate::layer::quantized::QuantizedWeight;

/// What a layer computes, for targeting: `all_linear()` selects linear
/// layers only; names and regexes select any kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LayerKind {
    /// `peft_core::Linear` (dense or quantized).
    Linear,
    /// `peft_core::Embedding`.
    Embedding,
    /// `peft_core::Conv1d`, `peft_core::Conv2d`.
    Conv,
}

/// The weights of a layer seen as a linear map, `weight` stored `[out, in]`
/// as in `candle_nn::Linear` and PyTorch (an embedding's table transposed,
/// a convolution's kernel flattened to `[out, in·k...]`).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, if the layer has a bias.
    pub bias: Option<Tensor>,
}

impl LayerWeights {
    /// These weights with `delta` (`[out, in]`) added to the weight, the bias
    /// kept: how an additive adapter (LoRA, LoHa, LoKr) merges.
    pub fn plus(&self, delta: &Tensor) -> Result<LayerWeights> {
        Ok(LayerWeights {
            weight: (&self.weight + delta)?,
            bias: self.bias.clone(),
        })
    }

    /// These weights with `delta` taken out of the weight: the inverse of
    /// [`plus`](Self::plus), up to float rounding.
    pub fn minus(&self, delta: &Tensor) -> Result<LayerWeights> {
        Ok(LayerWeights {
            weight: (&self.weight - delta)?,
            bias: self.bias.clone(),
        })
    }

    /// Whether every value of the weight and bias is finite (no NaN, no
    /// infinity): merging refuses weights that are not, as PEFT's
    /// `safe_merge` does.
    pub fn all_finite(&self) -> Result<bool> {
        // The largest magnitude is NaN or ∞ exactly when some value is.
        let finite = |t: &Tensor| -> Result<bool> { Ok(crate::kernels::reduce::max_abs(t)?.is_finite()) };
        Ok(finite(&self.weight)? && self.bias.as_ref().map_or(Ok(true), finite)?)
    }
}

/// A trainable copy of a base ([`Base::trainable_copy`]): the base computing
/// with new variables, and those variables by PyTorch's names.
#[derive(Debug, Clone)]
pub(crate) struct TrainableBase {
    pub(crate) base: Base,
    pub(crate) vars: Vec<(&'static str, Var)>,
}

/// The frozen base of a layer: dense (candle-nn's layer), quantized (QLoRA),
/// an embedding table or a convolution. Crate-internal: adapters see it
/// through [`ForwardContext`](super::ForwardContext).
#[derive(Debug, Clone)]
pub(crate) enum Base {
    Dense(candle_nn::Linear),
    Quantized {
        weight: QuantizedWeight,
        bias: Option<Tensor>,
    },
    /// An embedding table `[vocab, dim]` looked up by token ids: a linear
    /// map on one-hot inputs, whose weight `[out = dim, in = vocab]` is the
    /// table's transpose (kept as a view, no copy).
    Lookup {
        table: candle_nn::Embedding,
        weight: Tensor,
    },
    /// A convolution: a linear map of each input patch, whose weight
    /// `[out, in·k...]` is the kernel flattened (a view, no copy).
    Conv {
        conv: ConvLayer,
        weight: Tensor,
    },
}

impl Base {
    pub(crate) fn lookup(table: Tensor) -> CandleResult<Base> {
        let dim = table.dim(1)?;
        let weight = table.t()?;
        Ok(Base::Lookup {
            table: candle_nn::Embedding::new(table, dim),
            weight,
        })
    }

    pub(crate) fn conv(conv: ConvLayer) -> CandleResult<Base> {
        let out = conv.kernel().dim(0)?;
        let weight = conv.kernel().reshape((out, ()))?;
        Ok(Base::Conv { conv, weight })
    }

    /// The same kind of base with new (dense) weights. Made while planning a
    /// merge, so that a failure leaves the layer as it was.
    ///
    /// The new weights are detached: a merged base is frozen like the one it
    /// replaces (PEFT merges under `no_grad`), so it keeps no graph back to
    /// the adapter weights alive and takes the fused kernels of [`crate::fused`].
    pub(crate) fn rebuilt(&self, weights: LayerWeights) -> CandleResult<Base> {
        let weights = LayerWeights {
            weight: weights.weight.detach(),
            bias: weights.bias.as_ref().map(Tensor::detach),
        };
        match self {
            Base::Conv { conv, .. } => {
                let kernel = weights.weight.reshape(conv.kernel().shape())?;
                Base::conv(conv.with(kernel, weights.bias))
            }
            // The weight is `[dim, vocab]`: the table is its transpose.
            Base::Lookup { .. } => Base::lookup(weights.weight.t()?.contiguous()?),
            _ => Ok(Base::Dense(candle_nn::Linear::new(weights.weight, weights.bias))),
        }
    }

    /// A trainable copy of this base: new [`Var`]s holding copies of its
    /// tensors (keyed as PyTorch names them: `weight`, `bias`), and a base
    /// computing with them. What PEFT's `modules_to_save` deep-copies. `None`
    /// for a quantized base, whose weight cannot be trained.
    pub(crate) fn trainable_copy(&self) -> CandleResult<Option<TrainableBase>> {
        let var = |t: &Tensor| Var::from_tensor(&t.detach());
        let bias_var = |bias: Option<&Tensor>| bias.map(var).transpose();
        let copy = match self {
            Base::Quantized { .. } => return Ok(None),
            Base::Dense(linear) => {
                let weight = var(linear.weight())?;
                let bias = bias_var(linear.bias())?;
                let base = Base::Dense(candle_nn::Linear::new(
                    weight.as_tensor().clone(),
                    bias.as_ref().map(|b| b.as_tensor().clone()),
                ));
                (base, weight, bias)
            }
            Base::Lookup { table, .. } => {
                let weight = var(table.embeddings())?;
                (Base::lookup(weight.as_tensor().clone())?, weight, None)
            }
            Base::Conv { conv, .. } => {
                let weight = var(conv.kernel())?;
                let bias = bias_var(conv.bias())?;
                let copied = conv.with(weight.as_tensor().clone(), bias.as_ref().map(|b| b.as_tensor().clone()));
                (Base::conv(copied)?, weight, bias)
            }
        };
        let (base, weight, bias) = copy;
        let vars = std::iter::once(("weight", weight))
            .chain(bias.map(|b| ("bias", b)))
            .collect();
        Ok(Some(TrainableBase { base, vars }))
    }

    /// The same base computing with `bias` in place of its own: how a bias
    /// trained beside the adapters (PEFT's `bias = "all" | "lora_only"`) is
    /// put in. `None` for a base without a bias (an embedding table, or a
    /// layer loaded with none).
    pub(crate) fn with_bias(&self, bias: Tensor) -> Option<Base> {
        Some(match self {
            Base::Dense(linear) if linear.bias().is_some() => {
                Base::Dense(candle_nn::Linear::new(linear.weight().clone(), Some(bias)))
            }
            Base::Quantized { weight, bias: Some(_) } => Base::Quantized {
                weight: weight.clone(),
                bias: Some(bias),
            },
            Base::Conv { conv, weight } if conv.bias().is_some() => Base::Conv {
                conv: conv.with(conv.kernel().clone(), Some(bias)),
                weight: weight.clone(),
            },
            _ => return None,
        })
    }

    /// The same base, cut from the autograd graph.
    pub(crate) fn detached(&self) -> Base {
        match self {
            Base::Dense(linear) => Base::Dense(candle_nn::Linear::new(
                linear.weight().detach(),
                linear.bias().map(Tensor::detach),
            )),
            Base::Lookup { table, .. } => Base::lookup(table.embeddings().detach()).unwrap_or_else(|_| self.clone()),
            Base::Conv { conv, .. } => Base::conv(conv.with(conv.kernel().detach(), conv.bias().map(Tensor::detach)))
                .unwrap_or_else(|_| self.clone()),
            Base::Quantized { .. } => self.clone(),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        match self {
            Base::Dense(linear) => crate::kernels::fused::linear(x, linear.weight(), linear.bias()),
            Base::Lookup { table, .. } => table.forward(x),
            Base::Conv { conv, .. } => conv.forward(x),
            Base::Quantized { weight, bias } => {
                let y = weight.forward(x)?;
                match bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
        }
    }

    /// The dense weight; for a quantized base, dequantized once and kept
    /// (the only case that can fail: candle could not dequantize it).
    pub(crate) fn weight(&self) -> CandleResult<&Tensor> {
        match self {
            Base::Dense(linear) => Ok(linear.weight()),
            Base::Quantized { weight, .. } => weight.dequantized(),
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => Ok(weight),
        }
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        match self {
            Base::Dense(linear) => linear.bias(),
            Base::Quantized { bias, .. } => bias.as_ref(),
            Base::Lookup { .. } => None,
            Base::Conv { conv, .. } => conv.bias(),
        }
    }
}

impl Base {
    /// What kind of layer this base makes.
    pub(crate) fn kind(&self) -> LayerKind {
        match self {
            Base::Lookup { .. } => LayerKind::Embedding,
            Base::Conv { .. } => LayerKind::Conv,
            Base::Dense(_) | Base::Quantized { .. } => LayerKind::Linear,
        }
    }

    /// Weight and bias of a plain dense base.
    pub(crate) fn dense(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match self {
            Base::Dense(linear) => Some((linear.weight(), linear.bias())),
            _ => None,
        }
    }

    /// The convolution of a convolution base.
    pub(crate) fn conv_layer(&self) -> Option<&ConvLayer> {
        match self {
            Base::Conv { conv, .. } => Some(conv),
            _ => None,
        }
    }

    /// Stride, padding and dilation of a convolution base.
    pub(crate) fn conv_geometry(&self) -> Option<ConvGeometry> {
        self.conv_layer().map(ConvLayer::geometry)
    }

    /// The embedding table `[vocab, dim]` of a lookup base.
    pub(crate) fn lookup_table(&self) -> Option<&Tensor> {
        match self {
            Base::Lookup { table, .. } => Some(table.embeddings()),
            _ => None,
        }
    }

    /// The quantized weight of a quantized base.
    pub(crate) fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        match self {
            Base::Quantized { weight, .. } => Some(weight),
            _ => None,
        }
    }

    /// The tensors the base holds, for counting parameters (tied tensors
    /// count once); a quantized weight has none.
    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Base::Dense(linear) => std::iter::once(linear.weight()).chain(linear.bias()).collect(),
            Base::Quantized { bias, .. } => bias.iter().collect(),
            Base::Lookup { table, .. } => vec![table.embeddings()],
            Base::Conv { conv, .. } => std::iter::once(conv.kernel()).chain(conv.bias()).collect(),
        }
    }

    /// `[out, in]`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        let dims = match self {
            Base::Dense(linear) => linear.weight().dims(),
            Base::Quantized { weight, .. } => weight.shape().dims(),
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => weight.dims(),
        };
        (dims.first().copied().unwrap_or(0), dims.get(1).copied().unwrap_or(0))
    }

    /// The dtype of the activations: the weight's, f32 for a quantized base.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Base::Dense(linear) => linear.weight().dtype(),
            Base::Quantized { .. } => DType::F32,
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => weight.dtype(),
        }
    }

    /// The device the weight lives on.
    pub(crate) fn device(&self) -> Device {
        match self {
            Base::Dense(linear) => linear.weight().device().clone(),
            Base::Quantized { weight, .. } => weight.qtensor().device(),
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => weight.device().clone(),
        }
    }
}
