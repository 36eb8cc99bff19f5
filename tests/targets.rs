//! PEFT's matching rules, table-driven, and the errors of target resolution.

use candle_core::{DType, Device, Tensor};
use peft_core::prelude::*;
use peft_core::{name_matches, PeftError, Role};

#[test]
fn name_rule_is_exact_path_or_dotted_suffix() {
    let cases = [
        ("layers.0.self_attn.q_proj", "q_proj", true),
        ("layers.0.self_attn.q_proj", "self_attn.q_proj", true),
        ("layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj", true),
        ("q_proj", "q_proj", true),
        ("layers.0.self_attn.q_proj", "proj", false),
        ("layers.0.self_attn.xq_proj", "q_proj", false),
        ("layers.0.self_attn.q_proj", "attn.q_proj", false),
        ("layers.0.self_attn.q_proj", "0.self_attn", false),
        ("layers.0.self_attn.q_proj", "", false),
        ("head", "lm_head", false),
    ];
    for (path, name, expected) in cases {
        assert_eq!(name_matches(path, name), expected, "{name:?} against {path:?}");
    }
}

#[test]
fn regex_must_match_the_whole_path() {
    let cases = [
        (r".*q_proj", "layers.0.self_attn.q_proj", true),
        (r"q_proj", "layers.0.self_attn.q_proj", false),
        (
            r"layers\.\d+\.self_attn\.(q|v)_proj",
            "layers.11.self_attn.v_proj",
            true,
        ),
        (
            r"layers\.\d+\.self_attn\.(q|v)_proj",
            "layers.11.self_attn.k_proj",
            false,
        ),
        // Alternation binds inside the anchors: `a|b` must not mean `^a|b$`.
        (r"up|down", "mlp.down_extra", false),
        (r"up|down", "down", true),
    ];
    for (pattern, path, expected) in cases {
        assert_eq!(
            regex(pattern).matches(path, Role::Hidden),
            expected,
            "{pattern:?} against {path:?}"
        );
    }
}

#[test]
fn all_linear_skips_only_the_output_head() {
    let t = all_linear();
    assert!(t.matches("lm_head", Role::Hidden));
    assert!(!t.matches("lm_head", Role::OutputHead));
    // Naming the head targets it, as in PEFT.
    assert!(modules(["lm_head"]).matches("lm_head", Role::OutputHead));
}

#[test]
fn exclusions_and_layer_filter() {
    let cases = [
        (all_linear().exclude(["k_proj"]), "layers.0.attn.k_proj", false),
        (all_linear().exclude(["k_proj"]), "layers.0.attn.q_proj", true),
        (all_linear().exclude_regex(r".*\.1\..*"), "layers.1.attn.q_proj", false),
        (all_linear().exclude_regex(r".*\.1\..*"), "layers.0.attn.q_proj", true),
        (all_linear().layers([1, 3]), "layers.3.attn.q_proj", true),
        (all_linear().layers([1, 3]), "layers.2.attn.q_proj", false),
        // The layer index is the first numeric segment.
        (all_linear().layers([1]), "layers.1.experts.7.w1", true),
        (all_linear().layers([7]), "layers.1.experts.7.w1", false),
        // A path without a layer index is left out by a layer filter.
        (all_linear().layers([0]), "proj", false),
        (
            modules(["q_proj"]).or(modules(["v_proj"])),
            "layers.0.attn.v_proj",
            true,
        ),
        (
            modules(["q_proj"]).or(modules(["v_proj"])),
            "layers.0.attn.k_proj",
            false,
        ),
    ];
    for (targets, path, expected) in cases {
        assert_eq!(
            targets.matches(path, Role::Hidden),
            expected,
            "{targets} against {path:?}"
        );
    }
}

#[derive(Adaptable)]
struct Block {
    q_proj: Linear,
    v_proj: Linear,
}

#[derive(Adaptable)]
struct Model {
    layers: Vec<Block>,
    #[output_head]
    lm_head: Linear,
}

fn model() -> Model {
    let layer = || Linear::new(Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(), None);
    Model {
        layers: (0..3)
            .map(|_| Block {
                q_proj: layer(),
                v_proj: layer(),
            })
            .collect(),
        lm_head: layer(),
    }
}

#[test]
fn targeted_modules_are_full_paths_sorted() {
    let m = model();
    assert_eq!(
        m.targeted_modules(&all_linear()).unwrap(),
        [
            "layers.0.q_proj",
            "layers.0.v_proj",
            "layers.1.q_proj",
            "layers.1.v_proj",
            "layers.2.q_proj",
            "layers.2.v_proj"
        ]
    );
    assert_eq!(
        m.targeted_modules(&modules(["v_proj", "lm_head"]).layers([2])).unwrap(),
        ["layers.2.v_proj"]
    );
    assert_eq!(m.targeted_modules(&modules(["lm_head"])).unwrap(), ["lm_head"]);
}

#[test]
fn nothing_matched_names_what_was_asked() {
    let err = model().targeted_modules(&modules(["o_proj", "gate"])).unwrap_err();
    assert!(
        matches!(err, PeftError::NoTargetMatched { candidates: 7, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(r#"["o_proj", "gate"]"#), "{message}");
}

#[test]
fn everything_excluded_is_its_own_error() {
    let err = model()
        .targeted_modules(&all_linear().exclude(["q_proj", "v_proj"]))
        .unwrap_err();
    match &err {
        PeftError::AllTargetsExcluded {
            matched, removed_by, ..
        } => {
            assert_eq!(*matched, 6);
            assert!(removed_by.contains("q_proj"), "{removed_by}");
        }
        other => panic!("expected AllTargetsExcluded, got {other:?}"),
    }
    let err = model().targeted_modules(&all_linear().layers([9])).unwrap_err();
    assert!(err.to_string().contains("layers_to_transform [9]"), "{err}");
}

#[test]
fn a_bad_regex_is_reported_with_its_pattern() {
    let err = model().targeted_modules(&regex("layers.(")).unwrap_err();
    match err {
        PeftError::InvalidRegex { pattern, .. } => assert_eq!(pattern, "layers.("),
        other => panic!("expected InvalidRegex, got {other:?}"),
    }
}

// ---- layers_to_transform / layers_pattern read and saved as PEFT does --------------

mod support;

/// The tiny Llama of `tests/fixtures/llama_lora_all_linear`.
fn llama() -> peft_models::AutoModel {
    peft_models::AutoModel::from_dir(support::fixture_path("llama_lora_all_linear"), DType::F32, &Device::Cpu).unwrap()
}

fn adapted(model: &impl PeftModel, name: &str) -> Vec<String> {
    let mut paths: Vec<String> = model
        .layers()
        .into_iter()
        .filter(|l| l.layer.has_adapter(name))
        .map(|l| l.path)
        .collect();
    paths.sort();
    paths
}

#[test]
fn empty_layers_pattern_is_peft_default_layer_rule() {
    // PEFT saved `layers_pattern: []` with `layers_to_transform: [1]`
    // (tests/fixtures/bin_adapter/adapter_empty_pattern): no pattern, PEFT's
    // default layer rule, two modules of layer 1.
    let dir = support::fixture_path("bin_adapter/adapter_empty_pattern");
    let config: serde_json::Value = support::read_json(dir.join(peft_core::CONFIG_FILE));
    assert_eq!(config["layers_pattern"], serde_json::json!([]));
    let mut model = llama();
    model.load_adapter(&dir, "default").unwrap();
    let expected: Vec<String> = serde_json::from_value(
        support::read_json(support::fixture_path("bin_adapter/targets.json"))["adapter_empty_pattern"].clone(),
    )
    .unwrap();
    assert_eq!(adapted(&model, "default"), expected);
    let io = support::fixture_io("bin_adapter");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let diff = support::max_abs_diff(&model.forward(&ids).unwrap(), &io["logits_empty_pattern"]);
    eprintln!("layers_pattern []: max |logits - PEFT's| = {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
    // The builder reads no patterns the same way.
    let targets = modules(["q_proj", "up_proj"])
        .layers([1])
        .layers_pattern(Vec::<String>::new());
    assert_eq!(model.targeted_modules(&targets).unwrap(), expected);
}

#[test]
fn layer_filters_are_saved_and_read_back_alike() {
    // Targets with a layer filter: the saved config carries
    // layers_to_transform and layers_pattern beside the exact paths, and
    // reading it back adapts the same modules (Python PEFT too: see
    // tests/fixtures/bin_adapter/check_rust_saved.py and its CASE.md).
    let mut model = llama();
    let targets = modules(["q_proj", "up_proj"]).layers([1]).layers_pattern(["layers"]);
    model
        .apply_lora(LoraConfig::from(targets).rank(2).init(LoraInit::Random))
        .unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("targets/layer-filters-saved");
    let _ = std::fs::remove_dir_all(&dir);
    model.save_adapter(&dir, "default").unwrap();
    let config = support::read_json(dir.join(peft_core::CONFIG_FILE));
    assert_eq!(config["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(config["layers_pattern"], serde_json::json!(["layers"]));
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"])
    );
    let mut twin = llama();
    twin.load_adapter(&dir, "default").unwrap();
    assert_eq!(adapted(&twin, "default"), adapted(&model, "default"));
    let ids = Tensor::new(&[[1u32, 17, 33, 8]], &Device::Cpu).unwrap();
    let diff = support::max_abs_diff(&twin.forward(&ids).unwrap(), &model.forward(&ids).unwrap());
    assert_eq!(diff, 0.0);

    // 20 paths or more: PEFT rewrites the list as suffixes and applies the
    // filter with its own index rule. Where that rule finds no index
    // (`layers.0.q`, no segment before `layers`), the filters are saved as
    // null, the exact list alone.
    #[derive(Adaptable)]
    struct Block {
        q: Linear,
    }
    #[derive(Adaptable)]
    struct Flat {
        layers: Vec<Block>,
    }
    let lin = || Linear::new(Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(), None);
    let mut flat = Flat {
        layers: (0..24).map(|_| Block { q: lin() }).collect(),
    };
    flat.apply_lora(LoraConfig::from(modules(["q"]).layers(0..22))).unwrap();
    let dir = dir.with_file_name("layer-filters-flat");
    let _ = std::fs::remove_dir_all(&dir);
    flat.save_adapter(&dir, "default").unwrap();
    let config = support::read_json(dir.join(peft_core::CONFIG_FILE));
    assert!(
        config["layers_to_transform"].is_null() && config["layers_pattern"].is_null(),
        "{config}"
    );
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 22);
    assert_eq!(peft_core::peft_layer_index("layers.3.q", &[]), None);
    assert_eq!(peft_core::peft_layer_index("model.layers.3.q", &[]), Some(3));
    assert_eq!(
        peft_core::peft_layer_index("layers.3.q", &["layers".to_owned()]),
        Some(3)
    );
}
