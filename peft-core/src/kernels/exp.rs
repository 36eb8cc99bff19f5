//! The exponential over rows of f32 values, for the ops that spend their time
//! in it: softmax, attention probabilities, cross entropy and SwiGLU.
//!
//! `f32::exp` is a call into the C library per value, which no loop around
//! it can vectorize: on the bench model about 14 million of them a training
//! step. [`exp`] is the same function as a polynomial (Cephes' `expf`:
//! range reduction by `ln 2`, a degree-6 polynomial, the power of two built
//! from its bits; within 2 ulp of the exact value), written without calls,
//! so that the loops here, compiled for AVX2 and FMA where the CPU has them,
//! run 8 values at a time. A sum of exponentials is a map, then a sum in 8
//! partial sums: one loop doing both does not vectorize.

/// Below this, `e^x` is under the smallest normal f32: [`exp`] gives 0.
const SMALLEST: f32 = -87.336_55;
/// Above this, `e^x` overflows f32: [`exp`] gives infinity.
const LARGEST: f32 = 88.722_84;

/// `e^x`, within 2 ulp; 0 below the normal range, infinity above it, NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in few bits, so `n · ln 2` is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer held in the low mantissa bits:
    // n as a float and as an integer without a float-to-int conversion
    // (which does not vectorize, for its saturation).
    const ROUNDER: f32 = 12_582_912.0;
    let clamped = x.clamp(SMALLEST, LARGEST);
    let shifted = clamped * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let polynomial =
        (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r
            + 0.5)
            * (r * r)
            + r
            + 1.0;
    // 2^n as two factors, each a normal f32 over the whole range of n.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let half = n >> 1;
    let power = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let value = polynomial * power(half) * power(n - half);
    if x < SMALLEST {
        0.0
    } else if x > LARGEST {
        f32::INFINITY
    } else {
        value
    }
}

/// Defines a `pub(crate)` function from a portable body, which runs compiled
/// for AVX2 and FMA on an x86-64 CPU that has them.
macro_rules! multiversioned {
    ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::has_avx2_fma() {
                // SAFETY: the CPU has the features `avx2` is compiled for.
                return unsafe { avx2($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}

/// Lanes of the partial sums and maxima.
const LANES: usize = 8;

multiversioned! {
    /// The largest value of `row` (negative infinity for an empty row; NaN
    /// values are skipped, as `f32::max` skips them).
    fn max(row: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane = lane.max(v);
            }
        }
        rest.iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

multiversioned! {
    /// `dst[i] = e^(src[i] - shift)`; returns their sum.
    fn exp_shifted(dst: &mut [f32], src: &[f32], shift: f32) -> f32 {
        // A map, then a sum: a loop that does both does not vectorize.
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s - shift);
        }
        sum(dst)
    }
}

multiversioned! {
    /// `values[i] = e^(values[i] - shift)`; returns their sum.
    fn exp_shifted_in_place(values: &mut [f32], shift: f32) -> f32 {
        for v in values.iter_mut() {
            *v = exp(*v - shift);
        }
        sum(values)
    }
}

multiversioned! {
    /// `Σ e^(row[i] - shift)`.
    fn sum_exp_shifted(row: &[f32], shift: f32) -> f32 {
        let mut block = [0f32; 256];
        let mut total = 0f32;
        for chunk in row.chunks(block.len()) {
            let block = &mut block[..chunk.len()];
            for (b, &v) in block.iter_mut().zip(chunk) {
                *b = exp(v - shift);
            }
            total += sum(block);
        }
        total
    }
}

/// `Σ values[i]` in [`LANES`] partial sums (inlined into its callers, so
/// compiled for their features).
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (sum, &v) in sums.iter_mut().zip(chunk) {
            *sum += v;
        }
    }
    sums.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

multiversioned! {
    /// `dst[i] = scale · e^(src[i] - shift)`.
    fn scaled_exp_shifted(dst: &mut [f32], src: &[f32], shift: f32, scale: f32) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s - shift) * scale;
        }
    }
}

multiversioned! {
    /// SwiGLU: `y[i] = silu(gate[i]) · up[i]`, `silu(a) = a σ(a)`.
    fn silu_mul(y: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(gate).zip(up) {
            *y = a * b / (1.0 + exp(-a));
        }
    }
}

multiversioned! {
    /// SwiGLU's gradients for output gradient `g`:
    /// `∂gate = g · up · σ(a)(1 + a(1 - σ(a)))`, `∂up = g · a σ(a)`.
    fn silu_mul_backward(grad_gate: &mut [f32], grad_up: &mut [f32], gate: &[f32], up: &[f32], g: &[f32]) {
        let outputs = grad_gate.iter_mut().zip(grad_up.iter_mut());
        for (((grad_gate, grad_up), &a), (&b, &g)) in outputs.zip(gate).zip(up.iter().zip(g)) {
            let s = 1.0 / (1.0 + exp(-a));
            *grad_gate = g * b * s * (1.0 + a * (1.0 - s));
            *grad_up = g * a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of the exact value (f64's) over the whole range, and
    /// the edges: underflow to 0, overflow to infinity, NaN.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x < 88.7 {
            let got = exp(x);
            let exact = f64::from(x).exp();
            let ulp = f64::from(f32::from_bits(got.to_bits() + 1) - got);
            assert!(
                (f64::from(got) - exact).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, exact {exact}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The row functions against their plain loops, with lengths that leave a
    /// remainder after the lanes.
    #[test]
    fn row_functions_equal_their_plain_loops() {
        for len in [0, 1, 7, 8, 9, 33, 100] {
            let src: Vec<f32> = (0..len).map(|i| ((i as f32) * 0.71).sin() * 5.0).collect();
            let largest = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&src), largest, "len {len}");
            let plain: Vec<f32> = src.iter().map(|&v| exp(v - 1.5)).collect();
            let plain_sum: f32 = plain.iter().sum();
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);

            let mut dst = vec![0f32; len];
            assert!(close(exp_shifted(&mut dst, &src, 1.5), plain_sum), "len {len}");
            assert_eq!(dst, plain);
            let mut in_place = src.clone();
            assert!(close(exp_shifted_in_place(&mut in_place, 1.5), plain_sum));
            assert_eq!(in_place, plain);
            assert!(close(sum_exp_shifted(&src, 1.5), plain_sum));
            scaled_exp_shifted(&mut dst, &src, 1.5, 0.25);
            assert!(dst.iter().zip(&plain).all(|(d, p)| *d == p * 0.25));

            let up: Vec<f32> = src.iter().map(|v| v * 0.5 - 1.0).collect();
            let mut y = vec![0f32; len];
            silu_mul(&mut y, &src, &up);
            let (mut grad_gate, mut grad_up) = (vec![0f32; len], vec![0f32; len]);
            let g: Vec<f32> = src.iter().map(|v| v.cos()).collect();
            silu_mul_backward(&mut grad_gate, &mut grad_up, &src, &up, &g);
            for i in 0..len {
                let (a, b) = (f64::from(src[i]), f64::from(up[i]));
                let s = 1.0 / (1.0 + (-a).exp());
                let within = |got: f32, want: f64| (f64::from(got) - want).abs() <= 1e-5 * want.abs().max(1.0);
                assert!(within(y[i], a * s * b), "silu_mul[{i}]");
                let dg = f64::from(g[i]) * b * s * (1.0 + a * (1.0 - s));
                assert!(within(grad_gate[i], dg), "∂gate[{i}]");
                assert!(within(grad_up[i], f64::from(g[i]) * a * s), "∂up[{i}]");
            }
        }
    }
}
