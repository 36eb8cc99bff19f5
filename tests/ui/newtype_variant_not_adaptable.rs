use peft_core::prelude::*;

struct GatedMlp {
    gate: Linear,
}

// A newtype variant is visited without a path segment of its own; its field
// must still be adaptable, and the error must point at it.
#[derive(Adaptable)]
enum Mlp {
    Gated(GatedMlp),
    Plain { fc: Linear },
}

fn main() {}
