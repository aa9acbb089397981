"""DeepSeek-V3.2's lightning indexer: which index_topk tokens each query attends to (DSA).

Projections (HF names, under `self_attn.indexer.`): q = wq_b(q_resid) per head [rope | rest]
(q_resid is the attention's q_a_layernorm(q_a_proj(x))), one key k = k_norm(wk(x)) shared by all
heads (k_norm is a LayerNorm with bias), both roped on their first qk_rope_head_dim dims with
rotate_half pairs (unlike MLA's interleaved pairs), and per-head weights w = weights_proj(x) in fp32.

    score(query, key t) = sum_h w_h * n_heads**-0.5 * relu(q_h . k_t * index_head_dim**-0.5)

over the keys the query may see (causal); the top index_topk scores are kept.

Two ways to score:
- fp8 (DeepSeek's inference code and the production path): q and k go through a normalized
  Hadamard rotation (dot products unchanged, outliers spread so that FP8 loses less), are cast to
  FP8 (q one scale per token and head, folded into the weights; k one per token) and scored by
  `fp8_mqa_logits` (over the new tokens) or `fp8_paged_mqa_logits` (over a paged key cache in
  DeepGEMM's layout: per page the e4m3 rows, then the fp32 scales);
- float (transformers' DeepseekV32Indexer): fp32 dot products, keys cached in the layer's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dskernels
from dskernels._backend import batch_invariant_enabled
from dskernels.models.config import DeepseekV3Config
from dskernels.models.linear import Linear, triton_fusable, unhooked, weight_parameter
from dskernels.models.paged import cache_rows, write_rows
from dskernels.models.rope import apply_rope, rope_cos_sin
from dskernels.ops.invariant import invariant_linear, invariant_mm, invariant_path

_K_NORM_EPS = 1e-6  # HF: nn.LayerNorm(index_head_dim, eps=1e-6)
# fp32 scores held at once (256 MiB): a long prompt is scored a chunk of its queries at a time
_SCORE_BUDGET = 1 << 26


def _query_chunks(s: int, per_query: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering the S queries, each holding at most _SCORE_BUDGET scores (one query at least)."""
    step = max(1, _SCORE_BUDGET // max(1, per_query))
    if s <= step:  # the usual case, and under torch.compile(dynamic=True) one guard, not S itself
        return [(0, s)]
    return [(lo, min(s, lo + step)) for lo in range(0, s, step)]


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester's n x n Hadamard matrix over sqrt(n) (orthonormal, symmetric); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"index_head_dim: the FP8 indexer's Hadamard rotation needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _float_logits(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The float indexer's logits [B, S, T] = sum_h weights[b, s, h] relu(q[b, s, h] . keys[b, t]) in
    fp32 (q [B, S, H, D], keys [B, T, D], weights [B, S, H]): torch's einsums, or under
    dskernels.batch_invariant() the same two products on its fixed-tile kernel."""
    if not invariant_path(q.device, q, keys, weights):
        scores = torch.einsum("bshd,btd->bsht", q.float(), keys.float()).clamp(min=0)
        return torch.einsum("bsht,bsh->bst", scores, weights)
    b, s, heads, dim = q.shape
    t = keys.shape[1]
    scores = invariant_mm(q.float().reshape(b, s * heads, dim), keys.float(), torch.float32).clamp(min=0)
    # the sum over heads as a product of one row: weights [B * S, 1, H] times scores [B * S, T, H]
    logits = invariant_mm(weights.float().reshape(b * s, 1, heads), scores.view(b * s, heads, t).transpose(1, 2),
                          torch.float32)
    return logits.view(b, s, t)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32 (DeepSeek's inference code), output in x's dtype."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = weight_parameter(torch.ones(dim, dtype=dtype, device=device))
        self.bias = weight_parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Indexer(nn.Module):
    """The indexer of one V3.2 attention layer: projections, scoring (fp8 or float, see the module
    docstring) and top-k selection, prefill from scratch or over its paged key cache."""

    def __init__(self, cfg: DeepseekV3Config, dtype=None, device=None, fp8: bool = True, fp8_weights: bool = False):
        super().__init__()
        self.cfg, self.fp8 = cfg, fp8
        self.num_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        if fp8 and self.head_dim < 16:  # (then a power of two: a multiple of 16, as fp8_mqa_logits wants)
            raise ValueError(f"index_head_dim: the FP8 indexer's logits (fp8_mqa_logits) take at least 16, got "
                             f"{self.head_dim} (index_fp8=False takes any)")
        self.wq_b = Linear(cfg.q_lora_rank, self.num_heads * self.head_dim, dtype, device, fp8=fp8_weights)
        self.wk = Linear(cfg.hidden_size, self.head_dim, dtype, device, fp8=fp8_weights)
        self.k_norm = LayerNorm(self.head_dim, _K_NORM_EPS, dtype, device)
        # fp32 whatever the layer's dtype, through module casts too (see Linear.keep_fp32)
        self.weights_proj = Linear(cfg.hidden_size, self.num_heads, torch.float32, device)
        self.weights_proj.keep_fp32 = True
        # sum_h w_h relu(q.k s) with s = D**-0.5 > 0 equals sum_h (w_h s) relu(q.k): both factors go in the weights
        self.weight_scale = self.num_heads ** -0.5 * self.head_dim ** -0.5
        self.hadamard = hadamard_matrix(self.head_dim).to(device) if fp8 else None

    def rebuild_hadamard(self, device: torch.device) -> None:
        if self.hadamard is not None:
            self.hadamard = hadamard_matrix(self.head_dim).to(device)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self.hadamard is not None:  # not in the state dict: rebuilt where fn moves it (exact fp32, also
            self.rebuild_hadamard(fn(self.hadamard.new_empty(0)).device)  # after to_empty() of a meta-built layer)
        return module

    @property
    def cache_width(self) -> int:
        """Per-token width of the key cache: D e4m3 bytes + a 4-byte scale (fp8), else D values."""
        return self.head_dim + 4 if self.fp8 else self.head_dim

    # ---- projections ----
    def _projections(self, x, q_resid, x_fp8, q_resid_fp8):
        """wq_b's q [B, S, H, D], wk's k [B, S, D] (before k_norm) and weights_proj's head weights
        [B, S, H] in fp32 (not yet scaled)."""
        b, s, _ = x.shape
        q = self.wq_b(q_resid, q_resid_fp8).view(b, s, self.num_heads, self.head_dim)
        if self.weights_proj.is_fp8:
            weights = self.weights_proj(x, x_fp8).float()
        elif invariant_path(x.device, x, self.weights_proj.weight):  # dskernels.batch_invariant()
            weights = invariant_linear(x.float(), self.weights_proj.weight.float())
        else:  # transformers keeps weights_proj in fp32
            weights = F.linear(x.float(), self.weights_proj.weight.float())
        return q, self.wk(x, x_fp8), weights

    def project(self, x: torch.Tensor, q_resid: torch.Tensor, rope: tuple, x_fp8=None, q_resid_fp8=None):
        """x [B, S, hidden], q_resid [B, S, q_lora_rank], rope (positions int64 [B, S], inv_freq,
        attention_factor: the attention's angles) -> q [B, S, H, D], k [B, S, D] (x's dtype, roped,
        rotated for fp8) and weights [B, S, H] fp32 (the head weights times n_heads**-0.5 * D**-0.5).
        x_fp8, q_resid_fp8: the attention's FP8 casts of x and q_resid (models.linear.shared_cast), or None."""
        return self._rotate(*self._projections(x, q_resid, x_fp8, q_resid_fp8), rope)

    def _rotate(self, q, k, weights, rope):
        """The steps after the projections, in torch's ops: k_norm, the rope of q and k (rotate_half
        pairs on their first qk_rope_head_dim columns), the Hadamard rotation (fp8), the head weights' scale."""
        k = self.k_norm(k)
        dim = self.cfg.qk_rope_head_dim
        cos, sin = rope_cos_sin(*rope, q.dtype)
        q = torch.cat([apply_rope(q[..., :dim], cos, sin, interleave=False), q[..., dim:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :dim], cos, sin, interleave=False), k[..., dim:]], dim=-1)
        if self.fp8 and invariant_path(q.device, q, k):  # dskernels.batch_invariant(); H is symmetric: x @ H = x @ H.T
            q = invariant_linear(q.float(), self.hadamard, out_dtype=q.dtype)
            k = invariant_linear(k.float(), self.hadamard, out_dtype=k.dtype)
        elif self.fp8:
            q = (q.float() @ self.hadamard).to(q.dtype)
            k = (k.float() @ self.hadamard).to(k.dtype)
        return q, k, weights * self.weight_scale

    def _fp8_inputs(self, x, q_resid, rope, x_fp8, q_resid_fp8, key_cache: tuple | None = None):
        """The FP8 scoring's inputs: q8 [B, S, H, D], the head weights [B, S, H] with q's scales
        folded in, and the keys per_custom_dims_cast_to_fp8(k, (0,)) as (k8 [B * S, D], k_scale
        [B * S]), or, given key_cache = (index_cache, block_table, cache_seqlens, slots), written
        into the cache (at `slots`: flat cache rows [B * S], -1 not written, None: at cache_seqlens[b]
        + j through the block table) as (None, None). After the three projections one Triton kernel
        where it runs (dskernels/triton/layer.py's indexer_qk: the same steps; slots None, a plain
        k_norm without hooks, index_head_dim up to MAX_INDEXER_DIM), torch's ops otherwise."""
        fused = (triton_fusable(x) and (key_cache is None or key_cache[3] is None)
                 and type(self.k_norm) is LayerNorm and unhooked(self.k_norm))
        if fused:  # (imported only where Triton runs: the reference path needs no Triton installed)
            from dskernels.triton import layer as triton_layer

            fused = self.head_dim <= triton_layer.MAX_INDEXER_DIM
        if not fused:
            return self._cast(*self.project(x, q_resid, rope, x_fp8, q_resid_fp8), key_cache)
        q, k, weights = self._projections(x, q_resid, x_fp8, q_resid_fp8)
        if not (triton_fusable(q, k) and self.hadamard.device == x.device):
            return self._cast(*self._rotate(q, k, weights, rope), key_cache)
        positions, inv_freq, attention_factor = rope
        return triton_layer.indexer_qk(q, k, weights, self.k_norm.weight, self.k_norm.bias, self.k_norm.eps, positions,
                                       inv_freq.to(device=x.device, dtype=torch.float32).contiguous(),
                                       attention_factor, self.hadamard, self.weight_scale, self.cfg.fp8_round_scale,
                                       *(key_cache[:3] if key_cache is not None else ()))

    def _cast(self, q, k, weights, key_cache):
        """_fp8_inputs' casts and key write from the rotated q [B, S, H, D], k [B, S, D] and the
        scaled head weights [B, S, H], in torch's ops (and the row cast's kernel where it runs)."""
        b, s, heads, dim = q.shape
        q8, q_scale = dskernels.per_custom_dims_cast_to_fp8(q.reshape(b * s, heads, dim), (0, 1),
                                                            self.cfg.fp8_round_scale)
        weights = weights.reshape(b * s, heads) * q_scale
        k8, k_scale = dskernels.per_custom_dims_cast_to_fp8(k.reshape(b * s, dim), (0,), self.cfg.fp8_round_scale)
        if key_cache is not None:
            index_cache, block_table, cache_seqlens, slots = key_cache
            page_size = index_cache.shape[1]
            if slots is None:
                slots = cache_rows(block_table, cache_seqlens, s, index_cache.shape[0], page_size)
            pages = index_cache.view(torch.uint8).view(index_cache.shape[0], page_size * self.cache_width)
            keys = pages[:, :page_size * dim].view(-1, page_size, dim)
            scales = pages[:, page_size * dim:].view(-1, page_size, 4)
            at = (torch.div(slots, page_size, rounding_mode="floor"), slots % page_size)  # -1 slots: skipped
            write_rows(keys, at, k8.view(torch.uint8))
            write_rows(scales, at, k_scale.view(torch.uint8).view(-1, 4))
            k8 = k_scale = None
        return q8.view(b, s, heads, dim), weights.view(b, s, heads), k8, k_scale

    # ---- selection ----
    def select_new_tokens(self, x, q_resid, rope, x_fp8=None, q_resid_fp8=None) -> torch.Tensor:
        """Causal selection among the S tokens of x (prefill from scratch): int32 [B, S, topk]
        positions in the sequence (topk = min(index_topk, S)), -1 where a query sees fewer tokens."""
        b, s = x.shape[:2]
        heads = self.num_heads
        first = torch.arange(b, device=x.device, dtype=torch.int32)[:, None] * s  # each sequence's first key
        if self.fp8:
            q8, weights, k8, k_scale = self._fp8_inputs(x, q_resid, rope, x_fp8, q_resid_fp8)
        else:
            q, k, weights = self.project(x, q_resid, rope, x_fp8, q_resid_fp8)
        selected = []
        for lo, hi in _query_chunks(s, b * s * (1 if self.fp8 else heads)):
            if self.fp8:  # query j of sequence i sees keys [i s, i s + j] of the flattened batch
                ends = first + torch.arange(lo + 1, hi + 1, device=x.device, dtype=torch.int32)
                logits = dskernels.fp8_mqa_logits(q8[:, lo:hi].reshape(-1, heads, self.head_dim), (k8, k_scale),
                                                  weights[:, lo:hi].reshape(-1, heads),
                                                  first.expand(b, hi - lo).reshape(-1), ends.reshape(-1), True, s)
                logits = logits.view(b, hi - lo, s)
            else:
                logits = _float_logits(q[:, lo:hi], k, weights[:, lo:hi])
                unseen = torch.arange(s, device=x.device) > torch.arange(lo, hi, device=x.device)[:, None]
                logits = logits.masked_fill(unseen, float("-inf"))
            selected.append(self._top(logits))
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=1)

    def select_paged(self, x, q_resid, rope, x_fp8, q_resid_fp8, index_cache: torch.Tensor,
                     block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                     slots: torch.Tensor | None) -> torch.Tensor:
        """Writes the S new keys at `slots` (flat cache rows [B * S], -1: not written; None: computed
        here from the block table where needed) of index_cache, then selects
        for token j of sequence b among positions [0, cache_seqlens[b] + j + 1): int32 [B, S, topk]
        positions (topk = min(index_topk, the block table's capacity); index_topk under
        dskernels.batch_invariant()), -1 past what a query sees.
        No host sync: the logits span the whole block table; positions past a sequence are -inf."""
        b, s = x.shape[:2]
        heads, dim = self.num_heads, self.head_dim
        page_size = index_cache.shape[1]
        capacity = block_table.shape[1] * page_size
        if self.fp8:
            q8, weights, _, _ = self._fp8_inputs(x, q_resid, rope, x_fp8, q_resid_fp8,
                                                 (index_cache, block_table, cache_seqlens, slots))
        else:
            q, k, weights = self.project(x, q_resid, rope, x_fp8, q_resid_fp8)
            if slots is None:
                slots = cache_rows(block_table, cache_seqlens, s, index_cache.shape[0], page_size)
            flat = index_cache.view(-1, dim)
            write_rows(flat, slots, k.reshape(b * s, dim).to(index_cache.dtype))
            positions = torch.arange(capacity, device=x.device)
            table = block_table.long().clamp(0, index_cache.shape[0] - 1)  # entries past a sequence: masked below
            keys = flat[(table.gather(1, (positions // page_size).expand(b, -1)) * page_size
                         + positions % page_size)]                                  # [B, capacity, D]
        selected = []
        for lo, hi in _query_chunks(s, b * capacity * (1 if self.fp8 else heads)):
            if self.fp8:  # row j of the chunk sees [0, context - (hi - lo) + j + 1): causal. (No schedule:
                # get_paged_mqa_logits_metadata's plan is DeepGEMM's; our kernel does not read it.)
                context = (cache_seqlens + hi).to(torch.int32)
                logits = dskernels.fp8_paged_mqa_logits(q8[:, lo:hi].contiguous(), index_cache,
                                                        weights[:, lo:hi].reshape(-1, heads), context, block_table,
                                                        None, capacity, True)
                logits = logits.view(b, hi - lo, capacity)
            else:
                logits = _float_logits(q[:, lo:hi], keys, weights[:, lo:hi])
                seen = cache_seqlens.long()[:, None, None] + torch.arange(lo + 1, hi + 1, device=x.device)[:, None]
                logits = logits.masked_fill(positions >= seen, float("-inf"))
            selected.append(self._top(logits))
        selected = selected[0] if len(selected) == 1 else torch.cat(selected, dim=1)
        if batch_invariant_enabled() and selected.shape[-1] < self.cfg.index_topk:
            # dskernels.batch_invariant(): the sparse decode splits a list by its width, and the width
            # here is the batch's block-table capacity: padded with -1 (skipped) to index_topk, a
            # model constant, a sequence's lists split the same way beside longer sequences.
            selected = F.pad(selected, (0, self.cfg.index_topk - selected.shape[-1]), value=-1)
        return selected

    def _top(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, S, T] (-inf: not seen) -> int32 [B, S, min(index_topk, T)] positions, -1 for -inf."""
        values, positions = logits.topk(min(self.cfg.index_topk, logits.shape[-1]), dim=-1)
        if triton_fusable(values):
            from dskernels.triton import layer as triton_layer

            selected = triton_layer.topk_positions(values, positions)
        else:
            selected = torch.where(values == float("-inf"), -1, positions).to(torch.int32)
        if batch_invariant_enabled():
            # dskernels.batch_invariant(): equal scores are common (the ReLU's zeros), and topk may
            # order ties by the row count or width; the sparse attention sums its list in order, so
            # the list goes in position order (-1 last).
            last = torch.iinfo(torch.int32).max
            selected = torch.where(selected < 0, last, selected).sort(dim=-1).values
            selected = torch.where(selected == last, -1, selected)
        return selected
