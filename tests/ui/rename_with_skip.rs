use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(skip, rename = "cache")]
    kv: Vec<f32>,
    hidden: Linear,
}

fn main() {}
