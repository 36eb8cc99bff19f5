use peft_core::prelude::*;

#[derive(Adaptable)]
union Weights {
    a: u32,
    b: f32,
}

fn main() {}
