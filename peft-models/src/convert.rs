//! Any adapter as a plain LoRA adapter: each module's change `ΔW`
//! factored by a truncated SVD, as PEFT 0.21's `convert_to_lora` does.
//!
//! For each module the adapter holds tensors for, `ΔW` is what merging it
//! adds to the base weight, computed by
//! [`StandaloneAdapter::merge_module`] (the code that merges a model) in
//! float64:
//!
//! - additive kinds (LoRA, LoHa, LoKr): `ΔW` does not depend on the base, so
//!   it is the merge into a zero weight, whose shape the adapter's own
//!   tensors give ([`ModuleLayout::from_tensors`]), or the checkpoint's
//!   when one is given (each module's `<module>.weight` must be there);
//! - DoRA, IA³ and any other kind: `ΔW = merge(W) − W` with `W` read from
//!   the base checkpoint (`model`), which is then required
//!   ([`ModelError::NeedsBaseModel`]).
//!
//! `ΔW = U S Vᵀ` (faer's thin SVD); keeping the `R` largest singular
//! values, `lora_B = U_R S_R` and `lora_A = V_Rᵀ` (all of `S` in `B`, as
//! PEFT), `r = lora_alpha` so the scaling is 1 (rsLoRA off). A module whose
//! `ΔW` has fewer than `R` rows or columns keeps them all, its rank (and
//! equal alpha) in `rank_pattern` / `alpha_pattern`; `r` is the largest
//! rank kept, `R` unless every module is smaller.
//!
//! The output folder is written under a hidden name beside it, read back
//! with the loader's checks, measured, and only then renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::{modules, BaseModule, LoraConfig, PeftMetadata, StandaloneAdapter, WithRank};
use serde_json::Value;

use crate::checkpoint::{weight_files, ReleasingMmap};
use crate::error::{ModelError, Result};
use crate::output::{finish, partial_dir, same_folder};

/// PEFT's prefix of every tensor key in `adapter_model.safetensors`.
const KEY_PREFIX: &str = "base_model.model.";

/// How to convert.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// The rank `R` of the LoRA adapter written (at least 1; a module with
    /// fewer rows or columns keeps them all).
    pub rank: usize,
    /// The base checkpoint folder (needed for DoRA and IA³; for other kinds
    /// it only gives the modules' shapes).
    pub model: Option<PathBuf>,
    /// Replace an existing output folder.
    pub force: bool,
}

/// The layout of a module's base weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleLayout {
    /// A linear weight `[out, in]` (stored `[in, out]` by a checkpoint whose
    /// adapter says `fan_in_fan_out`).
    Linear {
        /// Output features.
        out: usize,
        /// Input features.
        inp: usize,
    },
    /// An embedding table `[vocab, dim]`.
    Embedding {
        /// Rows of the table.
        vocab: usize,
        /// Width of the table.
        dim: usize,
    },
    /// A convolution kernel `[out, in, k...]`.
    Conv {
        /// The kernel's shape.
        kernel: Vec<usize>,
    },
}

impl ModuleLayout {
    /// The layout the adapter's tensors of one module give, by their keys
    /// without the module (`lora_A.weight`, `hada_w1_a`, `lokr_w1`, ...):
    /// LoRA `A [r, in]`, `B [out, r]` (a kernel `[r, in, k...]` and
    /// `[out, r, 1...]` for a convolution; `lora_embedding_A [r, vocab]`,
    /// `lora_embedding_B [dim, r]`), LoHa `hada_w1_a [out, r]`,
    /// `hada_w1_b [r, in]`, LoKr the product of its two factors' shapes
    /// (each whole or as `_a @ _b`). `None` when they do not tell (IA³'s
    /// vector, or tensors missing).
    pub fn from_tensors<'a>(dims: impl Fn(&str) -> Option<&'a [usize]>) -> Option<ModuleLayout> {
        if let (Some(a), Some(b)) = (dims("lora_embedding_A"), dims("lora_embedding_B")) {
            return match (a, b) {
                ([_, vocab], [dim, _]) => Some(ModuleLayout::Embedding {
                    vocab: *vocab,
                    dim: *dim,
                }),
                _ => None,
            };
        }
        if let (Some(a), Some(b)) = (dims("lora_A.weight"), dims("lora_B.weight")) {
            return match (a, b) {
                ([_, inp], [out, _]) => Some(ModuleLayout::Linear { out: *out, inp: *inp }),
                ([_, inp, k @ ..], [out, ..]) if b.len() == a.len() => {
                    let mut kernel = vec![*out, *inp];
                    kernel.extend_from_slice(k);
                    Some(ModuleLayout::Conv { kernel })
                }
                _ => None,
            };
        }
        if let (Some([out, _]), Some([_, inp])) = (dims("hada_w1_a"), dims("hada_w1_b")) {
            return Some(ModuleLayout::Linear { out: *out, inp: *inp });
        }
        let factor = |whole: &str, a: &str, b: &str| -> Option<(usize, usize)> {
            match (dims(whole), dims(a), dims(b)) {
                (Some([rows, cols]), _, _) => Some((*rows, *cols)),
                (None, Some([rows, _]), Some([_, cols])) => Some((*rows, *cols)),
                _ => None,
            }
        };
        let (w1, w2) = (
            factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?,
            factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?,
        );
        Some(ModuleLayout::Linear {
            out: w1.0 * w2.0,
            inp: w1.1 * w2.1,
        })
    }

    /// The layout of a base weight of shape `dims`: an embedding when the
    /// adapter's tensors say so, a convolution for more than 2 dimensions.
    fn of_weight(dims: &[usize], embedding: bool) -> Option<ModuleLayout> {
        match dims {
            [vocab, dim] if embedding => Some(ModuleLayout::Embedding {
                vocab: *vocab,
                dim: *dim,
            }),
            [out, inp] => Some(ModuleLayout::Linear { out: *out, inp: *inp }),
            [_, _, _, ..] if dims.len() <= 4 => Some(ModuleLayout::Conv { kernel: dims.to_vec() }),
            _ => None,
        }
    }

    /// The weight's shape as `merge_module` takes it (`[in, out]` for a
    /// linear layer when `fan_in_fan_out`).
    pub(crate) fn stored_dims(&self, fan_in_fan_out: bool) -> Vec<usize> {
        match self {
            ModuleLayout::Linear { out, inp } if fan_in_fan_out => vec![*inp, *out],
            ModuleLayout::Linear { out, inp } => vec![*out, *inp],
            ModuleLayout::Embedding { vocab, dim } => vec![*vocab, *dim],
            ModuleLayout::Conv { kernel } => kernel.clone(),
        }
    }

    /// The base module holding `weight`, for `adapter`'s module `module`:
    /// with the bias the adapter trained for it (`bias = "all" |
    /// "lora_only"`), which merging needs a bias to go into, else none.
    pub(crate) fn base(&self, weight: Tensor, adapter: &StandaloneAdapter, module: &str) -> Result<BaseModule> {
        let bias = match adapter.saved_bias(module) {
            Some(bias) => Some(bias.to_dtype(weight.dtype())?),
            None => None,
        };
        Ok(match self {
            ModuleLayout::Linear { .. } => BaseModule::Linear { weight, bias },
            ModuleLayout::Embedding { .. } => BaseModule::Embedding { table: weight },
            ModuleLayout::Conv { .. } => BaseModule::Conv { weight, bias },
        })
    }

    /// The matrix LoRA factors as `B @ A` (before the scaling): `[out, in]`
    /// for a linear layer, `[dim, vocab]` for an embedding (PEFT's
    /// `lora_embedding_B @ lora_embedding_A` is the table's transpose),
    /// `[out, in · k...]` for a convolution.
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self {
            ModuleLayout::Linear { out, inp } => (*out, *inp),
            ModuleLayout::Embedding { vocab, dim } => (*dim, *vocab),
            ModuleLayout::Conv { kernel } => (kernel[0], kernel[1..].iter().product()),
        }
    }

    /// `ΔW` in the weight's layout (`[out, in]`, `[vocab, dim]`, the kernel)
    /// as the matrix [`matrix_dims`](Self::matrix_dims) names.
    fn to_matrix(&self, delta: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, cols) = self.matrix_dims();
        match self {
            ModuleLayout::Embedding { .. } => delta.t()?.contiguous(),
            _ => delta.reshape((rows, cols)),
        }
    }

    /// LoRA's tensors (key within the module, tensor) for `b [rows, R]` and
    /// `a [R, cols]` of [`matrix_dims`](Self::matrix_dims).
    fn lora_tensors(&self, b: Tensor, a: Tensor) -> candle_core::Result<Vec<(&'static str, Tensor)>> {
        Ok(match self {
            ModuleLayout::Linear { .. } => vec![("lora_A.weight", a), ("lora_B.weight", b)],
            ModuleLayout::Embedding { .. } => vec![("lora_embedding_A", a), ("lora_embedding_B", b)],
            ModuleLayout::Conv { kernel } => {
                let r = a.dim(0)?;
                let mut a_dims = kernel.clone();
                a_dims[0] = r;
                let mut b_dims = vec![kernel[0], r];
                b_dims.extend(std::iter::repeat_n(1, kernel.len() - 2));
                vec![
                    ("lora_A.weight", a.reshape(a_dims)?),
                    ("lora_B.weight", b.reshape(b_dims)?),
                ]
            }
        })
    }
}

/// A module's change, float64.
#[derive(Debug, Clone)]
pub struct ModuleDelta {
    /// The module's path.
    pub module: String,
    /// The base weight's layout.
    pub layout: ModuleLayout,
    /// `ΔW` in the weight's layout: `[out, in]` for a linear layer (also
    /// with `fan_in_fan_out`), `[vocab, dim]`, `[out, in, k...]`.
    pub delta: Tensor,
}

/// The base weights of a checkpoint, read one module at a time.
pub struct BaseWeights {
    dir: PathBuf,
    mapped: ReleasingMmap,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl std::fmt::Debug for BaseWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseWeights")
            .field("dir", &self.dir)
            .field("tensors", &self.shapes.len())
            .finish()
    }
}

impl BaseWeights {
    /// Maps the weights of the checkpoint in `dir` (`model.safetensors` or
    /// its shards).
    pub fn open(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        let mapped = ReleasingMmap::open(dir, &files)?;
        let shapes = mapped
            .headers()
            .into_iter()
            .map(|(name, _, shape)| (name, shape))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            mapped,
            shapes,
        })
    }

    /// The shape of `<module>.weight`; an error naming the key (and the
    /// adapter `adapter`) when the checkpoint has no such tensor.
    pub fn weight_shape(&self, adapter: &Path, module: &str) -> Result<&[usize]> {
        let key = format!("{module}.weight");
        match self.shapes.get(&key) {
            Some(shape) => Ok(shape),
            None => Err(ModelError::AdapterMismatch {
                adapter: adapter.to_path_buf(),
                reason: format!(
                    "the checkpoint {} has no tensor `{key}` for module `{module}`: is it the adapter's base model?",
                    self.dir.display()
                ),
            }),
        }
    }

    /// `<module>.weight` in float64, or an error naming the key.
    fn weight(&self, adapter: &Path, module: &str) -> Result<Tensor> {
        self.weight_shape(adapter, module)?;
        Ok(self
            .mapped
            .load(&format!("{module}.weight"), DType::F64, &Device::Cpu)?)
    }
}

/// Whether the adapter's tensors for `module` are an embedding's.
fn is_embedding(adapter: &StandaloneAdapter, module: &str) -> bool {
    adapter
        .tensors()
        .contains_key(&format!("{KEY_PREFIX}{module}.lora_embedding_A"))
}

/// The layout the adapter's own tensors give for `module`.
pub fn adapter_layout(adapter: &StandaloneAdapter, module: &str) -> Option<ModuleLayout> {
    let tensors = adapter.tensors();
    ModuleLayout::from_tensors(|name| tensors.get(&format!("{KEY_PREFIX}{module}.{name}")).map(Tensor::dims))
}

/// A name for the adapter's kind in messages: PEFT's `peft_type` (`LORA`,
/// `IA3`, `LOHA`...), or `DoRA` for LoRA with `use_dora`.
pub fn kind_name(adapter: &StandaloneAdapter) -> String {
    let dora = adapter.field("use_dora").and_then(Value::as_bool).unwrap_or(false);
    if adapter.peft_type() == "LORA" && dora {
        "DoRA".to_owned()
    } else {
        adapter.peft_type().to_owned()
    }
}

/// `ΔW` of `module`: what merging `adapter` (read from `dir`) adds to the
/// base weight, in float64. Additive kinds merge into zeros (shaped by
/// `base`'s checkpoint when given, else by the adapter's tensors); other
/// kinds need `base` and give `merge(W) − W`. A weight PEFT saved beside
/// the adapter (`<module>.base_layer.weight`) is the `W` the merge starts
/// from, so it is subtracted instead.
pub fn module_delta(
    dir: &Path,
    adapter: &StandaloneAdapter,
    module: &str,
    base: Option<&BaseWeights>,
) -> Result<ModuleDelta> {
    let fan_in_fan_out = adapter.fan_in_fan_out();
    let embedding = is_embedding(adapter, module);
    let mismatch = |reason: String| ModelError::AdapterMismatch {
        adapter: dir.to_path_buf(),
        reason,
    };
    let (layout, weight) = if adapter.is_additive() {
        let layout = match base {
            Some(base) => {
                let dims = base.weight_shape(dir, module)?;
                let stored =
                    ModuleLayout::of_weight(dims, embedding).ok_or_else(|| mismatch(unknown_weight(module, dims)))?;
                unstore(stored, fan_in_fan_out)
            }
            None => adapter_layout(adapter, module).ok_or_else(|| {
                mismatch(format!(
                    "module `{module}`: its tensors do not give the layer's shape; pass the base checkpoint (--model)"
                ))
            })?,
        };
        let zeros = Tensor::zeros(layout.stored_dims(fan_in_fan_out), DType::F64, &Device::Cpu)?;
        (layout, zeros)
    } else {
        let Some(base) = base else {
            return Err(ModelError::NeedsBaseModel {
                adapter: dir.to_path_buf(),
                kind: kind_name(adapter),
            });
        };
        let weight = base.weight(dir, module)?;
        let stored = ModuleLayout::of_weight(weight.dims(), embedding)
            .ok_or_else(|| mismatch(unknown_weight(module, weight.dims())))?;
        (unstore(stored, fan_in_fan_out), weight)
    };
    let saved_key = format!("{KEY_PREFIX}{module}.base_layer.weight");
    let reference = match adapter.tensors().get(&saved_key) {
        Some(saved) => Some(saved.to_dtype(DType::F64)?),
        None if adapter.is_additive() => None,
        None => Some(weight.clone()),
    };
    let (merged, _) = adapter.merge_module(module, layout.base(weight, adapter, module)?)?;
    let mut delta = match reference {
        Some(reference) => (merged - reference)?,
        None => merged,
    };
    if fan_in_fan_out && matches!(layout, ModuleLayout::Linear { .. }) {
        delta = delta.t()?.contiguous()?;
    }
    Ok(ModuleDelta {
        module: module.to_owned(),
        layout,
        delta,
    })
}

fn unknown_weight(module: &str, dims: &[usize]) -> String {
    format!(
        "module `{module}`: the checkpoint's `{module}.weight` has shape {dims:?}, \
         which is no linear, embedding or convolution weight"
    )
}

/// A linear layout read from a weight stored `[in, out]` (`fan_in_fan_out`)
/// as `[out, in]`.
fn unstore(stored: ModuleLayout, fan_in_fan_out: bool) -> ModuleLayout {
    match stored {
        ModuleLayout::Linear { out, inp } if fan_in_fan_out => ModuleLayout::Linear { out: inp, inp: out },
        other => other,
    }
}

/// `‖t‖_F`, in float64.
pub fn frobenius_norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// One converted module.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertedModule {
    /// The module's path.
    pub module: String,
    /// The base weight's layout.
    pub layout: ModuleLayout,
    /// The rank kept: `R`, or fewer when `ΔW` has fewer rows or columns.
    pub rank: usize,
    /// The numerical rank of `ΔW` (singular values above
    /// `σ₁ · max(rows, cols) · ε` of float64): from this rank on the
    /// conversion is exact.
    pub delta_rank: usize,
    /// `‖ΔW‖_F`.
    pub delta_norm: f64,
    /// `‖ΔW − ΔW'‖_F / ‖ΔW‖_F`, `ΔW'` being what the written adapter
    /// merges (read back from its files); 0 when `ΔW` is 0.
    pub relative_error: f64,
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// The output folder.
    pub out: PathBuf,
    /// The source adapter's kind (`LOHA`, `DoRA`, `IA3`, ...).
    pub source_kind: String,
    /// The rank asked for.
    pub rank: usize,
    /// The written config's `r` (and `lora_alpha`): the largest rank kept.
    pub r: usize,
    /// The modules, sorted by path.
    pub modules: Vec<ConvertedModule>,
    /// The values the written adapter holds.
    pub parameters: usize,
}

/// Converts the adapter in `adapter_dir` to a LoRA adapter of rank
/// `options.rank` written to `out` (see the [module](self) docs).
///
/// Refused before anything is written: rank 0, an output that exists
/// (unless `options.force`) or is the adapter's own folder, a kind whose
/// change needs the base weights without `options.model`.
pub fn convert_to_lora(adapter_dir: &Path, out: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    let refuse = |reason: String| ModelError::Convert {
        adapter: adapter_dir.to_path_buf(),
        reason,
    };
    if options.rank == 0 {
        return Err(refuse("the rank must be at least 1".to_owned()));
    }
    if out.exists() && !options.force {
        return Err(ModelError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if same_folder(adapter_dir, out) || options.model.as_deref().is_some_and(|m| same_folder(m, out)) {
        return Err(refuse(format!(
            "the output folder {} is an input; inputs are never modified",
            out.display()
        )));
    }
    let adapter = StandaloneAdapter::from_dir(adapter_dir)?;
    if let Some(key) = adapter.trainable_token_keys().first() {
        return Err(refuse(format!(
            "the adapter trains embedding rows (trainable tokens: `{key}`), which converting does not handle yet"
        )));
    }
    if !adapter.is_additive() && options.model.is_none() {
        return Err(ModelError::NeedsBaseModel {
            adapter: adapter_dir.to_path_buf(),
            kind: kind_name(&adapter),
        });
    }
    let base = options.model.as_deref().map(BaseWeights::open).transpose()?;
    // Modules held whole (modules_to_save) are no change to factor: they
    // go to the output as they are.
    let copied = adapter.copied_modules();
    let names: Vec<String> = adapter
        .modules()
        .into_iter()
        .filter(|module| !copied.contains(module))
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(refuse("the adapter holds no module's tensors".to_owned()));
    }
    let dtype = match adapter.dtype() {
        Some(dtype @ (DType::F16 | DType::BF16 | DType::F32 | DType::F64)) => dtype,
        _ => DType::F32,
    };

    // Pass 1: factor each module's ΔW, keeping only the factors.
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut ranks: Vec<(String, ModuleLayout, usize, usize)> = Vec::new();
    for module in &names {
        let delta = module_delta(adapter_dir, &adapter, module, base.as_ref())?;
        let matrix = delta.layout.to_matrix(&delta.delta)?;
        let factors =
            truncated_svd(&matrix, options.rank).map_err(|reason| refuse(format!("module `{module}`: {reason}")))?;
        let (b, a) = (factors.b.to_dtype(dtype)?, factors.a.to_dtype(dtype)?);
        for (key, tensor) in delta.layout.lora_tensors(b, a)? {
            tensors.push((format!("{KEY_PREFIX}{module}.{key}"), tensor));
        }
        ranks.push((module.clone(), delta.layout, factors.rank, factors.delta_rank));
    }
    let r = ranks.iter().map(|(_, _, rank, _)| *rank).max().unwrap_or(options.rank);
    for (key, tensor) in adapter.tensors() {
        let module = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|rest| rest.rsplit_once('.'))
            .map(|(module, _)| module);
        // Whole copies and trained biases (`bias = "all" | "lora_only"`) are
        // no change to factor either.
        let trained_bias = adapter.trains_biases() && key.ends_with(".bias");
        if trained_bias || module.is_some_and(|module| copied.contains(&module)) {
            tensors.push((key.clone(), tensor.clone()));
        }
    }
    let config = lora_config(&adapter, &ranks, r);
    let parameters = tensors.iter().map(|(_, t)| t.elem_count()).sum();

    let partial = partial_dir(out)?;
    let result = (|| -> Result<Vec<ConvertedModule>> {
        write_adapter(&partial, config, &tensors)?;
        drop(tensors);
        // Pass 2: read the written adapter back with the loader's checks and
        // measure what it merges against ΔW.
        let written = StandaloneAdapter::from_dir(&partial)?;
        let mut converted = Vec::with_capacity(ranks.len());
        for (module, layout, rank, delta_rank) in ranks {
            let original = module_delta(adapter_dir, &adapter, &module, base.as_ref())?.delta;
            let approximation = module_delta(&partial, &written, &module, None)?.delta;
            let delta_norm = frobenius_norm(&original)?;
            let error = frobenius_norm(&(&original - &approximation)?)?;
            converted.push(ConvertedModule {
                module,
                layout,
                rank,
                delta_rank,
                delta_norm,
                relative_error: if delta_norm > 0.0 { error / delta_norm } else { error },
            });
        }
        Ok(converted)
    })();
    let modules = finish(&partial, out, result)?;
    Ok(ConvertReport {
        out: out.to_path_buf(),
        source_kind: kind_name(&adapter),
        rank: options.rank,
        r,
        modules,
        parameters,
    })
}

/// `B [rows, R]` and `A [R, cols]` with `B @ A` the best rank-`R`
/// approximation of a matrix.
struct Factors {
    b: Tensor,
    a: Tensor,
    rank: usize,
    delta_rank: usize,
}

/// The truncated SVD of `matrix` (float64, 2-D) at rank `rank` (or its
/// smaller side): `B = U_R S_R`, `A = V_Rᵀ`, as PEFT's `convert_to_lora`.
fn truncated_svd(matrix: &Tensor, rank: usize) -> std::result::Result<Factors, String> {
    let (rows, cols) = matrix.dims2().map_err(|e| e.to_string())?;
    let values = matrix
        .to_dtype(DType::F64)
        .and_then(|m| m.flatten_all())
        .and_then(|m| m.to_vec1::<f64>())
        .map_err(|e| e.to_string())?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err("ΔW holds NaN or infinite values".to_owned());
    }
    let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| values[i * cols + j]);
    let svd = m
        .thin_svd()
        .map_err(|e| format!("the SVD of ΔW [{rows}, {cols}] did not converge ({e:?})"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let k = rows.min(cols);
    let kept = rank.min(k);
    let largest = if k > 0 { s[0] } else { 0.0 };
    let tolerance = largest * rows.max(cols) as f64 * f64::EPSILON;
    let delta_rank = (0..k).filter(|&i| s[i] > tolerance && s[i] > 0.0).count();
    let b: Vec<f64> = (0..rows)
        .flat_map(|i| (0..kept).map(move |j| u[(i, j)] * s[j]))
        .collect();
    let a: Vec<f64> = (0..kept).flat_map(|j| (0..cols).map(move |c| v[(c, j)])).collect();
    let tensor =
        |data: Vec<f64>, shape: (usize, usize)| Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| e.to_string());
    Ok(Factors {
        b: tensor(b, (rows, kept))?,
        a: tensor(a, (kept, cols))?,
        rank: kept,
        delta_rank,
    })
}

/// The written `adapter_config.json`: a LoRA config with `r = lora_alpha`
/// (scaling 1), the modules' own ranks in `rank_pattern` and
/// `alpha_pattern` where they differ, the source's `fan_in_fan_out`,
/// `bias`, `modules_to_save` and descriptive fields.
fn lora_config(
    adapter: &StandaloneAdapter,
    ranks: &[(String, ModuleLayout, usize, usize)],
    r: usize,
) -> serde_json::Map<String, Value> {
    let targets: Vec<&str> = ranks.iter().map(|(module, ..)| module.as_str()).collect();
    let saved_modules = adapter.config().targets().saved_modules().to_vec();
    let mut config = LoraConfig::from(modules(targets.iter().copied()).modules_to_save(saved_modules))
        .rank(r)
        .alpha(r as f64)
        .bias(adapter.config().trained_bias())
        .fan_in_fan_out(adapter.fan_in_fan_out());
    for (module, _, rank, _) in ranks.iter().filter(|(_, _, rank, _)| *rank != r) {
        // A pattern is a regex matched against the end of the path: the
        // dots escaped, it names this module only.
        let pattern = module.replace('.', "\\.");
        config = config.rank_for(&pattern, *rank).alpha_for(&pattern, *rank as f64);
    }
    let text = |name: &str| adapter.field(name).and_then(Value::as_str).map(str::to_owned);
    config.metadata = PeftMetadata {
        task_type: text("task_type"),
        base_model_name_or_path: text("base_model_name_or_path"),
        revision: text("revision"),
    };
    let mut fields = peft_core::AdapterConfig::to_peft_config(&config);
    fields.insert("target_modules".to_owned(), Value::from(targets));
    fields
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
fn write_adapter(dir: &Path, mut config: serde_json::Map<String, Value>, tensors: &[(String, Tensor)]) -> Result<()> {
    let config_path = dir.join(peft_core::CONFIG_FILE);
    config.sort_keys();
    let mut text = serde_json::to_string_pretty(&Value::Object(config)).map_err(|cause| ModelError::Json {
        path: config_path.clone(),
        cause,
    })?;
    text.push('\n');
    std::fs::write(&config_path, text).map_err(|cause| ModelError::Io {
        path: config_path.clone(),
        cause,
    })?;
    let weights_path = dir.join(peft_core::WEIGHTS_FILE);
    let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::tensor::serialize_to_file(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        &weights_path,
    )
    .map_err(|e| ModelError::Safetensors {
        path: weights_path,
        message: e.to_string(),
    })
}
