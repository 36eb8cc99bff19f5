use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n, label) in [
        (512, 512, 1408, "x Wt up"),
        (512, 1408, 512, "x Wt down"),
        (512, 512, 4096, "x Wt head"),
        (512, 1408, 512, "g W (up bwd)"),
        (512, 4096, 512, "g W head bwd"),
        (2048, 2048, 2048, "square 2048"),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?; // [out, in]
        let w2 = Tensor::randn(0f32, 1., (k, n), &dev)?;
        for (name, f) in [
            (
                "a.matmul(w.t())",
                Box::new(|| a.matmul(&w.t()?)) as Box<dyn Fn() -> candle_core::Result<Tensor>>,
            ),
            ("a.matmul(w2)", Box::new(|| a.matmul(&w2))),
        ] {
            f()?;
            let iters = 20;
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(f()?);
            }
            let dt = t.elapsed().as_secs_f64() / iters as f64;
            println!(
                "{label:14} {name:16} {m}x{k}x{n}: {:7.2} ms {:6.1} GFLOP/s",
                dt * 1e3,
                2.0 * (m * k * n) as f64 / dt / 1e9
            );
        }
    }
    Ok(())
}
