use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    hidden: Linear,
    #[adapt(skip, output_head)]
    lm_head: Linear,
}

fn main() {}
