//! The three matrix products the forward and backward passes need, on
//! row-major `f32` slices, through ndarray's safe interface to
//! matrixmultiply's multithreaded SGEMM.

use ndarray::{Array2, ArrayView2};

fn view(a: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), &a[..rows * cols]).expect("slice holds rows × cols")
}

fn into_vec(c: Array2<f32>) -> Vec<f32> {
    if c.is_standard_layout() { c.into_raw_vec_and_offset().0 } else { c.iter().copied().collect() }
}

/// `a [m × k] · w[n × k]ᵀ` → `[m × n]` (a layer applied to rows of `a`).
pub fn matmul_t(a: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    into_vec(view(a, m, k).dot(&view(w, n, k).t()))
}

/// `a [m × k] · b [k × n]` → `[m × n]`.
pub fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    into_vec(view(a, m, k).dot(&view(b, k, n)))
}

/// `a [k × m]ᵀ · b [k × n]` → `[m × n]`.
pub fn matmul_tn(a: &[f32], k: usize, m: usize, b: &[f32], n: usize) -> Vec<f32> {
    into_vec(view(a, k, m).t().dot(&view(b, k, n)))
}
