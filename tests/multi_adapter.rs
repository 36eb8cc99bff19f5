//! Several named adapters on one model, as PEFT's `add_adapter`,
//! `set_adapter([...])`, `disable_adapter()`, `delete_adapter`,
//! `merge_adapter(adapter_names=...)` and `merge_and_unload`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::PeftError;

mod support;
use support::{assert_close_relative, max_abs_diff};

#[derive(Adaptable)]
struct Block {
    attn: Linear,
    mlp: Linear,
}

#[derive(Adaptable)]
struct Net {
    blocks: Vec<Block>,
    #[output_head]
    head: Linear,
}

impl Net {
    fn new() -> Net {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        Net {
            blocks: (0..2)
                .map(|i| Block {
                    attn: linear(5, 5, vb.pp(format!("blocks.{i}.attn"))).unwrap(),
                    mlp: linear(5, 5, vb.pp(format!("blocks.{i}.mlp"))).unwrap(),
                })
                .collect(),
            head: linear(5, 3, vb.pp("head")).unwrap(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.clone();
        for block in &self.blocks {
            // Linear in x, so adapter deltas on one layer add up exactly.
            x = (&x + block.mlp.forward(&block.attn.forward(&x).unwrap()).unwrap()).unwrap();
        }
        self.head.forward(&x).unwrap()
    }
}

fn x() -> Tensor {
    Tensor::new(
        &[[0.3f32, -1.2, 0.8, 0.0, 2.0], [1.0, 0.5, -0.5, 0.25, -1.0]],
        &Device::Cpu,
    )
    .unwrap()
}

fn random_lora(targets: Targets) -> LoraConfig {
    LoraConfig::from(targets).rank(2).alpha(2.0).init(LoraInit::Random)
}

/// A model with adapters "a" (on attn) and "b" (on mlp), both active.
fn two_adapters() -> Net {
    let mut net = Net::new();
    net.add_adapter("a", &random_lora(modules(["attn"]))).unwrap();
    net.add_adapter("b", &random_lora(modules(["mlp"]))).unwrap();
    net
}

fn output_with(net: &mut Net, names: &[&str]) -> Tensor {
    net.set_active_adapters(names).unwrap();
    net.forward(&x())
}

#[test]
fn active_adapters_combine_and_each_can_be_chosen() {
    let mut net = two_adapters();
    let both = output_with(&mut net, &["a", "b"]);
    let a = output_with(&mut net, &["a"]);
    let b = output_with(&mut net, &["b"]);
    let none = output_with(&mut net, &[]);
    for (one, two) in [(&both, &a), (&a, &b), (&b, &none), (&both, &none)] {
        assert!(max_abs_diff(one, two) > 1e-3);
    }
    assert_eq!(net.num_parameters().trainable, 0, "no active adapter, nothing trains");
    net.set_active_adapters(&["a", "b"]).unwrap();
    assert_eq!(net.trainable_vars().len(), 8);
}

#[test]
fn adapters_on_the_same_layer_add_up() {
    let mut net = Net::new();
    let base = net.forward(&x());
    net.add_adapter("a", &random_lora(modules(["blocks.0.attn"]))).unwrap();
    net.add_adapter("b", &random_lora(modules(["blocks.0.attn"]))).unwrap();
    let both = output_with(&mut net, &["a", "b"]);
    let a = output_with(&mut net, &["a"]);
    let b = output_with(&mut net, &["b"]);
    // base -> head is linear in the attn output: the deltas add.
    let sum = ((&a + &b).unwrap() - &base).unwrap();
    assert_close_relative(&both, &sum, 1e-5);
}

#[test]
fn disabling_is_a_scope() {
    let mut net = two_adapters();
    let adapted = net.forward(&x());
    let base = output_with(&mut net, &[]);
    net.set_active_adapters(&["a", "b"]).unwrap();
    let inside = net.with_adapters_disabled(|net| net.forward(&x())).unwrap();
    assert_eq!(max_abs_diff(&inside, &base), 0.0);
    assert_eq!(max_abs_diff(&net.forward(&x()), &adapted), 0.0);
}

#[test]
fn merging_a_chosen_set() {
    let mut net = two_adapters();
    let adapted = net.forward(&x());
    let weights =
        |net: &Net| -> Vec<Tensor> { net.layers().iter().map(|l| l.layer.weight().unwrap().clone()).collect() };
    let before = weights(&net);
    net.merge_adapters(&["a"]).unwrap();
    let after = weights(&net);
    // Only the layers "a" sits on changed.
    let changed: Vec<String> = net
        .layers()
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| max_abs_diff(b, a) > 0.0)
        .map(|(l, _)| l.path.clone())
        .collect();
    assert_eq!(changed, ["blocks.0.attn", "blocks.1.attn"]);
    assert_close_relative(&net.forward(&x()), &adapted, 1e-5);
    assert!(matches!(
        net.merge_adapters(&["c"]),
        Err(PeftError::UnknownAdapter { .. })
    ));

    // Deleting a merged adapter, or changing the active set, is refused.
    match net.delete_adapter("a") {
        Err(PeftError::MergeState { module, .. }) => assert_eq!(module, "blocks.0.attn"),
        other => panic!("expected MergeState, got {other:?}"),
    }
    assert!(matches!(
        net.set_active_adapters(&["b"]),
        Err(PeftError::MergeState { .. })
    ));
    net.unmerge().unwrap();
    for (now, was) in weights(&net).iter().zip(&before) {
        assert!(max_abs_diff(now, was) < 1e-6);
    }
    net.delete_adapter("a").unwrap();
    assert_eq!(net.adapter_names(), ["b"]);
    assert_eq!(net.adapted_modules(), ["blocks.0.mlp", "blocks.1.mlp"]);
}

#[test]
fn merge_and_unload_folds_every_active_adapter() {
    let mut net = two_adapters();
    let adapted = net.forward(&x());
    net.merge_and_unload().unwrap();
    assert!(net.adapter_names().is_empty());
    assert_close_relative(&net.forward(&x()), &adapted, 1e-5);
}

#[test]
fn a_second_all_linear_adapter_wraps_only_base_layers() {
    let mut net = Net::new();
    net.apply_lora(all_linear()).unwrap();
    net.add_adapter("second", &LoraConfig::from(all_linear())).unwrap();
    // The same four layers, each with two adapters; nothing inside an adapter was wrapped.
    assert_eq!(net.targeted_modules(&all_linear()).unwrap().len(), 4);
    for layer in net.layers().iter().filter(|l| l.path != "head") {
        assert_eq!(layer.layer.adapter_names().collect::<Vec<_>>(), ["default", "second"]);
    }
}
