//! Fused CPU kernels for a linear layer whose weight is frozen, alone or with
//! an unmerged LoRA adapter.
//!
//! Written plainly with candle ops, a frozen linear layer and its LoRA adapter
//! cost more than their arithmetic:
//!
//! - candle's autograd differentiates `x.matmul(&w.t())` with respect to both
//!   operands, so a frozen base weight still gets a full-size weight-gradient
//!   product (and a zero tensor to add it to) in every backward pass: a third
//!   of a training step's matrix work for nothing;
//! - `y + s · (x Aᵀ) Bᵀ` makes three temporaries and two extra passes over
//!   the output, and the bias is one more.
//!
//! The two ops here compute the same values with the `gemm` crate candle's own
//! CPU matmul uses, in one output buffer:
//!
//! | pass | [`linear`] | [`lora_linear`] |
//! | --- | --- | --- |
//! | forward | `y = x Wᵀ; y += b` | `y = x Wᵀ; y += b; t = s·x Aᵀ; y += t Bᵀ` |
//! | backward | `∂x = g W` | `u = s·g B; ∂x = g W; ∂x += u A; ∂A = uᵀ x; ∂B = gᵀ (s·x Aᵀ)` |
//!
//! (`g` the output gradient, `s` the LoRA scale). Neither computes a gradient
//! for `W` or the bias. The scale is folded into the `r`-wide products, the
//! low-rank product accumulates straight into the output (and into `∂x`), and
//! `x` and `g` are read in place as `[tokens, features]` matrices.
//!
//! They run on the CPU for f32, f64 and f16. Anything else falls back to the
//! plain candle ops, which compute the same values: other devices (the `cuda`
//! and `metal` features), bf16, operands of different dtypes, and a weight or
//! bias that is itself being trained (it then gets its gradient from candle).
//! [`is_fused`] tells which path a call takes.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use peft_core::fused;
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Var::new(&[[1f32, 2.], [3., 4.]], &dev)?; // 2 tokens, in = 2
//! let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?; // out = 3
//! let a = Var::new(&[[1f32, -1.]], &dev)?; // r = 1
//! let b = Var::new(&[[1f32], [0.], [2.]], &dev)?;
//! assert!(fused::is_fused(&x, &w, None));
//!
//! // y = x Wᵀ + 0.5 · (x Aᵀ) Bᵀ; x Aᵀ = [-1, -1]
//! let y = fused::lora_linear(&x, &w, None, &a, &b, 0.5)?;
//! assert_eq!(y.to_vec2::<f32>()?, [[0.5, 2., 2.], [2.5, 4., 6.]]);
//!
//! let grads = y.sum_all()?.backward()?;
//! // ∂A = uᵀ x with u = s·g B = 0.5 · 3 for each token: 1.5 · [1 + 3, 2 + 4]
//! assert_eq!(grads.get(&a).unwrap().to_vec2::<f32>()?, [[6., 9.]]);
//! // ∂B = gᵀ (s·x Aᵀ): each output sums s·x Aᵀ over the tokens, 0.5 · (-1 - 1)
//! assert_eq!(grads.get(&b).unwrap().to_vec2::<f32>()?, [[-1.], [-1.], [-1.]]);
//! // ∂x = g W + u A = [2, 2] + 1.5 · [1, -1]
//! assert_eq!(grads.get(&x).unwrap().to_vec2::<f32>()?, [[3.5, 0.5], [3.5, 0.5]]);
//! # Ok(())
//! # }
//! ```

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};

use rayon::prelude::*;

use crate::kernels::matmul::{matmul_into, CpuTensor, Matrix};
use crate::kernels::profile::{Pass, Timer};

/// `x Wᵀ + bias`, differentiable with respect to `x` only.
///
/// `x` is `[.., in]`, `weight` `[out, in]`, `bias` `[out]`. The fused kernel
/// runs where [`is_fused`] says so; elsewhere this is `candle_nn::Linear`'s
/// forward.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !is_fused(x, weight, bias) {
        return plain_linear(x, weight, bias);
    }
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear {
        weight: weight.clone(),
        bias: bias.cloned(),
    })
}

/// `x Wᵀ + bias + scale · (x Aᵀ) Bᵀ`: a frozen linear layer with an unmerged
/// LoRA adapter, differentiable with respect to `x`, `a` and `b`.
///
/// `a` is `[r, in]` and `b` `[out, r]`. The fused kernel runs where
/// [`is_fused`] says so for the base and `a` and `b` share its dtype;
/// elsewhere this is the plain candle formula.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (rank, in_dim) = a.dims2()?;
    let (out_dim, rank_b) = b.dims2()?;
    let (w_out, w_in) = weight.dims2()?;
    if rank != rank_b || in_dim != w_in || out_dim != w_out {
        bail!(
            "LoRA shapes do not fit the layer: weight {:?}, lora_A {:?}, lora_B {:?}",
            weight.dims(),
            a.dims(),
            b.dims()
        );
    }
    let same_dtype = a.dtype() == x.dtype() && b.dtype() == x.dtype();
    if !(same_dtype && is_fused(x, weight, bias) && a.device().is_cpu() && b.device().is_cpu()) {
        let y = plain_linear(x, weight, bias)?;
        let down = plain_linear(x, a, None)?;
        return y + plain_linear(&(down * scale)?, b, None)?;
    }
    x.contiguous()?.apply_op3(
        a,
        b,
        FrozenLoraLinear {
            weight: weight.clone(),
            bias: bias.cloned(),
            scale,
        },
    )
}

/// `a · b` for matrices `[m, k]` and `[k, n]`, by the product kernels the
/// fused ops use (faer's for large f32 and f64 products, split over the
/// threads; `gemm`'s otherwise) on the CPU, and by candle's `matmul`
/// elsewhere. What `examples/bench.rs --profile` times as a step's roof.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (k_b, n) = b.dims2()?;
    let cpu = a.device().is_cpu() && b.device().is_cpu();
    let supported = matches!(a.dtype(), DType::F32 | DType::F64 | DType::F16);
    if !cpu || !supported || a.dtype() != b.dtype() || k != k_b {
        return a.matmul(b);
    }
    let (ta, tb) = (CpuTensor::new(a)?, CpuTensor::new(b)?);
    fn product<T: WithDType>(a: &CpuTensor<'_>, b: &CpuTensor<'_>, m: usize, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::zero(); m * n];
        matmul_into(&mut out, a.matrix()?, b.matrix()?, T::one(), false)?;
        Ok(out)
    }
    let device = a.device();
    match a.dtype() {
        DType::F32 => Tensor::from_vec(product::<f32>(&ta, &tb, m, n)?, (m, n), device),
        DType::F64 => Tensor::from_vec(product::<f64>(&ta, &tb, m, n)?, (m, n), device),
        _ => Tensor::from_vec(product::<half::f16>(&ta, &tb, m, n)?, (m, n), device),
    }
}

/// Whether [`linear`] (and [`lora_linear`], given adapter weights of the same
/// dtype) take the fused CPU kernel for these operands: all on the CPU, all
/// f32, f64 or f16 alike, `weight` two-dimensional and matching `x`'s last
/// dimension, and neither `weight` nor `bias` tracked by autograd (frozen).
pub fn is_fused(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    let dtype = x.dtype();
    let supported = matches!(dtype, DType::F32 | DType::F64 | DType::F16);
    let fits = match (weight.dims(), x.dims().last()) {
        ([out, in_dim], Some(last)) => last == in_dim && bias.is_none_or(|b| b.dims() == [*out]),
        _ => false,
    };
    let frozen = !weight.track_op() && bias.is_none_or(|b| !b.track_op());
    let on_cpu = x.device().is_cpu() && weight.device().is_cpu() && bias.is_none_or(|b| b.device().is_cpu());
    let same_dtype = weight.dtype() == dtype && bias.is_none_or(|b| b.dtype() == dtype);
    supported && fits && frozen && on_cpu && same_dtype
}

/// `candle_nn::Linear`'s forward, for the operands the fused kernel does not take.
fn plain_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    use candle_core::Module;
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)
}

// ---- the custom ops -------------------------------------------------------------

/// [`linear`]'s op: `x` is its argument, the frozen weight and bias are captured.
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "peft-frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        dispatch_cpu!(x, |x| forward_cpu(x, x_layout, &self.weight, self.bias.as_ref(), None))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let grads = backward(grad, x, &self.weight, None)?;
        Ok(grads.x)
    }
}

/// [`lora_linear`]'s op: the arguments are `x`, `A` and `B`; the frozen weight
/// and bias are captured.
struct FrozenLoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl CustomOp3 for FrozenLoraLinear {
    fn name(&self) -> &'static str {
        "peft-frozen-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        dispatch_cpu!(x, |x| {
            let lora = LowRank {
                a: Matrix::new(a.as_slice()?, a_layout)?,
                b: Matrix::new(b.as_slice()?, b_layout)?,
                scale: self.scale,
            };
            forward_cpu(x, x_layout, &self.weight, self.bias.as_ref(), Some(lora))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let grads = backward(grad, x, &self.weight, Some((a, b, self.scale)))?;
        Ok((grads.x, grads.a, grads.b))
    }
}

/// Runs `$body` with `$x` bound to the storage's slice, for the dtypes the
/// kernels take, and wraps the returned `Vec` back into a storage.
macro_rules! dispatch_cpu {
    ($storage:expr, |$x:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32($x) => $body.map(|(v, s)| (CpuStorage::F32(v), s)),
            CpuStorage::F64($x) => $body.map(|(v, s)| (CpuStorage::F64(v), s)),
            CpuStorage::F16($x) => $body.map(|(v, s)| (CpuStorage::F16(v), s)),
            other => bail!("fused linear kernels take f32, f64 or f16, not {:?}", other.dtype()),
        }
    };
}
use dispatch_cpu;

// ---- CPU kernels ---------------------------------------------------------------

/// The adapter's part of a forward pass.
struct LowRank<'a, T> {
    /// `[r, in]`.
    a: Matrix<'a, T>,
    /// `[out, r]`.
    b: Matrix<'a, T>,
    scale: f64,
}

fn forward_cpu<T: WithDType>(
    x: &[T],
    x_layout: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<LowRank<'_, T>>,
) -> Result<(Vec<T>, Shape)> {
    let x = Matrix::rows_of(x, x_layout)?;
    let weight = CpuTensor::new(weight)?;
    let w = weight.matrix::<T>()?;
    let (tokens, out_dim) = (x.rows, w.rows);

    let mut y = vec![T::zero(); tokens * out_dim];
    matmul_into(&mut y, x, w.t(), T::one(), false)?;
    if let Some(bias) = bias {
        // Added after the product, in place, as `candle_nn::Linear` adds it
        // (same rounding: a slot without adapter gives its output bit for bit).
        let bias = CpuTensor::new(bias)?;
        let bias = bias.matrix::<T>()?;
        let row: Vec<T> = (0..out_dim).map(|j| bias.at(0, j)).collect();
        y.par_chunks_mut(out_dim.max(1)).for_each(|y| {
            for (y, b) in y.iter_mut().zip(&row) {
                *y += *b;
            }
        });
    }
    if let Some(LowRank { a, b, scale }) = lora {
        let mut down = vec![T::zero(); tokens * a.rows];
        matmul_into(&mut down, x, a.t(), T::from_f64(scale), false)?;
        matmul_into(&mut y, Matrix::row_major(&down, tokens, a.rows), b.t(), T::one(), true)?;
    }
    let mut dims = x_layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    Ok((y, Shape::from(dims)))
}

/// The gradients a backward pass asks for; `None` where the operand is not
/// tracked by autograd.
struct Grads {
    x: Option<Tensor>,
    a: Option<Tensor>,
    b: Option<Tensor>,
}

/// Which gradients a backward pass computes.
#[derive(Clone, Copy)]
pub(crate) struct Wanted {
    pub(crate) x: bool,
    pub(crate) a: bool,
    pub(crate) b: bool,
}

fn backward(grad: &Tensor, x: &Tensor, weight: &Tensor, lora: Option<(&Tensor, &Tensor, f64)>) -> Result<Grads> {
    // The input gradient is needed unless `x` is a leaf no one trains (the
    // output of a frozen embedding, say).
    let wanted = Wanted {
        x: x.track_op(),
        a: lora.is_some_and(|(a, _, _)| a.track_op()),
        b: lora.is_some_and(|(_, b, _)| b.track_op()),
    };
    let grad = grad.contiguous()?;
    let x = x.contiguous()?;
    let g = CpuTensor::new(&grad)?;
    let (grad_x, a, b) = match g.storage()? {
        CpuStorage::F32(g) => backward_cpu(g, grad.layout(), &x, weight, lora, wanted, None)?.into_tensor(&x)?,
        CpuStorage::F64(g) => backward_cpu(g, grad.layout(), &x, weight, lora, wanted, None)?.into_tensor(&x)?,
        CpuStorage::F16(g) => backward_cpu(g, grad.layout(), &x, weight, lora, wanted, None)?.into_tensor(&x)?,
        other => bail!("fused linear kernels take f32, f64 or f16, not {:?}", other.dtype()),
    };
    Ok(Grads { x: grad_x, a, b })
}

/// [`lora_linear`]'s (or [`linear`]'s, without `lora`) gradients in f32, as
/// `wanted`, whether or not autograd tracks the operands; `∂x` is added onto
/// `grad_x_onto` when given (`[tokens, in]`), which then holds the sum.
pub(crate) fn linear_grads_f32(
    grad: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    lora: Option<(&Tensor, &Tensor, f64)>,
    wanted: Wanted,
    grad_x_onto: Option<Vec<f32>>,
) -> Result<LinearGrads<f32>> {
    let g = CpuTensor::new(grad)?;
    backward_cpu(g.slice::<f32>()?, grad.layout(), x, weight, lora, wanted, grad_x_onto)
}

/// What [`backward_cpu`] computes: `∂x` as values, `∂A` and `∂B` as tensors.
pub(crate) struct LinearGrads<T> {
    pub(crate) x: Option<Vec<T>>,
    pub(crate) a: Option<Tensor>,
    pub(crate) b: Option<Tensor>,
}

impl<T: WithDType> LinearGrads<T> {
    /// `∂x` as a tensor shaped like `x`.
    fn into_tensor(self, x: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = match self.x {
            Some(values) => Some(Tensor::from_vec(values, x.shape(), x.device())?),
            None => None,
        };
        Ok((grad_x, self.a, self.b))
    }
}

fn backward_cpu<T: WithDType>(
    grad: &[T],
    grad_layout: &Layout,
    x: &Tensor,
    weight: &Tensor,
    lora: Option<(&Tensor, &Tensor, f64)>,
    wanted: Wanted,
    grad_x_onto: Option<Vec<T>>,
) -> Result<LinearGrads<T>> {
    let device = x.device();
    let (x_ref, w_ref) = (CpuTensor::new(x)?, CpuTensor::new(weight)?);
    let g = Matrix::rows_of(grad, grad_layout)?;
    let xm = Matrix::rows_of(x_ref.slice::<T>()?, x.layout())?;
    let w = w_ref.matrix::<T>()?;
    let tokens = g.rows;

    let mut grads = LinearGrads {
        x: None,
        a: None,
        b: None,
    };
    let mut grad_x = match grad_x_onto {
        Some(onto) if onto.len() != tokens * w.cols => {
            bail!(
                "fused linear: adding ∂x onto {} values, not {}",
                onto.len(),
                tokens * w.cols
            )
        }
        Some(onto) => Some((onto, true)),
        None => wanted.x.then(|| (vec![T::zero(); tokens * w.cols], false)),
    };
    if let Some((grad_x, accumulate)) = grad_x.as_mut() {
        matmul_into(grad_x, g, w, T::one(), *accumulate)?;
    }
    if let Some((a, b, scale)) = lora {
        let (a_ref, b_ref) = (CpuTensor::new(a)?, CpuTensor::new(b)?);
        let (am, bm) = (a_ref.matrix::<T>()?, b_ref.matrix::<T>()?);
        let rank = am.rows;
        let scale = T::from_f64(scale);
        // u = s·g B, [tokens, r]: feeds both ∂x and ∂A.
        let mut u = vec![T::zero(); tokens * rank];
        matmul_into(&mut u, g, bm, scale, false)?;
        let u = Matrix::row_major(&u, tokens, rank);
        if let Some((grad_x, _)) = grad_x.as_mut() {
            matmul_into(grad_x, u, am, T::one(), true)?;
        }
        if wanted.a {
            // ∂Aᵀ = xᵀ u, [in, r]: tall and thin, so it splits by rows like the
            // other r-wide products; then transposed into A's layout.
            let in_dim = xm.cols;
            let mut grad_a_t = vec![T::zero(); in_dim * rank];
            matmul_into(&mut grad_a_t, xm.t(), u, T::one(), false)?;
            let grad_a: Vec<T> = (0..rank * in_dim)
                .map(|i| grad_a_t[(i % in_dim) * rank + i / in_dim])
                .collect();
            grads.a = Some(Tensor::from_vec(grad_a, a.shape(), device)?);
        }
        if wanted.b {
            // s·x Aᵀ again rather than kept from the forward pass: r / out of
            // the layer's work, and no activation held per layer.
            let mut down = vec![T::zero(); tokens * rank];
            matmul_into(&mut down, xm, am.t(), scale, false)?;
            let mut grad_b = vec![T::zero(); g.cols * rank];
            matmul_into(
                &mut grad_b,
                g.t(),
                Matrix::row_major(&down, tokens, rank),
                T::one(),
                false,
            )?;
            grads.b = Some(Tensor::from_vec(grad_b, b.shape(), device)?);
        }
    }
    grads.x = grad_x.map(|(values, _)| values);
    Ok(grads)
}
