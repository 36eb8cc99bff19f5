// Three different mistakes in one struct: all three are reported in one
// compile, and uses of the type add no error of their own (the derive emits a
// stub impl beside its errors).
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(frobnicate)]
    hidden: Linear,
    #[output_head]
    lm_head: Linear,
    #[output_head]
    cls_head: Linear,
    #[adapt(skip, skip)]
    cache: Vec<f32>,
}

fn layer() -> Linear {
    linear_no_bias(1, 1, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap()
}

fn count<M: PeftModel>(model: &M) -> usize {
    model.layers().len()
}

fn main() {
    let mut model = Model {
        hidden: layer(),
        lm_head: layer(),
        cls_head: layer(),
        cache: Vec::new(),
    };
    let _ = PeftModel::layers(&model);
    let _ = count(&model);
    let _ = model.apply_lora(all_linear());
}
