//! LoRA: `y = base(x) + s · B(A(dropout(x)))`, as PEFT's `lora.Linear`.
//!
//! `A` is `[r, in]`, `B` is `[out, r]` and `s = lora_alpha / r`
//! (`lora_alpha / √r` with rsLoRA). With [`LoraConfig::dora`] (PEFT's
//! `use_dora`) each layer gets a [`DoraAdapter`](crate::dora::DoraAdapter)
//! instead, which adds a learned magnitude per output.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor, Var};
//! use peft_core::{LoraAdapter, Linear};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let mut layer = Linear::new(Tensor::eye(2, DType::F32, &dev)?, None);
//! // r = 1: A = [[1, 1]], B = [[1], [0]], scale 0.5
//! let a = Var::from_tensor(&Tensor::new(&[[1f32, 1.]], &dev)?)?;
//! let b = Var::from_tensor(&Tensor::new(&[[1f32], [0.]], &dev)?)?;
//! layer.add_adapter("default", Box::new(LoraAdapter::new(a, b, 0.5, 0.0)?))?;
//! let y = layer.forward(&Tensor::new(&[[2f32, 4.]], &dev)?)?;
//! // x + 0.5 · B A x = [2, 4] + 0.5 · [6, 0]
//! assert_eq!(y.to_vec2::<f32>()?, [[5.0, 4.0]]);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::adaptable::LayerKind;
use crate::adapter::{ForwardContext, LinearAdapter, LinearWeights};
use crate::config::AdapterConfig;
use crate::config_file::{
    check_other_fields, float, number, ordered_map, parse_json, pattern_value, unsupported, PeftMetadata, TargetFields,
    WithMetadata,
};
use crate::conv::LoraConvAdapter;
use crate::dora::DoraAdapter;
use crate::embedding::LoraEmbeddingAdapter;
use crate::error::{PeftError, Result};
use crate::linear::Linear;
use crate::targets::{all_linear, Targets};

/// How LoRA's `A` and `B` start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LoraInit {
    /// PEFT's `True`: `A` Kaiming-uniform (a = √5, i.e. U(±1/√in)), `B` zeros,
    /// so a fresh adapter leaves the output unchanged.
    #[default]
    Default,
    /// PEFT's `"gaussian"`: `A` ~ N(0, (1/r)²), `B` zeros.
    Gaussian,
    /// PEFT's `False`: `A` and `B` both U(±1/√fan_in), so a fresh adapter
    /// changes the output. For tests only.
    Random,
}

/// LoRA's hyper-parameters and targets, with PEFT's field names and defaults.
///
/// ```
/// use peft_core::{all_linear, LoraConfig};
/// let config = LoraConfig::from(all_linear()).rank(16).alpha(32.0).dropout(0.05);
/// assert_eq!((config.r, config.lora_alpha, config.scaling()), (16, 32.0, 2.0));
/// ```
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Which layers to adapt (PEFT's `target_modules`, `exclude_modules`,
    /// `layers_to_transform`, `layers_pattern`). Default: [`all_linear()`].
    pub target_modules: Targets,
    /// Rank `r` (default 8).
    pub r: usize,
    /// `lora_alpha` (default 8).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training (default 0).
    pub lora_dropout: f32,
    /// Scale by `alpha / √r` instead of `alpha / r` (default false).
    pub use_rslora: bool,
    /// DoRA (default false): each adapted layer also learns a per-output
    /// magnitude vector; see [`DoraAdapter`](crate::dora::DoraAdapter).
    pub use_dora: bool,
    /// How `A` and `B` start.
    pub init_lora_weights: LoraInit,
    /// Per-module ranks: the first entry whose regex matches a dotted suffix
    /// of the module path gives its `r` (PEFT's `rank_pattern`, in order).
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, matched as `rank_pattern` (PEFT's `alpha_pattern`).
    pub alpha_pattern: Vec<(String, f64)>,
    /// PEFT's `fan_in_fan_out`: the targeted layers came from checkpoints that
    /// store weights `[in, out]` (GPT-2's `Conv1D`). The `Linear` slot always
    /// holds `[out, in]` (transpose at load, see [`Linear::from_fan_in_fan_out`]),
    /// so this only records the layout for the saved config.
    pub fan_in_fan_out: bool,
    /// PEFT's descriptive fields (`task_type`, `base_model_name_or_path`,
    /// `revision`), saved as given; set them with [`WithMetadata`].
    pub metadata: PeftMetadata,
}

impl Default for LoraConfig {
    fn default() -> Self {
        all_linear().into()
    }
}

impl From<Targets> for LoraConfig {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: LoraInit::Default,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            fan_in_fan_out: false,
            metadata: PeftMetadata::default(),
        }
    }
}

impl LoraConfig {
    /// Sets the rank `r`.
    pub fn rank(mut self, r: usize) -> Self {
        self.r = r;
        self
    }
    /// Sets `lora_alpha`.
    pub fn alpha(mut self, lora_alpha: f64) -> Self {
        self.lora_alpha = lora_alpha;
        self
    }
    /// Sets `lora_dropout`.
    pub fn dropout(mut self, p: f32) -> Self {
        self.lora_dropout = p;
        self
    }
    /// Sets `use_rslora`.
    pub fn rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }
    /// Sets `use_dora`: DoRA instead of plain LoRA on every targeted layer.
    pub fn dora(mut self, on: bool) -> Self {
        self.use_dora = on;
        self
    }
    /// Sets `init_lora_weights`.
    pub fn init(mut self, init: LoraInit) -> Self {
        self.init_lora_weights = init;
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
    /// Sets `fan_in_fan_out`.
    pub fn fan_in_fan_out(mut self, on: bool) -> Self {
        self.fan_in_fan_out = on;
        self
    }

    /// The factor `s` applied to `B(A(x))`, for the global `r` and `lora_alpha`.
    pub fn scaling(&self) -> f64 {
        scaling(self.lora_alpha, self.r, self.use_rslora)
    }

    /// `r` and `lora_alpha` for the module at `path`, after `rank_pattern`
    /// and `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = pattern_value(&self.rank_pattern, path)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path)?.unwrap_or(self.lora_alpha);
        Ok((r, alpha))
    }

    /// Fresh `A` `[r, in]` and `B` `[out, r]` for a layer, per `init_lora_weights`.
    fn init_vars(
        &self,
        r: usize,
        in_features: usize,
        out_features: usize,
        dtype: DType,
        device: &Device,
    ) -> CandleResult<(Var, Var)> {
        let uniform = |fan_in: usize, shape: (usize, usize)| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Var::rand_f64(-bound, bound, shape, dtype, device)
        };
        let zeros = || Var::zeros((out_features, r), dtype, device);
        Ok(match self.init_lora_weights {
            LoraInit::Default => (uniform(in_features, (r, in_features))?, zeros()?),
            LoraInit::Gaussian => (
                Var::randn_f64(0.0, 1.0 / r as f64, (r, in_features), dtype, device)?,
                zeros()?,
            ),
            LoraInit::Random => (uniform(in_features, (r, in_features))?, uniform(r, (out_features, r))?),
        })
    }
}

impl LoraConfig {
    /// LoRA on an embedding, initialised as PEFT's `lora.Embedding`: `A`
    /// `[r, vocab]` zeros and `B` `[dim, r]` N(0, 1) (both N(0, 1) for
    /// [`LoraInit::Random`]), so a fresh adapter changes nothing.
    fn embedding_adapter(
        &self,
        module: &str,
        layer: &Linear,
        r: usize,
        alpha: f64,
    ) -> CandleResult<Box<dyn LinearAdapter>> {
        if self.use_dora {
            candle_core::bail!("DoRA is not implemented for embedding layers (module `{module}`)");
        }
        let (vocab, dim, dtype, device) = (layer.in_features(), layer.out_features(), layer.dtype(), layer.device());
        let a = match self.init_lora_weights {
            LoraInit::Random => Var::randn_f64(0.0, 1.0, (r, vocab), dtype, &device)?,
            LoraInit::Default | LoraInit::Gaussian => Var::zeros((r, vocab), dtype, &device)?,
        };
        let b = Var::randn_f64(0.0, 1.0, (dim, r), dtype, &device)?;
        Ok(Box::new(LoraEmbeddingAdapter::new(
            a,
            b,
            scaling(alpha, r, self.use_rslora),
        )?))
    }
}

impl LoraConfig {
    /// LoRA on a convolution, initialised as PEFT's `lora.Conv*d`: `A`
    /// `[r, in, k...]` Kaiming-uniform (U(±1/√(in·k))), `B` `[out, r, 1...]`
    /// zeros (both uniform for [`LoraInit::Random`], `A` ~ N(0, 1/r²) for
    /// [`LoraInit::Gaussian`]).
    fn conv_adapter(&self, module: &str, layer: &Linear, r: usize, alpha: f64) -> CandleResult<Box<dyn LinearAdapter>> {
        let (Some((kernel, groups)), Some(geometry)) = (layer.conv_shape(), layer.conv_geometry()) else {
            candle_core::bail!("module `{module}` is not a convolution");
        };
        if self.use_dora {
            candle_core::bail!("DoRA is not implemented for convolution layers (module `{module}`)");
        }
        if groups != 1 {
            candle_core::bail!(
                "LoRA is not implemented for grouped convolutions (module `{module}` has {groups} groups)"
            );
        }
        let (dtype, device) = (layer.dtype(), layer.device());
        let mut a_shape = kernel.clone();
        a_shape[0] = r;
        let mut b_shape = vec![kernel[0], r];
        b_shape.extend(std::iter::repeat_n(1, kernel.len() - 2));
        let uniform = |fan_in: usize, shape: &[usize]| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Var::rand_f64(-bound, bound, shape, dtype, &device)
        };
        let fan_in = kernel[1..].iter().product::<usize>();
        let (a, b) = match self.init_lora_weights {
            LoraInit::Default => (uniform(fan_in, &a_shape)?, Var::zeros(b_shape, dtype, &device)?),
            LoraInit::Gaussian => (
                Var::randn_f64(0.0, 1.0 / r as f64, a_shape, dtype, &device)?,
                Var::zeros(b_shape, dtype, &device)?,
            ),
            LoraInit::Random => (uniform(fan_in, &a_shape)?, uniform(r, &b_shape)?),
        };
        let scale = scaling(alpha, r, self.use_rslora);
        Ok(Box::new(LoraConvAdapter::new(
            a,
            b,
            scale,
            self.lora_dropout,
            geometry,
        )?))
    }
}

/// `alpha / r`, or `alpha / √r` with rsLoRA.
fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

impl WithMetadata for LoraConfig {
    fn metadata_mut(&mut self) -> &mut PeftMetadata {
        &mut self.metadata
    }
}

impl AdapterConfig for LoraConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn targets(&self) -> &Targets {
        &self.target_modules
    }

    fn check_layer(&self, module: &str, _: &Linear, file_values: Option<usize>) -> Result<()> {
        let (r, _) = self.rank_and_alpha(module)?;
        crate::config::check_rank(module, r, file_values)
    }

    fn validate(&self) -> Result<()> {
        let invalid = |field, value: String, reason| Err(PeftError::InvalidConfig { field, value, reason });
        let ranks = std::iter::once(self.r).chain(self.rank_pattern.iter().map(|(_, r)| *r));
        if let Some(r) = ranks.into_iter().find(|&r| r == 0) {
            return invalid("r", r.to_string(), "the rank must be at least 1");
        }
        let alphas = std::iter::once(self.lora_alpha).chain(self.alpha_pattern.iter().map(|(_, a)| *a));
        if let Some(alpha) = alphas.into_iter().find(|a| !(*a > 0.0 && a.is_finite())) {
            return invalid("lora_alpha", alpha.to_string(), "must be a finite number > 0");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return invalid("lora_dropout", self.lora_dropout.to_string(), "must lie in [0, 1)");
        }
        // Compile every pattern once, so a bad one is reported before any layer changes.
        pattern_value(&self.rank_pattern, "")?;
        pattern_value(&self.alpha_pattern, "")?;
        self.target_modules.validate()
    }

    fn linear_adapter(&self, module: &str, layer: &Linear) -> CandleResult<Box<dyn LinearAdapter>> {
        let (r, alpha) = self.rank_and_alpha(module).map_err(candle_core::Error::wrap)?;
        match layer.kind() {
            LayerKind::Embedding => return self.embedding_adapter(module, layer, r, alpha),
            LayerKind::Conv => return self.conv_adapter(module, layer, r, alpha),
            _ => {}
        }
        let (a, b) = self.init_vars(
            r,
            layer.in_features(),
            layer.out_features(),
            layer.dtype(),
            &layer.device(),
        )?;
        let lora = LoraAdapter::new(a, b, scaling(alpha, r, self.use_rslora), self.lora_dropout)?;
        if self.use_dora {
            // The magnitude starts as the row norms of W + s·B·A, as PEFT's
            // `dora_init` (with B = 0, the norms of W), so m / n = 1 at first.
            Ok(Box::new(DoraAdapter::from_weight(lora, layer.weight()?)?))
        } else {
            Ok(Box::new(lora))
        }
    }

    fn to_peft_config(&self) -> serde_json::Map<String, serde_json::Value> {
        let init = match self.init_lora_weights {
            LoraInit::Default => Value::Bool(true),
            LoraInit::Random => Value::Bool(false),
            LoraInit::Gaussian => Value::from("gaussian"),
        };
        let fields = [
            ("peft_type", Value::from("LORA")),
            ("r", Value::from(self.r)),
            ("lora_alpha", number(self.lora_alpha)),
            ("lora_dropout", float(f64::from(self.lora_dropout))),
            ("use_rslora", Value::Bool(self.use_rslora)),
            ("use_dora", Value::Bool(self.use_dora)),
            ("fan_in_fan_out", Value::Bool(self.fan_in_fan_out)),
            ("bias", Value::from("none")),
            ("init_lora_weights", init),
            ("exclude_modules", self.target_modules.exclude_modules_json()),
            // target_modules is saved as the exact list of adapted modules, so
            // a layer filter has nothing left to do (and PEFT's own index rule
            // differs from ours): these are saved as null.
            ("layers_to_transform", Value::Null),
            ("layers_pattern", Value::Null),
            (
                "rank_pattern",
                self.rank_pattern
                    .iter()
                    .map(|(k, r)| (k.clone(), Value::from(*r)))
                    .collect(),
            ),
            (
                "alpha_pattern",
                self.alpha_pattern
                    .iter()
                    .map(|(k, a)| (k.clone(), number(*a)))
                    .collect(),
            ),
            ("modules_to_save", Value::Null),
            ("inference_mode", Value::Bool(true)),
        ];
        let mut map: serde_json::Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        self.metadata.write_fields(&mut map);
        map
    }
}

// ---- adapter_config.json ------------------------------------------------------

crate::register_adapter_kind!("LORA", parse_lora_config);

/// Parses a LoRA `adapter_config.json`, refusing what it cannot honour.
fn parse_lora_config(text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>> {
    let file: LoraConfigFile = parse_json(text, path)?;
    Ok(Box::new(file.into_config(path)?))
}

/// `adapter_config.json` of a LoRA adapter, as PEFT writes it.
#[derive(Deserialize)]
struct LoraConfigFile {
    #[serde(flatten)]
    targets: TargetFields,
    #[serde(default = "default_rank")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f32,
    #[serde(default, deserialize_with = "ordered_map")]
    rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered_map")]
    alpha_pattern: Vec<(String, f64)>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    init_lora_weights: Option<Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(flatten)]
    metadata: PeftMetadata,
    /// Every other field, for [`check_other_fields`].
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// PEFT 0.21's LoRA options that this crate does not implement: refused
/// when set (see [`check_other_fields`]).
const UNIMPLEMENTED_OPTIONS: &[&str] = &[
    "alora_invocation_tokens",
    "arrow_config",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "kasa_config",
    "layer_replication",
    "loftq_config",
    "lora_bias",
    "lora_ga_config",
    "megatron_config",
    "monteclora_config",
    "runtime_config",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_qalora",
    "velora_config",
];

fn default_rank() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

impl LoraConfigFile {
    fn into_config(self, path: &Path) -> Result<LoraConfig> {
        if let Some(bias) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported(
                "bias",
                format!("{bias:?}"),
                "only bias = \"none\" is implemented",
            ));
        }
        if let Some(modules) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(unsupported(
                "modules_to_save",
                format!("{modules:?}"),
                "modules_to_save is not implemented yet",
            ));
        }
        let init =
            match &self.init_lora_weights {
                None | Some(Value::Bool(true)) => LoraInit::Default,
                Some(Value::Bool(false)) => LoraInit::Random,
                Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
                Some(other) => return Err(unsupported(
                    "init_lora_weights",
                    other.to_string(),
                    "this initialisation changes the base weights (PiSSA, OLoRA, LoftQ, ...) and is not implemented",
                )),
            };
        check_other_fields(&self.other, UNIMPLEMENTED_OPTIONS, path)?;
        let mut config = LoraConfig::from(self.targets.into_targets()?)
            .rank(self.r)
            .alpha(self.lora_alpha)
            .dropout(self.lora_dropout)
            .rslora(self.use_rslora)
            .dora(self.use_dora)
            .init(init)
            .fan_in_fan_out(self.fan_in_fan_out);
        config.rank_pattern = self.rank_pattern;
        config.alpha_pattern = self.alpha_pattern;
        config.metadata = self.metadata;
        Ok(config)
    }
}

/// A LoRA adapter on one linear layer: trainable `A` `[r, in]` and `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
}

impl LoraAdapter {
    /// An adapter from its tensors; `a` is `[r, in]`, `b` is `[out, r]`.
    pub fn new(a: Var, b: Var, scale: f64, dropout: f32) -> CandleResult<Self> {
        let (r, _) = a.dims2()?;
        let (_, r_b) = b.dims2()?;
        if r != r_b {
            candle_core::bail!(
                "LoRA rank mismatch: lora_A is {:?} and lora_B is {:?}",
                a.dims(),
                b.dims()
            );
        }
        Ok(Self { a, b, scale, dropout })
    }

    /// `A`, `[r, in]`.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// `B`, `[out, r]`.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    /// The scaling `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// The dropout probability on the adapter's input in training mode.
    pub fn dropout(&self) -> f32 {
        self.dropout
    }

    /// `dropout(x)` when `training` and the probability is positive, else `x`.
    pub(crate) fn dropout_input(&self, x: &Tensor, training: bool) -> CandleResult<Tensor> {
        if training && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout)
        } else {
            Ok(x.clone())
        }
    }

    /// `s · B(A(x))`, with no dropout.
    pub(crate) fn lora_output(&self, x: &Tensor) -> CandleResult<Tensor> {
        // candle_nn::Linear keeps its fast reshape-to-2D matmul path; the
        // scale is applied on the narrow [.., r] activation.
        let down = candle_nn::Linear::new(self.a.as_tensor().clone(), None).forward(x)?;
        candle_nn::Linear::new(self.b.as_tensor().clone(), None).forward(&(down * self.scale)?)
    }

    /// `s · B A`, `[out, in]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        (self.b.matmul(self.a.as_tensor())? * self.scale)?.to_dtype(dtype)
    }
}

impl LinearAdapter for LoraAdapter {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn forward_with_base(&self, x: &Tensor, cx: ForwardContext<'_>) -> CandleResult<Option<Tensor>> {
        // With dropout active the adapter sees another input than the base.
        let dropout_active = cx.training() && self.dropout > 0.0;
        match cx.dense() {
            Some(base) if !dropout_active => {
                let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
                crate::fused::lora_linear(x, base.weight(), base.bias(), a, b, self.scale).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> CandleResult<Tensor> {
        let x = self.dropout_input(x, cx.training())?;
        base_output + self.lora_output(&x)?
    }

    fn merge(&self, base: &LinearWeights) -> CandleResult<LinearWeights> {
        base.plus(&self.delta_weight(base.weight.dtype())?)
    }

    fn unmerge(&self, merged: &LinearWeights) -> CandleResult<LinearWeights> {
        merged.minus(&self.delta_weight(merged.weight.dtype())?)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("lora_A.weight", self.a.clone()), ("lora_B.weight", self.b.clone())]
    }

    fn clone_box(&self) -> Box<dyn LinearAdapter> {
        Box::new(self.clone())
    }
}
