//! What the tests of the LoHa and LoKr fixtures share: the fixtures' tiny
//! torch model in Rust, and the check of one PEFT case (outputs, every
//! gradient, merge / unmerge, the saved files and a reload of them).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use peft_core::prelude::*;
use peft_core::{CONFIG_FILE, WEIGHTS_FILE};
use serde_json::Value;

use super::{max_abs, max_abs_diff, read_json_object, Fixture};

pub const DEV: Device = Device::Cpu;

/// The fixture's torch module: `y = fc2(tanh(fc1(x)))`.
#[derive(Adaptable)]
pub struct Tiny {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Tiny {
    pub fn new(vb: VarBuilder) -> Tiny {
        Tiny {
            fc1: linear(8, 12, vb.pp("fc1")).unwrap(),
            fc2: linear_no_bias(12, 20, vb.pp("fc2")).unwrap(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).unwrap().tanh().unwrap()).unwrap()
    }
}

/// A LoHa / LoKr case (made by its `make_case.py`): the base model is [`Tiny`].
impl Fixture {
    /// The base model of the case, from its `model.safetensors`.
    pub fn model(&self) -> Tiny {
        let tensors = candle_core::safetensors::load(self.path("model.safetensors"), &DEV).unwrap();
        Tiny::new(VarBuilder::from_tensors(tensors, DType::F32, &DEV))
    }

    /// The base model with the case's `adapter/` loaded, its config first
    /// edited by `edit` (in a copy of the folder).
    pub fn load_edited(
        &self,
        name: &str,
        edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    ) -> peft_core::Result<Tiny> {
        let dir = self.scratch(name);
        let mut config = read_json_object(self.path("adapter").join(CONFIG_FILE));
        edit(&mut config);
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config).unwrap()).unwrap();
        std::fs::copy(self.path("adapter").join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
        let mut model = self.model();
        model.load_adapter(&dir, "default").map(|()| model)
    }
}

pub fn loss(y: &Tensor) -> Tensor {
    y.sqr().unwrap().sum_all().unwrap()
}

pub fn string_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

pub fn weights_of(model: &Tiny) -> Vec<Tensor> {
    vec![model.fc1.weight().unwrap().clone(), model.fc2.weight().unwrap().clone()]
}

impl Fixture {
    /// Everything the fixture records for one case, checked against Rust.
    pub fn check_case(&self, case: &str, folder: &str) {
        let fixture = |path: &str| self.path(path);
        let io = self.io();
        let get = |key: &str| io.get(key).unwrap_or_else(|| panic!("io.safetensors has no {key}"));
        let x = get("x");

        let mut model = self.model();
        let y_base = model.forward(x);
        assert!(max_abs_diff(&y_base, get("y_base")) <= 1e-6);
        let original = weights_of(&model);

        model.load_adapter(fixture(folder), "default").unwrap();
        assert_eq!(model.adapted_modules(), ["fc1", "fc2"]);

        // Output.
        let y = model.forward(x);
        let d_out = max_abs_diff(&y, get(&format!("{case}.y_adapted")));
        println!("{case}: output max abs diff {d_out:.3e}");
        assert!(d_out <= 1e-5, "{case}: output differs by {d_out}");
        assert!(
            max_abs_diff(&y, &y_base) > 1e-2,
            "{case}: the adapter should change the output"
        );

        // Gradients of sum(y²) with respect to every adapter tensor.
        let grads = loss(&y).backward().unwrap();
        let mut checked = 0;
        let mut worst = 0f32;
        for layer in model.layers() {
            let adapter = layer.layer.adapter("default").unwrap();
            for (key, var) in adapter.trainable_vars() {
                let file_key = format!("base_model.model.{}.{key}", layer.path);
                let expected = get(&format!("{case}.grad.{file_key}"));
                let grad = grads.get(&var).unwrap_or_else(|| panic!("no gradient for {file_key}"));
                let rel = max_abs_diff(grad, expected) / max_abs(expected);
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
        let d_merged = max_abs_diff(&model.forward(x), get(&format!("{case}.y_merged")));
        let d_weights = ["fc1", "fc2"]
            .iter()
            .zip(weights_of(&model))
            .map(|(n, w)| max_abs_diff(&w, get(&format!("{case}.merged.{n}.weight"))))
            .fold(0f32, f32::max);
        println!("{case}: merged output {d_merged:.3e}, merged weights {d_weights:.3e}");
        assert!(d_merged <= 1e-5 && d_weights <= 1e-5);
        model.unmerge().unwrap();
        let d_restored = original
            .iter()
            .zip(weights_of(&model))
            .map(|(a, b)| max_abs_diff(a, &b))
            .fold(0f32, f32::max);
        println!("{case}: unmerged weights vs original {d_restored:.3e}");
        assert!(d_restored <= 1e-6);
        assert!(max_abs_diff(&model.forward(x), &y) <= 1e-6);

        // Saving writes PEFT's keys, shapes and values, and its config fields.
        let out = self.scratch(case);
        model.save_adapter(&out, "default").unwrap();
        let peft_tensors = candle_core::safetensors::load(fixture(folder).join(WEIGHTS_FILE), &DEV).unwrap();
        let ours = candle_core::safetensors::load(out.join(WEIGHTS_FILE), &DEV).unwrap();
        let keys = |m: &HashMap<String, Tensor>| m.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&ours), keys(&peft_tensors));
        for (key, tensor) in &peft_tensors {
            assert_eq!(ours[key].dims(), tensor.dims(), "{key}");
            assert_eq!(max_abs_diff(&ours[key], tensor), 0.0, "{key}");
        }
        check_saved_config(&fixture(folder).join(CONFIG_FILE), &out.join(CONFIG_FILE));

        // Reloading what Rust saved gives the same output.
        let mut reloaded = self.model();
        reloaded.load_adapter(&out, "default").unwrap();
        assert_eq!(max_abs_diff(&reloaded.forward(x), &y), 0.0);
    }
}

/// Every field PEFT saved is in ours with the same value, except PEFT's
/// bookkeeping; `target_modules` compares as a set (a PEFT regex is compared
/// through the modules it matched).
pub fn check_saved_config(peft: &Path, ours: &Path) {
    let peft = read_json_object(peft);
    let mut ours = read_json_object(ours);
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
