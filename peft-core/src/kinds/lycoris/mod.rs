//! The LyCORIS family (PEFT's `LycorisLayer` / `LycorisConfig`): LoHa and
//! LoKr, and what they share: rank settings read as `r` / `alpha`, the two
//! training-time dropouts, PyTorch's Kaiming-uniform initialisation and the
//! config fields both save. LoHa and LoKr never import each other.

pub(crate) mod loha;
pub(crate) mod lokr;

pub use loha::{LohaAdapter, LohaConfig};
pub use lokr::{factorization, LokrAdapter, LokrConfig, LokrFactor, LokrInit, LokrShapes};

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::{default_alpha, default_rank, invalid_config, RankSettings, WithRank};
use crate::kinds::config_file::{float, ordered_map, saved_fields, PeftMetadata};
use crate::targets::Targets;

/// A fresh tensor with PyTorch's `kaiming_uniform_(a = √5)`: U(±1/√fan_in),
/// `fan_in` being the second dimension.
pub(crate) fn kaiming_uniform(shape: (usize, usize), dtype: DType, device: &Device) -> CandleResult<Var> {
    let bound = 1.0 / (shape.1 as f64).sqrt();
    crate::kernels::random::uniform_var(-bound, bound, shape, dtype, device)
}

/// PEFT's two training-time dropouts of a LyCORIS adapter: `module`
/// skips the whole adapter for a forward pass, `rank` zeroes output rows of
/// `ΔW`, divided by the mask's mean when `rescale`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Dropouts {
    pub(crate) rank: f32,
    pub(crate) module: f32,
    pub(crate) rescale: bool,
}

impl Dropouts {
    /// `base_output + x · ΔWᵀ`, with the dropouts applied when `training`;
    /// `delta` makes `ΔW` `[out, in]` in the input's dtype.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        base_output: Tensor,
        training: bool,
        delta: impl FnOnce(DType) -> CandleResult<Tensor>,
    ) -> Result<Tensor> {
        if training && module_dropped(self.module)? {
            return Ok(base_output);
        }
        let mut delta = delta(x.dtype())?;
        if training && self.rank > 0.0 {
            delta = delta.broadcast_mul(&rank_dropout_mask(&delta, self.rank, self.rescale)?)?;
        }
        // x · ΔWᵀ for any number of leading dimensions of x.
        let change = candle_nn::Linear::new(delta, None).forward(x)?;
        Ok((base_output + change)?)
    }
}

/// Whether a training forward pass skips the adapter: PEFT applies it when
/// `torch.rand(1) > module_dropout`.
fn module_dropped(module_dropout: f32) -> CandleResult<bool> {
    if module_dropout <= 0.0 {
        return Ok(false);
    }
    let draw = crate::kernels::random::uniform(0.0, 1.0, 1, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?[0];
    Ok(draw <= module_dropout)
}

/// PEFT's rank dropout: a column `[out, 1]` of ones and zeros (each zero with
/// probability `p`), divided by its mean when `rescale`. When every row is
/// dropped the mask is all zeros (PEFT would divide by zero and give NaN).
fn rank_dropout_mask(delta: &Tensor, p: f32, rescale: bool) -> CandleResult<Tensor> {
    let out = delta.dims()[0];
    let keep = crate::kernels::random::uniform(0.0, 1.0, (out, 1), DType::F32, delta.device())?
        .gt(f64::from(p))?
        .to_dtype(DType::F32)?;
    let mask = if rescale {
        // mean(mask) is 0 or at least 1/out: the floor only matters when it is 0.
        let mean = keep.mean_all()?.maximum(0.5 / out as f64)?;
        keep.broadcast_div(&mean)?
    } else {
        keep
    };
    mask.to_dtype(delta.dtype())
}

/// The options LoHa and LoKr configs share besides their targets, with
/// PEFT's names and defaults (PEFT's `LycorisConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisOptions {
    /// `r` and `alpha` (default 8 and 8) and their per-module patterns.
    pub ranks: RankSettings,
    /// Probability of zeroing each output row of `ΔW` during training (default 0).
    pub rank_dropout: f32,
    /// Probability of skipping the adapter for a forward pass during training (default 0).
    pub module_dropout: f32,
    /// PEFT's `use_effective_conv2d`: only changes convolution layers, so it
    /// has no effect on linear layers; kept for the saved config.
    pub use_effective_conv2d: bool,
}

impl Default for LycorisOptions {
    fn default() -> Self {
        Self {
            ranks: RankSettings::default(),
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
        }
    }
}

impl LycorisOptions {
    /// Ranks at least 1, alphas finite and positive, `rank_dropout` in
    /// [0, 1), `module_dropout` in [0, 1], patterns that compile.
    pub(crate) fn validate(&self) -> Result<()> {
        self.ranks.validate("alpha")?;
        if !(0.0..1.0).contains(&self.rank_dropout) {
            return Err(invalid_config("rank_dropout", self.rank_dropout, "must lie in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.module_dropout) {
            return Err(invalid_config(
                "module_dropout",
                self.module_dropout,
                "must lie in [0, 1]",
            ));
        }
        Ok(())
    }

    /// The `adapter_config.json` fields LoHa and LoKr share, as PEFT writes
    /// them (without `target_modules`, which saving fills in).
    pub(crate) fn saved_fields(
        &self,
        peft_type: &str,
        targets: &Targets,
        metadata: &PeftMetadata,
    ) -> serde_json::Map<String, Value> {
        let mut fields = saved_fields(peft_type, targets, metadata);
        fields.extend(self.ranks.peft_fields("alpha"));
        let more = [
            ("rank_dropout", float(f64::from(self.rank_dropout))),
            ("module_dropout", float(f64::from(self.module_dropout))),
            ("use_effective_conv2d", Value::Bool(self.use_effective_conv2d)),
        ];
        fields.extend(more.into_iter().map(|(k, v)| (k.to_owned(), v)));
        fields
    }
}

/// Builder methods for the [`LycorisOptions`] of LoHa and LoKr configs.
pub trait WithLycoris: WithRank {
    /// The config's LyCORIS options, mutably.
    fn lycoris_mut(&mut self) -> &mut LycorisOptions;

    /// Sets `rank_dropout`.
    fn rank_dropout(mut self, p: f32) -> Self {
        self.lycoris_mut().rank_dropout = p;
        self
    }

    /// Sets `module_dropout`.
    fn module_dropout(mut self, p: f32) -> Self {
        self.lycoris_mut().module_dropout = p;
        self
    }

    /// Sets `use_effective_conv2d` (no effect on linear layers).
    fn use_effective_conv2d(mut self, on: bool) -> Self {
        self.lycoris_mut().use_effective_conv2d = on;
        self
    }
}

/// Implements [`WithRank`] and [`WithLycoris`] for a config with a
/// `lycoris: LycorisOptions` field.
macro_rules! impl_lycoris_builders {
    ($config:ty) => {
        impl $crate::kinds::config::WithRank for $config {
            fn ranks(&self) -> &$crate::kinds::config::RankSettings {
                &self.lycoris.ranks
            }
            fn ranks_mut(&mut self) -> &mut $crate::kinds::config::RankSettings {
                &mut self.lycoris.ranks
            }
        }

        impl $crate::kinds::lycoris::WithLycoris for $config {
            fn lycoris_mut(&mut self) -> &mut $crate::kinds::lycoris::LycorisOptions {
                &mut self.lycoris
            }
        }
    };
}
pub(crate) use impl_lycoris_builders;

/// The `adapter_config.json` fields LoHa and LoKr share (besides the targets).
#[derive(Deserialize)]
pub struct LycorisFileFields {
    #[serde(default = "default_rank")]
    r: usize,
    #[serde(default = "default_alpha")]
    alpha: f64,
    #[serde(default, deserialize_with = "ordered_map")]
    rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered_map")]
    alpha_pattern: Vec<(String, f64)>,
    #[serde(default)]
    rank_dropout: f32,
    #[serde(default)]
    module_dropout: f32,
    /// Only changes convolution layers in PEFT: no effect on linear layers.
    #[serde(default)]
    use_effective_conv2d: bool,
}

impl LycorisFileFields {
    /// The options these fields set.
    pub(crate) fn options(self) -> LycorisOptions {
        LycorisOptions {
            ranks: RankSettings {
                r: self.r,
                alpha: self.alpha,
                rank_pattern: self.rank_pattern,
                alpha_pattern: self.alpha_pattern,
            },
            rank_dropout: self.rank_dropout,
            module_dropout: self.module_dropout,
            use_effective_conv2d: self.use_effective_conv2d,
        }
    }
}

pub(crate) fn default_true() -> bool {
    true
}
