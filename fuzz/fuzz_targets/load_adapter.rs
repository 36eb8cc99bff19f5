//! Adapter loading from arbitrary bytes: a flag byte, a config text and
//! safetensors bytes (the format is `peft_fuzz::LoadInput`), loaded with
//! `PeftModel::load_adapter_from_bytes` onto the fuzz model. A failed load
//! must leave the model unchanged; a loaded adapter must run, merge, unmerge
//! and delete (see `peft_fuzz::exercise_load`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_fuzz::LoadInput;

fuzz_target!(|data: &[u8]| {
    if let Some(input) = LoadInput::parse(data) {
        peft_fuzz::exercise_load(input.flags, &input.config, input.weights);
    }
});
