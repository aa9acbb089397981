"""DeepSeek-V3's router in one kernel (dskernels.grouped_topk): sigmoid, bias, group scores, group
and expert selection, weights, for BLOCK_T tokens per program. Unfused, torch runs it as ~15 kernels
over [T, E] fp32 tensors (python_ref.moe.grouped_topk), which at decode sizes costs more launches
than math.

The scores are torch's CUDA sigmoid bit for bit (libdevice's expf, IEEE division) wherever they are
normal numbers (Triton flushes subnormals: logits below about -87 score 0), and the sums that rank
the groups add in torch's order, so selection agrees with torch.topk on the same logits except for
exact ties. Selection is by repeated arg-max (at most 16 groups and 16 experts are chosen): each
round takes the largest value among the lanes still free, first index on ties. Experts therefore
come out best first; torch.topk(sorted=False) gives the same set in an unspecified order. As in
torch.topk, NaN ranks above everything, and the ids are always distinct and in range, even where
every candidate is -inf."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK_T = 8  # tokens per program: V3's 8 x 32 experts are 2048 values, 16 per thread of 4 warps


@triton.jit
def _pick(values, available):
    """Per row: the index of the largest value among the available lanes (first on ties); the first
    available lane where all of those are -inf (torch.topk then returns some -inf lane too)."""
    key = tl.where(available, values, float("-inf"))
    best = tl.argmax(key, axis=1)
    return tl.where(tl.max(key, axis=1) > float("-inf"), best, tl.argmax(available.to(tl.int32), axis=1))


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, idx_ptr, weight_ptr, tokens, stride_lt, stride_le, stride_b,
                         stride_it, stride_wt, scaling_factor, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                         GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                         TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                         BLOCK: tl.constexpr, TORCH_SIGMOID: tl.constexpr):
    # The experts as [group, position in group], each group padded to a power of two: one reduction
    # over the last axis scores every group at once.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < tokens
    group = tl.arange(0, GROUPS_PAD)
    pos = tl.arange(0, GROUP_PAD)
    expert = (group[:, None] * GROUP_SIZE + pos[None, :]).to(tl.int64)      # [GROUPS_PAD, GROUP_PAD]
    expert_ok = (group < GROUPS)[:, None] & (pos < GROUP_SIZE)[None, :]
    logits = tl.load(logits_ptr + rows[:, None, None].to(tl.int64) * stride_lt + expert[None, :, :] * stride_le,
                     mask=row_ok[:, None, None] & expert_ok[None, :, :], other=0.0).to(tl.float32)
    if TORCH_SIGMOID:  # torch's CUDA sigmoid: 1 / (1 + expf(-x)), IEEE division
        scores = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-logits))
    else:  # the interpreter (no libdevice there)
        scores = 1.0 / (1.0 + tl.exp(-logits))
    bias = tl.load(bias_ptr + expert * stride_b, mask=expert_ok, other=0.0).to(tl.float32)
    # What the selection ranks: the biased scores, NaN first (torch.topk's order), padding never.
    biased = scores + bias[None, :, :]
    rank = tl.where(expert_ok[None, :, :], tl.where(biased != biased, float("inf"), biased), float("-inf"))

    # Each group's score: the sum of its two best (a tie counts twice, as topk(2)).
    first = tl.argmax(rank, axis=2)
    second = tl.max(tl.where(pos[None, None, :] == first[:, :, None], float("-inf"), rank), axis=2)
    group_score = tl.max(rank, axis=2) + second
    group_score = tl.where(group_score != group_score, float("inf"), group_score)  # inf + -inf

    # The TOPK_GROUPS best groups: their experts stay candidates.
    group_free = (group < GROUPS)[None, :] & (rows >= 0)[:, None]  # [BLOCK, GROUPS_PAD]
    keep = tl.zeros((BLOCK, GROUPS_PAD), tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        best = _pick(group_score, group_free)
        keep = keep | (group[None, :] == best[:, None])
        group_free = group_free & (group[None, :] != best[:, None])
    free = tl.reshape(keep[:, :, None] & expert_ok[None, :, :], (BLOCK, GROUPS_PAD * GROUP_PAD))
    rank = tl.reshape(rank, (BLOCK, GROUPS_PAD * GROUP_PAD))
    scores = tl.reshape(scores, (BLOCK, GROUPS_PAD * GROUP_PAD))
    flat = tl.arange(0, GROUPS_PAD * GROUP_PAD)

    # The TOPK best of the kept groups' experts (flat index: group * GROUP_PAD + position), weighted
    # by their unbiased scores.
    slots = tl.arange(0, TOPK_PAD)
    idx = tl.zeros((BLOCK, TOPK_PAD), tl.int32)
    weight = tl.zeros((BLOCK, TOPK_PAD), tl.float32)
    for k in tl.static_range(TOPK):
        best = _pick(rank, free)
        chosen = flat[None, :] == best[:, None]
        free = free & (flat[None, :] != best[:, None])
        slot = slots[None, :] == k
        idx = tl.where(slot, ((best // GROUP_PAD) * GROUP_SIZE + best % GROUP_PAD)[:, None], idx)
        weight = tl.where(slot, tl.sum(tl.where(chosen, scores, 0.0), axis=1)[:, None], weight)
    if RENORMALIZE:
        total = tl.sum(weight, axis=1)[:, None] + 1e-20
        if TORCH_SIGMOID:
            weight = tl.math.div_rn(weight, total)
        else:
            weight = weight / total
    out_ok = row_ok[:, None] & (slots < TOPK)[None, :]
    tl.store(idx_ptr + rows[:, None].to(tl.int64) * stride_it + slots[None, :], idx.to(tl.int64), mask=out_ok)
    tl.store(weight_ptr + rows[:, None].to(tl.int64) * stride_wt + slots[None, :], weight * scaling_factor,
             mask=out_ok)


def grouped_topk(logits, bias, idx, weight, num_groups: int, topk_groups: int, renormalize: bool,
                 scaling_factor: float) -> None:
    """logits [T, E], bias [E] -> idx int64 [T, K], weight fp32 [T, K] (both contiguous)."""
    tokens, experts = logits.shape
    topk = idx.shape[1]
    if tokens == 0:
        return
    grid = (triton.cdiv(tokens, BLOCK_T),)
    group_size = experts // num_groups
    _grouped_topk_kernel[grid](logits, bias, idx, weight, tokens, logits.stride(0), logits.stride(1), bias.stride(0),
                               idx.stride(0), weight.stride(0), float(scaling_factor), GROUP_SIZE=group_size,
                               GROUP_PAD=triton.next_power_of_2(group_size),
                               GROUPS=num_groups, GROUPS_PAD=triton.next_power_of_2(num_groups),
                               TOPK_GROUPS=topk_groups, TOPK=topk, TOPK_PAD=triton.next_power_of_2(topk),
                               RENORMALIZE=renormalize, BLOCK=BLOCK_T,
                               TORCH_SIGMOID=os.environ.get("TRITON_INTERPRET", "0") != "1", num_warps=4)
