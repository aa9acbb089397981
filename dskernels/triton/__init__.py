"""Triton kernels, one module per family. Imported lazily by dskernels.ops, so that TRITON_INTERPRET
set by a test harness before the first op call still takes effect."""

import os

import torch
import triton.language as tl

if os.environ.get("DSKERNELS_TRITON_COMPILE_LOG"):  # the device checks' compile log (dskernels/testing/triton_compiles.py)
    from dskernels.testing import triton_compiles

    triton_compiles.install_from_env()

TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# Host-side arithmetic for grids and block sizes. triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions since Triton 3.7 (usable inside kernels too), and on the host each call costs
# ~7 us of argument unwrapping: a dozen of them were half of a decode-size GEMM's Python time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
