//! `peft_models::merge`: checkpoints merged on disk equal what PEFT's
//! `merge_and_unload()` leaves, for every kind (`tests/fixtures/merge_cases`,
//! made with PEFT 0.21.2), shard by shard; bad input refused before
//! anything is written; the input never modified.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_models::merge::{merge_checkpoint, MergeOptions, WeightedAdapter};
use peft_models::ModelError;

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

/// The bytes of every file in `dir`, by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn merge(base: &str, adapters: &[(&str, f64)], out: &Path) -> Result<peft_models::merge::MergeReport, ModelError> {
    let adapters = adapters
        .iter()
        .map(|(name, weight)| WeightedAdapter::read(case(name).join("adapter"), *weight))
        .collect::<Result<Vec<_>, _>>()?;
    merge_checkpoint(&case(base), &adapters, out, &MergeOptions::default(), &mut |_| {})
}

#[test]
fn every_kind_merges_as_peft_merge_and_unload() -> TestResult {
    let cases = [
        ("lora", "llama"),
        ("rslora", "llama"),
        ("dora", "llama"),
        ("ia3", "llama"),
        ("loha", "llama"),
        ("lokr", "llama"),
        ("embedding", "llama"),
        ("gpt2_fan_in_fan_out", "gpt2"),
        ("conv_lora", "conv"),
    ];
    for (name, base) in cases {
        let before = snapshot(&case(base));
        let out = scratch("merge", name).join("merged");
        let report = merge(base, &[(name, 1.0)], &out)?;
        assert_eq!(snapshot(&case(base)), before, "{name}: the input changed");
        let expected = candle_core::safetensors::load(case(name).join("merged.safetensors"), &Device::Cpu)?;
        let merged = all_tensors(&out);
        let base_tensors = all_tensors(&case(base));
        let mut names: Vec<&String> = merged.keys().collect();
        names.sort();
        let mut expected_names: Vec<&String> = expected.keys().filter(|k| base_tensors.contains_key(*k)).collect();
        expected_names.sort();
        assert_eq!(names, expected_names, "{name}: tensor names");
        let mut changed = 0;
        for key in names {
            let (got, want) = (&merged[key], &expected[key]);
            assert_eq!(got.dims(), want.dims(), "{name}: {key}");
            let scale = support::max_abs(want).max(1e-6);
            let diff = support::max_abs_diff(got, want);
            assert!(
                diff <= 1e-6 * scale,
                "{name}: {key}: max diff {diff:e} against scale {scale}"
            );
            if support::max_abs_diff(got, &base_tensors[key]) > 0.0 {
                changed += 1;
            }
        }
        assert!(
            changed > 0 && changed >= report.merged_modules.len(),
            "{name}: {changed} tensors changed"
        );
        eprintln!(
            "{name}: {} tensors, {changed} changed, {} shards",
            report.tensors, report.shards
        );
    }
    Ok(())
}

#[test]
fn a_sharded_checkpoint_keeps_its_shards_index_and_other_files() -> TestResult {
    let out = scratch("merge", "layout").join("merged");
    let report = merge("llama", &[("lora", 1.0)], &out)?;
    assert_eq!(report.shards, 3);
    let files = |dir: &Path| {
        let mut names: Vec<String> = snapshot(dir).into_iter().map(|(name, _)| name).collect();
        names.sort();
        names
    };
    assert_eq!(files(&out), files(&case("llama")));
    let index = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap()
    };
    assert_eq!(index(&out)["weight_map"], index(&case("llama"))["weight_map"]);
    assert_eq!(
        std::fs::read(out.join("config.json"))?,
        std::fs::read(case("llama").join("config.json"))?
    );
    // Each shard holds the tensors it held.
    for (name, _) in snapshot(&case("llama"))
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors"))
    {
        let keys = |dir: &Path| {
            let mut keys: Vec<String> = candle_core::safetensors::load(dir.join(&name), &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(&out), keys(&case("llama")), "{name}");
    }
    Ok(())
}

#[test]
fn weighted_additive_adapters_add_their_scaled_changes() -> TestResult {
    let out = scratch("merge", "weighted").join("merged");
    merge("llama", &[("lora", 0.7), ("loha", 0.3)], &out)?;
    let merged = all_tensors(&out);
    let base = all_tensors(&case("llama"));
    let lora = candle_core::safetensors::load(case("lora").join("merged.safetensors"), &Device::Cpu)?;
    let loha = candle_core::safetensors::load(case("loha").join("merged.safetensors"), &Device::Cpu)?;
    let key = "model.layers.1.mlp.down_proj.weight";
    let expected = ((&base[key] + ((&lora[key] - &base[key])? * 0.7)?)? + ((&loha[key] - &base[key])? * 0.3)?)?;
    let diff = support::max_abs_diff(&merged[key], &expected);
    assert!(diff < 1e-6, "{diff:e}");
    Ok(())
}

#[test]
fn merging_in_another_dtype_writes_it_and_says_so() -> TestResult {
    let out = scratch("merge", "bf16").join("merged");
    let adapters = [WeightedAdapter::read(case("lora").join("adapter"), 1.0)?];
    let options = MergeOptions {
        dtype: Some(DType::BF16),
        force: false,
    };
    merge_checkpoint(&case("gpt2"), &[], &out, &options, &mut |_| {}).unwrap_err();
    let report = merge_checkpoint(&case("llama"), &adapters, &out, &options, &mut |_| {})?;
    assert_eq!(report.tensors, 21);
    let merged = all_tensors(&out);
    assert!(merged.values().all(|t| t.dtype() == DType::BF16));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(config["dtype"], "bfloat16");
    Ok(())
}

#[test]
fn bad_input_is_refused_before_anything_is_written() -> TestResult {
    let dir = scratch("merge", "refused");
    let out = dir.join("merged");
    // An adapter for another architecture: GPT-2's modules in a Llama.
    let error = merge("llama", &[("gpt2_fan_in_fan_out", 1.0)], &out).unwrap_err();
    assert!(matches!(error, ModelError::AdapterMismatch { .. }), "{error}");
    assert!(error.to_string().contains("transformer.h.0.attn.c_attn"), "{error}");
    // A weight on a kind that is not additive.
    let error = merge("llama", &[("dora", 0.5)], &out).unwrap_err();
    assert!(error.to_string().contains("additive"), "{error}");
    // Nothing was left behind, not even the hidden folder.
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0);

    // An output that exists: refused unless forced.
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("keep.txt"), "mine")?;
    let error = merge("llama", &[("lora", 1.0)], &out).unwrap_err();
    assert!(matches!(error, ModelError::OutputExists { .. }), "{error}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt"))?, "mine");
    let adapters = [WeightedAdapter::read(case("lora").join("adapter"), 1.0)?];
    let forced = MergeOptions {
        force: true,
        ..MergeOptions::default()
    };
    merge_checkpoint(&case("llama"), &adapters, &out, &forced, &mut |_| {})?;
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors.index.json").is_file());

    // A shape that does not fit: a LoRA A of the wrong width, named by key.
    let broken = dir.join("broken_adapter");
    std::fs::create_dir_all(&broken)?;
    std::fs::copy(
        case("lora").join("adapter/adapter_config.json"),
        broken.join("adapter_config.json"),
    )?;
    let mut tensors =
        candle_core::safetensors::load(case("lora").join("adapter/adapter_model.safetensors"), &Device::Cpu)?;
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    tensors.insert(key.to_owned(), Tensor::zeros((4, 31), DType::F32, &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, broken.join("adapter_model.safetensors"))?;
    let out2 = dir.join("merged2");
    let error = merge_checkpoint(
        &case("llama"),
        &[WeightedAdapter::read(&broken, 1.0)?],
        &out2,
        &MergeOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        error.to_string().contains(key) && error.to_string().contains("31"),
        "{error}"
    );
    assert!(!out2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

/// An output that cannot be written (a path under a file: CI runs as root,
/// for whom a read-only folder is writable): an error naming it, nothing
/// left behind.
#[test]
fn an_output_that_cannot_be_written_is_named() -> TestResult {
    let dir = scratch("merge", "unwritable");
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, "not a folder")?;
    let out = blocker.join("merged");
    let error = merge("llama", &[("lora", 1.0)], &out).unwrap_err();
    assert!(matches!(error, ModelError::Io { .. }), "{error}");
    assert!(error.to_string().contains("a-file"), "{error}");
    assert_eq!(std::fs::read_to_string(&blocker)?, "not a folder");
    Ok(())
}
