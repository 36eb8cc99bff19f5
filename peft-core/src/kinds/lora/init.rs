//! The initialisations that start LoRA from the base weight and rewrite
//! it (PEFT's `pissa_init` and `olora_init`): `A` and `B` from a
//! decomposition of `W` `[out, in]`, the base then `W - s·B·A`.
//!
//! The decompositions are faer's, in f64 (PEFT: LAPACK in f32). Singular
//! vectors and Householder QR columns have a sign freedom that faer and
//! LAPACK may resolve differently: row `i` of `A` and column `i` of `B`
//! can come out negated together, which changes neither `B·A` nor the
//! rewritten base.

use candle_core::{DType, Device, Result, Tensor};
use faer::Mat;

/// `A` `[r, in]` and `B` `[out, r]` as f32 tensors on `device`.
pub(crate) type Factors = (Tensor, Tensor);

/// PiSSA (PEFT's `"pissa"`, or `"pissa_niter_K"` with `niter = Some(K)`):
/// `W ≈ V S Uh`, `A = diag(√(S_r / s)) Uh_r`, `B = V_r diag(√(S_r / s))`,
/// so that `s·B·A` is the best rank-`r` part of `W`.
///
/// With `niter`, the top-`r` triplets come from the randomized subspace
/// iteration of torch's `svd_lowrank(W, q = r, niter)` (Halko et al. 2009,
/// algorithm 5.1), its Gaussian start drawn from [`crate::random`]: the
/// same algorithm, not torch's draws, so the factors approximate (and for
/// a matrix of rank ≤ r equal) those of torch, not bit for bit.
pub(crate) fn pissa(weight: &Tensor, r: usize, scale: f64, niter: Option<usize>) -> Result<Factors> {
    let w = to_mat(weight)?;
    let (u, s, v) = match niter {
        None => top_svd(&w, r)?,
        Some(niter) => svd_lowrank(&w, r, niter, weight.device())?,
    };
    let (out, inp) = (w.nrows(), w.ncols());
    let root: Vec<f64> = s.iter().map(|s| (s / scale).sqrt()).collect();
    let a = Mat::<f64>::from_fn(r, inp, |i, j| root[i] * v[(j, i)]);
    let b = Mat::<f64>::from_fn(out, r, |i, j| u[(i, j)] * root[j]);
    Ok((from_mat(&a, weight.device())?, from_mat(&b, weight.device())?))
}

/// OLoRA (PEFT's `"olora"`): `Q, R = qr(W)` (reduced), `A = R[:r]`,
/// `B = Q[:, :r]`.
pub(crate) fn olora(weight: &Tensor, r: usize) -> Result<Factors> {
    let w = to_mat(weight)?;
    let qr = w.qr();
    let (q, rr) = (qr.compute_thin_Q(), qr.thin_R().to_owned());
    let a = Mat::<f64>::from_fn(r, w.ncols(), |i, j| rr[(i, j)]);
    let b = Mat::<f64>::from_fn(w.nrows(), r, |i, j| q[(i, j)]);
    Ok((from_mat(&a, weight.device())?, from_mat(&b, weight.device())?))
}

/// The `r` largest singular triplets `(U_r [m, r], S_r, V_r [n, r])` of `w`.
fn top_svd(w: &Mat<f64>, r: usize) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let svd = w.thin_svd().map_err(|e| {
        candle_core::Error::Msg(format!(
            "the SVD of the base weight {:?} did not converge ({e:?})",
            (w.nrows(), w.ncols())
        ))
    })?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let s: Vec<f64> = (0..r).map(|i| s[i]).collect();
    Ok((
        Mat::from_fn(w.nrows(), r, |i, j| u[(i, j)]),
        s,
        Mat::from_fn(w.ncols(), r, |i, j| v[(i, j)]),
    ))
}

/// torch's `_svd_lowrank(w, q = r, niter)`: a tall view of `w`, an
/// orthonormal basis `Q` of its range found by `niter` subspace
/// iterations from a Gaussian start, then the SVD of `Qᵀ w`.
fn svd_lowrank(w: &Mat<f64>, r: usize, niter: usize, device: &Device) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let wide = w.nrows() < w.ncols();
    let a = if wide { w.transpose().to_owned() } else { w.clone() };
    let start = crate::kernels::random::normal(0.0, 1.0, (a.ncols(), r), DType::F32, device)?;
    let start = to_mat(&start)?;
    let basis = |x: Mat<f64>| x.qr().compute_thin_Q();
    let mut q = basis(&a * &start);
    for _ in 0..niter {
        q = basis(a.transpose() * &q);
        q = basis(&a * &q);
    }
    let (u, s, v) = top_svd(&(q.transpose() * &a), r)?;
    let u = &q * &u;
    Ok(if wide { (v, s, u) } else { (u, s, v) })
}

fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let (rows, cols) = t.dims2()?;
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat::from_fn(rows, cols, |i, j| values[i * cols + j]))
}

fn from_mat(m: &Mat<f64>, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32))
        .collect();
    Tensor::from_vec(values, (m.nrows(), m.ncols()), device)
}
