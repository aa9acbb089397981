"""Expert-parallel dispatch/combine oracles (API.md section 3; DeepEP's Buffer semantics).

Experts are split evenly and contiguously over R ranks: expert e lives on rank e // (E // R) as
local expert e % (E // R). `topk_idx` is int64 [T, K] with -1 meaning "no expert".

    get_dispatch_layout(topk_idx, E, R):
        is_token_in_rank[t, r]   = any_k topk_idx[t, k] is an expert of rank r
        num_tokens_per_rank[r]   = sum_t is_token_in_rank[t, r]
        num_tokens_per_expert[e] = number of entries (t, k) with topk_idx[t, k] = e  (a token
                                   that names e twice counts twice, as DeepEP's layout counts and
                                   as recv_topk_idx's entries are)

The row movers the Buffer is built from (the Triton kernels reproduce them bit for bit):
    copy_rows(src, src_idx, dst, dst_idx):     dst[dst_idx[i]] = src[src_idx[i]], i skipped where
                                               an index is negative
    pack_rows(segments, offsets, src_idx, dst): dst[i, offsets[j]:...] = segments[j][src_idx[i]]
    gather_reduce(y, index, weights, out):     out[t] = sum_j weights[t, j] * y[index[t, j]],
                                               j ascending, fp32 accumulation, index -1 skipped

`low_latency_send` fills the low-latency sender's fixed blocks (the FP8 cast fused in) and
`low_latency_slots` is the receiver's placement (fixed shapes, no host sync).
`dispatch_oracle` is what rank `rank` must receive, written from every rank's inputs at once.
"""

from __future__ import annotations

import torch


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_idx int64 [T, K] -> (num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
    is_token_in_rank bool [T, R])."""
    num_tokens = topk_idx.shape[0]
    valid = topk_idx >= 0
    ids = torch.where(valid, topk_idx, num_experts)
    # One-hot over experts, then "any" over k: a token goes to a rank once however many of its experts
    # live there; the per-expert counts count every entry.
    token_has_expert = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=topk_idx.device)
    token_has_expert.scatter_(1, ids, True)
    token_has_expert = token_has_expert[:, :num_experts]
    is_token_in_rank = token_has_expert.reshape(num_tokens, num_ranks, num_experts // num_ranks).any(dim=2)
    entries = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    entries.scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int32, device=topk_idx.device))
    return (is_token_in_rank.sum(dim=0, dtype=torch.int32), entries[:num_experts], is_token_in_rank)


def copy_rows(src: torch.Tensor, src_idx: torch.Tensor | None, dst: torch.Tensor,
              dst_idx: torch.Tensor | None) -> None:
    """dst[dst_idx[i], :] = src[src_idx[i], :] for every i (None means the identity); an i with a
    negative src_idx[i] or dst_idx[i] is skipped (its dst row keeps its value)."""
    if src_idx is None and dst_idx is None:
        dst[: src.shape[0]] = src
        return
    num = (src_idx if src_idx is not None else dst_idx).shape[0]
    if num == 0 or src.shape[0] == 0:  # nothing to read: every index must be a skip
        return
    # Fixed shapes only (no boolean masks): skipped rows write into one spare row past the end.
    skip = torch.zeros(num, dtype=torch.bool, device=dst.device)
    if src_idx is not None:
        skip |= src_idx < 0
    if dst_idx is not None:
        skip |= dst_idx < 0
    rows = src[:num] if src_idx is None else src[src_idx.clamp(min=0)]
    target = torch.arange(num, device=dst.device) if dst_idx is None else dst_idx
    target = torch.where(skip, dst.shape[0], target)
    spare = torch.cat([dst, dst.new_empty((1, *dst.shape[1:]))])
    spare[target] = rows
    dst.copy_(spare[: dst.shape[0]])


def pack_rows(segments: list[torch.Tensor], offsets: list[int], src_idx: torch.Tensor | None,
              dst: torch.Tensor) -> None:
    """dst[i, offsets[j] : offsets[j] + segments[j].shape[1]] = segments[j][src_idx[i]] for every row i
    of dst (None: the identity): the packed send buffer, every payload of a row side by side."""
    for seg, off in zip(segments, offsets):
        rows = seg if src_idx is None else seg[src_idx]
        dst[:, off: off + seg.shape[1]] = rows[: dst.shape[0]]


def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None,
                  out: torch.Tensor) -> None:
    """out[t] = sum_j weights[t, j] * y[index[t, j]] (weights 1 when None), skipping index -1;
    the sum runs over j in order in fp32 (fp64 for fp64 rows) and is rounded once to out's dtype."""
    acc_dtype = torch.float64 if torch.float64 in (y.dtype, out.dtype) else torch.float32
    acc = torch.zeros(out.shape, dtype=acc_dtype, device=out.device)
    if y.shape[0] == 0:  # nothing arrived: every index is -1
        out.copy_(acc)
        return
    for j in range(index.shape[1]):
        valid = index[:, j] >= 0
        rows = y[index[:, j].clamp(min=0)].to(acc_dtype)
        if weights is not None:
            rows = rows * weights[:, j : j + 1].to(acc_dtype)
        acc += torch.where(valid[:, None], rows, torch.zeros((), device=out.device))
    out.copy_(acc)


def low_latency_send(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, use_fp8: bool,
                     send: torch.Tensor, offsets: list[int], round_scale: bool = False) -> None:
    """The low-latency sender's buffer send uint8 [R, M, row_bytes]: block r goes to rank r, its row t
    carries token t (T = x.shape[0] <= M). Fields at the byte offsets `offsets`: (fp8 x, fp32 scales,
    int64 ids) with use_fp8, the cast being per_token_cast_to_fp8's (with round_scale); else (x's
    bytes, int64 ids).
        ids of row t in every block:   topk_idx[t], or -1 (all bits set) for t >= T;
        payload of row t in block r:   written iff t < T and t has an expert on rank r (the
                                       receiver reads no other row's payload); the other payload
                                       bytes are left as they were."""
    from python_ref.fp8 import per_token_cast_to_fp8

    num_ranks, block_rows, _ = send.shape
    num_tokens, num_topk = topk_idx.shape
    payloads = list(per_token_cast_to_fp8(x, round_scale)) if use_fp8 else [x]
    ids = torch.full((block_rows, num_topk), -1, dtype=torch.int64, device=send.device)
    ids[:num_tokens] = topk_idx
    at = offsets[-1]
    send[:, :, at: at + 8 * num_topk] = ids.view(torch.uint8)
    to_rank = get_dispatch_layout(topk_idx, num_experts, num_ranks)[2].t()[:, :, None]  # [R, T, 1]
    for payload, at in zip(payloads, offsets):
        row_bytes = payload.shape[1] * payload.element_size()
        data = payload.contiguous().reshape(-1).view(torch.uint8).reshape(num_tokens, row_bytes)
        field = send[:, :num_tokens, at: at + data.shape[1]]
        field.copy_(torch.where(to_rank, data, field))


def low_latency_slots(ids: torch.Tensor, base: int, num_local: int, cap: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the low-latency receiver puts each received (row, k) entry, from the global expert ids
    `ids` int64 [N, K] of the N = R * M received rows (row s * M + t: token t of source s; rows
    that carry no token name no expert). Experts base .. base + num_local - 1 are local.

    Returns (write_slot [N * K], return_slot [N * K], recv_count int32 [num_local]):
        return_slot[n * K + k] = l * cap + p if ids[n, k] is local expert l and row n is the
            p-th row (from 0, in row order) naming l; else -1;
        write_slot: return_slot, but -1 where an earlier k of the same row names the same
            expert (a token is written once per expert);
        recv_count[l] = rows naming local expert l.
    Fixed shapes only (a one-hot of (row, expert) and its running sum): no host synchronization.
    """
    num_rows, num_topk = ids.shape
    local = torch.where((ids >= base) & (ids < base + num_local), ids - base, -1)
    hit = torch.zeros(num_rows, num_local + 1, dtype=torch.int32, device=ids.device)
    hit.scatter_(1, torch.where(local >= 0, local, num_local), 1)
    running = torch.cumsum(hit[:, :num_local], dim=0)                      # inclusive, row order
    recv_count = (running[-1] if num_rows else running.new_zeros(num_local)).to(torch.int32)
    position = torch.gather(running, 1, local.clamp(min=0)) - 1
    return_slot = torch.where(local >= 0, local * cap + position, -1)
    earlier = torch.ones(num_topk, num_topk, dtype=torch.bool, device=ids.device).tril(-1)
    repeat = ((local[:, :, None] == local[:, None, :]) & earlier).any(dim=2)
    write_slot = torch.where(repeat, -1, return_slot)
    return write_slot.reshape(-1), return_slot.reshape(-1), recv_count


def local_topk(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, rank: int,
               num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global ids -> local ids of `rank` (-1 for experts elsewhere); weights 0 where -1."""
    base = rank * num_local_experts
    here = (topk_idx >= base) & (topk_idx < base + num_local_experts)
    local = torch.where(here, topk_idx - base, -1)
    if topk_weights is None:
        return local, None
    return local, torch.where(here, topk_weights, torch.zeros((), dtype=topk_weights.dtype))


def dispatch_oracle(xs: list, topk_idxs: list[torch.Tensor], topk_weights: list[torch.Tensor],
                    num_experts: int, rank: int, expert_alignment: int = 1):
    """What `rank` receives from Buffer.dispatch when source rank s holds xs[s], topk_idxs[s],
    topk_weights[s]: (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list).
    xs[s] may be a tuple (fp8, scales); recv_x is then a tuple too."""
    num_ranks = len(topk_idxs)
    num_local = num_experts // num_ranks
    picks = [get_dispatch_layout(t, num_experts, num_ranks)[2][:, rank] for t in topk_idxs]

    def rows(tensors):
        return torch.cat([t[p] for t, p in zip(tensors, picks)])

    if isinstance(xs[0], tuple):
        recv_x = tuple(rows([x[i] for x in xs]) for i in range(len(xs[0])))
    else:
        recv_x = rows(xs)
    recv_idx, recv_w = local_topk(rows(topk_idxs), rows(topk_weights), rank, num_local)
    counts = [int((recv_idx == e).sum()) for e in range(num_local)]  # entries, as the layout counts
    counts = [-(-c // expert_alignment) * expert_alignment for c in counts]
    return recv_x, recv_idx, recv_w, counts
