//! Hugging Face checkpoints as adaptable candle models: each architecture a
//! set of plain structs with `#[derive(Adaptable)]` whose field names are
//! transformers' module names, so `apply_lora(all_linear())` adapts them and
//! PEFT's adapters (`base_model.model.model.layers.0.self_attn.q_proj...`)
//! load unchanged.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use peft_core::prelude::*;
//! use peft_models::AutoModel;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut model = AutoModel::from_dir("path/to/checkpoint", DType::F32, &Device::Cpu)?;
//! model.apply_lora(LoraConfig::from(all_linear()).rank(8))?;
//! let input_ids = Tensor::new(&[[1u32, 17, 33, 8]], &Device::Cpu)?;
//! let logits = model.forward(&input_ids)?; // [1, 4, vocab]
//! # Ok(())
//! # }
//! ```
//!
//! | module | architecture | transformers class |
//! | --- | --- | --- |
//! | [`llama`] | Llama (GQA, RoPE with default / linear / dynamic / llama3 scaling, RMSNorm; tied or untied head), and the decoder the next four share | `LlamaForCausalLM` |
//! | [`mistral`] | Mistral (sliding-window attention) | `MistralForCausalLM` |
//! | [`phi3`] | Phi-3 (fused `qkv_proj` and `gate_up_proj`) | `Phi3ForCausalLM` |
//! | [`qwen2`] | Qwen2 (q/k/v biases, tied head) | `Qwen2ForCausalLM` |
//! | [`qwen3`] | Qwen3 (per-head q/k RMSNorm, free `head_dim`) | `Qwen3ForCausalLM` |
//! | [`gemma2`] | Gemma 2 (soft-capping, four norms with `1 + w`, alternating sliding layers, scaled embedding) | `Gemma2ForCausalLM` |
//! | [`gpt2`] | GPT-2 (`Conv1D` layers through `fan_in_fan_out`, tied head) | `GPT2LMHeadModel` |
//!
//! [`hub::resolve`] finds a Hub id (`org/name`) in the local Hugging Face
//! cache. [`Checkpoint`] opens a folder (`config.json`, `model.safetensors` or
//! shards with `model.safetensors.index.json`) and checks it;
//! [`AutoModel`] picks the architecture from `config.json`'s `model_type`.
//! [`eval`] measures the next-token loss on a jsonl data set.
//! [`tokenizer`] reads `tokenizer.json` and renders chat templates.
//! [`rope`] computes rotary embeddings as transformers does.
//! [`generate`] continues a prompt, greedy or sampled, through the KV cache.
//! [`nn`] holds the differentiable building blocks the architectures share.

#![warn(missing_docs)]

mod auto;
mod cache;
mod checkpoint;
pub mod classification;
pub mod combine;
pub mod convert;
mod error;
pub mod eval;
pub mod gemma2;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod inspect;
pub mod llama;
pub mod merge;
pub mod mistral;
pub mod nn;
mod output;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod rope;
pub mod tokenizer;
pub mod train;

pub use auto::{AutoModel, SUPPORTED_MODEL_TYPES};
pub use checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE};
pub use error::{DownloadError, ModelError, Result};
pub use tokenizer::{Message, Tokenizer};
