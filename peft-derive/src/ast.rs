//! A model of the derive input, borrowing from it, with attributes parsed.

use syn::{Data as SynData, DeriveInput, Fields, Ident, LitStr, Member, Type};

use crate::attr::{ContainerAttrs, FieldAttrs};
use crate::ctxt::Ctxt;

pub struct Container<'a> {
    pub original: &'a DeriveInput,
    pub attrs: ContainerAttrs,
    pub data: Data<'a>,
}

pub enum Data<'a> {
    Struct(Vec<Field<'a>>),
    Enum(Vec<Variant<'a>>),
}

pub struct Variant<'a> {
    pub ident: &'a Ident,
    pub fields: Vec<Field<'a>>,
}

pub struct Field<'a> {
    /// How the field is named in a pattern (`q_proj` or `0`).
    pub member: Member,
    pub ty: &'a Type,
    pub attrs: FieldAttrs,
    pub segment: Segment,
}

/// The path segment a field adds.
pub enum Segment {
    /// `q_proj`, `0`, or the `rename` value.
    Named(String),
    /// None: the single field of a tuple enum variant, so that
    /// `Mlp::Gated(GatedMlp)` reads as `mlp.up_proj`, not `mlp.0.up_proj`.
    Inline,
}

impl<'a> Container<'a> {
    /// `None` if the input cannot be modelled at all (a union); the error is in `cx`.
    pub fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Self> {
        let attrs = ContainerAttrs::parse(cx, &input.attrs);
        let data = match &input.data {
            SynData::Struct(data) => Data::Struct(fields_from_ast(cx, &data.fields, false)),
            SynData::Enum(data) => Data::Enum(
                data.variants
                    .iter()
                    .map(|variant| Variant {
                        ident: &variant.ident,
                        fields: fields_from_ast(cx, &variant.fields, true),
                    })
                    .collect(),
            ),
            SynData::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`Adaptable` cannot be derived for a union: which field holds the layers is not known at compile time",
                );
                return None;
            }
        };
        Some(Container {
            original: input,
            attrs,
            data,
        })
    }

    /// Every field, of the struct or of all variants.
    pub fn all_fields(&self) -> Box<dyn Iterator<Item = &Field<'a>> + '_> {
        match &self.data {
            Data::Struct(fields) => Box::new(fields.iter()),
            Data::Enum(variants) => Box::new(variants.iter().flat_map(|v| v.fields.iter())),
        }
    }
}

fn fields_from_ast<'a>(cx: &mut Ctxt, fields: &'a Fields, in_enum: bool) -> Vec<Field<'a>> {
    let newtype_variant = in_enum && matches!(fields, Fields::Unnamed(f) if f.unnamed.len() == 1);
    fields
        .iter()
        .enumerate()
        .map(|(index, field)| {
            let attrs = FieldAttrs::parse(cx, &field.attrs);
            let member = match &field.ident {
                Some(ident) => Member::Named(ident.clone()),
                None => Member::Unnamed(index.into()),
            };
            let segment = match (&attrs.rename, &field.ident) {
                (Some(rename), _) => Segment::Named(LitStr::value(rename)),
                (None, _) if newtype_variant => Segment::Inline,
                (None, Some(ident)) => Segment::Named(unraw(ident)),
                (None, None) => Segment::Named(index.to_string()),
            };
            Field {
                member,
                ty: &field.ty,
                attrs,
                segment,
            }
        })
        .collect()
}

/// `r#type` -> `type`: the path segment is the field's name as written in a checkpoint.
fn unraw(ident: &Ident) -> String {
    let name = ident.to_string();
    name.strip_prefix("r#").map(str::to_owned).unwrap_or(name)
}
