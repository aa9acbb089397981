"""Sparse MLA (DeepSeek-V3.2's DeepSeek Sparse Attention, FlashMLA's sparse kernels), for clarity.

Every query token attends to its own list of top-k cached tokens (chosen by V3.2's indexer),
named by their index in the flat cache, instead of to a whole sequence. For query row r, query
head h (kv head g = h // (h_q // h_kv)) and list position k < topk:

    valid_k   = 0 <= indices[r, g, k] < num_slots and k < topk_length[r] (if given)
    score_k   = sm_scale * <q[r, h], kv[indices[r, g, k], g]>     for valid k (a repeated index
                                                                   counts as often as it is listed)
    lse       = log(sum_k exp(score_k))          natural log; +inf if no k is valid (a NaN or +inf
                                                 score, from NaN or inf in q or in a listed row,
                                                 gives NaN)
    max_logit = max_k score_k                    -inf if no k is valid; NaN as lse
    out       = sum_k exp(score_k - lse) * kv[indices[r, g, k], g, :d_v]    0 if no k is valid
    attn_sink (fp32 [h_q], optional): out *= 1 / (1 + exp(attn_sink[h] - lse)), i.e. one more
              logit that takes probability but adds no value; lse and max_logit ignore it.

Decode (`flash_mla_sparse_decode`): q [b, s_q, h_q, d], the paged cache k_cache [num_pages,
page_size, h_kv, d] read as num_pages * page_size slots (slot = page * page_size + offset in
the page: the caller has already gone through its block table), indices [b, s_q, topk] shared
by the kv heads, topk_length [b]. Returns out [b, s_q, h_q, d_v] and lse [b, h_q, s_q].
Prefill (`flash_mla_sparse_fwd`): q [s_q, h_q, d], kv [s_kv, h_kv, d], indices [s_q, h_kv, topk],
topk_length [s_q]. Returns out [s_q, h_q, d_v], max_logits and lse [s_q, h_q].

The FP8 cache of DeepSeek-V3.2 (`is_fp8_kvcache`; d = 576, one kv head): 656 bytes per token,
    bytes [0, 512)    the latent ("nope") part, 512 float8_e4m3fn values
    bytes [512, 528)  4 float32 scales, one per 128 latent values: value = fp8 * scale
    bytes [528, 656)  the rope part, 64 bfloat16 values (not quantized)
`quantize_sparse_kv_cache` writes it with power-of-two scales (UE8M0, FlashMLA's rule: the
smallest power of two >= max(amax / 448, 1e-4)); any float32 scales are read.
Everything is computed in fp32 on the exactly dequantized cache; out is then rounded to q's dtype.
"""

from __future__ import annotations

import math

import torch

from python_ref.fp8 import FP8_MAX, ceil_to_power_of_two, quantize

FP8_NOPE_DIM = 512      # quantized latent values per token
FP8_ROPE_DIM = 64       # bf16 rope values per token
FP8_TILE = 128          # latent values per scale
FP8_NUM_TILES = FP8_NOPE_DIM // FP8_TILE
FP8_SCALE_OFFSET = FP8_NOPE_DIM                                 # bytes
FP8_ROPE_OFFSET = FP8_SCALE_OFFSET + 4 * FP8_NUM_TILES          # 528
FP8_TOKEN_BYTES = FP8_ROPE_OFFSET + 2 * FP8_ROPE_DIM            # 656
FP8_HEAD_DIM = FP8_NOPE_DIM + FP8_ROPE_DIM                      # 576
SCALE_FLOOR = 1e-4


def quantize_sparse_kv_cache(kv: torch.Tensor) -> torch.Tensor:
    """kv [..., 576] (any float dtype) -> [..., 656] float8_e4m3fn bytes in V3.2's layout."""
    if not isinstance(kv, torch.Tensor) or not kv.is_floating_point():
        raise TypeError(f"kv: expected a floating-point tensor, got {getattr(kv, 'dtype', type(kv).__name__)}")
    if kv.dim() == 0 or kv.shape[-1] != FP8_HEAD_DIM:
        raise ValueError(f"kv: expected last dimension {FP8_HEAD_DIM} (512 latent + 64 rope), got {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    x = kv.float().reshape(-1, FP8_HEAD_DIM)
    tiles = x[:, :FP8_NOPE_DIM].reshape(-1, FP8_NUM_TILES, FP8_TILE)
    amax = tiles.abs().amax(dim=2)
    scale = ceil_to_power_of_two(torch.clamp(amax / torch.full_like(amax, FP8_MAX), min=SCALE_FLOOR))
    nope = quantize(tiles, (torch.ones_like(scale) / scale)[..., None])   # exact multiplier
    out = torch.empty(x.shape[0], FP8_TOKEN_BYTES, dtype=torch.uint8, device=kv.device)
    out[:, :FP8_SCALE_OFFSET] = nope.reshape(-1, FP8_NOPE_DIM).view(torch.uint8)
    out[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET] = scale.contiguous().view(torch.uint8)
    out[:, FP8_ROPE_OFFSET:] = x[:, FP8_NOPE_DIM:].to(torch.bfloat16).view(torch.uint8)
    return out.view(torch.float8_e4m3fn).reshape(*lead, FP8_TOKEN_BYTES)


def dequantize_sparse_kv_cache(cache: torch.Tensor) -> torch.Tensor:
    """[..., 656] bytes of V3.2's layout (float8_e4m3fn, uint8 or int8) -> float32 [..., 576], exactly."""
    if cache.dim() == 0 or cache.shape[-1] != FP8_TOKEN_BYTES:
        raise ValueError(f"cache: expected last dimension {FP8_TOKEN_BYTES} (V3.2's FP8 layout), "
                         f"got {tuple(cache.shape)}")
    lead = cache.shape[:-1]
    raw = cache.contiguous().view(torch.uint8).reshape(-1, FP8_TOKEN_BYTES)
    nope = raw[:, :FP8_SCALE_OFFSET].contiguous().view(torch.float8_e4m3fn).float()
    scale = raw[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].contiguous().view(torch.float32)
    rope = raw[:, FP8_ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    nope = (nope.reshape(-1, FP8_NUM_TILES, FP8_TILE) * scale[..., None]).reshape(-1, FP8_NOPE_DIM)
    return torch.cat([nope, rope], dim=1).reshape(*lead, FP8_HEAD_DIM)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                     topk_length: torch.Tensor | None = None, attn_sink: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The math of the module docstring on flat tensors: q [R, h_q, d], kv [S, h_kv, d] (float),
    indices [R, h_kv, topk], topk_length [R] -> fp32 (out [R, h_q, d_v], max_logits [R, h_q],
    lse [R, h_q])."""
    rows, h_q, d = q.shape
    num_slots, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    group = h_q // h_kv
    idx = indices.long()
    valid = (idx >= 0) & (idx < num_slots)                                   # [R, h_kv, topk]
    if topk_length is not None:
        valid &= torch.arange(topk, device=q.device) < topk_length.long()[:, None, None]
    safe = torch.where(valid, idx, 0)
    # gathered[r, g, k] = kv[indices[r, g, k], g]; an invalid entry is zeroed (its slot may be NaN).
    table = kv.float() if num_slots else kv.new_zeros(1, h_kv, d, dtype=torch.float32)
    gathered = table[safe, torch.arange(h_kv, device=q.device)[None, :, None]]       # [R, h_kv, topk, d]
    gathered = torch.where(valid[..., None], gathered, 0.0)
    queries = q.float().reshape(rows, h_kv, group, d)
    scores = torch.einsum("rgjd,rgkd->rgjk", queries, gathered) * sm_scale   # [R, h_kv, group, topk]
    scores = scores.masked_fill(~valid[:, :, None, :], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                    # -inf where nothing is valid
    max_logits = scores.amax(dim=-1) if topk else torch.full_like(lse, -math.inf)
    # A +inf score (an infinity in q or a listed row) has no finite softmax: NaN, as for a NaN score.
    lse = lse.masked_fill(lse == math.inf, math.nan)
    max_logits = max_logits.masked_fill(max_logits == math.inf, math.nan)
    seen = lse != -math.inf  # a NaN score stays NaN (in out and lse), not "nothing valid"
    probs = torch.exp(scores - torch.where(seen, lse, 0.0)[..., None])
    out = torch.einsum("rgjk,rgkd->rgjd", probs, gathered[..., :d_v])
    out = torch.where(seen[..., None], out, 0.0).reshape(rows, h_q, d_v)
    lse = lse.reshape(rows, h_q)
    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)); sink = +inf gives 0, -inf gives 1.
        keep = torch.sigmoid(lse - attn_sink.float()[None, :])
        out = out * torch.where(lse != -math.inf, keep, 0.0)[..., None]
    return out, max_logits.reshape(rows, h_q), torch.where(lse == -math.inf, math.inf, lse)


def flash_mla_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor, head_dim_v: int,
                            softmax_scale: float | None = None, is_fp8_kvcache: bool = False,
                            topk_length: torch.Tensor | None = None, attn_sink: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, d], k_cache [num_pages, page_size, h_kv, d or 656], indices [b, s_q, topk]
    -> (out [b, s_q, h_q, head_dim_v] in q's dtype, lse fp32 [b, h_q, s_q])."""
    b, s_q, h_q, d = q.shape
    num_pages, page_size, h_kv = k_cache.shape[:3]
    kv = dequantize_sparse_kv_cache(k_cache) if is_fp8_kvcache else k_cache.float()
    kv = kv.reshape(num_pages * page_size, h_kv, d)
    flat_idx = indices.reshape(b * s_q, 1, indices.shape[2]).expand(-1, h_kv, -1)
    lengths = None if topk_length is None else topk_length.repeat_interleave(s_q)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out, _, lse = sparse_attention(q.reshape(b * s_q, h_q, d), kv, flat_idx, scale, head_dim_v, lengths, attn_sink)
    return out.reshape(b, s_q, h_q, head_dim_v).to(q.dtype), lse.reshape(b, s_q, h_q).transpose(1, 2).contiguous()


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                         attn_sink: torch.Tensor | None = None, topk_length: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [s_q, h_q, d], kv [s_kv, h_kv, d], indices [s_q, h_kv, topk] -> (out [s_q, h_q, d_v] in
    q's dtype, max_logits fp32 [s_q, h_q], lse fp32 [s_q, h_q])."""
    out, max_logits, lse = sparse_attention(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
    return out.to(q.dtype), max_logits, lse
