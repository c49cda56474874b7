//! GPU benchmark of the fused LoRA linear (issue 8): forward + backward of
//! the frozen base GEMMs alone (the same plan at rank 0) against the fused
//! LoRA plan (one `lora_pack_block` per projection plus the GEMMs), timed
//! with CUDA events, interleaved iteration by iteration so both see the same
//! clocks; medians of many runs after warm-up. The PyTorch + PEFT side is
//! `bench/peft_lora_bench.py`, run beside it by `make bench-gpu`.
//!
//!   cargo build --release -p flywheel-trainer --features cuda --example lora_bench
//!   ./lora_bench [sm_90] [/usr/local/cuda/include] [iterations]
#![allow(clippy::print_stdout)] // a report for people

use cudarc::driver::sys::CUevent_flags;
use flywheel_trainer::SplitMix;
use flywheel_trainer::cuda::{DeviceGroup, Kernels};

mod common;
use flywheel_trainer::kernels::lora::{Buffer, GroupShape};

type Error = Box<dyn std::error::Error>;

fn random(n: usize, bound: f32, rng: &mut SplitMix) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(bound)).collect()
}

/// A group with random activations and weights on the device.
fn group(kernels: &Kernels, shape: GroupShape, rng: &mut SplitMix) -> Result<DeviceGroup, Error> {
    let mut g = DeviceGroup::new(&kernels.stream, shape.clone())?;
    for b in [Buffer::Input, Buffer::Weight, Buffer::OutputGrad] {
        let v = random(shape.len(b), 0.05, rng);
        g.upload(b, &v)?;
    }
    Ok(g)
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let iterations: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let kernels = common::open_kernels_or_skip(&args);
    let s = kernels.stream.clone();
    let blas = kernels.blas()?;
    let mut rng = SplitMix(8);
    println!("| shape (M, K, outs) | r | base fwd+bwd ms | fused LoRA fwd+bwd ms | overhead |");
    println!("|---|---|---|---|---|");
    let cases: [(usize, usize, Vec<usize>, usize); 5] = [
        (8192, 4096, vec![4096], 16),
        (8192, 4096, vec![4096], 64),
        (8192, 4096, vec![4096, 1024, 1024], 16), // Llama-3.1-8B q/k/v
        (8192, 4096, vec![14336, 14336], 16),     // Llama-3.1-8B gate/up
        (8192, 14336, vec![4096], 16),            // Llama-3.1-8B down
    ];
    for (m, k, outs, r) in cases {
        let mut base = group(&kernels, GroupShape { m, k, outs: outs.clone(), r: 0 }, &mut rng)?;
        let shape = GroupShape { m, k, outs: outs.clone(), r };
        let mut lora = group(&kernels, shape.clone(), &mut rng)?;
        let a_cat = s.clone_htod(&random(shape.pr() * k, 0.02, &mut rng))?;
        let b = s.clone_htod(&random(shape.n() * r, 0.02, &mut rng))?;
        let scale = 2.0f32;
        let (mut t_base, mut t_lora) = (Vec::new(), Vec::new());
        for i in 0..iterations + 10 {
            let e0 = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            base.forward(&blas)?;
            base.backward(&blas, scale, false)?;
            let e1 = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            lora.pack(&kernels, &a_cat, &b, scale)?;
            lora.forward(&blas)?;
            lora.backward(&blas, scale, false)?;
            let e2 = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            e2.synchronize()?;
            if i >= 10 {
                t_base.push(e0.elapsed_ms(&e1)?);
                t_lora.push(e1.elapsed_ms(&e2)?);
            }
        }
        let (b_ms, l_ms) = (median(t_base), median(t_lora));
        println!("| {m}, {k}, {outs:?} | {r} | {b_ms:.3} | {l_ms:.3} | {:+.1} % |", (l_ms / b_ms - 1.0) * 100.0);
    }
    println!("\n{iterations} timed iterations after 10 warm-up, medians; CUDA events.");
    Ok(())
}
