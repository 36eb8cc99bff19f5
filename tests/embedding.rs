//! LoRA on embeddings (PEFT's `lora.Embedding`): the `peft_core::Embedding`
//! slot against Python PEFT (`tests/fixtures/lora_embedding_tiny`) and its
//! own invariants.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use peft_core::prelude::*;
use peft_core::{Embedding, Ia3Config, LayerKind, PeftError, WEIGHTS_FILE};

mod support;
use support::{max_abs, max_abs_diff, scratch, Fixture};

const FIXTURE: Fixture = Fixture("lora_embedding_tiny");

const DEV: Device = Device::Cpu;

#[derive(Adaptable)]
struct Tiny {
    embed: Embedding,
    proj: Linear,
}

impl Tiny {
    fn load() -> Tiny {
        let tensors = candle_core::safetensors::load(FIXTURE.path("model.safetensors"), &DEV).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &DEV);
        Tiny {
            embed: peft_core::embedding(10, 4, vb.pp("embed")).unwrap(),
            proj: linear(4, 6, vb.pp("proj")).unwrap(),
        }
    }

    fn forward(&self, ids: &Tensor) -> Tensor {
        self.proj.forward(&self.embed.forward(ids).unwrap()).unwrap()
    }
}

fn ids(io: &HashMap<String, Tensor>) -> Tensor {
    io["input_ids"].to_dtype(DType::U32).unwrap()
}

#[test]
fn without_adapters_the_slot_is_candle_nn_embedding() {
    let table = Tensor::randn(0f32, 1.0, (7, 3), &DEV).unwrap();
    let ids = Tensor::new(&[[0u32, 6, 2], [2, 2, 5]], &DEV).unwrap();
    let ours = Embedding::new(table.clone(), 3).unwrap().forward(&ids).unwrap();
    let theirs = candle_nn::Embedding::new(table, 3).forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
}

#[test]
fn all_linear_leaves_embeddings_alone_and_names_select_them() {
    let model = Tiny::load();
    let kinds: Vec<(String, LayerKind)> = model.layers().into_iter().map(|l| (l.path, l.layer.kind())).collect();
    assert_eq!(
        kinds,
        [
            ("embed".to_owned(), LayerKind::Embedding),
            ("proj".to_owned(), LayerKind::Linear)
        ]
    );
    assert_eq!(model.targeted_modules(&all_linear()).unwrap(), ["proj"]);
    assert_eq!(
        model.targeted_modules(&modules(["embed", "proj"])).unwrap(),
        ["embed", "proj"]
    );
    assert_eq!(model.targeted_modules(&regex("emb.*")).unwrap(), ["embed"]);
}

/// PEFT's adapter on the embedding and the projection: outputs, every
/// gradient, merge, and the files Rust saves.
#[test]
fn matches_peft() {
    let io = FIXTURE.io();
    let ids = ids(&io);
    let mut model = Tiny::load();
    assert!(max_abs_diff(&model.forward(&ids), &io["y_base"]) < 1e-6);
    let table = model.embed.embeddings().unwrap();

    model.load_adapter(FIXTURE.path("adapter"), "default").unwrap();
    let y = model.forward(&ids);
    assert!(
        max_abs_diff(&y, &io["y_adapted"]) < 1e-5,
        "{}",
        max_abs_diff(&y, &io["y_adapted"])
    );

    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let vars = model.named_trainable_vars();
    assert_eq!(vars.len(), 4);
    for (name, var) in &vars {
        let key = format!("grad.base_model.model.{}", name.replacen(".default", "", 1));
        let expected = &io[&key];
        let rel = max_abs_diff(grads.get(var).unwrap(), expected) / max_abs(expected);
        assert!(rel < 1e-4, "{key}: relative error {rel}");
    }
    assert_eq!(vars[0].0, "embed.lora_embedding_A.default");

    let saved = scratch("embedding", "saved");
    model.save_adapter(&saved, "default").unwrap();
    let theirs = candle_core::safetensors::load(FIXTURE.path("adapter").join(WEIGHTS_FILE), &DEV).unwrap();
    let ours = candle_core::safetensors::load(saved.join(WEIGHTS_FILE), &DEV).unwrap();
    let mut keys: Vec<&String> = ours.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), theirs.len());
    for key in keys {
        assert_eq!(ours[key].dims(), theirs[key].dims(), "{key}");
        assert_eq!(max_abs_diff(&ours[key], &theirs[key]), 0.0, "{key}");
    }

    model.merge().unwrap();
    assert!(max_abs_diff(&model.forward(&ids), &io["y_merged"]) < 1e-5);
    assert!(
        max_abs_diff(&model.embed.embeddings().unwrap(), &table) > 1e-3,
        "the table changed"
    );
    model.unmerge().unwrap();
    assert!(max_abs_diff(&model.embed.embeddings().unwrap(), &table) < 1e-6);
}

#[test]
fn a_fresh_embedding_lora_changes_nothing_and_trains() {
    let io = FIXTURE.io();
    let ids = ids(&io);
    let mut model = Tiny::load();
    let base = model.forward(&ids);
    model.apply_lora(LoraConfig::from(modules(["embed"])).rank(2)).unwrap();
    assert_eq!(max_abs_diff(&model.forward(&ids), &base), 0.0);
    // A starts at zero, B does not: B's gradient is zero, A's is not.
    let grads = model
        .forward(&ids)
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars = model.named_trainable_vars();
    assert!(max_abs(grads.get(&vars[0].1).unwrap()) > 0.0, "lora_embedding_A");
    assert_eq!(model.num_parameters().trainable, 2 * 10 + 4 * 2);
    assert_eq!(
        model.num_parameters().total - model.num_parameters().trainable,
        10 * 4 + 6 * 4 + 6
    );
}

#[test]
fn kinds_without_an_embedding_form_refuse_it() {
    let mut model = Tiny::load();
    match model.add_adapter("ia3", &Ia3Config::from(modules(["embed"]))) {
        Err(PeftError::Module { module, cause: source }) => {
            assert_eq!(module, "embed");
            assert!(
                source.to_string().contains("not implemented for Embedding layers"),
                "{source}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(model.adapter_names().is_empty());
    let dora = LoraConfig::from(modules(["embed"])).dora(true);
    assert!(matches!(
        model.add_adapter("dora", &dora),
        Err(PeftError::Module { .. })
    ));
}
