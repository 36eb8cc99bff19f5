//! Adding an adapter to a model: the one attach routine that
//! [`PeftModel::add_adapter`] and loading share, the name checks, and
//! saving an adapter's config and tensors for [`crate::io`] to write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

use crate::adaptable::Role;
use crate::adaptable::Visitor;
use crate::error::{capped_list, InModule, PeftError, Result};
use crate::io::{write_adapter, KEY_PREFIX};
use crate::kinds::trainable_tokens::lora_token_adapter;
use crate::kinds::{AdapterConfig, ModuleCopy, TrainedBias};
use crate::layer::{Adapter, Composition, LayerKind};
use crate::model::{LayerRef, PeftModel, DEFAULT_ADAPTER};
use crate::path::ModulePath;
use crate::targets::{name_matches, Targets, TokenIndices};

/// Adds an adapter made from `config` under `name` on every layer `config`
/// targets. With `file`, each new adapter's tensors are then set from it
/// (a saved adapter being loaded) and every tensor of the file must be used.
///
/// Everything that can fail (names, targets, each layer's check, the
/// adapters, their tensors) happens before the model changes: on error it
/// is as it was.
pub(crate) fn attach<M: PeftModel + ?Sized, C: AdapterConfig + ?Sized>(
    model: &mut M,
    name: &str,
    config: &C,
    mut file: Option<FileTensors>,
    copies: Copies,
) -> Result<()> {
    check_adapter_name(name)?;
    check_new_name(model, name)?;
    config.validate()?;
    let adapters = {
        let layers = model.layers();
        let chosen = config
            .targets()
            .resolve(layers.iter().map(|l| (l.path.as_str(), l.role, l.layer.kind())))?;
        let mut adapters = Vec::with_capacity(chosen.len());
        for &i in &chosen {
            let LayerRef { path, layer, .. } = &layers[i];
            let file_values = file.as_ref().map(|file| file.values_under(path));
            config.check_layer(path, layer, file_values)?;
            let adapter = config.new_adapter(path, layer).in_module(path)?;
            layer.check_attach(name, &*adapter).in_module(path)?;
            // Before `fill`: a saved PiSSA/OLoRA adapter is re-initialised
            // from the base, whose rewrite needs the fresh factors; the
            // file's tensors then replace them, as PEFT loads one.
            let base = match config.initial_base(path, layer, &*adapter).in_module(path)? {
                Some(weights) => Some(layer.prepare_base(weights).in_module(path)?),
                None => None,
            };
            if let Some(file) = file.as_mut() {
                file.fill(path, &*adapter)?;
            }
            adapters.push((i, adapter, base));
        }
        let copied = match copies {
            Copies::Make => copied_layers(&*model, &layers, config.targets())?,
            Copies::Skip => Vec::new(),
        };
        for &i in &copied {
            let LayerRef { path, layer, .. } = &layers[i];
            let copy: Box<dyn Adapter> = Box::new(ModuleCopy::new(path, layer).in_module(path)?);
            prepare(&layers[i], name, &*copy, file.as_mut())?;
            adapters.push((i, copy, None));
        }
        if copies == Copies::Make {
            for (i, tokens) in token_layers(&layers, config.trainable_tokens())? {
                let LayerRef { path, layer, .. } = &layers[i];
                if adapters.iter().any(|(j, ..)| *j == i) {
                    return Err(PeftError::IncompatibleAdapter {
                        module: path.clone(),
                        adapter: name.to_owned(),
                        reason: "this module holds trainable tokens and is also a target or in modules_to_save; \
                                 leave it out of one of them"
                            .to_owned(),
                    });
                }
                let adapter: Box<dyn Adapter> = Box::new(lora_token_adapter(path, layer, &tokens)?);
                prepare(&layers[i], name, &*adapter, file.as_mut())?;
                adapters.push((i, adapter, None));
            }
        }
        let made: Vec<(usize, &dyn Adapter)> = adapters.iter().map(|(i, adapter, _)| (*i, &**adapter)).collect();
        for (i, tied) in tied_adapters(&layers, &made) {
            prepare(&layers[i], name, &*tied, file.as_mut())?;
            adapters.push((i, tied, None));
        }
        let biases = trained_biases(&*model, &layers, config.trained_bias(), &chosen, &copied, file.as_mut())?;
        if let Some(file) = file {
            file.check_all_used()?;
        }
        (adapters, biases)
    };
    let (adapters, biases) = adapters;
    let saved = Arc::new(config.to_peft_config());
    let mut layers = model.layers_mut();
    for (i, adapter, base) in adapters {
        if let Some(base) = base {
            layers[i].layer.replace_base(base);
        }
        layers[i].layer.insert_adapter(name, adapter, Some(saved.clone()));
    }
    for (i, bias) in biases {
        layers[i].layer.train_bias(bias);
    }
    Ok(())
}

/// Checks that `adapter` may join the slot `at` under `name` and, when
/// loading, sets its tensors from `file`: what every adapter [`attach`]
/// adds beside the config's own (copies, token rows, tied heads) goes
/// through before the model changes.
fn prepare(at: &LayerRef<'_>, name: &str, adapter: &dyn Adapter, file: Option<&mut FileTensors>) -> Result<()> {
    at.layer.check_attach(name, adapter).in_module(&at.path)?;
    match file {
        Some(file) => file.fill(&at.path, adapter),
        None => Ok(()),
    }
}

/// The base biases a config trains beside its adapter (PEFT's `bias`), as
/// new variables by index into `layers`: the `targeted` layers' for
/// `lora_only`, every slot's for `all` except whole copies (`copied` and
/// copies already there: a copy trains its own bias). Loading takes each
/// value from `file`, under PEFT's key (`<module>.base_layer.bias` for a
/// layer an adapter wraps, `<module>.bias` otherwise).
///
/// Refused for `all`: a bias held outside a slot (a `LayerNorm`'s), which
/// cannot be made trainable here.
fn trained_biases<M: PeftModel + ?Sized>(
    model: &M,
    layers: &[LayerRef<'_>],
    mode: TrainedBias,
    targeted: &[usize],
    copied: &[usize],
    mut file: Option<&mut FileTensors>,
) -> Result<Vec<(usize, Var)>> {
    let candidates: Vec<usize> = match mode {
        TrainedBias::None => return Ok(Vec::new()),
        TrainedBias::AdaptedLayers => targeted.to_vec(),
        TrainedBias::All => {
            refuse_biases_outside_slots(model)?;
            (0..layers.len())
                .filter(|i| !copied.contains(i) && !layers[*i].layer.holds_copy())
                .collect()
        }
    };
    let mut biases = Vec::new();
    for i in candidates {
        let LayerRef { path, layer, .. } = &layers[i];
        let Some(bias) = layer.bias() else { continue };
        let suffix = if targeted.contains(&i) {
            "base_layer.bias"
        } else {
            layer.bias_key()
        };
        let key = format!("{KEY_PREFIX}{path}.{suffix}");
        let value = match file.as_deref_mut() {
            None => None,
            Some(file) => Some(file.take(&key).ok_or_else(|| PeftError::MissingTensor {
                module: path.clone(),
                key: key.clone(),
            })?),
        };
        if let Some(value) = &value {
            if value.dims() != bias.dims() {
                return Err(PeftError::ShapeMismatch {
                    key,
                    expected: bias.dims().to_vec(),
                    found: value.dims().to_vec(),
                });
            }
        }
        if let Some(var) = layer.bias_var(value.as_ref()).in_module(path)? {
            biases.push((i, var));
        }
    }
    Ok(biases)
}

/// Refuses `bias = "all"` for a model holding a bias outside an adapter
/// slot (a `LayerNorm`'s bias), which PEFT would train and this crate
/// cannot: the derive hands such tensors to visitors read-only.
fn refuse_biases_outside_slots<M: PeftModel + ?Sized>(model: &M) -> Result<()> {
    #[derive(Default)]
    struct Biases(Option<String>);
    impl<'a> Visitor<'a> for Biases {
        fn visit_tensor(&mut self, path: &ModulePath, _: &'a Tensor) {
            let name = path.as_str();
            if self.0.is_none() && (name == "bias" || name.ends_with(".bias")) {
                self.0 = Some(name.to_owned());
            }
        }
    }
    let mut found = Biases::default();
    model.visit(&mut ModulePath::new(), &mut found);
    match found.0 {
        None => Ok(()),
        Some(tensor) => Err(PeftError::UnsupportedOption {
            field: "bias".into(),
            value: format!("\"all\" (the model holds the bias `{tensor}` outside a Linear or Conv field)"),
            reason: "only biases of adapter slots can train here; use bias = \"lora_only\", or make that \
                     layer a slot",
        }),
    }
}

/// Indices into `layers` of the slots `targets` copies whole
/// ([`Targets::modules_to_save`]): every slot at or under a module whose
/// path ends with one of the names, as PEFT's `_set_trainable` matches
/// them (a module inside a matched one is covered by its copy).
///
/// Refused: names that match no module, and a matched module holding a
/// tensor outside a slot (a norm's weight): only `Linear`, `Embedding` and
/// `Conv` fields can be copied.
fn copied_layers<M: PeftModel + ?Sized>(model: &M, layers: &[LayerRef<'_>], targets: &Targets) -> Result<Vec<usize>> {
    let names = targets.saved_modules();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(Default)]
    struct Modules {
        modules: Vec<String>,
        tensors: Vec<String>,
    }
    impl<'a> Visitor<'a> for Modules {
        fn enter_module(&mut self, path: &ModulePath) {
            self.modules.push(path.as_str().to_owned());
        }
        fn visit_tensor(&mut self, path: &ModulePath, _: &'a Tensor) {
            self.tensors.push(path.as_str().to_owned());
        }
    }
    let mut seen = Modules::default();
    model.visit(&mut ModulePath::new(), &mut seen);
    let under =
        |path: &str, module: &str| path == module || path.strip_prefix(module).is_some_and(|r| r.starts_with('.'));
    let matched: Vec<&String> = seen.modules.iter().filter(|m| targets.is_saved_module(m)).collect();
    if matched.is_empty() {
        return Err(PeftError::NoModuleToSave {
            requested: format!("{names:?}"),
            candidates: seen.modules.len(),
        });
    }
    let outermost = matched
        .iter()
        .filter(|m| !matched.iter().any(|outer| outer != *m && under(m, outer)));
    let mut copied = Vec::new();
    for module in outermost {
        if let Some(tensor) = seen.tensors.iter().find(|t| under(t, module)) {
            return Err(PeftError::UnsupportedOption {
                field: "modules_to_save".into(),
                value: format!("{module:?} (it holds the tensor `{tensor}`)"),
                reason: "this module holds a tensor outside a Linear, Embedding or Conv field (a norm's weight, ...), \
                         which cannot be copied here",
            });
        }
        copied.extend((0..layers.len()).filter(|&i| under(&layers[i].path, module)));
    }
    copied.sort_unstable();
    copied.dedup();
    Ok(copied)
}

/// The slots LoRA's `trainable_token_indices` (`tokens`) puts trainable
/// tokens on, each with its rows: a list goes to the model's one embedding
/// layer (several, or none, are refused: the dict form names the module),
/// a dict to every slot whose path ends with a name given (PEFT's list
/// rule), each name matching at least one.
fn token_layers(layers: &[LayerRef<'_>], tokens: Option<&TokenIndices>) -> Result<Vec<(usize, Vec<usize>)>> {
    match tokens {
        None => Ok(Vec::new()),
        Some(TokenIndices::Embedding(indices)) => {
            let embeddings: Vec<usize> = (0..layers.len())
                .filter(|&i| layers[i].layer.kind() == LayerKind::Embedding)
                .collect();
            match embeddings.as_slice() {
                [one] => Ok(vec![(*one, indices.clone())]),
                _ => Err(PeftError::NoInputEmbedding {
                    embeddings: embeddings.iter().map(|&i| layers[i].path.clone()).collect(),
                }),
            }
        }
        Some(TokenIndices::Modules(modules)) => {
            let mut chosen = Vec::new();
            for (module, indices) in modules {
                let matched: Vec<usize> = (0..layers.len())
                    .filter(|&i| name_matches(&layers[i].path, module))
                    .collect();
                if matched.is_empty() {
                    return Err(PeftError::NoTargetMatched {
                        requested: format!("trainable_token_indices {{{module:?}: ...}}"),
                        candidates: layers.len(),
                    });
                }
                chosen.extend(matched.into_iter().map(|i| (i, indices.clone())));
            }
            Ok(chosen)
        }
    }
}

/// The adapters that output heads tied to an adapted embedding get
/// ([`Adapter::tied`]), sharing its tensors: for each pending adapter on
/// an embedding slot that follows tied weights, every output head whose
/// weight is that embedding's table and that gets no adapter of its own here.
fn tied_adapters(layers: &[LayerRef<'_>], adapters: &[(usize, &dyn Adapter)]) -> Vec<(usize, Box<dyn Adapter>)> {
    let mut tied: Vec<(usize, Box<dyn Adapter>)> = Vec::new();
    for &(i, adapter) in adapters {
        if layers[i].layer.kind() != LayerKind::Embedding {
            continue;
        }
        for (j, head) in layers.iter().enumerate() {
            let taken = adapters.iter().any(|(k, _)| *k == j) || tied.iter().any(|(k, _)| *k == j);
            if head.role != Role::OutputHead || taken || !head.layer.shares_table_with(layers[i].layer) {
                continue;
            }
            if let Some(follower) = adapter.tied() {
                tied.push((j, follower));
            }
        }
    }
    tied
}

/// Whether [`attach`] makes the whole copies a config's `modules_to_save`
/// asks for: a model does; a one-module merge of a standalone adapter
/// file, which takes copied modules from the file as they are, does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copies {
    Make,
    Skip,
}

/// The tensors of an adapter file, by file key, handed out to the layers
/// as their adapters are made.
pub(crate) struct FileTensors {
    unused: BTreeMap<String, Tensor>,
}

impl FileTensors {
    pub(crate) fn new(tensors: BTreeMap<String, Tensor>) -> Self {
        Self { unused: tensors }
    }

    /// How many values the file holds for the module at `path`.
    fn values_under(&self, path: &str) -> usize {
        let prefix = format!("{KEY_PREFIX}{path}.");
        self.unused
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(_, tensor)| tensor.elem_count())
            .sum()
    }

    /// Sets every trainable tensor of `adapter` (at `path`) from the file,
    /// converting f16/bf16 to the adapter's dtype.
    fn fill(&mut self, path: &str, adapter: &dyn Adapter) -> Result<()> {
        for (key, var) in adapter.trainable_vars() {
            let file_key = format!("{KEY_PREFIX}{path}.{key}");
            let Some(tensor) = self.unused.remove(&file_key) else {
                return Err(PeftError::MissingTensor {
                    module: path.to_owned(),
                    key: file_key,
                });
            };
            if tensor.dims() != var.dims() {
                return Err(PeftError::ShapeMismatch {
                    key: file_key,
                    expected: var.dims().to_vec(),
                    found: tensor.dims().to_vec(),
                });
            }
            var.set(&tensor.to_dtype(var.dtype()).in_module(path)?)
                .in_module(path)?;
        }
        Ok(())
    }

    /// Takes the tensor under `key` out of the file.
    fn take(&mut self, key: &str) -> Option<Tensor> {
        self.unused.remove(key)
    }

    /// Refuses tensors that no targeted module took.
    fn check_all_used(self) -> Result<()> {
        if self.unused.is_empty() {
            return Ok(());
        }
        Err(PeftError::UnexpectedTensors {
            keys: self.unused.into_keys().collect(),
        })
    }
}

/// What saving an adapter writes: its config fields and its tensors.
pub(crate) struct SavedAdapter {
    /// PEFT's config fields, `target_modules` the adapted modules.
    pub config: Map<String, Value>,
    /// The tensors under their file keys.
    pub tensors: Vec<(String, Tensor)>,
}

/// The config and tensors of adapter `name` of `model`, as PEFT saves them.
pub(crate) fn saved_adapter<M: PeftModel + ?Sized>(model: &M, name: &str) -> Result<SavedAdapter> {
    let layers = model.layers();
    let adapted: Vec<_> = layers
        .iter()
        .filter_map(|l| l.layer.adapter(name).map(|adapter| (l, adapter)))
        .collect();
    let Some((first, _)) = adapted.first() else {
        return Err(PeftError::UnknownAdapter {
            adapter: name.to_owned(),
            known: capped_list(&model.adapter_names()),
        });
    };
    let Some(config) = first.layer.adapter_config(name) else {
        return Err(PeftError::UnsupportedOption {
            field: "config".into(),
            value: format!("{name:?}"),
            reason: "the adapter was attached by hand with Layer::add_adapter, so its config is unknown; \
                     add it with PeftModel::add_adapter to save it",
        });
    };
    let mut config = Map::clone(config);
    // Whole copies are saved as `modules_to_save`, LoRA's trainable tokens
    // as `trainable_token_indices`, and a tied head follows its embedding:
    // none of them is a target of its own.
    let peft_type = config.get("peft_type").and_then(Value::as_str).unwrap_or_default();
    let mut target_modules: Vec<&str> = adapted
        .iter()
        .filter(|(_, adapter)| match adapter.composition() {
            Composition::ReplacesBase => false,
            Composition::ReplacesRows => adapter.peft_type() == peft_type && !adapter.follows_tied_weight(),
            _ => true,
        })
        .map(|(l, _)| l.path.as_str())
        .collect();
    target_modules.sort_unstable();
    if !peft_keeps_every_path(&config, &target_modules) {
        config.insert("layers_to_transform".into(), Value::Null);
        config.insert("layers_pattern".into(), Value::Null);
    }
    config.insert("target_modules".into(), Value::from(target_modules));
    if adapted.iter().any(|(l, _)| l.layer.is_fan_in_fan_out()) {
        // PEFT forces this for Conv1D layers too.
        config.insert("fan_in_fan_out".into(), Value::Bool(true));
    }
    let mut tensors = Vec::new();
    for (layer, adapter) in &adapted {
        for (key, var) in adapter.trainable_vars() {
            tensors.push((format!("{KEY_PREFIX}{}.{key}", layer.path), var.as_tensor().clone()));
        }
    }
    // PEFT's `bias`: "all" saves every bias, "<kind>_only" the adapted layers'.
    let bias_layers: Vec<&LayerRef<'_>> = match config.get("bias").and_then(Value::as_str) {
        Some("all") => layers.iter().filter(|l| !l.layer.holds_copy()).collect(),
        Some(mode) if mode.ends_with("_only") => adapted
            .iter()
            .filter(|(_, adapter)| adapter.composition() != Composition::ReplacesBase)
            .map(|(l, _)| *l)
            .collect(),
        _ => Vec::new(),
    };
    for layer in bias_layers {
        if let Some(bias) = layer.layer.bias() {
            let key = format!("{KEY_PREFIX}{}.{}", layer.path, layer.layer.bias_key());
            tensors.push((key, bias.clone()));
        }
    }
    Ok(SavedAdapter { config, tensors })
}

/// How many entries PEFT's `target_modules` list needs before PEFT rewrites
/// it as dotted suffixes (`MIN_TARGET_MODULES_FOR_OPTIMIZATION`), after which
/// `layers_to_transform` applies to every match.
const PEFT_SUFFIX_REWRITE: usize = 20;

/// Whether PEFT 0.21, reading the saved `config`'s `layers_to_transform` and
/// `layers_pattern` beside `target_modules` (the exact adapted paths),
/// adapts every path. Below [`PEFT_SUFFIX_REWRITE`] entries PEFT takes an
/// exact path whatever its layer; from there it rewrites the list as
/// suffixes and applies the filter with its own index rule
/// ([`peft_layer_index`](crate::targets::peft_layer_index)), which can
/// differ from this crate's: then the filters are saved as null (the list
/// alone is exact in both).
fn peft_keeps_every_path(config: &Map<String, Value>, paths: &[&str]) -> bool {
    let Some(layers) = config.get("layers_to_transform").and_then(Value::as_array) else {
        return true;
    };
    if paths.len() < PEFT_SUFFIX_REWRITE {
        return true;
    }
    let layers: Vec<u64> = layers.iter().filter_map(Value::as_u64).collect();
    let patterns: Vec<String> = match config.get("layers_pattern") {
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Some(Value::String(pattern)) if !pattern.is_empty() => vec![pattern.clone()],
        _ => Vec::new(),
    };
    paths
        .iter()
        .all(|path| crate::targets::peft_layer_index(path, &patterns).is_some_and(|i| layers.contains(&(i as u64))))
}

/// Writes adapter `name` of `model` in PEFT's layout under `dir`.
pub(crate) fn save<M: PeftModel + ?Sized>(model: &M, dir: &Path, name: &str) -> Result<()> {
    let folder = adapter_dir(dir, name)?;
    let saved = saved_adapter(model, name)?;
    write_adapter(&folder, saved.config, &saved.tensors)
}

/// Where PEFT saves adapter `name` under `dir`: `dir` itself for `"default"`,
/// `dir/<name>` otherwise. A name that would not stay one folder below `dir`
/// (see [`check_adapter_name`]) is an error.
pub fn adapter_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    check_adapter_name(name)?;
    Ok(if name == DEFAULT_ADAPTER {
        dir.to_path_buf()
    } else {
        dir.join(name)
    })
}

/// Refuses adapter names that cannot be a single folder name below the folder
/// adapters are saved in: empty, `.` or `..`, with a path separator (`/`, or
/// `\` as Windows reads it; an absolute path has one too) or a control
/// character. [`PeftModel::add_adapter`], `load_adapter` and `save_adapter`
/// check this first. PEFT uses the name as a subfolder the same way but does
/// not check it.
pub fn check_adapter_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name == "." || name == ".." {
        "it names a folder itself or its parent, not a subfolder"
    } else if name.contains(['/', '\\']) {
        "it contains a path separator, so it would not be one folder below the one given"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(PeftError::InvalidAdapterName {
        name: name.to_owned(),
        reason,
    })
}

/// Refuses a name an adapter of the model already has, on any layer: one
/// name is one adapter with one config, as PEFT's `peft_config[name]`.
pub(crate) fn check_new_name<M: PeftModel + ?Sized>(model: &M, name: &str) -> Result<()> {
    match model.layers().into_iter().find(|l| l.layer.has_adapter(name)) {
        Some(layer) => Err(PeftError::AdapterExists {
            module: layer.path,
            adapter: name.to_owned(),
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_known(names: &[&str], known: &[String]) -> Result<()> {
    match names.iter().find(|name| !known.iter().any(|k| k == *name)) {
        None => Ok(()),
        Some(missing) => Err(PeftError::UnknownAdapter {
            adapter: (*missing).to_owned(),
            known: capped_list(known),
        }),
    }
}
