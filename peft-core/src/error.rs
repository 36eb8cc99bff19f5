//! The error type of every fallible operation in this crate.

/// What went wrong, naming the module, adapter, field or pattern at fault.
///
/// Every model-level operation that returns an error leaves the model exactly
/// as it was before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// Nothing in the model matched the requested targets (PEFT: "Target
    /// modules ... not found in the base model").
    #[error("target modules {requested} not found in the model (it has {candidates} adaptable layers)")]
    NoTargetMatched {
        /// The targets as they were asked for.
        requested: String,
        /// How many adaptable layers the model has.
        candidates: usize,
    },
    /// No module's path ends with a name of `modules_to_save` (PEFT ignores
    /// such names silently; a head that is not copied would stay untrained
    /// and unsaved, so it is an error here).
    #[error("modules_to_save {requested} names no module of the model (it has {candidates} modules)")]
    NoModuleToSave {
        /// The names as they were given.
        requested: String,
        /// How many modules the model has.
        candidates: usize,
    },
    /// Targets matched, but the exclusions or the layer filter removed every one.
    #[error("all {matched} modules matched by {requested} were removed by {removed_by}")]
    AllTargetsExcluded {
        /// The targets as they were asked for.
        requested: String,
        /// How many modules matched before exclusion.
        matched: usize,
        /// The exclusion or layer filter that removed them.
        removed_by: String,
    },
    /// A regular expression given as a target or exclusion does not compile.
    #[error("invalid target regex `{pattern}`: {cause}")]
    InvalidRegex {
        /// The pattern as written.
        pattern: String,
        /// The regex crate's diagnosis (part of the message).
        cause: regex::Error,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid adapter config: `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// The config field at fault (PEFT's name for it).
        field: &'static str,
        /// The value given.
        value: String,
        /// What a valid value looks like.
        reason: &'static str,
    },
    /// An adapter of this name already sits on a targeted module.
    #[error("module `{module}` already has an adapter named `{adapter}`")]
    AdapterExists {
        /// Dotted path of the module.
        module: String,
        /// The adapter name.
        adapter: String,
    },
    /// An adapter that cannot join the adapters a module holds: the merged
    /// and unmerged outputs would no longer agree (see
    /// [`Composition`](crate::Composition)).
    #[error("module `{module}`: adapter `{adapter}` cannot be added: {reason}")]
    IncompatibleAdapter {
        /// Dotted path of the module.
        module: String,
        /// The adapter being added.
        adapter: String,
        /// Why.
        reason: String,
    },
    /// An adapter name that could not serve as a folder name under the
    /// folder adapters are saved in (empty, `.`, `..`, a path separator, a
    /// control character): refused before anything is added, read or written.
    #[error("invalid adapter name {name:?}: {reason}")]
    InvalidAdapterName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No module of the model holds an adapter of this name.
    #[error("no adapter named `{adapter}` in the model (adapters: [{known}])")]
    UnknownAdapter {
        /// The adapter name asked for.
        adapter: String,
        /// The adapter names the model does hold, comma separated.
        known: String,
    },
    /// The operation needs the model unmerged (or merged) first.
    #[error("module `{module}`: {reason}")]
    MergeState {
        /// Dotted path of the module.
        module: String,
        /// Why the operation was refused.
        reason: &'static str,
    },
    /// A merge (or unmerge) would put NaN or infinity into the weights of a
    /// module, as an adapter with such values or a huge scale does: refused
    /// before any layer changes, as PEFT's `safe_merge` refuses it.
    #[error("module `{module}`: {operation} would give non-finite weights (NaN or infinity); the model is unchanged")]
    NonFiniteWeights {
        /// Dotted path of the first module at fault.
        module: String,
        /// `"merge"`, `"unmerge"`, ...
        operation: &'static str,
    },
    /// `merge` or `merge_adapters` found nothing to merge: the adapters are
    /// already merged, there is no active adapter, or adapters are disabled.
    /// PEFT warns and does nothing; an error tells a script that merges twice.
    #[error("nothing to merge: {reason}")]
    NothingToMerge {
        /// Why: which adapters are already merged, or what is missing.
        reason: String,
    },
    /// `unmerge` on a model with no merged adapter (PEFT warns "Already
    /// unmerged. Nothing to do.").
    #[error("nothing to unmerge: no adapter is merged")]
    NothingToUnmerge,
    /// A config's rank is larger than the number of values the adapter
    /// file holds for the module: the file cannot match, and making the
    /// adapter would allocate whatever the rank asks for.
    #[error("module `{module}`: rank r = {r}, but the adapter file holds only {values} values for it")]
    RankBeyondFile {
        /// Dotted path of the module.
        module: String,
        /// The rank the config asks for (after `rank_pattern`).
        r: usize,
        /// How many values the file holds for the module.
        values: usize,
    },
    /// A tensor in the adapter file has a dtype that cannot hold adapter
    /// weights (integers, booleans): converting it would load nonsense.
    #[error("tensor `{key}`: dtype {found} is not a floating-point type (f32, f64, f16 or bf16)")]
    WrongDtype {
        /// The tensor's key in the file.
        key: String,
        /// The dtype in the file.
        found: String,
    },
    /// A tensor's entry in the adapter file's header is wrong on its own:
    /// named twice (which entry PEFT's reader would keep is not defined),
    /// a shape and dtype whose byte count differs from what its offsets
    /// hold, offsets outside the file.
    #[error("{}: tensor `{key}`: {problem}", path.display())]
    TensorHeader {
        /// The tensor file.
        path: std::path::PathBuf,
        /// The tensor's key.
        key: String,
        /// What is wrong with its entry.
        problem: String,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The operating system's error (part of the message).
        cause: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON or has a field of the wrong type.
    #[error("{}: malformed adapter config{}: {cause}", path.display(), in_field(field))]
    Json {
        /// The config file.
        path: std::path::PathBuf,
        /// The field whose value has the wrong type, when one alone is at fault.
        field: Option<String>,
        /// serde_json's diagnosis, with line and column (part of the message).
        cause: serde_json::Error,
    },
    /// `adapter_model.safetensors` could not be parsed or written.
    #[error("{}: {message}", path.display())]
    Safetensors {
        /// The tensor file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// `adapter_model.bin` (PyTorch's pickle) is not a PyTorch zip archive
    /// or holds something other than a flat dict of tensors: a nested dict,
    /// a number, a list, a call of another global (`os.system`). Nothing in
    /// the file is executed (docs/guide/file-format.md says how it is read).
    #[error("{}: {}{problem}", path.display(), in_key(key))]
    Pickle {
        /// The tensor file.
        path: std::path::PathBuf,
        /// The dict key at fault, when one is.
        key: Option<String>,
        /// What is wrong.
        problem: String,
    },
    /// The config names an adapter kind this crate does not implement.
    #[error("unsupported peft_type `{found}` (supported: {supported})")]
    UnsupportedPeftType {
        /// `peft_type` as found in the config.
        found: String,
        /// The kinds this crate can load, comma separated.
        supported: String,
    },
    /// Two adapter kinds were registered under the same `peft_type`.
    #[error("adapter kind `{peft_type}` is registered twice")]
    DuplicateAdapterKind {
        /// The `peft_type` registered twice.
        peft_type: String,
    },
    /// The config sets an option this crate does not implement yet; loading
    /// it anyway would give different outputs than PEFT.
    #[error("unsupported adapter option `{field}` = {value}: {reason}")]
    UnsupportedOption {
        /// The config field.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// Why it cannot be honoured.
        reason: &'static str,
    },
    /// A targeted module has no tensor in the adapter file.
    #[error("module `{module}` is targeted but the adapter file has no tensor `{key}`")]
    MissingTensor {
        /// Dotted path of the module.
        module: String,
        /// The key that was looked for.
        key: String,
    },
    /// The adapter file holds tensors that belong to no targeted module.
    #[error("the adapter file has {} tensor(s) that match no targeted module: {}", keys.len(), capped_list(keys))]
    UnexpectedTensors {
        /// Their keys, sorted.
        keys: Vec<String>,
    },
    /// A tensor in the adapter file has the wrong shape for its module.
    #[error("tensor `{key}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor's key in the file.
        key: String,
        /// The shape the module needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A trainable token's index is not a row of the embedding (or of the
    /// output head) it is asked of.
    #[error("module `{module}`: trainable token index {index} is out of range: the vocabulary has {vocab} tokens")]
    TokenIndexOutOfRange {
        /// Dotted path of the module.
        module: String,
        /// The index asked for.
        index: usize,
        /// The module's number of tokens (rows of its table).
        vocab: usize,
    },
    /// A trainable token is listed twice for one module: its row would have
    /// two trainable copies, one of which would be ignored.
    #[error("module `{module}`: trainable token index {index} is listed twice")]
    DuplicateTokenIndex {
        /// Dotted path of the module.
        module: String,
        /// The repeated index.
        index: usize,
    },
    /// `trainable_token_indices` given as a list needs the model's input
    /// embedding, found here as its one embedding layer: there is none, or
    /// there are several.
    #[error("trainable_token_indices as a list is for the model's input embedding, but the model has {} embedding layers{}; give {{module_name: [indices]}} instead", embeddings.len(), if embeddings.is_empty() { String::new() } else { format!(" ({})", capped_list(embeddings)) })]
    NoInputEmbedding {
        /// The paths of the model's embedding layers.
        embeddings: Vec<String>,
    },
    /// `add_weighted_adapter` was given another number of weights than
    /// adapters (PEFT's `zip` drops the extra ones silently).
    #[error("add_weighted_adapter: {adapters} adapter(s) but {weights} weight(s); give one weight per adapter")]
    WeightsLength {
        /// How many adapters were named.
        adapters: usize,
        /// How many weights were given.
        weights: usize,
    },
    /// An adapter `add_weighted_adapter` cannot combine: not LoRA, DoRA,
    /// attached by hand with no config.
    #[error("cannot combine adapter `{adapter}`: {reason}")]
    NotCombinable {
        /// The adapter's name.
        adapter: String,
        /// Why, naming the module when one is at fault.
        reason: String,
    },
    /// The combination type needs adapters of one rank and they differ
    /// (PEFT: "All adapters must have the same r value when using
    /// combination_type linear, ties, dare_ties or dare_linear").
    #[error("combination `{combination}` needs adapters of equal rank, found {ranks}; `cat` and the SVD types (`svd`, `ties_svd`, ...) take any ranks")]
    RankMismatch {
        /// The combination type.
        combination: &'static str,
        /// Each adapter's rank (`a: r = 4, c: r = 2`), and the module when
        /// they differ on one module only.
        ranks: String,
    },
    /// An SVD combination asked for more singular vectors than the
    /// module's `ΔW` has.
    #[error("module `{module}`: svd rank {rank} is larger than ΔW {shape:?} allows (at most {})", shape.iter().min().copied().unwrap_or(0))]
    SvdRankTooLarge {
        /// Dotted path of the module.
        module: String,
        /// The rank asked for (`svd_rank`, or the largest source rank).
        rank: usize,
        /// `ΔW`'s shape `[out, in]` (convolutions flattened to `[out, in·k]`).
        shape: Vec<usize>,
    },
    /// A tensor operation failed inside a module.
    #[error("module `{module}`: {cause}")]
    Module {
        /// Dotted path of the module.
        module: String,
        /// candle's error (part of the message).
        cause: candle_core::Error,
    },
    /// A tensor operation failed outside any particular module.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// ` (field `name`)` for a message, or nothing.
fn in_field(field: &Option<String>) -> String {
    field
        .as_ref()
        .map_or_else(String::new, |field| format!(" (field `{field}`)"))
}

fn in_key(key: &Option<String>) -> String {
    key.as_ref()
        .map_or_else(String::new, |key| format!("tensor `{}`: ", capped_text(key)))
}

/// How many items of a list an error message names before "and N more".
pub(crate) const LISTED_ITEMS: usize = 8;
/// How many characters of a value an error message shows.
pub(crate) const SHOWN_CHARS: usize = 200;

/// `items` joined with `, `, the first [`LISTED_ITEMS`] only, then
/// `and N more`: a config listing 200,000 modules must not make a 2 MB message.
pub(crate) fn capped_list<T: std::fmt::Display>(items: &[T]) -> String {
    let mut text = items
        .iter()
        .take(LISTED_ITEMS)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LISTED_ITEMS {
        text.push_str(&format!(" and {} more", items.len() - LISTED_ITEMS));
    }
    text
}

/// `text` cut to [`SHOWN_CHARS`] characters, saying how much was left out.
pub(crate) fn capped_text(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}... ({} more characters)", &text[..end], text[end..].chars().count()),
    }
}

/// `Result` with [`PeftError`].
pub type Result<T, E = PeftError> = ::core::result::Result<T, E>;

/// Attaches a module path to an error raised where the path was not known:
/// a candle error becomes [`PeftError::Module`], a layer's own error gets
/// the path in place of the layer's description.
pub(crate) trait InModule<T> {
    fn in_module(self, module: &str) -> Result<T>;
}

impl<T> InModule<T> for candle_core::Result<T> {
    fn in_module(self, module: &str) -> Result<T> {
        self.map_err(|cause| PeftError::Module {
            module: module.to_owned(),
            cause,
        })
    }
}

impl<T> InModule<T> for Result<T> {
    fn in_module(self, module: &str) -> Result<T> {
        self.map_err(|error| error.in_module(module))
    }
}

impl PeftError {
    /// This error with the module path `path` in place of what a layer that
    /// does not know its path wrote, and a bare candle error placed in it.
    pub(crate) fn in_module(self, path: &str) -> PeftError {
        let module = path.to_owned();
        match self {
            PeftError::Candle(cause) => PeftError::Module { module, cause },
            PeftError::MergeState { reason, .. } => PeftError::MergeState { module, reason },
            PeftError::AdapterExists { adapter, .. } => PeftError::AdapterExists { module, adapter },
            PeftError::IncompatibleAdapter { adapter, reason, .. } => PeftError::IncompatibleAdapter {
                module,
                adapter,
                reason,
            },
            PeftError::NonFiniteWeights { operation, .. } => PeftError::NonFiniteWeights { module, operation },
            other => other,
        }
    }
}

/// Adapters report errors as [`PeftError`]; candle's `Module::forward` of a
/// slot returns candle's error: a candle error inside goes back out as it
/// was, anything else is wrapped.
impl From<PeftError> for candle_core::Error {
    fn from(error: PeftError) -> Self {
        match error {
            PeftError::Candle(error) => error,
            other => candle_core::Error::wrap(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{capped_list, capped_text};

    #[test]
    fn long_lists_and_values_are_cut() {
        let names: Vec<String> = (0..200_000).map(|i| format!("layers.{i}.q_proj")).collect();
        let listed = capped_list(&names);
        assert!(listed.ends_with("layers.7.q_proj and 199992 more"), "{listed}");
        assert_eq!(capped_list(&["a", "b"]), "a, b");
        let long = "x".repeat(1000);
        assert_eq!(
            capped_text(&long),
            format!("{}... (800 more characters)", "x".repeat(200))
        );
        assert_eq!(capped_text("short"), "short");
    }
}
