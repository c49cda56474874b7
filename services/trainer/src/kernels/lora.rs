//! The fused LoRA linear, as a plan of GEMMs over padded buffers, and the
//! CPU executor that is the twin of the CUDA one (cuBLAS, `crate::cuda`).
//!
//! A group is P projections of one input X [m×k] (q/k/v: 3, gate/up: 2, any
//! other module: 1), each with rank r. The LoRA term is folded into the
//! base GEMM by widening its inner dimension instead of adding a pass:
//!
//! ```text
//!   X′ = [X | T],  T = X·A_catᵀ                (m × (k + P·r))
//!   W′ = [ W      | s·B (block-diagonal) ]      ((N + P·r) × (k + P·r))
//!        [ A_cat  | unused               ]
//!   Y  = X′ · W′[0..N]ᵀ                         = X·Wᵀ + s·(X·Aᵀ)·Bᵀ per projection
//! ```
//!
//! and the backward alike, with dY′ = [dY | s·U], s·U = dY·(s·B):
//! dX = dY′ · W′[.., 0..k] = dY·W + s·U·A, dB_p = s·dY_pᵀ·T_p, dA = (s·U)ᵀ·X.
//! So the forward is two GEMMs and the backward 3 + P, the LoRA work adds
//! about 6·m·k·r FLOPs to the base's 4·m·k·N, and Y and dX are each
//! written once. Activations (X′, W′, Y, dY′, dX) are bf16; dA and dB are
//! fp32, as are the master A and B that `lora.cu`'s `lora_pack_block`
//! copies into W′ each step.

use super::bf16_round;

/// The buffers a plan reads and writes. Activations and W′ are bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buffer {
    /// X′ = [X | T], m × (k + P·r).
    Input,
    /// W′, (N + P·r) × (k + P·r).
    Weight,
    /// Y, m × N.
    Output,
    /// dY′ = [dY | s·U], m × (N + P·r).
    OutputGrad,
    /// dX, m × k.
    InputGrad,
    /// dA_cat, P·r × k, fp32.
    AGrad,
    /// dB stacked by projection, N × r, fp32.
    BGrad,
}

impl Buffer {
    /// Every buffer of a group.
    pub const ALL: [Buffer; 7] = [
        Buffer::Input,
        Buffer::Weight,
        Buffer::Output,
        Buffer::OutputGrad,
        Buffer::InputGrad,
        Buffer::AGrad,
        Buffer::BGrad,
    ];

    /// Whether elements are bf16 (else fp32).
    pub fn is_bf16(self) -> bool {
        !matches!(self, Buffer::AGrad | Buffer::BGrad)
    }
}

/// A sub-matrix of a buffer: row-major with leading dimension `ld`,
/// starting `offset` elements in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// The buffer.
    pub buffer: Buffer,
    /// First element.
    pub offset: usize,
    /// Leading dimension (elements per stored row).
    pub ld: usize,
}

/// Row-major C[m×n] = alpha·op(A)·op(B) + beta·C with op(A) m×k and op(B)
/// k×n; `trans_a` means A is stored k×m (and `trans_b`: B stored n×k).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// What the step computes, for reports.
    pub name: &'static str,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A is stored transposed.
    pub trans_a: bool,
    /// B is stored transposed.
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C's old value (0: overwrite; 1: accumulate).
    pub beta: f32,
    /// Left operand.
    pub a: Operand,
    /// Right operand.
    pub b: Operand,
    /// Output.
    pub c: Operand,
}

/// The shape of a LoRA group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupShape {
    /// Tokens.
    pub m: usize,
    /// Input width.
    pub k: usize,
    /// Output width of each projection.
    pub outs: Vec<usize>,
    /// Rank of every projection.
    pub r: usize,
}

impl GroupShape {
    /// Total output width N.
    pub fn n(&self) -> usize {
        self.outs.iter().sum()
    }
    /// P·r: the width of T and of s·U.
    pub fn pr(&self) -> usize {
        self.outs.len() * self.r
    }
    /// Row of W′ (and of dB) where projection `p` starts.
    pub fn row_offset(&self, p: usize) -> usize {
        self.outs[..p].iter().sum()
    }
    /// Leading dimension of X′ and W′.
    pub fn wide_k(&self) -> usize {
        self.k + self.pr()
    }
    /// Leading dimension of dY′.
    pub fn wide_n(&self) -> usize {
        self.n() + self.pr()
    }
    /// Elements of each buffer.
    pub fn len(&self, b: Buffer) -> usize {
        let rows = match b {
            Buffer::Input | Buffer::Output | Buffer::OutputGrad | Buffer::InputGrad => self.m,
            Buffer::Weight => self.wide_n(),
            Buffer::AGrad => self.pr(),
            Buffer::BGrad => self.n(),
        };
        rows * self.ld(b)
    }

    /// Leading dimension (elements per stored row) of each buffer.
    pub fn ld(&self, b: Buffer) -> usize {
        match b {
            Buffer::Input | Buffer::Weight => self.wide_k(),
            Buffer::Output => self.n(),
            Buffer::OutputGrad => self.wide_n(),
            Buffer::InputGrad | Buffer::AGrad => self.k,
            Buffer::BGrad => self.r,
        }
    }

    fn at(&self, buffer: Buffer, row: usize, col: usize) -> Operand {
        let ld = self.ld(buffer);
        Operand { buffer, offset: row * ld + col, ld }
    }

    /// Where the master A_cat (P·r × k) and B stacked by projection (N × r)
    /// go in W′: one block for A, one per projection for s·B. Both
    /// executors pack by this list, so the layout is stated once.
    pub fn pack_blocks(&self, scale: f32) -> Vec<PackBlock> {
        let (k, r) = (self.k, self.r);
        let mut blocks = vec![PackBlock {
            from_b: false,
            src_offset: 0,
            rows: self.pr(),
            cols: k,
            row0: self.n(),
            col0: 0,
            scale: 1.0,
        }];
        for (p, &out) in self.outs.iter().enumerate() {
            let row = self.row_offset(p);
            blocks.push(PackBlock {
                from_b: true,
                src_offset: row * r,
                rows: out,
                cols: r,
                row0: row,
                col0: k + p * r,
                scale,
            });
        }
        blocks
    }

    /// Forward: T into X′, then Y = X′·W′[0..N]ᵀ.
    pub fn forward_plan(&self) -> Vec<Gemm> {
        let (m, k, n, pr) = (self.m, self.k, self.n(), self.pr());
        vec![
            Gemm {
                name: "T = X·Aᵀ",
                m,
                n: pr,
                k,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                beta: 0.0,
                a: self.at(Buffer::Input, 0, 0),
                b: self.at(Buffer::Weight, n, 0),
                c: self.at(Buffer::Input, 0, k),
            },
            Gemm {
                name: "Y = [X|T]·[W|sB]ᵀ",
                m,
                n,
                k: k + pr,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                beta: 0.0,
                a: self.at(Buffer::Input, 0, 0),
                b: self.at(Buffer::Weight, 0, 0),
                c: self.at(Buffer::Output, 0, 0),
            },
        ]
    }

    /// Backward, given dY in dY′'s first N columns and the forward's X′:
    /// s·U into dY′, dX, each dB_p, dA. With `accumulate`, dA and dB are
    /// added to (gradient accumulation over micro-batches).
    pub fn backward_plan(&self, scale: f32, accumulate: bool) -> Vec<Gemm> {
        let (m, k, n, r, pr) = (self.m, self.k, self.n(), self.r, self.pr());
        let beta = if accumulate { 1.0 } else { 0.0 };
        let mut plan = vec![
            Gemm {
                name: "sU = dY·sB",
                m,
                n: pr,
                k: n,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: 0.0,
                a: self.at(Buffer::OutputGrad, 0, 0),
                b: self.at(Buffer::Weight, 0, k),
                c: self.at(Buffer::OutputGrad, 0, n),
            },
            Gemm {
                name: "dX = [dY|sU]·[W;A]",
                m,
                n: k,
                k: n + pr,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: 0.0,
                a: self.at(Buffer::OutputGrad, 0, 0),
                b: self.at(Buffer::Weight, 0, 0),
                c: self.at(Buffer::InputGrad, 0, 0),
            },
        ];
        for (p, &out) in self.outs.iter().enumerate() {
            let row = self.row_offset(p);
            plan.push(Gemm {
                name: "dB = s·dYᵀ·T",
                m: out,
                n: r,
                k: m,
                trans_a: true,
                trans_b: false,
                alpha: scale,
                beta,
                a: self.at(Buffer::OutputGrad, 0, row),
                b: self.at(Buffer::Input, 0, k + p * r),
                c: self.at(Buffer::BGrad, row, 0),
            });
        }
        plan.push(Gemm {
            name: "dA = (sU)ᵀ·X",
            m: pr,
            n: k,
            k: m,
            trans_a: true,
            trans_b: false,
            alpha: 1.0,
            beta,
            a: self.at(Buffer::OutputGrad, 0, n),
            b: self.at(Buffer::Input, 0, 0),
            c: self.at(Buffer::AGrad, 0, 0),
        });
        plan
    }
}

/// `lora_pack_block`: dst[(row0 + i)·ld + col0 + j] = bf16(scale · src[i·cols + j]).
#[allow(clippy::too_many_arguments)] // mirrors the kernel's signature
pub fn lora_pack_block(
    dst: &mut [f32],
    ld: usize,
    row0: usize,
    col0: usize,
    src: &[f32],
    rows: usize,
    cols: usize,
    scale: f32,
) {
    for i in 0..rows {
        for j in 0..cols {
            dst[(row0 + i) * ld + col0 + j] = bf16_round(scale * src[i * cols + j]);
        }
    }
}

/// One `lora_pack_block` copy into W′ (see [`GroupShape::pack_blocks`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackBlock {
    /// The source is B stacked by projection (else A_cat).
    pub from_b: bool,
    /// First source element.
    pub src_offset: usize,
    /// Rows copied.
    pub rows: usize,
    /// Columns copied (the source's row length).
    pub cols: usize,
    /// Row of W′ the block starts at.
    pub row0: usize,
    /// Column of W′ the block starts at.
    pub col0: usize,
    /// Factor applied (s for B, 1 for A).
    pub scale: f32,
}

/// Copies the master A_cat and B into W′ by [`GroupShape::pack_blocks`],
/// as the CUDA backend does with one `lora_pack_block` launch per block.
pub fn pack(shape: &GroupShape, weight: &mut [f32], a_cat: &[f32], b_stacked: &[f32], scale: f32) {
    for blk in shape.pack_blocks(scale) {
        let src = if blk.from_b { b_stacked } else { a_cat };
        let src = &src[blk.src_offset..blk.src_offset + blk.rows * blk.cols];
        lora_pack_block(weight, shape.wide_k(), blk.row0, blk.col0, src, blk.rows, blk.cols, blk.scale);
    }
}

/// Runs one GEMM of a plan on the CPU: fp32 sums, the output rounded to
/// bf16 when its buffer is bf16. `buffers` holds every buffer the step
/// names (inputs are read before the output is written, so an operand may
/// share a buffer with the output, as T and X do).
pub fn run_gemm(g: &Gemm, buffers: &mut std::collections::HashMap<Buffer, Vec<f32>>) {
    let element = |o: &Operand, trans: bool, row: usize, col: usize| {
        let (r, c) = if trans { (col, row) } else { (row, col) };
        buffers[&o.buffer][o.offset + r * o.ld + c]
    };
    let a: Vec<f32> = (0..g.m * g.k).map(|i| element(&g.a, g.trans_a, i / g.k, i % g.k)).collect();
    let b: Vec<f32> = (0..g.k * g.n).map(|i| element(&g.b, g.trans_b, i / g.n, i % g.n)).collect();
    let out = buffers.get_mut(&g.c.buffer).expect("the output buffer");
    let bf16 = g.c.buffer.is_bf16();
    let mut row = vec![0.0f32; g.n];
    for i in 0..g.m {
        row.iter_mut().for_each(|v| *v = 0.0);
        for l in 0..g.k {
            let x = a[i * g.k + l];
            row.iter_mut().zip(&b[l * g.n..(l + 1) * g.n]).for_each(|(acc, y)| *acc += x * y);
        }
        for (j, sum) in row.iter().enumerate() {
            let at = g.c.offset + i * g.c.ld + j;
            // beta = 0 never reads C, as cuBLAS (C may hold garbage).
            let v = g.alpha * sum + if g.beta == 0.0 { 0.0 } else { g.beta * out[at] };
            out[at] = if bf16 { bf16_round(v) } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::SplitMix;
    use crate::linalg::{matmul, matmul_t, matmul_tn};

    fn random(n: usize, bound: f32, rng: &mut SplitMix) -> Vec<f32> {
        (0..n).map(|_| bf16_round(rng.uniform(bound))).collect()
    }

    fn close(what: &str, got: &[f32], want: &[f32], rel: f32) {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
        }
    }

    fn columns(v: &[f32], ld: usize, rows: usize, from: usize, to: usize) -> Vec<f32> {
        (0..rows).flat_map(|i| v[i * ld + from..i * ld + to].to_vec()).collect()
    }

    /// The plan computes each projection's LoRA linear and its gradients:
    /// checked against the unfused formula per projection, with q/k/v-like
    /// (grouped-query widths), gate/up-like and single groups at shapes that
    /// are multiples of nothing.
    #[test]
    fn the_plan_computes_each_projections_lora_linear_and_gradients() {
        let mut rng = SplitMix(8);
        let shapes = [
            GroupShape { m: 5, k: 7, outs: vec![3], r: 2 },
            GroupShape { m: 33, k: 65, outs: vec![64, 16, 16], r: 4 },
            GroupShape { m: 19, k: 48, outs: vec![80, 80], r: 3 },
        ];
        for shape in shapes {
            let (m, k, r, n, s) = (shape.m, shape.k, shape.r, shape.n(), 2.0f32);
            let x = random(m * k, 1.0, &mut rng);
            let dy = random(m * n, 1.0, &mut rng);
            let w = random(n * k, 0.5, &mut rng);
            let a_cat = random(shape.pr() * k, 0.3, &mut rng);
            let b = random(n * r, 0.3, &mut rng);
            let mut bufs: HashMap<Buffer, Vec<f32>> =
                Buffer::ALL.into_iter().map(|b| (b, vec![f32::NAN; shape.len(b)])).collect();
            let wide = shape.wide_k();
            let weight = bufs.get_mut(&Buffer::Weight).unwrap();
            weight.iter_mut().for_each(|v| *v = 0.0);
            lora_pack_block(weight, wide, 0, 0, &w, n, k, 1.0);
            pack(&shape, weight, &a_cat, &b, s);
            lora_pack_block(bufs.get_mut(&Buffer::Input).unwrap(), wide, 0, 0, &x, m, k, 1.0);
            lora_pack_block(bufs.get_mut(&Buffer::OutputGrad).unwrap(), shape.wide_n(), 0, 0, &dy, m, n, 1.0);
            for g in shape.forward_plan().iter().chain(&shape.backward_plan(s, false)) {
                run_gemm(g, &mut bufs);
            }
            let mut dx_want = matmul(&dy, m, n, &w, k);
            for (p, &out) in shape.outs.iter().enumerate() {
                let row = shape.row_offset(p);
                let a_p = &a_cat[p * r * k..(p + 1) * r * k];
                let b_p = &b[row * r..(row + out) * r];
                let w_p = &w[row * k..(row + out) * k];
                let dy_p = columns(&dy, n, m, row, row + out);
                // Forward: Y_p = X·W_pᵀ + s·(X·A_pᵀ)·B_pᵀ.
                let t = matmul_t(&x, m, k, a_p, r);
                let y_want: Vec<f32> = matmul_t(&x, m, k, w_p, out)
                    .iter()
                    .zip(matmul_t(&t, m, r, b_p, out))
                    .map(|(base, l)| base + s * l)
                    .collect();
                close("Y", &columns(&bufs[&Buffer::Output], n, m, row, row + out), &y_want, 2e-2);
                // dB_p = s·dY_pᵀ·T_p; dA_p = s·U_pᵀ·X with U_p = dY_p·B_p.
                let u = matmul(&dy_p, m, out, b_p, r);
                let db: Vec<f32> = matmul_tn(&dy_p, m, out, &t, r).iter().map(|v| s * v).collect();
                close("dB", &bufs[&Buffer::BGrad][row * r..(row + out) * r], &db, 2e-2);
                let da: Vec<f32> = matmul_tn(&u, m, r, &x, k).iter().map(|v| s * v).collect();
                close("dA", &bufs[&Buffer::AGrad][p * r * k..(p + 1) * r * k], &da, 2e-2);
                for (d, l) in dx_want.iter_mut().zip(matmul(&u, m, r, a_p, k)) {
                    *d += s * l;
                }
            }
            close("dX", &bufs[&Buffer::InputGrad], &dx_want, 2e-2);
        }
    }

    #[test]
    fn accumulating_plans_add_gradients() {
        let shape = GroupShape { m: 4, k: 6, outs: vec![5, 2], r: 2 };
        let once = shape.backward_plan(1.5, false);
        let twice = shape.backward_plan(1.5, true);
        for (a, b) in once.iter().zip(&twice) {
            let grads = matches!(a.c.buffer, Buffer::AGrad | Buffer::BGrad);
            assert_eq!((a.beta, b.beta), if grads { (0.0, 1.0) } else { (0.0, 0.0) }, "{}", a.name);
        }
        assert_eq!(once.len(), 3 + shape.outs.len());
    }
}
