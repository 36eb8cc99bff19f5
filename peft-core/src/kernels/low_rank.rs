//! `W + s·B·A` in one pass over the weight: LoRA's merge and unmerge
//! ([`add_low_rank`]).

use std::mem::MaybeUninit;

use candle_core::{bail, DType, Result, Tensor, WithDType};
use rayon::prelude::*;

use crate::kernels::matmul::{CpuTensor, Matrix};

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
