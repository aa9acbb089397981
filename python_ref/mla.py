"""MLA decode over a paged KV cache (FlashMLA's `flash_mla_with_kvcache`), written for clarity.

For sequence i, query token j (0 <= j < s_q) and query head h (kv head g = h // (h_q // h_kv)):

    K_i       = the first cache_seqlens[i] tokens of sequence i, gathered page by page through
                block_table[i] (token t lives at k_cache[block_table[i, t // page], t % page])
    V_i       = K_i[..., :head_dim_v]                   (MLA: V is the latent part of K)
    visible   = keys [0, n_i)                           causal=False
                keys [0, n_i - s_q + j + 1)             causal=True (queries are the last s_q tokens)
    score_t   = softmax_scale * <q[i, j, h], K_i[t, g]>  for visible t
    lse       = log(sum_t exp(score_t))                 natural log
    out       = sum_t exp(score_t - lse) * V_i[t, g]
    no visible key: out = 0, lse = +inf
    a NaN or +inf score: out and lse NaN (never "no visible key")

An fp8 cache is dequantized first: k = k_cache.float() * k_scale. Everything is computed in fp32;
`out` is then rounded to q's dtype.
"""

from __future__ import annotations

import math

import torch


def gather_sequence(k_cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, h_kv, d], in the cache's dtype."""
    page_size = k_cache.shape[1]
    num_pages = -(-length // page_size)
    pages = block_table_row[:num_pages].long()
    return k_cache[pages].reshape(num_pages * page_size, *k_cache.shape[2:])[:length]


def check_pages(k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> list[int]:
    """The lengths as Python ints, after checking (reads the values: a host sync on a GPU) that each
    fits its block-table row and that every page it uses is one of the cache's."""
    lengths = cache_seqlens.tolist()
    capacity = block_table.shape[1] * k_cache.shape[1]
    for i, n in enumerate(lengths):
        if n < 0 or n > capacity:
            raise ValueError(f"cache_seqlens: expected values in [0, {capacity}] (block_table has "
                             f"{block_table.shape[1]} pages of {k_cache.shape[1]}), got {n} for sequence {i}")
        pages = block_table[i, : -(-n // k_cache.shape[1])]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_table: sequence {i} (length {n}) names pages outside the cache's "
                             f"{k_cache.shape[0]}: {pages.tolist()}")
    return lengths


def check_plan(tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor, lengths: list[int]) -> None:
    """Checks (reading the values: a host sync on a GPU) that get_mla_metadata's split plan covers
    the keys of these lengths as the kernels walk it: per sequence, pieces numbered 0, 1, .. (as
    num_splits counts them) that tile [0, length). A plan made for other lengths (lengths that moved
    on without a new get_mla_metadata) drops or repeats keys, which the kernels cannot see."""
    splits = num_splits.tolist()
    pieces = [[] for _ in lengths]
    for begin_idx, begin_tok, end_idx, end_tok, begin_split, *_ in tile_scheduler_metadata.tolist():
        for i in range(max(begin_idx, 0), min(end_idx, len(lengths) - 1) + 1):
            lo = begin_tok if i == begin_idx else 0
            hi = end_tok if i == end_idx else lengths[i]
            if lo < hi:
                pieces[i].append((begin_split if i == begin_idx else 0, lo, hi))
    for i, n in enumerate(lengths):
        got = sorted(pieces[i])
        ends = [0] + [hi for _, _, hi in got]
        if ([s for s, _, _ in got] != list(range(splits[i + 1] - splits[i]) if n else [])
                or [lo for _, lo, _ in got] != ends[:-1] or ends[-1] != n):
            raise ValueError(f"tile_scheduler_metadata: the split plan does not cover the {n} keys of sequence {i} "
                             f"(its pieces: {[(lo, hi) for _, lo, hi in got]}): it was made for other "
                             "cache_seqlens; call get_mla_metadata again whenever they change")


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float | None = None,
                           causal: bool = False, k_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, d], k_cache [num_pages, page_size, h_kv, d] -> (out [b, s_q, h_q, dv] in q's
    dtype, lse fp32 [b, h_q, s_q]). See the module docstring for the math."""
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    lengths = check_pages(k_cache, block_table, cache_seqlens)
    for i, n in enumerate(lengths):
        keys = gather_sequence(k_cache, block_table[i], n).float()
        if k_scale is not None:
            keys = keys * k_scale.float().reshape(())
        values = keys[..., :head_dim_v]                                   # [n, h_kv, dv]
        # Query head h = g * group + r reads kv head g.
        queries = q[i].float().reshape(s_q, h_kv, group, d)
        scores = torch.einsum("jgrd,tgd->grjt", queries, keys).reshape(h_q, s_q, n) * softmax_scale
        t = torch.arange(n, device=q.device)
        j = torch.arange(s_q, device=q.device)
        limit = n - s_q + j + 1 if causal else torch.full_like(j, n)
        visible = t[None, :] < limit[:, None]                             # [s_q, n]
        scores = scores.masked_fill(~visible, -math.inf)
        seq_lse = torch.logsumexp(scores, dim=-1)                         # [h_q, s_q], -inf if none
        # A +inf score (an infinity in q or a key) has no finite softmax: NaN, as for a NaN score.
        seq_lse = seq_lse.masked_fill(seq_lse == math.inf, math.nan)
        seen = seq_lse != -math.inf  # a NaN score stays NaN (in out and lse), not "no key seen"
        probs = torch.exp(scores - torch.where(seen, seq_lse, 0.0)[..., None])
        out[i] = torch.einsum("grjt,tgd->jgrd", probs.reshape(h_kv, group, s_q, n), values).reshape(
            s_q, h_q, head_dim_v)
        lse[i] = torch.where(seen, seq_lse, math.inf)
    return out.to(q.dtype), lse
