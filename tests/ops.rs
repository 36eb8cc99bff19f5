//! The fused kernels of `peft_core::ops` against the plain candle
//! compositions, values and gradients, over random shapes.
//!
//! The kernels run in f32; the references are the same formulas written with
//! candle ops in f64 from the same (rounded) inputs.

use candle_core::{DType, Tensor, Var, D};
use peft_core::ops;

mod support;
use support::rng::{probed_gradients, relative_error, Rng};

/// f32 kernels against f64 references: sums over up to a few hundred terms.
const TOLERANCE: f64 = 2e-5;

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

fn f64_var(t: &Tensor) -> Var {
    var(&t.to_dtype(DType::F64).unwrap())
}

/// Runs `fused` on f32 variables and `reference` on f64 copies of the same
/// inputs, and checks the output and the gradient of `sum(y * probe)` with
/// respect to every input.
fn check(
    what: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Var]) -> Tensor,
    reference: impl Fn(&[Var]) -> Tensor,
    rng: &mut Rng,
) {
    let vars: Vec<Var> = inputs.iter().map(var).collect();
    let vars64: Vec<Var> = inputs.iter().map(f64_var).collect();
    let y = fused(&vars);
    let y_ref = reference(&vars64);
    assert_eq!(y.dtype(), DType::F32, "{what}");
    let err = relative_error(&y, &y_ref);
    assert!(err <= TOLERANCE, "{what}: output relative error {err:e}");

    let (grads, grads_ref) = probed_gradients(&y, &y_ref, rng);
    for (i, (v, v64)) in vars.iter().zip(&vars64).enumerate() {
        let expected = grads_ref.get(v64).expect("the reference reaches every input");
        let got = grads
            .get(v)
            .unwrap_or_else(|| panic!("{what}: no gradient for input {i}"));
        let err = relative_error(got, expected);
        assert!(err <= TOLERANCE, "{what}: gradient of input {i} relative error {err:e}");
    }
}

/// A few leading dimensions and a last one, sometimes large enough for the
/// kernels to split rows across threads.
fn random_dims(rng: &mut Rng) -> Vec<usize> {
    let mut dims: Vec<usize> = (0..1 + rng.below(3)).map(|_| 1 + rng.below(6)).collect();
    dims.push(if rng.below(3) == 0 {
        200 + rng.below(300)
    } else {
        1 + rng.below(40)
    });
    dims
}

#[test]
fn rms_norm_matches_rms_norm_slow() {
    let mut rng = Rng(0x0b5_0001);
    for _ in 0..30 {
        let dims = random_dims(&mut rng);
        let d = *dims.last().unwrap();
        let eps = [1e-6, 1e-5, 0.1][rng.below(3)];
        let inputs = [rng.tensor(&dims, DType::F32), rng.tensor(&[d], DType::F32)];
        check(
            &format!("rms_norm {dims:?} eps {eps}"),
            &inputs,
            |v| ops::rms_norm(&v[0], &v[1], eps).unwrap(),
            |v| candle_nn::ops::rms_norm_slow(&v[0], &v[1], eps as f32).unwrap(),
            &mut rng,
        );
    }
}

#[test]
fn softmax_last_dim_matches_candle_nn_softmax() {
    let mut rng = Rng(0x0b5_0002);
    for _ in 0..30 {
        let dims = random_dims(&mut rng);
        // Logits of a few units, as attention scores are.
        let x = (rng.tensor(&dims, DType::F32) * 6.0).unwrap();
        check(
            &format!("softmax {dims:?}"),
            &[x],
            |v| ops::softmax_last_dim(&v[0]).unwrap(),
            |v| candle_nn::ops::softmax(&v[0], D::Minus1).unwrap(),
            &mut rng,
        );
    }
}

#[test]
fn silu_mul_matches_silu_times_up() {
    let mut rng = Rng(0x0b5_0003);
    for _ in 0..30 {
        let dims = random_dims(&mut rng);
        let gate = (rng.tensor(&dims, DType::F32) * 5.0).unwrap();
        let up = rng.tensor(&dims, DType::F32);
        check(
            &format!("silu_mul {dims:?}"),
            &[gate, up],
            |v| ops::silu_mul(&v[0], &v[1]).unwrap(),
            |v| (v[0].silu().unwrap() * v[1].as_tensor()).unwrap(),
            &mut rng,
        );
    }
}

/// One random rotary case: `(batch, heads, t, d)`, and tables `cos`, `sin`
/// `[t_max, d / 2]` (`t_max >= t`) in f32 and in f64.
struct RopeCase {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    tables: (Tensor, Tensor),
    tables64: (Tensor, Tensor),
}

impl RopeCase {
    fn random(rng: &mut Rng) -> Self {
        let (b, h, t, half) = (1 + rng.below(3), 1 + rng.below(4), 1 + rng.below(20), 1 + rng.below(16));
        let t_max = t + rng.below(5);
        let angles = (rng.tensor(&[t_max, half], DType::F32) * 3.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let tables64 = (cos.to_dtype(DType::F64).unwrap(), sin.to_dtype(DType::F64).unwrap());
        Self {
            b,
            h,
            t,
            d: 2 * half,
            tables: (cos, sin),
            tables64,
        }
    }
}

#[test]
fn rope_matches_rope_slow() {
    let mut rng = Rng(0x0b5_0004);
    for _ in 0..30 {
        let RopeCase {
            b,
            h,
            t,
            d,
            tables: (cos, sin),
            tables64: (cos64, sin64),
        } = RopeCase::random(&mut rng);
        let x = rng.tensor(&[b, h, t, d], DType::F32);
        check(
            &format!("rope [{b}, {h}, {t}, {d}] tables of {}", cos.dim(0).unwrap()),
            &[x],
            |v| ops::rope(&v[0], &cos, &sin).unwrap(),
            |v| candle_nn::rotary_emb::rope_slow(&v[0], &cos64, &sin64).unwrap(),
            &mut rng,
        );
    }
}

#[test]
fn rope_thd_matches_rope_slow_on_transposed_heads() {
    let mut rng = Rng(0x0b5_0009);
    for _ in 0..30 {
        let RopeCase {
            b,
            h,
            t,
            d,
            tables: (cos, sin),
            tables64: (cos64, sin64),
        } = RopeCase::random(&mut rng);
        let x = rng.tensor(&[b, t, h, d], DType::F32);
        check(
            &format!("rope_thd [{b}, {t}, {h}, {d}]"),
            &[x],
            |v| ops::rope_thd(&v[0], &cos, &sin).unwrap(),
            |v| {
                let heads_first = v[0].transpose(1, 2).unwrap().contiguous().unwrap();
                let y = candle_nn::rotary_emb::rope_slow(&heads_first, &cos64, &sin64).unwrap();
                y.transpose(1, 2).unwrap()
            },
            &mut rng,
        );
    }
}

/// `softmax(q kᵀ · scale + causal mask) v` with key/value heads repeated, in
/// plain candle ops, on `[batch, t, heads, d]` inputs; with `window`, query
/// position `p` sees key `j` only when `p - window < j <= p`.
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
    let heads_first = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    let (q, k, v) = (heads_first(q), heads_first(k), heads_first(v));
    let (b, heads, t_q, d) = q.dims4().unwrap();
    let (_, kv_heads, t_k, _) = k.dims4().unwrap();
    let n_rep = heads / kv_heads;
    let repeat = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kv_heads, n_rep, t_k, d))
            .unwrap()
            .reshape((b, heads, t_k, d))
            .unwrap()
    };
    let (k, v) = (repeat(&k), repeat(&v));
    let mask: Vec<f64> = (0..t_q * t_k)
        .map(|i| {
            let (position, key) = (i / t_k + (t_k - t_q), i % t_k);
            let too_old = window.is_some_and(|w| key + w <= position);
            if key > position || too_old {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t_q, t_k), q.device()).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
    probs.matmul(&v).unwrap().transpose(1, 2).unwrap()
}

#[test]
fn causal_attention_matches_the_plain_formula() {
    let mut rng = Rng(0x0b5_0005);
    for _ in 0..30 {
        let (b, kv_heads, n_rep) = (1 + rng.below(2), 1 + rng.below(3), 1 + rng.below(3));
        let (t_q, d) = (1 + rng.below(24), 1 + rng.below(20));
        let t_k = t_q + if rng.below(2) == 0 { 0 } else { rng.below(6) };
        let scale = (d as f64).powf(-0.5);
        let inputs = [
            rng.tensor(&[b, t_q, kv_heads * n_rep, d], DType::F32),
            rng.tensor(&[b, t_k, kv_heads, d], DType::F32),
            rng.tensor(&[b, t_k, kv_heads, d], DType::F32),
        ];
        check(
            &format!(
                "attention q [{b}, {t_q}, {}, {d}] kv [{b}, {t_k}, {kv_heads}, {d}]",
                kv_heads * n_rep
            ),
            &inputs,
            |v| ops::causal_attention(&v[0], &v[1], &v[2], scale).unwrap(),
            |v| reference_attention(&v[0], &v[1], &v[2], scale, None),
            &mut rng,
        );
    }
}

#[test]
fn windowed_causal_attention_matches_the_plain_formula() {
    let mut rng = Rng(0x0b5_0009);
    for _ in 0..30 {
        let (b, kv_heads, n_rep) = (1 + rng.below(2), 1 + rng.below(3), 1 + rng.below(3));
        let (t_q, d) = (1 + rng.below(24), 1 + rng.below(20));
        let t_k = t_q + if rng.below(2) == 0 { 0 } else { rng.below(6) };
        // Windows shorter than, equal to and longer than the sequence.
        let window = 1 + rng.below(t_k + 2);
        let scale = (d as f64).powf(-0.5);
        let inputs = [
            rng.tensor(&[b, t_q, kv_heads * n_rep, d], DType::F32),
            rng.tensor(&[b, t_k, kv_heads, d], DType::F32),
            rng.tensor(&[b, t_k, kv_heads, d], DType::F32),
        ];
        check(
            &format!("attention t_q {t_q} t_k {t_k} window {window}"),
            &inputs,
            |v| ops::windowed_causal_attention(&v[0], &v[1], &v[2], scale, Some(window)).unwrap(),
            |v| reference_attention(&v[0], &v[1], &v[2], scale, Some(window)),
            &mut rng,
        );
    }
    // The candle path (f64) applies the same window.
    let q = rng.tensor(&[1, 6, 2, 4], DType::F64);
    let k = rng.tensor(&[1, 6, 2, 4], DType::F64);
    let fused_path = ops::windowed_causal_attention(&q, &k, &k, 0.5, Some(3)).unwrap();
    let reference = reference_attention(&q, &k, &k, 0.5, Some(3));
    assert!(relative_error(&fused_path, &reference) < 1e-12);
    assert!(ops::windowed_causal_attention(&q, &k, &k, 0.5, Some(0)).is_err());
}

#[test]
fn cross_entropy_matches_candle_nn_cross_entropy() {
    let mut rng = Rng(0x0b5_0006);
    for _ in 0..30 {
        let (n, classes) = (1 + rng.below(40), 2 + rng.below(300));
        let logits = (rng.tensor(&[n, classes], DType::F32) * 8.0).unwrap();
        let targets: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
        let targets = Tensor::new(targets, logits.device()).unwrap();
        check(
            &format!("cross_entropy [{n}, {classes}]"),
            &[logits],
            |v| ops::cross_entropy(&v[0], &targets).unwrap(),
            |v| candle_nn::loss::cross_entropy(&v[0], &targets).unwrap(),
            &mut rng,
        );
    }
}

#[test]
fn other_dtypes_take_the_candle_compositions() {
    let mut rng = Rng(0x0b5_0007);
    let x = rng.tensor(&[3, 8], DType::F64);
    let y = ops::softmax_last_dim(&x).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let expected = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
    assert_eq!(relative_error(&y, &expected), 0.0);
    let w = rng.tensor(&[8], DType::F64);
    let y = ops::rms_norm(&x, &w, 1e-6).unwrap();
    assert_eq!(
        relative_error(&y, &candle_nn::ops::rms_norm_slow(&x, &w, 1e-6).unwrap()),
        0.0
    );
}

#[test]
fn bad_shapes_and_targets_are_errors_naming_them() {
    let mut rng = Rng(0x0b5_0008);
    let x = rng.tensor(&[2, 3, 4, 8], DType::F32);
    let short_tables = rng.tensor(&[2, 4], DType::F32);
    let err = ops::rope(&x, &short_tables, &short_tables).unwrap_err().to_string();
    assert!(err.contains("[2, 4]") && err.contains("[2, 3, 4, 8]"), "{err}");

    let k = rng.tensor(&[2, 2, 4, 8], DType::F32);
    let err = ops::causal_attention(&x, &k, &k, 1.0).unwrap_err().to_string();
    assert!(err.contains("[2, 3, 4, 8]") && err.contains("[2, 2, 4, 8]"), "{err}");

    let w = rng.tensor(&[7], DType::F32);
    let err = ops::rms_norm(&x, &w, 1e-6).unwrap_err().to_string();
    assert!(err.contains("[7]"), "{err}");

    let logits = rng.tensor(&[2, 5], DType::F32);
    let targets = Tensor::new(&[1u32, 5], logits.device()).unwrap();
    let err = ops::cross_entropy(&logits, &targets).unwrap_err().to_string();
    assert!(err.contains("target 5") && err.contains("below 5"), "{err}");
}
