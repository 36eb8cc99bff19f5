//! LoRA on a linear layer, as PEFT's `lora.Linear`: `y = base(x) + s · B(A(dropout(x)))`.

use candle_core::{DType, Module, Result as CandleResult, Tensor, Var};

use crate::error::Result;
use crate::kernels::fused::lora_linear;
use crate::kernels::low_rank::add_low_rank;
use crate::kernels::reduce::{dtype_epsilon, dtype_max, max_abs_of};
use crate::kinds::lora::PEFT_TYPE;
use crate::layer::{adapter_identity, Adapter, Composition, ForwardContext, LayerWeights, LowRankFactors};

/// A LoRA adapter on one linear layer: trainable `A` `[r, in]` and `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
}

impl LoraAdapter {
    /// An adapter from its tensors; `a` is `[r, in]`, `b` is `[out, r]`.
    pub fn new(a: Var, b: Var, scale: f64, dropout: f32) -> CandleResult<Self> {
        let (r, _) = a.dims2()?;
        let (_, r_b) = b.dims2()?;
        if r != r_b {
            candle_core::bail!(
                "LoRA rank mismatch: lora_A is {:?} and lora_B is {:?}",
                a.dims(),
                b.dims()
            );
        }
        Ok(Self { a, b, scale, dropout })
    }

    /// `A`, `[r, in]`.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// `B`, `[out, r]`.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    /// The scaling `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// The dropout probability on the adapter's input in training mode.
    pub fn dropout(&self) -> f32 {
        self.dropout
    }

    /// `dropout(x)` when `training` and the probability is positive, else `x`.
    pub(crate) fn dropout_input(&self, x: &Tensor, training: bool) -> CandleResult<Tensor> {
        if training && self.dropout > 0.0 {
            crate::kernels::random::dropout(x, self.dropout)
        } else {
            Ok(x.clone())
        }
    }

    /// `s · B(A(x))`, with no dropout.
    pub(crate) fn lora_output(&self, x: &Tensor) -> CandleResult<Tensor> {
        // candle_nn::Linear keeps its fast reshape-to-2D matmul path; the
        // scale is applied on the narrow [.., r] activation.
        let down = candle_nn::Linear::new(self.a.as_tensor().clone(), None).forward(x)?;
        candle_nn::Linear::new(self.b.as_tensor().clone(), None).forward(&(down * self.scale)?)
    }

    /// `s · B A`, `[out, in]`, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> CandleResult<Tensor> {
        (self.b.matmul(self.a.as_tensor())? * self.scale)?.to_dtype(dtype)
    }

    /// `weights` with `s · B A` added to the weight (taken out when
    /// `take_out`): in one CPU pass where [`add_low_rank`] applies, else by
    /// candle's ops on [`delta_weight`](Self::delta_weight).
    fn add_to(&self, weights: &LayerWeights, take_out: bool) -> Result<LayerWeights> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let scale = if take_out { -self.scale } else { self.scale };
        if let Some(weight) = add_low_rank(&weights.weight, b, a, scale)? {
            return Ok(LayerWeights {
                weight,
                bias: weights.bias.clone(),
            });
        }
        let delta = self.delta_weight(weights.weight.dtype())?;
        if take_out {
            weights.minus(&delta)
        } else {
            weights.plus(&delta)
        }
    }
}

impl Adapter for LoraAdapter {
    adapter_identity!(PEFT_TYPE, Composition::Additive);

    fn forward_with_base(&self, x: &Tensor, cx: ForwardContext<'_>) -> Result<Option<Tensor>> {
        // With dropout active the adapter sees another input than the base.
        let dropout_active = cx.training() && self.dropout > 0.0;
        match cx.dense() {
            Some((weight, bias)) if !dropout_active => {
                let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
                Ok(Some(lora_linear(x, weight, bias, a, b, self.scale)?))
            }
            _ => Ok(None),
        }
    }

    fn forward(&self, x: &Tensor, base_output: Tensor, cx: ForwardContext<'_>) -> Result<Tensor> {
        let x = self.dropout_input(x, cx.training())?;
        Ok((base_output + self.lora_output(&x)?)?)
    }

    fn low_rank(&self, cx: ForwardContext<'_>) -> Option<LowRankFactors<'_>> {
        // What `forward_with_base` computes: no dropout, a dense base.
        if (cx.training() && self.dropout > 0.0) || cx.dense().is_none() {
            return None;
        }
        Some(LowRankFactors {
            a: self.a.as_tensor(),
            b: self.b.as_tensor(),
            scale: self.scale,
        })
    }

    fn delta_weight(&self, dtype: DType) -> Result<Option<Tensor>> {
        Ok(Some(LoraAdapter::delta_weight(self, dtype)?))
    }

    fn merge(&self, base: &LayerWeights) -> Result<LayerWeights> {
        self.add_to(base, false)
    }

    fn unmerge(&self, merged: &LayerWeights) -> Result<LayerWeights> {
        self.add_to(merged, true)
    }

    fn merge_bound(&self) -> Result<Option<f64>> {
        // |(B A)ᵢⱼ| ≤ Σₖ maxᵢ |Bᵢₖ| · maxⱼ |Aₖⱼ|; twice that, scaled or not,
        // must fit the adapter's dtype (the product is formed in it).
        let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
        let (a, b) = (values(self.a.as_tensor())?, values(self.b.as_tensor())?);
        let in_dim = a.len() / self.rank().max(1);
        let a_rows = a.chunks(in_dim.max(1)).map(|row| max_abs_of(row.iter().copied()));
        let mut b_columns = vec![0f64; self.rank()];
        for row in b.chunks(self.rank().max(1)) {
            for (largest, v) in b_columns.iter_mut().zip(row) {
                *largest = max_abs_of([*largest, *v].into_iter());
            }
        }
        let product: f64 = a_rows.zip(&b_columns).map(|(a, b)| a * b).sum();
        // Rounding: each of the r products and sums, the scaling and the cast
        // moves a value by at most one unit of the dtype's precision.
        let rounding = 1.0 + (self.rank() + 2) as f64 * dtype_epsilon(self.a.dtype());
        let bound = product * self.scale.abs() * rounding;
        let limit = dtype_max(self.a.dtype()) / 2.0;
        Ok((product.is_finite() && product < limit && bound < limit).then_some(bound))
    }

    fn trainable_vars(&self) -> Vec<(&'static str, Var)> {
        vec![("lora_A.weight", self.a.clone()), ("lora_B.weight", self.b.clone())]
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::LoraAdapter;
    use crate::kernels::reduce::max_abs;
    use crate::layer::Adapter;

    fn adapter(a: Tensor, b: Tensor, scale: f64) -> LoraAdapter {
        LoraAdapter::new(Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap(), scale, 0.0).unwrap()
    }

    #[test]
    fn merge_bound_holds_every_change_the_merge_makes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (seed, (out, r, inp)) in [(5, 3, 7), (64, 16, 48), (1, 1, 1), (9, 32, 4)].into_iter().enumerate() {
            let a = Tensor::randn(0f32, 1.0, (r, inp), &dev)?;
            let b = (Tensor::randn(0f32, 1.0, (out, r), &dev)? * (seed as f64 + 0.5))?;
            for scale in [2.0, -0.25] {
                let lora = adapter(a.clone(), b.clone(), scale);
                let bound = lora.merge_bound().unwrap().expect("finite adapters have a bound");
                let largest = max_abs(&lora.delta_weight(DType::F32)?)?;
                assert!(
                    largest <= bound,
                    "{out}x{r}x{inp}: |ΔW| {largest} above the bound {bound}"
                );
            }
        }
        // Nothing to promise for values that are not finite, or that overflow f32 on the way.
        let mut spoiled = vec![0.5f32; 6];
        spoiled[4] = f32::NAN;
        let a = Tensor::from_vec(spoiled, (2, 3), &dev)?;
        assert_eq!(
            adapter(a, Tensor::ones((4, 2), DType::F32, &dev)?, 1.0)
                .merge_bound()
                .unwrap(),
            None
        );
        let huge = (Tensor::ones((2, 3), DType::F32, &dev)? * 1e30)?;
        let b = (Tensor::ones((4, 2), DType::F32, &dev)? * 1e30)?;
        assert_eq!(adapter(huge.clone(), b.clone(), 1e-30).merge_bound().unwrap(), None);
        assert_eq!(adapter(huge, b, 1.0).merge_bound().unwrap(), None);
        Ok(())
    }
}
