//! LoRA on whole models: forward against hand computations, gradients,
//! merging, several adapters, and failures that leave the model unchanged.

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use peft_core::prelude::*;
use peft_core::{
    Adapter, AdapterConfig, ForwardContext, LayerWeights, LoraAdapter, ParameterCount, PeftError, Role, Targets,
};

mod support;
use support::rng::Rng;
use support::{assert_close_relative, max_abs_diff};

const DEV: Device = Device::Cpu;

#[derive(Adaptable)]
struct Block {
    up: Linear,
    down: Linear,
    norm: candle_nn::LayerNorm,
}

#[derive(Adaptable)]
struct Net {
    embed: candle_nn::Embedding,
    blocks: Vec<Block>,
    #[output_head]
    head: Linear,
}

impl Net {
    /// Embedding 11x4, 2 blocks (4 -> 6 -> 4, LayerNorm 4), head 4 -> 11.
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let blocks = (0..2)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    up: linear(4, 6, vb.pp("up"))?,
                    down: linear_no_bias(6, 4, vb.pp("down"))?,
                    norm: candle_nn::layer_norm(4, 1e-5, vb.pp("norm"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            embed: candle_nn::embedding(11, 4, vb.pp("embed"))?,
            blocks,
            head: linear(4, 11, vb.pp("head"))?,
        })
    }

    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.embed.forward(ids)?;
        for block in &self.blocks {
            let h = block.up.forward(&block.norm.forward(&x)?)?.gelu()?;
            x = (x + block.down.forward(&h)?)?;
        }
        self.head.forward(&x)
    }
}

fn net() -> (Net, VarMap) {
    let varmap = VarMap::new();
    let net = Net::new(VarBuilder::from_varmap(&varmap, DType::F32, &DEV)).unwrap();
    (net, varmap)
}

fn ids() -> Tensor {
    Tensor::new(&[[1u32, 5, 7, 2, 9], [3, 3, 0, 10, 4]], &DEV).unwrap()
}

fn random_lora(targets: Targets) -> LoraConfig {
    LoraConfig::from(targets).rank(2).alpha(4.0).init(LoraInit::Random)
}

#[test]
fn lora_forward_matches_a_hand_computation() {
    let w = [[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.5]];
    let bias = [0.1f32, -0.2];
    let a = [[1.0f32, 2.0, -1.0], [0.5, 0.0, 1.0]]; // [r=2, in=3]
    let b = [[0.3f32, -0.7], [1.1, 0.2]]; // [out=2, r=2]
    let x = [[1.0f32, -2.0, 0.5], [0.0, 1.0, 3.0]];
    let scale = 16.0 / 2.0; // alpha 16, r 2

    let mut expected = [[0f32; 2]; 2];
    for t in 0..2 {
        let ax: Vec<f32> = (0..2).map(|k| (0..3).map(|i| a[k][i] * x[t][i]).sum()).collect();
        for o in 0..2 {
            let base: f32 = (0..3).map(|i| w[o][i] * x[t][i]).sum::<f32>() + bias[o];
            let delta: f32 = (0..2).map(|k| b[o][k] * ax[k]).sum();
            expected[t][o] = base + scale * delta;
        }
    }

    let mut layer = Linear::new(Tensor::new(&w, &DEV).unwrap(), Some(Tensor::new(&bias, &DEV).unwrap()));
    let adapter = LoraAdapter::new(
        Var::new(&a, &DEV).unwrap(),
        Var::new(&b, &DEV).unwrap(),
        LoraConfig::default().rank(2).alpha(16.0).scaling(),
        0.0,
    )
    .unwrap();
    layer.add_adapter("default", Box::new(adapter)).unwrap();
    let y = layer
        .forward(&Tensor::new(&x, &DEV).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for t in 0..2 {
        for o in 0..2 {
            assert!((y[t][o] - expected[t][o]).abs() < 1e-5, "{y:?} vs {expected:?}");
        }
    }
}

#[test]
fn scaling_follows_alpha_over_r_or_sqrt_r() {
    let config = LoraConfig::default().rank(16).alpha(32.0);
    assert_eq!(config.scaling(), 2.0);
    assert_eq!(config.rslora(true).scaling(), 8.0);
    let defaults = LoraConfig::default();
    assert_eq!(
        (defaults.ranks.r, defaults.ranks.alpha, defaults.lora_dropout),
        (8, 8.0, 0.0)
    );
    assert!(!defaults.use_rslora);
    assert_eq!(defaults.init_lora_weights, LoraInit::Default);
}

#[test]
fn default_init_gives_exactly_the_base_output() {
    let (mut net, _) = net();
    let base = net.forward(&ids()).unwrap();
    net.apply_lora(all_linear()).unwrap();
    let adapted = net.forward(&ids()).unwrap();
    assert_eq!(max_abs_diff(&base, &adapted), 0.0);
    // ...and the adapter is there: A is non-zero, B zero.
    let vars = net.named_trainable_vars();
    assert_eq!(vars.len(), 8);
    assert_eq!(vars[0].0, "blocks.0.up.lora_A.default.weight");
    assert_eq!(vars[0].1.dims(), [8, 4]);
    assert_eq!(vars[1].0, "blocks.0.up.lora_B.default.weight");
    assert_eq!(vars[1].1.dims(), [6, 8]);
    assert!(vars[0].1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    assert_eq!(
        vars[1].1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
}

#[test]
fn gaussian_init_has_std_one_over_r() {
    // candle's CPU draws cannot be seeded, so the statistics are taken over
    // enough draws that they cannot miss by chance: A is r x in = 4 x 4096,
    // n = 16384 draws of N(0, σ²), σ = 1/r = 0.25.
    // - The sample mean has std σ/√n = 0.25/128 ≈ 0.00195: the bound 0.015 is
    //   7.7 std (P(|N(0,1)| > 7.7) ≈ 1.4e-14).
    // - The sample std has std ≈ σ/√(2n) = 0.25/181 ≈ 0.00138: the bound 0.01
    //   around 0.25 is 7.2 std (≈ 6e-13).
    // - No draw beyond 8σ = 2.0: P(|N(0,1)| > 8) ≈ 1.2e-15, times n ≈ 2e-11.
    // (16 draws and a 0.2 bound on the mean, 3.2 std, failed about once in 700.)
    #[derive(Adaptable)]
    struct Wide {
        up: Linear,
    }
    let mut wide = Wide {
        up: Linear::new(Tensor::zeros((3, 4096), DType::F32, &DEV).unwrap(), None),
    };
    wide.apply_lora(LoraConfig::from(modules(["up"])).rank(4).init(LoraInit::Gaussian))
        .unwrap();
    let a = &wide.named_trainable_vars()[0].1;
    assert_eq!(a.dims(), [4, 4096]);
    let values: Vec<f64> = a
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(values.iter().all(|v| v.abs() < 8.0 * 0.25), "a draw beyond 8σ");
    assert!(mean.abs() < 0.015, "{mean}");
    assert!((std - 0.25).abs() < 0.01, "{std}");
    let b = &wide.named_trainable_vars()[1].1;
    assert_eq!(b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn gradients_reach_a_and_b_and_never_the_base_weight() {
    let (mut net, varmap) = net();
    net.apply_lora(random_lora(all_linear())).unwrap();
    let logits = net.forward(&ids()).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &ids().flatten_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in net.named_trainable_vars() {
        let grad = grads.get(&var).unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = grad.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
    let base = varmap.data().lock().unwrap();
    for name in ["blocks.0.up.weight", "blocks.0.up.bias", "blocks.1.down.weight"] {
        assert!(
            grads.get(&base[name]).is_none(),
            "the frozen {name} received a gradient"
        );
    }
}

#[test]
fn training_lowers_the_loss_and_leaves_the_base_unchanged() {
    let (mut net, varmap) = net();
    net.apply_lora(LoraConfig::from(all_linear()).rank(4).alpha(8.0))
        .unwrap();
    // How far 30 steps get depends on the starting point: what candle drew
    // (unseedable) is redrawn from a fixed seed, from the same distributions
    // (embedding N(0, 1), weights Kaiming normal N(0, 2/in), biases and
    // LoRA's A U(±1/√in); the LayerNorms' ones and zeros and B = 0 stay), so
    // every run trains from the same point.
    let mut rng = Rng(0x7a11);
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    for name in names {
        let var = varmap.data().lock().unwrap()[&name].clone();
        if name == "embed.weight" {
            rng.fill_randn(&var, 1.0);
        } else if name.ends_with(".weight") && !name.contains("norm") {
            rng.fill_randn(&var, (2.0 / var.dims()[1] as f64).sqrt());
        } else if name.ends_with(".bias") && !name.contains("norm") {
            // U(±1/√in): the layers with a bias (up, head) take 4 inputs.
            var.set(&rng.tensor(var.dims(), DType::F32).affine(0.5, 0.0).unwrap())
                .unwrap();
        }
    }
    for (name, var) in net.named_trainable_vars() {
        if name.contains("lora_A") {
            let values = rng
                .tensor(var.dims(), DType::F32)
                .affine(1.0 / (var.dims()[1] as f64).sqrt(), 0.0)
                .unwrap();
            var.set(&values).unwrap();
        }
    }
    let before: Vec<(String, Vec<f32>)> = {
        let data = varmap.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, var)| (k.clone(), var.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let ids = ids();
    let (inputs, targets) = (ids.narrow(1, 0, 4).unwrap(), ids.narrow(1, 1, 4).unwrap());
    let mut opt = AdamW::new(
        net.trainable_vars(),
        ParamsAdamW {
            lr: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    let loss_of = |net: &Net| {
        let logits = net.forward(&inputs).unwrap();
        candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &targets.flatten_all().unwrap()).unwrap()
    };
    let first = loss_of(&net).to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        opt.backward_step(&loss_of(&net)).unwrap();
    }
    let last = loss_of(&net).to_scalar::<f32>().unwrap();
    assert!(last < first * 0.8, "loss went from {first} to {last}");
    let data = varmap.data().lock().unwrap();
    for (name, values) in before {
        let now: Vec<f32> = data[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(now, values, "base tensor {name} changed during training");
    }
}

#[test]
fn merge_matches_unmerged_and_unmerge_restores_the_weights() {
    let (mut net, _) = net();
    let base_weights: Vec<Tensor> = net.layers().iter().map(|l| l.layer.weight().unwrap().clone()).collect();
    net.apply_lora(random_lora(all_linear())).unwrap();
    let adapted = net.forward(&ids()).unwrap();
    net.merge().unwrap();
    assert!(net
        .layers()
        .iter()
        .filter(|l| l.role == Role::Hidden)
        .all(|l| l.layer.is_merged()));
    let merged = net.forward(&ids()).unwrap();
    assert_close_relative(&adapted, &merged, 1e-5);
    // The merged weights really differ from the base.
    assert!(max_abs_diff(net.layers()[0].layer.weight().unwrap(), &base_weights[0]) > 1e-3);
    // Merging twice is refused (PEFT warns and does nothing) and changes nothing.
    assert!(
        matches!(net.merge(), Err(PeftError::NothingToMerge { .. })),
        "a second merge is an error"
    );
    assert_close_relative(&adapted, &net.forward(&ids()).unwrap(), 1e-5);

    net.unmerge().unwrap();
    for (layer, base) in net.layers().iter().zip(&base_weights) {
        assert!(
            max_abs_diff(layer.layer.weight().unwrap(), base) < 1e-6,
            "{}",
            layer.path
        );
    }
    assert_close_relative(&adapted, &net.forward(&ids()).unwrap(), 1e-5);
}

#[test]
fn merge_and_unload_leaves_plain_layers_with_the_adapted_output() {
    let (mut net, _) = net();
    net.apply_lora(random_lora(all_linear())).unwrap();
    let adapted = net.forward(&ids()).unwrap();
    net.merge_and_unload().unwrap();
    assert!(net.adapted_modules().is_empty());
    assert!(net.trainable_vars().is_empty());
    assert_close_relative(&adapted, &net.forward(&ids()).unwrap(), 1e-5);
}

#[test]
fn disabling_adapters_gives_the_base_output_even_when_merged() {
    let (mut net, _) = net();
    let base = net.forward(&ids()).unwrap();
    net.apply_lora(random_lora(all_linear())).unwrap();
    let adapted = net.forward(&ids()).unwrap();
    assert!(max_abs_diff(&base, &adapted) > 1e-3);
    net.merge().unwrap();
    net.disable_adapters().unwrap();
    assert_close_relative(&base, &net.forward(&ids()).unwrap(), 1e-5);
    net.enable_adapters();
    assert_close_relative(&adapted, &net.forward(&ids()).unwrap(), 1e-5);
}

#[test]
fn dropout_acts_only_in_training_mode() {
    let (mut net, _) = net();
    net.apply_lora(random_lora(all_linear()).dropout(0.5)).unwrap();
    let eval_a = net.forward(&ids()).unwrap();
    let eval_b = net.forward(&ids()).unwrap();
    assert_eq!(max_abs_diff(&eval_a, &eval_b), 0.0);
    net.set_training(true);
    let train = net.forward(&ids()).unwrap();
    assert!(max_abs_diff(&eval_a, &train) > 1e-4);
    net.set_training(false);
    assert_eq!(max_abs_diff(&eval_a, &net.forward(&ids()).unwrap()), 0.0);
}

#[test]
fn a_second_adapter_never_wraps_the_first() {
    let (mut net, _) = net();
    net.apply_lora(random_lora(all_linear())).unwrap();
    let first = net.forward(&ids()).unwrap();
    net.add_adapter("other", &random_lora(all_linear())).unwrap();
    assert_eq!(
        net.adapted_modules(),
        ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    );
    assert_eq!(net.adapter_names(), ["default", "other"]);
    let names: Vec<String> = net.named_trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 16);
    assert!(names
        .iter()
        .all(|n| !n.contains("lora_A.default.lora") && !n.contains("weight.lora")));
    assert_eq!(names[2], "blocks.0.up.lora_A.other.weight");
    // Both active: outputs add up, then each alone.
    let both = net.forward(&ids()).unwrap();
    assert!(max_abs_diff(&first, &both) > 1e-3);
    net.set_active_adapters(&["default"]).unwrap();
    assert_eq!(max_abs_diff(&first, &net.forward(&ids()).unwrap()), 0.0);
    net.delete_adapter("other").unwrap();
    assert_eq!(net.adapter_names(), ["default"]);
}

#[test]
fn parameter_summary_reads_like_peft() {
    let (mut net, _) = net();
    // embed 44, blocks 2 x (up 24 + 6, down 24, norm 4 + 4), head 44 + 11
    let base = 44 + 2 * (30 + 24 + 8) + 55;
    assert_eq!(
        net.num_parameters(),
        ParameterCount {
            trainable: 0,
            total: base
        }
    );
    net.apply_lora(LoraConfig::from(all_linear()).rank(2)).unwrap();
    // per block: up A 2x4 + B 6x2, down A 2x6 + B 4x2
    let lora = 2 * (8 + 12 + 12 + 8);
    let count = net.num_parameters();
    assert_eq!(
        count,
        ParameterCount {
            trainable: lora,
            total: base + lora
        }
    );
    assert_eq!(
        count.to_string(),
        format!(
            "trainable params: {lora} || all params: {} || trainable%: {:.4}",
            base + lora,
            100.0 * lora as f64 / (base + lora) as f64
        )
    );
    assert_eq!(
        ParameterCount {
            trainable: 1_234_567,
            total: 1_000_000_000
        }
        .to_string(),
        "trainable params: 1,234,567 || all params: 1,000,000,000 || trainable%: 0.1235"
    );
}

#[test]
fn invalid_configs_are_refused_before_touching_the_model() {
    let cases: [(LoraConfig, &str); 5] = [
        (LoraConfig::default().rank(0), "r"),
        (LoraConfig::default().alpha(0.0), "lora_alpha"),
        (LoraConfig::default().alpha(-1.0), "lora_alpha"),
        (LoraConfig::default().dropout(1.0), "lora_dropout"),
        (LoraConfig::default().dropout(-0.1), "lora_dropout"),
    ];
    for (config, expected_field) in cases {
        let (mut net, _) = net();
        match net.apply_lora(config) {
            Err(PeftError::InvalidConfig { field, .. }) => assert_eq!(field, expected_field),
            other => panic!("expected InvalidConfig for {expected_field}, got {other:?}"),
        }
        assert!(net.adapted_modules().is_empty());
    }
}

#[test]
fn failed_applications_leave_the_model_unchanged() {
    let (mut net, _) = net();
    assert!(matches!(
        net.apply_lora(modules(["nope"])),
        Err(PeftError::NoTargetMatched { .. })
    ));
    assert!(net.adapted_modules().is_empty());

    net.apply_lora(modules(["up"])).unwrap();
    // "default" already sits on blocks.0.up: the whole call is refused, so
    // blocks.0.down does not get one either.
    match net.apply_lora(modules(["down", "up"])) {
        Err(PeftError::AdapterExists { module, adapter }) => {
            assert_eq!((module.as_str(), adapter.as_str()), ("blocks.0.up", "default"));
        }
        other => panic!("expected AdapterExists, got {other:?}"),
    }
    assert_eq!(net.adapted_modules(), ["blocks.0.up", "blocks.1.up"]);
    assert!(matches!(
        net.delete_adapter("nope"),
        Err(PeftError::UnknownAdapter { .. })
    ));
    assert!(matches!(
        net.set_active_adapters(&["nope"]),
        Err(PeftError::UnknownAdapter { .. })
    ));
}

/// An adapter whose merge fails, to show that a failed merge changes no layer.
#[derive(Debug, Clone)]
struct Unmergeable;

impl Adapter for Unmergeable {
    fn peft_type(&self) -> &'static str {
        "TEST"
    }
    fn forward(&self, _: &Tensor, base_output: Tensor, _: ForwardContext<'_>) -> peft_core::Result<Tensor> {
        Ok(base_output)
    }
    fn merge(&self, _: &LayerWeights) -> peft_core::Result<LayerWeights> {
        Err(candle_core::Error::Msg("this adapter cannot merge".into()).into())
    }
    fn unmerge(&self, merged: &LayerWeights) -> peft_core::Result<LayerWeights> {
        Ok(merged.clone())
    }
    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        Vec::new()
    }
}

struct UnmergeableConfig(Targets);

impl AdapterConfig for UnmergeableConfig {
    fn peft_type(&self) -> &'static str {
        "TEST"
    }
    fn targets(&self) -> &Targets {
        &self.0
    }
    fn validate(&self) -> peft_core::Result<()> {
        Ok(())
    }
    fn new_adapter(&self, _: &str, _: &Linear) -> peft_core::Result<Box<dyn Adapter>> {
        Ok(Box::new(Unmergeable))
    }
}

#[test]
fn a_failed_merge_changes_no_layer() {
    let (mut net, _) = net();
    net.apply_lora(random_lora(all_linear())).unwrap();
    net.add_adapter("broken", &UnmergeableConfig(modules(["blocks.1.down"])))
        .unwrap();
    let before: Vec<Tensor> = net.layers().iter().map(|l| l.layer.weight().unwrap().clone()).collect();
    match net.merge() {
        Err(PeftError::Module { module, cause: source }) => {
            assert_eq!(module, "blocks.1.down");
            assert!(source.to_string().contains("cannot merge"));
        }
        other => panic!("expected a module error, got {other:?}"),
    }
    for (layer, weight) in net.layers().iter().zip(&before) {
        assert!(!layer.layer.is_merged(), "{} was merged", layer.path);
        assert_eq!(max_abs_diff(layer.layer.weight().unwrap(), weight), 0.0);
    }
}

#[test]
fn without_adapters_the_slot_is_candle_nn_linear() {
    let w = Tensor::randn(0f32, 1.0, (5, 3), &DEV).unwrap();
    let b = Tensor::randn(0f32, 1.0, 5, &DEV).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 3), &DEV).unwrap();
    let ours = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
    let theirs = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
    assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
    assert_eq!(ours.dims(), [2, 4, 5]);
    let last: Vec<f32> = ours.max(D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(last.len(), 8);
}

/// candle-nn's fused RmsNorm has no backward pass: `missing_gradients` names
/// the adapters it cuts off, and `forward_diff` restores them.
#[test]
fn missing_gradients_finds_adapters_cut_off_by_a_non_differentiable_op() {
    #[derive(Adaptable)]
    struct Normed {
        first: Linear,
        norm: candle_nn::RmsNorm,
        #[output_head]
        head: Linear,
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let mut model = Normed {
        first: linear(4, 4, vb.pp("first")).unwrap(),
        norm: candle_nn::rms_norm(4, 1e-6, vb.pp("norm")).unwrap(),
        head: linear(4, 3, vb.pp("head")).unwrap(),
    };
    model.apply_lora(random_lora(all_linear())).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4), &DEV).unwrap();
    let loss_with = |differentiable: bool| {
        let h = model.first.forward(&x).unwrap();
        let h = if differentiable {
            model.norm.forward_diff(&h)
        } else {
            model.norm.forward(&h)
        }
        .unwrap();
        model.head.forward(&h).unwrap().sqr().unwrap().sum_all().unwrap()
    };
    let grads = loss_with(false).backward().unwrap();
    assert_eq!(
        model.missing_gradients(&grads).unwrap(),
        ["first.lora_A.default.weight", "first.lora_B.default.weight"]
    );
    let grads = loss_with(true).backward().unwrap();
    assert!(model.missing_gradients(&grads).unwrap().is_empty());
}
