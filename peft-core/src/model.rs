//! [`PeftModel`]: the model-level API every [`Adaptable`] model gets.
//!
//! Each operation that changes the model first computes everything that can
//! fail (targets, new adapters, merged weights) and only then changes the
//! layers, so an error leaves the model exactly as it was.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use candle_core::{Tensor, Var};

use crate::adaptable::{Adaptable, Role, Visitor, VisitorMut};
use crate::config::AdapterConfig;
use crate::error::{InModule, PeftError, Result};
use crate::linear::{Linear, MergePlan};
use crate::lora::LoraConfig;
use crate::path::ModulePath;
use crate::targets::Targets;

/// The adapter name [`PeftModel::apply_lora`] uses, as PEFT does.
pub const DEFAULT_ADAPTER: &str = "default";

/// A linear layer of a model, with its path and role.
#[derive(Debug)]
pub struct LayerRef<'a> {
    /// Dotted module path (`layers.0.self_attn.q_proj`).
    pub path: String,
    /// Hidden layer or output head.
    pub role: Role,
    /// The layer.
    pub layer: &'a Linear,
}

/// A linear layer of a model, mutably, with its path and role.
#[derive(Debug)]
pub struct LayerMut<'a> {
    /// Dotted module path (`layers.0.self_attn.q_proj`).
    pub path: String,
    /// Hidden layer or output head.
    pub role: Role,
    /// The layer.
    pub layer: &'a mut Linear,
}

/// Trainable and total parameter counts; displays as PEFT's
/// `print_trainable_parameters()` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCount {
    /// Elements in the active adapters' trainable tensors.
    pub trainable: usize,
    /// Elements in every tensor of the model (tied tensors counted once),
    /// adapters included.
    pub total: usize,
}

impl ParameterCount {
    /// `trainable / total`, in percent.
    pub fn trainable_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl fmt::Display for ParameterCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            Thousands(self.trainable),
            Thousands(self.total),
            self.trainable_percent()
        )
    }
}

/// `1234567` -> `1,234,567`, as Python's `{:,}`.
struct Thousands(usize);

impl fmt::Display for Thousands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, digit) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                f.write_str(",")?;
            }
            write!(f, "{digit}")?;
        }
        Ok(())
    }
}

/// Adapter management for any [`Adaptable`] model: implemented for every one.
pub trait PeftModel: Adaptable {
    /// Every linear layer, in the order of the struct's fields.
    fn linear_layers(&self) -> Vec<LayerRef<'_>> {
        struct Collect<'a>(Vec<LayerRef<'a>>);
        impl<'a> Visitor<'a> for Collect<'a> {
            fn visit_linear(&mut self, path: &ModulePath, role: Role, layer: &'a Linear) {
                self.0.push(LayerRef {
                    path: path.as_str().to_owned(),
                    role,
                    layer,
                });
            }
        }
        let mut collect = Collect(Vec::new());
        self.visit(&mut ModulePath::new(), &mut collect);
        collect.0
    }

    /// Every linear layer, mutably, in the order of the struct's fields.
    fn linear_layers_mut(&mut self) -> Vec<LayerMut<'_>> {
        struct Collect<'a>(Vec<LayerMut<'a>>);
        impl<'a> VisitorMut<'a> for Collect<'a> {
            fn visit_linear_mut(&mut self, path: &ModulePath, role: Role, layer: &'a mut Linear) {
                self.0.push(LayerMut {
                    path: path.as_str().to_owned(),
                    role,
                    layer,
                });
            }
        }
        let mut collect = Collect(Vec::new());
        self.visit_mut(&mut ModulePath::new(), &mut collect);
        collect.0
    }

    /// The full paths of the layers `targets` selects, sorted.
    fn targeted_modules(&self, targets: &Targets) -> Result<Vec<String>> {
        let layers = self.linear_layers();
        let chosen = targets.resolve(layers.iter().map(|l| (l.path.as_str(), l.role, l.layer.kind())))?;
        let mut paths: Vec<String> = chosen.into_iter().map(|i| layers[i].path.clone()).collect();
        paths.sort();
        Ok(paths)
    }

    /// Adds LoRA under the name `"default"` on the layers `config` targets.
    ///
    /// `config` is a [`LoraConfig`] or anything that converts into one, such
    /// as [`all_linear()`](crate::all_linear).
    fn apply_lora(&mut self, config: impl Into<LoraConfig>) -> Result<()> {
        self.add_adapter(DEFAULT_ADAPTER, &config.into())
    }

    /// Saves adapter `name` in PEFT's format (`adapter_config.json` and
    /// `adapter_model.safetensors`), as `PeftModel.save_pretrained` does: in
    /// `dir` for `"default"`, in `dir/<name>` for any other name. Each file is
    /// written to a temporary file and renamed into place.
    fn save_adapter(&self, dir: impl AsRef<std::path::Path>, name: &str) -> Result<()> {
        crate::io::save_adapter(self, dir.as_ref(), name)
    }

    /// Saves every adapter of the model as [`save_adapter`](Self::save_adapter)
    /// does: `"default"` in `dir`, the others in subfolders.
    fn save_adapters(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        for name in self.adapter_names() {
            crate::io::save_adapter(self, dir.as_ref(), &name)?;
        }
        Ok(())
    }

    /// Loads the PEFT adapter in `dir` (as `PeftModel.from_pretrained` or
    /// `load_adapter` read it) and adds it under `name`, active.
    ///
    /// Targets are resolved from the config as PEFT does (`target_modules`
    /// as a list, a regex or `"all-linear"`, `exclude_modules`,
    /// `layers_to_transform` with `layers_pattern`, `rank_pattern`,
    /// `alpha_pattern`); tensors in f16/bf16 are converted to the model's
    /// dtype. Every check is made before the model changes: on error it is
    /// as it was.
    fn load_adapter(&mut self, dir: impl AsRef<std::path::Path>, name: &str) -> Result<()> {
        crate::io::load_adapter(self, dir.as_ref(), name)
    }

    /// Adds the adapter whose two files are already in memory, checked as
    /// [`load_adapter`](Self::load_adapter) checks them: `config` is the text
    /// of `adapter_config.json`, `weights` the bytes of
    /// `adapter_model.safetensors` (from a network, an archive, ...). Errors
    /// name the files by their usual names.
    fn load_adapter_from_bytes(&mut self, config: &str, weights: &[u8], name: &str) -> Result<()> {
        let files = crate::io::AdapterFiles {
            config,
            config_path: std::path::Path::new(crate::io::CONFIG_FILE),
            weights,
            weights_path: std::path::Path::new(crate::io::WEIGHTS_FILE),
        };
        crate::io::load_adapter_from(self, files, name)
    }

    /// Adds an adapter named `name`, active, on the layers `config` targets.
    ///
    /// Targets are resolved over the model's own layers only: adapters are
    /// not layers, so a second adapter never wraps the first one's weights.
    fn add_adapter<C: AdapterConfig + ?Sized>(&mut self, name: &str, config: &C) -> Result<()> {
        crate::io::check_adapter_name(name)?;
        check_new_name(self, name)?;
        config.validate()?;
        let chosen = {
            let layers = self.linear_layers();
            let chosen = config
                .targets()
                .resolve(layers.iter().map(|l| (l.path.as_str(), l.role, l.layer.kind())))?;
            let mut adapters = Vec::with_capacity(chosen.len());
            for &i in &chosen {
                let LayerRef { path, layer, .. } = &layers[i];
                if layer.has_adapter(name) {
                    return Err(PeftError::AdapterExists {
                        module: path.clone(),
                        adapter: name.to_owned(),
                    });
                }
                config.check_layer(path, layer, None)?;
                let adapter = config.linear_adapter(path, layer).in_module(path)?;
                layer.check_attach(name, &*adapter).map_err(|e| relocate(e, path))?;
                adapters.push(adapter);
            }
            chosen.into_iter().zip(adapters).collect::<Vec<_>>()
        };
        let saved = std::sync::Arc::new(config.to_peft_config());
        let mut layers = self.linear_layers_mut();
        for (i, adapter) in chosen {
            layers[i].layer.insert_adapter(name, adapter, Some(saved.clone()));
        }
        Ok(())
    }

    /// Paths of the layers that hold at least one adapter, sorted.
    fn adapted_modules(&self) -> Vec<String> {
        let mut paths: Vec<String> = self
            .linear_layers()
            .into_iter()
            .filter(|l| l.layer.adapter_names().next().is_some())
            .map(|l| l.path)
            .collect();
        paths.sort();
        paths
    }

    /// Names of the adapters in the model, sorted.
    fn adapter_names(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .linear_layers()
            .iter()
            .flat_map(|l| l.layer.adapter_names().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        names.into_iter().collect()
    }

    /// Makes exactly the adapters in `names` active; their outputs add up, as
    /// with PEFT's `set_adapter([...])`. Refused while any adapter is merged.
    fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        let known = self.adapter_names();
        check_known(names, &known)?;
        if let Some(merged) = self.linear_layers().iter().find(|l| l.layer.is_merged()) {
            return Err(PeftError::MergeState {
                module: merged.path.clone(),
                reason: "cannot change the active adapters while merged; unmerge first",
            });
        }
        for layer in self.linear_layers_mut() {
            layer.layer.set_active_adapters(names);
        }
        Ok(())
    }

    /// Removes the adapter `name` from every layer. Refused while it is merged.
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        check_known(&[name], &self.adapter_names())?;
        if let Some(merged) = self
            .linear_layers()
            .iter()
            .find(|l| l.layer.is_merged() && l.layer.has_adapter(name))
        {
            return Err(PeftError::MergeState {
                module: merged.path.clone(),
                reason: "cannot delete an adapter while it is merged; unmerge first",
            });
        }
        for layer in self.linear_layers_mut() {
            // Checked above: no merged adapter is removed here.
            layer.layer.remove_adapter(name).map_err(|e| relocate(e, &layer.path))?;
        }
        Ok(())
    }

    /// The trainable tensors of the active adapters, for an optimizer, in a
    /// fixed order (layers in field order, then each adapter's own order).
    fn trainable_vars(&self) -> Vec<Var> {
        self.named_trainable_vars().into_iter().map(|(_, var)| var).collect()
    }

    /// [`trainable_vars`](Self::trainable_vars) with PEFT's state-dict names
    /// (`layers.0.self_attn.q_proj.lora_A.default.weight`).
    fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        self.linear_layers()
            .iter()
            .flat_map(|l| {
                l.layer
                    .trainable_vars()
                    .into_iter()
                    .map(|(key, var)| (format!("{}.{key}", l.path), var))
            })
            .collect()
    }

    /// Names of the trainable tensors that got no gradient, or an all-zero
    /// one, in `grads` (from `loss.backward()`).
    ///
    /// An adapter whose `B` is still zero (LoRA's default init) leaves `A`
    /// with a zero gradient on the first step; `B` itself always gets one
    /// when the graph is intact. A `B` listed here means something between
    /// the layer and the loss stopped the gradient: in candle-nn 0.11 the
    /// fused `RmsNorm::forward`, `LayerNorm::forward` (with bias) and
    /// `ops::softmax_last_dim` have no backward pass and drop it silently.
    fn missing_gradients(&self, grads: &candle_core::backprop::GradStore) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for (name, var) in self.named_trainable_vars() {
            let reached = match grads.get(&var) {
                None => false,
                Some(grad) => {
                    grad.abs()?
                        .sum_all()?
                        .to_dtype(candle_core::DType::F64)?
                        .to_scalar::<f64>()?
                        > 0.0
                }
            };
            if !reached {
                missing.push(name);
            }
        }
        Ok(missing)
    }

    /// Trainable (active adapters) and total parameter counts.
    fn num_parameters(&self) -> ParameterCount {
        struct Count<'a> {
            seen: HashSet<candle_core::TensorId>,
            total: usize,
            trainable: usize,
            _tensors: std::marker::PhantomData<&'a Tensor>,
        }
        impl Count<'_> {
            fn add(&mut self, tensor: &Tensor) {
                // Tied weights (one tensor in two places) count once.
                if self.seen.insert(tensor.id()) {
                    self.total += tensor.elem_count();
                }
            }
        }
        impl<'a> Visitor<'a> for Count<'a> {
            fn visit_linear(&mut self, _: &ModulePath, _: Role, layer: &'a Linear) {
                if layer.is_quantized() {
                    // No dense tensor to share: count the quantized weight's elements.
                    self.total += layer.in_features() * layer.out_features();
                }
                for tensor in layer.base_tensors() {
                    self.add(tensor);
                }
                let (all, active) = layer.num_adapter_parameters();
                self.total += all;
                self.trainable += active;
            }
            fn visit_tensor(&mut self, _: &ModulePath, tensor: &'a Tensor) {
                self.add(tensor);
            }
        }
        let mut count = Count {
            seen: HashSet::new(),
            total: 0,
            trainable: 0,
            _tensors: std::marker::PhantomData,
        };
        self.visit(&mut ModulePath::new(), &mut count);
        ParameterCount {
            trainable: count.trainable,
            total: count.total,
        }
    }

    /// Folds the active adapters into the base weights: the forward pass then
    /// costs what the base model costs.
    fn merge(&mut self) -> Result<()> {
        check_mergeable(self, None)?;
        check_pending_merge(self, None)?;
        commit_all(self, "merge", Linear::plan_merge, commit_plan)
    }

    /// Merges exactly the adapters in `names` (active or not), as PEFT's
    /// `merge_adapter(adapter_names=[...])`; the others stay unmerged.
    fn merge_adapters(&mut self, names: &[&str]) -> Result<()> {
        check_known(names, &self.adapter_names())?;
        check_mergeable(self, Some(names))?;
        check_pending_merge(self, Some(names))?;
        commit_all(self, "merge", |layer| layer.plan_merge_of(Some(names)), commit_plan)
    }

    /// Takes merged adapters back out of the base weights (PEFT subtracts the
    /// delta too, so the base comes back up to float rounding). With nothing
    /// merged it is an error ([`PeftError::NothingToUnmerge`]).
    fn unmerge(&mut self) -> Result<()> {
        if !self.linear_layers().iter().any(|l| l.layer.is_merged()) {
            return Err(PeftError::NothingToUnmerge);
        }
        commit_all(self, "unmerge", Linear::plan_unmerge, commit_plan)
    }

    /// Merges the active adapters and removes every adapter: plain layers
    /// with the adapted weights remain. Adapters merged before are kept in
    /// the weights.
    fn merge_and_unload(&mut self) -> Result<()> {
        check_mergeable(self, None)?;
        commit_all(self, "merge", Linear::plan_merge, Linear::commit_and_unload)
    }

    /// Turns all adapters off (unmerging first), so the model computes the
    /// base model's output, as PEFT's `disable_adapter()`.
    fn disable_adapters(&mut self) -> Result<()> {
        commit_all(self, "unmerge", Linear::plan_unmerge, |layer, plan| {
            commit_plan(layer, plan);
            layer.disable_adapters_unmerged();
        })
    }

    /// Turns adapters back on after [`disable_adapters`](Self::disable_adapters).
    fn enable_adapters(&mut self) {
        for layer in self.linear_layers_mut() {
            layer.layer.enable_adapters();
        }
    }

    /// Runs `f` with every adapter turned off (the base model's outputs), then
    /// turns them back on, as PEFT's `with model.disable_adapter():` block.
    /// Merged adapters are unmerged first and stay unmerged afterwards.
    fn with_adapters_disabled<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> Result<R>
    where
        Self: Sized,
    {
        self.disable_adapters()?;
        let result = f(self);
        self.enable_adapters();
        Ok(result)
    }

    /// Training mode turns adapter dropout on; inference mode (the default)
    /// turns it off.
    fn set_training(&mut self, training: bool) {
        for layer in self.linear_layers_mut() {
            layer.layer.set_training(training);
        }
    }
}

impl<M: Adaptable + ?Sized> PeftModel for M {}

/// Plans a change on every layer and commits it, so that nothing changes if
/// any plan fails and at most one layer's new weights exist at a time.
///
/// The first pass makes every plan and drops it at once: a failure there
/// leaves the model untouched. The second pass makes each plan again and
/// commits it before making the next, so the old weights of a layer are freed
/// before the next layer's new ones are made (merging never holds a second
/// copy of the model). Plans are deterministic, so the second pass repeats
/// the first; merging costs two computations of the new weights.
///
/// A plan whose weights are not all finite is refused in the first pass
/// ([`PeftError::NonFiniteWeights`], naming `operation`).
fn commit_all<M: PeftModel + ?Sized>(
    model: &mut M,
    operation: &'static str,
    plan: impl Fn(&Linear) -> candle_core::Result<Option<MergePlan>>,
    commit: impl Fn(&mut Linear, Option<MergePlan>),
) -> Result<()> {
    for layer in model.linear_layers() {
        if let Some(plan) = plan(layer.layer).in_module(&layer.path)? {
            if !plan.finite {
                return Err(PeftError::NonFiniteWeights {
                    module: layer.path.clone(),
                    operation,
                });
            }
        }
    }
    for layer in model.linear_layers_mut() {
        let plan = plan(layer.layer).in_module(&layer.path)?;
        commit(layer.layer, plan);
    }
    Ok(())
}

/// Refuses a name an adapter of the model already has, on any layer: one
/// name is one adapter with one config, as PEFT's `peft_config[name]`.
pub(crate) fn check_new_name<M: PeftModel + ?Sized>(model: &M, name: &str) -> Result<()> {
    match model.linear_layers().into_iter().find(|l| l.layer.has_adapter(name)) {
        Some(layer) => Err(PeftError::AdapterExists {
            module: layer.path,
            adapter: name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Installs a plan, if there is one.
fn commit_plan(layer: &mut Linear, plan: Option<MergePlan>) {
    if let Some(plan) = plan {
        layer.commit(plan);
    }
}

/// Refuses a merge that would change nothing, saying why: the chosen
/// adapters are already merged, none is active, or adapters are disabled.
fn check_pending_merge<M: PeftModel + ?Sized>(model: &M, names: Option<&[&str]>) -> Result<()> {
    let layers = model.linear_layers();
    if layers.iter().any(|l| l.layer.has_pending_merge(names)) {
        return Ok(());
    }
    let reason = if layers.iter().any(|l| !l.layer.adapters_enabled()) {
        "adapters are disabled; enable them first".to_owned()
    } else {
        let chosen = |name: &str| names.is_none_or(|names| names.contains(&name));
        let merged: BTreeSet<&str> = layers
            .iter()
            .flat_map(|l| l.layer.merged_adapter_names().filter(|name| chosen(name)))
            .collect();
        if merged.is_empty() {
            "the model has no active adapter".to_owned()
        } else {
            let names: Vec<String> = merged.iter().map(|name| format!("`{name}`")).collect();
            format!("adapter(s) {} already merged", names.join(", "))
        }
    };
    Err(PeftError::NothingToMerge { reason })
}

/// Refuses a merge that would go into a quantized base, naming the layer.
fn check_mergeable<M: PeftModel + ?Sized>(model: &M, names: Option<&[&str]>) -> Result<()> {
    for layer in model.linear_layers() {
        layer
            .layer
            .check_mergeable(names)
            .map_err(|e| relocate(e, &layer.path))?;
    }
    Ok(())
}

fn check_known(names: &[&str], known: &[String]) -> Result<()> {
    match names.iter().find(|name| !known.iter().any(|k| k == *name)) {
        None => Ok(()),
        Some(missing) => Err(PeftError::UnknownAdapter {
            adapter: (*missing).to_owned(),
            known: known.join(", "),
        }),
    }
}

/// Fills in the module path of an error raised by a layer that does not know it.
pub(crate) fn relocate(error: PeftError, path: &str) -> PeftError {
    match error {
        PeftError::MergeState { reason, .. } => PeftError::MergeState {
            module: path.to_owned(),
            reason,
        },
        PeftError::AdapterExists { adapter, .. } => PeftError::AdapterExists {
            module: path.to_owned(),
            adapter,
        },
        PeftError::IncompatibleAdapter { adapter, reason, .. } => PeftError::IncompatibleAdapter {
            module: path.to_owned(),
            adapter,
            reason,
        },
        PeftError::NonFiniteWeights { operation, .. } => PeftError::NonFiniteWeights {
            module: path.to_owned(),
            operation,
        },
        other => other,
    }
}
