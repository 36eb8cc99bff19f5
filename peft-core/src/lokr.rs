//! LoKr (`peft_type: "LOKR"`): a weight update that is the Kronecker product
//! of two small matrices, as PEFT's `lokr.Linear`.
//!
//! The layer's dimensions are factored, `in = in_m · in_n` and
//! `out = out_l · out_k` (by [`factorization`] with `decompose_factor`), and
//! `ΔW = (w1 ⊗ w2) · alpha / r` with `w1` `[out_l, in_m]` and `w2`
//! `[out_k, in_n]`; the forward pass is `y = base(x) + x · ΔWᵀ`, merging is
//! `W + ΔW`.
//!
//! Each factor is stored whole (`lokr_w1`, `lokr_w2`) or as a rank-`r`
//! product (`lokr_w1_a · lokr_w1_b`, `lokr_w2_a · lokr_w2_b`), as PEFT
//! decides from the shapes: `w2` is low-rank when `r < max(out_k, in_n) / 2`,
//! `w1` only with `decompose_both` and `r < max(out_l, in_m) / 2`. A fresh
//! adapter (`init_weights = true`) has `w1` (or `w1_a`) zero, so it changes
//! nothing until trained.
//!
//! In training mode the adapter applies PEFT's `module_dropout` (skip the
//! adapter for a forward pass) and `rank_dropout` (zero output rows of `ΔW`;
//! rescaled by `1 / mean(mask)` only with `rank_dropout_scale`).
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor, Var};
//! use peft_core::lokr::{factorization, LokrAdapter, LokrFactor};
//! use peft_core::Linear;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // PEFT's factorization: near the square root, or `factor` first when it divides.
//! assert_eq!(factorization(12, -1), (3, 4));
//! assert_eq!(factorization(20, -1), (4, 5));
//! assert_eq!(factorization(12, 4), (4, 3));
//!
//! // w1 = [[1, 0], [0, 2]], w2 = [[0, 1], [1, 0]], scale 1:
//! // w1 ⊗ w2 = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 2], [0, 0, 2, 0]]
//! let w1 = Var::from_tensor(&Tensor::new(&[[1f32, 0.], [0., 2.]], &dev)?)?;
//! let w2 = Var::from_tensor(&Tensor::new(&[[0f32, 1.], [1., 0.]], &dev)?)?;
//! let adapter = LokrAdapter::new(LokrFactor::Full(w1), LokrFactor::Full(w2), 1.0)?;
//! let mut layer = Linear::new(Tensor::eye(4, DType::F32, &dev)?, None);
//! layer.add_adapter("default", Box::new(adapter))?;
//! // x + ΔW x = [1, 2, 3, 4] + [2, 1, 8, 6]
//! let y = layer.forward(&Tensor::new(&[[1f32, 2., 3., 4.]], &dev)?)?;
//! assert_eq!(y.to_vec2::<f32>()?, [[3.0, 3.0, 11.0, 10.0]]);
//! layer.merge()?;
//! assert_eq!(layer.weight()?.to_vec2::<f32>()?[2], [0.0, 0.0, 1.0, 2.0]);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Result as CandleResult, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::adapter::{ForwardContext, LinearAdapter, LinearWeights};
use crate::config::AdapterConfig;
use crate::config_file::{
    check_other_fields, parse_json, pattern_value, unsupported, PeftMetadata, TargetFields, WithMetadata,
};
use crate::error::{PeftError, Result};
use crate::linear::Linear;
use crate::loha::{
    delta_output, kaiming_uniform, lycoris_common_fields, module_dropped, rank_dropout_mask, validate_common,
    LycorisFileFields,
};
use crate::targets::{all_linear, Targets};

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
/// use peft_core::all_linear;
/// use peft_core::lokr::LokrConfig;
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
    /// `layers_to_transform`, `layers_pattern`). Default: [`all_linear()`].
    pub target_modules: Targets,
    /// Rank `r` of the low-rank factors (default 8).
    pub r: usize,
    /// `alpha` (default 8): the update is scaled by `alpha / r`, whether or
    /// not a factor is low-rank.
    pub alpha: f64,
    /// Probability of zeroing each output row of `ΔW` during training (default 0).
    pub rank_dropout: f32,
    /// Probability of skipping the adapter for a forward pass during training (default 0).
    pub module_dropout: f32,
    /// Divide the rank-dropout mask by its mean (default false).
    pub rank_dropout_scale: bool,
    /// Also store `w1` as a rank-`r` product when it is large enough (default false).
    pub decompose_both: bool,
    /// The first factor of each dimension when it divides it; `-1` (the
    /// default) factors near the square root. See [`factorization`].
    pub decompose_factor: i64,
    /// How the factors start.
    pub init_weights: LokrInit,
    /// Per-module ranks: the first entry whose regex matches a dotted suffix
    /// of the module path gives its `r` (PEFT's `rank_pattern`, in order).
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, matched as `rank_pattern` (PEFT's `alpha_pattern`).
    pub alpha_pattern: Vec<(String, f64)>,
    /// PEFT's `use_effective_conv2d`: only changes convolution layers, so it
    /// has no effect on linear layers; kept for the saved config.
    pub use_effective_conv2d: bool,
    /// PEFT's descriptive fields (`task_type`, `base_model_name_or_path`,
    /// `revision`), saved as given; set them with [`WithMetadata`].
    pub metadata: PeftMetadata,
}

impl Default for LokrConfig {
    fn default() -> Self {
        all_linear().into()
    }
}

impl From<Targets> for LokrConfig {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            rank_dropout_scale: false,
            decompose_both: false,
            decompose_factor: -1,
            init_weights: LokrInit::Default,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_effective_conv2d: false,
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
    /// Sets the rank `r`.
    pub fn rank(mut self, r: usize) -> Self {
        self.r = r;
        self
    }
    /// Sets `alpha`.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    /// Sets `rank_dropout`.
    pub fn rank_dropout(mut self, p: f32) -> Self {
        self.rank_dropout = p;
        self
    }
    /// Sets `module_dropout`.
    pub fn module_dropout(mut self, p: f32) -> Self {
        self.module_dropout = p;
        self
    }
    /// Sets `rank_dropout_scale`.
    pub fn rank_dropout_scale(mut self, on: bool) -> Self {
        self.rank_dropout_scale = on;
        self
    }
    /// Sets `decompose_both`.
    pub fn decompose_both(mut self, on: bool) -> Self {
        self.decompose_both = on;
        self
    }
    /// Sets `decompose_factor` (`-1` or a positive integer).
    pub fn decompose_factor(mut self, factor: i64) -> Self {
        self.decompose_factor = factor;
        self
    }
    /// Sets `init_weights`.
    pub fn init(mut self, init: LokrInit) -> Self {
        self.init_weights = init;
        self
    }
    /// Sets the targets (`target_modules` and the filters that go with it).
    pub fn target_modules(mut self, targets: Targets) -> Self {
        self.target_modules = targets;
        self
    }
    /// Adds a `rank_pattern` entry: modules matching `pattern` get rank `r`.
    pub fn rank_for(mut self, pattern: &str, r: usize) -> Self {
        self.rank_pattern.push((pattern.to_owned(), r));
        self
    }
    /// Adds an `alpha_pattern` entry: modules matching `pattern` get `alpha`.
    pub fn alpha_for(mut self, pattern: &str, alpha: f64) -> Self {
        self.alpha_pattern.push((pattern.to_owned(), alpha));
        self
    }
    /// Sets `use_effective_conv2d` (no effect on linear layers).
    pub fn use_effective_conv2d(mut self, on: bool) -> Self {
        self.use_effective_conv2d = on;
        self
    }

    /// `r` and `alpha` for the module at `path`, after `rank_pattern` and
    /// `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = pattern_value(&self.rank_pattern, path)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path)?.unwrap_or(self.alpha);
        Ok((r, alpha))
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

impl WithMetadata for LokrConfig {
    fn metadata_mut(&mut self) -> &mut PeftMetadata {
        &mut self.metadata
    }
}

impl AdapterConfig for LokrConfig {
    fn peft_type(&self) -> &'static str {
        "LOKR"
    }

    fn targets(&self) -> &Targets {
        &self.target_modules
    }

    fn validate(&self) -> Result<()> {
        validate_common(
            self.r,
            &self.rank_pattern,
            self.alpha,
            &self.alpha_pattern,
            self.rank_dropout,
            self.module_dropout,
        )?;
        if self.decompose_factor != -1 && self.decompose_factor < 1 {
            return Err(PeftError::InvalidConfig {
                field: "decompose_factor",
                value: self.decompose_factor.to_string(),
                reason: "must be -1 (factor near the square root) or a positive integer",
            });
        }
        self.target_modules.validate()
    }

    fn linear_adapter(&self, module: &str, layer: &Linear) -> CandleResult<Box<dyn LinearAdapter>> {
        crate::config::require_linear(self.peft_type(), module, layer)?;
        let (r, alpha) = self.rank_and_alpha(module).map_err(candle_core::Error::wrap)?;
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
            self.rank_dropout,
            self.module_dropout,
            self.rank_dropout_scale,
        );
        Ok(Box::new(adapter))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let mut fields = lycoris_common_fields(
            "LOKR",
            self.r,
            self.alpha,
            self.rank_dropout,
            self.module_dropout,
            &self.rank_pattern,
            &self.alpha_pattern,
            &self.target_modules,
        );
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
            ("use_effective_conv2d", Value::Bool(self.use_effective_conv2d)),
        ];
        fields.extend(more.into_iter().map(|(k, v)| (k.to_owned(), v)));
        self.metadata.write_fields(&mut fields);
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

/// PEFT 0.21's options of this kind that are not implemented: none (every
/// option is read), so any other field is metadata or unknown.
const UNIMPLEMENTED_OPTIONS: &[&str] = &[];

crate::register_adapter_kind!("LOKR", parse_lokr_config);

/// Parses a LoKr `adapter_config.json`, refusing what it cannot honour.
fn parse_lokr_config(text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>> {
    let file: LokrConfigFile = parse_json(text, path)?;
    Ok(Box::new(file.into_config(path)?))
}

/// `adapter_config.json` of a LoKr adapter, as PEFT writes it.
#[derive(Deserialize)]
struct LokrConfigFile {
    #[serde(flatten)]
    targets: TargetFields,
    #[serde(flatten)]
    common: LycorisFileFields,
    #[serde(flatten)]
    metadata: PeftMetadata,
    #[serde(default)]
    init_weights: Option<Value>,
    #[serde(default)]
    rank_dropout_scale: bool,
    #[serde(default)]
    decompose_both: bool,
    #[serde(default = "default_factor")]
    decompose_factor: i64,
    /// Every other field, for [`check_other_fields`].
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

fn default_factor() -> i64 {
    -1
}

impl LokrConfigFile {
    fn into_config(self, path: &Path) -> Result<LokrConfig> {
        self.common.refuse_modules_to_save()?;
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
        check_other_fields(&self.other, UNIMPLEMENTED_OPTIONS, path)?;
        let mut config = LokrConfig::from(self.targets.into_targets()?)
            .rank(self.common.r)
            .alpha(self.common.alpha)
            .rank_dropout(self.common.rank_dropout)
            .module_dropout(self.common.module_dropout)
            .rank_dropout_scale(self.rank_dropout_scale)
            .decompose_both(self.decompose_both)
            .decompose_factor(self.decompose_factor)
            .init(init)
            .use_effective_conv2d(self.common.use_effective_conv2d);
        config.rank_pattern = self.common.rank_pattern;
        config.alpha_pattern = self.common.alpha_pattern;
        config.metadata = self.metadata;
        Ok(config)
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

/// A LoKr adapter on one linear layer: `ΔW = (w1 ⊗ w2) · scale`; see the
/// [module documentation](self).
#[derive(Debug, Clone)]
pub struct LokrAdapter {
    w1: LokrFactor,
    w2: LokrFactor,
    scale: f64,
    rank_dropout: f32,
    module_dropout: f32,
    rank_dropout_scale: bool,
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
            rank_dropout: 0.0,
            module_dropout: 0.0,
            rank_dropout_scale: false,
        })
    }

    /// Sets the training-time dropouts: `rank_dropout` (each output row of
    /// `ΔW`, divided by the mask's mean when `rank_dropout_scale`) and
    /// `module_dropout` (the whole adapter).
    pub fn with_dropout(mut self, rank_dropout: f32, module_dropout: f32, rank_dropout_scale: bool) -> Self {
        self.rank_dropout = rank_dropout;
        self.module_dropout = module_dropout;
        self.rank_dropout_scale = rank_dropout_scale;
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

impl LinearAdapter for LokrAdapter {
    fn peft_type(&self) -> &'static str {
        "LOKR"
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> CandleResult<Tensor> {
        if cx.training() && module_dropped(self.module_dropout)? {
            return Ok(base_output);
        }
        let mut delta = self.delta_weight(x.dtype())?;
        if cx.training() && self.rank_dropout > 0.0 {
            delta = delta.broadcast_mul(&rank_dropout_mask(&delta, self.rank_dropout, self.rank_dropout_scale)?)?;
        }
        base_output + delta_output(x, delta)?
    }

    fn merge(&self, base: &LinearWeights) -> CandleResult<LinearWeights> {
        self.check_layer(&base.weight)?;
        base.plus(&self.delta_weight(base.weight.dtype())?)
    }

    fn unmerge(&self, merged: &LinearWeights) -> CandleResult<LinearWeights> {
        self.check_layer(&merged.weight)?;
        merged.minus(&self.delta_weight(merged.weight.dtype())?)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        let mut vars = self.w1.vars(["lokr_w1", "lokr_w1_a", "lokr_w1_b"]);
        vars.extend(self.w2.vars(["lokr_w2", "lokr_w2_a", "lokr_w2_b"]));
        vars
    }

    fn clone_box(&self) -> Box<dyn LinearAdapter> {
        Box::new(self.clone())
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
