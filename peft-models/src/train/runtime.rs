//! Process-wide settings that make CPU training faster.

/// Two process-wide settings for training on the CPU (docs/PERFORMANCE.md); each gains 10 to 25% on a training step here:
///
/// - glibc's malloc returns freed memory above 128 KiB to the kernel, so every
///   activation-sized tensor is page-faulted in again; raising the mmap and
///   trim thresholds keeps it (the same as `GLIBC_TUNABLES=
///   glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824`);
/// - candle's element-wise thread pool spins 25,000 times after each op before
///   it sleeps, on a core `gemm`'s threads need next;
///   `CANDLE_BARRIER_POOL_SPIN_LIMIT=50` makes it sleep almost at once.
///
/// Call it first thing in `main`, before any other thread exists (`peft
/// train` does). Returns what it set, for a report.
pub fn tune_runtime() -> Vec<String> {
    let mut set = Vec::new();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's thresholds; called before any
        // other thread exists.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        };
        if ok {
            set.push("glibc malloc keeps freed memory".to_owned());
        }
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "50");
    }
    if let Ok(spin) = std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT") {
        set.push(format!("CANDLE_BARRIER_POOL_SPIN_LIMIT={spin}"));
    }
    set
}
