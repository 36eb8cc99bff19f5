//! Merging a [`Layer`]'s adapters into its base and taking them out again.
//!
//! Every change is planned first ([`MergePlan`]: the new base and which
//! adapters it holds), without touching the layer, and committed only when
//! every layer of a model has a plan: a failure anywhere leaves the model
//! as it was.

use candle_core::TensorId;

use crate::error::{PeftError, Result};
use crate::kernels::reduce::{dtype_epsilon, dtype_max, max_abs};
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
    /// The bound check's bound on the new weights' largest value, if it made one.
    weight_bound: Option<f64>,
}

/// What the bound check knows of a layer's new weights before they are
/// computed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FiniteCheck {
    /// The layer has nothing to change.
    Unchanged,
    /// Every new value is at most this in magnitude, and finite.
    Within(f64),
    /// The bounds cannot tell: the new weights must be computed and read.
    Unknown,
}

/// An upper bound on the magnitude of every value of a layer's base weight
/// (the weight with this id), which the bound check of the merge or unmerge
/// that made that weight proved: the next check starts from it instead of
/// reading the weight again, so merging and unmerging read each weight once.
/// Only weights a merge made carry one; a layer owns them and nothing writes
/// into them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightBound {
    weight: TensorId,
    largest: f64,
}

impl MergePlan {
    /// Whether installing this plan is safe given what the bound check knew:
    /// vouched for by the bounds (which the plan keeps for the next check),
    /// or read and found finite. `None` for a plan with a value that is not.
    fn checked(self, check: FiniteCheck) -> Result<Option<MergePlan>> {
        if let FiniteCheck::Within(bound) = check {
            return Ok(Some(self.with_weight_bound(Some(bound))));
        }
        Ok(self.all_finite()?.then_some(self))
    }

    /// This plan, keeping `bound` (proved by the bound check) on its weight's
    /// largest value for the next check.
    pub(crate) fn with_weight_bound(self, bound: Option<f64>) -> MergePlan {
        MergePlan {
            weight_bound: bound,
            ..self
        }
    }

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
        let check = self.merge_finite_check(None)?;
        let plan = self.plan_merge()?;
        self.commit_checked(plan, check, "merge")
    }

    /// Takes every merged adapter back out of the base weight (nothing to do
    /// when none is merged).
    pub fn unmerge(&mut self) -> Result<()> {
        let check = self.unmerge_finite_check()?;
        let plan = self.plan_unmerge()?;
        self.commit_checked(plan, check, "unmerge")
    }

    /// Installs `plan` if its weights are finite.
    fn commit_checked(&mut self, plan: Option<MergePlan>, check: FiniteCheck, operation: &'static str) -> Result<()> {
        let Some(plan) = plan else {
            return Ok(());
        };
        let plan = plan.checked(check)?.ok_or_else(|| PeftError::NonFiniteWeights {
            module: self.describe(),
            operation,
        })?;
        self.commit(plan);
        Ok(())
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
            weight_bound: None,
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
            weight_bound: None,
        }))
    }

    /// What is known, without computing them, of the weights
    /// [`plan_merge_of(names)`](Self::plan_merge_of) would give (see
    /// [`Adapter::merge_bound`](crate::layer::Adapter::merge_bound)).
    pub(crate) fn merge_finite_check(&self, names: Option<&[&str]>) -> Result<FiniteCheck> {
        if !self.has_pending_merge(names) {
            return Ok(FiniteCheck::Unchanged);
        }
        let chosen = |a: &AttachedAdapter| match names {
            None => a.active,
            Some(names) => names.contains(&a.name.as_str()),
        };
        self.rebuild_finite_check(|a| a.merged || chosen(a))
    }

    /// [`merge_finite_check`](Self::merge_finite_check) for
    /// [`plan_unmerge`](Self::plan_unmerge).
    pub(crate) fn unmerge_finite_check(&self) -> Result<FiniteCheck> {
        if !self.is_merged() {
            return Ok(FiniteCheck::Unchanged);
        }
        self.rebuild_finite_check(|a| a.merged)
    }

    /// Whether rebuilding the weights from the current base, taking out every
    /// merged adapter and folding in those `involved` (a superset of the
    /// merged ones), stays finite: every value on the way is at most the
    /// base's largest plus each merged adapter's bound twice and each other
    /// one's once; with a factor 2 for rounding, that must fit the dtype.
    ///
    /// The base's largest value is the one the last merge or unmerge left
    /// ([`WeightBound`]) when it has one for this weight and it is tight
    /// enough; otherwise the weight is read.
    fn rebuild_finite_check(&self, involved: impl Fn(&AttachedAdapter) -> bool) -> Result<FiniteCheck> {
        if self.is_quantized() {
            return Ok(FiniteCheck::Unknown);
        }
        let (mut reach, mut additions) = (0f64, 0);
        for attached in self.adapters.iter().filter(|a| involved(a)) {
            match attached.adapter.merge_bound()? {
                Some(bound) if bound.is_finite() => {
                    let times = if attached.merged { 2 } else { 1 };
                    reach += f64::from(times) * bound;
                    additions += times;
                }
                _ => return Ok(FiniteCheck::Unknown),
            }
        }
        let weight = self.base.weight()?;
        let limit = dtype_max(weight.dtype()) / 2.0;
        let bias_largest = self.base.bias().map_or(Ok(0.0), max_abs)?;
        // Each addition on the way rounds once, by at most one unit of the
        // dtype's precision.
        let rounding = (1.0 + dtype_epsilon(weight.dtype())).powi(additions + 1);
        let within = |weight_largest: f64| {
            // (`f64::max` would drop a NaN.)
            let finite = weight_largest.is_finite() && bias_largest.is_finite();
            let total = weight_largest.max(bias_largest) + reach;
            (finite && total.is_finite() && total < limit).then_some(total * rounding)
        };
        let carried = self
            .weight_bound
            .filter(|bound| bound.weight == weight.id())
            .and_then(|bound| within(bound.largest));
        let bound = match carried {
            Some(bound) => Some(bound),
            None => within(max_abs(weight)?),
        };
        Ok(bound.map_or(FiniteCheck::Unknown, FiniteCheck::Within))
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
        self.install_base(plan.base, plan.weight_bound);
        self.reinstall_trainable_bias();
        for (attached, merged) in self.adapters.iter_mut().zip(plan.merged) {
            attached.merged = merged;
        }
    }

    /// Installs a merge plan and drops every adapter: a plain layer remains.
    pub(crate) fn commit_and_unload(&mut self, plan: Option<MergePlan>) {
        if let Some(plan) = plan {
            self.install_base(plan.base, plan.weight_bound);
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

    /// Replaces the base with a planned one, keeping the bound check's bound
    /// on its weight for the next check.
    fn install_base(&mut self, base: Base, weight_bound: Option<f64>) {
        self.base = base;
        // A bound comes only with a plan the adapters' bounds vouched for:
        // its weight is the sum a merge computed into new memory, which no
        // variable shares, so its values stay as the bound saw them.
        self.weight_bound = weight_bound.and_then(|largest| {
            let weight = self.base.weight().ok()?;
            Some(WeightBound {
                weight: weight.id(),
                largest,
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::error::PeftError;
    use crate::kernels::reduce::{dtype_max, max_abs};
    use crate::{Layer, LoraAdapter};

    /// A `[6, 5]` layer of `dtype` whose LoRA change (about `change` in size)
    /// dwarfs its weight (values below 1), so that a bound on the old weight
    /// cannot pass for one on the new.
    fn layer(dtype: DType, change: f64, bias: Option<f32>) -> Layer {
        let device = Device::Cpu;
        let values = |n: usize, size: f64| -> Vec<f32> {
            (0..n)
                .map(|i| (size * (((i * 7 + 3) % 11) as f64 / 5.0 - 1.0)) as f32)
                .collect()
        };
        let tensor = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &device)?.to_dtype(dtype);
        let weight = tensor(values(30, 0.9), (6, 5)).unwrap();
        let bias = bias.map(|b| Tensor::full(b, 6, &device).unwrap().to_dtype(dtype).unwrap());
        let mut layer = Layer::new(weight, bias);
        let a = Var::from_tensor(&tensor(values(10, change.sqrt()), (2, 5)).unwrap()).unwrap();
        let b = Var::from_tensor(&tensor(values(12, change.sqrt()), (6, 2)).unwrap()).unwrap();
        let lora = LoraAdapter::new(a, b, 0.5, 0.0).unwrap();
        layer.add_adapter("default", Box::new(lora)).unwrap();
        layer
    }

    /// The bound the layer keeps is on the weight it holds, and holds.
    fn assert_bound_holds(layer: &Layer, when: &str) {
        let bound = layer
            .weight_bound
            .unwrap_or_else(|| panic!("no bound kept after {when}"));
        let weight = layer.weight().unwrap();
        assert_eq!(bound.weight, weight.id(), "after {when}");
        let largest = max_abs(weight).unwrap();
        assert!(
            largest <= bound.largest,
            "after {when}: |W| {largest} above the bound {}",
            bound.largest
        );
    }

    #[test]
    fn every_merge_and_unmerge_keeps_a_bound_on_the_weight_it_made() {
        let mut layer = layer(DType::F32, 100.0, Some(0.5));
        assert!(layer.weight_bound.is_none());
        for round in 0..4 {
            layer.merge().unwrap();
            assert_bound_holds(&layer, &format!("merge {round}"));
            layer.unmerge().unwrap();
            assert_bound_holds(&layer, &format!("unmerge {round}"));
        }
    }

    #[test]
    fn a_bound_grown_too_loose_gives_way_to_the_weight_read_again() {
        // In f16 each merge and unmerge adds the change's bound (hundreds)
        // to the one kept: within fifty pairs it passes f16's limit, and
        // the check must read the weight rather than give up vouching.
        let mut layer = layer(DType::F16, 300.0, None);
        let limit = dtype_max(DType::F16) / 2.0;
        let mut largest_kept = 0f64;
        for round in 0..50 {
            layer.merge().unwrap();
            assert_bound_holds(&layer, &format!("merge {round}"));
            layer.unmerge().unwrap();
            assert_bound_holds(&layer, &format!("unmerge {round}"));
            let kept = layer.weight_bound.unwrap().largest;
            assert!(kept < limit, "a bound {kept} past f16's limit was kept");
            largest_kept = largest_kept.max(kept);
        }
        // The bound did grow towards the limit: the read happened.
        assert!(largest_kept > limit / 4.0, "the bound never grew: {largest_kept}");
    }

    #[test]
    fn a_bias_that_is_not_finite_is_refused_even_where_the_bounds_vouch() {
        for value in [f32::NAN, f32::INFINITY] {
            let mut layer = layer(DType::F32, 1.0, Some(value));
            let error = layer.merge().unwrap_err();
            assert!(matches!(error, PeftError::NonFiniteWeights { .. }), "{error}");
            assert!(!layer.is_merged());
        }
    }
}
