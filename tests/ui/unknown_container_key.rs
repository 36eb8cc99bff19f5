use peft_core::prelude::*;

#[derive(Adaptable)]
#[adapt(skip)]
struct Model {
    hidden: Linear,
}

fn main() {}
