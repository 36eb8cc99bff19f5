//! `W + s·B·A` in one pass over the weight: LoRA's merge and unmerge
//! ([`add_low_rank`]).

use std::mem::MaybeUninit;

use candle_core::{bail, DType, Result, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernels::matmul::{gemm_into, CpuTensor, Matrix};

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
        let (in_dim, b) = (w.matrix::<T>()?.cols, b.matrix::<T>()?);
        let a = Matrix::row_major(a.contiguous_values::<T>()?, b.cols, in_dim);
        let w = w.contiguous_values::<T>()?;
        let values_per_task = LOW_RANK_ROWS * in_dim.max(1);
        let mut out: Vec<T> = Vec::with_capacity(w.len());
        // Blocks of rows over the threads. Each block of the new tensor is
        // written once from the weight (into the vector's spare capacity,
        // never zeroed first), then, while it is in the cache, the product's
        // kernel adds `scale · B[rows] · A` onto it, its sums over the rank
        // added once (one rounding at the weight's magnitude, as `W + ΔW`).
        out.spare_capacity_mut()[..w.len()]
            .par_chunks_mut(values_per_task)
            .zip(w.par_chunks(values_per_task))
            .enumerate()
            .try_for_each(|(block, (out_rows, w_rows))| {
                for (o, &x) in out_rows.iter_mut().zip(w_rows) {
                    o.write(x);
                }
                // SAFETY: every value of the block was written just above.
                let out_rows = unsafe { &mut *(out_rows as *mut [MaybeUninit<T>] as *mut [T]) };
                let b_rows = b.rows_from(block * LOW_RANK_ROWS, w_rows.len() / in_dim.max(1))?;
                gemm_into(out_rows, b_rows, a, T::from_f64(scale), true, Parallelism::None)
            })?;
        // SAFETY: the blocks cover `0..w.len()` (the chunks of `w` and of
        // the spare capacity have the same lengths) and each was written.
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

/// Weight rows per task of [`add_low_rank`]: a block of the new tensor
/// stays in the core's cache between its copy and the product added onto it.
const LOW_RANK_ROWS: usize = 64;

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
