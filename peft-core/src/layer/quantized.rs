//! Quantized base weights (QLoRA): see [`QuantizedWeight`].

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// A frozen quantized weight `[out, in]`: the base of a QLoRA layer.
///
/// Quantized base weights for [`Linear`](crate::Linear): QLoRA.
///
/// The weight stays a candle [`QTensor`] (Q4_0, Q4K, Q8_0, ... as read from a
/// GGUF file) and is multiplied in its quantized form. candle's own
/// `QMatMul` has no backward pass, so adapters in earlier layers would never
/// receive a gradient; [`QuantizedWeight::forward`] gives it one with respect
/// to the input, `grad_x = grad_y · dequant(W)`, with `W` frozen.
///
/// ```
/// use candle_core::quantized::{GgmlDType, QTensor};
/// use candle_core::{DType, Device, Module, Tensor, Var, D};
/// use peft_core::Linear;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let w = Tensor::arange(0f32, 64., &dev)?.reshape((2, 32))?.affine(1.0 / 32.0, -1.0)?;
/// let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
/// let w_deq = q.dequantize(&dev)?;
/// let layer = Linear::from_qtensor(q, None)?;
/// assert!(layer.is_quantized());
///
/// let x = Var::from_tensor(&Tensor::ones((1, 32), DType::F32, &dev)?)?;
/// let y = layer.forward(&x)?;
/// // Within 8-bit quantization error of the dense product.
/// let dense = x.matmul(&w.t()?)?;
/// let err = (&y - &dense)?.abs()?.max_keepdim(D::Minus1)?.to_vec2::<f32>()?[0][0];
/// assert!(err < 0.05, "{err}");
/// // The gradient reaches the input: d(sum y)/dx = column sums of dequant(W).
/// let grad = y.sum_all()?.backward()?;
/// let expected = w_deq.sum(0)?.unsqueeze(0)?;
/// assert_eq!(grad.get(&x).unwrap().to_vec2::<f32>()?, expected.to_vec2::<f32>()?);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    weight: Arc<QTensor>,
    /// The dequantized weight, made on first use by [`dequantized`](Self::dequantized)
    /// and kept: only adapters that need the dense weight (DoRA) ask for it.
    dense: Arc<OnceLock<Tensor>>,
}

impl QuantizedWeight {
    /// Wraps a quantized `[out, in]` weight.
    pub fn new(weight: impl Into<Arc<QTensor>>) -> Result<Self> {
        let weight = weight.into();
        weight.shape().dims2()?;
        Ok(Self {
            weight,
            dense: Arc::new(OnceLock::new()),
        })
    }

    /// The quantized tensor.
    pub fn qtensor(&self) -> &QTensor {
        &self.weight
    }

    /// `[out, in]`.
    pub fn shape(&self) -> &Shape {
        self.weight.shape()
    }

    /// The quantization format.
    pub fn dtype(&self) -> GgmlDType {
        self.weight.dtype()
    }

    /// Bytes the quantized weight takes.
    pub fn size_in_bytes(&self) -> usize {
        self.weight.storage_size_in_bytes()
    }

    /// The weight in f32, dequantized on first use and kept from then on
    /// (which costs the f32 memory QLoRA avoids: only DoRA asks for it).
    pub fn dequantized(&self) -> Result<&Tensor> {
        if let Some(dense) = self.dense.get() {
            return Ok(dense);
        }
        let dense = self.weight.dequantize(&self.weight.device())?;
        Ok(self.dense.get_or_init(|| dense))
    }

    /// `x Wᵀ`, differentiable with respect to `x` (never to `W`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(QuantizedMatMul(self.weight.clone()))
    }
}

/// candle's quantized matmul with a backward pass for the input.
struct QuantizedMatMul(Arc<QTensor>);

impl CustomOp1 for QuantizedMatMul {
    fn name(&self) -> &'static str {
        "peft-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda_fwd(storage, layout)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.0.metal_fwd(storage, layout)
    }

    /// `y = x Wᵀ`, so `grad_x = grad_y W`. The weight is dequantized for the
    /// product and dropped right after: it is frozen and gets no gradient.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let weight = self.0.dequantize(arg.device())?.to_dtype(grad_res.dtype())?;
        let out = weight.dim(0)?;
        let rows = grad_res.elem_count() / out;
        let grad = grad_res.reshape((rows, out))?.matmul(&weight)?.reshape(arg.shape())?;
        Ok(Some(grad.to_dtype(arg.dtype())?))
    }
}
