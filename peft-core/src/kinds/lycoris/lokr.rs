//! LoKr (`peft_type: "LOKR"`): a weight update that is the Kronecker product
//! of two small matrices, as PEFT's `lokr.Linear`.
//!
//! The maths, PEFT's keys and an example are on [`LokrAdapter`].

use candle_core::{DType, Device, Result as CandleResult, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::{
    config_basics, config_identity, invalid_config, require_linear, setters, AdapterConfig, WithRank,
};
use crate::kinds::config_file::{unsupported, KindFields, LayerChecks, PeftMetadata};
use crate::kinds::lycoris::{impl_lycoris_builders, kaiming_uniform, Dropouts, LycorisFileFields, LycorisOptions};
use crate::kinds::registry::kind;
use crate::layer::{adapter_identity, Adapter, Composition, ForwardContext, Layer, LayerWeights};
use crate::targets::Targets;

/// PEFT's `peft_type` for LoKr.
pub const PEFT_TYPE: &str = "LOKR";

/// How LoKr's factors start (PEFT's `init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LokrInit {
    /// PEFT's `True`: `w1` (or `w1_a`) zeros, the other factors
    /// Kaiming-uniform (U(±1/√fan_in)), so a fresh adapter changes nothing.
    #[default]
    Default,
    /// PEFT's `"lycoris"`: as the LyCORIS repository, `w2` (or `w2_b`) zeros,
    /// the other factors Kaiming-uniform.
    Lycoris,
    /// PEFT's `False`: every factor Kaiming-uniform, so a fresh adapter
    /// changes the output. For tests only.
    Random,
}

/// LoKr's hyper-parameters and targets, with PEFT's field names and defaults
/// (`LoKrConfig`).
///
/// ```
/// use peft_core::prelude::*;
/// use peft_core::LokrConfig;
/// let config = LokrConfig::from(all_linear()).rank(2).alpha(4.0).decompose_both(true);
/// // A [20, 12] layer: out = 4 · 5, in = 3 · 4; w1 [4, 3], w2 [5, 4].
/// let shape = config.factor_shapes(2, 12, 20);
/// assert_eq!((shape.w1, shape.w2), ((4, 3), (5, 4)));
/// // r = 2 < max(5, 4) / 2: w2 is stored as [5, 2] · [2, 4]; w1 stays whole.
/// assert_eq!((shape.w1_low_rank, shape.w2_low_rank), (false, true));
/// ```
#[derive(Debug, Clone)]
pub struct LokrConfig {
    /// Which layers to adapt (PEFT's `target_modules`, `exclude_modules`,
    /// `layers_to_transform`, `layers_pattern`). Default: [`all_linear()`](crate::all_linear).
    pub target_modules: Targets,
    /// `r` (of the low-rank factors), `alpha` (the update is scaled by
    /// `alpha / r`, whether or not a factor is low-rank), their patterns and
    /// the dropouts; set them with [`WithRank`] and
    /// [`WithLycoris`](crate::WithLycoris).
    pub lycoris: LycorisOptions,
    /// Divide the rank-dropout mask by its mean (default false).
    pub rank_dropout_scale: bool,
    /// Also store `w1` as a rank-`r` product when it is large enough (default false).
    pub decompose_both: bool,
    /// The first factor of each dimension when it divides it; `-1` (the
    /// default) factors near the square root. See [`factorization`].
    pub decompose_factor: i64,
    /// How the factors start.
    pub init_weights: LokrInit,
    /// PEFT's descriptive fields (`task_type`, `base_model_name_or_path`,
    /// `revision`), saved as given; set them with [`WithMetadata`](crate::WithMetadata).
    pub metadata: PeftMetadata,
}

impl From<Targets> for LokrConfig {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            lycoris: LycorisOptions::default(),
            rank_dropout_scale: false,
            decompose_both: false,
            decompose_factor: -1,
            init_weights: LokrInit::Default,
            metadata: PeftMetadata::default(),
        }
    }
}

/// How LoKr splits a `[out, in]` layer (see [`LokrConfig::factor_shapes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LokrShapes {
    /// `w1`: `[out_l, in_m]`.
    pub w1: (usize, usize),
    /// `w2`: `[out_k, in_n]`.
    pub w2: (usize, usize),
    /// `w1` is stored as `lokr_w1_a` `[out_l, r]` · `lokr_w1_b` `[r, in_m]`.
    pub w1_low_rank: bool,
    /// `w2` is stored as `lokr_w2_a` `[out_k, r]` · `lokr_w2_b` `[r, in_n]`.
    pub w2_low_rank: bool,
}

impl LokrConfig {
    setters! {
        /// Sets `rank_dropout_scale`.
        rank_dropout_scale => rank_dropout_scale: bool,
        /// Sets `decompose_both`.
        decompose_both => decompose_both: bool,
        /// Sets `decompose_factor` (`-1` or a positive integer).
        decompose_factor => decompose_factor: i64,
        /// Sets `init_weights`.
        init => init_weights: LokrInit,
    }
    /// The factor shapes PEFT uses for a linear layer with rank `r`,
    /// `in_features` and `out_features` (`LoKrLayer.update_layer`).
    pub fn factor_shapes(&self, r: usize, in_features: usize, out_features: usize) -> LokrShapes {
        let (in_m, in_n) = factorization(in_features, self.decompose_factor);
        let (out_l, out_k) = factorization(out_features, self.decompose_factor);
        // PEFT: r < max(..) / 2 in floating point, i.e. 2r < max(..).
        LokrShapes {
            w1: (out_l, in_m),
            w2: (out_k, in_n),
            w1_low_rank: self.decompose_both && 2 * r < out_l.max(in_m),
            w2_low_rank: 2 * r < out_k.max(in_n),
        }
    }
}

/// PEFT's (and LyCORIS's) `factorization(dimension, factor)`: two numbers
/// whose product is `dimension`.
///
/// When `factor > 0` divides `dimension` the result is
/// `(factor, dimension / factor)`, in that order. Otherwise (`-1`: no limit)
/// divisors are tried upwards from 1, keeping the pair while the smaller one
/// stays at most `factor`, and the result is `(smaller, larger)`: near the
/// square root when there is no limit.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let limit = if factor == -1 { dimension as i64 } else { factor };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i64 > limit {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

impl_lycoris_builders!(LokrConfig);

config_basics!(LokrConfig);
kind!(LokrConfig, PEFT_TYPE, LokrFields);

impl AdapterConfig for LokrConfig {
    config_identity!(PEFT_TYPE);

    fn validate(&self) -> Result<()> {
        self.lycoris.validate()?;
        if self.decompose_factor != -1 && self.decompose_factor < 1 {
            return Err(invalid_config(
                "decompose_factor",
                self.decompose_factor,
                "must be -1 (factor near the square root) or a positive integer",
            ));
        }
        self.target_modules.validate()
    }

    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        require_linear(PEFT_TYPE, module, layer)?;
        let (r, alpha) = self.rank_and_alpha(module)?;
        let shapes = self.factor_shapes(r, layer.in_features(), layer.out_features());
        let (dtype, device) = (layer.dtype(), &layer.device());
        let (zero_w1, zero_w2) = match self.init_weights {
            LokrInit::Default => (true, false),
            LokrInit::Lycoris => (false, true),
            LokrInit::Random => (false, false),
        };
        let w1 = new_factor(shapes.w1, shapes.w1_low_rank, r, zero_w1, FactorSide::W1, dtype, device)?;
        let w2 = new_factor(shapes.w2, shapes.w2_low_rank, r, zero_w2, FactorSide::W2, dtype, device)?;
        let adapter = LokrAdapter::new(w1, w2, alpha / r as f64)?.with_dropout(
            self.lycoris.rank_dropout,
            self.lycoris.module_dropout,
            self.rank_dropout_scale,
        );
        Ok(Box::new(adapter))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let mut fields = self
            .lycoris
            .saved_fields(PEFT_TYPE, &self.target_modules, &self.metadata);
        let init = match self.init_weights {
            LokrInit::Default => Value::Bool(true),
            LokrInit::Random => Value::Bool(false),
            LokrInit::Lycoris => Value::from("lycoris"),
        };
        let more = [
            ("init_weights", init),
            ("rank_dropout_scale", Value::Bool(self.rank_dropout_scale)),
            ("decompose_both", Value::Bool(self.decompose_both)),
            ("decompose_factor", Value::from(self.decompose_factor)),
        ];
        fields.extend(more.into_iter().map(|(k, v)| (k.to_owned(), v)));
        fields
    }
}

#[derive(Clone, Copy)]
enum FactorSide {
    W1,
    W2,
}

/// A fresh factor as PEFT initialises it. `zero` is the factor PEFT zeroes:
/// for `w1` the whole matrix or `w1_a`, for `w2` the whole matrix or `w2_b`.
fn new_factor(
    (rows, cols): (usize, usize),
    low_rank: bool,
    r: usize,
    zero: bool,
    side: FactorSide,
    dtype: DType,
    device: &Device,
) -> CandleResult<LokrFactor> {
    let make = |shape: (usize, usize), zeroed: bool| {
        if zeroed {
            Var::zeros(shape, dtype, device)
        } else {
            kaiming_uniform(shape, dtype, device)
        }
    };
    Ok(if low_rank {
        let (zero_a, zero_b) = match side {
            FactorSide::W1 => (zero, false),
            FactorSide::W2 => (false, zero),
        };
        LokrFactor::LowRank(make((rows, r), zero_a)?, make((r, cols), zero_b)?)
    } else {
        LokrFactor::Full(make((rows, cols), zero)?)
    })
}

// ---- adapter_config.json ------------------------------------------------------

/// LoKr's own fields of `adapter_config.json`, as PEFT writes them (every
/// PEFT 0.21 option of this kind is read).
#[derive(Deserialize)]
pub struct LokrFields {
    #[serde(default)]
    init_weights: Option<Value>,
    #[serde(default)]
    rank_dropout_scale: bool,
    #[serde(default)]
    decompose_both: bool,
    #[serde(default = "default_factor")]
    decompose_factor: i64,
}

fn default_factor() -> i64 {
    -1
}

impl KindFields for LokrFields {
    type Config = LokrConfig;
    type Family = LycorisFileFields;
    // LoKrConfig checks only that layers_pattern comes with layers_to_transform.
    const LAYER_CHECKS: LayerChecks = LayerChecks::PatternNeedsLayers;

    fn into_config(self, family: Self::Family, targets: Targets, metadata: PeftMetadata) -> Result<LokrConfig> {
        let init = match &self.init_weights {
            None | Some(Value::Bool(true)) => LokrInit::Default,
            Some(Value::Bool(false)) => LokrInit::Random,
            Some(Value::String(s)) if s == "lycoris" => LokrInit::Lycoris,
            Some(other) => {
                return Err(unsupported(
                    "init_weights",
                    other.to_string(),
                    "LoKr's init_weights is true, false or \"lycoris\"",
                ))
            }
        };
        Ok(LokrConfig {
            target_modules: targets,
            lycoris: family.options(),
            rank_dropout_scale: self.rank_dropout_scale,
            decompose_both: self.decompose_both,
            decompose_factor: self.decompose_factor,
            init_weights: init,
            metadata,
        })
    }
}

// ---- the adapter ----------------------------------------------------------------

/// One Kronecker factor of a LoKr update: a whole matrix or a rank-`r` product.
#[derive(Debug, Clone)]
pub enum LokrFactor {
    /// The matrix itself (`lokr_w1` / `lokr_w2`).
    Full(Var),
    /// `a · b` with `a` `[rows, r]` and `b` `[r, cols]` (`lokr_w1_a`,
    /// `lokr_w1_b` / `lokr_w2_a`, `lokr_w2_b`).
    LowRank(Var, Var),
}

impl LokrFactor {
    /// The factor as one matrix.
    pub fn matrix(&self) -> CandleResult<Tensor> {
        match self {
            LokrFactor::Full(w) => Ok(w.as_tensor().clone()),
            LokrFactor::LowRank(a, b) => a.matmul(b.as_tensor()),
        }
    }

    /// `(rows, cols)` of [`matrix`](Self::matrix).
    pub fn shape(&self) -> CandleResult<(usize, usize)> {
        match self {
            LokrFactor::Full(w) => w.dims2(),
            LokrFactor::LowRank(a, b) => {
                let (rows, r) = a.dims2()?;
                let (r_b, cols) = b.dims2()?;
                if r != r_b {
                    candle_core::bail!("LoKr rank mismatch: {:?} · {:?}", a.dims(), b.dims());
                }
                Ok((rows, cols))
            }
        }
    }

    fn vars(&self, keys: [&'static str; 3]) -> Vec<(&'static str, Var)> {
        match self {
            LokrFactor::Full(w) => vec![(keys[0], w.clone())],
            LokrFactor::LowRank(a, b) => vec![(keys[1], a.clone()), (keys[2], b.clone())],
        }
    }
}

/// LoKr (`peft_type: "LOKR"`): a weight update that is the Kronecker product
/// of two small matrices, as PEFT's `lokr.Linear`.
///
/// The layer's dimensions are factored, `in = in_m · in_n` and
/// `out = out_l · out_k` (by [`factorization`] with `decompose_factor`), and
/// `ΔW = (w1 ⊗ w2) · alpha / r` with `w1` `[out_l, in_m]` and `w2`
/// `[out_k, in_n]`; the forward pass is `y = base(x) + x · ΔWᵀ`, merging is
/// `W + ΔW`.
///
/// Each factor is stored whole (`lokr_w1`, `lokr_w2`) or as a rank-`r`
/// product (`lokr_w1_a · lokr_w1_b`, `lokr_w2_a · lokr_w2_b`), as PEFT
/// decides from the shapes: `w2` is low-rank when `r < max(out_k, in_n) / 2`,
/// `w1` only with `decompose_both` and `r < max(out_l, in_m) / 2`. A fresh
/// adapter (`init_weights = true`) has `w1` (or `w1_a`) zero, so it changes
/// nothing until trained.
///
/// In training mode the adapter applies PEFT's `module_dropout` (skip the
/// adapter for a forward pass) and `rank_dropout` (zero output rows of `ΔW`;
/// rescaled by `1 / mean(mask)` only with `rank_dropout_scale`).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use peft_core::{factorization, LokrAdapter, LokrFactor};
/// use peft_core::Linear;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // PEFT's factorization: near the square root, or `factor` first when it divides.
/// assert_eq!(factorization(12, -1), (3, 4));
/// assert_eq!(factorization(20, -1), (4, 5));
/// assert_eq!(factorization(12, 4), (4, 3));
///
/// // w1 = [[1, 0], [0, 2]], w2 = [[0, 1], [1, 0]], scale 1:
/// // w1 ⊗ w2 = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 2], [0, 0, 2, 0]]
/// let w1 = Var::from_tensor(&Tensor::new(&[[1f32, 0.], [0., 2.]], &dev)?)?;
/// let w2 = Var::from_tensor(&Tensor::new(&[[0f32, 1.], [1., 0.]], &dev)?)?;
/// let adapter = LokrAdapter::new(LokrFactor::Full(w1), LokrFactor::Full(w2), 1.0)?;
/// let mut layer = Linear::new(Tensor::eye(4, DType::F32, &dev)?, None);
/// layer.add_adapter("default", Box::new(adapter))?;
/// // x + ΔW x = [1, 2, 3, 4] + [2, 1, 8, 6]
/// let y = layer.forward(&Tensor::new(&[[1f32, 2., 3., 4.]], &dev)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[3.0, 3.0, 11.0, 10.0]]);
/// layer.merge()?;
/// assert_eq!(layer.weight()?.to_vec2::<f32>()?[2], [0.0, 0.0, 1.0, 2.0]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LokrAdapter {
    w1: LokrFactor,
    w2: LokrFactor,
    scale: f64,
    dropouts: Dropouts,
}

impl LokrAdapter {
    /// An adapter from its factors (`w1` `[out_l, in_m]`, `w2` `[out_k, in_n]`
    /// for a layer `[out_l · out_k, in_m · in_n]`) and its scaling
    /// `alpha / r`, with no dropout.
    pub fn new(w1: LokrFactor, w2: LokrFactor, scale: f64) -> CandleResult<Self> {
        w1.shape()?;
        w2.shape()?;
        Ok(Self {
            w1,
            w2,
            scale,
            dropouts: Dropouts::default(),
        })
    }

    /// Sets the training-time dropouts: `rank_dropout` (each output row of
    /// `ΔW`, divided by the mask's mean when `rank_dropout_scale`) and
    /// `module_dropout` (the whole adapter).
    pub fn with_dropout(mut self, rank_dropout: f32, module_dropout: f32, rank_dropout_scale: bool) -> Self {
        self.dropouts = Dropouts {
            rank: rank_dropout,
            module: module_dropout,
            rescale: rank_dropout_scale,
        };
        self
    }

    /// The left factor `w1`, `[out_l, in_m]`.
    pub fn w1(&self) -> &LokrFactor {
        &self.w1
    }
    /// The right factor `w2`, `[out_k, in_n]`.
    pub fn w2(&self) -> &LokrFactor {
        &self.w2
    }
    /// The scaling `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `ΔW = (w1 ⊗ w2) · scale`, `[out_l · out_k, in_m · in_n]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        let w1 = self.w1.matrix()?;
        let w2 = self.w2.matrix()?;
        let (a, c) = w1.dims2()?;
        let (b, d) = w2.dims2()?;
        // kron(w1, w2)[i·b + k, j·d + l] = w1[i, j] · w2[k, l]
        let kron = w1
            .reshape((a, 1, c, 1))?
            .broadcast_mul(&w2.reshape((1, b, 1, d))?)?
            .reshape((a * b, c * d))?;
        (kron * self.scale)?.to_dtype(dtype)
    }

    fn check_layer(&self, weight: &Tensor) -> CandleResult<()> {
        let (a, c) = self.w1.shape()?;
        let (b, d) = self.w2.shape()?;
        if weight.dims() != [a * b, c * d] {
            candle_core::bail!(
                "LoKr factors {:?} ⊗ {:?} do not fit a layer of shape {:?}",
                (a, c),
                (b, d),
                weight.dims()
            );
        }
        Ok(())
    }
}

impl Adapter for LokrAdapter {
    adapter_identity!(PEFT_TYPE, Composition::Additive);

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let delta = |dtype| LokrAdapter::delta_weight(self, dtype);
        self.dropouts.forward(x, base_output, cx.training(), delta)
    }

    fn merge(&self, base: &LayerWeights) -> Result<LayerWeights> {
        self.check_layer(&base.weight)?;
        base.plus(&LokrAdapter::delta_weight(self, base.weight.dtype())?)
    }

    fn unmerge(&self, merged: &LayerWeights) -> Result<LayerWeights> {
        self.check_layer(&merged.weight)?;
        merged.minus(&LokrAdapter::delta_weight(self, merged.weight.dtype())?)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        let mut vars = self.w1.vars(["lokr_w1", "lokr_w1_a", "lokr_w1_b"]);
        vars.extend(self.w2.vars(["lokr_w2", "lokr_w2_a", "lokr_w2_b"]));
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::factorization;

    #[test]
    fn factorization_matches_peft() {
        // Values from PEFT's docstring and from running its function.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(8, -1), (2, 4));
        assert_eq!(factorization(6, -1), (2, 3));
        assert_eq!(factorization(30, -1), (5, 6));
        assert_eq!(factorization(12, 5), (3, 4));
        assert_eq!(factorization(12, 2), (2, 6));
        assert_eq!(factorization(1, -1), (1, 1));
        assert_eq!(factorization(16, 3), (2, 8));
        assert_eq!(factorization(36, 5), (4, 9));
        assert_eq!(factorization(64, 3), (2, 32));
        assert_eq!(factorization(60, 7), (6, 10));
    }
}
