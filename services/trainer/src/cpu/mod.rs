//! The CPU training engine: the whole batch in one pass.
//!
//! The reference path ([`crate::model`], `grad`) runs one sequence at
//! a time in f32 and is what gradients are finite-difference checked on. This
//! engine computes the same quantities for a batch packed into one matrix of
//! rows (every GEMM has `M` = all tokens of the batch; attention stays within
//! each sequence), with the frozen base packed once in f32 or bf16
//! ([`gemm::Precision`]), q/k/v and gate/up fused into one product each, and
//! the LM head evaluated only on the positions that carry loss. A prefix
//! every sequence of the batch shares (a system prompt) is rows computed
//! once, which every sequence's attention reads.
//!
//! - [`generate`]: batched decoding with a key/value cache, an adapter per request;
//! - [`gemm`]: the matrix-product kernels (the only `unsafe` of the trainer);
//! - [`engine`]: the packed model, its batched forward and backward passes;
//! - `simd`: element-wise passes (SwiGLU, softmax rows) vectorised at run time;
//! - `alloc`: keeps the steps' freed buffers in the heap (glibc settings);
//! - `pool`: activation buffers handed from one step to the next unzeroed.

mod alloc;
pub mod engine;
pub mod gemm;
pub mod generate;
mod pool;
pub(crate) mod simd;
