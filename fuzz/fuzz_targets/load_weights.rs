//! Adapter loading with a known-good config and arbitrary safetensors bytes:
//! the first byte picks the config from `peft_fuzz::cases()` (and, shifted
//! right by 4, the flag bits of `load_adapter`), the rest is the weights
//! file. With the config fixed, every mutation lands in the safetensors
//! header, the tensor data and the key/shape checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, weights)) = data.split_first() else {
        return;
    };
    let cases = peft_fuzz::cases();
    let case = &cases[usize::from(selector & 0x0f) % cases.len()];
    peft_fuzz::exercise_load(selector >> 4, &case.config, weights);
});
