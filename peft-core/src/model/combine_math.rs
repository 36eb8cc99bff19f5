//! The arithmetic of [`add_weighted_adapter`](crate::PeftModel::add_weighted_adapter),
//! on plain `f64` buffers: PEFT's `peft/utils/merge_utils.py` (task
//! arithmetic, magnitude pruning, TIES, DARE) and the SVD of
//! `_svd_generalized_task_arithmetic_weighted_adapter`.

use candle_core::{DType, Device};

use crate::error::Result;
use crate::model::combine_options::MajoritySign;

/// How the task tensors are merged once weighted (PEFT's functions of
/// `merge_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// `task_arithmetic`: `Σ wᵢ tᵢ`.
    Arithmetic,
    /// `magnitude_prune`: each `tᵢ` keeps its `density` largest magnitudes, then `Σ wᵢ tᵢ`.
    MagnitudePrune,
    /// `ties`: magnitude pruning, sign election, disjoint mean.
    Ties,
    /// `dare_linear`: random pruning rescaled by `1/density`, then `Σ wᵢ tᵢ`.
    DareLinear,
    /// `dare_ties`: random pruning rescaled, sign election, disjoint mean.
    DareTies,
}

/// Merges `tensors` (all of one length) with `weights` by `rule`.
pub(crate) fn merge(
    rule: Rule,
    tensors: &[Vec<f64>],
    weights: &[f64],
    density: f64,
    sign: MajoritySign,
) -> Result<Vec<f64>> {
    let pruned: Vec<Vec<f64>> = match rule {
        Rule::Arithmetic => tensors.to_vec(),
        Rule::MagnitudePrune | Rule::Ties => tensors.iter().map(|t| magnitude_prune(t, density)).collect(),
        Rule::DareLinear | Rule::DareTies => tensors
            .iter()
            .map(|t| random_prune(t, density))
            .collect::<Result<_>>()?,
    };
    Ok(match rule {
        Rule::Arithmetic | Rule::MagnitudePrune | Rule::DareLinear => weighted_sum(&pruned, weights),
        Rule::Ties | Rule::DareTies => disjoint_merge(&pruned, weights, sign),
    })
}

fn weighted_sum(tensors: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let len = tensors.first().map_or(0, Vec::len);
    (0..len)
        .map(|j| tensors.iter().zip(weights).map(|(t, w)| t[j] * w).sum())
        .collect()
}

/// PEFT's `magnitude_based_pruning`: the `int(density · n)` entries of
/// largest magnitude stay, the others become 0 (`density ≥ 1` keeps all).
pub(crate) fn magnitude_prune(tensor: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    // Python's int() truncates toward zero.
    let keep = (density * tensor.len() as f64) as usize;
    let mut order: Vec<usize> = (0..tensor.len()).collect();
    order.sort_by(|&i, &j| tensor[j].abs().total_cmp(&tensor[i].abs()).then(i.cmp(&j)));
    let mut pruned = vec![0.0; tensor.len()];
    for &i in &order[..keep] {
        pruned[i] = tensor[i];
    }
    pruned
}

/// PEFT's `random_pruning(rescale=True)`: each entry kept with probability
/// `density` and divided by it (`density ≥ 1` keeps all, draws nothing).
/// The draws come from [`crate::random`]: seeded inside
/// [`with_seed`](crate::random::with_seed), where PEFT uses `torch.bernoulli`.
pub(crate) fn random_prune(tensor: &[f64], density: f64) -> Result<Vec<f64>> {
    if density >= 1.0 {
        return Ok(tensor.to_vec());
    }
    let draws: Vec<f32> =
        crate::kernels::random::uniform(0.0, 1.0, tensor.len(), DType::F32, &Device::Cpu)?.to_vec1()?;
    Ok(tensor
        .iter()
        .zip(draws)
        .map(|(&x, u)| if f64::from(u) < density { x / density } else { 0.0 })
        .collect())
}

/// PEFT's `calculate_majority_sign_mask` then `disjoint_merge`: per entry,
/// the sign of `Σ tᵢ` (`total`) or of `Σ sign(tᵢ)` (`frequency`) wins (0
/// counts as +), and the weighted entries of that sign are averaged.
fn disjoint_merge(tensors: &[Vec<f64>], weights: &[f64], method: MajoritySign) -> Vec<f64> {
    let len = tensors.first().map_or(0, Vec::len);
    (0..len)
        .map(|j| {
            let votes: f64 = tensors
                .iter()
                .map(|t| match method {
                    MajoritySign::Total => t[j],
                    MajoritySign::Frequency => sign(t[j]),
                })
                .sum();
            let majority = if votes >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0, 0usize);
            for (t, w) in tensors.iter().zip(weights) {
                if sign(t[j]) == majority {
                    sum += t[j] * w;
                    count += 1;
                }
            }
            sum / count.max(1) as f64
        })
        .collect()
}

/// `torch.sign`: -1, 0 or 1.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `torch.quantile(values, q)` (linear interpolation between the two
/// nearest ranks).
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let position = q * last as f64;
    let below = (position.floor() as usize).min(last);
    let above = (below + 1).min(last);
    let fraction = position - below as f64;
    sorted[below] + fraction * (sorted[above] - sorted[below])
}

/// `ΔW` `[rows, cols]` (row-major) split by its SVD into `B = U_k S_k`
/// `[rows, k]` and `A = V_kᵀ` `[k, cols]`, as PEFT's
/// `U, S, Vh = torch.linalg.svd(ΔW)` then `U[:, :k] @ diag(S[:k])`,
/// `Vh[:k]`; with `clamp`, both clamped to ±`quantile(B ∪ A, clamp)`.
/// `Err` with a message when the SVD fails.
pub(crate) fn svd_factors(
    delta: &[f64],
    rows: usize,
    cols: usize,
    k: usize,
    clamp: Option<f64>,
) -> std::result::Result<(Vec<f64>, Vec<f64>), String> {
    if delta.iter().any(|v| !v.is_finite()) {
        return Err("ΔW holds NaN or infinite values".to_owned());
    }
    let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| delta[i * cols + j]);
    let svd = m
        .thin_svd()
        .map_err(|e| format!("the SVD of ΔW [{rows}, {cols}] did not converge ({e:?})"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut b: Vec<f64> = (0..rows).flat_map(|i| (0..k).map(move |j| u[(i, j)] * s[j])).collect();
    let mut a: Vec<f64> = (0..k).flat_map(|j| (0..cols).map(move |c| v[(c, j)])).collect();
    // Singular vectors have a sign freedom, which LAPACK and faer resolve
    // differently: fix it, so the clamp's quantile does not depend on the
    // library. The largest entry (by magnitude, the first of equals) of
    // each column of B is made positive.
    for j in 0..k {
        let largest = (0..rows).fold(0.0f64, |best, i| {
            let x = b[i * k + j];
            if x.abs() > best.abs() {
                x
            } else {
                best
            }
        });
        if largest < 0.0 {
            for i in 0..rows {
                b[i * k + j] = -b[i * k + j];
            }
            for x in &mut a[j * cols..(j + 1) * cols] {
                *x = -*x;
            }
        }
    }
    if let Some(q) = clamp {
        let all: Vec<f64> = b.iter().chain(&a).copied().collect();
        let high = quantile(&all, q);
        let low = -high;
        // torch.clamp(x, low, high) = min(max(x, low), high).
        for x in b.iter_mut().chain(a.iter_mut()) {
            *x = x.max(low).min(high);
        }
    }
    Ok((b, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_prune_keeps_the_largest() {
        let t = [0.1, -3.0, 2.0, -0.5];
        assert_eq!(magnitude_prune(&t, 0.5), [0.0, -3.0, 2.0, 0.0]);
        // int(0.6 * 4) = 2
        assert_eq!(magnitude_prune(&t, 0.6), [0.0, -3.0, 2.0, 0.0]);
        assert_eq!(magnitude_prune(&t, 1.0), t);
    }

    #[test]
    fn ties_elects_a_sign_and_averages_it() {
        let tensors = [vec![1.0, -2.0, 0.0], vec![3.0, 1.0, 0.0], vec![-1.0, 0.5, 0.0]];
        let weights = [1.0, 1.0, 2.0];
        // column 0: total 3 > 0, + wins: (1 + 3) / 2; column 1: total -0.5, - wins: -2 / 1.
        let total = merge(Rule::Ties, &tensors, &weights, 1.0, MajoritySign::Total).unwrap();
        assert_eq!(total, [2.0, -2.0, 0.0]);
        // frequency: column 1 has two + against one -: (1 + 2·0.5) / 2.
        let frequency = merge(Rule::Ties, &tensors, &weights, 1.0, MajoritySign::Frequency).unwrap();
        assert_eq!(frequency, [2.0, 1.0, 0.0]);
    }

    #[test]
    fn quantile_interpolates_as_torch() {
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 1.0), 4.0);
        assert!((quantile(&[0.0, 10.0], 0.9) - 9.0).abs() < 1e-12);
    }

    #[test]
    fn svd_factors_rebuild_a_low_rank_matrix() {
        // rank 1: [[1, 2], [2, 4], [3, 6]]
        let delta = [1.0, 2.0, 2.0, 4.0, 3.0, 6.0];
        let (b, a) = svd_factors(&delta, 3, 2, 1, None).unwrap();
        for i in 0..3 {
            for j in 0..2 {
                assert!((b[i] * a[j] - delta[i * 2 + j]).abs() < 1e-12);
            }
        }
    }
}
