//! Random cases for the kernel tests: a small deterministic generator (so
//! every run tries the same cases) and a relative error measure.

use candle_core::{DType, Device, Tensor};

/// xorshift64*: enough randomness for shapes and values, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// In `[-1, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// Uniform values in `[-1, 1)`, rounded to `dtype`.
    pub fn tensor(&mut self, dims: &[usize], dtype: DType) -> Tensor {
        let n: usize = dims.iter().product();
        let values: Vec<f64> = (0..n).map(|_| self.uniform()).collect();
        Tensor::from_vec(values, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

/// Largest absolute difference, relative to the reference's largest
/// magnitude (or to 1 when that is smaller).
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims());
    let actual = actual.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let expected = expected.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    if expected.elem_count() == 0 {
        return 0.0;
    }
    let diff = (&actual - &expected).unwrap().abs().unwrap().max(0).unwrap();
    let scale = expected.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.max(1.0)
}
