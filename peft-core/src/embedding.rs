//! [`Embedding`]: the drop-in for `candle_nn::Embedding` that can hold
//! adapters, and LoRA for embeddings as PEFT's `lora.Embedding`.
//!
//! An embedding lookup is a linear map on one-hot inputs, so the slot is a
//! [`Linear`] whose weight `[dim, vocab]` is the table's transpose: targets,
//! several adapters, merging and PEFT's file format work as for linear
//! layers. `all_linear()` leaves embeddings alone; select them by name or
//! regex (`modules(["embed_tokens"])`).
//!
//! LoRA on an embedding (PEFT's keys `lora_embedding_A` `[r, vocab]` and
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
//! embed.add_adapter("default", LoraEmbeddingAdapter::new(a, b, 0.5)?)?;
//! let ids = Tensor::new(&[2u32, 0], &dev)?;
//! // token 2: [1, 1] + 0.5·3·[1, -1]; token 0: [1, 0] + 0.5·1·[1, -1]
//! assert_eq!(embed.forward(&ids)?.to_vec2::<f32>()?, [[2.5, -0.5], [1.5, -0.5]]);
//! embed.layer_mut().merge()?;
//! assert_eq!(embed.embeddings()?.to_vec2::<f32>()?[2], [2.5, -0.5]);
//! # Ok(())
//! # }
//! ```

use candle_core::{Module, Result as CandleResult, Tensor, Var};

use crate::adaptable::{Adaptable, Role, Visitor, VisitorMut};
use crate::adapter::{ForwardContext, LinearAdapter, LinearWeights};
use crate::error::Result;
use crate::linear::Linear;
use crate::lora::LoraAdapter;
use crate::path::ModulePath;

/// An embedding table `[vocab, dim]` that adapters can be attached to.
///
/// With no adapter, its forward pass is exactly `candle_nn::Embedding`'s.
#[derive(Debug, Clone)]
pub struct Embedding {
    layer: Linear,
    hidden_size: usize,
}

impl Embedding {
    /// A slot for `table` `[vocab, hidden_size]`.
    pub fn new(table: Tensor, hidden_size: usize) -> CandleResult<Self> {
        Ok(Self {
            layer: Linear::lookup(table)?,
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
    pub fn layer(&self) -> &Linear {
        &self.layer
    }

    /// Mutable [`layer`](Self::layer).
    pub fn layer_mut(&mut self) -> &mut Linear {
        &mut self.layer
    }

    /// Attaches an adapter under `name`, active.
    pub fn add_adapter(&mut self, name: &str, adapter: impl LinearAdapter + 'static) -> Result<()> {
        self.layer.add_adapter(name, Box::new(adapter))
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

/// Reported to visitors as a layer of kind [`LayerKind::Embedding`](crate::LayerKind).
impl Adaptable for Embedding {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_linear(path, Role::Hidden, &self.layer);
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_linear_mut(path, Role::Hidden, &mut self.layer);
    }
}

/// LoRA on an embedding, as PEFT's `lora.Embedding`: `A` `[r, vocab]`,
/// `B` `[dim, r]`, `y = table[x] + s·(Aᵀ[x])·Bᵀ`, no dropout.
#[derive(Debug, Clone)]
pub struct LoraEmbeddingAdapter {
    /// `A` `[r, in = vocab]` and `B` `[out = dim, r]`: a LoRA on the one-hot view.
    lora: LoraAdapter,
}

impl LoraEmbeddingAdapter {
    /// An adapter from `a` `[r, vocab]`, `b` `[dim, r]` and the scale `s`.
    pub fn new(a: Var, b: Var, scale: f64) -> CandleResult<Self> {
        Ok(Self {
            lora: LoraAdapter::new(a, b, scale, 0.0)?,
        })
    }

    /// `A` `[r, vocab]`.
    pub fn a(&self) -> &Var {
        self.lora.a()
    }

    /// `B` `[dim, r]`.
    pub fn b(&self) -> &Var {
        self.lora.b()
    }
}

impl LinearAdapter for LoraEmbeddingAdapter {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn forward(&self, ids: &Tensor, base_output: Tensor, _: ForwardContext<'_>) -> CandleResult<Tensor> {
        // Aᵀ[x]: the columns of A for the tokens, [n, r]; then · s·Bᵀ.
        let columns = self.lora.a().as_tensor().index_select(&ids.flatten_all()?, 1)?;
        let delta = (columns.t()?.matmul(&self.lora.b().as_tensor().t()?)? * self.lora.scale())?;
        let delta = delta.reshape(base_output.shape())?;
        base_output + delta
    }

    fn merge(&self, base: &LinearWeights) -> CandleResult<LinearWeights> {
        self.lora.merge(base)
    }

    fn unmerge(&self, merged: &LinearWeights) -> CandleResult<LinearWeights> {
        self.lora.unmerge(merged)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("lora_embedding_A", self.lora.a().clone()),
            ("lora_embedding_B", self.lora.b().clone()),
        ]
    }

    fn clone_box(&self) -> Box<dyn LinearAdapter> {
        Box::new(self.clone())
    }
}
