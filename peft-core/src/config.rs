//! What every adapter configuration offers to the model-level operations.

use candle_core::Result as CandleResult;

use crate::adapter::LinearAdapter;
use crate::error::{PeftError, Result};
use crate::linear::Linear;
use crate::targets::Targets;

/// A configuration that can build one adapter per targeted layer.
///
/// [`LoraConfig`](crate::LoraConfig) implements it; other adapter kinds do the
/// same, and [`PeftModel::add_adapter`](crate::PeftModel::add_adapter) accepts
/// any of them.
pub trait AdapterConfig {
    /// PEFT's name for the kind (`"LORA"`).
    fn peft_type(&self) -> &'static str;

    /// The layers to adapt.
    fn targets(&self) -> &Targets;

    /// Checks every field; called before the model is touched.
    fn validate(&self) -> Result<()>;

    /// Checks, before any adapter is made, that this config fits the layer
    /// at `module`. When loading, `file_values` is how many values the
    /// adapter file holds for this module: LoRA and LoHa refuse a rank larger
    /// than that ([`check_rank`]), so that a corrupt or hostile `r` cannot
    /// make loading allocate beyond the file's size. The default checks
    /// nothing.
    fn check_layer(&self, module: &str, layer: &Linear, file_values: Option<usize>) -> Result<()> {
        let _ = (module, layer, file_values);
        Ok(())
    }

    /// A fresh adapter for the linear layer at `module`, on its device and dtype.
    fn linear_adapter(&self, module: &str, layer: &Linear) -> CandleResult<Box<dyn LinearAdapter>>;

    /// The fields of PEFT's `adapter_config.json` for this config, except
    /// `target_modules`, which saving fills with the adapted modules.
    fn to_peft_config(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("peft_type".into(), self.peft_type().into());
        fields
    }
}

/// Refuses a layer that is not a plain linear layer, for adapter kinds that
/// only have a linear form (as in PEFT).
pub(crate) fn require_linear(peft_type: &str, module: &str, layer: &Linear) -> CandleResult<()> {
    if layer.kind() != crate::adaptable::LayerKind::Linear {
        candle_core::bail!(
            "{peft_type} adapters are not implemented for {:?} layers (module `{module}`)",
            layer.kind()
        );
    }
    Ok(())
}

/// Refuses a rank `r` larger than `file_values`, the number of values the
/// adapter file holds for the module: every rank-`r` factor has at least `r`
/// values, so such a file cannot match its config, and making the adapter
/// first would allocate whatever `r` asks for (`"r": 1000000000000`). Adding
/// an adapter from code (`file_values` = `None`) has no limit, as in PEFT.
pub fn check_rank(module: &str, r: usize, file_values: Option<usize>) -> Result<()> {
    match file_values {
        Some(values) if r > values => Err(PeftError::RankBeyondFile {
            module: module.to_owned(),
            r,
            values,
        }),
        _ => Ok(()),
    }
}
