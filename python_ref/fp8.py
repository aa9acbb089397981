"""FP8 e4m3 casts with DeepGEMM's fine-grained scales.

For each group (1x128 for activations, 128x128 for weights):
    amax  = max(max |x|, 1e-4)
    q     = fp8_e4m3(x * (448 / amax))    round to nearest even
    scale = amax / 448                    so x ~= q.float() * scale
Both divisions are correctly rounded fp32 divisions of two tensors, on every device (PyTorch's
`448.0 / tensor` is a reciprocal then a product, and on CUDA `tensor / 448.0` is a product by
1/448), so every backend, this oracle on a GPU included, can reproduce the bits exactly.

round_scale=True (DeepSeek-V3.1's "scale_fmt": "ue8m0", DeepEP's round_scale) rounds each scale
up to a power of two, so it is exactly representable as an 8-bit exponent (UE8M0):
    scale = 2^ceil(log2(amax / 448))      (amax / 448 correctly rounded first, as above)
    q     = fp8_e4m3(x * (1 / scale))     1 / scale and the product are exact; |q| <= 448
"""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
GROUP_SIZE = 128
AMAX_FLOOR = 1e-4


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded on every device: PyTorch's CUDA division by a Python scalar
    multiplies by its reciprocal instead (a different last bit for about half the values)."""
    return amax / torch.full_like(amax, FP8_MAX)


def ceil_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale, for non-negative fp32 scales (NaN and inf kept): in the
    bits, a nonzero mantissa carries into the exponent and is then dropped. Subnormals (below
    2^-126; no cast scale is) are powers of two in their mantissa: the next one up, by bit smearing."""
    bits = scale.view(torch.int32)
    rounded = (bits + 0x7FFFFF) & 0x7F800000
    smear = (bits & 0x7FFFFF) - 1  # (0 -> -1 -> 0 below: zero stays zero)
    for shift in (1, 2, 4, 8, 16):
        smear = smear | (smear >> shift)
    rounded = torch.where((bits & 0x7F800000) == 0, smear + 1, rounded).view(torch.float32)
    return torch.where(scale.isnan(), scale, rounded)


def _scales(amax: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the multiplier x is scaled by before rounding to fp8, the scale returned) for a floored amax."""
    if round_scale:
        scale = ceil_to_power_of_two(_scale(amax))
        return torch.ones_like(scale) / scale, scale  # exact: a power of two
    return torch.full_like(amax, FP8_MAX) / amax, _scale(amax)


def quantize(x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """x fp32, multiplier broadcastable to x."""
    q = x * multiplier
    # inf * 0 (a group holding +-inf) gives the CPU's default NaN, which is negative on x86: one
    # NaN byte (0x7F) on every device and backend instead.
    return torch.where(q.isnan(), torch.nan, q).to(torch.float8_e4m3fn)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] (k % 128 == 0) -> (fp8 [m, k], fp32 scales [m, k / 128])."""
    m, k = x.shape
    groups = x.float().contiguous().reshape(m, k // GROUP_SIZE, GROUP_SIZE)  # row-major out, as the fake kernel says
    amax = groups.abs().amax(dim=2, keepdim=True).clamp(min=AMAX_FLOOR)
    multiplier, scale = _scales(amax, round_scale)
    return quantize(groups, multiplier).reshape(m, k), scale.reshape(m, k // GROUP_SIZE)


def per_block_cast_to_fp8(w: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, k] (k % 128 == 0) -> (fp8 [n, k], fp32 scales [ceil(n / 128), k / 128]).

    The last block of rows may be partial: its amax is taken over the rows that exist.
    """
    n, k = w.shape
    n_blocks = -(-n // GROUP_SIZE)
    padded = w.new_zeros(n_blocks * GROUP_SIZE, k, dtype=torch.float32)
    padded[:n] = w.float()
    blocks = padded.reshape(n_blocks, GROUP_SIZE, k // GROUP_SIZE, GROUP_SIZE)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=AMAX_FLOOR)
    multiplier, scale = _scales(amax, round_scale)
    q = quantize(blocks, multiplier).reshape(n_blocks * GROUP_SIZE, k)[:n]
    return q.contiguous(), scale.reshape(n_blocks, k // GROUP_SIZE)


def per_channel_cast_to_fp8(x: torch.Tensor, ks=None, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, h] -> (fp8 [tokens, h], fp32 scales [sum(ceil(k_g / 128)), h]): one scale per
    column per 128 tokens, the tokens split into groups of ks (None: one group of all of them),
    each group's first token starting a new 128-token block. A group's last block may be partial:
    its amax is taken over the tokens that exist."""
    tokens, h = x.shape
    ks = [tokens] if ks is None else [int(k) for k in ks]
    values, scales, first = [], [], 0
    for k in ks:
        blocks = -(-k // GROUP_SIZE)
        padded = x.new_zeros(blocks * GROUP_SIZE, h, dtype=torch.float32)
        padded[:k] = x[first:first + k].float()
        grouped = padded.reshape(blocks, GROUP_SIZE, h)
        amax = grouped.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_FLOOR)
        multiplier, scale = _scales(amax, round_scale)
        values.append(quantize(grouped, multiplier).reshape(blocks * GROUP_SIZE, h)[:k])
        scales.append(scale.reshape(blocks, h))
        first += k
    empty = x.new_empty(0, h, dtype=torch.float32)
    return (torch.cat([empty.to(torch.float8_e4m3fn), *values]).contiguous(), torch.cat([empty, *scales]))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: x [..., 2I] holds [gate | up]; silu(gate) * up computed in fp32 and
    rounded once to x's dtype -> [..., I]."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def silu_and_mul_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A SwiGLU expert's activation cast for its down projection: x [..., 2I] holds [gate | up]
    (I % 128 == 0); act = silu(gate) * up in fp32, then per_token_cast_to_fp8(act) ->
    (fp8 [..., I], fp32 scales [..., I / 128])."""
    gate, up = x.float().chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    q, s = per_token_cast_to_fp8(act.reshape(act.shape[:-1].numel(), act.shape[-1]), round_scale)
    return q.reshape(act.shape), s.reshape(*act.shape[:-1], act.shape[-1] // GROUP_SIZE)
