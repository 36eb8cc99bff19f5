//! LoKr against Python PEFT (`tests/fixtures/lokr_tiny`, see its CASE.md):
//! outputs, every gradient, merge / unmerge, the saved files, and a reload of
//! what Rust saved; then fresh adapters, dropout, parameter counts and the
//! errors of configs and files.

use candle_core::{DType, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::{AdapterConfig, PeftError, CONFIG_FILE};
use peft_core::{LokrAdapter, LokrConfig, LokrFactor, LokrInit};
use serde_json::Value;

mod support;

use support::fixture_case::{loss, Tiny, DEV};
use support::{max_abs, max_abs_diff, read_json_object, Fixture};

const FIXTURE: Fixture = Fixture("lokr_tiny");

#[test]
fn matches_peft_default_case() {
    // r = 2: fc1 (12 x 8) gets w1 [3, 2] and w2 [4, 4] whole; fc2 (20 x 12)
    // gets w1 [4, 3] whole and w2 = [5, 2] · [2, 4].
    FIXTURE.check_case("default", "adapter");
    assert_eq!(
        factor_shapes("adapter"),
        [
            ("fc1.lokr_w1".to_owned(), vec![3, 2]),
            ("fc1.lokr_w2".to_owned(), vec![4, 4]),
            ("fc2.lokr_w1".to_owned(), vec![4, 3]),
            ("fc2.lokr_w2_a".to_owned(), vec![5, 2]),
            ("fc2.lokr_w2_b".to_owned(), vec![2, 4]),
        ]
    );
}

#[test]
fn matches_peft_with_decompose_both_and_patterns() {
    // decompose_factor = 4, decompose_both, r = 1 (fc2: r = 2, alpha = 3):
    // fc1 gets both factors low-rank, fc2 a whole w1 and a low-rank w2.
    FIXTURE.check_case("decompose_both", "adapter_decompose_both");
    assert_eq!(
        factor_shapes("adapter_decompose_both"),
        [
            ("fc1.lokr_w1_a".to_owned(), vec![4, 1]),
            ("fc1.lokr_w1_b".to_owned(), vec![1, 4]),
            ("fc1.lokr_w2_a".to_owned(), vec![3, 1]),
            ("fc1.lokr_w2_b".to_owned(), vec![1, 2]),
            ("fc2.lokr_w1".to_owned(), vec![4, 4]),
            ("fc2.lokr_w2_a".to_owned(), vec![5, 2]),
            ("fc2.lokr_w2_b".to_owned(), vec![2, 3]),
        ]
    );
}

/// `(<module>.<key>, shape)` of every tensor of the adapter in `folder`, as loaded.
fn factor_shapes(folder: &str) -> Vec<(String, Vec<usize>)> {
    let mut model = FIXTURE.model();
    model.load_adapter(FIXTURE.path(folder), "default").unwrap();
    model
        .layers()
        .iter()
        .flat_map(|l| {
            let adapter = l.layer.adapter("default").unwrap();
            adapter
                .trainable_vars()
                .into_iter()
                .map(|(k, v)| (format!("{}.{k}", l.path), v.dims().to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn fresh_adapters_start_as_peft_s() {
    let x = FIXTURE.io()["x"].clone();
    for (init, changes_output) in [
        (LokrInit::Default, false),
        (LokrInit::Lycoris, false),
        (LokrInit::Random, true),
    ] {
        for decompose_both in [false, true] {
            let mut model = FIXTURE.model();
            let y_base = model.forward(&x);
            let config = LokrConfig::from(modules(["fc1", "fc2"]))
                .rank(1)
                .decompose_both(decompose_both)
                .init(init);
            model.add_adapter("default", &config).unwrap();
            let d = max_abs_diff(&model.forward(&x), &y_base);
            assert_eq!(
                d > 0.0,
                changes_output,
                "{init:?}, decompose_both {decompose_both}: {d}"
            );
            // Which tensor PEFT zeroes: w1 / w1_a by default, w2 / w2_b for "lycoris".
            for layer in model.layers() {
                for (key, var) in layer.layer.adapter("default").unwrap().trainable_vars() {
                    let zero = match init {
                        LokrInit::Default => key == "lokr_w1" || key == "lokr_w1_a",
                        LokrInit::Lycoris => key == "lokr_w2" || key == "lokr_w2_b",
                        _ => false,
                    };
                    let max = max_abs(var.as_tensor());
                    // kaiming_uniform(a = √5): U(±1/√fan_in), fan_in the second dimension.
                    let bound = 1.0 / (var.dims()[1] as f32).sqrt();
                    assert!(
                        if zero { max == 0.0 } else { max > 0.0 && max <= bound },
                        "{key}: {max}"
                    );
                }
            }
        }
    }
}

#[test]
fn gradients_reach_the_adapter_and_never_the_base() {
    let varmap = VarMap::new();
    let mut model = Tiny::new(VarBuilder::from_varmap(&varmap, DType::F32, &DEV));
    let config = LokrConfig::from(all_linear())
        .rank(1)
        .decompose_both(true)
        .init(LokrInit::Random);
    model.add_adapter("default", &config).unwrap();
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
    // fc1: 3·2 + 4·4; fc2: 4·3 + 5·2 + 2·4.
    let trainable = (3 * 2 + 4 * 4) + (4 * 3 + 5 * 2 + 2 * 4);
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
            "fc1.lokr_w1.default",
            "fc1.lokr_w2.default",
            "fc2.lokr_w1.default",
            "fc2.lokr_w2_a.default",
            "fc2.lokr_w2_b.default",
        ]
    );
}

#[test]
fn dropouts_act_only_in_training() {
    let x = FIXTURE.io()["x"].clone();
    let mut model = FIXTURE.model();
    let y_base = model.forward(&x);
    let config = LokrConfig::from(modules(["fc2"]))
        .rank(2)
        .init(LokrInit::Random)
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
fn rank_dropout_zeroes_output_rows_rescaling_only_when_asked() {
    let dev = &DEV;
    let layer_x = Tensor::randn(0f32, 1., (5, 12), dev).unwrap();
    let var = |r, c| candle_core::Var::rand_f64(-1.0, 1.0, (r, c), DType::F32, dev).unwrap();
    for rescale in [false, true] {
        let mut layer = Linear::new(Tensor::zeros((20, 12), DType::F32, dev).unwrap(), None);
        let adapter = LokrAdapter::new(
            LokrFactor::Full(var(4, 3)),
            LokrFactor::LowRank(var(5, 2), var(2, 4)),
            2.0,
        )
        .unwrap()
        .with_dropout(0.5, 0.0, rescale);
        layer.add_adapter("default", Box::new(adapter)).unwrap();
        let full = layer.forward(&layer_x).unwrap().to_vec2::<f32>().unwrap();
        let mut saw_drop = false;
        for _ in 0..10 {
            let y = layer.forward_t(&layer_x, true).unwrap().to_vec2::<f32>().unwrap();
            // Each output feature j is either dropped (all zero) or kept,
            // multiplied by 1 / mean(mask) = 20 / kept with rank_dropout_scale.
            let kept: Vec<bool> = (0..20).map(|j| y.iter().any(|row| row[j] != 0.0)).collect();
            let n_kept = kept.iter().filter(|k| **k).count();
            saw_drop |= n_kept < 20;
            if n_kept == 0 {
                continue;
            }
            let factor = if rescale { 20.0 / n_kept as f32 } else { 1.0 };
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
}

#[test]
fn invalid_configs_are_refused_before_anything_changes() {
    let mut model = FIXTURE.model();
    let cases: [(LokrConfig, &str); 7] = [
        (LokrConfig::default().rank(0), "r"),
        (LokrConfig::default().rank_for("fc2", 0), "r"),
        (LokrConfig::default().alpha(-1.0), "alpha"),
        (LokrConfig::default().rank_dropout(-0.1), "rank_dropout"),
        (LokrConfig::default().module_dropout(2.0), "module_dropout"),
        (LokrConfig::default().decompose_factor(0), "decompose_factor"),
        (LokrConfig::default().alpha_for("[", 2.0), "regex"),
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
    let model = FIXTURE
        .load_edited("options", |c| {
            c.insert("use_effective_conv2d".into(), Value::Bool(true));
            c.insert("init_weights".into(), Value::from("lycoris"));
            c.insert("rank_dropout".into(), 0.25.into());
            c.insert("rank_dropout_scale".into(), Value::Bool(true));
            c.insert("module_dropout".into(), 0.5.into());
            // A field PEFT's LoKrConfig does not have (a newer PEFT's) is ignored
            // with a warning, as PEFT ignores it.
            c.insert("some_future_option".into(), Value::from(3));
        })
        .unwrap();
    assert_eq!(model.adapted_modules(), ["fc1", "fc2"]);
    let out = FIXTURE.scratch("options_saved");
    model.save_adapter(&out, "default").unwrap();
    let saved = read_json_object(out.join(CONFIG_FILE));
    assert_eq!(saved["use_effective_conv2d"], Value::Bool(true));
    assert_eq!(saved["init_weights"], Value::from("lycoris"));
    assert_eq!(saved["rank_dropout_scale"], Value::Bool(true));
    assert_eq!(saved["rank_dropout"], Value::from(0.25));

    // The decomposition comes from the config: another factor, other shapes.
    let err = FIXTURE
        .load_edited("factor_2", |c| {
            c.insert("decompose_factor".into(), 2.into());
        })
        .err()
        .unwrap();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
    let err = FIXTURE
        .load_edited("decompose_both", |c| {
            c.insert("decompose_both".into(), Value::Bool(true));
            c.insert("r".into(), 1.into());
        })
        .err()
        .unwrap();
    assert!(matches!(err, PeftError::MissingTensor { .. }), "{err}");
}

#[test]
fn options_it_cannot_honour_are_refused() {
    let err = FIXTURE
        .load_edited("refuse_init_weights", |c| {
            c.insert("init_weights".into(), Value::from("orthogonal"));
        })
        .err()
        .unwrap();
    match &err {
        PeftError::UnsupportedOption { field, .. } => assert_eq!(field, "init_weights"),
        other => panic!("init_weights: unexpected error {other}"),
    }
    let err = FIXTURE
        .load_edited("bad_factor", |c| {
            c.insert("decompose_factor".into(), 0.into());
        })
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            PeftError::InvalidConfig {
                field: "decompose_factor",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_config_round_trips_through_peft_fields() {
    let config = LokrConfig::from(modules(["fc1"]))
        .rank(3)
        .alpha(1.5)
        .decompose_both(true)
        .decompose_factor(4)
        .rank_dropout(0.1)
        .rank_dropout_scale(true)
        .init(LokrInit::Lycoris)
        .rank_for("fc1", 2);
    let fields = config.to_peft_config();
    assert_eq!(fields["peft_type"], "LOKR");
    assert_eq!(fields["r"], 3);
    assert_eq!(fields["alpha"], 1.5);
    assert_eq!(fields["decompose_both"], true);
    assert_eq!(fields["decompose_factor"], 4);
    assert_eq!(fields["rank_dropout"].to_string(), "0.1");
    assert_eq!(fields["rank_dropout_scale"], true);
    assert_eq!(fields["init_weights"], "lycoris");
    assert_eq!(fields["rank_pattern"], serde_json::json!({"fc1": 2}));
    assert_eq!(LokrConfig::default().to_peft_config()["decompose_factor"], -1);
    assert_eq!(config.rank_and_alpha("fc1").unwrap(), (2, 1.5));
}
