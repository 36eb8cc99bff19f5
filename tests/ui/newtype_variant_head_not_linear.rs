use peft_core::prelude::*;

#[derive(Adaptable)]
enum Head {
    Tied(#[output_head] candle_nn::Embedding),
    Untied(#[output_head] Linear),
}

fn main() {}
