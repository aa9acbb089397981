"""Rotary embedding of DeepSeek-V3: YaRN frequencies, HF's interleaved-pair layout.

inv_freq and the cos/sin scaling follow transformers' `_compute_yarn_parameters` (the same math as
DeepSeek's `precompute_freqs_cis`), so positions far past original_max_position_embeddings give the
same angles bit for bit: angle = float(position) * inv_freq in fp32.
"""

from __future__ import annotations

import math

import torch

from dskernels.models.linear import triton_fusable



def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(params: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """-> (inv_freq fp32 [dim / 2], attention_factor that multiplies cos and sin)."""
    base = params["rope_theta"]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if params.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    if params["rope_type"] != "yarn":
        raise ValueError(f"rope_parameters: rope_type {params['rope_type']!r} is not supported (default, yarn)")
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_mscale(factor, mscale) / _mscale(factor, mscale_all_dim))
        else:
            attention_factor = _mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int64 [...] -> cos, sin [..., dim / 2] in dtype (one angle per rotated pair)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, S, (heads,) dim], cos/sin [B, S, dim / 2] -> rotated x [.., dim].

    interleave=True (the V3 checkpoints): pairs (x0, x1), (x2, x3), ... rotate together and come out
    de-interleaved as [evens, odds] (what HF's apply_rotary_pos_emb_interleave returns: q and k get
    the same permutation, so the cached keys are exactly HF's). interleave=False: rotate_half pairs
    (x_i, x_{i + dim/2})."""
    if x.dim() == cos.dim() + 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            attention_factor: float, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, S, heads, dim] and k [B, S, dim] (the attention's rope parts, any strides with a unit
    last one) rotated at positions int64 [B, S]: apply_rope of each with rope_cos_sin's angles. One
    Triton kernel (dskernels/triton/layer.py, the same bits) where it runs: CUDA tensors, or CPU
    under the interpreter with the triton backend forced (models.linear.triton_fusable); torch's ops
    (~22 kernels) otherwise."""
    if not triton_fusable(q, k):
        cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, q.dtype)
        return apply_rope(q, cos, sin, interleave), apply_rope(k, cos, sin, interleave)
    from dskernels.triton import layer as triton_layer

    b, s, heads, dim = q.shape
    q_out, k_out = triton_layer.rope_qk(q.reshape(b * s, heads, dim), k.reshape(b * s, dim),
                                       positions.reshape(-1).contiguous(), inv_freq.contiguous(), attention_factor,
                                       interleave)
    return q_out.view(b, s, heads, dim), k_out.view(b, s, dim)
