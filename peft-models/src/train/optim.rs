//! AdamW with a state that can be saved and restored (candle-nn's keeps
//! its moments private), the learning-rate schedules, and gradient
//! clipping by global norm.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use peft_core::optim::{adamw_step, takes_fused_update, AdamWStep};
use serde::{Deserialize, Serialize};

/// AdamW's hyper-parameters (PyTorch's names and defaults but the weight
/// decay, which is transformers' `Trainer` default of 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables, computed as `candle_nn::AdamW` computes it
/// (the same operations in the same order, so the same bits; tested), with
/// its moments readable for a checkpoint.
///
/// f32 variables on the CPU take the fused update of
/// [`peft_core::optim::adamw_step`] (one pass over each tensor, moments kept
/// as plain vectors); other devices and dtypes take candle's tensor ops.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    moments: Vec<Moments>,
    step: usize,
    params: AdamWParams,
}

/// One variable's first and second moments.
enum Moments {
    /// For the fused CPU update: updated in place.
    Fused { first: Vec<f32>, second: Vec<f32> },
    /// For candle's ops: replaced each step.
    Tensors { first: Tensor, second: Tensor },
}

impl Moments {
    /// Zero moments for `var`, in the form its update takes.
    fn zeros(var: &Var) -> Result<Self> {
        Self::from_tensors(var, var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?)
    }

    /// Moments holding `first` and `second` (in `var`'s shape, dtype and device).
    fn from_tensors(var: &Var, first: Tensor, second: Tensor) -> Result<Self> {
        if takes_fused_update(var) {
            let values = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
            Ok(Moments::Fused {
                first: values(first)?,
                second: values(second)?,
            })
        } else {
            Ok(Moments::Tensors { first, second })
        }
    }

    /// The moments as tensors in `var`'s shape.
    fn to_tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        match self {
            Moments::Fused { first, second } => {
                let tensor = |values: &[f32]| Tensor::from_slice(values, var.dims(), var.device());
                Ok((tensor(first)?, tensor(second)?))
            }
            Moments::Tensors { first, second } => Ok((first.clone(), second.clone())),
        }
    }
}

impl AdamW {
    /// Zero moments for every variable.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let moments = vars.iter().map(|(_, var)| Moments::zeros(var)).collect::<Result<_>>()?;
        Ok(Self {
            vars,
            moments,
            step: 0,
            params,
        })
    }

    /// Sets the learning rate of the next steps (the schedule's).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update from `grads`; variables without a gradient keep their
    /// value and moments.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let fused = AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: self.step,
        };
        let lr_lambda = lr * weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step as i32));
        for ((_, var), moments) in self.vars.iter().zip(&mut self.moments) {
            let theta = var.as_tensor();
            let Some(g) = grads.get(theta) else { continue };
            match moments {
                Moments::Fused { first, second } => {
                    if !adamw_step(var, g, first, second, &fused)? {
                        candle_core::bail!("AdamW: the gradient of a {:?} variable is {:?}", var.dtype(), g.dtype());
                    }
                }
                Moments::Tensors { first, second } => {
                    let next_m = ((&*first * beta1)? + (g * (1.0 - beta1))?)?;
                    let next_v = ((&*second * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&next_m * scale_m)?;
                    let v_hat = (&next_v * scale_v)?;
                    let next_theta = (theta * (1f64 - lr_lambda))?;
                    let adjusted_grad = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    let next_theta = (next_theta - (adjusted_grad * lr)?)?;
                    *first = next_m;
                    *second = next_v;
                    var.set(&next_theta)?;
                }
            }
        }
        Ok(())
    }

    /// The moments by `<var name>.exp_avg` / `.exp_avg_sq` (PyTorch's
    /// names), for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for ((name, var), moments) in self.vars.iter().zip(&self.moments) {
            let (first, second) = moments.to_tensors(var)?;
            tensors.insert(format!("{name}.exp_avg"), first);
            tensors.insert(format!("{name}.exp_avg_sq"), second);
        }
        Ok(tensors)
    }

    /// Restores the moments [`state_tensors`](Self::state_tensors) gave and
    /// the step count. Every variable's moments must be there, in its shape.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, steps: usize) -> std::result::Result<(), String> {
        let mut moments = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            let mut pair = Vec::with_capacity(2);
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{name}.{suffix}");
                let tensor = tensors.get(&key).ok_or_else(|| format!("no tensor `{key}`"))?;
                if tensor.dims() != var.dims() {
                    return Err(format!("`{key}` is {:?}, the variable {:?}", tensor.dims(), var.dims()));
                }
                let tensor = tensor
                    .to_dtype(var.dtype())
                    .and_then(|t| t.to_device(var.device()))
                    .map_err(|e| format!("`{key}`: {e}"))?;
                pair.push(tensor);
            }
            let second = pair.pop().expect("two moments");
            let first = pair.pop().expect("two moments");
            moments.push(Moments::from_tensors(var, first, second).map_err(|e| format!("`{name}`: {e}"))?);
        }
        self.moments = moments;
        self.step = steps;
        Ok(())
    }
}

/// How the learning rate moves over the run (transformers' schedules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The peak rate after warm-up.
    #[default]
    Constant,
    /// Down to 0 at the last step.
    Linear,
    /// Half a cosine down to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// The rate of optimizer step `step` (0-based) of `total`, after
    /// `warmup` steps rising linearly from 0, as transformers'
    /// `get_{constant,linear,cosine}_schedule_with_warmup`.
    pub fn learning_rate(self, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        peak * match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// The global L2 norm of the gradients of `vars`; when it is above
/// `max_norm`, every gradient is scaled by `max_norm / (norm + 1e-6)`, as
/// PyTorch's `clip_grad_norm_`. Returns the norm before clipping.
pub fn clip_grad_norm(vars: &[(String, Var)], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    // Summed here in f64 rather than by tensor ops: one read of each
    // gradient instead of four small ops (and thread wake-ups) per tensor.
    let mut sum = 0f64;
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let values = g.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            sum += values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        }
    }
    let norm = sum.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for (_, var) in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::Optimizer;

    use super::*;

    #[test]
    fn adamw_takes_candles_steps_bit_for_bit() -> Result<()> {
        // The fused update, on one thread and split over the pool; candle's ops for f64.
        takes_candles_steps((5, 7), DType::F32)?;
        takes_candles_steps((300, 257), DType::F32)?;
        takes_candles_steps((5, 7), DType::F64)
    }

    fn takes_candles_steps(shape: (usize, usize), dtype: DType) -> Result<()> {
        let device = Device::Cpu;
        let start = Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?;
        let ours = Var::from_tensor(&start)?;
        let theirs = Var::from_tensor(&start)?;
        let params = AdamWParams {
            lr: 0.01,
            weight_decay: 0.1,
            ..AdamWParams::default()
        };
        let mut adamw = AdamW::new(vec![("w".to_owned(), ours.clone())], params)?;
        let mut candle = candle_nn::AdamW::new(
            vec![theirs.clone()],
            candle_nn::ParamsAdamW {
                lr: params.lr,
                beta1: params.beta1,
                beta2: params.beta2,
                eps: params.eps,
                weight_decay: params.weight_decay,
            },
        )?;
        for step in 0..5 {
            let target = Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?;
            let lr = 0.01 / (step + 1) as f64;
            adamw.set_learning_rate(lr);
            candle.set_learning_rate(lr);
            adamw.step(&(ours.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?)?;
            candle.step(&(theirs.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?)?;
            let bits = |var: &Var| -> Result<Vec<u64>> {
                let values = var.as_tensor().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                Ok(values.into_iter().map(f64::to_bits).collect())
            };
            assert_eq!(bits(&ours)?, bits(&theirs)?, "step {step}, {shape:?} {dtype:?}");
        }
        // Saved and restored, it goes on as if never stopped.
        let copy = Var::from_tensor(ours.as_tensor())?;
        let mut resumed = AdamW::new(vec![("w".to_owned(), copy.clone())], params)?;
        resumed
            .restore(&adamw.state_tensors()?, adamw.steps())
            .map_err(candle_core::Error::Msg)?;
        let target = Tensor::ones(shape, dtype, &device)?;
        adamw.step(&(ours.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?)?;
        resumed.step(&(copy.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?)?;
        let values = |var: &Var| var.as_tensor().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
        assert_eq!(values(&ours)?, values(&copy)?);
        Ok(())
    }

    #[test]
    fn schedules_warm_up_then_decay_as_transformers() {
        let lr = |s: Schedule, step| s.learning_rate(1.0, step, 10, 110);
        assert_eq!(lr(Schedule::Constant, 0), 0.0);
        assert_eq!(lr(Schedule::Constant, 5), 0.5);
        assert_eq!(lr(Schedule::Constant, 60), 1.0);
        assert_eq!(lr(Schedule::Linear, 10), 1.0);
        assert_eq!(lr(Schedule::Linear, 60), 0.5);
        assert!((lr(Schedule::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 110).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_limit() -> Result<()> {
        let device = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[3f32], &device)?)?;
        let b = Var::from_tensor(&Tensor::new(&[4f32], &device)?)?;
        // d/dx of x²/2 is x: gradients (3, 4), norm 5.
        let loss = ((a.as_tensor().sqr()? + b.as_tensor().sqr()?)? * 0.5)?.sum_all()?;
        let mut grads = loss.backward()?;
        let vars = vec![("a".to_owned(), a.clone()), ("b".to_owned(), b.clone())];
        assert!((clip_grad_norm(&vars, &mut grads, 1.0)? - 5.0).abs() < 1e-6);
        let clipped = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?[0];
        assert!((clipped - 0.6).abs() < 1e-5, "{clipped}");
        Ok(())
    }
}
