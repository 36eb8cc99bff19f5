//! The KV cache of generation.

use candle_core::{Result, Tensor};

/// The keys and values of the positions a decoder has seen, layer by layer,
/// for generating one token at a time (`forward_with_cache` of every
/// architecture). Start with `KvCache::default()` for each new
/// sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    seen: usize,
}

impl KvCache {
    /// How many positions the cache holds.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Makes room for `layers` layers.
    pub(crate) fn resize(&mut self, layers: usize) {
        self.layers.resize_with(layers, LayerCache::default);
    }

    /// Layer `i`'s keys and values.
    pub(crate) fn layer(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    /// Counts `t` new positions, once every layer has appended them.
    pub(crate) fn advance(&mut self, t: usize) {
        self.seen += t;
    }
}

/// One layer's keys and values, `[batch, positions, kv_heads, head_dim]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerCache {
    keys_values: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Appends the new positions' keys and values; returns all of them.
    pub(crate) fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.keys_values.take() {
            None => (k, v),
            Some((old_k, old_v)) => (Tensor::cat(&[&old_k, &k], 1)?, Tensor::cat(&[&old_v, &v], 1)?),
        };
        self.keys_values = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
