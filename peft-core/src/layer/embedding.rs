//! [`Embedding`]: the drop-in for `candle_nn::Embedding` that can hold
//! adapters.
//!
//! An embedding lookup is a linear map on one-hot inputs, so the slot is a
//! [`Layer`] whose weight `[dim, vocab]` is the table's transpose: targets,
//! several adapters, merging and PEFT's file format work as for linear
//! layers. `all_linear()` leaves embeddings alone; select them by name or
//! regex (`modules(["embed_tokens"])`).
//!
//! LoRA on an embedding is [`LoraEmbeddingAdapter`](crate::LoraEmbeddingAdapter) (PEFT's keys `lora_embedding_A` `[r, vocab]` and
//! `lora_embedding_B` `[dim, r]`, no dropout): `y = table[x] + s·(Aᵀ[x])·Bᵀ`.
//!
//! ```
//! use candle_core::{Device, Module, Tensor, Var};
//! use peft_core::{Embedding, LoraEmbeddingAdapter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // vocab 3, dim 2
//! let table = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
//! let mut embed = Embedding::new(table, 2)?;
//! // r = 1: A = [[1, 2, 3]] ([r, vocab]), B = [[1], [-1]] ([dim, r]), scale 0.5
//! let a = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.]], &dev)?)?;
//! let b = Var::from_tensor(&Tensor::new(&[[1f32], [-1.]], &dev)?)?;
//! embed.layer_mut().add_adapter("default", Box::new(LoraEmbeddingAdapter::new(a, b, 0.5)?))?;
//! let ids = Tensor::new(&[2u32, 0], &dev)?;
//! // token 2: [1, 1] + 0.5·3·[1, -1]; token 0: [1, 0] + 0.5·1·[1, -1]
//! assert_eq!(embed.forward(&ids)?.to_vec2::<f32>()?, [[2.5, -0.5], [1.5, -0.5]]);
//! embed.layer_mut().merge()?;
//! assert_eq!(embed.embeddings()?.to_vec2::<f32>()?[2], [2.5, -0.5]);
//! # Ok(())
//! # }
//! ```

use candle_core::{Module, Result as CandleResult, Tensor};

use crate::layer::slot::Layer;

/// An embedding table `[vocab, dim]` that adapters can be attached to.
///
/// With no adapter, its forward pass is exactly `candle_nn::Embedding`'s.
#[derive(Debug, Clone)]
pub struct Embedding {
    layer: Layer,
    hidden_size: usize,
}

impl Embedding {
    /// A slot for `table` `[vocab, hidden_size]`.
    pub fn new(table: Tensor, hidden_size: usize) -> CandleResult<Self> {
        Ok(Self {
            layer: Layer::lookup(table)?,
            hidden_size,
        })
    }

    /// The table `[vocab, dim]` (with merged adapters folded in).
    pub fn embeddings(&self) -> CandleResult<Tensor> {
        match self.layer.lookup_table() {
            Some(table) => Ok(table.clone()),
            // A layer put in through `layer_mut`: its weight is `[dim, vocab]`.
            None => self.layer.weight()?.t(),
        }
    }

    /// The embedding dimension.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The slot as the linear layer it is on one-hot inputs (weight
    /// `[dim, vocab]`): adapters, merging, activity.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// Mutable [`layer`](Self::layer).
    pub fn layer_mut(&mut self) -> &mut Layer {
        &mut self.layer
    }
}

impl TryFrom<candle_nn::Embedding> for Embedding {
    type Error = candle_core::Error;

    /// Fails when the table is not 2-D (`candle_nn::Embedding::new` does not check).
    fn try_from(embedding: candle_nn::Embedding) -> CandleResult<Self> {
        let hidden_size = embedding.hidden_size();
        Self::new(embedding.embeddings().clone(), hidden_size)
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> CandleResult<Tensor> {
        self.layer.forward(ids)
    }
}

/// Creates or loads an embedding table `weight` `[vocab, dim]`, as
/// [`candle_nn::embedding()`] does.
pub fn embedding(vocab: usize, dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Embedding> {
    candle_nn::embedding(vocab, dim, vb).and_then(Embedding::try_from)
}
