"""Builds dskernels._C: every schema, plus the sm_90a kernels when a CUDA toolkit is present.

Never asks for a GPU: nvcc (found through CUDA_HOME, or on PATH) is enough to compile the Hopper
kernels. Without a toolkit, or with DSKERNELS_CPU_ONLY=1, only csrc/torch_bindings.cpp is built:
the ops then run on the reference and Triton backends.

The CUDA sources are compiled for sm_90a only, whatever TORCH_CUDA_ARCH_LIST says (wgmma and
setmaxnreg need the `a` target; a list such as "8.0;9.0" would otherwise fail in ptxas).

Build against the torch you run with: `pip install --no-build-isolation .` (an isolated build
compiles against whatever torch the index has, and the library then fails to load).

Knobs (environment):
  CUTLASS_HOME          a CUTLASS checkout (else the headers of the nvidia-cutlass package)
  MAX_JOBS              parallel compile jobs (ninja)
  DSKERNELS_CPU_ONLY=1  skip the CUDA sources (also true/yes; 0, false, no or unset: build them)
  DSKERNELS_ALLOW_ISOLATED_BUILD=1  build in an isolated environment anyway (a wheel for the torch
                        installed there, e.g. for a pinned distribution build)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # else a bare "No module named 'torch'" from inside pip's traceback
    raise RuntimeError(
        "dskernels: building it needs torch installed first (the extension is compiled against it): "
        "`pip install torch` (scripts/install.sh installs 2.14.1), then `pip install --no-build-isolation .`"
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def refuse_old_torch() -> None:
    """The oldest torch dskernels runs on is dskernels/_requirements.py's (read without importing the
    package, which would load torch's ops): an older one is refused before compiling against it."""
    import runpy

    message = runpy.run_path(os.path.join(ROOT, "dskernels", "_requirements.py"))["too_old_message"](
        torch.__version__)
    if message:
        raise RuntimeError(message)


def refuse_isolated_build() -> None:
    """pip's default isolated build (`pip install .`) installs a torch of its own choosing into a
    temporary environment and compiles against it: the install then succeeds and `import dskernels`
    fails ("built against torch X, but this is torch Y"), and CUTLASS installed beside torch is not
    seen. Refused at once instead, saying what to run."""
    import torch

    where = os.path.abspath(torch.__file__)
    isolated = any(mark in where for mark in ("pip-build-env", f"{os.sep}build-env-", f"{os.sep}builds-v"))
    if isolated and os.environ.get("DSKERNELS_ALLOW_ISOLATED_BUILD", "") not in ("1", "true", "yes"):
        raise RuntimeError(
            f"dskernels: this is an isolated build (torch {torch.__version__} from {os.path.dirname(where)}, not "
            "the torch you run): the library would be compiled against it and fail to load. Install torch first, "
            "then `pip install --no-build-isolation .` (or `bash scripts/install.sh`); "
            "DSKERNELS_ALLOW_ISOLATED_BUILD=1 builds against the isolated torch anyway.")


def torch_requirement() -> str:
    """_C is compiled against this torch's C++ ABI and refuses another major.minor at import: the
    wheel's metadata says so, so that pip keeps (or fetches) a torch it loads under, and warns when a
    later `pip install -U torch` breaks it, instead of an install that fails at import."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


# The CUTLASS release the kernels are written and checked against (scripts/install.sh installs it).
CUTLASS_PACKAGE = "nvidia-cutlass==4.2.0.0"


def cutlass_include_dir():
    """CUTLASS/CuTe headers: CUTLASS_HOME if set, else the nvidia-cutlass package; a clear error
    when neither has them (the CUDA build cannot go on without them)."""
    home = os.environ.get("CUTLASS_HOME")
    if home:
        include = os.path.join(home, "include")
    else:
        try:
            import cutlass_library
        except ImportError:
            cutlass_library = None
        include = (os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
                   if cutlass_library else None)
    if include is None or not os.path.exists(os.path.join(include, "cute", "tensor.hpp")):
        raise RuntimeError(
            f"dskernels: the CUDA kernels need the CUTLASS/CuTe headers, not found "
            f"({'CUTLASS_HOME=' + home if home else 'no nvidia-cutlass package'}). Install them with "
            f"`pip install --no-deps {CUTLASS_PACKAGE}`, or set CUTLASS_HOME to a CUTLASS checkout, or "
            f"build without the CUDA kernels (DSKERNELS_CPU_ONLY=1: Triton and the reference only).")
    return include


def cpu_only() -> bool:
    value = os.environ.get("DSKERNELS_CPU_ONLY", "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise RuntimeError(f"DSKERNELS_CPU_ONLY: expected 1/0 (or true/false, yes/no), got {value!r}")
    return value in ("1", "true", "yes")


def with_cuda():
    if cpu_only():
        return False
    home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from the first nvcc on PATH; a wrapper script there gives a root
    # without the toolkit's headers. Unless CUDA_HOME was set, the usual toolkit link is taken.
    usual = "/usr/local/cuda"
    if (not os.environ.get("CUDA_HOME") and home is not None
            and not os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
            and os.path.exists(os.path.join(usual, "include", "cuda_runtime.h"))):
        home = cpp_extension.CUDA_HOME = usual
        os.environ["CUDA_HOME"] = usual
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        if os.environ.get("CUDA_HOME"):  # asked for a toolkit that is not there: a typo, not a CPU build
            raise RuntimeError(
                f"dskernels: CUDA_HOME={os.environ['CUDA_HOME']} has no bin/nvcc, so it is not a CUDA toolkit root. "
                "Set CUDA_HOME to the toolkit (usually /usr/local/cuda), or unset it with DSKERNELS_CPU_ONLY=1 to "
                "build without the CUDA kernels.")
        print("dskernels: no CUDA toolkit found (CUDA_HOME unset, no nvcc on PATH): building WITHOUT the CUDA "
              "kernels (the Triton and reference backends only; DSKERNELS_CPU_ONLY=1 says this is meant)",
              file=sys.stderr)
        return False
    # Without the headers the compile would fail deep inside torch's headers.
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        raise RuntimeError(
            f"dskernels: CUDA_HOME={home}{'' if os.environ.get('CUDA_HOME') else ' (torch guessed it from the nvcc on PATH)'} "
            "has no include/cuda_runtime.h, "
            "so it is not a CUDA toolkit root. Set CUDA_HOME to the toolkit (usually /usr/local/cuda), or "
            "build without the CUDA kernels with DSKERNELS_CPU_ONLY=1.")
    return True


def extension():
    cxx_flags = ["-O3", "-std=c++20"]
    # csrc/**/*.cpp: host C++ (schemas, CPU kernels), always built; csrc/**/*.cu: CUDA kernels.
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not with_cuda():
        return cpp_extension.CppExtension(
            "dskernels._C", sources, extra_compile_args={"cxx": cxx_flags})

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), cutlass_include_dir()]
    nvcc_flags = [
        # An explicit arch flag also tells torch's BuildExtension to add none from TORCH_CUDA_ARCH_LIST.
        "-gencode=arch=compute_90a,code=sm_90a",
        "-O3",
        "-std=c++20",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-Xptxas=--warn-on-spills",
        # ptxas's report (registers, spills, wgmma serialization notes) for every kernel, in the build's
        # output: scripts/build.sh keeps it in build-setup.log, scripts/check_build.sh reads it.
        "-Xptxas=-v",
        "-DDSKERNELS_WITH_CUDA",
    ]
    return cpp_extension.CUDAExtension(
        "dskernels._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DDSKERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
    )


refuse_old_torch()
refuse_isolated_build()
setup(
    name="dskernels",
    version="0.1.0",
    description="DeepSeek-V3 kernels for Hopper: MLA decode, FP8 GEMMs, EP dispatch/combine, DualPipe",
    packages=find_packages(include=["dskernels", "dskernels.*", "python_ref", "python_ref.*"]),
    python_requires=">=3.10",
    # torch (the release built against) and its Triton; numpy for Triton's interpreter (CPU runs of
    # the Triton kernels) and torch's tensor <-> numpy conversions.
    install_requires=[torch_requirement(), "numpy"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
