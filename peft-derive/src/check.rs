//! Rules that involve more than one attribute or field.

use crate::ast::{Container, Data, Field};
use crate::ctxt::Ctxt;

pub fn check(cx: &mut Ctxt, container: &Container) {
    match &container.data {
        Data::Struct(fields) => check_fields(cx, fields, "struct"),
        Data::Enum(variants) => {
            for variant in variants {
                check_fields(cx, &variant.fields, "variant");
            }
        }
    }
}

fn check_fields(cx: &mut Ctxt, fields: &[Field], scope: &str) {
    let mut head_seen = false;
    for field in fields {
        let attrs = &field.attrs;
        if let Some(span) = attrs.output_head {
            if head_seen {
                cx.push(syn::Error::new(
                    span,
                    format_args!("more than one `#[output_head]` in this {scope}; a model has one output head"),
                ));
            }
            head_seen = true;
        }
        if let Some(skip) = attrs.skip {
            if attrs.output_head.is_some() {
                cx.push(syn::Error::new(
                    skip,
                    "`skip` cannot be combined with `output_head`: the head must be visited",
                ));
            }
            if let Some(rename) = &attrs.rename {
                cx.error_spanned_by(rename, "`rename` has no effect on a field marked `skip`");
            }
        }
    }
}
