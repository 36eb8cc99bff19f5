//! `#[derive(Adaptable)]` for peft-core. Use it through `peft_core`, which
//! re-exports it.
//!
//! The derive runs in stages, as serde_derive does:
//! `attr` parses `#[adapt(...)]` and `#[output_head]`, `ast` builds a model
//! of the input that borrows from it, `check` applies the rules that span
//! several fields, and `expand` writes the impl. Errors from every stage are
//! collected in a `ctxt::Ctxt` and reported together, beside a stub impl so
//! that one mistake gives one message.

extern crate proc_macro;

mod ast;
mod attr;
mod bound;
mod check;
mod ctxt;
mod expand;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Implements `peft_core::Adaptable`: a typed walk over the struct's or enum's
/// fields that reports every linear layer with its dotted path.
///
/// Field attributes: `#[output_head]` (or `#[adapt(output_head)]`) marks the
/// layer `all_linear()` leaves alone; `#[adapt(skip)]` leaves a field out of
/// the walk; `#[adapt(rename = "h")]` sets the field's path segment.
/// Container attribute: `#[adapt(crate = "path")]` names the peft-core crate
/// when it is re-exported under another path.
#[proc_macro_derive(Adaptable, attributes(adapt, output_head))]
pub fn derive_adaptable(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}
