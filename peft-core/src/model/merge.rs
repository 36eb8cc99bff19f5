//! Merging and unmerging every layer, all or nothing.

use std::collections::BTreeSet;

use rayon::prelude::*;

use crate::error::{InModule, PeftError, Result};
use crate::layer::merge::{FiniteCheck, MergePlan};
use crate::layer::Layer;
use crate::model::PeftModel;

/// Plans a change on every layer and commits it, so that nothing changes if
/// any plan fails and at most one layer's new weights exist at a time.
///
/// A first pass checks every layer before any changes: where `check` shows
/// from the adapters' bounds and the weight's largest value that the new
/// weights are finite ([`FiniteCheck::Within`]; see
/// [`Adapter::merge_bound`](crate::layer::Adapter::merge_bound)), nothing
/// more; otherwise it makes the plan and drops it (a dry run). A failure
/// there leaves the model untouched. The second pass makes each plan and
/// commits it before making the next, so the old weights of a layer are freed
/// before the next layer's new ones are made (merging never holds a second
/// copy of the model). Plans are deterministic, so a plan made in the first
/// pass cannot fail in the second; a layer the bounds vouch for (LoRA's) is
/// planned in the second pass only, computing its new weights once, and its
/// values cannot fail the check there. Any other layer computes them twice.
/// A vouched-for layer keeps its bound for the next check, which then need
/// not read the weight (see [`WeightBound`](crate::layer::merge::WeightBound)).
///
/// A plan whose weights are not all finite is refused in the first pass
/// ([`PeftError::NonFiniteWeights`], naming `operation`).
pub(crate) fn commit_all<M: PeftModel + ?Sized>(
    model: &mut M,
    operation: &'static str,
    check: impl Fn(&Layer) -> Result<FiniteCheck> + Sync,
    plan: impl Fn(&Layer) -> Result<Option<MergePlan>>,
    commit: impl Fn(&mut Layer, Option<MergePlan>),
) -> Result<()> {
    let layers = model.layers();
    // Every layer's bound check on the threads at once (each reads its
    // weight at most once), rather than waking them for each layer in turn.
    let checks: Vec<Result<FiniteCheck>> = layers.par_iter().map(|layer| check(layer.layer)).collect();
    let mut known = Vec::with_capacity(layers.len());
    for (layer, checked) in layers.iter().zip(checks) {
        let checked = checked.in_module(&layer.path)?;
        if matches!(checked, FiniteCheck::Unknown) {
            if let Some(plan) = plan(layer.layer).in_module(&layer.path)? {
                if !plan.all_finite().in_module(&layer.path)? {
                    return Err(PeftError::NonFiniteWeights {
                        module: layer.path.clone(),
                        operation,
                    });
                }
            }
        }
        known.push((layer.path.clone(), checked));
    }
    let mut known = known.into_iter();
    for layer in model.layers_mut() {
        // Checked above: only a bound to keep (the walks visit the layers in
        // one order; a layer out of it keeps none).
        let bound = match known.next() {
            Some((path, FiniteCheck::Within(bound))) if path == layer.path => Some(bound),
            _ => None,
        };
        let plan = plan(layer.layer).in_module(&layer.path)?;
        let plan = plan.map(|plan| plan.with_weight_bound(bound));
        commit(layer.layer, plan);
    }
    Ok(())
}

/// Installs a plan, if there is one.
pub(crate) fn commit_plan(layer: &mut Layer, plan: Option<MergePlan>) {
    if let Some(plan) = plan {
        layer.commit(plan);
    }
}

/// Refuses a merge that would change nothing, saying why: the chosen
/// adapters are already merged, none is active, or adapters are disabled.
pub(crate) fn check_pending_merge<M: PeftModel + ?Sized>(model: &M, names: Option<&[&str]>) -> Result<()> {
    let layers = model.layers();
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
pub(crate) fn check_mergeable<M: PeftModel + ?Sized>(model: &M, names: Option<&[&str]>) -> Result<()> {
    for layer in model.layers() {
        layer.layer.check_mergeable(names).in_module(&layer.path)?;
    }
    Ok(())
}
