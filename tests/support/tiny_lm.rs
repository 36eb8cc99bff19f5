//! `TinyLM`, a plain torch module (not a transformers model), written with
//! `#[derive(Adaptable)]`.
//!
//! Paths are the torch module names: `blocks.0.q`, ..., `blocks.1.down`, and
//! `head`. PEFT's `"all-linear"` only leaves the output layer alone on a
//! transformers model (it asks `get_output_embeddings()`); on this model it
//! wrapped `head` too, and the reference adapter needed
//! `exclude_modules=["head"]`. Here `head` is marked `#[output_head]`, so
//! plain `all_linear()` selects the same 12 layers.
//!
//! Architecture:
//!
//! ```text
//! x = embed[input_ids]                                  vocab 48, dim 16
//! for blk in blocks:                                    2 pre-norm blocks, one head of dim 16
//!     h = ln1(x);  q, k, v = q(h), k(h), v(h)
//!     x = x + o(softmax(q k^T / sqrt(16) + causal) v)   o has no bias
//!     x = x + down(gelu_tanh(up(ln2(x))))               16 -> 32 -> 16
//! logits = head(ln_f(x))                                LayerNorms: eps 1e-5, with bias
//! ```

use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use peft_core::prelude::*;

use peft_models::nn::{causal_mask, layer_norm, masked_attention};

/// The sizes of `TinyLM` (a torch module: there is no `config.json`).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub vocab_size: usize,
    pub dim: usize,
    pub hidden: usize,
    pub n_blocks: usize,
    pub eps: f64,
}

impl Config {
    /// The reference case's sizes.
    pub const TINY: Self = Self {
        vocab_size: 48,
        dim: 16,
        hidden: 32,
        n_blocks: 2,
        eps: 1e-5,
    };
}

impl Default for Config {
    fn default() -> Self {
        Self::TINY
    }
}

#[derive(Adaptable)]
pub struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    up: Linear,
    down: Linear,
}

#[derive(Adaptable)]
pub struct TinyLm {
    embed: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    #[output_head]
    head: Linear,
    eps: f64,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (d, hidden) = (cfg.dim, cfg.hidden);
        Ok(Self {
            ln1: candle_nn::layer_norm(d, cfg.eps, vb.pp("ln1"))?,
            q: linear(d, d, vb.pp("q"))?,
            k: linear(d, d, vb.pp("k"))?,
            v: linear(d, d, vb.pp("v"))?,
            o: linear_no_bias(d, d, vb.pp("o"))?,
            ln2: candle_nn::layer_norm(d, cfg.eps, vb.pp("ln2"))?,
            up: linear(d, hidden, vb.pp("up"))?,
            down: linear(hidden, d, vb.pp("down"))?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f64, mask: &Tensor) -> Result<Tensor> {
        let h = layer_norm(&self.ln1, eps, x)?;
        let (q, k, v) = (self.q.forward(&h)?, self.k.forward(&h)?, self.v.forward(&h)?);
        let scores = (q.matmul(&k.t()?)? / (q.dim(2)? as f64).sqrt())?;
        let x = (x + self.o.forward(&masked_attention(&scores, mask, &v)?)?)?;
        let h = layer_norm(&self.ln2, eps, &x)?;
        // Tensor::gelu is the tanh approximation.
        &x + self.down.forward(&self.up.forward(&h)?.gelu()?)?
    }
}

impl TinyLm {
    /// Loads the reference case's model ([`Config::TINY`]) from the torch
    /// state dict's names (`embed.weight`, `blocks.0.q.weight`, ..., `head.weight`).
    pub fn load(vb: VarBuilder) -> Result<Self> {
        Self::load_with_config(vb, &Config::TINY)
    }

    /// [`load`](Self::load) with other sizes.
    pub fn load_with_config(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let blocks = (0..cfg.n_blocks)
            .map(|i| Block::load(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed: candle_nn::embedding(cfg.vocab_size, cfg.dim, vb.pp("embed"))?,
            blocks,
            ln_f: candle_nn::layer_norm(cfg.dim, cfg.eps, vb.pp("ln_f"))?,
            head: linear(cfg.dim, cfg.vocab_size, vb.pp("head"))?,
            eps: cfg.eps,
        })
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32 or i64).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let mask = causal_mask(t, input_ids.device())?;
        let mut x = self.embed.forward(input_ids)?;
        for block in &self.blocks {
            x = block.forward(&x, self.eps, &mask)?;
        }
        self.head.forward(&layer_norm(&self.ln_f, self.eps, &x)?)
    }
}
