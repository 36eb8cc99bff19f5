//! Where a step's time goes, op by op: while profiling is on, every fused op
//! of [`crate::fused`] and [`crate::ops`] adds the time of its forward and
//! backward passes to a process-wide table. Off (the default), an op pays
//! one relaxed atomic load.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use peft_core::profile::{self, Pass};
//!
//! # fn main() -> candle_core::Result<()> {
//! let x = Var::ones((2, 8), DType::F32, &Device::Cpu)?;
//! let weight = Tensor::ones(8, DType::F32, &Device::Cpu)?;
//! profile::set_enabled(true);
//! let y = peft_core::ops::rms_norm(&x, &weight, 1e-6)?;
//! y.sum_all()?.backward()?;
//! profile::set_enabled(false);
//! let times = profile::take();
//! let calls = |pass| times.iter().find(|t| t.op == "peft-rms-norm" && t.pass == pass).map(|t| t.calls);
//! assert_eq!((calls(Pass::Forward), calls(Pass::Backward)), (Some(1), Some(1)));
//! assert!(profile::take().is_empty(), "taking empties the table");
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

/// The pass of an op a time belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Computing the output.
    Forward,
    /// Computing the gradients of the inputs (called by candle's autograd).
    Backward,
}

/// One op's time in one pass since the table was last taken.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// The op's name (candle's custom op name: `peft-frozen-lora-linear`, `peft-causal-attention`, ...).
    pub op: &'static str,
    /// Forward or backward.
    pub pass: Pass,
    /// How many times it ran.
    pub calls: u64,
    /// Wall-clock seconds in all.
    pub seconds: f64,
}

/// Turns timing on or off for the whole process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The times gathered since the last call, in the order the ops first ran,
/// and an empty table to gather into.
pub fn take() -> Vec<OpTime> {
    std::mem::take(&mut *TIMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// Times its own life when profiling is on: an op's pass holds one.
pub(crate) struct Timer {
    started: Option<(Instant, &'static str, Pass)>,
}

impl Timer {
    pub(crate) fn start(op: &'static str, pass: Pass) -> Self {
        let started = ENABLED.load(Ordering::Relaxed).then(|| (Instant::now(), op, pass));
        Timer { started }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some((started, op, pass)) = self.started else {
            return;
        };
        let seconds = started.elapsed().as_secs_f64();
        let mut times = TIMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match times.iter_mut().find(|t| t.op == op && t.pass == pass) {
            Some(time) => {
                time.calls += 1;
                time.seconds += seconds;
            }
            None => times.push(OpTime {
                op,
                pass,
                calls: 1,
                seconds,
            }),
        }
    }
}
