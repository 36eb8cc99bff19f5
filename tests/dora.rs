//! DoRA (`LoraConfig::dora(true)`, PEFT's `use_dora=True`): cross-checked
//! against Python PEFT on `tests/fixtures/dora_tiny` (outputs, gradients,
//! merge, unmerge, the saved files), plus a 2x3 layer computed by hand.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::DoraAdapter;
use peft_core::{Adapter, LayerWeights, LoraAdapter, CONFIG_FILE, WEIGHTS_FILE};
use serde_json::Value;

mod support;
use support::{assert_close, max_abs, max_abs_diff_or_nan, read_json, scratch, Fixture};

const FIXTURE: Fixture = Fixture("dora_tiny");

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DEV: Device = Device::Cpu;

/// The fixture's model: `y = down(tanh(up(x)))`, `up` 4 -> 6 with bias,
/// `down` 6 -> 3 without.
#[derive(Adaptable)]
struct Tiny {
    up: Linear,
    down: Linear,
}

impl Tiny {
    fn load(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            up: linear(4, 6, vb.pp("up"))?,
            down: linear_no_bias(6, 3, vb.pp("down"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.tanh()?)
    }
}

fn base_tensors() -> candle_core::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(FIXTURE.path("model.safetensors"), &DEV)
}

/// The base model, loaded from the fixture's `model.safetensors`.
fn tiny() -> candle_core::Result<Tiny> {
    Tiny::load(VarBuilder::from_tensors(base_tensors()?, DType::F32, &DEV))
}

/// The loss the fixture differentiates: `(y ** 2).mean()`.
fn loss(y: &Tensor) -> candle_core::Result<Tensor> {
    y.sqr()?.mean_all()
}

/// `(key in adapter_model.safetensors, tensor)` of adapter `default`, layer
/// by layer in field order.
fn saved_vars(model: &Tiny) -> Vec<(String, Var)> {
    let mut vars = Vec::new();
    for layer in model.layers() {
        if let Some(adapter) = layer.layer.adapter("default") {
            for (key, var) in adapter.trainable_vars() {
                vars.push((format!("base_model.model.{}.{key}", layer.path), var));
            }
        }
    }
    vars
}

#[test]
fn matches_peft_outputs_and_gradients() -> TestResult {
    let io = FIXTURE.io();
    let x = &io["x"];
    let mut model = tiny()?;
    assert_close("base output", &model.forward(x)?, &io["y_base"], 1e-6)?;

    model.load_adapter(FIXTURE.path("adapter"), "default")?;
    assert_eq!(model.adapted_modules(), ["down", "up"]);
    let names: Vec<String> = model.named_trainable_vars().into_iter().map(|(n, _)| n).collect();
    // PEFT's in-memory names are the same, except that its magnitude is
    // `up.lora_magnitude_vector.default.weight` (a parameter of a submodule).
    assert_eq!(names[0], "up.lora_A.default.weight");
    assert_eq!(names[1], "up.lora_B.default.weight");
    assert!(names[2].starts_with("up.lora_magnitude_vector.default"), "{names:?}");
    assert_eq!(names[3], "down.lora_A.default.weight");
    assert_eq!(names.len(), 6);
    // 2x4 + 6x2 + 6, 2x6 + 3x2 + 3 adapter weights; 6x4 + 6 + 3x6 base.
    assert_eq!(model.num_parameters().trainable, 26 + 21);
    assert_eq!(model.num_parameters().total, 26 + 21 + 48);

    let y = model.forward(x)?;
    assert_close("adapted output", &y, &io["y_adapted"], 1e-5)?;
    let loss = loss(&y)?;
    assert_close("loss", &loss.reshape(1)?, &io["loss"], 1e-6)?;
    let grads = loss.backward()?;
    assert!(model.missing_gradients(&grads)?.is_empty());
    for (key, var) in saved_vars(&model) {
        let grad = grads.get(&var).ok_or_else(|| format!("no gradient for {key}"))?;
        let expected = &io[&format!("grad.{key}")];
        let relative = max_abs_diff_or_nan(grad, expected)? / max_abs(expected);
        eprintln!("  grad {key}: max relative diff {relative:.3e}");
        assert!(relative < 1e-4, "grad {key}: relative diff {relative:.3e}");
    }
    Ok(())
}

#[test]
fn merge_and_unmerge_match_peft() -> TestResult {
    let io = FIXTURE.io();
    let x = &io["x"];
    let base = base_tensors()?;
    let mut model = tiny()?;
    model.load_adapter(FIXTURE.path("adapter"), "default")?;

    model.merge()?;
    assert_close(
        "merged up.weight",
        model.up.weight().unwrap(),
        &io["merged.up.weight"],
        1e-6,
    )?;
    assert_close(
        "merged down.weight",
        model.down.weight().unwrap(),
        &io["merged.down.weight"],
        1e-6,
    )?;
    assert_close(
        "merged bias (unchanged)",
        model.up.bias().unwrap(),
        &base["up.bias"],
        0.0,
    )?;
    assert_close("merged output", &model.forward(x)?, &io["y_merged"], 1e-5)?;
    assert_close("merged vs adapted output", &model.forward(x)?, &io["y_adapted"], 1e-5)?;

    // A copy made while merged can unmerge too: the merge-time norm goes with it.
    let mut copy = Tiny {
        up: model.up.clone(),
        down: model.down.clone(),
    };
    for m in [&mut model, &mut copy] {
        m.unmerge()?;
        assert_close("unmerged up.weight", m.up.weight().unwrap(), &base["up.weight"], 1e-6)?;
        assert_close(
            "unmerged down.weight",
            m.down.weight().unwrap(),
            &base["down.weight"],
            1e-6,
        )?;
        assert_close("output after unmerge", &m.forward(x)?, &io["y_adapted"], 1e-5)?;
    }

    // merge_and_unload leaves plain layers with the merged weights.
    model.merge_and_unload()?;
    assert!(model.adapted_modules().is_empty());
    assert_close("merge_and_unload output", &model.forward(x)?, &io["y_merged"], 1e-5)?;
    Ok(())
}

#[test]
fn magnitude_starts_as_peft_initialises_it() -> TestResult {
    // PEFT's init with init_lora_weights=False: m = ‖W + s·B·A‖ row-wise
    // with its random B (not ‖W‖).
    let io = FIXTURE.io();
    let base = base_tensors()?;
    let adapter = candle_core::safetensors::load(FIXTURE.path("adapter").join(WEIGHTS_FILE), &DEV)?;
    for module in ["up", "down"] {
        let a = Var::from_tensor(&adapter[&format!("base_model.model.{module}.lora_A.weight")])?;
        let b = Var::from_tensor(&adapter[&format!("base_model.model.{module}.lora_B.weight")])?;
        let lora = LoraAdapter::new(a, b, 4.0 / 2.0, 0.0)?;
        let dora = DoraAdapter::from_weight(lora, &base[&format!("{module}.weight")])?;
        let expected = &io[&format!("init_magnitude.{module}")];
        assert_close(&format!("{module} initial magnitude"), dora.magnitude(), expected, 1e-6)?;
    }
    Ok(())
}

#[test]
fn saved_adapter_is_what_peft_saved() -> TestResult {
    let io = FIXTURE.io();
    let peft_dir = FIXTURE.path("adapter");
    let mut model = tiny()?;
    model.load_adapter(&peft_dir, "default")?;
    let dir = scratch("dora", "round_trip");
    model.save_adapter(&dir, "default")?;

    // Same keys, shapes and values.
    let ours = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &DEV)?;
    let theirs = candle_core::safetensors::load(peft_dir.join(WEIGHTS_FILE), &DEV)?;
    let mut keys: Vec<&String> = ours.keys().collect();
    keys.sort();
    let mut peft_keys: Vec<&String> = theirs.keys().collect();
    peft_keys.sort();
    assert_eq!(keys, peft_keys);
    assert!(keys.contains(&&"base_model.model.up.lora_magnitude_vector".to_owned()));
    for key in keys {
        assert_eq!(ours[key].dims(), theirs[key].dims(), "{key}");
        assert_eq!(max_abs_diff_or_nan(&ours[key], &theirs[key])?, 0.0, "{key}");
    }
    assert_eq!(ours["base_model.model.up.lora_magnitude_vector"].dims(), [6]);
    assert_eq!(ours["base_model.model.down.lora_magnitude_vector"].dims(), [3]);
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );

    // Every field we write has PEFT's value (target_modules as a set).
    let ours = read_json(dir.join(CONFIG_FILE));
    let theirs = read_json(peft_dir.join(CONFIG_FILE));
    assert_eq!(ours["use_dora"], Value::Bool(true));
    for (field, value) in ours.as_object().unwrap() {
        let mut peft_value = theirs[field].clone();
        if field == "target_modules" {
            let mut names: Vec<String> = serde_json::from_value(peft_value)?;
            names.sort();
            peft_value = names.into();
        }
        assert_eq!(value, &peft_value, "adapter_config.json field {field}");
    }

    // What Rust saved loads back to the same outputs.
    let mut reloaded = tiny()?;
    reloaded.load_adapter(&dir, "default")?;
    let (a, b) = (model.forward(&io["x"])?, reloaded.forward(&io["x"])?);
    assert_eq!(max_abs_diff_or_nan(&a, &b)?, 0.0);
    Ok(())
}

#[test]
fn fresh_adapter_changes_nothing() -> TestResult {
    // Default init: B = 0 and m = ‖W‖, so m / n = 1 and the output is exactly the base.
    let x = FIXTURE.io()["x"].clone();
    let mut model = tiny()?;
    let y_base = model.forward(&x)?;
    model.apply_lora(LoraConfig::from(modules(["up", "down"])).rank(2).alpha(4.0).dora(true))?;
    assert_eq!(model.num_parameters().trainable, 26 + 21);
    assert_eq!(model.forward(&x)?.to_vec3::<f32>()?, y_base.to_vec3::<f32>()?);
    Ok(())
}

#[test]
fn fresh_random_adapter_gives_the_lora_output() -> TestResult {
    // m starts as ‖W + s·B·A‖, so with a non-zero B the first output is plain LoRA's.
    let dev = &DEV;
    let weight = Tensor::new(&[[0.3f32, -1.2, 0.5], [2.0, 0.1, -0.7]], dev)?;
    let bias = Tensor::new(&[0.25f32, -0.5], dev)?;
    let a = Var::from_tensor(&Tensor::new(&[[0.4f32, -0.2, 0.9], [0.1, 0.6, -0.3]], dev)?)?;
    let b = Var::from_tensor(&Tensor::new(&[[0.5f32, -0.8], [0.2, 0.7]], dev)?)?;
    let lora = LoraAdapter::new(a, b, 1.5, 0.0)?;
    let x = Tensor::new(&[[1f32, -2., 0.5], [0.3, 0.2, -1.0]], dev)?;

    let mut with_lora = Linear::new(weight.clone(), Some(bias.clone()));
    with_lora.add_adapter("default", Box::new(lora.clone()))?;
    let mut with_dora = Linear::new(weight.clone(), Some(bias));
    with_dora.add_adapter("default", Box::new(DoraAdapter::from_weight(lora, &weight)?))?;
    assert_close(
        "fresh DoRA vs LoRA",
        &with_dora.forward(&x)?,
        &with_lora.forward(&x)?,
        1e-6,
    )?;
    Ok(())
}

/// A 2x3 layer whose numbers are worked out by hand: `W + s·B·A` has rows
/// `[2, 2, 1]` and `[0, 3, 4]`, of norms 3 and 5.
struct HandLayer {
    layer: Linear,
    weight: Var,
    bias: Var,
    a: Var,
    b: Var,
    m: Var,
}

fn hand_layer() -> Result<HandLayer, Box<dyn std::error::Error>> {
    let dev = &DEV;
    let weight = Var::from_tensor(&Tensor::new(&[[1f32, 2., 1.], [0., 3., 4.]], dev)?)?;
    let bias = Var::from_tensor(&Tensor::new(&[1f32, -1.], dev)?)?;
    // r = 1, s = 2: s·B·A = 2 · [1, 0]ᵀ [0.5, 0, 0] = [[1, 0, 0], [0, 0, 0]].
    let a = Var::from_tensor(&Tensor::new(&[[0.5f32, 0., 0.]], dev)?)?;
    let b = Var::from_tensor(&Tensor::new(&[[1f32], [0.]], dev)?)?;
    // m / n = [6 / 3, 2.5 / 5] = [2, 0.5].
    let m = Var::from_tensor(&Tensor::new(&[6f32, 2.5], dev)?)?;
    let dora = DoraAdapter::new(LoraAdapter::new(a.clone(), b.clone(), 2.0, 0.0)?, m.clone())?;
    let mut layer = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
    layer.add_adapter("default", Box::new(dora))?;
    Ok(HandLayer {
        layer,
        weight,
        bias,
        a,
        b,
        m,
    })
}

#[test]
fn hand_computed_layer() -> TestResult {
    let HandLayer {
        mut layer,
        weight,
        bias,
        a,
        b,
        m,
    } = hand_layer()?;
    assert_eq!(layer.adapter("default").unwrap().peft_type(), "LORA");
    let x = Tensor::new(&[[1f32, 1., 2.]], &DEV)?;
    // (W + s·B·A) x = [6, 11]; y = [2 · 6 + 1, 0.5 · 11 − 1].
    let y = layer.forward(&x)?;
    assert_eq!(y.to_vec2::<f32>()?, [[13.0, 4.5]]);

    // loss = Σ y. ∂/∂m_i = ((W + s·B·A) x)_i / n_i = [6/3, 11/5];
    // ∂/∂B = (m/n)_i · s · (A x) = [2 · 2 · 0.5, 0.5 · 2 · 0.5];
    // ∂/∂A = Σ_i (m/n)_i · s · B_i · x = 2 · 2 · 1 · x. Nothing reaches n.
    let grads = y.sum_all()?.backward()?;
    let grad = |v: &Var| grads.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let close = |got: Vec<f32>, expected: &[f32]| {
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {expected:?}");
        }
    };
    close(grad(&m), &[2.0, 2.2]);
    close(grad(&b), &[2.0, 0.5]);
    close(grad(&a), &[4.0, 4.0, 8.0]);
    // The base never gets a gradient.
    assert!(grads.get(&weight).is_none() && grads.get(&bias).is_none());

    // Merge: the rows of W + s·B·A scaled by m / n; the bias stays.
    layer.merge()?;
    assert_eq!(
        layer.weight().unwrap().to_vec2::<f32>()?,
        [[4.0, 4.0, 2.0], [0.0, 1.5, 2.0]]
    );
    assert_eq!(layer.bias().unwrap().to_vec1::<f32>()?, [1.0, -1.0]);
    assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, [[13.0, 4.5]]);
    layer.unmerge()?;
    assert_eq!(
        layer.weight().unwrap().to_vec2::<f32>()?,
        [[1.0, 2.0, 1.0], [0.0, 3.0, 4.0]]
    );
    Ok(())
}

#[test]
fn gradients_never_reach_the_base() -> TestResult {
    // Base weights that are themselves Vars: only the adapter's tensors get gradients.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let mut model = Tiny::load(vb)?;
    model.apply_lora(
        LoraConfig::from(modules(["up", "down"]))
            .rank(2)
            .alpha(4.0)
            .init(LoraInit::Random)
            .dora(true),
    )?;
    let y = model.forward(&FIXTURE.io()["x"])?;
    let grads = loss(&y)?.backward()?;
    for var in varmap.all_vars() {
        assert!(grads.get(&var).is_none(), "a base tensor got a gradient");
    }
    assert_eq!(model.trainable_vars().len(), 6);
    assert!(model.missing_gradients(&grads)?.is_empty());
    Ok(())
}

#[test]
fn unmerge_needs_a_merge_and_shapes_are_checked() -> TestResult {
    let layer = hand_layer()?.layer;
    let adapter = layer.adapter("default").unwrap();
    let weights = LayerWeights {
        weight: layer.weight().unwrap().clone(),
        bias: None,
    };
    assert!(adapter.unmerge(&weights).is_err());

    let a = Var::zeros((1, 3), DType::F32, &DEV)?;
    let b = Var::zeros((2, 1), DType::F32, &DEV)?;
    let m = Var::zeros(3, DType::F32, &DEV)?;
    let err = DoraAdapter::new(LoraAdapter::new(a, b, 1.0, 0.0)?, m).unwrap_err();
    assert!(err.to_string().contains("magnitude"), "{err}");
    Ok(())
}

#[test]
fn dropout_is_applied_only_in_training() -> TestResult {
    // With dropout configured, inference mode is deterministic and equal to
    // the same adapter without dropout; training mode changes the output.
    let io = FIXTURE.io();
    let x = &io["x"];
    let mut model = tiny()?;
    model.load_adapter(FIXTURE.path("adapter"), "default")?;
    let expected = model.forward(x)?;
    let dir = scratch("dora", "dropout");
    model.save_adapter(&dir, "default")?;
    let config_path = dir.join(CONFIG_FILE);
    let mut config = read_json(&config_path);
    config["lora_dropout"] = Value::from(0.5);
    std::fs::write(&config_path, serde_json::to_string(&config)?)?;

    let mut model = tiny()?;
    model.load_adapter(&dir, "default")?;
    assert_eq!(max_abs_diff_or_nan(&model.forward(x)?, &expected)?, 0.0);
    model.set_training(true);
    assert!(max_abs_diff_or_nan(&model.forward(x)?, &expected)? > 1e-3);
    Ok(())
}

#[test]
fn files_that_disagree_with_use_dora_are_refused() -> TestResult {
    let varmap = VarMap::new();
    let peft_dir = FIXTURE.path("adapter");
    let config = read_json(peft_dir.join(CONFIG_FILE));
    let tensors = candle_core::safetensors::load(peft_dir.join(WEIGHTS_FILE), &DEV)?;

    // DoRA tensors with use_dora = false: the magnitudes belong to nothing.
    let dir = scratch("dora", "not_dora");
    let mut plain = config.clone();
    plain["use_dora"] = Value::Bool(false);
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&plain)?)?;
    std::fs::copy(peft_dir.join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE))?;
    let mut model = Tiny::load(VarBuilder::from_varmap(&varmap, DType::F32, &DEV))?;
    match model.load_adapter(&dir, "default") {
        Err(peft_core::PeftError::UnexpectedTensors { keys }) => assert_eq!(
            keys,
            [
                "base_model.model.down.lora_magnitude_vector",
                "base_model.model.up.lora_magnitude_vector"
            ]
        ),
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }

    // use_dora = true without the magnitudes (a plain LoRA file).
    let dir = scratch("dora", "no_magnitude");
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&config)?)?;
    let lora_only: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.ends_with("lora_magnitude_vector"))
        .collect();
    candle_core::safetensors::save(&lora_only, dir.join(WEIGHTS_FILE))?;
    match model.load_adapter(&dir, "default") {
        Err(peft_core::PeftError::MissingTensor { key, .. }) => {
            assert!(key.ends_with(".lora_magnitude_vector"), "{key}")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(model.adapted_modules().is_empty());
    Ok(())
}

/// A layer with a LoRA adapter `a` and then a DoRA adapter `b`, both active.
fn lora_then_dora() -> Result<(Linear, LoraAdapter, DoraAdapter), Box<dyn std::error::Error>> {
    let dev = &DEV;
    let weight = Tensor::new(&[[0.3f32, -1.2, 0.5], [2.0, 0.1, -0.7]], dev)?;
    let bias = Tensor::new(&[0.25f32, -0.5], dev)?;
    let var = |t: Tensor| Var::from_tensor(&t);
    let lora = LoraAdapter::new(
        var(Tensor::new(&[[0.4f32, -0.2, 0.9]], dev)?)?,
        var(Tensor::new(&[[0.5f32], [0.2]], dev)?)?,
        2.0,
        0.0,
    )?;
    let dora = DoraAdapter::new(
        LoraAdapter::new(
            var(Tensor::new(&[[0.1f32, 0.6, -0.3]], dev)?)?,
            var(Tensor::new(&[[-0.8f32], [0.7]], dev)?)?,
            1.5,
            0.0,
        )?,
        var(Tensor::new(&[1.7f32, 1.1], dev)?)?,
    )?;
    let mut layer = Linear::new(weight, Some(bias));
    layer.add_adapter("a", Box::new(lora.clone()))?;
    layer.add_adapter("b", Box::new(dora.clone()))?;
    Ok((layer, lora, dora))
}

#[test]
fn dora_after_another_adapter_takes_its_norm_from_the_unmerged_base() -> TestResult {
    // As PEFT (checked with PEFT 0.21.2, LoRA "a" then DoRA "b" on one
    // layer): the forward pass takes n from the base weight without "a", and
    // so must merging "b" after "a", or merged and unmerged outputs differ.
    let (layer, lora, dora) = lora_then_dora()?;
    let x = Tensor::new(&[[1f32, -2., 0.5], [0.3, 0.2, -1.0]], &DEV)?;
    let y = layer.forward(&x)?;
    let base = layer.base_weights()?;
    let with_a = lora.merge(&base)?;
    let merged = dora.merge_with_base(&with_a, &base)?;
    let merged_layer = Linear::new(merged.weight.clone(), merged.bias.clone());
    assert_close(
        "merged (norm of the unmerged base)",
        &merged_layer.forward(&x)?,
        &y,
        1e-6,
    )?;
    // Unmerging in reverse order gives the base back.
    let restored = lora.unmerge(&dora.unmerge(&merged)?)?;
    assert_close("restored weight", &restored.weight, &base.weight, 1e-6)?;
    Ok(())
}

#[test]
fn merging_lora_then_dora_keeps_the_output() -> TestResult {
    let (mut layer, ..) = lora_then_dora()?;
    let x = Tensor::new(&[[1f32, -2., 0.5], [0.3, 0.2, -1.0]], &DEV)?;
    let y = layer.forward(&x)?;
    layer.merge()?;
    assert_close("merged output", &layer.forward(&x)?, &y, 1e-6)?;
    Ok(())
}
