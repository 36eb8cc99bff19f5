//! Rotary position embeddings as transformers 5.24 computes them
//! (`modeling_rope_utils.py`): the default, `linear`, `dynamic` (NTK) and
//! `llama3` types, every frequency in float32.
//!
//! Only the frequencies `inv_freq` differ between the types (their
//! attention factor is 1): the angle of pair `i` at position `p` is
//! `p · inv_freq[i]`.
//!
//! - default: `inv_freq[i] = 1 / theta^(2i / d)`;
//! - `linear`: the default divided by `factor`;
//! - `dynamic`: for a sequence of `L > M = max_position_embeddings`
//!   positions, the default with the base
//!   `theta · (factor · L / M - (factor - 1))^(d / (d - 2))`; up to `M`, the
//!   default. transformers keeps the last `L` as state in the module; here
//!   `L` is the length of the sequence so far, which gives what transformers
//!   gives for a fresh model and for generation through the KV cache (the
//!   keys in the cache keep the rotation they were made with);
//! - `llama3`: the default divided by `factor` for wavelengths above
//!   `original_max_position_embeddings / low_freq_factor`, kept below
//!   `original_max_position_embeddings / high_freq_factor`, smoothly mixed
//!   between.

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use crate::error::ModelError;

/// `rope_parameters` of `config.json` (transformers 5), or `rope_scaling`
/// (transformers 4, which names the type `type` or `rope_type`).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    /// The base of the rotary frequencies (transformers 5 keeps it here).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `default`, `linear`, `dynamic` or `llama3` are implemented.
    #[serde(default = "default_rope_type", alias = "type")]
    pub rope_type: String,
    /// The scaling factor of `linear`, `dynamic` and `llama3`.
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3`: wavelengths above `original / low_freq_factor` are scaled.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: wavelengths below `original / high_freq_factor` are kept.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context the model was first trained for.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_type() -> String {
    "default".to_owned()
}

/// Which RoPE, with its numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeKind {
    /// `1 / theta^(2i / d)`.
    Default,
    /// The default divided by `factor`.
    Linear {
        /// The divisor of the frequencies.
        factor: f64,
    },
    /// Dynamic NTK scaling past `max_positions`.
    Dynamic {
        /// How much the base grows with the length.
        factor: f64,
        /// `max_position_embeddings`: up to it, the default.
        max_positions: usize,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_positions: usize,
    },
}

/// A model's rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// The base of the frequencies.
    pub theta: f64,
    /// The type and its numbers.
    pub kind: RopeKind,
}

impl Rope {
    /// The default RoPE with base `theta`.
    pub fn default_with(theta: f64) -> Self {
        Rope {
            theta,
            kind: RopeKind::Default,
        }
    }

    /// The RoPE `parameters` describe (`None`: the default), with `theta`
    /// when they do not hold it and `max_positions` for `dynamic`.
    /// Refuses a type or a number that is missing or not implemented,
    /// naming the field (`field` is where `parameters` came from).
    pub fn from_parameters(
        parameters: Option<&RopeParameters>,
        field: &'static str,
        theta: f64,
        max_positions: Option<usize>,
    ) -> std::result::Result<Self, ModelError> {
        let Some(p) = parameters else {
            return Ok(Rope::default_with(theta));
        };
        let theta = p.rope_theta.unwrap_or(theta);
        let missing = |what: &'static str| ModelError::Unsupported {
            field,
            value: format!("{:?} without {what}", p.rope_type),
            reason: "this RoPE type needs that number",
        };
        let factor = || p.factor.ok_or_else(|| missing("factor"));
        let kind = match p.rope_type.as_str() {
            "default" => RopeKind::Default,
            "linear" => RopeKind::Linear { factor: factor()? },
            "dynamic" => RopeKind::Dynamic {
                factor: factor()?,
                max_positions: max_positions.ok_or_else(|| missing("max_position_embeddings"))?,
            },
            "llama3" => RopeKind::Llama3 {
                factor: factor()?,
                low_freq_factor: p.low_freq_factor.ok_or_else(|| missing("low_freq_factor"))?,
                high_freq_factor: p.high_freq_factor.ok_or_else(|| missing("high_freq_factor"))?,
                original_max_positions: p
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?,
            },
            other => {
                return Err(ModelError::Unsupported {
                    field,
                    value: format!("{other:?}"),
                    reason: "the RoPE types implemented are default, linear, dynamic and llama3",
                })
            }
        };
        Ok(Rope { theta, kind })
    }

    /// The frequencies `[d / 2]` for a sequence of `length` positions.
    pub fn inv_freq(&self, head_dim: usize, length: usize) -> Vec<f32> {
        let d = head_dim as f32;
        let default =
            |base: f32| -> Vec<f32> { (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d)).collect() };
        match self.kind {
            RopeKind::Default => default(self.theta as f32),
            RopeKind::Linear { factor } => default(self.theta as f32)
                .into_iter()
                .map(|f| f / factor as f32)
                .collect(),
            RopeKind::Dynamic { factor, max_positions } if length > max_positions => {
                // In float32, as transformers computes it inside forward.
                let (factor, length, max) = (factor as f32, length as f32, max_positions as f32);
                let base = self.theta as f32 * (factor * length / max - (factor - 1.0)).powf(d / (d - 2.0));
                default(base)
            }
            RopeKind::Dynamic { .. } => default(self.theta as f32),
            RopeKind::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
                let old = original_max_positions as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                default(self.theta as f32)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The rotary tables `cos`, `sin` `[t, head_dim / 2]` for positions
    /// `start..start + t` of a sequence that then has `start + t` positions
    /// (transformers repeats the table over both halves of a head;
    /// [`peft_core::ops::rope`] takes the half).
    pub fn tables(&self, start: usize, t: usize, head_dim: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inv_freq = Tensor::from_vec(self.inv_freq(head_dim, start + t), (1, head_dim / 2), device)?;
        let positions = Tensor::arange(start as u32, (start + t) as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((t, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| ((x - y) / y).abs() < 1e-6)
    }

    #[test]
    fn frequencies_match_transformers() {
        // The values tests/fixtures/llama_rope_scaling/CASE.md lists (d = 8).
        let dynamic = Rope {
            theta: 10_000.0,
            kind: RopeKind::Dynamic {
                factor: 2.0,
                max_positions: 8,
            },
        };
        assert!(close(&dynamic.inv_freq(8, 8), &[1.0, 0.1, 0.01, 0.001]));
        assert!(close(
            &dynamic.inv_freq(8, 12),
            &[1.0, 0.079_370_05, 0.006_299_605, 0.0005]
        ));
        assert!(close(
            &dynamic.inv_freq(8, 16),
            &[1.0, 0.069_336_13, 0.004_807_5, 0.000_333_333_3]
        ));
        let linear = Rope {
            theta: 10_000.0,
            kind: RopeKind::Linear { factor: 2.0 },
        };
        assert!(close(&linear.inv_freq(8, 1), &[0.5, 0.05, 0.005, 0.0005]));
    }
}
