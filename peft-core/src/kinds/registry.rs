//! Adapter kinds, registered with the `inventory` crate and keyed by PEFT's
//! `peft_type`, so that loading dispatches on `adapter_config.json`.
//!
//! A crate outside peft-core adds a kind of its own the way the kinds in
//! this folder do: a config type implementing [`AdapterConfig`] and
//! [`PeftConfig`] (its `peft_type` and parser), registered with one line,
//! [`register_adapter_kind!(MyConfig);`](crate::register_adapter_kind).

use std::path::Path;

use serde::de::Error as _;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::kinds::config::{AdapterConfig, PeftConfig};
use crate::kinds::config_file::parse_json;

/// Parses `adapter_config.json` (its text, and its path for error messages)
/// into a config of one kind.
pub type ParseConfig = fn(text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>>;

/// One registered adapter kind.
#[derive(Debug)]
pub struct AdapterKind {
    peft_type: &'static str,
    parse: ParseConfig,
}

impl AdapterKind {
    /// A kind named `peft_type` (PEFT's string: `"LORA"`, `"IA3"`, ...)
    /// whose files `parse` reads.
    pub const fn new(peft_type: &'static str, parse: ParseConfig) -> Self {
        Self { peft_type, parse }
    }

    /// The kind of the config type `C`: its `PEFT_TYPE` and its parser.
    pub const fn of<C: PeftConfig>() -> Self {
        Self::new(C::PEFT_TYPE, parse_boxed::<C>)
    }

    /// PEFT's name for the kind.
    pub fn peft_type(&self) -> &'static str {
        self.peft_type
    }

    /// Parses a config file of this kind.
    pub fn parse(&self, text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>> {
        (self.parse)(text, path)
    }
}

inventory::collect!(AdapterKind);

/// [`PeftConfig::from_json`], boxed as any config.
fn parse_boxed<C: PeftConfig>(text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>> {
    Ok(Box::new(C::from_json(text, path)?))
}

/// Registers an adapter kind: `register_adapter_kind!(MyConfig);` where
/// `MyConfig` implements [`PeftConfig`](crate::PeftConfig), or
/// `register_adapter_kind!("MYKIND", parse_fn);` with a
/// [`ParseConfig`](crate::ParseConfig). Use it once per kind, at module
/// level, in any crate.
#[macro_export]
macro_rules! register_adapter_kind {
    ($config:ty $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::AdapterKind::of::<$config>()
        }
    };
    ($peft_type:expr, $parse:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::AdapterKind::new($peft_type, $parse)
        }
    };
}

/// Makes one of this crate's kinds loadable, in one line:
/// `kind!(LohaConfig, PEFT_TYPE, LohaFields);` implements [`PeftConfig`]
/// (its `peft_type` and the fields it reads from `adapter_config.json`) and
/// registers it.
macro_rules! kind {
    ($config:ty, $peft_type:expr, $fields:ty) => {
        impl $crate::kinds::config::PeftConfig for $config {
            const PEFT_TYPE: &'static str = $peft_type;
            type Fields = $fields;
        }

        $crate::register_adapter_kind!($config);
    };
}
pub(crate) use kind;

/// Every registered kind, sorted by `peft_type`. Two registrations of the
/// same `peft_type` are an error: which one would load is not knowable.
pub fn adapter_kinds() -> Result<Vec<&'static AdapterKind>> {
    let mut kinds: Vec<&'static AdapterKind> = inventory::iter::<AdapterKind>.into_iter().collect();
    kinds.sort_by_key(|kind| kind.peft_type);
    if let Some(pair) = kinds.windows(2).find(|pair| pair[0].peft_type == pair[1].peft_type) {
        return Err(PeftError::DuplicateAdapterKind {
            peft_type: pair[0].peft_type.to_owned(),
        });
    }
    Ok(kinds)
}

/// The kind registered under `peft_type`.
pub fn adapter_kind(peft_type: &str) -> Result<&'static AdapterKind> {
    let kinds = adapter_kinds()?;
    match kinds.iter().find(|kind| kind.peft_type == peft_type) {
        Some(kind) => Ok(kind),
        None => Err(PeftError::UnsupportedPeftType {
            found: crate::error::capped_text(peft_type),
            supported: kinds.iter().map(|k| k.peft_type).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Parses `adapter_config.json` by dispatching on its `peft_type` to the
/// registered adapter kind.
pub fn parse_config(text: &str, path: &Path) -> Result<Box<dyn AdapterConfig>> {
    #[derive(Deserialize)]
    struct PeftType {
        peft_type: Option<String>,
    }
    let value: Value = parse_json(text, path)?;
    if !value.is_object() {
        return Err(PeftError::Json {
            path: path.to_path_buf(),
            field: None,
            cause: serde_json::Error::custom(format!("expected a JSON object, found {}", json_kind(&value))),
        });
    }
    let kind: PeftType = parse_json(text, path)?;
    adapter_kind(kind.peft_type.as_deref().unwrap_or("null"))?.parse(text, path)
}

/// What kind of JSON value `value` is, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
