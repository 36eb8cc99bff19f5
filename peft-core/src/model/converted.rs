//! Saving a PiSSA/OLoRA adapter as a plain LoRA for the original base:
//! PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion)`.
//!
//! The model's base is `W_res = W - s·B0·A0`; the adapter, trained, adds
//! `s·B·A`. So `W_res + s·B·A = W + s·(B·A - B0·A0) = W + s'·B'·A'` with
//! `A' = [A; A0]`, `B' = [B, -B0]`, `r' = 2r` and `alpha' = 2·alpha`
//! (`√2·alpha` with rsLoRA) keeping `s' = s`.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{InModule, PeftError, Result};
use crate::io::{self, write_adapter, KEY_PREFIX};
use crate::kinds::config_file::number;
use crate::model::attach::{adapter_dir, saved_adapter};
use crate::model::PeftModel;

/// What [`PeftModel::save_adapter_converted`] does; see there.
pub(crate) fn save_converted<M: PeftModel + ?Sized>(
    model: &M,
    dir: &Path,
    name: &str,
    initial_dir: &Path,
) -> Result<()> {
    let folder = adapter_dir(dir, name)?;
    let saved = saved_adapter(model, name)?;
    let mut config = saved.config;
    let refuse = |value: String, reason: &'static str| PeftError::UnsupportedOption {
        field: "path_initial_model_for_weight_conversion".into(),
        value,
        reason,
    };
    if config.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(refuse(
            format!("adapter `{name}`"),
            "only a LoRA adapter (PiSSA, OLoRA) can be converted",
        ));
    }
    let flag = |field: &str| config.get(field).and_then(Value::as_bool).unwrap_or(false);
    let non_empty = |field: &str| {
        config
            .get(field)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    };
    if flag("use_dora") {
        // PEFT keeps only lora_A and lora_B, which would drop the magnitude.
        return Err(refuse(
            format!("adapter `{name}` (use_dora)"),
            "a DoRA adapter's magnitude has no place in the converted LoRA (PEFT drops it)",
        ));
    }
    let rslora = flag("use_rslora");
    if rslora && (non_empty("rank_pattern") || non_empty("alpha_pattern")) {
        return Err(refuse(
            format!("adapter `{name}` (use_rslora with rank_pattern or alpha_pattern)"),
            "PEFT refuses this conversion: doubling the rank changes an rsLoRA pattern's scaling",
        ));
    }
    let device = saved
        .tensors
        .first()
        .map_or(candle_core::Device::Cpu, |(_, t)| t.device().clone());
    let mut initial = io::with_adapter_files(initial_dir, |files| io::decode(files, &device))?.tensors;
    let mut tensors = Vec::with_capacity(saved.tensors.len());
    for (key, tensor) in &saved.tensors {
        let module = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.rsplit_once(".lora_").map(|(module, _)| module))
            .unwrap_or(key);
        let (is_a, is_b) = (key.ends_with(".lora_A.weight"), key.ends_with(".lora_B.weight"));
        if !is_a && !is_b {
            return Err(refuse(
                format!("tensor `{key}`"),
                "only linear LoRA factors (lora_A.weight, lora_B.weight) can be converted; \
                 PEFT drops the other tensors",
            ));
        }
        let Some(start) = initial.remove(key) else {
            return Err(PeftError::MissingTensor {
                module: module.to_owned(),
                key: format!("{key} (in {})", initial_dir.display()),
            });
        };
        if start.dims() != tensor.dims() {
            return Err(PeftError::ShapeMismatch {
                key: format!("{key} (in {})", initial_dir.display()),
                expected: tensor.dims().to_vec(),
                found: start.dims().to_vec(),
            });
        }
        let start = start.to_dtype(tensor.dtype()).in_module(module)?;
        let joined = if is_a {
            Tensor::cat(&[tensor, &start], 0)
        } else {
            Tensor::cat(&[tensor, &start.neg().in_module(module)?], 1)
        };
        tensors.push((key.clone(), joined.in_module(module)?));
    }
    if !initial.is_empty() {
        return Err(PeftError::UnexpectedTensors {
            keys: initial.into_keys().collect(),
        });
    }
    double_ranks(&mut config, rslora);
    write_adapter(&folder, config, &tensors)
}

/// PEFT's config edits for the converted adapter: `r`, `rank_pattern` and
/// `alpha_pattern` doubled, `lora_alpha` doubled (times √2 with rsLoRA,
/// whose scaling is `alpha / √r`), `init_lora_weights = true`.
fn double_ranks(config: &mut serde_json::Map<String, Value>, rslora: bool) {
    let doubled = |value: &Value, factor: f64| value.as_f64().map_or(value.clone(), |v| number(v * factor));
    if let Some(r) = config.get("r") {
        config.insert("r".into(), doubled(r, 2.0));
    }
    if let Some(alpha) = config.get("lora_alpha") {
        let factor = if rslora { std::f64::consts::SQRT_2 } else { 2.0 };
        config.insert("lora_alpha".into(), doubled(alpha, factor));
    }
    for field in ["rank_pattern", "alpha_pattern"] {
        if let Some(Value::Object(pattern)) = config.get_mut(field) {
            for value in pattern.values_mut() {
                *value = doubled(value, 2.0);
            }
        }
    }
    config.insert("init_lora_weights".into(), Value::Bool(true));
}
