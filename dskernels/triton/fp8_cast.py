"""Triton FP8 casts: the math of python_ref.fp8, bit for bit (div_rn is the correctly rounded
division; Triton's plain `/` on fp32 is an approximate one on NVIDIA GPUs; round_to_e4m3 is the
rounding the interpreter gets wrong). A NaN makes its group's scale and values NaN, as in the
reference (max_nan: the GPU's plain max and min skip NaN). The fp8 output is written through a
uint8 view, as the bits of the GPU's own e4m3 conversion on sm_90+ (NATIVE: native_fp8_cast) or of
e4m3_bits elsewhere, so the kernels run on any GPU.

Tiles: 32 rows x 128 columns (per-token, SwiGLU) or 128 x 128 (per-block) per program: each thread
issues 4 (SwiGLU 8, per-block 8) 16-byte loads, of which 4 (SwiGLU 5, per-block 8) are in flight at
once on sm_90a (triton 3.8's SASS), so the bytes in flight per SM, not the instruction count, bound
these kernels once the rounding is the hardware's."""

import os

import torch
import triton
import triton.language as tl

from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import (cast_groups, max_nan, native_fp8_cast, reciprocal_scales, round_to_bf16,
                                      scales_of, to_e4m3_bits)
from dskernels.triton.launch import fast

GROUP_SIZE = 128
BLOCK_ROWS = 32  # rows per program of the per-token and SwiGLU casts


@triton.jit
def _per_token_cast_kernel(x_ptr, out_ptr, scale_ptr, m, stride_xm, stride_om, stride_sm, stride_sg,
                           BLOCK_M: tl.constexpr, GROUP: tl.constexpr, ROUND_SCALE: tl.constexpr,
                           NATIVE: tl.constexpr):
    # One program: BLOCK_M rows x one 128-wide group.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    row_ok = rows < m
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    bits, scale = cast_groups(x, ROUND_SCALE, NATIVE)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], bits, mask=row_ok[:, None])
    tl.store(scale_ptr + rows.to(tl.int64) * stride_sm + group * stride_sg, scale, mask=row_ok)


@triton.jit
def _per_row_cast_kernel(x_ptr, out_ptr, scale_ptr, rows, cols, stride_x, stride_out, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    # per_custom_dims_cast_to_fp8 with the kept dimensions leading: one scale per row of x [rows,
    # cols] (cols <= BLOCK_C), DeepGEMM's multiplier 1 / scale (python_ref.indexer), not 448 / amax.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    ok = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + c[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(max_nan(tl.abs(x), 1), 1e-4, propagate_nan=tl.PropagateNan.ALL)
    multiplier, scale = reciprocal_scales(amax, ROUND_SCALE)
    tl.store(out_ptr + r[:, None].to(tl.int64) * stride_out + c[None, :], to_e4m3_bits(x * multiplier[:, None], NATIVE),
             mask=ok)
    tl.store(scale_ptr + r, scale, mask=r < rows)


@triton.jit
def _per_block_cast_kernel(w_ptr, out_ptr, scale_ptr, n, stride_wn, stride_on, stride_sn, stride_sk,
                           BLOCK: tl.constexpr, ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    # One program: one 128x128 block (the last row-block may be partial).
    block_n = tl.program_id(0)
    block_k = tl.program_id(1)
    rows = block_n * BLOCK + tl.arange(0, BLOCK)
    cols = block_k * BLOCK + tl.arange(0, BLOCK)
    row_ok = (rows < n)[:, None]
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :], mask=row_ok,
                other=0.0).to(tl.float32)
    amax = tl.maximum(max_nan(max_nan(tl.abs(w), 1), 0), 1e-4, propagate_nan=tl.PropagateNan.ALL)
    multiplier, scale = scales_of(amax, ROUND_SCALE)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :], to_e4m3_bits(w * multiplier, NATIVE),
             mask=row_ok)
    tl.store(scale_ptr + block_n * stride_sn + block_k * stride_sk, scale)


@triton.jit
def _per_channel_cast_kernel(x_ptr, out_ptr, scale_ptr, ks_ptr, tokens, h, groups,
                             stride_xt, stride_ot, stride_sb, stride_ks,
                             BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
                             ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    # One program: one 128-token scale block (of the group that holds it) x BLOCK_H columns. The
    # block's group, first token and length come from ks on the device; a ks tensor that claims
    # more tokens than x has is cut at x's end (never a read or write past it).
    block = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    sizes = tl.maximum(tl.load(ks_ptr + offs_g * stride_ks, mask=offs_g < groups, other=0), 0).to(tl.int64)
    group_blocks = (sizes + GROUP - 1) // GROUP
    blocks_end = tl.cumsum(group_blocks, 0)
    holds = (blocks_end - group_blocks <= block) & (block < blocks_end)  # at most one group
    local = block - tl.sum(tl.where(holds, blocks_end - group_blocks, 0))
    first = tl.sum(tl.where(holds, tl.cumsum(sizes, 0) - sizes, 0)) + local * GROUP
    count = tl.minimum(tl.sum(tl.where(holds, sizes, 0)) - local * GROUP, tokens - first)
    offs_t = tl.arange(0, GROUP)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < h
    mask = (offs_t < count)[:, None] & col_ok[None, :]
    rows = (first + offs_t).to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(max_nan(tl.abs(x), 0), 1e-4, propagate_nan=tl.PropagateNan.ALL)
    multiplier, scale = scales_of(amax, ROUND_SCALE)
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], to_e4m3_bits(x * multiplier[None, :], NATIVE), mask=mask)
    tl.store(scale_ptr + block.to(tl.int64) * stride_sb + cols, scale, mask=col_ok)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, masked_m_ptr, m, half,
                         stride_xg, stride_xm, stride_og, stride_om, stride_sg, stride_sm, stride_mm,
                         BLOCK_M: tl.constexpr, GROUP: tl.constexpr, ROUND_SCALE: tl.constexpr,
                         MASKED: tl.constexpr, CAST: tl.constexpr, ROUND_BF16: tl.constexpr,
                         NATIVE: tl.constexpr):
    # One program: BLOCK_M rows x one 128-wide group of the output; gate at columns c, up at half + c.
    # Grid axis 0 holds (batch entry, row block): CUDA caps axes 1 and 2 at 65535 programs, and a
    # [G, M, 2I] x without masked_m may have more entries. MASKED: the rows past masked_m[g] are
    # skipped (not read, not written), as the masked grouped GEMM leaves them. CAST:
    # per_token_cast_to_fp8 of the activation (half % 128 == 0); else the activation itself in out's
    # dtype (any half).
    row_blocks = tl.cdiv(m, BLOCK_M)
    batch = (tl.program_id(0) // row_blocks).to(tl.int64)
    rows = tl.program_id(0) % row_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    rows_here = m
    if MASKED:
        rows_here = tl.minimum(tl.maximum(tl.load(masked_m_ptr + batch * stride_mm), 0), m)
    mask = (rows < rows_here)[:, None] & (cols < half)[None, :]
    x_rows = x_ptr + batch * stride_xg + rows[:, None].to(tl.int64) * stride_xm
    gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_rows + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + batch * stride_og + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    if CAST:
        bits, scale = cast_groups(act, ROUND_SCALE, NATIVE)
        tl.store(out_ptrs, bits, mask=mask)
        tl.store(scale_ptr + batch * stride_sg + rows.to(tl.int64) * stride_sm + group, scale, mask=rows < rows_here)
    else:
        if ROUND_BF16:  # the interpreter truncates fp32 -> bf16; GPUs round in the conversion
            act = round_to_bf16(act)
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_cast_to_fp8(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, masked_m, round_scale: bool) -> None:
    """x [G, M, 2I] (unit stride along the columns) -> out fp8 [G, M, I], scale [G, M, I / 128]."""
    _silu_and_mul(x, out.view(torch.uint8), scale, masked_m, round_scale, cast=True)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor, masked_m) -> None:
    """x [G, M, 2I] (unit stride along the columns) -> out [G, M, I] in its own dtype."""
    _silu_and_mul(x, out, None, masked_m, False, cast=False)


def _silu_and_mul(x, out, scale, masked_m, round_scale: bool, cast: bool) -> None:
    groups, m, width = x.shape
    half = width // 2
    if groups == 0 or m == 0 or half == 0:
        return
    assert x.stride(2) == 1 and out.stride(2) == 1 and (scale is None or scale.stride(2) == 1)
    grid = (cdiv(m, BLOCK_ROWS) * groups, cdiv(half, GROUP_SIZE))
    scale_args = (scale, scale.stride(0), scale.stride(1)) if cast else (out, 0, 0)  # (unread without cast)
    fast(_silu_and_mul_kernel)[grid](x, out, scale_args[0], x if masked_m is None else masked_m, m, half,
                                     x.stride(0), x.stride(1), out.stride(0), out.stride(1), *scale_args[1:],
                                     0 if masked_m is None else masked_m.stride(0), BLOCK_M=BLOCK_ROWS,
                                     GROUP=GROUP_SIZE, ROUND_SCALE=round_scale, MASKED=masked_m is not None, CAST=cast,
                                     ROUND_BF16=out.dtype == torch.bfloat16
                                     and os.environ.get("TRITON_INTERPRET") == "1",
                                     NATIVE=cast and native_fp8_cast(x.device), num_warps=4)


def per_token_cast_to_fp8(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, round_scale: bool = False) -> None:
    m, k = x.shape
    assert x.stride(1) == 1 and out.stride(1) == 1
    grid = (cdiv(m, BLOCK_ROWS), k // GROUP_SIZE)
    fast(_per_token_cast_kernel)[grid](x, out.view(torch.uint8), scale, m, x.stride(0), out.stride(0), scale.stride(0),
                                       scale.stride(1), BLOCK_M=BLOCK_ROWS, GROUP=GROUP_SIZE, ROUND_SCALE=round_scale,
                                       NATIVE=native_fp8_cast(x.device), num_warps=4)


MAX_ROW_CAST_COLS = 8192  # per_row_cast_to_fp8 holds a row in one tile


def per_row_cast_to_fp8(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, round_scale: bool = False) -> None:
    """x [rows, cols] (unit last stride, cols <= MAX_ROW_CAST_COLS) -> out fp8 [rows, cols] (unit last
    stride) and scale fp32 [rows] (contiguous): per_custom_dims_cast_to_fp8 over each row."""
    rows, cols = x.shape
    assert x.stride(1) == 1 and out.stride(1) == 1 and scale.is_contiguous() and cols <= MAX_ROW_CAST_COLS
    block_c = next_power_of_2(cols)
    block_r = max(1, min(32, 4096 // block_c))
    fast(_per_row_cast_kernel)[(cdiv(rows, block_r),)](x, out.view(torch.uint8), scale, rows, cols, x.stride(0),
                                                       out.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                                                       ROUND_SCALE=round_scale, NATIVE=native_fp8_cast(x.device),
                                                       num_warps=4)


def per_block_cast_to_fp8(w: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, round_scale: bool = False) -> None:
    n, k = w.shape
    assert w.stride(1) == 1 and out.stride(1) == 1
    grid = (cdiv(n, GROUP_SIZE), k // GROUP_SIZE)
    fast(_per_block_cast_kernel)[grid](w, out.view(torch.uint8), scale, n, w.stride(0), out.stride(0), scale.stride(0),
                                       scale.stride(1), BLOCK=GROUP_SIZE, ROUND_SCALE=round_scale,
                                       NATIVE=native_fp8_cast(w.device), num_warps=8)


def per_channel_cast_to_fp8(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, ks_tensor: torch.Tensor,
                            round_scale: bool = False) -> None:
    """x [tokens, h] (unit stride along h) -> out (fp8 [tokens, h]) and scale ([blocks, h], one row
    per 128-token block of each group of ks_tensor, blocks = the host's sum(ceil(k_g / 128)))."""
    tokens, h = x.shape
    blocks = scale.shape[0]
    if blocks == 0 or h == 0:
        return
    assert (x.stride(1) == 1 or h == 1) and out.stride(1) == 1 and scale.stride(1) == 1  # the kernel assumes it
    block_h = 64
    groups = ks_tensor.shape[0]
    grid = (blocks, cdiv(h, block_h))
    fast(_per_channel_cast_kernel)[grid](x, out.view(torch.uint8), scale, ks_tensor, tokens, h, groups, x.stride(0),
                                         out.stride(0), scale.stride(0), ks_tensor.stride(0), BLOCK_H=block_h,
                                         BLOCK_G=next_power_of_2(groups), GROUP=GROUP_SIZE,
                                         ROUND_SCALE=round_scale, NATIVE=native_fp8_cast(x.device), num_warps=8)
