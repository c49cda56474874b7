//! The CUDA side of the trainer (cargo feature `cuda`): a device context,
//! every kernel of [`crate::kernels::SOURCES`] compiled with NVRTC and
//! loaded by name. libcuda and libnvrtc are loaded at run time, so a build
//! with this feature runs anywhere and says clearly when there is no GPU.
#![allow(unsafe_code)] // kernel launches are unsafe by nature; each says why it is sound

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use crate::TrainerError;
use crate::kernels::SOURCES;

/// The loaded kernels on one device.
pub struct Kernels {
    /// The stream every launch goes to.
    pub stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("functions", &self.functions.keys().collect::<Vec<_>>()).finish()
    }
}

fn cuda_error(what: &str, e: impl std::fmt::Debug) -> TrainerError {
    TrainerError::Unsupported(format!("--device cuda: {what}: {e:?}"))
}

/// The names of the `extern "C" __global__` functions of a source.
pub fn kernel_names(source: &str) -> Vec<String> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next().map(|n| n.trim().to_string()))
        .collect()
}

impl Kernels {
    /// Opens device `ordinal` and compiles every kernel for `arch` (e.g.
    /// `sm_90`) with the CUDA headers in `include` (`/usr/local/cuda/include`).
    pub fn open(ordinal: usize, arch: &'static str, include: &str) -> Result<Kernels, TrainerError> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(TrainerError::Unsupported(
                "--device cuda: no NVIDIA driver (libcuda) on this machine; use --device cpu".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error("opening the device", e))?;
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        for (file, source) in SOURCES {
            let options = CompileOptions {
                arch: Some(arch),
                include_paths: vec![include.to_string()],
                name: Some((*file).to_string()),
                ..Default::default()
            };
            let ptx =
                compile_ptx_with_opts(source, options).map_err(|e| cuda_error(&format!("compiling {file}"), e))?;
            let module = ctx.load_module(ptx).map_err(|e| cuda_error(&format!("loading {file}"), e))?;
            for name in kernel_names(source) {
                let f = module.load_function(&name).map_err(|e| cuda_error(&format!("{file}: {name}"), e))?;
                functions.insert(name, f);
            }
        }
        Ok(Kernels { stream, functions })
    }

    /// A kernel by name.
    pub fn function(&self, name: &str) -> Result<&CudaFunction, TrainerError> {
        self.functions.get(name).ok_or_else(|| TrainerError::Unsupported(format!("no kernel named {name}")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kernel_of_every_source_is_found_by_name() {
        let names: Vec<String> = crate::kernels::SOURCES.iter().flat_map(|(_, s)| super::kernel_names(s)).collect();
        for expected in ["lora_down", "lora_up_add", "lora_grad_u", "lora_dx_add", "lora_grad_b", "lora_grad_a"] {
            assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
        }
        assert!(names.iter().any(|n| n == "adamw_step") && names.iter().any(|n| n == "sum_squares"));
    }
}
