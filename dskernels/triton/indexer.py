"""Triton kernels for DeepSeek-V3.2's indexer logits (python_ref/indexer.py).

Both kernels compute, for a tile of query rows and a block of keys, one tensor-core product of
[rows x heads, D] by [D, keys] (every head of every row of the tile shares each key load), then
relu, times the key's scale and the (row, head) weight, summed over the heads. A block of keys
that no row of the tile sees is not loaded at all: its logits are -inf.

Prefill (`_mqa_logits_kernel`): tiles of BLOCK_M query rows x BLOCK_N keys of a flat k [N, D]; in
the compressed layout (max_seqlen_k > 0) a tile is one row, its columns c being keys ks + c.
Decode (`_paged_mqa_logits_kernel`): one sequence's next_n rows x BLOCK_N keys, read through the
block table from DeepGEMM's paged layout (per page: page_size rows of D e4m3 bytes, then
page_size fp32 scales).

FP8 e4m3 operands go to the tensor cores as they are (products exact, fp32 sums); where Triton has
no fp8 type (before sm_89) they are widened from their bytes to fp16 (exact).
"""

import os

import torch
import triton
import triton.language as tl

from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import e4m3_bits_to_fp16, native_fp8
from dskernels.triton.launch import fast


@triton.jit
def _load_fp8(ptrs, mask, FP8_BYTES: tl.constexpr, FP32_DOT: tl.constexpr):
    """e4m3 values at ptrs as a dot operand: fp8 (native), fp16 (from the bytes), or fp32 (IEEE dots)."""
    if FP8_BYTES:
        x = e4m3_bits_to_fp16(tl.load(ptrs, mask=mask, other=0))
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    if FP32_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _weighted_head_sum(q, k, k_scale, w, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                       FP32_DOT: tl.constexpr):
    """q [ROWS * BLOCK_H, D], k [BLOCK_N, D], k_scale [BLOCK_N], w [ROWS * BLOCK_H] ->
    [ROWS, BLOCK_N]: sum over heads of w * relu(q.k * k_scale)."""
    if FP32_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # relu keeps NaN, as the oracle's clamp does: the default maximum (GPU max.f32, the interpreter's
    # fmax) drops it, turning a NaN key scale into a plausible 0 for that head
    s = tl.maximum(s * k_scale[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL) * w[:, None]
    return tl.sum(tl.reshape(s, (ROWS, BLOCK_H, BLOCK_N)), axis=1)


@triton.jit
def _mqa_logits_kernel(
        q_ptr, k_ptr, k_scale_ptr, w_ptr, start_ptr, end_ptr, out_ptr,
        m, n, num_heads, out_cols,
        stride_qm, stride_qh, stride_kn, stride_ks, stride_wm, stride_wh, stride_om,
        COMPRESSED: tl.constexpr, FP8_BYTES: tl.constexpr, FP32_DOT: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One grid axis (CUDA caps the others at 65535): key blocks inner, so neighbours share q rows.
    pid_m = tl.program_id(0) // tl.cdiv(out_cols, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(out_cols, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_cols
    lo = tl.maximum(tl.load(start_ptr + rows, mask=row_ok, other=0), 0)
    hi = tl.minimum(tl.load(end_ptr + rows, mask=row_ok, other=0), n)
    if COMPRESSED:  # one row per tile: column c is key ks + c
        keys = tl.load(start_ptr + pid_m) + cols
    else:
        keys = cols
    visible = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]) & col_ok[None, :] & row_ok[:, None]
    logits = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
    if tl.max(tl.max(visible.to(tl.int32), axis=1), axis=0) > 0:
        key_ok = tl.max(visible.to(tl.int32), axis=0) > 0  # keys some row sees: in [0, n)
        flat = tl.arange(0, BLOCK_M * BLOCK_H)
        q_row = pid_m * BLOCK_M + flat // BLOCK_H
        head = flat % BLOCK_H
        rh_ok = (q_row < m) & (head < num_heads)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = _load_fp8(q_ptr + q_row.to(tl.int64)[:, None] * stride_qm + head[:, None] * stride_qh + d[None, :],
                      rh_ok[:, None] & d_ok[None, :], FP8_BYTES, FP32_DOT)
        k = _load_fp8(k_ptr + keys.to(tl.int64)[:, None] * stride_kn + d[None, :], key_ok[:, None] & d_ok[None, :],
                      FP8_BYTES, FP32_DOT)
        k_scale = tl.load(k_scale_ptr + keys.to(tl.int64) * stride_ks, mask=key_ok, other=0.0)
        w = tl.load(w_ptr + q_row.to(tl.int64) * stride_wm + head * stride_wh, mask=rh_ok, other=0.0)
        acc = _weighted_head_sum(q, k, k_scale, w, BLOCK_M, BLOCK_H, BLOCK_N, FP32_DOT)
        logits = tl.where(visible, acc, float("-inf"))
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], logits,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _paged_mqa_logits_kernel(
        q_ptr, kv_ptr, w_ptr, lens_ptr, table_ptr, out_ptr,
        next_n, num_heads, page_size, num_pages, max_pages, max_context_len,
        stride_qb, stride_qn, stride_qh, stride_page, stride_wm, stride_wh, stride_lb, stride_ln, stride_tb,
        stride_om,
        LENS_2D: tl.constexpr, FP8_BYTES: tl.constexpr, FP32_DOT: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One grid axis, as above: (sequence, block of its query rows, key block), key blocks inner.
    key_blocks = tl.cdiv(max_context_len, BLOCK_N)
    row_blocks = tl.cdiv(next_n, BLOCK_R)
    b = (tl.program_id(0) // (key_blocks * row_blocks)).to(tl.int64)
    pid_r = tl.program_id(0) // key_blocks % row_blocks
    pid_n = tl.program_id(0) % key_blocks
    j = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # the sequence's query rows (MTP tokens; a prefill's)
    row_ok = j < next_n
    if LENS_2D:
        limit = tl.load(lens_ptr + b * stride_lb + j * stride_ln, mask=row_ok, other=0)
    else:
        limit = tl.maximum(tl.load(lens_ptr + b * stride_lb), 0) - next_n + 1 + j  # no int32 wrap
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = keys < max_context_len
    visible = (keys[None, :] < limit[:, None]) & col_ok[None, :] & row_ok[:, None]
    logits = tl.full([BLOCK_R, BLOCK_N], float("-inf"), dtype=tl.float32)
    if tl.max(tl.max(visible.to(tl.int32), axis=1), axis=0) > 0:
        wanted = tl.max(visible.to(tl.int32), axis=0) > 0
        page_idx = keys // page_size
        page = tl.load(table_ptr + b * stride_tb + page_idx, mask=wanted & (page_idx < max_pages), other=-1)
        key_ok = wanted & (page >= 0) & (page < num_pages)  # a key on a page outside the cache: -inf
        visible = visible & key_ok[None, :]
        base = kv_ptr + page.to(tl.int64) * stride_page
        slot = keys % page_size
        flat = tl.arange(0, BLOCK_R * BLOCK_H)
        row = pid_r * BLOCK_R + flat // BLOCK_H
        head = flat % BLOCK_H
        rh_ok = (row < next_n) & (head < num_heads)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_rows = q_ptr + b * stride_qb + row.to(tl.int64) * stride_qn + head * stride_qh
        q = _load_fp8(q_rows[:, None] + d[None, :], rh_ok[:, None] & d_ok[None, :], FP8_BYTES, FP32_DOT)
        k = _load_fp8(base[:, None] + (slot * HEAD_DIM)[:, None] + d[None, :], key_ok[:, None] & d_ok[None, :],
                      FP8_BYTES, FP32_DOT)
        k_scale = tl.load((base + page_size * HEAD_DIM + slot * 4).to(tl.pointer_type(tl.float32)), mask=key_ok,
                          other=0.0)
        w = tl.load(w_ptr + (b * next_n + row) * stride_wm + head * stride_wh, mask=rh_ok, other=0.0)
        acc = _weighted_head_sum(q, k, k_scale, w, BLOCK_R, BLOCK_H, BLOCK_N, FP32_DOT)
        logits = tl.where(visible, acc, float("-inf"))
    tl.store(out_ptr + (b * next_n + j)[:, None] * stride_om + keys[None, :], logits,
             mask=row_ok[:, None] & col_ok[None, :])


MIN_DOT_K = 32  # Triton's fp8 tl.dot wants K >= 32 (sm_89 / sm_90a, triton 3.8): D = 16 is padded (masked)


def _pow2(n: int, floor: int = 1) -> int:
    return max(next_power_of_2(max(n, 1)), floor)


def _flags(device: torch.device) -> tuple[bool, bool]:
    """(FP8_BYTES, FP32_DOT): the interpreter's tl.dot takes fp32 operands only reliably."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (not native_fp8(device)), interpret


def _as_fp8(t: torch.Tensor, fp8_bytes: bool) -> torch.Tensor:
    return t.view(torch.uint8 if fp8_bytes else torch.float8_e4m3fn)


def mqa_logits(q, k, k_scale, weights, ks, ke, max_seqlen_k, out) -> None:
    """q [M, H, D] e4m3 (unit last stride), k [N, D] e4m3 (unit last stride), k_scale [N], weights
    [M, H], ks / ke [M] int32 (contiguous) -> fills out [M, N or max_seqlen_k] (unit last stride)."""
    m, heads, dim = q.shape
    n = k.shape[0]
    if m == 0 or out.shape[1] == 0:
        return
    fp8_bytes, fp32_dot = _flags(q.device)
    block_h = _pow2(heads)
    compressed = max_seqlen_k > 0
    # Rows x heads = 128 tensor-core rows on a GPU (64 heads: 2 query rows per tile); one row in
    # the compressed layout (each row's keys start elsewhere).
    block_m = 1 if compressed else max(1, (64 if q.device.type == "cpu" else 128) // block_h)
    block_h = max(block_h, 16 // block_m)  # tl.dot wants 16 rows
    block_n = 64
    grid = (cdiv(m, block_m) * cdiv(out.shape[1], block_n),)
    fast(_mqa_logits_kernel)[grid](
        _as_fp8(q, fp8_bytes), _as_fp8(k, fp8_bytes), k_scale, weights, ks, ke, out,
        m, n, heads, out.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k_scale.stride(0), weights.stride(0), weights.stride(1),
        out.stride(0),
        COMPRESSED=compressed, FP8_BYTES=fp8_bytes, FP32_DOT=fp32_dot, HEAD_DIM=dim,
        BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=_pow2(dim, MIN_DOT_K),
        num_warps=4, num_stages=3)


def paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, out) -> None:
    """q [B, next_n, H, D] e4m3 (unit last stride), kv_cache [num_pages, page_size, 1, D + 4] bytes
    (each page contiguous), weights [B * next_n, H], context_lens [B] or [B, next_n] int32,
    block_table [B, max_pages] int32 (unit last stride) -> fills out [B * next_n, max_context_len]."""
    b, next_n, heads, dim = q.shape
    num_pages, page_size = kv_cache.shape[:2]
    if b == 0 or out.shape[1] == 0:
        return
    fp8_bytes, fp32_dot = _flags(q.device)
    # Query rows x heads = 128 tensor-core rows on a GPU (64 heads: V3.2's 2 MTP rows per tile), as
    # in mqa_logits; more rows (a prefill written through the paged cache) take more row blocks.
    block_r = min(_pow2(next_n), max(1, (64 if q.device.type == "cpu" else 128) // _pow2(heads)))
    block_h = max(_pow2(heads), 16 // block_r)
    block_n = 64
    lens_2d = context_lens.dim() == 2
    grid = (b * cdiv(next_n, block_r) * cdiv(out.shape[1], block_n),)
    fast(_paged_mqa_logits_kernel)[grid](
        _as_fp8(q, fp8_bytes), _as_fp8(kv_cache, fp8_bytes), weights, context_lens, block_table, out,
        next_n, heads, page_size, num_pages, block_table.shape[1], out.shape[1],
        q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), weights.stride(0), weights.stride(1),
        context_lens.stride(0), context_lens.stride(1) if lens_2d else 0, block_table.stride(0),
        out.stride(0),
        LENS_2D=lens_2d, FP8_BYTES=fp8_bytes, FP32_DOT=fp32_dot, HEAD_DIM=dim,
        BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=_pow2(dim, MIN_DOT_K),
        num_warps=4, num_stages=3)
