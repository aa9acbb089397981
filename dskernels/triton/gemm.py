"""Triton FP8 block-scaled GEMMs: out = bf16(sum over 128-wide K blocks of sa * sb * (a @ b.T)).

Per K block the FP8 tensor-core dot accumulates into a fresh fp32 tile, which is then scaled by
the 1x128 activation scales (one per row) and the 128x128 weight scales (one per column: a tile
of up to 128 columns has one, a tile of 256 two; n need not be a multiple of 128) and added to
the fp32 accumulator: DeepGEMM's "promotion" math, so the results agree with the
dequantize-then-multiply oracle up to fp32 rounding before the final bf16 rounding.

Four kernels share that K loop (`_scaled_tile`):
- dense: one program per (BLOCK_M, BLOCK_N) tile, tiles visited in GROUP_M-row bands so that
  consecutive programs reuse the same b tiles from L2; also fp8_gemm_nt's general form (per-row b
  scales, fp32 out, adding to out: compile-time switches); on Hopper, opt-in, also persistent
  warp-specialized programs loading through the tensor copy engine (TMA_WS, _tiles_tma_ws);
- contiguous grouped: the same grid over the M rows; each program reads its rows' m_indices on
  the device and walks the runs of equal group ids inside its tile (one run per tile in
  DeepGEMM's 128-aligned layout, a few at the edges of unaligned segments); runs of -1 (or of an id
  outside [0, G)) do no work. No host sync, no precomputed map to launch;
  DeepGEMM's psum layout (one cumulative row end per group, groups starting at multiples of 128)
  is read the same way: each tile finds its group among the G ends;
- masked grouped: a (tiles, G) grid; each program reads masked_m[g] on the device and does no
  K-loop work when its tile starts at or beyond it. CUDA-graph safe;
- K-grouped (weight gradients, _k_grouped_kernel): a (tiles, G) grid; each program sums ks before
  its group on the device and runs the K loop over that group's own tokens.

The grouped kernels also run DeepGEMM's bf16 GEMMs (SCALED=False): the same grids and group
logic around a plain bf16 dot with one fp32 accumulator (`_dot_tile`, any k).

Every tensor is addressed through its strides, so scales may be row-major (our casts) or
DeepGEMM's column-major TMA-aligned layout, and a, b, out may be strided views.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation as triton_allocation
from triton.runtime.jit import JITFunction

from dskernels._backend import batch_invariant_enabled, env_choice, version_tuple
from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import e4m3_bits_to_fp16, native_fp8, round_to_bf16
from dskernels.triton.launch import fast

GROUP_SIZE = 128  # the K (and n) width of one scale
TOKEN_MAJOR_KNOB = "DSKERNELS_GEMM_TOKEN_MAJOR"  # _token_major_direct
TMA_WS_KNOB = "DSKERNELS_GEMM_TMA_WS"  # _tma_ws_mode


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), walking GROUP_M tile rows per band for L2 reuse."""
    per_band = GROUP_M * num_pid_n
    band = pid // per_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m
    return pid_m, pid_n


@triton.jit
def _tile(m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output rows and columns (swizzled tile order) and which of them exist."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < m, cols < n


@triton.jit
def _scaled_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, rows, cols, row_ok, col_ok, k_blocks,
                 stride_am, stride_ak, stride_sam, stride_sak,
                 stride_bn, stride_bk, stride_sbn, stride_sbk,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr,
                 SB_PER_ROW: tl.constexpr, k_valid=0, MASK_K: tl.constexpr = False):
    """sum over K blocks kb < k_blocks of sa[rows, kb] * sb[cols // 128, kb] * (a @ b.T)[kb]
    (SB_PER_ROW: sb[cols, kb], b's 1x128 scales when b is an activation too; MASK_K: only the first
    k_valid columns of a and b are read, the rest of the last block counts as zeros)."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
    sa_ptrs = sa_ptr + rows.to(tl.int64) * stride_sam
    # Weight scales: a tile of BLOCK_N <= 128 columns lies inside one 128-row weight block (BLOCK_N
    # divides 128), one of 256 spans two (the second may lie past n): one or two scalar loads per K
    # block instead of a per-column gather, which costs registers (128 x 128 tile, 8 warps: 255
    # registers with the gather, 176 without; ptxas sm_90a through Triton 3.8, 2026-11-23).
    tl.static_assert(BLOCK_N <= 2 * BLOCK_K)
    first_block = tl.min(cols) // BLOCK_K
    second_ok = tl.max(tl.where(col_ok, cols, -1)) >= (first_block + 1) * BLOCK_K
    sb_ptrs = sb_ptr + first_block.to(tl.int64) * stride_sbn
    sb_row_ptrs = sb_ptr + cols.to(tl.int64) * stride_sbn  # SB_PER_ROW only
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_left = k_valid
    for _ in range(0, k_blocks):
        if MASK_K:
            a_mask = row_ok[:, None] & (ks[None, :] < k_left)
            b_mask = col_ok[None, :] & (ks[:, None] < k_left)
            k_left -= BLOCK_K
        else:
            a_mask = row_ok[:, None]
            b_mask = col_ok[None, :]
        if FP8_DOT:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        else:  # a and b arrive as uint8 views
            a = e4m3_bits_to_fp16(tl.load(a_ptrs, mask=a_mask, other=0))
            b = e4m3_bits_to_fp16(tl.load(b_ptrs, mask=b_mask, other=0))
        sa = tl.load(sa_ptrs, mask=row_ok, other=0.0)
        # A fresh fp32 tile per K block, promoted with its scales (DeepGEMM's math): Hopper's FP8
        # MMA accumulates with fewer than fp32's bits, so long K chains must not stay inside it.
        if SB_PER_ROW:
            sb = tl.load(sb_row_ptrs, mask=col_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        elif BLOCK_N <= BLOCK_K:
            acc += tl.dot(a, b) * (sa * tl.load(sb_ptrs))[:, None]
        else:
            sb0 = tl.load(sb_ptrs)
            sb1 = tl.load(sb_ptrs + stride_sbn, mask=second_ok, other=0.0)
            sb = tl.where(tl.arange(0, BLOCK_N) < BLOCK_K, sb0, sb1)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        sa_ptrs += stride_sak
        sb_ptrs += stride_sbk
        if SB_PER_ROW:
            sb_row_ptrs += stride_sbk
    return acc


@triton.jit
def _tiles_tma_ws(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, m, n, k_blocks, stride_am, stride_bn,
                  stride_sam, stride_sak, stride_sbn, stride_sbk, stride_om, stride_on,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  ROUND_BF16: tl.constexpr, OUT_FP32: tl.constexpr, ACCUMULATE: tl.constexpr):
    """The dense kernel's TMA_WS form (Hopper): persistent programs, each taking every
    num_programs-th output tile, warp-specialized by Triton's Hopper pass (launched with
    num_warps=4, it adds the other warp groups and moves registers with setmaxnreg):
    - a producer warp group loads the a and b tiles with the tensor copy engine into a num_stages
      ring guarded by mbarriers, running on into the next tile while the consumers store this one;
    - two consumer warp groups take 64 of the 128 rows each. Each waits for its own dot before
      promoting it, as _scaled_tile does, but no CTA-wide barrier ties the two together: one
      promotes while the other's dot runs, the overlap the pointer-load pipeline cannot give
      (docs/gemm.md).
    The scales stay plain loads in any strides. a and b: K-major, rows and base 16-byte aligned
    (_tma_ws_ok); rows and columns past m and n arrive as zeros."""
    tl.static_assert(BLOCK_N <= BLOCK_K)  # one weight scale per K block
    k = k_blocks * BLOCK_K
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[m, k], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[n, k], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_pid_m, num_pid_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
    stride_sak, stride_sbk = tl.cast(stride_sak, tl.int64), tl.cast(stride_sbk, tl.int64)  # kb * stride: int64
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), warp_specialize=True):
        pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        sa_ptrs = sa_ptr + rows.to(tl.int64) * stride_sam
        sb_ptrs = sb_ptr + (pid_n * BLOCK_N // BLOCK_K).to(tl.int64) * stride_sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_blocks):
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            sa = tl.load(sa_ptrs + kb * stride_sak, mask=rows < m, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sbk)
            acc += tl.dot(a, b.T) * (sa * sb)[:, None]
        _store(out_ptr, acc, rows, cols, (rows < m)[:, None] & (cols < n)[None, :], stride_om, stride_on,
               ROUND_BF16, OUT_FP32, ACCUMULATE)


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, k, stride_am, stride_ak, stride_bn, stride_bk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    """a[rows, :k] @ b[cols, :k].T in fp32 for 16-bit operands (the bf16 GEMMs): one accumulator
    for the whole K loop (no scales to promote by), any k (columns past it load as zeros).
    INTERPRETED: Triton's interpreter, whose tl.dot reads bf16 operands as garbage (3.8: products
    off by 1e10); the operands widen exactly to fp32 for an IEEE fp32 dot there."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks[None, :] < k - k0), other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :] & (ks[:, None] < k - k0), other=0.0)
        if INTERPRETED:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _psum_groups(ends_ptr, rows, first_row, groups, stride_ends, BLOCK_G: tl.constexpr):
    """The group of each row in DeepGEMM's psum layout, -1 for rows in no group: group g owns rows
    align(ends[g - 1], 128) .. ends[g] - 1 (ends cumulative, read on the device). Every group starts
    at a multiple of 128 and a tile of rows at a multiple of BLOCK_M, which divides 128: the tile's
    rows all lie between two group starts, in the group of its first row (the last group starting
    at or before it: empty groups share their start with the next one). Ends that decrease are no
    layout: the rows then go to some group or none, never outside the tensors."""
    offs_g = tl.arange(0, BLOCK_G)
    in_range = offs_g < groups
    ends = tl.load(ends_ptr + offs_g * stride_ends, mask=in_range, other=0).to(tl.int64)
    prev_ends = tl.maximum(tl.load(ends_ptr + (offs_g - 1) * stride_ends, mask=in_range & (offs_g > 0),
                                   other=0).to(tl.int64), 0)  # int64: an end near 2^31 must not wrap
    starts = (prev_ends + 127) // 128 * 128
    group = tl.max(tl.where(in_range & (starts <= first_row), offs_g, 0))
    end = tl.sum(tl.where(offs_g == group, ends, 0))
    return tl.where(rows < end, group, -1)


@triton.jit
def _store_bf16(out_ptr, acc, rows, cols, mask, stride_om, stride_on, ROUND_BF16: tl.constexpr):
    _store(out_ptr, acc, rows, cols, mask, stride_om, stride_on, ROUND_BF16, False, False)


@triton.jit
def _store(out_ptr, acc, rows, cols, mask, stride_om, stride_on, ROUND_BF16: tl.constexpr,
           OUT_FP32: tl.constexpr, ACCUMULATE: tl.constexpr):
    """out = acc (ACCUMULATE: out + acc, summed in fp32), rounded once to out's dtype."""
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :].to(tl.int64) * stride_on
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if OUT_FP32:
        tl.store(ptrs, acc, mask=mask)
    else:
        if ROUND_BF16:
            acc = round_to_bf16(acc)
        tl.store(ptrs, acc.to(tl.bfloat16), mask=mask)


# k_blocks is never specialized: Triton would make a k_blocks of 1 (k = 128) a constant, folding the
# TMA_WS tile's one-trip K loop, which its Hopper warp specialization then fails to compile.
@triton.jit(do_not_specialize=["split_key", "k_blocks"])
def _gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, m, n, k_blocks,
                 stride_am, stride_ak, stride_sam, stride_sak,
                 stride_bn, stride_bk, stride_sbn, stride_sbk, stride_om, stride_on, m_bucket,
                 split_key, partial_ptr, arrived_ptr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, ROUND_BF16: tl.constexpr, FP8_DOT: tl.constexpr,
                 SB_PER_ROW: tl.constexpr, OUT_FP32: tl.constexpr, ACCUMULATE: tl.constexpr,
                 SPLIT_K: tl.constexpr, TMA_WS: tl.constexpr = False, K_RANGES: tl.constexpr = 1):
    """SPLIT_K: grid axis 1 cuts the K blocks into contiguous ranges (_split_count); see _split_k_sum.
    One range goes straight to out, without the workspace (then empty): a guard only, since the
    autotuning key holds the split counts (split_key) and split candidates that would run one range
    are pruned. TMA_WS: persistent warp-specialized programs instead (_tiles_tma_ws; unsplit,
    128x128 b scales, a grid of at most one program per SM). K_RANGES > 1 (batch-invariant mode,
    unsplit): one program sums the K ranges a split into K_RANGES would run, as _split_k_sum adds
    them (_invariant_k_ranges)."""
    if TMA_WS:
        tl.static_assert(not SPLIT_K and not SB_PER_ROW and FP8_DOT and K_RANGES == 1)
        _tiles_tma_ws(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, m, n, k_blocks, stride_am, stride_bn, stride_sam,
                      stride_sak, stride_sbn, stride_sbk, stride_om, stride_on, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                      ROUND_BF16, OUT_FP32, ACCUMULATE)
    else:
        _gemm_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, m, n, k_blocks, stride_am, stride_ak, stride_sam,
                   stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk, stride_om, stride_on, partial_ptr,
                   arrived_ptr, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, ROUND_BF16, FP8_DOT, SB_PER_ROW, OUT_FP32,
                   ACCUMULATE, SPLIT_K, K_RANGES)


@triton.jit
def _gemm_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, m, n, k_blocks, stride_am, stride_ak, stride_sam, stride_sak,
               stride_bn, stride_bk, stride_sbn, stride_sbk, stride_om, stride_on, partial_ptr, arrived_ptr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               ROUND_BF16: tl.constexpr, FP8_DOT: tl.constexpr, SB_PER_ROW: tl.constexpr, OUT_FP32: tl.constexpr,
               ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr, K_RANGES: tl.constexpr):
    """The dense kernel's pointer-load form: this program's tile (and K range, SPLIT_K; or the
    K_RANGES ranges one after another)."""
    rows, cols, row_ok, col_ok = _tile(m, n, BLOCK_M, BLOCK_N, GROUP_M)
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K:
        split = tl.program_id(1)
        first = (split * k_blocks // tl.num_programs(1)).to(tl.int64)
        k_blocks = (split + 1) * k_blocks // tl.num_programs(1) - first
        a_ptr += first * BLOCK_K * stride_ak
        b_ptr += first * BLOCK_K * stride_bk
        sa_ptr += first * stride_sak
        sb_ptr += first * stride_sbk
    if K_RANGES > 1:
        tl.static_assert(not SPLIT_K)
        # The split programs' ranges (same bounds), each summed from zero and added in range order
        # as _split_k_sum adds the partials: the same bits whether the launch splits or not.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, K_RANGES):
            first = (r * k_blocks // K_RANGES).to(tl.int64)
            acc += _scaled_tile(a_ptr + first * BLOCK_K * stride_ak, sa_ptr + first * stride_sak,
                                b_ptr + first * BLOCK_K * stride_bk, sb_ptr + first * stride_sbk, rows, cols,
                                row_ok, col_ok, (r + 1) * k_blocks // K_RANGES - first, stride_am, stride_ak,
                                stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn, stride_sbk,
                                BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, SB_PER_ROW)
    else:
        acc = _scaled_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, rows, cols, row_ok, col_ok, k_blocks,
                           stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn,
                           stride_sbk, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, SB_PER_ROW)
    if SPLIT_K:
        last = tl.program_id(1) == 0  # the only range, unless there are more
        if tl.num_programs(1) > 1:
            acc, last = _split_k_sum(acc, partial_ptr, arrived_ptr, rows, cols, mask, m, n)
        if last:
            _store(out_ptr, acc, rows, cols, mask, stride_om, stride_on, ROUND_BF16, OUT_FP32, ACCUMULATE)
    else:
        _store(out_ptr, acc, rows, cols, mask, stride_om, stride_on, ROUND_BF16, OUT_FP32, ACCUMULATE)


@triton.jit
def _split_k_sum(acc, partial_ptr, arrived_ptr, rows, cols, mask, m, n):
    """Split-K reduction without a second launch or a nondeterministic sum: every split of a tile
    writes its fp32 partial to partial_ptr[split, m, n] and counts itself in arrived_ptr[tile]; the
    last to arrive adds the partials in split order (the same sum whichever split is last) and
    returns (sum, True) to store it, and puts the counter back to 0 for the next launch. Others
    return (acc, False). The barrier orders all threads' partial stores before the counting atomic
    (acq_rel, GPU scope: it publishes them and, for the last, acquires the others'); the partials
    are read through L2 (.cg), never from a stale L1 line."""
    tile = tl.program_id(0)
    offsets = rows[:, None].to(tl.int64) * n + cols[None, :]
    tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * m * n + offsets, acc, mask=mask)
    tl.debug_barrier()
    last = tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1
    if last:
        tl.debug_barrier()
        acc = tl.zeros_like(acc)
        for _ in range(0, tl.num_programs(1)):
            acc += tl.load(partial_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            partial_ptr += m * n  # int32 is enough: a split shape has at most sms / 2 tiles of 128 x 256
        tl.store(arrived_ptr + tile, 0)
    return acc, last


@triton.jit
def _contiguous_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, idx_ptr, m, n, k, k_blocks, groups,
                       stride_am, stride_ak, stride_sam, stride_sak,
                       stride_bg, stride_bn, stride_bk, stride_sbg, stride_sbn, stride_sbk,
                       stride_om, stride_on, stride_idx, m_bucket,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, ROUND_BF16: tl.constexpr, FP8_DOT: tl.constexpr,
                       SCALED: tl.constexpr, PSUM: tl.constexpr, ZERO_PAD: tl.constexpr, BLOCK_G: tl.constexpr):
    """SCALED: FP8 with scales (_scaled_tile), else bf16 (_dot_tile). idx: one group id per row,
    or (PSUM) the groups' cumulative row ends (_psum_groups). ZERO_PAD: rows in no group get zeros.

    Grid (tiles, run slots): a tile's rows fall into runs of one group id, each a whole K loop
    over its own b[g]; program (tile, slot) takes the tile's runs slot, slot + slots, ... In
    DeepGEMM's 128-aligned layouts a tile holds one run (one slot); in decode shapes (a few rows
    per expert, _run_slots) dozens, which one program would otherwise walk one after another."""
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    offs = tl.arange(0, BLOCK_M)
    rows = pid_m * BLOCK_M + offs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    if PSUM:
        tl.static_assert(128 % BLOCK_M == 0)  # a tile never straddles a group start
        group_of_row = _psum_groups(idx_ptr, rows, pid_m * BLOCK_M, groups, stride_idx, BLOCK_G)
        group_before = _psum_groups(idx_ptr, rows - 1, pid_m * BLOCK_M, groups, stride_idx, BLOCK_G)
    else:
        group_of_row = tl.load(idx_ptr + rows.to(tl.int64) * stride_idx, mask=row_ok, other=-1)
        group_before = tl.load(idx_ptr + (rows - 1).to(tl.int64) * stride_idx, mask=row_ok & (offs > 0), other=-1)
    # Runs: maximal stretches of rows with one group id, numbered in row order (-1: rows past m).
    # Each run's group is read off its first row, the only one where start_group keeps it.
    starts = row_ok & ((offs == 0) | (group_of_row != group_before))
    run_of_row = tl.where(row_ok, tl.cumsum(starts.to(tl.int32), 0) - 1, -1)
    start_group = tl.where(starts, group_of_row, 0)
    num_runs = tl.sum(starts.to(tl.int32), 0)
    for r in range(tl.program_id(1), num_runs, tl.num_programs(1)):
        in_run = run_of_row == r
        group = tl.sum(tl.where(in_run, start_group, 0))
        valid = (group >= 0) & (group < groups)
        run = in_run & valid
        safe_group = tl.where(valid, group, 0).to(tl.int64)
        if SCALED:
            acc = _scaled_tile(a_ptr, sa_ptr, b_ptr + safe_group * stride_bg, sb_ptr + safe_group * stride_sbg,
                               rows, cols, run, col_ok, tl.where(valid, k_blocks, 0),
                               stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn,
                               stride_sbk, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, False)
        else:
            acc = _dot_tile(a_ptr, b_ptr + safe_group * stride_bg, rows, cols, run, col_ok, tl.where(valid, k, 0),
                            stride_am, stride_ak, stride_bn, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K,
                            ROUND_BF16)  # ROUND_BF16: the interpreter
        # A run in no group did no K-loop work: its acc is zeros, stored when ZERO_PAD asks for them.
        stored = in_run if ZERO_PAD else run
        _store_bf16(out_ptr, acc, rows, cols, stored[:, None] & col_ok[None, :], stride_om, stride_on, ROUND_BF16)


@triton.jit
def _masked_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, masked_m_ptr, m_max, n, k, k_blocks,
                   stride_ag, stride_am, stride_ak, stride_sag, stride_sam, stride_sak,
                   stride_bg, stride_bn, stride_bk, stride_sbg, stride_sbn, stride_sbk,
                   stride_og, stride_om, stride_on, stride_mm, m_bucket,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, ROUND_BF16: tl.constexpr, FP8_DOT: tl.constexpr,
                   SCALED: tl.constexpr, SB_PER_ROW: tl.constexpr = False, OUT_FP32: tl.constexpr = False,
                   ACCUMULATE: tl.constexpr = False):
    """SB_PER_ROW, OUT_FP32, ACCUMULATE as in the dense kernel (fp8_bmm_nt's general form)."""
    group = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(m_max, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    rows_here = tl.minimum(tl.maximum(tl.load(masked_m_ptr + group * stride_mm), 0), m_max)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < rows_here
    col_ok = cols < n
    # Tiles past masked_m[g] run no K block (no early return: one code path for every Triton).
    active = pid_m * BLOCK_M < rows_here
    if SCALED:
        acc = _scaled_tile(a_ptr + group * stride_ag, sa_ptr + group * stride_sag, b_ptr + group * stride_bg,
                           sb_ptr + group * stride_sbg, rows, cols, row_ok, col_ok, tl.where(active, k_blocks, 0),
                           stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk, stride_sbn,
                           stride_sbk, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, SB_PER_ROW)
    else:
        acc = _dot_tile(a_ptr + group * stride_ag, b_ptr + group * stride_bg, rows, cols, row_ok, col_ok,
                        tl.where(active, k, 0), stride_am, stride_ak, stride_bn, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K,
                        ROUND_BF16)  # ROUND_BF16: the interpreter
    _store(out_ptr + group * stride_og, acc, rows, cols, row_ok[:, None] & col_ok[None, :],
           stride_om, stride_on, ROUND_BF16, OUT_FP32, ACCUMULATE)


@triton.jit
def _k_grouped_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, ks_ptr, m, n, groups, total_k, total_blocks,
                      stride_at, stride_bt, stride_sab, stride_sam, stride_sbb, stride_sbn,
                      stride_og, stride_om, stride_on, stride_ks, m_bucket, k_blocks,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, ROUND_BF16: tl.constexpr, FP8_DOT: tl.constexpr,
                      SB_PER_ROW: tl.constexpr, OUT_FP32: tl.constexpr, ACCUMULATE: tl.constexpr,
                      K_MAJOR: tl.constexpr, BLOCK_G: tl.constexpr, SCALED: tl.constexpr):
    """out[g] (+)= A_g @ B_g.T over group g's own k_g = ks[g] tokens; grid (tiles of [m, n], groups).
    SCALED: FP8 with 1x128 scales; else bf16 (token-major only, the scale arguments unread).

    Group g starts at token sum(ks[:g]) and at scale row sum(ceil(ks[:g] / 128)), both summed here
    from ks on the device. K_MAJOR: A_g is [m, k_g'] row-major at a + m * start, k_g' = k_g rounded
    up to 16 (DeepGEMM's "nt" K-grouped layout, rows 16-byte aligned: wide loads; the launcher
    copies groups of other sizes into it); else a is [tokens, m] with unit stride along m and A_g
    its rows start .. start + k_g, transposed ("tn": the activations as the forward pass left
    them, any k_g). B likewise with n. A group's last K block is masked past k_g. A ks tensor
    that disagrees with the host's sizes cannot make a read outside the operands: negative sizes
    count as 0, K-major ones are rounded up to 16 here (so the alignment hints hold), and groups
    reaching past total_k tokens or total_blocks scale rows are cut there.
    """
    tl.static_assert(SB_PER_ROW)  # both operands are activations: 1x128 scales per row
    group = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    sizes = tl.maximum(tl.load(ks_ptr + offs_g * stride_ks, mask=offs_g < groups, other=0), 0).to(tl.int64)
    if K_MAJOR:  # rows of k_g rounded up to 16 (the launcher's layout; what the hints below say)
        sizes = (sizes + 15) // 16 * 16
    before = offs_g < group
    start = tl.sum(tl.where(before, sizes, 0))
    first_block = tl.sum(tl.where(before, (sizes + BLOCK_K - 1) // BLOCK_K, 0))
    k_here = tl.maximum(tl.minimum(tl.sum(tl.where(offs_g == group, sizes, 0)), total_k - start), 0)
    blocks = tl.maximum(tl.minimum((k_here + BLOCK_K - 1) // BLOCK_K, total_blocks - first_block), 0)
    if K_MAJOR:  # every size a multiple of 16, even from a ks tensor that disagrees: 16-byte aligned rows
        k_here = tl.multiple_of(k_here, 16)
        start = tl.multiple_of(start, 16)
    rows, cols, row_ok, col_ok = _tile(m, n, BLOCK_M, BLOCK_N, GROUP_M)
    if K_MAJOR:
        a_group, a_row, a_tok = a_ptr + start * m, k_here, 1
        b_group, b_row, b_tok = b_ptr + start * n, k_here, 1
    else:  # unit stride along m (and n), known here: contiguous tiles, wide loads
        a_group, a_row, a_tok = a_ptr + start * stride_at, 1, stride_at
        b_group, b_row, b_tok = b_ptr + start * stride_bt, 1, stride_bt
    if SCALED:
        acc = _scaled_tile(a_group, sa_ptr + first_block * stride_sab, b_group, sb_ptr + first_block * stride_sbb,
                           rows, cols, row_ok, col_ok, blocks, a_row, a_tok, stride_sam, stride_sab,
                           b_row, b_tok, stride_sbn, stride_sbb, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, True,
                           k_here, True)
    else:
        acc = _dot_tile(a_group, b_group, rows, cols, row_ok, col_ok, k_here, a_row, a_tok, b_row, b_tok,
                        BLOCK_M, BLOCK_N, BLOCK_K, ROUND_BF16)  # ROUND_BF16: the interpreter
    _store(out_ptr + group.to(tl.int64) * stride_og, acc, rows, cols, row_ok[:, None] & col_ok[None, :],
           stride_om, stride_on, ROUND_BF16, OUT_FP32, ACCUMULATE)


# ---- block sizes ----

def _interpret() -> bool:
    """Whether this module's kernels run on Triton's interpreter: fixed when they were defined
    (TRITON_INTERPRET then), so read once, not from the environment at each of a GEMM's calls."""
    return _INTERPRETED


_INTERPRETED = not isinstance(_gemm_kernel, JITFunction)


# Under the interpreter every program is numpy work: small fixed tiles keep the CPU tests fast.
_INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, GROUP_M=2)
# The TMA_WS programs there (no SMs to count): few, so that each walks several tiles.
INTERPRETER_PERSISTENT_PROGRAMS = 3


def _gpu_configs(max_block_m: int, sb_per_row: bool = False, lean: bool = False) -> list[triton.Config]:
    """Candidate tiles for Hopper-class GPUs (BLOCK_K is fixed at 128, the scale width).

    No 128 x 256 (8 warps) or 128 x 128 (4 warps): the accumulator and each K block's product are
    both fp32 tiles in registers, and those spill (ptxas sm_90a through Triton 3.8, 2026-11-23).
    With per-row b scales (sb_per_row) no 128 x 128 at all: each thread also holds the scales of its
    32 accumulator columns, and 8 warps spill 12-36 bytes (same ptxas, 2026-12-03). lean (the
    contiguous kernel, _FP8_LEAN_KERNELS): no 128 x 64 in 4 warps either, at 255 registers there
    without its run bookkeeping and 4 bytes spilled with it (same ptxas, 2026-12-05).
    """
    shapes = [(128, 128, 4, 8), (128, 128, 3, 8), (128, 128, 5, 8), (64, 256, 3, 8), (64, 128, 4, 4),
              (128, 64, 4, 4), (64, 64, 5, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
            for bm, bn, stages, warps in shapes if bm <= max_block_m and not (sb_per_row and bm == bn == 128)
            and not (lean and (bm, bn, warps) == (128, 64, 4))]


_FP8_LEAN_KERNELS = ("_contiguous_kernel",)


# The bf16 kernels whose code around the dot holds more live values (the contiguous kernel's run
# walk, the K-grouped kernel's group sums and fp32 accumulate-store): 128 accumulator registers per
# thread spill there (80-330 bytes), 64 do not (ptxas sm_90a through Triton 3.8, 2026-12-04).
_BF16_LEAN_KERNELS = ("_contiguous_kernel", "_k_grouped_kernel")


# The warp-specialized dense candidates (TMA_WS; _tma_ws_ok): 128 x 128 tiles only. Triton splits
# them into two 64-row consumer warp groups beside a producer one (num_warps=4 is the per-group
# count its Hopper pass requires); 128 x 256 and 256 x 128 spill ~1 KB there (ptxas sm_90a through
# Triton 3.8 and 3.6, 2026-12-04). Never run on a GPU so far: opt-in (_tma_ws_mode).
_TMA_WS_SHAPES = [(128, 128, 4, 4), (128, 128, 3, 4), (128, 128, 5, 4)]


def _tma_ws_mode() -> str:
    """DSKERNELS_GEMM_TMA_WS: `off` (default until a device run has checked and timed them), never
    the TMA_WS candidates; `auto`, the autotuner weighs them beside the others where _tma_ws_ok;
    `only`, nothing else there (to time them on their own). A forced config (the tests' heuristic
    stand-in, the interpreter's tile) with TMA_WS takes it unless the knob is `off` explicitly."""
    return env_choice(TMA_WS_KNOB, ("auto", "off", "only")) or "off"


def _tma_ws_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "SPLIT_K": False, "TMA_WS": True},
                          num_stages=stages, num_warps=warps) for bm, bn, stages, warps in _TMA_WS_SHAPES]


def _tma_ws_ok(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, fp8_dot: bool, sb_per_row: bool) -> bool:
    """Whether the dense kernel may run its warp-specialized TMA form (TMA_WS): on Hopper (the
    warp specialization Triton does for sm_90; other GPUs keep the pointer loads), under a Triton
    whose Hopper pass has been checked with it (_triton_version), FP8 dots, 128x128 b scales, and
    a and b K-major with base and rows 16-byte aligned (the tensor copy engine's rule) and rows
    that do not overlap. An fp32 out also needs a row stride that is a multiple of 16 elements:
    otherwise its load-add-store epilogue cannot be vectorized and spills 672-816 bytes (ptxas for
    sm_90a under Triton 3.6 and 3.8, 203 x 300 x 384; none at a row stride of 304, nor for a bf16
    out). Under the interpreter wherever the operands allow it (tests force the candidate there)."""
    if not fp8_dot or sb_per_row or _triton_version() < TMA_WS_MIN_TRITON:
        return False
    if out.dtype == torch.float32 and out.stride(0) % 16:
        return False
    if not _interpret() and torch.cuda.get_device_capability(a.device)[0] != 9:
        return False
    return _tma_ws_operand(a) and _tma_ws_operand(b)  # (no generator: this runs on every dense call)


def _tma_ws_operand(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0


# Triton 3.6 (the lent H200's) and 3.8 (CI's) compile the TMA_WS candidates warp-specialized; the
# Hopper pass came in 3.5 and changed since, so older ones keep the pointer loads.
TMA_WS_MIN_TRITON = (3, 6)


@functools.cache
def _triton_version() -> tuple[int, ...]:
    return version_tuple(triton.__version__)


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:  # noqa: ARG001
    return torch.empty(size, dtype=torch.int8, device="cuda" if not _interpret() else "cpu")


@contextlib.contextmanager
def _use_descriptor_scratch(enabled: bool):
    """Device-side tensor descriptors are written to global scratch, which Triton asks its
    allocator for at each launch (a few hundred bytes per program): torch's caching allocator on
    the current device (Triton launches there; inside a CUDA graph capture, from the graph's pool),
    set for our launch only and the caller's allocator put back after it (Triton keeps it in a
    context variable; where it does not, it stays set, as inductor leaves its own)."""
    if not enabled:
        yield
        return
    current = getattr(triton_allocation, "_allocator", None)
    if not isinstance(current, contextvars.ContextVar):
        triton.set_allocator(_descriptor_scratch)
        yield
        return
    token = current.set(_descriptor_scratch)
    try:
        yield
    finally:
        current.reset(token)


def _bf16_gpu_configs(max_block_m: int, lean: bool = False) -> list[triton.Config]:
    """Candidate tiles of the bf16 grouped GEMMs (BLOCK_K 64: 128 bytes of a row, one swizzle span).
    One fp32 accumulator (no per-block product tile as in FP8), so the masked kernel fits 128 x 256
    in 8 warps (128 registers of it per thread); lean: at most 64 per thread (_BF16_LEAN_KERNELS)."""
    shapes = [(128, 256, 3, 8), (128, 128, 4, 8), (128, 128, 4, 4), (64, 256, 4, 8), (64, 128, 4, 4),
              (128, 64, 4, 4), (64, 64, 5, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=stages,
                          num_warps=warps)
            for bm, bn, stages, warps in shapes
            if bm <= max_block_m and not (lean and bm * bn > 64 * 32 * warps)]


def _heuristic_config(m_hint: int, n: int, sb_per_row: bool = False, scaled: bool = True,  # noqa: ARG001
                      lean: bool = False) -> dict:
    """Without autotuning (DSKERNELS_GEMM_AUTOTUNE=0): small-M decode shapes get 64-row tiles.
    (n: for later rules; scaled=False: the bf16 kernels, lean as in _bf16_gpu_configs.)"""
    if not scaled:
        if m_hint <= 64:
            return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=4, num_warps=4)
        if lean:
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=4, num_warps=8)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=8)
    if m_hint <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_stages=4, num_warps=4)
    if sb_per_row:  # 128 x 128 spills there (_gpu_configs)
        return dict(BLOCK_M=64, BLOCK_N=256, GROUP_M=8, num_stages=3, num_warps=8)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_stages=4, num_warps=8)


def _autotune_enabled() -> bool:
    return os.environ.get("DSKERNELS_GEMM_AUTOTUNE", "1") != "0"


# The kernels whose rows are tokens: under batch-invariant mode (dskernels.batch_invariant) their
# tile is _invariant_config's, whatever m, expected_m or the SM count, and the dense one cuts K
# into ranges fixed by n and k (_invariant_k_ranges). (The K-grouped kernel's rows are weight
# rows: the batch is its K.)
_TOKEN_ROW_KERNELS = ("_gemm_kernel", "_contiguous_kernel", "_masked_kernel")
# The rows _invariant_config asks the heuristic for: its prefill tile (128 rows) at every m.
INVARIANT_M_HINT = 4096


def _invariant_config(n: int, sb_per_row: bool, scaled: bool, lean: bool) -> dict:
    """The one tile of batch-invariant mode (docs/gemm.md, "Batch invariance"): two tiles may sum a
    row's K block in different orders (Triton's interpreter does: numpy's matmul by tile shape), so
    the tile must not follow m. The heuristic's prefill tile: 128 x 128 in 8 warps (64 x 256 with
    per-row b scales; bf16: 128 x 256 or the lean kernels' 128 x 128), which the sm90 numbers
    (README) put ~10% behind 64-row tiles at m <= 64 and ahead by 23-50% at m = 4096."""
    return _heuristic_config(INVARIANT_M_HINT, n, sb_per_row, scaled, lean)


@functools.cache
def _tuned(kernel_name: str, max_block_m: int, accumulate: bool = False, sb_per_row: bool = False,
           scaled: bool = True, tma_ws: str = "off"):
    kernel = globals()[kernel_name]
    # Keyed on the M bucket (next power of two, capped), so new batch sizes rarely retune; the dense
    # kernel's variants (names not in a kernel's arguments are left out of its key) tune apart.
    # split_key: the dense kernel's K splits per tile at this m, which the M bucket does not fix.
    key = ["m_bucket", "n", "k_blocks", "split_key", "SB_PER_ROW", "OUT_FP32", "ACCUMULATE", "K_MAJOR", "PSUM"]
    # A kernel that adds to out runs once per candidate while tuning: out is put back after each.
    restore = ["out_ptr"] if accumulate else None
    configs = (_gpu_configs(max_block_m, sb_per_row, kernel_name in _FP8_LEAN_KERNELS) if scaled
               else _bf16_gpu_configs(max_block_m, kernel_name in _BF16_LEAN_KERNELS))
    prune = None
    if kernel_name == "_gemm_kernel":  # every tile also split along K, where _split_count splits it
        configs = [triton.Config(dict(c.kwargs, SPLIT_K=split), num_stages=c.num_stages, num_warps=c.num_warps)
                   for split in (False, True) for c in configs]
        # tma_ws (_tma_ws_mode where the operands allow it): a separate autotuner from the others
        configs = {"off": configs, "auto": configs + _tma_ws_configs(), "only": _tma_ws_configs()}[tma_ws]
        prune = {"early_config_prune": _prune_unsplit}
    return triton.autotune(configs=configs, key=key, restore_value=restore, prune_configs_by=prune)(kernel)


@functools.cache
def _tuned_split_tiles(tuned) -> tuple[tuple[int, int], ...]:
    return _split_tiles(tuned.configs)


def _prune_unsplit(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """The dense kernel's candidates without the split ones that would not split this shape."""
    sms = _sm_count(named_args["out_ptr"].device)
    return [c for c in configs if not c.kwargs["SPLIT_K"] or
            _split_count(named_args["m"], named_args["n"], named_args["k_blocks"], c.kwargs["BLOCK_M"],
                         c.kwargs["BLOCK_N"], sms) > 1]


def _m_bucket(m: int) -> int:
    return min(next_power_of_2(max(m, 1)), 4096)


def _operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """FP8 tensor-core dots where Triton has the fp8 type (sm_89+); elsewhere the kernels read the
    fp8 bytes and widen them to fp16 exactly before an fp16 dot (same products, fp32 sums).
    Where the kernels do not read MN-major FP8 tiles themselves (_token_major_direct: Hopper's FP8
    wgmma takes K-major tiles only, others go through registers unpipelined), an operand whose K
    stride is not 1 (fp8_gemm_nn/tn/tt's transposed views) is first copied K-major: one pass."""
    if all(t.stride(-1) == 1 or t.shape[-1] <= 1 for t in (a, b)):  # K-major (decode): no capability query
        env_choice(TOKEN_MAJOR_KNOB, ("direct", "transpose"))  # (a typo still raises on every path)
    elif not _token_major_direct(a.device):
        a, b = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (a, b))
    fp8_dot = native_fp8(a.device)
    return (a, b, True) if fp8_dot else (a.view(torch.uint8), b.view(torch.uint8), False)


def _launch(kernel_name: str, grid_fn, args: tuple, m_hint: int, n: int, *, fp8_dot: bool,
            max_block_m: int = 256, split_k: _SplitK | None = None, tma_ws: bool = False, **variant) -> None:
    """variant: the kernels' compile-time switches (SCALED: FP8 with scales, BLOCK_K 128, the
    default; False: bf16, BLOCK_K from the config; the dense and K-grouped kernels' SB_PER_ROW,
    OUT_FP32 and ACCUMULATE; the grouped kernels' own). split_k: the dense kernel's K splits, whose
    workspace is appended to args once the candidate tiles are known. tma_ws: the dense kernel's
    operands allow its TMA_WS candidates (_tma_ws_ok); a forced config asking for TMA_WS without it
    runs the pointer loop."""
    kernel = globals()[kernel_name]
    scaled = variant.get("SCALED", True)  # passed on only by the kernels that have the switch
    fixed = dict(ROUND_BF16=_interpret(), FP8_DOT=fp8_dot, **variant)
    if scaled:
        fixed["BLOCK_K"] = GROUP_SIZE
    sb_per_row = variant.get("SB_PER_ROW", False)
    invariant = kernel_name in _TOKEN_ROW_KERNELS and batch_invariant_enabled()
    if _interpret():  # (one tile for every m already)
        meta = dict(_INTERPRETER_CONFIG, **({} if scaled else {"BLOCK_K": 32}), **fixed)
    elif invariant:  # no autotuning: the first call's timings would pick the tile
        meta = dict(_invariant_config(n, sb_per_row, scaled, kernel_name in _BF16_LEAN_KERNELS), **fixed)
        meta["BLOCK_M"] = min(meta["BLOCK_M"], max_block_m)
    elif _autotune_enabled():
        ws_mode = _tma_ws_mode() if tma_ws else "off"
        tuned = _tuned(kernel_name, max_block_m, variant.get("ACCUMULATE", False), sb_per_row, scaled, ws_mode)
        if split_k is not None:
            args += split_k.key_and_workspace(_tuned_split_tiles(tuned))
        if ws_mode == "off":  # (no context manager to enter: ~1 us of every call's host time)
            fast(tuned)[grid_fn](*args, **fixed)
            return
        with _use_descriptor_scratch(True):
            fast(tuned)[grid_fn](*args, **fixed)
        return
    else:
        meta = dict(_heuristic_config(m_hint, n, sb_per_row, scaled, kernel_name in _BF16_LEAN_KERNELS), **fixed)
        meta["BLOCK_M"] = min(meta["BLOCK_M"], max_block_m)
    if meta.get("TMA_WS"):
        meta["TMA_WS"] = tma_ws and env_choice(TMA_WS_KNOB, ("auto", "off", "only")) != "off"
    if split_k is not None and invariant:
        _invariant_k_ranges(split_k, meta)
        args += (0, *split_k.workspace_for(meta))
    elif split_k is not None:
        meta["SPLIT_K"] = not meta.get("TMA_WS") and split_k.count(dict(meta, SPLIT_K=True)) > 1
        args += (0, *split_k.workspace_for(meta))  # (no autotuning key)
    with _use_descriptor_scratch(meta.get("TMA_WS", False)):
        fast(kernel)[grid_fn(meta)](*args, **meta)


# ---- split-K: the dense kernel on shapes of few output tiles (decode) ----

MAX_SPLITS = 16
MIN_SPLIT_BLOCKS = 4  # K blocks per split, enough to fill the 3-5 stage pipelines
# The SMs assumed for tensors on no GPU (the interpreter, the sm_90a compile check on meta tensors):
# 0, no split, unless a test or the compile check sets it.
NO_DEVICE_SMS = 0


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return NO_DEVICE_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Batch-invariant mode's K ranges are the splits of one row tile on this many SMs (an H100 SXM's and
# H200's; _invariant_k_ranges), whatever the GPU: a row then gets the same bits on every Hopper part.
INVARIANT_SMS = 132


def _invariant_k_ranges(split_k: _SplitK, meta: dict) -> None:
    """Batch-invariant mode's K association (docs/gemm.md, "Batch invariance"): S contiguous K
    ranges, each summed from zero, added in range order, S from n, k and the mode's fixed tile alone
    (the splits _split_count gives one row tile on INVARIANT_SMS). Where this call's tiles fill few
    SMs (_split_count splits it) S programs per tile run them (SPLIT_K: _split_k_sum adds them in
    that order), else one program loops over them (K_RANGES): the same bits either way. The
    persistent TMA_WS form sums K in one loop: off here. One range (one K loop, never split) for
    per-row b scales or an accumulating call: the loop's third fp32 tile (the running total beside
    a range's sum and a block's product) spills 8-36 bytes there at 255 registers, none in the plain
    and fp32-out forms (ptxas sm_90a, Triton 3.8, 2026-12-07; scripts/check_triton_compile.py)."""
    ranges = 1
    if not meta.get("SB_PER_ROW") and not meta.get("ACCUMULATE"):
        ranges = _split_count(1, split_k.n, split_k.k_blocks, meta["BLOCK_M"], meta["BLOCK_N"], INVARIANT_SMS)
    split = ranges > 1 and _split_count(split_k.m, split_k.n, split_k.k_blocks, meta["BLOCK_M"], meta["BLOCK_N"],
                                        split_k.sms) > 1
    meta.update(TMA_WS=False, SPLIT_K=split, K_RANGES=1 if split else ranges)
    split_k.fixed_count = ranges


def _split_count(m: int, n: int, k_blocks: int, block_m: int, block_n: int, sms: int) -> int:
    """K splits of the dense kernel: none while its output tiles fill more than half the SMs (decode
    GEMMs fill a few: m = 64, n = 2112 is 17 tiles of 64 x 128 for 132 SMs, each reading 56 K
    blocks); else as many as fill the SMs once, each of at least MIN_SPLIT_BLOCKS K blocks."""
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    if 2 * tiles > sms:
        return 1
    return max(1, min(sms // tiles, k_blocks // MIN_SPLIT_BLOCKS, MAX_SPLITS))


class _SplitK:
    """One dense call's K splits (the SPLIT_K grid axis) and their workspace."""

    def __init__(self, m: int, n: int, k_blocks: int, out: torch.Tensor):
        self.m, self.n, self.k_blocks, self.out = m, n, k_blocks, out
        self.sms = _sm_count(out.device)
        self.fixed_count = 0  # batch-invariant mode's K ranges (_invariant_k_ranges), else by m and SMs

    def count(self, meta: dict) -> int:
        if not meta["SPLIT_K"]:
            return 1
        if self.fixed_count:
            return self.fixed_count
        return _split_count(self.m, self.n, self.k_blocks, meta["BLOCK_M"], meta["BLOCK_N"], self.sms)

    def key_and_workspace(self, tiles: tuple[tuple[int, int], ...]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """For the candidate tiles `tiles` ((BLOCK_M, BLOCK_N) of the splitting candidates, sorted;
        _split_tiles): the autotuning key of their split counts and a workspace large enough for
        any of them."""
        key, partials, counters = _split_plan(self.m, self.n, self.k_blocks, self.sms, tiles)
        return (key, *self._workspace(partials, counters))

    def workspace_for(self, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The workspace of one forced tile (no autotuning)."""
        splits = self.count(meta)
        if splits <= 1:
            return self._workspace(0, 0)
        return self._workspace(splits * self.m * self.n, cdiv(self.m, meta["BLOCK_M"]) * cdiv(self.n, meta["BLOCK_N"]))

    def _workspace(self, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(partials, arrival counters), empty (never read) where no candidate splits: of the
        dtypes the split kernel is compiled for."""
        device = self.out.device
        if not partials:
            return torch.empty(0, dtype=torch.float32, device=device), torch.empty(0, dtype=torch.int32, device=device)
        return torch.empty(partials, dtype=torch.float32, device=device), _arrival_counters(device, counters)


def _split_tiles(configs: list[triton.Config]) -> tuple[tuple[int, int], ...]:
    """The distinct (BLOCK_M, BLOCK_N) of the splitting candidates among configs, sorted."""
    return tuple(sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs if c.kwargs.get("SPLIT_K")}))


@functools.lru_cache(maxsize=4096)
def _split_plan(m: int, n: int, k_blocks: int, sms: int, tiles: tuple[tuple[int, int], ...]) -> tuple[int, int, int]:
    """(key, partial floats, arrival counters) of a dense call's splitting candidate tiles (computed
    once per shape: a decode step calls the same few).

    key: their split counts, one 5-bit digit per tile shape (at most MAX_SPLITS = 16 each; five
    shapes stay below 2^31): the autotuner retunes where they change. Within an M bucket they can:
    64 x 128 tiles split m = 160, n = 2112 but not m = 256. The workspace: the largest any of them
    needs, none where none splits."""
    key = partials = counters = 0
    for block_m, block_n in tiles:
        splits = _split_count(m, n, k_blocks, block_m, block_n, sms)
        key = key * 32 + splits
        if splits > 1:
            partials = max(partials, splits * m * n)
            counters = max(counters, cdiv(m, block_m) * cdiv(n, block_n))
    return key, partials, counters


_ARRIVALS: dict[tuple[int, int], torch.Tensor] = {}
_MAX_ARRIVAL_STREAMS = 64  # past it the oldest stream's go (a server making streams per request)


def _arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """At least size zeroed int32 counters, which the split-K kernel leaves zeroed (_split_k_sum).
    Kept per (device, stream), as torch keeps cuBLAS workspaces: kernels on one stream run one after
    another. While a CUDA graph is captured, fresh ones per call (a fill node in the graph): graphs
    captured on one stream may replay side by side on others."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < size:
        # (dropping a stream's counters is safe: they are zero between launches, and their memory
        # goes back to the caching allocator in that stream's order)
        while key not in _ARRIVALS and len(_ARRIVALS) >= _MAX_ARRIVAL_STREAMS:
            del _ARRIVALS[next(iter(_ARRIVALS))]
        counters = _ARRIVALS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return counters


# ---- launchers (inputs already validated by dskernels.ops.gemm) ----

def gemm_fp8_fp8_bf16_nt(a, sa, b, sb, out) -> None:
    fp8_gemm_nt(a, sa, b, sb, out, accumulate=False)


def fp8_gemm_nt(a, sa, b, sb, out, accumulate: bool) -> None:
    """out (bf16 or fp32) = (out if accumulate else 0) + a @ b.T; sb per 128x128 block of b or per
    row of b ([n, k / 128])."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out.zero_()
        return
    a_op, b_op, fp8_dot = _operands(a, b)
    args = (a_op, sa, b_op, sb, out, m, n, k // GROUP_SIZE,
            *a_op.stride(), *sa.stride(), *b_op.stride(), *sb.stride(), *out.stride(), _m_bucket(m))
    split_k = _SplitK(m, n, k // GROUP_SIZE, out)
    def grid(meta):
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
        if meta.get("TMA_WS"):  # persistent programs
            return (min(tiles, _sm_count(out.device) or INTERPRETER_PERSISTENT_PROGRAMS), 1)
        return (tiles, split_k.count(meta))

    # n = 1: one scale either way (the per-block path reads it once per K block).
    sb_per_row = n > 1 and sb.shape[0] == n
    _launch("_gemm_kernel", grid, args, m, n, fp8_dot=fp8_dot, split_k=split_k,
            tma_ws=_tma_ws_ok(a_op, b_op, out, fp8_dot, sb_per_row), SB_PER_ROW=sb_per_row,
            OUT_FP32=out.dtype == torch.float32, ACCUMULATE=accumulate)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, out, m_indices, psum: bool = False,
                                              zero_pad: bool = False, m_hint: int = 0) -> None:
    """m_indices: one group id per row, or (psum) the groups' cumulative row ends; m_hint: the
    expected rows per group (0: unknown, the whole M)."""
    _contiguous(a, sa, b, sb, out, m_indices, psum, zero_pad, m_hint, scaled=True)


def m_grouped_bf16_gemm_contiguous(a, b, out, grouped_layout, psum: bool, zero_pad: bool, m_hint: int) -> None:
    """out[i] = a[i] @ b[g].T for the rows i of group g (bf16 operands, b [G, n, k] any strides)."""
    _contiguous(a, None, b, None, out, grouped_layout, psum, zero_pad, m_hint, scaled=False)


def _contiguous(a, sa, b, sb, out, layout, psum: bool, zero_pad: bool, m_hint: int, *, scaled: bool) -> None:
    m, k = a.shape
    groups, n, _ = b.shape
    if m == 0 or n == 0:
        return
    if k == 0:
        out.zero_()
        return
    if scaled:
        a_op, b_op, fp8_dot = _operands(a, b)
        scale_args = (sa, sb, *sa.stride(), *sb.stride())
    else:
        a_op, b_op, fp8_dot = a, b, False
        scale_args = (a, a, 0, 0, 0, 0, 0)  # unread
    sa_op, sb_op, stride_sam, stride_sak, *stride_sb = scale_args
    args = (a_op, sa_op, b_op, sb_op, out, layout, m, n, k, k // GROUP_SIZE, groups,
            *a_op.stride(), stride_sam, stride_sak, *b_op.stride(), *stride_sb, *out.stride(), layout.stride(0),
            _m_bucket(m_hint if m_hint > 0 else m))
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                         _run_slots(m, groups, meta["BLOCK_M"], psum))
    # At most 128 rows per tile: in DeepGEMM's 128-aligned layouts every tile then holds one group.
    _launch("_contiguous_kernel", grid, args, m_hint if m_hint > 0 else m, n, fp8_dot=fp8_dot, max_block_m=128,
            SCALED=scaled, PSUM=psum, ZERO_PAD=zero_pad, BLOCK_G=next_power_of_2(max(groups, 1)) if psum else 1)


def _run_slots(m: int, groups: int, block_m: int, psum: bool) -> int:
    """Programs per tile of the contiguous kernel (its run slots): about the runs a tile of
    block_m rows holds where the layout's segments (at most one per group and one of padding
    rows between them) spread evenly over the m rows; at most block_m and m. One in DeepGEMM's
    aligned layouts (4 x 8192 rows: 1) and the psum layout (a tile never holds two groups);
    decode routing (8 rows per token over 256 experts, 64-row tiles): 8 at one token, 64 at 32,
    17 at 128."""
    if psum or m == 0:
        return 1
    segments = min(groups + 1, m)
    return max(1, min(block_m, m, cdiv(block_m * segments, m)))


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, out, masked_m, expected_m: int) -> None:
    _masked(a, sa, b, sb, out, masked_m, expected_m, scaled=True)


def m_grouped_bf16_gemm_masked(a, b, out, masked_m, expected_m: int) -> None:
    _masked(a, None, b, None, out, masked_m, expected_m, scaled=False)


def fp8_bmm_nt(a, sa, b, sb, out, accumulate: bool) -> None:
    """Batched fp8_gemm_nt (fp8_einsum): out[g] (bf16 or fp32) = (out[g] if accumulate else 0) +
    a[g] @ b[g].T, sb per 128x128 block or per row of b[g]: the masked kernel with every row valid."""
    groups, m = a.shape[:2]
    masked_m = torch.full((groups,), m, dtype=torch.int32, device=a.device)
    sb_per_row = b.shape[1] > 1 and sb.shape[1] == b.shape[1]
    _masked(a, sa, b, sb, out, masked_m, m, scaled=True, SB_PER_ROW=sb_per_row,
            OUT_FP32=out.dtype == torch.float32, ACCUMULATE=accumulate)


def _masked(a, sa, b, sb, out, masked_m, expected_m: int, *, scaled: bool, **general) -> None:
    """general: fp8_bmm_nt's SB_PER_ROW, OUT_FP32 and ACCUMULATE (bf16 written over, by default)."""
    groups, m_max, k = a.shape
    n = b.shape[1]
    if groups == 0 or m_max == 0 or n == 0:
        return
    if k == 0:
        if not general.get("ACCUMULATE"):
            out.zero_()
        return
    m_hint = max(1, min(expected_m, m_max))  # the tuning hint, as in DeepGEMM
    if scaled:
        a_op, b_op, fp8_dot = _operands(a, b)
        sa_args, sb_args = (sa, *sa.stride()), (sb, *sb.stride())
    else:
        a_op, b_op, fp8_dot = a, b, False
        sa_args, sb_args = (a, 0, 0, 0), (a, 0, 0, 0)  # unread
    args = (a_op, sa_args[0], b_op, sb_args[0], out, masked_m, m_max, n, k, k // GROUP_SIZE,
            *a_op.stride(), *sa_args[1:], *b_op.stride(), *sb_args[1:], *out.stride(), masked_m.stride(0),
            _m_bucket(m_hint))
    grid = lambda meta: (cdiv(m_max, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), groups)  # noqa: E731
    _launch("_masked_kernel", grid, args, m_hint, n, fp8_dot=fp8_dot, SCALED=scaled, **general)


def k_grouped_fp8_gemm(a, sa, b, sb, out, ks: list[int], ks_tensor, k_major: bool, accumulate: bool) -> None:
    """out[g] (bf16 or fp32) = (out[g] if accumulate else 0) + A_g @ B_g.T, one GEMM launch for
    every group (layouts: _k_grouped_kernel; sa [blocks, m] and sb [blocks, n] in any strides;
    k_major: a and b flat, else [tokens, m] and [tokens, n])."""
    groups, m, n = out.shape
    if groups == 0 or m == 0 or n == 0:
        return
    if not k_major and not _token_major_direct(out.device):
        # Hopper's FP8 wgmma reads K-major tiles only: token-major ones would go through registers,
        # unpipelined (scripts/check_triton_compile.py shows no multi-buffering). One transposing copy
        # per group into the K-major layout instead, then the pipelined kernel.
        a, b = (_k_major_groups(t, rows, ks, token_major=True) for t, rows in ((a, m), (b, n)))
        k_major, ks = True, _rounded_sizes(ks)  # the kernel rounds ks_tensor likewise
    elif k_major and any(k % 16 for k in ks):
        # Rows of k_g bytes would start anywhere: one byte per load, no pipelining (and spills). Each
        # group is copied once into rows of k_g rounded up to 16, zeros after (adding nothing); the
        # scale rows stay as they are (ceil(k_g / 128) blocks either way).
        a, b = (_k_major_groups(t, rows, ks, token_major=False) for t, rows in ((a, m), (b, n)))
        ks = _rounded_sizes(ks)
    if not k_major:  # the kernel assumes unit stride along m and n
        a, b = (t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous() for t in (a, b))
    a_op, b_op, fp8_dot = _operands(a, b)
    total_k = sum(ks)
    k_bucket = min(next_power_of_2(max(total_k // groups // GROUP_SIZE, 1)), 64)
    args = (a_op, sa, b_op, sb, out, ks_tensor, m, n, groups, total_k, sa.shape[0],
            0 if k_major else a_op.stride(0), 0 if k_major else b_op.stride(0), *sa.stride(), *sb.stride(),
            *out.stride(), ks_tensor.stride(0), _m_bucket(m), k_bucket)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), groups)  # noqa: E731
    _launch("_k_grouped_kernel", grid, args, m, n, fp8_dot=fp8_dot, SB_PER_ROW=True,
            OUT_FP32=out.dtype == torch.float32, ACCUMULATE=accumulate, K_MAJOR=k_major,
            BLOCK_G=next_power_of_2(groups), SCALED=True)


def k_grouped_bf16_gemm(a, b, out, ks: list[int], ks_tensor, accumulate: bool) -> None:
    """out[g] (bf16 or fp32) = (out[g] if accumulate else 0) + a[rows of g].T @ b[rows of g]: bf16
    a [tokens, m] and b [tokens, n], read token-major as they are (Hopper's bf16 wgmma takes
    MN-major tiles from shared memory: no transposing copy, unlike FP8)."""
    groups, m, n = out.shape
    if groups == 0 or m == 0 or n == 0:
        return
    a, b = (t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous() for t in (a, b))
    total_k = sum(ks)
    k_bucket = min(next_power_of_2(max(total_k // groups // GROUP_SIZE, 1)), 64)
    args = (a, a, b, a, out, ks_tensor, m, n, groups, total_k, 0, a.stride(0), b.stride(0), 0, 0, 0, 0,
            *out.stride(), ks_tensor.stride(0), _m_bucket(m), k_bucket)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), groups)  # noqa: E731
    _launch("_k_grouped_kernel", grid, args, m, n, fp8_dot=False, SB_PER_ROW=True,
            OUT_FP32=out.dtype == torch.float32, ACCUMULATE=accumulate, K_MAJOR=False,
            BLOCK_G=next_power_of_2(groups), SCALED=False)


def _token_major_direct(device: torch.device) -> bool:
    """Whether the kernels read MN-major FP8 operands (token-major in the K-grouped GEMMs, the
    transposed views of fp8_gemm_nn/tn/tt) themselves: under the interpreter and on sm_100 (B200:
    its tcgen05 tensor cores take MN-major FP8 tiles from shared memory; pipelined there per
    scripts/check_triton_compile.py); elsewhere the launchers copy them K-major first.
    DSKERNELS_GEMM_TOKEN_MAJOR=direct or =transpose forces either."""
    forced = env_choice(TOKEN_MAJOR_KNOB, ("direct", "transpose"))
    if forced:
        return forced == "direct"
    return _interpret() or torch.cuda.get_device_capability(device)[0] == 10


def _rounded_sizes(ks: list[int]) -> list[int]:
    return [-(-k // 16) * 16 for k in ks]


def _k_major_groups(t: torch.Tensor, rows: int, ks: list[int], token_major: bool) -> torch.Tensor:
    """The groups' A_g [rows, k_g] one after another, each row widened to k_g rounded up to 16 with
    zeros (adding nothing), flat: from the flat K-major layout or from token-major [tokens, rows]."""
    widths = _rounded_sizes(ks)
    packed = torch.empty(rows * sum(widths), dtype=torch.uint8, device=t.device)
    source = t.view(torch.uint8)
    first = first_packed = 0
    for k, width in zip(ks, widths):
        block = packed[rows * first_packed:rows * (first_packed + width)].view(rows, width)
        if token_major:
            block[:, :k] = source[first:first + k].T
        else:
            block[:, :k] = source[rows * first:rows * (first + k)].view(rows, k)
        block[:, k:] = 0
        first, first_packed = first + k, first_packed + width
    return packed.view(t.dtype)
