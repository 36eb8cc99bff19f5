//! LoRA on convolutions (PEFT's `lora.Conv1d` / `lora.Conv2d`): the
//! `peft_core::Conv1d` / `Conv2d` slots against Python PEFT
//! (`tests/fixtures/lora_conv_tiny`) and their own invariants.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv1dConfig, Conv2dConfig, VarBuilder};
use peft_core::prelude::*;
use peft_core::{Conv1d, Conv2d, Ia3Config, LayerKind, PeftError, WEIGHTS_FILE};

mod support;
use support::rng::Rng;
use support::{max_abs, max_abs_diff, scratch, Fixture};

const FIXTURE: Fixture = Fixture("lora_conv_tiny");

const DEV: Device = Device::Cpu;

#[derive(Adaptable)]
struct Tiny {
    c1: Conv1d,
    c2: Conv2d,
}

impl Tiny {
    fn load() -> Tiny {
        let tensors = candle_core::safetensors::load(FIXTURE.path("model.safetensors"), &DEV).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &DEV);
        let c1 = Conv1dConfig {
            padding: 1,
            ..Default::default()
        };
        let c2 = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Tiny {
            c1: peft_core::conv1d(3, 4, 3, c1, vb.pp("c1")).unwrap(),
            c2: candle_nn::conv2d_no_bias(2, 5, 3, c2, vb.pp("c2"))
                .unwrap()
                .try_into()
                .unwrap(),
        }
    }

    fn forward(&self, io: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
        (self.c1.forward(&io["x1"]).unwrap(), self.c2.forward(&io["x2"]).unwrap())
    }
}

fn check_outputs(model: &Tiny, io: &HashMap<String, Tensor>, which: &str) {
    let (y1, y2) = model.forward(io);
    let (d1, d2) = (
        max_abs_diff(&y1, &io[&format!("y1_{which}")]),
        max_abs_diff(&y2, &io[&format!("y2_{which}")]),
    );
    assert!(d1 < 1e-5 && d2 < 1e-5, "{which}: {d1}, {d2}");
}

#[test]
fn without_adapters_the_slots_are_candle_nn_convolutions() {
    let io = FIXTURE.io();
    let model = Tiny::load();
    check_outputs(&model, &io, "base");
    let kinds: Vec<LayerKind> = model.layers().iter().map(|l| l.layer.kind()).collect();
    assert_eq!(kinds, [LayerKind::Conv, LayerKind::Conv]);
    // all_linear() leaves convolutions alone; names select them.
    assert!(matches!(
        model.targeted_modules(&all_linear()),
        Err(PeftError::NoTargetMatched { .. })
    ));
    assert_eq!(model.targeted_modules(&modules(["c1", "c2"])).unwrap(), ["c1", "c2"]);
}

#[test]
fn matches_peft() {
    let io = FIXTURE.io();
    let mut model = Tiny::load();
    let kernels = (model.c1.weight().unwrap(), model.c2.weight().unwrap());
    model.load_adapter(FIXTURE.path("adapter"), "default").unwrap();
    check_outputs(&model, &io, "adapted");

    let (y1, y2) = model.forward(&io);
    let loss = (y1.sqr().unwrap().sum_all().unwrap() + y2.sqr().unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars = model.named_trainable_vars();
    assert_eq!(vars.len(), 4);
    for (name, var) in &vars {
        let key = format!("grad.base_model.model.{}", name.replacen(".default", "", 1));
        let expected = &io[&key];
        let rel = max_abs_diff(grads.get(var).unwrap(), expected) / max_abs(expected);
        assert!(rel < 1e-4, "{key}: relative error {rel}");
    }

    let saved = scratch("conv", "saved");
    model.save_adapter(&saved, "default").unwrap();
    let theirs = candle_core::safetensors::load(FIXTURE.path("adapter").join(WEIGHTS_FILE), &DEV).unwrap();
    let ours = candle_core::safetensors::load(saved.join(WEIGHTS_FILE), &DEV).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (key, tensor) in &theirs {
        assert_eq!(ours[key].dims(), tensor.dims(), "{key}");
        assert_eq!(max_abs_diff(&ours[key], tensor), 0.0, "{key}");
    }

    model.merge().unwrap();
    check_outputs(&model, &io, "merged");
    assert!(max_abs_diff(&model.c2.weight().unwrap(), &kernels.1) > 1e-3);
    model.unmerge().unwrap();
    assert!(max_abs_diff(&model.c1.weight().unwrap(), &kernels.0) < 1e-6);
    assert!(max_abs_diff(&model.c2.weight().unwrap(), &kernels.1) < 1e-6);
}

#[test]
fn a_fresh_conv_lora_changes_nothing() {
    let io = FIXTURE.io();
    let mut model = Tiny::load();
    model
        .apply_lora(LoraConfig::from(modules(["c1", "c2"])).rank(3))
        .unwrap();
    check_outputs(&model, &io, "base");
    let shapes: Vec<Vec<usize>> = model
        .named_trainable_vars()
        .iter()
        .map(|(_, v)| v.dims().to_vec())
        .collect();
    assert_eq!(
        shapes,
        [vec![3, 3, 3], vec![4, 3, 1], vec![3, 2, 3, 3], vec![5, 3, 1, 1]]
    );
}

/// Gradients with respect to the input of a 1-D convolution slot match a
/// plain matmul formulation (candle's own `conv1d` backward does not).
#[test]
fn conv1d_input_gradients_are_right() {
    // N(0, 1) values from a fixed seed: the tolerance holds on every run.
    let mut rng = Rng(0xc0_4d1d);
    let x = candle_core::Var::from_tensor(&rng.randn(&[2, 3, 7], 1.0)).unwrap();
    let kernel = rng.randn(&[4, 3, 1], 1.0);
    let conv = Conv1d::new(kernel.clone(), None, Conv1dConfig::default()).unwrap();
    let grad_conv = conv
        .forward(&x)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // A kernel of size 1 is a matmul over channels: y[b, o, t] = Σ_c W[o, c] x[b, c, t].
    let w = kernel
        .squeeze(2)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((2, 4, 3))
        .unwrap();
    let y = w.matmul(x.as_tensor()).unwrap();
    let grad_mm = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_abs_diff(grad_conv.get(&x).unwrap(), grad_mm.get(&x).unwrap()) < 1e-4);
}

#[test]
fn kinds_without_a_conv_form_refuse_it() {
    let mut model = Tiny::load();
    match model.add_adapter("ia3", &Ia3Config::from(modules(["c1"]))) {
        Err(PeftError::Module { module, cause: source }) => {
            assert_eq!(module, "c1");
            assert!(
                source.to_string().contains("not implemented for Conv layers"),
                "{source}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(model.adapter_names().is_empty());
}
