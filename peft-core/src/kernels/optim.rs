//! Optimizer updates in one pass over each tensor.
//!
//! candle-nn's `AdamW` updates a variable with ten tensor ops, each a pass
//! over the whole tensor with its own allocation (and, for large tensors, a
//! wake-up of the thread pool). [`adamw_step`] reads the gradient and
//! updates the variable and both moments in place, in one pass, with the
//! same float operations in the same order, so the result is bit for bit
//! candle-nn's.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use peft_core::optim::{adamw_step, AdamWStep};
//!
//! # fn main() -> candle_core::Result<()> {
//! let theta = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &Device::Cpu)?)?;
//! let grad = Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?;
//! let (mut first, mut second) = (vec![0f32; 2], vec![0f32; 2]);
//! let step = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
//! assert!(adamw_step(&theta, &grad, &mut first, &mut second, &step)?);
//! // The first step moves every weight by the learning rate against its gradient's sign.
//! let moved: Vec<f32> = theta.as_tensor().to_vec1()?;
//! assert!((moved[0] - 0.9).abs() < 1e-6 && (moved[1] + 1.9).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, Var};
use rayon::prelude::*;

/// The scalars of one AdamW step: the hyper-parameters as PyTorch names
/// them and `step`, the 1-based number of this update (bias correction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// This update's number, from 1.
    pub step: usize,
}

/// Elements per task when a tensor is updated on several threads; below
/// two of these the update runs on the calling thread (waking the pool
/// costs more than the pass).
const CHUNK: usize = 1 << 15;

/// Updates `theta` and its moments `first` (m) and `second` (v) in place
/// from `grad`, as `candle_nn::AdamW` would (bit for bit: the same f32
/// operations in the same order).
///
/// Returns `Ok(false)`, changing nothing, when the kernel does not apply: a
/// variable that is not f32 on the CPU or not contiguous, or a gradient of
/// another dtype; the
/// caller then takes candle's ops. `first` and `second` must have one value
/// per element of `theta`.
pub fn adamw_step(theta: &Var, grad: &Tensor, first: &mut [f32], second: &mut [f32], step: &AdamWStep) -> Result<bool> {
    if !takes_fused_update(theta) || grad.dtype() != DType::F32 {
        return Ok(false);
    }
    let count = theta.elem_count();
    if grad.dims() != theta.dims() || first.len() != count || second.len() != count {
        candle_core::bail!(
            "adamw_step: the variable is {:?}, its gradient {:?}, its moments {} and {} values",
            theta.dims(),
            grad.dims(),
            first.len(),
            second.len()
        );
    }
    let grad = grad.contiguous()?;
    let op = AdamWOp {
        moments: RefCell::new((first, second)),
        scalars: Scalars::new(step),
    };
    theta.as_tensor().inplace_op2(&grad, &op)?;
    Ok(true)
}

/// Whether [`adamw_step`] updates `theta` (an f32, contiguous variable on
/// the CPU); other variables take candle's ops.
pub fn takes_fused_update(theta: &Var) -> bool {
    theta.device().is_cpu() && theta.dtype() == DType::F32 && theta.is_contiguous()
}

/// The step's constants in f32, as candle's affine ops convert them.
#[derive(Clone, Copy)]
struct Scalars {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

impl Scalars {
    /// The constants `candle_nn::AdamW::step` computes in f64 and its affine
    /// ops cast to f32.
    fn new(step: &AdamWStep) -> Self {
        let t = step.step as i32;
        Self {
            beta1: step.beta1 as f32,
            one_minus_beta1: (1.0 - step.beta1) as f32,
            beta2: step.beta2 as f32,
            one_minus_beta2: (1.0 - step.beta2) as f32,
            scale_m: (1.0 / (1.0 - step.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - step.beta2.powi(t))) as f32,
            decay: (1.0 - step.lr * step.weight_decay) as f32,
            eps: step.eps as f32,
            lr: step.lr as f32,
        }
    }

    /// One element, with candle's operations spelled out: `x * c` is its
    /// affine op `x * c + 0`, which differs from `x * c` only for -0.
    #[inline(always)]
    fn update(&self, theta: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        let next_m = (*m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let next_v = (*v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        let m_hat = next_m * self.scale_m + 0.0;
        let v_hat = next_v * self.scale_v + 0.0;
        let decayed = *theta * self.decay + 0.0;
        let adjusted = m_hat / (v_hat.sqrt() * 1.0 + self.eps);
        *theta = decayed - (adjusted * self.lr + 0.0);
        *m = next_m;
        *v = next_v;
    }

    fn update_all(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((theta, m), v), g) in theta.iter_mut().zip(m).zip(v).zip(g) {
            self.update(theta, m, v, *g);
        }
    }
}

struct AdamWOp<'a> {
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    scalars: Scalars,
}

impl candle_core::InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, grad: &CpuStorage, grad_l: &Layout) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (dst, grad) else {
            candle_core::bail!("adamw-step: f32 storage expected");
        };
        let (Some((t0, t1)), Some((g0, g1))) = (dst_l.contiguous_offsets(), grad_l.contiguous_offsets()) else {
            candle_core::bail!("adamw-step: contiguous variable and gradient expected");
        };
        let (theta, grad) = (&mut theta[t0..t1], &grad[g0..g1]);
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        let scalars = self.scalars;
        if theta.len() < 2 * CHUNK {
            scalars.update_all(theta, m, v, grad);
        } else {
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(((theta, m), v), g)| scalars.update_all(theta, m, v, g));
        }
        Ok(())
    }
}
