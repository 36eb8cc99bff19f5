use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    hidden: Linear,
    #[output_head(x)]
    lm_head: Linear,
}

fn main() {}
