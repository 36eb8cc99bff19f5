//! Parsing of `#[adapt(...)]` and `#[output_head]`.

use proc_macro2::Span;
use syn::{spanned::Spanned, Attribute, LitStr, Meta};

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
                    set_flag(cx, &mut out.output_head, key.span(), "output_head");
                } else if key.is_ident("skip") {
                    set_flag(cx, &mut out.skip, key.span(), "skip");
                } else if key.is_ident("rename") {
                    let value: LitStr = meta.value()?.parse()?;
                    if value.value().is_empty() {
                        cx.error_spanned_by(&value, "`rename` needs a non-empty path segment");
                    }
                    if out.rename.is_some() {
                        cx.error_spanned_by(&key, "duplicate `adapt` attribute key `rename`");
                    } else {
                        out.rename = Some(value);
                    }
                } else {
                    let name = key.get_ident().map_or_else(|| "?".to_owned(), ToString::to_string);
                    return Err(meta.error(format_args!(
                        "unknown `adapt` attribute key `{name}` on a field; expected `output_head`, `skip` or `rename = \"...\"`"
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
                        cx.error_spanned_by(&meta.path, "duplicate `adapt` attribute key `crate`");
                    } else {
                        out.krate = Some(path);
                    }
                    Ok(())
                } else {
                    let name = meta
                        .path
                        .get_ident()
                        .map_or_else(|| "?".to_owned(), ToString::to_string);
                    Err(meta.error(format_args!(
                        "unknown `adapt` attribute key `{name}` on a type; expected `crate = \"...\"`"
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
