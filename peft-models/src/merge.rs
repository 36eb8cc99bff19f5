//! Merging adapters into a checkpoint on disk, tensor by tensor, with no
//! model code: PEFT's `merge_and_unload()` then `save_pretrained()`, for any
//! architecture whose tensor names the adapters' keys address.
//!
//! A module `M` an adapter holds tensors for is the checkpoint's `M.weight`
//! (and `M.bias`); its merged weight is computed by
//! [`StandaloneAdapter::merge_module`], the same code that merges a model.
//! Each shard is read memory-mapped and written through the `safetensors`
//! crate, which asks for one tensor's bytes at a time: each is loaded (its
//! mapped pages handed back once copied), merged and written before the
//! next, so memory holds the adapters and about one tensor, whatever the
//! shard sizes.
//!
//! The output folder is written under a hidden name beside it and renamed
//! into place at the end: a failure part way leaves no folder that looks
//! complete, and the input is only read.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::{BaseModule, StandaloneAdapter};
use serde_json::Value;

use crate::checkpoint::{release_freed_memory, release_pages, weight_files, with_shape, ReleasingMmap, INDEX_FILE};
use crate::error::{ModelError, Result};
use crate::output::{finish, partial_dir, same_folder};

/// An adapter to merge, with the factor its change is scaled by.
#[derive(Debug)]
pub struct WeightedAdapter {
    /// Where it was read from (for messages).
    pub dir: PathBuf,
    /// The adapter.
    pub adapter: StandaloneAdapter,
    /// 1 merges it as it is; another factor scales its change `ΔW` (only
    /// for additive kinds: LoRA, LoHa, LoKr).
    pub weight: f64,
}

impl WeightedAdapter {
    /// Reads the adapter folder `dir`, to merge with `weight`.
    pub fn read(dir: impl AsRef<Path>, weight: f64) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let adapter = StandaloneAdapter::from_dir(&dir)?;
        Ok(Self { dir, adapter, weight })
    }
}

/// How to merge.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Write the weights in this dtype (`None`: as stored).
    pub dtype: Option<DType>,
    /// Replace an existing output folder.
    pub force: bool,
}

/// Where a merge is, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct MergeProgress {
    /// Tensors written so far, over all shards.
    pub tensors_done: usize,
    /// Tensors in all.
    pub tensors_total: usize,
    /// The shard being written (from 0).
    pub shard: usize,
    /// Shards in all.
    pub shards: usize,
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// The output folder.
    pub out: PathBuf,
    /// Weight files written.
    pub shards: usize,
    /// Tensors written.
    pub tensors: usize,
    /// The modules whose weights changed, sorted.
    pub merged_modules: Vec<String>,
    /// Other files copied from the checkpoint folder (config, tokenizer...).
    pub copied: Vec<String>,
}

/// One tensor of the checkpoint: where it is and what it is.
struct Entry {
    name: String,
    stored: safetensors::Dtype,
    shape: Vec<usize>,
}

/// Merges `adapters` (in order, each onto the result of the ones before)
/// into the checkpoint in `model_dir` and writes the result to `out`: the
/// same weight files (one, or the shards and an index with the same
/// layout), every other file of the folder copied. `on_progress` is called
/// after each tensor.
///
/// Refused before anything is written: an output folder that exists
/// (unless `options.force`), an adapter module the checkpoint has no
/// `.weight` for, a weight other than 1 on a kind that is not additive.
pub fn merge_checkpoint(
    model_dir: &Path,
    adapters: &[WeightedAdapter],
    out: &Path,
    options: &MergeOptions,
    on_progress: &mut dyn FnMut(MergeProgress),
) -> Result<MergeReport> {
    if adapters.is_empty() {
        return Err(merge_error("no adapter to merge".to_owned()));
    }
    if out.exists() && !options.force {
        return Err(ModelError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if same_folder(model_dir, out) {
        return Err(merge_error(format!(
            "the output folder {} is the checkpoint itself; the input is never modified",
            out.display()
        )));
    }
    let files = weight_files(model_dir)?;
    let mut shards = Vec::with_capacity(files.len());
    for file in &files {
        let mapped = ReleasingMmap::open(model_dir, std::slice::from_ref(file))?;
        let mut entries: Vec<Entry> = mapped
            .headers()
            .into_iter()
            .map(|(name, stored, shape)| Entry { name, stored, shape })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        shards.push(entries);
    }
    let names: HashMap<&str, &Entry> = shards.iter().flatten().map(|e| (e.name.as_str(), e)).collect();
    for adapter in adapters {
        check_adapter(adapter, &names)?;
    }
    let merged_modules = merged_modules(adapters);

    let partial = partial_dir(out)?;
    let result = (|| -> Result<MergeReport> {
        let copied = copy_other_files(model_dir, &partial, options.dtype)?;
        let total: usize = shards.iter().map(Vec::len).sum();
        let mut done = 0;
        for (index, (file, entries)) in files.iter().zip(&shards).enumerate() {
            let mapped = ReleasingMmap::open(model_dir, std::slice::from_ref(file))?;
            let target = partial.join(file.file_name().unwrap_or_default());
            let failure = RefCell::new(None);
            let borrowed = Cell::new(None);
            let progress = RefCell::new((&mut *on_progress, done));
            let on_written = || {
                let mut progress = progress.borrow_mut();
                progress.1 += 1;
                let tensors_done = progress.1;
                (progress.0)(MergeProgress {
                    tensors_done,
                    tensors_total: total,
                    shard: index,
                    shards: files.len(),
                });
            };
            let views: Vec<(String, LazyTensor<'_>)> = entries
                .iter()
                .map(|entry| {
                    let view = LazyTensor {
                        entry,
                        mapped: &mapped,
                        adapters,
                        dtype: options.dtype,
                        failure: &failure,
                        borrowed: &borrowed,
                        on_written: &on_written,
                    };
                    (entry.name.clone(), view)
                })
                .collect();
            let metadata = Some(HashMap::from([("format".to_owned(), "pt".to_owned())]));
            let written = safetensors::serialize_to_file(views, metadata, &target);
            if let Some(last) = borrowed.take() {
                release_pages(last);
            }
            if let Some(error) = failure.into_inner() {
                return Err(error);
            }
            written.map_err(|e| ModelError::Safetensors {
                path: target.clone(),
                message: e.to_string(),
            })?;
            // The writer's temporary file is private (0600); give the shard
            // the input's permissions, as a copy would have.
            if let Ok(metadata) = std::fs::metadata(file) {
                let _ = std::fs::set_permissions(&target, metadata.permissions());
            }
            done += entries.len();
        }
        if files.len() > 1 {
            write_index(model_dir, &partial, &shards, options.dtype)?;
        }
        Ok(MergeReport {
            out: out.to_path_buf(),
            shards: files.len(),
            tensors: total,
            merged_modules,
            copied,
        })
    })();
    finish(&partial, out, result)
}

/// A candle [`VarBuilder`](candle_nn::VarBuilder) over the checkpoint in `model_dir` that merges
/// `adapters` into each weight as it is fetched (`M.weight` for every
/// module `M` an adapter addresses; everything else as stored), in `dtype`
/// on `device`. Any model that loads through a `VarBuilder`, such as
/// candle-transformers' whose layers cannot be derived on, then runs with
/// the adapters merged and no model code of ours. The adapters' modules are
/// checked against the checkpoint's tensor names first.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use peft_models::merge::{merged_var_builder, WeightedAdapter};
///
/// let adapters = vec![WeightedAdapter::read("my-adapter", 1.0)?];
/// let vb = merged_var_builder("my-llama".as_ref(), adapters, DType::F32, &Device::Cpu)?;
/// // let model = candle_transformers::models::llama::Llama::load(vb, &config)?;
/// # Ok::<(), peft_models::ModelError>(())
/// ```
pub fn merged_var_builder(
    model_dir: &Path,
    adapters: Vec<WeightedAdapter>,
    dtype: DType,
    device: &Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    let files = weight_files(model_dir)?;
    let mapped = ReleasingMmap::open(model_dir, &files)?;
    let headers = mapped.headers();
    let entries: Vec<Entry> = headers
        .into_iter()
        .map(|(name, stored, shape)| Entry { name, stored, shape })
        .collect();
    let names: HashMap<&str, &Entry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    for adapter in &adapters {
        check_adapter(adapter, &names)?;
    }
    Ok(candle_nn::VarBuilder::from_backend(
        Box::new(MergingBackend { mapped, adapters }),
        dtype,
        device.clone(),
    ))
}

/// The backend of [`merged_var_builder`].
struct MergingBackend {
    mapped: ReleasingMmap,
    adapters: Vec<WeightedAdapter>,
}

impl MergingBackend {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        if let Some(bias) = saved_bias(&self.adapters, name) {
            return bias.to_dtype(dtype)?.to_device(device);
        }
        let mut tensor = self.mapped.load(name, dtype, &Device::Cpu)?;
        if let Some(module) = name.strip_suffix(".weight") {
            for weighted in self.adapters.iter().filter(|w| w.adapter.adapts(module)) {
                tensor = merge_one(weighted, module, tensor, &self.mapped)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
        }
        tensor.to_device(device)
    }
}

impl candle_nn::var_builder::SimpleBackend for MergingBackend {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        with_shape(name, self.load(name, dtype, device)?, shape)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.mapped.contains(name)
    }
}

fn merge_error(reason: String) -> ModelError {
    ModelError::Merge { reason }
}

/// Every module of `adapter` must be a `.weight` of the checkpoint, and a
/// weight other than 1 needs an additive kind.
fn check_adapter(adapter: &WeightedAdapter, names: &HashMap<&str, &Entry>) -> Result<()> {
    if let Some(key) = adapter.adapter.trainable_token_keys().first() {
        return Err(ModelError::AdapterMismatch {
            adapter: adapter.dir.clone(),
            reason: format!(
                "the adapter trains embedding rows (trainable tokens: `{key}`), which merging on disk does not \
                 handle yet; load it with load_adapter and use merge_and_unload"
            ),
        });
    }
    let missing: Vec<&str> = adapter
        .adapter
        .modules()
        .into_iter()
        .filter(|module| !names.contains_key(format!("{module}.weight").as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(ModelError::AdapterMismatch {
            adapter: adapter.dir.clone(),
            reason: format!(
                "the checkpoint has no weight for module(s) {} (no tensor `{}.weight`): is it the adapter's base model?",
                missing.iter().take(8).map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
                missing[0]
            ),
        });
    }
    if adapter.weight != 1.0 && !adapter.adapter.copied_modules().is_empty() {
        return Err(ModelError::AdapterMismatch {
            adapter: adapter.dir.clone(),
            reason: format!(
                "a weight of {} cannot scale the module(s) {:?} the adapter holds whole (modules_to_save): \
                 merging replaces them",
                adapter.weight,
                adapter.adapter.copied_modules()
            ),
        });
    }
    if adapter.weight != 1.0 && adapter.adapter.trains_biases() {
        return Err(ModelError::AdapterMismatch {
            adapter: adapter.dir.clone(),
            reason: format!(
                "a weight of {} cannot scale the biases the adapter trained (bias = {}): merging replaces them",
                adapter.weight,
                adapter.adapter.field("bias").unwrap_or(&serde_json::Value::Null)
            ),
        });
    }
    if adapter.weight != 1.0 && !adapter.adapter.is_additive() {
        return Err(ModelError::AdapterMismatch {
            adapter: adapter.dir.clone(),
            reason: format!(
                "a weight of {} scales the change of additive kinds only (LoRA, LoHa, LoKr); this adapter is {}{}",
                adapter.weight,
                adapter.adapter.peft_type(),
                if adapter.adapter.peft_type() == "LORA" {
                    " with DoRA"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(())
}

fn merged_modules(adapters: &[WeightedAdapter]) -> Vec<String> {
    let mut modules: Vec<String> = adapters
        .iter()
        .flat_map(|a| a.adapter.modules().into_iter().map(str::to_owned))
        .collect();
    modules.sort();
    modules.dedup();
    modules
}

/// Copies the folder's files but the weights and the index (config,
/// tokenizer, generation config, ...); with a new dtype, `config.json`
/// says it.
fn copy_other_files(model_dir: &Path, to: &Path, dtype: Option<DType>) -> Result<Vec<String>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| ModelError::Io { path, cause }
    };
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(model_dir).map_err(io(model_dir))? {
        let entry = entry.map_err(io(model_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_file() || name.ends_with(".safetensors") || name == INDEX_FILE || name.starts_with('.') {
            continue;
        }
        let target = to.join(&name);
        match (name.as_str(), dtype) {
            ("config.json", Some(dtype)) => {
                let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                let mut config: Value = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
                    path: path.clone(),
                    cause,
                })?;
                if let Value::Object(fields) = &mut config {
                    let name = torch_dtype_name(dtype);
                    for key in ["torch_dtype", "dtype"] {
                        if fields.contains_key(key) {
                            fields.insert(key.to_owned(), Value::from(name));
                        }
                    }
                }
                let text = serde_json::to_string_pretty(&config).unwrap_or(text);
                std::fs::write(&target, text).map_err(io(&target))?;
            }
            _ => {
                std::fs::copy(&path, &target).map_err(io(&target))?;
            }
        }
        copied.push(name);
    }
    copied.sort();
    Ok(copied)
}

fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The index of the written shards: the same weight map, the new total size.
fn write_index(model_dir: &Path, to: &Path, shards: &[Vec<Entry>], dtype: Option<DType>) -> Result<()> {
    let path = model_dir.join(INDEX_FILE);
    let text = crate::checkpoint::read_text(&path, "model.safetensors.index.json")?;
    let mut index: Value = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
        path: path.clone(),
        cause,
    })?;
    let total: usize = shards
        .iter()
        .flatten()
        .map(|e| byte_len(&e.shape, output_dtype(e.stored, dtype)))
        .sum();
    if let Some(Value::Object(metadata)) = index.get_mut("metadata") {
        metadata.insert("total_size".to_owned(), Value::from(total));
    }
    let target = to.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).unwrap_or(text);
    std::fs::write(&target, text).map_err(|cause| ModelError::Io { path: target, cause })
}

/// The bytes of a tensor of `shape` in `dtype`.
fn byte_len(shape: &[usize], dtype: safetensors::Dtype) -> usize {
    (shape.iter().product::<usize>() * dtype.bitsize()).div_ceil(8)
}

/// The dtype a tensor is written in: `dtype` for floating-point tensors
/// when given, else as stored.
fn output_dtype(stored: safetensors::Dtype, dtype: Option<DType>) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match (stored, dtype) {
        (S::F32 | S::F16 | S::BF16 | S::F64, Some(DType::F32)) => S::F32,
        (S::F32 | S::F16 | S::BF16 | S::F64, Some(DType::F16)) => S::F16,
        (S::F32 | S::F16 | S::BF16 | S::F64, Some(DType::BF16)) => S::BF16,
        (S::F32 | S::F16 | S::BF16 | S::F64, Some(DType::F64)) => S::F64,
        _ => stored,
    }
}

fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// A tensor of the output, merged when `safetensors` asks for its bytes.
/// `View::data` cannot fail, so a failure is kept in `failure` (and empty
/// bytes returned); the caller checks it after the file is written and
/// throws the file away.
struct LazyTensor<'a> {
    entry: &'a Entry,
    mapped: &'a ReleasingMmap,
    adapters: &'a [WeightedAdapter],
    dtype: Option<DType>,
    failure: &'a RefCell<Option<ModelError>>,
    /// The mapped bytes handed to the writer last: their pages are handed
    /// back when the writer asks for the next tensor (it has written them).
    borrowed: &'a Cell<Option<&'a [u8]>>,
    on_written: &'a dyn Fn(),
}

impl<'a> LazyTensor<'a> {
    /// The bytes to write: the mapped ones themselves for a tensor written
    /// as stored (no copy), else the merged or converted tensor's.
    fn bytes(&self) -> Result<Cow<'a, [u8]>> {
        let entry = self.entry;
        if let Some(bias) = saved_bias(self.adapters, &entry.name) {
            let out = candle_dtype(output_dtype(entry.stored, self.dtype)).unwrap_or(bias.dtype());
            return Ok(Cow::Owned(tensor_bytes(&bias.to_dtype(out)?)?));
        }
        let adapted = entry
            .name
            .strip_suffix(".weight")
            .is_some_and(|module| self.adapters.iter().any(|w| w.adapter.adapts(module)));
        let Some(stored) = candle_dtype(entry.stored).filter(|_| adapted || self.dtype.is_some()) else {
            let bytes = self.mapped.stored_bytes(&entry.name)?;
            self.borrowed.set(Some(bytes));
            return Ok(Cow::Borrowed(bytes));
        };
        let mut tensor = self.mapped.load(&entry.name, stored, &Device::Cpu)?;
        if let Some(module) = entry.name.strip_suffix(".weight") {
            for weighted in self.adapters.iter().filter(|w| w.adapter.adapts(module)) {
                tensor = merge_one(weighted, module, tensor, self.mapped)?;
            }
        }
        let out = candle_dtype(output_dtype(entry.stored, self.dtype)).unwrap_or(stored);
        let bytes = tensor_bytes(&tensor.to_dtype(out)?)?;
        drop(tensor);
        release_freed_memory();
        Ok(Cow::Owned(bytes))
    }
}

/// The bias of checkpoint tensor `name` (`<module>.bias`) when an adapter
/// sets it (a whole copy's bias, or a bias trained with `bias = "all" |
/// "lora_only"`): the last such adapter's, as merging them in order leaves it.
fn saved_bias(adapters: &[WeightedAdapter], name: &str) -> Option<Tensor> {
    let module = name.strip_suffix(".bias")?;
    adapters
        .iter()
        .rev()
        .find_map(|w| w.adapter.saved_bias(module))
        .cloned()
}

/// `tensor` (module `module`'s weight) with `weighted` merged in.
fn merge_one(weighted: &WeightedAdapter, module: &str, tensor: Tensor, mapped: &ReleasingMmap) -> Result<Tensor> {
    let adapter = &weighted.adapter;
    let dtype = tensor.dtype();
    let embedding = adapter
        .tensors()
        .keys()
        .any(|key| key.contains(&format!(".{module}.lora_embedding_")));
    let bias_name = format!("{module}.bias");
    let bias = if mapped.contains(&bias_name) {
        Some(mapped.load(&bias_name, dtype, &Device::Cpu)?)
    } else {
        None
    };
    let base = if embedding {
        BaseModule::Embedding { table: tensor.clone() }
    } else if tensor.rank() > 2 {
        BaseModule::Conv {
            weight: tensor.clone(),
            bias,
        }
    } else {
        BaseModule::Linear {
            weight: tensor.clone(),
            bias,
        }
    };
    let (merged, _) = adapter
        .merge_module(module, base)
        .map_err(|e| ModelError::AdapterMismatch {
            adapter: weighted.dir.clone(),
            reason: e.to_string(),
        })?;
    if weighted.weight == 1.0 {
        return Ok(merged);
    }
    let delta = ((merged - &tensor)? * weighted.weight)?;
    Ok((tensor + delta)?)
}

/// A tensor's bytes, little-endian, as safetensors stores them.
fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        DType::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(merge_error(format!("cannot write a {other:?} tensor"))),
    })
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        output_dtype(self.entry.stored, self.dtype)
    }

    fn shape(&self) -> &[usize] {
        &self.entry.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if let Some(written) = self.borrowed.take() {
            release_pages(written);
        }
        let len = self.data_len();
        if self.failure.borrow().is_some() {
            return Cow::Owned(vec![0; len]);
        }
        let bytes = match self.bytes() {
            Ok(bytes) if bytes.len() == len => bytes,
            Ok(bytes) => {
                *self.failure.borrow_mut() = Some(merge_error(format!(
                    "tensor `{}`: {} bytes computed, {len} expected",
                    self.entry.name,
                    bytes.len()
                )));
                Cow::Owned(vec![0; len])
            }
            Err(error) => {
                *self.failure.borrow_mut() = Some(error);
                Cow::Owned(vec![0; len])
            }
        };
        (self.on_written)();
        bytes
    }

    fn data_len(&self) -> usize {
        byte_len(&self.entry.shape, self.dtype())
    }
}
