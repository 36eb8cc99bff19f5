//! [`AdapterSkeleton`]: a model made from adapter files alone, each module
//! a slot of the shape the files' tensors give, with zero base weights
//! that take no memory (a broadcast zero). It holds the adapters, so
//! [`PeftModel::add_weighted_adapter`] and
//! [`save_adapter`](PeftModel::save_adapter) work on it as on a model:
//! `peft combine` needs no base checkpoint, as PEFT's
//! `add_weighted_adapter` reads only the adapters' own tensors.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::adaptable::{Adaptable, Visitor, VisitorMut};
use crate::error::{InModule, PeftError, Result};
use crate::io::KEY_PREFIX;
use crate::kinds::AdapterConfig;
use crate::layer::{Adapter, Conv1d, Conv2d, Embedding, Layer, Linear};
use crate::model::attach::{attach, Copies, FileTensors};
use crate::model::standalone::Slot;
use crate::model::{PeftModel, StandaloneAdapter};
use crate::path::ModulePath;
use crate::targets::{regex, Targets};

/// A model with one slot per module that LoRA adapter files address,
/// holding those adapters under the names given.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use peft_core::prelude::*;
/// use peft_core::{AdapterSkeleton, Combination, CombineOptions, StandaloneAdapter};
///
/// #[derive(Adaptable)]
/// struct Block { up: Linear }
///
/// let dir = std::env::temp_dir().join(format!("peft-skeleton-doc-{}", std::process::id()));
/// let weight = Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu)?;
/// for (name, alpha) in [("a", 2.0), ("b", 4.0)] {
///     let mut block = Block { up: Linear::new(weight.clone(), None) };
///     block.apply_lora(LoraConfig::from(all_linear()).rank(2).alpha(alpha).init(LoraInit::Random))?;
///     block.save_adapter(dir.join(name), "default")?;
/// }
/// let (a, b) = (StandaloneAdapter::from_dir(dir.join("a"))?, StandaloneAdapter::from_dir(dir.join("b"))?);
/// let mut skeleton = AdapterSkeleton::from_adapters(&[("a", &a), ("b", &b)])?;
/// assert_eq!(skeleton.adapted_modules(), ["up"]);
/// skeleton.add_weighted_adapter(&["a", "b"], &[0.5, 0.5], "default", &CombineOptions::new(Combination::Cat))?;
/// skeleton.save_adapter(dir.join("combined"), "default")?;
/// assert_eq!(StandaloneAdapter::from_dir(dir.join("combined"))?.field("r"), Some(&4.into()));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AdapterSkeleton {
    /// The slots by module path, each with its path's segments.
    slots: BTreeMap<String, (Vec<String>, Slot)>,
}

impl std::fmt::Debug for AdapterSkeleton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterSkeleton")
            .field("modules", &self.slots.len())
            .field("adapters", &self.adapter_names())
            .finish()
    }
}

impl Adaptable for AdapterSkeleton {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        for (segments, slot) in self.slots.values() {
            for segment in segments {
                path.push(segment);
            }
            slot.visit(path, visitor);
            for _ in segments {
                path.pop();
            }
        }
    }

    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        for (segments, slot) in self.slots.values_mut() {
            for segment in segments.iter() {
                path.push(segment);
            }
            slot.visit_mut(path, visitor);
            for _ in segments.iter() {
                path.pop();
            }
        }
    }
}

impl AdapterSkeleton {
    /// A skeleton with a slot for every module the LoRA adapters address
    /// (a linear layer, an embedding or a convolution, as their tensors'
    /// shapes say), each adapter loaded under its name with the checks of
    /// [`PeftModel::load_adapter`], on its own modules only. Tensors are
    /// kept in the first adapter's dtype.
    ///
    /// Refused: adapters that are not LoRA ([`PeftError::NotCombinable`]),
    /// and adapters that disagree on a module's shape
    /// ([`PeftError::ShapeMismatch`]).
    pub fn from_adapters(adapters: &[(&str, &StandaloneAdapter)]) -> Result<Self> {
        let dtype = adapters.first().and_then(|(_, a)| a.dtype()).unwrap_or(DType::F32);
        let mut skeleton = AdapterSkeleton { slots: BTreeMap::new() };
        for (name, adapter) in adapters {
            if adapter.peft_type() != crate::kinds::lora::PEFT_TYPE {
                return Err(PeftError::NotCombinable {
                    adapter: (*name).to_owned(),
                    reason: format!("it is {}; only LoRA adapters combine", adapter.peft_type()),
                });
            }
            for module in adapter.modules() {
                if !skeleton.slots.contains_key(module) {
                    let slot = slot_for(name, module, adapter.tensors(), dtype)?;
                    let segments = module.split('.').map(str::to_owned).collect();
                    skeleton.slots.insert(module.to_owned(), (segments, slot));
                }
            }
        }
        for (name, adapter) in adapters {
            let modules = adapter.modules();
            let pattern = modules.iter().map(|m| regex_escape(m)).collect::<Vec<_>>().join("|");
            let config = OnModules {
                inner: adapter.config(),
                targets: regex(&format!("^(?:{pattern})$")),
            };
            // PEFT's saved embedding base weights are not adapter tensors.
            let tensors = adapter
                .tensors()
                .iter()
                .filter(|(key, _)| !key.contains(".base_layer."))
                .map(|(key, tensor)| (key.clone(), tensor.clone()))
                .collect();
            attach(
                &mut skeleton,
                name,
                &config,
                Some(FileTensors::new(tensors)),
                Copies::Skip,
            )?;
        }
        Ok(skeleton)
    }
}

/// The slot of `module`, shaped by its LoRA tensors in `tensors`.
fn slot_for(name: &str, module: &str, tensors: &BTreeMap<String, Tensor>, dtype: DType) -> Result<Slot> {
    let dims = |key: &str| {
        tensors
            .get(&format!("{KEY_PREFIX}{module}.{key}"))
            .map(|t| t.dims().to_vec())
    };
    // A zero that takes no memory: the base weight is never read.
    let zeros = |shape: Vec<usize>| {
        Tensor::zeros((), dtype, &Device::Cpu)
            .and_then(|z| z.broadcast_as(shape))
            .in_module(module)
    };
    if let (Some(a), Some(b)) = (dims("lora_A.weight"), dims("lora_B.weight")) {
        if a.len() == 2 && b.len() == 2 {
            return Ok(Slot::Linear(Linear::new(zeros(vec![b[0], a[1]])?, None)));
        }
        if a.len() >= 3 && b.len() == a.len() {
            let mut kernel = a.clone();
            kernel[0] = b[0];
            // A convolution kernel is reshaped by the slot: real zeros.
            let weight = Tensor::zeros(kernel, dtype, &Device::Cpu).in_module(module)?;
            return match a.len() {
                3 => Ok(Slot::Conv1d(
                    Conv1d::new(weight, None, Default::default()).in_module(module)?,
                )),
                4 => Ok(Slot::Conv2d(
                    Conv2d::new(weight, None, Default::default()).in_module(module)?,
                )),
                _ => Err(not_lora(name, module, "convolution tensors of more than 4 dimensions")),
            };
        }
    }
    if let (Some(a), Some(b)) = (dims("lora_embedding_A"), dims("lora_embedding_B")) {
        if a.len() == 2 && b.len() == 2 {
            let embedding = Embedding::new(zeros(vec![a[1], b[0]])?, b[0]).in_module(module)?;
            return Ok(Slot::Embedding(embedding));
        }
    }
    Err(not_lora(name, module, "no LoRA A and B tensors of 2 to 4 dimensions"))
}

fn not_lora(name: &str, module: &str, what: &str) -> PeftError {
    PeftError::NotCombinable {
        adapter: name.to_owned(),
        reason: format!("module `{module}`: {what}"),
    }
}

/// `text` with the regex metacharacters escaped (module paths hold `.`).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A config with its targets replaced by an exact list of modules.
struct OnModules<'a> {
    inner: &'a dyn AdapterConfig,
    targets: Targets,
}

impl AdapterConfig for OnModules<'_> {
    fn peft_type(&self) -> &'static str {
        self.inner.peft_type()
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn validate(&self) -> Result<()> {
        self.inner.validate()?;
        self.targets.validate()
    }
    fn check_layer(&self, module: &str, layer: &Layer, file_values: Option<usize>) -> Result<()> {
        self.inner.check_layer(module, layer, file_values)
    }
    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        self.inner.new_adapter(module, layer)
    }
    fn to_peft_config(&self) -> serde_json::Map<String, serde_json::Value> {
        self.inner.to_peft_config()
    }
}
