//! LoRA: `y = base(x) + s · B(A(dropout(x)))`, as PEFT's `lora.Linear`.
//!
//! `A` is `[r, in]`, `B` is `[out, r]` and `s = lora_alpha / r`
//! (`lora_alpha / √r` with rsLoRA). With [`LoraConfig::dora`] (PEFT's
//! `use_dora`) each layer gets a [`DoraAdapter`]
//! instead, which adds a learned magnitude per output.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor, Var};
//! use peft_core::{LoraAdapter, Linear};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let mut layer = Linear::new(Tensor::eye(2, DType::F32, &dev)?, None);
//! // r = 1: A = [[1, 1]], B = [[1], [0]], scale 0.5
//! let a = Var::from_tensor(&Tensor::new(&[[1f32, 1.]], &dev)?)?;
//! let b = Var::from_tensor(&Tensor::new(&[[1f32], [0.]], &dev)?)?;
//! layer.add_adapter("default", Box::new(LoraAdapter::new(a, b, 0.5, 0.0)?))?;
//! let y = layer.forward(&Tensor::new(&[[2f32, 4.]], &dev)?)?;
//! // x + 0.5 · B A x = [2, 4] + 0.5 · [6, 0]
//! assert_eq!(y.to_vec2::<f32>()?, [[5.0, 4.0]]);
//! # Ok(())
//! # }
//! ```
//!
//! This folder: the config and its file (`mod.rs`, `file.rs`), the adapter
//! of each layer kind (`linear.rs`, `embedding.rs`, `conv.rs`) and DoRA
//! (`dora.rs`). All of them are PEFT's `peft_type: "LORA"`.

mod conv;
mod dora;
mod embedding;
mod file;
mod linear;

pub use conv::LoraConvAdapter;
pub use dora::DoraAdapter;
pub use embedding::LoraEmbeddingAdapter;
pub use linear::LoraAdapter;

use candle_core::{DType, Device, Result as CandleResult, Var};
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::{
    config_basics, config_identity, invalid_config, not_implemented, setters, AdapterConfig, RankSettings, WithRank,
};
use crate::kinds::config_file::{float, saved_fields, PeftMetadata};
use crate::kinds::registry::kind;
use crate::layer::{Adapter, Layer, LayerKind};
use crate::targets::{Targets, TokenIndices};

/// PEFT's `peft_type` for LoRA, DoRA and LoRA on embeddings and convolutions.
pub const PEFT_TYPE: &str = "LORA";

/// How LoRA's `A` and `B` start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LoraInit {
    /// PEFT's `True`: `A` Kaiming-uniform (a = √5, i.e. U(±1/√in)), `B` zeros,
    /// so a fresh adapter leaves the output unchanged.
    #[default]
    Default,
    /// PEFT's `"gaussian"`: `A` ~ N(0, (1/r)²), `B` zeros.
    Gaussian,
    /// PEFT's `False`: `A` and `B` both U(±1/√fan_in), so a fresh adapter
    /// changes the output. For tests only.
    Random,
}

/// LoRA's hyper-parameters and targets, with PEFT's field names and defaults.
///
/// ```
/// use peft_core::prelude::*;
/// let config = LoraConfig::from(all_linear()).rank(16).alpha(32.0).dropout(0.05);
/// assert_eq!((config.ranks.r, config.ranks.alpha, config.scaling()), (16, 32.0, 2.0));
/// ```
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Which layers to adapt (PEFT's `target_modules`, `exclude_modules`,
    /// `layers_to_transform`, `layers_pattern`). Default: [`all_linear()`](crate::all_linear).
    pub target_modules: Targets,
    /// `r` (default 8), `lora_alpha` (default 8), `rank_pattern` and
    /// `alpha_pattern`; set them with [`WithRank`].
    pub ranks: RankSettings,
    /// Dropout on the adapter's input during training (default 0).
    pub lora_dropout: f32,
    /// Scale by `alpha / √r` instead of `alpha / r` (default false).
    pub use_rslora: bool,
    /// DoRA (default false): each adapted layer also learns a per-output
    /// magnitude vector; see [`DoraAdapter`].
    pub use_dora: bool,
    /// How `A` and `B` start.
    pub init_lora_weights: LoraInit,
    /// PEFT's `fan_in_fan_out`: the targeted layers came from checkpoints that
    /// store weights `[in, out]` (GPT-2's `Conv1D`). The slot always holds
    /// `[out, in]` (transposed at load, see
    /// [`Linear::from_fan_in_fan_out`](crate::Linear::from_fan_in_fan_out)),
    /// so this only records the layout for the saved config.
    pub fan_in_fan_out: bool,
    /// PEFT's descriptive fields (`task_type`, `base_model_name_or_path`,
    /// `revision`), saved as given; set them with [`WithMetadata`](crate::WithMetadata).
    pub metadata: PeftMetadata,
    /// PEFT's `trainable_token_indices` (default none): embedding rows
    /// that train beside the LoRA matrices, as a
    /// [`TrainableTokensAdapter`](crate::TrainableTokensAdapter) of this
    /// adapter (and of an output head tied to the embedding).
    pub trainable_token_indices: Option<TokenIndices>,
}

impl From<Targets> for LoraConfig {
    fn from(target_modules: Targets) -> Self {
        Self {
            target_modules,
            ranks: RankSettings::default(),
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: LoraInit::Default,
            fan_in_fan_out: false,
            metadata: PeftMetadata::default(),
            trainable_token_indices: None,
        }
    }
}

impl LoraConfig {
    setters! {
        /// Sets `lora_dropout`.
        dropout => lora_dropout: f32,
        /// Sets `use_rslora`.
        rslora => use_rslora: bool,
        /// Sets `use_dora`: DoRA instead of plain LoRA on every targeted layer.
        dora => use_dora: bool,
        /// Sets `init_lora_weights`.
        init => init_lora_weights: LoraInit,
        /// Sets `fan_in_fan_out`.
        fan_in_fan_out => fan_in_fan_out: bool,
    }

    /// Trains the rows `indices` of the model's input embedding (its one
    /// embedding layer) beside the LoRA matrices: PEFT's
    /// `trainable_token_indices=[...]`.
    pub fn trainable_tokens(mut self, indices: impl IntoIterator<Item = usize>) -> Self {
        self.trainable_token_indices = Some(TokenIndices::Embedding(indices.into_iter().collect()));
        self
    }

    /// Trains the rows `indices` of the module(s) named `module`: PEFT's
    /// `trainable_token_indices={module: [...]}` (repeat for more modules).
    pub fn trainable_tokens_in(mut self, module: &str, indices: impl IntoIterator<Item = usize>) -> Self {
        let entry = (module.to_owned(), indices.into_iter().collect());
        match &mut self.trainable_token_indices {
            Some(TokenIndices::Modules(modules)) => modules.push(entry),
            _ => self.trainable_token_indices = Some(TokenIndices::Modules(vec![entry])),
        }
        self
    }

    /// The factor `s` applied to `B(A(x))`, for the global `r` and `lora_alpha`.
    pub fn scaling(&self) -> f64 {
        scaling(self.ranks.alpha, self.ranks.r, self.use_rslora)
    }

    /// Fresh `A` `[r, in]` and `B` `[out, r]` for a layer, per `init_lora_weights`.
    fn init_vars(
        &self,
        r: usize,
        in_features: usize,
        out_features: usize,
        dtype: DType,
        device: &Device,
    ) -> CandleResult<(Var, Var)> {
        let uniform = |fan_in: usize, shape: (usize, usize)| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            crate::kernels::random::uniform_var(-bound, bound, shape, dtype, device)
        };
        let zeros = || Var::zeros((out_features, r), dtype, device);
        Ok(match self.init_lora_weights {
            LoraInit::Default => (uniform(in_features, (r, in_features))?, zeros()?),
            LoraInit::Gaussian => (
                crate::kernels::random::normal_var(0.0, 1.0 / r as f64, (r, in_features), dtype, device)?,
                zeros()?,
            ),
            LoraInit::Random => (uniform(in_features, (r, in_features))?, uniform(r, (out_features, r))?),
        })
    }
}

impl LoraConfig {
    /// LoRA on an embedding, initialised as PEFT's `lora.Embedding`: `A`
    /// `[r, vocab]` zeros and `B` `[dim, r]` N(0, 1) (both N(0, 1) for
    /// [`LoraInit::Random`]), so a fresh adapter changes nothing.
    fn embedding_adapter(&self, module: &str, layer: &Layer, r: usize, alpha: f64) -> Result<Box<dyn Adapter>> {
        if self.use_dora {
            return Err(not_implemented(format!(
                "DoRA is not implemented for embedding layers (module `{module}`)"
            )));
        }
        let (vocab, dim, dtype, device) = (layer.in_features(), layer.out_features(), layer.dtype(), layer.device());
        let a = match self.init_lora_weights {
            LoraInit::Random => crate::kernels::random::normal_var(0.0, 1.0, (r, vocab), dtype, &device)?,
            LoraInit::Default | LoraInit::Gaussian => Var::zeros((r, vocab), dtype, &device)?,
        };
        let b = crate::kernels::random::normal_var(0.0, 1.0, (dim, r), dtype, &device)?;
        Ok(Box::new(LoraEmbeddingAdapter::new(
            a,
            b,
            scaling(alpha, r, self.use_rslora),
        )?))
    }
}

impl LoraConfig {
    /// LoRA on a convolution, initialised as PEFT's `lora.Conv*d`: `A`
    /// `[r, in, k...]` Kaiming-uniform (U(±1/√(in·k))), `B` `[out, r, 1...]`
    /// zeros (both uniform for [`LoraInit::Random`], `A` ~ N(0, 1/r²) for
    /// [`LoraInit::Gaussian`]).
    fn conv_adapter(&self, module: &str, layer: &Layer, r: usize, alpha: f64) -> Result<Box<dyn Adapter>> {
        let (Some(conv), Some(geometry)) = (layer.conv_layer(), layer.conv_geometry()) else {
            return Err(not_implemented(format!("module `{module}` is not a convolution")));
        };
        let (kernel, groups) = (conv.kernel().dims().to_vec(), conv.groups());
        if self.use_dora {
            return Err(not_implemented(format!(
                "DoRA is not implemented for convolution layers (module `{module}`)"
            )));
        }
        if groups != 1 {
            return Err(not_implemented(format!(
                "LoRA is not implemented for grouped convolutions (module `{module}` has {groups} groups)"
            )));
        }
        let (dtype, device) = (layer.dtype(), layer.device());
        let mut a_shape = kernel.clone();
        a_shape[0] = r;
        let mut b_shape = vec![kernel[0], r];
        b_shape.extend(std::iter::repeat_n(1, kernel.len() - 2));
        let uniform = |fan_in: usize, shape: &[usize]| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            crate::kernels::random::uniform_var(-bound, bound, shape, dtype, &device)
        };
        let fan_in = kernel[1..].iter().product::<usize>();
        let (a, b) = match self.init_lora_weights {
            LoraInit::Default => (uniform(fan_in, &a_shape)?, Var::zeros(b_shape, dtype, &device)?),
            LoraInit::Gaussian => (
                crate::kernels::random::normal_var(0.0, 1.0 / r as f64, a_shape, dtype, &device)?,
                Var::zeros(b_shape, dtype, &device)?,
            ),
            LoraInit::Random => (uniform(fan_in, &a_shape)?, uniform(r, &b_shape)?),
        };
        let scale = scaling(alpha, r, self.use_rslora);
        Ok(Box::new(LoraConvAdapter::new(
            a,
            b,
            scale,
            self.lora_dropout,
            geometry,
        )?))
    }
}

/// `alpha / r`, or `alpha / √r` with rsLoRA.
fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

config_basics!(LoraConfig);
kind!(LoraConfig, PEFT_TYPE, file::LoraFields);

impl WithRank for LoraConfig {
    fn ranks(&self) -> &RankSettings {
        &self.ranks
    }
    fn ranks_mut(&mut self) -> &mut RankSettings {
        &mut self.ranks
    }
}

impl AdapterConfig for LoraConfig {
    config_identity!(PEFT_TYPE);

    fn check_layer(&self, module: &str, _: &Layer, file_values: Option<usize>) -> Result<()> {
        self.ranks.check_layer(module, file_values)
    }

    fn trainable_tokens(&self) -> Option<&TokenIndices> {
        self.trainable_token_indices.as_ref()
    }

    fn validate(&self) -> Result<()> {
        self.ranks.validate("lora_alpha")?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid_config("lora_dropout", self.lora_dropout, "must lie in [0, 1)"));
        }
        self.target_modules.validate()
    }

    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        let (r, alpha) = self.ranks.rank_and_alpha(module)?;
        match layer.kind() {
            LayerKind::Embedding => return self.embedding_adapter(module, layer, r, alpha),
            LayerKind::Conv => return self.conv_adapter(module, layer, r, alpha),
            _ => {}
        }
        let (a, b) = self.init_vars(
            r,
            layer.in_features(),
            layer.out_features(),
            layer.dtype(),
            &layer.device(),
        )?;
        let lora = LoraAdapter::new(a, b, scaling(alpha, r, self.use_rslora), self.lora_dropout)?;
        if self.use_dora {
            // The magnitude starts as the row norms of W + s·B·A, as PEFT's
            // `dora_init` (with B = 0, the norms of W), so m / n = 1 at first.
            Ok(Box::new(DoraAdapter::from_weight(lora, layer.weight()?)?))
        } else {
            Ok(Box::new(lora))
        }
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let init = match self.init_lora_weights {
            LoraInit::Default => Value::Bool(true),
            LoraInit::Random => Value::Bool(false),
            LoraInit::Gaussian => Value::from("gaussian"),
        };
        let mut fields = saved_fields(PEFT_TYPE, &self.target_modules, &self.metadata);
        fields.extend(self.ranks.peft_fields("lora_alpha"));
        let more = [
            ("lora_dropout", float(f64::from(self.lora_dropout))),
            ("use_rslora", Value::Bool(self.use_rslora)),
            ("use_dora", Value::Bool(self.use_dora)),
            ("fan_in_fan_out", Value::Bool(self.fan_in_fan_out)),
            ("bias", Value::from("none")),
            ("init_lora_weights", init),
            (
                "trainable_token_indices",
                self.trainable_token_indices
                    .as_ref()
                    .map_or(Value::Null, TokenIndices::to_peft_json),
            ),
        ];
        fields.extend(more.into_iter().map(|(k, v)| (k.to_owned(), v)));
        fields
    }
}
