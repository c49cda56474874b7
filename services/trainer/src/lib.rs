//! The trainer: LoRA post-training of Llama-family models from lake shards.
//!
//! - [`backend`]: where training runs (the CPU reference; CUDA beside it);
//! - [`cpu`]: the batched CPU engine (packed f32/bf16 weights, our GEMM kernels)
//!   and batched generation with a KV cache (the simulated product's serving side);
//! - `arch`: the decoder's shape (`config.json`) and projection names;
//! - [`model`]: the HF checkpoint format and the CPU forward pass;
//! - `grad`: the manual backward pass to the LoRA parameters;
//! - [`objective`]: REINFORCE (+ PPO clip, KL), KTO and reward-weighted SFT;
//! - [`optim`]: AdamW, gradient clipping, warm-up + cosine schedule;
//! - [`lora`]: adapters, their PEFT file format and initialisation;
//! - [`tiny`]: a deterministic tiny checkpoint for tests and the demo;
//! - [`tokenize`]: the model's `tokenizer.json` (HF `tokenizers`);
//! - [`gguf`]: reading GGUF files (llama.cpp's format) and dequantising them;
//! - [`import`]: a GGUF model → the HF model directory the trainer loads;
//! - [`kernels`]: the CUDA kernels (`.cu`, NVRTC-checked in CI) and their CPU twins;
//! - [`job`]: one train request → adapter + model candidate;
//! - [`service`]: the Kafka service (`train-requests` → `model-candidates`).

pub use service::{Config, run};

pub(crate) mod arch;
pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gguf;
pub(crate) mod grad;
pub mod import;
pub mod job;
pub mod kernels;
pub(crate) mod linalg;
pub mod lora;
pub mod model;
pub mod objective;
pub mod optim;
pub mod service;
pub mod tiny;
pub mod tokenize;

/// The trainer's errors.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// From the core library (configuration, Kafka, codec).
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// The OS error, kept so callers can see its kind.
        #[source]
        source: std::io::Error,
    },
    /// A file that its format's library (safetensors, JSON, tokenizers)
    /// rejected on reading or writing; the library's error is the source.
    #[error("invalid model or adapter: {path}: {source}")]
    Malformed {
        /// File.
        path: String,
        /// The library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file is not what it should be (missing tensor, wrong shape, a value
    /// out of range) by the trainer's own checks.
    #[error("invalid model or adapter: {0}")]
    Format(String),
    /// A model feature this trainer does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The lake could not be read (storage, Delta log, Parquet).
    #[error(transparent)]
    Lake(#[from] flywheel_lake::LakeError),
    /// A pinned shard is not the committed data the request names: missing,
    /// altered, or not added by the commit it is pinned to.
    #[error("shard {shard_id}: {detail}")]
    Shard {
        /// Which shard.
        shard_id: String,
        /// `shard_missing`, `shard_hash_mismatch` or `shard_not_in_commit`.
        code: &'static str,
        /// What is wrong and what to do.
        detail: String,
    },
    /// A job stopped by shutdown before it finished (nothing was written;
    /// its request is trained again after a restart).
    #[error("stopped by shutdown after {after_steps} training steps")]
    Cancelled {
        /// Steps done before it stopped.
        after_steps: u64,
    },
}

impl TrainerError {
    /// Stable machine-readable code: the dead-letter `reason_code` of a
    /// request that cannot be trained.
    pub fn reason_code(&self) -> &'static str {
        match self {
            TrainerError::Core(e) => e.reason_code(),
            TrainerError::Lake(e) => e.reason_code(),
            TrainerError::Shard { code, .. } => code,
            TrainerError::Io { .. } => "io",
            TrainerError::Format(_) | TrainerError::Malformed { .. } => "invalid_model_or_data",
            TrainerError::Unsupported(_) => "unsupported",
            TrainerError::Cancelled { .. } => "cancelled",
        }
    }

    /// An I/O error on `path`.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> TrainerError {
        TrainerError::Io { path: path.display().to_string(), source }
    }

    /// A format library's error on `path`; an I/O error it boxed stays
    /// [`TrainerError::Io`], so a missing file is not reported as a bad one.
    pub(crate) fn malformed(
        path: &std::path::Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> TrainerError {
        match source.into().downcast::<std::io::Error>() {
            Ok(io) => TrainerError::io(path, *io),
            Err(source) => TrainerError::Malformed { path: path.display().to_string(), source },
        }
    }
}

/// The deterministic generator of initialisation and sampling (in core, so
/// tests and services share one).
pub use flywheel_core::rng::SplitMix;

/// Writes f32 tensors `(name, values, shape)` as a safetensors file with the
/// `{"format": "pt"}` metadata transformers requires.
pub(crate) fn write_safetensors(
    path: &std::path::Path,
    tensors: &[(String, &[f32], Vec<usize>)],
) -> Result<(), TrainerError> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, shape), data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| TrainerError::Format(format!("{name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    let out = safetensors::serialize(views, metadata).map_err(|e| TrainerError::Format(e.to_string()))?;
    std::fs::write(path, out).map_err(|e| TrainerError::io(path, e))
}
