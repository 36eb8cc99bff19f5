//! CPU kernels: fused products and differentiable ops for training on the
//! CPU. Plain tensor code with no PEFT logic, used by the slots and the
//! adapters, and public as [`crate::fused`], [`crate::ops`], [`crate::optim`] and
//! [`crate::profile`].

pub mod block;
pub(crate) mod exp;
pub mod fused;
pub(crate) mod low_rank;
pub(crate) mod matmul;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod random;
pub(crate) mod reduce;

/// Whether `T` is f32 or f64, the types the hand-written product loops and
/// faer's kernels take.
pub(crate) fn is_f32_or_f64<T: 'static>() -> bool {
    use std::any::TypeId;
    TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>()
}

/// Whether this x86-64 CPU has AVX2 and FMA: the kernels compiled for them
/// (and faer's assembly ones) run here. `false` on other architectures.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
