"""DeepSeek-V3's rotary embedding of the query and key rope parts in one kernel (the model layer's
`rope_qk`): the angles from the positions, their cos and sin, and both rotations. In torch ops
(dskernels/models/rope.py, the definition) that is ~22 small kernels per layer call, most of a
decode step's elementwise launches.

Bit for bit the torch ops' arithmetic: angle = float(position) * inv_freq in fp32, cos and sin
(libdevice) times attention_factor rounded to the data's dtype, then each product rounded to that
dtype and the difference (sum) rounded again, as torch's elementwise ops on bf16/fp16 round every
result; fp32 data without contracting a * b - c * d into an FMA (enable_fp_fusion=False)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dskernels.triton import TL_DTYPES, next_power_of_2
from dskernels.triton.fp8_math import rounded_to


@triton.jit
def _rotate(x_ptr, out_ptr, stride_xh, stride_oh, heads, cos, sin, INTERLEAVE: tl.constexpr,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, DTYPE: tl.constexpr,
            ROUND_BF16: tl.constexpr):
    """One token's [heads, 2 * HALF] rope values (unit stride along the last dimension) rotated
    into out: pairs (2i, 2i + 1) with INTERLEAVE, else (i, i + HALF); out is [evens', odds'] either
    way (models/rope.py's apply_rope)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (h < heads) & (j < HALF)
    first = 2 * j if INTERLEAVE else j
    second = 2 * j + 1 if INTERLEAVE else j + HALF
    x1 = tl.load(x_ptr + h * stride_xh + first, mask=ok, other=0.0)
    x2 = tl.load(x_ptr + h * stride_xh + second, mask=ok, other=0.0)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # every product and sum rounded to the data's dtype, as torch's bf16/fp16 ops round each result
    a = rounded_to(x1 * cos, DTYPE, ROUND_BF16) - rounded_to(x2 * sin, DTYPE, ROUND_BF16)
    b = rounded_to(x2 * cos, DTYPE, ROUND_BF16) + rounded_to(x1 * sin, DTYPE, ROUND_BF16)
    tl.store(out_ptr + h * stride_oh + j, rounded_to(a, DTYPE, ROUND_BF16).to(DTYPE), mask=ok)
    tl.store(out_ptr + h * stride_oh + HALF + j, rounded_to(b, DTYPE, ROUND_BF16).to(DTYPE), mask=ok)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, inv_freq_ptr, attention_factor, heads,
                    stride_qt, stride_qh, stride_kt, stride_qot, stride_qoh, stride_kot,
                    INTERLEAVE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Program t: token t's query heads [heads, 2 * HALF] and its one key [2 * HALF]."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    angle = tl.load(positions_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    cos = rounded_to(tl.cos(angle) * attention_factor, DTYPE, ROUND_BF16)
    sin = rounded_to(tl.sin(angle) * attention_factor, DTYPE, ROUND_BF16)
    _rotate(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, heads, cos, sin,
            INTERLEAVE, HALF, BLOCK_H, BLOCK_HALF, DTYPE, ROUND_BF16)
    _rotate(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, 0, 0, 1, cos, sin, INTERLEAVE, HALF, 1, BLOCK_HALF,
            DTYPE, ROUND_BF16)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            attention_factor: float, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, dim], k [T, dim] (unit stride along dim, any other strides), positions int64 [T],
    inv_freq fp32 [dim / 2] -> rotated (q [T, heads, dim], k [T, dim]), new contiguous tensors."""
    tokens, heads, dim = q.shape
    q_out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(tokens, dim, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    assert q.stride(2) == 1 and k.stride(1) == 1 and positions.stride(0) == 1 and inv_freq.is_contiguous()
    half = dim // 2
    _rope_qk_kernel[(tokens,)](q, k, q_out, k_out, positions, inv_freq, float(attention_factor), heads,
                               q.stride(0), q.stride(1), k.stride(0), q_out.stride(0), q_out.stride(1), k_out.stride(0),
                               INTERLEAVE=interleave, HALF=half, BLOCK_H=next_power_of_2(heads),
                               BLOCK_HALF=next_power_of_2(half), DTYPE=TL_DTYPES[q.dtype],
                               ROUND_BF16=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
                               num_warps=4, enable_fp_fusion=False)
    return q_out, k_out
