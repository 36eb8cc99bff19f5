//! LoHa against Python PEFT (`tests/fixtures/loha_tiny`, see its CASE.md):
//! outputs, every gradient, merge / unmerge, the saved files, and a reload of
//! what Rust saved; then fresh adapters, dropout, parameter counts and the
//! errors of configs and files.

use std::collections::BTreeMap;

use candle_core::{DType, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::{AdapterConfig, PeftError, CONFIG_FILE};
use peft_core::{LohaAdapter, LohaConfig};
use serde_json::Value;

mod support;

use support::fixture_case::{loss, Tiny, DEV};
use support::{max_abs, max_abs_diff, read_json_object, Fixture};

const FIXTURE: Fixture = Fixture("loha_tiny");

#[test]
fn matches_peft_default_case() {
    FIXTURE.check_case("default", "adapter");
}

#[test]
fn matches_peft_with_rank_and_alpha_patterns() {
    // target_modules is the regex "fc\d"; fc2 has r = 3, alpha = 1.5.
    FIXTURE.check_case("patterns", "adapter_patterns");
    let mut model = FIXTURE.model();
    model.load_adapter(FIXTURE.path("adapter_patterns"), "default").unwrap();
    let fc2 = model.fc2.adapter("default").unwrap();
    let vars: BTreeMap<_, _> = fc2.trainable_vars().into_iter().collect();
    assert_eq!(vars["hada_w1_a"].dims(), [20, 3]);
    assert_eq!(vars["hada_w2_b"].dims(), [3, 12]);
}

#[test]
fn a_fresh_adapter_changes_nothing() {
    let mut model = FIXTURE.model();
    let x = FIXTURE.io()["x"].clone();
    let y_base = model.forward(&x);
    model
        .add_adapter("default", &LohaConfig::from(modules(["fc1", "fc2"])).rank(2).alpha(4.0))
        .unwrap();
    assert_eq!(max_abs_diff(&model.forward(&x), &y_base), 0.0);

    // init_weights = false draws all four factors, so the output moves.
    model
        .add_adapter("random", &LohaConfig::from(modules(["fc1"])).init_weights(false))
        .unwrap();
    model.set_active_adapters(&["random"]).unwrap();
    assert!(max_abs_diff(&model.forward(&x), &y_base) > 1e-3);
}

#[test]
fn fresh_factors_are_drawn_as_peft_draws_them() {
    let mut model = FIXTURE.model();
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
        let max = max_abs(vars[key].as_tensor());
        assert!(max <= bound && max > 0.5 * bound, "{key}: max {max}, bound {bound}");
    }
    assert_eq!(max_abs(vars["hada_w2_b"].as_tensor()), 0.0);
}

#[test]
fn gradients_reach_the_adapter_and_never_the_base() {
    let varmap = VarMap::new();
    let mut model = Tiny::new(VarBuilder::from_varmap(&varmap, DType::F32, &DEV));
    model
        .add_adapter("default", &LohaConfig::from(all_linear()).rank(2).init_weights(false))
        .unwrap();
    let x = FIXTURE.io()["x"].clone();
    let grads = loss(&model.forward(&x)).backward().unwrap();
    for var in varmap.all_vars() {
        assert!(grads.get(&var).is_none(), "a base weight got a gradient");
    }
    assert!(model.missing_gradients(&grads).unwrap().is_empty());
    assert_eq!(model.trainable_vars().len(), 8);
}

#[test]
fn parameter_counts_and_names_are_peft_s() {
    let mut model = FIXTURE.model();
    let base = 12 * 8 + 12 + 20 * 12;
    assert_eq!(model.num_parameters().total, base);
    model.load_adapter(FIXTURE.path("adapter"), "default").unwrap();
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
    let x = FIXTURE.io()["x"].clone();
    let mut model = FIXTURE.model();
    let y_base = model.forward(&x);
    let config = LohaConfig::from(modules(["fc2"]))
        .rank(2)
        .init_weights(false)
        .module_dropout(1.0);
    model.add_adapter("default", &config).unwrap();
    let y_eval = model.forward(&x);
    assert!(max_abs_diff(&y_eval, &y_base) > 1e-3);
    // module_dropout = 1: PEFT applies the adapter when rand() > 1, never.
    model.set_training(true);
    assert_eq!(max_abs_diff(&model.forward(&x), &y_base), 0.0);
    model.set_training(false);
    assert_eq!(max_abs_diff(&model.forward(&x), &y_eval), 0.0);
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
    let mut model = FIXTURE.model();
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

#[test]
fn config_files_are_read_as_peft_writes_them() {
    // Options that do not change a linear layer, or are off, load.
    let model = FIXTURE
        .load_edited("conv_option", |c| {
            c.insert("use_effective_conv2d".into(), Value::Bool(true));
            c.insert("init_weights".into(), Value::Bool(false));
            c.insert("rank_dropout".into(), 0.25.into());
            c.insert("module_dropout".into(), 0.5.into());
            c.insert("layers_to_transform".into(), Value::Null);
            c.insert("modules_to_save".into(), Value::Array(vec![]));
            // Fields PEFT's LoHaConfig does not have (a newer PEFT's, LoKr's) are
            // ignored with a warning, as PEFT ignores them.
            c.insert("some_future_option".into(), Value::Bool(true));
            c.insert("rank_dropout_scale".into(), Value::Bool(true));
        })
        .unwrap();
    assert_eq!(model.adapted_modules(), ["fc1", "fc2"]);
    let out = FIXTURE.scratch("conv_option_saved");
    model.save_adapter(&out, "default").unwrap();
    let saved = read_json_object(out.join(CONFIG_FILE));
    assert_eq!(saved["use_effective_conv2d"], Value::Bool(true));
    assert_eq!(saved["init_weights"], Value::Bool(false));
    assert_eq!(saved["rank_dropout"], Value::from(0.25));
    assert_eq!(saved["module_dropout"], Value::from(0.5));

    // Missing fields take PEFT's defaults: r = 8 then does not fit the tensors.
    let err = FIXTURE
        .load_edited("no_r", |c| {
            c.remove("r");
        })
        .err()
        .unwrap();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn options_it_cannot_honour_are_refused() {
    let err = FIXTURE
        .load_edited("refuse_target_modules", |c| {
            c.insert("target_modules".into(), Value::Null);
        })
        .err()
        .unwrap();
    match &err {
        PeftError::UnsupportedOption { field, .. } => assert_eq!(field, "target_modules"),
        other => panic!("target_modules: unexpected error {other}"),
    }
    let err = FIXTURE
        .load_edited("bad_rank_dropout", |c| {
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
