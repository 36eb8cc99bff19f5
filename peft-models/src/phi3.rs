//! transformers' `Phi3ForCausalLM`: the Llama decoder with q, k and v fused
//! into one projection (`qkv_proj`, q then k then v) and the MLP's gate and
//! up fused into `gate_up_proj` (gate first). PEFT targets those fused
//! layers by their names, so an adapter adapts q, k and v together.

use candle_core::Result;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::ModelError;
use crate::llama::{self, Decoder};

/// Phi-3 is the Llama-family decoder with fused projections.
pub type Phi3ForCausalLM = llama::LlamaForCausalLM;

/// The fields of transformers' Phi-3 `config.json` this model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields Phi-3 shares with Llama.
    #[serde(flatten)]
    pub base: llama::Config,
    /// The attention window (`null`: none).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// The part of each head RoPE rotates; only 1 (all of it) is implemented.
    #[serde(default = "one")]
    pub partial_rotary_factor: f64,
}

fn one() -> f64 {
    1.0
}

impl Config {
    /// Reads a transformers `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::result::Result<Self, ModelError> {
        crate::checkpoint::read_config(path.as_ref())
    }

    /// Refuses the options this port does not implement: a partial rotary
    /// factor, RoPE scaling (Phi-3's 128k models use `longrope`).
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        if self.partial_rotary_factor != 1.0 {
            return Err(ModelError::Unsupported {
                field: "partial_rotary_factor",
                value: self.partial_rotary_factor.to_string(),
                reason: "only RoPE over the whole head (1.0) is implemented",
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
            fused_projections: true,
            ..Decoder::try_from(&cfg.base)?
        })
    }
}

/// Loads the model from transformers' checkpoint names.
pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Phi3ForCausalLM> {
    let decoder = Decoder::try_from(cfg).map_err(candle_core::Error::wrap)?;
    llama::LlamaForCausalLM::load_decoder(vb, &decoder)
}
