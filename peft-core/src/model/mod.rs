//! [`PeftModel`]: the model-level API every [`Adaptable`] model gets.
//!
//! Each operation that changes the model first computes everything that can
//! fail (targets, new adapters, merged weights) and only then changes the
//! layers, so an error leaves the model exactly as it was.
//!
//! - `mod.rs`: the API;
//! - `attach.rs`: the one attach routine ([`PeftModel::add_adapter`] and
//!   loading both use it), adapter-name checks, what saving writes;
//! - `merge.rs`: merging every layer, all or nothing;
//! - `combine.rs`, `combine_options.rs`, `combine_math.rs`: [`PeftModel::add_weighted_adapter`],
//!   PEFT's combinations of LoRA adapters into a new one;
//! - `skeleton.rs`: [`AdapterSkeleton`], a model made from adapter files
//!   alone, for combining adapters with no base model;
//! - `converted.rs`: saving a PiSSA/OLoRA adapter as a plain LoRA;
//! - `count.rs`: parameter counts.

mod attach;
mod combine;
mod combine_math;
mod combine_options;
mod converted;
mod count;
mod inspect;
mod merge;
mod skeleton;
mod standalone;

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::Var;

pub use attach::{adapter_dir, check_adapter_name};
pub use combine_options::{Combination, CombineOptions, MajoritySign};
pub use count::ParameterCount;
pub use inspect::{read_tensor_entries, split_adapter_key, TensorEntry};
pub use skeleton::AdapterSkeleton;
pub use standalone::{BaseModule, StandaloneAdapter};

use crate::adaptable::{Adaptable, Role, Visitor, VisitorMut};
use crate::error::{InModule, PeftError, Result};
use crate::io;
use crate::kinds::{AdapterConfig, LoraConfig};
use crate::layer::{Layer, BASE_ROWS};
use crate::path::ModulePath;
use crate::targets::Targets;
use attach::{check_known, Copies, FileTensors};
use merge::{check_mergeable, check_pending_merge, commit_all, commit_plan};

/// The adapter name [`PeftModel::apply_lora`] uses, as PEFT does.
pub const DEFAULT_ADAPTER: &str = "default";

/// An adapter slot of a model, with its path and role.
#[derive(Debug)]
pub struct LayerRef<'a> {
    /// Dotted module path (`layers.0.self_attn.q_proj`).
    pub path: String,
    /// Hidden layer or output head.
    pub role: Role,
    /// The slot.
    pub layer: &'a Layer,
}

/// An adapter slot of a model, mutably, with its path and role.
#[derive(Debug)]
pub struct LayerMut<'a> {
    /// Dotted module path (`layers.0.self_attn.q_proj`).
    pub path: String,
    /// Hidden layer or output head.
    pub role: Role,
    /// The slot.
    pub layer: &'a mut Layer,
}

/// Adapter management for any [`Adaptable`] model: implemented for every one.
pub trait PeftModel: Adaptable {
    /// Every adapter slot (each `Linear` field, and the layer inside each
    /// `Embedding`, `Conv1d` and `Conv2d`), in the order of the struct's fields.
    fn layers(&self) -> Vec<LayerRef<'_>> {
        struct Collect<'a>(Vec<LayerRef<'a>>);
        impl<'a> Visitor<'a> for Collect<'a> {
            fn visit_layer(&mut self, path: &ModulePath, role: Role, layer: &'a Layer) {
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

    /// Every adapter slot, mutably, in the order of the struct's fields.
    fn layers_mut(&mut self) -> Vec<LayerMut<'_>> {
        struct Collect<'a>(Vec<LayerMut<'a>>);
        impl<'a> VisitorMut<'a> for Collect<'a> {
            fn visit_layer_mut(&mut self, path: &ModulePath, role: Role, layer: &'a mut Layer) {
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
        let layers = self.layers();
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
        attach::save(self, dir.as_ref(), name)
    }

    /// Saves adapter `name`, a trained PiSSA or OLoRA adapter, as a plain
    /// LoRA for the ORIGINAL base weights, as PEFT's
    /// `save_pretrained(dir, path_initial_model_for_weight_conversion=initial_dir)`:
    /// `initial_dir` holds the same adapter saved right after it was made
    /// (before training). The base of this model is `W - s·B0·A0`; the
    /// file written is `A' = [A; A0]`, `B' = [B, -B0]` with `r` and
    /// `lora_alpha` doubled (`lora_alpha` times √2 with rsLoRA),
    /// `rank_pattern` and `alpha_pattern` doubled and
    /// `init_lora_weights = true`, so `W + s·B'·A'` is this model's weight.
    /// Unlike PEFT, `initial_dir` is only read (PEFT rewrites its config).
    ///
    /// Refused before anything is written: an adapter that is not LoRA,
    /// DoRA, rsLoRA with `rank_pattern`/`alpha_pattern` (as PEFT), tensors
    /// other than linear `lora_A`/`lora_B`, and an initial adapter missing
    /// a tensor, holding one of another shape or holding extra ones. The
    /// files are written as [`save_adapter`](Self::save_adapter) writes them.
    fn save_adapter_converted(
        &self,
        dir: impl AsRef<std::path::Path>,
        name: &str,
        initial_dir: impl AsRef<std::path::Path>,
    ) -> Result<()> {
        converted::save_converted(self, dir.as_ref(), name, initial_dir.as_ref())
    }

    /// Saves every adapter of the model as [`save_adapter`](Self::save_adapter)
    /// does: `"default"` in `dir`, the others in subfolders.
    fn save_adapters(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        for name in self.adapter_names() {
            attach::save(self, dir.as_ref(), &name)?;
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
        check_adapter_name(name)?;
        io::with_adapter_files(dir.as_ref(), |files| load_files(self, files, name))
    }

    /// Adds the adapter whose two files are already in memory, checked as
    /// [`load_adapter`](Self::load_adapter) checks them: `config` is the text
    /// of `adapter_config.json`, `weights` the bytes of
    /// `adapter_model.safetensors` (from a network, an archive, ...). Errors
    /// name the files by their usual names.
    fn load_adapter_from_bytes(&mut self, config: &str, weights: &[u8], name: &str) -> Result<()> {
        let files = io::AdapterFiles {
            config,
            config_path: Path::new(io::CONFIG_FILE),
            weights,
            weights_path: Path::new(io::WEIGHTS_FILE),
        };
        load_files(self, files, name)
    }

    /// Adds an adapter named `name`, active, on the layers `config` targets.
    ///
    /// Targets are resolved over the model's own layers only: adapters are
    /// not layers, so a second adapter never wraps the first one's weights.
    fn add_adapter<C: AdapterConfig + ?Sized>(&mut self, name: &str, config: &C) -> Result<()> {
        attach::attach(self, name, config, None, Copies::Make)
    }

    /// Combines LoRA adapters of the model into a new adapter `name`, as
    /// PEFT's `add_weighted_adapter(adapters, weights, name,
    /// combination_type, ...)`: `weights[i]` scales `adapters[i]` (negative
    /// weights subtract), `options` holds the combination type and its
    /// settings (see [`Combination`] for each type's rule and
    /// `docs/guide/combine.md` for where this differs from PEFT).
    ///
    /// The new adapter goes on every layer holding one of the sources, with
    /// the first source's config and `r = lora_alpha` = the new rank (the
    /// common rank, the sum for `cat`, `svd_rank` or the largest for the
    /// SVD types), and is active, as [`add_adapter`](Self::add_adapter)
    /// leaves a new adapter; `set_active_adapters(&[name])` uses it alone.
    /// With one adapter the combination is `linear`, as in PEFT. The DARE
    /// types draw their masks from [`crate::random`]: wrap the call in
    /// [`with_seed`](crate::random::with_seed) to repeat it.
    ///
    /// Refused, with the model unchanged: unknown adapters, a name in use,
    /// as many weights as adapters not given, adapters that are not plain
    /// LoRA, different ranks for `linear` and the non-SVD pruning types, a
    /// density outside (0, 1] (or none for a type that prunes).
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        options: &CombineOptions,
    ) -> Result<()> {
        combine::add_weighted(self, adapters, weights, name, options)
    }

    /// Paths of the layers that hold at least one adapter, sorted.
    fn adapted_modules(&self) -> Vec<String> {
        let mut paths: Vec<String> = self
            .layers()
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
            .layers()
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
        if let Some(merged) = self.layers().iter().find(|l| l.layer.is_merged()) {
            return Err(PeftError::MergeState {
                module: merged.path.clone(),
                reason: "cannot change the active adapters while merged; unmerge first",
            });
        }
        for layer in self.layers_mut() {
            layer.layer.set_active_adapters(names);
        }
        Ok(())
    }

    /// Removes the adapter `name` from every layer. Refused while it is merged.
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        check_known(&[name], &self.adapter_names())?;
        if let Some(merged) = self
            .layers()
            .iter()
            .find(|l| l.layer.is_merged() && l.layer.has_adapter(name))
        {
            return Err(PeftError::MergeState {
                module: merged.path.clone(),
                reason: "cannot delete an adapter while it is merged; unmerge first",
            });
        }
        for layer in self.layers_mut() {
            // Checked above: no merged adapter is removed here.
            layer.layer.remove_adapter(name).in_module(&layer.path)?;
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
    /// A tensor that adapters of several layers share (trainable tokens of
    /// an embedding and its tied output head) is listed once, under its
    /// first layer's name, so an optimizer steps it once.
    fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        let mut seen = std::collections::HashSet::new();
        self.layers()
            .iter()
            .flat_map(|l| {
                l.layer
                    .trainable_vars()
                    .into_iter()
                    .map(|(key, var)| (format!("{}.{key}", l.path), var))
            })
            .filter(|(_, var)| seen.insert(var.as_tensor().id()))
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
        count::count_parameters(self)
    }

    /// Folds the active adapters into the base weights: the forward pass then
    /// costs what the base model costs.
    fn merge(&mut self) -> Result<()> {
        check_mergeable(self, None)?;
        check_pending_merge(self, None)?;
        commit_all(
            self,
            "merge",
            |layer| layer.merge_finite_check(None),
            Layer::plan_merge,
            commit_plan,
        )
    }

    /// Merges exactly the adapters in `names` (active or not), as PEFT's
    /// `merge_adapter(adapter_names=[...])`; the others stay unmerged.
    fn merge_adapters(&mut self, names: &[&str]) -> Result<()> {
        check_known(names, &self.adapter_names())?;
        check_mergeable(self, Some(names))?;
        check_pending_merge(self, Some(names))?;
        commit_all(
            self,
            "merge",
            |layer| layer.merge_finite_check(Some(names)),
            |layer| layer.plan_merge_of(Some(names)),
            commit_plan,
        )
    }

    /// Takes merged adapters back out of the base weights (PEFT subtracts the
    /// delta too, so the base comes back up to float rounding). With nothing
    /// merged it is an error ([`PeftError::NothingToUnmerge`]).
    fn unmerge(&mut self) -> Result<()> {
        if !self.layers().iter().any(|l| l.layer.is_merged()) {
            return Err(PeftError::NothingToUnmerge);
        }
        commit_all(
            self,
            "unmerge",
            Layer::unmerge_finite_check,
            Layer::plan_unmerge,
            commit_plan,
        )
    }

    /// Merges the active adapters and removes every adapter: plain layers
    /// with the adapted weights remain. Adapters merged before are kept in
    /// the weights.
    fn merge_and_unload(&mut self) -> Result<()> {
        check_mergeable(self, None)?;
        commit_all(
            self,
            "merge",
            |layer| layer.merge_finite_check(None),
            Layer::plan_merge,
            Layer::commit_and_unload,
        )
    }

    /// Turns all adapters off (unmerging first), so the model computes the
    /// base model's output, as PEFT's `disable_adapter()`.
    fn disable_adapters(&mut self) -> Result<()> {
        commit_all(
            self,
            "unmerge",
            Layer::unmerge_finite_check,
            Layer::plan_unmerge,
            |layer, plan| {
                commit_plan(layer, plan);
                layer.disable_adapters_unmerged();
            },
        )
    }

    /// Turns adapters back on after [`disable_adapters`](Self::disable_adapters).
    fn enable_adapters(&mut self) {
        for layer in self.layers_mut() {
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

    /// Runs `f` with each row of the batch computed by its own adapter, as
    /// PEFT's `model(..., adapter_names=[...])`: `rows[i]` names the adapter
    /// of row `i` (active or not), [`BASE_ROWS`](crate::BASE_ROWS)
    /// (`"__base__"`) the base model. Every layer groups the rows by adapter
    /// and runs each group with that adapter alone, so a batch serves
    /// several adapters with no weight copied per row; generation with a KV
    /// cache inside `f` keeps each row's adapter. Afterwards the model
    /// computes with its active adapters again.
    ///
    /// Refused (before `f` runs): a name that is no adapter of the model,
    /// and merged adapters (as PEFT refuses them). A batch whose row count
    /// is not `rows.len()` is an error of the forward pass inside `f`.
    fn with_batch_adapters<R>(&mut self, rows: &[&str], f: impl FnOnce(&Self) -> R) -> Result<R>
    where
        Self: Sized,
    {
        let named: Vec<&str> = rows.iter().copied().filter(|r| *r != BASE_ROWS).collect();
        check_known(&named, &self.adapter_names())?;
        if let Some(merged) = self.layers().iter().find(|l| l.layer.is_merged()) {
            return Err(PeftError::MergeState {
                module: merged.path.clone(),
                reason: "a mixed batch needs every adapter unmerged (as PEFT); unmerge first",
            });
        }
        let rows: std::sync::Arc<[String]> = rows.iter().map(|r| (*r).to_owned()).collect();
        for layer in self.layers_mut() {
            layer.layer.set_batch_adapters(Some(rows.clone()));
        }
        let result = f(self);
        for layer in self.layers_mut() {
            layer.layer.set_batch_adapters(None);
        }
        Ok(result)
    }

    /// Training mode turns adapter dropout on; inference mode (the default)
    /// turns it off.
    fn set_training(&mut self, training: bool) {
        for layer in self.layers_mut() {
            layer.layer.set_training(training);
        }
    }
}

impl<M: Adaptable + ?Sized> PeftModel for M {}

/// Adds the adapter in `files` to `model` under `name`: the files decoded
/// by [`io`], then the one attach routine with the file's tensors.
fn load_files<M: PeftModel + ?Sized>(model: &mut M, files: io::AdapterFiles<'_>, name: &str) -> Result<()> {
    check_adapter_name(name)?;
    attach::check_new_name(model, name)?;
    let device = model
        .layers()
        .first()
        .map_or(candle_core::Device::Cpu, |l| l.layer.device());
    let adapter = io::decode(files, &device)?;
    attach::attach(
        model,
        name,
        &*adapter.config,
        Some(FileTensors::new(adapter.tensors)),
        Copies::Make,
    )
}
