//! transformers' `LlamaForSequenceClassification` (and the same head on
//! Mistral, Qwen2, Qwen3 and Phi-3): the decoder, a `score` head without
//! bias, and the logits of each sequence's last token that is not padding;
//! and `LlamaForTokenClassification`: a `score` head with a bias on every
//! position.
//!
//! A PEFT adapter for it is made with `task_type="SEQ_CLS"`, which puts
//! `classifier` and `score` in `modules_to_save`: the adapter carries its
//! own trained head, and [`peft_core::PeftModel::load_adapter`] swaps it in
//! (`score` is an ordinary linear layer here, so `all_linear()` targets it
//! as PEFT's `"all-linear"` would, unless `modules_to_save` names it).
//!
//! Pooling is transformers': the rightmost position whose id is not
//! `pad_token_id` (position 0 when every id is padding). The forward pass
//! takes no attention mask, so pad on the right: real tokens then never
//! see the padding, which comes after them (transformers given the same
//! ids and no mask computes the same).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use peft_core::prelude::*;
use serde::Deserialize;

use crate::auto::llama_family_decoder;
use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::llama::{Decoder, LlamaModel};
use crate::rope::Rope;

/// The fields of `config.json` the classification head reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClassificationConfig {
    /// The padding id; without one, a batch must be a single sequence.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Label names by index: their count is the number of labels.
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Set when `id2label` is not (transformers' default: 2).
    #[serde(default)]
    pub num_labels: Option<usize>,
}

impl ClassificationConfig {
    /// How many classes the head scores.
    pub fn num_labels(&self) -> usize {
        self.id2label
            .as_ref()
            .map(BTreeMap::len)
            .or(self.num_labels)
            .unwrap_or(2)
    }
}

/// transformers' `LlamaForSequenceClassification`: class logits
/// `[batch, num_labels]` for token ids `[batch, t]`.
#[derive(Adaptable)]
pub struct LlamaForSequenceClassification {
    model: LlamaModel,
    score: Linear,
    #[adapt(skip)]
    rope: Rope,
    pad_token_id: Option<u32>,
}

impl LlamaForSequenceClassification {
    /// Loads the decoder and the `score` head (`[num_labels, hidden]`) from
    /// transformers' checkpoint names.
    pub fn load(vb: VarBuilder, decoder: &Decoder, head: &ClassificationConfig) -> Result<Self> {
        Ok(Self {
            model: LlamaModel::load(vb.pp("model"), decoder)?,
            score: linear_no_bias(decoder.hidden_size, head.num_labels(), vb.pp("score"))?,
            rope: decoder.rope,
            pad_token_id: head.pad_token_id,
        })
    }

    /// Loads a checkpoint folder of the Llama family (`llama`, `mistral`,
    /// `phi3`, `qwen2`, `qwen3`) saved from a `...ForSequenceClassification`.
    pub fn from_dir(dir: impl AsRef<std::path::Path>, dtype: DType, device: &Device) -> crate::Result<Self> {
        load_classifier(dir.as_ref(), dtype, device, Self::load)
    }

    /// Class logits `[batch, num_labels]` for token ids `[batch, t]`, taken
    /// at each row's last position that is not padding.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.model.hidden_states(&self.rope, input_ids, None)?;
        let positions = last_non_pad_positions(input_ids, self.pad_token_id)?;
        // Pool first: the head then runs on one position per row.
        let pooled = hidden_at(&hidden, &positions)?;
        self.score.forward(&pooled)
    }

    /// The number of labels the head scores.
    pub fn num_labels(&self) -> usize {
        self.score.out_features()
    }
}

/// transformers' `LlamaForTokenClassification` (its `GenericForTokenClassification`,
/// also on Mistral, Qwen2, Qwen3 and Phi-3): label logits
/// `[batch, t, num_labels]`, the `score` head (with a bias) on every
/// position. A PEFT adapter for it is made with `task_type="TOKEN_CLS"`,
/// which keeps `score` whole as for sequence classification. The head's
/// dropout is not applied: this forward pass is inference's.
#[derive(Adaptable)]
pub struct LlamaForTokenClassification {
    model: LlamaModel,
    score: Linear,
    #[adapt(skip)]
    rope: Rope,
}

impl LlamaForTokenClassification {
    /// Loads the decoder and the `score` head (`[num_labels, hidden]` and
    /// its bias) from transformers' checkpoint names.
    pub fn load(vb: VarBuilder, decoder: &Decoder, head: &ClassificationConfig) -> Result<Self> {
        Ok(Self {
            model: LlamaModel::load(vb.pp("model"), decoder)?,
            score: linear(decoder.hidden_size, head.num_labels(), vb.pp("score"))?,
            rope: decoder.rope,
        })
    }

    /// Loads a checkpoint folder of the Llama family (`llama`, `mistral`,
    /// `phi3`, `qwen2`, `qwen3`) saved from a `...ForTokenClassification`.
    pub fn from_dir(dir: impl AsRef<std::path::Path>, dtype: DType, device: &Device) -> crate::Result<Self> {
        load_classifier(dir.as_ref(), dtype, device, Self::load)
    }

    /// Label logits `[batch, t, num_labels]` for token ids `[batch, t]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.score
            .forward(&self.model.hidden_states(&self.rope, input_ids, None)?)
    }

    /// The number of labels the head scores.
    pub fn num_labels(&self) -> usize {
        self.score.out_features()
    }
}

/// Opens a checkpoint folder of the Llama family and loads a classifier of
/// it with `load` (the decoder's and the head's config read from `config.json`).
fn load_classifier<T>(
    dir: &std::path::Path,
    dtype: DType,
    device: &Device,
    load: impl FnOnce(VarBuilder, &Decoder, &ClassificationConfig) -> Result<T>,
) -> crate::Result<T> {
    let checkpoint = Checkpoint::open(dir)?;
    let Some(decoder) = llama_family_decoder(&checkpoint)? else {
        return Err(ModelError::UnknownModelType {
            path: checkpoint.dir().join(crate::checkpoint::CONFIG_FILE),
            found: checkpoint.model_type().to_owned(),
            supported: "llama, mistral, phi3, qwen2, qwen3".to_owned(),
        });
    };
    let head: ClassificationConfig = checkpoint.config()?;
    let vb = checkpoint.var_builder(dtype, device)?;
    load(vb, &decoder, &head).map_err(|cause| ModelError::Load {
        path: checkpoint.dir().to_path_buf(),
        cause,
    })
}

/// Each row's rightmost position whose id is not `pad` (0 when all are), as
/// transformers' `(arange(t) * (ids != pad)).argmax(-1)`; the last position
/// without a padding id, which transformers allows for one row only.
pub fn last_non_pad_positions(input_ids: &Tensor, pad: Option<u32>) -> Result<Vec<usize>> {
    let (batch, t) = input_ids.dims2()?;
    let Some(pad) = pad else {
        if batch != 1 {
            candle_core::bail!("the config has no pad_token_id, so a batch must hold one sequence (found {batch})");
        }
        return Ok(vec![t.saturating_sub(1)]);
    };
    let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    Ok(ids
        .iter()
        .map(|row| row.iter().rposition(|&id| id != i64::from(pad)).unwrap_or(0))
        .collect())
}

/// `hidden[b, positions[b], :]` for every row: `[batch, hidden]`.
fn hidden_at(hidden: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let rows = positions
        .iter()
        .enumerate()
        .map(|(b, &p)| hidden.get(b)?.get(p))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}
