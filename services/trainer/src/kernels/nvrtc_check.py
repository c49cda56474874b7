"""Compiles every CUDA kernel beside this file with NVRTC for sm_90, as the
trainer's CUDA backend does at run time, and fails on any error. Needs no GPU:
the PyPI wheels nvidia-cuda-nvrtc (the compiler) and nvidia-cuda-runtime (the
headers) are enough. Usage: python nvrtc_check.py [arch]."""

import ctypes
import pathlib
import sys

import nvidia

ARCH = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
roots = [pathlib.Path(p) / "cu13" for p in nvidia.__path__]
lib_dir = next(r / "lib" for r in roots if (r / "lib" / "libnvrtc.so.13").exists())
include = next(r / "include" for r in roots if (r / "include" / "cuda_bf16.h").exists())
# libnvrtc opens its builtins by soname: load them first so no
# LD_LIBRARY_PATH is needed.
ctypes.CDLL(str(next(lib_dir.glob("libnvrtc-builtins.so.13.*"))), mode=ctypes.RTLD_GLOBAL)
nvrtc = ctypes.CDLL(str(lib_dir / "libnvrtc.so.13"))


def compile_ptx(path: pathlib.Path) -> tuple[bool, str, int]:
    prog = ctypes.c_void_p()
    source = path.read_bytes()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, path.name.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram returned {rc}", 0
    opts = [f"--gpu-architecture={ARCH}", f"-I{include}", "--std=c++17", "-default-device"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ptx_size = ctypes.c_size_t()
    if rc == 0:
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size))
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip(), ptx_size.value


def main() -> int:
    kernels = sorted(pathlib.Path(__file__).parent.glob("*.cu"))
    if not kernels:
        print("no .cu files found", file=sys.stderr)
        return 1
    failed = 0
    for path in kernels:
        ok, log, ptx = compile_ptx(path)
        if ok:
            print(f"nvrtc {ARCH}: {path.name} ok ({ptx} bytes of PTX)" + (f"\n{log}" if log else ""))
        else:
            failed += 1
            print(f"nvrtc {ARCH}: {path.name} FAILED\n{log}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
