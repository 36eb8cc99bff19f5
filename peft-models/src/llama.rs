//! transformers' `LlamaForCausalLM`, written with `#[derive(Adaptable)]`,
//! and the Llama-family decoder that Mistral, Qwen2 and Qwen3 are too, with
//! other options ([`Decoder`]: biases, per-head q/k norms, a sliding window).
//!
//! The field names follow the checkpoint, so the linear layers' paths are
//! transformers' module names and PEFT's: `model.layers.0.self_attn.q_proj`,
//! ..., `model.layers.0.mlp.down_proj`. `lm_head` is marked `#[output_head]`,
//! so `all_linear()` leaves it alone, as PEFT's `target_modules="all-linear"`
//! does (PEFT finds it with `get_output_embeddings()`).
//!
//! Architecture (what transformers computes with `attn_implementation="eager"`
//! and no attention mask):
//!
//! ```text
//! x = embed_tokens[input_ids]
//! for each layer:
//!     h = input_layernorm(x)                      RMSNorm: w * x / sqrt(mean(x^2) + eps)
//!     q, k, v = q_proj(h), k_proj(h), v_proj(h)   k, v have num_key_value_heads heads (GQA)
//!     (Qwen3: q, k = q_norm(q), k_norm(k), RMSNorm over each head)
//!     q, k = rope(q), rope(k)                     rotate_half convention
//!     a = softmax(q k^T / sqrt(head_dim) + causal) v, each kv head shared by num_heads / num_kv_heads query heads
//!         (Mistral: position p sees keys p - sliding_window < j <= p)
//!     x = x + o_proj(a)
//!     x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),  h = post_attention_layernorm(x)
//! logits = lm_head(norm(x))
//! ```

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use peft_core::ops;
use peft_core::prelude::*;
use serde::Deserialize;

use crate::error::ModelError;
use crate::nn::rms_norm;

/// RoPE settings, transformers 5 layout (`rope_parameters` in `config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    /// The base of the rotary frequencies.
    pub rope_theta: f64,
    /// Only `"default"` is implemented here.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

fn default_rope_type() -> String {
    "default".to_owned()
}

/// The fields of transformers' `config.json` this model uses.
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
    /// GQA: each key/value head serves `num_attention_heads / num_key_value_heads` query heads.
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// transformers 5 keeps `rope_theta` here...
    pub rope_parameters: Option<RopeParameters>,
    /// ...transformers 4 at the top level.
    pub rope_theta: Option<f64>,
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP's projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The head is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// transformers 4's RoPE scaling; only its absence is implemented.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// The MLP's activation; only `"silu"` is implemented.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// The positions the model was trained for; generation stops short of them.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

impl Config {
    /// Reads a transformers `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::result::Result<Self, ModelError> {
        crate::checkpoint::read_config(path.as_ref())
    }

    /// Refuses the options this port does not implement: RoPE types other
    /// than `"default"` (linear, dynamic, llama3, yarn scale the positions).
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        let unsupported = |field, value: String| ModelError::Unsupported {
            field,
            value,
            reason: "only the default RoPE is implemented (linear, dynamic, llama3 and yarn scaling are not yet)",
        };
        if let Some(rope) = self.rope_parameters.as_ref().filter(|r| r.rope_type != "default") {
            return Err(unsupported(
                "rope_parameters.rope_type",
                format!("{:?}", rope.rope_type),
            ));
        }
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return Err(unsupported("rope_scaling", scaling.to_string()));
        }
        if let Some(act) = self.hidden_act.as_ref().filter(|a| *a != "silu") {
            return Err(ModelError::Unsupported {
                field: "hidden_act",
                value: format!("{act:?}"),
                reason: "the MLP is SwiGLU: only \"silu\" is implemented",
            });
        }
        Ok(())
    }

    /// The width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Key/value heads (GQA), `num_attention_heads` when unset.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `rope_theta`, wherever the config keeps it (default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }
}

/// The Llama-family decoder's sizes and options. Each architecture's
/// `Config` (transformers' `config.json`) converts into one:
///
/// | | q/k/v bias | o bias | q/k norm | sliding window |
/// | --- | --- | --- | --- | --- |
/// | Llama | `attention_bias` | `attention_bias` | no | no |
/// | Mistral | no | no | no | `sliding_window` |
/// | Qwen2 | yes | no | no | no (`use_sliding_window` refused) |
/// | Qwen3 | `attention_bias` | `attention_bias` | yes | no (`use_sliding_window` refused) |
#[derive(Debug, Clone, PartialEq)]
pub struct Decoder {
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
    /// The base of the rotary frequencies (default RoPE).
    pub rope_theta: f64,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// A bias on o.
    pub o_bias: bool,
    /// Biases on the MLP's projections.
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm of q and k (`q_norm`, `k_norm`, over
    /// `head_dim`), before RoPE.
    pub qk_norm: bool,
    /// Mistral's sliding window: each position sees itself and the
    /// `window - 1` positions before it.
    pub sliding_window: Option<usize>,
    /// The head is the token embedding.
    pub tie_word_embeddings: bool,
    /// The positions the model was trained for (`max_position_embeddings`).
    pub max_positions: Option<usize>,
}

impl From<&Config> for Decoder {
    fn from(cfg: &Config) -> Self {
        Decoder {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads(),
            head_dim: cfg.head_dim(),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta(),
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            mlp_bias: cfg.mlp_bias,
            qk_norm: false,
            sliding_window: None,
            tie_word_embeddings: cfg.tie_word_embeddings,
            max_positions: cfg.max_position_embeddings,
        }
    }
}

/// The attention of the Llama family: q, k, v, o projections, GQA, RoPE;
/// Qwen3's q/k norms and Mistral's window when the [`Decoder`] has them.
#[derive(Adaptable)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    // Numbers are leaves with nothing in them: no `#[adapt(skip)]` needed.
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

/// Llama's MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Adaptable)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// One decoder layer: pre-norm attention and MLP.
#[derive(Adaptable)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// transformers' `LlamaModel`: the `model.` prefix of every checkpoint name.
#[derive(Adaptable)]
pub struct LlamaModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
}

/// transformers' `LlamaForCausalLM`.
#[derive(Adaptable)]
pub struct LlamaForCausalLM {
    model: LlamaModel,
    #[output_head]
    lm_head: Linear,
    rope_theta: f64,
    max_positions: Option<usize>,
}

/// The rotary tables `cos`, `sin` `[t, head_dim / 2]` for positions `0..t`,
/// as transformers' default RoPE computes them in float32:
/// `inv_freq[i] = 1 / theta^(2i / d)`, angle `pos * inv_freq[i]` (transformers
/// repeats the table over both halves of a head; [`peft_core::ops::rope`]
/// takes the half).
fn rope_tables(start: usize, t: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
    let positions = Tensor::arange(start as u32, (start + t) as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads, bias) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.qkv_bias);
        let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
            match cfg.qk_norm {
                true => candle_nn::rms_norm(head_dim, cfg.rms_norm_eps, vb.pp(name)).map(Some),
                false => Ok(None),
            }
        };
        Ok(Self {
            q_proj: linear_b(hidden, heads * head_dim, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(hidden, kv_heads * head_dim, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(hidden, kv_heads * head_dim, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(heads * head_dim, hidden, cfg.o_bias, vb.pp("o_proj"))?,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            sliding_window: cfg.sliding_window,
        })
    }

    /// `cache` holds the keys and values of the positions before `x`'s
    /// (none without a cache); the new ones are appended to it.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        // Heads stay in [batch, t, heads, head_dim], the layout the
        // projections give: peft_core::ops needs no transposes.
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim));
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let normed = |y: Tensor, norm: &Option<RmsNorm>| match norm {
            Some(norm) => rms_norm(norm, &y),
            None => Ok(y),
        };
        let q = ops::rope_thd(&normed(q, &self.q_norm)?, cos, sin)?;
        let k = ops::rope_thd(&normed(k, &self.k_norm)?, cos, sin)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => cache.append(k, v)?,
        };
        // Each kv head serves num_heads / num_kv_heads query heads (GQA).
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = ops::windowed_causal_attention(&q, &k, &v, scale, self.sliding_window)?;
        self.o_proj
            .forward(&out.reshape((b, t, self.num_heads * self.head_dim))?)
    }
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let (hidden, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear_b(hidden, inter, bias, vb.pp("gate_proj"))?,
            up_proj: linear_b(hidden, inter, bias, vb.pp("up_proj"))?,
            down_proj: linear_b(inter, hidden, bias, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = ops::silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&hidden)
    }
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: candle_nn::rms_norm(hidden, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: candle_nn::rms_norm(hidden, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let h = rms_norm(&self.input_layernorm, x)?;
        let x = (x + self.self_attn.forward(&h, cos, sin, cache)?)?;
        let h = rms_norm(&self.post_attention_layernorm, &x)?;
        &x + self.mlp.forward(&h)?
    }
}

impl LlamaForCausalLM {
    /// Loads the model from transformers' checkpoint names
    /// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
    /// `lm_head.weight`; with `tie_word_embeddings` the head is the embedding).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::wrap)?;
        Self::load_decoder(vb, &Decoder::from(cfg))
    }

    /// Loads any decoder of the Llama family from transformers' checkpoint
    /// names (the same for Llama, Mistral, Qwen2 and Qwen3).
    pub fn load_decoder(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb_m.pp(format!("layers.{i}")), cfg))
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?,
            },
            lm_head,
            rope_theta: cfg.rope_theta,
            max_positions: cfg.max_positions,
        })
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32 or i64).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.run(input_ids, None)
    }

    /// The positions the model was trained for, when its config says.
    pub fn max_positions(&self) -> Option<usize> {
        self.max_positions
    }

    /// Logits for token ids `[batch, t]` that follow the positions `cache`
    /// has seen, appending their keys and values to it: generation one
    /// token at a time costs one position per step, not the whole sequence.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(input_ids, Some(cache))
    }

    fn run(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let device = input_ids.device();
        let head_dim = self.model.layers.first().map_or(0, |l| l.self_attn.head_dim);
        let start = cache.as_ref().map_or(0, |cache| cache.seen);
        let mut x = self.model.embed_tokens.forward(input_ids)?;
        // Computed in f32 as transformers does, used in the model's dtype.
        let (cos, sin) = rope_tables(start, t, head_dim, self.rope_theta, device)?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize_with(self.model.layers.len(), LayerCache::default);
        }
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|cache| &mut cache.layers[i]);
            x = layer.forward(&x, &cos, &sin, layer_cache)?;
        }
        if let Some(cache) = cache {
            cache.seen += t;
        }
        self.lm_head.forward(&rms_norm(&self.model.norm, &x)?)
    }
}

/// The keys and values of the positions a Llama-family decoder has seen,
/// layer by layer, for [`LlamaForCausalLM::forward_with_cache`]. Start with
/// `KvCache::default()` for each new sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    seen: usize,
}

impl KvCache {
    /// How many positions the cache holds.
    pub fn seen(&self) -> usize {
        self.seen
    }
}

/// One layer's keys and values, `[batch, positions, kv_heads, head_dim]`.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    keys_values: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Appends the new positions' keys and values; returns all of them.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.keys_values.take() {
            None => (k, v),
            Some((old_k, old_v)) => (Tensor::cat(&[&old_k, &k], 1)?, Tensor::cat(&[&old_v, &v], 1)?),
        };
        self.keys_values = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
