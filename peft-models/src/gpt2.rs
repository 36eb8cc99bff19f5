//! transformers' `GPT2LMHeadModel`, written with `#[derive(Adaptable)]`.
//!
//! Paths are transformers' module names and PEFT's:
//! `transformer.h.0.attn.c_attn`, `transformer.h.0.attn.c_proj`,
//! `transformer.h.0.mlp.c_fc`, `transformer.h.0.mlp.c_proj`. The head is tied
//! to the token embedding `transformer.wte` and marked `#[output_head]`, so
//! `all_linear()` leaves it alone, as PEFT's `"all-linear"` does.
//!
//! # Conv1D weights are transposed at load
//!
//! GPT-2's linear layers are transformers' `Conv1D`: `y = x W + b` with the
//! weight stored `[in, out]` in the checkpoint, the transpose of
//! `nn.Linear`'s `[out, in]`. `peft_core::linear_fan_in_fan_out` loads that
//! tensor and transposes it once, into the `[out, in]` layout of
//! `peft_core::Linear`; the forward pass is then an ordinary linear layer, and
//! the layer remembers the layout so that a saved adapter config says
//! `fan_in_fan_out: true`, as PEFT's does.
//!
//! LoRA needs no special case for it. PEFT wraps a Conv1D in the same
//! `lora.Linear` as an `nn.Linear`: `lora_A` is `[r, in]`, `lora_B` `[out, r]`
//! and they apply to `x` exactly as for any linear layer; PEFT's
//! `fan_in_fan_out=True` (which it switches on by itself for Conv1D) only
//! transposes the merged delta `s·B·A` into the checkpoint's `[in, out]`
//! layout. Here the base weight is already `[out, in]`, so `merge()` adds
//! `s·B·A` to it as on any layer, and adapter files load unchanged.
//! (To write a merged GPT-2 back in transformers' layout, transpose again.)
//!
//! Architecture (transformers, `attn_implementation="eager"`, no attention mask):
//!
//! ```text
//! x = wte[input_ids] + wpe[0..t]
//! for each block in h:
//!     q | k | v = attn.c_attn(ln_1(x))            LayerNorm with bias
//!     x = x + attn.c_proj(softmax(q k^T / sqrt(head_dim) + causal) v)
//!     x = x + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(x))))
//! logits = ln_f(x) wte^T
//! ```
//! `gelu_new` is the tanh form `0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))`,
//! candle's `Tensor::gelu` (exact GELU, `gelu_erf`, differs by up to 1e-4).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};
use peft_core::prelude::*;
use peft_core::Embedding;
use serde::Deserialize;

use crate::cache::{KvCache, LayerCache};
use crate::error::ModelError;
use crate::nn::{causal_mask_after, layer_norm, masked_attention, merge_heads};

/// The fields of transformers' GPT-2 `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Positions the learned position table holds.
    pub n_positions: usize,
    /// MLP width; `None` means `4 * n_embd`.
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// `gelu_new` (or its alias `gelu_pytorch_tanh`): the tanh form of GELU.
    pub activation_function: String,
    /// Divide attention scores by √head_dim (only `true` is implemented).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide by the layer index + 1 (only `false` is implemented).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Upcast attention to f32 (no effect in f32).
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    /// The head is the token embedding (GPT-2 always ties it).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_true() -> bool {
    true
}

impl Config {
    /// Reads a transformers `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::result::Result<Self, ModelError> {
        crate::checkpoint::read_config(path.as_ref())
    }

    /// The MLP width.
    pub fn n_inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// GPT-2's attention: `c_attn` (q, k, v fused) and `c_proj`, `Conv1D`s.
#[derive(Adaptable)]
pub struct Attention {
    /// `[n_embd -> 3 * n_embd]`: q, k, v concatenated in that order.
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    scale: bool,
}

/// GPT-2's MLP: `c_fc`, GELU (tanh form), `c_proj`.
#[derive(Adaptable)]
pub struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

/// One GPT-2 block: pre-norm attention and MLP.
#[derive(Adaptable)]
pub struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// transformers' `GPT2Model`: the `transformer.` prefix of every checkpoint name.
#[derive(Adaptable)]
pub struct Gpt2Model {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
}

/// transformers' `GPT2LMHeadModel`.
#[derive(Adaptable)]
pub struct Gpt2LmHeadModel {
    transformer: Gpt2Model,
    /// Tied: the very tensor of `transformer.wte` (counted once by
    /// `num_parameters`), as a bias-free linear layer `[vocab, n_embd]`.
    #[output_head]
    lm_head: Linear,
    layer_norm_epsilon: f64,
    n_positions: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let n = cfg.n_embd;
        Ok(Self {
            c_attn: linear_fan_in_fan_out(n, 3 * n, vb.pp("c_attn"))?,
            c_proj: linear_fan_in_fan_out(n, n, vb.pp("c_proj"))?,
            n_head: cfg.n_head,
            scale: cfg.scale_attn_weights,
        })
    }

    /// `cache` holds the keys and values of the positions before `x`'s
    /// (none without a cache); the new ones are appended to it.
    fn forward(&self, x: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (b, t, n) = x.dims3()?;
        let head_dim = n / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        // `[batch, t, heads, head_dim]`, the cache's layout.
        let part = |i: usize| qkv.narrow(D::Minus1, i * n, n)?.reshape((b, t, self.n_head, head_dim));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => cache.append(k, v)?,
        };
        let heads = |x: Tensor| x.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let mut scores = q.matmul(&k.t()?)?;
        if self.scale {
            scores = (scores / (head_dim as f64).sqrt())?;
        }
        let out = masked_attention(&scores, mask, &v)?;
        self.c_proj.forward(&merge_heads(&out)?)
    }
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (n, inner) = (cfg.n_embd, cfg.n_inner());
        Ok(Self {
            c_fc: linear_fan_in_fan_out(n, inner, vb.pp("c_fc"))?,
            c_proj: linear_fan_in_fan_out(inner, n, vb.pp("c_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Tensor::gelu is the tanh approximation, i.e. gelu_new.
        self.c_proj.forward(&self.c_fc.forward(x)?.gelu()?)
    }
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (n, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: candle_nn::layer_norm(n, eps, vb.pp("ln_1"))?,
            attn: Attention::load(vb.pp("attn"), cfg)?,
            ln_2: candle_nn::layer_norm(n, eps, vb.pp("ln_2"))?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f64, mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&layer_norm(&self.ln_1, eps, x)?, mask, cache)?)?;
        &x + self.mlp.forward(&layer_norm(&self.ln_2, eps, &x)?)?
    }
}

impl Gpt2LmHeadModel {
    /// Loads the model from transformers' checkpoint names
    /// (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...).
    /// The checkpoint has no `lm_head.weight`: the head is `transformer.wte`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if !matches!(cfg.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
            candle_core::bail!(
                "activation_function {:?} is not implemented in this example",
                cfg.activation_function
            );
        }
        if cfg.scale_attn_by_inverse_layer_idx || cfg.reorder_and_upcast_attn {
            candle_core::bail!("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not implemented");
        }
        let vb_t = vb.pp("transformer");
        let wte = peft_core::embedding(cfg.vocab_size, cfg.n_embd, vb_t.pp("wte"))?;
        let lm_head = if cfg.tie_word_embeddings {
            // The table itself: trainable tokens find the tie by it.
            Linear::new(wte.embeddings()?, None)
        } else {
            linear_no_bias(cfg.n_embd, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let h = (0..cfg.n_layer)
            .map(|i| Block::load(vb_t.pp(format!("h.{i}")), cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            transformer: Gpt2Model {
                wte,
                wpe: peft_core::embedding(cfg.n_positions, cfg.n_embd, vb_t.pp("wpe"))?,
                h,
                ln_f: candle_nn::layer_norm(cfg.n_embd, cfg.layer_norm_epsilon, vb_t.pp("ln_f"))?,
            },
            lm_head,
            layer_norm_epsilon: cfg.layer_norm_epsilon,
            n_positions: cfg.n_positions,
        })
    }

    /// The positions of the learned position table (`n_positions`).
    pub fn max_positions(&self) -> usize {
        self.n_positions
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.run(input_ids, None)
    }

    /// Logits for token ids `[batch, t]` that follow the positions `cache`
    /// holds; their keys and values are added to it.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(input_ids, Some(cache))
    }

    fn run(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let eps = self.layer_norm_epsilon;
        let seen = cache.as_ref().map_or(0, |cache| cache.seen());
        if seen + t > self.n_positions {
            candle_core::bail!(
                "positions {seen}..{} are past GPT-2's {} learned positions",
                seen + t,
                self.n_positions
            );
        }
        let mask = causal_mask_after(seen, t, input_ids.device())?;
        // Looked up through the slot, so that an adapter on `wpe` applies.
        let position_ids = Tensor::arange(seen as u32, (seen + t) as u32, input_ids.device())?.unsqueeze(0)?;
        let positions = self.transformer.wpe.forward(&position_ids)?;
        let mut x = self.transformer.wte.forward(input_ids)?.broadcast_add(&positions)?;
        if let Some(cache) = cache.as_deref_mut() {
            cache.resize(self.transformer.h.len());
        }
        for (i, block) in self.transformer.h.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|cache| cache.layer(i));
            x = block.forward(&x, eps, &mask, layer_cache)?;
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        self.lm_head.forward(&layer_norm(&self.transformer.ln_f, eps, &x)?)
    }
}
