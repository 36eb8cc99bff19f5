//! The GGUF metadata, as convert_lora_to_gguf.py writes it: architecture
//! and type, the authorship fields gguf-py's `Metadata` draws from the
//! model card and the folder names, `adapter.lora.alpha`, the quantization
//! version.

use std::path::{Component, Path};

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::adapter::AdapterSettings;
use super::arch::BaseModel;
use super::model_card::{read_model_card, CardValue};
use super::naming::{id_to_title, model_id_components};

/// gguf-py's `GGML_QUANT_VERSION`, written as `general.quantization_version`.
const GGML_QUANT_VERSION: u32 = 2;

/// The metadata in the script's order: architecture and type (the writer's
/// constructor and `set_type`), the model card's authorship fields
/// (gguf-py's `Metadata`), `adapter.lora.alpha`, the quantization version.
pub(super) fn gguf_metadata(
    adapter_dir: &Path,
    model_dir: &Path,
    base: &BaseModel,
    settings: &AdapterSettings,
    total_params: i64,
    notes: &mut Vec<String>,
) -> Vec<(String, Value)> {
    let mut kv = Kv::default();
    kv.string("general.architecture", base.arch.gguf_name());
    kv.string("general.type", "adapter");
    kv.string("adapter.type", "lora");
    let authorship = Authorship::load(adapter_dir, model_dir, total_params, notes);
    authorship.write(&mut kv);
    kv.push("adapter.lora.alpha", Value::F32(settings.alpha as f32));
    if let Some(tokens) = &settings.alora_tokens {
        // As newer convert_lora_to_gguf.py writes an aLoRA's tokens.
        kv.push(
            "adapter.alora.invocation_tokens",
            Value::Array(tokens.iter().map(|&t| Value::U32(t)).collect()),
        );
    }
    kv.push("general.quantization_version", Value::U32(GGML_QUANT_VERSION));
    kv.0
}

/// Metadata being gathered, with gguf-py's `add_*` rules.
#[derive(Default)]
struct Kv(Vec<(String, Value)>);

impl Kv {
    fn push(&mut self, key: &str, value: Value) {
        self.0.push((key.to_owned(), value));
    }

    /// `add_string`: an empty string is not written.
    fn string(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.push(key, Value::String(value.to_owned()));
        }
    }

    fn optional(&mut self, key: &str, value: &Option<String>) {
        if let Some(value) = value {
            self.string(key, value);
        }
    }

    /// `add_array`: an empty list is not written.
    fn strings(&mut self, key: &str, values: &Option<Vec<String>>) {
        if let Some(values) = values.as_ref().filter(|v| !v.is_empty()) {
            self.push(
                key,
                Value::Array(values.iter().map(|v| Value::String(v.clone())).collect()),
            );
        }
    }
}

/// A base model or data set the model card names (gguf-py's dict entries).
#[derive(Debug, Default, Clone)]
struct Source {
    name: Option<String>,
    organization: Option<String>,
    version: Option<String>,
    repo_url: Option<String>,
}

/// gguf-py's `Metadata`: the authorship fields, from the model card, the
/// adapter folder's `config.json` and the adapter folder's name.
#[derive(Debug, Default)]
struct Authorship {
    name: Option<String>,
    author: Option<String>,
    version: Option<String>,
    organization: Option<String>,
    finetune: Option<String>,
    basename: Option<String>,
    description: Option<String>,
    size_label: Option<String>,
    license: Option<String>,
    license_name: Option<String>,
    license_link: Option<String>,
    source_url: Option<String>,
    source_doi: Option<String>,
    source_uuid: Option<String>,
    source_repo_url: Option<String>,
    base_models: Option<Vec<Source>>,
    datasets: Option<Vec<Source>>,
    tags: Option<Vec<String>>,
    languages: Option<Vec<String>>,
}

impl Authorship {
    /// `Metadata.load` with no override file and no `--model-name`, for the
    /// adapter folder (the script points its model card there), then
    /// `prepare_metadata`'s fallback to the base folder's name.
    fn load(adapter_dir: &Path, model_dir: &Path, total_params: i64, notes: &mut Vec<String>) -> Self {
        let mut meta = Authorship::default();
        let card = read_model_card(adapter_dir, notes);
        meta.apply_card(&card, total_params, notes);
        // `_name_or_path` of a config.json in the adapter folder, when it
        // looks like a Hub id rather than a path.
        if let Some(name_or_path) = read_name_or_path(adapter_dir) {
            if name_or_path.matches('/').count() <= 1 {
                meta.fill_from_id(&name_or_path, total_params);
            }
        }
        meta.fill_from_id(&folder_name(adapter_dir), total_params);
        if meta.name.is_none() {
            meta.name = Some(folder_name(model_dir));
        }
        meta
    }

    /// The model-card heuristics of `apply_metadata_heuristic`.
    fn apply_card(&mut self, card: &[(String, CardValue)], total_params: i64, notes: &mut Vec<String>) {
        let get = |key: &str| card.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
        // use_model_card_metadata: the first key present with a value wins.
        let scalar = |field: &mut Option<String>, keys: &[&str], notes: &mut Vec<String>| {
            for key in keys {
                if field.is_some() {
                    return;
                }
                match get(key) {
                    Some(CardValue::Str(s)) => *field = Some(s.clone()),
                    Some(CardValue::List(_)) => notes.push(format!("model card: `{key}` is a list; not written")),
                    Some(CardValue::Null) | None => {}
                }
            }
        };
        scalar(&mut self.name, &["name", "model_name"], notes);
        scalar(&mut self.author, &["author", "model_author", "model_creator"], notes);
        scalar(&mut self.version, &["version", "model_version"], notes);
        scalar(&mut self.organization, &["organization", "model_organization"], notes);
        scalar(&mut self.description, &["description", "model_description"], notes);
        scalar(&mut self.finetune, &["finetune", "model_finetune"], notes);
        scalar(&mut self.basename, &["basename", "model_basename", "model_type"], notes);
        scalar(&mut self.size_label, &["size_label", "model_size_label"], notes);
        scalar(&mut self.source_url, &["url", "model_url"], notes);
        scalar(&mut self.source_doi, &["doi", "model_doi"], notes);
        scalar(&mut self.source_uuid, &["uuid", "model_uuid"], notes);
        scalar(&mut self.source_repo_url, &["repo_url", "model_repo_url"], notes);
        self.base_models = sources(card, &["base_model", "base_models", "base_model_sources"], total_params);
        self.datasets = sources(card, &["datasets", "dataset", "dataset_sources"], total_params);
        // A license list is written comma-joined.
        self.license = match get("license") {
            Some(CardValue::Str(s)) => Some(s.clone()),
            Some(CardValue::List(items)) => Some(items.iter().flatten().cloned().collect::<Vec<_>>().join(",")),
            Some(CardValue::Null) | None => None,
        };
        scalar(&mut self.license_name, &["license_name"], notes);
        scalar(&mut self.license_link, &["license_link"], notes);
        // use_array_model_card_metadata: appends.
        let array = |field: &mut Option<Vec<String>>, keys: &[&str]| {
            for key in keys {
                let values: Vec<String> = match get(key) {
                    Some(CardValue::Str(s)) => vec![s.clone()],
                    Some(CardValue::List(items)) => items.iter().flatten().cloned().collect(),
                    Some(CardValue::Null) | None => continue,
                };
                field.get_or_insert_with(Vec::new).extend(values);
            }
        };
        array(&mut self.tags, &["tags", "pipeline_tag"]);
        array(&mut self.languages, &["languages", "language"]);
    }

    /// Fills what is still unset from a model id or folder name
    /// (`get_model_id_components`).
    fn fill_from_id(&mut self, id: &str, total_params: i64) {
        let parts = model_id_components(id, total_params);
        if self.name.is_none() {
            self.name = Some(id_to_title(&parts.full_name));
        }
        if self.organization.is_none() {
            self.organization = parts.organization.as_deref().map(id_to_title);
        }
        for (field, value) in [
            (&mut self.basename, parts.basename),
            (&mut self.finetune, parts.finetune),
            (&mut self.version, parts.version),
            (&mut self.size_label, parts.size_label),
        ] {
            if field.is_none() {
                *field = value;
            }
        }
    }

    /// `set_gguf_meta_model`, in its order.
    fn write(&self, kv: &mut Kv) {
        kv.optional("general.name", &self.name);
        kv.optional("general.author", &self.author);
        kv.optional("general.version", &self.version);
        kv.optional("general.organization", &self.organization);
        kv.optional("general.finetune", &self.finetune);
        kv.optional("general.basename", &self.basename);
        kv.optional("general.description", &self.description);
        kv.optional("general.size_label", &self.size_label);
        kv.optional("general.license", &self.license);
        kv.optional("general.license.name", &self.license_name);
        kv.optional("general.license.link", &self.license_link);
        kv.optional("general.source.url", &self.source_url);
        kv.optional("general.source.doi", &self.source_doi);
        kv.optional("general.source.uuid", &self.source_uuid);
        kv.optional("general.source.repo_url", &self.source_repo_url);
        for (prefix, sources) in [
            ("general.base_model", &self.base_models),
            ("general.dataset", &self.datasets),
        ] {
            let Some(sources) = sources else { continue };
            kv.push(&format!("{prefix}.count"), Value::U32(sources.len() as u32));
            for (i, source) in sources.iter().enumerate() {
                kv.optional(&format!("{prefix}.{i}.name"), &source.name);
                kv.optional(&format!("{prefix}.{i}.version"), &source.version);
                kv.optional(&format!("{prefix}.{i}.organization"), &source.organization);
                kv.optional(&format!("{prefix}.{i}.repo_url"), &source.repo_url);
            }
        }
        kv.strings("general.tags", &self.tags);
        kv.strings("general.languages", &self.languages);
    }
}

/// The base models or data sets of a model card: the first of `keys`
/// present (even when empty: the script then writes a count of 0).
fn sources(card: &[(String, CardValue)], keys: &[&str], total_params: i64) -> Option<Vec<Source>> {
    let value = keys
        .iter()
        .find_map(|key| card.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v))?;
    let ids: Vec<Option<String>> = match value {
        CardValue::Null => Vec::new(),
        CardValue::Str(s) => vec![Some(s.clone())],
        CardValue::List(items) => items.clone(),
    };
    Some(
        ids.into_iter()
            // A null entry is an empty one (the script logs an error and keeps it).
            .map(|id| id.map_or_else(Source::default, |id| source_from_id(&id, total_params)))
            .collect(),
    )
}

/// A base model or data set entry from a Hub id or URL.
fn source_from_id(id: &str, total_params: i64) -> Source {
    let mut source = Source::default();
    if ["http://", "https://", "ssh://"].iter().any(|p| id.starts_with(p)) {
        source.repo_url = Some(id.to_owned());
        if id.contains("huggingface.co") {
            if let Some(hub_id) = hub_id_of_url(id) {
                let parts = model_id_components(hub_id, total_params);
                source.name = Some(id_to_title(&parts.full_name));
                source.organization = parts.organization.as_deref().map(id_to_title);
                source.version = parts.version;
            }
        }
    } else {
        let parts = model_id_components(id, total_params);
        source.name = Some(id_to_title(&parts.full_name));
        source.organization = parts.organization.as_deref().map(id_to_title);
        source.version = parts.version;
        if let Some(org) = &parts.organization {
            source.repo_url = Some(format!("https://huggingface.co/{org}/{}", parts.full_name));
        }
    }
    source
}

/// `org/name` of `https?://huggingface.co/org/name` (gguf-py's regex, whose
/// unescaped `.` takes any character).
fn hub_id_of_url(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let rest = rest.strip_prefix("huggingface")?;
    let mut chars = rest.chars();
    chars.next()?;
    let id = chars.as_str().strip_prefix("co/")?;
    let (org, name) = id.split_once('/')?;
    (!org.is_empty() && !name.is_empty() && !name.contains('/')).then_some(id)
}

/// `_name_or_path` of a `config.json` in the adapter folder, if any.
fn read_name_or_path(adapter_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(adapter_dir.join(crate::CONFIG_FILE)).ok()?;
    let config: Json = serde_json::from_str(&text).ok()?;
    config.get("_name_or_path")?.as_str().map(str::to_owned)
}

/// A folder's name as Python's `Path.name` gives it for the path as given
/// (`..` for a parent, empty for `.` or a root).
fn folder_name(dir: &Path) -> String {
    match dir.components().next_back() {
        Some(Component::Normal(name)) => name.to_string_lossy().into_owned(),
        Some(Component::ParentDir) => "..".to_owned(),
        _ => String::new(),
    }
}
