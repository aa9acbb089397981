"""The model layer's RMSNorm in one kernel (models.linear.RMSNorm): HF's DeepseekV3RMSNorm, i.e.
weight * (x * rsqrt(mean(x^2) + eps)) with the normalization in fp32, rounded to x's dtype, then
the product with the weight rounded again. In torch ops that is four kernels (the fp32 copy,
F.rms_norm, the cast back, the multiply); four norms per decode step.

The sum of squares is a tree reduction (torch's order differs: fp32 rounding apart, the same
value); the two roundings to the data's dtype are torch's."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dskernels.triton import TL_DTYPES, next_power_of_2
from dskernels.triton.fp8_math import rounded_to

@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, dim, stride_x, stride_out, eps,
                     BLOCK: tl.constexpr, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = rounded_to(x * inv_rms, DTYPE, ROUND_BF16)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, rounded_to(weight * normed, DTYPE, ROUND_BF16).to(DTYPE), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] (unit last stride, rows at any one stride), weight [dim] of x's dtype ->
    a new contiguous tensor of x's shape and dtype."""
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)  # a view for the attention's strided latents too
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or dim == 0:
        return out.view(x.shape)
    assert rows.stride(1) == 1 and weight.is_contiguous()
    block = next_power_of_2(dim)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, dim, rows.stride(0), out.stride(0), float(eps),
                                       BLOCK=block, DTYPE=TL_DTYPES[x.dtype],
                                       ROUND_BF16=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
                                       num_warps=8 if block >= 4096 else 4)
    return out.view(x.shape)
