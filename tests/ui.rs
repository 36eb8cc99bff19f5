//! Compile-fail tests for `#[derive(Adaptable)]`: every mistake gets a message
//! that names the fix and points at the offending token.
//!
//! Regenerate the expected output with `TRYBUILD=overwrite cargo test --test ui`
//! and read every changed `.stderr` before committing it.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
