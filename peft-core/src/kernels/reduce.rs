//! Reductions that read a tensor once and allocate nothing of its size:
//! what a model-wide merge needs to know about a weight before it decides
//! whether the weight can be computed once.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The largest magnitude in `t` as f64; NaN if some value is NaN, ∞ if
/// some value is infinite. One pass over the storage on the CPU; candle's
/// ops elsewhere.
pub(crate) fn max_abs(t: &Tensor) -> Result<f64> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    let largest = if t.device().is_cpu() {
        t.contiguous()?.apply_op1_no_bwd(&MaxAbs)?
    } else {
        // Every value times 0 sums to NaN exactly when one is not finite.
        let any_nan = t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F64)?;
        (t.abs()?.max_all()?.to_dtype(DType::F64)? + any_nan)?
    };
    largest.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// The largest finite value of `dtype`.
pub(crate) fn dtype_max(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 65504.0,
        DType::BF16 => 3.389_531_389_251_535_5e38,
        DType::F32 => f64::from(f32::MAX),
        DType::F64 => f64::MAX,
        // Integer and 8-bit float weights are not merged into.
        _ => 0.0,
    }
}

/// The distance from 1 to the next value of `dtype` (1 for the dtypes
/// [`dtype_max`] gives 0).
pub(crate) fn dtype_epsilon(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        DType::F32 => f64::from(f32::EPSILON),
        DType::F64 => f64::EPSILON,
        _ => 1.0,
    }
}

/// Values per task when a reduction is split over the threads (memory
/// bandwidth grows with the threads reading).
const PARALLEL_CHUNK: usize = 1 << 16;

struct MaxAbs;

/// `max |v|` over `values` with NaN winning over every number.
pub(crate) fn max_abs_of(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |largest: f64, v| {
        let v = v.abs();
        if v.is_nan() || largest.is_nan() {
            f64::NAN
        } else {
            largest.max(v)
        }
    })
}

/// [`max_abs_of`] for f32, in lanes the compiler turns into vector
/// instructions: the merge check reads every adapted weight once.
fn max_abs_f32(values: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut largest = [0f32; LANES];
    // x · 0 is 0 for finite x and NaN for NaN and ±∞.
    let mut poison = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for lane in 0..LANES {
            let v = chunk[lane].abs();
            largest[lane] = if v > largest[lane] { v } else { largest[lane] };
            poison[lane] += chunk[lane] * 0.0;
        }
    }
    let lanes = largest.iter().chain(rest).map(|&v| f64::from(v));
    let poison: f64 = poison.iter().chain(rest).map(|&v| f64::from(v) * 0.0).sum();
    max_abs_of(lanes) + poison
}

impl CustomOp1 for MaxAbs {
    fn name(&self) -> &'static str {
        "max-abs"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("max-abs: a contiguous tensor expected");
        };
        let largest = match storage {
            CpuStorage::F32(v) => {
                let values = &v[start..end];
                if values.len() < 2 * PARALLEL_CHUNK {
                    max_abs_f32(values)
                } else {
                    values
                        .par_chunks(PARALLEL_CHUNK)
                        .map(max_abs_f32)
                        .reduce(|| 0.0, |a, b| max_abs_of([a, b].into_iter()))
                }
            }
            CpuStorage::F64(v) => max_abs_of(v[start..end].iter().copied()),
            CpuStorage::F16(v) => max_abs_of(v[start..end].iter().map(|&x| f64::from(x))),
            CpuStorage::BF16(v) => max_abs_of(v[start..end].iter().map(|&x| f64::from(x))),
            other => bail!("max-abs: {:?} is not a float dtype", other.dtype()),
        };
        Ok((CpuStorage::F64(vec![largest]), Shape::from(())))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn max_abs_finds_the_largest_magnitude_or_says_not_finite() -> Result<()> {
        let dev = Device::Cpu;
        // 37 values: two full lanes of 16 and a remainder; the largest in each part in turn.
        for at in [0, 20, 36] {
            let mut values: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
            values[at] = -7.5;
            let t = Tensor::from_vec(values.clone(), (37,), &dev)?;
            assert_eq!(max_abs(&t)?, 7.5);
            for dtype in [DType::F64, DType::F16, DType::BF16] {
                assert_eq!(max_abs(&t.to_dtype(dtype)?)?, 7.5, "{dtype:?}");
            }
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut spoiled = values.clone();
                spoiled[(at + 5) % 37] = bad;
                let t = Tensor::from_vec(spoiled, (37,), &dev)?;
                assert!(!max_abs(&t)?.is_finite(), "{bad} at {}", (at + 5) % 37);
                assert!(!max_abs(&t.to_dtype(DType::F64)?)?.is_finite());
            }
        }
        // A strided view reads its own values only.
        let t = Tensor::new(&[[1f32, -9.0], [2.0, 3.0]], &dev)?;
        assert_eq!(max_abs(&t.narrow(1, 0, 1)?)?, 2.0);
        assert_eq!(max_abs(&t.t()?)?, 9.0);
        assert_eq!(max_abs(&Tensor::zeros((0,), DType::F32, &dev)?)?, 0.0);
        Ok(())
    }
}
