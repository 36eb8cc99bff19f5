//! `peft_models::inspect`: an adapter folder described without its base
//! model, and every problem the loader would meet listed at once. The
//! fixtures (made by PEFT) inspect clean with the norms computed here by
//! other code; broken copies of them list each of their problems.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::StandaloneAdapter;
use peft_models::inspect::{inspect_adapter, InspectReport, NormsOf};
use serde_json::{json, Value};

mod support;
use support::{fixture_path, scratch};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn adapter(case: &str) -> PathBuf {
    fixture_path(case).join("adapter")
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn norm(t: &Tensor) -> f64 {
    f64_of(t)
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

fn tensors_of(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn norm_of(report: &InspectReport, module: &str) -> f64 {
    report
        .modules
        .iter()
        .find(|m| m.module == module)
        .and_then(|m| m.delta_norm)
        .unwrap_or_else(|| panic!("no norm for {module}"))
}

/// Writes an adapter folder: `config` and `tensors`.
fn write_adapter(dir: &Path, config: &Value, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(tensors, dir.join("adapter_model.safetensors")).unwrap();
}

fn messages(report: &InspectReport) -> Vec<String> {
    report
        .problems
        .iter()
        .map(|p| format!("[{}] {}", p.at, p.message))
        .collect()
}

/// Panics unless one problem contains every one of `parts`.
fn assert_listed(report: &InspectReport, parts: &[&str]) {
    let all = messages(report);
    assert!(
        all.iter().any(|m| parts.iter().all(|p| m.contains(p))),
        "no problem with {parts:?} in {all:#?}"
    );
}

#[test]
fn every_fixture_inspects_clean_with_its_counts() -> TestResult {
    let cases = [
        "merge_cases/lora",
        "merge_cases/rslora",
        "merge_cases/dora",
        "merge_cases/ia3",
        "merge_cases/loha",
        "merge_cases/lokr",
        "merge_cases/embedding",
        "merge_cases/gpt2_fan_in_fan_out",
        "merge_cases/conv_lora",
        "llama_lora_all_linear",
    ];
    for case in cases {
        let report = inspect_adapter(&adapter(case));
        assert!(report.problems.is_empty(), "{case}: {:#?}", messages(&report));
        let loaded = StandaloneAdapter::from_dir(adapter(case))?;
        let names: Vec<&str> = report.modules.iter().map(|m| m.module.as_str()).collect();
        assert_eq!(names, loaded.modules(), "{case}");
        let values: usize = loaded
            .tensors()
            .iter()
            .filter(|(key, _)| !key.contains(".base_layer."))
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(report.parameters, values, "{case}");
        assert_eq!(report.dtypes, ["F32"], "{case}");
        assert_eq!(report.peft_type.as_deref(), Some(loaded.peft_type()), "{case}");
        let expected_norms = match case {
            "merge_cases/dora" => NormsOf::LoraPart,
            "merge_cases/ia3" => report.norms_of.clone(),
            _ => NormsOf::Delta,
        };
        assert_eq!(report.norms_of, expected_norms, "{case}");
        let with_norm = report.modules.iter().filter(|m| m.delta_norm.is_some()).count();
        if case == "merge_cases/ia3" {
            assert!(matches!(report.norms_of, NormsOf::NotComputed(ref why) if why.contains("base")));
            assert_eq!(with_norm, 0);
        } else {
            assert_eq!(with_norm, report.modules.len(), "{case}");
        }
        eprintln!(
            "{case}: {} {} modules, {} values",
            report.peft_type.as_deref().unwrap_or("?"),
            report.modules.len(),
            report.parameters
        );
    }
    let embedding = inspect_adapter(&adapter("merge_cases/embedding"));
    assert_eq!(
        embedding.saved_base_weights,
        [(
            "base_model.model.model.embed_tokens.base_layer.weight".to_owned(),
            vec![96, 32]
        )]
    );
    Ok(())
}

#[test]
fn norms_are_those_of_the_change_with_each_kinds_scaling() -> TestResult {
    // rsLoRA: s = alpha / √r, q_proj at r = 2 and down_proj at alpha = 3.
    let dir = adapter("merge_cases/rslora");
    let report = inspect_adapter(&dir);
    let tensors = tensors_of(&dir);
    for module in &report.modules {
        let name = &module.module;
        let key = |k: &str| f64_of(&tensors[&format!("base_model.model.{name}.{k}")]);
        let r: f64 = if name.ends_with("q_proj") { 2.0 } else { 4.0 };
        let alpha = if name.ends_with("down_proj") { 3.0 } else { 8.0 };
        let delta = (key("lora_B.weight").matmul(&key("lora_A.weight"))? * (alpha / r.sqrt()))?;
        let (want, got) = (norm(&delta), norm_of(&report, name));
        assert!((got - want).abs() <= 1e-9 * want, "{name}: {got} against {want}");
    }

    // LoHa: (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r.
    let dir = adapter("merge_cases/loha");
    let report = inspect_adapter(&dir);
    let tensors = tensors_of(&dir);
    for module in &report.modules {
        let name = &module.module;
        let key = |k: &str| f64_of(&tensors[&format!("base_model.model.{name}.{k}")]);
        let w1 = key("hada_w1_a").matmul(&key("hada_w1_b"))?;
        let w2 = key("hada_w2_a").matmul(&key("hada_w2_b"))?;
        let want = norm(&((w1 * w2)? * 2.0)?);
        let got = norm_of(&report, name);
        assert!((got - want).abs() <= 1e-9 * want, "{name}: {got} against {want}");
    }

    // DoRA: the LoRA part s · B · A (s = 8 / 4).
    let dir = adapter("merge_cases/dora");
    let report = inspect_adapter(&dir);
    let tensors = tensors_of(&dir);
    for module in &report.modules {
        let name = &module.module;
        let key = |k: &str| f64_of(&tensors[&format!("base_model.model.{name}.{k}")]);
        let want = norm(&(key("lora_B.weight").matmul(&key("lora_A.weight"))? * 2.0)?);
        let got = norm_of(&report, name);
        assert!((got - want).abs() <= 1e-9 * want, "{name}: {got} against {want}");
    }

    // The summary: quartiles by linear interpolation, every module in a bin,
    // the top modules largest first.
    let summary = report.norm_summary(8).unwrap();
    let mut norms: Vec<f64> = report.modules.iter().filter_map(|m| m.delta_norm).collect();
    norms.sort_by(f64::total_cmp);
    assert_eq!(norms.len(), 14);
    // 13 · 0.25 = 3.25: a quarter of the way from the 4th to the 5th.
    let q1 = norms[3] + 0.25 * (norms[4] - norms[3]);
    let median = (norms[6] + norms[7]) / 2.0;
    assert!((summary.q1 - q1).abs() < 1e-12 && (summary.median - median).abs() < 1e-12);
    assert_eq!((summary.min, summary.max), (norms[0], norms[13]));
    assert_eq!(summary.histogram.iter().map(|(_, _, n)| n).sum::<usize>(), 14);
    assert_eq!(summary.histogram.len(), 8);
    let top = report.top_modules(10);
    assert_eq!(top.len(), 10);
    assert_eq!(top[0].delta_norm, Some(norms[13]));
    assert!(top.windows(2).all(|w| w[0].delta_norm >= w[1].delta_norm));
    Ok(())
}

#[test]
fn a_broken_copy_lists_every_problem_at_once() -> TestResult {
    let source = adapter("llama_lora_all_linear");
    let mut tensors = tensors_of(&source);
    let config = support::read_json(source.join("adapter_config.json"));
    let key = |module: &str, name: &str| format!("base_model.model.model.layers.{module}.{name}");
    // A module without lora_B.
    tensors.remove(&key("0.self_attn.q_proj", "lora_B.weight"));
    // A tensor of rank 3 where r = 4.
    let a = tensors[&key("0.self_attn.k_proj", "lora_A.weight")].narrow(0, 0, 3)?;
    tensors.insert(key("0.self_attn.k_proj", "lora_A.weight"), a);
    // An integer tensor.
    tensors.insert(
        key("1.mlp.up_proj", "lora_B.weight"),
        Tensor::zeros((64, 4), DType::I64, &Device::Cpu)?,
    );
    // A key that names no module, and a LoHa tensor in a LoRA file.
    tensors.insert(
        "model.norm.weight".to_owned(),
        Tensor::ones(32, DType::F32, &Device::Cpu)?,
    );
    tensors.insert(
        key("1.mlp.gate_proj", "hada_w1_a"),
        Tensor::ones((64, 4), DType::F32, &Device::Cpu)?,
    );
    let dir = scratch("inspect", "broken").join("adapter");
    write_adapter(&dir, &config, &tensors);

    let report = inspect_adapter(&dir);
    eprintln!("{:#?}", messages(&report));
    assert_listed(
        &report,
        &["model.layers.0.self_attn.q_proj", "no tensor", "lora_B.weight"],
    );
    assert_listed(
        &report,
        &[
            "model.layers.0.self_attn.k_proj.lora_A.weight",
            "[3, 32]",
            "rank 3",
            "r = 4",
        ],
    );
    assert_listed(
        &report,
        &["model.layers.1.mlp.up_proj.lora_B.weight", "not a floating-point"],
    );
    assert_listed(&report, &["model.norm.weight", "names no module"]);
    assert_listed(&report, &["hada_w1_a", "not a tensor of a LORA adapter"]);
    assert_eq!(report.problems.len(), 5, "{:#?}", messages(&report));
    // The rest is still reported, and measured where sound.
    assert_eq!(report.modules.len(), 14);
    assert_eq!(report.dtypes, ["F32", "I64"]);
    let measured = report.modules.iter().filter(|m| m.delta_norm.is_some()).count();
    assert_eq!(measured, 10, "14 modules, 4 with a problem");
    Ok(())
}

#[test]
fn config_problems_are_listed_beside_the_tensors_problems() -> TestResult {
    let source = adapter("merge_cases/loha");
    let tensors = tensors_of(&source);
    let config = support::read_json(source.join("adapter_config.json"));
    let root = scratch("inspect", "configs");

    // Not JSON: named with the line, and the tensors are still counted.
    let dir = root.join("bad_json");
    write_adapter(&dir, &config, &tensors);
    std::fs::write(dir.join("adapter_config.json"), "{\"peft_type\": \"LOHA\", \"r\": 4,,}")?;
    let report = inspect_adapter(&dir);
    assert_listed(&report, &["adapter_config.json", "malformed adapter config", "line 1"]);
    assert_eq!(report.modules.len(), 14);
    assert!(matches!(report.norms_of, NormsOf::NotComputed(_)));

    // An unknown peft_type, and a damaged header entry at the same time.
    let dir = root.join("unknown_type");
    let mut unknown = config.clone();
    unknown["peft_type"] = json!("NOT_A_KIND");
    write_adapter(&dir, &unknown, &tensors);
    let path = dir.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&path)?;
    let length = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header = String::from_utf8(bytes[8..8 + length].to_vec())?;
    // Same length: a shape of 5 rows where the bytes hold 4 (of `[4, 32]`).
    let key = "base_model.model.model.layers.0.self_attn.q_proj.hada_w1_b";
    let at = header.find(key).unwrap();
    let shape_at = at + header[at..].find("\"shape\":[4,32]").unwrap();
    let damaged = format!("{}\"shape\":[5,32]{}", &header[..shape_at], &header[shape_at + 14..]);
    bytes.splice(8..8 + length, damaged.into_bytes());
    std::fs::write(&path, bytes)?;
    let report = inspect_adapter(&dir);
    assert_listed(&report, &["unsupported peft_type `NOT_A_KIND`"]);
    assert_listed(&report, &[key, "needs 640 bytes", "hold 512"]);
    assert_eq!(report.problems.len(), 2, "{:#?}", messages(&report));

    // A rank_pattern the tensors disagree with, and targets that leave a
    // module out.
    let dir = root.join("patterns");
    let mut patterns = config.clone();
    patterns["rank_pattern"] = json!({"q_proj": 2});
    patterns["target_modules"] = json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]);
    write_adapter(&dir, &patterns, &tensors);
    let report = inspect_adapter(&dir);
    for layer in 0..2 {
        assert_listed(
            &report,
            &[
                &format!("model.layers.{layer}.self_attn.q_proj.hada_w1_a"),
                "rank 4",
                "r = 2 (`rank_pattern` entry `q_proj`)",
            ],
        );
        assert_listed(
            &report,
            &[&format!("module `model.layers.{layer}.mlp.down_proj`"), "do not select"],
        );
    }
    // 4 tensors each of 2 q_proj, 2 down_proj left out.
    assert_eq!(report.problems.len(), 10, "{:#?}", messages(&report));
    assert_eq!(report.modules.iter().filter(|m| m.delta_norm.is_some()).count(), 10);

    // An exclusion that removes modules the file holds.
    let dir = root.join("exclude");
    let mut exclude = config.clone();
    exclude["exclude_modules"] = json!(["o_proj"]);
    write_adapter(&dir, &exclude, &tensors);
    let report = inspect_adapter(&dir);
    assert_listed(
        &report,
        &["module `model.layers.1.self_attn.o_proj`", "exclude", "removes it"],
    );
    assert_eq!(report.problems.len(), 2, "{:#?}", messages(&report));

    // No folder at all: both files named.
    let report = inspect_adapter(&root.join("missing"));
    assert_listed(&report, &["adapter_config.json", "No such file"]);
    assert_listed(&report, &["adapter_model.safetensors", "No such file"]);
    Ok(())
}
