//! The PEFT adapter: `adapter_config.json`'s settings (the kinds and
//! settings llama.cpp cannot apply are refused), and the LoRA pairs of
//! `adapter_model.safetensors`, their shapes checked.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::Value as Json;

use crate::error::{ModelError, Result};

/// The adapter's config file, as PEFT writes it.
const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights, as PEFT writes them.
pub(super) const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// What `adapter_config.json` says that the export uses or refuses.
pub(super) struct AdapterSettings {
    /// `lora_alpha`.
    pub(super) alpha: f64,
    /// aLoRA's `alora_invocation_tokens` (written as newer converters do).
    pub(super) alora_tokens: Option<Vec<u32>>,
}

impl AdapterSettings {
    /// Reads `adapter_config.json`, refusing kinds and settings llama.cpp
    /// cannot apply. The kind is checked first, before anything of the base.
    pub(super) fn read(adapter_dir: &Path) -> Result<Self> {
        let path = adapter_dir.join(ADAPTER_CONFIG);
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                what: "the adapter's config (adapter_config.json, as PEFT's save_pretrained writes it)",
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|cause| ModelError::Io {
            path: path.clone(),
            cause,
        })?;
        let config: Json = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
            path: path.clone(),
            cause,
        })?;
        let setting = |field: &str, value: &Json, reason: &str| ModelError::ExportSetting {
            path: path.clone(),
            field: field.to_owned(),
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        let peft_type = config.get("peft_type").unwrap_or(&Json::Null);
        let kind = match peft_type.as_str() {
            Some("LORA") if config.get("use_dora").and_then(Json::as_bool) == Some(true) => Some("DoRA"),
            Some("LORA") => None,
            Some("LOHA") => Some("LoHa"),
            Some("LOKR") => Some("LoKr"),
            Some("IA3") => Some("IA³"),
            Some(other) => Some(other),
            None => {
                return Err(setting(
                    "peft_type",
                    peft_type,
                    "a PEFT adapter config names its kind in peft_type",
                ))
            }
        };
        if let Some(kind) = kind {
            return Err(ModelError::ExportKind {
                path,
                kind: kind.to_owned(),
            });
        }
        let flag = |field: &str| config.get(field).and_then(Json::as_bool) == Some(true);
        if flag("use_rslora") {
            return Err(setting(
                "use_rslora",
                &Json::Bool(true),
                "rsLoRA scales the update by alpha / sqrt(r), and llama.cpp always scales by adapter.lora.alpha / r \
                 (convert_lora_to_gguf.py writes such a file anyway, with the wrong scale)",
            ));
        }
        if flag("lora_bias") {
            return Err(setting(
                "lora_bias",
                &Json::Bool(true),
                "llama.cpp's LoRA adapters have no bias (the script refuses the lora_B.bias tensors)",
            ));
        }
        if let Some(bias) = config.get("bias").filter(|b| b.as_str().is_some_and(|b| b != "none")) {
            return Err(setting(
                "bias",
                bias,
                "the adapter trained base biases, and a llama.cpp LoRA adapter holds no bias; merge it into the base \
                 with `peft merge` and convert the merged model instead",
            ));
        }
        let alpha_value = config.get("lora_alpha").unwrap_or(&Json::Null);
        let Some(alpha) = alpha_value.as_f64() else {
            return Err(setting("lora_alpha", alpha_value, "a LoRA config needs a number here"));
        };
        if alpha == 0.0 {
            return Err(setting(
                "lora_alpha",
                alpha_value,
                "llama.cpp reads alpha 0 as \"no alpha\" and applies the update unscaled, where PEFT scales it by 0",
            ));
        }
        if let Some(patterns) = config.get("alpha_pattern").and_then(Json::as_object) {
            for (pattern, value) in patterns {
                if value.as_f64() != Some(alpha) {
                    return Err(setting(
                        "alpha_pattern",
                        &Json::Object(patterns.clone()),
                        &format!(
                            "`{pattern}` sets alpha {value} where lora_alpha is {alpha}: a LoRA GGUF holds one alpha \
                             (adapter.lora.alpha) for every layer"
                        ),
                    ));
                }
            }
        }
        if let Some(init) = config.get("init_lora_weights").and_then(Json::as_str) {
            let lowered = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|p| lowered.starts_with(p))
            {
                return Err(setting(
                    "init_lora_weights",
                    &Json::String(init.to_owned()),
                    "this initialisation changes the base weights too, and llama.cpp adds the LoRA to the unchanged base; \
                     save the adapter with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA",
                ));
            }
        }
        let tokens_value = config.get("alora_invocation_tokens").unwrap_or(&Json::Null);
        let alora_tokens = match tokens_value {
            Json::Null => None,
            Json::Array(items) => {
                let tokens: Option<Vec<u32>> = items
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect();
                match tokens {
                    Some(tokens) if tokens.is_empty() => None,
                    Some(tokens) => Some(tokens),
                    None => {
                        return Err(setting(
                            "alora_invocation_tokens",
                            tokens_value,
                            "token ids are integers from 0",
                        ))
                    }
                }
            }
            other => return Err(setting("alora_invocation_tokens", other, "a list of token ids")),
        };
        if alora_tokens.is_none() {
            if let Some(text) = config
                .get("invocation_string")
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
            {
                return Err(setting(
                    "invocation_string",
                    &Json::String(text.to_owned()),
                    "an aLoRA activates after its invocation tokens, and this export does not tokenize; \
                     give alora_invocation_tokens in adapter_config.json",
                ));
            }
        }
        Ok(Self { alpha, alora_tokens })
    }
}

/// One LoRA pair of the adapter: the module and its two tensors' keys.
pub(super) struct LoraPair {
    /// The module path, `base_model.model.` removed (`model.layers.0.self_attn.q_proj`).
    pub(super) module: String,
    /// LoRA A's key.
    pub(super) a: String,
    /// LoRA B's key.
    pub(super) b: String,
    /// `lora_embedding_A` / `_B` (an embedding) rather than `lora_A.weight`.
    pub(super) embedding: bool,
}

/// Groups the adapter's tensors into LoRA pairs, in the order the script
/// meets them (the first of each pair in file order), skipping what it
/// skips and refusing what llama.cpp would not apply.
pub(super) fn pair_lora_tensors(path: &Path, keys: &[String], notes: &mut Vec<String>) -> Result<Vec<LoraPair>> {
    struct Partial {
        module: String,
        a: Option<String>,
        b: Option<String>,
        embedding: bool,
    }
    let tensor_error = |key: &str, reason: String| ModelError::ExportTensor {
        path: path.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    let mut partials: Vec<Partial> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut skipped = 0usize;
    for key in keys {
        let name = key.replace("base_model.model.", "");
        let split = [
            (".lora_A.weight", true, false),
            (".lora_B.weight", false, false),
            (".lora_embedding_A", true, true),
            (".lora_embedding_B", false, true),
        ]
        .into_iter()
        .find_map(|(suffix, is_a, embedding)| name.strip_suffix(suffix).map(|module| (module, is_a, embedding)));
        let Some((module, is_a, embedding)) = split else {
            if name.ends_with(".base_layer.weight") {
                // The base weights PEFT saves beside LoRA on embeddings.
                skipped += 1;
                continue;
            }
            return Err(tensor_error(key, non_lora_reason(&name)));
        };
        let slot = *index.entry(module.to_owned()).or_insert_with(|| {
            partials.push(Partial {
                module: module.to_owned(),
                a: None,
                b: None,
                embedding,
            });
            partials.len() - 1
        });
        let partial = &mut partials[slot];
        if partial.embedding != embedding {
            return Err(tensor_error(
                key,
                format!("`{module}` has both linear (lora_A/lora_B) and embedding (lora_embedding_A/B) factors"),
            ));
        }
        let half = if is_a { &mut partial.a } else { &mut partial.b };
        *half = Some(key.clone());
    }
    if skipped > 0 {
        notes.push(format!(
            "skipped {skipped} `.base_layer.weight` tensor(s) of the adapter (base weights, as convert_lora_to_gguf.py skips them)"
        ));
    }
    let mut pairs = Vec::with_capacity(partials.len());
    for partial in partials {
        match (partial.a, partial.b) {
            (Some(a), Some(b)) => pairs.push(LoraPair {
                module: partial.module,
                a,
                b,
                embedding: partial.embedding,
            }),
            (Some(key), None) => {
                return Err(tensor_error(
                    &key,
                    format!("`{}` has no LoRA B to go with it", partial.module),
                ));
            }
            (None, Some(key)) => {
                return Err(tensor_error(
                    &key,
                    format!("`{}` has no LoRA A to go with it", partial.module),
                ));
            }
            (None, None) => {}
        }
    }
    if pairs.is_empty() {
        return Err(ModelError::ExportTensor {
            path: path.to_path_buf(),
            key: String::new(),
            reason: "no LoRA tensors (lora_A / lora_B) in the adapter".to_owned(),
        });
    }
    Ok(pairs)
}

/// Why a tensor that is not a LoRA factor cannot be exported.
fn non_lora_reason(name: &str) -> String {
    if name.contains("lora_magnitude_vector") {
        "DoRA's magnitude vector: llama.cpp applies plain LoRA only".to_owned()
    } else if name.contains(".lora_B.bias") || name.contains(".lora_A.bias") {
        "a LoRA bias: llama.cpp's LoRA adapters have none".to_owned()
    } else if name.contains("_layernorm") || name.contains(".norm") || name.contains("_norm") {
        "a full norm weight (modules_to_save, or norms mergekit extracts): llama.cpp ignores everything but \
         lora_a / lora_b pairs when it loads an adapter, so the trained norm would be lost"
            .to_owned()
    } else if name.contains("trainable_tokens") {
        "trainable token embeddings (trainable_token_indices): llama.cpp's LoRA adapters hold lora_a / lora_b pairs only"
            .to_owned()
    } else {
        "not a LoRA factor (lora_A / lora_B): a full weight saved with modules_to_save, or another adapter kind; \
         llama.cpp loads lora_a / lora_b pairs only"
            .to_owned()
    }
}

/// Checks a pair's shapes: 2-D, the same rank, and the sizes the base's
/// config gives the module (`expected` is (out, in), B's rows and A's
/// columns).
pub(super) fn check_pair(path: &Path, pair: &LoraPair, a: &Tensor, b: &Tensor, expected: (usize, usize)) -> Result<()> {
    let (a_dims, b_dims) = (a.dims(), b.dims());
    let tensor_error = |key: &str, reason: String| ModelError::ExportTensor {
        path: path.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    if a_dims.len() != 2 {
        return Err(tensor_error(
            &pair.a,
            format!("shape {a_dims:?}: llama.cpp's LoRA pairs are matrices (LoRA on convolutions is not exported)"),
        ));
    }
    if b_dims.len() != 2 {
        return Err(tensor_error(
            &pair.b,
            format!("shape {b_dims:?}: llama.cpp's LoRA pairs are matrices (LoRA on convolutions is not exported)"),
        ));
    }
    let rank = a_dims[0];
    let shape_error =
        |key: &str, expected: [usize; 2], found: [usize; 2], what: &'static str| ModelError::ExportShape {
            path: path.to_path_buf(),
            key: key.to_owned(),
            expected,
            found,
            what,
        };
    let (a_what, b_what) = if pair.embedding {
        (
            "LoRA A is [rank, vocabulary size] and the base's config.json gives the vocabulary size",
            "LoRA B is [embedding width, rank of LoRA A] and the base's config.json gives the width",
        )
    } else {
        (
            "LoRA A is [rank, the layer's inputs] and the base's config.json gives the inputs",
            "LoRA B is [the layer's outputs, rank of LoRA A] and the base's config.json gives the outputs",
        )
    };
    if a_dims[1] != expected.1 {
        return Err(shape_error(&pair.a, [rank, expected.1], [rank, a_dims[1]], a_what));
    }
    if b_dims != [expected.0, rank] {
        return Err(shape_error(&pair.b, [expected.0, rank], [b_dims[0], b_dims[1]], b_what));
    }
    Ok(())
}
