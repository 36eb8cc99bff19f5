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
mod init;
mod linear;

pub use conv::LoraConvAdapter;
pub use dora::DoraAdapter;
pub use embedding::LoraEmbeddingAdapter;
pub use linear::LoraAdapter;

use candle_core::{DType, Device, Result as CandleResult, Var};
use serde_json::Value;

use crate::error::Result;
use crate::kinds::config::{
    config_basics, config_identity, invalid_config, not_implemented, setters, AdapterConfig, RankSettings, TrainedBias,
    WithRank,
};
use crate::kinds::config_file::{float, saved_fields, PeftMetadata};
use crate::kinds::registry::kind;
use crate::layer::{Adapter, Layer, LayerKind, LayerWeights};
use crate::targets::{Targets, TokenIndices};

/// PEFT's `peft_type` for LoRA, DoRA and LoRA on embeddings and convolutions.
pub const PEFT_TYPE: &str = "LORA";

/// PEFT's `bias` value for [`TrainedBias::AdaptedLayers`] on LoRA.
pub(crate) const LORA_ONLY: &str = "lora_only";

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
    /// PEFT's `"pissa"`: `A` and `B` from the `r` largest singular triplets
    /// of the base weight `W = V S Uh` (`A = diag(√(S_r/s)) Uh_r`,
    /// `B = V_r diag(√(S_r/s))`), and the base becomes `W - s·B·A`, so
    /// the output is unchanged. Linear layers only (on an embedding PEFT
    /// ignores it, and so does this crate; convolutions are refused).
    Pissa,
    /// PEFT's `"pissa_niter_K"`: [`Pissa`](Self::Pissa) with the triplets
    /// from `K` iterations of a randomized subspace iteration (torch's
    /// `svd_lowrank`), drawn from [`crate::random`]: approximately the
    /// truncated SVD, faster on large weights. Not bit-equal to PEFT's
    /// (other random draws); see `docs/guide/kinds.md`.
    PissaNiter(usize),
    /// PEFT's `"olora"`: `Q, R = qr(W)`, `A = R[:r]`, `B = Q[:, :r]`, and
    /// the base becomes `W - s·B·A`. Linear layers only, as
    /// [`Pissa`](Self::Pissa).
    Olora,
}

impl LoraInit {
    /// Whether this initialisation rewrites the base weight (PiSSA, OLoRA).
    pub fn rewrites_base(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora)
    }

    /// The value of `init_lora_weights` PEFT writes for it.
    pub fn to_peft(self) -> Value {
        match self {
            LoraInit::Default => Value::Bool(true),
            LoraInit::Random => Value::Bool(false),
            LoraInit::Gaussian => Value::from("gaussian"),
            LoraInit::Pissa => Value::from("pissa"),
            LoraInit::PissaNiter(k) => Value::from(format!("pissa_niter_{k}")),
            LoraInit::Olora => Value::from("olora"),
        }
    }
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
    /// Which base biases train beside the adapter (PEFT's `bias`: `"none"`,
    /// the default, `"all"` or `"lora_only"`).
    pub bias: TrainedBias,
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
            bias: TrainedBias::None,
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
        /// Sets `bias`: which base biases train beside the adapter.
        bias => bias: TrainedBias,
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
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora => {
                candle_core::bail!("init_vars: {:?} starts from the base weight", self.init_lora_weights)
            }
        })
    }

    /// A linear layer's adapter for PiSSA or OLoRA: `A` and `B` from the
    /// base weight `W` (in f32, as PEFT), in the layer's dtype. The base
    /// itself is rewritten by [`AdapterConfig::initial_base`].
    fn base_rewriting_adapter(&self, module: &str, layer: &Layer, r: usize, scale: f64) -> Result<Box<dyn Adapter>> {
        let init = self.init_lora_weights;
        if layer.is_quantized() {
            return Err(refused_init(
                init,
                module,
                "the base is quantized: start PiSSA/OLoRA on the f32/f16/bf16 weights and quantize the residual",
            ));
        }
        if layer.is_merged() {
            return Err(refused_init(
                init,
                module,
                "the layer has merged adapters, which the decomposition would take in; unmerge first",
            ));
        }
        let (out, inp) = (layer.out_features(), layer.in_features());
        if r > out.min(inp) {
            return Err(refused_init(
                init,
                module,
                "r is larger than min(out, in) of the weight, so there are not r singular vectors / QR columns",
            ));
        }
        let weight = layer.weight()?.to_dtype(DType::F32)?;
        let (a, b) = match init {
            LoraInit::Olora => init::olora(&weight, r)?,
            LoraInit::PissaNiter(niter) => init::pissa(&weight, r, scale, Some(niter))?,
            _ => init::pissa(&weight, r, scale, None)?,
        };
        let device = layer.device();
        let var = |t: &candle_core::Tensor| Var::from_tensor(&t.to_dtype(layer.dtype())?.to_device(&device)?);
        let lora = LoraAdapter::new(var(&a)?, var(&b)?, scale, self.lora_dropout)?;
        if self.use_dora {
            // PEFT's DoRA takes its magnitude after the rewrite: the row
            // norms of W_res + s·B·A, that is of W.
            let residual = residual(layer, &a, &b, scale)?;
            Ok(Box::new(DoraAdapter::from_weight(lora, &residual.weight)?))
        } else {
            Ok(Box::new(lora))
        }
    }
}

/// The base weights `W - s·B·A` (computed in f32 as PEFT, then in the
/// layer's dtype), the bias as it is.
fn residual(layer: &Layer, a: &candle_core::Tensor, b: &candle_core::Tensor, scale: f64) -> Result<LayerWeights> {
    let weight = layer.weight()?;
    let delta = (b.matmul(a)? * scale)?;
    let rewritten = (weight.to_dtype(DType::F32)? - delta.to_device(weight.device())?)?.to_dtype(weight.dtype())?;
    Ok(LayerWeights {
        weight: rewritten,
        bias: layer.bias().cloned(),
    })
}

/// [`PeftError::UnsupportedOption`] for `init_lora_weights` on `module`.
fn refused_init(init: LoraInit, module: &str, reason: &'static str) -> crate::error::PeftError {
    crate::error::PeftError::UnsupportedOption {
        field: "init_lora_weights".into(),
        value: format!("{} (module `{module}`)", init.to_peft()),
        reason,
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
            // PEFT's `lora.Embedding` has no PiSSA or OLoRA form and silently
            // starts them as its default.
            _ => Var::zeros((r, vocab), dtype, &device)?,
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
        if self.init_lora_weights.rewrites_base() {
            // PEFT's `lora.Conv*d` raises "Unknown initialization" too.
            return Err(refused_init(self.init_lora_weights, module, CONV_REFUSED));
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
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora => {
                return Err(refused_init(self.init_lora_weights, module, CONV_REFUSED))
            }
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

/// Why PiSSA and OLoRA are refused on a convolution.
const CONV_REFUSED: &str = "PiSSA and OLoRA are implemented for linear layers only (PEFT refuses them on convolutions)";

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

    fn trained_bias(&self) -> TrainedBias {
        self.bias
    }

    fn new_adapter(&self, module: &str, layer: &Layer) -> Result<Box<dyn Adapter>> {
        let (r, alpha) = self.ranks.rank_and_alpha(module)?;
        match layer.kind() {
            LayerKind::Embedding => return self.embedding_adapter(module, layer, r, alpha),
            LayerKind::Conv => return self.conv_adapter(module, layer, r, alpha),
            _ => {}
        }
        let scale = scaling(alpha, r, self.use_rslora);
        if self.init_lora_weights.rewrites_base() {
            return self.base_rewriting_adapter(module, layer, r, scale);
        }
        let (a, b) = self.init_vars(
            r,
            layer.in_features(),
            layer.out_features(),
            layer.dtype(),
            &layer.device(),
        )?;
        let lora = LoraAdapter::new(a, b, scale, self.lora_dropout)?;
        if self.use_dora {
            // The magnitude starts as the row norms of W + s·B·A, as PEFT's
            // `dora_init` (with B = 0, the norms of W), so m / n = 1 at first.
            Ok(Box::new(DoraAdapter::from_weight(lora, layer.weight()?)?))
        } else {
            Ok(Box::new(lora))
        }
    }

    fn initial_base(&self, module: &str, layer: &Layer, adapter: &dyn Adapter) -> Result<Option<LayerWeights>> {
        if !self.init_lora_weights.rewrites_base() || layer.kind() != LayerKind::Linear {
            return Ok(None);
        }
        let (r, alpha) = self.ranks.rank_and_alpha(module)?;
        let vars = adapter.trainable_vars();
        let factor = |key: &str| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, var)| var.as_tensor().to_dtype(DType::F32))
                .ok_or_else(|| not_implemented(format!("module `{module}`: the adapter has no `{key}`")))
        };
        let (a, b) = (factor("lora_A.weight")??, factor("lora_B.weight")??);
        Ok(Some(residual(layer, &a, &b, scaling(alpha, r, self.use_rslora))?))
    }

    fn to_peft_config(&self) -> serde_json::Map<String, Value> {
        let init = self.init_lora_weights.to_peft();
        let mut fields = saved_fields(PEFT_TYPE, &self.target_modules, &self.metadata);
        fields.extend(self.ranks.peft_fields("lora_alpha"));
        let more = [
            ("lora_dropout", float(f64::from(self.lora_dropout))),
            ("use_rslora", Value::Bool(self.use_rslora)),
            ("use_dora", Value::Bool(self.use_dora)),
            ("fan_in_fan_out", Value::Bool(self.fan_in_fan_out)),
            ("bias", Value::from(self.bias.peft_name(LORA_ONLY))),
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
