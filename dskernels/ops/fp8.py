"""FP8 casts with fine-grained scales (API.md section 2; DeepGEMM's `per_token_cast_to_fp8` and
`per_block_cast_to_fp8`)."""

from __future__ import annotations

import numpy
import torch

import python_ref
from dskernels._backend import select_backend
from dskernels._checks import as_flag, check_multiple, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel
from dskernels.ops._sizes import as_sizes, check_sizes, check_sizes_tensor, sizes_on_device

FP8 = torch.float8_e4m3fn
GROUP_SIZE = 128
# The sm90 cast kernels passed tests/test_fp8_cast.py and compute-sanitizer on an H200
# (2026-12-04, abe2885). Their load order and group arithmetic were rewritten after that run (same
# math; docs/fp8_cast.md, f15c9de), and in the device call that had the rewrite (1683657)
# tests/test_fp8_cast.py failed or did not finish (scripts/gpu_check.sh's list). So `auto` takes
# Triton until that file passes on a GPU again; then this goes back to True (the forced "cuda"
# backend runs them meanwhile).
_CUDA_CAST_VERIFIED = False
_SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False, gran_k: int = GROUP_SIZE, *,
                          use_ue8m0: bool | None = None, use_packed_ue8m0: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Casts activations to FP8 e4m3 with one scale per row per 128 columns.

    Args:
        x: [m, k] bfloat16, float16 or float32, k % 128 == 0, any device, any row stride.
        round_scale: round each scale up to a power of two (UE8M0 scales: DeepSeek-V3.1's
            checkpoints, "scale_fmt": "ue8m0"; DeepEP's round_scale; DeepGEMM's use_ue8m0 casts):
            x_scale = 2^ceil(log2(amax / 448)), x_fp8 = round_to_nearest_even(x * (1 / x_scale)).
        use_ue8m0, gran_k, use_packed_ue8m0: DeepGEMM's helper's arguments (in its order: x,
            use_ue8m0, gran_k): use_ue8m0 is round_scale, gran_k must be 128, and the scales are
            fp32 here (use_packed_ue8m0=True, Blackwell's int32-packed exponents, is refused).

    Returns:
        x_fp8: [m, k] torch.float8_e4m3fn, contiguous.
        x_scale: [m, k / 128] float32, row-major, with
            x_scale[i, j] = max(max(|x[i, 128j : 128j + 128]|), 1e-4) / 448 and
            x_fp8 = round_to_nearest_even(x * (448 / amax)), so x ~= x_fp8.float() * x_scale
            (each scale broadcast over its 128 columns).

    Raises TypeError / ValueError naming the argument for a wrong dtype, rank or k.
    """
    round_scale = _deepgemm_keywords(round_scale, use_ue8m0, gran_k, use_packed_ue8m0)
    return torch.ops.dskernels.per_token_cast_to_fp8(x, round_scale)


def per_block_cast_to_fp8(w: torch.Tensor, round_scale: bool = False, gran_k: int = GROUP_SIZE, *,
                          use_ue8m0: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Casts weights to FP8 e4m3 with one scale per 128x128 block.

    Args:
        w: [n, k] bfloat16, float16 or float32, k % 128 == 0 (n may be anything >= 0).
        round_scale: power-of-two scales, as for per_token_cast_to_fp8 (use_ue8m0, gran_k too).

    Returns:
        w_fp8: [n, k] torch.float8_e4m3fn, contiguous.
        w_scale: [ceil(n / 128), k / 128] float32, row-major; block (i, j) covers rows
            128i .. min(128i + 128, n) - 1 and columns 128j .. 128j + 127, its amax taken over
            the rows that exist; same rounding and scale rule as per_token_cast_to_fp8.
    """
    round_scale = _deepgemm_keywords(round_scale, use_ue8m0, gran_k)
    return torch.ops.dskernels.per_block_cast_to_fp8(w, round_scale)


def per_channel_cast_to_fp8(x: torch.Tensor, ks=None, ks_tensor: torch.Tensor | None = None,
                            round_scale: bool = False, *, use_ue8m0: bool | None = None,
                            gran_k: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Casts token-major activations (or gradients) to FP8 e4m3 with one scale per column per 128
    tokens, optionally per group of tokens: the operands of the K-grouped weight-gradient GEMM
    (k_grouped_fp8_gemm_tn_contiguous), cast straight from the [tokens, h] layout the forward pass
    stored, with no transposing copy.

    Args:
        x: [tokens, h] bfloat16, float16 or float32, any h, any strides.
        ks: None (one group of all the tokens) or a list of python ints >= 0 summing to tokens: the
            groups (experts' tokens, one after another). Each group's first token starts a new
            128-token scale block; its last block may be partial (amax over the tokens it has).
        ks_tensor: ks as int32 [G] on x's device (the kernel reads it; must equal ks, checked on CPU
            tensors), or None (made from ks by one asynchronous copy). Only with ks. One that
            disagrees (on a GPU, where it is not checked) never makes a read or write outside x
            and the outputs, but rows of x_fp8 that its blocks do not cover are left unwritten.
        round_scale: power-of-two (UE8M0) scales, as for per_token_cast_to_fp8 (use_ue8m0, gran_k:
            DeepGEMM's helper keywords, gran_k 128 only). DeepGEMM's helper takes them by position,
            (x, use_ue8m0, gran_k): a bool where ks goes is read that way.

    Returns:
        x_fp8: [tokens, h] torch.float8_e4m3fn, contiguous.
        x_scale: [sum(ceil(k_g / 128)), h] float32, row-major: row j of group g's rows holds, per
            column c, max(max |x[t, c]|, 1e-4) / 448 over that block's tokens t, and
            x ~= x_fp8.float() * x_scale (each scale broadcast over its block's tokens).
    """
    if isinstance(ks, (bool, numpy.bool_)):  # DeepGEMM's (x, use_ue8m0, gran_k=128)
        if use_ue8m0 is not None:
            raise TypeError("use_ue8m0: given twice (also as the second positional argument, DeepGEMM's place for it)")
        if ks_tensor is not None and not isinstance(ks_tensor, torch.Tensor):
            ks_tensor, gran_k = None, ks_tensor
        ks, use_ue8m0 = None, bool(ks)
    round_scale = _deepgemm_keywords(round_scale, use_ue8m0, gran_k)
    if ks is not None:
        ks = as_sizes("ks", ks)
    return torch.ops.dskernels.per_channel_cast_to_fp8(x, ks, ks_tensor, round_scale)


def silu_and_mul_cast_to_fp8(x: torch.Tensor, masked_m: torch.Tensor | None = None,
                             round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A SwiGLU expert's activation, cast for its down projection, in one pass: x holds the gate
    and up projections side by side ([gate | up], as the fused gate_up GEMM writes them), and
    the result is per_token_cast_to_fp8(silu(gate) * up) with the product in fp32: no fp32
    intermediate in memory, one read of x and one write of the FP8 values and scales.

    Args:
        x: [M, 2I] (contiguous layout) or [G, M, 2I] (masked layout), bfloat16, float16 or
            float32, I % 128 == 0, any strides.
        masked_m: None, or int32 [G] on x's device with a 3-dimensional x: only the rows
            i < masked_m[g] of group g are computed (read and written on the device: CUDA-graph
            safe), the others are left unspecified, as the masked grouped GEMM leaves them.
        round_scale: power-of-two (UE8M0) scales, as for per_token_cast_to_fp8.

    Returns:
        act_fp8: [..., I] torch.float8_e4m3fn and act_scale: [..., I / 128] float32, row-major:
        per_token_cast_to_fp8's output for act = silu(gate) * up, up to the last bits of silu
        (the kernel forms gate * sigmoid(gate) * up, torch gate / (1 + exp(-gate)) * up: a scale
        may differ by an ulp, an e4m3 value rarely by one step).
    """
    round_scale = as_flag("round_scale", round_scale)
    return torch.ops.dskernels.silu_and_mul_cast_to_fp8(x, masked_m, round_scale)


def silu_and_mul(x: torch.Tensor, masked_m: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU's activation for float experts: x = [gate | up] ([M, 2I] or [G, M, 2I], bfloat16,
    float16 or float32, any I, any strides) -> silu(gate) * up in x's dtype ([.., I]), computed in
    fp32 and rounded once, in one pass. masked_m as for silu_and_mul_cast_to_fp8: only each group's
    first masked_m[g] rows are computed (the masked layout's valid rows; the others unspecified)."""
    return torch.ops.dskernels.silu_and_mul(x, masked_m)


def _check_silu_and_mul(x, masked_m, cast: bool = True) -> None:
    check_tensor("x", x, dtypes=_SOURCE_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected [M, 2I] or [G, M, 2I], got shape {tuple(x.shape)}")
    if cast:
        check_multiple("x", x.shape[-1], 2 * GROUP_SIZE, "the last dimension (2I: gate and up, I % 128 == 0)")
    else:
        check_multiple("x", x.shape[-1], 2, "the last dimension (2I: gate and up)")
    if masked_m is not None:
        if x.dim() != 3:
            raise ValueError(f"masked_m: only with a 3-dimensional x [G, M, 2I], got x of shape {tuple(x.shape)}")
        check_tensor("masked_m", masked_m, ndim=1, dtypes=(torch.int32,), device=x.device)
        if masked_m.shape[0] != x.shape[0]:
            raise ValueError(f"masked_m: expected shape ({x.shape[0]},) (one row count per group of x), got "
                             f"{tuple(masked_m.shape)}")


def _silu_and_mul_outputs(x):
    half = x.shape[-1] // 2
    return (x.new_empty(*x.shape[:-1], half, dtype=FP8),
            x.new_empty(*x.shape[:-1], half // GROUP_SIZE, dtype=torch.float32))


@torch.library.register_kernel("dskernels::silu_and_mul_cast_to_fp8", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("silu_and_mul_cast_to_fp8")
def _silu_and_mul_cast_to_fp8(x, masked_m=None, round_scale=False):
    _check_silu_and_mul(x, masked_m)
    return _run_silu_and_mul("silu_and_mul_cast_to_fp8", x, masked_m, round_scale, cast=True)


def _run_silu_and_mul(op: str, x, masked_m, round_scale: bool, cast: bool):
    """Both SwiGLU ops: the reference (every row: those past masked_m are unspecified) or the Triton
    kernel, on a 3-dimensional view of x with unit column stride."""
    if select_backend(op, x.device, has_cuda=False, has_triton=True) == "ref":
        # contiguous: the fake's row-major layout whatever x's strides (the oracle follows x's)
        if cast:
            return tuple(t.contiguous() for t in python_ref.silu_and_mul_cast_to_fp8(x, round_scale))
        return python_ref.silu_and_mul(x).contiguous()
    from dskernels.triton import fp8_cast

    if x.stride(-1) != 1:
        x = x.contiguous()
    outputs = _silu_and_mul_outputs(x) if cast else (x.new_empty(*x.shape[:-1], x.shape[-1] // 2),)
    batched = [t if x.dim() == 3 else t.unsqueeze(0) for t in (x, *outputs)]
    if cast:
        fp8_cast.silu_and_mul_cast_to_fp8(*batched, masked_m, round_scale)
        return outputs
    fp8_cast.silu_and_mul(*batched, masked_m)
    return outputs[0]


@torch.library.register_fake("dskernels::silu_and_mul_cast_to_fp8")
def _silu_and_mul_cast_to_fp8_fake(x, masked_m=None, round_scale=False):
    _check_silu_and_mul(x, masked_m)
    return _silu_and_mul_outputs(x)


@torch.library.register_kernel("dskernels::silu_and_mul", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("silu_and_mul")
def _silu_and_mul(x, masked_m=None):
    _check_silu_and_mul(x, masked_m, cast=False)
    return _run_silu_and_mul("silu_and_mul", x, masked_m, False, cast=False)


@torch.library.register_fake("dskernels::silu_and_mul")
def _silu_and_mul_fake(x, masked_m=None):
    _check_silu_and_mul(x, masked_m, cast=False)
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _check_channel_cast(x, ks, ks_tensor) -> int:
    """per_channel_cast_to_fp8's arguments; returns the number of scale rows."""
    check_tensor("x", x, ndim=2, dtypes=_SOURCE_DTYPES)
    if ks is None:
        if ks_tensor is not None:
            raise ValueError("ks_tensor: expected None when ks is None (one group of every token)")
        return (x.shape[0] + GROUP_SIZE - 1) // GROUP_SIZE
    check_sizes("ks", ks)
    if sum(ks) != x.shape[0]:
        raise ValueError(f"ks: expected sizes summing to x's {x.shape[0]} tokens, got {sum(ks)}")
    check_sizes_tensor(ks_tensor, len(ks), x.device, ks=ks)
    return sum((k + GROUP_SIZE - 1) // GROUP_SIZE for k in ks)


def _deepgemm_keywords(round_scale, use_ue8m0, gran_k, use_packed_ue8m0=False) -> bool:
    """round_scale, from it or from DeepGEMM's use_ue8m0 (the same rounding); gran_k must be 128,
    and the scales fp32 (not packed)."""
    round_scale = as_flag("round_scale", round_scale)
    if as_flag("use_packed_ue8m0", use_packed_ue8m0):
        raise ValueError("use_packed_ue8m0: the scales are fp32 here (1x128 groups); packed UE8M0 exponents "
                         "are Blackwell's layout")
    if use_ue8m0 is not None:
        use_ue8m0 = as_flag("use_ue8m0", use_ue8m0)
        if round_scale and not use_ue8m0:
            raise ValueError("use_ue8m0: DeepGEMM's name for round_scale; got use_ue8m0=False with round_scale=True")
        round_scale = use_ue8m0
    if gran_k != GROUP_SIZE:
        raise ValueError(f"gran_k: only {GROUP_SIZE} (1x128 and 128x128 groups) is supported, got {gran_k!r}")
    return round_scale


def _check_source(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t, ndim=2, dtypes=_SOURCE_DTYPES)
    check_multiple(name, t.shape[1], GROUP_SIZE, "the last dimension (k)")


def _vectorizable(t: torch.Tensor) -> torch.Tensor:
    """The CUDA and Triton kernels read whole rows with 16-byte loads: unit stride, aligned rows.
    Otherwise a fresh row-major copy: contiguous() and clone() keep the stride of a single row
    (torch ignores it), and the CUDA kernel refused a [1, k] view of a wider buffer."""
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t


def _cast(op: str, src: torch.Tensor, scale_rows: int, ref, triton_kernel: str,
          round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    backend = select_backend(op, src.device, has_cuda=True, has_triton=True, cuda_verified=_CUDA_CAST_VERIFIED)
    if backend == "ref":
        return ref(src, round_scale)
    out = torch.empty(src.shape, dtype=FP8, device=src.device)
    scale = torch.empty(scale_rows, src.shape[1] // GROUP_SIZE, dtype=torch.float32, device=src.device)
    if src.numel() == 0:  # (an [m, 0] tensor has strides the CUDA launcher's row alignment check refuses)
        return out, scale
    src = _vectorizable(src)
    if backend == "cuda":
        getattr(torch.ops.dskernels, f"_sm90_{op}")(src, out, scale, round_scale)
    else:
        from dskernels.triton import fp8_cast

        getattr(fp8_cast, triton_kernel)(src, out, scale, round_scale)
    return out, scale


@torch.library.register_kernel("dskernels::per_token_cast_to_fp8", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("per_token_cast_to_fp8")
def _per_token_cast_to_fp8(x, round_scale=False):
    _check_source("x", x)
    return _cast("per_token_cast_to_fp8", x, x.shape[0], python_ref.per_token_cast_to_fp8,
                 "per_token_cast_to_fp8", round_scale)


@torch.library.register_kernel("dskernels::per_block_cast_to_fp8", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("per_block_cast_to_fp8")
def _per_block_cast_to_fp8(w, round_scale=False):
    _check_source("w", w)
    return _cast("per_block_cast_to_fp8", w, -(-w.shape[0] // GROUP_SIZE),
                 python_ref.per_block_cast_to_fp8, "per_block_cast_to_fp8", round_scale)


@torch.library.register_fake("dskernels::per_token_cast_to_fp8")
def _per_token_cast_to_fp8_fake(x, round_scale=False):
    _check_source("x", x)
    m, k = x.shape
    return x.new_empty(m, k, dtype=FP8), x.new_empty(m, k // GROUP_SIZE, dtype=torch.float32)


@torch.library.register_fake("dskernels::per_block_cast_to_fp8")
def _per_block_cast_to_fp8_fake(w, round_scale=False):
    _check_source("w", w)
    n, k = w.shape
    return (w.new_empty(n, k, dtype=FP8),
            w.new_empty((n + GROUP_SIZE - 1) // GROUP_SIZE, k // GROUP_SIZE, dtype=torch.float32))


@torch.library.register_kernel("dskernels::per_channel_cast_to_fp8", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("per_channel_cast_to_fp8")
def _per_channel_cast_to_fp8(x, ks=None, ks_tensor=None, round_scale=False):
    blocks = _check_channel_cast(x, ks, ks_tensor)
    backend = select_backend("per_channel_cast_to_fp8", x.device, has_cuda=False, has_triton=True)
    if backend == "ref":
        return python_ref.per_channel_cast_to_fp8(x, ks, round_scale)
    from dskernels.triton import fp8_cast

    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(blocks, x.shape[1], dtype=torch.float32, device=x.device)
    if ks_tensor is None:
        ks_tensor = sizes_on_device([x.shape[0]] if ks is None else ks, x.device)
    fp8_cast.per_channel_cast_to_fp8(x, out, scale, ks_tensor, round_scale)
    return out, scale


@torch.library.register_fake("dskernels::per_channel_cast_to_fp8")
def _per_channel_cast_to_fp8_fake(x, ks=None, ks_tensor=None, round_scale=False):
    blocks = _check_channel_cast(x, ks, ks_tensor)
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(blocks, x.shape[1], dtype=torch.float32)
