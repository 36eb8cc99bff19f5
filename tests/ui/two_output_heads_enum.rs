use peft_core::prelude::*;

// One head per variant is fine; two in the same variant are not.
#[derive(Adaptable)]
enum Head {
    Tied {
        #[output_head]
        lm_head: Linear,
    },
    Split(#[output_head] Linear, #[adapt(output_head)] Linear),
}

fn main() {}
