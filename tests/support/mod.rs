//! What many integration tests share: comparing tensors and scratch folders.
//!
//! Each test crate uses a part of it, hence `dead_code` allowed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar())
        .unwrap()
}

/// The largest absolute difference between `a` and `b` (same shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// A fresh, empty folder `group/name` under the target's temporary folder.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(group).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
