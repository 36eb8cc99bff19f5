//! The error type of loading a checkpoint.

use std::path::PathBuf;

/// What went wrong while opening or loading a checkpoint, naming the file,
/// the field or the tensor at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file of the checkpoint could not be read.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error (part of the message).
        cause: std::io::Error,
    },
    /// A file the checkpoint needs is not there.
    #[error("{}: {what} not found", path.display())]
    MissingFile {
        /// Where it was looked for.
        path: PathBuf,
        /// What it is (`config.json`, a shard named by the index, ...).
        what: &'static str,
    },
    /// `config.json` (or the shard index) is not valid JSON or has a field
    /// of the wrong type.
    #[error("{}: {cause}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's diagnosis, with line and column (part of the message).
        cause: serde_json::Error,
    },
    /// `config.json` names an architecture this crate does not implement.
    #[error("{}: unknown model_type `{found}` (supported: {supported})", path.display())]
    UnknownModelType {
        /// The config file.
        path: PathBuf,
        /// `model_type` as found (`null` when missing).
        found: String,
        /// The architectures this crate implements, comma separated.
        supported: String,
    },
    /// `config.json` sets an option that changes the computation and is not
    /// implemented: loading anyway would give other logits than transformers.
    #[error("config.json: `{field}` = {value}: {reason}")]
    Unsupported {
        /// The config field.
        field: &'static str,
        /// Its value, as JSON.
        value: String,
        /// Why it cannot be honoured.
        reason: &'static str,
    },
    /// The shard index names a tensor that its shard does not hold.
    #[error("{}: tensor `{key}` is not in {}, the shard model.safetensors.index.json names for it", index.display(), shard.display())]
    MissingTensor {
        /// `model.safetensors.index.json`.
        index: PathBuf,
        /// The shard.
        shard: PathBuf,
        /// The tensor's key.
        key: String,
    },
    /// A safetensors file could not be read.
    #[error("{}: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The weights do not fit the config: a tensor missing, or of another
    /// shape than the config makes (candle's message names the tensor and
    /// both shapes).
    #[error("{}: the weights do not fit config.json: {cause}", path.display())]
    Load {
        /// The checkpoint folder.
        path: PathBuf,
        /// candle's error (part of the message).
        cause: candle_core::Error,
    },
    /// A Hub id that is not in the local Hugging Face cache, while offline
    /// (`HF_HUB_OFFLINE=1`, or a cache-only lookup).
    #[error(
        "model `{repo}` at revision `{revision}` is not in the Hugging Face cache {} and peft is offline; \
         unset HF_HUB_OFFLINE to download it, or give a checkpoint folder",
        cache.display()
    )]
    NotInCache {
        /// The Hub id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache folder looked in.
        cache: PathBuf,
    },
    /// Downloading a checkpoint from the Hub failed (boxed: it names five
    /// things).
    #[error(transparent)]
    Download(Box<DownloadError>),
    /// Generation was asked for something the model cannot do.
    #[error("cannot generate: {reason}")]
    Generation {
        /// Why.
        reason: String,
    },
    /// A data set could not be evaluated: no line long enough to predict a
    /// token, or a token the model's vocabulary does not hold.
    #[error("cannot evaluate: {reason}")]
    Eval {
        /// Why.
        reason: String,
    },
    /// The tokenizer could not read its file, a text or ids, or render its
    /// chat template.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// `tokenizer.json`.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A line of a data file is not what it should be.
    #[error("{}:{line}: {reason}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Training settings that cannot work together, or a run that cannot go on.
    #[error("cannot train: {reason}")]
    Train {
        /// Why.
        reason: String,
    },
    /// A checkpoint to resume from is missing a file, is damaged, or was
    /// made with other settings.
    #[error("cannot resume from {}: {reason}", path.display())]
    Resume {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An adapter does not fit the checkpoint it is merged into.
    #[error("{}: {reason}", adapter.display())]
    AdapterMismatch {
        /// The adapter folder.
        adapter: PathBuf,
        /// What does not fit (the module, the tensor key, the shapes).
        reason: String,
    },
    /// A merge that cannot be done as asked.
    #[error("cannot merge: {reason}")]
    Merge {
        /// Why.
        reason: String,
    },
    /// Adapters that cannot be combined as asked (`peft combine`: the
    /// output folder is an input, the seed without a DARE type, ...).
    #[error("cannot combine adapters: {reason}")]
    Combine {
        /// Why.
        reason: String,
    },
    /// The output folder or file exists (pass `force` to replace it).
    #[error("{} exists; choose another output or pass --force to replace it", path.display())]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// An adapter cannot be converted as asked (the rank, the output
    /// folder, a module whose change cannot be factored).
    #[error("{}: cannot convert to LoRA: {reason}", adapter.display())]
    Convert {
        /// The adapter folder.
        adapter: PathBuf,
        /// Why (naming the module when one is at fault).
        reason: String,
    },
    /// The adapter's change `ΔW` depends on the base weights (DoRA, IA³):
    /// computing it needs the base checkpoint.
    #[error(
        "{}: the change of a {kind} adapter depends on the base weights; \
         pass its base model with --model to compute it",
        adapter.display()
    )]
    NeedsBaseModel {
        /// The adapter folder.
        adapter: PathBuf,
        /// The adapter's kind (`DoRA`, `IA3`, ...).
        kind: String,
    },
    /// A layer cannot be quantized as asked.
    #[error("cannot quantize `{module}`: {reason}")]
    Quantize {
        /// The layer's path.
        module: String,
        /// Why.
        reason: String,
    },
    /// An adapter kind llama.cpp cannot load (it applies plain LoRA only),
    /// refused by `gguf::export_lora_gguf` before anything of the base is
    /// read.
    #[error(
        "{}: {kind} adapters cannot be exported as llama.cpp's LoRA GGUF (llama.cpp applies plain LoRA only); \
         turn it into a LoRA first: peft convert --adapter DIR --to lora --rank R --out DIR2",
        path.display()
    )]
    ExportKind {
        /// The adapter's `adapter_config.json`.
        path: PathBuf,
        /// The kind (`LoHa`, `LoKr`, `DoRA`, `IA³`, or PEFT's `peft_type`).
        kind: String,
    },
    /// A setting of `adapter_config.json` (or a size in the base's
    /// `config.json`) the GGUF export cannot honour or needs and lacks.
    #[error("{}: `{field}` = {value}: {reason}", path.display())]
    ExportSetting {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// Why it stops the export.
        reason: String,
    },
    /// A tensor of the adapter that cannot go into llama.cpp's LoRA GGUF:
    /// not a LoRA factor, half of a pair, or for a module the base lacks.
    #[error("{}: tensor `{key}`: {reason}", path.display())]
    ExportTensor {
        /// `adapter_model.safetensors`.
        path: PathBuf,
        /// The tensor's key in it.
        key: String,
        /// What is wrong, naming the module.
        reason: String,
    },
    /// A LoRA factor whose shape does not fit the base's `config.json`.
    #[error("{}: tensor `{key}` has shape {found:?}, expected {expected:?}: {what}", path.display())]
    ExportShape {
        /// `adapter_model.safetensors`.
        path: PathBuf,
        /// The tensor's key in it.
        key: String,
        /// The shape the base's config makes (rows, columns).
        expected: [usize; 2],
        /// The shape in the adapter.
        found: [usize; 2],
        /// Which factor and size differ.
        what: &'static str,
    },
    /// peft-core refused an operation on the model's layers (boxed: it is
    /// large, and rare).
    #[error(transparent)]
    Peft(Box<peft_core::PeftError>),
    /// A tensor operation failed while running the model.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<peft_core::PeftError> for ModelError {
    fn from(error: peft_core::PeftError) -> Self {
        ModelError::Peft(Box::new(error))
    }
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = ::core::result::Result<T, E>;

/// What [`ModelError::Download`] says: which file of which repository could
/// not be downloaded where, and why.
#[derive(Debug, thiserror::Error)]
#[error(
    "could not download {file} of {repo} (revision {revision}) into {}: {message}; \
     with HF_HUB_OFFLINE=1 peft uses only the cache",
    cache.display()
)]
pub struct DownloadError {
    /// The Hub id.
    pub repo: String,
    /// The revision asked for.
    pub revision: String,
    /// The file being fetched (or what was being asked, such as the file list).
    pub file: String,
    /// Why, as the client says it.
    pub message: String,
    /// The cache folder downloaded into.
    pub cache: PathBuf,
}
