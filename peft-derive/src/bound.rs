//! Which type parameters need an `Adaptable` bound: those that appear in the
//! type of a visited field. `PhantomData<T>` does not count, and neither does a
//! parameter used only by skipped fields.

use std::collections::BTreeSet;

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::{GenericArgument, Ident, PathArguments, ReturnType, Type};

/// Adds to `used` every name of `params` that `ty` mentions.
pub fn collect_params(ty: &Type, params: &[&Ident], used: &mut BTreeSet<String>) {
    match ty {
        Type::Path(path) => {
            if let Some(qself) = &path.qself {
                collect_params(&qself.ty, params, used);
            }
            let segments = &path.path.segments;
            if path.qself.is_none() && path.path.leading_colon.is_none() {
                if let Some(first) = segments.first() {
                    // `T` or `T::Assoc`.
                    if params.iter().any(|p| first.ident == **p) {
                        used.insert(first.ident.to_string());
                    }
                }
            }
            for segment in segments {
                if segment.ident == "PhantomData" {
                    continue;
                }
                match &segment.arguments {
                    PathArguments::AngleBracketed(args) => {
                        for arg in &args.args {
                            match arg {
                                GenericArgument::Type(ty) => collect_params(ty, params, used),
                                GenericArgument::AssocType(assoc) => collect_params(&assoc.ty, params, used),
                                other => scan_tokens(other.to_token_stream(), params, used),
                            }
                        }
                    }
                    PathArguments::Parenthesized(args) => {
                        for input in &args.inputs {
                            collect_params(input, params, used);
                        }
                        if let ReturnType::Type(_, output) = &args.output {
                            collect_params(output, params, used);
                        }
                    }
                    PathArguments::None => {}
                }
            }
        }
        Type::Reference(r) => collect_params(&r.elem, params, used),
        Type::Array(a) => collect_params(&a.elem, params, used),
        Type::Slice(s) => collect_params(&s.elem, params, used),
        Type::Ptr(p) => collect_params(&p.elem, params, used),
        Type::Paren(p) => collect_params(&p.elem, params, used),
        Type::Group(g) => collect_params(&g.elem, params, used),
        Type::Tuple(t) => {
            for elem in &t.elems {
                collect_params(elem, params, used);
            }
        }
        other => scan_tokens(other.to_token_stream(), params, used),
    }
}

/// Conservative fallback for types not modelled above (trait objects, macros).
fn scan_tokens(tokens: TokenStream, params: &[&Ident], used: &mut BTreeSet<String>) {
    for tree in tokens {
        match tree {
            TokenTree::Ident(ident) if params.iter().any(|p| ident == **p) => {
                used.insert(ident.to_string());
            }
            TokenTree::Group(group) => scan_tokens(group.stream(), params, used),
            _ => {}
        }
    }
}
