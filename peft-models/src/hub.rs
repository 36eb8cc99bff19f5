//! Where a model is: a checkpoint folder, or a Hub id (`org/name`, with a
//! revision) in the local Hugging Face cache, downloaded into it when it is
//! not there, with the `hf-hub` crate. The cache is the layout
//! `huggingface_hub` and transformers write
//! (`models--org--name/refs/<revision>`, `snapshots/<commit>/`), so a model
//! Python fetched is found, and one peft fetched is found by Python.
//!
//! As in Python: the cache folder is `HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` uses only the cache;
//! `HF_ENDPOINT` names another Hub; `HF_TOKEN` is sent for gated and
//! private models. A download fetches `config.json`, the safetensors
//! weights (`model.safetensors`, or the index and the shards it names) and
//! the tokenizer files there are, and never a checkpoint's pickled `*.bin`
//! weights. An adapter download takes `adapter_model.safetensors`, or the
//! pickled `adapter_model.bin` when the repository has no safetensors
//! file, as PEFT does (peft-core reads it without executing anything).
//!
//! One difference from transformers: a model already in the cache is used
//! as it is, without asking the Hub whether the revision has moved (what
//! transformers does at every load when online). Give a commit hash to pin
//! one, or delete the snapshot to refresh it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::{shards_of_index, CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE};
use crate::error::{DownloadError, ModelError, Result};
use crate::tokenizer::{CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// The Hub transformers talks to when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files a download takes besides the config and weights, when the
/// repository has them.
const EXTRA_FILES: [&str; 5] = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    "special_tokens_map.json",
    "generation_config.json",
];

/// How [`resolve_with`] reaches the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The cache folder ([`cache_dir`]).
    pub cache: PathBuf,
    /// Use only the cache (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// The Hub's address (`HF_ENDPOINT`, else [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The token for gated and private models (`HF_TOKEN`, else the token
    /// file `huggingface-cli login` writes, which hf-hub reads).
    pub token: Option<String>,
    /// Show download progress bars on stderr.
    pub progress: bool,
}

impl HubOptions {
    /// The options the environment gives, as `huggingface_hub` reads them;
    /// no progress bars.
    pub fn from_env() -> Self {
        let set = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Self {
            cache: cache_dir(),
            offline: set("HF_HUB_OFFLINE").is_some_and(|value| is_true(&value)),
            endpoint: set("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            token: set("HF_TOKEN"),
            progress: false,
        }
    }
}

/// `huggingface_hub`'s truthy values: 1, ON, YES, TRUE (any case).
fn is_true(value: &str) -> bool {
    ["1", "on", "yes", "true"].contains(&value.trim().to_ascii_lowercase().as_str())
}

/// The cache folder of the Hugging Face Hub on this machine.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The checkpoint folder `model` names: the folder itself when it is one,
/// else the snapshot of the Hub id `model` at `revision` (default `main`),
/// from the cache or downloaded into it, with [`HubOptions::from_env`].
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_with(model, revision, &HubOptions::from_env())
}

/// [`resolve`] with the options given.
pub fn resolve_with(model: &str, revision: Option<&str>, options: &HubOptions) -> Result<PathBuf> {
    match resolve_in(model, revision, &options.cache) {
        Err(ModelError::NotInCache { .. }) if !options.offline => download(model, revision.unwrap_or("main"), options),
        found => found,
    }
}

/// [`resolve`] from the cache folder given only (offline).
pub fn resolve_in(model: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    lookup(model, revision, cache, RepoKind::Model)
}

/// The PEFT adapter folder `adapter` names: the folder itself when it is
/// one, else the snapshot of the Hub id `adapter` at `revision` (default
/// `main`), from the cache or downloaded into it (`adapter_config.json`
/// and `adapter_model.safetensors`, or, when the repository has no
/// safetensors file, the pickled `adapter_model.bin`, as PEFT's
/// `load_peft_weights` falls back to it: peft reads it without executing
/// anything, see [`peft_core::read_pickled_tensors`]).
pub fn resolve_adapter_with(adapter: &str, revision: Option<&str>, options: &HubOptions) -> Result<PathBuf> {
    match lookup(adapter, revision, &options.cache, RepoKind::Adapter) {
        Err(ModelError::NotInCache { .. }) if !options.offline => {
            download_adapter(adapter, revision.unwrap_or("main"), options)
        }
        found => found,
    }
}

/// [`resolve_adapter_with`] from the cache folder given only (offline).
pub fn resolve_adapter_in(adapter: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    lookup(adapter, revision, cache, RepoKind::Adapter)
}

/// What a repository holds: a checkpoint or a PEFT adapter. A snapshot
/// counts as there once its marker file is (downloaded last).
#[derive(Debug, Clone, Copy)]
enum RepoKind {
    Model,
    Adapter,
}

impl RepoKind {
    fn marker(self) -> &'static str {
        match self {
            RepoKind::Model => CONFIG_FILE,
            RepoKind::Adapter => peft_core::CONFIG_FILE,
        }
    }

    fn folder(self) -> &'static str {
        match self {
            RepoKind::Model => "checkpoint folder (or a Hub id org/name)",
            RepoKind::Adapter => "adapter folder (or a Hub id org/name)",
        }
    }
}

fn lookup(model: &str, revision: Option<&str>, cache: &Path, kind: RepoKind) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: kind.folder(),
        });
    }
    let revision = revision.unwrap_or("main");
    let repo = Repo::with_revision(model.to_owned(), RepoType::Model, revision.to_owned());
    // A branch or tag goes through refs/<revision> (hf-hub); a commit hash
    // names its snapshot directly, as huggingface_hub allows.
    let by_commit = is_commit(revision)
        .then(|| cache.join(repo.folder_name()).join("snapshots").join(revision))
        .filter(|dir| dir.join(kind.marker()).is_file());
    let by_ref = || Cache::new(cache.to_path_buf()).repo(repo.clone()).get(kind.marker());
    match by_commit.or_else(|| by_ref().and_then(|config| config.parent().map(Path::to_path_buf))) {
        Some(snapshot) => Ok(snapshot),
        None => Err(ModelError::NotInCache {
            repo: model.to_owned(),
            revision: revision.to_owned(),
            cache: cache.to_path_buf(),
        }),
    }
}

/// Downloads the checkpoint `model` at `revision` into the cache and
/// returns its snapshot folder. `config.json` comes last, so that a
/// download cut short is not taken for a whole checkpoint by the next
/// lookup (which looks for `config.json`).
fn download(model: &str, revision: &str, options: &HubOptions) -> Result<PathBuf> {
    let remote = Remote::open(model, revision, options)?;
    if !remote.lists(CONFIG_FILE) {
        return Err(remote.failed(
            CONFIG_FILE,
            "the repository has none: it is not a transformers model".to_owned(),
        ));
    }
    let mut files = Vec::new();
    if remote.lists(WEIGHTS_FILE) {
        files.push(WEIGHTS_FILE.to_owned());
    } else if remote.lists(INDEX_FILE) {
        files.extend(shards_of_index(&remote.fetch(INDEX_FILE)?)?);
    } else {
        return Err(remote.failed(
            WEIGHTS_FILE,
            "the repository has no safetensors weights (peft does not read pickled *.bin files)".to_owned(),
        ));
    }
    files.extend(
        EXTRA_FILES
            .iter()
            .filter(|file| remote.lists(file))
            .map(|file| (*file).to_owned()),
    );
    for file in &files {
        remote.fetch(file)?;
    }
    let config = remote.fetch(CONFIG_FILE)?;
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| remote.failed(CONFIG_FILE, "downloaded to a path without a folder".to_owned()))
}

/// Downloads the PEFT adapter `adapter` at `revision` into the cache and
/// returns its snapshot folder; `adapter_config.json` comes last, as
/// `config.json` does for a checkpoint.
fn download_adapter(adapter: &str, revision: &str, options: &HubOptions) -> Result<PathBuf> {
    let remote = Remote::open(adapter, revision, options)?;
    if !remote.lists(peft_core::CONFIG_FILE) {
        return Err(remote.failed(
            peft_core::CONFIG_FILE,
            "the repository has none: it is not a PEFT adapter".to_owned(),
        ));
    }
    // As PEFT's load_peft_weights: safetensors first, else the pickle.
    let weights = [peft_core::WEIGHTS_FILE, peft_core::PICKLE_WEIGHTS_FILE]
        .into_iter()
        .find(|file| remote.lists(file))
        .ok_or_else(|| {
            remote.failed(
                peft_core::WEIGHTS_FILE,
                format!(
                    "the repository has no adapter weights ({} or {})",
                    peft_core::WEIGHTS_FILE,
                    peft_core::PICKLE_WEIGHTS_FILE
                ),
            )
        })?;
    remote.fetch(weights)?;
    let config = remote.fetch(peft_core::CONFIG_FILE)?;
    config.parent().map(Path::to_path_buf).ok_or_else(|| {
        remote.failed(
            peft_core::CONFIG_FILE,
            "downloaded to a path without a folder".to_owned(),
        )
    })
}

/// A repository on the Hub at a revision, with the files it lists.
struct Remote<'a> {
    repo: hf_hub::api::sync::ApiRepo,
    listed: BTreeSet<String>,
    id: &'a str,
    revision: &'a str,
    options: &'a HubOptions,
}

impl<'a> Remote<'a> {
    fn open(id: &'a str, revision: &'a str, options: &'a HubOptions) -> Result<Self> {
        let failed = |file: &str, message: String| download_error(id, revision, options, file, message);
        let mut builder = ApiBuilder::from_cache(Cache::new(options.cache.clone()))
            .with_endpoint(options.endpoint.clone())
            .with_progress(options.progress);
        if options.token.is_some() {
            builder = builder.with_token(options.token.clone());
        }
        let api = builder.build().map_err(|e| failed("(the client)", e.to_string()))?;
        let repo = api.repo(Repo::with_revision(id.to_owned(), RepoType::Model, revision.to_owned()));
        let info = repo.info().map_err(|e| failed("(the file list)", e.to_string()))?;
        let listed = info.siblings.into_iter().map(|file| file.rfilename).collect();
        Ok(Self {
            repo,
            listed,
            id,
            revision,
            options,
        })
    }

    fn lists(&self, file: &str) -> bool {
        self.listed.contains(file)
    }

    fn fetch(&self, file: &str) -> Result<PathBuf> {
        self.repo.download(file).map_err(|e| self.failed(file, e.to_string()))
    }

    fn failed(&self, file: &str, message: String) -> ModelError {
        download_error(self.id, self.revision, self.options, file, message)
    }
}

fn download_error(id: &str, revision: &str, options: &HubOptions, file: &str, message: String) -> ModelError {
    ModelError::Download(Box::new(DownloadError {
        repo: id.to_owned(),
        revision: revision.to_owned(),
        file: file.to_owned(),
        message,
        cache: options.cache.clone(),
    }))
}

/// A full commit hash: 40 hexadecimal digits.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// `org/name`: two non-empty parts of letters, digits, `-`, `_` and `.`.
fn is_hub_id(model: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(model.split_once('/'), Some((org, name)) if valid(org) && valid(name))
}

#[cfg(test)]
mod tests {
    use super::{is_hub_id, is_true};

    #[test]
    fn offline_takes_huggingface_hubs_truthy_values() {
        for yes in ["1", "ON", "yes", "True"] {
            assert!(is_true(yes), "{yes}");
        }
        for no in ["0", "off", "", "2"] {
            assert!(!is_true(no), "{no}");
        }
    }

    #[test]
    fn hub_ids_are_org_slash_name() {
        assert!(is_hub_id("Qwen/Qwen3-0.6B"));
        assert!(is_hub_id("meta-llama/Llama-3.2-1B"));
        for not_an_id in ["gpt2", "a/b/c", "/abs", "org/", "../x", "org/na me"] {
            assert!(!is_hub_id(not_an_id), "{not_an_id}");
        }
    }
}
