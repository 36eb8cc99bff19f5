//! transformers' `MistralForCausalLM`: the Llama decoder without biases and
//! with a sliding window of attention (each position sees itself and the
//! `sliding_window - 1` positions before it), honoured when a sequence is
//! longer than the window.

use candle_core::Result;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::ModelError;
use crate::llama::{self, Decoder};

/// Mistral is the Llama-family decoder with its options.
pub type MistralForCausalLM = llama::LlamaForCausalLM;

/// The fields of transformers' Mistral `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields Mistral shares with Llama.
    #[serde(flatten)]
    pub base: llama::Config,
    /// The attention window (`null`: none).
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl Config {
    /// Reads a transformers `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::result::Result<Self, ModelError> {
        crate::checkpoint::read_config(path.as_ref())
    }

    /// Refuses the options this port does not implement (see
    /// [`llama::Config::check`]) and a window of 0.
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        if self.sliding_window == Some(0) {
            return Err(ModelError::Unsupported {
                field: "sliding_window",
                value: "0".to_owned(),
                reason: "a window of 0 positions lets no token see anything",
            });
        }
        self.base.check()
    }
}

impl TryFrom<&Config> for Decoder {
    type Error = ModelError;

    /// Checks the config and takes its sizes and options.
    fn try_from(cfg: &Config) -> std::result::Result<Self, ModelError> {
        cfg.check()?;
        Ok(Decoder {
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: cfg.sliding_window,
            ..Decoder::try_from(&cfg.base)?
        })
    }
}

/// Loads the model from transformers' checkpoint names.
pub fn load(vb: VarBuilder, cfg: &Config) -> Result<MistralForCausalLM> {
    let decoder = Decoder::try_from(cfg).map_err(candle_core::Error::wrap)?;
    llama::LlamaForCausalLM::load_decoder(vb, &decoder)
}
