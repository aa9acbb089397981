"""Sparse MLA: DeepSeek-V3.2's DeepSeek Sparse Attention (FlashMLA's sparse decode and
`flash_mla_sparse_fwd`). The math and V3.2's FP8 cache layout are python_ref/mla_sparse.py; the
Triton kernel is dskernels/triton/mla_sparse.py. No sm90 CUDA kernel yet: `auto` runs Triton on
CUDA tensors and the reference on CPU tensors.

`flash_mla_with_kvcache(..., indices=...)` (dskernels/ops/mla.py) calls the decode op, as
FlashMLA's does; both ops are public under their own names as well.
"""

from __future__ import annotations

import math
import numbers

import torch

import python_ref.mla_sparse as ref
from dskernels._backend import select_backend
from dskernels._checks import as_flag, check_int, check_multiple, check_one_device, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel
from dskernels.ops.mla import check_cache_heads

FP8 = torch.float8_e4m3fn
_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
quantize_sparse_kv_cache = ref.quantize_sparse_kv_cache


def dequantize_sparse_kv_cache(cache: torch.Tensor) -> torch.Tensor:
    """[..., 656] bytes of V3.2's FP8 layout (uint8, int8 as FlashMLA's tests hold them, or
    float8_e4m3fn) -> float32 [..., 576], exactly (python_ref.mla_sparse's torch ops on every device)."""
    check_tensor("cache", cache, dtypes=(torch.uint8, torch.int8, torch.float8_e4m3fn))
    return ref.dequantize_sparse_kv_cache(cache)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def flash_mla_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor, head_dim_v: int,
                            softmax_scale: float | None = None, is_fp8_kvcache: bool = False,
                            topk_length: torch.Tensor | None = None, attn_sink: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decode: each query token attends to its own top-k tokens of a paged cache.

    Args:
        q: [b, s_q, h_q, d] bfloat16 or float16 (float32 too; not float16 with the FP8 cache),
            unit stride in the last dimension.
        k_cache: [num_pages, page_size, h_kv, d] in q's dtype, or with is_fp8_kvcache V3.2's FP8
            layout [num_pages, page_size, h_kv, 656] (float8_e4m3fn, uint8 or int8 bytes; d = 576,
            head_dim_v = 512): per token 512 e4m3 latent values, 4 float32 scales (one per 128
            values: value = fp8 * scale), 64 bfloat16 rope values; `quantize_sparse_kv_cache`
            writes it. Any page_size and page stride (FlashMLA pads pages); unit last stride.
        indices: [b, s_q, topk] int32: the cache slots query token (i, j) attends to, slot =
            page * page_size + offset in the page (a sequence's block table already applied).
            -1, any negative value and slots >= num_pages * page_size mean "no token" and are
            never read; a slot listed twice counts twice. Shared by the kv heads.
        head_dim_v: dv; V is the first dv values of each cached token (512 for V3.2).
        softmax_scale: default d ** -0.5.
        topk_length: [b] int32 or None: sequence i uses only indices[i, :, :topk_length[i]].
        attn_sink: [h_q] float32 or None: out is multiplied by exp(lse) / (exp(lse) +
            exp(attn_sink[h])) (+inf: out = 0; -inf: no effect); lse is unaffected.

    Returns:
        out: [b, s_q, h_q, dv] in q's dtype; lse: [b, h_q, s_q] float32, the natural log of the
        sum of exp(scaled scores). A query with no valid index gets out = 0 and lse = +inf; one
        whose scores hold NaN (a NaN in q or in a listed cache row) gets NaN in both.
    """
    # The scalars checked here: the op's schema would refuse a wrong type with a RuntimeError
    is_fp8_kvcache = as_flag("is_fp8_kvcache", is_fp8_kvcache)
    if is_fp8_kvcache and isinstance(k_cache, torch.Tensor) and k_cache.dtype == torch.int8:
        k_cache = k_cache.view(torch.uint8)  # FlashMLA takes the bytes as int8 too
    head_dim_v = check_int("head_dim_v", head_dim_v, 1)
    softmax_scale = _check_scale("softmax_scale", softmax_scale, required=False)
    return torch.ops.dskernels.flash_mla_sparse_decode(q, k_cache, indices, head_dim_v, softmax_scale,
                                                       is_fp8_kvcache, topk_length, attn_sink)


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                         d_v: int = 512, attn_sink: torch.Tensor | None = None,
                         topk_length: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill (FlashMLA's `flash_mla_sparse_fwd`): token-level sparse attention.

    Args:
        q: [s_q, h_q, d] bfloat16 or float16 (float32 too), unit stride in the last dimension.
        kv: [s_kv, h_kv, d] in q's dtype (h_q % h_kv == 0; query head h reads kv head
            h // (h_q // h_kv)); V is kv[..., :d_v]. Unit stride in the last dimension.
        indices: [s_q, h_kv, topk] int32, rows of kv per (query token, kv head); negative values
            and values >= s_kv mean "no token" and are never read.
        sm_scale: the scale of q.k.
        d_v: the value width (512 for V3.2), 1 <= d_v <= d.
        attn_sink: [h_q] float32 or None, as in flash_mla_sparse_decode.
        topk_length: [s_q] int32 or None: query token i uses only indices[i, :, :topk_length[i]].

    Returns:
        out: [s_q, h_q, d_v] in q's dtype; max_logits: [s_q, h_q] float32, the largest scaled
        score (-inf with no valid index); lse: [s_q, h_q] float32, natural log (+inf with no
        valid index, where out = 0).
    """
    d_v = check_int("d_v", d_v, 1)
    sm_scale = _check_scale("sm_scale", sm_scale, required=True)  # before the schema's own, unnamed complaint
    return torch.ops.dskernels.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_scale(name: str, value, required: bool):
    """value as the float the op schemas take (any real number but a bool: numpy's too, as
    FlashMLA's bindings take them), None where not required, a traced float as it is."""
    if value is None and not required:
        return None
    if isinstance(value, torch.SymFloat):  # a fake kernel's under torch.compile(dynamic=True)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    # Traced with dynamic=True, a float is a symbol math.isfinite cannot read: the op's kernel
    # checks the value it is called with.
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value}")
    return value if isinstance(value, float) else float(value)


def _check_extras(topk_length, attn_sink, rows: int, rows_name: str, h_q: int, device) -> None:
    if topk_length is not None:
        check_tensor("topk_length", topk_length, ndim=1, dtypes=(torch.int32,), device=device)
        if topk_length.shape[0] != rows:
            raise ValueError(f"topk_length: expected shape ({rows},) (one per {rows_name}), "
                             f"got {tuple(topk_length.shape)}")
    if attn_sink is not None:
        check_tensor("attn_sink", attn_sink, ndim=1, dtypes=(torch.float32,), device=device)
        if attn_sink.shape[0] != h_q:
            raise ValueError(f"attn_sink: expected shape ({h_q},) (one per query head), got {tuple(attn_sink.shape)}")


def _check_q(q, ndim: int) -> None:
    check_tensor("q", q, ndim=ndim, dtypes=_Q_DTYPES)
    check_multiple("q", q.shape[-1], 16, "the head dimension d (last dimension)")
    if q.stride(-1) != 1 and q.numel() > 0:
        raise ValueError(f"q: expected unit stride in the last dimension, got strides {q.stride()}")


def _check_decode_args(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8_kvcache, topk_length, attn_sink):
    check_one_device(q=q, k_cache=k_cache, indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    _check_q(q, 4)
    b, s_q, h_q, d = q.shape
    device = q.device
    if s_q < 1:
        raise ValueError(f"q: expected s_q (dimension 1) >= 1, got shape {tuple(q.shape)}")
    if as_flag("is_fp8_kvcache", is_fp8_kvcache):
        check_tensor("k_cache", k_cache, ndim=4, dtypes=(FP8, torch.uint8), device=device)
        if k_cache.shape[3] != ref.FP8_TOKEN_BYTES or d != ref.FP8_HEAD_DIM:
            raise ValueError(f"k_cache: is_fp8_kvcache reads DeepSeek-V3.2's layout, {ref.FP8_TOKEN_BYTES} bytes "
                             f"per token for d = {ref.FP8_HEAD_DIM}; got k_cache {tuple(k_cache.shape)} and "
                             f"q's d = {d}")
        if head_dim_v != ref.FP8_NOPE_DIM:
            raise ValueError(f"head_dim_v: expected {ref.FP8_NOPE_DIM} (the latent part) with is_fp8_kvcache, "
                             f"got {head_dim_v}")
        if q.dtype == torch.float16:
            # The dequantized latent (fp8 x scale) and the bf16 rope can exceed fp16's range.
            raise TypeError("q: expected bfloat16 or float32 with is_fp8_kvcache (the cache's values are "
                            "dequantized to q's dtype; fp16 overflows past 65504), got torch.float16")
        if any(k_cache.stride(i) % 16 for i in range(3) if k_cache.shape[i] > 1):
            raise ValueError(f"k_cache: expected 16-byte aligned token rows in the FP8 layout (its scales are "
                             f"float32), got strides {k_cache.stride()}")
    else:
        check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device)
        if k_cache.shape[3] != d:
            raise ValueError(f"k_cache: expected head dimension {d} (q's d), got shape {tuple(k_cache.shape)}")
    check_cache_heads(q, k_cache, head_dim_v)
    check_tensor("indices", indices, ndim=3, dtypes=(torch.int32,), device=device)
    if tuple(indices.shape[:2]) != (b, s_q):
        raise ValueError(f"indices: expected shape ({b}, {s_q}, topk) (q's batch and s_q), got {tuple(indices.shape)}")
    _check_scale("softmax_scale", softmax_scale, required=False)
    _check_extras(topk_length, attn_sink, b, "sequence", h_q, device)


def _check_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    check_one_device(q=q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)
    _check_q(q, 3)
    s_q, h_q, d = q.shape
    device = q.device
    check_tensor("kv", kv, ndim=3, dtypes=(q.dtype,), device=device)
    s_kv, h_kv, d_k = kv.shape
    if d_k != d:
        raise ValueError(f"kv: expected head dimension {d} (q's d), got shape {tuple(kv.shape)}")
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"kv: expected h_kv >= 1 dividing h_q = {h_q}, got shape {tuple(kv.shape)}")
    if kv.stride(2) != 1 and kv.numel() > 0:
        raise ValueError(f"kv: expected unit stride in the last dimension, got strides {kv.stride()}")
    check_tensor("indices", indices, ndim=3, dtypes=(torch.int32,), device=device)
    if tuple(indices.shape[:2]) != (s_q, h_kv):
        raise ValueError(f"indices: expected shape ({s_q}, {h_kv}, topk) (q's tokens, kv's heads), "
                         f"got {tuple(indices.shape)}")
    _check_scale("sm_scale", sm_scale, required=True)
    check_int("d_v", d_v, 1)
    if d_v > d:
        raise ValueError(f"d_v: expected at most d = {d}, got {d_v}")
    _check_extras(topk_length, attn_sink, s_q, "query token", h_q, device)


# ---------------------------------------------------------------------------------------------
# Registered kernels
# ---------------------------------------------------------------------------------------------

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@torch.library.register_kernel("dskernels::flash_mla_sparse_decode", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("flash_mla_sparse_decode")
def _flash_mla_sparse_decode(q, k_cache, indices, head_dim_v, softmax_scale=None, is_fp8_kvcache=False,
                             topk_length=None, attn_sink=None):
    _check_decode_args(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8_kvcache, topk_length, attn_sink)
    if is_fp8_kvcache and k_cache.numel() and k_cache.data_ptr() % 16:  # not in the fake: no data there
        raise ValueError(f"k_cache: expected a 16-byte aligned start in the FP8 layout, got address "
                         f"{k_cache.data_ptr():#x}")
    b, s_q, h_q, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    topk_length = None if topk_length is None else topk_length.contiguous()  # the kernels index them flat
    attn_sink = None if attn_sink is None else attn_sink.contiguous()
    backend = select_backend("flash_mla_sparse_decode", q.device, has_cuda=False, has_triton=True)
    if backend == "ref":
        return ref.flash_mla_sparse_decode(q, k_cache, indices, head_dim_v, scale, is_fp8_kvcache, topk_length,
                                           attn_sink)
    from dskernels.triton import mla_sparse as triton_sparse

    out = q.new_empty(b, s_q, h_q, head_dim_v)
    lse = q.new_empty(b, h_q, s_q, dtype=torch.float32)
    h_kv = k_cache.shape[2]
    rows_idx = _unit_last(indices).reshape(b * s_q, 1, indices.shape[2]).expand(-1, h_kv, -1)
    num_pages, page_size = k_cache.shape[:2]
    triton_sparse.sparse_mla(q.reshape(b * s_q, h_q, d), k_cache, rows_idx, topk_length, attn_sink, scale,
                             head_dim_v, page_size, num_pages * page_size, is_fp8_kvcache,
                             out.view(b * s_q, h_q, head_dim_v), lse.permute(0, 2, 1), s_q)
    return out, lse


@torch.library.register_fake("dskernels::flash_mla_sparse_decode")
def _flash_mla_sparse_decode_fake(q, k_cache, indices, head_dim_v, softmax_scale=None, is_fp8_kvcache=False,
                                  topk_length=None, attn_sink=None):
    _check_decode_args(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8_kvcache, topk_length, attn_sink)
    b, s_q, h_q, _ = q.shape
    return q.new_empty(b, s_q, h_q, head_dim_v), q.new_empty(b, h_q, s_q, dtype=torch.float32)


@torch.library.register_kernel("dskernels::flash_mla_sparse_fwd", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("flash_mla_sparse_fwd")
def _flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    _check_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    topk_length = None if topk_length is None else topk_length.contiguous()
    attn_sink = None if attn_sink is None else attn_sink.contiguous()
    backend = select_backend("flash_mla_sparse_fwd", q.device, has_cuda=False, has_triton=True)
    if backend == "ref":
        return ref.flash_mla_sparse_fwd(q, kv, indices, float(sm_scale), d_v, attn_sink, topk_length)
    from dskernels.triton import mla_sparse as triton_sparse

    s_q, h_q, _ = q.shape
    out = q.new_empty(s_q, h_q, d_v)
    max_logits = q.new_empty(s_q, h_q, dtype=torch.float32)
    lse = q.new_empty(s_q, h_q, dtype=torch.float32)
    # kv as one page of s_kv tokens: slot = row of kv.
    triton_sparse.sparse_mla(q, kv.unsqueeze(0), _unit_last(indices), topk_length, attn_sink, float(sm_scale), d_v,
                             max(kv.shape[0], 1), kv.shape[0], False, out, lse.unsqueeze(1), 1, max_logits)
    return out, max_logits, lse


@torch.library.register_fake("dskernels::flash_mla_sparse_fwd")
def _flash_mla_sparse_fwd_fake(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    _check_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    s_q, h_q, _ = q.shape
    return (q.new_empty(s_q, h_q, d_v), q.new_empty(s_q, h_q, dtype=torch.float32),
            q.new_empty(s_q, h_q, dtype=torch.float32))
