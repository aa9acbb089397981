"""DeepSeek-V3.2's lightning indexer logits (DeepGEMM's `fp8_mqa_logits` and `fp8_paged_mqa_logits`).

The indexer scores every cached token t for every query token i with a few small heads (64 heads
of dimension 128 in V3.2) and keeps the top-k (2048) for sparse MLA (python_ref/mla_sparse.py):

    logits[i, t] = sum_h weights[i, h] * relu(<q[i, h], k[t]> * k_scale[t])

q is FP8 e4m3 (no scale: the caller folds it into `weights`), k is FP8 e4m3 with one fp32 scale
per token. Keys a query does not see get -inf (`clean_logits`).

Prefill (`fp8_mqa_logits`): q [M, H, D], k [N, D], k_scale [N], weights [M, H]; query i sees keys
[cu_seqlen_ks[i], cu_seqlen_ke[i]) (clamped to [0, N)); out [M, N], or with max_seqlen_k > 0 the
compressed form [M, max_seqlen_k] whose column c is key cu_seqlen_ks[i] + c.
Decode (`fp8_paged_mqa_logits`): q [B, next_n, H, D]; the paged cache kv_cache [num_pages,
page_size, 1, D + 4] bytes, each page laid out as DeepGEMM's: page_size * D e4m3 bytes (token
after token), then page_size fp32 scales; token t of sequence b is at page block_table[b, t //
page_size], position t % page_size. Row b * next_n + j sees keys [0, context_lens[b] - next_n + j
+ 1) (the last next_n cached tokens are the queries), or [0, context_lens[b, j]) when
context_lens is [B, next_n]; out [B * next_n, max_context_len].

The products are computed in float64 here (every e4m3 product is exact in fp32 too).
"""

from __future__ import annotations

import math

import torch

from python_ref.fp8 import FP8_MAX, ceil_to_power_of_two, quantize

FP8 = torch.float8_e4m3fn


def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims: tuple[int, ...], use_ue8m0: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's helper: one fp32 scale per index of the kept `dims`, over all other dims:
    scale = max(amax, 1e-4) / 448 (rounded up to a power of two with use_ue8m0), fp8 = x / scale.
    Returns (fp8 tensor shaped like x, scales [x.shape[d] for d in dims], indexed in the order of
    `dims`: with dims (1, 0), scale[j, i] is that of x[i, j]). Where nothing is reduced over (an
    empty dimension), the amax is 0, as for an all-zero slice. For the indexer's keys:
    per_custom_dims_cast_to_fp8(k [N, D], (0,)) -> (k_fp8 [N, D], k_scale [N])."""
    dims = tuple(d % x.dim() for d in dims)
    reduce = tuple(d for d in range(x.dim()) if d not in dims)
    amax = x.float().abs()
    if 0 in [x.shape[d] for d in reduce]:  # (torch's amax refuses an empty reduction; a list: Dynamo traces it)
        amax = amax.new_zeros([1 if d in reduce else size for d, size in enumerate(x.shape)])
    elif reduce:  # (none: one scale per element; amax over dim=() would reduce every dimension)
        amax = amax.amax(dim=reduce, keepdim=True)
    amax = amax.clamp(min=1e-4)
    scale = amax / torch.full_like(amax, FP8_MAX)
    if use_ue8m0:
        scale = ceil_to_power_of_two(scale)
    fp8 = quantize(x.float(), torch.ones_like(scale) / scale)
    kept = sorted(dims)  # scale's kept dimensions, in x's order
    scale = scale.reshape([x.shape[d] for d in kept]).permute([kept.index(d) for d in dims])
    return fp8, scale.contiguous()


def paged_k_cache_cast_to_fp8(k_cache: torch.Tensor) -> torch.Tensor:
    """k_cache [num_pages, page_size, 1, D] (any float) -> uint8 [num_pages, page_size, 1, D + 4] in
    DeepGEMM's paged layout (per page: the e4m3 rows, then the fp32 scales; one scale per token)."""
    num_pages, page_size, heads, dim = k_cache.shape
    if heads != 1:
        raise ValueError(f"k_cache: expected one kv head (dimension 2), got shape {tuple(k_cache.shape)}")
    fp8, scale = per_custom_dims_cast_to_fp8(k_cache.reshape(num_pages, page_size, dim), (0, 1))
    out = torch.empty(num_pages, page_size * (dim + 4), dtype=torch.uint8, device=k_cache.device)
    out[:, :page_size * dim] = fp8.reshape(num_pages, page_size * dim).view(torch.uint8)
    out[:, page_size * dim:] = scale.contiguous().view(torch.uint8).reshape(num_pages, page_size * 4)
    return out.reshape(num_pages, page_size, 1, dim + 4)


def paged_k_cache_dequantize(kv_cache: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse view: [num_pages, page_size, 1, dim + 4] bytes -> float64 keys [num_pages, page_size, dim]."""
    num_pages, page_size = kv_cache.shape[:2]
    raw = kv_cache.contiguous().view(torch.uint8).reshape(num_pages, page_size * (dim + 4))
    keys = raw[:, :page_size * dim].contiguous().view(FP8).reshape(num_pages, page_size, dim).double()
    scales = raw[:, page_size * dim:].contiguous().view(torch.float32).reshape(num_pages, page_size, 1).double()
    return keys * scales


def _logits(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q [M, H, D] (dequantized), keys [N, D] (dequantized), weights [M, H] -> float64 [M, N]."""
    scores = torch.einsum("mhd,nd->mhn", q.float().double(), keys.double()).clamp(min=0)
    return torch.einsum("mhn,mh->mn", scores, weights.double())


def fp8_mqa_logits(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, clean_logits: bool = True,
                   max_seqlen_k: int = 0) -> torch.Tensor:
    """See the module docstring. Returns float32 [M, N] or [M, max_seqlen_k]."""
    m, n = q.shape[0], k.shape[0]
    keys = k.float().double() * k_scale.double()[:, None]
    logits = _logits(q, keys, weights)                                          # [M, N]
    cols = torch.arange(n, device=q.device)
    seen = (cols[None, :] >= cu_seqlen_ks.long()[:, None]) & (cols[None, :] < cu_seqlen_ke.long()[:, None])
    logits = logits.masked_fill(~seen, -math.inf)
    if max_seqlen_k <= 0:
        return logits.float()
    # Compressed: column c of row i is key ks[i] + c (-inf outside the row's window or past N).
    key = cu_seqlen_ks.long()[:, None] + torch.arange(max_seqlen_k, device=q.device)[None, :]
    inside = (key >= 0) & (key < n)
    gathered = torch.gather(logits, 1, key.clamp(0, max(n - 1, 0))) if n else logits.new_empty(m, max_seqlen_k)
    return torch.where(inside, gathered, -math.inf).float()


def check_pages(num_pages: int, page_size: int, context_lens: torch.Tensor, block_table: torch.Tensor,
                max_context_len: int) -> list[int]:
    """Each sequence's key count that its rows read (at most max_context_len and the block
    table's span), after checking (a host read: free on CPU tensors) that every page those keys
    lie on is one of the cache's."""
    lens = [max(row) if isinstance(row, list) else row for row in context_lens.tolist()]  # [B] or [B, next_n]
    span = block_table.shape[1] * page_size
    widths = []
    for i, length in enumerate(lens):
        width = min(length, max_context_len, span)  # (1-D lengths: the last of the next_n rows sees them all)
        if width > 0:
            pages = block_table[i, : -(-width // page_size)]
            if int(pages.min()) < 0 or int(pages.max()) >= num_pages:
                raise ValueError(f"block_table: sequence {i} names pages outside the cache's {num_pages}: "
                                 f"{pages.tolist()}")
        widths.append(width)
    return widths


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor, max_context_len: int,
                         clean_logits: bool = True) -> torch.Tensor:
    """See the module docstring. Returns float32 [B * next_n, max_context_len]."""
    b, next_n, h, dim = q.shape
    num_pages, page_size = kv_cache.shape[:2]
    keys_all = paged_k_cache_dequantize(kv_cache, dim)                          # [pages, page_size, D]
    out = torch.full((b * next_n, max_context_len), -math.inf, dtype=torch.float64, device=q.device)
    widths = check_pages(num_pages, page_size, context_lens, block_table, max_context_len)
    lens = context_lens.long()
    for i, width in enumerate(widths):
        if width <= 0:
            continue
        if context_lens.dim() == 1:
            limits = lens[i] - next_n + 1 + torch.arange(next_n, device=q.device)   # row j sees [0, limit_j)
        else:
            limits = lens[i]
        pages = block_table[i, : -(-width // page_size)].long()
        keys = keys_all[pages].reshape(-1, dim)[:width]
        logits = _logits(q[i].double(), keys, weights[i * next_n:(i + 1) * next_n])  # [next_n, width]
        visible = torch.arange(width, device=q.device)[None, :] < limits[:, None]
        out[i * next_n:(i + 1) * next_n, :width] = logits.masked_fill(~visible, -math.inf)
    return out.float()
