//! Merging a [`Layer`]'s adapters into its base and taking them out again.
//!
//! Every change is planned first ([`MergePlan`]: the new base and which
//! adapters it holds), without touching the layer, and committed only when
//! every layer of a model has a plan: a failure anywhere leaves the model
//! as it was.

use crate::error::{PeftError, Result};
use crate::kernels::reduce::{dtype_max, max_abs};
use crate::layer::adapter::Composition;
use crate::layer::base::{Base, LayerWeights};
use crate::layer::slot::{AttachedAdapter, Layer};

/// Why a partial merge is refused.
const PARTIAL_MERGE: &str = "merging some adapters of this layer while other active ones stay unmerged is exact only \
     when all of them are additive (`Composition::Additive`); merge every active adapter, or deactivate the others first";
/// Why merging into a quantized base is refused.
const QUANTIZED_MERGE: &str = "cannot merge into a quantized base weight: requantizing the merged weight would \
     lose the adapter's precision; keep the adapter unmerged, or load the base in f32/f16 to merge";

/// Why merging two whole copies of one layer is refused.
const TWO_COPIES_MERGE: &str = "two adapters hold a whole copy of this layer (modules_to_save) and both would be \
     merged, but only one copy can replace the base; activate one of them";

/// A new base for the layer, and which adapters are merged into it.
pub(crate) struct MergePlan {
    base: Base,
    merged: Vec<bool>,
}

impl MergePlan {
    /// Whether the new weights are all finite; a plan that is not is refused
    /// before any layer changes.
    pub(crate) fn all_finite(&self) -> Result<bool> {
        let weights = LayerWeights {
            weight: self.base.weight()?.clone(),
            bias: self.base.bias().cloned(),
        };
        weights.all_finite()
    }
}

impl Layer {
    /// Folds the active, unmerged adapters into the base weight. Refused for
    /// a quantized base: see [`from_qtensor`](Self::from_qtensor).
    /// Merging what is already merged does nothing; weights that would not
    /// be finite are refused ([`PeftError::NonFiniteWeights`]).
    pub fn merge(&mut self) -> Result<()> {
        self.check_mergeable(None)?;
        let plan = self.plan_merge()?;
        self.commit_checked(plan, "merge")
    }

    /// Takes every merged adapter back out of the base weight (nothing to do
    /// when none is merged).
    pub fn unmerge(&mut self) -> Result<()> {
        let plan = self.plan_unmerge()?;
        self.commit_checked(plan, "unmerge")
    }

    /// Installs `plan` if its weights are finite.
    fn commit_checked(&mut self, plan: Option<MergePlan>, operation: &'static str) -> Result<()> {
        match plan {
            Some(plan) if !plan.all_finite()? => Err(PeftError::NonFiniteWeights {
                module: self.describe(),
                operation,
            }),
            Some(plan) => {
                self.commit(plan);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Turns adapters off, unmerging first as PEFT's `disable_adapter()`
    /// does, so the output is the base layer's.
    pub fn disable_adapters(&mut self) -> Result<()> {
        self.unmerge()?;
        self.disable_adapters_unmerged();
        Ok(())
    }

    /// Turns adapters back on.
    pub fn enable_adapters(&mut self) {
        self.adapters_enabled = true;
    }

    /// Turns adapters off; the caller has unmerged them.
    pub(crate) fn disable_adapters_unmerged(&mut self) {
        debug_assert!(!self.is_merged());
        self.adapters_enabled = false;
    }

    /// Refuses to merge the adapters in `names` (the active ones when `None`)
    /// into a quantized base.
    pub(crate) fn check_mergeable(&self, names: Option<&[&str]>) -> Result<()> {
        if !self.has_pending_merge(names) {
            return Ok(());
        }
        if self.is_quantized() {
            return Err(PeftError::MergeState {
                module: self.describe(),
                reason: QUANTIZED_MERGE,
            });
        }
        // After the merge, some adapters are in the weight and some active
        // ones are not: exact only when the ones left out add a change of the
        // input alone and nothing merged scales what they add to.
        let merged_after = |a: &AttachedAdapter| {
            a.merged
                || match names {
                    None => a.active,
                    Some(names) => names.contains(&a.name.as_str()),
                }
        };
        let partial = self.adapters.iter().any(|a| a.active && !merged_after(a));
        let exact = |a: &AttachedAdapter| match a.adapter.composition() {
            Composition::Additive => true,
            Composition::TransformsInput | Composition::ReplacesBase | Composition::ReplacesRows => merged_after(a),
            _ => false,
        };
        let copies_merged = self
            .adapters
            .iter()
            .filter(|a| a.adapter.composition() == Composition::ReplacesBase && merged_after(a))
            .count();
        if copies_merged > 1 {
            return Err(PeftError::MergeState {
                module: self.describe(),
                reason: TWO_COPIES_MERGE,
            });
        }
        if partial && !self.adapters.iter().filter(|a| a.active || merged_after(a)).all(exact) {
            return Err(PeftError::MergeState {
                module: self.describe(),
                reason: PARTIAL_MERGE,
            });
        }
        Ok(())
    }

    /// Whether merging the adapters in `names` (the active ones when `None`)
    /// would change this layer: adapters are enabled and one of them is not
    /// merged yet.
    pub(crate) fn has_pending_merge(&self, names: Option<&[&str]>) -> bool {
        self.adapters_enabled
            && self.adapters.iter().any(|a| {
                !a.merged
                    && match names {
                        None => a.active,
                        Some(names) => names.contains(&a.name.as_str()),
                    }
            })
    }

    /// Computes the merged weights without changing the layer.
    pub(crate) fn plan_merge(&self) -> Result<Option<MergePlan>> {
        self.plan_merge_of(None)
    }

    /// Computes the weights with the adapters in `names` (all active ones
    /// when `None`) merged, without changing the layer.
    ///
    /// The weights are rebuilt from the unmerged base with every adapter that
    /// ends up merged, in [`merge_order`](Self::merge_order), so that merging
    /// one adapter after another gives what the forward pass computes.
    pub(crate) fn plan_merge_of(&self, names: Option<&[&str]>) -> Result<Option<MergePlan>> {
        let chosen = |a: &AttachedAdapter| match names {
            None => a.active,
            Some(names) => names.contains(&a.name.as_str()),
        };
        if !self.has_pending_merge(names) {
            return Ok(None);
        }
        if self.is_quantized() {
            return Err(PeftError::MergeState {
                module: self.describe(),
                reason: QUANTIZED_MERGE,
            });
        }
        let merged: Vec<bool> = self.adapters.iter().map(|a| a.merged || chosen(a)).collect();
        let unmerged = self.unmerged_weights()?;
        let mut weights = unmerged.clone();
        for i in self.merge_order(&merged) {
            weights = self.adapters[i].adapter.merge_onto(&weights, &unmerged)?;
        }
        self.check_trained_bias_kept(&weights)?;
        Ok(Some(MergePlan {
            base: self.base.rebuilt(weights)?,
            merged,
        }))
    }

    /// Computes the unmerged weights without changing the layer.
    pub(crate) fn plan_unmerge(&self) -> Result<Option<MergePlan>> {
        if !self.is_merged() {
            return Ok(None);
        }
        let weights = self.unmerged_weights()?;
        self.check_trained_bias_kept(&weights)?;
        Ok(Some(MergePlan {
            base: self.base.rebuilt(weights)?,
            merged: vec![false; self.adapters.len()],
        }))
    }

    /// Whether [`plan_merge_of(names)`](Self::plan_merge_of) is known to give
    /// finite weights without computing them (see [`Adapter::merge_bound`](crate::layer::Adapter::merge_bound)).
    /// `false` when it cannot tell: the caller then computes the plan.
    pub(crate) fn merge_stays_finite(&self, names: Option<&[&str]>) -> Result<bool> {
        if !self.has_pending_merge(names) {
            return Ok(true);
        }
        let chosen = |a: &AttachedAdapter| match names {
            None => a.active,
            Some(names) => names.contains(&a.name.as_str()),
        };
        self.rebuild_stays_finite(|a| a.merged || chosen(a))
    }

    /// [`merge_stays_finite`](Self::merge_stays_finite) for
    /// [`plan_unmerge`](Self::plan_unmerge).
    pub(crate) fn unmerge_stays_finite(&self) -> Result<bool> {
        if !self.is_merged() {
            return Ok(true);
        }
        self.rebuild_stays_finite(|a| a.merged)
    }

    /// Whether rebuilding the weights from the current base, taking out every
    /// merged adapter and folding in those `involved` (a superset of the
    /// merged ones), stays finite: every value on the way is at most the
    /// base's largest plus each merged adapter's bound twice and each other
    /// one's once; with a factor 2 for rounding, that must fit the dtype.
    fn rebuild_stays_finite(&self, involved: impl Fn(&AttachedAdapter) -> bool) -> Result<bool> {
        if self.is_quantized() {
            return Ok(false);
        }
        let mut reach = 0f64;
        for attached in self.adapters.iter().filter(|a| involved(a)) {
            match attached.adapter.merge_bound()? {
                Some(bound) if bound.is_finite() => reach += if attached.merged { 2.0 * bound } else { bound },
                _ => return Ok(false),
            }
        }
        let weight = self.base.weight()?;
        let mut largest = max_abs(weight)?;
        if let Some(bias) = self.base.bias() {
            largest = largest.max(max_abs(bias)?);
        }
        let total = largest + reach;
        Ok(total.is_finite() && 2.0 * total < dtype_max(weight.dtype()))
    }

    /// Refuses new weights whose bias differs from the bias being trained
    /// (PEFT's `bias = "all" | "lora_only"`): an adapter that merges into the
    /// bias too (IA³ scaling the output) would leave the trained variable
    /// and the computed bias apart. LoRA, LoHa and LoKr keep the bias.
    fn check_trained_bias_kept(&self, weights: &LayerWeights) -> Result<()> {
        let (Some(var), Some(bias)) = (&self.trainable_bias, &weights.bias) else {
            return Ok(());
        };
        let change = (var.as_tensor() - bias)?
            .abs()?
            .max_all()?
            .to_dtype(candle_core::DType::F64)?;
        if change.to_scalar::<f64>()? != 0.0 {
            return Err(PeftError::MergeState {
                module: self.describe(),
                reason: "an adapter of this layer merges into its bias, which is being trained beside \
                         the adapters (a config's `bias`); keep that adapter unmerged",
            });
        }
        Ok(())
    }

    /// The base weights with every merged adapter taken out again, in the
    /// reverse of the order they were merged in.
    fn unmerged_weights(&self) -> Result<LayerWeights> {
        let merged: Vec<bool> = self.adapters.iter().map(|a| a.merged).collect();
        let mut weights = self.base_weights()?;
        for i in self.merge_order(&merged).into_iter().rev() {
            weights = self.adapters[i].adapter.unmerge(&weights)?;
        }
        Ok(weights)
    }

    /// The order to merge the adapters flagged in `selected`: those that
    /// transform the input first (the forward pass applies them to the base
    /// weight only), then the others in the order they were added.
    fn merge_order(&self, selected: &[bool]) -> Vec<usize> {
        let (mut first, rest): (Vec<usize>, Vec<usize>) = (0..self.adapters.len())
            .filter(|&i| selected[i])
            .partition(|&i| self.adapters[i].adapter.composition() == Composition::TransformsInput);
        first.extend(rest);
        first
    }

    /// Installs a plan made by `plan_merge`/`plan_unmerge` on this same layer.
    pub(crate) fn commit(&mut self, plan: MergePlan) {
        debug_assert_eq!(plan.merged.len(), self.adapters.len());
        self.base = plan.base;
        self.reinstall_trainable_bias();
        for (attached, merged) in self.adapters.iter_mut().zip(plan.merged) {
            attached.merged = merged;
        }
    }

    /// Installs a merge plan and drops every adapter: a plain layer remains.
    pub(crate) fn commit_and_unload(&mut self, plan: Option<MergePlan>) {
        if let Some(plan) = plan {
            self.base = plan.base;
        }
        // A plain layer again: its bias, trained or not, is frozen.
        if let Some(var) = self.trainable_bias.take() {
            if let Some(base) = self.base.with_bias(var.as_tensor().detach()) {
                self.base = base;
            }
        }
        self.adapters.clear();
        self.adapters_enabled = true;
    }
}
