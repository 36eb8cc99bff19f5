//! The [`Adaptable`] trait: a typed walk over a model's layers.
//!
//! `#[derive(Adaptable)]` implements it for the user's structs and enums; this
//! module implements it for the containers models are built from (`Vec`,
//! `Option`, `Box`, arrays, tuples, `&mut T`) and, as leaves with nothing to
//! adapt, for candle-nn's layers and for primitives. Which fields are linear
//! layers is decided by their types at compile time: a walk is a chain of
//! monomorphised calls, with no reflection and no lookup by name.

use candle_core::{Tensor, Var};

use crate::layer::{Conv1d, Conv2d, Embedding, Layer};
use crate::path::ModulePath;

/// What a layer is for, as far as targeting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// An ordinary layer: `all_linear()` targets it.
    Hidden,
    /// The field marked `#[output_head]`: `all_linear()` leaves it alone, as
    /// PEFT's `"all-linear"` leaves the LM head alone.
    OutputHead,
}

/// Sees the layers of a model by shared reference.
///
/// Every method has an empty default, so a visitor implements only what it
/// needs. The lifetime `'a` lets a visitor keep the references it is given.
pub trait Visitor<'a> {
    /// Called when the walk enters a child module (a field or an element).
    fn enter_module(&mut self, _path: &ModulePath) {}
    /// Called when the walk leaves the child module entered last.
    fn exit_module(&mut self, _path: &ModulePath) {}
    /// An adapter slot at `path`: the [`Layer`] inside a `Linear`,
    /// `Embedding`, `Conv1d` or `Conv2d` field (`layer.kind()` tells which).
    fn visit_layer(&mut self, _path: &ModulePath, _role: Role, _layer: &'a Layer) {}
    /// A frozen tensor held by a leaf (an embedding table, a norm weight...).
    /// `path` names the tensor as a checkpoint would (`embed_tokens.weight`).
    fn visit_tensor(&mut self, _path: &ModulePath, _tensor: &'a Tensor) {}
}

/// Sees the layers of a model by mutable reference.
pub trait VisitorMut<'a> {
    /// Called when the walk enters a child module (a field or an element).
    fn enter_module(&mut self, _path: &ModulePath) {}
    /// Called when the walk leaves the child module entered last.
    fn exit_module(&mut self, _path: &ModulePath) {}
    /// An adapter slot at `path`, mutably (see [`Visitor::visit_layer`]).
    fn visit_layer_mut(&mut self, _path: &ModulePath, _role: Role, _layer: &'a mut Layer) {}
}

/// A model, or a part of one, whose adaptable layers can be walked.
///
/// Derive it with `#[derive(Adaptable)]`; implement it by hand only for
/// containers of your own.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an adaptable module",
    label = "`{Self}` does not implement `Adaptable`",
    note = "if `{Self}` is your type, add `#[derive(Adaptable)]` to it; otherwise mark this field `#[adapt(skip)]` if it holds no layer to adapt"
)]
pub trait Adaptable {
    /// Reports every layer and frozen tensor under `self` to `visitor`, with
    /// `path` naming `self` (the visitor's hooks are called by the containers).
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V);

    /// Reports every layer under `self` to `visitor`, mutably.
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V);
}

/// A layer that may be marked `#[output_head]`: linear layers only.
#[diagnostic::on_unimplemented(
    message = "`#[output_head]` must mark a linear layer, and `{Self}` is not one",
    label = "not a `peft_core::Linear`",
    note = "the output head is the linear layer that produces the logits; use `peft_core::Linear` for it"
)]
pub trait OutputHead {
    /// Reports `self` as the output head.
    fn visit_head<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V);
    /// Reports `self` as the output head, mutably.
    fn visit_head_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V);
}

/// One step down the module tree: a field name or an element index.
#[derive(Clone, Copy)]
enum Segment<'s> {
    Name(&'s str),
    Index(usize),
}

impl Segment<'_> {
    fn push_onto(self, path: &mut ModulePath) {
        match self {
            Segment::Name(name) => path.push(name),
            Segment::Index(index) => path.push_index(index),
        }
    }
}

/// Runs `body` with `segment` pushed on `path`, between the visitor's
/// enter and exit hooks.
fn scope<'a, V>(segment: Segment, path: &mut ModulePath, visitor: &mut V, body: impl FnOnce(&mut ModulePath, &mut V))
where
    V: Visitor<'a> + ?Sized,
{
    segment.push_onto(path);
    visitor.enter_module(path);
    body(path, visitor);
    visitor.exit_module(path);
    path.pop();
}

/// Mutable twin of [`scope`].
fn scope_mut<'a, V>(
    segment: Segment,
    path: &mut ModulePath,
    visitor: &mut V,
    body: impl FnOnce(&mut ModulePath, &mut V),
) where
    V: VisitorMut<'a> + ?Sized,
{
    segment.push_onto(path);
    visitor.enter_module(path);
    body(path, visitor);
    visitor.exit_module(path);
    path.pop();
}

/// Visits `child` under the segment `segment`, calling the enter/exit hooks.
/// Use it to implement [`Adaptable`] for a container of your own.
pub fn visit_child<'a, T, V>(child: &'a T, segment: &str, path: &mut ModulePath, visitor: &mut V)
where
    T: Adaptable + ?Sized,
    V: Visitor<'a> + ?Sized,
{
    visit_child_with(child, segment, path, visitor, T::visit);
}

/// Mutable twin of [`visit_child`].
pub fn visit_child_mut<'a, T, V>(child: &'a mut T, segment: &str, path: &mut ModulePath, visitor: &mut V)
where
    T: Adaptable + ?Sized,
    V: VisitorMut<'a> + ?Sized,
{
    visit_child_with_mut(child, segment, path, visitor, T::visit_mut);
}

/// [`visit_child`] with the visiting function given: `Adaptable::visit`, or
/// `OutputHead::visit_head` for the head. The derive names the trait method
/// at the field's span, so a missing impl is reported once, on the field.
pub fn visit_child_with<'a, T, V>(
    child: &'a T,
    segment: &str,
    path: &mut ModulePath,
    visitor: &mut V,
    visit: impl FnOnce(&'a T, &mut ModulePath, &mut V),
) where
    T: ?Sized,
    V: Visitor<'a> + ?Sized,
{
    scope(Segment::Name(segment), path, visitor, |path, visitor| {
        visit(child, path, visitor)
    });
}

/// Mutable twin of [`visit_child_with`].
pub fn visit_child_with_mut<'a, T, V>(
    child: &'a mut T,
    segment: &str,
    path: &mut ModulePath,
    visitor: &mut V,
    visit: impl FnOnce(&'a mut T, &mut ModulePath, &mut V),
) where
    T: ?Sized,
    V: VisitorMut<'a> + ?Sized,
{
    scope_mut(Segment::Name(segment), path, visitor, |path, visitor| {
        visit(child, path, visitor)
    });
}

fn visit_elements<'a, T, V>(items: &'a [T], path: &mut ModulePath, visitor: &mut V)
where
    T: Adaptable,
    V: Visitor<'a> + ?Sized,
{
    for (index, item) in items.iter().enumerate() {
        scope(Segment::Index(index), path, visitor, |path, visitor| {
            item.visit(path, visitor)
        });
    }
}

fn visit_elements_mut<'a, T, V>(items: &'a mut [T], path: &mut ModulePath, visitor: &mut V)
where
    T: Adaptable,
    V: VisitorMut<'a> + ?Sized,
{
    for (index, item) in items.iter_mut().enumerate() {
        scope_mut(Segment::Index(index), path, visitor, |path, visitor| {
            item.visit_mut(path, visitor)
        });
    }
}

// ---- containers -----------------------------------------------------------

macro_rules! impl_sequence {
    ($([$($generics:tt)*] $ty:ty),* $(,)?) => {
        $(
            /// Elements are numbered like `nn.ModuleList`: `layers.0`, `layers.1`, ...
            impl<$($generics)*> Adaptable for $ty {
                fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
                    visit_elements(self, path, visitor);
                }
                fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
                    visit_elements_mut(self, path, visitor);
                }
            }
        )*
    };
}

impl_sequence!(
    [T: Adaptable] Vec<T>,
    [T: Adaptable] [T],
    [T: Adaptable, const N: usize] [T; N],
);

/// `None` holds nothing; `Some` adds no path segment.
impl<T: Adaptable> Adaptable for Option<T> {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        if let Some(inner) = self {
            inner.visit(path, visitor);
        }
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        if let Some(inner) = self {
            inner.visit_mut(path, visitor);
        }
    }
}

/// Transparent: adds no path segment.
impl<T: Adaptable + ?Sized> Adaptable for Box<T> {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        (**self).visit(path, visitor);
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        (**self).visit_mut(path, visitor);
    }
}

/// Transparent: a model may borrow part of itself mutably (`&'a mut Block`).
impl<T: Adaptable + ?Sized> Adaptable for &mut T {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        (**self).visit(path, visitor);
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        (**self).visit_mut(path, visitor);
    }
}

macro_rules! impl_tuple {
    ($($name:ident $index:tt),+) => {
        /// Tuple elements are numbered like tuple struct fields: `0`, `1`, ...
        impl<$($name: Adaptable),+> Adaptable for ($($name,)+) {
            fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
                $(visit_child(&self.$index, stringify!($index), path, visitor);)+
            }
            fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
                $(visit_child_mut(&mut self.$index, stringify!($index), path, visitor);)+
            }
        }
    };
}

impl_tuple!(A 0);
impl_tuple!(A 0, B 1);
impl_tuple!(A 0, B 1, C 2);
impl_tuple!(A 0, B 1, C 2, D 3);

// ---- leaves -----------------------------------------------------------------

macro_rules! impl_empty_leaf {
    ($($ty:ty),* $(,)?) => {
        $(
            /// A leaf with nothing to adapt and no parameters.
            impl Adaptable for $ty {
                fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, _: &mut ModulePath, _: &mut V) {}
                fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, _: &mut ModulePath, _: &mut V) {}
            }
        )*
    };
}

impl_empty_leaf!(
    (),
    bool,
    char,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    str,
    String,
    &str,
    candle_core::DType,
    candle_core::Device,
    candle_core::Shape,
    candle_nn::Activation,
    candle_nn::kv_cache::Cache,
    candle_nn::kv_cache::KvCache,
    candle_nn::kv_cache::RotatingCache,
    candle_nn::kv_cache::RotatingKvCache,
);

impl<T: ?Sized> Adaptable for core::marker::PhantomData<T> {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, _: &mut ModulePath, _: &mut V) {}
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, _: &mut ModulePath, _: &mut V) {}
}

/// Reports `tensor` as `<path>.<name>`.
fn report_tensor<'a, V: Visitor<'a> + ?Sized>(tensor: &'a Tensor, name: &str, path: &mut ModulePath, visitor: &mut V) {
    path.push(name);
    visitor.visit_tensor(path, tensor);
    path.pop();
}

/// A bare tensor field is a frozen parameter named by the field itself.
impl Adaptable for Tensor {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_tensor(path, self);
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, _: &mut ModulePath, _: &mut V) {}
}

impl Adaptable for Var {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_tensor(path, self.as_tensor());
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, _: &mut ModulePath, _: &mut V) {}
}

/// Implements `Adaptable` for a candle-nn layer as a leaf that reports its
/// tensors under the names candle's `VarBuilder` constructors give them.
macro_rules! impl_tensor_leaf {
    ($ty:ty, |$layer:ident| { $($name:literal => $tensor:expr),* $(,)? } $(, optional { $($opt_name:literal => $opt:expr),* })?) => {
        /// A leaf with nothing to adapt; its tensors count as frozen parameters.
        impl Adaptable for $ty {
            fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
                let $layer = self;
                $(report_tensor($tensor, $name, path, visitor);)*
                $($(if let Some(tensor) = $opt {
                    report_tensor(tensor, $opt_name, path, visitor);
                })*)?
            }
            fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, _: &mut ModulePath, _: &mut V) {}
        }
    };
}

impl_tensor_leaf!(candle_nn::Embedding, |layer| { "weight" => layer.embeddings() });
impl_tensor_leaf!(candle_nn::LayerNorm, |layer| { "weight" => layer.weight() }, optional { "bias" => layer.bias() });
impl_tensor_leaf!(candle_nn::RmsNorm, |layer| { "weight" => layer.weight() });
impl_tensor_leaf!(candle_nn::Conv1d, |layer| { "weight" => layer.weight() }, optional { "bias" => layer.bias() });
impl_tensor_leaf!(candle_nn::Conv2d, |layer| { "weight" => layer.weight() }, optional { "bias" => layer.bias() });
impl_tensor_leaf!(candle_nn::ConvTranspose1d, |layer| { "weight" => layer.weight() }, optional { "bias" => layer.bias() });
impl_tensor_leaf!(candle_nn::ConvTranspose2d, |layer| { "weight" => layer.weight() }, optional { "bias" => layer.bias() });
impl_tensor_leaf!(candle_nn::PReLU, |layer| { "weight" => layer.weight() });
impl_tensor_leaf!(
    candle_nn::BatchNorm,
    |layer| { "running_mean" => layer.running_mean(), "running_var" => layer.running_var() },
    optional { "weight" => layer.weight_and_bias().map(|(w, _)| w), "bias" => layer.weight_and_bias().map(|(_, b)| b) }
);

// ---- the slots ----------------------------------------------------------------

/// A slot field (`Linear`) is reported as itself; dense and quantized ones
/// are of kind [`LayerKind::Linear`](crate::LayerKind), the one kind
/// `all_linear()` adapts.
impl Adaptable for Layer {
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_layer(path, Role::Hidden, self);
    }
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_layer_mut(path, Role::Hidden, self);
    }
}

impl OutputHead for Layer {
    fn visit_head<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_layer(path, Role::OutputHead, self);
    }
    fn visit_head_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        visitor.visit_layer_mut(path, Role::OutputHead, self);
    }
}

macro_rules! impl_slot {
    ($($slot:ty => $kind:literal),* $(,)?) => {
        $(
            #[doc = concat!("Reported as its [`Layer`], of kind [`LayerKind::", $kind, "`](crate::LayerKind).")]
            impl Adaptable for $slot {
                fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
                    visitor.visit_layer(path, Role::Hidden, self.layer());
                }
                fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
                    visitor.visit_layer_mut(path, Role::Hidden, self.layer_mut());
                }
            }
        )*
    };
}

impl_slot!(Embedding => "Embedding", Conv1d => "Conv", Conv2d => "Conv");

/// `candle_nn::Linear` keeps its weights private, so no adapter can sit in
/// it; it "implements" [`Adaptable`] only under a bound that never holds,
/// so that a field of that type gets an error that names the fix.
impl<'x> Adaptable for candle_nn::Linear
where
    &'x candle_nn::Linear: UsePeftLinear,
{
    fn visit<'a, V: Visitor<'a> + ?Sized>(&'a self, _: &mut ModulePath, _: &mut V) {}
    fn visit_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, _: &mut ModulePath, _: &mut V) {}
}

/// Implemented for nothing: the bound that makes a `candle_nn::Linear`
/// field a compile error with this message.
#[diagnostic::on_unimplemented(
    message = "a `candle_nn::Linear` cannot be adapted: use `peft_core::Linear`, its drop-in",
    label = "this field is a `candle_nn::Linear`",
    note = "`peft_core::Linear` loads the same tensors (`peft_core::linear(in, out, vb)`) and computes the same output"
)]
pub trait UsePeftLinear {}

/// An optional head (absent when tied to the embedding, say).
impl<T: OutputHead> OutputHead for Option<T> {
    fn visit_head<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        if let Some(head) = self {
            head.visit_head(path, visitor);
        }
    }
    fn visit_head_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        if let Some(head) = self {
            head.visit_head_mut(path, visitor);
        }
    }
}

impl<T: OutputHead + ?Sized> OutputHead for Box<T> {
    fn visit_head<'a, V: Visitor<'a> + ?Sized>(&'a self, path: &mut ModulePath, visitor: &mut V) {
        (**self).visit_head(path, visitor);
    }
    fn visit_head_mut<'a, V: VisitorMut<'a> + ?Sized>(&'a mut self, path: &mut ModulePath, visitor: &mut V) {
        (**self).visit_head_mut(path, visitor);
    }
}
