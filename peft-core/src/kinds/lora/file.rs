//! LoRA's fields of `adapter_config.json` as PEFT writes them, read into a [`LoraConfig`].

use serde::Deserialize;
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::kinds::config::{default_alpha, default_rank, RankSettings, TrainedBias};
use crate::kinds::config_file::{ordered_map, unsupported, KindFields, NoFields, PeftMetadata};
use crate::kinds::lora::{LoraConfig, LoraInit, LORA_ONLY};
use crate::targets::{Targets, TokenIndices};

/// LoRA's own fields of `adapter_config.json`, as PEFT writes them.
#[derive(Deserialize)]
pub struct LoraFields {
    #[serde(default = "default_rank")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    #[serde(default, deserialize_with = "ordered_map")]
    rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered_map")]
    alpha_pattern: Vec<(String, f64)>,
    #[serde(default)]
    lora_dropout: f32,
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
    trainable_token_indices: Option<TokenIndicesField>,
}

/// `trainable_token_indices` as PEFT writes it: a list (the input
/// embedding's rows) or `{module: [rows]}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIndicesField {
    List(Vec<usize>),
    #[serde(deserialize_with = "ordered_map")]
    Modules(Vec<(String, Vec<usize>)>),
}

/// PEFT 0.21's LoRA options that this crate does not implement: refused
/// when set (see [`check_other_fields`](crate::config_file::check_other_fields)).
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
    "use_bdlora",
    "use_qalora",
    "velora_config",
];

impl KindFields for LoraFields {
    type Config = LoraConfig;
    type Family = NoFields;
    const UNIMPLEMENTED_OPTIONS: &'static [&'static str] = UNIMPLEMENTED_OPTIONS;

    fn into_config(self, _: NoFields, targets: Targets, metadata: PeftMetadata) -> Result<LoraConfig> {
        let bias = match self.bias.as_deref() {
            None => TrainedBias::None,
            Some(name) => TrainedBias::from_peft_name(name, LORA_ONLY).ok_or_else(|| PeftError::InvalidConfig {
                field: "bias",
                value: format!("{name:?}"),
                reason: "must be \"none\", \"all\" or \"lora_only\"",
            })?,
        };
        let init =
            match &self.init_lora_weights {
                None | Some(Value::Bool(true)) => LoraInit::Default,
                Some(Value::Bool(false)) => LoraInit::Random,
                Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
                Some(Value::String(s)) if s == "pissa" => LoraInit::Pissa,
                // PEFT compares "olora" case-insensitively.
                Some(Value::String(s)) if s.eq_ignore_ascii_case("olora") => LoraInit::Olora,
                Some(Value::String(s)) if pissa_niter(s).is_some() => LoraInit::PissaNiter(pissa_niter(s).unwrap_or(0)),
                Some(other) => return Err(unsupported(
                    "init_lora_weights",
                    other.to_string(),
                    "this initialisation (CorDA, LoftQ, EVA, ...) is not implemented; \"pissa\", \"pissa_niter_K\" and \"olora\" are",
                )),
            };
        let mut config = LoraConfig::from(targets)
            .dropout(self.lora_dropout)
            .rslora(self.use_rslora)
            .dora(self.use_dora)
            .init(init)
            .bias(bias)
            .fan_in_fan_out(self.fan_in_fan_out);
        config.ranks = RankSettings {
            r: self.r,
            alpha: self.lora_alpha,
            rank_pattern: self.rank_pattern,
            alpha_pattern: self.alpha_pattern,
        };
        config.metadata = metadata;
        config.trainable_token_indices = self.trainable_token_indices.map(|field| match field {
            TokenIndicesField::List(indices) => TokenIndices::Embedding(indices),
            TokenIndicesField::Modules(modules) => TokenIndices::Modules(modules),
        });
        Ok(config)
    }
}

/// `K` of PEFT's `"pissa_niter_K"`.
fn pissa_niter(init: &str) -> Option<usize> {
    init.strip_prefix("pissa_niter_")?.parse().ok()
}
