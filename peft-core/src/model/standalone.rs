//! A PEFT adapter read from its files and applied to base weights one
//! module at a time, with no model: for merging a checkpoint tensor by
//! tensor (streaming, any architecture) and for loading a model whose
//! layers cannot be derived on with the adapter merged as it loads.
//!
//! Each module is merged by placing its base weight, alone, in a
//! one-layer model at the module's path and running the same code as
//! [`PeftModel::load_adapter`] then [`PeftModel::merge_and_unload`]: the
//! config's targets, the checks, and every kind's merge are those of a
//! whole model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::adaptable::{Adaptable, Visitor, VisitorMut};
use crate::error::{InModule, PeftError, Result};
use crate::io::{self, KEY_PREFIX};
use crate::kinds::{AdapterConfig, TrainedBias};
use crate::layer::{Conv1d, Conv2d, Embedding, Linear};
use crate::model::attach::{attach, Copies, FileTensors};
use crate::model::{PeftModel, DEFAULT_ADAPTER};
use crate::path::ModulePath;

/// A module's base weights, as a checkpoint stores them.
#[derive(Debug, Clone)]
pub enum BaseModule {
    /// A linear layer: `weight` `[out, in]` (`[in, out]` for an adapter
    /// saved with `fan_in_fan_out`, as GPT-2's `Conv1D` stores it).
    Linear {
        /// The weight.
        weight: Tensor,
        /// The bias, if any.
        bias: Option<Tensor>,
    },
    /// An embedding table `[vocab, dim]`.
    Embedding {
        /// The table.
        table: Tensor,
    },
    /// A convolution kernel `[out, in, k...]` (1-D or 2-D).
    Conv {
        /// The kernel.
        weight: Tensor,
        /// The bias, if any.
        bias: Option<Tensor>,
    },
}

/// One slot placed at a module path: a model of one layer.
pub(super) enum Slot {
    Linear(Linear),
    Embedding(Embedding),
    Conv1d(Conv1d),
    Conv2d(Conv2d),
}

struct Placed {
    segments: Vec<String>,
    slot: Slot,
}

impl Slot {
    /// Visits the slot at `path`.
    pub(super) fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        match self {
            Slot::Linear(slot) => slot.visit(path, visitor),
            Slot::Embedding(slot) => slot.visit(path, visitor),
            Slot::Conv1d(slot) => slot.visit(path, visitor),
            Slot::Conv2d(slot) => slot.visit(path, visitor),
        }
    }

    /// Visits the slot at `path`, mutably.
    pub(super) fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        match self {
            Slot::Linear(slot) => slot.visit_mut(path, visitor),
            Slot::Embedding(slot) => slot.visit_mut(path, visitor),
            Slot::Conv1d(slot) => slot.visit_mut(path, visitor),
            Slot::Conv2d(slot) => slot.visit_mut(path, visitor),
        }
    }
}

impl Adaptable for Placed {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        for segment in &self.segments {
            path.push(segment);
        }
        self.slot.visit(path, visitor);
        for _ in &self.segments {
            path.pop();
        }
    }

    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        for segment in &self.segments {
            path.push(segment);
        }
        self.slot.visit_mut(path, visitor);
        for _ in &self.segments {
            path.pop();
        }
    }
}

/// A PEFT adapter folder read whole (config and tensors, checked as
/// [`PeftModel::load_adapter`] checks them), ready to merge into base
/// weights module by module.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use peft_core::prelude::*;
/// use peft_core::{BaseModule, StandaloneAdapter};
///
/// #[derive(Adaptable)]
/// struct Block { up: Linear }
///
/// // An adapter saved from a model...
/// let weight = Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu)?;
/// let mut block = Block { up: Linear::new(weight.clone(), None) };
/// block.apply_lora(LoraConfig::from(all_linear()).rank(2).init(LoraInit::Random))?;
/// let dir = std::env::temp_dir().join(format!("peft-standalone-doc-{}", std::process::id()));
/// block.save_adapter(&dir, "default")?;
///
/// // ...merged into the bare weight, as the model merges it.
/// let adapter = StandaloneAdapter::from_dir(&dir)?;
/// assert_eq!(adapter.modules(), ["up"]);
/// let (merged, _) = adapter.merge_module("up", BaseModule::Linear { weight, bias: None })?;
/// block.merge_and_unload()?;
/// let difference = (merged - block.up.weight()?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert_eq!(difference, 0.0);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StandaloneAdapter {
    config: Box<dyn AdapterConfig>,
    fields: serde_json::Map<String, Value>,
    tensors: BTreeMap<String, Tensor>,
    modules: BTreeSet<String>,
    /// Modules the file holds whole (`modules_to_save`): merging takes them as they are.
    copied: BTreeSet<String>,
}

impl std::fmt::Debug for StandaloneAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneAdapter")
            .field("peft_type", &self.config.peft_type())
            .field("modules", &self.modules.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl StandaloneAdapter {
    /// Reads the adapter in `dir` (`adapter_config.json`,
    /// `adapter_model.safetensors`), tensors on the CPU.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        io::with_adapter_files(dir.as_ref(), Self::from_files)
    }

    /// The adapter whose two files are in memory (see
    /// [`PeftModel::load_adapter_from_bytes`]).
    pub fn from_bytes(config: &str, weights: &[u8]) -> Result<Self> {
        Self::from_files(io::AdapterFiles {
            config,
            config_path: Path::new(io::CONFIG_FILE),
            weights,
            weights_path: Path::new(io::WEIGHTS_FILE),
        })
    }

    fn from_files(files: io::AdapterFiles<'_>) -> Result<Self> {
        let fields = match serde_json::from_str::<Value>(files.config) {
            Ok(Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        let decoded = io::decode(files, &Device::Cpu)?;
        let targets = decoded.config.targets();
        let copied: BTreeSet<String> = decoded
            .tensors
            .keys()
            .filter_map(|key| copied_module_of(key, targets))
            .collect();
        let mut modules: BTreeSet<String> = decoded.tensors.keys().filter_map(|key| module_of(key)).collect();
        modules.extend(copied.iter().cloned());
        Ok(Self {
            config: decoded.config,
            fields,
            tensors: decoded.tensors,
            modules,
            copied,
        })
    }

    /// PEFT's `peft_type` (`LORA`, `IA3`, `LOHA`, `LOKR`).
    pub fn peft_type(&self) -> &'static str {
        self.config.peft_type()
    }

    /// The parsed config.
    pub fn config(&self) -> &dyn AdapterConfig {
        &*self.config
    }

    /// A field of `adapter_config.json` as written (`r`, `use_dora`, ...).
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// Whether merging adds a delta that does not depend on the base weight
    /// (LoRA, LoHa, LoKr), so deltas of several adapters add up and can be
    /// weighted. DoRA and IA³ are not, nor a LoRA whose initialisation
    /// rewrites the base (PiSSA, OLoRA: merging gives `W - s·B0·A0 + s·B·A`).
    pub fn is_additive(&self) -> bool {
        let dora = self.field("use_dora").and_then(Value::as_bool).unwrap_or(false);
        let init = self.field("init_lora_weights").and_then(Value::as_str).unwrap_or("");
        let rewrites_base = init.starts_with("pissa") || init.eq_ignore_ascii_case("olora");
        matches!(self.peft_type(), "LORA" | "LOHA" | "LOKR") && !dora && !rewrites_base
    }

    /// Whether the adapter was saved with `fan_in_fan_out` (weights stored
    /// `[in, out]`, GPT-2's `Conv1D`).
    pub fn fan_in_fan_out(&self) -> bool {
        self.field("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false)
    }

    /// The module paths the file holds tensors for, sorted
    /// (`model.layers.0.self_attn.q_proj`, without PEFT's `base_model.model.`).
    pub fn modules(&self) -> Vec<&str> {
        self.modules.iter().map(String::as_str).collect()
    }

    /// The tensors by file key.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// The modules the file holds whole (`modules_to_save`: a classifier
    /// head, ...), sorted; [`merge_module`](Self::merge_module) gives their
    /// saved weights as they are.
    pub fn copied_modules(&self) -> Vec<&str> {
        self.copied.iter().map(String::as_str).collect()
    }

    /// The bias the file sets for module `path`, if any: merging replaces
    /// the checkpoint's bias with it. Either the bias of a whole copy
    /// (`modules_to_save`) or a bias trained beside the adapter (PEFT's
    /// `bias = "all" | "lora_only"`: `<module>.base_layer.bias` for an
    /// adapted module, `<module>.bias` for another).
    pub fn saved_bias(&self, path: &str) -> Option<&Tensor> {
        let trained = self.config.trained_bias() != TrainedBias::None;
        if !(trained || self.copied.contains(path)) {
            return None;
        }
        let key = |suffix: &str| format!("{KEY_PREFIX}{path}.{suffix}");
        let wrapped = trained.then(|| self.tensors.get(&key("base_layer.bias"))).flatten();
        wrapped.or_else(|| self.tensors.get(&key("bias")))
    }

    /// Whether the file trains base biases beside the adapter (PEFT's
    /// `bias = "all" | "lora_only"`): see [`saved_bias`](Self::saved_bias).
    pub fn trains_biases(&self) -> bool {
        self.config.trained_bias() != TrainedBias::None
    }

    /// The keys of trainable-token rows the file holds
    /// (`<module>.token_adapter.trainable_tokens_delta` for LoRA's
    /// `trainable_token_indices`, `<module>.trainable_tokens_delta` for the
    /// `TRAINABLE_TOKENS` kind): what the file tools cannot merge or convert
    /// yet, so that they refuse rather than leave the rows out.
    pub fn trainable_token_keys(&self) -> Vec<&str> {
        self.tensors
            .keys()
            .filter(|key| key.ends_with("trainable_tokens_delta"))
            .map(String::as_str)
            .collect()
    }

    /// Whether the file holds tensors for the module at `path`.
    pub fn adapts(&self, path: &str) -> bool {
        self.modules.contains(path)
    }

    /// The weights of module `path` with the adapter merged, as
    /// `merge_and_unload()` would leave them, in the base's layout and
    /// dtype (`fan_in_fan_out` weights come back `[in, out]`), and the
    /// bias. Refuses a module the file has no tensors for, tensors of the
    /// wrong shape (naming the key) and bases of another kind than the
    /// adapter's tensors are for.
    pub fn merge_module(&self, path: &str, base: BaseModule) -> Result<(Tensor, Option<Tensor>)> {
        if !self.adapts(path) {
            return Err(PeftError::NoTargetMatched {
                requested: format!("[{path}] (the adapter file has no tensor for it)"),
                candidates: 1,
            });
        }
        if self.copied.contains(path) {
            return self.copy_of(path, base);
        }
        let transposed = self.fan_in_fan_out() && matches!(base, BaseModule::Linear { .. });
        let prefix = format!("{KEY_PREFIX}{path}.");
        let (saved_base, tensors): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) = self
            .tensors
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(key, tensor)| (key.clone(), tensor.clone()))
            .partition(|(key, _)| &key[prefix.len()..] == "base_layer.weight");
        let base = with_saved_base(path, base, &saved_base)?;
        let slot = self.slot_for(path, base)?;
        let mut placed = Placed {
            segments: path.split('.').map(str::to_owned).collect(),
            slot,
        };
        attach(
            &mut placed,
            DEFAULT_ADAPTER,
            &*self.config,
            Some(FileTensors::new(tensors)),
            Copies::Skip,
        )?;
        placed.merge_and_unload()?;
        let (weight, bias) = match &placed.slot {
            Slot::Linear(slot) => (slot.weight().in_module(path)?.clone(), slot.bias().cloned()),
            Slot::Embedding(slot) => (slot.embeddings().in_module(path)?, None),
            Slot::Conv1d(slot) => (slot.weight().in_module(path)?, slot.layer().bias().cloned()),
            Slot::Conv2d(slot) => (slot.weight().in_module(path)?, slot.layer().bias().cloned()),
        };
        let weight = if transposed {
            weight.t().and_then(|w| w.contiguous()).in_module(path)?
        } else {
            weight
        };
        Ok((weight, bias))
    }

    /// A module the file holds whole (`modules_to_save`): its saved weight
    /// (and bias, else the base's) in the base's dtype, as merging leaves it.
    fn copy_of(&self, path: &str, base: BaseModule) -> Result<(Tensor, Option<Tensor>)> {
        let (current, bias) = match base {
            BaseModule::Linear { weight, bias } | BaseModule::Conv { weight, bias } => (weight, bias),
            BaseModule::Embedding { table } => (table, None),
        };
        let saved = |name: &str, like: &Tensor| -> Result<Option<Tensor>> {
            let key = format!("{KEY_PREFIX}{path}.{name}");
            let Some(tensor) = self.tensors.get(&key) else {
                return Ok(None);
            };
            if tensor.dims() != like.dims() {
                return Err(PeftError::ShapeMismatch {
                    key,
                    expected: like.dims().to_vec(),
                    found: tensor.dims().to_vec(),
                });
            }
            Ok(Some(tensor.to_dtype(like.dtype()).in_module(path)?))
        };
        let Some(weight) = saved("weight", &current)? else {
            return Err(PeftError::MissingTensor {
                module: path.to_owned(),
                key: format!("{KEY_PREFIX}{path}.weight"),
            });
        };
        let bias = match bias {
            Some(bias) => Some(saved("bias", &bias)?.unwrap_or(bias)),
            None => None,
        };
        Ok((weight, bias))
    }

    fn slot_for(&self, path: &str, base: BaseModule) -> Result<Slot> {
        let wrong = |what: &str, dims: &[usize]| PeftError::Module {
            module: path.to_owned(),
            cause: candle_core::Error::Msg(format!("{what}, this base weight is {dims:?}")),
        };
        Ok(match base {
            BaseModule::Linear { weight, bias } => {
                if weight.rank() != 2 {
                    return Err(wrong("a linear weight has 2 dimensions", weight.dims()));
                }
                if self.fan_in_fan_out() {
                    let weight = weight.t().and_then(|w| w.contiguous()).in_module(path)?;
                    let mut layer = Linear::new(weight, bias);
                    layer.set_fan_in_fan_out();
                    Slot::Linear(layer)
                } else {
                    Slot::Linear(Linear::new(weight, bias))
                }
            }
            BaseModule::Embedding { table } => {
                let (_, dim) = table.dims2().in_module(path)?;
                Slot::Embedding(Embedding::new(table, dim).in_module(path)?)
            }
            BaseModule::Conv { weight, bias } => match weight.rank() {
                3 => Slot::Conv1d(Conv1d::new(weight, bias, Default::default()).in_module(path)?),
                4 => Slot::Conv2d(Conv2d::new(weight, bias, Default::default()).in_module(path)?),
                _ => return Err(wrong("a convolution kernel has 3 or 4 dimensions", weight.dims())),
            },
        })
    }

    /// The dtype of the file's tensors (the first one's).
    pub fn dtype(&self) -> Option<DType> {
        self.tensors.values().next().map(Tensor::dtype)
    }
}

/// The base with the weights PEFT saved beside the adapter put in:
/// `save_embedding_layers` (on by default when an embedding layer is
/// targeted) writes `<module>.base_layer.weight`, and PEFT's loader puts it
/// into the base layer, so the merge starts from it.
fn with_saved_base(path: &str, base: BaseModule, saved: &BTreeMap<String, Tensor>) -> Result<BaseModule> {
    let Some((key, weight)) = saved.iter().find(|(key, _)| key.ends_with(".base_layer.weight")) else {
        return Ok(base);
    };
    let current = match &base {
        BaseModule::Linear { weight, .. } | BaseModule::Conv { weight, .. } => weight,
        BaseModule::Embedding { table } => table,
    };
    if weight.dims() != current.dims() {
        return Err(PeftError::ShapeMismatch {
            key: key.clone(),
            expected: current.dims().to_vec(),
            found: weight.dims().to_vec(),
        });
    }
    let weight = weight.to_dtype(current.dtype()).in_module(path)?;
    Ok(match base {
        BaseModule::Linear { bias, .. } => BaseModule::Linear { weight, bias },
        BaseModule::Conv { bias, .. } => BaseModule::Conv { weight, bias },
        BaseModule::Embedding { .. } => BaseModule::Embedding { table: weight },
    })
}

/// The module a file key belongs to: `base_model.model.<module>.<adapter
/// tensor>`, where the adapter tensor is `lora_A.weight`,
/// `lora_magnitude_vector`, `ia3_l`, `hada_w1_a`, `lokr_w1`, ... (the
/// part from the first segment that names an adapter tensor).
fn module_of(key: &str) -> Option<String> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let segments: Vec<&str> = rest.split('.').collect();
    let at = segments.iter().position(|segment| is_adapter_segment(segment))?;
    (at > 0).then(|| segments[..at].join("."))
}

/// The module of a file key that a `modules_to_save` copy wrote
/// (`base_model.model.score.weight` → `score`): a key with no adapter
/// segment, whose module is, or lies inside, a module `targets` copies.
fn copied_module_of(key: &str, targets: &crate::targets::Targets) -> Option<String> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (module, _) = rest.rsplit_once('.')?;
    if rest.split('.').any(is_adapter_segment) {
        return None;
    }
    targets.saved_module_containing(module).map(|_| module.to_owned())
}

fn is_adapter_segment(segment: &str) -> bool {
    segment == "base_layer"
        || ["lora_", "ia3_", "hada_", "lokr_"]
            .iter()
            .any(|prefix| segment.starts_with(prefix))
}
