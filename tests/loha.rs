//! LoHa against Python PEFT (`tests/fixtures/loha_tiny`, see its CASE.md):
//! outputs, every gradient, merge / unmerge, the saved files, and a reload of
//! what Rust saved; then fresh adapters, dropout, parameter counts and the
//! errors of configs and files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::loha::{LohaAdapter, LohaConfig};
use peft_core::prelude::*;
use peft_core::{AdapterConfig, PeftError, CONFIG_FILE, WEIGHTS_FILE};
use serde_json::Value;

const DEV: Device = Device::Cpu;
const FIXTURE: &str = "tests/fixtures/loha_tiny";

/// The fixture's torch module: `y = fc2(tanh(fc1(x)))`.
#[derive(Adaptable)]
struct Tiny {
    fc1: Linear,
    fc2: Linear,
}

impl Tiny {
    fn new(vb: VarBuilder) -> Tiny {
        Tiny {
            fc1: linear(8, 12, vb.pp("fc1")).unwrap(),
            fc2: linear_no_bias(12, 20, vb.pp("fc2")).unwrap(),
        }
    }

    /// The base model of the fixture, from its `model.safetensors`.
    fn from_fixture() -> Tiny {
        let tensors = candle_core::safetensors::load(fixture("model.safetensors"), &DEV).unwrap();
        Tiny::new(VarBuilder::from_tensors(tensors, DType::F32, &DEV))
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).unwrap().tanh().unwrap()).unwrap()
    }
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE).join(path)
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("io.safetensors"), &DEV).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_of(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn loss(y: &Tensor) -> Tensor {
    y.sqr().unwrap().sum_all().unwrap()
}

/// A fresh folder under the target dir, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("loha").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_json(path: &Path) -> serde_json::Map<String, Value> {
    match serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() {
        Value::Object(map) => map,
        other => panic!("{path:?} is not a JSON object: {other}"),
    }
}

fn string_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn weights_of(model: &Tiny) -> Vec<Tensor> {
    vec![model.fc1.weight().clone(), model.fc2.weight().clone()]
}

/// Everything the fixture records for one case, checked against Rust.
fn check_case(case: &str, folder: &str) {
    let io = io();
    let get = |key: &str| io.get(key).unwrap_or_else(|| panic!("io.safetensors has no {key}"));
    let x = get("x");

    let mut model = Tiny::from_fixture();
    let y_base = model.forward(x);
    assert!(max_abs(&y_base, get("y_base")) <= 1e-6);
    let original = weights_of(&model);

    model.load_adapter(fixture(folder), "default").unwrap();
    assert_eq!(model.adapted_modules(), ["fc1", "fc2"]);

    // Output.
    let y = model.forward(x);
    let d_out = max_abs(&y, get(&format!("{case}.y_adapted")));
    println!("{case}: output max abs diff {d_out:.3e}");
    assert!(d_out <= 1e-5, "{case}: output differs by {d_out}");
    assert!(
        max_abs(&y, &y_base) > 1e-2,
        "{case}: the adapter should change the output"
    );

    // Gradients of sum(y²) with respect to every adapter tensor.
    let grads = loss(&y).backward().unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    for layer in model.linear_layers() {
        let adapter = layer.layer.adapter("default").unwrap();
        for (key, var) in adapter.trainable_vars() {
            let file_key = format!("base_model.model.{}.{key}", layer.path);
            let expected = get(&format!("{case}.grad.{file_key}"));
            let grad = grads.get(&var).unwrap_or_else(|| panic!("no gradient for {file_key}"));
            let rel = max_abs(grad, expected) / max_of(expected);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{case}: gradient of {file_key} differs by {rel} (relative)"
            );
            checked += 1;
        }
    }
    println!("{case}: gradients max relative diff {worst:.3e}");
    let in_fixture = io.keys().filter(|k| k.starts_with(&format!("{case}.grad."))).count();
    assert_eq!(checked, in_fixture);

    // Merge, then unmerge.
    model.merge().unwrap();
    let d_merged = max_abs(&model.forward(x), get(&format!("{case}.y_merged")));
    let d_weights = ["fc1", "fc2"]
        .iter()
        .zip(weights_of(&model))
        .map(|(n, w)| max_abs(&w, get(&format!("{case}.merged.{n}.weight"))))
        .fold(0f32, f32::max);
    println!("{case}: merged output {d_merged:.3e}, merged weights {d_weights:.3e}");
    assert!(d_merged <= 1e-5 && d_weights <= 1e-5);
    model.unmerge().unwrap();
    let d_restored = original
        .iter()
        .zip(weights_of(&model))
        .map(|(a, b)| max_abs(a, &b))
        .fold(0f32, f32::max);
    println!("{case}: unmerged weights vs original {d_restored:.3e}");
    assert!(d_restored <= 1e-6);
    assert!(max_abs(&model.forward(x), &y) <= 1e-6);

    // Saving writes PEFT's keys, shapes and values, and its config fields.
    let out = scratch(case);
    model.save_adapter(&out, "default").unwrap();
    let peft_tensors = candle_core::safetensors::load(fixture(folder).join(WEIGHTS_FILE), &DEV).unwrap();
    let ours = candle_core::safetensors::load(out.join(WEIGHTS_FILE), &DEV).unwrap();
    let keys = |m: &HashMap<String, Tensor>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&ours), keys(&peft_tensors));
    for (key, tensor) in &peft_tensors {
        assert_eq!(ours[key].dims(), tensor.dims(), "{key}");
        assert_eq!(max_abs(&ours[key], tensor), 0.0, "{key}");
    }
    check_saved_config(&fixture(folder).join(CONFIG_FILE), &out.join(CONFIG_FILE));

    // Reloading what Rust saved gives the same output.
    let mut reloaded = Tiny::from_fixture();
    reloaded.load_adapter(&out, "default").unwrap();
    assert_eq!(max_abs(&reloaded.forward(x), &y), 0.0);
}

/// Every field PEFT saved is in ours with the same value, except PEFT's
/// bookkeeping; `target_modules` compares as a set (a PEFT regex is compared
/// through the modules it matched).
fn check_saved_config(peft: &Path, ours: &Path) {
    let peft = read_json(peft);
    let mut ours = read_json(ours);
    let our_targets = string_set(&ours.remove("target_modules").unwrap());
    assert_eq!(our_targets, BTreeSet::from(["fc1".to_owned(), "fc2".to_owned()]));
    for (field, value) in &peft {
        match field.as_str() {
            "peft_version" | "auto_mapping" => {}
            "target_modules" => {
                if value.is_array() {
                    assert_eq!(string_set(value), our_targets);
                }
            }
            _ => assert_eq!(ours.get(field), Some(value), "field {field}"),
        }
    }
    let extra: Vec<_> = ours.keys().filter(|k| !peft.contains_key(*k)).collect();
    assert!(extra.is_empty(), "fields PEFT does not write: {extra:?}");
}

#[test]
fn matches_peft_default_case() {
    check_case("default", "adapter");
}

#[test]
fn matches_peft_with_rank_and_alpha_patterns() {
    // target_modules is the regex "fc\d"; fc2 has r = 3, alpha = 1.5.
    check_case("patterns", "adapter_patterns");
    let mut model = Tiny::from_fixture();
    model.load_adapter(fixture("adapter_patterns"), "default").unwrap();
    let fc2 = model.fc2.adapter("default").unwrap();
    let vars: BTreeMap<_, _> = fc2.trainable_vars().into_iter().collect();
    assert_eq!(vars["hada_w1_a"].dims(), [20, 3]);
    assert_eq!(vars["hada_w2_b"].dims(), [3, 12]);
}

#[test]
fn a_fresh_adapter_changes_nothing() {
    let mut model = Tiny::from_fixture();
    let x = io()["x"].clone();
    let y_base = model.forward(&x);
    model
        .add_adapter("default", &LohaConfig::from(modules(["fc1", "fc2"])).rank(2).alpha(4.0))
        .unwrap();
    assert_eq!(max_abs(&model.forward(&x), &y_base), 0.0);

    // init_weights = false draws all four factors, so the output moves.
    model
        .add_adapter("random", &LohaConfig::from(modules(["fc1"])).init_weights(false))
        .unwrap();
    model.set_active_adapters(&["random"]).unwrap();
    assert!(max_abs(&model.forward(&x), &y_base) > 1e-3);
}

#[test]
fn fresh_factors_are_drawn_as_peft_draws_them() {
    let mut model = Tiny::from_fixture();
    model
        .add_adapter("default", &LohaConfig::from(modules(["fc2"])).rank(4))
        .unwrap();
    let vars: BTreeMap<_, _> = model
        .fc2
        .adapter("default")
        .unwrap()
        .trainable_vars()
        .into_iter()
        .collect();
    // kaiming_uniform(a = √5): U(±1/√fan_in), fan_in the second dimension.
    for (key, dims, bound) in [
        ("hada_w1_a", [20, 4], 0.5),
        ("hada_w1_b", [4, 12], 1.0 / 12f32.sqrt()),
        ("hada_w2_a", [20, 4], 0.5),
    ] {
        assert_eq!(vars[key].dims(), dims);
        let max = max_of(vars[key].as_tensor());
        assert!(max <= bound && max > 0.5 * bound, "{key}: max {max}, bound {bound}");
    }
    assert_eq!(max_of(vars["hada_w2_b"].as_tensor()), 0.0);
}

#[test]
fn gradients_reach_the_adapter_and_never_the_base() {
    let varmap = VarMap::new();
    let mut model = Tiny::new(VarBuilder::from_varmap(&varmap, DType::F32, &DEV));
    model
        .add_adapter("default", &LohaConfig::from(all_linear()).rank(2).init_weights(false))
        .unwrap();
    let x = io()["x"].clone();
    let grads = loss(&model.forward(&x)).backward().unwrap();
    for var in varmap.all_vars() {
        assert!(grads.get(&var).is_none(), "a base weight got a gradient");
    }
    assert!(model.missing_gradients(&grads).unwrap().is_empty());
    assert_eq!(model.trainable_vars().len(), 8);
}

#[test]
fn parameter_counts_and_names_are_peft_s() {
    let mut model = Tiny::from_fixture();
    let base = 12 * 8 + 12 + 20 * 12;
    assert_eq!(model.num_parameters().total, base);
    model.load_adapter(fixture("adapter"), "default").unwrap();
    // r = 2: 2·(out·r + r·in) per layer.
    let trainable = 2 * (12 * 2 + 2 * 8) + 2 * (20 * 2 + 2 * 12);
    assert_eq!(
        model.num_parameters(),
        peft_core::ParameterCount {
            trainable,
            total: base + trainable
        }
    );
    // PEFT's in-memory names, without `base_model.model.`.
    let names: Vec<String> = model.named_trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "fc1.hada_w1_a.default",
            "fc1.hada_w1_b.default",
            "fc1.hada_w2_a.default",
            "fc1.hada_w2_b.default",
            "fc2.hada_w1_a.default",
            "fc2.hada_w1_b.default",
            "fc2.hada_w2_a.default",
            "fc2.hada_w2_b.default",
        ]
    );
}

#[test]
fn dropouts_act_only_in_training() {
    let x = io()["x"].clone();
    let mut model = Tiny::from_fixture();
    let y_base = model.forward(&x);
    let config = LohaConfig::from(modules(["fc2"]))
        .rank(2)
        .init_weights(false)
        .module_dropout(1.0);
    model.add_adapter("default", &config).unwrap();
    let y_eval = model.forward(&x);
    assert!(max_abs(&y_eval, &y_base) > 1e-3);
    // module_dropout = 1: PEFT applies the adapter when rand() > 1, never.
    model.set_training(true);
    assert_eq!(max_abs(&model.forward(&x), &y_base), 0.0);
    model.set_training(false);
    assert_eq!(max_abs(&model.forward(&x), &y_eval), 0.0);
}

#[test]
fn rank_dropout_zeroes_output_rows_and_rescales_the_rest() {
    let dev = &DEV;
    let layer_x = Tensor::randn(0f32, 1., (5, 12), dev).unwrap();
    let mut layer = Linear::new(Tensor::zeros((20, 12), DType::F32, dev).unwrap(), None);
    let var = |r, c| candle_core::Var::rand_f64(-1.0, 1.0, (r, c), DType::F32, dev).unwrap();
    let adapter = LohaAdapter::new(var(20, 2), var(2, 12), var(20, 2), var(2, 12), 2.0)
        .unwrap()
        .with_dropout(0.5, 0.0);
    layer.add_adapter("default", Box::new(adapter)).unwrap();
    let full = layer.forward(&layer_x).unwrap().to_vec2::<f32>().unwrap();
    let mut saw_drop = false;
    for _ in 0..10 {
        let y = layer.forward_t(&layer_x, true).unwrap().to_vec2::<f32>().unwrap();
        // Each output feature j is either dropped (all zero) or kept and
        // multiplied by 1 / mean(mask) = 20 / kept.
        let kept: Vec<bool> = (0..20).map(|j| y.iter().any(|row| row[j] != 0.0)).collect();
        let n_kept = kept.iter().filter(|k| **k).count();
        saw_drop |= n_kept < 20;
        if n_kept == 0 {
            continue;
        }
        let factor = 20.0 / n_kept as f32;
        for (row, full_row) in y.iter().zip(&full) {
            for j in 0..20 {
                let expected = if kept[j] { full_row[j] * factor } else { 0.0 };
                assert!(
                    (row[j] - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                    "{} vs {expected}",
                    row[j]
                );
            }
        }
    }
    assert!(saw_drop, "rank dropout 0.5 never dropped a row in 10 draws");
}

#[test]
fn invalid_configs_are_refused_before_anything_changes() {
    let mut model = Tiny::from_fixture();
    let cases: [(LohaConfig, &str); 6] = [
        (LohaConfig::default().rank(0), "r"),
        (LohaConfig::default().alpha(0.0), "alpha"),
        (LohaConfig::default().alpha_for("fc1", f64::NAN), "alpha"),
        (LohaConfig::default().rank_dropout(1.0), "rank_dropout"),
        (LohaConfig::default().module_dropout(1.5), "module_dropout"),
        (LohaConfig::default().rank_for("fc(", 2), "regex"),
    ];
    for (config, what) in cases {
        let err = model.add_adapter("default", &config).unwrap_err();
        match (&err, what) {
            (PeftError::InvalidConfig { field, .. }, _) => assert_eq!(*field, what),
            (PeftError::InvalidRegex { .. }, "regex") => {}
            _ => panic!("{what}: unexpected error {err}"),
        }
        assert!(model.adapted_modules().is_empty());
    }
}

/// Loads the fixture's default adapter with its config edited by `edit`.
fn load_edited(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> peft_core::Result<Tiny> {
    let dir = scratch(name);
    let mut config = read_json(&fixture("adapter").join(CONFIG_FILE));
    edit(&mut config);
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::copy(fixture("adapter").join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    let mut model = Tiny::from_fixture();
    model.load_adapter(&dir, "default").map(|()| model)
}

#[test]
fn config_files_are_read_as_peft_writes_them() {
    // Options that do not change a linear layer, or are off, load.
    let model = load_edited("conv_option", |c| {
        c.insert("use_effective_conv2d".into(), Value::Bool(true));
        c.insert("init_weights".into(), Value::Bool(false));
        c.insert("rank_dropout".into(), 0.25.into());
        c.insert("module_dropout".into(), 0.5.into());
        c.insert("layers_to_transform".into(), Value::Null);
        c.insert("modules_to_save".into(), Value::Array(vec![]));
    })
    .unwrap();
    assert_eq!(model.adapted_modules(), ["fc1", "fc2"]);
    let out = scratch("conv_option_saved");
    model.save_adapter(&out, "default").unwrap();
    let saved = read_json(&out.join(CONFIG_FILE));
    assert_eq!(saved["use_effective_conv2d"], Value::Bool(true));
    assert_eq!(saved["init_weights"], Value::Bool(false));
    assert_eq!(saved["rank_dropout"], Value::from(0.25));
    assert_eq!(saved["module_dropout"], Value::from(0.5));

    // Missing fields take PEFT's defaults: r = 8 then does not fit the tensors.
    let err = load_edited("no_r", |c| {
        c.remove("r");
    })
    .err()
    .unwrap();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn options_it_cannot_honour_are_refused() {
    for (field, value, expect) in [
        ("modules_to_save", serde_json::json!(["head"]), "modules_to_save"),
        ("some_future_option", Value::Bool(true), "some_future_option"),
        ("rank_dropout_scale", Value::Bool(true), "rank_dropout_scale"),
        ("target_modules", Value::Null, "target_modules"),
    ] {
        let err = load_edited(&format!("refuse_{field}"), |c| {
            c.insert(field.into(), value);
        })
        .err()
        .unwrap();
        match &err {
            PeftError::UnsupportedOption { field, .. } => assert_eq!(field, expect),
            other => panic!("{expect}: unexpected error {other}"),
        }
    }
    let err = load_edited("bad_rank_dropout", |c| {
        c.insert("rank_dropout".into(), 1.0.into());
    })
    .err()
    .unwrap();
    assert!(
        matches!(
            err,
            PeftError::InvalidConfig {
                field: "rank_dropout",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_config_round_trips_through_peft_fields() {
    let config = LohaConfig::from(modules(["fc1"]))
        .rank(3)
        .alpha(1.5)
        .rank_dropout(0.1)
        .module_dropout(0.2)
        .rank_for("fc1", 2)
        .alpha_for("fc1", 6.0)
        .task_type("CAUSAL_LM");
    let fields = config.to_peft_config();
    assert_eq!(fields["peft_type"], "LOHA");
    assert_eq!(fields["r"], 3);
    assert_eq!(fields["alpha"], 1.5);
    assert_eq!(fields["rank_dropout"].to_string(), "0.1");
    assert_eq!(fields["module_dropout"].to_string(), "0.2");
    assert_eq!(fields["rank_pattern"], serde_json::json!({"fc1": 2}));
    assert_eq!(fields["alpha_pattern"], serde_json::json!({"fc1": 6}));
    assert_eq!(fields["task_type"], "CAUSAL_LM");
    assert_eq!(config.rank_and_alpha("fc1").unwrap(), (2, 6.0));
    assert_eq!(config.rank_and_alpha("fc2").unwrap(), (3, 1.5));
}
