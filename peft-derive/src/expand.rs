//! Code generation: the `Adaptable` impl, or a stub beside the errors.

use std::collections::BTreeSet;

use proc_macro2::{Group, Ident, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::{parse_quote, spanned::Spanned, DeriveInput, Generics, Path, WherePredicate};

use crate::ast::{Container, Data, Field, Segment};
use crate::bound::collect_params;
use crate::check;
use crate::ctxt::Ctxt;

pub fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let container = Container::from_ast(&mut cx, input);
    if let Some(container) = &container {
        check::check(&mut cx, container);
    }
    let krate: Path = container
        .as_ref()
        .and_then(|c| c.attrs.krate.clone())
        .unwrap_or_else(|| parse_quote!(::peft_core));
    match (cx.check(), container) {
        (Ok(()), Some(container)) => expand(&container, &krate),
        (Err(errors), _) => {
            // The stub keeps uses of the type from adding errors of their own.
            let stub = impl_block(input, &input.generics, &krate, quote!(), quote!());
            let errors = errors.to_compile_error();
            quote!(#stub #errors)
        }
        (Ok(()), None) => unreachable!("a container that failed to build records an error"),
    }
}

fn expand(container: &Container, krate: &Path) -> TokenStream {
    let generics = with_bounds(container, krate);
    let (body, body_mut) = match &container.data {
        Data::Struct(fields) => (
            struct_body(fields, krate, Mode::Shared),
            struct_body(fields, krate, Mode::Mut),
        ),
        Data::Enum(variants) => {
            let arms = |mode| {
                variants.iter().map(move |variant| {
                    let ident = variant.ident;
                    let (pattern, calls) = destructure(&variant.fields, krate, mode);
                    quote!(Self::#ident #pattern => { #calls })
                })
            };
            if variants.is_empty() {
                // An uninhabited enum: `self` cannot exist.
                (quote!(match *self {}), quote!(match *self {}))
            } else {
                let (shared, mutable) = (arms(Mode::Shared), arms(Mode::Mut));
                (
                    quote!(match self { #(#shared,)* }),
                    quote!(match self { #(#mutable,)* }),
                )
            }
        }
    };
    impl_block(container.original, &generics, krate, body, body_mut)
}

fn impl_block(
    input: &DeriveInput,
    generics: &Generics,
    krate: &Path,
    body: TokenStream,
    body_mut: TokenStream,
) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #impl_generics #krate::__private::Adaptable for #ident #ty_generics #where_clause {
                fn visit<'__a, __V: #krate::__private::Visitor<'__a> + ?::core::marker::Sized>(
                    &'__a self,
                    __path: &mut #krate::__private::ModulePath,
                    __visitor: &mut __V,
                ) {
                    #body
                }

                fn visit_mut<'__a, __V: #krate::__private::VisitorMut<'__a> + ?::core::marker::Sized>(
                    &'__a mut self,
                    __path: &mut #krate::__private::ModulePath,
                    __visitor: &mut __V,
                ) {
                    #body_mut
                }
            }
        };
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Shared,
    Mut,
}

fn struct_body(fields: &[Field], krate: &Path, mode: Mode) -> TokenStream {
    let (pattern, calls) = destructure(fields, krate, mode);
    if fields.iter().all(|f| f.attrs.skip.is_some()) {
        return quote!();
    }
    quote! {
        let Self #pattern = self;
        #calls
    }
}

/// `{ a: __field0, 2: __field2, .. }` and one visiting call per bound field.
fn destructure(fields: &[Field], krate: &Path, mode: Mode) -> (TokenStream, TokenStream) {
    let visited: Vec<(usize, &Field)> = fields
        .iter()
        .enumerate()
        .filter(|(_, f)| f.attrs.skip.is_none())
        .collect();
    let bindings: Vec<Ident> = visited.iter().map(|(i, _)| format_ident!("__field{}", i)).collect();
    let members = visited.iter().map(|(_, f)| &f.member);
    let calls = visited
        .iter()
        .zip(&bindings)
        .map(|((_, field), binding)| visit_call(field, binding, krate, mode));
    (quote!({ #(#members: #bindings,)* .. }), quote!(#(#calls)*))
}

/// The call that visits one field. The trait method is named as
/// `<Type as Trait>::method` at the span of the field's type, so a missing
/// `Adaptable` (or `OutputHead`) impl is reported once, on the field.
fn visit_call(field: &Field, binding: &Ident, krate: &Path, mode: Mode) -> TokenStream {
    let ty = field.ty;
    let span = ty.span();
    // Every token at the field's span: an obligation whose tokens mix spans
    // would be reported a second time at the derive attribute.
    let private = respan(quote!(#krate::__private), span);
    let head = field.attrs.output_head.is_some();
    let (trait_, method) = match (head, mode) {
        (false, Mode::Shared) => (quote!(Adaptable), quote!(visit)),
        (false, Mode::Mut) => (quote!(Adaptable), quote!(visit_mut)),
        (true, Mode::Shared) => (quote!(OutputHead), quote!(visit_head)),
        (true, Mode::Mut) => (quote!(OutputHead), quote!(visit_head_mut)),
    };
    // A closure rather than the method as a fn item: passing the fn item
    // would raise the same obligation a second time.
    let visit = quote_spanned! {span=>
        |__child, __path, __visitor| <#ty as #private::#trait_>::#method(__child, __path, __visitor)
    };
    match (&field.segment, mode) {
        (Segment::Named(segment), Mode::Shared) => {
            quote_spanned!(span=> #private::visit_child_with(#binding, #segment, __path, __visitor, #visit);)
        }
        (Segment::Named(segment), Mode::Mut) => {
            quote_spanned!(span=> #private::visit_child_with_mut(#binding, #segment, __path, __visitor, #visit);)
        }
        (Segment::Inline, _) => {
            quote_spanned!(span=> <#ty as #private::#trait_>::#method(#binding, __path, __visitor);)
        }
    }
}

/// `tokens` with every span, nested groups included, set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let TokenTree::Group(group) = &tree {
                let mut respanned = Group::new(group.delimiter(), respan(group.stream(), span));
                respanned.set_span(span);
                tree = TokenTree::Group(respanned);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

/// The input's generics plus `T: Adaptable` for each type parameter used by a
/// visited field, and `T: OutputHead` for one used by the head field.
fn with_bounds(container: &Container, krate: &Path) -> Generics {
    let mut generics = container.original.generics.clone();
    let params: Vec<&Ident> = container.original.generics.type_params().map(|p| &p.ident).collect();
    if params.is_empty() {
        return generics;
    }
    let mut visited = BTreeSet::new();
    let mut heads = BTreeSet::new();
    for field in container.all_fields().filter(|f| f.attrs.skip.is_none()) {
        let used = if field.attrs.output_head.is_some() {
            &mut heads
        } else {
            &mut visited
        };
        collect_params(field.ty, &params, used);
    }
    let predicates = generics.make_where_clause();
    for param in &params {
        let name = param.to_string();
        if visited.contains(&name) {
            let predicate: WherePredicate = parse_quote!(#param: #krate::__private::Adaptable);
            predicates.predicates.push(predicate);
        }
        if heads.contains(&name) {
            let predicate: WherePredicate = parse_quote!(#param: #krate::__private::OutputHead);
            predicates.predicates.push(predicate);
        }
    }
    generics
}
