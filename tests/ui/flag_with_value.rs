use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(skip = true)]
    cache: Vec<u8>,
    body: Linear,
}

fn main() {}
