//! QLoRA: LoRA trained over quantized base weights. The gradient must reach
//! the adapters of the first block through the quantized layers above it,
//! and match (within quantization error) the same model with the base
//! dequantized to f32.

use candle_core::quantized::{GgmlDType, QTensor};
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use peft_core::prelude::*;
use peft_core::PeftError;

mod support;
use support::max_abs;
use support::rng::Rng;

const DEV: Device = Device::Cpu;
const VOCAB: usize = 32;
const HIDDEN: usize = 64;
const INNER: usize = 128;

#[derive(Adaptable)]
struct Block {
    up: Linear,
    down: Linear,
}

#[derive(Adaptable)]
struct Net {
    embed: candle_nn::Embedding,
    blocks: Vec<Block>,
    #[output_head]
    head: Linear,
}

impl Net {
    fn forward(&self, ids: &Tensor) -> Tensor {
        let mut x = self.embed.forward(ids).unwrap();
        for block in &self.blocks {
            let h = block.up.forward(&x).unwrap().gelu().unwrap();
            x = (&x + block.down.forward(&h).unwrap()).unwrap();
        }
        self.head.forward(&x).unwrap()
    }

    fn loss(&self, ids: &Tensor) -> Tensor {
        let t = ids.dim(1).unwrap();
        let logits = self.forward(&ids.narrow(1, 0, t - 1).unwrap());
        let targets = ids.narrow(1, 1, t - 1).unwrap();
        candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &targets.flatten_all().unwrap()).unwrap()
    }
}

/// Random dense weights for every linear layer, `[out, in]`, in field order,
/// N(0, 1/in) drawn from a fixed seed (candle's CPU draws cannot be seeded):
/// the same on every run, so the bounds below cannot fail by chance.
fn dense_weights(rng: &mut Rng) -> Vec<Tensor> {
    let shapes = [
        (INNER, HIDDEN),
        (HIDDEN, INNER),
        (INNER, HIDDEN),
        (HIDDEN, INNER),
        (VOCAB, HIDDEN),
    ];
    shapes
        .iter()
        .map(|&(out, inp)| rng.randn(&[out, inp], (1.0 / inp as f64).sqrt()))
        .collect()
}

/// The same model twice: with quantized base weights, and with those
/// weights dequantized to f32.
fn twins(dtype: GgmlDType) -> (Net, Net) {
    let mut rng = Rng(0x9_1024);
    let embed = rng.randn(&[VOCAB, HIDDEN], 1.0);
    let quantized: Vec<Arc<QTensor>> = dense_weights(&mut rng)
        .iter()
        .map(|w| Arc::new(QTensor::quantize(w, dtype).unwrap()))
        .collect();
    let build = |layer: &dyn Fn(usize) -> Linear| Net {
        embed: candle_nn::Embedding::new(embed.clone(), HIDDEN),
        blocks: (0..2)
            .map(|b| Block {
                up: layer(2 * b),
                down: layer(2 * b + 1),
            })
            .collect(),
        head: layer(4),
    };
    let q = build(&|i| Linear::from_qtensor(quantized[i].clone(), None).unwrap());
    let f = build(&|i| Linear::new(quantized[i].dequantize(&DEV).unwrap(), None));
    (q, f)
}

fn ids() -> Tensor {
    let ids: Vec<u32> = (0..4 * 12).map(|i| ((i * 7 + i / 12) % VOCAB) as u32).collect();
    Tensor::from_vec(ids, (4, 12), &DEV).unwrap()
}

#[test]
fn gradients_reach_the_first_block_and_match_the_dequantized_model() {
    let (mut quantized, mut dense) = twins(GgmlDType::Q8_0);
    assert!(quantized.layers().iter().all(|l| l.layer.is_quantized()));
    let config = LoraConfig::from(all_linear()).rank(4).alpha(8.0).init(LoraInit::Random);
    // all_linear() covers quantized layers like any other.
    assert_eq!(quantized.targeted_modules(&all_linear()).unwrap().len(), 4);
    quantized.apply_lora(config.clone()).unwrap();
    dense.apply_lora(config).unwrap();
    // The adapters' random init redrawn from a fixed seed, U(±1/√in) as
    // LoraInit::Random draws them: the gradient bound holds on every run.
    let mut rng = Rng(0x9_0a0b);
    for (_, var) in quantized.named_trainable_vars() {
        rng.fill_fan_in_uniform(&var);
    }
    for ((_, q), (_, f)) in quantized
        .named_trainable_vars()
        .iter()
        .zip(dense.named_trainable_vars())
    {
        f.set(q.as_tensor()).unwrap();
    }

    let (gq, gf) = (
        quantized.loss(&ids()).backward().unwrap(),
        dense.loss(&ids()).backward().unwrap(),
    );
    let mut first_block = 0;
    for ((name, q), (_, f)) in quantized
        .named_trainable_vars()
        .iter()
        .zip(dense.named_trainable_vars())
    {
        let (gq, gf) = (gq.get(q).unwrap(), gf.get(&f).unwrap());
        let norm = max_abs(gf);
        assert!(max_abs(gq) > 0.0, "no gradient reached {name}");
        let rel = max_abs(&(gq - gf).unwrap()) / norm;
        assert!(rel < 5e-2, "{name}: relative gradient difference {rel}");
        first_block += usize::from(name.starts_with("blocks.0."));
    }
    assert_eq!(first_block, 4, "lora_A and lora_B of blocks.0.up and blocks.0.down");
}

#[test]
fn a_few_adamw_steps_lower_the_loss_over_a_4_bit_base() {
    let (mut model, _) = twins(GgmlDType::Q4_0);
    model
        .apply_lora(LoraConfig::from(all_linear()).rank(8).alpha(16.0))
        .unwrap();
    // LoRA's A redrawn from a fixed seed, U(±1/√in) as the default init draws
    // it (B stays 0): 20 steps start from the same point on every run.
    let mut rng = Rng(0x9_0a0c);
    for (name, var) in model.named_trainable_vars() {
        if name.contains("lora_A") {
            rng.fill_fan_in_uniform(&var);
        }
    }
    let mut opt = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let first = model.loss(&ids()).to_scalar::<f32>().unwrap();
    for _ in 0..20 {
        opt.backward_step(&model.loss(&ids())).unwrap();
    }
    let last = model.loss(&ids()).to_scalar::<f32>().unwrap();
    assert!(last < 0.8 * first, "loss went from {first} to {last}");
    // The base stayed quantized.
    assert!(model.layers().iter().all(|l| l.layer.is_quantized()));
}

#[test]
fn merging_into_a_quantized_base_is_refused_and_changes_nothing() {
    let (mut model, _) = twins(GgmlDType::Q8_0);
    model
        .apply_lora(LoraConfig::from(all_linear()).init(LoraInit::Random))
        .unwrap();
    let before = model.forward(&ids());
    match model.merge() {
        Err(PeftError::MergeState { module, reason }) => {
            assert_eq!(module, "blocks.0.up");
            assert!(reason.contains("quantized base weight"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(model.layers().iter().all(|l| !l.layer.is_merged()));
    assert_eq!(max_abs(&(model.forward(&ids()) - before).unwrap()), 0.0);
    // Parameter counts see through the quantization.
    let count = model.num_parameters();
    assert_eq!(
        count.total - count.trainable,
        VOCAB * HIDDEN + 4 * HIDDEN * INNER + VOCAB * HIDDEN
    );
}

/// Every adapter kind trains over a quantized base: each gets gradients in
/// the first block, through the quantized layers above it.
#[test]
fn every_adapter_kind_trains_over_a_quantized_base() {
    use peft_core::{AdapterConfig, Ia3Config, LohaConfig, LokrConfig};
    let configs: Vec<(&str, Box<dyn AdapterConfig>)> = vec![
        ("LoRA", Box::new(LoraConfig::from(all_linear()).init(LoraInit::Random))),
        (
            "DoRA",
            Box::new(LoraConfig::from(all_linear()).init(LoraInit::Random).dora(true)),
        ),
        (
            "IA3",
            Box::new(Ia3Config::from(all_linear()).feedforward_modules(["down"])),
        ),
        ("LoHa", Box::new(LohaConfig::from(all_linear()).init_weights(false))),
        (
            "LoKr",
            Box::new(LokrConfig::from(all_linear()).init(peft_core::LokrInit::Random)),
        ),
    ];
    for (kind, config) in configs {
        let (mut model, _) = twins(GgmlDType::Q8_0);
        model.add_adapter("default", config.as_ref()).unwrap();
        let grads = model.loss(&ids()).backward().unwrap();
        let first_block: Vec<(String, f32)> = model
            .named_trainable_vars()
            .into_iter()
            .filter(|(name, _)| name.starts_with("blocks.0."))
            .map(|(name, var)| {
                let grad = grads.get(&var).map_or(0.0, max_abs);
                (name, grad)
            })
            .collect();
        assert!(!first_block.is_empty(), "{kind}");
        assert!(
            first_block.iter().all(|(_, g)| *g > 0.0),
            "{kind}: adapters of the first block without gradient: {first_block:?}"
        );
    }
}
