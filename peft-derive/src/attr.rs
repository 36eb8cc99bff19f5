//! Parsing of `#[adapt(...)]` and `#[output_head]`.

use proc_macro2::Span;
use syn::{meta::ParseNestedMeta, spanned::Spanned, Attribute, LitStr, Meta, Token};

use crate::ctxt::Ctxt;

/// A flag set by an attribute, with where it was set.
pub type Flag = Option<Span>;

/// Attributes on a field.
#[derive(Default)]
pub struct FieldAttrs {
    /// `#[output_head]` or `#[adapt(output_head)]`.
    pub output_head: Flag,
    /// `#[adapt(skip)]`.
    pub skip: Flag,
    /// `#[adapt(rename = "...")]`.
    pub rename: Option<LitStr>,
}

/// Attributes on the struct or enum.
#[derive(Default)]
pub struct ContainerAttrs {
    /// `#[adapt(crate = "path")]`.
    pub krate: Option<syn::Path>,
}

impl FieldAttrs {
    pub fn parse(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = FieldAttrs::default();
        for attr in attrs {
            if attr.path().is_ident("output_head") {
                if let Meta::Path(_) = &attr.meta {
                    set_flag(cx, &mut out.output_head, attr.path().span(), "output_head");
                } else {
                    cx.error_spanned_by(&attr.meta, "`#[output_head]` takes no arguments");
                }
                continue;
            }
            if !attr.path().is_ident("adapt") {
                continue;
            }
            let result = attr.parse_nested_meta(|meta| {
                let key = meta.path.clone();
                if key.is_ident("output_head") {
                    no_value(&meta, "output_head")?;
                    set_flag(cx, &mut out.output_head, key.span(), "output_head");
                } else if key.is_ident("skip") {
                    no_value(&meta, "skip")?;
                    set_flag(cx, &mut out.skip, key.span(), "skip");
                } else if key.is_ident("rename") {
                    if !meta.input.peek(Token![=]) {
                        return Err(meta.error("expected `rename = \"...\"`"));
                    }
                    let value: LitStr = meta.value()?.parse()?;
                    if value.value().is_empty() {
                        cx.error_spanned_by(&value, "`rename` needs a non-empty path segment");
                    }
                    if out.rename.is_some() {
                        cx.error_spanned_by(&key, "duplicate attribute `rename` on this field");
                    } else {
                        out.rename = Some(value);
                    }
                } else {
                    return Err(meta.error(format_args!(
                        "unknown `adapt` attribute key `{}` on a field; expected `output_head`, `skip` or `rename = \"...\"`",
                        path_text(&key)
                    )));
                }
                Ok(())
            });
            if let Err(error) = result {
                cx.push(error);
            }
        }
        out
    }
}

impl ContainerAttrs {
    pub fn parse(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = ContainerAttrs::default();
        for attr in attrs {
            if attr.path().is_ident("output_head") {
                cx.error_spanned_by(attr, "`#[output_head]` goes on a field, not on the type");
                continue;
            }
            if !attr.path().is_ident("adapt") {
                continue;
            }
            let result = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("crate") {
                    let value: LitStr = meta.value()?.parse()?;
                    let path: syn::Path = value.parse()?;
                    if out.krate.is_some() {
                        cx.error_spanned_by(&meta.path, "duplicate attribute `crate` on this type");
                    } else {
                        out.krate = Some(path);
                    }
                    Ok(())
                } else {
                    Err(meta.error(format_args!(
                        "unknown `adapt` attribute key `{}` on a type; expected `crate = \"...\"`",
                        path_text(&meta.path)
                    )))
                }
            });
            if let Err(error) = result {
                cx.push(error);
            }
        }
        out
    }
}

/// A flag is written bare: `skip`, not `skip = true` or `skip(...)`.
fn no_value(meta: &ParseNestedMeta, name: &str) -> syn::Result<()> {
    if meta.input.peek(Token![=]) || meta.input.peek(syn::token::Paren) {
        return Err(meta.error(format_args!("`{name}` takes no value; write `#[adapt({name})]`")));
    }
    Ok(())
}

/// `serde::skip` as written, for error messages.
fn path_text(path: &syn::Path) -> String {
    path.segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

fn set_flag(cx: &mut Ctxt, flag: &mut Flag, span: Span, name: &str) {
    if flag.is_some() {
        cx.push(syn::Error::new(
            span,
            format_args!("duplicate attribute `{name}` on this field"),
        ));
    } else {
        *flag = Some(span);
    }
}
