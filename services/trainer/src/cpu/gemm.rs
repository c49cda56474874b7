//! The CPU trainer's matrix products: `C (+)= A · B` with `A` an f32
//! activation matrix and `B` packed once (frozen weights) or per call
//! (adapters, attention), in f32, in bf16 with f32 sums, or stored in bf16
//! and widened to f32 inside the f32 kernel (half the bytes of a pass over
//! the weights at the f32 FMA rate, for CPUs whose bf16 dot products are slow).
//!
//! Why our own kernel: the frozen base is the bulk of the work, and on CPUs
//! with AVX512_BF16 a bf16 dot product (`vdpbf16ps`: two products and an f32
//! sum per lane) does twice the work of an f32 FMA per instruction and halves
//! the bytes read; no well-kept Rust GEMM crate has that kernel. The layout is
//! the classic one: `B` in panels of `NR` columns, `A` packed per call in
//! blocks of `MR` rows, a register-resident `MR × NR` tile of sums.
//!
//! Determinism: each element of `C` is summed over `k` in one fixed order by
//! one thread, whatever the number of threads (work is split over rows or
//! columns of `C`, never over `k`), so results are bit-identical across
//! thread counts. They may differ across instruction sets (the portable
//! kernel is the fallback of machines without AVX-512).
//!
//! This is the one module of the trainer that uses `unsafe`: the SIMD
//! intrinsics and the raw tile pointers of the micro-kernels. Every `unsafe`
//! block states why it is sound.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Columns of `C` per micro-tile (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Rows of `C` per micro-tile.
pub(crate) const MR: usize = 12;
/// `k` per cache block, in elements: the `MR`-row sliver of `A` and the
/// `KC × NR` panel of `B` stay in L1 while a tile is summed.
const KC: usize = 384;
/// Pairs of `k` steps per cache block of the bf16 kernel: a 48 KiB panel
/// block, streamed from L2 while it is reused by every tile of the rows
/// (longer than L1 would hold: fewer passes over `C` paid off more, e.g.
/// the LM head's input gradient, `k` = 32,000, 21.4 → 17.2 ms on Zen 4).
const KC_PAIRS: usize = 384;
/// Panels of `B` per column group: the group's block of `C` (a thread's rows
/// × `NC_PANELS · NR` columns) stays in L2 while every `k` block adds to it,
/// instead of all of `C` being re-read from farther away once per `k` block.
const NC_PANELS: usize = 8;
/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_WORK: usize = 1 << 21;
/// Bytes per cache line.
const LINE: usize = 64;

/// How the frozen weights (and the activations multiplied with them) are
/// stored: f32, or bf16 with f32 sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere (the reference precision; tests and the tiny model).
    #[default]
    F32,
    /// bf16 weights, activations rounded to bf16 on packing, f32 sums.
    Bf16,
    /// bf16 weights widened to f32 inside the f32 kernel: half the bytes of
    /// f32 weights at the f32 FMA rate, activations and sums in f32.
    Bf16Weights,
}

/// The instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F FMA for f32 and AVX512_BF16 dot products for bf16.
    Avx512Bf16,
    /// AVX-512F FMA; bf16 products are widened to f32 first.
    Avx512,
    /// AVX2 and FMA (AMD Zen 2 and 3, Intel client CPUs): the f32 kernel
    /// eight lanes wide, bf16-stored weights widened in it; bf16 dot
    /// products run portably.
    Avx2,
    /// Plain Rust loops (any CPU).
    Portable,
}

impl Isa {
    /// The best instruction set of this CPU (`FLYWHEEL_GEMM_ISA=portable|avx2|avx512`
    /// forces a lesser one, for comparisons).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let forced = std::env::var("FLYWHEEL_GEMM_ISA").unwrap_or_default();
            let best = best_isa();
            match (forced.as_str(), best) {
                ("portable", _) => Isa::Portable,
                ("avx512", Isa::Avx512Bf16) => Isa::Avx512,
                ("avx2", Isa::Avx512Bf16 | Isa::Avx512) => Isa::Avx2,
                _ => best,
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn best_isa() -> Isa {
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
        Isa::Avx512Bf16
    } else if is_x86_feature_detected!("avx512f") {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn best_isa() -> Isa {
    Isa::Portable
}

/// How the CPU trainer stores the frozen base: a fixed precision, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PrecisionChoice {
    /// bf16 on CPUs whose bf16 dot products do twice the work of their f32
    /// FMAs (AMD Zen 4 and later with AVX512_BF16); bf16-stored weights with
    /// f32 arithmetic on other AVX-512 CPUs (Intel Xeons without AMX run
    /// `vdpbf16ps` at about half their FMA rate; see [`kernel_times`] and
    /// BENCHMARKS.md); f32 without AVX-512.
    #[default]
    Auto,
    /// f32 weights (the reference precision).
    F32,
    /// bf16 weights, f32 sums.
    Bf16,
    /// bf16-stored weights, f32 activations and arithmetic.
    Bf16Weights,
}

impl PrecisionChoice {
    /// The precision this choice means on this machine.
    pub fn resolve(self) -> Precision {
        match self {
            PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::Bf16Weights => Precision::Bf16Weights,
            PrecisionChoice::Auto => auto_precision(),
        }
    }
}

/// bf16 on AMD CPUs with AVX512_BF16, bf16-stored weights on other AVX-512
/// CPUs (as fast as f32 there, in 30 % less memory), f32 elsewhere (the
/// portable kernel widens bf16 slowly; on AVX2, bf16-weights trained within
/// a few per cent of f32 either way: BENCHMARKS.md, twelfth part). Decided
/// from the CPU's identity, not by timing, so the same machine always trains
/// the same way (a timed choice could differ between an optimised and a
/// debug build).
fn auto_precision() -> Precision {
    match Isa::detect() {
        Isa::Avx512Bf16 if cpu_vendor() == "AuthenticAMD" => Precision::Bf16,
        Isa::Avx512Bf16 | Isa::Avx512 => Precision::Bf16Weights,
        Isa::Avx2 | Isa::Portable => Precision::F32,
    }
}

/// The CPUID vendor string ("GenuineIntel", "AuthenticAMD", …).
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_vendor() -> String {
    let r = std::arch::x86_64::__cpuid(0);
    let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The CPUID vendor string (empty off x86-64).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn cpu_vendor() -> String {
    String::new()
}

/// Floating-point operations of each of [`kernel_times`]' runs: 200 tiles
/// of 256 steps.
pub const KERNEL_TIMES_FLOPS: f64 = (2 * MR * NR * 256 * 200) as f64;

/// Seconds the f32 and the bf16 micro-kernels take for the same work
/// ([`KERNEL_TIMES_FLOPS`]) on cache-resident operands (best of five); the
/// bf16 one only with AVX512_BF16, neither on the portable kernel.
pub fn kernel_times() -> Option<(f64, Option<f64>)> {
    let isa = Isa::detect();
    if isa == Isa::Portable {
        return None;
    }
    let kc = 256;
    let a32 = vec![0.5f32; kc * MR];
    let b32 = vec![0.25f32; kc * NR];
    let a16 = vec![0x3f00_3f00u32; kc / 2 * MR];
    let b16 = vec![0x3e80u16; kc * NR];
    let mut c = vec![0.0f32; MR * NR];
    let mut time = |bf16: bool| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..200 {
                if bf16 {
                    tile_bf16(isa, kc / 2, (&a16, kc / 2), &b16, (std::ptr::null(), 0), &mut c, NR, MR, NR, false);
                } else {
                    tile_f32(
                        isa,
                        kc,
                        (&a32, 1, MR),
                        PanelRef::F32(&b32),
                        (std::ptr::null(), 0),
                        &mut c,
                        NR,
                        MR,
                        NR,
                        false,
                    );
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    Some((time(false), (isa == Isa::Avx512Bf16).then(|| time(true))))
}

/// f32 → bf16 bits as `vcvtneps2bf16` converts: to nearest even, NaN stays
/// NaN, subnormals become zeros of their sign (so the SIMD and the portable
/// packing agree bit for bit).
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 rounded through bf16.
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(bf16_bits(x))
}

/// The packed storage of a `B` operand.
#[derive(Debug, Clone, PartialEq)]
enum Panels {
    /// Panel-major: per panel of `NR` columns, `k` rows of `NR` values.
    F32(Vec<f32>),
    /// Per panel, `⌈k/2⌉` pairs of rows, each `NR` columns × 2 (the two
    /// rows' values side by side, as `vdpbf16ps` reads them).
    Bf16(Vec<u16>),
    /// Panel-major like `F32`, a row of `NR` columns in `NR / 2` words:
    /// word `j` holds column `j`'s bf16 bits low and column `j + NR / 2`'s
    /// high, so one shift and one mask widen a row to two f32 vectors.
    Bf16Wide(Vec<u32>),
}

/// One `k` block of one panel of an f32-kernel operand.
#[derive(Debug, Clone, Copy)]
enum PanelRef<'a> {
    F32(&'a [f32]),
    Bf16Wide(&'a [u32]),
}

impl<'a> PanelRef<'a> {
    /// The panel from its step `steps` on.
    fn skip_steps(self, steps: usize) -> PanelRef<'a> {
        match self {
            PanelRef::F32(d) => PanelRef::F32(&d[steps * NR..]),
            PanelRef::Bf16Wide(d) => PanelRef::Bf16Wide(&d[steps * NR / 2..]),
        }
    }

    /// Start address and length in bytes (for prefetching).
    fn span(self) -> (*const u8, usize) {
        match self {
            PanelRef::F32(d) => (d.as_ptr().cast(), std::mem::size_of_val(d)),
            PanelRef::Bf16Wide(d) => (d.as_ptr().cast(), std::mem::size_of_val(d)),
        }
    }
}

/// A `B` operand `[k × n]` packed in column panels.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedB {
    k: usize,
    n: usize,
    panels: Panels,
}

impl PackedB {
    /// Packs `B [k × n]` held as a row-major matrix `m` with row stride `ld`,
    /// or, when `transposed`, as `Bᵀ` (`[n × k]`, row stride `ld`).
    fn pack(m: &[f32], k: usize, n: usize, ld: usize, transposed: bool, precision: Precision) -> PackedB {
        let count = n.div_ceil(NR);
        // Fills one panel: `put(kk, j, value)` for every element of it.
        fn fill(
            m: &[f32],
            k: usize,
            n: usize,
            ld: usize,
            transposed: bool,
            p: usize,
            mut put: impl FnMut(usize, usize, f32),
        ) {
            let cols = NR.min(n - p * NR);
            if transposed {
                for j in 0..cols {
                    let src = &m[(p * NR + j) * ld..(p * NR + j) * ld + k];
                    for (kk, v) in src.iter().enumerate() {
                        put(kk, j, *v);
                    }
                }
            } else {
                for kk in 0..k {
                    let src = &m[kk * ld + p * NR..kk * ld + p * NR + cols];
                    for (j, v) in src.iter().enumerate() {
                        put(kk, j, *v);
                    }
                }
            }
        }
        /// `count` zeroed panels of `len` values, each filled by
        /// `one(panel index, panel)`; on the pool for large matrices.
        fn each_panel<T: Copy + Default + Send>(
            count: usize,
            len: usize,
            large: bool,
            one: impl Fn((usize, &mut [T])) + Sync + Send,
        ) -> Vec<T> {
            let mut data = vec![T::default(); count * len];
            if large {
                data.par_chunks_mut(len.max(1)).enumerate().for_each(one);
            } else {
                data.chunks_mut(len.max(1)).enumerate().for_each(one);
            }
            data
        }
        /// [`each_panel`] filled by `put(panel, kk, j, value)` for every
        /// element of `B`.
        fn panels<T: Copy + Default + Send>(
            (m, k, n, ld, transposed): (&[f32], usize, usize, usize, bool),
            count: usize,
            len: usize,
            put: impl Fn(&mut [T], usize, usize, f32) + Sync,
        ) -> Vec<T> {
            each_panel(count, len, k * n >= 1 << 16, |(p, panel): (usize, &mut [T])| {
                fill(m, k, n, ld, transposed, p, |kk, j, v| put(panel, kk, j, v));
            })
        }
        let source = (m, k, n, ld, transposed);
        let panels = match precision {
            Precision::F32 if k * n < 1 << 16 => Panels::F32(small_f32_panels(source, count)),
            Precision::F32 => {
                Panels::F32(panels(source, count, k * NR, |panel: &mut [f32], kk, j, v| panel[kk * NR + j] = v))
            }
            #[cfg(target_arch = "x86_64")]
            Precision::Bf16 if !transposed && Isa::detect() == Isa::Avx512Bf16 => {
                // Two rows at a time into pairs, vectorised: the adapters'
                // terms are packed anew at every step (~2 % of a ~110M step
                // element by element).
                let one = |(p, panel): (usize, &mut [u16])| {
                    let (c0, cols) = (p * NR, NR.min(n - p * NR));
                    for (q, dst) in panel.chunks_exact_mut(NR * 2).enumerate() {
                        let first = m[2 * q * ld + c0..][..cols].as_ptr();
                        let second =
                            if 2 * q + 1 < k { m[(2 * q + 1) * ld + c0..][..cols].as_ptr() } else { std::ptr::null() };
                        // SAFETY: the CPU has AVX-512F and AVX512_BF16
                        // (detected); both rows hold `cols` floats (sliced
                        // above) and `dst` `NR` words (`2 · NR` halves).
                        unsafe { avx512::bf16_row_pair(first, second, cols, dst.as_mut_ptr().cast()) }
                    }
                };
                Panels::Bf16(each_panel(count, k.div_ceil(2) * NR * 2, k * n >= 1 << 16, one))
            }
            Precision::Bf16 => {
                Panels::Bf16(panels(source, count, k.div_ceil(2) * NR * 2, |panel: &mut [u16], kk, j, v| {
                    panel[(kk / 2) * NR * 2 + j * 2 + kk % 2] = bf16_bits(v)
                }))
            }
            Precision::Bf16Weights => {
                const HALF: usize = NR / 2;
                Panels::Bf16Wide(panels(source, count, k * HALF, |panel: &mut [u32], kk, j, v| {
                    panel[kk * HALF + j % HALF] |= u32::from(bf16_bits(v)) << (16 * (j / HALF))
                }))
            }
        };
        PackedB { k, n, panels }
    }

    /// `B = M` for a row-major `M [k × n]` with row stride `ld`.
    pub fn from_rows(m: &[f32], k: usize, n: usize, ld: usize, precision: Precision) -> PackedB {
        assert!(k == 0 || n == 0 || m.len() >= (k - 1) * ld + n, "matrix smaller than {k} x {n} (ld {ld})");
        Self::pack(m, k, n, ld, false, precision)
    }

    /// `B = Mᵀ` for a row-major `M [n × k]` with row stride `ld` (a layer's
    /// weight `[out × in]` applied to rows: `y = x · Wᵀ`).
    pub fn from_transposed(m: &[f32], n: usize, k: usize, ld: usize, precision: Precision) -> PackedB {
        assert!(k == 0 || n == 0 || m.len() >= (n - 1) * ld + k, "matrix smaller than {n} x {k} (ld {ld})");
        Self::pack(m, k, n, ld, true, precision)
    }

    /// Rows of the product.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the product.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The stored precision.
    pub fn precision(&self) -> Precision {
        match self.panels {
            Panels::F32(_) => Precision::F32,
            Panels::Bf16(_) => Precision::Bf16,
            Panels::Bf16Wide(_) => Precision::Bf16Weights,
        }
    }

    /// Row `r` of `B` as f32 (an embedding lookup in a packed LM head).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.k && out.len() == self.n);
        for (c, o) in out.iter_mut().enumerate() {
            let (p, j) = (c / NR, c % NR);
            *o = match &self.panels {
                Panels::F32(d) => d[p * self.k * NR + r * NR + j],
                Panels::Bf16(d) => bf16_to_f32(d[p * self.k.div_ceil(2) * NR * 2 + (r / 2) * NR * 2 + j * 2 + r % 2]),
                Panels::Bf16Wide(d) => wide_value(d[p * self.k * NR / 2 + r * NR / 2 + j % (NR / 2)], j),
            };
        }
    }

    /// Column `c` of `B` as f32 (an embedding lookup in a head packed for
    /// `x · Eᵀ`).
    pub fn column(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        let (p, j) = (c / NR, c % NR);
        for (r, o) in out.iter_mut().enumerate() {
            *o = match &self.panels {
                Panels::F32(d) => d[p * self.k * NR + r * NR + j],
                Panels::Bf16(d) => bf16_to_f32(d[p * self.k.div_ceil(2) * NR * 2 + (r / 2) * NR * 2 + j * 2 + r % 2]),
                Panels::Bf16Wide(d) => wide_value(d[p * self.k * NR / 2 + r * NR / 2 + j % (NR / 2)], j),
            };
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(d) => d.len() * 4,
            Panels::Bf16(d) => d.len() * 2,
            Panels::Bf16Wide(d) => d.len() * 4,
        }
    }

    /// Panel `p`'s pairs of steps `q0..q0 + qc` of a bf16 dot-product
    /// operand (`None` for the f32 kernel's panels).
    fn bf16_panel(&self, p: usize, q0: usize, qc: usize) -> Option<&[u16]> {
        let Panels::Bf16(d) = &self.panels else { return None };
        let base = p * self.k.div_ceil(2) * NR * 2;
        Some(&d[base + q0 * NR * 2..base + (q0 + qc) * NR * 2])
    }

    /// Panel `p`'s steps `k0..k0 + kc`, for the f32 kernel (`None` for
    /// bf16 dot-product panels).
    fn f32_panel(&self, p: usize, k0: usize, kc: usize) -> Option<PanelRef<'_>> {
        let k = self.k;
        match &self.panels {
            Panels::F32(d) => Some(PanelRef::F32(&d[p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR])),
            Panels::Bf16Wide(d) => {
                let half = NR / 2;
                Some(PanelRef::Bf16Wide(&d[p * k * half + k0 * half..p * k * half + (k0 + kc) * half]))
            }
            Panels::Bf16(_) => None,
        }
    }
}

/// The f32 panels of a small `B` (attention's per-head keys and values,
/// the adapters' narrow factors: packed anew at every step), written in
/// order: runs of a row's values where `B`'s rows are stored, no zero fill
/// before (only the last panel's missing columns are zeros).
fn small_f32_panels((m, k, n, ld, transposed): (&[f32], usize, usize, usize, bool), count: usize) -> Vec<f32> {
    let mut data = Vec::with_capacity(count * k * NR);
    for p in 0..count {
        let (c0, cols) = (p * NR, NR.min(n - p * NR));
        for kk in 0..k {
            if transposed {
                data.extend((c0..c0 + cols).map(|j| m[j * ld + kk]));
            } else {
                data.extend_from_slice(&m[kk * ld + c0..kk * ld + c0 + cols]);
            }
            data.extend(std::iter::repeat_n(0.0, NR - cols));
        }
    }
    data
}

/// Column `j` (of its panel) of a `Bf16Wide` word.
fn wide_value(word: u32, j: usize) -> f32 {
    bf16_to_f32((word >> (16 * ((j % NR) / (NR / 2)))) as u16)
}

/// How `A` is read: `A[i][kk] = a[i * ld + kk]`, or transposed,
/// `A[i][kk] = a[kk * ld + i]` (a gradient's `Xᵀ · Y`).
#[derive(Debug, Clone, Copy)]
pub struct MatA<'a> {
    /// Values.
    pub data: &'a [f32],
    /// Row stride of the stored matrix.
    pub ld: usize,
    /// Whether the stored matrix is `Aᵀ`.
    pub transposed: bool,
}

impl<'a> MatA<'a> {
    /// A row-major `[m × k]` matrix with row stride `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> MatA<'a> {
        MatA { data, ld, transposed: false }
    }

    /// `A = Sᵀ` for a row-major `S [k × m]` with row stride `ld`.
    pub fn transposed(data: &'a [f32], ld: usize) -> MatA<'a> {
        MatA { data, ld, transposed: true }
    }
}

/// Packed `A` rows of one call (reused per thread, so steady-state products
/// allocate nothing).
#[derive(Default)]
struct Scratch {
    f32s: Vec<f32>,
    pairs: Vec<u32>,
    /// The last partial block of a second product's `A`.
    extra: Vec<f32>,
    /// A bf16 second product's `A`, every block, in pairs of steps.
    extra_pairs: Vec<u32>,
    /// Whole blocks of an f32 `A` over one `k` block, when `A`'s rows are
    /// not read in place.
    blocks: Vec<f32>,
}

/// A second, narrow product added to `C` inside [`gemm_plus`].
struct Extra<'a> {
    a: MatA<'a>,
    b: &'a PackedB,
    /// Per panel of `b`: its rows holding any non-zero value (a
    /// block-diagonal `b` adds each block's columns from its own rows only),
    /// in pairs of rows when `b` is a bf16 dot-product operand.
    spans: Vec<(usize, usize)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `C[m × n] = A[m × k] · B` (or `+=` when `accumulate`), `C` row-major with
/// row stride `ldc`. Splits over rows (or, for few rows, columns) of `C`
/// across the current rayon pool.
pub fn gemm(a: MatA<'_>, m: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    gemm_with(a, m, (b, Triangle::None), c, ldc, accumulate, None);
}

/// One product of a [`gemm_batch`]: `C[m × n] = A[m × k] · B`, `C`
/// row-major with row stride `ldc` (overwritten).
#[derive(Debug)]
pub struct Product<'a> {
    /// `A`.
    pub a: MatA<'a>,
    /// Rows of `A` and `C`.
    pub m: usize,
    /// `B`, packed.
    pub b: &'a PackedB,
    /// `C`.
    pub c: &'a mut [f32],
    /// Row stride of `C`.
    pub ldc: usize,
}

/// Independent products in one parallel region: each is cut into pieces of
/// rows of about equal work, and each piece runs on one thread. For narrow
/// products (a LoRA rank of columns) split one call at a time, the second
/// thread's share was too short to pay for its wake-up: two threads ran
/// them 1.0–1.8× as fast as one. The sums are [`gemm`]'s (a row's sum does
/// not depend on which piece holds it).
pub fn gemm_batch(products: Vec<Product<'_>>) {
    let threads = rayon::current_num_threads();
    let work: usize = products.iter().map(|p| p.m * p.b.n * p.b.k).sum();
    // About four pieces per thread, so that uneven ones even out.
    let target = work.div_ceil(4 * threads).max(PARALLEL_WORK / 8);
    let mut pieces = Vec::new();
    for Product { a, m, b, c, ldc } in products {
        let Some(c) = checked(a, m, b, c, ldc) else { continue };
        // Whole pairs of row blocks (the narrow kernel's unit) per piece.
        let count = (m * b.n * b.k).div_ceil(target).max(1);
        let per = m.div_ceil(count).next_multiple_of(2 * MR);
        for (i, chunk) in c.chunks_mut(per * ldc).enumerate() {
            let r0 = i * per;
            pieces.push((a, r0, per.min(m - r0), b, chunk, ldc));
        }
    }
    let run = |(a, r0, rows, b, c, ldc): (MatA<'_>, usize, usize, &PackedB, &mut [f32], usize)| {
        gemm_rows(a, r0, rows, (b, Triangle::None), 0, b.n.div_ceil(NR), c, ldc, false, None);
    };
    if threads <= 1 || work < PARALLEL_WORK {
        pieces.into_iter().for_each(run);
    } else {
        pieces.into_par_iter().for_each(run);
    }
}

/// The zeros of a causal-attention product (a segment's own `t × t` block
/// of scores, probabilities or their gradients, stored with a row stride
/// that may also hold a shared prefix's columns) that its tiles skip. Row
/// indices are `A`'s and `C`'s, column indices `C`'s or `A`'s steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triangle {
    /// A full product.
    None,
    /// Row `i` of `C` is read only up to column `i` (`Q · Kᵀ`): a block of
    /// rows skips the panels past its last row, whose columns then hold
    /// anything (the caller overwrites them).
    Output,
    /// Row `i` of `A` is zero past step `i` (`P · V`): a block of rows stops
    /// after its last row's step.
    LowerA,
    /// Row `i` of `A` is zero before step `i` (`Pᵀ · dO`): a block of rows
    /// starts at its first row's step.
    UpperA,
}

impl Triangle {
    /// The part of block `q0..q0 + qc` of `k` steps, counted in units of
    /// `unit` steps (2 for bf16 pairs), that the tile of rows `g0..g1` in
    /// panel `p` multiplies, and whether it is the tile's first (which sets
    /// the tile rather than adding to it); `None` where the tile skips the
    /// block. Every tile multiplies at least one unit, so each is written.
    fn tile_steps(
        self,
        (g0, g1): (usize, usize),
        p: usize,
        k: usize,
        unit: usize,
        (q0, qc): (usize, usize),
    ) -> Option<(usize, usize, bool)> {
        let (lo, hi) = match self {
            Triangle::Output if p * NR >= g1 => return None,
            Triangle::None | Triangle::Output => (0, k),
            Triangle::LowerA => (0, g1.clamp(1, k)),
            Triangle::UpperA => (g0.min(k - 1), k),
        };
        // A unit past a triangle's edge multiplies a zero of `A`.
        let (lo, hi) = (lo / unit, hi.div_ceil(unit));
        let (s0, s1) = (lo.max(q0), hi.min(q0 + qc));
        (s0 < s1).then_some((s0, s1, s0 == lo))
    }
}

/// `C (+)= A · B` skipping the zeros (or unread outputs) `triangle` names;
/// the sums of the rest are those of [`gemm`].
pub fn gemm_triangular(
    a: MatA<'_>,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    triangle: Triangle,
) {
    gemm_with(a, m, (b, triangle), c, ldc, accumulate, None);
}

/// `C (+)= A · B + A₂ · B₂` for a narrow second product (a LoRA term:
/// `A₂ [m × r]`, `B₂ [r × n]` packed in f32, or in bf16 dot-product pairs):
/// each tile adds it right after its own last block of `A · B`, while the
/// tile is still in L1, instead of a second pass over all of `C`. `B₂`'s
/// all-zero rows (pairs of rows, in bf16) are skipped per panel, so a
/// block-diagonal `B₂` costs only its blocks. The sums are those of `gemm`
/// followed by a `gemm` of the second product accumulating into `C`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_plus(
    a: MatA<'_>,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    (a2, b2): (MatA<'_>, &PackedB),
) {
    assert!(b2.n == b.n && b.k > 0, "the second product must have the first's columns and a non-empty first");
    let panels = b2.n.div_ceil(NR);
    // Per panel: its rows (f32) or pairs of rows (bf16) as slices, and the
    // span of those holding any non-zero value.
    fn span<T: PartialEq + Default>(rows: std::slice::Chunks<'_, T>) -> (usize, usize) {
        let used: Vec<bool> = rows.map(|r| r.iter().any(|v| *v != T::default())).collect();
        match used.iter().position(|u| *u) {
            Some(lo) => (lo, used.iter().rposition(|u| *u).map_or(lo, |hi| hi + 1)),
            None => (0, 0),
        }
    }
    let spans = match &b2.panels {
        Panels::F32(data) => data.chunks(b2.k * NR).take(panels).map(|p| span(p.chunks(NR))).collect(),
        Panels::Bf16(data) => {
            data.chunks(b2.k.div_ceil(2) * NR * 2).take(panels).map(|p| span(p.chunks(NR * 2))).collect()
        }
        Panels::Bf16Wide(_) => panic!("the second product of gemm_plus is packed in f32 or bf16 pairs"),
    };
    let k2 = b2.k;
    check_a(a2, m, k2);
    gemm_with(a, m, (b, Triangle::None), c, ldc, accumulate, Some(&Extra { a: a2, b: b2, spans }));
}

/// `C` cut to the `m × n` product's rows, after checking that `C` and `A`
/// hold them; `None` for an empty product.
fn checked<'c>(a: MatA<'_>, m: usize, b: &PackedB, c: &'c mut [f32], ldc: usize) -> Option<&'c mut [f32]> {
    let n = b.n;
    if m == 0 || n == 0 {
        return None;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C smaller than {m} x {n} (ldc {ldc})");
    check_a(a, m, b.k);
    Some(&mut c[..(m - 1) * ldc + n])
}

fn check_a(a: MatA<'_>, m: usize, k: usize) {
    if !a.transposed {
        assert!(k == 0 || a.data.len() >= (m - 1) * a.ld + k, "A smaller than {m} x {k}");
    } else {
        assert!(k == 0 || a.data.len() >= (k - 1) * a.ld + m, "Aᵀ smaller than {k} x {m}");
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(
    a: MatA<'_>,
    m: usize,
    (b, tri): (&PackedB, Triangle),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    extra: Option<&Extra<'_>>,
) {
    let (k, n) = (b.k, b.n);
    let Some(c) = checked(a, m, b, c, ldc) else { return };
    let threads = rayon::current_num_threads();
    let work = m * n * k.max(1);
    if threads <= 1 || work < PARALLEL_WORK {
        gemm_rows(a, 0, m, (b, tri), 0, n.div_ceil(NR), c, ldc, accumulate, extra);
        return;
    }
    let blocks = m.div_ceil(MR);
    if blocks >= 2 * threads {
        // Split rows: each task owns whole rows of C, as even a share as
        // blocks of 4 rows allow (the kernels run 4, 8 or 12 rows). Whole
        // blocks of 12 gave 256 rows 11 and 10⅓ blocks' work (a last block
        // of 4 rows ran as 12), so one thread waited a block's time.
        let per = m.div_ceil(threads).next_multiple_of(4);
        c.par_chunks_mut(per * ldc).enumerate().for_each(|(t, chunk)| {
            let r0 = t * per;
            let rows = per.min(m - r0);
            gemm_rows(a, r0, rows, (b, tri), 0, n.div_ceil(NR), chunk, ldc, accumulate, extra);
        });
    } else {
        // Few rows: split panels into narrow column strips; each task sums
        // into its own small buffer, then it is copied into its columns. (A
        // strip per thread would give each task rows tens of KiB apart, whose
        // tiles then collide in the same cache sets.)
        let panels = n.div_ceil(NR);
        let per = panels.div_ceil(threads).clamp(1, 8);
        let parts: Vec<(usize, usize, Vec<f32>)> = (0..panels.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
                let (c0, c1) = (p0 * NR, (p1 * NR).min(n));
                let width = c1 - c0;
                let mut part = vec![0.0f32; m * width];
                if accumulate {
                    for i in 0..m {
                        part[i * width..(i + 1) * width].copy_from_slice(&c[i * ldc + c0..i * ldc + c1]);
                    }
                }
                gemm_rows(a, 0, m, (b, tri), p0, p1, &mut part, width, accumulate, extra);
                (c0, width, part)
            })
            .collect();
        for (c0, width, part) in parts {
            for i in 0..m {
                c[i * ldc + c0..i * ldc + c0 + width].copy_from_slice(&part[i * width..(i + 1) * width]);
            }
        }
    }
}

/// Rows `r0..r0 + rows` of `A` times panels `p0..p1` of `B`'s window into
/// `c`, whose row 0 is `A`'s row `r0` and column 0 is panel `p0`'s first
/// column; plus the `extra` product's rows, tile by tile.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    a: MatA<'_>,
    r0: usize,
    rows: usize,
    (b, tri): (&PackedB, Triangle),
    p0: usize,
    p1: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    extra: Option<&Extra<'_>>,
) {
    let (k, n) = (b.k, b.n);
    let blocks = rows.div_ceil(MR);
    let col0 = p0 * NR;
    if k == 0 {
        if !accumulate {
            for i in 0..rows {
                c[i * ldc..i * ldc + (p1 * NR).min(n) - col0].fill(0.0);
            }
        }
        return;
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let scratch = &mut *scratch;
        let isa = Isa::detect();
        let full = rows / MR;
        // Adds the extra product to tile (`p`, `blk`) of `c` at `off`.
        let extra_tail = &mut scratch.extra;
        let extra_pairs = &mut scratch.extra_pairs;
        let extra_bf16 = extra.is_some_and(|e| matches!(e.b.panels, Panels::Bf16(_)));
        // Words between rows of a bf16 extra product's packed `A`.
        let extra_stride = extra.map_or(0, |e| pair_stride(e.b.k.div_ceil(2)));
        match extra {
            Some(e) if extra_bf16 => {
                // Every block's rows in pairs of steps, as the main bf16
                // product packs its `A` (zero rows past the last).
                let len = blocks * MR * extra_stride;
                if extra_pairs.len() < len {
                    extra_pairs.resize(len, 0);
                }
                pack_a_bf16(isa, e.a, r0, rows, e.b.k, extra_stride, &mut extra_pairs[..len]);
            }
            Some(e) if full < blocks => {
                extra_tail.clear();
                extra_tail.resize(e.b.k * MR, 0.0);
                pack_a(e.a, r0 + full * MR, rows - full * MR, e.b.k, |_, kk, i, v| extra_tail[kk * MR + i] = v);
            }
            _ => {}
        }
        let (extra_tail, extra_pairs) = (&*extra_tail, &*extra_pairs);
        let finish = |p: usize, blk: usize, c: &mut [f32], tile_rows: usize, cols: usize| {
            let Some(e) = extra else { return };
            let (lo, hi) = e.spans[p];
            if hi == lo {
                return;
            }
            if let Some(panel) = e.b.bf16_panel(p, lo, hi - lo) {
                let sliver = (&extra_pairs[blk * MR * extra_stride + lo..], extra_stride);
                tile_bf16(isa, hi - lo, sliver, panel, (std::ptr::null(), 0), c, ldc, tile_rows, cols, true);
                return;
            }
            let sliver = a_sliver(e.a, extra_tail, (r0, blk, full), lo);
            let Some(panel) = e.b.f32_panel(p, lo, hi - lo) else { unreachable!("checked in gemm_plus") };
            tile_f32(isa, hi - lo, sliver, panel, (std::ptr::null(), 0), c, ldc, tile_rows, cols, true);
        };
        match &b.panels {
            Panels::F32(_) | Panels::Bf16Wide(_) => {
                // f32 `A` is read in place (its rows, or its transpose's,
                // are already contiguous runs); only a last partial block of
                // rows is copied, zero-padded, so tiles never read past `A`.
                let tail = &mut scratch.f32s;
                tail.clear();
                if full < blocks {
                    tail.resize(k * MR, 0.0);
                    pack_a(a, r0 + full * MR, rows - full * MR, k, |_, kk, i, v| tail[kk * MR + i] = v);
                }
                let tail = &*tail;
                // Rows a multiple of 4 KiB apart all fall into one L1 set: a
                // tile's 12 rows evict each other at every step (`k` = 2,048
                // or 4,096 wide activations and their gradients: 256 × 2,048
                // × 768 took 6.1 ms, 3.8 at `k` = 2,040). Those rows are
                // copied, per `k` block, into rows `kc` apart.
                // A product of one narrow panel (a LoRA rank) runs 24 rows
                // at a time (below), which a multiple of 32 lines (`k` =
                // 1,536) already folds into two sets: those are copied too.
                let narrow_b = n <= NR / 2 && matches!(b.panels, Panels::F32(_)) && tri == Triangle::None;
                let set_stride = if narrow_b { 32 * LINE } else { 64 * LINE };
                let copied = !a.transposed && full > 0 && (a.ld * 4).is_multiple_of(set_stride);
                let copy = &mut scratch.blocks;
                if copied {
                    copy.resize(full * MR * KC.min(k), 0.0);
                }
                // The panel blocks in the order the loops below visit them.
                let order = (p0..p1).step_by(NC_PANELS).flat_map(|g| {
                    (0..k).step_by(KC).flat_map(move |k0| (g..(g + NC_PANELS).min(p1)).map(move |p| (p, k0)))
                });
                let panel_at = |(p, k0): (usize, usize)| b.f32_panel(p, k0, KC.min(k - k0));
                let mut next = order.clone().skip(1);
                for (p, k0) in order {
                    let kc = KC.min(k - k0);
                    if copied && (p - p0).is_multiple_of(NC_PANELS) {
                        // The first panel of a group at this `k` block.
                        for (i, dst) in copy.chunks_exact_mut(kc).take(full * MR).enumerate() {
                            dst.copy_from_slice(&a.data[(r0 + i) * a.ld + k0..(r0 + i) * a.ld + k0 + kc]);
                        }
                    }
                    // (data, row stride, k stride) of block `blk` from step `k0`.
                    let source = |blk: usize| {
                        if copied && blk < full {
                            (&copy[blk * MR * kc..], kc, 1)
                        } else {
                            a_sliver(a, tail, (r0, blk, full), k0)
                        }
                    };
                    let cols = NR.min(n - p * NR);
                    let Some(panel) = panel_at((p, k0)) else { unreachable!("f32 kernel on a bf16 dot-product panel") };
                    let ahead = next.next().and_then(panel_at).map_or((std::ptr::null(), 0), PanelRef::span);
                    // A panel of at most half the columns (a LoRA rank of
                    // 16) runs two blocks of rows at once at full width.
                    let narrow = cols <= NR / 2 && matches!(panel, PanelRef::F32(_)) && tri == Triangle::None;
                    let mut blk = 0;
                    while blk < blocks {
                        let tile_rows = MR.min(rows - blk * MR);
                        let g0 = r0 + blk * MR;
                        let Some((s0, s1, first)) = tri.tile_steps((g0, g0 + tile_rows), p, k, 1, (k0, kc)) else {
                            blk += 1;
                            continue;
                        };
                        let acc = accumulate || !first;
                        let (sliver, rs, ks) = source(blk);
                        let off = blk * MR * ldc + (p * NR - col0);
                        let fetch = fetch_share(ahead, blk, blocks);
                        // 24 rows whose stride is a multiple of 32 cache
                        // lines fall into two L1 sets and evict each other
                        // (`k` = 1,536 or 2,048): those stay one block each.
                        let pair = narrow && blk + 1 < full && (rs == 1 || (rs * 4) % (32 * LINE) != 0);
                        if pair && tile_f32_narrow(isa, kc, (sliver, rs, ks), panel, &mut c[off..], ldc, cols, acc) {
                            if k0 + kc == k {
                                finish(p, blk, &mut c[off..], MR, cols);
                                finish(p, blk + 1, &mut c[off + MR * ldc..], MR, cols);
                            }
                            blk += 2;
                            continue;
                        }
                        let (sliver, panel) = (&sliver[(s0 - k0) * ks..], panel.skip_steps(s0 - k0));
                        tile_f32(
                            isa,
                            s1 - s0,
                            (sliver, rs, ks),
                            panel,
                            fetch,
                            &mut c[off..],
                            ldc,
                            tile_rows,
                            cols,
                            acc,
                        );
                        if k0 + kc == k {
                            finish(p, blk, &mut c[off..], tile_rows, cols);
                        }
                        blk += 1;
                    }
                }
            }
            Panels::Bf16(bp) => {
                // `A` rounded to bf16 once per call, row-major in pairs of
                // steps (as `vdpbf16ps` reads them), `pair_stride` apart,
                // rows padded with zeros to whole blocks; every word a tile
                // reads is written, so the scratch is never cleared.
                let (pairs, stride) = (k.div_ceil(2), pair_stride(k.div_ceil(2)));
                let len = blocks * MR * stride;
                let packed = &mut scratch.pairs;
                if packed.len() < len {
                    packed.resize(len, 0);
                }
                let packed = &mut packed[..len];
                pack_a_bf16(isa, a, r0, rows, k, stride, packed);
                let kcp = KC_PAIRS;
                let order = (p0..p1).step_by(NC_PANELS).flat_map(|g| {
                    (0..pairs).step_by(kcp).flat_map(move |q0| (g..(g + NC_PANELS).min(p1)).map(move |p| (p, q0)))
                });
                let panel_at = |(p, q0): (usize, usize)| {
                    let base = p * pairs * NR * 2;
                    &bp[base + q0 * NR * 2..base + (q0 + kcp.min(pairs - q0)) * NR * 2]
                };
                let mut next = order.clone().skip(1);
                for (p, q0) in order {
                    let qc = kcp.min(pairs - q0);
                    let cols = NR.min(n - p * NR);
                    let panel = panel_at((p, q0));
                    let ahead = next
                        .next()
                        .map(panel_at)
                        .map_or((std::ptr::null(), 0), |d| (d.as_ptr().cast::<u8>(), std::mem::size_of_val(d)));
                    for blk in 0..blocks {
                        let tile_rows = MR.min(rows - blk * MR);
                        let g0 = r0 + blk * MR;
                        let Some((s0, s1, first)) = tri.tile_steps((g0, g0 + tile_rows), p, k, 2, (q0, qc)) else {
                            continue;
                        };
                        let acc = accumulate || !first;
                        let sliver = (&packed[blk * MR * stride + s0..], stride);
                        let off = blk * MR * ldc + (p * NR - col0);
                        let fetch = fetch_share(ahead, blk, blocks);
                        let panel = &panel[(s0 - q0) * NR * 2..];
                        tile_bf16(isa, s1 - s0, sliver, panel, fetch, &mut c[off..], ldc, tile_rows, cols, acc);
                        if q0 + qc == pairs {
                            finish(p, blk, &mut c[off..], tile_rows, cols);
                        }
                    }
                }
            }
        }
    });
}

/// Block `blk` of rows (from `A`'s row `r0`) of an f32 `A` from step `k0`
/// on, as (data, row stride, `k` stride): read in place, except block
/// `full` (the last, partial one), which is `tail`, its zero-padded copy.
fn a_sliver<'a>(
    a: MatA<'a>,
    tail: &'a [f32],
    (r0, blk, full): (usize, usize, usize),
    k0: usize,
) -> (&'a [f32], usize, usize) {
    if blk == full {
        (&tail[k0 * MR..], 1, MR)
    } else if a.transposed {
        (&a.data[k0 * a.ld + r0 + blk * MR..], 1, a.ld)
    } else {
        (&a.data[(r0 + blk * MR) * a.ld + k0..], a.ld, 1)
    }
}

/// The words between rows of a packed bf16 `A` of `pairs` words a row: an
/// odd number of whole cache lines, so that a tile's 12 rows, read at the
/// same step, fall into 12 different L1 sets. Rows of 1,024 or 2,048 pairs
/// (`k` = 2,048 or 4,096: the down projection's input, the gradient of
/// gate and up) all fell into one set and evicted each other at every
/// step: 256 × 4,096 × 768 ran at 250 GFLOP/s against 388 at `k` = 768.
fn pair_stride(pairs: usize) -> usize {
    const WORDS: usize = LINE / 4;
    let lines = pairs.div_ceil(WORDS);
    (lines | 1) * WORDS
}

/// Tile `blk`'s share (of `blocks`) of the cache lines of `ahead`, the next
/// panel block: the tiles of one block prefetch the next between them, so
/// the next block's first tile does not wait on memory for all of it (the
/// frozen weights are read once per pass).
fn fetch_share(ahead: (*const u8, usize), blk: usize, blocks: usize) -> (*const u8, usize) {
    let lines = ahead.1.div_ceil(LINE);
    let share = lines.div_ceil(blocks);
    let first = (blk * share).min(lines);
    let count = ((blk + 1) * share).min(lines) - first;
    (ahead.0.wrapping_add(first * LINE), count)
}

/// Rows `r0..r0 + rows` of `A` rounded to bf16 into `out`, rows `stride`
/// words apart: row `i` holds `⌈k/2⌉` words, word `q` steps `2q` (low half)
/// and `2q + 1` (high; zero past `k`); rows past `rows` are zeros. The
/// words between a row's end and the next row are not written.
fn pack_a_bf16(isa: Isa, a: MatA<'_>, r0: usize, rows: usize, k: usize, stride: usize, out: &mut [u32]) {
    let pairs = k.div_ceil(2);
    for (r, dst) in out.chunks_mut(stride).enumerate() {
        let dst = &mut dst[..pairs];
        if r >= rows {
            dst.fill(0);
        } else if a.transposed {
            let at = |kk: usize| if kk < k { bf16_bits(a.data[kk * a.ld + r0 + r]) } else { 0 };
            for (q, d) in dst.iter_mut().enumerate() {
                *d = u32::from(at(2 * q)) | (u32::from(at(2 * q + 1)) << 16);
            }
        } else {
            let src = &a.data[(r0 + r) * a.ld..(r0 + r) * a.ld + k];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512F and AVX512_BF16 (detected);
                // `dst` holds `⌈src.len() / 2⌉` words.
                Isa::Avx512Bf16 => unsafe { avx512::to_bf16_pairs(src.as_ptr(), src.len(), dst.as_mut_ptr()) },
                _ => {
                    for (d, two) in dst.iter_mut().zip(src.chunks(2)) {
                        let high = two.get(1).map_or(0, |v| bf16_bits(*v));
                        *d = u32::from(bf16_bits(two[0])) | (u32::from(high) << 16);
                    }
                }
            }
        }
    }
}

/// Visits rows `r0..r0 + rows` of `A` as `put(block, kk, row in block, value)`,
/// reading the stored matrix in its own order (rows of `A`, or of `Aᵀ`).
fn pack_a(a: MatA<'_>, r0: usize, rows: usize, k: usize, mut put: impl FnMut(usize, usize, usize, f32)) {
    if a.transposed {
        for kk in 0..k {
            let src = &a.data[kk * a.ld + r0..kk * a.ld + r0 + rows];
            for (r, v) in src.iter().enumerate() {
                put(r / MR, kk, r % MR, *v);
            }
        }
    } else {
        for r in 0..rows {
            let src = &a.data[(r0 + r) * a.ld..(r0 + r) * a.ld + k];
            for (kk, v) in src.iter().enumerate() {
                put(r / MR, kk, r % MR, *v);
            }
        }
    }
}

/// One `MR × NR` tile over `kc` steps, f32.
#[allow(clippy::too_many_arguments)]
fn tile_f32(
    isa: Isa,
    kc: usize,
    a: (&[f32], usize, usize),
    b: PanelRef<'_>,
    fetch: (*const u8, usize),
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    let (a, rs, ks) = a;
    assert!(kc > 0 && a.len() > (MR - 1) * rs + (kc - 1) * ks, "A sliver shorter than {MR} x {kc}");
    let row_bytes = match b {
        PanelRef::F32(_) => NR * 4,
        PanelRef::Bf16Wide(_) => NR * 2,
    };
    assert!(b.span().1 >= kc * row_bytes, "B panel shorter than {kc} rows");
    assert!(rows <= MR && cols <= NR);
    assert!(rows == 0 || c.len() >= (rows - 1) * ldc + cols);
    match (isa, b) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx512Bf16, _) => {
            // As in `tile_bf16`: a kernel of as many rows as the block has.
            let kernel = match (b, rows) {
                (PanelRef::F32(_), 0..=4) => avx512::tile_f32::<false, 4>,
                (PanelRef::F32(_), 5..=8) => avx512::tile_f32::<false, 8>,
                (PanelRef::F32(_), _) => avx512::tile_f32::<false, MR>,
                (PanelRef::Bf16Wide(_), 0..=4) => avx512::tile_f32::<true, 4>,
                (PanelRef::Bf16Wide(_), 5..=8) => avx512::tile_f32::<true, 8>,
                (PanelRef::Bf16Wide(_), _) => avx512::tile_f32::<true, MR>,
            };
            // SAFETY: the CPU has AVX-512F (detected); the asserts above
            // bound every read of `a` and `b` (`kc` rows of either layout)
            // and every write of `c`.
            unsafe { kernel(kc, a.as_ptr(), rs, ks, b.span().0, fetch, c.as_mut_ptr(), ldc, rows, cols, accumulate) }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, _) => {
            let kernel = match b {
                PanelRef::F32(_) => avx2::tile_f32::<false>,
                PanelRef::Bf16Wide(_) => avx2::tile_f32::<true>,
            };
            // SAFETY: the CPU has AVX2 and FMA (detected); the asserts above
            // bound every read of `a` (all `MR` rows) and `b` and every
            // write of `c`.
            unsafe { kernel(kc, a.as_ptr(), rs, ks, b.span().0, fetch, c.as_mut_ptr(), ldc, rows, cols, accumulate) }
        }
        _ => {
            let mut acc = [[0.0f32; NR]; MR];
            let mut brow = [0.0f32; NR];
            for kk in 0..kc {
                match b {
                    PanelRef::F32(d) => brow.copy_from_slice(&d[kk * NR..(kk + 1) * NR]),
                    PanelRef::Bf16Wide(d) => {
                        for (j, v) in brow.iter_mut().enumerate() {
                            *v = wide_value(d[kk * NR / 2 + j % (NR / 2)], j);
                        }
                    }
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = a[i * rs + kk * ks];
                    for (s, bv) in row.iter_mut().zip(&brow) {
                        *s = av.mul_add(*bv, *s);
                    }
                }
            }
            store(&acc, c, ldc, rows, cols, accumulate);
        }
    }
}

/// Two blocks of rows (`2 · MR`) of a panel of at most `NR / 2` columns
/// over `kc` steps, f32: one vector of `B` per step instead of two, half of
/// them zeros. The same sums, in the same order, as two `tile_f32`s.
/// `false` (nothing done) where the CPU lacks AVX-512.
#[allow(clippy::too_many_arguments)]
fn tile_f32_narrow(
    isa: Isa,
    kc: usize,
    a: (&[f32], usize, usize),
    b: PanelRef<'_>,
    c: &mut [f32],
    ldc: usize,
    cols: usize,
    accumulate: bool,
) -> bool {
    let (a, rs, ks) = a;
    let PanelRef::F32(b) = b else { return false };
    assert!(kc > 0 && a.len() > (2 * MR - 1) * rs + (kc - 1) * ks, "A sliver shorter than {} x {kc}", 2 * MR);
    assert!(b.len() >= (kc - 1) * NR + NR / 2 && cols <= NR / 2);
    assert!(c.len() >= (2 * MR - 1) * ldc + cols);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => {
            // SAFETY: the CPU has AVX-512F (detected); the asserts above
            // bound every read of `a` and `b` and every write of `c`.
            unsafe {
                avx512::tile_f32_narrow(kc, a.as_ptr(), rs, ks, b.as_ptr(), c.as_mut_ptr(), ldc, cols, accumulate)
            }
            true
        }
        _ => false,
    }
}

/// One `MR × NR` tile over `kc` pairs of steps, bf16 products, f32 sums;
/// `a` is `(words, row stride)`: row `i`'s pair `q` at `i · rs + q`.
#[allow(clippy::too_many_arguments)]
fn tile_bf16(
    isa: Isa,
    kc: usize,
    a: (&[u32], usize),
    b: &[u16],
    fetch: (*const u8, usize),
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    let (a, rs) = a;
    assert!(kc > 0 && a.len() >= (MR - 1) * rs + kc && b.len() >= kc * NR * 2 && rows <= MR && cols <= NR);
    assert!(rows == 0 || c.len() >= (rows - 1) * ldc + cols);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => {
            // A block of a few rows runs a kernel of that many: the same
            // sums, in the same order, for a third or two thirds of the work.
            let kernel = match rows {
                0..=4 => avx512::tile_bf16::<4>,
                5..=8 => avx512::tile_bf16::<8>,
                _ => avx512::tile_bf16::<MR>,
            };
            // SAFETY: the CPU has AVX-512F and AVX512_BF16 (detected); the
            // asserts above bound every access.
            unsafe { kernel(kc, a.as_ptr(), rs, b.as_ptr(), fetch, c.as_mut_ptr(), ldc, rows, cols, accumulate) }
        }
        _ => {
            let mut acc = [[0.0f32; NR]; MR];
            for q in 0..kc {
                let brow = &b[q * NR * 2..(q + 1) * NR * 2];
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair = a[i * rs + q];
                    let (a0, a1) = (bf16_to_f32(pair as u16), bf16_to_f32((pair >> 16) as u16));
                    for (j, s) in row.iter_mut().enumerate() {
                        let (b0, b1) = (bf16_to_f32(brow[2 * j]), bf16_to_f32(brow[2 * j + 1]));
                        *s += a0 * b0 + a1 * b1;
                    }
                }
            }
            store(&acc, c, ldc, rows, cols, accumulate);
        }
    }
}

fn store(acc: &[[f32; NR]; MR], c: &mut [f32], ldc: usize, rows: usize, cols: usize, accumulate: bool) {
    for (i, row) in acc.iter().enumerate().take(rows) {
        let out = &mut c[i * ldc..i * ldc + cols];
        if accumulate {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        } else {
            out.copy_from_slice(&row[..cols]);
        }
    }
}

/// The f32 tile kernel for AVX2 and FMA. A `MR × NR` tile's 48 eight-lane
/// sums are three times the 16 vector registers, so it runs as up to four
/// `6 × 16` quarters (12 sums, two vectors of `B` and one of `A` in
/// registers: 12 multiply-adds to 8 loads a step), each over all `kc`
/// steps. Every sum is the portable kernel's: one fused multiply-add a step,
/// in step order.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LINE, MR, NR};

    /// Rows and columns of a quarter tile.
    const ROWS: usize = MR / 2;
    const COLS: usize = NR / 2;

    /// Lanes below `n` of an eight-lane mask.
    #[target_feature(enable = "avx2")]
    fn lanes(n: usize) -> __m256i {
        let n = n.min(8) as i32;
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// As `avx512::tile_f32` (same arguments, same contract), for AVX2.
    ///
    /// # Safety
    /// AVX2 and FMA; `a` holds element `(i, kk)` at `i·rs + kk·ks` for every
    /// `i < MR`, `kk < kc`; `b` holds `kc` rows; `c` is valid for `rows`
    /// rows of `cols` values at stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_f32<const WIDE: bool>(
        kc: usize,
        a: *const f32,
        rs: usize,
        ks: usize,
        b: *const u8,
        fetch: (*const u8, usize),
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        // Columns outside: the half panel of `B` (24 KiB at `kc` = 384)
        // stays in L1 for the second half of the rows.
        for c0 in (0..cols).step_by(COLS) {
            for r0 in (0..rows).step_by(ROWS) {
                let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
                let mut rows_at = [a; ROWS];
                for (i, r) in rows_at.iter_mut().enumerate() {
                    // SAFETY: row r0 + i < MR starts inside `a` (the caller's bound).
                    *r = unsafe { a.add((r0 + i) * rs) };
                }
                // One step of the quarter.
                let step = |acc: &mut [[__m256; 2]; ROWS], kk: usize| {
                    // SAFETY: kk < kc and r0 + i < MR: inside `a` and `b`
                    // (the caller's bounds); a wide row's 16 words hold
                    // columns 0..16 in their low halves, 16..32 in their high.
                    unsafe {
                        let (b0, b1) = if WIDE {
                            let words = b.add(kk * NR * 2).cast::<__m256i>();
                            let widen = |w: __m256i| {
                                let w = if c0 == 0 { _mm256_slli_epi32::<16>(w) } else { _mm256_and_si256(w, high) };
                                _mm256_castsi256_ps(w)
                            };
                            (widen(_mm256_loadu_si256(words)), widen(_mm256_loadu_si256(words.add(1))))
                        } else {
                            let row = b.add(kk * NR * 4).cast::<f32>().add(c0);
                            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
                        };
                        for (pair, row) in acc.iter_mut().zip(&rows_at) {
                            let av = _mm256_set1_ps(*row.add(kk * ks));
                            pair[0] = _mm256_fmadd_ps(av, b0, pair[0]);
                            pair[1] = _mm256_fmadd_ps(av, b1, pair[1]);
                        }
                    }
                };
                // The first quarter asks for the next panel block's lines,
                // one a step, in a loop of its own (a test a step cost more).
                let fetch_lines = if r0 == 0 && c0 == 0 { fetch.1.min(kc) } else { 0 };
                for kk in 0..fetch_lines {
                    _mm_prefetch::<_MM_HINT_T1>(fetch.0.wrapping_add(kk * LINE).cast());
                    step(&mut acc, kk);
                }
                for kk in fetch_lines..kc {
                    step(&mut acc, kk);
                }
                // Masked moves only at a tile's last columns: on Zen 3 a
                // masked store costs many times a plain one.
                let width = cols - c0;
                let (m0, m1) = (lanes(width), lanes(width.saturating_sub(8)));
                for (i, pair) in acc.iter().enumerate().take(rows - r0) {
                    // SAFETY: row r0 + i < rows and the stores cover only
                    // columns < cols (plainly where all eight are), inside
                    // `c` by the contract.
                    unsafe {
                        let p = c.add((r0 + i) * ldc + c0);
                        for (h, (v, m)) in [(pair[0], m0), (pair[1], m1)].into_iter().enumerate() {
                            let at = p.add(8 * h);
                            if width >= 8 * (h + 1) {
                                let v = if accumulate { _mm256_add_ps(v, _mm256_loadu_ps(at)) } else { v };
                                _mm256_storeu_ps(at, v);
                            } else if width > 8 * h {
                                let v = if accumulate { _mm256_add_ps(v, _mm256_maskload_ps(at, m)) } else { v };
                                _mm256_maskstore_ps(at, m, v);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{LINE, MR, NR};

    /// Masks of the two 16-lane halves of a tile row with `cols` columns.
    fn masks(cols: usize) -> (__mmask16, __mmask16) {
        let lo = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
        let hi = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        (lo, hi)
    }

    /// Adds (or stores) the sums `acc` into `c`'s first `rows` rows and
    /// `cols` columns (AVX-512F; `c` valid for `rows` rows of `cols` values
    /// at stride `ldc`). A macro because the sums must stay in registers: a
    /// call (which cannot be `inline(always)` with `target_feature`) took
    /// them by reference, so each tile zero-filled a 1.5 KiB stack array
    /// with `memset` and went through it (1–2 % of a training step).
    macro_rules! write_tile {
        ($acc:expr, $c:expr, $ldc:expr, $rows:expr, $cols:expr, $accumulate:expr) => {{
            let (m0, m1) = masks($cols);
            for (i, pair) in $acc.iter().enumerate() {
                if i >= $rows {
                    break;
                }
                // SAFETY: row i < rows and the masks cover only columns <
                // cols, inside `c` by the kernel's contract.
                unsafe {
                    let p = $c.add(i * $ldc);
                    let (mut v0, mut v1) = (pair[0], pair[1]);
                    if $accumulate {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
                    }
                    _mm512_mask_storeu_ps(p, m0, v0);
                    _mm512_mask_storeu_ps(p.add(16), m1, v1);
                }
            }
        }};
    }

    /// `b` is f32 rows of `NR` values, or (`WIDE`) rows of `NR / 2` words
    /// of two bf16 values, widened here. Also asks for `fetch.1` cache lines
    /// from `fetch.0` on to be brought into L2, one per step of `k`
    /// (prefetching reads nothing and never faults, whatever the address).
    ///
    /// # Safety
    /// AVX-512F; `a` holds element `(i, kk)` at `i·rs + kk·ks` for every
    /// `i < MR`, `kk < kc`; `b` holds `kc` rows; `c` as in `write_tile!`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_f32<const WIDE: bool, const R: usize>(
        kc: usize,
        a: *const f32,
        rs: usize,
        ks: usize,
        b: *const u8,
        fetch: (*const u8, usize),
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut rows_at = [a; R];
        for (i, r) in rows_at.iter_mut().enumerate() {
            // SAFETY: row i < R ≤ MR starts inside `a` (the caller's bound).
            *r = unsafe { a.add(i * rs) };
        }
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        for kk in 0..kc {
            if kk < fetch.1 {
                _mm_prefetch::<_MM_HINT_T1>(fetch.0.wrapping_add(kk * LINE).cast());
            }
            // SAFETY: kk < kc and i < MR, so these reads stay inside `a`
            // (`(MR - 1)·rs + (kc - 1)·ks` is in bounds) and `b`.
            unsafe {
                let (b0, b1) = if WIDE {
                    let w = _mm512_loadu_si512(b.add(kk * NR * 2).cast());
                    (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)), _mm512_castsi512_ps(_mm512_and_si512(w, high)))
                } else {
                    let row = b.add(kk * NR * 4).cast::<f32>();
                    (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)))
                };
                for (pair, row) in acc.iter_mut().zip(&rows_at) {
                    let av = _mm512_set1_ps(*row.add(kk * ks));
                    pair[0] = _mm512_fmadd_ps(av, b0, pair[0]);
                    pair[1] = _mm512_fmadd_ps(av, b1, pair[1]);
                }
            }
        }
        write_tile!(acc, c, ldc, rows, cols, accumulate);
    }

    /// `2 · MR` rows of `a` (as in `tile_f32`) times the first 16 columns
    /// of `kc` rows of an f32 panel, into `cols ≤ 16` columns of `c`.
    ///
    /// # Safety
    /// AVX-512F; `a` holds element `(i, kk)` at `i·rs + kk·ks` for every
    /// `i < 2·MR`, `kk < kc`; `b` holds `kc` panel rows; `c` is valid for
    /// `2·MR` rows of `cols` values at stride `ldc`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_f32_narrow(
        kc: usize,
        a: *const f32,
        rs: usize,
        ks: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        for kk in 0..kc {
            // SAFETY: kk < kc and i < 2·MR: inside `a` and `b` (the
            // caller's bounds).
            unsafe {
                let bv = _mm512_loadu_ps(b.add(kk * NR));
                for (i, s) in acc.iter_mut().enumerate() {
                    *s = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i * rs + kk * ks)), bv, *s);
                }
            }
        }
        let (mask, _) = masks(cols);
        for (i, s) in acc.iter().enumerate() {
            // SAFETY: row i < 2·MR, and the mask covers columns < cols.
            unsafe {
                let p = c.add(i * ldc);
                let v = if accumulate { _mm512_add_ps(*s, _mm512_maskz_loadu_ps(mask, p)) } else { *s };
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }

    /// `a` holds row `i`'s pair `q` at `i · rs + q`; `fetch` as in
    /// `tile_f32`.
    ///
    /// # Safety
    /// AVX-512F and AVX512_BF16; `a` holds `(MR - 1) · rs + kc` words, `b`
    /// `kc · NR · 2` values, `c` as in `write_tile!`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_bf16<const R: usize>(
        kc: usize,
        a: *const u32,
        rs: usize,
        b: *const u16,
        fetch: (*const u8, usize),
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut rows_at = [a; R];
        for (i, r) in rows_at.iter_mut().enumerate() {
            // SAFETY: row i < R ≤ MR starts inside `a` (the caller's bound).
            *r = unsafe { a.add(i * rs) };
        }
        for q in 0..kc {
            if q < fetch.1 {
                _mm_prefetch::<_MM_HINT_T1>(fetch.0.wrapping_add(q * LINE).cast());
            }
            // SAFETY: q < kc, so these reads stay inside `a` and `b`; the
            // casts reinterpret 32 bf16 values as the vector type that holds them.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR * 2).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR * 2 + 32).cast()));
                for (pair, row) in acc.iter_mut().zip(&rows_at) {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*row.add(q) as i32));
                    pair[0] = _mm512_dpbf16_ps(pair[0], av, b0);
                    pair[1] = _mm512_dpbf16_ps(pair[1], av, b1);
                }
            }
        }
        write_tile!(acc, c, ldc, rows, cols, accumulate);
    }

    /// `n` floats from `src` rounded to bf16 (`vcvtne2ps2bf16`: to nearest
    /// even, subnormals flushed, as `bf16_bits`) into `⌈n/2⌉` words at
    /// `dst`, step `2q` in word `q`'s low half.
    ///
    /// # Safety
    /// AVX-512F and AVX512_BF16; `src` holds `n` floats, `dst` `⌈n/2⌉` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_bf16_pairs(src: *const f32, n: usize, dst: *mut u32) {
        let mut i = 0;
        while i < n {
            let left = n - i;
            let (m0, m1) = masks(left.min(32));
            // SAFETY: the masked loads read only the `left` floats past
            // `i`, the masked store only the `⌈left/2⌉` words past `i / 2`
            // (`i` is even); converting picks step `2q` for the low half
            // of word `q` because the low 16 results come from the second
            // operand.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(m0, src.add(i));
                let hi = _mm512_maskz_loadu_ps(m1, src.add(i + 16));
                let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let count = left.min(32).div_ceil(2);
                let store = if count >= 16 { 0xffff } else { (1u32 << count) as u16 - 1 };
                _mm512_mask_storeu_epi32(dst.add(i / 2).cast(), store, words);
            }
            i += 32;
        }
    }

    /// Two rows of a `B` panel (`cols` ≤ `NR` values each; `second` null
    /// past `B`'s last row) as `NR` words of bf16 pairs: word `j` holds
    /// `first[j]` low and `second[j]` high, zeros past `cols`.
    ///
    /// # Safety
    /// AVX-512F and AVX512_BF16; `first` (and `second` unless null) hold
    /// `cols` floats, `dst` `NR` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_row_pair(first: *const f32, second: *const f32, cols: usize, dst: *mut u32) {
        let (m0, m1) = masks(cols);
        for (h, mask) in [(0, m0), (16, m1)] {
            // SAFETY: the masked loads read only the first `cols` floats of
            // each row; the store writes words `h..h + 16` of `NR`.
            unsafe {
                let low = _mm512_maskz_loadu_ps(mask, first.add(h));
                let high =
                    if second.is_null() { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(mask, second.add(h)) };
                let widen =
                    |v: __m512| _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)));
                let words = _mm512_or_si512(widen(low), _mm512_slli_epi32::<16>(widen(high)));
                _mm512_storeu_si512(dst.add(h).cast(), words);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        (0..n).map(|_| rng.uniform(1.0)).collect()
    }

    /// f64 sums of f32 inputs, each operand bf16-rounded first where
    /// `precision` rounds it: the independent reference.
    fn reference(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, precision: Precision) -> Vec<f64> {
        let (round_a, round_b) = match precision {
            Precision::F32 => (false, false),
            Precision::Bf16 => (true, true),
            Precision::Bf16Weights => (false, true),
        };
        let r = |x: f32, round: bool| f64::from(if round { round_bf16(x) } else { x });
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for kk in 0..k {
                let av = r(a[i * k + kk], round_a);
                for j in 0..n {
                    c[i * n + j] += av * r(b[kk * n + j], round_b);
                }
            }
        }
        c
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to even.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(bf16_bits(f32::INFINITY)), f32::INFINITY);
        // Subnormals flush to a zero of their sign, as the instruction does.
        assert_eq!(bf16_bits(f32::from_bits(0x0000_8001)), 0x0000);
        assert_eq!(bf16_bits(-f32::from_bits(0x007f_ffff)), 0x8000);
        assert_eq!(bf16_bits(f32::MIN_POSITIVE), 0x0080);
    }

    #[test]
    fn activations_round_to_bf16_alike_on_every_kernel() {
        // Every length up to three vectors, and values that exercise ties,
        // subnormals, NaN and infinities; packed by this machine's kernel
        // and by the portable loop, in both layouts of `A`.
        let mut values = random(97, 12);
        values[3] = f32::from_bits(0x3f80_8000);
        values[4] = f32::from_bits(0x3f81_8000);
        values[5] = f32::from_bits(0x0000_1234);
        values[6] = -f32::from_bits(0x0040_0000);
        values[7] = f32::NAN;
        values[8] = f32::NEG_INFINITY;
        for k in 1..values.len() {
            let rows = 2;
            let data: Vec<f32> = values[..k].iter().chain(values[..k].iter().rev()).copied().collect();
            let pairs = k.div_ceil(2);
            let want: Vec<u32> = (0..MR * pairs)
                .map(|w| {
                    let (r, q) = (w / pairs, w % pairs);
                    let at = |kk: usize| if r < rows && kk < k { bf16_bits(data[r * k + kk]) } else { 0 };
                    u32::from(at(2 * q)) | (u32::from(at(2 * q + 1)) << 16)
                })
                .collect();
            let mut transposed = vec![0.0f32; k * rows];
            for r in 0..rows {
                for kk in 0..k {
                    transposed[kk * rows + r] = data[r * k + kk];
                }
            }
            for isa in [Isa::detect(), Isa::Portable] {
                for a in [MatA::rows(&data, k), MatA::transposed(&transposed, rows)] {
                    let mut out = vec![u32::MAX; MR * pairs];
                    pack_a_bf16(isa, a, 0, rows, k, pairs, &mut out);
                    assert_eq!(out, want, "k {k}, {isa:?}, transposed {}", a.transposed);
                }
            }
        }
    }

    #[test]
    fn weights_round_to_bf16_pairs_alike_in_both_layouts() {
        // A `B` of odd `k`, a partial last panel and a row stride past `n`,
        // with ties, subnormals, NaN and infinities: packed from its rows
        // (vectorised where the CPU allows) and from its transpose (element
        // by element), each against pairs built here from `bf16_bits`.
        let (k, n, ld) = (7, 45, 50);
        let mut m = random(k * ld, 31);
        m[3] = f32::from_bits(0x3f80_8000);
        m[ld + 4] = f32::from_bits(0x3f81_8000);
        m[2 * ld + 5] = f32::from_bits(0x0000_1234);
        m[3 * ld + 6] = f32::NAN;
        m[6 * ld + 44] = f32::NEG_INFINITY;
        let mut t = vec![0.0f32; n * k];
        for kk in 0..k {
            for j in 0..n {
                t[j * k + kk] = m[kk * ld + j];
            }
        }
        let pairs = k.div_ceil(2);
        let mut want = vec![0u16; n.div_ceil(NR) * pairs * NR * 2];
        for kk in 0..k {
            for j in 0..n {
                want[(j / NR) * pairs * NR * 2 + (kk / 2) * NR * 2 + (j % NR) * 2 + kk % 2] = bf16_bits(m[kk * ld + j]);
            }
        }
        let packs =
            [PackedB::from_rows(&m, k, n, ld, Precision::Bf16), PackedB::from_transposed(&t, n, k, k, Precision::Bf16)];
        for (layout, packed) in ["rows", "transposed"].iter().zip(packs) {
            let Panels::Bf16(got) = packed.panels else { panic!("bf16 panels") };
            assert_eq!(got.len(), want.len());
            for (w, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, e, "{layout}: half-word {w}");
            }
        }
    }

    #[test]
    fn products_match_a_float64_reference_at_awkward_shapes() {
        // Last blocks of rows of every size, `A` as rows and as a transpose.
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (13, 385, 33),
            (12, 64, 32),
            (40, 1000, 70),
            (3, 2, 100),
            (61, 50, 16),
            (20, 40, 50),
            (44, 300, 33),
        ] {
            let (a, b) = (random(m * k, 1 + m as u64), random(k * n, 2 + n as u64));
            let mut at = vec![0.0f32; k * m];
            for (i, row) in a.chunks(k).enumerate() {
                row.iter().enumerate().for_each(|(kk, v)| at[kk * m + i] = *v);
            }
            for precision in [Precision::F32, Precision::Bf16, Precision::Bf16Weights] {
                let round = precision != Precision::F32;
                let want = reference(&a, m, k, &b, n, precision);
                let packed = PackedB::from_rows(&b, k, n, n, precision);
                for a in [MatA::rows(&a, k), MatA::transposed(&at, m)] {
                    let mut c = vec![f32::NAN; m * n];
                    gemm(a, m, &packed, &mut c, n, false);
                    let tol = if round { 1e-4 } else { 1e-5 } * (k as f64).sqrt();
                    let what = format!("{m}x{k}x{n} {precision:?}, transposed {}", a.transposed);
                    for (got, want) in c.iter().zip(&want) {
                        assert!((f64::from(*got) - want).abs() <= tol, "{what}: {got} vs {want}");
                    }
                    // Accumulating adds the same product again.
                    gemm(a, m, &packed, &mut c, n, true);
                    for (got, want) in c.iter().zip(&want) {
                        assert!((f64::from(*got) - 2.0 * want).abs() <= 2.0 * tol, "accumulate {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn transposed_operands_and_strides_read_the_right_elements() {
        let (m, k, n) = (7, 9, 11);
        let a = random(m * k, 3);
        let b = random(k * n, 4);
        let want = reference(&a, m, k, &b, n, Precision::F32);
        // A given as its transpose [k × m], B as its transpose [n × k], both
        // inside wider rows.
        let mut at = vec![0.0f32; k * (m + 2)];
        for i in 0..m {
            for kk in 0..k {
                at[kk * (m + 2) + i] = a[i * k + kk];
            }
        }
        let mut bt = vec![0.0f32; n * (k + 3)];
        for kk in 0..k {
            for j in 0..n {
                bt[j * (k + 3) + kk] = b[kk * n + j];
            }
        }
        let packed = PackedB::from_transposed(&bt, n, k, k + 3, Precision::F32);
        let mut c = vec![0.0f32; m * (n + 1)];
        gemm(MatA::transposed(&at, m + 2), m, &packed, &mut c, n + 1, false);
        for i in 0..m {
            for j in 0..n {
                assert!((f64::from(c[i * (n + 1) + j]) - want[i * n + j]).abs() < 1e-5);
            }
        }
        let mut row = vec![0.0f32; n];
        packed.row(4, &mut row);
        assert_eq!(row, b[4 * n..5 * n]);
        let mut column = vec![0.0f32; k];
        packed.column(5, &mut column);
        assert_eq!(column, (0..k).map(|kk| b[kk * n + 5]).collect::<Vec<_>>());
    }

    #[test]
    fn rows_and_columns_read_back_from_every_storage() {
        // 45 columns: a full panel (both halves of a bf16 word) and a part.
        let (k, n) = (5, 45);
        let b = random(k * n, 11);
        for precision in [Precision::F32, Precision::Bf16, Precision::Bf16Weights] {
            let value = |x: f32| if precision == Precision::F32 { x } else { round_bf16(x) };
            for packed in [PackedB::from_rows(&b, k, n, n, precision), {
                let mut bt = vec![0.0f32; n * k];
                for kk in 0..k {
                    for j in 0..n {
                        bt[j * k + kk] = b[kk * n + j];
                    }
                }
                PackedB::from_transposed(&bt, n, k, k, precision)
            }] {
                let mut row = vec![0.0f32; n];
                for r in 0..k {
                    packed.row(r, &mut row);
                    assert_eq!(
                        row,
                        b[r * n..(r + 1) * n].iter().map(|x| value(*x)).collect::<Vec<_>>(),
                        "{precision:?}"
                    );
                }
                let mut column = vec![0.0f32; k];
                for c in 0..n {
                    packed.column(c, &mut column);
                    assert_eq!(column, (0..k).map(|kk| value(b[kk * n + c])).collect::<Vec<_>>(), "{precision:?}");
                }
            }
        }
    }

    #[test]
    fn rows_4_kib_apart_are_copied_and_give_the_sums_of_rows_read_in_place() {
        // `k` = 1,024 f32s: rows 4 KiB apart, copied per `k` block (three
        // blocks, the last partial); the same rows inside wider ones are
        // read in place. Row split (60 rows, 2 threads), column split (30),
        // one narrow panel and several. At `k` = 512 (2 KiB apart) only the
        // narrow panel's rows are copied.
        for &(k, m, n) in &[(1024, 60, 16), (1024, 60, 70), (1024, 30, 40), (512, 60, 16), (512, 60, 40)] {
            let (a, b) = (random(m * k, 21), random(k * n, 22));
            let mut wide = vec![0.0f32; m * (k + 1)];
            for i in 0..m {
                wide[i * (k + 1)..i * (k + 1) + k].copy_from_slice(&a[i * k..(i + 1) * k]);
            }
            let want = reference(&a, m, k, &b, n, Precision::F32);
            let packed = PackedB::from_rows(&b, k, n, n, Precision::F32);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let run = |a: MatA<'_>| {
                let mut c = vec![f32::NAN; m * n];
                pool.install(|| gemm(a, m, &packed, &mut c, n, false));
                c
            };
            let copied = run(MatA::rows(&a, k));
            assert_eq!(copied, run(MatA::rows(&wide, k + 1)), "{m}x{k}x{n}");
            for (got, want) in copied.iter().zip(&want) {
                assert!((f64::from(*got) - want).abs() <= 1e-5 * (k as f64).sqrt(), "{m}x{k}x{n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn a_batch_gives_each_products_sums_bit_for_bit() {
        // Narrow and wide panels, `A` as rows (one with rows 2 KiB apart)
        // and transposed, `C` inside wider rows, and an empty product; one
        // thread and two.
        let shapes =
            [(600, 512, 16, false), (50, 300, 48, true), (1000, 64, 16, true), (37, 200, 70, false), (0, 8, 16, false)];
        let operands: Vec<(Vec<f32>, Vec<f32>)> =
            shapes.iter().map(|&(m, k, n, _)| (random(m * k, 31 + m as u64), random(k * n, 32 + n as u64))).collect();
        let packs: Vec<PackedB> = shapes
            .iter()
            .zip(&operands)
            .map(|(&(_, k, n, _), (_, b))| PackedB::from_rows(b, k, n, n, Precision::F32))
            .collect();
        let a_of = |i: usize| {
            let (m, k, _, transposed) = shapes[i];
            if transposed { MatA::transposed(&operands[i].0, m) } else { MatA::rows(&operands[i].0, k) }
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut batched: Vec<Vec<f32>> = shapes.iter().map(|&(m, _, n, _)| vec![f32::NAN; m * (n + 3)]).collect();
            let products = batched.iter_mut().enumerate().map(|(i, c)| Product {
                a: a_of(i),
                m: shapes[i].0,
                b: &packs[i],
                c,
                ldc: shapes[i].2 + 3,
            });
            pool.install(|| gemm_batch(products.collect()));
            for (i, got) in batched.iter().enumerate() {
                let (m, _, n, _) = shapes[i];
                let mut want = vec![f32::NAN; m * (n + 3)];
                pool.install(|| gemm(a_of(i), m, &packs[i], &mut want, n + 3, false));
                for (r, (g, w)) in got.chunks(n + 3).zip(want.chunks(n + 3)).enumerate() {
                    assert_eq!(g[..n], w[..n], "product {i}, row {r}, {threads} threads");
                }
            }
        }
    }

    #[test]
    fn results_are_bit_identical_across_thread_counts_and_split_directions() {
        for &(m, k, n) in &[(300, 500, 200), (4, 700, 900)] {
            let (a, b) = (random(m * k, 5), random(k * n, 6));
            for precision in [Precision::F32, Precision::Bf16, Precision::Bf16Weights] {
                let packed = PackedB::from_rows(&b, k, n, n, precision);
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut c = vec![0.0f32; m * n];
                    pool.install(|| gemm(MatA::rows(&a, k), m, &packed, &mut c, n, false));
                    c
                };
                let one = run(1);
                assert_eq!(one, run(2), "{m}x{k}x{n} {precision:?}");
                assert_eq!(one, run(3), "{m}x{k}x{n} {precision:?}");
            }
        }
    }

    #[test]
    fn a_triangular_product_skips_only_what_its_triangle_makes_zero_or_unread() {
        // Square products as causal attention runs them: one block of
        // rows, several with a partial last one, k blocks (t > KC), row and
        // column splits on two threads; `A` stored as rows and transposed.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(t, n) in &[(1, 5), (7, 64), (45, 32), (128, 64), (400, 64), (40, 700)] {
            let b = random(t * n, 41);
            for tri in [Triangle::Output, Triangle::LowerA, Triangle::UpperA] {
                // A's zeros where the triangle says; any values elsewhere.
                let zero = |i: usize, j: usize| match tri {
                    Triangle::LowerA => j > i,
                    Triangle::UpperA => j < i,
                    _ => false,
                };
                let mut a = random(t * t, 42);
                for (x, v) in a.iter_mut().enumerate() {
                    if zero(x / t, x % t) {
                        *v = 0.0;
                    }
                }
                let a_t: Vec<f32> = (0..t * t).map(|x| a[(x % t) * t + x / t]).collect();
                for precision in [Precision::F32, Precision::Bf16, Precision::Bf16Weights] {
                    let packed = PackedB::from_rows(&b, t, n, n, precision);
                    let want = reference(&a, t, t, &b, n, precision);
                    for operand in [MatA::rows(&a, t), MatA::transposed(&a_t, t)] {
                        let mut c = vec![f32::NAN; t * (n + 3)];
                        pool.install(|| gemm_triangular(operand, t, &packed, &mut c, n + 3, false, tri));
                        let tol = 1e-5 * (t as f64).sqrt();
                        for i in 0..t {
                            // `Output` computes at least columns ..=i.
                            let cols = if tri == Triangle::Output { (i + 1).min(n) } else { n };
                            for j in 0..cols {
                                let got = f64::from(c[i * (n + 3) + j]);
                                let case = format!("{t}x{n} {tri:?} {precision:?} row {i} col {j}");
                                assert!((got - want[i * n + j]).abs() <= tol, "{case}: {got} vs {}", want[i * n + j]);
                            }
                            assert!(c[i * (n + 3) + n..(i + 1) * (n + 3)].iter().all(|v| v.is_nan()), "wrote past n");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_second_product_adds_the_same_sums_as_a_second_pass() {
        // Row splits, column splits (few rows) and a partial last block;
        // a block-diagonal second operand (zero rows skipped per panel),
        // read as rows and as a transpose; every storage of the first.
        for &(m, k, n) in &[(300, 70, 200), (5, 90, 700), (13, 33, 45)] {
            let (a, b) = (random(m * k, 21), random(k * n, 22));
            let r = 6;
            let t = random(m * r, 23);
            let mut l = vec![0.0f32; r * n];
            for (j, row) in l.chunks_mut(n).enumerate() {
                let cols = if j < 3 { 0..n / 3 } else { n / 2..n };
                row[cols].iter_mut().zip(random(n, 24 + j as u64)).for_each(|(v, x)| *v = x);
            }
            let mut tt = vec![0.0f32; r * m];
            for i in 0..m {
                for j in 0..r {
                    tt[j * m + i] = t[i * r + j];
                }
            }
            // The second operand in f32 and in bf16 pairs (whose pair of
            // rows 2 and 3 straddles the two blocks).
            let seconds = [Precision::F32, Precision::Bf16].map(|p| PackedB::from_rows(&l, r, n, n, p));
            for (precision, second) in [Precision::F32, Precision::Bf16, Precision::Bf16Weights]
                .into_iter()
                .flat_map(|p| seconds.iter().map(move |s| (p, s)))
            {
                let first = PackedB::from_rows(&b, k, n, n, precision);
                let mut want = vec![0.0f32; m * n];
                gemm(MatA::rows(&a, k), m, &first, &mut want, n, false);
                gemm(MatA::rows(&t, r), m, second, &mut want, n, true);
                let second_precision = second.precision();
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    for a2 in [MatA::rows(&t, r), MatA::transposed(&tt, m)] {
                        let mut got = vec![f32::NAN; m * n];
                        pool.install(|| gemm_plus(MatA::rows(&a, k), m, &first, &mut got, n, false, (a2, second)));
                        assert_eq!(got, want, "{m}x{k}x{n} {precision:?} + {second_precision:?} {threads} threads");
                    }
                }
            }
        }
    }

    #[test]
    fn a_block_of_fewer_rows_gives_the_bits_of_those_rows_of_a_full_block() {
        // The kernels run 4, 8 or 12 rows: each row count must give the same
        // sums as a full tile, and write nothing past its rows.
        let kc = 29;
        let a = random(kc * MR, 21);
        let pa: Vec<u32> = a.iter().map(|v| u32::from(bf16_bits(*v)) | (u32::from(bf16_bits(-v)) << 16)).collect();
        let pb: Vec<u16> = random(kc * NR * 2, 22).iter().map(|v| bf16_bits(*v)).collect();
        let b = random(kc * NR, 23);
        let words: Vec<u32> =
            b.iter().map(|v| u32::from(bf16_bits(*v)) | (u32::from(bf16_bits(0.5 * v)) << 16)).collect();
        let fetch = (std::ptr::null(), 0);
        let cols = NR - 3;
        type Run<'a> = Box<dyn Fn(&mut [f32], usize) + 'a>;
        let kernels: [(&str, Run<'_>); 3] = [
            (
                "f32",
                Box::new(|c, rows| {
                    tile_f32(Isa::detect(), kc, (&a, 1, MR), PanelRef::F32(&b), fetch, c, NR, rows, cols, true)
                }),
            ),
            (
                "bf16-weights",
                Box::new(|c, rows| {
                    tile_f32(Isa::detect(), kc, (&a, 1, MR), PanelRef::Bf16Wide(&words), fetch, c, NR, rows, cols, true)
                }),
            ),
            ("bf16", Box::new(|c, rows| tile_bf16(Isa::detect(), kc, (&pa, kc), &pb, fetch, c, NR, rows, cols, true))),
        ];
        for (name, run) in &kernels {
            let start = random(MR * NR, 24);
            let mut full = start.clone();
            run(&mut full, MR);
            for rows in 1..=MR {
                let mut part = start.clone();
                run(&mut part, rows);
                assert_eq!(part[..rows * NR], full[..rows * NR], "{name}: {rows} rows");
                assert_eq!(part[rows * NR..], start[rows * NR..], "{name}: {rows} rows wrote past them");
            }
        }
    }

    #[test]
    fn every_kernel_of_this_machine_agrees_with_the_portable_one() {
        // The portable kernel is what `FLYWHEEL_GEMM_ISA=portable` runs; the
        // SIMD tiles must compute the same sums (to rounding).
        let (kc, rows, cols) = (37, MR, NR);
        let a = random(kc * MR, 7);
        let b = random(kc * NR, 8);
        let mut fast = vec![0.0f32; rows * cols];
        let mut slow = vec![0.0f32; rows * cols];
        let fetch = (b.as_ptr().cast(), 3);
        tile_f32(Isa::detect(), kc, (&a, 1, MR), PanelRef::F32(&b), fetch, &mut fast, cols, rows, cols, false);
        tile_f32(Isa::Portable, kc, (&a, 1, MR), PanelRef::F32(&b), fetch, &mut slow, cols, rows, cols, false);
        for (x, y) in fast.iter().zip(&slow) {
            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
        }
        let words: Vec<u32> = random(kc * NR / 2, 10)
            .iter()
            .map(|v| u32::from(bf16_bits(*v)) | (u32::from(bf16_bits(-2.0 * v)) << 16))
            .collect();
        tile_f32(Isa::detect(), kc, (&a, 1, MR), PanelRef::Bf16Wide(&words), fetch, &mut fast, cols, rows, cols, false);
        tile_f32(Isa::Portable, kc, (&a, 1, MR), PanelRef::Bf16Wide(&words), fetch, &mut slow, cols, rows, cols, false);
        for (x, y) in fast.iter().zip(&slow) {
            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
        }
        // Two blocks of rows of a narrow panel at once: the same bits as a
        // tile per block.
        let a2 = random(kc * 2 * MR, 11);
        let (mut pair, mut single) = (vec![0.5f32; 2 * MR * cols], vec![0.5f32; 2 * MR * cols]);
        let narrow = 13;
        if tile_f32_narrow(Isa::detect(), kc, (&a2, 1, 2 * MR), PanelRef::F32(&b), &mut pair, cols, narrow, true) {
            for blk in 0..2 {
                let sliver = &a2[blk * MR..];
                let c = &mut single[blk * MR * cols..];
                tile_f32(Isa::detect(), kc, (sliver, 1, 2 * MR), PanelRef::F32(&b), fetch, c, cols, MR, narrow, true);
            }
            assert_eq!(pair, single);
        } else {
            assert!(matches!(Isa::detect(), Isa::Avx2 | Isa::Portable), "the narrow kernel runs wherever AVX-512 does");
        }
        let pa: Vec<u32> = a.iter().map(|v| u32::from(bf16_bits(*v)) | (u32::from(bf16_bits(-v)) << 16)).collect();
        let pb: Vec<u16> = random(kc * NR * 2, 9).iter().map(|v| bf16_bits(*v)).collect();
        tile_bf16(Isa::detect(), kc, (&pa, kc), &pb, fetch, &mut fast, cols, rows, cols, false);
        tile_bf16(Isa::Portable, kc, (&pa, kc), &pb, fetch, &mut slow, cols, rows, cols, false);
        for (x, y) in fast.iter().zip(&slow) {
            assert!((x - y).abs() <= 1e-4, "{x} vs {y}");
        }
    }

    /// The AVX2 kernel (what CPUs without AVX-512 run) computes the
    /// portable kernel's bits: the same fused multiply-add per step, in
    /// step order, at every tile size its quarters and masks cut.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_kernel_gives_the_portable_kernels_bits_at_every_tile_size() {
        assert!(
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            "this x86-64 CPU lacks AVX2 or FMA: the AVX2 kernel cannot be checked here"
        );
        let kc = 29;
        let ldc = NR + 3;
        let a = random(kc * MR * 2, 21);
        let b = random(kc * NR, 22);
        let words: Vec<u32> = random(kc * NR / 2, 23)
            .iter()
            .map(|v| u32::from(bf16_bits(*v)) | (u32::from(bf16_bits(0.5 - v)) << 16))
            .collect();
        for (rs, ks) in [(1, 2 * MR), (kc, 1)] {
            for panel in [PanelRef::F32(&b), PanelRef::Bf16Wide(&words)] {
                for rows in [1, 5, 6, 7, MR] {
                    for cols in [1, 8, 9, 16, 17, 25, NR] {
                        for accumulate in [false, true] {
                            let start = random(MR * ldc, 24);
                            let (mut fast, mut slow) = (start.clone(), start.clone());
                            let fetch = (b.as_ptr().cast(), 2);
                            let run = |isa, c: &mut [f32]| {
                                tile_f32(isa, kc, (&a, rs, ks), panel, fetch, c, ldc, rows, cols, accumulate);
                            };
                            run(Isa::Avx2, &mut fast);
                            run(Isa::Portable, &mut slow);
                            let same = fast.iter().zip(&slow).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "rows {rows}, cols {cols}, rs {rs}, accumulate {accumulate}");
                            // Outside the tile nothing is written.
                            for (i, (x, s)) in fast.iter().zip(&start).enumerate() {
                                if i / ldc >= rows || i % ldc >= cols {
                                    assert_eq!(x.to_bits(), s.to_bits(), "wrote outside the tile at {i}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
