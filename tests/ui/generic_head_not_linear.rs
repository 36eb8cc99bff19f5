use candle_core::{DType, Device, Tensor};
use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model<H> {
    hidden: Linear,
    #[output_head]
    head: H,
}

fn count<M: PeftModel>(model: &M) -> usize {
    model.layers().len()
}

fn main() {
    let table = || Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let model = Model {
        hidden: Linear::new(table(), None),
        head: candle_nn::Embedding::new(table(), 2),
    };
    let _ = count(&model);
}
