"""The batch-invariant float matmul (dskernels.batch_invariant): out[g] = c[g] + a[g] @ b[g].T for
bf16, fp16 or fp32 operands, summed in fp32 and rounded once to out's dtype.

A row's bits do not depend on how many rows come with it: one tile shape whatever m (no choice by
shape, no autotuning), each output element summed over K in BLOCK_K steps in order, in K_RANGES
contiguous ranges fixed by n and k (_k_ranges), each into its own fp32 accumulator from zero,
added in range order. Where a plain matmul's tiles fill few SMs (decode) one program per tile and
range runs them and the last to arrive adds them in that order (gemm.py's _split_k_sum); elsewhere
one program loops over them: the same bits either way. torch's matmuls (cuBLAS on a GPU, MKL on
CPU) pick their kernel, and so their summation order, by shape: a token's row changes its last
bits when the batch grows.

Two layouts:
- batched: a [G, m, k], b [G, n, k], out [G, m, n] (G = 1 for a plain matmul; einsum's batch);
- row-grouped (`ends`): a [M, k] and out [M, n] hold groups of consecutive rows, group g the rows
  ends[g - 1] .. ends[g] - 1 (ends int32 [G] on the device, never read on the host; cut at M), times
  b[g]: the float MoE experts (rows sorted by expert). Rows past ends[-1] are not written.

Grid: row tiles x column tiles, flat on axis 0 (CUDA's 2**31 - 1; axes 1 and 2 hold 65535), so
neither n nor G meets a 65535 limit (the batched form keeps G on axis 2, 65535 a launch). The
row-grouped form's row tiles start at each group's first row, BLOCK_M apart; a one-program tile
map (_tile_map_kernel) writes each group's cumulative count of them on the device, and each
program finds its group and tile by a binary search over it. The grid is the host's bound on the
row tiles, cdiv(M, BLOCK_M) plus one partial tile per group with rows (V3's prefill, M = 32768 rows
over 256 experts, n = 4096: 764 x 64 programs; a grid of cdiv(M, 64) row tiles per group was 8.4M);
programs past the real tiles do no work. No host sync (CUDA-graph safe). A row's bits still do not
depend on M or on the other groups: its tile's K loop is the same wherever the tile lands.

fp32 operands take an IEEE fp32 dot (input_precision="ieee": no TF32), 16-bit ones the tensor
cores with an fp32 accumulator. Under Triton's interpreter the products are summed over each K step
in numpy (its tl.dot is numpy's matmul, whose BLAS sums a row differently by its place in the tile,
and misreads bf16 operands); 16-bit values widen exactly to fp32 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import as_element_type
from dskernels.triton import gemm as triton_gemm
from dskernels.triton.gemm import _split_k_sum, _swizzle
from dskernels.triton.launch import fast

# One tile for every m (the invariance): 64 x 64 fills a decode step's few rows without much waste
# and keeps the IEEE fp32 dot's registers in bounds. BLOCK_K: 64 16-bit values (128 bytes of a
# row) or 32 fp32 ones.
BLOCK_M, BLOCK_N = 64, 64
BLOCK_K = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 32}
NUM_WARPS = 4
GROUP_M = 8  # row tiles per band of the swizzled tile order (the FP8 GEMMs' L2-friendly walk)
DTYPES = tuple(BLOCK_K)
MAX_GRID_Z = 65535  # CUDA's limit on grid dimension 2: the batched form's groups per launch
MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid dimension 0: row tiles x column tiles
MAX_TILE_MAP_BLOCK = 1024  # groups per step of the tile map's running sum


@triton.jit
def _group_rows(ends_ptr, group, m, stride_ends, mask):
    """Rows start .. end - 1 of group (ends[group - 1] .. ends[group] - 1, cut to 0 .. m: never a
    row past a's), int64; end < start: no rows. One definition for the tile map and the matmul."""
    start = tl.load(ends_ptr + tl.maximum(group - 1, 0).to(tl.int64) * stride_ends, mask=mask & (group > 0), other=0)
    end = tl.load(ends_ptr + group.to(tl.int64) * stride_ends, mask=mask, other=0)
    return tl.minimum(tl.maximum(start.to(tl.int64), 0), m), tl.minimum(tl.maximum(end.to(tl.int64), 0), m)


@triton.jit
def _tile_map_kernel(ends_ptr, tile_ends_ptr, groups, m, stride_ends, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program: tile_ends[g] (int32 [G]) = the row tiles of groups 0 .. g, cdiv(rows, BLOCK_M)
    each, a running sum over chunks of BLOCK_G groups."""
    before = tl.zeros((), dtype=tl.int64)
    for first in range(0, groups, BLOCK_G):
        group = first + tl.arange(0, BLOCK_G)
        ok = group < groups
        start, end = _group_rows(ends_ptr, group, m, stride_ends, ok)
        tiles = tl.where(ok, (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M, 0)
        tl.store(tile_ends_ptr + group, (before + tl.cumsum(tiles, 0)).to(tl.int32), mask=ok)
        before += tl.sum(tiles, 0)


@triton.jit
def _k_steps(a_ptrs, b_ptrs, row_ok, col_ok, ks, k, first, stop, stride_ak, stride_bk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
             INTERPRETED: tl.constexpr):
    """The fp32 sum, from zero, of K steps first .. stop - 1 (BLOCK_K each, in order) of a tile."""
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs += tl.cast(first, tl.int64) * BLOCK_K * stride_ak
    b_ptrs += tl.cast(first, tl.int64) * BLOCK_K * stride_bk
    for k_step in range(first, stop):
        k0 = k_step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks[None, :] < k - k0), other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :] & (ks[:, None] < k - k0), other=0.0)
        if INTERPRETED:  # (its tl.dot is numpy's matmul, whose BLAS sums a row by its place in the tile)
            part += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), part, input_precision="ieee")
        else:
            part = tl.dot(a, b, part)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return part


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, out_ptr, ends_ptr, tile_ends_ptr, partial_ptr, arrived_ptr,
                   m, n, k, groups, row_tiles,
                   stride_ag, stride_am, stride_ak, stride_bg, stride_bn, stride_bk,
                   stride_cg, stride_cm, stride_cn, stride_og, stride_om, stride_on, stride_ends,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SEARCH_STEPS: tl.constexpr, K_RANGES: tl.constexpr, SPLIT: tl.constexpr,
                   IEEE: tl.constexpr, HAS_C: tl.constexpr, GROUPED: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid axis 0: row_tiles x column tiles, in gemm.py's swizzled order (GROUP_M row tiles per
    band: a band's rows of a and columns of b are read while in L2). Batched: row tiles of m, axis
    2 the group. GROUPED: row tile t is tile i of group g, where tile_ends[g - 1] <= t <
    tile_ends[g] (found by a binary search of SEARCH_STEPS probes, 2**SEARCH_STEPS > G), its rows
    ends[g - 1] + i * BLOCK_M .. of a and out (b[g]); the grid's bound past the real tiles
    (tile_ends[-1]) leaves programs of no rows, which do no work (no early return: one code path
    for every Triton). K: K_RANGES ranges of BLOCK_K steps, all in this program, or (SPLIT:
    batched, one group) range program_id(1) only, summed across the programs by _split_k_sum
    (partials [K_RANGES, m, n], one arrival counter per tile)."""
    tile, col_tile = _swizzle(tl.program_id(0), row_tiles, tl.cdiv(n, BLOCK_N), GROUP_M)
    offs = tl.arange(0, BLOCK_M)
    if GROUPED:
        group = tile * 0  # (an int32 tensor: the number of groups whose tiles end at or before tile)
        for step in tl.static_range(SEARCH_STEPS):
            probe = group + (1 << (SEARCH_STEPS - 1 - step))
            ends_here = tl.load(tile_ends_ptr + tl.minimum(probe, groups) - 1)
            group = tl.where((probe <= groups) & (ends_here <= tile), probe, group)
        group = tl.minimum(group, groups - 1)  # (past the last tile: its group's rows run out below)
        first_tile = tl.load(tile_ends_ptr + tl.maximum(group - 1, 0), mask=group > 0, other=0)
        start, end = _group_rows(ends_ptr, group, m, stride_ends, True)
        rows = start + (tile - first_tile).to(tl.int64) * BLOCK_M + offs
        row_ok = rows < end
        group = group.to(tl.int64)
    else:
        group = tl.program_id(2).to(tl.int64)
        a_ptr += group * stride_ag
        c_ptr += group * stride_cg
        out_ptr += group * stride_og
        rows = tile.to(tl.int64) * BLOCK_M + offs
        row_ok = rows < m
    b_ptr += group * stride_bg
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
    steps = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, tl.cdiv(k, BLOCK_K), 0)  # none for a tile of no rows
    if K_RANGES == 1:  # one K loop, one accumulator (no running total beside it: fewer registers)
        acc = _k_steps(a_ptrs, b_ptrs, row_ok, col_ok, ks, k, 0, steps, stride_ak, stride_bk,
                       BLOCK_M, BLOCK_N, BLOCK_K, IEEE, INTERPRETED)
    else:
        # K in order within a range, from zero per range, ranges added in order: the same sum for
        # every row, split or not (_split_k_sum adds the split programs' ranges the same way)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first_range = tl.program_id(1) if SPLIT else 0
        for r in range(first_range, first_range + 1 if SPLIT else K_RANGES):
            acc += _k_steps(a_ptrs, b_ptrs, row_ok, col_ok, ks, k, r * steps // K_RANGES,
                            (r + 1) * steps // K_RANGES, stride_ak, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, IEEE,
                            INTERPRETED)
    mask = row_ok[:, None] & col_ok[None, :]
    last = True
    if SPLIT:
        acc, last = _split_k_sum(acc, partial_ptr, arrived_ptr, rows, cols, mask, m, n)
    if last:
        if HAS_C:  # added in fp32 before the one rounding
            c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :].to(tl.int64) * stride_cn
            acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :].to(tl.int64) * stride_on
        tl.store(out_ptrs, as_element_type(acc, out_ptrs), mask=mask)


_INTERPRETED = not isinstance(_matmul_kernel, JITFunction)



def matmul_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, c: torch.Tensor | None = None,
              ends: torch.Tensor | None = None) -> None:
    """out = c + a @ b.T per group (module docstring), any strides; operands checked by the caller
    (a and b of one dtype in DTYPES; out bf16, fp16 or fp32; c of out's shape or None, which may be
    out itself: each program reads its c tile before writing the same out tile). Batched: more
    than MAX_GRID_Z groups take several launches; row-grouped: any number of groups, one launch
    after the tile map's."""
    groups, n, k = b.shape
    m = a.shape[-2]
    if m == 0 or n == 0 or groups == 0:
        return
    if ends is not None:
        # Each group's last tile may be partial: at most one tile more per group with rows (a host
        # bound: the sum of cdiv(rows_g, BLOCK_M) over min(G, M) groups of M rows in all).
        row_tiles = (m + (BLOCK_M - 1) * min(groups, m)) // BLOCK_M
        tile_ends = torch.empty(groups, dtype=torch.int32, device=a.device)
        fast(_tile_map_kernel)[(1,)](ends, tile_ends, groups, m, ends.stride(0), BLOCK_M=BLOCK_M,
                                     BLOCK_G=min(MAX_TILE_MAP_BLOCK, next_power_of_2(groups)))
        _launch(a.unsqueeze(0), b, out.unsqueeze(0), None if c is None else c.unsqueeze(0), ends, tile_ends,
                row_tiles, (), m, n, k)
        return
    for first in range(0, groups, MAX_GRID_Z):
        part = slice(first, min(groups, first + MAX_GRID_Z))
        _launch(a[part], b[part], out[part], None if c is None else c[part], None, None, cdiv(m, BLOCK_M),
                (1, part.stop - first), m, n, k)


def _k_ranges(n: int, k: int, dtype: torch.dtype) -> int:
    """The K ranges of every call of this n, k and dtype, whatever m: the splits gemm.py's
    _split_count gives one row tile on INVARIANT_SMS (132) SMs, in BLOCK_K steps. One for fp32
    operands: the IEEE dot's looped ranges spill 28 bytes at 255 registers (ptxas sm_90a, Triton
    3.8, 2026-12-07; 16-bit ones 166 registers, no spill)."""
    if dtype == torch.float32:
        return 1
    return triton_gemm._split_count(1, n, cdiv(k, BLOCK_K[dtype]), BLOCK_M, BLOCK_N, triton_gemm.INVARIANT_SMS)


def _launch(a3, b, out3, c3, ends, tile_ends, row_tiles: int, grid_yz: tuple, m: int, n: int, k: int) -> None:
    grouped = ends is not None
    strides = [t.stride() if t is not None else (0, 0, 0) for t in (a3, out3, c3)]
    if grouped:  # (the group comes from the tile map: a, out and c are one matrix of all the rows)
        strides = [(0, *s[1:]) for s in strides]
    (a_strides, out_strides, c_strides) = strides
    programs = row_tiles * cdiv(n, BLOCK_N)
    if programs > MAX_GRID_X:
        raise ValueError(f"a, b: at most {MAX_GRID_X} tiles of {BLOCK_M} x {BLOCK_N} per launch (CUDA's grid "
                         f"dimension 0), got {row_tiles} x {cdiv(n, BLOCK_N)} for m = {m}, n = {n}")
    groups = b.shape[0]
    ranges = _k_ranges(n, k, a3.dtype)
    # Split where a plain matmul's tiles fill few SMs (decode; gemm.py's rule with this GPU's SMs);
    # the row-grouped and many-group forms loop over the ranges.
    split = (ranges > 1 and not grouped and groups == 1 and
             triton_gemm._split_count(m, n, cdiv(k, BLOCK_K[a3.dtype]), BLOCK_M, BLOCK_N,
                                      triton_gemm._sm_count(out3.device)) > 1)
    if split:
        grid_yz = (ranges, 1)
        partials = torch.empty(ranges * m * n, dtype=torch.float32, device=out3.device)
        arrived = triton_gemm._arrival_counters(out3.device, programs)
    else:
        partials = arrived = out3  # unread
    # (out3 stands in for c, ends and tile_ends where there are none: unread unless HAS_C / GROUPED)
    fast(_matmul_kernel)[(programs, *grid_yz)](
        a3, b, out3 if c3 is None else c3, out3, out3 if ends is None else ends,
        out3 if tile_ends is None else tile_ends, partials, arrived, m, n, k, groups, row_tiles,
        *a_strides, *b.stride(), *c_strides, *out_strides, 0 if ends is None else ends.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K[a3.dtype], GROUP_M=GROUP_M,
        SEARCH_STEPS=groups.bit_length() if grouped else 0, K_RANGES=ranges, SPLIT=split,
        IEEE=a3.dtype == torch.float32, HAS_C=c3 is not None, GROUPED=grouped, INTERPRETED=_INTERPRETED,
        num_warps=NUM_WARPS)
