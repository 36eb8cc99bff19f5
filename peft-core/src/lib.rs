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
mod adapter;
mod config;
pub mod config_file;
mod conv;
pub mod dora;
mod embedding;
mod error;
pub mod fused;
pub mod ia3;
mod io;
mod linear;
pub mod loha;
pub mod lokr;
mod lora;
mod model;
pub mod ops;
mod path;
pub mod quantized;
mod registry;
mod targets;

pub use adaptable::{
    visit_child, visit_child_mut, visit_child_with, visit_child_with_mut, Adaptable, LayerKind, OutputHead, Role,
    Visitor, VisitorMut,
};
pub use adapter::{ForwardContext, LinearAdapter, LinearWeights};
pub use config::{check_rank, AdapterConfig};
pub use conv::{conv1d, conv2d, Conv1d, Conv2d, ConvGeometry, LoraConvAdapter};
pub use dora::DoraAdapter;
pub use embedding::{embedding, Embedding, LoraEmbeddingAdapter};
pub use error::{PeftError, Result};
pub use ia3::{FeedforwardModules, Ia3Adapter, Ia3Config};
pub use io::{adapter_dir, check_adapter_name, CONFIG_FILE, WEIGHTS_FILE};
pub use linear::{linear, linear_b, linear_fan_in_fan_out, linear_no_bias, Linear};
pub use loha::{LohaAdapter, LohaConfig};
pub use lokr::{LokrAdapter, LokrConfig};
pub use lora::{LoraAdapter, LoraConfig, LoraInit};
pub use model::{LayerMut, LayerRef, ParameterCount, PeftModel, DEFAULT_ADAPTER};
pub use path::ModulePath;
pub use quantized::QuantizedWeight;
pub use registry::{adapter_kind, adapter_kinds, AdapterKind, ParseConfig};
pub use targets::{all_linear, layer_index, modules, name_matches, regex, Targets};

/// `#[derive(Adaptable)]`: see the crate's README for the attributes.
#[cfg(feature = "derive")]
pub use peft_derive::Adaptable;

/// What a model file needs: the derive, the layer slot and its constructors,
/// targets, LoRA and the model API.
pub mod prelude {
    pub use crate::config_file::WithMetadata;
    #[cfg(feature = "derive")]
    pub use crate::Adaptable;
    pub use crate::{
        all_linear, linear, linear_b, linear_fan_in_fan_out, linear_no_bias, modules, regex, Linear, LoraConfig,
        LoraInit, PeftModel, Targets,
    };
}

/// Used by the code `#[derive(Adaptable)]` generates; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::adaptable::{visit_child_with, visit_child_with_mut, Adaptable, OutputHead, Visitor, VisitorMut};
    pub use crate::path::ModulePath;
    pub use inventory;
}
