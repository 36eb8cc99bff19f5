//! A Hugging Face checkpoint folder: `config.json` and the weights, in one
//! `model.safetensors` or in shards listed by `model.safetensors.index.json`.
//!
//! Opening checks what can be checked before any weight is read: the
//! config is JSON with a `model_type`, every shard the index names exists
//! and holds the tensors the index says it holds. Loading memory-maps the
//! shards, so only the tensors a model asks for are read, and hands the
//! mapped pages back as they are copied: the peak resident memory of a load
//! is the weights plus a few MiB, not twice the weights.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The config file's name.
pub const CONFIG_FILE: &str = "config.json";
/// The weights of an unsharded checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A Hugging Face checkpoint folder: `config.json` and the weights, in one
/// `model.safetensors` or in shards listed by `model.safetensors.index.json`.
///
/// [`open`](Self::open) checks what can be checked before any weight is
/// read: the config is JSON with a `model_type`, every shard the index names
/// is a file of the folder and holds the tensors the index says it holds.
/// [`var_builder`](Self::var_builder) memory-maps the shards, so only the
/// tensors a model asks for are read.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    model_type: String,
    weights: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join(CONFIG_FILE);
        let config: serde_json::Value = read_config(&config_path)?;
        let model_type = match config.get("model_type") {
            Some(serde_json::Value::String(model_type)) => model_type.clone(),
            other => {
                return Err(ModelError::UnknownModelType {
                    path: config_path,
                    found: other.map_or_else(|| "null".to_owned(), ToString::to_string),
                    supported: crate::auto::SUPPORTED_MODEL_TYPES.join(", "),
                })
            }
        };
        let weights = weight_files(&dir)?;
        Ok(Self {
            dir,
            config,
            model_type,
            weights,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`'s `model_type` (`"llama"`, `"gpt2"`, ...).
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// The safetensors files holding the weights.
    pub fn weight_files(&self) -> &[PathBuf] {
        &self.weights
    }

    /// `config.json` read as an architecture's `Config`; unknown fields are
    /// ignored, as transformers ignores them.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.config.clone()).map_err(|cause| ModelError::Json {
            path: self.dir.join(CONFIG_FILE),
            cause,
        })
    }

    /// The weights, memory-mapped, converted to `dtype` on `device` as a
    /// model asks for them.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_backend(
            Box::new(ReleasingMmap::open(&self.dir, &self.weights)?),
            dtype,
            device.clone(),
        ))
    }
}

/// Memory-mapped safetensors that give a tensor's pages back to the kernel
/// as it is copied out. A mapped page a load has read counts in the
/// process's resident memory until unmapped; without this, loading peaks at
/// the mapped file plus its copy (measured: 2.0 x the weights of a 174 MiB
/// checkpoint). A tensor kept in its stored dtype (f32, f16, bf16) is copied
/// in [`RELEASE_CHUNK`] pieces, each released after its copy, so the peak is
/// the weights plus one piece; a converted one is released once converted.
pub(crate) struct ReleasingMmap(MmapedSafetensors);

/// The bytes copied between two releases of mapped pages.
const RELEASE_CHUNK: usize = 8 << 20;

impl ReleasingMmap {
    /// Maps `files` (one checkpoint's weight files), naming `dir` in errors.
    pub(crate) fn open(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        // SAFETY: the files are mapped read-only; like every reader of
        // memory-mapped checkpoints (candle, transformers' safetensors), this
        // assumes no one truncates or rewrites them while they are loaded.
        let mapped = unsafe { MmapedSafetensors::multi(files) }.map_err(|cause| ModelError::Safetensors {
            path: dir.to_path_buf(),
            message: cause.to_string(),
        })?;
        Ok(Self(mapped))
    }

    /// Whether a tensor `name` is there.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }

    /// Tensor `name`'s bytes as stored, in the mapping (hand the pages
    /// back with [`release_pages`] once read).
    pub(crate) fn stored_bytes(&self, name: &str) -> candle_core::Result<&[u8]> {
        Ok(self.0.get(name)?.data())
    }

    /// Every tensor's name, stored dtype and shape.
    pub(crate) fn headers(&self) -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
        self.0
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.dtype(), view.shape().to_vec()))
            .collect()
    }

    /// Tensor `name` as stored when `dtype` is its stored dtype, else `None`.
    /// Tensor `name` in `dtype`: copied piece by piece when `dtype` is its
    /// stored dtype, else converted by candle and then released.
    pub(crate) fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        use candle_core::safetensors::Load;
        use safetensors::Dtype as Stored;
        let view = self.0.get(name)?;
        let (data, shape) = (view.data(), view.shape().to_vec());
        match (view.dtype(), dtype) {
            (Stored::F32, DType::F32) => Tensor::from_vec(copy_releasing(data, f32::from_le_bytes), shape, device),
            (Stored::F16, DType::F16) => {
                Tensor::from_vec(copy_releasing(data, half::f16::from_le_bytes), shape, device)
            }
            (Stored::BF16, DType::BF16) => {
                Tensor::from_vec(copy_releasing(data, half::bf16::from_le_bytes), shape, device)
            }
            _ => {
                let tensor = view.load(device)?.to_dtype(dtype)?;
                release_pages(data);
                Ok(tensor)
            }
        }
    }
}

/// Little-endian `bytes` as `T`s, releasing each [`RELEASE_CHUNK`] of the
/// mapping once copied.
fn copy_releasing<T, const N: usize>(bytes: &[u8], from_le_bytes: fn([u8; N]) -> T) -> Vec<T> {
    let mut values = Vec::with_capacity(bytes.len() / N);
    for chunk in bytes.chunks(RELEASE_CHUNK / N * N) {
        values.extend(chunk.chunks_exact(N).map(|b| {
            let mut array = [0u8; N];
            array.copy_from_slice(b);
            from_le_bytes(array)
        }));
        release_pages(chunk);
    }
    values
}

/// Drops the resident pages wholly inside `data`, a slice of a read-only
/// private file mapping (the file is unchanged; a later read maps them in
/// again). Does nothing off Unix.
/// Hands memory the allocator holds free back to the kernel. glibc raises
/// its mmap threshold to the size of the largest block freed (up to 32
/// MiB), so after a merge frees a weight-sized block, later ones come from
/// the heap and stay resident once freed; a merge calls this after each
/// merged tensor so that its peak stays about one tensor. Does nothing
/// elsewhere than glibc.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub(crate) fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = match usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) {
            Ok(page) if page > 0 => page,
            _ => return,
        };
        let start = (data.as_ptr() as usize).div_ceil(page) * page;
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `data`, part of a read-only
            // private file mapping that stays mapped; MADV_DONTNEED on such
            // a mapping only drops pages, which later reads fetch again from
            // the unchanged file, so every view of it keeps its bytes.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = data;
}

impl SimpleBackend for ReleasingMmap {
    fn get(
        &self,
        shape: Shape,
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
        self.0.contains_tensor(name)
    }
}

/// `tensor` if it has `shape`, else the error candle's own `VarBuilder`
/// backends give (which `ModelError` reads).
pub(crate) fn with_shape(name: &str, tensor: Tensor, shape: Shape) -> candle_core::Result<Tensor> {
    if tensor.shape() != &shape {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: shape,
            got: tensor.shape().clone(),
        }
        .bt());
    }
    Ok(tensor)
}

/// Reads and parses a JSON file, naming it in errors.
pub(crate) fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path, "config.json")?;
    serde_json::from_str(&text).map_err(|cause| ModelError::Json {
        path: path.to_path_buf(),
        cause,
    })
}

/// The text of `path`; a missing file is [`ModelError::MissingFile`] saying
/// `what` it is.
pub(crate) fn read_text(path: &Path, what: &'static str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|cause| match cause.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile {
            path: path.to_path_buf(),
            what,
        },
        _ => ModelError::Io {
            path: path.to_path_buf(),
            cause,
        },
    })
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Reads a shard index, naming it in errors.
fn read_shard_index(index_path: &Path) -> Result<ShardIndex> {
    serde_json::from_str(&read_text(index_path, "shard index")?).map_err(|cause| ModelError::Json {
        path: index_path.to_path_buf(),
        cause,
    })
}

/// The shard files a shard index names, each once, in order.
pub(crate) fn shards_of_index(index_path: &Path) -> Result<BTreeSet<String>> {
    Ok(read_shard_index(index_path)?.weight_map.into_values().collect())
}

/// The weight files of the checkpoint in `dir`, the index checked against
/// the shards' headers.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
            what: "model.safetensors (or model.safetensors.index.json)",
        });
    }
    let index = read_shard_index(&index_path)?;
    let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, shard) in &index.weight_map {
        by_shard.entry(shard.as_str()).or_default().push(key.as_str());
    }
    let mut files = Vec::with_capacity(by_shard.len());
    for (shard, keys) in by_shard {
        // A shard name is a file in this folder, never a path elsewhere.
        let path = dir.join(shard);
        if Path::new(shard).components().count() != 1 || !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                what: "shard named by model.safetensors.index.json",
            });
        }
        let held = shard_keys(&path)?;
        if let Some(key) = keys.into_iter().find(|key| !held.contains(*key)) {
            return Err(ModelError::MissingTensor {
                index: index_path,
                shard: path,
                key: key.to_owned(),
            });
        }
        files.push(path);
    }
    Ok(files)
}

/// The tensor names in a safetensors file's header, read without mapping
/// the data.
fn shard_keys(path: &Path) -> Result<BTreeSet<String>> {
    use std::io::Read;
    let io_error = |cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let bad = |message: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io_error)?;
    let length = u64::from_le_bytes(length);
    let file_length = file.metadata().map_err(io_error)?.len();
    if length > file_length.saturating_sub(8) {
        return Err(bad(format!(
            "header of {length} bytes in a file of {file_length} bytes"
        )));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(io_error)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    Ok(header.into_keys().filter(|key| key != "__metadata__").collect())
}
