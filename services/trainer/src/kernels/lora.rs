//! CPU twins of `lora.cu`: the same sums in fp32, the same bf16 rounding of
//! activations written back. Row-major: X [m×k], A [r×k], B [n×r], T and U
//! [m×r], Y and dY [m×n].

use super::bf16_round;

/// `lora_down`: T = X·Aᵀ.
pub fn lora_down(x: &[f32], a: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    let mut t = vec![0.0; m * r];
    for i in 0..m {
        for j in 0..r {
            t[i * r + j] = (0..k).map(|c| x[i * k + c] * a[j * k + c]).sum();
        }
    }
    t
}

/// `lora_up_add`: Y += s·T·Bᵀ, rounded to bf16.
pub fn lora_up_add(y: &mut [f32], t: &[f32], b: &[f32], scale: f32, m: usize, n: usize, r: usize) {
    for i in 0..m {
        for c in 0..n {
            let acc: f32 = (0..r).map(|j| t[i * r + j] * b[c * r + j]).sum();
            y[i * n + c] = bf16_round(y[i * n + c] + scale * acc);
        }
    }
}

/// `lora_grad_u`: U = dY·B.
pub fn lora_grad_u(dy: &[f32], b: &[f32], m: usize, n: usize, r: usize) -> Vec<f32> {
    let mut u = vec![0.0; m * r];
    for i in 0..m {
        for j in 0..r {
            u[i * r + j] = (0..n).map(|c| dy[i * n + c] * b[c * r + j]).sum();
        }
    }
    u
}

/// `lora_dx_add`: dX += s·U·A, rounded to bf16.
pub fn lora_dx_add(dx: &mut [f32], u: &[f32], a: &[f32], scale: f32, m: usize, k: usize, r: usize) {
    for i in 0..m {
        for c in 0..k {
            let acc: f32 = (0..r).map(|j| u[i * r + j] * a[j * k + c]).sum();
            dx[i * k + c] = bf16_round(dx[i * k + c] + scale * acc);
        }
    }
}

/// `lora_grad_b`: dB = s·dYᵀ·T.
pub fn lora_grad_b(dy: &[f32], t: &[f32], scale: f32, m: usize, n: usize, r: usize) -> Vec<f32> {
    let mut db = vec![0.0; n * r];
    for c in 0..n {
        for j in 0..r {
            db[c * r + j] = scale * (0..m).map(|i| dy[i * n + c] * t[i * r + j]).sum::<f32>();
        }
    }
    db
}

/// `lora_grad_a`: dA = s·Uᵀ·X.
pub fn lora_grad_a(u: &[f32], x: &[f32], scale: f32, m: usize, k: usize, r: usize) -> Vec<f32> {
    let mut da = vec![0.0; r * k];
    for j in 0..r {
        for c in 0..k {
            da[j * k + c] = scale * (0..m).map(|i| u[i * r + j] * x[i * k + c]).sum::<f32>();
        }
    }
    da
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix;
    use crate::linalg::{matmul, matmul_t, matmul_tn};

    fn random(n: usize, bound: f32, rng: &mut SplitMix, bf16: bool) -> Vec<f32> {
        (0..n).map(|_| rng.uniform(bound)).map(|v| if bf16 { bf16_round(v) } else { v }).collect()
    }

    fn close(got: &[f32], want: &[f32], rel: f32) {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= rel * scale, "{g} vs {w} (scale {scale})");
        }
    }

    /// The twins compose into the LoRA linear and its gradients: checked
    /// against plain matrix products of the unfused formula, at shapes that
    /// are not multiples of any tile.
    #[test]
    fn twins_compute_the_lora_linear_and_its_gradients() {
        let mut rng = SplitMix(3);
        for (m, k, n, r) in [(5, 7, 3, 2), (33, 65, 17, 4), (64, 48, 80, 16)] {
            let s = 2.0f32;
            let x = random(m * k, 1.0, &mut rng, true);
            let a = random(r * k, 0.3, &mut rng, false);
            let b = random(n * r, 0.3, &mut rng, false);
            let base = random(m * n, 1.0, &mut rng, true);
            let dy = random(m * n, 1.0, &mut rng, true);
            // Forward: Y = base + s·(X·Aᵀ)·Bᵀ.
            let t = lora_down(&x, &a, m, k, r);
            close(&t, &matmul_t(&x, m, k, &a, r), 1e-5);
            let mut y = base.clone();
            lora_up_add(&mut y, &t, &b, s, m, n, r);
            let want: Vec<f32> = matmul_t(&t, m, r, &b, n).iter().zip(&base).map(|(l, y0)| y0 + s * l).collect();
            close(&y, &want, 1.0 / 128.0); // bf16 output
            // Backward.
            let u = lora_grad_u(&dy, &b, m, n, r);
            close(&u, &matmul(&dy, m, n, &b, r), 1e-5);
            let db = lora_grad_b(&dy, &t, s, m, n, r);
            let want_db: Vec<f32> = matmul_tn(&dy, m, n, &t, r).iter().map(|v| s * v).collect();
            close(&db, &want_db, 1e-5);
            let da = lora_grad_a(&u, &x, s, m, k, r);
            let want_da: Vec<f32> = matmul_tn(&u, m, r, &x, k).iter().map(|v| s * v).collect();
            close(&da, &want_da, 1e-5);
            let mut dx = vec![0.0; m * k];
            lora_dx_add(&mut dx, &u, &a, s, m, k, r);
            let want_dx: Vec<f32> = matmul(&u, m, r, &a, k).iter().map(|v| s * v).collect();
            close(&dx, &want_dx, 1.0 / 128.0);
        }
    }
}
