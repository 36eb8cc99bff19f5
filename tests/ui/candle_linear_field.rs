use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    q_proj: candle_nn::Linear,
    #[output_head]
    lm_head: Linear,
}

fn main() {}
