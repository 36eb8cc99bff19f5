//! Differentiable fused CPU kernels for the rest of a transformer: what a
//! LoRA training step spends its time on besides the linear layers.
//!
//! Training an adapter runs the backward pass through the whole frozen model.
//! candle-nn's fused kernels for these operations (`rms_norm`,
//! `softmax_last_dim`, `rotary_emb::rope`) have no backward pass, and the
//! differentiable compositions (`rms_norm_slow`, `ops::softmax`, `rope_slow`,
//! `silu() * up`, `loss::cross_entropy`) make a temporary and two more
//! passes (a zero tensor and an add) per elementary op in the backward pass:
//! on a Llama-shaped model they cost more than the matrix products. Each
//! function here is one custom op with its own forward and backward kernels:
//!
//! | function | computes | replaces |
//! | --- | --- | --- |
//! | [`rms_norm`] | `w · x / sqrt(mean(x²) + eps)` over the last dimension | `candle_nn::ops::rms_norm_slow`, `RmsNorm::forward_diff` |
//! | [`softmax_last_dim`] | softmax over the last dimension | `candle_nn::ops::softmax(x, D::Minus1)` |
//! | [`silu_mul`] | `silu(gate) · up` (SwiGLU) | `gate.silu()? * up` |
//! | [`rope`], [`rope_thd`] | rotary embedding, "rotate half" convention, `[batch, heads, t, d]` / `[batch, t, heads, d]` | `candle_nn::rotary_emb::rope_slow` |
//! | [`causal_attention`] | `softmax(q kᵀ · scale + causal mask) v` on `[batch, t, heads, d]`, grouped-query heads | head transposes, `q.matmul(&k.t())`, mask, `ops::softmax`, `matmul(v)` (and `repeat_kv`) |
//! | [`cross_entropy`] | mean of `-log softmax(logits)[target]` | `candle_nn::loss::cross_entropy` |
//!
//! The kernels take contiguous f32 tensors on the CPU (rows split across
//! rayon's threads); every other dtype and device goes through the candle
//! composition on the right, which computes the same values. Gradients flow to
//! every floating-point argument that autograd tracks (the RMSNorm weight
//! included); the rotary tables are constants and get none.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use peft_core::ops;
//!
//! # fn main() -> candle_core::Result<()> {
//! let x = Var::new(&[[1f32, 2., 3.]], &Device::Cpu)?;
//! let p = ops::softmax_last_dim(&x)?;
//! let expected = [0.09003057f32, 0.24472847, 0.66524096];
//! for (got, want) in p.to_vec2::<f32>()?[0].iter().zip(expected) {
//!     assert!((got - want).abs() < 1e-6);
//! }
//! // Cross entropy of target 2: -ln p[2]; its gradient is p - onehot(2).
//! let targets = Tensor::new(&[2u32], &Device::Cpu)?;
//! let loss = ops::cross_entropy(&x, &targets)?;
//! assert!((loss.to_scalar::<f32>()? + expected[2].ln()).abs() < 1e-6);
//! let grad = loss.backward()?.get(&x).unwrap().to_vec2::<f32>()?;
//! assert!((grad[0][2] - (expected[2] - 1.0)).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernels::exp;
use crate::kernels::matmul::{gemm_into, CpuTensor, Matrix};
use crate::kernels::profile::{Pass, Timer};

// ---- public functions ---------------------------------------------------------

/// RMSNorm over the last dimension: `weight · x / sqrt(mean(x²) + eps)`,
/// `weight` `[d]` for `x` `[.., d]`; differentiable in `x` and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    if weight.dims() != [dim] {
        bail!(
            "rms_norm: weight {:?} does not match input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    if !fusable(&[x, weight]) {
        return candle_nn::ops::rms_norm_slow(x, weight, eps as f32);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fusable(&[x]) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// `silu(gate) · up`, the gated activation of Llama's MLP (SwiGLU); both
/// operands have the same shape. Differentiable in both.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "silu_mul: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    if !fusable(&[gate, up]) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// Rotary position embedding in the "rotate half" convention (transformers'
/// Llama, `candle_nn::rotary_emb::rope`): for `x` `[batch, heads, t, d]` and
/// tables `cos`, `sin` `[t_max, d / 2]` (`t_max >= t`, row `p` for position
/// `p`), `y = x · cos + rotate_half(x) · sin` with the tables repeated over
/// both halves. Differentiable in `x`; the tables are constants.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, _) = x.dims4()?;
    check_rope_tables(x, t, cos, sin)?;
    if !rope_fusable(x, cos, sin) {
        return candle_nn::rotary_emb::rope_slow(x, cos, sin);
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope(RopeLayout::HeadsFirst))
}

/// [`rope`] for `x` `[batch, t, heads, d]` (`candle_nn::rotary_emb::rope_thd`'s
/// layout, the one [`causal_attention`] takes).
pub fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, _) = x.dims4()?;
    check_rope_tables(x, t, cos, sin)?;
    if !rope_fusable(x, cos, sin) {
        let heads_first = x.transpose(1, 2)?.contiguous()?;
        return candle_nn::rotary_emb::rope_slow(&heads_first, cos, sin)?
            .transpose(1, 2)?
            .contiguous();
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope(RopeLayout::PositionsFirst))
}

fn check_rope_tables(x: &Tensor, t: usize, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let d = x.dim(D::Minus1)?;
    let (t_max, half) = cos.dims2()?;
    if d % 2 != 0 || half * 2 != d || sin.dims() != cos.dims() || t_max < t {
        bail!(
            "rope: tables cos {:?} / sin {:?} do not fit input {:?} (expected [>= {t}, {}])",
            cos.dims(),
            sin.dims(),
            x.dims(),
            d / 2
        );
    }
    Ok(())
}

fn rope_fusable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    !cos.track_op() && !sin.track_op() && fusable(&[x, cos, sin])
}

/// Causal scaled dot-product attention, `softmax(q kᵀ · scale + mask) v`,
/// differentiable in `q`, `k` and `v`.
///
/// The layout is the one the linear projections give after a reshape (and
/// the one `candle-flash-attn` takes): `q` is `[batch, t_q, heads, d]`, `k`
/// and `v` `[batch, t_k, kv_heads, d]`, the result `[batch, t_q, heads, d]`,
/// so no head transposes (and their copies and backward passes) are needed.
/// `heads` is a multiple of `kv_heads` (grouped-query attention: query head
/// `h` reads key/value head `h / (heads / kv_heads)`, as transformers'
/// `repeat_kv` arranges) and `t_k >= t_q`: query `i` sits at position
/// `t_k - t_q + i` and sees keys `0..=` that position. The kernel keeps no
/// `[t_q, t_k]` probabilities between the passes: the backward pass
/// recomputes them, one head at a time.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    windowed_causal_attention(q, k, v, scale, None)
}

/// [`causal_attention`] where each query sees at most `window` keys, its own
/// position and the `window - 1` before it (Mistral's sliding window:
/// query position `p` sees key `j` when `p - window < j <= p`); `None` sees
/// every earlier key.
pub fn windowed_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (batch, t_q, heads, d) = q.dims4()?;
    let (k_batch, t_k, kv_heads, k_d) = k.dims4()?;
    if k.dims() != v.dims() || k_batch != batch || k_d != d || kv_heads == 0 || heads % kv_heads != 0 || t_k < t_q {
        bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} do not fit ([batch, t, heads, d]; k and v alike, same batch \
             and head size, heads a multiple of kv heads, at least as many keys as queries)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if window == Some(0) {
        bail!("windowed_causal_attention: a window of 0 keys lets no query see anything");
    }
    if !fusable(&[q, k, v]) {
        return plain_causal_attention(q, k, v, scale, window);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            scale: scale as f32,
            window,
        },
    )
}

/// The first key a query at position `position` sees: 0, or the start of
/// its window.
fn first_visible(position: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (position + 1).saturating_sub(w))
}

/// [`windowed_causal_attention`] with candle ops, for the operands the kernel does not take.
fn plain_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    let (batch, t_q, heads, d) = q.dims4()?;
    let (_, t_k, kv_heads, _) = k.dims4()?;
    let n_rep = heads / kv_heads;
    // To [batch, heads, t, d], key/value heads repeated for their query heads.
    let heads_first = |x: &Tensor| -> Result<Tensor> {
        let x = x.transpose(1, 2)?;
        if n_rep == 1 {
            return x.contiguous();
        }
        x.unsqueeze(2)?
            .broadcast_as((batch, kv_heads, n_rep, t_k, d))?
            .reshape((batch, heads, t_k, d))
    };
    let (q, k, v) = (q.transpose(1, 2)?.contiguous()?, heads_first(k)?, heads_first(v)?);
    let offset = t_k - t_q;
    let mask: Vec<f32> = (0..t_q * t_k)
        .map(|i| {
            let (position, key) = (i / t_k + offset, i % t_k);
            if key > position || key < first_visible(position, window) {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t_q, t_k), q.device())?.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    let out = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
    out.transpose(1, 2)?.contiguous()
}

/// Mean cross entropy of `logits` `[.., classes]` against class indices
/// `targets` `[..]` (u8, u32 or i64; the same leading dimensions):
/// `mean(logsumexp(row) - row[target])` over all rows, a scalar,
/// differentiable in `logits`. Unlike `candle_nn::loss::cross_entropy` the
/// logits need not be flattened to two dimensions first (a flatten is one
/// more full-size copy in the backward pass).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let dims = logits.dims();
    if dims.is_empty() || targets.dims() != &dims[..dims.len() - 1] {
        bail!(
            "cross_entropy: targets {:?} do not match logits {:?} (expected the logits' dimensions but the last)",
            targets.dims(),
            logits.dims()
        );
    }
    if !(fusable(&[logits]) && targets.device().is_cpu()) {
        return candle_nn::loss::cross_entropy(
            &logits.flatten_to(dims.len().saturating_sub(2))?,
            &targets.flatten_all()?,
        );
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)
}

/// Whether the kernels take these operands: all f32 on the CPU.
pub(crate) fn fusable(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

// ---- storage helpers ----------------------------------------------------------

/// The f32 elements of a contiguous storage.
pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("fused ops read their operands in place and need them contiguous"),
    }
}

/// The f32 elements of a contiguous tensor, read-locked while the guard lives.
pub(crate) fn with_f32<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let tensor = tensor.contiguous()?;
    let guard = CpuTensor::new(&tensor)?;
    f(f32_slice(guard.storage()?, tensor.layout())?)
}

fn f32_storage(values: Vec<f32>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (CpuStorage::F32(values), shape.into())
}

pub(crate) fn tensor_like(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, like.shape(), like.device())
}

// ---- RMSNorm --------------------------------------------------------------------

struct RmsNorm {
    eps: f32,
}

fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "peft-rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        let (x, w) = (f32_slice(x, xl)?, f32_slice(w, wl)?);
        let dim = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(y, x)| {
            let r = inverse_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = w * x * r;
            }
        });
        Ok(f32_storage(y, xl.shape().clone()))
    }

    /// With `x̂ = x·r`: `∂x = r·(w·g - x̂·mean(w·g·x̂))`, `∂w = Σ_rows g·x̂`
    /// (summed per rayon task, then across tasks).
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let (gx, gw) = rms_norm_grads(x, w, grad, self.eps, w.track_op())?;
        let gx = if x.track_op() { Some(tensor_like(gx, x)?) } else { None };
        let gw = gw.map(|gw| tensor_like(gw, w)).transpose()?;
        Ok((gx, gw))
    }
}

/// [`RmsNorm`]'s gradients: `∂x`, and `∂w` when `weight_grad` (a frozen
/// norm, as in the decoder block, skips its per-task sums).
pub(crate) fn rms_norm_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
    weight_grad: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let dim = w.elem_count().max(1);
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            with_f32(grad, |gs| {
                let mut gx = vec![0f32; xs.len()];
                let rows = gx.par_chunks_mut(dim).zip(xs.par_chunks(dim).zip(gs.par_chunks(dim)));
                // One row's `∂x`; its `1/rms` for the caller's `∂w`.
                let row_grad = |gx: &mut [f32], x: &[f32], g: &[f32]| {
                    let r = inverse_rms(x, eps);
                    let mean_wgx = x.iter().zip(g).zip(ws).map(|((x, g), w)| w * g * x * r).sum::<f32>() / dim as f32;
                    for (((gx, x), g), w) in gx.iter_mut().zip(x).zip(g).zip(ws) {
                        *gx = r * (w * g - x * r * mean_wgx);
                    }
                    r
                };
                if !weight_grad {
                    rows.for_each(|(gx, (x, g))| {
                        row_grad(gx, x, g);
                    });
                    return Ok((gx, None));
                }
                let gw = rows
                    .fold(
                        || vec![0f32; dim],
                        |mut gw, (gx, (x, g))| {
                            let r = row_grad(gx, x, g);
                            for ((gw, x), g) in gw.iter_mut().zip(x).zip(g) {
                                *gw += g * x * r;
                            }
                            gw
                        },
                    )
                    .reduce(Vec::new, add_into);
                Ok((gx, Some(gw)))
            })
        })
    })
}

/// Sums two partial gradients (either may be the empty identity).
fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    if a.is_empty() {
        return b;
    }
    for (a, b) in a.iter_mut().zip(&b) {
        *a += b;
    }
    a
}

// ---- softmax --------------------------------------------------------------------

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "peft-softmax-last-dim"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        let x = f32_slice(x, xl)?;
        let dim = xl.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(y, x)| {
            let sum = exp::exp_shifted(y, x, exp::max(x));
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok(f32_storage(y, xl.shape().clone()))
    }

    /// `∂x = y · (g - Σ g·y)` per row.
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let dim = x.dim(D::Minus1)?.max(1);
        with_f32(res, |ys| {
            with_f32(grad, |gs| {
                let mut gx = vec![0f32; ys.len()];
                gx.par_chunks_mut(dim)
                    .zip(ys.par_chunks(dim).zip(gs.par_chunks(dim)))
                    .for_each(|(gx, (y, g))| {
                        let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                        for ((gx, y), g) in gx.iter_mut().zip(y).zip(g) {
                            *gx = y * (g - dot);
                        }
                    });
                tensor_like(gx, x).map(Some)
            })
        })
    }
}

// ---- SwiGLU ---------------------------------------------------------------------

struct SiluMul;

/// Elements per rayon task for elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 16 * 1024;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "peft-silu-mul"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        let (a, b) = (f32_slice(a, al)?, f32_slice(b, bl)?);
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(a.par_chunks(ELEMENTWISE_CHUNK).zip(b.par_chunks(ELEMENTWISE_CHUNK)))
            .for_each(|(y, (a, b))| exp::silu_mul(y, a, b));
        Ok(f32_storage(y, al.shape().clone()))
    }

    /// `∂gate = g · up · σ(a)(1 + a(1 - σ(a)))`, `∂up = g · a σ(a)`; both in
    /// one pass (in a Llama MLP both come from adapted layers and are tracked).
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let (ga, gb) = silu_mul_grads(a, b, grad)?;
        let ga = if a.track_op() { Some(tensor_like(ga, a)?) } else { None };
        let gb = if b.track_op() { Some(tensor_like(gb, b)?) } else { None };
        Ok((ga, gb))
    }
}

/// [`SiluMul`]'s gradients `(∂gate, ∂up)`, whether or not autograd tracks the operands.
pub(crate) fn silu_mul_grads(a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    with_f32(a, |av| {
        with_f32(b, |bv| {
            with_f32(grad, |gv| {
                let mut ga = vec![0f32; av.len()];
                let mut gb = vec![0f32; av.len()];
                let inputs = av.par_chunks(ELEMENTWISE_CHUNK).zip(bv.par_chunks(ELEMENTWISE_CHUNK));
                let outputs = ga
                    .par_chunks_mut(ELEMENTWISE_CHUNK)
                    .zip(gb.par_chunks_mut(ELEMENTWISE_CHUNK));
                inputs
                    .zip(gv.par_chunks(ELEMENTWISE_CHUNK))
                    .zip(outputs)
                    .for_each(|(((a, b), g), (ga, gb))| exp::silu_mul_backward(ga, gb, a, b, g));
                Ok((ga, gb))
            })
        })
    })
}

// ---- RoPE -----------------------------------------------------------------------

/// Where the position axis is in a rotary embedding's 4-D input.
#[derive(Clone, Copy)]
pub(crate) enum RopeLayout {
    /// `[batch, heads, t, d]`: row `i` (of `d` values) is position `i % t`.
    HeadsFirst,
    /// `[batch, t, heads, d]`: row `i` is position `(i / heads) % t`.
    PositionsFirst,
}

struct Rope(RopeLayout);

/// Rows of `d` values per rayon task.
const ROPE_ROWS_PER_TASK: usize = 256;

/// Rotates each `d`-wide row of `x` (`dims` its 4-D shape) by its position's
/// angles; `sign` +1 for the forward rotation, -1 for its transpose (the
/// backward pass).
pub(crate) fn rotate_rows(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    dims: &[usize],
    layout: RopeLayout,
    sign: f32,
) -> Vec<f32> {
    let d = dims[3].max(2);
    let half = d / 2;
    let (t, rows_per_position) = match layout {
        RopeLayout::HeadsFirst => (dims[2], 1),
        RopeLayout::PositionsFirst => (dims[1], dims[2]),
    };
    let mut y = vec![0f32; x.len()];
    let chunk = d * ROPE_ROWS_PER_TASK;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .enumerate()
        .for_each(|(task, (y, x))| {
            for (j, (y, x)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                let p = ((task * ROPE_ROWS_PER_TASK + j) / rows_per_position.max(1)) % t.max(1);
                let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    y1[i] = x1[i] * c[i] - sign * x2[i] * s[i];
                    y2[i] = x2[i] * c[i] + sign * x1[i] * s[i];
                }
            }
        });
    y
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "peft-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        let (x, c, s) = (f32_slice(x, xl)?, f32_slice(cos, cl)?, f32_slice(sin, sl)?);
        let y = rotate_rows(x, c, s, xl.dims(), self.0, 1.0);
        Ok(f32_storage(y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let dims = x.dims();
        let gx = with_f32(grad, |g| {
            with_f32(cos, |c| with_f32(sin, |s| Ok(rotate_rows(g, c, s, dims, self.0, -1.0))))
        })?;
        Ok((Some(tensor_like(gx, x)?), None, None))
    }
}

// ---- causal attention -----------------------------------------------------------

struct CausalAttention {
    scale: f32,
    window: Option<usize>,
}

/// The shapes of one attention call, `[batch, t, heads, d]` layout.
#[derive(Clone, Copy)]
struct AttentionDims {
    heads: usize,
    kv_heads: usize,
    t_q: usize,
    t_k: usize,
    d: usize,
}

impl AttentionDims {
    fn of(q: &[usize], k: &[usize]) -> Self {
        Self {
            heads: q[2],
            kv_heads: k[2],
            t_q: q[1],
            t_k: k[1],
            d: q[3],
        }
    }

    /// Query heads per key/value head.
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// One head of `[batch, t, heads, d]` data as a `[t, d]` matrix (rows
    /// `heads * d` apart).
    fn head<'a>(&self, data: &'a [f32], batch: usize, head: usize, heads: usize, t: usize) -> Result<Matrix<'a, f32>> {
        let start = (batch * t * heads + head) * self.d;
        Matrix::strided(data.get(start..).unwrap_or(&[]), t, self.d, heads * self.d, 1)
    }

    /// Writes `[t, d]` head blocks back into `[batch, t, heads, d]` data.
    fn scatter(&self, dst: &mut [f32], block: &[f32], batch: usize, head: usize, heads: usize, t: usize) {
        let d = self.d;
        for (i, row) in block.chunks(d).enumerate() {
            let start = ((batch * t + i) * heads + head) * d;
            dst[start..start + d].copy_from_slice(row);
        }
    }
}

/// The attention probabilities of one query head, `[t_q, t_k]`, into `probs`:
/// `softmax(scale · q kᵀ)` over the keys each query may see, 0 elsewhere.
fn causal_probs(
    probs: &mut [f32],
    q: Matrix<'_, f32>,
    k: Matrix<'_, f32>,
    scale: f32,
    window: Option<usize>,
) -> Result<()> {
    let (t_q, t_k) = (q.rows, k.rows);
    gemm_into(probs, q, k.t(), scale, false, Parallelism::None)?;
    let offset = t_k - t_q;
    for (i, row) in probs.chunks_mut(t_k.max(1)).enumerate() {
        let position = offset + i;
        let (before, row) = row.split_at_mut(first_visible(position, window));
        before.fill(0.0);
        let (seen, masked) = row.split_at_mut(position + 1 - before.len());
        let max = exp::max(seen);
        let sum = exp::exp_shifted_in_place(seen, max);
        let inv = 1.0 / sum;
        seen.iter_mut().for_each(|p| *p *= inv);
        masked.fill(0.0);
    }
    Ok(())
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "peft-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        let dims = AttentionDims::of(ql.dims(), kl.dims());
        let batch = ql.dims()[0];
        let AttentionDims {
            heads,
            kv_heads,
            t_q,
            t_k,
            d,
        } = dims;
        let (q, k, v) = (f32_slice(q, ql)?, f32_slice(k, kl)?, f32_slice(v, vl)?);
        // One task per (batch, key/value head), each writing its query heads'
        // outputs into a block of its own; the blocks are put in place after.
        let blocks: Vec<Vec<f32>> = (0..batch * kv_heads)
            .into_par_iter()
            .map(|task| {
                let (b, g) = (task / kv_heads, task % kv_heads);
                let (km, vm) = (dims.head(k, b, g, kv_heads, t_k)?, dims.head(v, b, g, kv_heads, t_k)?);
                let mut probs = vec![0f32; t_q * t_k];
                let mut out = vec![0f32; dims.n_rep() * t_q * d];
                for (r, out) in out.chunks_mut(t_q * d).enumerate() {
                    let qm = dims.head(q, b, g * dims.n_rep() + r, heads, t_q)?;
                    causal_probs(&mut probs, qm, km, self.scale, self.window)?;
                    gemm_into(
                        out,
                        Matrix::row_major(&probs, t_q, t_k),
                        vm,
                        1.0,
                        false,
                        Parallelism::None,
                    )?;
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0f32; q.len()];
        for (task, block) in blocks.iter().enumerate() {
            let (b, g) = (task / kv_heads, task % kv_heads);
            for (r, head) in block.chunks(t_q * d).enumerate() {
                dims.scatter(&mut out, head, b, g * dims.n_rep() + r, heads, t_q);
            }
        }
        Ok(f32_storage(out, ql.shape().clone()))
    }

    /// Per query head, with `P` recomputed: `∂P = g vᵀ`,
    /// `∂S = scale · P ⊙ (∂P - rowsum(∂P ⊙ P))`, `∂q = ∂S k`, and summed over the
    /// query heads sharing a key/value head, `∂k = ∂Sᵀ q`, `∂v = Pᵀ g`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let (gq, gk, gv) = attention_grads(q, k, v, grad, self.scale, self.window)?;
        let wanted = |grad: Vec<f32>, of: &Tensor| -> Result<Option<Tensor>> {
            if of.track_op() {
                tensor_like(grad, of).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((wanted(gq, q)?, wanted(gk, k)?, wanted(gv, v)?))
    }
}

/// [`CausalAttention`]'s gradients `(∂q, ∂k, ∂v)`, whether or not autograd
/// tracks the operands.
pub(crate) fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let dims = AttentionDims::of(q.dims(), k.dims());
    let batch = q.dim(0)?;
    let AttentionDims {
        heads,
        kv_heads,
        t_q,
        t_k,
        d,
    } = dims;
    with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                with_f32(grad, |gs| {
                    // Per task: the query heads' ∂q blocks, then ∂k and ∂v.
                    type Blocks = (Vec<f32>, Vec<f32>, Vec<f32>);
                    let blocks: Vec<Blocks> = (0..batch * kv_heads)
                        .into_par_iter()
                        .map(|task| {
                            let (b, g) = (task / kv_heads, task % kv_heads);
                            let km = dims.head(ks, b, g, kv_heads, t_k)?;
                            let vm = dims.head(vs, b, g, kv_heads, t_k)?;
                            let mut probs = vec![0f32; t_q * t_k];
                            let mut dprobs = vec![0f32; t_q * t_k];
                            let mut gq = vec![0f32; dims.n_rep() * t_q * d];
                            let (mut gk, mut gv) = (vec![0f32; t_k * d], vec![0f32; t_k * d]);
                            for (r, gq) in gq.chunks_mut(t_q * d).enumerate() {
                                let h = g * dims.n_rep() + r;
                                let (qm, gm) = (dims.head(qs, b, h, heads, t_q)?, dims.head(gs, b, h, heads, t_q)?);
                                causal_probs(&mut probs, qm, km, scale, window)?;
                                gemm_into(&mut dprobs, gm, vm.t(), 1.0, false, Parallelism::None)?;
                                for (dp, p) in dprobs.chunks_mut(t_k).zip(probs.chunks(t_k)) {
                                    let dot: f32 = dp.iter().zip(p).map(|(dp, p)| dp * p).sum();
                                    for (dp, p) in dp.iter_mut().zip(p) {
                                        *dp = scale * p * (*dp - dot);
                                    }
                                }
                                let ds = Matrix::row_major(&dprobs, t_q, t_k);
                                let accumulate = r > 0;
                                gemm_into(gq, ds, km, 1.0, false, Parallelism::None)?;
                                gemm_into(&mut gk, ds.t(), qm, 1.0, accumulate, Parallelism::None)?;
                                let pm = Matrix::row_major(&probs, t_q, t_k);
                                gemm_into(&mut gv, pm.t(), gm, 1.0, accumulate, Parallelism::None)?;
                            }
                            Ok((gq, gk, gv))
                        })
                        .collect::<Result<_>>()?;
                    let (mut gq, mut gk, mut gv) = (vec![0f32; qs.len()], vec![0f32; ks.len()], vec![0f32; vs.len()]);
                    for (task, (gq_block, gk_block, gv_block)) in blocks.iter().enumerate() {
                        let (b, g) = (task / kv_heads, task % kv_heads);
                        for (r, head) in gq_block.chunks(t_q * d).enumerate() {
                            dims.scatter(&mut gq, head, b, g * dims.n_rep() + r, heads, t_q);
                        }
                        dims.scatter(&mut gk, gk_block, b, g, kv_heads, t_k);
                        dims.scatter(&mut gv, gv_block, b, g, kv_heads, t_k);
                    }
                    Ok((gq, gk, gv))
                })
            })
        })
    })
}

// ---- cross entropy --------------------------------------------------------------

struct CrossEntropy;

/// Class indices as `usize`, each checked against `classes`.
fn class_indices(targets: &CpuStorage, layout: &Layout, classes: usize) -> Result<Vec<usize>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross_entropy: targets must be contiguous".into()))?;
    let indices: Vec<i64> = match targets {
        CpuStorage::U8(v) => v[start..end].iter().map(|&i| i64::from(i)).collect(),
        CpuStorage::U32(v) => v[start..end].iter().map(|&i| i64::from(i)).collect(),
        CpuStorage::I64(v) => v[start..end].to_vec(),
        other => bail!("cross_entropy: targets must be u8, u32 or i64, not {:?}", {
            use candle_core::backend::BackendStorage;
            other.dtype()
        }),
    };
    indices
        .into_iter()
        .map(|i| match usize::try_from(i) {
            Ok(i) if i < classes => Ok(i),
            _ => bail!("cross_entropy: target {i} is not a class index below {classes}"),
        })
        .collect()
}

/// `logsumexp` of a row.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = exp::max(row);
    max + exp::sum_exp_shifted(row, max).ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "peft-cross-entropy"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, t: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = Timer::start(self.name(), Pass::Forward);
        let logits = f32_slice(x, xl)?;
        let classes = xl.dims().last().copied().unwrap_or(1).max(1);
        let targets = class_indices(t, tl, classes)?;
        let total: f64 = logits
            .par_chunks(classes)
            .zip(targets.par_iter())
            .map(|(row, &target)| f64::from(log_sum_exp(row) - row[target]))
            .sum();
        let mean = if targets.is_empty() {
            f32::NAN
        } else {
            (total / targets.len() as f64) as f32
        };
        Ok(f32_storage(vec![mean], ()))
    }

    /// `∂logits = g / n · (softmax(row) - onehot(target))`.
    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let classes = x.dim(D::Minus1)?;
        let n = x.elem_count() / classes.max(1);
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / n.max(1) as f32;
        let targets = {
            let t = t.contiguous()?;
            let guard = CpuTensor::new(&t)?;
            class_indices(guard.storage()?, t.layout(), classes)?
        };
        let gx = with_f32(x, |logits| {
            let mut gx = vec![0f32; logits.len()];
            gx.par_chunks_mut(classes.max(1))
                .zip(logits.par_chunks(classes.max(1)).zip(targets.par_iter()))
                .for_each(|(gx, (row, &target))| {
                    exp::scaled_exp_shifted(gx, row, log_sum_exp(row), scale);
                    gx[target] -= scale;
                });
            Ok(gx)
        })?;
        Ok((Some(tensor_like(gx, x)?), None))
    }
}
