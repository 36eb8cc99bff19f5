//! The fused kernels of `peft_core::fused` against the plain formula, values
//! and gradients, over random shapes, ranks, scales and dtypes.
//!
//! The reference is computed with candle's own ops in f64 from the same
//! (rounded) inputs, so one tolerance per dtype covers the kernels' rounding.

use candle_core::{DType, Tensor, Var};
use peft_core::fused;

mod support;
use support::rng::{relative_error, Rng};

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        other => unreachable!("no tolerance for {other:?}"),
    }
}

/// One random layer: `x` `[lead.., in]`, `W` `[out, in]`, optional bias, `A` `[r, in]`, `B` `[out, r]`.
struct Case {
    dtype: DType,
    x: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// Weights for the loss `sum(y * probe)`, so every output element gets its own gradient.
    probe: Tensor,
}

impl Case {
    fn random(rng: &mut Rng) -> Self {
        let dtype = [DType::F32, DType::F64, DType::F16][rng.below(3)];
        let (in_dim, out_dim, rank) = (1 + rng.below(80), 1 + rng.below(80), 1 + rng.below(24));
        // Two or three leading dimensions' worth of tokens, sometimes enough
        // for the products to be split across threads.
        let tokens = if rng.below(4) == 0 {
            64 + rng.below(200)
        } else {
            1 + rng.below(20)
        };
        let lead: Vec<usize> = if rng.below(2) == 0 {
            vec![tokens]
        } else {
            vec![1 + rng.below(3), tokens]
        };
        let mut x_dims = lead.clone();
        x_dims.push(in_dim);
        let mut y_dims = lead;
        y_dims.push(out_dim);
        Self {
            dtype,
            x: rng.tensor(&x_dims, dtype),
            weight: rng.tensor(&[out_dim, in_dim], dtype),
            bias: (rng.below(2) == 0).then(|| rng.tensor(&[out_dim], dtype)),
            a: rng.tensor(&[rank, in_dim], dtype),
            b: rng.tensor(&[out_dim, rank], dtype),
            scale: 0.1 + 4.0 * rng.uniform().abs(),
            probe: rng.tensor(&y_dims, dtype),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{:?} x {:?} W {:?} bias {} r {} scale {:.3}",
            self.dtype,
            self.x.dims(),
            self.weight.dims(),
            self.bias.is_some(),
            self.a.dim(0).unwrap(),
            self.scale
        )
    }
}

/// `y` and the gradients of `sum(y * probe)` by the plain formula in f64.
fn reference(case: &Case, with_lora: bool) -> (Tensor, [Tensor; 3]) {
    let f64_var = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
    let (x, a, b) = (f64_var(&case.x), f64_var(&case.a), f64_var(&case.b));
    let w = case.weight.to_dtype(DType::F64).unwrap();
    let mut y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    if let Some(bias) = &case.bias {
        y = y.broadcast_add(&bias.to_dtype(DType::F64).unwrap()).unwrap();
    }
    if with_lora {
        let down = x.broadcast_matmul(&a.t().unwrap()).unwrap();
        let lora = (down.broadcast_matmul(&b.t().unwrap()).unwrap() * case.scale).unwrap();
        y = (y + lora).unwrap();
    }
    let probe = case.probe.to_dtype(DType::F64).unwrap();
    let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| {
        grads
            .get(v)
            .cloned()
            .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
    };
    (y.detach(), [grad(&x), grad(&a), grad(&b)])
}

/// Runs `fused::lora_linear` on `case` and checks its output and the
/// gradients of `sum(y * probe)` for `x`, `A` and `B` against [`reference`];
/// returns the output.
fn check_lora_case(case: &Case) -> Tensor {
    let what = case.describe();
    let (x, a, b) = (
        Var::from_tensor(&case.x).unwrap(),
        Var::from_tensor(&case.a).unwrap(),
        Var::from_tensor(&case.b).unwrap(),
    );
    let y = fused::lora_linear(&x, &case.weight, case.bias.as_ref(), &a, &b, case.scale).unwrap();
    let grads = (&y * &case.probe).unwrap().sum_all().unwrap().backward().unwrap();
    let (y_ref, [gx_ref, ga_ref, gb_ref]) = reference(case, true);
    let tol = tolerance(case.dtype);
    for (name, got, expected) in [
        ("y", &y, &y_ref),
        ("grad x", grads.get(&x).unwrap(), &gx_ref),
        ("grad A", grads.get(&a).unwrap(), &ga_ref),
        ("grad B", grads.get(&b).unwrap(), &gb_ref),
    ] {
        let err = relative_error(got, expected);
        assert!(err <= tol, "{name}: relative error {err:e} > {tol:e} for {what}");
    }
    y
}

#[test]
fn lora_linear_matches_the_plain_formula_in_values_and_gradients() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for _ in 0..60 {
        let case = Case::random(&mut rng);
        assert!(
            fused::is_fused(&case.x, &case.weight, case.bias.as_ref()),
            "{}",
            case.describe()
        );
        let y = check_lora_case(&case);
        assert_eq!(y.dtype(), case.dtype, "{}", case.describe());
    }
}

/// Products large enough for the multi-threaded path of the kernels.
#[test]
fn large_products_match_the_plain_formula() {
    let mut rng = Rng(0x5eed_1234_abcd_0003);
    for (tokens, in_dim, out_dim, rank) in [(200, 130, 150, 8), (96, 256, 72, 64), (130, 70, 300, 100)] {
        let dtype = DType::F32;
        check_lora_case(&Case {
            dtype,
            x: rng.tensor(&[2, tokens, in_dim], dtype),
            weight: rng.tensor(&[out_dim, in_dim], dtype),
            bias: Some(rng.tensor(&[out_dim], dtype)),
            a: rng.tensor(&[rank, in_dim], dtype),
            b: rng.tensor(&[out_dim, rank], dtype),
            scale: 0.7,
            probe: rng.tensor(&[2, tokens, out_dim], dtype),
        });
    }
}

/// `fused::matmul`, the product the kernels use (faer's for large f32 and
/// f64 products), against candle's in f64, for row-major and transposed
/// operands.
#[test]
fn matmul_matches_candles_product() {
    let mut rng = Rng(0x5eed_1234_abcd_0004);
    for (m, k, n) in [(3, 5, 7), (64, 16, 300), (300, 200, 90), (16, 508, 400)] {
        for dtype in [DType::F32, DType::F64, DType::F16] {
            let a = rng.tensor(&[m, k], dtype);
            let b_t = rng.tensor(&[n, k], dtype);
            let b = b_t.t().unwrap();
            let expected = a
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&b.to_dtype(DType::F64).unwrap())
                .unwrap();
            for (what, b) in [("transposed", b.clone()), ("row-major", b.contiguous().unwrap())] {
                let product = fused::matmul(&a, &b).unwrap();
                assert_eq!(product.dtype(), dtype);
                let error = relative_error(&product, &expected);
                // f16 sums k products in f16's precision.
                let tolerance = if dtype == DType::F16 { 1e-2 } else { tolerance(dtype) };
                assert!(
                    error <= tolerance,
                    "{m}x{k}x{n} {dtype:?} {what}: relative error {error:e}"
                );
            }
        }
    }
}

#[test]
fn linear_matches_candle_nn_and_gives_the_input_gradient() {
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    for _ in 0..40 {
        let case = Case::random(&mut rng);
        let what = case.describe();
        let x = Var::from_tensor(&case.x).unwrap();
        let y = fused::linear(&x, &case.weight, case.bias.as_ref()).unwrap();
        let grads = (&y * &case.probe).unwrap().sum_all().unwrap().backward().unwrap();

        let (y_ref, [gx_ref, _, _]) = reference(&case, false);
        let tol = tolerance(case.dtype);
        let y_err = relative_error(&y, &y_ref);
        let gx_err = relative_error(grads.get(&x).unwrap(), &gx_ref);
        assert!(y_err <= tol, "y: relative error {y_err:e} for {what}");
        assert!(gx_err <= tol, "grad x: relative error {gx_err:e} for {what}");
    }
}

#[test]
fn non_contiguous_input_gives_the_same_result() {
    let mut rng = Rng(7);
    let dtype = DType::F32;
    let (x_t, w) = (rng.tensor(&[24, 10], dtype), rng.tensor(&[12, 24], dtype));
    let (a, b) = (rng.tensor(&[3, 24], dtype), rng.tensor(&[12, 3], dtype));
    // `x` is `[10, 24]` as a transposed view.
    let x = x_t.t().unwrap();
    assert!(!x.is_contiguous());
    let fused_y = fused::lora_linear(&x, &w, None, &a, &b, 0.5).unwrap();
    let plain_y = fused::lora_linear(&x.contiguous().unwrap(), &w, None, &a, &b, 0.5).unwrap();
    assert_eq!(relative_error(&fused_y, &plain_y), 0.0);
}

#[test]
fn only_tracked_operands_get_gradients() {
    let mut rng = Rng(11);
    let dtype = DType::F32;
    let x = rng.tensor(&[5, 6], dtype); // a plain tensor: the output of a frozen embedding, say
    let w = rng.tensor(&[4, 6], dtype);
    let a = Var::from_tensor(&rng.tensor(&[2, 6], dtype)).unwrap();
    let b = Var::from_tensor(&rng.tensor(&[4, 2], dtype)).unwrap();
    let y = fused::lora_linear(&x, &w, None, &a, &b, 1.0).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&a).is_some() && grads.get(&b).is_some());
    assert!(grads.get(&x).is_none());
    assert!(grads.get(&w).is_none(), "the frozen weight gets no gradient");
}

#[test]
fn operands_the_kernel_does_not_take_go_through_plain_candle_ops() {
    let mut rng = Rng(13);
    let x = Var::from_tensor(&rng.tensor(&[5, 6], DType::F32)).unwrap();
    let w = rng.tensor(&[4, 6], DType::F32);
    // A trained weight keeps its gradient: the plain path.
    let w_var = Var::from_tensor(&w).unwrap();
    assert!(!fused::is_fused(&x, &w_var, None));
    let y = fused::linear(&x, &w_var, None).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let expected = x
        .as_tensor()
        .sum(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((4, 6))
        .unwrap();
    assert_eq!(relative_error(grads.get(&w_var).unwrap(), &expected), 0.0);

    // bf16 has no kernel here; the plain path still computes it.
    let x16 = x.as_tensor().to_dtype(DType::BF16).unwrap();
    let w16 = w.to_dtype(DType::BF16).unwrap();
    assert!(!fused::is_fused(&x16, &w16, None));
    let y16 = fused::linear(&x16, &w16, None).unwrap();
    let y32 = fused::linear(x.as_tensor(), &w, None).unwrap();
    assert!(relative_error(&y16, &y32) < 2e-2);

    // Mismatched shapes are an error naming both.
    let a = rng.tensor(&[2, 5], DType::F32);
    let b = rng.tensor(&[4, 2], DType::F32);
    let err = fused::lora_linear(&x, &w, None, &a, &b, 1.0).unwrap_err().to_string();
    assert!(err.contains("[4, 6]") && err.contains("[2, 5]"), "{err}");
}
