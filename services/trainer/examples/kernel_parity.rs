//! GPU parity of every kernel, and of every cuBLAS step of the fused LoRA
//! plan, against the CPU twins (issue 8). Fresh random inputs at several
//! shapes (none a multiple of a tile; single, q/k/v and gate/up groups),
//! outputs poisoned with NaN before each launch so an unwritten element
//! fails. Prints the maximum relative error per step and shape; exits 1 if
//! any exceeds its tolerance (1e-2 where bf16 is written, 1e-5 for fp32
//! outputs, 0 for the pack copy), 2 with "skipped: no GPU" when there is no
//! driver.
//!
//! Build here, run on the GPU machine:
//!   cargo build --release -p flywheel-trainer --features cuda --example kernel_parity
//!   ./kernel_parity [sm_90] [/usr/local/cuda/include]
#![allow(unsafe_code)] // kernel launches
#![allow(clippy::print_stdout)] // a report for people

use std::collections::HashMap;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use flywheel_trainer::SplitMix;
use flywheel_trainer::cuda::{DeviceGroup, Kernels};

mod common;
use flywheel_trainer::kernels::lora::{Buffer, GroupShape};
use flywheel_trainer::kernels::{adamw, bf16_round, lora};

fn random(n: usize, bound: f32, rng: &mut SplitMix) -> Vec<f32> {
    (0..n).map(|_| bf16_round(rng.uniform(bound))).collect()
}

/// max |got − want| / max |want|; NaN anywhere (an unwritten element) → ∞.
fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs()))).max(1e-12);
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max(f64::from((g - w).abs()) / scale);
    }
    worst
}

type Check = Result<Vec<(String, f64, f64)>, Box<dyn std::error::Error>>;

/// The LoRA group: `lora_pack_block` against its twin, then every GEMM of
/// the forward and backward plans, each from identical inputs (after a
/// step is compared, the host's result is copied over the device's so
/// errors do not compound from step to step).
fn lora_group(k: &Kernels, shape: GroupShape, rng: &mut SplitMix) -> Check {
    let s = k.stream.clone();
    let blas = k.blas()?;
    let scale = 2.0f32;
    let (m, kk, n, r) = (shape.m, shape.k, shape.n(), shape.r);
    let mut host: HashMap<Buffer, Vec<f32>> = Buffer::ALL.iter().map(|b| (*b, vec![0.0; shape.len(*b)])).collect();
    let w = random(n * kk, 0.5, rng);
    lora::lora_pack_block(host.get_mut(&Buffer::Weight).unwrap(), shape.wide_k(), 0, 0, &w, n, kk, 1.0);
    let mut dev = DeviceGroup::new(&s, shape.clone())?;
    dev.upload(Buffer::Weight, &host[&Buffer::Weight])?;
    let (a_cat, b) = (random(shape.pr() * kk, 0.3, rng), random(n * r, 0.3, rng));
    lora::pack(&shape, host.get_mut(&Buffer::Weight).unwrap(), &a_cat, &b, scale);
    dev.pack(k, &s.clone_htod(&a_cat)?, &s.clone_htod(&b)?, scale)?;
    let mut out =
        vec![("lora_pack_block".to_string(), rel_error(&dev.download(Buffer::Weight)?, &host[&Buffer::Weight]), 0.0)];

    lora::lora_pack_block(
        host.get_mut(&Buffer::Input).unwrap(),
        shape.wide_k(),
        0,
        0,
        &random(m * kk, 1.0, rng),
        m,
        kk,
        1.0,
    );
    lora::lora_pack_block(
        host.get_mut(&Buffer::OutputGrad).unwrap(),
        shape.wide_n(),
        0,
        0,
        &random(m * n, 1.0, rng),
        m,
        n,
        1.0,
    );
    for buffer in Buffer::ALL {
        // Poison what the plan writes (T in X′, s·U in dY′, every output):
        // an element it skips fails.
        let (ld, from) = match buffer {
            Buffer::Weight => continue,
            Buffer::Input => (shape.wide_k(), kk),
            Buffer::OutputGrad => (shape.wide_n(), n),
            _ => (1, 0),
        };
        let poisoned: Vec<f32> =
            host[&buffer].iter().enumerate().map(|(i, v)| if i % ld >= from { f32::NAN } else { *v }).collect();
        dev.upload(buffer, &poisoned)?;
    }
    for g in shape.forward_plan().iter().chain(&shape.backward_plan(scale, false)) {
        lora::run_gemm(g, &mut host);
        dev.run(&blas, g)?;
        let want = &host[&g.c.buffer];
        let got = dev.download(g.c.buffer)?;
        let tolerance = if g.c.buffer.is_bf16() { 1e-2 } else { 1e-5 };
        out.push((g.name.to_string(), rel_error(&got, want), tolerance));
        dev.upload(g.c.buffer, want)?;
    }
    Ok(out)
}

fn adamw_kernels(k: &Kernels, n: usize, rng: &mut SplitMix) -> Check {
    let s = k.stream.clone();
    let g: Vec<f32> = (0..n).map(|_| rng.uniform(1.0)).collect();
    let p: Vec<f32> = (0..n).map(|_| rng.uniform(0.5)).collect();
    let blocks = n.div_ceil(256).min(1024);
    let d_g = s.clone_htod(&g)?;
    let mut d_partial = s.clone_htod(&vec![f64::NAN; blocks])?;
    let nn = n as i64;
    let mut l = s.launch_builder(k.function("sum_squares")?);
    l.arg(&d_g).arg(&nn).arg(&mut d_partial);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: g has n elements, partial one per block; the block size is the shared array's.
    unsafe { l.launch(cfg) }?;
    let total: f64 = s.clone_dtoh(&d_partial)?.iter().sum();
    let want_total = adamw::sum_squares(&g);
    let mut out = vec![("sum_squares".to_string(), ((total - want_total) / want_total).abs(), 1e-9)];

    let settings = adamw::AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        bias1: 0.1,
        bias2: 0.001,
        grad_scale: 0.5,
    };
    let (mut want_p, mut want_m, mut want_v) = (p.clone(), vec![0.0; n], vec![0.0; n]);
    adamw::adamw_step(&mut want_p, &g, &mut want_m, &mut want_v, settings);
    let mut d_p = s.clone_htod(&p)?;
    let mut d_m = s.alloc_zeros::<f32>(n)?;
    let mut d_v = s.alloc_zeros::<f32>(n)?;
    let st = settings;
    let mut l = s.launch_builder(k.function("adamw_step")?);
    l.arg(&mut d_p).arg(&d_g).arg(&mut d_m).arg(&mut d_v).arg(&nn);
    l.arg(&st.lr).arg(&st.beta1).arg(&st.beta2).arg(&st.eps).arg(&st.weight_decay);
    l.arg(&st.bias1).arg(&st.bias2).arg(&st.grad_scale);
    // SAFETY: four buffers of n elements.
    unsafe { l.launch(cfg) }?;
    out.push(("adamw_step".into(), rel_error(&s.clone_dtoh(&d_p)?, &want_p), 1e-5));
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kernels = common::open_kernels_or_skip(&args);
    let mut rng = SplitMix(20261123);
    let mut failed = 0;
    println!("{:<22} {:>26} {:>12} {:>10}", "kernel / GEMM", "shape m,k,outs,r / n", "max rel err", "tolerance");
    let mut report = |shape: String, rows: Vec<(String, f64, f64)>| {
        for (name, err, tol) in rows {
            let verdict = if err <= tol { "ok" } else { "FAIL" };
            failed += usize::from(err > tol);
            println!("{name:<22} {shape:>26} {err:>12.3e} {tol:>10.0e} {verdict}");
        }
    };
    let groups = [
        (1, 1, vec![1], 1),
        (37, 129, vec![65], 4),
        (255, 1000, vec![513], 16),
        (512, 2048, vec![2048], 64),
        (300, 576, vec![576, 192, 192], 16), // q/k/v with grouped-query widths
        (200, 512, vec![1400, 1400], 8),     // gate/up
    ];
    for (m, k, outs, r) in groups {
        let label = format!("{m},{k},{outs:?},{r}").replace(' ', "");
        let rows = lora_group(&kernels, GroupShape { m, k, outs, r }, &mut rng)?;
        report(label, rows);
    }
    for n in [1usize, 1000, 300_001] {
        let rows = adamw_kernels(&kernels, n, &mut rng)?;
        report(n.to_string(), rows);
    }
    if failed > 0 {
        eprintln!("{failed} kernel checks over tolerance");
        std::process::exit(1);
    }
    Ok(())
}
