//! LoRA on an embedding, as PEFT's `lora.Embedding` (see
//! [`Embedding`](crate::Embedding) for the slot).

use candle_core::{DType, Result as CandleResult, Tensor, Var};

use crate::error::Result;
use crate::kinds::lora::{LoraAdapter, PEFT_TYPE};
use crate::layer::{adapter_identity, Adapter, Composition, ForwardContext};

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

impl Adapter for LoraEmbeddingAdapter {
    adapter_identity!(PEFT_TYPE, Composition::Additive);

    fn forward(&self, ids: &Tensor, base_output: Tensor, _: ForwardContext<'_>) -> Result<Tensor> {
        // Aᵀ[x]: the columns of A for the tokens, [n, r]; then · s·Bᵀ.
        let columns = self.lora.a().as_tensor().index_select(&ids.flatten_all()?, 1)?;
        let delta = (columns.t()?.matmul(&self.lora.b().as_tensor().t()?)? * self.lora.scale())?;
        let delta = delta.reshape(base_output.shape())?;
        Ok((base_output + delta)?)
    }

    fn delta_weight(&self, dtype: DType) -> Result<Option<Tensor>> {
        Ok(Some(self.lora.delta_weight(dtype)?))
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("lora_embedding_A", self.lora.a().clone()),
            ("lora_embedding_B", self.lora.b().clone()),
        ]
    }
}
