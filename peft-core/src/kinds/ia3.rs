//! IA³ (`peft_type: "IA3"`): a learned vector `l` per layer that rescales
//! activations, as PEFT's `ia3.Linear`.
//!
//! The maths, PEFT's keys and an example are on [`Ia3Adapter`].

use candle_core::{DType, Result as CandleResult, Tensor, Var};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::kinds::config::{config_basics, config_identity, require_linear, setters, AdapterConfig};
use crate::kinds::config_file::{
    saved_fields, unsupported, KindFields, LayerChecks, NoFields, OneOrMany, PeftMetadata,
};
use crate::kinds::registry::kind;
use crate::layer::{Adapter, Composition, ForwardContext, Layer, LayerWeights};
use crate::targets::Targets;

/// PEFT's `peft_type` for IA³.
pub const PEFT_TYPE: &str = "IA3";

/// The smallest `|l|` [`Ia3Adapter`]'s unmerge divides by (the tolerance PEFT adds).
const UNMERGE_MIN_ABS: f64 = 1e-8;

/// Which targeted modules are feed-forward (PEFT's `feedforward_modules`):
/// their vector scales the layer's input instead of its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedforwardModules {
    /// PEFT's list form: a module is feed-forward when its path ends with one
    /// of the names, as a plain string suffix (Python's `str.endswith`, no dot
    /// boundary: `"proj"` matches `mlp.down_proj`).
    Names(Vec<String>),
    /// PEFT's string form: a regex that must match the whole path
    /// (`re.fullmatch`).
    Regex(String),
}

impl Default for FeedforwardModules {
    /// No feed-forward module.
    fn default() -> Self {
        FeedforwardModules::Names(Vec::new())
    }
}

impl FeedforwardModules {
    /// Whether the module at `path` is feed-forward, by PEFT's rule. Errors
    /// only for a regex that does not compile.
    pub fn matches(&self, path: &str) -> Result<bool> {
        match self {
            FeedforwardModules::Names(names) => Ok(names.iter().any(|name| path.ends_with(name.as_str()))),
            FeedforwardModules::Regex(pattern) => Ok(whole_path_regex(pattern)?.is_match(path)),
        }
    }

    /// The value saved as `feedforward_modules`: a regex string, or `[]` for
    /// none. A list of names is saved as the equivalent regex
    /// `.*(?:name|...)` so that PEFT, which checks a *list* against the
    /// saved full-path `target_modules`, can reload it (see the module docs).
    pub fn to_peft_json(&self) -> Value {
        match self {
            FeedforwardModules::Names(names) if names.is_empty() => Value::Array(Vec::new()),
            FeedforwardModules::Names(names) => {
                let alternatives: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
                Value::from(format!(".*(?:{})", alternatives.join("|")))
            }
            FeedforwardModules::Regex(pattern) => Value::from(pattern.as_str()),
        }
    }
}

/// `pattern` anchored at both ends, as `re.fullmatch` applies it.
fn whole_path_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|cause| PeftError::InvalidRegex {
        pattern: pattern.to_owned(),
        cause,
    })
}

/// IA³'s targets and options, with PEFT's field names and defaults.
///
/// ```
/// use peft_core::all_linear;
/// use peft_core::Ia3Config;
/// let config = Ia3Config::from(all_linear()).feedforward_modules(["down_proj"]);
/// assert!(config.is_feedforward("model.layers.0.mlp.down_proj")?);
/// assert!(!config.is_feedforward("model.layers.0.mlp.up_proj")?);
/// # Ok::<(), peft_core::PeftError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Ia3Config {
    /// Which layers to adapt (PEFT's `target_modules`, `exclude_modules`).
    /// Default: [`all_linear()`](crate::all_linear).
    pub target_modules: Targets,
    /// Which of the targeted layers scale their input rather than their
    /// output. Default: none.
    pub feedforward_modules: FeedforwardModules,
    /// PEFT's `fan_in_fan_out`: the targeted layers came from checkpoints that
    /// store weights `[in, out]` (GPT-2's `Conv1D`). The `Linear` slot always
    /// holds `[out, in]` and the vector's shape does not depend on the
    /// layout, so this only records it for the saved config.
    pub fan_in_fan_out: bool,
    /// PEFT's `init_ia3_weights` (default true): start every vector at ones,
    /// so a fresh adapter changes nothing; false draws it from N(0, 1) (for
    /// tests).
    pub init_ia3_weights: bool,
    /// PEFT's descriptive fields (`task_type`, `base_model_name_or_path`,
    /// `revision`), saved as given; set them with [`WithMetadata`](crate::WithMetadata).
    pub metadata: PeftMetadata,
}

impl From<Targets> for Ia3Config {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            feedforward_modules: FeedforwardModules::default(),
            fan_in_fan_out: false,
            init_ia3_weights: true,
            metadata: PeftMetadata::default(),
        }
    }
}

impl Ia3Config {
    /// Sets `feedforward_modules` to a list of names: a module is feed-forward
    /// when its path ends with one of them (plain suffix, as PEFT).
    pub fn feedforward_modules<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.feedforward_modules = FeedforwardModules::Names(names.into_iter().map(Into::into).collect());
        self
    }
    /// Sets `feedforward_modules` to a regex that must match the whole path.
    pub fn feedforward_regex(mut self, pattern: &str) -> Self {
        self.feedforward_modules = FeedforwardModules::Regex(pattern.to_owned());
        self
    }
    setters! {
        /// Sets `fan_in_fan_out`.
        fan_in_fan_out => fan_in_fan_out: bool,
        /// Sets `init_ia3_weights` (true: ones; false: N(0, 1)).
        init => init_ia3_weights: bool,
    }

    /// Whether the module at `path` is feed-forward, by PEFT's rule (see
    /// [`FeedforwardModules`]).
    pub fn is_feedforward(&self, path: &str) -> Result<bool> {
        self.feedforward_modules.matches(path)
    }
}

config_basics!(Ia3Config);
kind!(Ia3Config, PEFT_TYPE, Ia3Fields);

impl AdapterConfig for Ia3Config {
    config_identity!(PEFT_TYPE);

    fn validate(&self) -> Result<()> {
        if let FeedforwardModules::Regex(pattern) = &self.feedforward_modules {
            whole_path_regex(pattern)?;
        }
        self.target_modules.validate()
    }

    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        require_linear(PEFT_TYPE, module, layer)?;
        let feedforward = self.is_feedforward(module)?;
        let (dtype, device) = (layer.dtype(), layer.device());
        let shape = if feedforward {
            (1, layer.in_features())
        } else {
            (layer.out_features(), 1)
        };
        let l = if self.init_ia3_weights {
            Var::ones(shape, dtype, &device)?
        } else {
            crate::kernels::random::normal_var(0.0, 1.0, shape, dtype, &device)?
        };
        Ok(Box::new(Ia3Adapter::new(l, feedforward)?))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let mut fields = saved_fields(PEFT_TYPE, &self.target_modules, &self.metadata);
        // IA3Config has no layer options: the exact list of paths says it all.
        fields.remove("layers_to_transform");
        fields.remove("layers_pattern");
        let more = [
            ("feedforward_modules", self.feedforward_modules.to_peft_json()),
            ("fan_in_fan_out", Value::Bool(self.fan_in_fan_out)),
            ("init_ia3_weights", Value::Bool(self.init_ia3_weights)),
        ];
        fields.extend(more.into_iter().map(|(k, v)| (k.to_owned(), v)));
        fields
    }
}

// ---- adapter_config.json ------------------------------------------------------

/// IA³'s own fields of `adapter_config.json`, as PEFT writes them (every
/// PEFT 0.21 option of this kind is read).
#[derive(Deserialize)]
pub struct Ia3Fields {
    #[serde(default)]
    feedforward_modules: Option<OneOrMany<String>>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default = "default_init")]
    init_ia3_weights: bool,
}

fn default_init() -> bool {
    true
}

impl KindFields for Ia3Fields {
    type Config = Ia3Config;
    type Family = NoFields;
    // IA3Config has neither layers_to_transform nor layers_pattern.
    const LAYER_CHECKS: LayerChecks = LayerChecks::None;

    fn into_config(self, _: NoFields, targets: Targets, metadata: PeftMetadata) -> Result<Ia3Config> {
        let feedforward_modules = match self.feedforward_modules {
            None => {
                return Err(unsupported(
                    "feedforward_modules",
                    "null".into(),
                    "PEFT's per-architecture default feed-forward modules are not known here; list them",
                ))
            }
            Some(OneOrMany::One(pattern)) => FeedforwardModules::Regex(pattern),
            Some(OneOrMany::Many(names)) => FeedforwardModules::Names(names),
        };
        // PEFT would also require a list of feedforward_modules to be a
        // literal subset of a list of target_modules; that check rejects
        // PEFT's own "all-linear" saves, and the per-module rule does not
        // need it, so it is not made.
        let mut config = Ia3Config::from(targets)
            .fan_in_fan_out(self.fan_in_fan_out)
            .init(self.init_ia3_weights);
        config.feedforward_modules = feedforward_modules;
        config.metadata = metadata;
        Ok(config)
    }
}

// ---- the adapter ----------------------------------------------------------------

/// IA³ (`peft_type: "IA3"`): a learned vector `l` per layer that rescales
/// activations, as PEFT's `ia3.Linear`.
///
/// - On an ordinary layer it scales the output features:
///   `y = base(x) · l`, `l` stored `[out, 1]` (the bias is scaled too, being
///   part of `base(x)`).
/// - On a *feed-forward* layer it scales the input features:
///   `y = base(x · l)`, `l` stored `[1, in]` (the bias is not scaled).
///
/// Which layers are feed-forward is [`Ia3Config::feedforward_modules`]; a
/// fresh adapter starts at `l = 1` ([`Ia3Config::init_ia3_weights`]), so it
/// changes nothing until trained. Merging multiplies the weight (and, for an
/// ordinary layer, the bias) by `l`; unmerging divides it back out.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use candle_nn::{VarBuilder, VarMap};
/// use peft_core::{Ia3Adapter, Ia3Config};
/// use peft_core::prelude::*;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // W = [[1, 2, 3], [4, 5, 6]], b = [1, -1]: base([1, 1, 1]) = [7, 14]
/// let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev)?;
/// let b = Tensor::new(&[1f32, -1.], &dev)?;
/// let x = Tensor::new(&[[1f32, 1., 1.]], &dev)?;
///
/// // Output scaling, l = [2, 0.5] stored [out, 1]: [7 · 2, 14 · 0.5]
/// let mut layer = Linear::new(w.clone(), Some(b.clone()));
/// let l = Var::from_tensor(&Tensor::new(&[[2f32], [0.5]], &dev)?)?;
/// layer.add_adapter("default", Box::new(Ia3Adapter::new(l, false)?))?;
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[14.0, 7.0]]);
/// layer.merge()?; // W'[o, i] = W[o, i] · l[o], b' = b · l
/// assert_eq!(layer.weight()?.to_vec2::<f32>()?, [[2.0, 4.0, 6.0], [2.0, 2.5, 3.0]]);
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[14.0, 7.0]]);
///
/// // Input scaling (feed-forward), l = [1, 2, 3] stored [1, in]:
/// // W · [1, 2, 3] + b = [14 + 1, 32 - 1]
/// let mut layer = Linear::new(w, Some(b));
/// let l = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.]], &dev)?)?;
/// layer.add_adapter("default", Box::new(Ia3Adapter::new(l, true)?))?;
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[15.0, 31.0]]);
///
/// // On a model: one vector per targeted layer, [out] or [in] elements.
/// #[derive(Adaptable)]
/// struct Mlp {
///     up: Linear,
///     down: Linear,
///     #[output_head]
///     head: Linear,
/// }
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let mut model = Mlp {
///     up: linear(4, 16, vb.pp("up"))?,
///     down: linear(16, 4, vb.pp("down"))?,
///     head: linear(4, 10, vb.pp("head"))?,
/// };
/// let config = Ia3Config::from(all_linear()).feedforward_modules(["down"]);
/// model.add_adapter("default", &config)?;
/// // up: l scales its 16 outputs; down (feed-forward): l scales its 16 inputs
/// assert_eq!(model.num_parameters().trainable, 16 + 16);
/// # Ok(())
/// # }
/// ```
///
/// # Feed-forward modules: PEFT's rule, exactly
///
/// PEFT decides per module, when it creates the layer
/// (`IA3Model._check_target_module_feedforward`):
///
/// - a list of names: feed-forward when the module path ends with one of the
///   names, **as a plain string suffix** (`str.endswith`). Unlike the
///   `target_modules` rule there is no dot boundary: `"proj"` makes
///   `mlp.down_proj` feed-forward, and `"down_proj"` matches `mlp.xdown_proj`
///   too. This is implemented as PEFT does it, so a config means the same on
///   both sides;
/// - a string: a regex that must match the whole path (`re.fullmatch`).
///
/// # Better than PEFT at loading, and at saving
///
/// PEFT's `IA3Config` refuses a config whose `feedforward_modules` list is not
/// literally a subset of its `target_modules` list. Saving `"all-linear"`
/// writes `target_modules` as full paths while `feedforward_modules` keeps the
/// short names, so PEFT cannot reload its own save. Here that check is not
/// made: each targeted module is feed-forward or not by the rule above, and
/// such a file loads.
///
/// Saving writes `target_modules` as the full paths of the adapted modules
/// (as for every adapter kind), so a list of short `feedforward_modules`
/// names would hit the same PEFT check. To keep the saved folder loadable by
/// Python PEFT, a non-empty list is saved as the equivalent regex string:
/// `["down_proj", "w0"]` becomes `".*(?:down_proj|w0)"` (`re.fullmatch` of
/// `.*` followed by a name is exactly `endswith`), which PEFT does not check
/// against `target_modules`. A regex is saved as given.
///
/// # Unmerging
///
/// PEFT unmerges by dividing by `l + 1e-8`, which silently returns wrong
/// weights when an entry of `l` is (close to) zero: the merge destroyed that
/// row or column. Here unmerging divides by `l` itself and refuses, with a
/// candle error naming the entry, when some `|l| < 1e-8` or an entry is not
/// finite; the model then stays merged, unchanged. Otherwise the base weights
/// come back up to float rounding.
///
/// An IA³ adapter on one linear layer: a trainable vector `l`, `[out, 1]`
/// (scales the output) or, on a feed-forward layer, `[1, in]` (scales the
/// input). Saved as `ia3_l`, in the shape PEFT saves it.
#[derive(Debug, Clone)]
pub struct Ia3Adapter {
    l: Var,
    feedforward: bool,
}

impl Ia3Adapter {
    /// An adapter from its vector: `l` is `[out, 1]` for an ordinary layer,
    /// `[1, in]` when `feedforward`.
    pub fn new(l: Var, feedforward: bool) -> CandleResult<Self> {
        let (rows, cols) = l.dims2()?;
        let ok = if feedforward { rows == 1 } else { cols == 1 };
        if !ok {
            candle_core::bail!(
                "IA³ vector of shape {:?}: expected {} for a {} layer",
                l.dims(),
                if feedforward { "[1, in]" } else { "[out, 1]" },
                if feedforward {
                    "feed-forward"
                } else {
                    "non-feed-forward"
                },
            );
        }
        Ok(Self { l, feedforward })
    }

    /// The vector `l`, `[out, 1]` or `[1, in]`.
    pub fn l(&self) -> &Var {
        &self.l
    }

    /// Whether the layer is feed-forward: `l` scales its input.
    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    /// `l` flattened (`[out]` or `[in]`), in `dtype`.
    fn scaling(&self, dtype: DType) -> CandleResult<Tensor> {
        self.l.as_tensor().flatten_all()?.to_dtype(dtype)
    }

    /// `l` in the shape that broadcasts over a weight `[out, in]`, checked
    /// against it.
    fn weight_factor(&self, weight: &Tensor) -> CandleResult<Tensor> {
        let (out, inp) = weight.dims2()?;
        let expected = if self.feedforward { [1, inp] } else { [out, 1] };
        if self.l.dims() != expected {
            candle_core::bail!(
                "IA³ vector of shape {:?} does not fit a weight of shape {:?} (expected {:?})",
                self.l.dims(),
                weight.dims(),
                expected
            );
        }
        self.l.as_tensor().to_dtype(weight.dtype())
    }

    /// `weights` with the weight, and the bias of a layer whose output `l`
    /// scales, multiplied (merge) or divided (unmerge) by `l`.
    fn rescaled(
        &self,
        weights: &LayerWeights,
        apply: impl Fn(&Tensor, &Tensor) -> CandleResult<Tensor>,
    ) -> Result<LayerWeights> {
        let factor = self.weight_factor(&weights.weight)?;
        let bias = match (&weights.bias, self.feedforward) {
            (Some(bias), false) => Some(apply(bias, &self.scaling(bias.dtype())?)?),
            (bias, _) => bias.clone(),
        };
        Ok(LayerWeights {
            weight: apply(&weights.weight, &factor)?,
            bias,
        })
    }

    /// Refuses to divide by an entry that merging has made irreversible.
    fn check_invertible(&self) -> CandleResult<()> {
        let values = self
            .l
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.abs() >= UNMERGE_MIN_ABS && v.is_finite()))
        {
            candle_core::bail!(
                "cannot unmerge IA³: ia3_l entry {i} is {v:e}; merging multiplied the weights by it, and \
                 dividing by |l| < {UNMERGE_MIN_ABS:e} or a non-finite l cannot restore them (the layer stays merged)"
            );
        }
        Ok(())
    }
}

impl Adapter for Ia3Adapter {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn composition(&self) -> Composition {
        if self.feedforward {
            Composition::TransformsInput
        } else {
            Composition::ScalesOutput
        }
    }

    fn transform_input(&self, x: &Tensor, _cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        if !self.feedforward {
            return Ok(None);
        }
        Ok(Some(x.broadcast_mul(&self.scaling(x.dtype())?)?))
    }

    fn forward(&self, _x: &Tensor, base_output: Tensor, _cx: ForwardContext<'_>) -> Result<Tensor> {
        if self.feedforward {
            // The input was scaled in transform_input.
            return Ok(base_output);
        }
        Ok(base_output.broadcast_mul(&self.scaling(base_output.dtype())?)?)
    }

    fn merge(&self, base: &LayerWeights) -> Result<LayerWeights> {
        self.rescaled(base, Tensor::broadcast_mul)
    }

    fn unmerge(&self, merged: &LayerWeights) -> Result<LayerWeights> {
        self.weight_factor(&merged.weight)?;
        self.check_invertible()?;
        self.rescaled(merged, Tensor::broadcast_div)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("ia3_l", self.l.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::FeedforwardModules;

    #[test]
    fn feedforward_names_are_plain_suffixes_as_in_peft() {
        let ff = FeedforwardModules::Names(vec!["down_proj".into()]);
        assert!(ff.matches("model.layers.0.mlp.down_proj").unwrap());
        assert!(ff.matches("down_proj").unwrap());
        // PEFT's `str.endswith`: no dot boundary.
        assert!(ff.matches("model.layers.0.mlp.xdown_proj").unwrap());
        assert!(!ff.matches("model.layers.0.mlp.down_proj.inner").unwrap());
        let ff = FeedforwardModules::Names(vec!["proj".into()]);
        assert!(ff.matches("mlp.up_proj").unwrap());
    }

    #[test]
    fn feedforward_regex_matches_the_whole_path() {
        let ff = FeedforwardModules::Regex(r".*\.mlp\.down_proj".into());
        assert!(ff.matches("model.layers.1.mlp.down_proj").unwrap());
        assert!(!ff.matches("model.layers.1.mlp.down_proj2").unwrap());
        assert!(FeedforwardModules::Regex("(".into()).matches("x").is_err());
    }

    #[test]
    fn saved_names_become_an_equivalent_regex() {
        let names = FeedforwardModules::Names(vec!["down_proj".into(), "w.0".into()]);
        let saved = names.to_peft_json();
        assert_eq!(saved, r".*(?:down_proj|w\.0)");
        let reread = FeedforwardModules::Regex(saved.as_str().unwrap().to_owned());
        for path in [
            "a.down_proj",
            "xdown_proj",
            "a.w.0",
            "aw.0",
            "a.w00",
            "a.down_proj.b",
            "w_0",
        ] {
            assert_eq!(names.matches(path).unwrap(), reread.matches(path).unwrap(), "{path}");
        }
        assert_eq!(FeedforwardModules::default().to_peft_json(), serde_json::json!([]));
    }
}
