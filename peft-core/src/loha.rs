//! LoHa (`peft_type: "LOHA"`): a weight update that is the Hadamard
//! (elementwise) product of two low-rank matrices, as PEFT's `loha.Linear`.
//!
//! `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / r`, with `w1_a`, `w2_a`
//! `[out, r]` and `w1_b`, `w2_b` `[r, in]`; the forward pass is
//! `y = base(x) + x · ΔWᵀ`, merging is `W + ΔW`. The product of two rank-`r`
//! matrices can reach rank `r²`, for the parameters of a rank-`2r` LoRA.
//!
//! Saved tensors (PEFT's keys): `hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
//! `hada_w2_b` (PEFT's `hada_t1` / `hada_t2` exist only for convolutions).
//! A fresh adapter (`init_weights = true`) has `w2_b = 0`, so it changes
//! nothing until trained.
//!
//! In training mode ([`PeftModel::set_training`](crate::PeftModel)) the
//! adapter applies PEFT's two dropouts: `module_dropout` skips the whole
//! adapter for a forward pass with that probability, and `rank_dropout` zeroes
//! each output row of `ΔW` with that probability, rescaling the kept rows by
//! `1 / mean(mask)` as PEFT does.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor, Var};
//! use candle_nn::{VarBuilder, VarMap};
//! use peft_core::loha::{LohaAdapter, LohaConfig};
//! use peft_core::prelude::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let var = |rows: &[&[f32]]| -> candle_core::Result<Var> {
//!     Var::from_tensor(&Tensor::new(rows.concat(), &dev)?.reshape((rows.len(), rows[0].len()))?)
//! };
//! // r = 1, scale 0.5: (w1_a w1_b) ⊙ (w2_a w2_b) = [[1, 1], [2, 2]] ⊙ [[1, 0], [1, 0]]
//! let adapter = LohaAdapter::new(
//!     var(&[&[1.], &[2.]])?, var(&[&[1., 1.]])?,
//!     var(&[&[1.], &[1.]])?, var(&[&[1., 0.]])?,
//!     0.5,
//! )?;
//! assert_eq!(adapter.delta_weight(DType::F32)?.to_vec2::<f32>()?, [[0.5, 0.0], [1.0, 0.0]]);
//! let mut layer = Linear::new(Tensor::eye(2, DType::F32, &dev)?, None);
//! layer.add_adapter("default", Box::new(adapter))?;
//! // x + ΔW x = [2, 4] + [1, 2]
//! let y = layer.forward(&Tensor::new(&[[2f32, 4.]], &dev)?)?;
//! assert_eq!(y.to_vec2::<f32>()?, [[3.0, 6.0]]);
//! layer.merge()?;
//! assert_eq!(layer.weight()?.to_vec2::<f32>()?, [[1.5, 0.0], [1.0, 1.0]]);
//!
//! // On a model: four [out, r] / [r, in] tensors per layer; a fresh adapter
//! // leaves the output as it was.
//! #[derive(Adaptable)]
//! struct Mlp {
//!     up: Linear,
//!     down: Linear,
//! }
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let mut model = Mlp { up: linear(4, 8, vb.pp("up"))?, down: linear(8, 4, vb.pp("down"))? };
//! let x = Tensor::ones((1, 4), DType::F32, &dev)?;
//! let before = model.down.forward(&model.up.forward(&x)?)?;
//! model.add_adapter("default", &LohaConfig::from(all_linear()).rank(2).alpha(4.0))?;
//! assert_eq!(model.num_parameters().trainable, 2 * (8 * 2 + 2 * 4) + 2 * (4 * 2 + 2 * 8));
//! let after = model.down.forward(&model.up.forward(&x)?)?;
//! assert_eq!(after.to_vec2::<f32>()?, before.to_vec2::<f32>()?);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::adapter::{ForwardContext, LinearAdapter, LinearWeights};
use crate::config::AdapterConfig;
use crate::config_file::{
    check_other_fields, float, number, ordered_map, parse_json, pattern_value, unsupported, PeftMetadata, TargetFields,
    WithMetadata,
};
use crate::error::{PeftError, Result};
use crate::linear::Linear;
use crate::targets::{all_linear, Targets};

/// LoHa's hyper-parameters and targets, with PEFT's field names and defaults
/// (`LoHaConfig`).
///
/// ```
/// use peft_core::loha::LohaConfig;
/// use peft_core::modules;
/// let config = LohaConfig::from(modules(["q_proj", "v_proj"])).rank(4).alpha(8.0).rank_for("v_proj", 2);
/// assert_eq!(config.rank_and_alpha("layers.0.v_proj")?, (2, 8.0));
/// assert_eq!(config.rank_and_alpha("layers.0.q_proj")?, (4, 8.0));
/// # Ok::<(), peft_core::PeftError>(())
/// ```
#[derive(Debug, Clone)]
pub struct LohaConfig {
    /// Which layers to adapt (PEFT's `target_modules`, `exclude_modules`,
    /// `layers_to_transform`, `layers_pattern`). Default: [`all_linear()`].
    pub target_modules: Targets,
    /// Rank `r` of each of the two factors (default 8).
    pub r: usize,
    /// `alpha` (default 8): the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Probability of zeroing each output row of `ΔW` during training (default 0).
    pub rank_dropout: f32,
    /// Probability of skipping the adapter for a forward pass during training (default 0).
    pub module_dropout: f32,
    /// PEFT's `init_weights` (default true): `w2_b` starts at zero, so a fresh
    /// adapter changes nothing; `false` draws all four factors (for tests).
    pub init_weights: bool,
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

impl Default for LohaConfig {
    fn default() -> Self {
        all_linear().into()
    }
}

impl From<Targets> for LohaConfig {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            init_weights: true,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_effective_conv2d: false,
            metadata: PeftMetadata::default(),
        }
    }
}

impl LohaConfig {
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
    /// Sets `init_weights`.
    pub fn init_weights(mut self, on: bool) -> Self {
        self.init_weights = on;
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
}

impl WithMetadata for LohaConfig {
    fn metadata_mut(&mut self) -> &mut PeftMetadata {
        &mut self.metadata
    }
}

impl AdapterConfig for LohaConfig {
    fn peft_type(&self) -> &'static str {
        "LOHA"
    }

    fn targets(&self) -> &Targets {
        &self.target_modules
    }

    fn check_layer(&self, module: &str, _: &Linear, file_values: Option<usize>) -> Result<()> {
        let (r, _) = self.rank_and_alpha(module)?;
        crate::config::check_rank(module, r, file_values)
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
        self.target_modules.validate()
    }

    fn linear_adapter(&self, module: &str, layer: &Linear) -> CandleResult<Box<dyn LinearAdapter>> {
        crate::config::require_linear(self.peft_type(), module, layer)?;
        let (r, alpha) = self.rank_and_alpha(module).map_err(candle_core::Error::wrap)?;
        let (out_f, in_f) = (layer.out_features(), layer.in_features());
        let (dtype, device) = (layer.dtype(), &layer.device());
        // PEFT: kaiming_uniform(a = √5) on all four (U(±1/√fan_in), fan_in the
        // second dimension), except w2_b, zero with init_weights = true.
        let w1_a = kaiming_uniform((out_f, r), dtype, device)?;
        let w1_b = kaiming_uniform((r, in_f), dtype, device)?;
        let w2_a = kaiming_uniform((out_f, r), dtype, device)?;
        let w2_b = if self.init_weights {
            Var::zeros((r, in_f), dtype, device)?
        } else {
            kaiming_uniform((r, in_f), dtype, device)?
        };
        let adapter = LohaAdapter::new(w1_a, w1_b, w2_a, w2_b, alpha / r as f64)?
            .with_dropout(self.rank_dropout, self.module_dropout);
        Ok(Box::new(adapter))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let mut fields = lycoris_common_fields(
            "LOHA",
            self.r,
            self.alpha,
            self.rank_dropout,
            self.module_dropout,
            &self.rank_pattern,
            &self.alpha_pattern,
            &self.target_modules,
        );
        let more = [
            ("init_weights", Value::Bool(self.init_weights)),
            ("use_effective_conv2d", Value::Bool(self.use_effective_conv2d)),
        ];
        fields.extend(more.into_iter().map(|(k, v)| (k.to_owned(), v)));
        self.metadata.write_fields(&mut fields);
        fields
    }
}

// ---- adapter_config.json ------------------------------------------------------

/// PEFT 0.21's options of this kind that are not implemented: none (every
/// option is read), so any other field is metadata or unknown.
const UNIMPLEMENTED_OPTIONS: &[&str] = &[];

crate::register_adapter_kind!("LOHA", parse_loha_config);

/// Parses a LoHa `adapter_config.json`, refusing what it cannot honour.
fn parse_loha_config(text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>> {
    let file: LohaConfigFile = parse_json(text, path)?;
    Ok(Box::new(file.into_config(path)?))
}

/// `adapter_config.json` of a LoHa adapter, as PEFT writes it.
#[derive(Deserialize)]
struct LohaConfigFile {
    #[serde(flatten)]
    targets: TargetFields,
    #[serde(flatten)]
    common: LycorisFileFields,
    #[serde(flatten)]
    metadata: PeftMetadata,
    #[serde(default = "default_true")]
    init_weights: bool,
    /// Every other field, for [`check_other_fields`].
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

impl LohaConfigFile {
    fn into_config(self, path: &Path) -> Result<LohaConfig> {
        self.common.refuse_modules_to_save()?;
        check_other_fields(&self.other, UNIMPLEMENTED_OPTIONS, path)?;
        let mut config = LohaConfig::from(self.targets.into_targets()?)
            .rank(self.common.r)
            .alpha(self.common.alpha)
            .rank_dropout(self.common.rank_dropout)
            .module_dropout(self.common.module_dropout)
            .init_weights(self.init_weights)
            .use_effective_conv2d(self.common.use_effective_conv2d);
        config.rank_pattern = self.common.rank_pattern;
        config.alpha_pattern = self.common.alpha_pattern;
        config.metadata = self.metadata;
        Ok(config)
    }
}

// ---- the adapter ----------------------------------------------------------------

/// A LoHa adapter on one linear layer: trainable `w1_a`, `w2_a` `[out, r]` and
/// `w1_b`, `w2_b` `[r, in]`; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct LohaAdapter {
    w1_a: Var,
    w1_b: Var,
    w2_a: Var,
    w2_b: Var,
    scale: f64,
    rank_dropout: f32,
    module_dropout: f32,
}

impl LohaAdapter {
    /// An adapter from its tensors (`w1_a`, `w2_a` `[out, r]`, `w1_b`, `w2_b`
    /// `[r, in]`) and its scaling `alpha / r`, with no dropout.
    pub fn new(w1_a: Var, w1_b: Var, w2_a: Var, w2_b: Var, scale: f64) -> CandleResult<Self> {
        let (out_f, r) = w1_a.dims2()?;
        let (_, in_f) = w1_b.dims2()?;
        for (name, var, expected) in [
            ("hada_w1_b", &w1_b, [r, in_f]),
            ("hada_w2_a", &w2_a, [out_f, r]),
            ("hada_w2_b", &w2_b, [r, in_f]),
        ] {
            if var.dims() != expected {
                candle_core::bail!(
                    "LoHa shape mismatch: hada_w1_a is {:?}, so {name} must be {expected:?}, found {:?}",
                    w1_a.dims(),
                    var.dims()
                );
            }
        }
        Ok(Self {
            w1_a,
            w1_b,
            w2_a,
            w2_b,
            scale,
            rank_dropout: 0.0,
            module_dropout: 0.0,
        })
    }

    /// Sets the training-time dropouts: `rank_dropout` (each output row of
    /// `ΔW`) and `module_dropout` (the whole adapter).
    pub fn with_dropout(mut self, rank_dropout: f32, module_dropout: f32) -> Self {
        self.rank_dropout = rank_dropout;
        self.module_dropout = module_dropout;
        self
    }

    /// `hada_w1_a`, `[out, r]`.
    pub fn w1_a(&self) -> &Var {
        &self.w1_a
    }
    /// `hada_w1_b`, `[r, in]`.
    pub fn w1_b(&self) -> &Var {
        &self.w1_b
    }
    /// `hada_w2_a`, `[out, r]`.
    pub fn w2_a(&self) -> &Var {
        &self.w2_a
    }
    /// `hada_w2_b`, `[r, in]`.
    pub fn w2_b(&self) -> &Var {
        &self.w2_b
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.w1_a.dims()[1]
    }
    /// The scaling `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// The training-time dropouts: `(rank_dropout, module_dropout)`.
    pub fn dropouts(&self) -> (f32, f32) {
        (self.rank_dropout, self.module_dropout)
    }

    /// `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · scale`, `[out, in]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        let w1 = self.w1_a.matmul(self.w1_b.as_tensor())?;
        let w2 = self.w2_a.matmul(self.w2_b.as_tensor())?;
        ((w1 * w2)? * self.scale)?.to_dtype(dtype)
    }
}

impl LinearAdapter for LohaAdapter {
    fn peft_type(&self) -> &'static str {
        "LOHA"
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
            delta = delta.broadcast_mul(&rank_dropout_mask(&delta, self.rank_dropout, true)?)?;
        }
        base_output + delta_output(x, delta)?
    }

    fn merge(&self, base: &LinearWeights) -> CandleResult<LinearWeights> {
        base.plus(&self.delta_weight(base.weight.dtype())?)
    }

    fn unmerge(&self, merged: &LinearWeights) -> CandleResult<LinearWeights> {
        merged.minus(&self.delta_weight(merged.weight.dtype())?)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("hada_w1_a", self.w1_a.clone()),
            ("hada_w1_b", self.w1_b.clone()),
            ("hada_w2_a", self.w2_a.clone()),
            ("hada_w2_b", self.w2_b.clone()),
        ]
    }

    fn clone_box(&self) -> Box<dyn LinearAdapter> {
        Box::new(self.clone())
    }
}

// ---- shared with LoKr (PEFT's `LycorisLayer` / `LycorisConfig`) ---------------------

/// A fresh tensor with PyTorch's `kaiming_uniform_(a = √5)`: U(±1/√fan_in),
/// `fan_in` being the second dimension.
pub(crate) fn kaiming_uniform(shape: (usize, usize), dtype: DType, device: &Device) -> CandleResult<Var> {
    let bound = 1.0 / (shape.1 as f64).sqrt();
    Var::rand_f64(-bound, bound, shape, dtype, device)
}

/// `x · ΔWᵀ` for any number of leading dimensions of `x`.
pub(crate) fn delta_output(x: &Tensor, delta: Tensor) -> CandleResult<Tensor> {
    candle_nn::Linear::new(delta, None).forward(x)
}

/// Whether a training forward pass skips the adapter: PEFT applies it when
/// `torch.rand(1) > module_dropout`.
pub(crate) fn module_dropped(module_dropout: f32) -> CandleResult<bool> {
    if module_dropout <= 0.0 {
        return Ok(false);
    }
    let draw = Tensor::rand(0f32, 1f32, 1, &Device::Cpu)?.to_vec1::<f32>()?[0];
    Ok(draw <= module_dropout)
}

/// PEFT's rank dropout: a column `[out, 1]` of ones and zeros (each zero with
/// probability `p`), divided by its mean when `rescale`. When every row is
/// dropped the mask is all zeros (PEFT would divide by zero and give NaN).
pub(crate) fn rank_dropout_mask(delta: &Tensor, p: f32, rescale: bool) -> CandleResult<Tensor> {
    let out = delta.dims()[0];
    let keep = Tensor::rand(0f32, 1f32, (out, 1), delta.device())?
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

/// The checks LoHa and LoKr share: ranks at least 1, alphas finite and
/// positive, `rank_dropout` in [0, 1), `module_dropout` in [0, 1], patterns
/// that compile.
pub(crate) fn validate_common(
    r: usize,
    rank_pattern: &[(String, usize)],
    alpha: f64,
    alpha_pattern: &[(String, f64)],
    rank_dropout: f32,
    module_dropout: f32,
) -> Result<()> {
    let invalid = |field, value: String, reason| Err(PeftError::InvalidConfig { field, value, reason });
    let ranks = std::iter::once(r).chain(rank_pattern.iter().map(|(_, r)| *r));
    if let Some(r) = ranks.into_iter().find(|&r| r == 0) {
        return invalid("r", r.to_string(), "the rank must be at least 1");
    }
    let alphas = std::iter::once(alpha).chain(alpha_pattern.iter().map(|(_, a)| *a));
    if let Some(alpha) = alphas.into_iter().find(|a| !(*a > 0.0 && a.is_finite())) {
        return invalid("alpha", alpha.to_string(), "must be a finite number > 0");
    }
    if !(0.0..1.0).contains(&rank_dropout) {
        return invalid("rank_dropout", rank_dropout.to_string(), "must lie in [0, 1)");
    }
    if !(0.0..=1.0).contains(&module_dropout) {
        return invalid("module_dropout", module_dropout.to_string(), "must lie in [0, 1]");
    }
    // Compile every pattern once, so a bad one is reported before any layer changes.
    pattern_value(rank_pattern, "")?;
    pattern_value(alpha_pattern, "")?;
    Ok(())
}

/// The `adapter_config.json` fields LoHa and LoKr share, as PEFT writes them
/// (without `target_modules`, which saving fills in).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lycoris_common_fields(
    peft_type: &'static str,
    r: usize,
    alpha: f64,
    rank_dropout: f32,
    module_dropout: f32,
    rank_pattern: &[(String, usize)],
    alpha_pattern: &[(String, f64)],
    targets: &Targets,
) -> serde_json::Map<String, Value> {
    let fields = [
        ("peft_type", Value::from(peft_type)),
        ("r", Value::from(r)),
        ("alpha", number(alpha)),
        ("rank_dropout", float(f64::from(rank_dropout))),
        ("module_dropout", float(f64::from(module_dropout))),
        ("exclude_modules", targets.exclude_modules_json()),
        // target_modules is saved as the exact list of adapted modules, so a
        // layer filter has nothing left to do: these are saved as null.
        ("layers_to_transform", Value::Null),
        ("layers_pattern", Value::Null),
        (
            "rank_pattern",
            rank_pattern.iter().map(|(k, r)| (k.clone(), Value::from(*r))).collect(),
        ),
        (
            "alpha_pattern",
            alpha_pattern.iter().map(|(k, a)| (k.clone(), number(*a))).collect(),
        ),
        ("modules_to_save", Value::Null),
        ("inference_mode", Value::Bool(true)),
    ];
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The `adapter_config.json` fields LoHa and LoKr share (besides the targets).
#[derive(Deserialize)]
pub(crate) struct LycorisFileFields {
    #[serde(default = "default_rank")]
    pub(crate) r: usize,
    #[serde(default = "default_alpha")]
    pub(crate) alpha: f64,
    #[serde(default)]
    pub(crate) rank_dropout: f32,
    #[serde(default)]
    pub(crate) module_dropout: f32,
    #[serde(default, deserialize_with = "ordered_map")]
    pub(crate) rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered_map")]
    pub(crate) alpha_pattern: Vec<(String, f64)>,
    /// Only changes convolution layers in PEFT: no effect on linear layers.
    #[serde(default)]
    pub(crate) use_effective_conv2d: bool,
    #[serde(default)]
    pub(crate) modules_to_save: Option<Vec<String>>,
}

impl LycorisFileFields {
    pub(crate) fn refuse_modules_to_save(&self) -> Result<()> {
        match self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            Some(modules) => Err(unsupported(
                "modules_to_save",
                format!("{modules:?}"),
                "modules_to_save is not implemented yet",
            )),
            None => Ok(()),
        }
    }
}

fn default_rank() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

pub(crate) fn default_true() -> bool {
    true
}
