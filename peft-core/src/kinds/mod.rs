//! Adapter kinds: what a PEFT kind is (`config.rs`: [`AdapterConfig`],
//! [`PeftConfig`], the shared [`RankSettings`]), how kinds are found by
//! `peft_type` (`registry.rs`) and read from `adapter_config.json`
//! (`config_file.rs`), then one room per kind: `lora/`, `ia3.rs`,
//! `lycoris/` (LoHa, LoKr), `trainable_tokens/` (also what LoRA's
//! `trainable_token_indices` attaches), and `modules_to_save.rs`, the whole copies any
//! kind's config may ask for. Sibling kinds never import each other.
//!
//! To add a kind: add a folder (or file) here with its config (implementing
//! [`AdapterConfig`]; `config_basics!` and `config_identity!` write what
//! every kind's config has alike), the fields it reads from
//! `adapter_config.json` ([`KindFields`](crate::config_file::KindFields))
//! and its adapter (implementing [`Adapter`](crate::Adapter)), declare it
//! below, and make it loadable with one line:
//! `kind!(MyConfig, PEFT_TYPE, MyFields);` (a crate of its own writes the
//! [`PeftConfig`] impl and `register_adapter_kind!(MyConfig);`).

pub(crate) mod config;
pub mod config_file;
pub(crate) mod ia3;
pub(crate) mod lora;
pub(crate) mod lycoris;
pub(crate) mod modules_to_save;
pub(crate) mod registry;
pub(crate) mod trainable_tokens;

pub use config::{check_rank, AdapterConfig, PeftConfig, RankSettings, TrainedBias, WithRank};
pub use ia3::{FeedforwardModules, Ia3Adapter, Ia3Config};
pub use lora::{DoraAdapter, LoraAdapter, LoraConfig, LoraConvAdapter, LoraEmbeddingAdapter, LoraInit};
pub use lycoris::{
    factorization, LohaAdapter, LohaConfig, LokrAdapter, LokrConfig, LokrFactor, LokrInit, LokrShapes, LycorisOptions,
    WithLycoris,
};
pub use modules_to_save::ModuleCopy;
pub use registry::{adapter_kind, adapter_kinds, parse_config, AdapterKind, ParseConfig};
pub use trainable_tokens::{TrainableTokensAdapter, TrainableTokensConfig};
