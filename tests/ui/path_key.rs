use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(serde::skip)]
    body: Linear,
}

fn main() {}
