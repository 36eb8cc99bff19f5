//! LoHa (`peft_type: "LOHA"`): a weight update that is the Hadamard
//! (elementwise) product of two low-rank matrices, as PEFT's `loha.Linear`.
//!
//! The maths, PEFT's keys and an example are on [`LohaAdapter`].

use candle_core::{DType, Result as CandleResult, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::{config_basics, config_identity, require_linear, setters, AdapterConfig, WithRank};
use crate::kinds::config_file::{KindFields, LayerChecks, PeftMetadata};
use crate::kinds::lycoris::{
    default_true, impl_lycoris_builders, kaiming_uniform, Dropouts, LycorisFileFields, LycorisOptions,
};
use crate::kinds::registry::kind;
use crate::layer::{adapter_identity, Adapter, Composition, ForwardContext, Layer};
use crate::targets::Targets;

/// PEFT's `peft_type` for LoHa.
pub const PEFT_TYPE: &str = "LOHA";

/// LoHa's hyper-parameters and targets, with PEFT's field names and defaults
/// (`LoHaConfig`).
///
/// ```
/// use peft_core::prelude::*;
/// use peft_core::LohaConfig;
/// let config = LohaConfig::from(modules(["q_proj", "v_proj"])).rank(4).alpha(8.0).rank_for("v_proj", 2);
/// assert_eq!(config.rank_and_alpha("layers.0.v_proj")?, (2, 8.0));
/// assert_eq!(config.rank_and_alpha("layers.0.q_proj")?, (4, 8.0));
/// # Ok::<(), peft_core::PeftError>(())
/// ```
#[derive(Debug, Clone)]
pub struct LohaConfig {
    /// Which layers to adapt (PEFT's `target_modules`, `exclude_modules`,
    /// `layers_to_transform`, `layers_pattern`). Default: [`all_linear()`](crate::all_linear).
    pub target_modules: Targets,
    /// `r` (of each of the two factors), `alpha` (the update is scaled by
    /// `alpha / r`), their patterns and the dropouts; set them with
    /// [`WithRank`] and [`WithLycoris`](crate::WithLycoris).
    pub lycoris: LycorisOptions,
    /// PEFT's `init_weights` (default true): `w2_b` starts at zero, so a fresh
    /// adapter changes nothing; `false` draws all four factors (for tests).
    pub init_weights: bool,
    /// PEFT's descriptive fields (`task_type`, `base_model_name_or_path`,
    /// `revision`), saved as given; set them with [`WithMetadata`](crate::WithMetadata).
    pub metadata: PeftMetadata,
}

impl From<Targets> for LohaConfig {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            lycoris: LycorisOptions::default(),
            init_weights: true,
            metadata: PeftMetadata::default(),
        }
    }
}

impl LohaConfig {
    setters! {
        /// Sets `init_weights`.
        init_weights => init_weights: bool,
    }
}

impl_lycoris_builders!(LohaConfig);

config_basics!(LohaConfig);
kind!(LohaConfig, PEFT_TYPE, LohaFields);

impl AdapterConfig for LohaConfig {
    config_identity!(PEFT_TYPE);

    fn check_layer(&self, module: &str, _: &Layer, file_values: Option<usize>) -> Result<()> {
        self.lycoris.ranks.check_layer(module, file_values)
    }

    fn validate(&self) -> Result<()> {
        self.lycoris.validate()?;
        self.target_modules.validate()
    }

    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        require_linear(PEFT_TYPE, module, layer)?;
        let (r, alpha) = self.rank_and_alpha(module)?;
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
            .with_dropout(self.lycoris.rank_dropout, self.lycoris.module_dropout);
        Ok(Box::new(adapter))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let mut fields = self
            .lycoris
            .saved_fields(PEFT_TYPE, &self.target_modules, &self.metadata);
        fields.insert("init_weights".into(), Value::Bool(self.init_weights));
        fields
    }
}

// ---- adapter_config.json ------------------------------------------------------

/// LoHa's own fields of `adapter_config.json`, as PEFT writes them (every
/// PEFT 0.21 option of this kind is read).
#[derive(Deserialize)]
pub struct LohaFields {
    #[serde(default = "default_true")]
    init_weights: bool,
}

impl KindFields for LohaFields {
    type Config = LohaConfig;
    type Family = LycorisFileFields;
    // LoHaConfig checks only that layers_pattern comes with layers_to_transform.
    const LAYER_CHECKS: LayerChecks = LayerChecks::PatternNeedsLayers;

    fn into_config(self, family: Self::Family, targets: Targets, metadata: PeftMetadata) -> Result<LohaConfig> {
        Ok(LohaConfig {
            target_modules: targets,
            lycoris: family.options(),
            init_weights: self.init_weights,
            metadata,
        })
    }
}

// ---- the adapter ----------------------------------------------------------------

/// LoHa (`peft_type: "LOHA"`): a weight update that is the Hadamard
/// (elementwise) product of two low-rank matrices, as PEFT's `loha.Linear`.
///
/// `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / r`, with `w1_a`, `w2_a`
/// `[out, r]` and `w1_b`, `w2_b` `[r, in]`; the forward pass is
/// `y = base(x) + x · ΔWᵀ`, merging is `W + ΔW`. The product of two rank-`r`
/// matrices can reach rank `r²`, for the parameters of a rank-`2r` LoRA.
///
/// Saved tensors (PEFT's keys): `hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
/// `hada_w2_b` (PEFT's `hada_t1` / `hada_t2` exist only for convolutions).
/// A fresh adapter (`init_weights = true`) has `w2_b = 0`, so it changes
/// nothing until trained.
///
/// In training mode ([`PeftModel::set_training`](crate::PeftModel)) the
/// adapter applies PEFT's two dropouts: `module_dropout` skips the whole
/// adapter for a forward pass with that probability, and `rank_dropout` zeroes
/// each output row of `ΔW` with that probability, rescaling the kept rows by
/// `1 / mean(mask)` as PEFT does.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use candle_nn::{VarBuilder, VarMap};
/// use peft_core::{LohaAdapter, LohaConfig};
/// use peft_core::prelude::*;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let var = |rows: &[&[f32]]| -> candle_core::Result<Var> {
///     Var::from_tensor(&Tensor::new(rows.concat(), &dev)?.reshape((rows.len(), rows[0].len()))?)
/// };
/// // r = 1, scale 0.5: (w1_a w1_b) ⊙ (w2_a w2_b) = [[1, 1], [2, 2]] ⊙ [[1, 0], [1, 0]]
/// let adapter = LohaAdapter::new(
///     var(&[&[1.], &[2.]])?, var(&[&[1., 1.]])?,
///     var(&[&[1.], &[1.]])?, var(&[&[1., 0.]])?,
///     0.5,
/// )?;
/// assert_eq!(adapter.delta_weight(DType::F32)?.to_vec2::<f32>()?, [[0.5, 0.0], [1.0, 0.0]]);
/// let mut layer = Linear::new(Tensor::eye(2, DType::F32, &dev)?, None);
/// layer.add_adapter("default", Box::new(adapter))?;
/// // x + ΔW x = [2, 4] + [1, 2]
/// let y = layer.forward(&Tensor::new(&[[2f32, 4.]], &dev)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[3.0, 6.0]]);
/// layer.merge()?;
/// assert_eq!(layer.weight()?.to_vec2::<f32>()?, [[1.5, 0.0], [1.0, 1.0]]);
///
/// // On a model: four [out, r] / [r, in] tensors per layer; a fresh adapter
/// // leaves the output as it was.
/// #[derive(Adaptable)]
/// struct Mlp {
///     up: Linear,
///     down: Linear,
/// }
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let mut model = Mlp { up: linear(4, 8, vb.pp("up"))?, down: linear(8, 4, vb.pp("down"))? };
/// let x = Tensor::ones((1, 4), DType::F32, &dev)?;
/// let before = model.down.forward(&model.up.forward(&x)?)?;
/// model.add_adapter("default", &LohaConfig::from(all_linear()).rank(2).alpha(4.0))?;
/// assert_eq!(model.num_parameters().trainable, 2 * (8 * 2 + 2 * 4) + 2 * (4 * 2 + 2 * 8));
/// let after = model.down.forward(&model.up.forward(&x)?)?;
/// assert_eq!(after.to_vec2::<f32>()?, before.to_vec2::<f32>()?);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LohaAdapter {
    w1_a: Var,
    w1_b: Var,
    w2_a: Var,
    w2_b: Var,
    scale: f64,
    dropouts: Dropouts,
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
            dropouts: Dropouts {
                rescale: true,
                ..Dropouts::default()
            },
        })
    }

    /// Sets the training-time dropouts: `rank_dropout` (each output row of
    /// `ΔW`) and `module_dropout` (the whole adapter).
    pub fn with_dropout(mut self, rank_dropout: f32, module_dropout: f32) -> Self {
        self.dropouts.rank = rank_dropout;
        self.dropouts.module = module_dropout;
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
        (self.dropouts.rank, self.dropouts.module)
    }

    /// `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · scale`, `[out, in]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        let w1 = self.w1_a.matmul(self.w1_b.as_tensor())?;
        let w2 = self.w2_a.matmul(self.w2_b.as_tensor())?;
        ((w1 * w2)? * self.scale)?.to_dtype(dtype)
    }
}

impl Adapter for LohaAdapter {
    adapter_identity!(PEFT_TYPE, Composition::Additive);

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let delta = |dtype| LohaAdapter::delta_weight(self, dtype);
        self.dropouts.forward(x, base_output, cx.training(), delta)
    }

    fn delta_weight(&self, dtype: DType) -> Result<Option<Tensor>> {
        Ok(Some(LohaAdapter::delta_weight(self, dtype)?))
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("hada_w1_a", self.w1_a.clone()),
            ("hada_w1_b", self.w1_b.clone()),
            ("hada_w2_a", self.w2_a.clone()),
            ("hada_w2_b", self.w2_b.clone()),
        ]
    }
}
