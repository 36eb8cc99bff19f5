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

use std::mem::MaybeUninit;

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

/// `weight + scale · b · a`, a new `[out, in]` tensor: a LoRA merged into
/// its weight (taken out again with `-scale`), in one copy of the weight and
/// one product added onto it, where candle's ops make the product, scale it
/// and add it in three passes with a tensor each. `None` where the kernel
/// does not apply: not all on the CPU in one dtype of f32, f64 or f16.
pub(crate) fn add_low_rank(weight: &Tensor, b: &Tensor, a: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let dtype = weight.dtype();
    let cpu = weight.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu();
    let supported = matches!(dtype, DType::F32 | DType::F64 | DType::F16);
    if !cpu || !supported || a.dtype() != dtype || b.dtype() != dtype {
        return Ok(None);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let (b_out, rank) = b.dims2()?;
    if b_out != out_dim || a.dims2()? != (rank, in_dim) {
        bail!(
            "a low-rank change does not fit the weight: weight {:?}, lora_A {:?}, lora_B {:?}",
            weight.dims(),
            a.dims(),
            b.dims()
        );
    }
    let weight = weight.contiguous()?;
    let a = a.contiguous()?;
    let (w, b, a) = (CpuTensor::new(&weight)?, CpuTensor::new(b)?, CpuTensor::new(&a)?);
    fn sum<T: WithDType>(w: &CpuTensor<'_>, b: &CpuTensor<'_>, a: &CpuTensor<'_>, scale: f64) -> Result<Vec<T>> {
        let (b, a) = (b.matrix::<T>()?, a.contiguous_values::<T>()?);
        let w = w.contiguous_values::<T>()?;
        let in_dim = a.len() / b.cols.max(1);
        let rows_per_task = LOW_RANK_ROWS * in_dim.max(1);
        let mut out: Vec<T> = Vec::with_capacity(w.len());
        // Rows in blocks over the threads: each output row is written once
        // (into the vector's spare capacity, never zeroed first), from its
        // weight row read once, so the pass runs at memory speed.
        out.spare_capacity_mut()[..w.len()]
            .par_chunks_mut(rows_per_task)
            .zip(w.par_chunks(rows_per_task))
            .enumerate()
            .for_each(|(block, (out_rows, w_rows))| {
                let change = LowRankBlock {
                    b: &b,
                    first_row: block * LOW_RANK_ROWS,
                    a,
                    in_dim,
                    scale: T::from_f64(scale),
                };
                add_low_rank_rows(out_rows, w_rows, &change);
            });
        // SAFETY: the blocks cover `0..w.len()` (the chunks of `w` and of
        // the spare capacity have the same lengths) and `add_low_rank_rows`
        // writes every value of its block.
        unsafe { out.set_len(w.len()) };
        Ok(out)
    }
    let shape = (out_dim, in_dim);
    let device = weight.device();
    let merged = match dtype {
        DType::F32 => Tensor::from_vec(sum::<f32>(&w, &b, &a, scale)?, shape, device)?,
        DType::F64 => Tensor::from_vec(sum::<f64>(&w, &b, &a, scale)?, shape, device)?,
        _ => Tensor::from_vec(sum::<half::f16>(&w, &b, &a, scale)?, shape, device)?,
    };
    Ok(Some(merged))
}

/// Weight rows per task of [`add_low_rank`].
const LOW_RANK_ROWS: usize = 32;

/// The low-rank change of a block of weight rows: `scale · B[first_row..] · A`,
/// `A` row-major `[r, in_dim]`.
struct LowRankBlock<'a, T> {
    b: &'a Matrix<'a, T>,
    first_row: usize,
    a: &'a [T],
    in_dim: usize,
    scale: T,
}

/// `out = w + change` for a block of rows: per row and strip of columns,
/// the change `Σₖ (scale · Bᵢₖ) · Aₖ` is summed in registers, then added to
/// the weight once (one rounding at the weight's magnitude, as `W + ΔW`).
/// On x86-64 CPUs with AVX2 and FMA the loop is compiled for them.
fn add_low_rank_rows<T: WithDType>(out: &mut [MaybeUninit<T>], w: &[T], change: &LowRankBlock<'_, T>) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { add_low_rank_rows_avx2(out, w, change) };
        return;
    }
    add_low_rank_rows_portable(out, w, change);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_low_rank_rows_avx2<T: WithDType>(out: &mut [MaybeUninit<T>], w: &[T], change: &LowRankBlock<'_, T>) {
    add_low_rank_rows_portable(out, w, change);
}

#[inline(always)]
fn add_low_rank_rows_portable<T: WithDType>(out: &mut [MaybeUninit<T>], w: &[T], block: &LowRankBlock<'_, T>) {
    let LowRankBlock {
        b,
        first_row,
        a,
        in_dim,
        scale,
    } = *block;
    // Columns in strips of this many values, summed over the rank in
    // registers: the strip's change is written once, not once per rank.
    const STRIP: usize = 64;
    if in_dim == 0 {
        return;
    }
    debug_assert_eq!(out.len(), w.len());
    let rank = a.len() / in_dim;
    let mut coefficients = vec![T::zero(); rank];
    for (row, (out_row, w_row)) in out.chunks_exact_mut(in_dim).zip(w.chunks_exact(in_dim)).enumerate() {
        for (k, c) in coefficients.iter_mut().enumerate() {
            *c = scale * b.at(first_row + row, k);
        }
        let mut start = 0;
        while start < in_dim {
            let width = STRIP.min(in_dim - start);
            let mut change = [T::zero(); STRIP];
            if width == STRIP {
                for (k, &c) in coefficients.iter().enumerate() {
                    let a_strip = &a[k * in_dim + start..k * in_dim + start + STRIP];
                    for (sum, &x) in change.iter_mut().zip(a_strip) {
                        *sum += c * x;
                    }
                }
            } else {
                for (k, &c) in coefficients.iter().enumerate() {
                    let a_strip = &a[k * in_dim + start..k * in_dim + start + width];
                    for (sum, &x) in change.iter_mut().zip(a_strip) {
                        *sum += c * x;
                    }
                }
            }
            let outs = &mut out_row[start..start + width];
            for ((o, &w), &c) in outs.iter_mut().zip(&w_row[start..start + width]).zip(&change) {
                o.write(w + c);
            }
            start += width;
        }
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

fn backward(grad: &Tensor, x: &Tensor, weight: &Tensor, lora: Option<(&Tensor, &Tensor, f64)>) -> Result<Grads> {
    let grad = grad.contiguous()?;
    let x = x.contiguous()?;
    let g = CpuTensor::new(&grad)?;
    match g.storage()? {
        CpuStorage::F32(g) => backward_cpu(g, grad.layout(), &x, weight, lora),
        CpuStorage::F64(g) => backward_cpu(g, grad.layout(), &x, weight, lora),
        CpuStorage::F16(g) => backward_cpu(g, grad.layout(), &x, weight, lora),
        other => bail!("fused linear kernels take f32, f64 or f16, not {:?}", other.dtype()),
    }
}

fn backward_cpu<T: WithDType>(
    grad: &[T],
    grad_layout: &Layout,
    x: &Tensor,
    weight: &Tensor,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Grads> {
    let device = x.device();
    let (x_ref, w_ref) = (CpuTensor::new(x)?, CpuTensor::new(weight)?);
    let g = Matrix::rows_of(grad, grad_layout)?;
    let xm = Matrix::rows_of(x_ref.slice::<T>()?, x.layout())?;
    let w = w_ref.matrix::<T>()?;
    let tokens = g.rows;

    let mut grads = Grads {
        x: None,
        a: None,
        b: None,
    };
    // The input gradient is needed unless `x` is a leaf no one trains (the
    // output of a frozen embedding, say).
    let mut grad_x = x.track_op().then(|| vec![T::zero(); tokens * w.cols]);
    if let Some(grad_x) = grad_x.as_mut() {
        matmul_into(grad_x, g, w, T::one(), false)?;
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
        if let Some(grad_x) = grad_x.as_mut() {
            matmul_into(grad_x, u, am, T::one(), true)?;
        }
        if a.track_op() {
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
        if b.track_op() {
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
    if let Some(grad_x) = grad_x {
        grads.x = Some(Tensor::from_vec(grad_x, x.shape(), device)?);
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::add_low_rank;

    /// `W + s·B·A` by the row kernel against candle's ops in f64, for
    /// shapes that split into several blocks and one that does not.
    #[test]
    fn add_low_rank_equals_the_plain_sum() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (out_dim, rank, in_dim) in [(70, 3, 33), (5, 1, 1), (200, 16, 96)] {
            for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::F64, 1e-14), (DType::F16, 2e-3)] {
                let values = |n: usize, phase: f64| -> candle_core::Result<Tensor> {
                    let v: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37 + phase).sin()).collect();
                    Tensor::from_vec(v, n, &dev)?.to_dtype(dtype)
                };
                let w = values(out_dim * in_dim, 0.1)?.reshape((out_dim, in_dim))?;
                let b = values(out_dim * rank, 0.7)?.reshape((out_dim, rank))?;
                // A given transposed, as a view: the kernel makes it contiguous.
                let a = values(rank * in_dim, 1.3)?.reshape((in_dim, rank))?.t()?;
                let merged = add_low_rank(&w, &b, &a, -0.75)?.expect("the CPU kernel takes these");
                let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
                let expected = (f64_of(&w)? + (f64_of(&b)?.matmul(&f64_of(&a)?)? * -0.75)?)?;
                let error = (f64_of(&merged)? - &expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
                let largest = expected.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                assert!(
                    error <= tolerance * largest,
                    "{out_dim}x{rank}x{in_dim} {dtype:?}: {error:e} of {largest}"
                );
                assert_eq!(merged.dims(), [out_dim, in_dim]);
            }
        }
        Ok(())
    }
}
