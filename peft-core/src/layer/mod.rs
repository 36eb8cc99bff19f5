//! The adapter slot: a frozen base and the adapters attached to it by name.
//!
//! This folder knows the [`Adapter`] contract and never an adapter kind:
//! LoRA, IA³ and the rest live in `kinds/`, and what is special about one
//! (DoRA's state-dict key, IA³ scaling the input) is asked of the adapter.
//!
//! - `adapter.rs`: the contract ([`Adapter`], [`Composition`], [`ForwardContext`]);
//! - `base.rs`: the frozen base (dense, quantized, lookup, convolution),
//!   [`LayerWeights`], [`LayerKind`];
//! - `slot.rs`: [`Layer`], the slot: forward pass, adapters by name;
//! - `merge.rs`: merging a slot's adapters into its base, planned before committed;
//! - `batch.rs`: mixed batches, each row through its own adapter;
//! - `bias.rs`: the base bias trained beside the adapters (a config's `bias`);
//! - `linear.rs`, `embedding.rs`, `conv.rs`, `quantized.rs`: the drop-ins for
//!   candle-nn's layers that hold a slot, and their constructors.

pub(crate) mod adapter;
pub(crate) mod base;
pub(crate) mod batch;
pub(crate) mod bias;
pub(crate) mod conv;
pub(crate) mod embedding;
pub(crate) mod linear;
pub(crate) mod merge;
pub(crate) mod quantized;
pub(crate) mod slot;

pub use crate::kernels::block::{DenseLowRank, LowRankFactors};
pub(crate) use adapter::adapter_identity;
pub use adapter::{Adapter, CloneAdapter, Composition, ForwardContext};
pub use base::{LayerKind, LayerWeights};
pub use batch::BASE_ROWS;
pub use conv::{conv1d, conv2d, Conv1d, Conv2d, ConvGeometry};
pub use embedding::{embedding, Embedding};
pub use linear::{linear, linear_b, linear_fan_in_fan_out, linear_no_bias, Linear};
pub use quantized::QuantizedWeight;
pub use slot::Layer;
