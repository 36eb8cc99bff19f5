//! Seedable random numbers for adapter initialisation and dropout.
//!
//! candle's CPU backend cannot be seeded (`Device::set_seed` fails on the
//! CPU), so a fresh adapter's weights and every dropout mask would differ
//! from run to run, and a training run could not be repeated or resumed
//! exactly. Inside [`with_seed`] they come from a seeded generator instead
//! (drawn on the CPU, then moved to the tensor's device), as after
//! `torch.manual_seed` in PyTorch; outside it, from candle as before.
//!
//! ```
//! use candle_core::{DType, Device};
//! use peft_core::prelude::*;
//! use peft_core::random::with_seed;
//!
//! let fresh = || -> peft_core::Result<Vec<f32>> {
//!     let mut layer = Linear::new(candle_core::Tensor::ones((4, 8), DType::F32, &Device::Cpu)?, None);
//!     layer.apply_lora(LoraConfig::from(all_linear()).rank(2))?;
//!     let vars = layer.trainable_vars();
//!     let (_, a) = vars.iter().find(|(name, _)| name.contains("lora_A")).unwrap();
//!     Ok(a.as_tensor().flatten_all()?.to_vec1()?)
//! };
//! // The same seed gives the same lora_A, a different one another.
//! assert_eq!(with_seed(7, fresh)?, with_seed(7, fresh)?);
//! assert_ne!(with_seed(7, fresh)?, with_seed(8, fresh)?);
//! # Ok::<(), peft_core::PeftError>(())
//! ```

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StandardUniform};

thread_local! {
    /// The generator of the innermost `with_seed` on this thread.
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's adapter initialisations and dropout masks
/// drawn from a generator seeded with `seed`. Calls nest: the outer
/// generator is back in place when `f` returns or panics.
pub fn with_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    /// Puts the outer generator back, also when `f` unwinds.
    struct Restore(Option<StdRng>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            SEEDED.with(|cell| *cell.borrow_mut() = outer);
        }
    }
    let outer = SEEDED.with(|cell| cell.borrow_mut().replace(StdRng::seed_from_u64(seed)));
    let _restore = Restore(outer);
    f()
}

/// `count` draws from `draw` with the seeded generator, or `None` outside
/// [`with_seed`].
fn seeded_draws(count: usize, mut draw: impl FnMut(&mut StdRng) -> f32) -> Option<Vec<f32>> {
    SEEDED.with(|cell| {
        cell.borrow_mut()
            .as_mut()
            .map(|rng| (0..count).map(|_| draw(rng)).collect())
    })
}

fn tensor_from(values: Vec<f32>, shape: Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// A tensor of U(`lo`, `hi`) draws.
pub fn uniform(lo: f64, hi: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    match seeded_draws(shape.elem_count(), |rng| rng.random_range(lo..hi) as f32) {
        Some(values) => tensor_from(values, shape, dtype, device),
        None => Ok(Var::rand_f64(lo, hi, shape, dtype, device)?.as_tensor().detach()),
    }
}

/// A tensor of N(`mean`, `std`²) draws.
pub fn normal(mean: f64, std: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let distribution = Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(format!("N({mean}, {std}): {e}")))?;
    match seeded_draws(shape.elem_count(), |rng| distribution.sample(rng) as f32) {
        Some(values) => tensor_from(values, shape, dtype, device),
        None => Ok(Var::randn_f64(mean, std, shape, dtype, device)?.as_tensor().detach()),
    }
}

/// A trainable [`uniform`] tensor.
pub(crate) fn uniform_var(lo: f64, hi: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Var> {
    Var::from_tensor(&uniform(lo, hi, shape, dtype, device)?)
}

/// A trainable [`normal`] tensor.
pub(crate) fn normal_var(mean: f64, std: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Var> {
    Var::from_tensor(&normal(mean, std, shape, dtype, device)?)
}

/// Inverted dropout, as `candle_nn::ops::dropout` (each element zeroed with
/// probability `p`, the others divided by `1 - p`), its mask from the
/// seeded generator inside [`with_seed`].
pub fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    let Some(draws) = seeded_draws(x.elem_count(), |rng| rng.sample(StandardUniform)) else {
        return candle_nn::ops::dropout(x, p);
    };
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is not in [0, 1)");
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = draws.into_iter().map(|u| if u >= p { scale } else { 0.0 }).collect();
    x * tensor_from(mask, x.shape().clone(), x.dtype(), x.device())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_dropout_repeats_and_scales_what_it_keeps() -> Result<()> {
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu)?;
        let first = with_seed(3, || dropout(&x, 0.25))?;
        let again = with_seed(3, || dropout(&x, 0.25))?;
        let other = with_seed(4, || dropout(&x, 0.25))?;
        let values: Vec<f32> = first.flatten_all()?.to_vec1()?;
        assert_eq!(values, again.flatten_all()?.to_vec1::<f32>()?);
        assert_ne!(values, other.flatten_all()?.to_vec1::<f32>()?);
        assert!(values.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "dropped {dropped}");
        Ok(())
    }

    #[test]
    fn the_outer_seed_is_back_after_a_nested_one() -> Result<()> {
        let draw = || uniform(0.0, 1.0, 4, DType::F32, &Device::Cpu)?.to_vec1::<f32>();
        let straight = with_seed(1, || -> Result<_> { Ok((draw()?, draw()?)) })?;
        let nested = with_seed(1, || -> Result<_> {
            let first = draw()?;
            with_seed(2, draw)?;
            Ok((first, draw()?))
        })?;
        assert_eq!(straight, nested);
        assert!(SEEDED.with(|cell| cell.borrow().is_none()));
        Ok(())
    }
}
