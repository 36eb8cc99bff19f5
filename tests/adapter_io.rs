//! Saving and loading adapters in PEFT's file format: round trips, PEFT's
//! target rules read from the config, and every error, each leaving the
//! model unchanged.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::{PeftError, CONFIG_FILE, WEIGHTS_FILE};
use serde_json::{json, Value};

mod support;
use support::{max_abs_diff, read_json, scratch};

const DEV: Device = Device::Cpu;

#[derive(Adaptable)]
struct Block {
    q: Linear,
    v: Linear,
    mlp: Linear,
}

#[derive(Adaptable)]
struct Net {
    layers: Vec<Block>,
    #[output_head]
    head: Linear,
}

impl Net {
    fn new(varmap: &VarMap) -> Net {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &DEV);
        let layers = (0..3)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Block {
                    q: linear(6, 6, vb.pp("q")).unwrap(),
                    v: linear_no_bias(6, 6, vb.pp("v")).unwrap(),
                    mlp: linear(6, 6, vb.pp("mlp")).unwrap(),
                }
            })
            .collect();
        Net {
            layers,
            head: linear(6, 5, vb.pp("head")).unwrap(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.clone();
        for block in &self.layers {
            let h = (block.q.forward(&x).unwrap() + block.v.forward(&x).unwrap()).unwrap();
            x = (&x + block.mlp.forward(&h.tanh().unwrap()).unwrap()).unwrap();
        }
        self.head.forward(&x).unwrap()
    }

    /// A second instance with the same base weights.
    fn twin(varmap: &VarMap) -> Net {
        Net::new(varmap)
    }
}

fn input() -> Tensor {
    Tensor::arange(0f32, 12.0, &DEV)
        .unwrap()
        .reshape((2, 6))
        .unwrap()
        .affine(0.1, -0.5)
        .unwrap()
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn random_lora(targets: Targets) -> LoraConfig {
    LoraConfig::from(targets).rank(2).alpha(4.0).init(LoraInit::Random)
}

/// A model with a saved random adapter, the folder, and the adapted output.
fn saved(name: &str, config: LoraConfig) -> (VarMap, PathBuf, Tensor) {
    let varmap = VarMap::new();
    let mut net = Net::new(&varmap);
    net.apply_lora(config).unwrap();
    let dir = scratch("adapter_io", name);
    net.save_adapter(&dir, "default").unwrap();
    let y = net.forward(&input());
    (varmap, dir, y)
}

#[test]
fn saved_files_are_what_peft_writes() {
    let (_, dir, _) = saved(
        "format",
        random_lora(all_linear().exclude(["mlp"])).task_type("CAUSAL_LM"),
    );
    let config = read_json(dir.join(CONFIG_FILE));
    let expected_targets: Vec<String> = (0..3)
        .flat_map(|i| [format!("layers.{i}.q"), format!("layers.{i}.v")])
        .collect();
    assert_eq!(config["target_modules"], json!(expected_targets));
    for (field, value) in [
        ("peft_type", json!("LORA")),
        ("r", json!(2)),
        ("lora_alpha", json!(4)),
        ("lora_dropout", json!(0.0)),
        ("exclude_modules", json!(["mlp"])),
        ("use_rslora", json!(false)),
        ("use_dora", json!(false)),
        ("fan_in_fan_out", json!(false)),
        ("bias", json!("none")),
        ("init_lora_weights", json!(false)),
        ("layers_to_transform", json!(null)),
        ("layers_pattern", json!(null)),
        ("rank_pattern", json!({})),
        ("alpha_pattern", json!({})),
        ("modules_to_save", json!(null)),
        ("task_type", json!("CAUSAL_LM")),
        ("base_model_name_or_path", json!(null)),
        ("revision", json!(null)),
        ("inference_mode", json!(true)),
    ] {
        assert_eq!(config[field], value, "{field}");
    }
    // Keys sorted, two-space indent, as json.dumps(indent=2, sort_keys=True).
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    assert!(
        text.starts_with("{\n  \"alpha_pattern\": {},\n  \"base_model_name_or_path\": null,"),
        "{text}"
    );

    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        metadata.metadata().as_ref().unwrap().get("format").map(String::as_str),
        Some("pt")
    );
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &DEV).unwrap();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 12);
    assert_eq!(keys[0], "base_model.model.layers.0.q.lora_A.weight");
    assert_eq!(tensors["base_model.model.layers.0.q.lora_A.weight"].dims(), [2, 6]);
    assert_eq!(tensors["base_model.model.layers.0.q.lora_B.weight"].dims(), [6, 2]);
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

#[test]
fn load_gives_back_the_same_outputs() {
    let (varmap, dir, adapted) = saved("round_trip", random_lora(all_linear()).rslora(true));
    let mut twin = Net::twin(&varmap);
    assert!(max_abs_diff(&twin.forward(&input()), &adapted) > 1e-3);
    twin.load_adapter(&dir, "default").unwrap();
    assert_eq!(max_abs_diff(&twin.forward(&input()), &adapted), 0.0);
    // The same adapter again, under another name.
    twin.load_adapter(&dir, "copy").unwrap();
    assert_eq!(twin.adapter_names(), ["copy", "default"]);
    // Saving what was loaded writes the same config.
    let again = scratch("adapter_io", "round_trip_again");
    twin.save_adapter(&again, "default").unwrap();
    assert_eq!(read_json(again.join(CONFIG_FILE)), read_json(dir.join(CONFIG_FILE)));
}

#[test]
fn other_adapters_go_in_subfolders() {
    let varmap = VarMap::new();
    let mut net = Net::new(&varmap);
    net.apply_lora(random_lora(modules(["q"]))).unwrap();
    net.add_adapter("second", &random_lora(modules(["v"]))).unwrap();
    let dir = scratch("adapter_io", "subfolders");
    net.save_adapters(&dir).unwrap();
    assert!(dir.join(CONFIG_FILE).is_file());
    assert!(dir.join("second").join(CONFIG_FILE).is_file());
    let config = read_json(dir.join("second").join(CONFIG_FILE));
    assert_eq!(
        config["target_modules"],
        json!(["layers.0.v", "layers.1.v", "layers.2.v"])
    );

    let both = net.forward(&input());
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&dir, "default").unwrap();
    twin.load_adapter(dir.join("second"), "second").unwrap();
    assert_eq!(max_abs_diff(&twin.forward(&input()), &both), 0.0);
}

#[test]
fn f16_and_bf16_tensors_load_into_the_model_dtype() {
    for dtype in [DType::F16, DType::BF16] {
        let (varmap, dir, adapted) = saved(&format!("{dtype:?}"), random_lora(all_linear()));
        let path = dir.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&path, &DEV).unwrap();
        let narrow: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&narrow.into_iter().collect(), &path).unwrap();
        let mut twin = Net::twin(&varmap);
        twin.load_adapter(&dir, "default").unwrap();
        assert!(twin.named_trainable_vars().iter().all(|(_, v)| v.dtype() == DType::F32));
        // Only the rounding of the adapter weights to 16 bits differs
        // (bf16 keeps 8 bits of mantissa).
        let diff = max_abs_diff(&twin.forward(&input()), &adapted);
        let scale = adapted
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff > 0.0 && diff < 2e-2 * scale,
            "{dtype:?}: {diff} (outputs up to {scale})"
        );
    }
}

/// Saves an adapter made with `targets`, rewrites its config with `edit`
/// (saying the same thing in another of PEFT's forms), loads it into a twin,
/// and returns the twin's adapted modules.
fn load_edited(name: &str, targets: Targets, edit: impl FnOnce(&mut Value)) -> peft_core::Result<Vec<String>> {
    let (varmap, dir, adapted) = saved(name, random_lora(targets));
    let mut config = read_json(dir.join(CONFIG_FILE));
    edit(&mut config);
    write_json(&dir.join(CONFIG_FILE), &config);
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&dir, "default")?;
    assert_eq!(max_abs_diff(&twin.forward(&input()), &adapted), 0.0);
    Ok(twin.adapted_modules())
}

#[test]
fn config_targets_follow_peft_rules() {
    let all = load_edited("all_linear", all_linear(), |c| {
        c["target_modules"] = json!("all-linear")
    })
    .unwrap();
    assert_eq!(all.len(), 9);
    let regex = load_edited("regex", modules(["q", "v"]).layers([0, 1]), |c| {
        c["target_modules"] = json!(r"layers\.[01]\.(q|v)");
        // Saved beside the list; PEFT refuses it beside a regex.
        assert_eq!(c["layers_to_transform"], json!([0, 1]));
        c["layers_to_transform"] = Value::Null;
    })
    .unwrap();
    assert_eq!(regex, ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]);
    let excluded = load_edited("exclude_list", all_linear().exclude(["mlp"]), |c| {
        c["target_modules"] = json!("all-linear");
        c["exclude_modules"] = json!(["mlp"]);
    })
    .unwrap();
    assert_eq!(excluded.len(), 6);
    let excluded = load_edited("exclude_regex", modules(["mlp"]), |c| {
        c["target_modules"] = json!("all-linear");
        c["exclude_modules"] = json!(r".*\.(q|v)");
    })
    .unwrap();
    assert_eq!(excluded, ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]);
    let layers = load_edited("layers", modules(["q"]).layers([0, 2]), |c| {
        c["target_modules"] = json!(["q"]);
        c["layers_to_transform"] = json!([0, 2]);
        c["layers_pattern"] = json!("layers");
    })
    .unwrap();
    assert_eq!(layers, ["layers.0.q", "layers.2.q"]);
    // A narrower config than the file is an error: the extra tensors belong to no target.
    let narrower = load_edited("narrower", all_linear(), |c| c["target_modules"] = json!(["q"]));
    assert!(matches!(narrower, Err(PeftError::UnexpectedTensors { ref keys }) if keys.len() == 12));
}

#[test]
fn rank_pattern_takes_the_first_match_in_file_order() {
    let varmap = VarMap::new();
    let mut net = Net::new(&varmap);
    // layers.1.q matches both patterns; the first in file order wins.
    net.apply_lora(
        random_lora(modules(["q"]))
            .rank_for(r"layers\.1\.q", 4)
            .rank_for("q", 5)
            .alpha_for("q", 10.0),
    )
    .unwrap();
    let ranks: Vec<usize> = net
        .named_trainable_vars()
        .iter()
        .step_by(2)
        .map(|(_, v)| v.dims()[0])
        .collect();
    assert_eq!(ranks, [5, 4, 5]);
    let dir = scratch("adapter_io", "rank_pattern");
    net.save_adapter(&dir, "default").unwrap();
    let adapted = net.forward(&input());
    // Written by hand so that the order is not alphabetical.
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains(r#""rank_pattern": {"#), "{text}");
    let mut config = read_json(&config_path);
    config["rank_pattern"] = json!({});
    let text = serde_json::to_string_pretty(&config).unwrap().replace(
        r#""rank_pattern": {}"#,
        r#""rank_pattern": {"layers\\.1\\.q": 4, "q": 5}"#,
    );
    std::fs::write(&config_path, text).unwrap();
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&dir, "default").unwrap();
    assert_eq!(max_abs_diff(&twin.forward(&input()), &adapted), 0.0);
}

#[test]
fn saving_keeps_the_pattern_order() {
    // "q" comes first and matches every q, so layers\.1\.q never wins: an
    // alphabetical save would put it first and change layers.1.q's rank.
    let varmap = VarMap::new();
    let mut net = Net::new(&varmap);
    let config = random_lora(modules(["q"]))
        .rank_for("q", 3)
        .rank_for(r"layers\.1\.q", 5)
        .alpha_for("q", 6.0)
        .alpha_for(r"layers\.1\.q", 1.0);
    net.apply_lora(config).unwrap();
    let dir = scratch("adapter_io", "pattern_order");
    net.save_adapter(&dir, "default").unwrap();
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let rank_pattern = &text[text.find(r#""rank_pattern""#).unwrap()..];
    assert!(
        rank_pattern.find(r#""q""#) < rank_pattern.find(r#""layers\\.1\\.q""#),
        "{text}"
    );
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&dir, "default").unwrap();
    assert_eq!(max_abs_diff(&twin.forward(&input()), &net.forward(&input())), 0.0);
    // The top-level keys stay sorted, as PEFT writes them.
    let keys: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("  \""))
        .map(|l| l.trim())
        .collect();
    assert!(keys.is_sorted(), "{keys:?}");
}

#[test]
fn an_exclusion_regex_is_saved_as_it_was_read() {
    // Saving, loading and saving again writes the same config.
    let varmap = VarMap::new();
    let mut net = Net::new(&varmap);
    net.apply_lora(random_lora(modules(["q", "v"]).exclude_regex(r"layers\.0\..*")))
        .unwrap();
    let first = scratch("adapter_io", "exclusion_regex_first");
    net.save_adapter(&first, "default").unwrap();
    assert_eq!(
        read_json(first.join(CONFIG_FILE))["exclude_modules"],
        json!(r"layers\.0\..*")
    );
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&first, "default").unwrap();
    let again = scratch("adapter_io", "exclusion_regex_again");
    twin.save_adapter(&again, "default").unwrap();
    assert_eq!(
        std::fs::read_to_string(first.join(CONFIG_FILE)).unwrap(),
        std::fs::read_to_string(again.join(CONFIG_FILE)).unwrap()
    );
}

#[test]
fn a_repeated_pattern_key_takes_its_last_value() {
    // Python's json.load keeps the last value of a repeated key, in the
    // first key's place; PEFT then reads that dict.
    let (varmap, dir, _) = saved("repeated_key", random_lora(modules(["q"])));
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(r#""rank_pattern": {}"#, r#""rank_pattern": {"q": 1, "v": 7, "q": 2}"#);
    std::fs::write(&path, text).unwrap();
    let mut twin = Net::twin(&varmap);
    // The file's tensors have rank 2: the last value of "q" matches them.
    twin.load_adapter(&dir, "default").unwrap();
    let out = scratch("adapter_io", "repeated_key_saved");
    twin.save_adapter(&out, "default").unwrap();
    let saved = read_json(out.join(CONFIG_FILE));
    assert_eq!(saved["rank_pattern"], json!({"q": 2, "v": 7}));
}

/// Runs a load that must fail, and checks that the model did not change.
fn failing_load(dir: &Path, varmap: &VarMap) -> PeftError {
    let mut twin = Net::twin(varmap);
    let before = twin.forward(&input());
    let err = twin.load_adapter(dir, "default").unwrap_err();
    assert!(twin.adapter_names().is_empty(), "a failed load left adapters: {err}");
    assert_eq!(max_abs_diff(&twin.forward(&input()), &before), 0.0);
    err
}

#[test]
fn missing_folder_and_files_are_io_errors_naming_the_path() {
    let (varmap, dir, _) = saved("missing", random_lora(all_linear()));
    let nowhere = dir.join("nowhere");
    match failing_load(&nowhere, &varmap) {
        PeftError::Io { path, .. } => assert_eq!(path, nowhere.join(CONFIG_FILE)),
        other => panic!("expected Io, got {other:?}"),
    }
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    match failing_load(&dir, &varmap) {
        PeftError::Io { path, .. } => assert_eq!(path, dir.join(WEIGHTS_FILE)),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn malformed_json_is_reported_with_the_file() {
    let (varmap, dir, _) = saved("malformed", random_lora(all_linear()));
    std::fs::write(dir.join(CONFIG_FILE), "{\"peft_type\": \"LORA\", \"r\": }").unwrap();
    match failing_load(&dir, &varmap) {
        PeftError::Json {
            path, cause: source, ..
        } => {
            assert_eq!(path, dir.join(CONFIG_FILE));
            assert_eq!(source.line(), 1);
        }
        other => panic!("expected Json, got {other:?}"),
    }
    write_json(
        &dir.join(CONFIG_FILE),
        &json!({"peft_type": "LORA", "r": "eight", "target_modules": ["q"]}),
    );
    assert!(matches!(failing_load(&dir, &varmap), PeftError::Json { .. }));
}

#[test]
fn unsupported_types_and_options_are_refused() {
    let (varmap, dir, _) = saved("unsupported", random_lora(all_linear()));
    let original = read_json(dir.join(CONFIG_FILE));
    let cases = [
        ("peft_type", json!("VERA"), "peft_type"),
        ("use_qalora", json!(true), "use_qalora"),
        ("lora_bias", json!(true), "lora_bias"),
        ("init_lora_weights", json!("loftq"), "init_lora_weights"),
        ("layer_replication", json!([[0, 2]]), "layer_replication"),
        ("target_modules", json!(null), "target_modules"),
    ];
    for (field, value, expected) in cases {
        let mut config = original.clone();
        config[field] = value;
        write_json(&dir.join(CONFIG_FILE), &config);
        match failing_load(&dir, &varmap) {
            PeftError::UnsupportedPeftType { found, supported } => {
                assert_eq!((expected, found.as_str()), ("peft_type", "VERA"));
                assert!(supported.split(", ").any(|kind| kind == "LORA"), "{supported}");
            }
            PeftError::UnsupportedOption { field, .. } => assert_eq!(field, expected),
            other => panic!("{field}: expected an unsupported error, got {other:?}"),
        }
    }
}

#[test]
fn tensor_problems_name_the_key() {
    let (varmap, dir, _) = saved("tensors", random_lora(all_linear()));
    let path = dir.join(WEIGHTS_FILE);
    let original = candle_core::safetensors::load(&path, &DEV).unwrap();

    let mut missing = original.clone();
    missing.remove("base_model.model.layers.1.v.lora_B.weight");
    candle_core::safetensors::save(&missing, &path).unwrap();
    match failing_load(&dir, &varmap) {
        PeftError::MissingTensor { module, key } => {
            assert_eq!(module, "layers.1.v");
            assert_eq!(key, "base_model.model.layers.1.v.lora_B.weight");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    let mut extra = original.clone();
    extra.insert(
        "base_model.model.head.lora_A.weight".into(),
        Tensor::zeros((2, 6), DType::F32, &DEV).unwrap(),
    );
    candle_core::safetensors::save(&extra, &path).unwrap();
    match failing_load(&dir, &varmap) {
        PeftError::UnexpectedTensors { keys } => assert_eq!(keys, ["base_model.model.head.lora_A.weight"]),
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }

    let mut wrong = original.clone();
    wrong.insert(
        "base_model.model.layers.2.mlp.lora_A.weight".into(),
        Tensor::zeros((2, 5), DType::F32, &DEV).unwrap(),
    );
    candle_core::safetensors::save(&wrong, &path).unwrap();
    match failing_load(&dir, &varmap) {
        PeftError::ShapeMismatch { key, expected, found } => {
            assert_eq!(key, "base_model.model.layers.2.mlp.lora_A.weight");
            assert_eq!((expected, found), (vec![2, 6], vec![2, 5]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }

    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(failing_load(&dir, &varmap), PeftError::Safetensors { .. }));
}

#[test]
fn loading_a_name_twice_is_refused() {
    let (varmap, dir, _) = saved("twice", random_lora(all_linear()));
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&dir, "default").unwrap();
    let before = twin.forward(&input());
    assert!(matches!(
        twin.load_adapter(&dir, "default"),
        Err(PeftError::AdapterExists { .. })
    ));
    assert_eq!(max_abs_diff(&twin.forward(&input()), &before), 0.0);
}

#[test]
fn saving_an_unknown_adapter_is_an_error_and_writes_nothing() {
    let varmap = VarMap::new();
    let net = Net::new(&varmap);
    let dir = scratch("adapter_io", "unknown").join("out");
    assert!(matches!(
        net.save_adapter(&dir, "default"),
        Err(PeftError::UnknownAdapter { .. })
    ));
    assert!(!dir.exists());
}

/// Names that would not stay one folder below the chosen one are refused by
/// every entry point before anything is added, read or written.
#[test]
fn adapter_names_that_leave_the_folder_are_refused() {
    let (varmap, saved_dir, _) = saved("names", random_lora(all_linear()));
    let root = scratch("adapter_io", "names-out");
    let dir = root.join("inner");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = [
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        "/tmp/absolute",
        "a\\b",
        "line\nbreak",
    ];
    for name in bad {
        let refused = |result: peft_core::Result<()>, what: &str| match result {
            Err(PeftError::InvalidAdapterName { name: got, reason }) => {
                assert_eq!(got, name, "{what}");
                assert!(!reason.is_empty());
            }
            other => panic!("{what} {name:?}: expected InvalidAdapterName, got {other:?}"),
        };
        let mut net = Net::twin(&varmap);
        refused(net.add_adapter(name, &random_lora(all_linear())), "add_adapter");
        refused(net.load_adapter(&saved_dir, name), "load_adapter");
        assert!(net.adapter_names().is_empty(), "{name:?} left an adapter behind");
        net.apply_lora(random_lora(all_linear())).unwrap();
        refused(net.save_adapter(&dir, name), "save_adapter");
        assert!(peft_core::adapter_dir(&dir, name).is_err());
    }
    // Nothing was written inside the folder or next to it.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let beside: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["inner"]);
    // Dots inside a name are fine, as in PEFT.
    let mut net = Net::twin(&varmap);
    net.add_adapter("v1.2", &random_lora(all_linear())).unwrap();
    net.save_adapter(&dir, "v1.2").unwrap();
    assert!(dir.join("v1.2").join(CONFIG_FILE).exists());
}

#[test]
fn saving_over_an_adapter_replaces_it_whole() {
    let (varmap, dir, _) = saved("overwrite", random_lora(all_linear()));
    let mut other = Net::twin(&varmap);
    other.apply_lora(random_lora(modules(["q"])).rank(4)).unwrap();
    other.save_adapter(&dir, "default").unwrap();
    let mut twin = Net::twin(&varmap);
    twin.load_adapter(&dir, "default").unwrap();
    assert_eq!(twin.adapted_modules(), ["layers.0.q", "layers.1.q", "layers.2.q"]);
    assert_eq!(max_abs_diff(&twin.forward(&input()), &other.forward(&input())), 0.0);
}

// ---- adapter_model.bin (PyTorch's pickle) ------------------------------------------

/// `tests/fixtures/bin_adapter/<folder>`.
fn bin_case(folder: &str) -> PathBuf {
    support::fixture_path("bin_adapter").join(folder)
}

#[test]
fn pickled_adapters_load_as_peft_loads_them() {
    use peft_models::AutoModel;
    // A LoRA adapter PEFT saved with safe_serialization=False, over the base
    // of llama_lora_all_linear: PEFT's logits.
    let io = support::fixture_io("bin_adapter");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let base = || AutoModel::from_dir(support::fixture_path("llama_lora_all_linear"), DType::F32, &DEV).unwrap();
    let mut model = base();
    model.load_adapter(bin_case("adapter_bin"), "default").unwrap();
    let diff = max_abs_diff(&model.forward(&ids).unwrap(), &io["logits_bin"]);
    eprintln!("adapter_model.bin: max |logits - PEFT's| = {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
    let targets: Vec<String> =
        serde_json::from_value(read_json(support::fixture_path("bin_adapter/targets.json"))["adapter_bin"].clone())
            .unwrap();
    let mut loaded: Vec<String> = model
        .layers()
        .into_iter()
        .filter(|l| l.layer.has_adapter("default"))
        .map(|l| l.path)
        .collect();
    loaded.sort();
    assert_eq!(loaded, targets);

    // The same tensors, bit for bit, as the same adapter saved as safetensors.
    let pickled = peft_core::StandaloneAdapter::from_dir(bin_case("adapter_bin")).unwrap();
    let safetensors = peft_core::StandaloneAdapter::from_dir(bin_case("adapter_safetensors")).unwrap();
    assert_eq!(pickled.tensors().len(), 12);
    assert_eq!(
        pickled.tensors().keys().collect::<Vec<_>>(),
        safetensors.tensors().keys().collect::<Vec<_>>()
    );
    for (key, tensor) in pickled.tensors() {
        assert_eq!(tensor.dims(), safetensors.tensors()[key].dims(), "{key}");
        assert_eq!(max_abs_diff(tensor, &safetensors.tensors()[key]), 0.0, "{key}");
    }

    // From memory, the zip is recognised as PyTorch's file.
    let config = std::fs::read_to_string(bin_case("adapter_bin").join(CONFIG_FILE)).unwrap();
    let bytes = std::fs::read(bin_case("adapter_bin").join(peft_core::PICKLE_WEIGHTS_FILE)).unwrap();
    let mut from_memory = base();
    from_memory.load_adapter_from_bytes(&config, &bytes, "default").unwrap();
    assert_eq!(
        max_abs_diff(&from_memory.forward(&ids).unwrap(), &model.forward(&ids).unwrap()),
        0.0
    );

    // `peft inspect` reads it too.
    let report = peft_models::inspect::inspect_adapter(&bin_case("adapter_bin"));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.modules.len(), 6);
}

#[test]
fn safetensors_are_preferred_to_adapter_model_bin() {
    // Both files: the safetensors one is read (as PEFT's load_peft_weights),
    // so a pickle beside it, even a hostile one, is never opened.
    let dir = scratch("adapter_io", "both-weight-files");
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(bin_case("adapter_safetensors").join(file), dir.join(file)).unwrap();
    }
    std::fs::copy(
        bin_case("hostile").join("global_top.bin"),
        dir.join(peft_core::PICKLE_WEIGHTS_FILE),
    )
    .unwrap();
    assert_eq!(peft_core::adapter_weights_file(&dir), dir.join(WEIGHTS_FILE));
    let adapter = peft_core::StandaloneAdapter::from_dir(&dir).unwrap();
    assert_eq!(adapter.modules().len(), 6);
    // Without the safetensors file, the pickle is read (and this one refused).
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(
        peft_core::adapter_weights_file(&dir),
        dir.join(peft_core::PICKLE_WEIGHTS_FILE)
    );
    let error = peft_core::StandaloneAdapter::from_dir(&dir).unwrap_err();
    assert!(matches!(error, PeftError::Pickle { .. }), "{error}");
}
