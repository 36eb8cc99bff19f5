//! `peft_models::convert`: any adapter turned into a plain LoRA adapter by a
//! truncated SVD of each module's change. At full rank the converted
//! adapter merges into PEFT's own merged weights (`tests/fixtures/merge_cases`,
//! PEFT 0.21.2) and gives PEFT's logits; at a lower rank the error it
//! reports is the one measured here from the written files, by other code;
//! bad input is refused before anything is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::{PeftModel, StandaloneAdapter};
use peft_models::convert::{convert_to_lora, ConvertOptions, ConvertReport};
use peft_models::merge::{merge_checkpoint, MergeOptions, WeightedAdapter};
use peft_models::{AutoModel, ModelError};
use serde_json::Value;

mod support;
use support::{fixture_path, scratch};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn case(name: &str) -> PathBuf {
    fixture_path("merge_cases").join(name)
}

/// Every tensor of every `.safetensors` file in `dir`.
fn all_tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    tensors
}

fn convert(name: &str, base: Option<&str>, rank: usize, out: &Path) -> Result<ConvertReport, ModelError> {
    let options = ConvertOptions {
        rank,
        model: base.map(case),
        force: false,
    };
    convert_to_lora(&case(name).join("adapter"), out, &options)
}

/// `‖t‖_F` in f64.
fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

/// The written adapter's `B @ A · lora_alpha / r` for `module`, `[out, in]`,
/// computed from the files alone (PEFT's rule, with the config's patterns
/// looked up by hand).
fn written_delta(out: &Path, module: &str) -> Tensor {
    let tensors = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let config: Value = support::read_json(out.join("adapter_config.json"));
    let pattern = module.replace('.', "\\.");
    let r = config["rank_pattern"][&pattern]
        .as_f64()
        .unwrap_or(config["r"].as_f64().unwrap());
    let alpha = config["alpha_pattern"][&pattern]
        .as_f64()
        .unwrap_or(config["lora_alpha"].as_f64().unwrap());
    let key = |k: &str| f64_of(&tensors[&format!("base_model.model.{module}.{k}")]);
    let (a, b) = (key("lora_A.weight"), key("lora_B.weight"));
    assert_eq!(
        a.dim(0).unwrap() as f64,
        r,
        "{module}: lora_A's rank against the config's"
    );
    (b.matmul(&a).unwrap() * (alpha / r)).unwrap()
}

#[test]
fn at_full_rank_every_kind_merges_as_peft_and_loads_on_the_model() -> TestResult {
    // (case, base, whether the conversion needs the base)
    let cases = [
        ("loha", "llama", false),
        ("lokr", "llama", false),
        ("dora", "llama", true),
        ("ia3", "llama", true),
        ("rslora", "llama", false),
        ("gpt2_fan_in_fan_out", "gpt2", false),
    ];
    for (name, base, needs_base) in cases {
        let dir = scratch("convert", name);
        let out = dir.join("lora");
        // 64 is at least every module's smaller side, so every module keeps
        // its whole ΔW.
        let report = convert(name, needs_base.then_some(base), 64, &out)?;
        let adapter = StandaloneAdapter::from_dir(&out)?;
        assert_eq!(adapter.peft_type(), "LORA", "{name}");
        let config = support::read_json_object(out.join("adapter_config.json"));
        assert_eq!(config["use_dora"], false, "{name}");
        assert_eq!(config["use_rslora"], false, "{name}");
        assert_eq!(config["r"], config["lora_alpha"], "{name}: the scaling is 1");
        let mut targets: Vec<&str> = config["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        targets.sort();
        let source = StandaloneAdapter::from_dir(case(name).join("adapter"))?;
        assert_eq!(targets, source.modules(), "{name}: target_modules");
        assert_eq!(adapter.modules(), source.modules(), "{name}");
        assert_eq!(adapter.fan_in_fan_out(), source.fan_in_fan_out(), "{name}");
        for module in &report.modules {
            let (rows, cols) = module.layout.matrix_dims();
            assert_eq!(module.rank, rows.min(cols), "{name}: {}", module.module);
            assert!(module.delta_norm > 0.0, "{name}: {}", module.module);
            assert!(
                module.relative_error < 1e-6,
                "{name}: {}: relative error {:e}",
                module.module,
                module.relative_error
            );
        }
        let worst = report.modules.iter().map(|m| m.relative_error).fold(0.0, f64::max);
        eprintln!(
            "{name}: {} modules, r = {}, largest relative error {worst:.2e}",
            report.modules.len(),
            report.r
        );

        // Merged into the base, the converted LoRA leaves PEFT's merged weights.
        let merged_dir = dir.join("merged");
        let converted = WeightedAdapter::read(&out, 1.0)?;
        merge_checkpoint(
            &case(base),
            &[converted],
            &merged_dir,
            &MergeOptions::default(),
            &mut |_| {},
        )?;
        let expected = candle_core::safetensors::load(case(name).join("merged.safetensors"), &Device::Cpu)?;
        let merged = all_tensors(&merged_dir);
        let base_tensors = all_tensors(&case(base));
        let mut compared = 0;
        for (key, got) in &merged {
            let want = &expected[key];
            let scale = support::max_abs(want).max(1e-6);
            let diff = support::max_abs_diff(got, want);
            assert!(
                diff <= 1e-5 * scale,
                "{name}: {key}: max diff {diff:e} against scale {scale}"
            );
            if support::max_abs_diff(want, &base_tensors[key]) > 0.0 {
                compared += 1;
            }
        }
        assert_eq!(compared, report.modules.len(), "{name}: changed tensors compared");

        // And it loads on the model, giving the logits of PEFT's model with
        // the original adapter.
        let mut model = AutoModel::from_dir(case(base), DType::F32, &Device::Cpu)?;
        model.load_adapter(&out, "default")?;
        let io = candle_core::safetensors::load(case(name).join("logits.safetensors"), &Device::Cpu)?;
        let ids = io["input_ids"].to_dtype(DType::U32)?;
        let logits = model.forward(&ids)?;
        let diff = support::assert_close(&format!("{name} logits"), &logits, &io["logits"], 1e-4)?;
        eprintln!("{name}: logits within {diff:.1e} of PEFT's");
    }
    Ok(())
}

#[test]
fn a_trained_dora_magnitude_is_part_of_the_change() -> TestResult {
    // The fixture's magnitudes are the row norms of W + s·B·A (as PEFT
    // initialises them), so its ΔW is the LoRA part alone. Training moves
    // them: scaled here by 0.85 to 1.15, row by row, ΔW gets the base's rank.
    let dir = scratch("convert", "dora_trained");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter)?;
    std::fs::copy(
        case("dora").join("adapter/adapter_config.json"),
        adapter.join("adapter_config.json"),
    )?;
    let mut tensors =
        candle_core::safetensors::load(case("dora").join("adapter/adapter_model.safetensors"), &Device::Cpu)?;
    for (key, tensor) in tensors.iter_mut() {
        if key.ends_with("lora_magnitude_vector") {
            let rows = tensor.dim(0)?;
            let factor: Vec<f32> = (0..rows).map(|i| 1.0 + 0.05 * ((i % 7) as f32 - 3.0)).collect();
            *tensor = (&*tensor * Tensor::new(factor, &Device::Cpu)?)?;
        }
    }
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors"))?;

    let out = dir.join("lora");
    let options = ConvertOptions {
        rank: 64,
        model: Some(case("llama")),
        force: false,
    };
    let report = convert_to_lora(&adapter, &out, &options)?;
    for module in &report.modules {
        let (rows, cols) = module.layout.matrix_dims();
        assert_eq!(
            module.delta_rank,
            rows.min(cols),
            "{}: ΔW is of full rank",
            module.module
        );
        assert!(module.relative_error < 1e-6, "{module:?}");
    }

    // Merged, the converted LoRA equals the DoRA adapter merged (our merge
    // equals PEFT's: tests/merge.rs).
    let merge = |adapter: &Path, to: &str| -> Result<HashMap<String, Tensor>, ModelError> {
        let out = dir.join(to);
        merge_checkpoint(
            &case("llama"),
            &[WeightedAdapter::read(adapter, 1.0)?],
            &out,
            &MergeOptions::default(),
            &mut |_| {},
        )?;
        Ok(all_tensors(&out))
    };
    let (want, got) = (merge(&adapter, "merged_dora")?, merge(&out, "merged_lora")?);
    let base = all_tensors(&case("llama"));
    let mut lora_part_errors = Vec::new();
    for module in &report.modules {
        let key = format!("{}.weight", module.module);
        let scale = support::max_abs(&want[&key]);
        let diff = support::max_abs_diff(&got[&key], &want[&key]);
        assert!(diff <= 1e-5 * scale, "{key}: max diff {diff:e} against scale {scale}");
        // What PEFT's convert_to_lora factors instead: s·B·A alone.
        let delta = (f64_of(&want[&key]) - f64_of(&base[&key]))?;
        let source = |k: &str| f64_of(&tensors[&format!("base_model.model.{}.{k}", module.module)]);
        let lora_part = (source("lora_B.weight").matmul(&source("lora_A.weight"))? * 2.0)?;
        lora_part_errors.push(norm(&(&delta - lora_part)?) / norm(&delta));
    }
    let smallest = lora_part_errors.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(smallest > 0.05, "the LoRA part alone is {smallest} off");
    eprintln!("trained DoRA: the LoRA part alone is {smallest:.3} or more off ΔW; the conversion within 1e-6");
    Ok(())
}

#[test]
fn embedding_and_convolution_lora_convert_too() -> TestResult {
    for (name, base) in [("embedding", "llama"), ("conv_lora", "conv")] {
        let dir = scratch("convert", name);
        let out = dir.join("lora");
        let report = convert(name, None, 64, &out)?;
        let tensors = all_tensors(&out);
        let keys: Vec<&String> = tensors.keys().collect();
        assert!(
            !keys.iter().any(|k| k.contains("base_layer")),
            "{name}: no saved base weight is written: {keys:?}"
        );
        for module in &report.modules {
            assert!(module.relative_error < 1e-6, "{name}: {module:?}");
        }
        let merged_dir = dir.join("merged");
        merge_checkpoint(
            &case(base),
            &[WeightedAdapter::read(&out, 1.0)?],
            &merged_dir,
            &MergeOptions::default(),
            &mut |_| {},
        )?;
        let expected = candle_core::safetensors::load(case(name).join("merged.safetensors"), &Device::Cpu)?;
        for (key, got) in all_tensors(&merged_dir) {
            let want = &expected[&key];
            let scale = support::max_abs(want).max(1e-6);
            let diff = support::max_abs_diff(&got, want);
            assert!(
                diff <= 1e-5 * scale,
                "{name}: {key}: max diff {diff:e} against scale {scale}"
            );
        }
        eprintln!("{name}: {} modules converted", report.modules.len());
    }
    let embedding = StandaloneAdapter::from_dir(scratch_path("embedding").join("lora"))?;
    assert!(embedding
        .tensors()
        .contains_key("base_model.model.model.embed_tokens.lora_embedding_A"));
    Ok(())
}

fn scratch_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("convert").join(name)
}

#[test]
fn at_a_lower_rank_the_reported_error_is_the_one_the_files_give() -> TestResult {
    // LoHa: ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r, from the source files.
    let source = candle_core::safetensors::load(case("loha").join("adapter/adapter_model.safetensors"), &Device::Cpu)?;
    let out = scratch("convert", "loha_rank_2").join("lora");
    let report = convert("loha", None, 2, &out)?;
    assert_eq!(report.r, 2);
    let mut errors = Vec::new();
    for module in &report.modules {
        let name = &module.module;
        let key = |k: &str| f64_of(&source[&format!("base_model.model.{name}.{k}")]);
        let w1 = key("hada_w1_a").matmul(&key("hada_w1_b"))?;
        let w2 = key("hada_w2_a").matmul(&key("hada_w2_b"))?;
        let delta = ((w1 * w2)? * (8.0 / 4.0))?;
        let measured = norm(&(&delta - written_delta(&out, name))?) / norm(&delta);
        assert_eq!(module.rank, 2);
        assert!(
            (module.relative_error - measured).abs() <= 1e-6 * measured.max(1e-12),
            "{name}: reported {} measured {measured}",
            module.relative_error
        );
        assert!(
            (module.delta_norm - norm(&delta)).abs() <= 1e-9 * norm(&delta),
            "{name}"
        );
        // A Hadamard product of two rank-4 matrices: rank up to 16, so
        // rank 2 loses a good part of it.
        assert!(module.delta_rank > 2 && measured > 0.05, "{name}: {measured}");
        errors.push(measured);
    }
    eprintln!(
        "loha at rank 2: relative errors {:.3} to {:.3}",
        errors.iter().cloned().fold(f64::INFINITY, f64::min),
        errors.iter().cloned().fold(0.0, f64::max)
    );

    // DoRA: ΔW is PEFT's merged weight less the base, the error measured
    // against it (PEFT's float32 merge: agreement to about 1e-5).
    let out = scratch("convert", "dora_rank_2").join("lora");
    let report = convert("dora", Some("llama"), 2, &out)?;
    let merged = candle_core::safetensors::load(case("dora").join("merged.safetensors"), &Device::Cpu)?;
    let base = all_tensors(&case("llama"));
    for module in &report.modules {
        let key = format!("{}.weight", module.module);
        let delta = (f64_of(&merged[&key]) - f64_of(&base[&key]))?;
        let measured = norm(&(&delta - written_delta(&out, &module.module))?) / norm(&delta);
        assert!(
            (module.relative_error - measured).abs() <= 1e-3 * measured,
            "{}: reported {} measured {measured}",
            module.module,
            module.relative_error
        );
        assert!(measured > 0.01, "{}: DoRA's ΔW is not of rank 2", module.module);
    }
    let dora_errors: Vec<f64> = report.modules.iter().map(|m| m.relative_error).collect();
    eprintln!(
        "dora at rank 2: relative errors {:.3} to {:.3}",
        dora_errors.iter().cloned().fold(f64::INFINITY, f64::min),
        dora_errors.iter().cloned().fold(0.0, f64::max)
    );

    // LoRA of rank 4 is exact from rank 4 on, and only then.
    for (rank, exact) in [(3, false), (4, true)] {
        let out = scratch("convert", &format!("lora_rank_{rank}")).join("lora");
        let report = convert("lora", None, rank, &out)?;
        for module in &report.modules {
            assert_eq!(module.delta_rank, 4, "{}", module.module);
            assert_eq!(module.relative_error < 1e-6, exact, "rank {rank}: {module:?}");
        }
    }
    Ok(())
}

#[test]
fn a_rank_above_a_modules_sides_keeps_them_all_in_the_patterns() -> TestResult {
    // k_proj and v_proj are [16, 32]: rank 20 keeps 16 there, 20 elsewhere.
    let out = scratch("convert", "lokr_rank_20").join("lora");
    let report = convert("lokr", None, 20, &out)?;
    assert_eq!(report.r, 20);
    let config = support::read_json_object(out.join("adapter_config.json"));
    for module in &report.modules {
        let (rows, cols) = module.layout.matrix_dims();
        let pattern = module.module.replace('.', "\\.");
        if rows.min(cols) < 20 {
            assert_eq!(module.rank, 16, "{}", module.module);
            assert_eq!(config["rank_pattern"][&pattern], 16, "{}", module.module);
            assert_eq!(config["alpha_pattern"][&pattern], 16.0, "{}", module.module);
        } else {
            assert_eq!(module.rank, 20, "{}", module.module);
            assert!(config["rank_pattern"].get(&pattern).is_none(), "{}", module.module);
        }
        let measured = {
            let merged = written_delta(&out, &module.module);
            let source = StandaloneAdapter::from_dir(case("lokr").join("adapter"))?;
            let zeros = Tensor::zeros(merged.dims(), DType::F64, &Device::Cpu)?;
            let (delta, _) = source.merge_module(
                &module.module,
                peft_core::BaseModule::Linear {
                    weight: zeros,
                    bias: None,
                },
            )?;
            norm(&(&delta - &merged)?) / norm(&delta)
        };
        assert!(
            (module.relative_error - measured).abs() <= 1e-6 * measured.max(1e-9),
            "{}: reported {} measured {measured}",
            module.module,
            module.relative_error
        );
    }
    // The model loads it: the patterns are read as PEFT reads them.
    let mut model = AutoModel::from_dir(case("llama"), DType::F32, &Device::Cpu)?;
    model.load_adapter(&out, "default")?;
    Ok(())
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() -> TestResult {
    let dir = scratch("convert", "refused");
    let out = dir.join("lora");

    // DoRA and IA³ need the base.
    for (name, kind) in [("dora", "DoRA"), ("ia3", "IA3")] {
        let error = convert(name, None, 4, &out).unwrap_err();
        assert!(matches!(error, ModelError::NeedsBaseModel { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(kind) && message.contains("--model"), "{message}");
    }
    // Rank 0.
    let error = convert("loha", None, 0, &out).unwrap_err();
    assert!(
        matches!(error, ModelError::Convert { .. }) && error.to_string().contains("at least 1"),
        "{error}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?.collect();
    assert!(leftovers.is_empty(), "written: {leftovers:?}");

    // An output that exists, without force; with force it is replaced.
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("keep.txt"), "mine")?;
    let error = convert("loha", None, 2, &out).unwrap_err();
    assert!(matches!(error, ModelError::OutputExists { .. }), "{error:?}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt"))?, "mine");
    let options = ConvertOptions {
        rank: 2,
        model: None,
        force: true,
    };
    convert_to_lora(&case("loha").join("adapter"), &out, &options)?;
    assert!(!out.join("keep.txt").exists() && out.join("adapter_model.safetensors").is_file());

    // The adapter's own folder, even with force.
    let source = scratch("convert", "source");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(case("loha").join("adapter").join(file), source.join(file))?;
    }
    let error = convert_to_lora(&source, &source, &options).unwrap_err();
    assert!(error.to_string().contains("is an input"), "{error}");
    assert!(StandaloneAdapter::from_dir(&source).is_ok());

    // A base that is not the adapter's: the module and the key are named.
    let error = convert("dora", Some("gpt2"), 4, &dir.join("wrong_base")).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("model.layers.0.mlp.down_proj.weight"), "{message}");
    assert!(!dir.join("wrong_base").exists());
    let hidden: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "partial folders left: {hidden:?}");
    Ok(())
}
