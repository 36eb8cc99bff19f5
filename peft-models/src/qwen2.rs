//! transformers' `Qwen2ForCausalLM`: the Llama decoder with biases on q, k
//! and v (none on o), usually with the head tied to the embedding.

use candle_core::Result;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::ModelError;
use crate::llama::{self, Decoder};

/// Qwen2 is the Llama-family decoder with its options.
pub type Qwen2ForCausalLM = llama::LlamaForCausalLM;

/// The fields of transformers' Qwen2 `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields Qwen2 shares with Llama.
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
        refuse_sliding_window(self.use_sliding_window)?;
        self.base.check()
    }
}

/// Qwen's `use_sliding_window` (a window on the layers from
/// `max_window_layers` on) is not implemented.
pub(crate) fn refuse_sliding_window(on: bool) -> std::result::Result<(), ModelError> {
    match on {
        true => Err(ModelError::Unsupported {
            field: "use_sliding_window",
            value: "true".to_owned(),
            reason: "Qwen's sliding window on the upper layers is not implemented",
        }),
        false => Ok(()),
    }
}

impl TryFrom<&Config> for Decoder {
    type Error = ModelError;

    /// Checks the config and takes its sizes and options.
    fn try_from(cfg: &Config) -> std::result::Result<Self, ModelError> {
        cfg.check()?;
        Ok(Decoder {
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            ..Decoder::try_from(&cfg.base)?
        })
    }
}

/// Loads the model from transformers' checkpoint names.
pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Qwen2ForCausalLM> {
    let decoder = Decoder::try_from(cfg).map_err(candle_core::Error::wrap)?;
    llama::LlamaForCausalLM::load_decoder(vb, &decoder)
}
