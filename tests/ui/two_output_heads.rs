use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    hidden: Linear,
    #[output_head]
    lm_head: Linear,
    #[output_head]
    cls_head: Linear,
}

fn main() {}
