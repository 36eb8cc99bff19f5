//! Parameter-efficient fine-tuning (LoRA and its family) for candle models.
//!
//! Write the model as plain structs, derive [`Adaptable`], mark the output
//! layer `#[output_head]`, and apply LoRA to every other linear layer:
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use peft_core::prelude::*;
//!
//! #[derive(Adaptable)]
//! struct Mlp {
//!     up: Linear,
//!     down: Linear,
//!     #[output_head]
//!     head: Linear,
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let mut model = Mlp {
//!     up: linear(4, 8, vb.pp("up"))?,
//!     down: linear(8, 4, vb.pp("down"))?,
//!     head: linear(4, 10, vb.pp("head"))?,
//! };
//! model.apply_lora(all_linear())?;
//! assert_eq!(model.adapted_modules(), ["down", "up"]);
//! // lora_A and lora_B of two layers, r = 8: 8*4 + 8*8 + 8*8 + 4*8
//! assert_eq!(model.num_parameters().trainable, 192);
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//!
//! Folders show the architecture; imports run one way, from the left to
//! the right of this list and never back (`tests/architecture.rs` checks
//! it on every `cargo test`):
//!
//! | room | what it holds |
//! | --- | --- |
//! | `error.rs`, `path.rs` | [`PeftError`], [`ModulePath`] |
//! | `kernels/` | CPU kernels, no PEFT logic: [`fused`], [`ops`], [`optim`], [`profile`], [`random`] (seedable initialisation and dropout) |
//! | `layer/` | the adapter slot [`Layer`] and the drop-ins that hold one ([`Linear`], [`Embedding`], [`Conv1d`], [`Conv2d`]); the adapter contract [`Adapter`]. Knows no adapter kind. |
//! | `adaptable.rs` | the walk: [`Adaptable`], [`Visitor`], the containers and the slots' impls |
//! | `targets.rs` | [`Targets`]: which layers an adapter goes on |
//! | `kinds/` | what a kind is ([`AdapterConfig`], [`PeftConfig`], [`RankSettings`], the registry), then one room per kind: `lora/`, `ia3.rs`, `lycoris/` (LoHa, LoKr). Sibling kinds never import each other. |
//! | `io.rs` | PEFT's file format only: bytes to (config, tensors) and back, atomic writes |
//! | `model/` | [`PeftModel`]: the one attach routine used by `add_adapter` and loading, merging, counting |
//!
//! To add a kind, add a folder (or file) under `kinds/` with its config,
//! the fields it reads from `adapter_config.json` and its adapter, and one
//! registration line: `kind!(MyConfig, PEFT_TYPE, MyFields);` (`kinds/mod.rs`
//! says more). A crate of your own does the same through the public API:
//! [`PeftConfig`] and [`register_adapter_kind!`]`(MyConfig);`.
//!
//! Types are re-exported here, flat; the kind modules are private. The
//! public modules are namespaces of helpers: [`ops`] and [`fused`] (CPU
//! kernels), [`config_file`] (for writing a kind's parser) and [`prelude`].

// Bad input must give an error, never a panic: see docs/ERRORS.md.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
#![warn(missing_docs)]

// Lets the derive's `::peft_core::...` paths resolve inside this crate's own tests.
extern crate self as peft_core;

mod adaptable;
mod error;
mod io;
mod kernels;
mod kinds;
mod layer;
mod model;
mod path;
mod targets;

pub use adaptable::{
    visit_child, visit_child_mut, visit_child_with, visit_child_with_mut, Adaptable, OutputHead, Role, Visitor,
    VisitorMut,
};
pub use error::{PeftError, Result};
pub use io::{adapter_weights_file, read_pickled_tensors, CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE};
pub use kernels::{block, fused, ops, optim, profile, random};
pub use kinds::config_file::{PeftMetadata, WithMetadata};
pub use kinds::{
    adapter_kind, adapter_kinds, check_rank, factorization, AdapterConfig, AdapterKind, DoraAdapter,
    FeedforwardModules, Ia3Adapter, Ia3Config, LohaAdapter, LohaConfig, LokrAdapter, LokrConfig, LokrFactor, LokrInit,
    LokrShapes, LoraAdapter, LoraConfig, LoraConvAdapter, LoraEmbeddingAdapter, LoraInit, LycorisOptions, ModuleCopy,
    ParseConfig, PeftConfig, RankSettings, TrainableTokensAdapter, TrainableTokensConfig, TrainedBias, WithLycoris,
    WithRank,
};
pub use layer::{
    conv1d, conv2d, embedding, linear, linear_b, linear_fan_in_fan_out, linear_no_bias, Adapter, CloneAdapter,
    Composition, Conv1d, Conv2d, ConvGeometry, DenseLowRank, Embedding, ForwardContext, Layer, LayerKind, LayerWeights,
    Linear, LowRankFactors, QuantizedWeight, BASE_ROWS,
};
pub use model::{
    adapter_dir, check_adapter_name, read_tensor_entries, split_adapter_key, AdapterSkeleton, BaseModule, Combination,
    CombineOptions, LayerMut, LayerRef, MajoritySign, ParameterCount, PeftModel, StandaloneAdapter, TensorEntry,
    DEFAULT_ADAPTER,
};
pub use path::ModulePath;
pub use targets::{all_linear, layer_index, modules, name_matches, peft_layer_index, regex, Targets, TokenIndices};

/// Helpers for writing an adapter kind's parser of `adapter_config.json`:
/// the target fields, the "is this option set?" check, JSON numbers as
/// Python writes them; and [`parse_config`](config_file::parse_config),
/// which dispatches a file to its kind.
pub mod config_file {
    pub use crate::kinds::config_file::*;
    pub use crate::kinds::parse_config;
}

/// `#[derive(Adaptable)]`: see `docs/guide/derive.md` for the attributes.
#[cfg(feature = "derive")]
pub use peft_derive::Adaptable;

/// What a model file needs: the derive, the slots and their constructors,
/// targets, LoRA, the model API and the config builders.
pub mod prelude {
    #[cfg(feature = "derive")]
    pub use crate::Adaptable;
    pub use crate::{
        all_linear, linear, linear_b, linear_fan_in_fan_out, linear_no_bias, modules, regex, Linear, LoraConfig,
        LoraInit, PeftModel, Targets, WithLycoris, WithMetadata, WithRank,
    };
}

/// Used by the code `#[derive(Adaptable)]` generates; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::adaptable::{
        visit_child_with, visit_child_with_mut, Adaptable, OutputHead, UsePeftLinear, Visitor, VisitorMut,
    };
    pub use crate::path::ModulePath;
    pub use inventory;
}
