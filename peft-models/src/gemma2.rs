//! transformers' `Gemma2ForCausalLM`, written with `#[derive(Adaptable)]`.
//!
//! What sets Gemma 2 apart from Llama:
//!
//! ```text
//! x = embed_tokens[input_ids] · √hidden_size         (the normalizer in the model's dtype)
//! for each layer:
//!     h = input_layernorm(x)                         RMSNorm with (1 + w): x / rms(x) · (1 + w), in f32
//!     a = attention(h)                               scale query_pre_attn_scalar^-½,
//!                                                    scores soft-capped: cap · tanh(s / cap),
//!                                                    sliding layers see keys p - window < j <= p
//!     x = x + post_attention_layernorm(a)
//!     x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
//!                                                    mlp: down(gelu_tanh(gate(h)) · up(h))
//! logits = cap · tanh(lm_head(norm(x)) / cap)        final_logit_softcapping; the head is tied
//! ```
//!
//! Which layers slide is `config.json`'s `layer_types` (by default the
//! even ones, from layer 0). The soft-capped attention takes plain candle
//! operations, not the fused kernel, which has no cap.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};
use peft_core::ops;
use peft_core::prelude::*;
use peft_core::Embedding;
use serde::Deserialize;

use crate::cache::{KvCache, LayerCache};
use crate::error::ModelError;
use crate::nn::rms_norm;
use crate::rope::{Rope, RopeParameters};

/// The fields of transformers' Gemma 2 `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// The width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE, transformers 5 layout.
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE base, transformers 4 layout.
    pub rope_theta: Option<f64>,
    /// The attention scale is `query_pre_attn_scalar^-½`.
    pub query_pre_attn_scalar: f64,
    /// The cap of the attention scores (`null`: none).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// The cap of the logits (`null`: none).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// The window of the sliding layers.
    pub sliding_window: Option<usize>,
    /// `"sliding_attention"` or `"full_attention"` per layer; by default the
    /// even layers slide.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// The MLP's activation; only `gelu_pytorch_tanh` is implemented.
    #[serde(default = "default_activation")]
    pub hidden_activation: String,
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// The head is the token embedding (Gemma's default).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// The positions the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

fn default_activation() -> String {
    "gelu_pytorch_tanh".to_owned()
}

fn default_true() -> bool {
    true
}

impl Config {
    /// Reads a transformers `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::result::Result<Self, ModelError> {
        crate::checkpoint::read_config(path.as_ref())
    }

    /// Refuses the options this port does not implement.
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        let unsupported = |field, value: String, reason| ModelError::Unsupported { field, value, reason };
        if !matches!(self.hidden_activation.as_str(), "gelu_pytorch_tanh" | "gelu_new") {
            return Err(unsupported(
                "hidden_activation",
                format!("{:?}", self.hidden_activation),
                "only the tanh form of GELU (gelu_pytorch_tanh) is implemented",
            ));
        }
        self.rope()?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(unsupported(
                    "layer_types",
                    format!("{} entries", types.len()),
                    "needs one entry per layer",
                ));
            }
            if let Some(other) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention"))
            {
                return Err(unsupported(
                    "layer_types",
                    format!("{other:?}"),
                    "each layer is sliding_attention or full_attention",
                ));
            }
        }
        Ok(())
    }

    /// Whether layer `i` slides.
    fn slides(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types[i] == "sliding_attention",
            None => i.is_multiple_of(2),
        }
    }

    /// The RoPE the config describes.
    pub fn rope(&self) -> std::result::Result<Rope, ModelError> {
        Rope::from_parameters(
            self.rope_parameters.as_ref(),
            "rope_parameters",
            self.rope_theta.unwrap_or(10_000.0),
            self.max_position_embeddings,
        )
    }
}

/// Gemma 2's attention: q, k, v, o projections, GQA, RoPE, soft-capped
/// scores, a window on the sliding layers.
#[derive(Adaptable)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    #[adapt(skip)]
    shape: AttentionShape,
}

#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
}

/// Gemma 2's MLP: `down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))`.
#[derive(Adaptable)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// One decoder layer: four norms around attention and MLP.
#[derive(Adaptable)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
}

/// transformers' `Gemma2Model`: the `model.` prefix of every checkpoint name.
#[derive(Adaptable)]
pub struct Gemma2Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
}

/// transformers' `Gemma2ForCausalLM`.
#[derive(Adaptable)]
pub struct Gemma2ForCausalLM {
    model: Gemma2Model,
    #[output_head]
    lm_head: Linear,
    #[adapt(skip)]
    settings: ModelSettings,
}

#[derive(Debug, Clone, Copy)]
struct ModelSettings {
    hidden_size: usize,
    head_dim: usize,
    rope: Rope,
    final_softcap: Option<f64>,
    max_positions: Option<usize>,
}

/// Gemma's RMSNorm scales by `1 + w`: the checkpoint's `w` is loaded as
/// `1 + w`, so the norm is a plain RMSNorm (computed in f32 as transformers
/// does, by [`rms_norm`]).
fn gemma_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let weight = vb.get(size, "weight")?;
    Ok(RmsNorm::new((weight + 1.0)?, eps))
}

/// `cap · tanh(x / cap)`.
fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(cap) => (x / cap)?.tanh()? * cap,
        None => Ok(x.clone()),
    }
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize) -> Result<Self> {
        let (hidden, head_dim, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: linear_b(hidden, heads * head_dim, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(hidden, kv_heads * head_dim, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(hidden, kv_heads * head_dim, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(heads * head_dim, hidden, bias, vb.pp("o_proj"))?,
            shape: AttentionShape {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim,
                scale: cfg.query_pre_attn_scalar.powf(-0.5),
                softcap: cfg.attn_logit_softcapping,
                window: cfg.sliding_window.filter(|_| cfg.slides(layer)),
            },
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let s = self.shape;
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, n: usize| y.reshape((b, t, n, s.head_dim));
        let q = ops::rope_thd(&split(self.q_proj.forward(x)?, s.num_heads)?, cos, sin)?;
        let k = ops::rope_thd(&split(self.k_proj.forward(x)?, s.num_kv_heads)?, cos, sin)?;
        let v = split(self.v_proj.forward(x)?, s.num_kv_heads)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => cache.append(k, v)?,
        };
        let t_k = k.dim(1)?;
        // [batch, heads, t, d], key/value heads repeated for their queries.
        let n_rep = s.num_heads / s.num_kv_heads;
        let heads_first = |x: &Tensor, n: usize, len: usize| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.contiguous()?;
            if n_rep == 1 || n == s.num_heads {
                return Ok(x);
            }
            x.unsqueeze(2)?
                .broadcast_as((b, n, n_rep, len, s.head_dim))?
                .reshape((b, n * n_rep, len, s.head_dim))
        };
        let q = heads_first(&q, s.num_heads, t)?;
        let (k, v) = (
            heads_first(&k, s.num_kv_heads, t_k)?,
            heads_first(&v, s.num_kv_heads, t_k)?,
        );
        let scores = softcap(&(q.matmul(&k.t()?)? * s.scale)?, s.softcap)?;
        let mask = attention_mask(t, t_k, s.window, x.device())?.to_dtype(scores.dtype())?;
        let probs = ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?;
        self.o_proj.forward(&out.reshape((b, t, s.num_heads * s.head_dim))?)
    }
}

/// The additive mask `[t_q, t_k]`: query `i` stands at position
/// `t_k - t_q + i` and sees key `j` when `j <= position` and, with a window,
/// `position - window < j`.
fn attention_mask(t_q: usize, t_k: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let offset = t_k - t_q;
    let mask: Vec<f32> = (0..t_q * t_k)
        .map(|i| {
            let (position, key) = (i / t_k + offset, i % t_k);
            let too_old = window.is_some_and(|w| key + w <= position);
            if key > position || too_old {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t_q, t_k), device)
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(hidden, inter, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, inter, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(inter, hidden, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Tensor::gelu is the tanh form, gelu_pytorch_tanh.
        let gate = self.gate_proj.forward(x)?.gelu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize) -> Result<Self> {
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: gemma_norm(hidden, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, layer)?,
            post_attention_layernorm: gemma_norm(hidden, eps, vb.pp("post_attention_layernorm"))?,
            pre_feedforward_layernorm: gemma_norm(hidden, eps, vb.pp("pre_feedforward_layernorm"))?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            post_feedforward_layernorm: gemma_norm(hidden, eps, vb.pp("post_feedforward_layernorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&rms_norm(&self.input_layernorm, x)?, cos, sin, cache)?;
        let x = (x + rms_norm(&self.post_attention_layernorm, &a)?)?;
        let m = self.mlp.forward(&rms_norm(&self.pre_feedforward_layernorm, &x)?)?;
        &x + rms_norm(&self.post_feedforward_layernorm, &m)?
    }
}

impl Gemma2ForCausalLM {
    /// Loads the model from transformers' checkpoint names
    /// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`,
    /// ...; the head is the embedding unless `tie_word_embeddings` is false).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::wrap)?;
        let vb_m = vb.pp("model");
        let embed_tokens = peft_core::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb_m.pp(format!("layers.{i}")), cfg, i))
            .collect::<Result<_>>()?;
        let norm = gemma_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            // The table itself: trainable tokens find the tie by it.
            Linear::new(embed_tokens.embeddings()?, None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            model: Gemma2Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            settings: ModelSettings {
                hidden_size: cfg.hidden_size,
                head_dim: cfg.head_dim,
                rope: cfg.rope().map_err(candle_core::Error::wrap)?,
                final_softcap: cfg.final_logit_softcapping,
                max_positions: cfg.max_position_embeddings,
            },
        })
    }

    /// The positions the model was trained for, when its config says.
    pub fn max_positions(&self) -> Option<usize> {
        self.settings.max_positions
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.run(input_ids, None)
    }

    /// Logits for token ids that follow the positions `cache` has seen,
    /// appending their keys and values to it.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(input_ids, Some(cache))
    }

    fn run(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let s = self.settings;
        let (_, t) = input_ids.dims2()?;
        let start = cache.as_ref().map_or(0, |cache| cache.seen());
        let x = self.model.embed_tokens.forward(input_ids)?;
        // transformers' normalizer is a tensor of the model's dtype.
        let normalizer = Tensor::new((s.hidden_size as f32).sqrt(), x.device())?.to_dtype(x.dtype())?;
        let mut x = x.broadcast_mul(&normalizer)?;
        let (cos, sin) = s.rope.tables(start, t, s.head_dim, x.device())?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        if let Some(cache) = cache.as_deref_mut() {
            cache.resize(self.model.layers.len());
        }
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|cache| cache.layer(i));
            x = layer.forward(&x, &cos, &sin, layer_cache)?;
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        let logits = self.lm_head.forward(&rms_norm(&self.model.norm, &x)?)?;
        softcap(&logits, s.final_softcap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_slides() {
        let mask = attention_mask(4, 4, Some(2), &Device::Cpu).unwrap();
        let seen: Vec<Vec<bool>> = mask
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|row| row.iter().map(|v| v.is_finite()).collect())
            .collect();
        assert_eq!(
            seen,
            [
                [true, false, false, false],
                [true, true, false, false],
                [false, true, true, false],
                [false, false, true, true],
            ]
        );
    }
}
