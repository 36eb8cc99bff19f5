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

use candle_core::{Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};
use peft_core::ops;
use peft_core::prelude::*;
use peft_core::Embedding;
use serde::Deserialize;

pub use crate::cache::KvCache;
use crate::cache::LayerCache;
use crate::error::ModelError;
use crate::nn::rms_norm;
use crate::rope::{Rope, RopeKind};

pub use crate::rope::RopeParameters;

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
    /// transformers 4's RoPE scaling (transformers 5 moved it to
    /// `rope_parameters`).
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
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
    /// than default, linear, dynamic and llama3 (yarn, longrope), an
    /// activation other than SiLU.
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        self.rope()?;
        if let Some(act) = self.hidden_act.as_ref().filter(|a| *a != "silu") {
            return Err(ModelError::Unsupported {
                field: "hidden_act",
                value: format!("{act:?}"),
                reason: "the MLP is SwiGLU: only \"silu\" is implemented",
            });
        }
        Ok(())
    }

    /// The RoPE the config describes, from `rope_parameters`
    /// (transformers 5) or `rope_scaling` and `rope_theta` (transformers 4).
    pub fn rope(&self) -> std::result::Result<Rope, ModelError> {
        let theta = self.rope_theta.unwrap_or(10_000.0);
        match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => Rope::from_parameters(Some(p), "rope_parameters", theta, self.max_position_embeddings),
            (None, Some(p)) => Rope::from_parameters(Some(p), "rope_scaling", theta, self.max_position_embeddings),
            (None, None) => Ok(Rope::default_with(theta)),
        }
    }

    /// The width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Key/value heads (GQA), `num_attention_heads` when unset.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
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
/// | Phi-3 (fused `qkv_proj`, `gate_up_proj`) | no | no | no | `sliding_window` |
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
    /// The rotary embedding.
    pub rope: Rope,
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
    /// The positions the model was trained for (`max_position_embeddings`);
    /// none with dynamic RoPE, which extends them.
    pub max_positions: Option<usize>,
    /// Phi-3's fused projections: `qkv_proj` for q, k and v, `gate_up_proj`
    /// for the MLP's gate and up.
    pub fused_projections: bool,
}

impl TryFrom<&Config> for Decoder {
    type Error = ModelError;

    /// Checks the config ([`Config::check`]) and takes its sizes and options.
    fn try_from(cfg: &Config) -> std::result::Result<Self, ModelError> {
        cfg.check()?;
        Ok(Decoder {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads(),
            head_dim: cfg.head_dim(),
            rms_norm_eps: cfg.rms_norm_eps,
            rope: cfg.rope()?,
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            mlp_bias: cfg.mlp_bias,
            qk_norm: false,
            sliding_window: None,
            tie_word_embeddings: cfg.tie_word_embeddings,
            // Dynamic NTK RoPE exists to run past max_position_embeddings.
            max_positions: cfg
                .max_position_embeddings
                .filter(|_| !matches!(cfg.rope().map(|r| r.kind), Ok(RopeKind::Dynamic { .. }))),
            fused_projections: false,
        })
    }
}

/// The attention of the Llama family: q, k, v and o projections, GQA,
/// RoPE; Qwen3's q/k norms and Mistral's window when the [`Decoder`] has
/// them. Phi-3 fuses q, k and v into one projection, `qkv_proj`. A newtype
/// variant adds no path segment: the layers are `self_attn.q_proj` or
/// `self_attn.qkv_proj`, as in the checkpoints.
#[derive(Adaptable)]
// One per layer, made once and never moved on a hot path: the size
// difference of the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Attention {
    /// `q_proj`, `k_proj`, `v_proj` (Llama, Mistral, Qwen2, Qwen3).
    Separate(SeparateQkv),
    /// `qkv_proj` (Phi-3).
    Fused(FusedQkv),
}

/// Attention with one projection each for q, k and v.
#[derive(Adaptable)]
pub struct SeparateQkv {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    #[adapt(skip)]
    heads: HeadLayout,
}

/// Attention with q, k and v in one projection, in that order:
/// `qkv_proj` `[hidden -> (heads + 2 kv_heads) head_dim]`.
#[derive(Adaptable)]
pub struct FusedQkv {
    qkv_proj: Linear,
    o_proj: Linear,
    #[adapt(skip)]
    heads: HeadLayout,
}

/// How the projections split into heads, and the attention over them.
#[derive(Debug, Clone, Copy)]
struct HeadLayout {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

/// The MLP of the Llama family: `down_proj(silu(gate) * up)`, the gate and
/// up projections separate or (Phi-3) fused into `gate_up_proj`.
#[derive(Adaptable)]
pub enum Mlp {
    /// `gate_proj`, `up_proj`, `down_proj`.
    Gated(GatedMlp),
    /// `gate_up_proj` (gate first, then up), `down_proj` (Phi-3).
    Fused(FusedGatedMlp),
}

/// `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Adaptable)]
pub struct GatedMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// `down_proj(silu(gate) * up)` with `[gate, up] = gate_up_proj(x)`.
#[derive(Adaptable)]
pub struct FusedGatedMlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    #[adapt(skip)]
    intermediate_size: usize,
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

impl LlamaModel {
    /// The decoder under `vb` (`model.` in a checkpoint).
    pub(crate) fn load(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let embed_tokens = peft_core::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
        })
    }

    /// The final hidden states `[batch, t, hidden]` (after `norm`) for token
    /// ids `[batch, t]` that follow the positions `cache` has seen.
    pub(crate) fn hidden_states(
        &self,
        rope: &Rope,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let device = input_ids.device();
        let head_dim = self.layers.first().map_or(0, |l| l.self_attn.head_dim());
        let start = cache.as_ref().map_or(0, |cache| cache.seen());
        let mut x = self.embed_tokens.forward(input_ids)?;
        // Computed in f32 as transformers does, used in the model's dtype.
        let (cos, sin) = rope.tables(start, t, head_dim, device)?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        if let Some(cache) = cache.as_deref_mut() {
            cache.resize(self.layers.len());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|cache| cache.layer(i));
            x = layer.forward(&x, &cos, &sin, layer_cache)?;
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        rms_norm(&self.norm, &x)
    }
}

/// transformers' `LlamaForCausalLM`.
#[derive(Adaptable)]
pub struct LlamaForCausalLM {
    model: LlamaModel,
    #[output_head]
    lm_head: Linear,
    #[adapt(skip)]
    rope: Rope,
    max_positions: Option<usize>,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads, bias) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.qkv_bias);
        let layout = HeadLayout {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            sliding_window: cfg.sliding_window,
        };
        let o_proj = || linear_b(heads * head_dim, hidden, cfg.o_bias, vb.pp("o_proj"));
        if cfg.fused_projections {
            let width = (heads + 2 * kv_heads) * head_dim;
            return Ok(Attention::Fused(FusedQkv {
                qkv_proj: linear_b(hidden, width, bias, vb.pp("qkv_proj"))?,
                o_proj: o_proj()?,
                heads: layout,
            }));
        }
        let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
            match cfg.qk_norm {
                true => candle_nn::rms_norm(head_dim, cfg.rms_norm_eps, vb.pp(name)).map(Some),
                false => Ok(None),
            }
        };
        Ok(Attention::Separate(SeparateQkv {
            q_proj: linear_b(hidden, heads * head_dim, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(hidden, kv_heads * head_dim, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(hidden, kv_heads * head_dim, bias, vb.pp("v_proj"))?,
            o_proj: o_proj()?,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            heads: layout,
        }))
    }

    fn head_dim(&self) -> usize {
        match self {
            Attention::Separate(a) => a.heads.head_dim,
            Attention::Fused(a) => a.heads.head_dim,
        }
    }

    /// `cache` holds the keys and values of the positions before `x`'s
    /// (none without a cache); the new ones are appended to it.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        // Heads stay in [batch, t, heads, head_dim], the layout the
        // projections give: peft_core::ops needs no transposes.
        let (b, t, _) = x.dims3()?;
        match self {
            Attention::Separate(a) => {
                let layout = a.heads;
                let split = |y: Tensor, n: usize| y.reshape((b, t, n, layout.head_dim));
                let normed = |y: Tensor, norm: &Option<RmsNorm>| match norm {
                    Some(norm) => rms_norm(norm, &y),
                    None => Ok(y),
                };
                let q = normed(split(a.q_proj.forward(x)?, layout.num_heads)?, &a.q_norm)?;
                let k = normed(split(a.k_proj.forward(x)?, layout.num_kv_heads)?, &a.k_norm)?;
                let v = split(a.v_proj.forward(x)?, layout.num_kv_heads)?;
                a.o_proj.forward(&layout.attend(q, k, v, cos, sin, cache)?)
            }
            Attention::Fused(a) => {
                let layout = a.heads;
                let qkv = a.qkv_proj.forward(x)?;
                let (q_width, kv_width) = (
                    layout.num_heads * layout.head_dim,
                    layout.num_kv_heads * layout.head_dim,
                );
                let part = |start: usize, width: usize, n: usize| {
                    qkv.narrow(2, start, width)?
                        .contiguous()?
                        .reshape((b, t, n, layout.head_dim))
                };
                let q = part(0, q_width, layout.num_heads)?;
                let k = part(q_width, kv_width, layout.num_kv_heads)?;
                let v = part(q_width + kv_width, kv_width, layout.num_kv_heads)?;
                a.o_proj.forward(&layout.attend(q, k, v, cos, sin, cache)?)
            }
        }
    }
}

impl HeadLayout {
    /// RoPE on `q` and `k` (`[batch, t, heads, head_dim]`), the cache, and
    /// attention: the heads' outputs as `[batch, t, heads · head_dim]`.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _, _) = q.dims4()?;
        let q = ops::rope_thd(&q, cos, sin)?;
        let k = ops::rope_thd(&k, cos, sin)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => cache.append(k, v)?,
        };
        // Each kv head serves num_heads / num_kv_heads query heads (GQA).
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = ops::windowed_causal_attention(&q, &k, &v, scale, self.sliding_window)?;
        out.reshape((b, t, self.num_heads * self.head_dim))
    }
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let (hidden, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let down_proj = || linear_b(inter, hidden, bias, vb.pp("down_proj"));
        if cfg.fused_projections {
            return Ok(Mlp::Fused(FusedGatedMlp {
                gate_up_proj: linear_b(hidden, 2 * inter, bias, vb.pp("gate_up_proj"))?,
                down_proj: down_proj()?,
                intermediate_size: inter,
            }));
        }
        Ok(Mlp::Gated(GatedMlp {
            gate_proj: linear_b(hidden, inter, bias, vb.pp("gate_proj"))?,
            up_proj: linear_b(hidden, inter, bias, vb.pp("up_proj"))?,
            down_proj: down_proj()?,
        }))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gated(m) => {
                let hidden = ops::silu_mul(&m.gate_proj.forward(x)?, &m.up_proj.forward(x)?)?;
                m.down_proj.forward(&hidden)
            }
            Mlp::Fused(m) => {
                let gate_up = m.gate_up_proj.forward(x)?;
                let last = gate_up.rank() - 1;
                let inter = m.intermediate_size;
                let gate = gate_up.narrow(last, 0, inter)?.contiguous()?;
                let up = gate_up.narrow(last, inter, inter)?.contiguous()?;
                m.down_proj.forward(&ops::silu_mul(&gate, &up)?)
            }
        }
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
        if cache.is_none() {
            if let Some(y) = self.fused_block(x, cos, sin)? {
                return Ok(y);
            }
        }
        let h = rms_norm(&self.input_layernorm, x)?;
        let x = (x + self.self_attn.forward(&h, cos, sin, cache)?)?;
        let h = rms_norm(&self.post_attention_layernorm, &x)?;
        &x + self.mlp.forward(&h)?
    }

    /// The layer as one op with its own backward pass
    /// ([`peft_core::block::decoder_block`]) when it can take it: separate
    /// q, k, v projections without q/k norms, a gated MLP, and every
    /// projection a dense product with at most one LoRA adapter. `None` to
    /// compute the layer op by op.
    fn fused_block(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
        let (Attention::Separate(attention), Mlp::Gated(mlp)) = (&self.self_attn, &self.mlp) else {
            return Ok(None);
        };
        if attention.q_norm.is_some() || attention.k_norm.is_some() {
            return Ok(None);
        }
        let eps = self.input_layernorm.eps();
        if self.post_attention_layernorm.eps() != eps {
            return Ok(None);
        }
        let linears = [
            &attention.q_proj,
            &attention.k_proj,
            &attention.v_proj,
            &attention.o_proj,
            &mlp.gate_proj,
            &mlp.up_proj,
            &mlp.down_proj,
        ];
        let projections = linears
            .map(|linear| linear.dense_low_rank(linear.is_training()))
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(<[_; 7]>::try_from);
        let Some(Ok(projections)) = projections else {
            return Ok(None);
        };
        let heads = attention.heads;
        peft_core::block::decoder_block(
            x,
            &peft_core::block::DecoderBlock {
                input_norm: self.input_layernorm.weight(),
                post_attention_norm: self.post_attention_layernorm.weight(),
                eps,
                projections,
                num_heads: heads.num_heads,
                num_kv_heads: heads.num_kv_heads,
                head_dim: heads.head_dim,
                sliding_window: heads.sliding_window,
                cos,
                sin,
            },
        )
    }
}

impl LlamaForCausalLM {
    /// Loads the model from transformers' checkpoint names
    /// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
    /// `lm_head.weight`; with `tie_word_embeddings` the head is the embedding).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load_decoder(vb, &Decoder::try_from(cfg).map_err(candle_core::Error::wrap)?)
    }

    /// Loads any decoder of the Llama family from transformers' checkpoint
    /// names (the same for Llama, Mistral, Qwen2 and Qwen3).
    pub fn load_decoder(vb: VarBuilder, cfg: &Decoder) -> Result<Self> {
        let model = LlamaModel::load(vb.pp("model"), cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            // The same tensor as the table: trainable tokens find the tie by it.
            Linear::new(model.embed_tokens.embeddings()?, None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            model,
            lm_head,
            rope: cfg.rope,
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

    fn run(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.lm_head
            .forward(&self.model.hidden_states(&self.rope, input_ids, cache)?)
    }
}
