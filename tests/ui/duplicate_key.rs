use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(skip, skip)]
    cache: Vec<f32>,
    #[adapt(rename = "a", rename = "b")]
    hidden: Linear,
}

fn main() {}
