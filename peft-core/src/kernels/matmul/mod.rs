//! Matrix products on CPU storage, without copies: strided views over a
//! tensor's slice and `gemm` calls into a caller's buffer, split across
//! threads where `gemm` alone is slow (thin, rank-`r` products). The
//! kernels of [`fused`](super::fused) and [`ops`](super::ops) are built on them.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, StorageRef, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

mod faer;
mod short_depth;

use faer::{faer_into, FAER_MIN_PRODUCT};
use short_depth::{short_depth_into, SHORT_DEPTH, SHORT_DEPTH_MIN_RESULT, STRIP};

/// A tensor's CPU storage, read-locked for as long as this lives.
pub(crate) struct CpuTensor<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> CpuTensor<'a> {
    pub(crate) fn new(tensor: &'a Tensor) -> Result<Self> {
        let (storage, layout) = tensor.storage_and_layout();
        if !matches!(&*storage, Storage::Cpu(_)) {
            bail!(
                "fused linear kernels run on the CPU, found a tensor on {:?}",
                tensor.device()
            );
        }
        Ok(Self { storage, layout })
    }

    pub(crate) fn storage(&self) -> Result<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(cpu),
            _ => bail!("fused linear kernels run on the CPU"),
        }
    }

    pub(crate) fn slice<T: WithDType>(&self) -> Result<&[T]> {
        self.storage()?.as_slice::<T>()
    }

    /// The values of a contiguous tensor, in order.
    pub(crate) fn contiguous_values<T: WithDType>(&self) -> Result<&[T]> {
        let Some((start, end)) = self.layout.contiguous_offsets() else {
            bail!("a contiguous tensor expected");
        };
        Ok(&self.slice()?[start..end])
    }

    /// The tensor as a matrix: a 2-D tensor with its strides, or a 1-D one as a row.
    pub(crate) fn matrix<T: WithDType>(&self) -> Result<Matrix<'_, T>> {
        Matrix::new(self.slice()?, self.layout)
    }
}

/// A strided read-only matrix over a slice: element `(i, j)` is
/// `data[i * row_stride + j * col_stride]`, every index checked in [`Matrix::new`].
#[derive(Clone, Copy)]
pub(crate) struct Matrix<'a, T> {
    data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T: Copy> Matrix<'a, T> {
    /// A 2-D layout as it is (any strides, transposed views included), or a
    /// 1-D layout as one row.
    pub(crate) fn new(storage: &'a [T], layout: &Layout) -> Result<Self> {
        let data = storage.get(layout.start_offset()..).unwrap_or(&[]);
        let (rows, cols, row_stride, col_stride) = match (layout.dims(), layout.stride()) {
            ([rows, cols], [rs, cs]) => (*rows, *cols, *rs, *cs),
            ([cols], [cs]) => (1, *cols, 0, *cs),
            (dims, _) => bail!("fused linear kernels take matrices, found shape {dims:?}"),
        };
        Self::checked(data, rows, cols, row_stride, col_stride)
    }

    /// A contiguous tensor of any rank as `[elements / last, last]`.
    pub(crate) fn rows_of(storage: &'a [T], layout: &Layout) -> Result<Self> {
        if !layout.is_contiguous() {
            bail!("fused linear kernels read the input in place and need it contiguous");
        }
        let cols = layout.dims().last().copied().unwrap_or(1);
        let rows = layout.shape().elem_count().checked_div(cols).unwrap_or(0);
        let data = storage.get(layout.start_offset()..).unwrap_or(&[]);
        Self::checked(data, rows, cols, cols, 1)
    }

    /// A matrix with any strides over `data`, checked to fit.
    pub(crate) fn strided(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        Self::checked(data, rows, cols, row_stride, col_stride)
    }

    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn checked(data: &'a [T], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<Self> {
        let last = (rows.saturating_sub(1)) * row_stride + (cols.saturating_sub(1)) * col_stride;
        if rows > 0 && cols > 0 && last >= data.len() {
            bail!("a {rows}x{cols} matrix with strides ({row_stride}, {col_stride}) does not fit its storage");
        }
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// Rows `start..start + count` of this matrix.
    pub(crate) fn rows_from(self, start: usize, count: usize) -> Result<Self> {
        if start + count > self.rows {
            bail!("rows {start}..{} of a matrix with {} rows", start + count, self.rows);
        }
        let data = self.data.get(start * self.row_stride..).unwrap_or(&[]);
        Self::checked(data, count, self.cols, self.row_stride, self.col_stride)
    }

    /// Columns `start..start + count` of this matrix.
    fn cols_from(self, start: usize, count: usize) -> Result<Self> {
        Ok(self.t().rows_from(start, count)?.t())
    }

    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    pub(crate) fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` when `accumulate`;
/// `dst` is row-major `[lhs.rows, rhs.cols]`.
///
/// A product with a result at least [`THIN_DIMENSION`] wide and tall is left
/// to `gemm`'s own threads. A thin one (the `r`-wide LoRA products, which
/// `gemm` runs slower on two threads than on one) is split into blocks of
/// result rows, one `gemm` call per thread; a short, wide one (decoding a
/// token: a few rows against a whole weight, which `gemm` runs on one
/// thread) into blocks of result columns, each thread reading its share of
/// the weight.
pub(crate) fn matmul_into<T: WithDType>(
    dst: &mut [T],
    lhs: Matrix<'_, T>,
    rhs: Matrix<'_, T>,
    scale: T,
    accumulate: bool,
) -> Result<()> {
    let (m, n) = (lhs.rows, rhs.cols);
    let threads = candle_core::utils::get_num_threads();
    if lhs.cols <= SHORT_DEPTH
        && n >= STRIP
        && m * n >= SHORT_DEPTH_MIN_RESULT
        && short_depth_into(dst, lhs, rhs, scale, accumulate)?
    {
        return Ok(());
    }
    if m.min(n) >= THIN_DIMENSION {
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        return gemm_into(dst, lhs, rhs, scale, accumulate, parallelism);
    }
    if threads > 1 && m < THIN_DIMENSION && n >= 2 * WIDE_BLOCK && dst.len() == m * n {
        return matmul_by_columns(dst, lhs, rhs, scale, accumulate, threads);
    }
    if threads <= 1 || m < 2 * THIN_DIMENSION || n == 0 || dst.len() != m * n {
        return gemm_into(dst, lhs, rhs, scale, accumulate, Parallelism::None);
    }
    let rows_per_task = m.div_ceil(threads);
    dst.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .try_for_each(|(task, dst)| {
            let lhs = lhs.rows_from(task * rows_per_task, dst.len() / n)?;
            gemm_into(dst, lhs, rhs, scale, accumulate, Parallelism::None)
        })
}

/// [`matmul_into`] for a short, wide result: `threads` blocks of columns,
/// each computed on its own thread into its own buffer, then written (or
/// added) into `dst`. The copy is `m · n` elements against the `k · n` of
/// the weight each product reads, so it costs little when `m` is small.
fn matmul_by_columns<T: WithDType>(
    dst: &mut [T],
    lhs: Matrix<'_, T>,
    rhs: Matrix<'_, T>,
    scale: T,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let (m, n) = (lhs.rows, rhs.cols);
    let cols_per_task = n.div_ceil(threads);
    let blocks = (0..n.div_ceil(cols_per_task))
        .into_par_iter()
        .map(|task| {
            let start = task * cols_per_task;
            let count = cols_per_task.min(n - start);
            let mut block = vec![T::zero(); m * count];
            gemm_into(
                &mut block,
                lhs,
                rhs.cols_from(start, count)?,
                scale,
                false,
                Parallelism::None,
            )?;
            Ok((start, count, block))
        })
        .collect::<Result<Vec<_>>>()?;
    for (start, count, block) in blocks {
        for (dst_row, block_row) in dst.chunks_exact_mut(n).zip(block.chunks_exact(count)) {
            let dst_block = &mut dst_row[start..start + count];
            if accumulate {
                dst_block.iter_mut().zip(block_row).for_each(|(d, b)| *d += *b);
            } else {
                dst_block.copy_from_slice(block_row);
            }
        }
    }
    Ok(())
}

/// [`matmul_into`] with `gemm`'s threads as given: `Parallelism::None` on
/// the calling thread only, for callers that split their work across
/// threads themselves.
pub(crate) fn gemm_into<T: WithDType>(
    dst: &mut [T],
    lhs: Matrix<'_, T>,
    rhs: Matrix<'_, T>,
    scale: T,
    accumulate: bool,
    threads: Parallelism,
) -> Result<()> {
    check_product(dst.len(), lhs, rhs)?;
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return Ok(());
    }
    if m * k * n >= FAER_MIN_PRODUCT && faer_into(dst, lhs, rhs, scale, accumulate, threads)? {
        return Ok(());
    }
    // SAFETY: `Matrix::checked` proved every `(i, j)` with `i < rows`,
    // `j < cols` in bounds of its slice, `dst` holds `m * n` elements written
    // row-major, and `dst` (a `&mut`) cannot alias the shared `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            threads,
        );
    }
    Ok(())
}

/// Refuses a product `lhs · rhs` whose depths differ or whose result does
/// not fill `dst_len` values.
fn check_product<T>(dst_len: usize, lhs: Matrix<'_, T>, rhs: Matrix<'_, T>) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst_len != m * n {
        bail!("fused matmul: [{m}, {k}] x [{}, {n}] into {dst_len} elements", rhs.rows);
    }
    Ok(())
}

/// A short result at least twice this wide is split by columns in [`matmul_into`].
const WIDE_BLOCK: usize = 128;

/// A result with fewer rows or columns than this is a thin product for [`matmul_into`].
const THIN_DIMENSION: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// The column-split product equals the plain one, writing and adding,
    /// with blocks that do not divide the width evenly.
    #[test]
    fn split_by_columns_equals_the_plain_product() -> Result<()> {
        let (m, k, n) = (3, 5, 301);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let (lhs, rhs) = (Matrix::row_major(&lhs, m, k), Matrix::row_major(&rhs, k, n));
        let start: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
        for accumulate in [false, true] {
            let mut expected = start.clone();
            gemm_into(&mut expected, lhs, rhs, 0.5, accumulate, Parallelism::None)?;
            for threads in [2, 3] {
                let mut split = start.clone();
                matmul_by_columns(&mut split, lhs, rhs, 0.5, accumulate, threads)?;
                for (s, e) in split.iter().zip(&expected) {
                    assert!(
                        (s - e).abs() < 1e-5,
                        "accumulate {accumulate}, {threads} threads: {s} vs {e}"
                    );
                }
            }
        }
        Ok(())
    }
}
