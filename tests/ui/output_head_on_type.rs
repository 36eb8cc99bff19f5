use peft_core::prelude::*;

#[derive(Adaptable)]
#[output_head]
struct Model {
    hidden: Linear,
}

fn main() {}
