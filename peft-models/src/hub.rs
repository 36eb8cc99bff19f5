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
//! the tokenizer files there are, and never pickled `*.bin` weights.
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
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: "checkpoint folder (or a Hub id org/name)",
        });
    }
    let revision = revision.unwrap_or("main");
    let repo = Repo::with_revision(model.to_owned(), RepoType::Model, revision.to_owned());
    // A branch or tag goes through refs/<revision> (hf-hub); a commit hash
    // names its snapshot directly, as huggingface_hub allows.
    let by_commit = is_commit(revision)
        .then(|| cache.join(repo.folder_name()).join("snapshots").join(revision))
        .filter(|dir| dir.join(CONFIG_FILE).is_file());
    let by_ref = || Cache::new(cache.to_path_buf()).repo(repo.clone()).get(CONFIG_FILE);
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
    let failed = |file: &str, message: String| {
        ModelError::Download(Box::new(DownloadError {
            repo: model.to_owned(),
            revision: revision.to_owned(),
            file: file.to_owned(),
            message,
            cache: options.cache.clone(),
        }))
    };
    let mut builder = ApiBuilder::from_cache(Cache::new(options.cache.clone()))
        .with_endpoint(options.endpoint.clone())
        .with_progress(options.progress);
    if options.token.is_some() {
        builder = builder.with_token(options.token.clone());
    }
    let api = builder.build().map_err(|e| failed("(the client)", e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        model.to_owned(),
        RepoType::Model,
        revision.to_owned(),
    ));
    let info = repo.info().map_err(|e| failed("(the file list)", e.to_string()))?;
    let listed: BTreeSet<&str> = info.siblings.iter().map(|file| file.rfilename.as_str()).collect();
    if !listed.contains(CONFIG_FILE) {
        return Err(failed(
            CONFIG_FILE,
            "the repository has none: it is not a transformers model".to_owned(),
        ));
    }
    let fetch = |file: &str| repo.download(file).map_err(|e| failed(file, e.to_string()));
    let mut files = Vec::new();
    if listed.contains(WEIGHTS_FILE) {
        files.push(WEIGHTS_FILE.to_owned());
    } else if listed.contains(INDEX_FILE) {
        files.extend(shards_of_index(&fetch(INDEX_FILE)?)?);
    } else {
        return Err(failed(
            WEIGHTS_FILE,
            "the repository has no safetensors weights (peft does not read pickled *.bin files)".to_owned(),
        ));
    }
    files.extend(
        EXTRA_FILES
            .iter()
            .filter(|file| listed.contains(*file))
            .map(|file| (*file).to_owned()),
    );
    for file in &files {
        fetch(file)?;
    }
    let config = fetch(CONFIG_FILE)?;
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| failed(CONFIG_FILE, "downloaded to a path without a folder".to_owned()))
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
