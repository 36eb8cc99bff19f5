//! `peft_models::gguf::export_lora_gguf` against the GGUF files llama.cpp's
//! own `convert_lora_to_gguf.py` wrote for the same adapters
//! (`tests/fixtures/gguf_export/`, see its CASE.md): metadata (keys, types,
//! values), tensors (names, shapes, dtypes, values) read back with candle's
//! GGUF reader, and the bytes; then the inputs it refuses.

mod support;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use peft_models::gguf::{export_lora_gguf, ExportOptions, GgufReport};
use peft_models::ModelError;

use support::{fixture_path, scratch};

/// A GGUF file as candle's reader sees it: metadata as `Debug` text (the
/// variant names the type), tensors with their GGUF dtype and values.
struct Gguf {
    metadata: HashMap<String, String>,
    tensors: HashMap<String, (GgmlDType, Tensor)>,
}

fn read_gguf(path: &Path) -> Gguf {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = Content::read(&mut file).unwrap();
    let metadata = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect();
    let tensors = content
        .tensor_infos
        .iter()
        .map(|(name, info)| {
            let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            (
                name.clone(),
                (info.ggml_dtype, tensor.dequantize(&Device::Cpu).unwrap()),
            )
        })
        .collect();
    Gguf { metadata, tensors }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Exports `tests/fixtures/gguf_export/<case>/<adapter>` over the case's
/// `base/` into a scratch folder of its own (`test` tells apart tests of one
/// case, which run in parallel).
fn export_case(case: &str, adapter: &str, test: &str) -> (PathBuf, GgufReport) {
    let dir = fixture_path("gguf_export").join(case);
    let out = scratch("export_gguf", &format!("{case}-{test}")).join("adapter.gguf");
    let report = export_lora_gguf(&dir.join(adapter), &dir.join("base"), &out, &ExportOptions::default())
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    (out, report)
}

/// Our file against the converter's: the same metadata, the same tensors
/// with the same values (exactly: the export only moves f32 values), and
/// the same bytes (which also checks the order of keys and tensors).
fn assert_matches_reference(case: &str, adapter: &str) -> GgufReport {
    let (out, report) = export_case(case, adapter, "reference");
    let reference_path = fixture_path("gguf_export").join(case).join("reference.gguf");
    let ours = read_gguf(&out);
    let reference = read_gguf(&reference_path);
    assert_eq!(ours.metadata, reference.metadata, "{case}: metadata");
    let mut names: Vec<&String> = reference.tensors.keys().collect();
    names.sort();
    let mut our_names: Vec<&String> = ours.tensors.keys().collect();
    our_names.sort();
    assert_eq!(our_names, names, "{case}: tensor names");
    for name in names {
        let (dtype, expected) = &reference.tensors[name];
        let (our_dtype, got) = &ours.tensors[name];
        assert_eq!(our_dtype, dtype, "{case}: {name} dtype");
        assert_eq!(got.dims(), expected.dims(), "{case}: {name} shape");
        assert_eq!(values(got), values(expected), "{case}: {name} values");
    }
    let (our_bytes, reference_bytes) = (std::fs::read(&out).unwrap(), std::fs::read(&reference_path).unwrap());
    assert!(
        our_bytes == reference_bytes,
        "{case}: the bytes differ from reference.gguf"
    );
    // The report says what the file holds, in file order.
    assert_eq!(report.bytes, our_bytes.len() as u64);
    assert_eq!(report.tensors.len(), reference.tensors.len());
    assert_eq!(report.metadata.len(), reference.metadata.len());
    report
}

/// `tests/fixtures/<case>/adapter/adapter_model.safetensors`.
fn adapter_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn llama_matches_convert_lora_to_gguf() {
    let report = assert_matches_reference("llama", "adapter");
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.alpha, 8.0);
    assert_eq!(report.tensors[0].name, "blk.0.ffn_down.weight.lora_a");
    assert_eq!(
        report.tensors[0].source,
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );
    // q_proj's and k_proj's LoRA B are the ones permuted.
    let permuted: Vec<&str> = report
        .tensors
        .iter()
        .filter(|t| t.permuted)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        permuted,
        [
            "blk.0.attn_k.weight.lora_b",
            "blk.0.attn_q.weight.lora_b",
            "blk.1.attn_k.weight.lora_b",
            "blk.1.attn_q.weight.lora_b"
        ]
    );
}

/// The permutation, checked against the adapter itself: within each head
/// of `head_dim` rows, row `h*d + 2j + i` of the GGUF's LoRA B is row
/// `h*d + i*d/2 + j` of PEFT's (rotated halves to interleaved pairs).
#[test]
fn llama_q_and_k_rows_are_interleaved_per_head() {
    let (out, _) = export_case("llama", "adapter", "permutation");
    let ours = read_gguf(&out);
    let adapter = adapter_tensors(&fixture_path("gguf_export/llama/adapter"));
    // 4 query heads and 2 key/value heads of head_dim 8 (base/config.json).
    for (module, slot, heads) in [("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)] {
        let peft_b = &adapter[&format!("base_model.model.model.layers.1.self_attn.{module}.lora_B.weight")];
        let (rows, rank) = peft_b.dims2().unwrap();
        let peft_b: Vec<Vec<f32>> = peft_b.to_vec2().unwrap();
        let ours_b: Vec<Vec<f32>> = ours.tensors[&format!("blk.1.{slot}.weight.lora_b")]
            .1
            .to_vec2()
            .unwrap();
        assert_eq!((ours_b.len(), ours_b[0].len()), (rows, rank));
        let d = rows / heads;
        for h in 0..heads {
            for j in 0..d / 2 {
                for i in 0..2 {
                    assert_eq!(
                        ours_b[h * d + 2 * j + i],
                        peft_b[h * d + i * d / 2 + j],
                        "{module} head {h}"
                    );
                }
            }
        }
        // LoRA A is not touched.
        let peft_a = &adapter[&format!("base_model.model.model.layers.1.self_attn.{module}.lora_A.weight")];
        assert_eq!(
            values(&ours.tensors[&format!("blk.1.{slot}.weight.lora_a")].1),
            values(peft_a)
        );
    }
}

#[test]
fn qwen2_matches_convert_lora_to_gguf() {
    let report = assert_matches_reference("qwen2", "adapter");
    assert_eq!(report.architecture, "qwen2");
    assert!(
        report.tensors.iter().all(|t| !t.permuted),
        "Qwen2 rotates halves, as llama.cpp's NEOX RoPE"
    );
}

#[test]
fn mistral_matches_convert_lora_to_gguf() {
    let report = assert_matches_reference("mistral", "adapter");
    assert_eq!((report.model_type.as_str(), report.architecture), ("mistral", "llama"));
}

#[test]
fn gemma2_matches_convert_lora_to_gguf() {
    assert_eq!(assert_matches_reference("gemma2", "adapter").architecture, "gemma2");
}

#[test]
fn phi3_matches_convert_lora_to_gguf() {
    let report = assert_matches_reference("phi3", "adapter");
    let names: Vec<&str> = report.tensors.iter().map(|t| t.name.as_str()).collect();
    // gate_up_proj is llama.cpp's ffn_up, qkv_proj its attn_qkv.
    assert!(names.contains(&"blk.1.ffn_up.weight.lora_b") && names.contains(&"blk.1.attn_qkv.weight.lora_a"));
}

/// LoRA on embed_tokens (A transposed, as llama.cpp gathers its rows) and
/// lm_head, k_proj at rank 2 through rank_pattern, and PEFT's saved
/// `base_layer` weights skipped as the converter skips them.
#[test]
fn embedding_head_and_rank_pattern_match_convert_lora_to_gguf() {
    let report = assert_matches_reference("llama_embed_rank_pattern", "adapter");
    let shapes: HashMap<&str, &[usize]> = report
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(shapes["token_embd.weight.lora_a"], [64, 4]);
    assert_eq!(shapes["output.weight.lora_b"], [64, 4]);
    assert_eq!(shapes["blk.0.attn_k.weight.lora_a"], [2, 32]);
    assert!(
        report.notes.iter().any(|n| n.contains("base_layer")),
        "{:?}",
        report.notes
    );
}

/// The converter's metadata heuristics: general.name, basename, size label,
/// fine-tune and version from the adapter folder's name, base models, data
/// sets, license, tags and languages from the model card.
#[test]
fn model_card_metadata_matches_convert_lora_to_gguf() {
    let report = assert_matches_reference("llama_card", "Tiny-Llama-1.1B-Chat-v0.3-LoRA");
    let metadata: HashMap<&str, &Value> = report.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(
        metadata["general.name"].to_string().unwrap(),
        "Tiny Llama 1.1B Chat v0.3 LoRA"
    );
    assert_eq!(metadata["general.base_model.count"].to_u32().unwrap(), 2);
}

/// GPT-2: the converter transposes the LoRA factors as it transposes the
/// base's Conv1D weights, swapping A and B; PEFT stores them as for a
/// linear layer already, so the export writes them as stored. The
/// reference shows the difference exactly: our A is its B transposed, our
/// B its A transposed, and ours are the adapter's own.
#[test]
fn gpt2_writes_lora_factors_as_peft_stores_them() {
    let (out, report) = export_case("gpt2", "adapter", "swap");
    let ours = read_gguf(&out);
    let reference = read_gguf(&fixture_path("gguf_export/gpt2/reference.gguf"));
    assert_eq!(ours.metadata, reference.metadata);
    assert_eq!(ours.tensors.len(), reference.tensors.len());
    let adapter = adapter_tensors(&fixture_path("gguf_export/gpt2/adapter"));
    for tensor in &report.tensors {
        let (kind, other) = if tensor.name.ends_with(".lora_a") {
            ("lora_a", "lora_b")
        } else {
            ("lora_b", "lora_a")
        };
        let got = &ours.tensors[&tensor.name].1;
        let theirs = &reference.tensors[&tensor.name.replace(kind, other)].1;
        assert_eq!(values(got), values(&theirs.t().unwrap()), "{}", tensor.name);
        assert_eq!(values(got), values(&adapter[&tensor.source]), "{}", tensor.name);
    }
    // llama.cpp's attn_qkv is {n_embd, 3 n_embd}: lora_a must be [rank, n_embd].
    let qkv_a = &ours.tensors["blk.0.attn_qkv.weight.lora_a"].1;
    assert_eq!(qkv_a.dims(), [4, 32]);
    assert_eq!(reference.tensors["blk.0.attn_qkv.weight.lora_a"].1.dims(), [4, 96]);
}

/// Qwen3 (not in the llama.cpp snapshot the references were made with):
/// the converter's Qwen3Model is its Qwen2Model, so the factors go
/// unpermuted; checked against the adapter.
#[test]
fn qwen3_writes_the_adapter_unpermuted() {
    let dir = fixture_path("qwen3_lora_all_linear");
    let out = scratch("export_gguf", "qwen3").join("adapter.gguf");
    let report = export_lora_gguf(&dir.join("adapter"), &dir, &out, &ExportOptions::default()).unwrap();
    let ours = read_gguf(&out);
    assert_eq!(ours.metadata["general.architecture"], "String(\"qwen3\")");
    assert_eq!(ours.metadata["adapter.lora.alpha"], "F32(8.0)");
    let adapter = adapter_tensors(&dir.join("adapter"));
    assert_eq!(report.tensors.len(), adapter.len());
    for tensor in &report.tensors {
        assert!(!tensor.permuted);
        assert_eq!(
            values(&ours.tensors[&tensor.name].1),
            values(&adapter[&tensor.source]),
            "{}",
            tensor.name
        );
    }
    // head_dim 16: q_proj's LoRA B is [4 heads x 16, rank].
    assert_eq!(ours.tensors["blk.0.attn_q.weight.lora_b"].1.dims(), [64, 4]);
}

// ---------------------------------------------------------------------------
// Refusals

fn export_error(adapter: &Path, base: &Path, name: &str) -> ModelError {
    let out = scratch("export_gguf_errors", name).join("out.gguf");
    let error = export_lora_gguf(adapter, base, &out, &ExportOptions::default()).unwrap_err();
    assert!(!out.exists(), "{name}: nothing is written on an error");
    error
}

/// LoHa, LoKr, DoRA and IA³: refused naming the kind and pointing to
/// `peft convert`, before the base is looked at (these bases are not even
/// llama; a missing base folder changes nothing).
#[test]
fn kinds_llama_cpp_cannot_load_are_refused_first() {
    let missing_base = Path::new("/nonexistent/base");
    for (case, kind) in [
        ("loha_tiny", "LoHa"),
        ("lokr_tiny", "LoKr"),
        ("dora_tiny", "DoRA"),
        ("llama_ia3_all_linear", "IA³"),
    ] {
        let adapter = fixture_path(case).join("adapter");
        for base in [fixture_path("gguf_export/llama/base").as_path(), missing_base] {
            let error = export_error(&adapter, base, case);
            assert!(
                matches!(&error, ModelError::ExportKind { kind: k, .. } if k == kind),
                "{case}: {error:?}"
            );
            let message = error.to_string();
            assert!(
                message.contains(kind) && message.contains("peft convert --adapter DIR --to lora --rank R --out DIR2"),
                "{message}"
            );
        }
    }
}

/// A Llama adapter over a GPT-2 base: the first module the base lacks is
/// named; a Qwen3 adapter (head_dim 16) over a Llama base of head_dim 8:
/// the tensor, its shape and the one the base's config makes.
#[test]
fn an_adapter_for_another_architecture_is_refused_naming_the_module() {
    let llama_adapter = fixture_path("gguf_export/llama/adapter");
    let error = export_error(&llama_adapter, &fixture_path("gguf_export/gpt2/base"), "llama_on_gpt2");
    let message = error.to_string();
    assert!(matches!(error, ModelError::ExportTensor { .. }), "{error:?}");
    assert!(
        message.contains("model.layers.0.mlp.down_proj") && message.contains("gpt2"),
        "{message}"
    );

    let qwen3_adapter = fixture_path("qwen3_lora_all_linear/adapter");
    let error = export_error(
        &qwen3_adapter,
        &fixture_path("gguf_export/llama/base"),
        "qwen3_on_llama",
    );
    match &error {
        ModelError::ExportShape {
            key, expected, found, ..
        } => {
            // The MLP fits (same sizes); k_proj, 2 heads of 16 rows, is the first that does not.
            assert!(key.contains("layers.0.self_attn.k_proj.lora_B"), "{key}");
            assert_eq!((*expected, *found), ([16, 4], [32, 4]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_existing_output_is_refused_without_force() {
    let dir = fixture_path("gguf_export/llama");
    let out = scratch("export_gguf_errors", "exists").join("out.gguf");
    std::fs::write(&out, b"an older file").unwrap();
    let error = export_lora_gguf(&dir.join("adapter"), &dir.join("base"), &out, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(&error, ModelError::OutputExists { path } if path == &out),
        "{error:?}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"an older file");
    export_lora_gguf(
        &dir.join("adapter"),
        &dir.join("base"),
        &out,
        &ExportOptions { force: true },
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(dir.join("reference.gguf")).unwrap()
    );
    // No temporary file left beside it.
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert_eq!(left.len(), 1);
}

#[test]
fn an_unknown_architecture_is_refused() {
    let base = scratch("export_gguf_errors", "bert_base");
    std::fs::write(base.join("config.json"), r#"{"model_type": "bert", "hidden_size": 32}"#).unwrap();
    let error = export_error(&fixture_path("gguf_export/llama/adapter"), &base, "bert");
    match &error {
        ModelError::UnknownModelType { found, supported, .. } => {
            assert_eq!(found, "bert");
            assert!(supported.contains("qwen3") && supported.contains("gpt2"), "{supported}");
        }
        other => panic!("{other:?}"),
    }
}

/// A copy of the llama case's adapter with `adapter_config.json` changed.
fn edited_adapter(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let source = fixture_path("gguf_export/llama/adapter");
    let dir = scratch("export_gguf_errors", &format!("{name}_adapter")).join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        source.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config = support::read_json_object(source.join("adapter_config.json"));
    edit(&mut config);
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    dir
}

/// Settings llama.cpp cannot apply (it scales every pair by alpha / rank):
/// refused naming the field, where the converter writes a wrongly scaled file.
#[test]
fn settings_llama_cpp_would_apply_wrongly_are_refused() {
    let base = fixture_path("gguf_export/llama/base");
    type Edit = fn(&mut serde_json::Map<String, serde_json::Value>);
    let cases: [(&str, Edit); 3] = [
        ("use_rslora", |c| {
            c.insert("use_rslora".into(), true.into());
        }),
        ("alpha_pattern", |c| {
            c.insert("alpha_pattern".into(), serde_json::json!({"q_proj": 16}));
        }),
        ("lora_alpha", |c| {
            c.insert("lora_alpha".into(), 0.into());
        }),
    ];
    for (field, edit) in cases {
        let adapter = edited_adapter(field, edit);
        let error = export_error(&adapter, &base, field);
        assert!(
            matches!(&error, ModelError::ExportSetting { field: f, .. } if f == field),
            "{error:?}"
        );
    }
    // rank_pattern is fine: llama.cpp reads each pair's rank from its tensors.
    let adapter = edited_adapter("rank_pattern", |c| {
        c.insert("rank_pattern".into(), serde_json::json!({"q_proj": 4}));
    });
    let out = scratch("export_gguf_errors", "rank_pattern_out").join("out.gguf");
    export_lora_gguf(&adapter, &base, &out, &ExportOptions::default()).unwrap();
}

/// A copy of the llama case's adapter with its tensors changed.
fn adapter_with_tensors(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let source = fixture_path("gguf_export/llama/adapter");
    let dir = scratch("export_gguf_errors", &format!("{name}_adapter")).join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(source.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let mut tensors = adapter_tensors(&source);
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

/// Tensors llama.cpp would not load as a LoRA pair: a full norm weight
/// (modules_to_save), half of a pair. Refused naming the tensor.
#[test]
fn tensors_that_are_not_lora_pairs_are_refused_naming_them() {
    let base = fixture_path("gguf_export/llama/base");
    let norm = "base_model.model.model.norm.weight";
    let adapter = adapter_with_tensors("norm", |t| {
        t.insert(
            norm.to_owned(),
            Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let error = export_error(&adapter, &base, "norm");
    assert!(
        matches!(&error, ModelError::ExportTensor { key, .. } if key == norm),
        "{error:?}"
    );
    assert!(error.to_string().contains("norm"), "{error}");

    let lonely = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight";
    let adapter = adapter_with_tensors("half", |t| {
        t.remove("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight");
    });
    let error = export_error(&adapter, &base, "half");
    assert!(
        matches!(&error, ModelError::ExportTensor { key, .. } if key == lonely),
        "{error:?}"
    );
    assert!(error.to_string().contains("no LoRA B"), "{error}");
}
