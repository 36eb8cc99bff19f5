//! [`AutoModel`]: a checkpoint's architecture chosen from its `config.json`,
//! as transformers' `AutoModelForCausalLM` does.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use peft_core::{Adaptable, LayerKind, PeftModel, Role};

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::llama::KvCache;
use crate::{gemma2, gpt2, llama, mistral, phi3, qwen2, qwen3};

/// The `model_type`s of `config.json` this crate implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["gemma2", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3"];

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
    /// `MistralForCausalLM` (the Llama decoder with a sliding window).
    Mistral(mistral::MistralForCausalLM),
    /// `Phi3ForCausalLM` (the Llama decoder with fused projections).
    Phi3(phi3::Phi3ForCausalLM),
    /// `Qwen2ForCausalLM` (the Llama decoder with q/k/v biases).
    Qwen2(qwen2::Qwen2ForCausalLM),
    /// `Qwen3ForCausalLM` (the Llama decoder with q/k norms).
    Qwen3(qwen3::Qwen3ForCausalLM),
    /// `Gemma2ForCausalLM`.
    Gemma2(gemma2::Gemma2ForCausalLM),
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
        if let Some(decoder) = llama_family_decoder(checkpoint)? {
            let vb = checkpoint.var_builder(dtype, device)?;
            let model = llama::LlamaForCausalLM::load_decoder(vb, &decoder).map_err(weights_error)?;
            return Ok(match checkpoint.model_type() {
                "mistral" => AutoModel::Mistral(model),
                "phi3" => AutoModel::Phi3(model),
                "qwen2" => AutoModel::Qwen2(model),
                "qwen3" => AutoModel::Qwen3(model),
                _ => AutoModel::Llama(model),
            });
        }
        match checkpoint.model_type() {
            "gemma2" => {
                let config: gemma2::Config = checkpoint.config()?;
                config.check()?;
                let vb = checkpoint.var_builder(dtype, device)?;
                gemma2::Gemma2ForCausalLM::load(vb, &config)
                    .map(AutoModel::Gemma2)
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

    /// Quantizes every linear layer but the head to `dtype` (QLoRA on a
    /// checkpoint loaded in f32): the weights stay quantized and adapters
    /// train on top. Returns the quantized layers' paths. Every layer is
    /// checked first (the model loaded in f32, no adapter yet, a width that
    /// is a multiple of the format's block: 32 for Q8_0 and Q4_0, 256 for
    /// Q4K); on error no layer has changed.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<Vec<String>> {
        let quantizable =
            |layer: &peft_core::Layer, role: Role| role == Role::Hidden && layer.kind() == LayerKind::Linear;
        for layer in self.layers() {
            if !quantizable(layer.layer, layer.role) {
                continue;
            }
            let refuse = |reason: String| {
                Err(ModelError::Quantize {
                    module: layer.path.clone(),
                    reason,
                })
            };
            if layer.layer.dtype() != DType::F32 || layer.layer.is_quantized() {
                return refuse(format!(
                    "load the model in f32 to quantize it (it is {:?})",
                    layer.layer.dtype()
                ));
            }
            if layer.layer.adapter_names().next().is_some() {
                return refuse("quantize before adding adapters".to_owned());
            }
            if !layer.layer.in_features().is_multiple_of(dtype.block_size()) {
                return refuse(format!(
                    "{dtype:?} quantizes blocks of {} inputs, and the layer has {}",
                    dtype.block_size(),
                    layer.layer.in_features()
                ));
            }
        }
        let mut quantized = Vec::new();
        for layer in self.layers_mut() {
            if quantizable(layer.layer, layer.role) {
                layer.layer.quantize(dtype)?;
                quantized.push(layer.path);
            }
        }
        Ok(quantized)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            AutoModel::Llama(model)
            | AutoModel::Mistral(model)
            | AutoModel::Phi3(model)
            | AutoModel::Qwen2(model)
            | AutoModel::Qwen3(model) => model.forward(input_ids),
            AutoModel::Gemma2(model) => model.forward(input_ids),
            AutoModel::Gpt2(model) => model.forward(input_ids),
        }
    }

    /// Logits for the token ids `new_ids` `[batch, t]` that follow the
    /// positions `cache` holds; their keys and values are added to it.
    /// Start each sequence with `KvCache::default()`.
    pub fn forward_with_cache(&self, new_ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        match self {
            AutoModel::Llama(model)
            | AutoModel::Mistral(model)
            | AutoModel::Phi3(model)
            | AutoModel::Qwen2(model)
            | AutoModel::Qwen3(model) => model.forward_with_cache(new_ids, cache),
            AutoModel::Gemma2(model) => model.forward_with_cache(new_ids, cache),
            AutoModel::Gpt2(model) => model.forward_with_cache(new_ids, cache),
        }
    }

    /// The positions the model was trained for, when its config says.
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            AutoModel::Llama(model)
            | AutoModel::Mistral(model)
            | AutoModel::Phi3(model)
            | AutoModel::Qwen2(model)
            | AutoModel::Qwen3(model) => model.max_positions(),
            AutoModel::Gemma2(model) => model.max_positions(),
            AutoModel::Gpt2(model) => Some(model.max_positions()),
        }
    }

    /// The architecture's `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            AutoModel::Llama(_) => "llama",
            AutoModel::Mistral(_) => "mistral",
            AutoModel::Phi3(_) => "phi3",
            AutoModel::Qwen2(_) => "qwen2",
            AutoModel::Qwen3(_) => "qwen3",
            AutoModel::Gemma2(_) => "gemma2",
            AutoModel::Gpt2(_) => "gpt2",
        }
    }
}

/// The decoder of a checkpoint of the Llama family (`llama`, `mistral`,
/// `phi3`, `qwen2`, `qwen3`: one [`llama::Decoder`] with options), its
/// config checked; `None` for another `model_type`.
pub(crate) fn llama_family_decoder(checkpoint: &Checkpoint) -> Result<Option<llama::Decoder>> {
    let decoder = match checkpoint.model_type() {
        "llama" => llama::Decoder::try_from(&checkpoint.config::<llama::Config>()?)?,
        "mistral" => llama::Decoder::try_from(&checkpoint.config::<mistral::Config>()?)?,
        "phi3" => llama::Decoder::try_from(&checkpoint.config::<phi3::Config>()?)?,
        "qwen2" => llama::Decoder::try_from(&checkpoint.config::<qwen2::Config>()?)?,
        "qwen3" => llama::Decoder::try_from(&checkpoint.config::<qwen3::Config>()?)?,
        _ => return Ok(None),
    };
    Ok(Some(decoder))
}
