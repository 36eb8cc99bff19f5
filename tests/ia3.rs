//! IA³ (`peft_core::ia3`) against the reference case made with Python
//! transformers + PEFT 0.21 (`tests/fixtures/llama_ia3_all_linear`, see its
//! `CASE.md`), and by hand.
//!
//! - PEFT's adapter folder loads (PEFT itself cannot reload it: its
//!   `feedforward_modules` are short names, its `target_modules` full paths),
//!   with `down_proj` decided feed-forward by PEFT's suffix rule; adapted,
//!   merged and unmerged logits match.
//! - Saving from Rust writes PEFT's tensors and config fields and loads back.
//! - A fresh adapter is the identity, trains only its vectors, and learns.
//! - Forward and merge on a 2x3 layer, computed by hand; parameter counts;
//!   options that cannot be honoured are refused.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::PeftError;
use peft_core::{Ia3Adapter, Ia3Config};
use peft_models::llama;
use serde_json::Value;

mod support;
use support::{assert_close, max_abs_diff_or_nan, next_token_loss, read_json, scratch, Fixture};

const FIXTURE: Fixture = Fixture("llama_ia3_all_linear");
/// Logits: a correct float32 implementation lands within ~3e-6.
const LOGITS_TOL: f32 = 1e-5;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn config() -> Result<llama::Config, Box<dyn std::error::Error>> {
    Ok(llama::Config::from_file(FIXTURE.path("config.json"))?)
}

/// The fixture's base model, weights memory-mapped (plain tensors).
fn load_llama() -> Result<llama::LlamaForCausalLM, Box<dyn std::error::Error>> {
    let path = FIXTURE.path("model.safetensors");
    // SAFETY: the fixture files are not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu)? };
    Ok(llama::LlamaForCausalLM::load(vb, &config()?)?)
}

/// The fixture's base model with every weight a `Var` of `varmap`, so that
/// a gradient reaching a base weight would show.
fn load_llama_vars(varmap: &mut VarMap) -> Result<llama::LlamaForCausalLM, Box<dyn std::error::Error>> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let model = llama::LlamaForCausalLM::load(vb, &config()?)?;
    varmap.load(FIXTURE.path("model.safetensors"))?;
    Ok(model)
}

/// `input_ids` (i64 in the file) as u32.
fn input_ids(io: &HashMap<String, Tensor>) -> candle_core::Result<Tensor> {
    io["input_ids"].to_dtype(DType::U32)
}

/// `targets.json`'s list under `key`.
fn fixture_list(key: &str) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    Ok(serde_json::from_value(
        read_json(FIXTURE.path("targets.json"))[key].clone(),
    )?)
}

fn fresh_config() -> Ia3Config {
    Ia3Config::from(all_linear()).feedforward_modules(["down_proj"])
}

// ---- (1) PEFT's folder: load, forward, merge, unmerge --------------------------

#[test]
fn peft_adapter_loads_and_matches_adapted_merged_and_unmerged_logits() -> TestResult {
    let io = FIXTURE.io();
    let ids = input_ids(&io)?;
    let mut model = load_llama()?;
    eprintln!("{}:", FIXTURE.0);
    assert_close("logits_base", &model.forward(&ids)?, &io["logits_base"], LOGITS_TOL)?;

    // PEFT refuses this folder; the per-module suffix rule loads it.
    let peft_config = read_json(FIXTURE.path("adapter").join("adapter_config.json"));
    assert_eq!(peft_config["feedforward_modules"], serde_json::json!(["down_proj"]));
    model.load_adapter(FIXTURE.path("adapter"), "default")?;
    assert_eq!(model.adapted_modules(), fixture_list("targets")?);

    // down_proj is feed-forward ([1, in]), every other layer is not ([out, 1]).
    let feedforward: BTreeSet<String> = fixture_list("feedforward_targets")?.into_iter().collect();
    for layer in model.layers() {
        let Some(adapter) = layer.layer.adapter("default") else {
            continue;
        };
        let vars = adapter.trainable_vars();
        assert_eq!(vars.len(), 1);
        let (key, l) = &vars[0];
        assert_eq!(*key, "ia3_l");
        let expected = if feedforward.contains(&layer.path) {
            [1, layer.layer.in_features()]
        } else {
            [layer.layer.out_features(), 1]
        };
        assert_eq!(l.dims(), expected, "{}", layer.path);
    }

    let adapted = model.forward(&ids)?;
    assert_close("logits_adapted", &adapted, &io["logits_adapted"], LOGITS_TOL)?;

    model.merge()?;
    let merged = model.forward(&ids)?;
    assert_close("logits_merged", &merged, &io["logits_merged"], LOGITS_TOL)?;
    assert_close("merged vs adapted (Rust)", &merged, &adapted, LOGITS_TOL)?;

    model.unmerge()?;
    let base = load_llama()?;
    let mut worst = 0f32;
    for (ours, theirs) in model.layers().iter().zip(base.layers()) {
        worst = worst.max(max_abs_diff_or_nan(
            ours.layer.weight().unwrap(),
            theirs.layer.weight().unwrap(),
        )?);
    }
    eprintln!("  unmerged weights vs base: max abs diff {worst:.3e}");
    assert!(worst < 1e-6, "unmerged weights differ from the base by {worst:e}");
    model.disable_adapters()?;
    assert_close(
        "logits after unmerge, adapters disabled",
        &model.forward(&ids)?,
        &io["logits_base"],
        LOGITS_TOL,
    )?;
    model.enable_adapters();
    assert_close(
        "logits after unmerge (adapter active)",
        &model.forward(&ids)?,
        &io["logits_adapted"],
        LOGITS_TOL,
    )?;
    Ok(())
}

/// The same vectors with `feedforward_modules` given as full paths (what
/// PEFT can reload) or as a regex give the same model.
#[test]
fn feedforward_modules_as_full_paths_or_regex_load_the_same() -> TestResult {
    let io = FIXTURE.io();
    let ids = input_ids(&io)?;
    let peft_config = read_json(FIXTURE.path("adapter").join("adapter_config.json"));
    let full_paths = Value::from(fixture_list("feedforward_targets")?);
    for (name, feedforward) in [
        ("full_paths", full_paths),
        ("regex", Value::from(r".*\.mlp\.down_proj")),
    ] {
        let mut config = peft_config.clone();
        config["feedforward_modules"] = feedforward;
        let dir = write_adapter(&format!("ff_{name}"), &config)?;
        let mut model = load_llama()?;
        model.load_adapter(&dir, "default")?;
        assert_close(
            &format!("logits_adapted, feedforward_modules as {name}"),
            &model.forward(&ids)?,
            &io["logits_adapted"],
            LOGITS_TOL,
        )?;
    }
    Ok(())
}

/// PEFT's `str.endswith` has no dot boundary: `"proj"` makes every layer
/// feed-forward, so the fixture's `[out, 1]` vectors no longer fit.
#[test]
fn feedforward_suffix_has_no_dot_boundary() -> TestResult {
    let config = Ia3Config::from(all_linear()).feedforward_modules(["proj"]);
    assert!(config.is_feedforward("model.layers.0.self_attn.q_proj")?);
    let config = fresh_config();
    assert!(config.is_feedforward("model.layers.0.mlp.down_proj")?);
    assert!(config.is_feedforward("model.layers.0.mlp.xdown_proj")?);
    assert!(!config.is_feedforward("model.layers.0.mlp.up_proj")?);

    let mut peft_config = read_json(FIXTURE.path("adapter").join("adapter_config.json"));
    peft_config["feedforward_modules"] = serde_json::json!(["proj"]);
    let dir = write_adapter("ff_proj", &peft_config)?;
    let mut model = load_llama()?;
    let err = model.load_adapter(&dir, "default").unwrap_err();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
    assert!(model.adapter_names().is_empty());
    Ok(())
}

// ---- (2) saving from Rust --------------------------------------------------------

#[test]
fn rust_save_matches_peft_files_and_loads_back() -> TestResult {
    let io = FIXTURE.io();
    let ids = input_ids(&io)?;
    let mut model = load_llama()?;
    model.load_adapter(FIXTURE.path("adapter"), "default")?;
    let adapted = model.forward(&ids)?;

    let saved = scratch("ia3", "saved");
    model.save_adapter(&saved, "default")?;

    // Tensors: the same keys, shapes and values.
    let theirs =
        candle_core::safetensors::load(FIXTURE.path("adapter").join("adapter_model.safetensors"), &Device::Cpu)?;
    let ours = candle_core::safetensors::load(saved.join("adapter_model.safetensors"), &Device::Cpu)?;
    let their_keys: BTreeSet<&String> = theirs.keys().collect();
    let our_keys: BTreeSet<&String> = ours.keys().collect();
    assert_eq!(our_keys, their_keys, "tensor keys");
    assert!(their_keys.iter().all(|k| k.ends_with(".ia3_l")));
    for (key, tensor) in &theirs {
        assert_eq!(ours[key].dims(), tensor.dims(), "{key}");
        assert_eq!(max_abs_diff_or_nan(&ours[key], tensor)?, 0.0, "{key}");
    }

    // Config: PEFT's fields and values.
    let theirs = read_json(FIXTURE.path("adapter").join("adapter_config.json"));
    let ours = read_json(saved.join("adapter_config.json"));
    let our_fields: Vec<&String> = ours.as_object().ok_or("config is an object")?.keys().collect();
    assert_eq!(
        our_fields,
        [
            "base_model_name_or_path",
            "exclude_modules",
            "fan_in_fan_out",
            "feedforward_modules",
            "inference_mode",
            "init_ia3_weights",
            "modules_to_save",
            "peft_type",
            "revision",
            "target_modules",
            "task_type",
        ]
    );
    for field in [
        "peft_type",
        "exclude_modules",
        "fan_in_fan_out",
        "init_ia3_weights",
        "modules_to_save",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    ] {
        assert_eq!(ours[field], theirs[field], "config field {field}");
    }
    let set = |value: &Value| -> BTreeSet<String> { serde_json::from_value(value.clone()).unwrap_or_default() };
    assert_eq!(
        set(&ours["target_modules"]),
        set(&theirs["target_modules"]),
        "target_modules"
    );
    // feedforward_modules: PEFT's ["down_proj"] is saved as the equivalent
    // regex, which PEFT does not check against the full-path target_modules,
    // and which selects exactly PEFT's feed-forward modules.
    assert_eq!(ours["feedforward_modules"], ".*(?:down_proj)");
    // PEFT applies a string with re.fullmatch, as a target regex here.
    let fullmatch = regex(ours["feedforward_modules"].as_str().unwrap_or_default());
    fullmatch.validate()?;
    let selected: Vec<String> = fixture_list("targets")?
        .into_iter()
        .filter(|p| fullmatch.matches(p, peft_core::Role::Hidden))
        .collect();
    assert_eq!(selected, fixture_list("feedforward_targets")?);

    let mut reloaded = load_llama()?;
    reloaded.load_adapter(&saved, "default")?;
    assert_close(
        "logits after a Rust save and load",
        &reloaded.forward(&ids)?,
        &adapted,
        0.0,
    )?;
    Ok(())
}

// ---- (3) a fresh adapter: identity, gradients, training ---------------------------

#[test]
fn fresh_adapter_is_the_identity() -> TestResult {
    let io = FIXTURE.io();
    let ids = input_ids(&io)?;
    let mut model = load_llama()?;
    let base = model.forward(&ids)?;
    model.add_adapter("ia3", &fresh_config())?;
    assert_eq!(model.adapted_modules().len(), 14);
    for (name, var) in model.named_trainable_vars() {
        assert!(name.ends_with(".ia3_l.ia3"), "{name}");
        let min = var.flatten_all()?.min(0)?.to_scalar::<f32>()?;
        let max = var.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!((min, max), (1.0, 1.0), "{name} starts at ones");
    }
    assert_close("fresh IA³ vs base", &model.forward(&ids)?, &base, 0.0)?;
    Ok(())
}

#[test]
fn only_the_vectors_get_gradients_and_training_lowers_the_loss() -> TestResult {
    let io = FIXTURE.io();
    let ids = input_ids(&io)?;
    let mut varmap = VarMap::new();
    let mut model = load_llama_vars(&mut varmap)?;
    assert_close(
        "logits_base (Var weights)",
        &model.forward(&ids)?,
        &io["logits_base"],
        LOGITS_TOL,
    )?;
    model.add_adapter("ia3", &fresh_config())?;
    model.set_training(true);

    let loss = next_token_loss(&model.forward(&ids)?, &ids)?;
    let grads = loss.backward()?;
    assert_eq!(model.missing_gradients(&grads)?, Vec::<String>::new());
    assert_eq!(model.trainable_vars().len(), 14);
    let adapted = model.adapted_modules();
    let mut base_weights = 0;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        if adapted.iter().any(|m| name == &format!("{m}.weight")) {
            base_weights += 1;
            assert!(grads.get(var.as_tensor()).is_none(), "{name} got a gradient");
        }
    }
    assert_eq!(base_weights, 14);

    let mut opt = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let first = loss.to_scalar::<f32>()?;
    let mut last = first;
    for _ in 0..20 {
        let loss = next_token_loss(&model.forward(&ids)?, &ids)?;
        opt.backward_step(&loss)?;
        last = loss.to_scalar::<f32>()?;
    }
    let after = next_token_loss(&model.forward(&ids)?, &ids)?.to_scalar::<f32>()?;
    eprintln!("  loss {first:.4} -> {last:.4} (after the last step: {after:.4})");
    assert!(after < first * 0.9, "loss {first} -> {after}");

    // The base weights did not move.
    let reference = load_llama()?;
    for (ours, theirs) in model.layers().iter().zip(reference.layers()) {
        assert_eq!(
            max_abs_diff_or_nan(ours.layer.weight().unwrap(), theirs.layer.weight().unwrap())?,
            0.0,
            "{}",
            ours.path
        );
    }
    Ok(())
}

// ---- (4) by hand ----------------------------------------------------------------

fn tensor2(rows: &[&[f32]]) -> candle_core::Result<Tensor> {
    let cols = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu)
}

fn layer_2x3() -> candle_core::Result<Linear> {
    // W [out = 2, in = 3], b [2]
    let w = tensor2(&[&[1., 2., 3.], &[4., 5., 6.]])?;
    let b = Tensor::new(&[0.5f32, -1.], &Device::Cpu)?;
    Ok(Linear::new(w, Some(b)))
}

fn ia3(l: &[&[f32]], feedforward: bool) -> Result<Box<Ia3Adapter>, Box<dyn std::error::Error>> {
    Ok(Box::new(Ia3Adapter::new(Var::from_tensor(&tensor2(l)?)?, feedforward)?))
}

#[test]
fn hand_computed_output_scaling() -> TestResult {
    let x = tensor2(&[&[1., -1., 2.]])?;
    let mut layer = layer_2x3()?;
    // base(x) = [1 - 2 + 6 + 0.5, 4 - 5 + 12 - 1] = [5.5, 10]
    assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[5.5, 10.0]]);
    layer.add_adapter("default", ia3(&[&[2.], &[0.5]], false)?)?;
    // y = base(x) * l = [11, 5]
    assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[11.0, 5.0]]);

    layer.merge()?;
    // W'[o, i] = W[o, i] * l[o], b' = b * l
    assert_eq!(layer.weight().unwrap().to_vec2::<f32>()?, [[2., 4., 6.], [2., 2.5, 3.]]);
    assert_eq!(layer.bias().ok_or("bias")?.to_vec1::<f32>()?, [1.0, -0.5]);
    assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[11.0, 5.0]]);

    layer.unmerge()?;
    assert_eq!(layer.weight().unwrap().to_vec2::<f32>()?, [[1., 2., 3.], [4., 5., 6.]]);
    assert_eq!(layer.bias().ok_or("bias")?.to_vec1::<f32>()?, [0.5, -1.0]);
    Ok(())
}

#[test]
fn hand_computed_input_scaling() -> TestResult {
    let x = tensor2(&[&[1., -1., 2.]])?;
    let mut layer = layer_2x3()?;
    layer.add_adapter("default", ia3(&[&[2., 1., 0.5]], true)?)?;
    // x * l = [2, -1, 1]; W (x * l) + b = [2 - 2 + 3 + 0.5, 8 - 5 + 6 - 1] = [3.5, 8]
    assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[3.5, 8.0]]);
    // Batched input [2, 1, 3]: each row scaled the same way.
    let xb = Tensor::stack(&[&x, &x.affine(2.0, 0.0)?], 0)?;
    assert_eq!(layer.forward(&xb)?.to_vec3::<f32>()?, [[[3.5, 8.0]], [[6.5, 17.0]]]);

    layer.merge()?;
    // W'[o, i] = W[o, i] * l[i], bias unchanged
    assert_eq!(layer.weight().unwrap().to_vec2::<f32>()?, [[2., 2., 1.5], [8., 5., 3.]]);
    assert_eq!(layer.bias().ok_or("bias")?.to_vec1::<f32>()?, [0.5, -1.0]);
    assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[3.5, 8.0]]);

    layer.unmerge()?;
    assert_eq!(layer.weight().unwrap().to_vec2::<f32>()?, [[1., 2., 3.], [4., 5., 6.]]);
    Ok(())
}

#[test]
fn unmerge_refuses_a_zero_entry_and_stays_merged() -> TestResult {
    let mut layer = layer_2x3()?;
    layer.add_adapter("default", ia3(&[&[0.], &[3.]], false)?)?;
    layer.merge()?;
    let merged = layer.weight().unwrap().to_vec2::<f32>()?;
    assert_eq!(merged, [[0., 0., 0.], [12., 15., 18.]]);
    let err = layer.unmerge().unwrap_err();
    assert!(err.to_string().contains("ia3_l entry 0"), "{err}");
    assert!(layer.is_merged());
    assert_eq!(layer.weight().unwrap().to_vec2::<f32>()?, merged);
    Ok(())
}

#[test]
fn vector_shape_is_checked() -> TestResult {
    let column = Var::from_tensor(&tensor2(&[&[1.], &[1.], &[1.]])?)?;
    assert!(Ia3Adapter::new(column.clone(), true).is_err());
    assert!(Ia3Adapter::new(column.clone(), false).is_ok());
    // [3, 1] does not fit a layer with 2 outputs: merging says so.
    let mut layer = layer_2x3()?;
    layer.add_adapter("default", Box::new(Ia3Adapter::new(column, false)?))?;
    let err = layer.merge().unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    Ok(())
}

/// IA³ next to LoRA on one layer: the merged layer computes what the
/// unmerged one does, in every order of attachment (an input-scaling IA³ is
/// merged before the additive adapter whatever the order), and merging one
/// adapter after the other gives the same weights as merging both at once.
#[test]
fn with_lora_on_the_same_layer_merge_matches_forward() -> TestResult {
    let x = tensor2(&[&[1., -1., 2.], &[0.5, 3., -2.]])?;
    let lora = || -> Result<Box<peft_core::LoraAdapter>, Box<dyn std::error::Error>> {
        let a = Var::from_tensor(&tensor2(&[&[0.5, -1., 0.25]])?)?;
        let b = Var::from_tensor(&tensor2(&[&[2.], &[-1.]])?)?;
        Ok(Box::new(peft_core::LoraAdapter::new(a, b, 0.5, 0.0)?))
    };
    let cases: [(&str, bool, bool); 4] = [
        ("IA³ (output) then LoRA", false, true),
        ("LoRA then IA³ (output)", false, false),
        ("IA³ (input) then LoRA", true, true),
        ("LoRA then IA³ (input)", true, false),
    ];
    for (what, feedforward, ia3_first) in cases {
        let l: &[&[f32]] = if feedforward {
            &[&[2., 1., 0.5]]
        } else {
            &[&[2.], &[0.5]]
        };
        let mut layer = layer_2x3()?;
        if ia3_first {
            layer.add_adapter("ia3", ia3(l, feedforward)?)?;
            layer.add_adapter("lora", lora()?)?;
        } else {
            layer.add_adapter("lora", lora()?)?;
            layer.add_adapter("ia3", ia3(l, feedforward)?)?;
        }
        let unmerged = layer.forward(&x)?;
        let mut one_by_one = layer.clone();
        layer.merge()?;
        assert_close(
            &format!("{what}: merged vs unmerged"),
            &layer.forward(&x)?,
            &unmerged,
            1e-6,
        )?;
        // The LoRA first, then the IA³: the weights are rebuilt, not stacked.
        let mut names: Vec<String> = one_by_one.adapter_names().map(str::to_owned).collect();
        names.sort_by_key(|n| n != "lora");
        for name in &names {
            one_by_one.set_active_adapters(&[name.as_str()]);
            one_by_one.merge()?;
        }
        one_by_one.set_active_adapters(&["ia3", "lora"]);
        assert_close(
            &format!("{what}: merged one by one"),
            one_by_one.weight().unwrap(),
            layer.weight().unwrap(),
            1e-6,
        )?;
        layer.unmerge()?;
        assert_close(
            &format!("{what}: unmerged weight vs base"),
            layer.weight().unwrap(),
            layer_2x3()?.weight().unwrap(),
            1e-6,
        )?;
    }
    Ok(())
}

// ---- (5) parameter counts -------------------------------------------------------

#[test]
fn parameter_counts_are_out_or_in_per_layer() -> TestResult {
    let mut model = load_llama()?;
    let base = model.num_parameters();
    assert_eq!(base.trainable, 0);
    let config = fresh_config();
    let mut expected = 0;
    for layer in model.layers() {
        if model.targeted_modules(&all_linear())?.contains(&layer.path) {
            expected += if config.is_feedforward(&layer.path)? {
                layer.layer.in_features()
            } else {
                layer.layer.out_features()
            };
        }
    }
    // Per layer: q 32 + k 16 + v 16 + o 32 + gate 64 + up 64 + down 64 (its input).
    assert_eq!(expected, 2 * (32 + 16 + 16 + 32 + 64 + 64 + 64));
    model.add_adapter("default", &config)?;
    let count = model.num_parameters();
    eprintln!("{count}");
    assert_eq!(count.trainable, expected);
    assert_eq!(count.total, base.total + expected);

    // Without feed-forward modules down_proj scales its 32 outputs instead.
    model.add_adapter("plain", &Ia3Config::from(all_linear()))?;
    model.set_active_adapters(&["plain"])?;
    assert_eq!(model.num_parameters().trainable, expected - 2 * (64 - 32));
    Ok(())
}

// ---- (6) options that cannot be honoured ------------------------------------------

/// A copy of the fixture's adapter folder with `config` as its config.
fn write_adapter(name: &str, config: &Value) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = scratch("ia3", name);
    std::fs::copy(
        FIXTURE.path("adapter").join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )?;
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(config)?)?;
    Ok(dir)
}

fn refused_field(dir: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let mut model = load_llama()?;
    let err = model.load_adapter(dir, "default").unwrap_err();
    assert!(model.adapter_names().is_empty(), "the model is unchanged");
    match err {
        PeftError::UnsupportedOption { field, .. } => Ok(field),
        other => Err(format!("expected UnsupportedOption, got {other}").into()),
    }
}

#[test]
fn unsupported_options_are_refused() -> TestResult {
    let peft_config = read_json(FIXTURE.path("adapter").join("adapter_config.json"));
    let mut config = peft_config.clone();
    config["feedforward_modules"] = Value::Null;
    let dir = write_adapter("refused_feedforward_modules", &config)?;
    assert_eq!(refused_field(&dir)?, "feedforward_modules");
    // Options set to their "off" value and PEFT's metadata load.
    let mut config = peft_config.clone();
    config["modules_to_save"] = serde_json::json!([]);
    config["use_dora"] = Value::Bool(false);
    let dir = write_adapter("off_values", &config)?;
    load_llama()?.load_adapter(&dir, "default")?;
    // Fields PEFT's IA3Config does not have (LoRA's options among them) are
    // ignored with a warning, as PEFT ignores them.
    let mut config = peft_config.clone();
    config["use_dora"] = Value::Bool(true);
    config["layer_replication"] = serde_json::json!([[0, 1]]);
    let dir = write_adapter("unknown_fields", &config)?;
    load_llama()?.load_adapter(&dir, "default")?;
    Ok(())
}
