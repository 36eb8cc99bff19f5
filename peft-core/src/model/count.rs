//! Counting parameters, as PEFT's `print_trainable_parameters()`.

use std::collections::HashSet;
use std::fmt;

use candle_core::Tensor;

use crate::adaptable::{Adaptable, Role, Visitor};
use crate::layer::Layer;
use crate::path::ModulePath;

/// Trainable and total parameter counts; displays as PEFT's
/// `print_trainable_parameters()` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCount {
    /// Elements in the active adapters' trainable tensors.
    pub trainable: usize,
    /// Elements in every tensor of the model (tied tensors counted once),
    /// adapters included.
    pub total: usize,
}

impl ParameterCount {
    /// `trainable / total`, in percent.
    pub fn trainable_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl fmt::Display for ParameterCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            Thousands(self.trainable),
            Thousands(self.total),
            self.trainable_percent()
        )
    }
}

/// `1234567` -> `1,234,567`, as Python's `{:,}`.
struct Thousands(usize);

impl fmt::Display for Thousands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, digit) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                f.write_str(",")?;
            }
            write!(f, "{digit}")?;
        }
        Ok(())
    }
}

/// Counts the model's tensors (tied ones once) and its adapters' trainable
/// tensors (active ones as trainable).
pub(crate) fn count_parameters<M: Adaptable + ?Sized>(model: &M) -> ParameterCount {
    struct Count<'a> {
        seen: HashSet<candle_core::TensorId>,
        /// Adapter tensors counted so far (a tied head's adapter shares its embedding's).
        seen_vars: HashSet<candle_core::TensorId>,
        total: usize,
        trainable: usize,
        _tensors: std::marker::PhantomData<&'a Tensor>,
    }
    impl Count<'_> {
        fn add(&mut self, tensor: &Tensor) {
            // Tied weights (one tensor in two places) count once.
            if self.seen.insert(tensor.id()) {
                self.total += tensor.elem_count();
            }
        }
    }
    impl<'a> Visitor<'a> for Count<'a> {
        fn visit_layer(&mut self, _: &ModulePath, _: Role, layer: &'a Layer) {
            if layer.is_quantized() {
                // No dense tensor to share: count the quantized weight's elements.
                self.total += layer.in_features() * layer.out_features();
            }
            for tensor in layer.base_tensors() {
                self.add(tensor);
            }
            let (all, active) = layer.num_adapter_parameters(&mut self.seen_vars);
            self.total += all;
            self.trainable += active;
        }
        fn visit_tensor(&mut self, _: &ModulePath, tensor: &'a Tensor) {
            self.add(tensor);
        }
    }
    let mut count = Count {
        seen: HashSet::new(),
        seen_vars: HashSet::new(),
        total: 0,
        trainable: 0,
        _tensors: std::marker::PhantomData,
    };
    model.visit(&mut ModulePath::new(), &mut count);
    ParameterCount {
        trainable: count.trainable,
        total: count.total,
    }
}
