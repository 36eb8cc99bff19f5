//! What every adapter configuration offers to the model-level operations,
//! and the rank settings LoRA, LoHa and LoKr share.

use std::path::Path;

use crate::error::{PeftError, Result};
use crate::kinds::config_file::{pattern_value, KindFields, KindFile};
use crate::layer::{Adapter, Layer, LayerKind, LayerWeights};
use crate::targets::{Targets, TokenIndices};

/// A configuration that can build one adapter per targeted layer.
///
/// [`LoraConfig`](crate::LoraConfig) implements it; other adapter kinds do the
/// same, and [`PeftModel::add_adapter`](crate::PeftModel::add_adapter) accepts
/// any of them.
///
/// Configs are plain data, `Send + Sync`, so a read adapter can be shared
/// by threads (a candle `VarBuilder` backend merging it must be).
pub trait AdapterConfig: Send + Sync {
    /// PEFT's name for the kind (`"LORA"`).
    fn peft_type(&self) -> &'static str;

    /// The layers to adapt.
    fn targets(&self) -> &Targets;

    /// Checks every field; called before the model is touched. The default
    /// checks the targets' regexes.
    fn validate(&self) -> Result<()> {
        self.targets().validate()
    }

    /// Checks, before any adapter is made, that this config fits the layer
    /// at `module`. When loading, `file_values` is how many values the
    /// adapter file holds for this module: LoRA and LoHa refuse a rank larger
    /// than that ([`check_rank`]), so that a corrupt or hostile `r` cannot
    /// make loading allocate beyond the file's size. The default checks
    /// nothing.
    fn check_layer(&self, module: &str, layer: &Layer, file_values: Option<usize>) -> Result<()> {
        let _ = (module, layer, file_values);
        Ok(())
    }

    /// Which base biases train beside the adapters (PEFT's `bias`); the
    /// default trains none.
    fn trained_bias(&self) -> TrainedBias {
        TrainedBias::None
    }

    /// The embedding rows that train beside the adapter (LoRA's
    /// `trainable_token_indices`): attaching puts a
    /// [`TrainableTokensAdapter`](crate::TrainableTokensAdapter) on those
    /// modules, and on an output head tied to them. The default: none.
    fn trainable_tokens(&self) -> Option<&TokenIndices> {
        None
    }

    /// A fresh adapter for the layer at `module`, on its device and dtype.
    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>>;

    /// The base weights the layer at `module` must have once `adapter`
    /// (just made by [`new_adapter`](Self::new_adapter), before any saved
    /// tensor is loaded into it) is attached, for a kind whose
    /// initialisation rewrites them (LoRA's PiSSA and OLoRA: `W - s·B·A`);
    /// `None`, the default, leaves the base as it is. Called for every
    /// targeted layer before the model changes; the bases are replaced
    /// when the adapters are attached, and stay so when the adapter is
    /// deleted (as in PEFT).
    fn initial_base(&self, module: &str, layer: &Layer, adapter: &dyn Adapter) -> Result<Option<LayerWeights>> {
        let _ = (module, layer, adapter);
        Ok(None)
    }

    /// The fields of PEFT's `adapter_config.json` for this config, except
    /// `target_modules`, which saving fills with the adapted modules.
    fn to_peft_config(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("peft_type".into(), self.peft_type().into());
        fields
    }
}

/// Which biases of the base model train beside an adapter: PEFT's `bias`
/// field (`"none"`, `"all"`, `"lora_only"`).
///
/// A trained bias belongs to the base layer, not to the adapter, as in PEFT:
/// every adapter of the layer and the model with adapters disabled compute
/// with it, and loading an adapter file that holds biases writes them into
/// the base. Only biases of adapter slots (`Linear`, `Conv1d`, `Conv2d`
/// fields) can train here; with [`All`](Self::All), a bias held outside a slot
/// (a `LayerNorm`'s) is refused with [`PeftError::UnsupportedOption`] naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TrainedBias {
    /// `"none"`: biases stay frozen (the default).
    #[default]
    None,
    /// `"all"`: every bias of the model trains; saved as
    /// `<module>.base_layer.bias` for adapted layers and `<module>.bias`
    /// for the others.
    All,
    /// `"lora_only"`: the biases of the adapted layers train; saved as
    /// `<module>.base_layer.bias`.
    AdaptedLayers,
}

impl TrainedBias {
    /// PEFT's value of `bias` for this choice (`adapted` is the kind's
    /// `"<kind>_only"` spelling, `"lora_only"` for LoRA).
    pub fn peft_name(self, adapted: &'static str) -> &'static str {
        match self {
            TrainedBias::None => "none",
            TrainedBias::All => "all",
            TrainedBias::AdaptedLayers => adapted,
        }
    }

    /// Reads PEFT's value of `bias` (`"none"`, `"all"`, or `adapted`, the
    /// kind's `"<kind>_only"`); `None` for anything else.
    pub fn from_peft_name(name: &str, adapted: &str) -> Option<TrainedBias> {
        match name {
            "none" => Some(TrainedBias::None),
            "all" => Some(TrainedBias::All),
            _ if name == adapted => Some(TrainedBias::AdaptedLayers),
            _ => None,
        }
    }
}

/// A config type that PEFT's files name: its `peft_type` and how it is read
/// from `adapter_config.json`. Register it with one line,
/// `register_adapter_kind!(MyConfig);`, and `load_adapter` dispatches to it.
pub trait PeftConfig: AdapterConfig + Sized + 'static {
    /// PEFT's `peft_type` for this kind (`"LORA"`).
    const PEFT_TYPE: &'static str;

    /// The kind's own fields of `adapter_config.json`, read beside the
    /// fields every kind shares (targets, metadata, `modules_to_save`).
    type Fields: KindFields<Config = Self>;

    /// Parses `adapter_config.json` (its text, and its path for error
    /// messages), refusing what this kind cannot honour. The default reads
    /// a [`KindFile`] of [`Fields`](Self::Fields).
    fn from_json(text: &str, path: &Path) -> Result<Self> {
        KindFile::<Self::Fields>::parse(text, path)
    }
}

/// Refuses a layer that is not a plain linear layer, for adapter kinds that
/// only have a linear form (as in PEFT).
pub(crate) fn require_linear(peft_type: &str, module: &str, layer: &Layer) -> Result<()> {
    if layer.kind() != LayerKind::Linear {
        return Err(not_implemented(format!(
            "{peft_type} adapters are not implemented for {:?} layers (module `{module}`)",
            layer.kind()
        )));
    }
    Ok(())
}

/// [`PeftError::InvalidConfig`]: `field` = `value` is out of its range.
pub(crate) fn invalid_config(field: &'static str, value: impl ToString, reason: &'static str) -> PeftError {
    PeftError::InvalidConfig {
        field,
        value: value.to_string(),
        reason,
    }
}

/// An adapter kind's refusal of a layer it has no form for.
pub(crate) fn not_implemented(message: String) -> PeftError {
    PeftError::Candle(candle_core::Error::Msg(message))
}

/// Refuses a rank `r` larger than `file_values`, the number of values the
/// adapter file holds for the module: every rank-`r` factor has at least `r`
/// values, so such a file cannot match its config, and making the adapter
/// first would allocate whatever `r` asks for (`"r": 1000000000000`). Adding
/// an adapter from code (`file_values` = `None`) has no limit, as in PEFT.
pub fn check_rank(module: &str, r: usize, file_values: Option<usize>) -> Result<()> {
    match file_values {
        Some(values) if r > values => Err(PeftError::RankBeyondFile {
            module: module.to_owned(),
            r,
            values,
        }),
        _ => Ok(()),
    }
}

/// The rank `r`, the scaling numerator `alpha` and their per-module
/// overrides: what LoRA (`r`, `lora_alpha`), LoHa and LoKr (`r`, `alpha`)
/// share, with PEFT's defaults (8 and 8).
///
/// ```
/// use peft_core::{modules, LohaConfig, WithRank};
/// let config = LohaConfig::from(modules(["q_proj", "v_proj"])).rank(4).alpha(8.0).rank_for("v_proj", 2);
/// assert_eq!(config.ranks().rank_and_alpha("layers.0.v_proj")?, (2, 8.0));
/// assert_eq!(config.ranks().rank_and_alpha("layers.0.q_proj")?, (4, 8.0));
/// # Ok::<(), peft_core::PeftError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RankSettings {
    /// The rank `r` (default 8).
    pub r: usize,
    /// `alpha` (default 8): the update is scaled by `alpha / r`
    /// (`alpha / √r` with rsLoRA).
    pub alpha: f64,
    /// Per-module ranks: the first entry whose regex matches a dotted suffix
    /// of the module path gives its `r` (PEFT's `rank_pattern`, in order).
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, matched as `rank_pattern` (PEFT's `alpha_pattern`).
    pub alpha_pattern: Vec<(String, f64)>,
}

impl Default for RankSettings {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
        }
    }
}

impl RankSettings {
    /// `r` and `alpha` for the module at `path`, after `rank_pattern` and
    /// `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = pattern_value(&self.rank_pattern, path)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path)?.unwrap_or(self.alpha);
        Ok((r, alpha))
    }

    /// Checks that every rank is at least 1, every alpha finite and
    /// positive, and every pattern compiles. `alpha_field` is the kind's
    /// name for alpha in error messages (`lora_alpha` or `alpha`).
    pub fn validate(&self, alpha_field: &'static str) -> Result<()> {
        let ranks = std::iter::once(self.r).chain(self.rank_pattern.iter().map(|(_, r)| *r));
        if let Some(r) = ranks.into_iter().find(|&r| r == 0) {
            return Err(invalid_config("r", r, "the rank must be at least 1"));
        }
        let alphas = std::iter::once(self.alpha).chain(self.alpha_pattern.iter().map(|(_, a)| *a));
        if let Some(alpha) = alphas.into_iter().find(|a| !(*a > 0.0 && a.is_finite())) {
            return Err(invalid_config(alpha_field, alpha, "must be a finite number > 0"));
        }
        // Compile every pattern once, so a bad one is reported before any layer changes.
        pattern_value(&self.rank_pattern, "")?;
        pattern_value(&self.alpha_pattern, "")?;
        Ok(())
    }

    /// Refuses a rank for `module` larger than the adapter file holds
    /// values for (see [`check_rank`]).
    pub fn check_layer(&self, module: &str, file_values: Option<usize>) -> Result<()> {
        let (r, _) = self.rank_and_alpha(module)?;
        check_rank(module, r, file_values)
    }

    /// The settings as PEFT's fields (`r`, `alpha_field`, `rank_pattern`,
    /// `alpha_pattern`), patterns in their order.
    pub fn peft_fields(&self, alpha_field: &str) -> Vec<(String, serde_json::Value)> {
        use crate::kinds::config_file::number;
        use serde_json::Value;
        vec![
            ("r".to_owned(), Value::from(self.r)),
            (alpha_field.to_owned(), number(self.alpha)),
            (
                "rank_pattern".to_owned(),
                self.rank_pattern
                    .iter()
                    .map(|(k, r)| (k.clone(), Value::from(*r)))
                    .collect(),
            ),
            (
                "alpha_pattern".to_owned(),
                self.alpha_pattern
                    .iter()
                    .map(|(k, a)| (k.clone(), number(*a)))
                    .collect(),
            ),
        ]
    }
}

/// PEFT's default rank, for a kind's `#[serde(default = ...)]`.
pub(crate) fn default_rank() -> usize {
    RankSettings::default().r
}

/// PEFT's default alpha, for a kind's `#[serde(default = ...)]`.
pub(crate) fn default_alpha() -> f64 {
    RankSettings::default().alpha
}

/// Builder methods for the [`RankSettings`] of LoRA, LoHa and LoKr configs.
pub trait WithRank: Sized {
    /// The config's rank settings.
    fn ranks(&self) -> &RankSettings;

    /// The config's rank settings, mutably.
    fn ranks_mut(&mut self) -> &mut RankSettings;

    /// Sets the rank `r`.
    fn rank(mut self, r: usize) -> Self {
        self.ranks_mut().r = r;
        self
    }

    /// Sets `alpha` (PEFT's `lora_alpha` for LoRA).
    fn alpha(mut self, alpha: f64) -> Self {
        self.ranks_mut().alpha = alpha;
        self
    }

    /// Adds a `rank_pattern` entry: modules matching `pattern` get rank `r`.
    fn rank_for(mut self, pattern: &str, r: usize) -> Self {
        self.ranks_mut().rank_pattern.push((pattern.to_owned(), r));
        self
    }

    /// Adds an `alpha_pattern` entry: modules matching `pattern` get `alpha`.
    fn alpha_for(mut self, pattern: &str, alpha: f64) -> Self {
        self.ranks_mut().alpha_pattern.push((pattern.to_owned(), alpha));
        self
    }

    /// `r` and `alpha` for the module at `path`, after the patterns.
    fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        self.ranks().rank_and_alpha(path)
    }
}

// ---- what every kind's config writes alike ----------------------------------

/// Builder methods that set one field each: `setters! { /// doc
/// name => field: Type, ... }` inside an `impl` block gives
/// `pub fn name(mut self, value: Type) -> Self`.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident => $field:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}
pub(crate) use setters;

/// For a kind's config struct with the fields `target_modules: Targets`
/// and `metadata: PeftMetadata`: `Default` (targets [`all_linear()`](crate::all_linear)),
/// the `target_modules` builder and `WithMetadata`.
macro_rules! config_basics {
    ($config:ty) => {
        impl Default for $config {
            fn default() -> Self {
                $crate::targets::all_linear().into()
            }
        }

        impl $config {
            /// Sets the targets (`target_modules` and the filters that go with it).
            pub fn target_modules(mut self, targets: $crate::targets::Targets) -> Self {
                self.target_modules = targets;
                self
            }
        }

        impl $crate::kinds::config_file::WithMetadata for $config {
            fn metadata_mut(&mut self) -> &mut $crate::kinds::config_file::PeftMetadata {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use config_basics;

/// `peft_type()` and `targets()` of an `impl AdapterConfig` for a config
/// struct with a `target_modules` field: `config_identity!(PEFT_TYPE);`.
macro_rules! config_identity {
    ($peft_type:expr) => {
        fn peft_type(&self) -> &'static str {
            $peft_type
        }

        fn targets(&self) -> &$crate::targets::Targets {
            &self.target_modules
        }
    };
}
pub(crate) use config_identity;
