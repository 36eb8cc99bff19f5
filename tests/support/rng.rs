//! Deterministic random numbers for the tests: a small generator (so every
//! run draws the same values; candle's CPU random numbers cannot be seeded)
//! and a relative error measure.

use candle_core::{DType, Device, Tensor, Var};

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

    /// N(0, 1), by Box–Muller.
    pub fn normal(&mut self) -> f64 {
        // u1 in (0, 1], so ln(u1) is finite.
        let u1 = 1.0 - (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// N(0, std²) f32 values: what `Tensor::randn(0f32, std, dims, &Device::Cpu)`
    /// draws, the same on every run.
    pub fn randn(&mut self, dims: &[usize], std: f64) -> Tensor {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|_| (self.normal() * std) as f32).collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    /// Overwrites `var` (f32) with N(0, std²) values.
    pub fn fill_randn(&mut self, var: &Var, std: f64) {
        var.set(&self.randn(var.dims(), std)).unwrap();
    }

    /// Overwrites `var` (f32, `[out, in]`) with U(±1/√in) values: what
    /// PyTorch's `kaiming_uniform_(a = √5)` and `LoraInit::Random` draw.
    pub fn fill_fan_in_uniform(&mut self, var: &Var) {
        let bound = 1.0 / (var.dims()[1] as f64).sqrt();
        var.set(&self.tensor(var.dims(), DType::F32).affine(bound, 0.0).unwrap())
            .unwrap();
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

/// The gradients of `sum(y · probe)` and `sum(y_ref · probe)` for one random
/// probe (f32, and as `y_ref`'s dtype): every input's gradient of a kernel and
/// of its reference, weighted alike.
pub fn probed_gradients(
    y: &Tensor,
    y_ref: &Tensor,
    rng: &mut Rng,
) -> (candle_core::backprop::GradStore, candle_core::backprop::GradStore) {
    let probe = rng.tensor(y.dims(), DType::F32);
    let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let probe_ref = probe.to_dtype(y_ref.dtype()).unwrap();
    let grads_ref = (y_ref * &probe_ref).unwrap().sum_all().unwrap().backward().unwrap();
    (grads, grads_ref)
}
