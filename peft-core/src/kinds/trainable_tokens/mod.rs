//! Trainable tokens (`peft_type: "TRAINABLE_TOKENS"`, and LoRA's
//! `trainable_token_indices`): the embedding rows of a few tokens train,
//! the rest of the table stays frozen, as PEFT's `TrainableTokensLayer`.
//!
//! An output head tied to the embedding (its weight is the embedding table)
//! follows the same rows: attaching gives it an adapter sharing the
//! embedding's tensor ([`Adapter::tied`](crate::Adapter::tied)).
//!
//! This folder: the config and its file fields (here), the adapter
//! (`adapter.rs`).

mod adapter;

pub use adapter::TrainableTokensAdapter;

use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::{config_identity, setters, AdapterConfig};
use crate::kinds::config_file::{saved_fields, KindFields, LayerChecks, NoFields, PeftMetadata, WithMetadata};
use crate::kinds::registry::kind;
use crate::layer::{Adapter, Layer};
use crate::targets::{modules, Targets};

/// PEFT's `peft_type` for trainable tokens.
pub const PEFT_TYPE: &str = "TRAINABLE_TOKENS";

/// The adapter for LoRA's `trainable_token_indices` on the layer at
/// `module`: the base's rows, saved under PEFT's
/// `token_adapter.trainable_tokens_delta`.
pub(crate) fn lora_token_adapter(module: &str, layer: &Layer, indices: &[usize]) -> Result<TrainableTokensAdapter> {
    TrainableTokensAdapter::with_key(module, layer, indices, true, adapter::LORA_DELTA_KEY)
}

/// PEFT's `TrainableTokensConfig`: which embedding (`target_modules`) and
/// which of its rows (`token_indices`) train.
///
/// ```
/// use peft_core::{modules, TrainableTokensConfig};
/// let config = TrainableTokensConfig::new([3, 7, 60]).target_modules(modules(["embed_tokens"]));
/// assert_eq!(config.token_indices, [3, 7, 60]);
/// assert!(config.init_weights);
/// ```
#[derive(Debug, Clone)]
pub struct TrainableTokensConfig {
    /// The embedding layers whose rows train. Default: `embed_tokens`
    /// (PEFT's fallback; PEFT first asks the model for its input
    /// embedding, which this crate does not know by name).
    pub target_modules: Targets,
    /// The tokens whose rows train.
    pub token_indices: Vec<usize>,
    /// PEFT's `init_weights` (default true): the trainable rows start as
    /// copies of the base's, so a fresh adapter changes nothing; false draws
    /// them from N(0, 1).
    pub init_weights: bool,
    /// PEFT's descriptive fields, saved as given.
    pub metadata: PeftMetadata,
}

impl TrainableTokensConfig {
    /// The rows `token_indices` of `embed_tokens`.
    pub fn new(token_indices: impl IntoIterator<Item = usize>) -> Self {
        Self {
            target_modules: modules(["embed_tokens"]),
            token_indices: token_indices.into_iter().collect(),
            init_weights: true,
            metadata: PeftMetadata::default(),
        }
    }

    setters! {
        /// Sets the embedding layers whose rows train.
        target_modules => target_modules: Targets,
        /// Sets `init_weights` (true: copies of the base's rows; false: N(0, 1)).
        init_weights => init_weights: bool,
    }
}

impl WithMetadata for TrainableTokensConfig {
    fn metadata_mut(&mut self) -> &mut PeftMetadata {
        &mut self.metadata
    }
}

kind!(TrainableTokensConfig, PEFT_TYPE, TrainableTokensFields);

impl AdapterConfig for TrainableTokensConfig {
    config_identity!(PEFT_TYPE);

    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(TrainableTokensAdapter::new(
            module,
            layer,
            &self.token_indices,
            self.init_weights,
        )?))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let mut fields = saved_fields(PEFT_TYPE, &self.target_modules, &self.metadata);
        // TrainableTokensConfig has none of these: the exact list of paths says it all.
        for field in ["layers_to_transform", "layers_pattern", "exclude_modules"] {
            fields.remove(field);
        }
        if fields.get("modules_to_save") == Some(&Value::Null) {
            fields.remove("modules_to_save");
        }
        fields.insert("token_indices".into(), Value::from(self.token_indices.clone()));
        fields.insert("init_weights".into(), Value::Bool(self.init_weights));
        fields
    }
}

/// The kind's own fields of `adapter_config.json`, as PEFT writes them
/// (every PEFT 0.21 option of this kind is read).
#[derive(Deserialize)]
pub struct TrainableTokensFields {
    #[serde(default)]
    token_indices: Vec<usize>,
    #[serde(default = "default_init")]
    init_weights: bool,
}

fn default_init() -> bool {
    true
}

impl KindFields for TrainableTokensFields {
    type Config = TrainableTokensConfig;
    type Family = NoFields;
    // TrainableTokensConfig has neither layers_to_transform nor layers_pattern.
    const LAYER_CHECKS: LayerChecks = LayerChecks::None;

    fn into_config(self, _: NoFields, targets: Targets, metadata: PeftMetadata) -> Result<TrainableTokensConfig> {
        let mut config = TrainableTokensConfig::new(self.token_indices)
            .target_modules(targets)
            .init_weights(self.init_weights);
        config.metadata = metadata;
        Ok(config)
    }
}
