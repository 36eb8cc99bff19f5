//! `adapter_config.json` from arbitrary bytes: parsing and validating must
//! never panic, and a valid config must resolve, build its adapters and read
//! back unchanged from the config saving would write (see
//! `peft_fuzz::exercise_config`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        peft_fuzz::exercise_config(text);
    }
});
