//! The base model as llama.cpp sees it: the architecture a `model_type`
//! is converted as, llama.cpp's tensor names for transformers' modules,
//! the module shapes `config.json` gives, and the q/k row permutation of
//! `convert_hf_to_gguf.py`'s `LlamaModel.permute`.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::Value as Json;

use super::adapter::LoraPair;
use super::GGUF_MODEL_TYPES;
use crate::error::{ModelError, Result};

/// llama.cpp's architecture for a `model_type`, as convert_hf_to_gguf.py
/// picks its model class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    /// `LlamaModel`: llama and mistral (q/k permuted).
    Llama,
    /// `Qwen2Model`.
    Qwen2,
    /// `Qwen3Model` (a `Qwen2Model`).
    Qwen3,
    /// `Gemma2Model`.
    Gemma2,
    /// `Phi3MiniModel`.
    Phi3,
    /// `GPT2Model`.
    Gpt2,
}

impl Arch {
    fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "phi3" => Arch::Phi3,
            "gpt2" => Arch::Gpt2,
            _ => return None,
        })
    }

    /// `general.architecture` (gguf-py's `MODEL_ARCH_NAMES`).
    pub(super) fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Phi3 => "phi3",
            Arch::Gpt2 => "gpt2",
        }
    }
}

/// A layer kind, with llama.cpp's tensor name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Qkv,
    GateUp,
    Embed,
    Head,
}

impl Slot {
    /// gguf-py's `TENSOR_NAMES` (Phi-3's fused gate_up is `ffn_up`).
    fn gguf_name(self) -> &'static str {
        match self {
            Slot::Q => "attn_q",
            Slot::K => "attn_k",
            Slot::V => "attn_v",
            Slot::O => "attn_output",
            Slot::Gate => "ffn_gate",
            Slot::Up | Slot::GateUp => "ffn_up",
            Slot::Down => "ffn_down",
            Slot::Qkv => "attn_qkv",
            Slot::Embed => "token_embd",
            Slot::Head => "output",
        }
    }
}

/// The base model: its architecture and the sizes of its layers, from
/// `config.json`.
pub(super) struct BaseModel {
    config_path: PathBuf,
    pub(super) model_type: String,
    pub(super) arch: Arch,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
}

/// Where a LoRA pair goes, and what it must look like.
pub(super) struct Target {
    /// The base tensor's GGUF name (`blk.0.attn_q.weight`).
    pub(super) name: String,
    slot: Slot,
    /// (out, in) of the module: LoRA B's rows, LoRA A's columns.
    pub(super) expected: (usize, usize),
    /// Heads to permute LoRA B's rows over (q_proj, k_proj of Llama).
    permute_heads: Option<usize>,
}

impl BaseModel {
    pub(super) fn read(model_dir: &Path) -> Result<Self> {
        let config_path = model_dir.join(crate::CONFIG_FILE);
        if !config_path.is_file() {
            return Err(ModelError::MissingFile {
                path: config_path,
                what: "the base model's config.json",
            });
        }
        let text = std::fs::read_to_string(&config_path).map_err(|cause| ModelError::Io {
            path: config_path.clone(),
            cause,
        })?;
        let config: Json = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
            path: config_path.clone(),
            cause,
        })?;
        let model_type_value = config.get("model_type").unwrap_or(&Json::Null);
        let arch = model_type_value.as_str().and_then(Arch::from_model_type);
        let (Some(model_type), Some(arch)) = (model_type_value.as_str(), arch) else {
            return Err(ModelError::UnknownModelType {
                path: config_path,
                found: model_type_value
                    .as_str()
                    .map_or_else(|| model_type_value.to_string(), str::to_owned),
                supported: GGUF_MODEL_TYPES.join(", "),
            });
        };
        let number = |keys: &[&str]| -> Result<Option<usize>> {
            for key in keys {
                match config.get(*key) {
                    None | Some(Json::Null) => continue,
                    Some(value) => {
                        return match value.as_u64().and_then(|v| usize::try_from(v).ok()) {
                            Some(v) if v > 0 => Ok(Some(v)),
                            _ => Err(ModelError::ExportSetting {
                                path: config_path.clone(),
                                field: (*key).to_owned(),
                                value: value.to_string(),
                                reason: "a size must be a positive integer".to_owned(),
                            }),
                        };
                    }
                }
            }
            Ok(None)
        };
        let required = |keys: &[&str]| -> Result<usize> {
            number(keys)?.ok_or_else(|| ModelError::ExportSetting {
                path: config_path.clone(),
                field: keys.join(" / "),
                value: "null".to_owned(),
                reason: format!(
                    "a {model_type} config.json gives it, and the export checks the adapter's shapes with it"
                ),
            })
        };
        let gpt2 = arch == Arch::Gpt2;
        let layers = required(if gpt2 { &["n_layer"] } else { &["num_hidden_layers"] })?;
        let hidden = required(if gpt2 { &["n_embd"] } else { &["hidden_size"] })?;
        let heads = required(if gpt2 { &["n_head"] } else { &["num_attention_heads"] })?;
        let vocab = required(&["vocab_size"])?;
        let kv_heads = if gpt2 {
            heads
        } else {
            number(&["num_key_value_heads"])?.unwrap_or(heads)
        };
        let head_dim = if gpt2 { None } else { number(&["head_dim"])? }.unwrap_or(hidden / heads);
        // GPT-2's n_inner is null for 4 x n_embd.
        let intermediate = if gpt2 {
            number(&["n_inner"])?.unwrap_or(4 * hidden)
        } else {
            required(&["intermediate_size"])?
        };
        Ok(Self {
            model_type: model_type.to_owned(),
            config_path,
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            vocab,
        })
    }

    /// Where `pair` goes in llama.cpp's naming, refusing modules this base
    /// does not have (an adapter for another architecture, another size).
    pub(super) fn target(&self, path: &Path, pair: &LoraPair) -> Result<Target> {
        let module = pair.module.as_str();
        let refuse = |reason: String| ModelError::ExportTensor {
            path: path.to_path_buf(),
            key: if pair.embedding { pair.a.clone() } else { pair.b.clone() },
            reason,
        };
        let not_here = || {
            refuse(format!(
                "module `{module}` is not a layer of a {} checkpoint ({}); is the adapter for another architecture?",
                self.model_type,
                self.config_path.display()
            ))
        };
        let (layer, slot) = self.slot(module).ok_or_else(not_here)?;
        if let Some(layer) = layer {
            if layer >= self.layers {
                return Err(refuse(format!(
                    "module `{module}` is in layer {layer}, and the base ({}) has {} layers",
                    self.config_path.display(),
                    self.layers
                )));
            }
        }
        if slot == Slot::Head && self.arch == Arch::Gemma2 {
            return Err(refuse(
                "LoRA on lm_head: Gemma 2's head is its embedding, which llama.cpp does not adapt as an output \
                 (convert_lora_to_gguf.py refuses it too)"
                    .to_owned(),
            ));
        }
        if pair.embedding != (slot == Slot::Embed) {
            return Err(refuse(format!(
                "module `{module}` is {}, and the adapter holds {} factors for it",
                if slot == Slot::Embed {
                    "an embedding"
                } else {
                    "a linear layer"
                },
                if pair.embedding { "embedding" } else { "linear" }
            )));
        }
        let (heads, kv, hd, hidden, ff) = (self.heads, self.kv_heads, self.head_dim, self.hidden, self.intermediate);
        let expected = match slot {
            Slot::Q => (heads * hd, hidden),
            Slot::K | Slot::V => (kv * hd, hidden),
            Slot::O if self.arch == Arch::Gpt2 => (hidden, hidden),
            Slot::O => (hidden, heads * hd),
            Slot::Gate | Slot::Up => (ff, hidden),
            Slot::Down => (hidden, ff),
            Slot::Qkv if self.arch == Arch::Gpt2 => (3 * hidden, hidden),
            Slot::Qkv => ((heads + 2 * kv) * hd, hidden),
            Slot::GateUp => (2 * ff, hidden),
            // An embedding's LoRA B gives rows of width hidden, A indexes the vocabulary.
            Slot::Embed => (hidden, self.vocab),
            Slot::Head => (self.vocab, hidden),
        };
        // LlamaModel.permute: k_proj over the key/value heads.
        let permute_heads = match slot {
            Slot::Q if self.arch == Arch::Llama => Some(heads),
            Slot::K if self.arch == Arch::Llama => Some(kv),
            _ => None,
        };
        let name = match layer {
            Some(layer) => format!("blk.{layer}.{}.weight", slot.gguf_name()),
            None => format!("{}.weight", slot.gguf_name()),
        };
        Ok(Target {
            name,
            slot,
            expected,
            permute_heads,
        })
    }

    /// The layer and kind of a module path, for this architecture's
    /// transformers module names.
    fn slot(&self, module: &str) -> Option<(Option<usize>, Slot)> {
        let (blocks, embed) = match self.arch {
            Arch::Gpt2 => ("transformer.h.", "transformer.wte"),
            _ => ("model.layers.", "model.embed_tokens"),
        };
        if module == embed {
            return Some((None, Slot::Embed));
        }
        if module == "lm_head" {
            return Some((None, Slot::Head));
        }
        let rest = module.strip_prefix(blocks)?;
        let (layer, inner) = rest.split_once('.')?;
        // Digits only, as the layer index of a module path.
        if layer.is_empty() || !layer.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let layer: usize = layer.parse().ok()?;
        let slot = match (self.arch, inner) {
            (Arch::Gpt2, "attn.c_attn") => Slot::Qkv,
            (Arch::Gpt2, "attn.c_proj") => Slot::O,
            (Arch::Gpt2, "mlp.c_fc") => Slot::Up,
            (Arch::Gpt2, "mlp.c_proj") => Slot::Down,
            (Arch::Gpt2, _) => return None,
            (Arch::Phi3, "self_attn.qkv_proj") => Slot::Qkv,
            (Arch::Phi3, "mlp.gate_up_proj") => Slot::GateUp,
            (
                Arch::Phi3,
                "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" | "mlp.gate_proj" | "mlp.up_proj",
            ) => return None,
            (_, "self_attn.q_proj") => Slot::Q,
            (_, "self_attn.k_proj") => Slot::K,
            (_, "self_attn.v_proj") => Slot::V,
            (_, "self_attn.o_proj") => Slot::O,
            (_, "mlp.gate_proj") => Slot::Gate,
            (_, "mlp.up_proj") => Slot::Up,
            (_, "mlp.down_proj") => Slot::Down,
            _ => return None,
        };
        Some((Some(layer), slot))
    }
}

impl Target {
    /// The pair as llama.cpp wants it: A as PEFT stores it ([rank, in]) but
    /// transposed for an embedding ([vocab, rank], as llama.cpp gathers rows
    /// of it), B ([out, rank]) with its rows permuted for Llama's q and k.
    pub(super) fn transform(
        &self,
        path: &Path,
        pair: &LoraPair,
        a: Tensor,
        b: Tensor,
    ) -> Result<(Tensor, Tensor, bool)> {
        let a = if self.slot == Slot::Embed {
            a.t()?.contiguous()?
        } else {
            a
        };
        let Some(heads) = self.permute_heads else {
            return Ok((a, b, false));
        };
        let (rows, rank) = b.dims2()?;
        if rows % (2 * heads) != 0 {
            return Err(ModelError::ExportTensor {
                path: path.to_path_buf(),
                key: pair.b.clone(),
                reason: format!("{rows} rows do not split into {heads} heads of an even size, as RoPE's pairs need"),
            });
        }
        // LlamaModel.permute: within each head, the rotated halves
        // (0..d/2, d/2..d) become interleaved pairs (0, d/2), (1, d/2+1), ...
        let b = b
            .reshape((heads, 2, rows / heads / 2, rank))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, rank))?;
        Ok((a, b, true))
    }
}
