//! [`Linear`]: the drop-in for `candle_nn::Linear` that can hold adapters.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use peft_core::Linear;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! // weight [out = 2, in = 3], bias [2]: y = x Wᵀ + b
//! let weight = Tensor::new(&[[1f32, 0., 2.], [0., 1., -1.]], &device)?;
//! let bias = Tensor::new(&[0.5f32, -0.5], &device)?;
//! let layer = Linear::new(weight, Some(bias));
//! let x = Tensor::new(&[[1f32, 2., 3.]], &device)?;
//! assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[7.5, -1.5]]);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Module, Result as CandleResult, Tensor, Var};

use crate::adaptable::LayerKind;
use crate::adapter::{ForwardContext, LinearAdapter, LinearWeights};
use crate::conv::ConvLayer;
use crate::error::{PeftError, Result};
use crate::quantized::QuantizedWeight;

/// A linear layer `y = x Wᵀ + b` (weight stored `[out, in]`) that adapters can
/// be attached to.
///
/// With no adapter, its forward pass is exactly `candle_nn::Linear`'s. Adapters
/// are held by name; attaching the first one detaches the base weights from
/// any autograd graph, so the base never receives a gradient.
#[derive(Debug, Clone)]
pub struct Linear {
    base: Base,
    adapters: Vec<AttachedAdapter>,
    adapters_enabled: bool,
    training: bool,
    /// The checkpoint stored this weight `[in, out]` (GPT-2's `Conv1D`).
    fan_in_fan_out: bool,
}

/// Why merging into a quantized base is refused.
const PARTIAL_MERGE: &str = "merging some adapters of this layer while other active ones stay unmerged is exact only \
     when all of them are additive (LoRA, LoHa, LoKr); merge every active adapter, or deactivate the others first";
const QUANTIZED_MERGE: &str = "cannot merge into a quantized base weight: requantizing the merged weight would \
     lose the adapter's precision; keep the adapter unmerged, or load the base in f32/f16 to merge";

/// The frozen base of a layer: dense (candle-nn's layer), quantized (QLoRA),
/// or an embedding table.
#[derive(Debug, Clone)]
pub(crate) enum Base {
    Dense(candle_nn::Linear),
    Quantized {
        weight: QuantizedWeight,
        bias: Option<Tensor>,
    },
    /// An embedding table `[vocab, dim]` looked up by token ids: a linear
    /// map on one-hot inputs, whose weight `[out = dim, in = vocab]` is the
    /// table's transpose (kept as a view, no copy).
    Lookup {
        table: candle_nn::Embedding,
        weight: Tensor,
    },
    /// A convolution: a linear map of each input patch, whose weight
    /// `[out, in·k...]` is the kernel flattened (a view, no copy).
    Conv {
        conv: ConvLayer,
        weight: Tensor,
    },
}

impl Base {
    fn lookup(table: Tensor) -> CandleResult<Base> {
        let dim = table.dim(1)?;
        let weight = table.t()?;
        Ok(Base::Lookup {
            table: candle_nn::Embedding::new(table, dim),
            weight,
        })
    }

    fn conv(conv: ConvLayer) -> CandleResult<Base> {
        let out = conv.kernel().dim(0)?;
        let weight = conv.kernel().reshape((out, ()))?;
        Ok(Base::Conv { conv, weight })
    }

    /// The same kind of base with new (dense) weights. Made while planning a
    /// merge, so that a failure leaves the layer as it was.
    ///
    /// The new weights are detached: a merged base is frozen like the one it
    /// replaces (PEFT merges under `no_grad`), so it keeps no graph back to
    /// the adapter weights alive and takes the fused kernels of [`crate::fused`].
    fn rebuilt(&self, weights: LinearWeights) -> CandleResult<Base> {
        let weights = LinearWeights {
            weight: weights.weight.detach(),
            bias: weights.bias.as_ref().map(Tensor::detach),
        };
        match self {
            Base::Conv { conv, .. } => {
                let kernel = weights.weight.reshape(conv.kernel().shape())?;
                Base::conv(conv.with(kernel, weights.bias))
            }
            // The weight is `[dim, vocab]`: the table is its transpose.
            Base::Lookup { .. } => Base::lookup(weights.weight.t()?.contiguous()?),
            _ => Ok(Base::Dense(candle_nn::Linear::new(weights.weight, weights.bias))),
        }
    }

    /// The same base, cut from the autograd graph.
    fn detached(&self) -> Base {
        match self {
            Base::Dense(linear) => Base::Dense(candle_nn::Linear::new(
                linear.weight().detach(),
                linear.bias().map(Tensor::detach),
            )),
            Base::Lookup { table, .. } => Base::lookup(table.embeddings().detach()).unwrap_or_else(|_| self.clone()),
            Base::Conv { conv, .. } => Base::conv(conv.with(conv.kernel().detach(), conv.bias().map(Tensor::detach)))
                .unwrap_or_else(|_| self.clone()),
            Base::Quantized { .. } => self.clone(),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        match self {
            Base::Dense(linear) => crate::fused::linear(x, linear.weight(), linear.bias()),
            Base::Lookup { table, .. } => table.forward(x),
            Base::Conv { conv, .. } => conv.forward(x),
            Base::Quantized { weight, bias } => {
                let y = weight.forward(x)?;
                match bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
        }
    }

    /// The dense weight; for a quantized base, dequantized once and kept
    /// (the only case that can fail: candle could not dequantize it).
    pub(crate) fn weight(&self) -> CandleResult<&Tensor> {
        match self {
            Base::Dense(linear) => Ok(linear.weight()),
            Base::Quantized { weight, .. } => weight.dequantized(),
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => Ok(weight),
        }
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        match self {
            Base::Dense(linear) => linear.bias(),
            Base::Quantized { bias, .. } => bias.as_ref(),
            Base::Lookup { .. } => None,
            Base::Conv { conv, .. } => conv.bias(),
        }
    }
}

/// PEFT's `adapter_config.json` fields of the config an adapter was made
/// from, shared by every layer that adapter sits on.
pub(crate) type SavedConfig = Arc<serde_json::Map<String, serde_json::Value>>;

#[derive(Debug, Clone)]
struct AttachedAdapter {
    name: String,
    adapter: Box<dyn LinearAdapter>,
    active: bool,
    merged: bool,
    config: Option<SavedConfig>,
}

/// A new base for the layer, and which adapters are merged into it.
pub(crate) struct MergePlan {
    base: Base,
    merged: Vec<bool>,
    /// Whether the new weights are all finite; a plan that is not is refused
    /// before any layer changes.
    pub(crate) finite: bool,
}

impl Linear {
    /// A layer with `weight` `[out, in]` and an optional `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        candle_nn::Linear::new(weight, bias).into()
    }

    /// A layer from a checkpoint that stores the weight `[in, out]`, as
    /// GPT-2's `Conv1D` does (PEFT's `fan_in_fan_out`). The weight is
    /// transposed once, here, so the forward pass and every adapter work as
    /// for any linear layer; the layer remembers the layout so that a saved
    /// adapter config says `fan_in_fan_out: true`, as PEFT's does.
    pub fn from_fan_in_fan_out(weight_in_out: Tensor, bias: Option<Tensor>) -> CandleResult<Self> {
        let mut layer = Self::new(weight_in_out.t()?.contiguous()?, bias);
        layer.fan_in_fan_out = true;
        Ok(layer)
    }

    /// Whether the checkpoint stored this weight `[in, out]`.
    pub fn is_fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    /// A layer whose weight `[out, in]` stays quantized (QLoRA): the forward
    /// pass multiplies by the quantized weight, adapters train on top, and
    /// gradients flow back through it to earlier layers. Merging into it is
    /// refused (see [`merge`](Self::merge)).
    pub fn from_qtensor(weight: impl Into<Arc<QTensor>>, bias: Option<Tensor>) -> CandleResult<Self> {
        let base = Base::Quantized {
            weight: QuantizedWeight::new(weight)?,
            bias,
        };
        Ok(Self::with_base(base))
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

    /// What kind of layer this is, for targeting.
    pub fn kind(&self) -> LayerKind {
        match self.base {
            Base::Lookup { .. } => LayerKind::Embedding,
            Base::Conv { .. } => LayerKind::Conv,
            _ => LayerKind::Linear,
        }
    }

    /// The kernel `[out, in, k...]` of a convolution slot.
    pub(crate) fn conv_kernel(&self) -> Option<Tensor> {
        match &self.base {
            Base::Conv { conv, .. } => Some(conv.kernel().clone()),
            _ => None,
        }
    }

    /// Stride, padding and dilation of a convolution slot.
    pub(crate) fn conv_geometry(&self) -> Option<crate::conv::ConvGeometry> {
        match &self.base {
            Base::Conv { conv, .. } => Some(conv.geometry()),
            _ => None,
        }
    }

    /// The kernel shape `[out, in, k...]` and groups of a convolution slot.
    pub(crate) fn conv_shape(&self) -> Option<(Vec<usize>, usize)> {
        match &self.base {
            Base::Conv { conv, .. } => Some((conv.kernel().dims().to_vec(), conv.groups())),
            _ => None,
        }
    }

    /// The tensors the base holds, for counting parameters (tied tensors
    /// count once); a quantized weight has none.
    pub(crate) fn base_tensors(&self) -> Vec<&Tensor> {
        match &self.base {
            Base::Dense(linear) => std::iter::once(linear.weight()).chain(linear.bias()).collect(),
            Base::Quantized { bias, .. } => bias.iter().collect(),
            Base::Lookup { table, .. } => vec![table.embeddings()],
            Base::Conv { conv, .. } => std::iter::once(conv.kernel()).chain(conv.bias()).collect(),
        }
    }

    /// Whether the base weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.base, Base::Quantized { .. })
    }

    /// The quantized base weight, if it is one.
    pub fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        match &self.base {
            Base::Quantized { weight, .. } => Some(weight),
            _ => None,
        }
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

    /// The embedding table `[vocab, dim]` of a layer made by
    /// [`Embedding`](crate::Embedding), with merged adapters folded in.
    pub(crate) fn lookup_table(&self) -> Option<&Tensor> {
        match &self.base {
            Base::Lookup { table, .. } => Some(table.embeddings()),
            _ => None,
        }
    }

    /// The base bias `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }

    /// `[out, in]`.
    fn dims(&self) -> (usize, usize) {
        let dims = match &self.base {
            Base::Dense(linear) => linear.weight().dims(),
            Base::Quantized { weight, .. } => weight.shape().dims(),
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => weight.dims(),
        };
        (dims.first().copied().unwrap_or(0), dims.get(1).copied().unwrap_or(0))
    }

    /// Input features (`in`).
    pub fn in_features(&self) -> usize {
        self.dims().1
    }

    /// Output features (`out`).
    pub fn out_features(&self) -> usize {
        self.dims().0
    }

    /// The dtype of the layer's activations, and of new adapters: the weight's
    /// for a dense layer, f32 for a quantized one.
    pub fn dtype(&self) -> candle_core::DType {
        match &self.base {
            Base::Dense(linear) => linear.weight().dtype(),
            Base::Quantized { .. } => candle_core::DType::F32,
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => weight.dtype(),
        }
    }

    /// The device the weight lives on.
    pub fn device(&self) -> candle_core::Device {
        match &self.base {
            Base::Dense(linear) => linear.weight().device().clone(),
            Base::Quantized { weight, .. } => weight.qtensor().device(),
            Base::Lookup { weight, .. } | Base::Conv { weight, .. } => weight.device().clone(),
        }
    }

    /// The base weights as one value (dense; see [`weight`](Self::weight)).
    pub fn base_weights(&self) -> CandleResult<LinearWeights> {
        Ok(LinearWeights {
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
        let cx = ForwardContext {
            base: &self.base,
            training: train,
        };
        let applied = || self.adapters.iter().filter(|a| a.active && !a.merged);
        let mut base_input = std::borrow::Cow::Borrowed(x);
        for attached in applied() {
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
    pub fn adapter(&self, name: &str) -> Option<&dyn LinearAdapter> {
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
    pub fn add_adapter(&mut self, name: &str, adapter: Box<dyn LinearAdapter>) -> Result<()> {
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
    pub(crate) fn check_attach(&self, name: &str, adapter: &dyn LinearAdapter) -> Result<()> {
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
        if adapter.reads_base_weight() {
            if let Some(scaling) = self
                .adapters
                .iter()
                .find(|a| !a.adapter.is_additive() && !a.adapter.transforms_input() && !a.adapter.reads_base_weight())
            {
                return Err(incompatible(format!(
                    "its change depends on the base weight and cannot follow `{}` ({}), which scales the output",
                    scaling.name,
                    scaling.adapter.peft_type()
                )));
            }
        }
        if !adapter.is_additive() && self.is_merged() {
            return Err(incompatible(
                "only additive adapters (LoRA, LoHa, LoKr) can join a layer with merged adapters; unmerge first"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Infallible part of [`add_adapter`](Self::add_adapter), for callers that
    /// checked the name already.
    pub(crate) fn insert_adapter(&mut self, name: &str, adapter: Box<dyn LinearAdapter>, config: Option<SavedConfig>) {
        if self.adapters.is_empty() {
            self.base = self.base.detached();
        }
        self.adapters.push(AttachedAdapter {
            name: name.to_owned(),
            adapter,
            active: true,
            merged: false,
            config,
        });
    }

    /// The saved-config fields of the adapter `name`, if it was added from a config.
    pub(crate) fn adapter_config(&self, name: &str) -> Option<&SavedConfig> {
        self.position(name).and_then(|i| self.adapters[i].config.as_ref())
    }

    /// Detaches and returns the adapter `name`; refused while it is merged.
    pub fn remove_adapter(&mut self, name: &str) -> Result<Option<Box<dyn LinearAdapter>>> {
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
        let mut vars = Vec::new();
        for attached in self.adapters.iter().filter(|a| a.active) {
            for (key, var) in attached.adapter.trainable_vars() {
                vars.push((insert_adapter_name(key, &attached.name), var));
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
    pub(crate) fn num_adapter_parameters(&self) -> (usize, usize) {
        let mut all = 0;
        let mut active = 0;
        for attached in &self.adapters {
            let count: usize = attached
                .adapter
                .trainable_vars()
                .iter()
                .map(|(_, var)| var.elem_count())
                .sum();
            all += count;
            if attached.active {
                active += count;
            }
        }
        (all, active)
    }

    // ---- merging -------------------------------------------------------------

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
            Some(plan) if !plan.finite => Err(PeftError::NonFiniteWeights {
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
        let exact = |a: &AttachedAdapter| a.adapter.is_additive() || (merged_after(a) && a.adapter.transforms_input());
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
    pub(crate) fn plan_merge(&self) -> CandleResult<Option<MergePlan>> {
        self.plan_merge_of(None)
    }

    /// Computes the weights with the adapters in `names` (all active ones
    /// when `None`) merged, without changing the layer.
    ///
    /// The weights are rebuilt from the unmerged base with every adapter that
    /// ends up merged, in [`merge_order`](Self::merge_order), so that merging
    /// one adapter after another gives what the forward pass computes.
    pub(crate) fn plan_merge_of(&self, names: Option<&[&str]>) -> CandleResult<Option<MergePlan>> {
        let chosen = |a: &AttachedAdapter| match names {
            None => a.active,
            Some(names) => names.contains(&a.name.as_str()),
        };
        if !self.has_pending_merge(names) {
            return Ok(None);
        }
        if self.is_quantized() {
            candle_core::bail!("{QUANTIZED_MERGE}");
        }
        let merged: Vec<bool> = self.adapters.iter().map(|a| a.merged || chosen(a)).collect();
        let unmerged = self.unmerged_weights()?;
        let mut weights = unmerged.clone();
        for i in self.merge_order(&merged) {
            weights = self.adapters[i].adapter.merge_onto(&weights, &unmerged)?;
        }
        Ok(Some(MergePlan {
            finite: weights.all_finite()?,
            base: self.base.rebuilt(weights)?,
            merged,
        }))
    }

    /// Computes the unmerged weights without changing the layer.
    pub(crate) fn plan_unmerge(&self) -> CandleResult<Option<MergePlan>> {
        if !self.is_merged() {
            return Ok(None);
        }
        let weights = self.unmerged_weights()?;
        Ok(Some(MergePlan {
            finite: weights.all_finite()?,
            base: self.base.rebuilt(weights)?,
            merged: vec![false; self.adapters.len()],
        }))
    }

    /// The base weights with every merged adapter taken out again, in the
    /// reverse of the order they were merged in.
    fn unmerged_weights(&self) -> CandleResult<LinearWeights> {
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
            .partition(|&i| self.adapters[i].adapter.transforms_input());
        first.extend(rest);
        first
    }

    /// Installs a plan made by `plan_merge`/`plan_unmerge` on this same layer.
    pub(crate) fn commit(&mut self, plan: MergePlan) {
        debug_assert_eq!(plan.merged.len(), self.adapters.len());
        self.base = plan.base;
        for (attached, merged) in self.adapters.iter_mut().zip(plan.merged) {
            attached.merged = merged;
        }
    }

    /// Installs a merge plan and drops every adapter: a plain layer remains.
    pub(crate) fn commit_and_unload(&mut self, plan: Option<MergePlan>) {
        if let Some(plan) = plan {
            self.base = plan.base;
        }
        self.adapters.clear();
        self.adapters_enabled = true;
    }

    /// How a layer that does not know its path names itself in errors.
    fn describe(&self) -> String {
        format!("Linear({} -> {})", self.in_features(), self.out_features())
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a.name == name)
    }
}

/// `lora_A.weight` + `default` -> `lora_A.default.weight`, PEFT's in-memory key.
fn insert_adapter_name(key: &str, adapter: &str) -> String {
    if key == crate::dora::MAGNITUDE_KEY {
        // PEFT keeps the magnitude in a ParameterDict of modules with a `weight`.
        return format!("{key}.{adapter}.weight");
    }
    match key.rsplit_once('.') {
        Some((head, tail)) => format!("{head}.{adapter}.{tail}"),
        None => format!("{key}.{adapter}"),
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(base: candle_nn::Linear) -> Self {
        Self::with_base(Base::Dense(base))
    }
}

impl Linear {
    fn with_base(base: Base) -> Self {
        Self {
            base,
            adapters: Vec::new(),
            adapters_enabled: true,
            training: false,
            fan_in_fan_out: false,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.forward_t(x, self.training)
    }
}

/// Creates or loads a linear layer with bias, as [`candle_nn::linear()`] does
/// (tensors `weight` `[out, in]` and `bias` `[out]`).
pub fn linear(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// Creates or loads a linear layer without bias, as [`candle_nn::linear_no_bias`] does.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
}

/// Loads a layer whose checkpoint stores the weight `[in, out]` (GPT-2's
/// `Conv1D`: tensors `weight` `[in, out]` and `bias` `[out]`); see
/// [`Linear::from_fan_in_fan_out`].
pub fn linear_fan_in_fan_out(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    let weight = vb.get((in_dim, out_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::from_fan_in_fan_out(weight, Some(bias))
}

/// [`linear`] or [`linear_no_bias`] depending on `bias`, as [`candle_nn::linear_b`] does.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: candle_nn::VarBuilder) -> CandleResult<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb).map(Linear::from)
}

#[cfg(test)]
mod tests {
    use super::insert_adapter_name;

    #[test]
    fn adapter_name_goes_before_the_last_segment() {
        assert_eq!(insert_adapter_name("lora_A.weight", "default"), "lora_A.default.weight");
        assert_eq!(insert_adapter_name("ia3_l", "x"), "ia3_l.x");
        assert_eq!(
            insert_adapter_name("lora_magnitude_vector", "default"),
            "lora_magnitude_vector.default.weight"
        );
    }
}
