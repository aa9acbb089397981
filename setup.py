"""Builds dskernels._C: every schema, plus the sm_90a kernels when a CUDA toolkit is present.

Never asks for a GPU: nvcc (found through CUDA_HOME, or on PATH) is enough to compile the Hopper
kernels. Without a toolkit, or with DSKERNELS_CPU_ONLY=1, only csrc/torch_bindings.cpp is built:
the ops then run on the reference and Triton backends.

Knobs (environment):
  TORCH_CUDA_ARCH_LIST  defaults to 9.0a (wgmma and setmaxnreg need the `a` target)
  MAX_JOBS              parallel compile jobs (ninja)
  DSKERNELS_CPU_ONLY=1  skip the CUDA sources
"""

import glob
import os

from setuptools import find_packages, setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")

from torch.utils import cpp_extension  # noqa: E402  (reads TORCH_CUDA_ARCH_LIST at import)

ROOT = os.path.dirname(os.path.abspath(__file__))


def cutlass_include_dirs():
    """CUTLASS/CuTe headers: CUTLASS_HOME if set, else the nvidia-cutlass package."""
    home = os.environ.get("CUTLASS_HOME")
    if home:
        return [os.path.join(home, "include")]
    try:
        import cutlass_library
    except ImportError:
        return []
    return [os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")]


def with_cuda():
    if os.environ.get("DSKERNELS_CPU_ONLY") == "1":
        return False
    return cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def extension():
    cxx_flags = ["-O3", "-std=c++20"]
    # csrc/**/*.cpp: host C++ (schemas, CPU kernels), always built; csrc/**/*.cu: CUDA kernels.
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not with_cuda():
        return cpp_extension.CppExtension(
            "dskernels._C", sources, extra_compile_args={"cxx": cxx_flags})

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc", "include")] + cutlass_include_dirs()
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-Xptxas=--warn-on-spills",
        "-DDSKERNELS_WITH_CUDA",
    ]
    return cpp_extension.CUDAExtension(
        "dskernels._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DDSKERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
    )


setup(
    name="dskernels",
    version="0.1.0",
    description="DeepSeek-V3 kernels for Hopper: MLA decode, FP8 GEMMs, EP dispatch/combine, DualPipe",
    packages=find_packages(include=["dskernels", "dskernels.*", "python_ref", "python_ref.*"]),
    python_requires=">=3.10",
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
