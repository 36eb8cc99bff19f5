//! CPU kernels: fused products and differentiable ops for training on the
//! CPU. Plain tensor code with no PEFT logic, used by the slots and the
//! adapters, and public as [`crate::fused`], [`crate::ops`], [`crate::optim`] and
//! [`crate::profile`].

pub mod fused;
pub(crate) mod matmul;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod random;
pub(crate) mod reduce;
