//! Reading and writing the parts of PEFT's `adapter_config.json` that every
//! adapter kind shares: which modules to adapt, the "is this option set?"
//! check, and JSON numbers written as Python writes them.
//!
//! An adapter kind's own parser ([`PeftConfig::from_json`](crate::PeftConfig::from_json))
//! deserializes a struct that flattens [`TargetFields`] and collects the
//! remaining fields for [`check_other_fields`]. Which kind's parser reads a
//! file is decided by [`parse_config`](crate::config_file::parse_config).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor as SerdeVisitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{capped_text, PeftError, Result};
use crate::targets::{all_linear, modules, regex, Targets};

/// Deserializes JSON text, reporting errors against `path` and, for a value
/// of the wrong type, naming the field.
pub fn parse_json<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|cause| PeftError::Json {
        path: path.to_path_buf(),
        field: if cause.is_data() {
            field_at_fault::<T>(text)
        } else {
            None
        },
        cause,
    })
}

/// The top-level field of a JSON object that `T` refuses on its own.
///
/// serde's messages for flattened structs say what was wrong ("invalid type:
/// string, expected usize") but not where; every field of a config has a
/// default, so each field can be tried alone. Only runs after a failure.
fn field_at_fault<T: DeserializeOwned>(text: &str) -> Option<String> {
    let fields: serde_json::Map<String, Value> = serde_json::from_str(text).ok()?;
    fields.into_iter().find_map(|(field, value)| {
        let alone = Value::Object(serde_json::Map::from_iter([(field.clone(), value)]));
        serde_json::from_value::<T>(alone).is_err().then_some(field)
    })
}

/// A kind's own fields of `adapter_config.json`, read inside a [`KindFile`]
/// beside the fields every kind shares.
///
/// serde's `flatten` works one level deep here: a flattened struct that
/// itself flattens another does not consume its fields, which would then
/// reach [`check_other_fields`] as unknown. So a kind's fields flatten
/// nothing, and fields a family of kinds shares (LoHa's and LoKr's) are a
/// second struct, [`Family`](Self::Family), that `KindFile` reads beside them.
pub trait KindFields: DeserializeOwned {
    /// The config these fields make.
    type Config;

    /// The fields this kind shares with its family, [`NoFields`] for none.
    type Family: DeserializeOwned;

    /// PEFT 0.21's options of this kind that are not implemented here:
    /// refused when set (see [`check_other_fields`]). Default: none.
    const UNIMPLEMENTED_OPTIONS: &'static [&'static str] = &[];

    /// Which of PEFT's checks of `layers_to_transform` / `layers_pattern`
    /// this kind's PEFT config makes in its `__post_init__`. Default:
    /// `LoraConfig`'s ([`LayerChecks::Lora`]).
    const LAYER_CHECKS: LayerChecks = LayerChecks::Lora;

    /// The config, from these fields, the family's and the targets and
    /// metadata read beside them; refuses values this kind cannot honour.
    fn into_config(self, family: Self::Family, targets: Targets, metadata: PeftMetadata) -> Result<Self::Config>;
}

/// No fields: the [`KindFields::Family`] of a kind with no family.
#[derive(Debug, Default, Deserialize)]
pub struct NoFields {}

/// `adapter_config.json` of one kind, as PEFT writes it: the target fields,
/// the kind's family's and own fields, `modules_to_save`, the descriptive
/// fields and every other field (for [`check_other_fields`]).
#[derive(Deserialize)]
#[serde(bound = "F: KindFields")]
pub struct KindFile<F: KindFields> {
    #[serde(flatten)]
    targets: TargetFields,
    #[serde(flatten)]
    family: F::Family,
    #[serde(flatten)]
    fields: F,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(flatten)]
    metadata: PeftMetadata,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

impl<F: KindFields> KindFile<F> {
    /// Reads the text of `adapter_config.json` (its path for messages) into
    /// the kind's config, refusing what it cannot honour.
    pub fn parse(text: &str, path: &Path) -> Result<F::Config> {
        let file: KindFile<F> = parse_json(text, path)?;
        check_other_fields(&file.other, F::UNIMPLEMENTED_OPTIONS, path)?;
        let targets = file
            .targets
            .into_targets_checked(F::LAYER_CHECKS)?
            .modules_to_save(file.modules_to_save.unwrap_or_default());
        file.fields.into_config(file.family, targets, file.metadata)
    }
}

/// `target_modules`, `exclude_modules`, `layers_to_transform` and
/// `layers_pattern`, as PEFT writes them.
#[derive(Debug, Default, Deserialize)]
pub struct TargetFields {
    /// A list of names, a regex, or `"all-linear"`.
    #[serde(default)]
    pub target_modules: Option<OneOrMany<String>>,
    /// A list of names or a regex.
    #[serde(default)]
    pub exclude_modules: Option<OneOrMany<String>>,
    /// Layer indices to keep.
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// Segment names the layer index follows.
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
}

/// The checks of `layers_to_transform` and `layers_pattern` a PEFT 0.21
/// config makes when it is built (`__post_init__`, which
/// `PeftConfig.from_pretrained` runs too), by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerChecks {
    /// `LoraConfig`'s: a string `target_modules` (a regex or
    /// `"all-linear"`) refuses `layers_to_transform` and `layers_pattern`
    /// (any value but null, even `[]`), and a non-empty `layers_pattern`
    /// needs `layers_to_transform`.
    Lora,
    /// `LoHaConfig`'s and `LoKrConfig`'s: a non-empty `layers_pattern`
    /// needs `layers_to_transform`.
    PatternNeedsLayers,
    /// `IA3Config`'s: it has no such fields (PEFT 0.21 drops them as
    /// unknown keys and never filters IA³ targets by layer), so they are
    /// ignored.
    None,
}

impl TargetFields {
    /// The targets these fields describe, with PEFT's rules and
    /// `LoraConfig`'s checks ([`into_targets_checked`](Self::into_targets_checked)
    /// with [`LayerChecks::Lora`]).
    pub fn into_targets(self) -> Result<Targets> {
        self.into_targets_checked(LayerChecks::Lora)
    }

    /// The targets these fields describe, with PEFT's rules: a list is exact
    /// paths or dotted suffixes, a string is a whole-path regex, and
    /// `"all-linear"` is [`all_linear()`]; `layers_to_transform` keeps the
    /// layers listed (an empty list is no filter), their index read after
    /// `layers_pattern` (an empty one, `[]` or `""`, is no pattern: PEFT's
    /// default rule). Refuses with [`PeftError::InvalidConfig`] what the
    /// kind's PEFT config refuses (`checks`). Where a kind's PEFT config
    /// accepts a regex string with a layer filter, PEFT's matching never
    /// reads the filter (its regex branch returns first), so it is ignored
    /// here too; `"all-linear"` becomes a list of names in PEFT, so the
    /// filter applies to it.
    pub fn into_targets_checked(mut self, checks: LayerChecks) -> Result<Targets> {
        let string_target = matches!(self.target_modules, Some(OneOrMany::One(_)));
        let pattern_set = match &self.layers_pattern {
            None => false,
            Some(OneOrMany::One(pattern)) => !pattern.is_empty(),
            Some(OneOrMany::Many(patterns)) => !patterns.is_empty(),
        };
        let invalid = |field: &'static str, value: String, reason: &'static str| PeftError::InvalidConfig {
            field,
            value: capped_text(&value),
            reason,
        };
        if checks == LayerChecks::Lora && string_target {
            let set = [
                (
                    "layers_to_transform",
                    self.layers_to_transform.as_ref().map(OneOrMany::to_json),
                ),
                ("layers_pattern", self.layers_pattern.as_ref().map(OneOrMany::to_json)),
            ];
            if let Some((field, Some(value))) = set.into_iter().find(|(_, value)| value.is_some()) {
                return Err(invalid(
                    field,
                    value.to_string(),
                    "cannot be used when `target_modules` is a string (a regex or \"all-linear\"), \
                     as PEFT's LoraConfig refuses it; list the module names instead",
                ));
            }
        }
        if checks != LayerChecks::None && pattern_set && self.layers_to_transform.is_none() {
            return Err(invalid(
                "layers_pattern",
                self.layers_pattern
                    .as_ref()
                    .map_or(Value::Null, OneOrMany::to_json)
                    .to_string(),
                "is set but `layers_to_transform` is not; PEFT refuses it (\"When `layers_pattern` is specified, \
                 `layers_to_transform` must also be specified.\")",
            ));
        }
        if checks == LayerChecks::None {
            self.layers_to_transform = None;
            self.layers_pattern = None;
        }
        let regex_target =
            matches!(&self.target_modules, Some(OneOrMany::One(s)) if !s.eq_ignore_ascii_case("all-linear"));
        let mut targets = match self.target_modules {
            None => {
                return Err(unsupported(
                    "target_modules",
                    "null".into(),
                    "PEFT's per-architecture default targets are not known here; list the modules",
                ))
            }
            // PEFT lower-cases the string before comparing.
            Some(OneOrMany::One(s)) if s.eq_ignore_ascii_case("all-linear") => all_linear(),
            Some(OneOrMany::One(pattern)) => regex(&pattern),
            Some(OneOrMany::Many(names)) => modules(names),
        };
        match self.exclude_modules {
            None => {}
            Some(OneOrMany::One(pattern)) => targets = targets.exclude_regex(&pattern),
            Some(OneOrMany::Many(names)) => targets = targets.exclude(names),
        }
        // An empty list is no filter, as in PEFT (a falsy value); PEFT's
        // regex branch never reads the filter.
        if let Some(layers) = self
            .layers_to_transform
            .map(OneOrMany::into_vec)
            .filter(|l| !l.is_empty() && !regex_target)
        {
            targets = targets.layers(layers);
            // An empty pattern ([] or "") is none: PEFT's default rule.
            if let Some(patterns) = self.layers_pattern.filter(|_| pattern_set) {
                targets = targets.layers_pattern(patterns.into_vec());
            }
        }
        Ok(targets)
    }
}

/// A value PEFT accepts as one item or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single item.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: Clone + Into<Value>> OneOrMany<T> {
    /// The value as JSON, as it was written.
    pub fn to_json(&self) -> Value {
        match self {
            OneOrMany::One(item) => item.clone().into(),
            OneOrMany::Many(items) => Value::from(items.clone()),
        }
    }
}

impl<T> OneOrMany<T> {
    /// The items as a list.
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(item) => vec![item],
            OneOrMany::Many(items) => items,
        }
    }
}

/// PEFT's descriptive config fields, saved as given and read back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PeftMetadata {
    /// `task_type` (`"CAUSAL_LM"`, ...).
    #[serde(default)]
    pub task_type: Option<String>,
    /// `base_model_name_or_path`.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// `revision`.
    #[serde(default)]
    pub revision: Option<String>,
}

impl PeftMetadata {
    /// Writes the three fields (null when unset) into a config's fields.
    pub fn write_fields(&self, fields: &mut serde_json::Map<String, Value>) {
        for (key, value) in [
            ("task_type", &self.task_type),
            ("base_model_name_or_path", &self.base_model_name_or_path),
            ("revision", &self.revision),
        ] {
            fields.insert(key.to_owned(), optional(value));
        }
    }
}

/// The saved fields every kind writes alike: `peft_type`, PEFT's
/// `exclude_modules`, `layers_to_transform`, `layers_pattern` and
/// `modules_to_save` for `targets` (null when empty), `inference_mode`
/// (true) and the [`PeftMetadata`]. `target_modules` is filled in by
/// saving, with the exact list of adapted modules (which keeps the layer
/// filters only where PEFT, reading them beside the list, adapts the same
/// modules).
pub fn saved_fields(peft_type: &str, targets: &Targets, metadata: &PeftMetadata) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("peft_type".into(), Value::from(peft_type));
    fields.insert("exclude_modules".into(), targets.exclude_modules_json());
    let (layers, pattern) = targets.layer_filters_json();
    fields.insert("layers_to_transform".into(), layers);
    fields.insert("layers_pattern".into(), pattern);
    let saved_modules = targets.saved_modules();
    fields.insert(
        "modules_to_save".into(),
        match saved_modules {
            [] => Value::Null,
            names => Value::from(names.to_vec()),
        },
    );
    fields.insert("inference_mode".into(), Value::Bool(true));
    metadata.write_fields(&mut fields);
    fields
}

/// Builder methods for the [`PeftMetadata`] of any adapter config.
pub trait WithMetadata: Sized {
    /// The config's metadata.
    fn metadata_mut(&mut self) -> &mut PeftMetadata;

    /// Sets `task_type` (`"CAUSAL_LM"`, ...).
    fn task_type(mut self, task_type: &str) -> Self {
        self.metadata_mut().task_type = Some(task_type.to_owned());
        self
    }

    /// Sets `base_model_name_or_path`.
    fn base_model(mut self, name_or_path: &str) -> Self {
        self.metadata_mut().base_model_name_or_path = Some(name_or_path.to_owned());
        self
    }

    /// Sets `revision`.
    fn revision(mut self, revision: &str) -> Self {
        self.metadata_mut().revision = Some(revision.to_owned());
        self
    }
}

/// Fields that describe the file rather than the computation.
pub const METADATA_FIELDS: &[&str] = &[
    "peft_type",
    "peft_version",
    "auto_mapping",
    "inference_mode",
    "megatron_core",
    "qalora_group_size",
    "task_type",
    "base_model_name_or_path",
    "revision",
];

/// Checks the fields of a config file that its kind's parser does not read
/// (`other`):
///
/// - PEFT options of this kind that are not implemented here (`unimplemented`)
///   are refused unless set to their "off" value (null, false, `{}`, `[]`):
///   ignoring one that is on would compute something else than PEFT does;
/// - descriptive fields ([`METADATA_FIELDS`]) are accepted;
/// - any other field is one this PEFT version does not know (a newer PEFT
///   saved it): ignored with a warning through the `log` crate, as PEFT's
///   `from_pretrained` ignores unexpected keys with a warning.
pub fn check_other_fields(other: &BTreeMap<String, Value>, unimplemented: &[&str], path: &Path) -> Result<()> {
    let mut unknown = Vec::new();
    for (field, value) in other {
        if METADATA_FIELDS.contains(&field.as_str()) {
            continue;
        }
        if !unimplemented.contains(&field.as_str()) {
            unknown.push(field.as_str());
            continue;
        }
        let off = match value {
            Value::Null | Value::Bool(false) => true,
            Value::Array(items) => items.is_empty(),
            Value::Object(fields) => fields.is_empty(),
            _ => false,
        };
        if !off {
            return Err(unsupported(
                field,
                value.to_string(),
                "this PEFT option is not implemented",
            ));
        }
    }
    if !unknown.is_empty() {
        let kind = other.get("peft_type").and_then(Value::as_str).unwrap_or("adapter");
        log::warn!(
            "{}: ignoring field(s) {unknown:?} that a {kind} config of PEFT 0.21 does not have \
             (saved by a newer PEFT?); PEFT ignores unexpected fields the same way",
            path.display()
        );
    }
    Ok(())
}

/// [`PeftError::UnsupportedOption`], the value cut to a readable length
/// (a `modules_to_save` list can be long).
pub fn unsupported(field: &str, value: String, reason: &'static str) -> PeftError {
    PeftError::UnsupportedOption {
        field: field.to_owned(),
        value: capped_text(&value),
        reason,
    }
}

/// `deserialize_with` for a JSON object (or null) read as a list of entries
/// in file order: PEFT picks the first matching `rank_pattern` key in that order.
pub fn ordered_map<'de, D, V>(deserializer: D) -> ::core::result::Result<Vec<(String, V)>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> SerdeVisitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E: de::Error>(self) -> ::core::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> ::core::result::Result<Self::Value, A::Error> {
            let mut entries: Vec<(String, V)> = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, V>()? {
                // A repeated key keeps its first place and takes the last
                // value, as Python's json.load builds the dict PEFT reads.
                match entries.iter_mut().find(|(k, _)| *k == key) {
                    Some(entry) => entry.1 = value,
                    None => entries.push((key, value)),
                }
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_any(Entries(PhantomData))
}

/// The value of the first `(pattern, value)` whose regex matches a dotted
/// suffix of `path`, as PEFT's `get_pattern_key` picks `rank_pattern` and
/// `alpha_pattern` entries (in file order).
pub fn pattern_value<T: Copy>(patterns: &[(String, T)], path: &str) -> Result<Option<T>> {
    for (pattern, value) in patterns {
        let regex =
            regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|cause| PeftError::InvalidRegex {
                pattern: pattern.clone(),
                cause,
            })?;
        if regex.is_match(path) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// An integral value as a JSON integer (PEFT writes `lora_alpha: 8`), any
/// other as the shortest decimal that reads back as the same `f64`.
pub fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        Value::from(value as i64)
    } else {
        serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
    }
}

/// A float that came from an `f32` field (dropout) as JSON: values that are
/// an `f32` print as its shortest decimal, `0.05`, not `0.05000000074505806`
/// (read back into the `f32` field, it gives the same `f32`). Use [`number`]
/// for `f64` fields.
pub fn float(value: f64) -> Value {
    let single = value as f32;
    let value = if f64::from(single) == value {
        single.to_string().parse().unwrap_or(value)
    } else {
        value
    };
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

/// `Some(text)` as a JSON string, `None` as null.
pub fn optional(value: &Option<String>) -> Value {
    value.as_deref().map_or(Value::Null, Value::from)
}

#[cfg(test)]
mod tests {
    use super::{float, number};

    #[test]
    fn numbers_print_as_python_does() {
        assert_eq!(number(8.0).to_string(), "8");
        assert_eq!(number(2.5).to_string(), "2.5");
        assert_eq!(float(f64::from(0.05f32)).to_string(), "0.05");
        assert_eq!(float(0.0).to_string(), "0.0");
        assert_eq!(float(0.1).to_string(), "0.1");
        // An f64 that happens to be an f32 reads back as itself.
        for value in [
            555555555555555555555555555555555.0,
            5.5555555555555556e32,
            1e-30,
            0.1 + 0.2,
        ] {
            let text = number(value).to_string();
            assert_eq!(text.parse::<f64>().unwrap(), value, "{text}");
        }
    }

    #[test]
    fn repeated_pattern_keys_keep_their_place_and_last_value() {
        #[derive(serde::Deserialize)]
        struct Patterns {
            #[serde(deserialize_with = "super::ordered_map")]
            rank_pattern: Vec<(String, usize)>,
        }
        let parsed: Patterns = serde_json::from_str(r#"{"rank_pattern": {"q": 1, "v": 7, "q": 2}}"#).unwrap();
        assert_eq!(parsed.rank_pattern, [("q".to_owned(), 2), ("v".to_owned(), 7)]);
    }
}
