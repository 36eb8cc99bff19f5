//! The model card: the YAML front matter of the adapter folder's
//! `README.md`, read with serde_yaml_ng, giving the values of the keys
//! gguf-py's `Metadata` reads (strings, nulls and lists of them).

use std::fmt;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_yaml_ng::Value as Yaml;

/// A front-matter value of the kinds gguf-py reads: a string, a null, or a
/// list of them. (Numbers and booleans are read as strings, the text they
/// are written with: where PyYAML would type them, gguf-py cannot write
/// them either.)
#[derive(Debug, Clone)]
pub(super) enum CardValue {
    Null,
    Str(String),
    List(Vec<Option<String>>),
}

/// The keys of a model card gguf-py's `Metadata` reads.
const CARD_KEYS: &[&str] = &[
    "name",
    "author",
    "version",
    "organization",
    "description",
    "finetune",
    "basename",
    "size_label",
    "url",
    "doi",
    "uuid",
    "repo_url",
    "model_name",
    "model_author",
    "model_version",
    "model_organization",
    "model_description",
    "model_finetune",
    "model_basename",
    "model_size_label",
    "model_url",
    "model_doi",
    "model_uuid",
    "model_repo_url",
    "model_creator",
    "model_type",
    "base_model",
    "base_models",
    "base_model_sources",
    "datasets",
    "dataset",
    "dataset_sources",
    "license",
    "license_name",
    "license_link",
    "tags",
    "pipeline_tag",
    "languages",
    "language",
];

/// `Metadata.load_model_card`: the YAML between a first line `---` and the
/// next `---` of `README.md`, its top-level keys gguf-py reads with their
/// string, null or list values (see [`parse_front_matter`]). Other values
/// of those keys (a nested mapping, a nested list, a tagged value) are left
/// out with a note; so is a front matter that is not a YAML mapping.
pub(super) fn read_model_card(dir: &Path, notes: &mut Vec<String>) -> Vec<(String, CardValue)> {
    let path = dir.join("README.md");
    if !path.is_file() {
        return Vec::new();
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        notes.push(format!("{}: not UTF-8; its model card is not read", path.display()));
        return Vec::new();
    };
    // Python's text mode reads every line ending as \n.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let Some(rest) = text.strip_prefix("---\n") else {
        return Vec::new();
    };
    let front = rest.find("---\n").map_or(rest, |end| &rest[..end]);
    parse_front_matter(front, &path, notes)
}

/// How a value is read: its shape as serde_yaml_ng types it.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Null,
    /// A string, a number or a boolean.
    Scalar,
    /// A list of nulls and scalars.
    List,
}

impl Shape {
    /// The shape of a value gguf-py reads, `None` for another value (a
    /// mapping, a list holding lists or mappings, a tagged value).
    fn of(value: &Yaml) -> Option<Self> {
        let scalar = |v: &Yaml| matches!(v, Yaml::String(_) | Yaml::Number(_) | Yaml::Bool(_));
        match value {
            Yaml::Null => Some(Shape::Null),
            Yaml::Sequence(items) if items.iter().all(|item| item.is_null() || scalar(item)) => Some(Shape::List),
            value if scalar(value) => Some(Shape::Scalar),
            _ => None,
        }
    }
}

/// The front matter's entries whose keys gguf-py reads ([`CARD_KEYS`]), in
/// file order; a key given twice is there twice (PyYAML keeps the last, as
/// the metadata's lookups do).
///
/// Two reads of the YAML: the first deserializes each value into a
/// [`serde_yaml_ng::Value`], for its shape; the second reads the scalars of
/// the values kept as strings, as written. (A `Value` types plain scalars,
/// and the text of a number is lost there: `version: 1.10` is the float
/// 1.1.)
fn parse_front_matter(front: &str, path: &Path, notes: &mut Vec<String>) -> Vec<(String, CardValue)> {
    let not_read = |error: serde_yaml_ng::Error| {
        format!(
            "{}: its front matter is not a YAML mapping ({error}); the model card is not read",
            path.display()
        )
    };
    let entries = match serde_yaml_ng::Deserializer::from_str(front).deserialize_any(CardEntries) {
        Ok(entries) => entries,
        Err(error) => {
            notes.push(not_read(error));
            return Vec::new();
        }
    };
    let shapes: Vec<Option<Shape>> = entries
        .iter()
        .map(|entry| {
            let (key, value) = entry.as_ref()?;
            let shape = Shape::of(value);
            if shape.is_none() {
                notes.push(format!(
                    "{}: model card field `{key}` is not a string or a list of strings this export reads; not written",
                    path.display()
                ));
            }
            shape
        })
        .collect();
    let texts = match EntryTexts(&shapes).deserialize(serde_yaml_ng::Deserializer::from_str(front)) {
        Ok(texts) => texts,
        Err(error) => {
            notes.push(not_read(error));
            return Vec::new();
        }
    };
    entries
        .into_iter()
        .zip(texts)
        .filter_map(|(entry, text)| Some((entry?.0, text?)))
        .collect()
}

/// The first read: the top-level entries in order, a card key's with its
/// value, `None` for the others (whose values are skipped unread). An
/// empty front matter has none.
struct CardEntries;

impl<'de> Visitor<'de> for CardEntries {
    type Value = Vec<Option<(String, Yaml)>>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a mapping of model card fields")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Yaml>()? {
            match key.as_str().filter(|key| CARD_KEYS.contains(key)) {
                Some(key) => entries.push(Some((key.to_owned(), map.next_value::<Yaml>()?))),
                None => {
                    map.next_value::<IgnoredAny>()?;
                    entries.push(None);
                }
            }
        }
        Ok(entries)
    }
}

/// The second read: the values of the entries the first read kept, by
/// their shapes (one per entry, in order), their scalars read as strings
/// (serde_yaml_ng gives any scalar as its text when asked for a string).
struct EntryTexts<'a>(&'a [Option<Shape>]);

impl<'de> DeserializeSeed<'de> for EntryTexts<'_> {
    type Value = Vec<Option<CardValue>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntryTexts<'_> {
    type Value = Vec<Option<CardValue>>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a mapping of model card fields")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::with_capacity(self.0.len());
        let mut shapes = self.0.iter();
        while map.next_key::<IgnoredAny>()?.is_some() {
            values.push(match shapes.next().copied().flatten() {
                Some(Shape::Scalar) => Some(CardValue::Str(map.next_value()?)),
                Some(Shape::List) => Some(CardValue::List(map.next_value()?)),
                Some(Shape::Null) => {
                    map.next_value::<IgnoredAny>()?;
                    Some(CardValue::Null)
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                    None
                }
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_reads_the_values_model_cards_hold() {
        let mut notes = Vec::new();
        let front = "base_model: ''\nlicense: mit # a comment\ntags:\n- 'base_model:adapter:'\n- \"a \\\"b\\\"\"\n\
                     language: [en, 'fr']\nmodel-index:\n- name: x\n  results: []\ndescription: one\n  two\n";
        let card = parse_front_matter(front, Path::new("README.md"), &mut notes);
        let get = |key: &str| card.iter().find(|(k, _)| k == key).map(|(_, v)| format!("{v:?}"));
        assert_eq!(get("base_model").as_deref(), Some("Str(\"\")"));
        assert_eq!(get("license").as_deref(), Some("Str(\"mit\")"));
        assert_eq!(
            get("tags").as_deref(),
            Some("List([Some(\"base_model:adapter:\"), Some(\"a \\\"b\\\"\")])")
        );
        assert_eq!(get("language").as_deref(), Some("List([Some(\"en\"), Some(\"fr\")])"));
        assert_eq!(get("description").as_deref(), Some("Str(\"one two\")"));
        // A nested mapping under a key gguf-py does not read: left out quietly.
        assert_eq!(get("model-index"), None);
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn numbers_and_booleans_keep_their_text_and_other_values_are_noted() {
        let mut notes = Vec::new();
        let front =
            "version: 1.10\nname: 0x1F\nauthor: True\ntags: [2.50, yes, ~]\nlicense: mit\nlicense: apache-2.0\n\
                     description: |\n  two\n  lines\nlanguage: [en,\n  fr]\nbase_model:\n  name: x\ndatasets: [[a]]\n";
        let card = parse_front_matter(front, Path::new("README.md"), &mut notes);
        let all = |key: &str| {
            card.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| format!("{v:?}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(all("version"), ["Str(\"1.10\")"]);
        assert_eq!(all("name"), ["Str(\"0x1F\")"]);
        assert_eq!(all("author"), ["Str(\"True\")"]);
        assert_eq!(all("tags"), ["List([Some(\"2.50\"), Some(\"yes\"), None])"]);
        // A key given twice is there twice; the metadata takes the last.
        assert_eq!(all("license"), ["Str(\"mit\")", "Str(\"apache-2.0\")"]);
        assert_eq!(all("description"), ["Str(\"two\\nlines\\n\")"]);
        assert_eq!(all("language"), ["List([Some(\"en\"), Some(\"fr\")])"]);
        assert!(all("base_model").is_empty() && all("datasets").is_empty());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("`base_model` is not a string") && notes[1].contains("`datasets`"));

        // Not YAML: the whole card is left out, with a note.
        let mut notes = Vec::new();
        assert!(parse_front_matter("name: a: b\nlicense: mit\n", Path::new("README.md"), &mut notes).is_empty());
        assert!(notes.len() == 1 && notes[0].contains("not read"), "{notes:?}");
        // Empty, or comments only: nothing, quietly.
        let mut notes = Vec::new();
        assert!(parse_front_matter("# a comment\n", Path::new("README.md"), &mut notes).is_empty());
        assert!(parse_front_matter("", Path::new("README.md"), &mut notes).is_empty());
        assert!(notes.is_empty(), "{notes:?}");
    }
}
