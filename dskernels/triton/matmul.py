"""The batch-invariant float matmul (dskernels.batch_invariant): out[g] = c[g] + a[g] @ b[g].T for
bf16, fp16 or fp32 operands, summed in fp32 and rounded once to out's dtype.

A row's bits do not depend on how many rows come with it: one tile shape whatever m (no choice by
shape, no autotuning, no split-K), each output element summed over K in BLOCK_K steps in order
into one fp32 accumulator. torch's matmuls (cuBLAS on a GPU, MKL on CPU) pick their kernel, and so
their summation order, by shape: a token's row changes its last bits when the batch grows.

Two layouts:
- batched: a [G, m, k], b [G, n, k], out [G, m, n] (G = 1 for a plain matmul; einsum's batch);
- row-grouped (`ends`): a [M, k] and out [M, n] hold groups of consecutive rows, group g the rows
  ends[g - 1] .. ends[g] - 1 (ends int32 [G] on the device, never read on the host), times b[g]:
  the float MoE experts (rows sorted by expert). Rows past ends[-1] are not written.

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

from dskernels.triton import cdiv
from dskernels.triton.fp8_math import as_element_type
from dskernels.triton.launch import fast

# One tile for every m (the invariance): 64 x 64 fills a decode step's few rows without much waste
# and keeps the IEEE fp32 dot's registers in bounds. BLOCK_K: 64 16-bit values (128 bytes of a
# row) or 32 fp32 ones.
BLOCK_M, BLOCK_N = 64, 64
BLOCK_K = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 32}
NUM_WARPS = 4
DTYPES = tuple(BLOCK_K)
MAX_GRID_Z = 65535  # CUDA's limit on grid dimension 2: groups per launch


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, out_ptr, ends_ptr, m, n, k,
                   stride_ag, stride_am, stride_ak, stride_bg, stride_bn, stride_bk,
                   stride_cg, stride_cm, stride_cn, stride_og, stride_om, stride_on, stride_ends,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr, HAS_C: tl.constexpr, GROUPED: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (row tiles, column tiles, G). GROUPED: program (i, j, g) takes rows
    ends[g - 1] + i * BLOCK_M .. of a and out (b[g]); a tile past the group's rows does no work."""
    group = tl.program_id(2).to(tl.int64)
    offs = tl.arange(0, BLOCK_M)
    if GROUPED:
        start = tl.load(ends_ptr + tl.maximum(group - 1, 0) * stride_ends).to(tl.int64)
        start = tl.where(group > 0, start, 0)
        end = tl.load(ends_ptr + group * stride_ends).to(tl.int64)
        rows = start + tl.program_id(0) * BLOCK_M + offs
        row_ok = rows < end
    else:
        a_ptr += group * stride_ag
        c_ptr += group * stride_cg
        out_ptr += group * stride_og
        rows = tl.program_id(0) * BLOCK_M + offs
        row_ok = rows < m
    b_ptr += group * stride_bg
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
    k_here = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, k, 0)  # no K loop for a tile of no rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_here, BLOCK_K):  # K in order, one accumulator: the same sum for every row
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks[None, :] < k - k0), other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :] & (ks[:, None] < k - k0), other=0.0)
        if INTERPRETED:  # (its tl.dot is numpy's matmul, whose BLAS sums a row by its place in the tile)
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_C:  # added in fp32 before the one rounding
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :].to(tl.int64) * stride_cn
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :].to(tl.int64) * stride_on
    tl.store(out_ptrs, as_element_type(acc, out_ptrs), mask=mask)


_INTERPRETED = not isinstance(_matmul_kernel, JITFunction)



def matmul_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, c: torch.Tensor | None = None,
              ends: torch.Tensor | None = None) -> None:
    """out = c + a @ b.T per group (module docstring), any strides; operands checked by the caller
    (a and b of one dtype in DTYPES; out bf16, fp16 or fp32; c of out's shape or None, which may be
    out itself: each program reads its c tile before writing the same out tile). Batched: more
    than MAX_GRID_Z groups take several launches; row-grouped: at most MAX_GRID_Z groups."""
    groups, n, k = b.shape
    m = a.shape[-2]
    if m == 0 or n == 0 or groups == 0:
        return
    if ends is not None:
        if groups > MAX_GRID_Z:
            raise ValueError(f"b: at most {MAX_GRID_Z} groups of rows (a grid dimension), got {groups}")
        _launch(a.unsqueeze(0), b, out.unsqueeze(0), None if c is None else c.unsqueeze(0), ends, groups, m, n, k)
        return
    for first in range(0, groups, MAX_GRID_Z):
        part = slice(first, min(groups, first + MAX_GRID_Z))
        _launch(a[part], b[part], out[part], None if c is None else c[part], None, part.stop - first, m, n, k)


def _launch(a3, b, out3, c3, ends, groups: int, m: int, n: int, k: int) -> None:
    grouped = ends is not None
    strides = [t.stride() if t is not None else (0, 0, 0) for t in (a3, out3, c3)]
    if grouped:  # (the group comes from the grid: a, out and c are one matrix of all the rows)
        strides = [(0, *s[1:]) for s in strides]
    (a_strides, out_strides, c_strides) = strides
    grid = (cdiv(m, BLOCK_M), cdiv(n, BLOCK_N), groups)
    # (out3 stands in for c and ends where there are none: unread unless HAS_C / GROUPED)
    fast(_matmul_kernel)[grid](a3, b, out3 if c3 is None else c3, out3, out3 if ends is None else ends, m, n, k,
                               *a_strides, *b.stride(), *c_strides, *out_strides,
                               0 if ends is None else ends.stride(0),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K[a3.dtype],
                               IEEE=a3.dtype == torch.float32, HAS_C=c3 is not None,
                               GROUPED=grouped, INTERPRETED=_INTERPRETED, num_warps=NUM_WARPS)
