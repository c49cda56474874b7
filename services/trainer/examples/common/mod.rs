//! What the GPU examples share: the device opened from `[arch] [include]`
//! arguments, or "skipped: no GPU" and exit code 2 (never a pass).

use flywheel_trainer::cuda::Kernels;

/// Opens device 0 with arguments 1 (arch, default `sm_90`) and 2 (CUDA
/// headers, default `/usr/local/cuda/include`); exits 2 without a GPU.
pub fn open_kernels_or_skip(args: &[String]) -> Kernels {
    let arch: &'static str = Box::leak(args.get(1).cloned().unwrap_or_else(|| "sm_90".into()).into_boxed_str());
    let include = args.get(2).cloned().unwrap_or_else(|| "/usr/local/cuda/include".into());
    match Kernels::open(0, arch, &include) {
        Ok(k) => k,
        Err(e) => {
            println!("skipped: no GPU ({e})");
            std::process::exit(2);
        }
    }
}
