//! The CUDA side of the trainer (cargo feature `cuda`): a device context,
//! every kernel of [`crate::kernels::SOURCES`] compiled with NVRTC and
//! loaded by name, and the fused LoRA linear ([`DeviceGroup`]) run as the
//! GEMM plan of [`crate::kernels::lora`] with cuBLAS. libcuda, libnvrtc and
//! libcublas are loaded at run time, so a build with this feature runs
//! anywhere and says clearly when there is no GPU.
#![allow(unsafe_code)] // kernel launches are unsafe by nature; each says why it is sound

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use crate::TrainerError;
use crate::kernels::lora::{Buffer, Gemm, GroupShape};
use crate::kernels::{SOURCES, bf16_bits, from_bf16_bits};

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

    /// A cuBLAS handle on this stream.
    pub fn blas(&self) -> Result<CudaBlas, TrainerError> {
        CudaBlas::new(self.stream.clone()).map_err(|e| cuda_error("creating the cuBLAS handle", e))
    }

    /// `lora_pack_block` (lora.cu): dst[(row0 + i)·ld + col0 + j] =
    /// bf16(scale · src[i·cols + j]) for a rows × cols source.
    #[allow(clippy::too_many_arguments)] // the kernel's signature
    pub fn pack_block(
        &self,
        dst: &mut CudaSlice<u16>,
        ld: usize,
        row0: usize,
        col0: usize,
        src: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<(), TrainerError> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        assert!(src.len() >= rows * cols && dst.len() >= (row0 + rows - 1) * ld + col0 + cols, "pack_block bounds");
        let (ld, row0, col0) = (ld as i64, row0 as i64, col0 as i64);
        let (ri, ci) = (rows as i32, cols as i32);
        let mut l = self.stream.launch_builder(self.function("lora_pack_block")?);
        l.arg(dst).arg(&ld).arg(&row0).arg(&col0).arg(src).arg(&ri).arg(&ci).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, rows.div_ceil(8) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the assert above keeps every (i, j) the grid covers inside
        // both buffers; the kernel returns for indices past rows × cols.
        unsafe { l.launch(cfg) }.map_err(|e| cuda_error("lora_pack_block", e))?;
        Ok(())
    }
}

/// One buffer of a LoRA group on the device: bf16 (as raw bits) or fp32.
#[derive(Debug)]
pub enum DeviceBuffer {
    /// bf16 elements.
    Bf16(CudaSlice<u16>),
    /// fp32 elements.
    F32(CudaSlice<f32>),
}

/// A LoRA group's buffers on the device ([`GroupShape`] says which and how
/// large); its forward and backward run the plans of `kernels::lora` with
/// cuBLAS (bf16 in, fp32 accumulation).
#[derive(Debug)]
pub struct DeviceGroup {
    /// The group's shape.
    pub shape: GroupShape,
    stream: Arc<CudaStream>,
    buffers: HashMap<Buffer, DeviceBuffer>,
}

impl DeviceGroup {
    /// Allocates every buffer, zeroed (W′'s unused corner and off-diagonal
    /// B blocks must stay zero).
    pub fn new(stream: &Arc<CudaStream>, shape: GroupShape) -> Result<DeviceGroup, TrainerError> {
        let mut buffers = HashMap::new();
        for b in Buffer::ALL {
            let len = shape.len(b).max(1);
            let buffer = if b.is_bf16() {
                DeviceBuffer::Bf16(stream.alloc_zeros::<u16>(len).map_err(|e| cuda_error("allocating", e))?)
            } else {
                DeviceBuffer::F32(stream.alloc_zeros::<f32>(len).map_err(|e| cuda_error("allocating", e))?)
            };
            buffers.insert(b, buffer);
        }
        Ok(DeviceGroup { shape, stream: stream.clone(), buffers })
    }

    /// Copies a whole buffer from the host (bf16 buffers are rounded).
    pub fn upload(&mut self, buffer: Buffer, host: &[f32]) -> Result<(), TrainerError> {
        let stream = &self.stream;
        assert_eq!(host.len(), self.shape.len(buffer), "{buffer:?} size");
        let r = match self.buffers.get_mut(&buffer).expect("every buffer is allocated") {
            DeviceBuffer::Bf16(d) => stream.memcpy_htod(&bf16_bits(host), d),
            DeviceBuffer::F32(d) => stream.memcpy_htod(host, d),
        };
        r.map_err(|e| cuda_error("copying to the device", e))
    }

    /// Copies a whole buffer to the host.
    pub fn download(&self, buffer: Buffer) -> Result<Vec<f32>, TrainerError> {
        let stream = &self.stream;
        let len = self.shape.len(buffer);
        let v = match &self.buffers[&buffer] {
            DeviceBuffer::Bf16(d) => stream.clone_dtoh(d).map(|v| from_bf16_bits(&v)),
            DeviceBuffer::F32(d) => stream.clone_dtoh(d),
        };
        Ok(v.map_err(|e| cuda_error("copying to the host", e))?.into_iter().take(len).collect())
    }

    /// Copies the master A_cat (P·r × k) and B stacked by projection
    /// (N × r) into W′: one `lora_pack_block` per block of
    /// [`GroupShape::pack_blocks`].
    pub fn pack(
        &mut self,
        kernels: &Kernels,
        a_cat: &CudaSlice<f32>,
        b_stacked: &CudaSlice<f32>,
        scale: f32,
    ) -> Result<(), TrainerError> {
        let wide = self.shape.wide_k();
        let Some(DeviceBuffer::Bf16(w)) = self.buffers.get_mut(&Buffer::Weight) else { unreachable!("W′ is bf16") };
        for blk in self.shape.pack_blocks(scale) {
            let src = if blk.from_b { b_stacked } else { a_cat };
            let src = src.slice(blk.src_offset..blk.src_offset + blk.rows * blk.cols);
            kernels.pack_block(w, wide, blk.row0, blk.col0, &src, blk.rows, blk.cols, blk.scale)?;
        }
        Ok(())
    }

    /// The forward plan: Y (and T, kept in X′ for the backward).
    pub fn forward(&mut self, blas: &CudaBlas) -> Result<(), TrainerError> {
        self.shape.forward_plan().iter().try_for_each(|g| self.run(blas, g))
    }

    /// The backward plan: dX, dA and dB from dY (in dY′'s first N columns).
    pub fn backward(&mut self, blas: &CudaBlas, scale: f32, accumulate: bool) -> Result<(), TrainerError> {
        self.shape.backward_plan(scale, accumulate).iter().try_for_each(|g| self.run(blas, g))
    }

    /// Runs one GEMM of a plan with cuBLAS.
    pub fn run(&mut self, blas: &CudaBlas, g: &Gemm) -> Result<(), TrainerError> {
        if g.m == 0 || g.n == 0 || g.k == 0 {
            return Ok(()); // a rank-0 group (the plain base) skips its LoRA steps
        }
        let stream = &self.stream;
        let pointer = |o: &crate::kernels::lora::Operand| -> (u64, cudaDataType) {
            match &self.buffers[&o.buffer] {
                DeviceBuffer::Bf16(d) => (d.device_ptr(stream).0 + 2 * o.offset as u64, cudaDataType::CUDA_R_16BF),
                DeviceBuffer::F32(d) => (d.device_ptr(stream).0 + 4 * o.offset as u64, cudaDataType::CUDA_R_32F),
            }
        };
        let ((a, a_type), (b, b_type), (c, c_type)) = (pointer(&g.a), pointer(&g.b), pointer(&g.c));
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let dim = |v: usize| i32::try_from(v).map_err(|_| cuda_error("GEMM dimension", v));
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the
        // operands swap places and keep their transposition flags.
        // SAFETY: every operand lies inside its buffer (the plan's shapes
        // and leading dimensions come from the same GroupShape that sized
        // the buffers), all work is on the handle's one stream, and alpha
        // and beta are host values that outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                op(g.trans_b),
                op(g.trans_a),
                dim(g.n)?,
                dim(g.m)?,
                dim(g.k)?,
                (&raw const g.alpha).cast(),
                b as *const std::ffi::c_void,
                b_type,
                dim(g.b.ld)?,
                a as *const std::ffi::c_void,
                a_type,
                dim(g.a.ld)?,
                (&raw const g.beta).cast(),
                c as *mut std::ffi::c_void,
                c_type,
                dim(g.c.ld)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_error(g.name, e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kernel_of_every_source_is_found_by_name() {
        let names: Vec<String> = crate::kernels::SOURCES.iter().flat_map(|(_, s)| super::kernel_names(s)).collect();
        assert!(names.iter().any(|n| n == "lora_pack_block"), "{names:?}");
        assert!(names.iter().any(|n| n == "adamw_step") && names.iter().any(|n| n == "sum_squares"));
    }
}
