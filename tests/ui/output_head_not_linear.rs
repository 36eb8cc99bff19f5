use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    hidden: Linear,
    #[output_head]
    embed: candle_nn::Embedding,
}

fn main() {}
