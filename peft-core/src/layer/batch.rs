//! Mixed batches: one forward pass in which each row of the batch uses its
//! own adapter, as PEFT's `model(..., adapter_names=[...])`.
//!
//! The rows are grouped by adapter; each group runs through the layer with
//! that adapter alone (any kind: LoRA, DoRA, IA³, a whole copy), rows named
//! [`BASE_ROWS`] through the base, and the outputs are put back in the
//! batch's order. No weight is copied per row.

use std::sync::Arc;

use candle_core::{Result as CandleResult, Tensor};

use crate::layer::slot::Layer;

/// The name PEFT gives rows that use no adapter: `"__base__"`.
pub const BASE_ROWS: &str = "__base__";

impl Layer {
    /// Sets the adapter of each row of the next forward passes (`None`: the
    /// active adapters for every row). The model-level
    /// [`PeftModel::with_batch_adapters`](crate::PeftModel::with_batch_adapters)
    /// checks the names and sets every layer.
    pub(crate) fn set_batch_adapters(&mut self, rows: Option<Arc<[String]>>) {
        self.batch_adapters = rows;
    }

    /// The forward pass of a mixed batch: rows grouped by adapter name, each
    /// group through the layer with that adapter alone (the base for
    /// [`BASE_ROWS`] and for names this layer does not hold), then the rows
    /// put back in order.
    pub(super) fn forward_mixed(&self, x: &Tensor, train: bool, rows: &[String]) -> CandleResult<Tensor> {
        let batch = x.dim(0)?;
        if batch != rows.len() {
            candle_core::bail!(
                "{}: a mixed batch names an adapter for {} rows, but the input has {batch} rows",
                self.describe(),
                rows.len()
            );
        }
        // Groups in order of first appearance, each with its rows.
        let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
        for (row, name) in rows.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| *n == name.as_str()) {
                Some((_, members)) => members.push(row as u32),
                None => groups.push((name.as_str(), vec![row as u32])),
            }
        }
        let run = |name: &str, x: &Tensor| match self.adapters.iter().position(|a| a.name == name) {
            Some(index) if name != BASE_ROWS => self.forward_with(x, train, |i, a| i == index && !a.merged),
            _ => self.base.forward(x),
        };
        if let [(name, _)] = groups.as_slice() {
            return run(name, x);
        }
        let mut order = Vec::with_capacity(batch);
        let mut outputs = Vec::with_capacity(groups.len());
        for (name, members) in &groups {
            let index = Tensor::new(members.as_slice(), x.device())?;
            outputs.push(run(name, &x.index_select(&index, 0)?)?);
            order.extend_from_slice(members);
        }
        // `order[k]` is the batch row of output row k: invert it.
        let mut position = vec![0u32; batch];
        for (k, &row) in order.iter().enumerate() {
            position[row as usize] = k as u32;
        }
        let joined = Tensor::cat(&outputs, 0)?;
        joined.index_select(&Tensor::new(position.as_slice(), x.device())?, 0)
    }
}
