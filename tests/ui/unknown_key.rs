use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(frobnicate)]
    hidden: Linear,
}

fn main() {}
