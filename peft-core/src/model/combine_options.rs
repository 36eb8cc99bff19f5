//! The arguments of [`PeftModel::add_weighted_adapter`](crate::PeftModel::add_weighted_adapter)
//! besides the adapters and weights: [`Combination`] (PEFT's
//! `combination_type`), [`MajoritySign`] and [`CombineOptions`].

use std::str::FromStr;

use crate::error::{PeftError, Result};
use crate::model::combine_math::Rule;

/// How [`add_weighted_adapter`](crate::PeftModel::add_weighted_adapter) combines
/// adapters: PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Combination {
    /// `svd` (PEFT's default): `ΔW = Σ wᵢ ΔWᵢ`, then its SVD truncated to
    /// `svd_rank` (default: the largest source rank). Any ranks.
    #[default]
    Svd,
    /// `linear`: `A = Σ ±√|wᵢ sᵢ| Aᵢ`, `B = Σ √|wᵢ sᵢ| Bᵢ` (the sign on `A`).
    /// Equal ranks only; not `Σ wᵢ ΔWᵢ` (cross terms), a rough approximation.
    Linear,
    /// `cat`: `A` and `B` stacked, `wᵢ sᵢ` on each `Aᵢ`: exactly
    /// `Σ wᵢ ΔWᵢ`, rank the sum of the sources' ranks.
    Cat,
    /// `ties` on `A` and `B` as `linear` does: magnitude pruning to
    /// `density`, sign election, disjoint mean. Equal ranks only.
    Ties,
    /// `ties` on the `ΔWᵢ`, then SVD.
    TiesSvd,
    /// `dare_linear` on `A` and `B`: random pruning to `density` rescaled
    /// by `1/density`, then the weighted sum. Equal ranks only.
    DareLinear,
    /// `dare_ties` on `A` and `B`: random pruning, then TIES's election and
    /// disjoint mean. Equal ranks only.
    DareTies,
    /// `dare_linear` on the `ΔWᵢ`, then SVD.
    DareLinearSvd,
    /// `dare_ties` on the `ΔWᵢ`, then SVD.
    DareTiesSvd,
    /// `magnitude_prune` on `A` and `B`: magnitude pruning to `density`,
    /// then the weighted sum. Equal ranks only.
    MagnitudePrune,
    /// `magnitude_prune` on the `ΔWᵢ`, then SVD.
    MagnitudePruneSvd,
}

impl Combination {
    /// Every combination type, in PEFT's order.
    pub const ALL: [Combination; 11] = [
        Combination::Svd,
        Combination::Linear,
        Combination::Cat,
        Combination::Ties,
        Combination::TiesSvd,
        Combination::DareTies,
        Combination::DareLinear,
        Combination::DareTiesSvd,
        Combination::DareLinearSvd,
        Combination::MagnitudePrune,
        Combination::MagnitudePruneSvd,
    ];

    /// PEFT's name (`"ties_svd"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Combination::Svd => "svd",
            Combination::Linear => "linear",
            Combination::Cat => "cat",
            Combination::Ties => "ties",
            Combination::TiesSvd => "ties_svd",
            Combination::DareLinear => "dare_linear",
            Combination::DareTies => "dare_ties",
            Combination::DareLinearSvd => "dare_linear_svd",
            Combination::DareTiesSvd => "dare_ties_svd",
            Combination::MagnitudePrune => "magnitude_prune",
            Combination::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the combined `ΔW` is factored by SVD (the `*svd` types).
    pub fn uses_svd(self) -> bool {
        self.as_str().ends_with("svd")
    }

    /// Whether the type prunes, and so needs a `density`.
    pub fn uses_density(self) -> bool {
        !matches!(self, Combination::Svd | Combination::Linear | Combination::Cat)
    }

    /// Whether the type draws random masks (DARE).
    pub fn is_random(self) -> bool {
        self.as_str().starts_with("dare")
    }

    pub(crate) fn rule(self) -> Rule {
        match self {
            Combination::Svd | Combination::Linear | Combination::Cat => Rule::Arithmetic,
            Combination::Ties | Combination::TiesSvd => Rule::Ties,
            Combination::DareLinear | Combination::DareLinearSvd => Rule::DareLinear,
            Combination::DareTies | Combination::DareTiesSvd => Rule::DareTies,
            Combination::MagnitudePrune | Combination::MagnitudePruneSvd => Rule::MagnitudePrune,
        }
    }
}

impl std::fmt::Display for Combination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Combination {
    type Err = PeftError;

    /// PEFT's name: `svd`, `linear`, `cat`, `ties`, `ties_svd`,
    /// `dare_linear`, `dare_ties`, `dare_linear_svd`, `dare_ties_svd`,
    /// `magnitude_prune`, `magnitude_prune_svd`.
    fn from_str(name: &str) -> Result<Self> {
        Combination::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .ok_or_else(|| PeftError::InvalidConfig {
                field: "combination_type",
                value: format!("{name:?}"),
                reason: "one of svd, linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, \
                         dare_ties_svd, magnitude_prune, magnitude_prune_svd",
            })
    }
}

/// How TIES elects each entry's sign: PEFT's `majority_sign_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// `total`: the sign of the sum of the (pruned, unweighted) entries.
    #[default]
    Total,
    /// `frequency`: the sign most entries have.
    Frequency,
}

impl FromStr for MajoritySign {
    type Err = PeftError;

    /// `total` or `frequency`.
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "total" => Ok(MajoritySign::Total),
            "frequency" => Ok(MajoritySign::Frequency),
            _ => Err(PeftError::InvalidConfig {
                field: "majority_sign_method",
                value: format!("{name:?}"),
                reason: "one of total, frequency",
            }),
        }
    }
}

/// The arguments of [`add_weighted_adapter`](crate::PeftModel::add_weighted_adapter)
/// besides the adapters and weights, with PEFT's names and defaults.
///
/// ```
/// use peft_core::{Combination, CombineOptions, MajoritySign};
/// let options = CombineOptions::new(Combination::Ties).density(0.5).majority_sign(MajoritySign::Frequency);
/// assert_eq!(options.density, Some(0.5));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CombineOptions {
    /// `combination_type` (default `svd`).
    pub combination: Combination,
    /// `svd_rank`: the new rank of an SVD type (default: the largest
    /// source rank).
    pub svd_rank: Option<usize>,
    /// `svd_clamp`: a quantile in [0, 1]; the SVD factors are clamped to
    /// ± that quantile of their entries.
    pub svd_clamp: Option<f64>,
    /// `svd_full_matrices` (default true). The factors kept are the same
    /// either way; accepted for PEFT's signature.
    pub svd_full_matrices: bool,
    /// `density`: the fraction of entries pruning keeps, in (0, 1];
    /// required by the pruning types (`ties*`, `dare_*`, `magnitude_prune*`).
    pub density: Option<f64>,
    /// `majority_sign_method` of the TIES types (default `total`).
    pub majority_sign_method: MajoritySign,
}

impl Default for CombineOptions {
    fn default() -> Self {
        CombineOptions::new(Combination::default())
    }
}

impl CombineOptions {
    /// PEFT's defaults with `combination`.
    pub fn new(combination: Combination) -> Self {
        CombineOptions {
            combination,
            svd_rank: None,
            svd_clamp: None,
            svd_full_matrices: true,
            density: None,
            majority_sign_method: MajoritySign::Total,
        }
    }

    /// Sets `density`.
    pub fn density(mut self, density: f64) -> Self {
        self.density = Some(density);
        self
    }

    /// Sets `majority_sign_method`.
    pub fn majority_sign(mut self, method: MajoritySign) -> Self {
        self.majority_sign_method = method;
        self
    }

    /// Sets `svd_rank`.
    pub fn svd_rank(mut self, rank: usize) -> Self {
        self.svd_rank = Some(rank);
        self
    }

    /// Sets `svd_clamp`.
    pub fn svd_clamp(mut self, quantile: f64) -> Self {
        self.svd_clamp = Some(quantile);
        self
    }

    /// Sets `svd_full_matrices`.
    pub fn svd_full_matrices(mut self, full: bool) -> Self {
        self.svd_full_matrices = full;
        self
    }

    /// The density the rules use: the given one, or 1 for the types that
    /// do not prune. A missing or out-of-range density is an error.
    pub(crate) fn checked(&self, combination: Combination) -> Result<f64> {
        if let Some(density) = self.density {
            if !(density > 0.0 && density <= 1.0) {
                return Err(PeftError::InvalidConfig {
                    field: "density",
                    value: density.to_string(),
                    reason: "must lie in (0, 1]",
                });
            }
        }
        if let Some(q) = self.svd_clamp {
            if !(0.0..=1.0).contains(&q) {
                return Err(PeftError::InvalidConfig {
                    field: "svd_clamp",
                    value: q.to_string(),
                    reason: "a quantile, must lie in [0, 1]",
                });
            }
        }
        if self.svd_rank == Some(0) {
            return Err(PeftError::InvalidConfig {
                field: "svd_rank",
                value: "0".into(),
                reason: "the rank must be at least 1",
            });
        }
        match (combination.uses_density(), self.density) {
            (false, _) => Ok(1.0),
            (true, Some(density)) => Ok(density),
            (true, None) => Err(PeftError::InvalidConfig {
                field: "density",
                value: "None".into(),
                reason: "ties, dare_* and magnitude_prune* need a density in (0, 1]",
            }),
        }
    }
}
