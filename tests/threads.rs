//! A model serves many threads: `Send + Sync`, and the same output from 8
//! threads at once as from one (the fused kernels split work over rayon's
//! threads from inside each call).
//!
//! Switching adapters needs `&mut self` (`set_active_adapters`, `merge`, ...),
//! so it cannot happen while an `Arc`-shared model runs forward passes: the
//! borrow checker rules it out, no lock is needed.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use peft_core::ops;
use peft_core::prelude::*;

#[derive(Adaptable)]
struct Block {
    norm: candle_nn::RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    #[output_head]
    head: Linear,
}

impl Block {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: candle_nn::rms_norm(64, 1e-6, vb.pp("norm"))?,
            gate: linear_no_bias(64, 160, vb.pp("gate"))?,
            up: linear_no_bias(64, 160, vb.pp("up"))?,
            down: linear(160, 64, vb.pp("down"))?,
            head: linear_no_bias(64, 96, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = ops::rms_norm(x, self.norm.weight(), self.norm.eps())?;
        let hidden = ops::silu_mul(&self.gate.forward(&h)?, &self.up.forward(&h)?)?;
        let y = (x + self.down.forward(&hidden)?)?;
        ops::softmax_last_dim(&self.head.forward(&y)?)
    }
}

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn eight_threads_get_exactly_the_single_thread_result() {
    assert_send_sync::<Block>();
    let varmap = VarMap::new();
    let mut model = Block::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    model
        .apply_lora(LoraConfig::from(all_linear()).rank(8).init(LoraInit::Random))
        .unwrap();
    model
        .add_adapter(
            "second",
            &LoraConfig::from(modules(["up"])).rank(4).init(LoraInit::Random),
        )
        .unwrap();
    model.set_active_adapters(&["default", "second"]).unwrap();

    let inputs: Vec<Tensor> = (0..8)
        .map(|i| Tensor::randn(0f32, 1.0, (2, 40 + i, 64), &Device::Cpu).unwrap())
        .collect();
    let expected: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| model.forward(x).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect();

    let model = Arc::new(model);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (model, x, expected) = (Arc::clone(&model), inputs[i].clone(), expected[i].clone());
            std::thread::spawn(move || {
                for pass in 0..100 {
                    let y: Vec<f32> = model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    assert!(
                        y == expected,
                        "thread {i}, pass {pass}: output differs from the single-thread one"
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a forward thread panicked");
    }
}
