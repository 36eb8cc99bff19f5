//! Products of a short depth (a LoRA rank): [`short_depth_into`], for
//! [`matmul_into`](super::matmul_into).

use candle_core::{Result, WithDType};
use rayon::prelude::*;

use super::Matrix;

/// Products this short (`k`, a LoRA rank) with a result this large go to
/// [`short_depth_into`].
pub(super) const SHORT_DEPTH: usize = 32;
pub(super) const SHORT_DEPTH_MIN_RESULT: usize = 1 << 15;

/// Columns summed in registers at a time by [`short_depth_into`].
pub(super) const STRIP: usize = 64;

/// [`matmul_into`](super::matmul_into) for a short depth `k` (the LoRA products
/// `(x Aᵀ) Bᵀ` and `u A`, rank `r` deep) and f32 or f64 (`Ok(false)`, doing
/// nothing, otherwise): each result row is read and written once, its `k` terms
/// summed in registers per strip of [`STRIP`] columns, rows split over the
/// threads. Such a product does little arithmetic per value it writes;
/// `gemm` and faer pack and block it as if it were deep (35 to 58 GFLOP/s on
/// the bench model's shapes). On x86-64 with AVX2 and FMA the loop is
/// compiled for them.
pub(super) fn short_depth_into<T: WithDType>(
    dst: &mut [T],
    lhs: Matrix<'_, T>,
    rhs: Matrix<'_, T>,
    scale: T,
    accumulate: bool,
) -> Result<bool> {
    if !crate::kernels::is_f32_or_f64::<T>() {
        return Ok(false);
    }
    super::check_product(dst.len(), lhs, rhs)?;
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    // The `k` rows of `rhs` contiguous (a copy of at most 32 rows when they
    // are not, as `Bᵀ` of a row-major `B`).
    let rows: Vec<T> = (0..k).flat_map(|p| (0..n).map(move |j| rhs.at(p, j))).collect();
    let threads = candle_core::utils::get_num_threads().max(1);
    let rows_per_task = m.div_ceil(threads).max(1);
    let block = ShortDepth {
        lhs: &lhs,
        rows: &rows,
        n,
        scale,
        accumulate,
    };
    dst.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each(|(task, dst)| short_depth_rows(dst, task * rows_per_task, &block));
    Ok(true)
}

/// The operands of [`short_depth_into`] a task needs.
struct ShortDepth<'a, T> {
    lhs: &'a Matrix<'a, T>,
    /// `rhs` row-major, `[k, n]`.
    rows: &'a [T],
    n: usize,
    scale: T,
    accumulate: bool,
}

/// Result rows `first_row..` of [`short_depth_into`] into `dst`.
fn short_depth_rows<T: WithDType>(dst: &mut [T], first_row: usize, block: &ShortDepth<'_, T>) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { short_depth_rows_avx2(dst, first_row, block) };
        return;
    }
    short_depth_rows_portable(dst, first_row, block);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn short_depth_rows_avx2<T: WithDType>(dst: &mut [T], first_row: usize, block: &ShortDepth<'_, T>) {
    short_depth_rows_portable(dst, first_row, block);
}

#[inline(always)]
fn short_depth_rows_portable<T: WithDType>(dst: &mut [T], first_row: usize, block: &ShortDepth<'_, T>) {
    let ShortDepth {
        lhs,
        rows,
        n,
        scale,
        accumulate,
    } = *block;
    let k = lhs.cols;
    let mut coefficients = [T::zero(); SHORT_DEPTH];
    for (i, dst_row) in dst.chunks_exact_mut(n).enumerate() {
        for (p, c) in coefficients[..k].iter_mut().enumerate() {
            *c = lhs.at(first_row + i, p);
        }
        let mut start = 0;
        while start < n {
            let width = STRIP.min(n - start);
            let mut sums = [T::zero(); STRIP];
            if width == STRIP {
                for (p, &c) in coefficients[..k].iter().enumerate() {
                    let strip = &rows[p * n + start..p * n + start + STRIP];
                    for (sum, &x) in sums.iter_mut().zip(strip) {
                        *sum += c * x;
                    }
                }
            } else {
                for (p, &c) in coefficients[..k].iter().enumerate() {
                    let strip = &rows[p * n + start..p * n + start + width];
                    for (sum, &x) in sums.iter_mut().zip(strip) {
                        *sum += c * x;
                    }
                }
            }
            let out = &mut dst_row[start..start + width];
            if accumulate {
                for (o, &sum) in out.iter_mut().zip(&sums) {
                    *o += scale * sum;
                }
            } else {
                for (o, &sum) in out.iter_mut().zip(&sums) {
                    *o = scale * sum;
                }
            }
            start += width;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::matmul_into;

    /// Short products (depth up to 32) equal a plain sum: widths that are
    /// and are not multiples of the strip, a transposed right operand (as
    /// `Bᵀ`), writing and adding, f32 and f64.
    #[test]
    fn short_depth_products_equal_the_plain_sum() -> Result<()> {
        fn check<T: WithDType>(tolerance: f64) -> Result<()> {
            for (m, k, n) in [(300, 16, 200), (513, 1, 64), (129, 32, 1000)] {
                assert!(m * n >= SHORT_DEPTH_MIN_RESULT && k <= SHORT_DEPTH && n >= STRIP);
                let lhs: Vec<T> = (0..m * k).map(|i| T::from_f64((i as f64 * 0.37).sin())).collect();
                let rhs: Vec<T> = (0..k * n).map(|i| T::from_f64((i as f64 * 0.11).cos())).collect();
                let start: Vec<T> = (0..m * n).map(|i| T::from_f64((i as f64 * 0.05).sin())).collect();
                let lhs = Matrix::row_major(&lhs, m, k);
                for rhs in [Matrix::row_major(&rhs, k, n), Matrix::row_major(&rhs, n, k).t()] {
                    for accumulate in [false, true] {
                        let mut dst = start.clone();
                        matmul_into(&mut dst, lhs, rhs, T::from_f64(-0.5), accumulate)?;
                        for i in 0..m {
                            for j in 0..n {
                                let sum: f64 = (0..k).map(|p| lhs.at(i, p).to_f64() * rhs.at(p, j).to_f64()).sum();
                                let before = if accumulate { start[i * n + j].to_f64() } else { 0.0 };
                                let expected = before - 0.5 * sum;
                                let found = dst[i * n + j].to_f64();
                                assert!(
                                    (found - expected).abs() <= tolerance * expected.abs().max(1.0),
                                    "{m}x{k}x{n} ({i}, {j}) {found} vs {expected}"
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
