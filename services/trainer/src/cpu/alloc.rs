//! Keeps freed memory in the process instead of returning it to the kernel.
//!
//! A training step allocates and frees the same activation buffers every
//! step, several of them megabytes (logits, the MLP's hidden rows). glibc
//! serves blocks above its mmap threshold with fresh `mmap`s and trims the
//! heap top after large frees, so each step faulted in and zeroed those
//! pages again (`clear_page_erms` was about 10 % of a `perf record` of the
//! ~110M training bench, set-up included). Raising both thresholds once
//! makes the steady state reuse the heap: 2–5 % more tokens/s
//! (BENCHMARKS.md). Peak memory is unchanged (the buffers were
//! live at the peak anyway); the resident size stays at that peak between
//! steps instead of dropping.

#![allow(unsafe_code)]

/// The largest mmap threshold glibc accepts on 64-bit (32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_MAX: i32 = 32 << 20;

/// Raises glibc's mmap and trim thresholds, once per process; a no-op on
/// other C libraries.
pub(crate) fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters; glibc documents it
        // as safe to call at any time, from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}
