"""FP8 helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """fp32 -> the nearest float8_e4m3fn value (ties to even, saturating at +-448, NaN kept), as fp32.

    The cast `.to(tl.float8e4nv)` of the result is then exact. We round ourselves because Triton's
    interpreter (the CPU path CI tests) rounds fp8 casts half-up and drops the carry into the
    exponent (124.3 -> 64); on GPUs this costs a few ALU ops in memory-bound kernels.
    """
    bits = x.to(tl.int32, bitcast=True)
    # NaN stays NaN (the GPU's plain min would turn it into 448); the steps below keep it NaN.
    magnitude = tl.minimum((bits & 0x7FFFFFFF).to(tl.float32, bitcast=True), 448.0, propagate_nan=tl.PropagateNan.ALL)
    exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # e4m3 keeps 3 mantissa bits; below 2^-6 its grid is the subnormal one, spacing 2^-9.
    ulp_exponent = tl.maximum(exponent, -6) - 3
    ulp = ((ulp_exponent + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exponent) << 23).to(tl.float32, bitcast=True)
    steps = magnitude * inv_ulp  # exact (a power of two), at most 14
    # Adding 2^23 leaves no fraction bits: fp32 addition rounds to an integer, ties to even.
    steps = (steps + 8388608.0) - 8388608.0
    rounded = (steps * ulp).to(tl.int32, bitcast=True)
    return (rounded | (bits & -2147483648)).to(tl.float32, bitcast=True)  # the sign of x, -0 too


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan(x, axis):
    """tl.max that returns NaN for a slice holding one (the GPU's plain max skips NaN)."""
    return tl.reduce(x, axis, _max_nan)


@triton.jit
def cast_to_e4m3(x):
    """fp32 -> float8_e4m3fn: round_to_e4m3, then the (then exact) cast; NaN -> the e4m3 NaN, which
    the interpreter's cast does not give (it returns 384)."""
    bits = round_to_e4m3(x).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(x != x, 0x7F, bits).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
