//! transformers' `Qwen3ForCausalLM`: the Llama decoder with a per-head
//! RMSNorm of q and k (`q_norm`, `k_norm`, over `head_dim`) before RoPE, and
//! a `head_dim` that may differ from `hidden_size / num_attention_heads`.

use candle_core::Result;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::ModelError;
use crate::llama::{self, Decoder};

/// Qwen3 is the Llama-family decoder with its options.
pub type Qwen3ForCausalLM = llama::LlamaForCausalLM;

/// The fields of transformers' Qwen3 `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields Qwen3 shares with Llama (`attention_bias` included).
    #[serde(flatten)]
    pub base: llama::Config,
    /// Sliding-window attention on some layers; only `false` is implemented.
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl Config {
    /// Reads a transformers `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::result::Result<Self, ModelError> {
        crate::checkpoint::read_config(path.as_ref())
    }

    /// Refuses the options this port does not implement.
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        crate::qwen2::refuse_sliding_window(self.use_sliding_window)?;
        self.base.check()
    }
}

impl TryFrom<&Config> for Decoder {
    type Error = ModelError;

    /// Checks the config and takes its sizes and options.
    fn try_from(cfg: &Config) -> std::result::Result<Self, ModelError> {
        cfg.check()?;
        Ok(Decoder {
            qk_norm: true,
            mlp_bias: false,
            ..Decoder::try_from(&cfg.base)?
        })
    }
}

/// Loads the model from transformers' checkpoint names.
pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Qwen3ForCausalLM> {
    let decoder = Decoder::try_from(cfg).map_err(candle_core::Error::wrap)?;
    llama::LlamaForCausalLM::load_decoder(vb, &decoder)
}
