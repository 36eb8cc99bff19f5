//! A LoRA `adapter_config.json` as PEFT writes it, read into a [`LoraConfig`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::RankSettings;
use crate::kinds::config_file::{
    check_other_fields, ordered_map, refuse_modules_to_save, unsupported, PeftMetadata, TargetFields,
};
use crate::kinds::lora::{LoraConfig, LoraInit};

/// `adapter_config.json` of a LoRA adapter, as PEFT writes it.
#[derive(Deserialize)]
pub(super) struct LoraConfigFile {
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
    RankSettings::default().r
}

fn default_alpha() -> f64 {
    RankSettings::default().alpha
}

impl LoraConfigFile {
    pub(super) fn into_config(self, path: &Path) -> Result<LoraConfig> {
        if let Some(bias) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported(
                "bias",
                format!("{bias:?}"),
                "only bias = \"none\" is implemented",
            ));
        }
        refuse_modules_to_save(self.modules_to_save.as_ref())?;
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
            .dropout(self.lora_dropout)
            .rslora(self.use_rslora)
            .dora(self.use_dora)
            .init(init)
            .fan_in_fan_out(self.fan_in_fan_out);
        config.ranks = RankSettings {
            r: self.r,
            alpha: self.lora_alpha,
            rank_pattern: self.rank_pattern,
            alpha_pattern: self.alpha_pattern,
        };
        config.metadata = self.metadata;
        Ok(config)
    }
}
