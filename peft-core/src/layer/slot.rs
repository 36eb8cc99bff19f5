//! [`Layer`]: the adapter slot. It holds a frozen base (dense, quantized,
//! an embedding table or a convolution: a linear map to adapters) and
//! adapters by name, runs them in the forward pass and merges them. It
//! knows the [`Adapter`] contract and nothing of any kind.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use peft_core::Layer;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! // weight [out = 2, in = 3], bias [2]: y = x Wᵀ + b
//! let weight = Tensor::new(&[[1f32, 0., 2.], [0., 1., -1.]], &device)?;
//! let bias = Tensor::new(&[0.5f32, -0.5], &device)?;
//! let layer = Layer::new(weight, Some(bias));
//! let x = Tensor::new(&[[1f32, 2., 3.]], &device)?;
//! assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[7.5, -1.5]]);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, Var};

use crate::error::{PeftError, Result};
use crate::layer::adapter::{Adapter, Composition, ForwardContext};
use crate::layer::base::{Base, LayerKind, LayerWeights, TrainableBase};
use crate::layer::conv::{ConvGeometry, ConvLayer};
use crate::layer::merge::WeightBound;
use crate::layer::quantized::QuantizedWeight;

/// The adapter slot: a frozen base seen as a linear map `y = x Wᵀ + b`
/// (weight `[out, in]`) and the adapters attached to it.
///
/// A field of type [`Linear`](crate::Linear) is a `Layer` over a dense (or
/// quantized) weight; [`Embedding`](crate::Embedding),
/// [`Conv1d`](crate::Conv1d) and [`Conv2d`](crate::Conv2d) each hold one.
/// Visitors and [`PeftModel::layers`](crate::PeftModel::layers) hand it out.
/// With no adapter, its forward pass is exactly its base's. Adapters
/// are held by name; attaching the first one detaches the base weights from
/// any autograd graph, so the base never receives a gradient.
#[derive(Debug, Clone)]
pub struct Layer {
    pub(super) base: Base,
    pub(super) adapters: Vec<AttachedAdapter>,
    pub(super) adapters_enabled: bool,
    pub(super) training: bool,
    /// The checkpoint stored this weight `[in, out]` (GPT-2's `Conv1D`).
    pub(super) fan_in_fan_out: bool,
    /// A mixed batch: the adapter of each row (see `batch.rs`).
    pub(super) batch_adapters: Option<Arc<[String]>>,
    /// The base bias, trained beside the adapters (PEFT's `bias = "all" |
    /// "lora_only"`); the base computes with this variable's tensor.
    pub(super) trainable_bias: Option<Var>,
    /// What the last merge or unmerge knew of the base weight's largest
    /// value (see `merge.rs`), so the next one need not read the weight.
    pub(super) weight_bound: Option<WeightBound>,
}

/// A rebuilt base, checked, waiting to replace a layer's (see
/// [`Layer::prepare_base`]).
pub(crate) struct PreparedBase(Base);

/// PEFT's `adapter_config.json` fields of the config an adapter was made
/// from, shared by every layer that adapter sits on.
pub(crate) type SavedConfig = Arc<serde_json::Map<String, serde_json::Value>>;

#[derive(Debug, Clone)]
pub(super) struct AttachedAdapter {
    pub(super) name: String,
    pub(super) adapter: Box<dyn Adapter>,
    pub(super) active: bool,
    pub(super) merged: bool,
    pub(super) config: Option<SavedConfig>,
}

impl Layer {
    /// A dense slot: `weight` `[out, in]`, an optional `bias` `[out]`.
    pub(crate) fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_base(Base::Dense(candle_nn::Linear::new(weight, bias)))
    }

    /// A slot whose weight `[out, in]` stays quantized (QLoRA).
    pub(crate) fn quantized(weight: QuantizedWeight, bias: Option<Tensor>) -> Self {
        Self::with_base(Base::Quantized { weight, bias })
    }

    /// An embedding slot's layer: `table` `[vocab, dim]` looked up by token
    /// ids. Adapters see it as a linear map `dim x vocab` on one-hot inputs.
    pub(crate) fn lookup(table: Tensor) -> CandleResult<Self> {
        Ok(Self::with_base(Base::lookup(table)?))
    }

    /// A convolution slot's layer.
    pub(crate) fn conv(conv: ConvLayer) -> CandleResult<Self> {
        Ok(Self::with_base(Base::conv(conv)?))
    }

    fn with_base(base: Base) -> Self {
        Self {
            base,
            adapters: Vec::new(),
            adapters_enabled: true,
            training: false,
            fan_in_fan_out: false,
            batch_adapters: None,
            trainable_bias: None,
            weight_bound: None,
        }
    }

    /// Records that the checkpoint stored this weight `[in, out]`.
    pub(crate) fn set_fan_in_fan_out(&mut self) {
        self.fan_in_fan_out = true;
    }

    /// Whether the checkpoint stored this weight `[in, out]` (GPT-2's
    /// `Conv1D`, PEFT's `fan_in_fan_out`).
    pub fn is_fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    /// What kind of layer this is, for targeting.
    pub fn kind(&self) -> LayerKind {
        self.base.kind()
    }

    /// The convolution of a convolution slot.
    pub(crate) fn conv_layer(&self) -> Option<&ConvLayer> {
        self.base.conv_layer()
    }

    /// Stride, padding and dilation of a convolution slot.
    pub fn conv_geometry(&self) -> Option<ConvGeometry> {
        self.base.conv_geometry()
    }

    /// The tensors the base holds, for counting parameters (tied tensors
    /// count once); a quantized weight has none.
    pub(crate) fn base_tensors(&self) -> Vec<&Tensor> {
        self.base.tensors()
    }

    /// Quantizes a dense base to `dtype` (QLoRA on a checkpoint loaded in
    /// f32/f16/bf16): from then on the forward pass multiplies by the
    /// quantized weight, as a layer made by
    /// [`Linear::from_qtensor`](crate::Linear::from_qtensor). Refused with
    /// adapters attached, for a base that is not dense, and for an input
    /// width that is not a multiple of the format's block (32 for Q8_0 and
    /// Q4_0, 256 for the K formats).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        let refuse = |reason: String| Err(PeftError::Candle(candle_core::Error::Msg(reason)));
        if !self.adapters.is_empty() {
            return refuse(format!("{}: quantize before attaching adapters", self.describe()));
        }
        let Some((weight, bias)) = self.base.dense() else {
            return refuse(format!("{}: only a dense base can be quantized", self.describe()));
        };
        let block = dtype.block_size();
        if !self.in_features().is_multiple_of(block) {
            return refuse(format!(
                "{}: {dtype:?} quantizes blocks of {block} inputs, and this layer has {}",
                self.describe(),
                self.in_features()
            ));
        }
        let qtensor = candle_core::quantized::QTensor::quantize(&weight.to_dtype(DType::F32)?, dtype)?;
        let bias = bias.map(|b| b.to_dtype(DType::F32).map(|b| b.detach())).transpose()?;
        self.trainable_bias = None;
        self.base = Base::Quantized {
            weight: QuantizedWeight::new(qtensor)?,
            bias,
        };
        Ok(())
    }

    /// Whether the base weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized_weight().is_some()
    }

    /// The quantized base weight, if it is one.
    pub fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        self.base.quantized_weight()
    }

    /// The base weight `[out, in]` (with merged adapters folded in). For a
    /// quantized layer this is the dequantized weight, made on first call and
    /// kept, which costs the f32 memory quantization saves: prefer
    /// [`in_features`](Self::in_features), [`dtype`](Self::dtype) and
    /// [`device`](Self::device) for what they tell. Fails only for a
    /// quantized layer that candle cannot dequantize on its device.
    pub fn weight(&self) -> CandleResult<&Tensor> {
        self.base.weight()
    }

    /// The embedding table `[vocab, dim]` of an embedding slot, with merged
    /// adapters folded in.
    pub(crate) fn lookup_table(&self) -> Option<&Tensor> {
        self.base.lookup_table()
    }

    /// The base bias `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }

    /// Input features (`in`).
    pub fn in_features(&self) -> usize {
        self.base.dims().1
    }

    /// Output features (`out`).
    pub fn out_features(&self) -> usize {
        self.base.dims().0
    }

    /// The dtype of the layer's activations, and of new adapters: the weight's
    /// for a dense layer, f32 for a quantized one.
    pub fn dtype(&self) -> DType {
        self.base.dtype()
    }

    /// The device the weight lives on.
    pub fn device(&self) -> Device {
        self.base.device()
    }

    /// The base weights as one value (dense; see [`weight`](Self::weight)).
    pub fn base_weights(&self) -> CandleResult<LayerWeights> {
        Ok(LayerWeights {
            weight: self.base.weight()?.clone(),
            bias: self.base.bias().cloned(),
        })
    }

    /// Forward pass with an explicit training flag (dropout in adapters is
    /// active only when `train` is true); [`Module::forward`] uses the flag set
    /// by [`set_training`](Self::set_training).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> CandleResult<Tensor> {
        if !self.adapters_enabled || self.adapters.is_empty() {
            // Disabling unmerges first, so the base is the plain base here.
            return self.base.forward(x);
        }
        if let Some(rows) = &self.batch_adapters {
            return self.forward_mixed(x, train, rows);
        }
        self.forward_with(x, train, |_, a| a.active && !a.merged)
    }

    /// The forward pass with the adapters `applied` selects (by index and
    /// state): the active unmerged ones, or one adapter for a mixed batch.
    pub(super) fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        applied: impl Fn(usize, &AttachedAdapter) -> bool,
    ) -> CandleResult<Tensor> {
        let cx = ForwardContext {
            base: &self.base,
            training: train,
        };
        let applied = || {
            self.adapters
                .iter()
                .enumerate()
                .filter(|(i, a)| applied(*i, a))
                .map(|(_, a)| a)
        };
        // A whole copy of the layer computes the output instead of the base;
        // it shares the layer with copies only, and the first active one
        // computes, as PEFT's `ModulesToSaveWrapper` uses its first active adapter.
        if let Some(copy) = applied().find(|a| a.adapter.composition() == Composition::ReplacesBase) {
            return copy.adapter.forward_with_base(x, cx)?.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "adapter `{}` replaces the base but computes no output (`forward_with_base` gave None)",
                    copy.name
                ))
            });
        }
        let mut base_input = std::borrow::Cow::Borrowed(x);
        let transforming = applied().filter(|a| a.adapter.composition() == Composition::TransformsInput);
        for attached in transforming {
            if let Some(transformed) = attached.adapter.transform_input(&base_input, cx)? {
                base_input = std::borrow::Cow::Owned(transformed);
            }
        }
        let mut adapters = applied().peekable();
        let fused = match (&base_input, adapters.peek()) {
            (std::borrow::Cow::Borrowed(_), Some(first)) => first.adapter.forward_with_base(x, cx)?,
            _ => None,
        };
        let mut y = match fused {
            Some(y) => {
                adapters.next();
                y
            }
            None => self.base.forward(&base_input)?,
        };
        for attached in adapters {
            y = attached.adapter.forward(x, y, cx)?;
        }
        Ok(y)
    }

    /// Sets the training flag used by [`Module::forward`].
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether [`Module::forward`] runs in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    // ---- adapters ------------------------------------------------------------

    /// Names of the attached adapters, in the order they were added.
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        self.adapters.iter().map(|a| a.name.as_str())
    }

    /// Whether an adapter of this name is attached.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// The adapter of this name.
    pub fn adapter(&self, name: &str) -> Option<&dyn Adapter> {
        self.position(name).map(|i| &*self.adapters[i].adapter)
    }

    /// Whether the adapter of this name is active (applied in forward/merge).
    pub fn is_active(&self, name: &str) -> bool {
        self.position(name).is_some_and(|i| self.adapters[i].active)
    }

    /// Whether any adapter is merged into the base weight.
    pub fn is_merged(&self) -> bool {
        self.adapters.iter().any(|a| a.merged)
    }

    /// Names of the adapters merged into the base weight, in the order they
    /// were added.
    pub fn merged_adapter_names(&self) -> impl Iterator<Item = &str> {
        self.adapters.iter().filter(|a| a.merged).map(|a| a.name.as_str())
    }

    /// Whether adapters take part in the forward pass.
    pub fn adapters_enabled(&self) -> bool {
        self.adapters_enabled
    }

    /// Attaches `adapter` under `name`, active. The base weights are detached
    /// from autograd so that only adapters train.
    pub fn add_adapter(&mut self, name: &str, adapter: Box<dyn Adapter>) -> Result<()> {
        self.check_attach(name, &*adapter)?;
        self.insert_adapter(name, adapter, None);
        Ok(())
    }

    /// Refuses to attach `adapter` under `name` when the name is taken, or
    /// when the merged and unmerged outputs would no longer agree: an adapter
    /// that reads the base weight (DoRA) after one that changes the output in
    /// any other way than adding to it or reading the base weight itself
    /// (IA³ on a non-feed-forward layer scales it), or any adapter but an
    /// additive one on a layer with merged adapters. PEFT cannot put these together at all
    /// (its mixed models take LoRA, LoHa and LoKr only).
    pub(crate) fn check_attach(&self, name: &str, adapter: &dyn Adapter) -> Result<()> {
        if self.has_adapter(name) {
            return Err(PeftError::AdapterExists {
                module: self.describe(),
                adapter: name.to_owned(),
            });
        }
        let incompatible = |reason| PeftError::IncompatibleAdapter {
            module: self.describe(),
            adapter: name.to_owned(),
            reason,
        };
        if adapter.composition() == Composition::ReadsBaseWeight {
            if let Some(scaling) = self
                .adapters
                .iter()
                .find(|a| a.adapter.composition() == Composition::ScalesOutput)
            {
                return Err(incompatible(format!(
                    "its change depends on the base weight and cannot follow `{}` ({}), which scales the output",
                    scaling.name,
                    scaling.adapter.peft_type()
                )));
            }
        }
        // A whole copy (modules_to_save) and replaced rows (trainable tokens)
        // each make the base's output meaningless where they act: they share
        // a layer only with adapters of their own composition.
        let exclusive = |c| matches!(c, Composition::ReplacesBase | Composition::ReplacesRows);
        let composition = adapter.composition();
        if let Some(other) = self.adapters.iter().find(|a| {
            let theirs = a.adapter.composition();
            (exclusive(theirs) || exclusive(composition)) && theirs != composition
        }) {
            let what = if exclusive(composition) {
                composition
            } else {
                other.adapter.composition()
            };
            let reason = if what == Composition::ReplacesBase {
                "a whole copy of a layer (modules_to_save) cannot share it with another kind of adapter"
            } else {
                "trainable tokens (rows of the weight replaced) cannot share a layer with another kind of adapter"
            };
            return Err(incompatible(format!(
                "{reason} (`{}` is {}); leave this module out of the targets, of modules_to_save \
                 or of the trainable tokens",
                other.name,
                other.adapter.peft_type()
            )));
        }
        if adapter.composition() != Composition::Additive && self.is_merged() {
            return Err(incompatible(
                "only additive adapters (`Composition::Additive`) can join a layer with merged adapters; unmerge first"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Infallible part of [`add_adapter`](Self::add_adapter), for callers that
    /// checked the name already.
    pub(crate) fn insert_adapter(&mut self, name: &str, adapter: Box<dyn Adapter>, config: Option<SavedConfig>) {
        if self.adapters.is_empty() {
            self.base = self.base.detached();
            self.reinstall_trainable_bias();
        }
        self.adapters.push(AttachedAdapter {
            name: name.to_owned(),
            adapter,
            active: true,
            merged: false,
            config,
        });
    }

    /// A base holding `weights` in place of this layer's, for an adapter
    /// whose initialisation rewrites them; put in place by
    /// [`replace_base`](Self::replace_base), which cannot fail. Refused:
    /// weights of other shapes than the base's, and a quantized base.
    pub(crate) fn prepare_base(&self, weights: LayerWeights) -> Result<PreparedBase> {
        let current = self.base_weights()?;
        let bias_dims = |b: &Option<Tensor>| b.as_ref().map(|b| b.dims().to_vec());
        if self.is_quantized()
            || weights.weight.dims() != current.weight.dims()
            || bias_dims(&weights.bias) != bias_dims(&current.bias)
        {
            return Err(PeftError::ShapeMismatch {
                key: format!("{}: rewritten base weight", self.describe()),
                expected: current.weight.dims().to_vec(),
                found: weights.weight.dims().to_vec(),
            });
        }
        Ok(PreparedBase(self.base.rebuilt(weights)?))
    }

    /// Puts a base made by [`prepare_base`](Self::prepare_base) in place.
    pub(crate) fn replace_base(&mut self, base: PreparedBase) {
        self.base = base.0;
        // The rewrite keeps the bias (only the weight moves): a bias being
        // trained stays the variable.
        self.reinstall_trainable_bias();
    }

    /// Whether this layer's weight is the embedding table of `embedding`
    /// (an output head tied to the input embedding): the same storage seen
    /// through the same layout. Storage rather than tensor identity, since
    /// attaching the first adapter detaches the base into a new tensor over
    /// the same storage.
    pub(crate) fn shares_table_with(&self, embedding: &Layer) -> bool {
        let (Some(table), Some((weight, _))) = (embedding.lookup_table(), self.base.dense()) else {
            return false;
        };
        let key = |t: &Tensor| {
            let (storage, layout) = t.storage_and_layout();
            let address = std::ptr::from_ref(&*storage).addr();
            (
                address,
                layout.shape().clone(),
                layout.stride().to_vec(),
                layout.start_offset(),
            )
        };
        key(table) == key(weight)
    }

    /// A trainable copy of the base (new variables holding copies of its
    /// tensors, keyed `weight` and `bias`) and a base computing with them;
    /// `None` for a quantized base.
    pub(crate) fn trainable_base_copy(&self) -> CandleResult<Option<TrainableBase>> {
        self.base.trainable_copy()
    }

    /// The saved-config fields of the adapter `name`, if it was added from a config.
    pub(crate) fn adapter_config(&self, name: &str) -> Option<&SavedConfig> {
        self.position(name).and_then(|i| self.adapters[i].config.as_ref())
    }

    /// Detaches and returns the adapter `name`; refused while it is merged.
    pub fn remove_adapter(&mut self, name: &str) -> Result<Option<Box<dyn Adapter>>> {
        let Some(index) = self.position(name) else {
            return Ok(None);
        };
        if self.adapters[index].merged {
            return Err(PeftError::MergeState {
                module: self.describe(),
                reason: "cannot delete an adapter while it is merged; unmerge first",
            });
        }
        Ok(Some(self.adapters.remove(index).adapter))
    }

    /// Activates exactly the adapters named in `names` (others stay attached
    /// but are skipped by the forward pass and by [`merge`](Self::merge)).
    /// Returns how many of `names` this layer holds. A merged adapter stays in
    /// the weights whatever its activity: unmerge first to drop it.
    pub fn set_active_adapters(&mut self, names: &[&str]) -> usize {
        let mut found = 0;
        for attached in &mut self.adapters {
            attached.active = names.contains(&attached.name.as_str());
            found += usize::from(attached.active);
        }
        found
    }

    /// Trainable tensors of the active adapters, keyed like PEFT's state dict
    /// relative to this module (`lora_A.<adapter>.weight`).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = self
            .trainable_bias
            .iter()
            .map(|var| (self.bias_key().to_owned(), var.clone()))
            .collect();
        for attached in self.adapters.iter().filter(|a| a.active) {
            for (key, var) in attached.adapter.trainable_vars() {
                vars.push((attached.adapter.state_dict_key(key, &attached.name), var));
            }
        }
        vars
    }

    /// Number of elements in the base weight and bias.
    pub fn num_base_parameters(&self) -> usize {
        self.in_features() * self.out_features() + self.bias().map_or(0, Tensor::elem_count)
    }

    /// Number of elements in all attached adapters' trainable tensors, and in
    /// the active ones.
    /// A tensor shared by adapters of several layers (tied weights) counts
    /// once: `seen` holds the ids counted so far.
    pub(crate) fn num_adapter_parameters(
        &self,
        seen: &mut std::collections::HashSet<candle_core::TensorId>,
    ) -> (usize, usize) {
        let mut all = 0;
        let mut active = 0;
        for attached in &self.adapters {
            let count: usize = attached
                .adapter
                .trainable_vars()
                .iter()
                .filter(|(_, var)| seen.insert(var.as_tensor().id()))
                .map(|(_, var)| var.elem_count())
                .sum();
            all += count;
            if attached.active {
                active += count;
            }
        }
        (all, active)
    }

    /// How a layer that does not know its path names itself in errors.
    pub(super) fn describe(&self) -> String {
        format!("Linear({} -> {})", self.in_features(), self.out_features())
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a.name == name)
    }
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.forward_t(x, self.training)
    }
}
