//! GFLOP/s of the CPU GEMM kernels at the trainer's shapes (f32 and bf16),
//! single product, medians of repeated runs. `gemm_bench [M K N]`.
//! `GEMM_BENCH_COLD=1` writes 512 MiB before each run, so `B` comes from
//! memory as a training step's frozen weights do (each is used once per
//! pass), not from the cache of the previous run. `GEMM_BENCH_RANK=r` also
//! times each product with a rank-`r` LoRA term added in its tiles
//! (`gemm_plus`), the term in f32 and in bf16 pairs.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use flywheel_trainer::cpu::gemm::{Isa, MatA, PackedB, Precision, gemm, gemm_plus};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let shapes: Vec<(usize, usize, usize)> = if args.len() == 3 {
        vec![(args[0], args[1], args[2])]
    } else {
        vec![(512, 576, 960), (512, 576, 3072), (512, 1536, 576), (256, 576, 49152), (256, 49152, 576), (512, 960, 576)]
    };
    println!("isa {:?}, threads {}", Isa::detect(), rayon::current_num_threads());
    if let Some((f, b)) = flywheel_trainer::cpu::gemm::kernel_times() {
        let flops = flywheel_trainer::cpu::gemm::KERNEL_TIMES_FLOPS;
        print!("micro-kernels, same work, one thread: f32 {:.3} ms ({:.0} GFLOP/s)", f * 1e3, flops / f / 1e9);
        match b {
            Some(b) => println!(", bf16 {:.3} ms ({:.0} GFLOP/s)", b * 1e3, flops / b / 1e9),
            None => println!(", no bf16 dot-product kernel on this CPU"),
        }
    }
    let mut evict = std::env::var_os("GEMM_BENCH_COLD").map(|_| vec![0u8; 512 << 20]);
    let rank: Option<usize> = std::env::var("GEMM_BENCH_RANK").ok().and_then(|r| r.parse().ok());
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let r = rank.unwrap_or(0);
        let t: Vec<f32> = (0..m * r).map(|i| ((i * 613) % 1000) as f32 / 1000.0 - 0.5).collect();
        let l: Vec<f32> = (0..r * n).map(|i| ((i * 7717) % 1000) as f32 / 1000.0 - 0.5).collect();
        let terms: Vec<(&str, Option<PackedB>)> = match rank {
            Some(r) => vec![
                ("", None),
                (" + f32 term", Some(PackedB::from_rows(&l, r, n, n, Precision::F32))),
                (" + bf16 term", Some(PackedB::from_rows(&l, r, n, n, Precision::Bf16))),
            ],
            None => vec![("", None)],
        };
        for precision in [Precision::F32, Precision::Bf16, Precision::Bf16Weights] {
            let packed = PackedB::from_rows(&b, k, n, n, precision);
            for (label, term) in &terms {
                let mut c = vec![0.0f32; m * n];
                let mut times = Vec::new();
                for run in 0..7 {
                    if let Some(buffer) = evict.as_mut() {
                        buffer.iter_mut().for_each(|v| *v = v.wrapping_add(run as u8 | 1));
                    }
                    let started = Instant::now();
                    match term {
                        Some(l) => gemm_plus(MatA::rows(&a, k), m, &packed, &mut c, n, false, (MatA::rows(&t, r), l)),
                        None => gemm(MatA::rows(&a, k), m, &packed, &mut c, n, false),
                    }
                    times.push(started.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let gflops = 2.0 * (m * k * n) as f64 / times[3] / 1e9;
                println!(
                    "{m:>5} x {k:>5} x {n:>5} {precision:?}{label}: {:>8.3} ms  {gflops:>6.1} GFLOP/s (of the first product)",
                    times[3] * 1e3
                );
            }
        }
    }
}
