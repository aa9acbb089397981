"""FP8 helpers shared by the Triton kernels.

Triton has float8_e4m3fn (fp8e4nv) only on sm_89 and newer; on older GPUs (an A100) a kernel that
names the type does not compile. So the casts write e4m3 bits through uint8 views: rounded by the
GPU's conversion on sm_90+ (`native_fp8_cast`), else computed in integer arithmetic (older GPUs and
the interpreter); and the kernels that read fp8 take the bytes as uint8 and widen them
themselves where `native_fp8` says the type is missing.
"""

import os

import torch
import triton
import triton.language as tl


def native_fp8(device: torch.device) -> bool:
    """Whether Triton has float8_e4m3fn on `device` (sm_89+, and the interpreter);
    DSKERNELS_TRITON_NATIVE_FP8=0 makes every kernel take the byte path (to test it anywhere)."""
    if os.environ.get("DSKERNELS_TRITON_NATIVE_FP8", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def native_fp8_cast(device: torch.device) -> bool:
    """Whether the casts may round to e4m3 with the GPU's own conversion (`cvt.rn.satfinite.e4m3x2.f32`:
    ties to even, saturating at +-448, NaN -> 0x7F, the bits of python_ref's cast, as the sm90 CUDA
    casts' tests show) instead of round_to_e4m3's ~35 integer and float operations per value, which
    made the Triton casts ALU-bound. sm_90+ only: for sm_89 Triton (3.8) converts through fp16
    rounded toward zero first (`cvt.rz.f16.f32`), a double rounding that moves values just above a
    tie. Never under the interpreter (its fp8 cast rounds wrongly) nor with DSKERNELS_TRITON_NATIVE_FP8=0;
    scripts/check_triton_compile.py checks the instruction in every NATIVE kernel."""
    # native_fp8's rule inlined: on the GPU path of every cast, one environment read and one capability
    # query (torch's, a few us of host time) less than calling it
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("DSKERNELS_TRITON_NATIVE_FP8", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


@triton.jit
def round_to_e4m3(x):
    """fp32 -> the nearest float8_e4m3fn value (ties to even, saturating at +-448, NaN kept), as fp32.

    e4m3_bits then only moves fields. The interpreter (the CPU path CI tests) needs it: its fp8
    cast rounds half-up and drops the carry into the exponent (124.3 -> 64); so do GPUs before
    sm_89 (no such cast) and sm_89 (Triton's cast rounds twice there). sm_90+ GPUs use the hardware
    conversion instead (native_fp8_cast): this costs ~35 ALU ops per value.
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
def e4m3_bits(x):
    """fp32 -> the bits (uint8) of the nearest float8_e4m3fn: round_to_e4m3, then the fields moved
    by integer arithmetic (no fp8 type: any GPU). NaN -> 0x7F, as torch's cast gives."""
    bits = round_to_e4m3(x).to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    normal = ((exponent - 120) << 3) | ((bits >> 20) & 7)  # fp32 bias 127, e4m3 bias 7
    # Below 2^-6 (fp32 exponent 121) e4m3 is subnormal: the value is k * 2^-9, k < 8, exactly.
    subnormal = ((bits & 0x7FFFFFFF).to(tl.float32, bitcast=True) * 512.0).to(tl.int32)
    code = tl.where(exponent >= 121, normal, subnormal) | ((bits >> 24) & 0x80)
    return tl.where(x != x, 0x7F, code).to(tl.uint8)


@triton.jit
def to_e4m3_bits(x, NATIVE: tl.constexpr):
    """fp32 -> e4m3 bits (uint8): the GPU's conversion where native_fp8_cast allows it, else
    e4m3_bits; the same bits either way."""
    if NATIVE:
        return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return e4m3_bits(x)


@triton.jit
def ceil_to_power_of_two(scale):
    """python_ref.fp8.ceil_to_power_of_two: the smallest power of two >= a positive fp32 (NaN and
    inf kept), by carrying a nonzero mantissa into the exponent."""
    bits = scale.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(scale != scale, scale, rounded)


@triton.jit
def scales_of(amax, ROUND_SCALE: tl.constexpr):
    """python_ref.fp8._scales: (multiplier, scale) for a floored amax; div_rn because Triton's plain
    `/` is approximate. ROUND_SCALE: the scale rounded up to a power of two (UE8M0)."""
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if ROUND_SCALE:
        scale = ceil_to_power_of_two(scale)
        multiplier = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale)
    else:
        multiplier = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
    return multiplier, scale


@triton.jit
def reciprocal_scales(amax, ROUND_SCALE: tl.constexpr):
    """DeepGEMM's per_custom_dims_cast_to_fp8 scales (python_ref.indexer): (multiplier, scale) with
    scale = amax / 448 (a power of two with ROUND_SCALE) and multiplier = 1 / scale either way,
    where scales_of's is 448 / amax without ROUND_SCALE."""
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if ROUND_SCALE:
        scale = ceil_to_power_of_two(scale)
    return tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale), scale


@triton.jit
def cast_groups(x, ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 [groups, 128] -> (e4m3 bits [groups, 128], fp32 scales [groups]): per_token_cast_to_fp8's
    math bit for bit (amax floored at 1e-4, NaN kept). NATIVE: native_fp8_cast."""
    amax = tl.maximum(max_nan(tl.abs(x), 1), 1e-4, propagate_nan=tl.PropagateNan.ALL)
    multiplier, scale = scales_of(amax, ROUND_SCALE)
    return to_e4m3_bits(x * multiplier[:, None], NATIVE), scale


@triton.jit
def e4m3_bits_to_fp16(bits):
    """uint8 float8_e4m3fn bits -> the same value in fp16 (exact: e4m3 is a subset of fp16).

    For GPUs without the fp8 type (see native_fp8). The bits moved into fp16's fields read as 2^-8
    times the value (subnormals included: fp16's grid is finer), so one exact multiplication by 256
    restores it. The NaN bytes (0x7F, 0xFF) would read as 480: they become NaN explicitly.
    """
    b = bits.to(tl.int16)
    half = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), half * 256.0).to(tl.float16)


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), as fp32, so `.to(tl.bfloat16)` is exact.

    Needed only under the interpreter: it truncates fp32 -> bf16 casts (1.0 + 3 * 2^-8 -> 1.0078
    instead of 1.0156); GPUs round to nearest even in the conversion instruction itself (the GEMM
    epilogues apply it under the interpreter only; EP's combine everywhere, for the same result).
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


# Read once, as Triton itself reads it when @triton.jit decorates (a constexpr global: a GPU build
# drops the branch below).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def as_element_type(x, ptr):
    """fp32 x converted for a store at ptr, rounded to nearest even as a GPU's conversion rounds
    (round_to_bf16 under the interpreter, which truncates fp32 -> bf16)."""
    if INTERPRETED:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = round_to_bf16(x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def rounded_to(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 x rounded to dtype (to nearest even), as fp32: the rounding of a torch elementwise op's
    bf16/fp16 result. ROUND_BF16 under the interpreter (its bf16 conversion truncates)."""
    if ROUND_BF16:
        return round_to_bf16(x)
    return x.to(dtype).to(tl.float32)
