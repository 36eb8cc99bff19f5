//! Large f32 and f64 products by faer's kernels: [`faer_into`], for
//! [`gemm_into`](super::gemm_into).

use candle_core::{Result, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::Matrix;

/// Products of at least this many multiply-adds (`m · k · n`) in f32 or f64
/// go to faer's kernels ([`faer_into`]); smaller ones (attention's per-head
/// products) stay with `gemm`, which is quicker there.
pub(super) const FAER_MIN_PRODUCT: usize = 1 << 21;

/// [`gemm_into`](super::gemm_into) by faer's matrix product, for f32 and f64
/// (`Ok(false)`, doing nothing, for other types and on CPUs without faer's x86
/// kernels). Those kernels use AVX-512 where the CPU has it, on stable Rust,
/// where `gemm` 0.19 needs a nightly compiler for its own: 1.2 to 1.4 x
/// `gemm`'s speed on a training step's large products here
/// (docs/PERFORMANCE.md).
///
/// Those kernels are hand-written assembly that returns with the upper
/// halves of the vector registers in use; until a `vzeroupper`, every
/// non-VEX SSE instruction after them (this crate's and candle's
/// element-wise loops, compiled for baseline x86-64) ran about 60 x slower
/// on the thread. So the product runs on one thread per block of the result
/// (rows, or columns when it is wider than tall), each block by faer on that
/// thread alone followed by a `vzeroupper` there, rather than on faer's own
/// threads, which this crate cannot clean up after.
pub(super) fn faer_into<T: WithDType>(
    dst: &mut [T],
    lhs: Matrix<'_, T>,
    rhs: Matrix<'_, T>,
    scale: T,
    accumulate: bool,
    threads: Parallelism,
) -> Result<bool> {
    if !crate::kernels::is_f32_or_f64::<T>() {
        return Ok(false);
    }
    let is_f32 = T::DTYPE == candle_core::DType::F32;
    // faer's x86 assembly kernels (AVX2 or AVX-512) run on this CPU;
    // elsewhere its portable kernels are no faster than `gemm`'s.
    if !crate::kernels::has_avx2_fma() {
        return Ok(false);
    }
    let tasks = match threads {
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        Parallelism::Rayon(n) => n,
        Parallelism::None => 1,
    };
    let (m, n) = (lhs.rows, rhs.cols);
    let by_rows = m >= n;
    let length = if by_rows { m } else { n };
    let per_task = length.div_ceil(tasks.max(1)).max(1);
    let dst = SharedMut(dst.as_mut_ptr());
    let block = |task: usize| -> Result<()> {
        let start = task * per_task;
        let count = per_task.min(length - start);
        let (offset, rows, cols) = if by_rows {
            (start * n, count, n)
        } else {
            (start, m, count)
        };
        let (lhs, rhs) = if by_rows {
            (lhs.rows_from(start, count), Ok(rhs))
        } else {
            (Ok(lhs), rhs.cols_from(start, count))
        };
        let (lhs, rhs) = (lhs?, rhs?);
        // SAFETY: every index of `lhs` and `rhs` is in bounds of its slice
        // (`Matrix::checked`); this task's block of `dst` (`rows x cols` at
        // `offset`, row stride `n`) lies inside its `m · n` values and is
        // written by this task only; `T` is f32 or f64 as the pointers are
        // cast to (`is_f32_or_f64` by `TypeId`, then the dtype).
        unsafe {
            let out = dst.at(offset);
            if is_f32 {
                faer_block::<f32, T>(out.cast(), n, rows, cols, &lhs, &rhs, scale.to_f64() as f32, accumulate);
            } else {
                faer_block::<f64, T>(out.cast(), n, rows, cols, &lhs, &rhs, scale.to_f64(), accumulate);
            }
        }
        clear_upper_vector_state();
        Ok(())
    };
    let blocks = length.div_ceil(per_task);
    if blocks == 1 {
        block(0)?;
    } else {
        (0..blocks).into_par_iter().try_for_each(block)?;
    }
    Ok(true)
}

/// `vzeroupper`: marks the upper halves of the vector registers unused, so
/// that SSE code after faer's kernels runs at full speed. Called only where
/// [`has_avx2_fma`](crate::kernels::has_avx2_fma) (the CPU has AVX).
fn clear_upper_vector_state() {
    // SAFETY: the CPU has AVX (see above); the instruction touches no memory
    // and no flags, and the registers it clears are caller-saved.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!("vzeroupper", options(nomem, nostack, preserves_flags));
    }
}

/// A pointer into the result, shared by the tasks of [`faer_into`], each
/// writing its own block.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: the tasks write disjoint blocks (see `faer_into`).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer `offset` values on.
    ///
    /// # Safety
    /// As for `pointer::add`: the result lies inside the same allocation.
    unsafe fn at(self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

/// `dst (rows x cols, row stride) = [dst +] scale · lhs · rhs` by faer on
/// this thread.
///
/// # Safety
/// `dst` holds the block; `lhs` and `rhs` hold values of type `U`.
#[allow(clippy::too_many_arguments)]
unsafe fn faer_block<U: faer::traits::ComplexField + Copy, T>(
    dst: *mut U,
    row_stride: usize,
    rows: usize,
    cols: usize,
    lhs: &Matrix<'_, T>,
    rhs: &Matrix<'_, T>,
    scale: U,
    accumulate: bool,
) {
    let accum = if accumulate {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    let k = lhs.cols;
    unsafe {
        let dst = faer::MatMut::from_raw_parts_mut(dst, rows, cols, row_stride as isize, 1);
        let lhs = faer::MatRef::from_raw_parts(
            lhs.data.as_ptr().cast::<U>(),
            rows,
            k,
            lhs.row_stride as isize,
            lhs.col_stride as isize,
        );
        let rhs = faer::MatRef::from_raw_parts(
            rhs.data.as_ptr().cast::<U>(),
            k,
            cols,
            rhs.row_stride as isize,
            rhs.col_stride as isize,
        );
        faer::linalg::matmul::matmul(dst, accum, lhs, rhs, scale, faer::Par::Seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::gemm_into;

    /// Products large enough for faer's kernels equal a plain sum, in f32 and
    /// f64, for every stride pattern the kernels pass (a transposed weight,
    /// a transposed input), writing and adding, on one thread and on several.
    #[test]
    fn large_products_equal_the_plain_sum() -> Result<()> {
        fn check<T: WithDType>(tolerance: f64) -> Result<()> {
            let (m, k, n) = (130, 200, 170);
            assert!(m * k * n >= FAER_MIN_PRODUCT);
            let lhs: Vec<T> = (0..m * k).map(|i| T::from_f64((i as f64 * 0.37).sin())).collect();
            let rhs: Vec<T> = (0..k * n).map(|i| T::from_f64((i as f64 * 0.11).cos())).collect();
            let start: Vec<T> = (0..m * n).map(|i| T::from_f64(i as f64 * 0.01)).collect();
            // Row-major and transposed (stored the other way round) operands.
            let lhs_views = [Matrix::row_major(&lhs, m, k), Matrix::row_major(&lhs, k, m).t()];
            let rhs_views = [Matrix::row_major(&rhs, k, n), Matrix::row_major(&rhs, n, k).t()];
            for (lhs, rhs) in lhs_views.iter().flat_map(|l| rhs_views.iter().map(move |r| (*l, *r))) {
                for accumulate in [false, true] {
                    for threads in [Parallelism::None, Parallelism::Rayon(2)] {
                        let mut dst = start.clone();
                        gemm_into(&mut dst, lhs, rhs, T::from_f64(0.5), accumulate, threads)?;
                        for i in 0..m {
                            for j in 0..n {
                                let sum: f64 = (0..k).map(|p| lhs.at(i, p).to_f64() * rhs.at(p, j).to_f64()).sum();
                                let before = if accumulate { start[i * n + j].to_f64() } else { 0.0 };
                                let expected = before + 0.5 * sum;
                                let found = dst[i * n + j].to_f64();
                                assert!(
                                    (found - expected).abs() <= tolerance * expected.abs().max(1.0),
                                    "({i}, {j}) {found} vs {expected}, {:?}",
                                    T::DTYPE
                                );
                            }
                        }
                    }
                }
            }
            Ok(())
        }
        check::<f32>(1e-5)?;
        check::<f64>(1e-12)
    }
}
