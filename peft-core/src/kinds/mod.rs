//! Adapter kinds: what a PEFT kind is (`config.rs`: [`AdapterConfig`],
//! [`PeftConfig`], the shared [`RankSettings`]), how kinds are found by
//! `peft_type` (`registry.rs`) and read from `adapter_config.json`
//! (`config_file.rs`), then one room per kind: `lora/`, `ia3.rs`,
//! `lycoris/` (LoHa, LoKr). Sibling kinds never import each other.
//!
//! To add a kind: add a folder (or file) here with its config (implementing
//! `AdapterConfig` and `PeftConfig`) and its adapter (implementing
//! [`Adapter`](crate::Adapter)), declare it below, and register it with one
//! line, `crate::register_adapter_kind!(MyConfig);`.

pub(crate) mod config;
pub mod config_file;
pub(crate) mod ia3;
pub(crate) mod lora;
pub(crate) mod lycoris;
pub(crate) mod registry;

pub use config::{check_rank, AdapterConfig, PeftConfig, RankSettings, WithRank};
pub use ia3::{FeedforwardModules, Ia3Adapter, Ia3Config};
pub use lora::{DoraAdapter, LoraAdapter, LoraConfig, LoraConvAdapter, LoraEmbeddingAdapter, LoraInit};
pub use lycoris::{
    factorization, LohaAdapter, LohaConfig, LokrAdapter, LokrConfig, LokrFactor, LokrInit, LokrShapes, LycorisOptions,
    WithLycoris,
};
pub use registry::{adapter_kind, adapter_kinds, parse_config, AdapterKind, ParseConfig};
