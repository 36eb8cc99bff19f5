use std::collections::HashMap;

use peft_core::prelude::*;

// A field of a type that is not a module: the error says how to fix it, and
// does not talk about `candle_nn::Linear`, which this field is not.
#[derive(Adaptable)]
struct Model {
    vocab: HashMap<String, u32>,
    #[output_head]
    lm_head: Linear,
}

fn main() {}
