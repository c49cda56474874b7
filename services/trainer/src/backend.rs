//! Where training runs. A [`Backend`] holds the frozen base model, the
//! adapter being trained and its optimiser state, so a device backend keeps
//! all three resident and only the batch crosses the bus. [`CpuBackend`]
//! runs the batched CPU engine ([`crate::cpu`]), itself checked against the
//! one-sequence f32 reference (`grad`).

use crate::TrainerError;
use crate::cpu::engine::CpuModel;
use crate::cpu::gemm::{Precision, PrecisionChoice};
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::objective::{Example, Objective};
use crate::optim::{AdamW, clip_grad_norm};

/// Tokens per forward pass when evaluating (bounds the activations held).
const EVAL_ROWS: usize = 4096;

/// Which backend a job runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Device {
    /// The CPU reference path (multithreaded f32 GEMM).
    #[default]
    Cpu,
    /// An NVIDIA GPU through CUDA (cargo feature `cuda`).
    Cuda,
}

impl Device {
    /// The name recorded in candidates.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// Settings of one optimisation step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// Learning rate of this step (after the schedule).
    pub learning_rate: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub max_grad_norm: f64,
}

/// One training device.
pub trait Backend: Send {
    /// The device name recorded in candidates ("cpu", "cuda").
    fn device(&self) -> &'static str;

    /// Loss and gradients of `batch`, clipping, and one AdamW update of the
    /// adapter being trained; returns the batch's mean loss.
    fn train_step(&mut self, batch: &[Example], objective: &Objective, step: StepSettings)
    -> Result<f64, TrainerError>;

    /// `log π(completion | prompt)` of each example under `adapter`, or the
    /// base when `None` (evaluation; the adapter need not be the trained one).
    fn completion_logprobs(
        &mut self,
        examples: &[Example],
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f64>, TrainerError>;

    /// The trained adapter's current weights, on the host.
    fn adapter(&self) -> Result<LoraAdapter, TrainerError>;
}

/// The CPU backend: the base packed once for the batched engine.
#[derive(Debug)]
pub struct CpuBackend {
    model: CpuModel,
    lora: LoraAdapter,
    optimizer: AdamW,
}

impl CpuBackend {
    /// Trains `lora` on `model` (packed in `precision`) with AdamW
    /// (`weight_decay`). The backend keeps its own packed copy: the caller
    /// may drop `model`.
    pub fn new(
        model: &Model,
        precision: PrecisionChoice,
        lora: LoraAdapter,
        weight_decay: f64,
    ) -> Result<CpuBackend, TrainerError> {
        let model = CpuModel::new(model, precision.resolve())?;
        Ok(CpuBackend { model, lora, optimizer: AdamW::new(weight_decay) })
    }

    /// A backend over an already packed model.
    pub fn from_packed(model: CpuModel, lora: LoraAdapter, weight_decay: f64) -> CpuBackend {
        CpuBackend { model, lora, optimizer: AdamW::new(weight_decay) }
    }

    /// The packed model.
    pub fn packed(&self) -> &CpuModel {
        &self.model
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> &'static str {
        match self.model.precision() {
            Precision::F32 => "cpu",
            Precision::Bf16 => "cpu-bf16",
            Precision::Bf16Weights => "cpu-bf16-weights",
        }
    }

    fn train_step(
        &mut self,
        batch: &[Example],
        objective: &Objective,
        step: StepSettings,
    ) -> Result<f64, TrainerError> {
        let (loss, mut grads) = self.model.loss_and_grads(&self.lora, batch, objective)?;
        clip_grad_norm(&mut grads, step.max_grad_norm);
        self.optimizer.update(&mut self.lora, &grads, step.learning_rate);
        Ok(loss)
    }

    fn completion_logprobs(
        &mut self,
        examples: &[Example],
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f64>, TrainerError> {
        self.model.completion_logprobs(examples, adapter, EVAL_ROWS)
    }

    fn adapter(&self) -> Result<LoraAdapter, TrainerError> {
        Ok(self.lora.clone())
    }
}

/// The backend for `device` (`precision`: how the CPU stores the base): a
/// clear error when this build or machine cannot provide it.
pub(crate) fn open_backend(
    device: Device,
    model: &Model,
    precision: PrecisionChoice,
    lora: LoraAdapter,
    weight_decay: f64,
) -> Result<Box<dyn Backend>, TrainerError> {
    match device {
        Device::Cpu => Ok(Box::new(CpuBackend::new(model, precision, lora, weight_decay)?)),
        Device::Cuda => Err(TrainerError::Unsupported(
            "--device cuda: the CUDA training step is not built yet (issues 8-9); use --device cpu".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_for_cuda_in_a_build_without_it_is_a_clear_error() {
        let model = crate::tiny::tiny_model(1).unwrap();
        let lora = LoraAdapter::init(&model.config, 2, 4.0, &["q_proj"], 1).unwrap();
        let f32 = PrecisionChoice::F32;
        let e = open_backend(Device::Cuda, &model, f32, lora.clone(), 0.0).err().unwrap().to_string();
        assert!(e.contains("--device cuda") && e.contains("--device cpu"), "{e}");
        assert_eq!(open_backend(Device::Cpu, &model, f32, lora.clone(), 0.0).unwrap().device(), "cpu");
        let bf16 = PrecisionChoice::Bf16;
        assert_eq!(open_backend(Device::Cpu, &model, bf16, lora.clone(), 0.0).unwrap().device(), "cpu-bf16");
        let weights = PrecisionChoice::Bf16Weights;
        assert_eq!(open_backend(Device::Cpu, &model, weights, lora, 0.0).unwrap().device(), "cpu-bf16-weights");
    }
}
