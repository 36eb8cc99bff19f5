use peft_core::prelude::*;

#[derive(Adaptable)]
struct Model {
    #[adapt(rename = "")]
    hidden: Linear,
}

fn main() {}
