//! Two registrations of one `peft_type` are an error, not a coin toss over
//! inventory's unspecified order. (A test binary of its own: the duplicate
//! would break every other test in the same binary.)

use std::path::Path;

use peft_core::{AdapterConfig, PeftError};

fn refuse(_: &str, _: &Path) -> peft_core::Result<Box<dyn AdapterConfig>> {
    unreachable!("a duplicate kind is never used")
}

peft_core::register_adapter_kind!("LORA", refuse);

#[test]
fn a_duplicate_registration_is_reported() {
    match peft_core::adapter_kinds() {
        Err(PeftError::DuplicateAdapterKind { peft_type }) => assert_eq!(peft_type, "LORA"),
        other => panic!("expected DuplicateAdapterKind, got {other:?}"),
    }
    assert!(matches!(
        peft_core::adapter_kind("LORA"),
        Err(PeftError::DuplicateAdapterKind { .. })
    ));
}
