use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(rename)]
    body: Linear,
}

fn main() {}
