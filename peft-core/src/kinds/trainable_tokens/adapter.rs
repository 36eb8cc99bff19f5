//! [`TrainableTokensAdapter`]: chosen rows of an embedding replaced by
//! trainable ones, and the matching output columns of a tied head.

use candle_core::{Tensor, Var};

use crate::error::{PeftError, Result};
use crate::layer::{Adapter, Composition, ForwardContext, Layer, LayerKind, LayerWeights};

/// The key of the rows in PEFT's files, for the `TRAINABLE_TOKENS` kind.
pub(crate) const DELTA_KEY: &str = "trainable_tokens_delta";
/// The key of the rows in PEFT's files when a LoRA config's
/// `trainable_token_indices` asked for them (PEFT's `TrainableTokensWrapper`).
pub(crate) const LORA_DELTA_KEY: &str = "token_adapter.trainable_tokens_delta";

/// Where the adapter sits: the table is looked up, or multiplied by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// An embedding slot: output rows of the chosen tokens replaced.
    Embedding,
    /// A dense slot whose weight `[vocab, dim]` holds one row per token (an
    /// output head): output columns of the chosen tokens replaced.
    Head,
}

/// PEFT's trainable tokens (`TrainableTokensLayer`): the rows of an
/// embedding table for a few tokens (`token_indices`) replaced by a
/// trainable tensor `trainable_tokens_delta` `[n, dim]`, the rest of the
/// table frozen. Despite its name the tensor holds the rows themselves, not
/// a difference: PEFT initialises it as a copy of the rows
/// (`init_weights`), so a fresh adapter changes nothing.
///
/// - On an embedding, the output for a token in `token_indices` is its row
///   of the tensor, exactly (a selection, not an addition); gradients reach
///   the tensor only.
/// - On an output head whose weight is the embedding table (tied weights),
///   the logits of those tokens are `x · rowᵀ` (+ the bias's entry), with the
///   same tensor ([`Adapter::tied`]), so it trains once.
///
/// Merging writes the rows into the base weight; unmerging writes back the
/// rows the base had when the adapter was made, bit for bit.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use peft_core::{Embedding, TrainableTokensAdapter};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let table = Tensor::new(&[[0f32, 0.], [1., 1.], [2., 2.]], &dev)?;
/// let mut embed = Embedding::new(table, 2)?;
/// let adapter = TrainableTokensAdapter::new("embed", embed.layer(), &[1], true)?;
/// adapter.delta().set(&Tensor::new(&[[5f32, 6.]], &dev)?)?;
/// embed.layer_mut().add_adapter("default", Box::new(adapter))?;
/// let y = embed.forward(&Tensor::new(&[2u32, 1], &dev)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[2., 2.], [5., 6.]]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TrainableTokensAdapter {
    delta: Var,
    indices: Vec<usize>,
    /// The base's rows at `indices` when the adapter was made, for unmerging.
    original: Tensor,
    /// `[vocab]` u32: for each token, its row in `delta`, or `n` for a token
    /// that keeps its base row.
    position: Tensor,
    placement: Placement,
    /// The file key of `delta`, `None` when this layer does not save it (a
    /// tied head under LoRA: PEFT saves the embedding's only).
    key: Option<&'static str>,
    /// Made by [`Adapter::tied`]: follows another layer's adapter.
    tied: bool,
}

impl TrainableTokensAdapter {
    /// Trainable rows `indices` of the embedding (or output head) `layer`,
    /// at `module` for messages: a copy of the base's rows when
    /// `init_weights` (PEFT's default), N(0, 1) otherwise. Saved under
    /// PEFT's `TRAINABLE_TOKENS` key, `trainable_tokens_delta`.
    ///
    /// Refused: an index beyond the table ([`PeftError::TokenIndexOutOfRange`]),
    /// an index listed twice ([`PeftError::DuplicateTokenIndex`]), a layer
    /// that is neither an embedding nor a dense layer, and an empty list.
    pub fn new(module: &str, layer: &Layer, indices: &[usize], init_weights: bool) -> Result<Self> {
        Self::with_key(module, layer, indices, init_weights, DELTA_KEY)
    }

    /// [`new`](Self::new), saved under `key`.
    pub(crate) fn with_key(
        module: &str,
        layer: &Layer,
        indices: &[usize],
        init_weights: bool,
        key: &'static str,
    ) -> Result<Self> {
        let fail = |message: String| PeftError::Module {
            module: module.to_owned(),
            cause: candle_core::Error::Msg(message),
        };
        // The table `[vocab, dim]`, one row per token.
        let (placement, table) = match (layer.kind(), layer.lookup_table()) {
            (LayerKind::Embedding, Some(table)) => (Placement::Embedding, table.clone()),
            (LayerKind::Linear, _) if !layer.is_quantized() && !layer.is_fan_in_fan_out() => {
                (Placement::Head, layer.weight()?.clone())
            }
            (kind, _) => {
                return Err(fail(format!(
                    "trainable tokens need an embedding or a dense (unquantized) output head, not a {kind:?} layer"
                )))
            }
        };
        if indices.is_empty() {
            return Err(fail("no trainable token index given".into()));
        }
        let (vocab, dim) = table.dims2()?;
        let mut position = vec![indices.len() as u32; vocab];
        for (row, &index) in indices.iter().enumerate() {
            if index >= vocab {
                return Err(PeftError::TokenIndexOutOfRange {
                    module: module.to_owned(),
                    index,
                    vocab,
                });
            }
            if position[index] != indices.len() as u32 {
                return Err(PeftError::DuplicateTokenIndex {
                    module: module.to_owned(),
                    index,
                });
            }
            position[index] = row as u32;
        }
        let device = table.device().clone();
        let rows = Tensor::new(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), &device)?;
        let original = table.index_select(&rows, 0)?.detach().copy()?;
        let delta = if init_weights {
            Var::from_tensor(&original)?
        } else {
            crate::kernels::random::normal_var(0.0, 1.0, (indices.len(), dim), table.dtype(), &device)?
        };
        Ok(Self {
            delta,
            indices: indices.to_vec(),
            original,
            position: Tensor::new(position, &device)?,
            placement,
            key: Some(key),
            tied: false,
        })
    }

    /// The trainable rows `[n, dim]`, in the order of
    /// [`token_indices`](Self::token_indices).
    pub fn delta(&self) -> &Var {
        &self.delta
    }

    /// The tokens whose rows train.
    pub fn token_indices(&self) -> &[usize] {
        &self.indices
    }

    /// `table` `[vocab, dim]` with the chosen rows replaced by `rows` `[n, dim]`.
    fn replace_rows(&self, table: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let (vocab, dim) = table.dims2()?;
        let picked = self.spread(&rows.to_dtype(table.dtype())?, 0)?;
        let mask = self.mask()?.reshape((vocab, 1))?.broadcast_as((vocab, dim))?;
        Ok(mask.where_cond(&picked, table)?)
    }

    /// `values` (`n` entries along `dim`) spread over the vocabulary along
    /// `dim`, zeros at the other tokens.
    fn spread(&self, values: &Tensor, dim: usize) -> Result<Tensor> {
        let mut zero_shape = values.dims().to_vec();
        zero_shape[dim] = 1;
        let zeros = Tensor::zeros(zero_shape, values.dtype(), values.device())?;
        Ok(Tensor::cat(&[values, &zeros], dim)?.index_select(&self.position, dim)?)
    }

    /// `[vocab]` u8: 1 for the chosen tokens.
    fn mask(&self) -> Result<Tensor> {
        Ok(self.position.lt(self.indices.len() as u32)?)
    }
}

impl Adapter for TrainableTokensAdapter {
    fn peft_type(&self) -> &'static str {
        super::PEFT_TYPE
    }

    fn composition(&self) -> Composition {
        Composition::ReplacesRows
    }

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let delta = self.delta.as_tensor();
        match self.placement {
            Placement::Embedding => {
                // One output row per token id: pick the token's trainable row
                // where it has one.
                let dim = delta.dim(1)?;
                let ids = x.flatten_all()?;
                let count = ids.dim(0)?;
                let at = self.position.index_select(&ids, 0)?;
                let padded = Tensor::cat(&[delta, &Tensor::zeros((1, dim), delta.dtype(), delta.device())?], 0)?;
                let rows = padded.index_select(&at, 0)?.to_dtype(base_output.dtype())?;
                let chosen = at
                    .lt(self.indices.len() as u32)?
                    .reshape((count, 1))?
                    .broadcast_as((count, dim))?;
                let flat = base_output.reshape((count, dim))?;
                Ok(chosen.where_cond(&rows, &flat)?.reshape(base_output.shape())?)
            }
            Placement::Head => {
                // The chosen tokens' logits from their trainable rows.
                let mut logits = x.broadcast_matmul(&delta.to_dtype(x.dtype())?.t()?)?;
                if let Some(bias) = cx.bias() {
                    let rows = Tensor::new(
                        self.indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                        bias.device(),
                    )?;
                    logits = logits.broadcast_add(&bias.index_select(&rows, 0)?.to_dtype(logits.dtype())?)?;
                }
                let last = logits.rank() - 1;
                let spread = self.spread(&logits, last)?.to_dtype(base_output.dtype())?;
                let mask = self.mask()?.broadcast_as(base_output.shape())?;
                Ok(mask.where_cond(&spread, &base_output)?)
            }
        }
    }

    fn merge(&self, base: &LayerWeights) -> Result<LayerWeights> {
        self.with_rows(base, &self.delta.as_tensor().detach())
    }

    fn unmerge(&self, merged: &LayerWeights) -> Result<LayerWeights> {
        self.with_rows(merged, &self.original)
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        self.key.map(|key| (key, self.delta.clone())).into_iter().collect()
    }

    fn tied(&self) -> Option<Box<dyn Adapter>> {
        if self.placement != Placement::Embedding {
            return None;
        }
        Some(Box::new(Self {
            placement: Placement::Head,
            // PEFT saves a tied head's rows for its own kind, and not when
            // LoRA's `trainable_token_indices` asked for them.
            key: self.key.filter(|key| *key == DELTA_KEY),
            tied: true,
            ..self.clone()
        }))
    }

    fn follows_tied_weight(&self) -> bool {
        self.tied
    }

    fn state_dict_key(&self, key: &str, adapter: &str) -> String {
        // PEFT: `embed_tokens.token_adapter.trainable_tokens_delta.default`.
        format!("{key}.{adapter}")
    }
}

impl TrainableTokensAdapter {
    /// `weights` with the chosen rows of the table replaced by `rows`: the
    /// columns of an embedding's `[dim, vocab]` weight, the rows of a head's.
    fn with_rows(&self, weights: &LayerWeights, rows: &Tensor) -> Result<LayerWeights> {
        let weight = match self.placement {
            Placement::Embedding => self.replace_rows(&weights.weight.t()?, rows)?.t()?,
            Placement::Head => self.replace_rows(&weights.weight, rows)?,
        };
        Ok(LayerWeights {
            weight,
            bias: weights.bias.clone(),
        })
    }
}
