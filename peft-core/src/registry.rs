//! Adapter kinds, registered with the `inventory` crate and keyed by PEFT's
//! `peft_type`, so that loading dispatches on `adapter_config.json`.
//!
//! A crate outside peft-core adds a kind of its own with
//! [`register_adapter_kind!`](crate::register_adapter_kind): a config type
//! implementing [`AdapterConfig`] and a function that parses it from the JSON
//! text of `adapter_config.json`.

use std::path::Path;

use crate::config::AdapterConfig;
use crate::error::{PeftError, Result};

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
    /// A kind named `peft_type` (PEFT's string: `"LORA"`, `"IA3"`, ...).
    pub const fn new(peft_type: &'static str, parse: ParseConfig) -> Self {
        Self { peft_type, parse }
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

/// Registers an adapter kind: `register_adapter_kind!("MYKIND", parse_fn);`
/// where `parse_fn` is a [`ParseConfig`](crate::ParseConfig). Use it once per
/// kind, at module level, in any crate.
#[macro_export]
macro_rules! register_adapter_kind {
    ($peft_type:expr, $parse:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::AdapterKind::new($peft_type, $parse)
        }
    };
}

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
            found: peft_type.to_owned(),
            supported: kinds.iter().map(|k| k.peft_type).collect::<Vec<_>>().join(", "),
        }),
    }
}
