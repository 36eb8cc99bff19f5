//! An adapter kind defined outside peft-core, through the public API only:
//! registered with `register_adapter_kind!`, applied, trained a step, saved
//! in PEFT's layout and loaded back by `load_adapter`'s dispatch on
//! `peft_type`.
//!
//! The kind, `BIAS_SHIFT`, learns one vector per layer added to the output:
//! `y = base(x) + shift`; merging adds it to the bias.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use peft_core::config_file::{KindFields, NoFields};
use peft_core::prelude::*;
use peft_core::{Adapter, AdapterConfig, ForwardContext, Layer, LayerWeights, PeftConfig, PeftMetadata, CONFIG_FILE};
use serde_json::Value;

mod support;
use support::max_abs_diff;

// ---- the kind: from here to the registration line -------------------------

/// The adapter on one layer.
#[derive(Debug, Clone)]
struct BiasShift {
    shift: Var,
}

impl Adapter for BiasShift {
    fn peft_type(&self) -> &'static str {
        BiasShiftConfig::PEFT_TYPE
    }
    fn forward(&self, _x: &Tensor, base_output: Tensor, _: ForwardContext<'_>) -> peft_core::Result<Tensor> {
        Ok(base_output.broadcast_add(self.shift.as_tensor())?)
    }
    fn merge(&self, base: &LayerWeights) -> peft_core::Result<LayerWeights> {
        let bias = match &base.bias {
            Some(bias) => (bias + self.shift.as_tensor())?,
            None => self.shift.as_tensor().clone(),
        };
        Ok(LayerWeights {
            weight: base.weight.clone(),
            bias: Some(bias),
        })
    }
    fn unmerge(&self, merged: &LayerWeights) -> peft_core::Result<LayerWeights> {
        let bias = merged
            .bias
            .as_ref()
            .map(|bias| bias - self.shift.as_tensor())
            .transpose()?;
        Ok(LayerWeights {
            weight: merged.weight.clone(),
            bias,
        })
    }
    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("shift", self.shift.clone())]
    }
}

/// Its config: just the targets.
struct BiasShiftConfig {
    targets: Targets,
}

impl AdapterConfig for BiasShiftConfig {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn new_adapter(&self, _: &str, layer: &Layer) -> peft_core::Result<Box<dyn Adapter>> {
        let shift = Var::zeros(layer.out_features(), layer.dtype(), &layer.device())?;
        Ok(Box::new(BiasShift { shift }))
    }
}

/// Its own fields of `adapter_config.json`: none beyond what every kind has,
/// so any other field is unknown.
#[derive(serde::Deserialize)]
struct BiasShiftFields {}

impl KindFields for BiasShiftFields {
    type Config = BiasShiftConfig;
    type Family = NoFields;
    fn into_config(self, _: NoFields, targets: Targets, _: PeftMetadata) -> peft_core::Result<BiasShiftConfig> {
        Ok(BiasShiftConfig { targets })
    }
}

impl PeftConfig for BiasShiftConfig {
    const PEFT_TYPE: &'static str = "BIAS_SHIFT";
    type Fields = BiasShiftFields;
}

peft_core::register_adapter_kind!(BiasShiftConfig);

// ---- the kind ends here ----------------------------------------------------

#[derive(Adaptable)]
struct Net {
    hidden: Linear,
    #[output_head]
    head: Linear,
}

impl Net {
    fn new(varmap: &VarMap) -> Net {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        Net {
            hidden: linear_no_bias(3, 4, vb.pp("hidden")).unwrap(),
            head: linear(4, 2, vb.pp("head")).unwrap(),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.head
            .forward(&self.hidden.forward(x).unwrap().tanh().unwrap())
            .unwrap()
    }
}

#[test]
fn a_kind_from_another_crate_trains_saves_and_loads() {
    let kinds: Vec<&str> = peft_core::adapter_kinds()
        .unwrap()
        .iter()
        .map(|k| k.peft_type())
        .collect();
    assert!(kinds.contains(&"BIAS_SHIFT") && kinds.contains(&"LORA"), "{kinds:?}");
    assert!(kinds.is_sorted(), "{kinds:?}");

    let varmap = VarMap::new();
    let mut net = Net::new(&varmap);
    let x = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.0, 0.0, -0.5]], &Device::Cpu).unwrap();
    let base = net.forward(&x);
    net.add_adapter("shift", &BiasShiftConfig { targets: all_linear() })
        .unwrap();
    assert_eq!(net.adapted_modules(), ["hidden"]);
    assert_eq!(max_abs_diff(&net.forward(&x), &base), 0.0);

    // One SGD step on the adapter alone moves the output.
    let mut sgd = SGD::new(net.trainable_vars(), 0.5).unwrap();
    sgd.backward_step(&net.forward(&x).sqr().unwrap().sum_all().unwrap())
        .unwrap();
    let trained = net.forward(&x);
    assert!(max_abs_diff(&trained, &base) > 1e-3);

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("custom_adapter_kind");
    let _ = std::fs::remove_dir_all(&dir);
    net.save_adapter(&dir, "shift").unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("shift").join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "BIAS_SHIFT");
    assert_eq!(config["target_modules"], serde_json::json!(["hidden"]));

    let mut twin = Net::new(&varmap);
    twin.load_adapter(dir.join("shift"), "shift").unwrap();
    assert_eq!(max_abs_diff(&twin.forward(&x), &trained), 0.0);
    twin.merge().unwrap();
    assert!(max_abs_diff(&twin.forward(&x), &trained) < 1e-6);
}
