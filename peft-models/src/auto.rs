//! [`AutoModel`]: a checkpoint's architecture chosen from its `config.json`,
//! as transformers' `AutoModelForCausalLM` does.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::Adaptable;

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::{gpt2, llama};

/// The `model_type`s of `config.json` this crate implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["gpt2", "llama"];

/// A causal language model of any architecture this crate implements.
///
/// A newtype variant adds no segment to module paths, so the layers keep
/// transformers' names (`model.layers.0.self_attn.q_proj`) and PEFT's
/// adapters load unchanged.
#[derive(Adaptable)]
#[non_exhaustive]
pub enum AutoModel {
    /// `LlamaForCausalLM`.
    Llama(llama::LlamaForCausalLM),
    /// `GPT2LMHeadModel`.
    Gpt2(gpt2::Gpt2LmHeadModel),
}

impl AutoModel {
    /// Loads the checkpoint in `dir` (see [`Checkpoint::open`]) in `dtype`
    /// on `device`.
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(&Checkpoint::open(dir)?, dtype, device)
    }

    /// Loads an opened checkpoint: dispatches on its `model_type`, refuses
    /// options that are not implemented, then reads the weights.
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let weights_error = |cause| ModelError::Load {
            path: checkpoint.dir().to_path_buf(),
            cause,
        };
        match checkpoint.model_type() {
            "llama" => {
                let config: llama::Config = checkpoint.config()?;
                config.check()?;
                let vb = checkpoint.var_builder(dtype, device)?;
                llama::LlamaForCausalLM::load(vb, &config)
                    .map(AutoModel::Llama)
                    .map_err(weights_error)
            }
            "gpt2" => {
                let config: gpt2::Config = checkpoint.config()?;
                let vb = checkpoint.var_builder(dtype, device)?;
                gpt2::Gpt2LmHeadModel::load(vb, &config)
                    .map(AutoModel::Gpt2)
                    .map_err(weights_error)
            }
            other => Err(ModelError::UnknownModelType {
                path: checkpoint.dir().join(crate::checkpoint::CONFIG_FILE),
                found: other.to_owned(),
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            }),
        }
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            AutoModel::Llama(model) => model.forward(input_ids),
            AutoModel::Gpt2(model) => model.forward(input_ids),
        }
    }

    /// The architecture's `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            AutoModel::Llama(_) => "llama",
            AutoModel::Gpt2(_) => "gpt2",
        }
    }
}
