"""FP8 e4m3 casts with DeepGEMM's fine-grained scales.

For each group (1x128 for activations, 128x128 for weights):
    amax  = max(max |x|, 1e-4)
    q     = fp8_e4m3(x * (448 / amax))    round to nearest even
    scale = amax / 448                    so x ~= q.float() * scale
Both divisions are correctly rounded fp32 divisions of two tensors, on every device (PyTorch's
`448.0 / tensor` is a reciprocal then a product, and on CUDA `tensor / 448.0` is a product by
1/448), so every backend, this oracle on a GPU included, can reproduce the bits exactly.
"""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
GROUP_SIZE = 128
AMAX_FLOOR = 1e-4


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded on every device: PyTorch's CUDA division by a Python scalar
    multiplies by its reciprocal instead (a different last bit for about half the values)."""
    return amax / torch.full_like(amax, FP8_MAX)


def _quantize(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x fp32, amax broadcastable to x and already floored."""
    multiplier = torch.full_like(amax, FP8_MAX) / amax
    q = x * multiplier
    # inf * 0 (a group holding +-inf) gives the CPU's default NaN, which is negative on x86: one
    # NaN byte (0x7F) on every device and backend instead.
    return torch.where(q.isnan(), torch.nan, q).to(torch.float8_e4m3fn)


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] (k % 128 == 0) -> (fp8 [m, k], fp32 scales [m, k / 128])."""
    m, k = x.shape
    groups = x.float().contiguous().reshape(m, k // GROUP_SIZE, GROUP_SIZE)  # row-major out, as the fake kernel says
    amax = groups.abs().amax(dim=2, keepdim=True).clamp(min=AMAX_FLOOR)
    return _quantize(groups, amax).reshape(m, k), _scale(amax).reshape(m, k // GROUP_SIZE)


def per_block_cast_to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, k] (k % 128 == 0) -> (fp8 [n, k], fp32 scales [ceil(n / 128), k / 128]).

    The last block of rows may be partial: its amax is taken over the rows that exist.
    """
    n, k = w.shape
    n_blocks = -(-n // GROUP_SIZE)
    padded = w.new_zeros(n_blocks * GROUP_SIZE, k, dtype=torch.float32)
    padded[:n] = w.float()
    blocks = padded.reshape(n_blocks, GROUP_SIZE, k // GROUP_SIZE, GROUP_SIZE)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=AMAX_FLOOR)
    q = _quantize(blocks, amax).reshape(n_blocks * GROUP_SIZE, k)[:n]
    return q.contiguous(), _scale(amax).reshape(n_blocks, k // GROUP_SIZE)
