//! A pre-norm decoder block (Llama, Mistral, Qwen2) as one differentiable
//! op: [`decoder_block`].
//!
//! Op by op, a block's backward pass hands each gradient to candle's
//! autograd, which for every operand an op reads starts the operand's
//! gradient as a zero tensor and adds the op's contribution to it: a zeroed
//! allocation and a full pass per edge of the graph, about 24 activation-sized
//! edges per block (the residual adds, the reshapes into heads, the three
//! projections reading one normed input). On a Llama-shaped model that was a
//! tenth of a training step (docs/PERFORMANCE.md). Here the block's backward
//! is one function: it chains the fused kernels' gradients itself, sums the
//! three projections' input gradients in their products' accumulators and
//! adds the residual gradients in place, so autograd sees one edge per block.
//!
//! The adapters' gradients do not fit through that edge (a candle custom op
//! takes at most three operands), so they take a relay: a chain of small
//! ops, each taking one adapter's `A` and `B`, whose scalar output the block
//! takes as its second operand. Autograd runs the block's backward before
//! the relay's (the relay feeds the block), so the block leaves each
//! adapter's gradients with the relay op that returns them, and they reach
//! the [`GradStore`](candle_core::backprop::GradStore) like any other.
//! Nothing changes for the caller: `loss.backward()` gives every gradient.
//!
//! The block runs for f32 on the CPU when autograd tracks the input or an
//! adapter, the norms and base weights are frozen, and every projection is a
//! dense product with at most one unmerged LoRA adapter without active
//! dropout ([`crate::Layer::dense_low_rank`]); [`decoder_block`] answers
//! `None` otherwise and the model computes the block op by op. The output
//! is the op-by-op path's, value for value (the same kernels in the same
//! order); the gradients differ from it in rounding only (sums taken in
//! another order).

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::fused::{self, linear_grads_f32, Wanted};
use crate::kernels::ops::{self, attention_grads, rms_norm_grads, rotate_rows, with_f32, RopeLayout};
use crate::kernels::profile::{Pass, Timer};

/// The factors of a low-rank change `scale · B A` ([`crate::Adapter::low_rank`]).
#[derive(Debug, Clone, Copy)]
pub struct LowRankFactors<'a> {
    /// `A`, `[r, in]`.
    pub a: &'a Tensor,
    /// `B`, `[out, r]`.
    pub b: &'a Tensor,
    /// The scale, `lora_alpha / r` (or `/ sqrt(r)`).
    pub scale: f64,
}

/// A layer's forward pass as a dense product plus at most one low-rank
/// change: `x Wᵀ + bias + scale · (x Aᵀ) Bᵀ`
/// ([`Layer::dense_low_rank`](crate::Layer::dense_low_rank)).
#[derive(Debug, Clone, Copy)]
pub struct DenseLowRank<'a> {
    /// `W`, `[out, in]`.
    pub weight: &'a Tensor,
    /// The bias, `[out]`.
    pub bias: Option<&'a Tensor>,
    /// The adapter's factors; `None` for the base alone.
    pub low_rank: Option<LowRankFactors<'a>>,
}

/// The operands of one pre-norm decoder block:
///
/// ```text
/// h  = rms_norm(x) · input_norm
/// x₁ = x + o(attention(rope(q(h)), rope(k(h)), v(h)))
/// h₂ = rms_norm(x₁) · post_attention_norm
/// y  = x₁ + down(silu(gate(h₂)) · up(h₂))
/// ```
#[derive(Debug, Clone, Copy)]
pub struct DecoderBlock<'a> {
    /// The first RMSNorm's weight, `[hidden]`.
    pub input_norm: &'a Tensor,
    /// The second RMSNorm's weight, `[hidden]`.
    pub post_attention_norm: &'a Tensor,
    /// Both norms' epsilon.
    pub eps: f64,
    /// The projections, in the order q, k, v, o, gate, up, down.
    pub projections: [DenseLowRank<'a>; 7],
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (a divisor of `num_heads`).
    pub num_kv_heads: usize,
    /// The width of one head.
    pub head_dim: usize,
    /// Each position sees at most this many keys (its own included).
    pub sliding_window: Option<usize>,
    /// The rotary tables, `[t_max, head_dim / 2]` (as [`ops::rope_thd`]).
    pub cos: &'a Tensor,
    /// See `cos`.
    pub sin: &'a Tensor,
}

/// The block's output for `x` `[batch, t, hidden]`, differentiable in `x`
/// and in every adapter's factors; `None` when the block does not take
/// these operands (see the [module documentation](self)), for the caller to
/// compute it op by op.
pub fn decoder_block(x: &Tensor, block: &DecoderBlock<'_>) -> Result<Option<Tensor>> {
    if !takes(x, block) {
        return Ok(None);
    }
    let (batch, t, _) = x.dims3()?;
    let heads = |n: usize| (batch, t, n, block.head_dim);
    let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = &block.projections;

    // The forward pass through the same public ops the model calls, on
    // operands autograd does not track: nothing of it enters the graph.
    let x_in = x.detach();
    let h = ops::rms_norm(&x_in, block.input_norm, block.eps)?;
    let q = ops::rope_thd(
        &project(&h, q_proj)?.reshape(heads(block.num_heads))?,
        block.cos,
        block.sin,
    )?;
    let k = ops::rope_thd(
        &project(&h, k_proj)?.reshape(heads(block.num_kv_heads))?,
        block.cos,
        block.sin,
    )?;
    let v = project(&h, v_proj)?.reshape(heads(block.num_kv_heads))?;
    let scale = (block.head_dim as f64).powf(-0.5);
    let attention = ops::windowed_causal_attention(&q, &k, &v, scale, block.sliding_window)?.reshape((
        batch,
        t,
        block.num_heads * block.head_dim,
    ))?;
    let x1 = (&x_in + project(&attention, o_proj)?)?;
    let h2 = ops::rms_norm(&x1, block.post_attention_norm, block.eps)?;
    let (gate, up) = (project(&h2, gate_proj)?, project(&h2, up_proj)?);
    let hidden = ops::silu_mul(&gate, &up)?;
    let mlp = project(&hidden, down_proj)?;

    // The relay: one op per adapter, chained into a scalar the block takes.
    let stash = Arc::new(Mutex::new(vec![None; 2 * block.projections.len()]));
    let mut token = Tensor::zeros((), DType::F32, x.device())?;
    for (i, projection) in block.projections.iter().enumerate() {
        if let Some(factors) = projection.low_rank {
            let relay = GradRelay {
                stash: stash.clone(),
                first_slot: 2 * i,
            };
            token = factors.a.apply_op3(factors.b, &token, relay)?;
        }
    }
    let op = BlockOp {
        saved: Saved {
            h,
            q,
            k,
            v,
            attention,
            x1,
            h2,
            gate,
            up,
            hidden,
            mlp,
        },
        projections: std::array::from_fn(|i| OwnedProjection::of(&block.projections[i], 2 * i)),
        input_norm: block.input_norm.clone(),
        post_attention_norm: block.post_attention_norm.clone(),
        eps: block.eps as f32,
        attention_scale: scale as f32,
        sliding_window: block.sliding_window,
        cos: block.cos.contiguous()?,
        sin: block.sin.contiguous()?,
        stash,
    };
    x.contiguous()?.apply_op2(&token, op).map(Some)
}

/// Whether [`decoder_block`] computes this call itself.
fn takes(x: &Tensor, block: &DecoderBlock<'_>) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let frozen = |t: &Tensor| f32_cpu(t) && !t.track_op();
    let projections_fit = block.projections.iter().all(|p| {
        frozen(p.weight) && p.bias.is_none_or(frozen) && p.low_rank.is_none_or(|f| f32_cpu(f.a) && f32_cpu(f.b))
    });
    let tracked = x.track_op()
        || block
            .projections
            .iter()
            .filter_map(|p| p.low_rank)
            .any(|f| f.a.track_op() || f.b.track_op());
    tracked
        && f32_cpu(x)
        && x.rank() == 3
        && projections_fit
        && frozen(block.input_norm)
        && frozen(block.post_attention_norm)
        && f32_cpu(block.cos)
        && f32_cpu(block.sin)
}

/// One projection's forward pass on untracked operands.
fn project(x: &Tensor, projection: &DenseLowRank<'_>) -> Result<Tensor> {
    match projection.low_rank {
        Some(f) => fused::lora_linear(
            x,
            projection.weight,
            projection.bias,
            &f.a.detach(),
            &f.b.detach(),
            f.scale,
        ),
        None => fused::linear(x, projection.weight, projection.bias),
    }
}

/// A projection's operands, held by the op until its backward pass; `a`
/// and `b` are the tracked tensors, to ask autograd whether they train.
struct OwnedProjection {
    weight: Tensor,
    low_rank: Option<(Tensor, Tensor, f64)>,
    /// Where its `∂A` (and after it `∂B`) go in the stash: its relay link's.
    first_slot: usize,
}

impl OwnedProjection {
    fn of(projection: &DenseLowRank<'_>, first_slot: usize) -> Self {
        Self {
            weight: projection.weight.clone(),
            low_rank: projection.low_rank.map(|f| (f.a.clone(), f.b.clone(), f.scale)),
            first_slot,
        }
    }

    /// The gradients of this projection for output gradient `grad` and
    /// input `x`: `∂x` (added onto `grad_x_onto` when given), and `∂A`, `∂B`
    /// where autograd trains them, left in `stash` for the relay.
    fn backward(
        &self,
        grad: &Tensor,
        x: &Tensor,
        grad_x_onto: Option<Vec<f32>>,
        stash: &mut [Option<Tensor>],
    ) -> Result<Vec<f32>> {
        let low_rank = self.low_rank.as_ref().map(|(a, b, scale)| (a, b, *scale));
        let wanted = Wanted {
            x: true,
            a: low_rank.is_some_and(|(a, _, _)| a.track_op()),
            b: low_rank.is_some_and(|(_, b, _)| b.track_op()),
        };
        let grads = linear_grads_f32(grad, x, &self.weight, low_rank, wanted, grad_x_onto)?;
        stash[self.first_slot] = grads.a;
        stash[self.first_slot + 1] = grads.b;
        match grads.x {
            Some(grad_x) => Ok(grad_x),
            None => bail!("decoder block: a projection gave no input gradient"),
        }
    }
}

/// What the forward pass keeps for the backward pass: the operands each
/// op's gradient reads (`q` and `k` after RoPE).
struct Saved {
    h: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention: Tensor,
    x1: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    hidden: Tensor,
    mlp: Tensor,
}

/// The block's op: operands `x` and the relay's scalar; computes `x₁ + mlp`
/// from the saved forward pass.
struct BlockOp {
    saved: Saved,
    projections: [OwnedProjection; 7],
    input_norm: Tensor,
    post_attention_norm: Tensor,
    eps: f32,
    attention_scale: f32,
    sliding_window: Option<usize>,
    cos: Tensor,
    sin: Tensor,
    /// The adapters' gradients, two slots (`A`, `B`) per projection.
    stash: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "peft-decoder-block"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, x_layout: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = with_f32(&self.saved.x1, |x1| {
            with_f32(&self.saved.mlp, |mlp| {
                let mut y = x1.to_vec();
                add_assign(&mut y, mlp);
                Ok(y)
            })
        })?;
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        token: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = Timer::start(self.name(), Pass::Backward);
        let grad_x = self.backward(x, &grad.contiguous()?)?;
        let token_grad = if token.track_op() {
            Some(Tensor::zeros((), DType::F32, token.device())?)
        } else {
            None
        };
        Ok((Some(grad_x), token_grad))
    }
}

impl BlockOp {
    /// `∂x` for the block's output gradient `dy`; the adapters' gradients
    /// into the stash.
    fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let s = &self.saved;
        let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = &self.projections;
        let mut stash = self.stash.lock().unwrap_or_else(PoisonError::into_inner);
        let like = |values: Vec<f32>, t: &Tensor| Tensor::from_vec(values, t.shape(), t.device());

        // MLP: y = x₁ + down(silu(gate) · up).
        let d_hidden = like(down_proj.backward(dy, &s.hidden, None, &mut stash)?, &s.hidden)?;
        let (d_gate, d_up) = ops::silu_mul_grads(&s.gate, &s.up, &d_hidden)?;
        let dh2 = gate_proj.backward(&like(d_gate, &s.gate)?, &s.h2, None, &mut stash)?;
        let dh2 = up_proj.backward(&like(d_up, &s.up)?, &s.h2, Some(dh2), &mut stash)?;
        let (mut dx1, _) = rms_norm_grads(&s.x1, &self.post_attention_norm, &like(dh2, &s.h2)?, self.eps, false)?;
        with_f32(dy, |dy| {
            add_assign(&mut dx1, dy);
            Ok(())
        })?;
        let dx1 = like(dx1, x)?;

        // Attention: x₁ = x + o(attention(rope(q), rope(k), v)).
        let d_attention = like(o_proj.backward(&dx1, &s.attention, None, &mut stash)?, &s.q)?;
        let (dq, dk, dv) = attention_grads(
            &s.q,
            &s.k,
            &s.v,
            &d_attention,
            self.attention_scale,
            self.sliding_window,
        )?;
        let (dq, dk) = with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                let unrotate =
                    |g: &[f32], like: &Tensor| rotate_rows(g, cos, sin, like.dims(), RopeLayout::PositionsFirst, -1.0);
                Ok((unrotate(&dq, &s.q), unrotate(&dk, &s.k)))
            })
        })?;
        let flat = |values: Vec<f32>, heads: &Tensor| -> Result<Tensor> {
            let (batch, t, n, d) = heads.dims4()?;
            Tensor::from_vec(values, (batch, t, n * d), heads.device())
        };
        let dh = q_proj.backward(&flat(dq, &s.q)?, &s.h, None, &mut stash)?;
        let dh = k_proj.backward(&flat(dk, &s.k)?, &s.h, Some(dh), &mut stash)?;
        let dh = v_proj.backward(&flat(dv, &s.v)?, &s.h, Some(dh), &mut stash)?;
        let (mut dx, _) = rms_norm_grads(x, &self.input_norm, &like(dh, &s.h)?, self.eps, false)?;
        with_f32(&dx1, |dx1| {
            add_assign(&mut dx, dx1);
            Ok(())
        })?;
        like(dx, x)
    }
}

/// `dst += src`, elementwise, split over the threads.
fn add_assign(dst: &mut [f32], src: &[f32]) {
    const CHUNK: usize = 16 * 1024;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dst, src)| dst.iter_mut().zip(src).for_each(|(d, s)| *d += s));
}

/// One adapter's link in the relay: operands `A`, `B` and the previous
/// link's scalar; its output is a zero scalar, its gradients those the
/// block left in `stash`.
struct GradRelay {
    stash: Arc<Mutex<Vec<Option<Tensor>>>>,
    first_slot: usize,
}

impl CustomOp3 for GradRelay {
    fn name(&self) -> &'static str {
        "peft-decoder-block-relay"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        previous: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut stash = self.stash.lock().unwrap_or_else(PoisonError::into_inner);
        let (grad_a, grad_b) = (stash[self.first_slot].take(), stash[self.first_slot + 1].take());
        let grad_previous = if previous.track_op() {
            Some(Tensor::zeros((), DType::F32, previous.device())?)
        } else {
            None
        };
        Ok((grad_a, grad_b, grad_previous))
    }
}
