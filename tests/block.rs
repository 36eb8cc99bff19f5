//! `peft_core::block::decoder_block` against the same block written op by
//! op: output, the input's gradient and every adapter's gradients, over
//! random shapes (grouped-query heads, biases, a sliding window, projections
//! without an adapter, a frozen factor), and the calls it must leave to the
//! op-by-op path.
//!
//! The block runs in f32; the reference is the op-by-op composition in f64
//! from the same (rounded) inputs, whose gradients come from candle's
//! autograd.

use candle_core::{DType, Device, Tensor, Var};
use peft_core::block::{decoder_block, DecoderBlock, DenseLowRank, LowRankFactors};
use peft_core::{fused, ops};

mod support;
use support::rng::{probed_gradients, relative_error, Rng};

const TOLERANCE: f64 = 2e-5;

/// One projection's tensors: a frozen weight and bias, and maybe an
/// adapter whose `A` may be frozen (a plain tensor rather than a `Var`).
struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<(Var, Option<Var>, Tensor, f64)>,
}

impl Projection {
    fn random(rng: &mut Rng, out: usize, inp: usize, bias: bool, adapter: bool, a_frozen: bool) -> Self {
        let scale_in = 1.0 / (inp as f64).sqrt();
        let weight = rng.randn(&[out, inp], scale_in);
        let bias = bias.then(|| rng.randn(&[out], 0.1));
        let adapter = adapter.then(|| {
            let rank = 1 + rng.below(6);
            let a = rng.randn(&[rank, inp], scale_in);
            let b = Var::from_tensor(&rng.randn(&[out, rank], 0.3)).unwrap();
            let a_var = (!a_frozen).then(|| Var::from_tensor(&a).unwrap());
            (b, a_var, a, [0.5, 2.0][rng.below(2)])
        });
        Self { weight, bias, adapter }
    }

    /// `A` as the model holds it: the `Var` when it trains.
    fn a(&self) -> Option<&Tensor> {
        self.adapter
            .as_ref()
            .map(|(_, a_var, a, _)| a_var.as_ref().map_or(a, |v| v.as_tensor()))
    }

    fn operands(&self) -> DenseLowRank<'_> {
        DenseLowRank {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            low_rank: self.adapter.as_ref().map(|(b, _, _, scale)| LowRankFactors {
                a: self.a().unwrap(),
                b: b.as_tensor(),
                scale: *scale,
            }),
        }
    }

    /// The f64 reference's copy: the same values, the trainable ones as new `Var`s.
    fn to_f64(&self) -> Projection {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let var = |t: &Tensor| Var::from_tensor(&f64(t)).unwrap();
        Projection {
            weight: f64(&self.weight),
            bias: self.bias.as_ref().map(f64),
            adapter: self.adapter.as_ref().map(|(b, a_var, a, scale)| {
                (
                    var(b.as_tensor()),
                    a_var.as_ref().map(|v| var(v.as_tensor())),
                    f64(a),
                    *scale,
                )
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match &self.adapter {
            Some((b, _, _, scale)) => {
                fused::lora_linear(x, &self.weight, self.bias.as_ref(), self.a().unwrap(), b, *scale).unwrap()
            }
            None => fused::linear(x, &self.weight, self.bias.as_ref()).unwrap(),
        }
    }

    /// The trainable tensors, `B` then `A` when it trains.
    fn vars(&self) -> Vec<&Var> {
        match &self.adapter {
            Some((b, a_var, _, _)) => std::iter::once(b).chain(a_var.as_ref()).collect(),
            None => Vec::new(),
        }
    }
}

struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    norms: [Tensor; 2],
    projections: Vec<Projection>,
    cos: Tensor,
    sin: Tensor,
}

impl Case {
    fn random(rng: &mut Rng, t: usize) -> Self {
        let kv_heads = 1 + rng.below(2);
        let heads = kv_heads * (1 + rng.below(3));
        let head_dim = 2 * (1 + rng.below(4));
        let hidden = 4 + rng.below(12);
        let inter = 4 + rng.below(20);
        let qkv_bias = rng.below(2) == 0;
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let shapes = [
            (q_width, hidden, qkv_bias),
            (kv_width, hidden, qkv_bias),
            (kv_width, hidden, qkv_bias),
            (hidden, q_width, false),
            (inter, hidden, false),
            (inter, hidden, false),
            (hidden, inter, false),
        ];
        let projections = shapes
            .iter()
            .map(|&(out, inp, bias)| {
                let adapter = rng.below(4) != 0;
                let a_frozen = rng.below(4) == 0;
                Projection::random(rng, out, inp, bias, adapter, a_frozen)
            })
            .collect();
        let positions: Vec<f32> = (0..t * head_dim / 2)
            .map(|i| (i / (head_dim / 2)) as f32 * 0.3f32.powi((i % (head_dim / 2)) as i32))
            .collect();
        let angles = Tensor::from_vec(positions, (t, head_dim / 2), &Device::Cpu).unwrap();
        Case {
            heads,
            kv_heads,
            head_dim,
            window: [None, Some(1 + rng.below(t))][rng.below(2)],
            norms: [0, 1].map(|_| (rng.randn(&[hidden], 0.1) + 1.0).unwrap()),
            projections,
            cos: angles.cos().unwrap(),
            sin: angles.sin().unwrap(),
        }
    }

    fn block(&self) -> DecoderBlock<'_> {
        let p = |i: usize| self.projections[i].operands();
        DecoderBlock {
            input_norm: &self.norms[0],
            post_attention_norm: &self.norms[1],
            eps: 1e-6,
            projections: [p(0), p(1), p(2), p(3), p(4), p(5), p(6)],
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            sliding_window: self.window,
            cos: &self.cos,
            sin: &self.sin,
        }
    }

    fn to_f64(&self) -> Case {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        Case {
            norms: [f64(&self.norms[0]), f64(&self.norms[1])],
            projections: self.projections.iter().map(Projection::to_f64).collect(),
            cos: f64(&self.cos),
            sin: f64(&self.sin),
            ..*self
        }
    }

    /// The block op by op, as `peft_models::llama` writes it.
    fn op_by_op(&self, x: &Tensor) -> Tensor {
        let (b, t, _) = x.dims3().unwrap();
        let p = &self.projections;
        let split = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim)).unwrap();
        let h = ops::rms_norm(x, &self.norms[0], 1e-6).unwrap();
        let q = ops::rope_thd(&split(p[0].forward(&h), self.heads), &self.cos, &self.sin).unwrap();
        let k = ops::rope_thd(&split(p[1].forward(&h), self.kv_heads), &self.cos, &self.sin).unwrap();
        let v = split(p[2].forward(&h), self.kv_heads);
        let scale = (self.head_dim as f64).powf(-0.5);
        let attention = ops::windowed_causal_attention(&q, &k, &v, scale, self.window)
            .unwrap()
            .reshape((b, t, self.heads * self.head_dim))
            .unwrap();
        let x1 = (x + p[3].forward(&attention)).unwrap();
        let h2 = ops::rms_norm(&x1, &self.norms[1], 1e-6).unwrap();
        let hidden = ops::silu_mul(&p[4].forward(&h2), &p[5].forward(&h2)).unwrap();
        (&x1 + p[6].forward(&hidden)).unwrap()
    }
}

/// Output and every gradient of the block against the op-by-op reference.
#[test]
fn decoder_block_matches_the_ops_it_fuses() {
    let mut rng = Rng(0xb10c_0001);
    for round in 0..24 {
        let (batch, t) = (1 + rng.below(2), 1 + rng.below(9));
        let case = Case::random(&mut rng, t);
        let reference = case.to_f64();
        let hidden = case.norms[0].dims()[0];
        let x_values = rng.randn(&[batch, t, hidden], 1.0);
        // The first layer's input comes from a frozen embedding: untracked.
        let x_tracked = rng.below(3) != 0;
        let x_var = Var::from_tensor(&x_values).unwrap();
        let x = if x_tracked {
            x_var.as_tensor().clone()
        } else {
            x_values.clone()
        };
        let what = format!(
            "round {round}: batch {batch}, t {t}, heads {}/{}, head_dim {}, window {:?}, x tracked {x_tracked}",
            case.heads, case.kv_heads, case.head_dim, case.window
        );

        let tracked = x_tracked || case.projections.iter().any(|p| !p.vars().is_empty());
        let Some(y) = decoder_block(&x, &case.block()).unwrap() else {
            assert!(!tracked, "{what}: the block refused a call it takes");
            continue;
        };
        let x64 = Var::from_tensor(&x_values.to_dtype(DType::F64).unwrap()).unwrap();
        let y_ref = reference.op_by_op(x64.as_tensor());
        let err = relative_error(&y, &y_ref);
        assert!(err <= TOLERANCE, "{what}: output relative error {err:e}");

        let (grads, grads_ref) = probed_gradients(&y, &y_ref, &mut rng);
        let mut pairs: Vec<(String, &Var, &Var)> = Vec::new();
        if x_tracked {
            pairs.push(("x".into(), &x_var, &x64));
        }
        for (i, (p, p64)) in case.projections.iter().zip(&reference.projections).enumerate() {
            for (j, (v, v64)) in p.vars().into_iter().zip(p64.vars()).enumerate() {
                pairs.push((format!("projection {i}, {}", ["B", "A"][j]), v, v64));
            }
        }
        for (name, v, v64) in pairs {
            let expected = grads_ref.get(v64).expect("the reference reaches every variable");
            let got = grads.get(v).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
            let err = relative_error(got, expected);
            assert!(err <= TOLERANCE, "{what}: gradient of {name}: relative error {err:e}");
        }
        // A frozen `A` gets no gradient.
        for p in &case.projections {
            if let Some((_, None, a, _)) = &p.adapter {
                assert!(grads.get(a).is_none(), "{what}: a frozen A got a gradient");
            }
        }
    }
}

/// Calls the block leaves to the op-by-op path: another dtype, a trained
/// norm weight, nothing tracked.
#[test]
fn decoder_block_leaves_what_it_does_not_take() {
    let mut rng = Rng(0xb10c_0002);
    let case = Case::random(&mut rng, 4);
    let hidden = case.norms[0].dims()[0];
    let x = Var::from_tensor(&rng.randn(&[1, 4, hidden], 1.0)).unwrap();
    assert!(decoder_block(&x, &case.block()).unwrap().is_some());

    let f64_case = case.to_f64();
    let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
    let x64 = Var::from_tensor(&x64).unwrap();
    assert!(decoder_block(&x64, &f64_case.block()).unwrap().is_none(), "f64");

    let trained_norm = Var::from_tensor(&case.norms[0]).unwrap();
    let block = DecoderBlock {
        input_norm: trained_norm.as_tensor(),
        ..case.block()
    };
    assert!(decoder_block(&x, &block).unwrap().is_none(), "a trained norm weight");

    let frozen: Vec<Projection> = case
        .projections
        .iter()
        .map(|p| Projection {
            weight: p.weight.clone(),
            bias: p.bias.clone(),
            adapter: None,
        })
        .collect();
    let operands: Vec<DenseLowRank<'_>> = frozen.iter().map(Projection::operands).collect();
    let block = DecoderBlock {
        projections: operands.try_into().unwrap(),
        ..case.block()
    };
    let untracked = x.as_tensor().detach();
    assert!(decoder_block(&untracked, &block).unwrap().is_none(), "nothing tracked");
}

/// `Layer::dense_low_rank`, which decides whether a projection joins the
/// block: the base alone, one LoRA without active dropout, or nothing.
#[test]
fn dense_low_rank_describes_only_what_the_block_computes() {
    use peft_core::{Layer, LoraAdapter};
    let mut rng = Rng(0xb10c_0003);
    let lora = |rng: &mut Rng, dropout: f32| {
        let a = Var::from_tensor(&rng.randn(&[2, 3], 0.5)).unwrap();
        let b = Var::from_tensor(&rng.randn(&[4, 2], 0.5)).unwrap();
        Box::new(LoraAdapter::new(a, b, 1.5, dropout).unwrap())
    };
    let mut layer = Layer::new(rng.randn(&[4, 3], 0.5), Some(rng.randn(&[4], 0.1)));
    let plain = layer.dense_low_rank(true).expect("a dense base alone");
    assert!(plain.low_rank.is_none() && plain.bias.is_some());

    layer.add_adapter("default", lora(&mut rng, 0.0)).unwrap();
    let adapted = layer.dense_low_rank(true).expect("one LoRA without dropout");
    let factors = adapted.low_rank.expect("its factors");
    assert_eq!(
        (factors.a.dims(), factors.b.dims(), factors.scale),
        (&[2, 3][..], &[4, 2][..], 1.5)
    );

    // A merged adapter is in the weight: the base alone again.
    layer.merge().unwrap();
    assert!(layer.dense_low_rank(true).unwrap().low_rank.is_none());
    layer.unmerge().unwrap();

    // Two active adapters: not one low-rank change.
    layer.add_adapter("second", lora(&mut rng, 0.0)).unwrap();
    layer.set_active_adapters(&["default", "second"]);
    assert!(layer.dense_low_rank(false).is_none());

    // Dropout changes the adapter's input while training only.
    let mut dropped = Layer::new(rng.randn(&[4, 3], 0.5), None);
    dropped.add_adapter("default", lora(&mut rng, 0.1)).unwrap();
    assert!(dropped.dense_low_rank(true).is_none());
    assert!(dropped.dense_low_rank(false).unwrap().low_rank.is_some());
}
