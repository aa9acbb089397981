"""DeepSeek-V3's router in one kernel (dskernels.grouped_topk): sigmoid, bias, group scores, group
and expert selection, weights, for BLOCK_T tokens per program. Unfused, torch runs it as ~15 kernels
over [T, E] fp32 tensors (python_ref.moe.grouped_topk), which at decode sizes costs more launches
than math.

The scores are torch's CUDA sigmoid bit for bit (libdevice's expf, IEEE division), and the sums
that rank the groups add in torch's order, so selection agrees with torch.topk on the same logits
except for exact ties. Selection is by repeated arg-max (at most 16 groups and 16 experts are
chosen): each round takes the largest remaining value of the row, first index on ties, and masks
it out. Experts therefore come out best first; torch.topk(sorted=False) gives the same set in an
unspecified order."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK_T = 8  # tokens per program: V3's 8 x 32 experts are 2048 values, 16 per thread of 4 warps


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, idx_ptr, weight_ptr, tokens, stride_lt, stride_le, stride_it,
                         stride_wt, scaling_factor, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                         GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                         TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                         BLOCK: tl.constexpr, TORCH_SIGMOID: tl.constexpr):
    # The experts as [group, position in group], each group padded to a power of two: one reduction
    # over the last axis scores every group at once.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < tokens
    group = tl.arange(0, GROUPS_PAD)
    pos = tl.arange(0, GROUP_PAD)
    expert = group[:, None] * GROUP_SIZE + pos[None, :]                      # [GROUPS_PAD, GROUP_PAD]
    expert_ok = (group < GROUPS)[:, None] & (pos < GROUP_SIZE)[None, :]
    ok = row_ok[:, None, None] & expert_ok[None, :, :]
    logits = tl.load(logits_ptr + rows[:, None, None].to(tl.int64) * stride_lt + expert[None, :, :] * stride_le,
                     mask=ok, other=0.0).to(tl.float32)
    if TORCH_SIGMOID:  # torch's CUDA sigmoid exactly: 1 / (1 + expf(-x)), IEEE division
        scores = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-logits))
    else:  # the interpreter (no libdevice there)
        scores = 1.0 / (1.0 + tl.exp(-logits))
    bias = tl.load(bias_ptr + expert, mask=expert_ok, other=0.0).to(tl.float32)
    biased = tl.where(expert_ok[None, :, :], scores + bias[None, :, :], float("-inf"))

    # Each group's score: the sum of its two best biased scores (a tie counts twice, as topk(2)).
    first = tl.argmax(biased, axis=2)
    second = tl.max(tl.where(pos[None, None, :] == first[:, :, None], float("-inf"), biased), axis=2)
    group_score = tl.where((group < GROUPS)[None, :], tl.max(biased, axis=2) + second, float("-inf"))

    # The TOPK_GROUPS best groups: their experts stay candidates.
    keep = tl.zeros((BLOCK, GROUPS_PAD), tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        best = tl.argmax(group_score, axis=1)
        chosen = group[None, :] == best[:, None]
        keep = keep | chosen
        group_score = tl.where(chosen, float("-inf"), group_score)
    candidates = tl.reshape(tl.where(keep[:, :, None], biased, float("-inf")), (BLOCK, GROUPS_PAD * GROUP_PAD))
    scores = tl.reshape(scores, (BLOCK, GROUPS_PAD * GROUP_PAD))
    flat = tl.arange(0, GROUPS_PAD * GROUP_PAD)

    # The TOPK best candidates (flat index: group * GROUP_PAD + position), weighted by their
    # unbiased scores.
    slots = tl.arange(0, TOPK_PAD)
    idx = tl.zeros((BLOCK, TOPK_PAD), tl.int32)
    weight = tl.zeros((BLOCK, TOPK_PAD), tl.float32)
    for k in tl.static_range(TOPK):
        best = tl.argmax(candidates, axis=1)
        chosen = flat[None, :] == best[:, None]
        slot = slots[None, :] == k
        idx = tl.where(slot, ((best // GROUP_PAD) * GROUP_SIZE + best % GROUP_PAD)[:, None], idx)
        weight = tl.where(slot, tl.sum(tl.where(chosen, scores, 0.0), axis=1)[:, None], weight)
        candidates = tl.where(chosen, float("-inf"), candidates)
    if RENORMALIZE:
        weight = weight / (tl.sum(weight, axis=1)[:, None] + 1e-20)
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
    _grouped_topk_kernel[grid](logits, bias, idx, weight, tokens, logits.stride(0), logits.stride(1), idx.stride(0),
                               weight.stride(0), float(scaling_factor), GROUP_SIZE=group_size,
                               GROUP_PAD=triton.next_power_of_2(group_size),
                               GROUPS=num_groups, GROUPS_PAD=triton.next_power_of_2(num_groups),
                               TOPK_GROUPS=topk_groups, TOPK=topk, TOPK_PAD=triton.next_power_of_2(topk),
                               RENORMALIZE=renormalize, BLOCK=BLOCK_T,
                               TORCH_SIGMOID=os.environ.get("TRITON_INTERPRET", "0") != "1", num_warps=4)
