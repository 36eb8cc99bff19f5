use peft_core::prelude::*;

struct Attention {
    q_proj: Linear,
}

#[derive(Adaptable)]
struct Block {
    attn: Attention,
    mlp: Linear,
}

fn main() {}
