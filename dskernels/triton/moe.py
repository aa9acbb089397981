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
every candidate is -inf.

At decode sizes the kernel's time is the latency of its reductions, one after another (12 rounds
for V3). So each round is one max over int64 keys that hold the value's order in the high word and
the lane in the low word (value and arg-max at once), and the weights are not gathered per round:
the chosen experts' logits are loaded again at the end (cache hits) and their sigmoid recomputed,
the same bits. DSKERNELS_ROUTER_TILE="TOKENS,WARPS" sets the tokens per program and its warps
(benchmarks/bench_moe.py times the choices)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from dskernels.triton import next_power_of_2
from dskernels.triton.launch import fast

BLOCK_T = 8  # tokens per program: V3's 8 x 32 experts are 2048 values, 16 per thread of 4 warps
NUM_WARPS = 4
LANE_BITS = tl.constexpr(32)  # a selection key's low word holds the lane (arg-max comes with the max)
LANE_MASK = tl.constexpr(2**32 - 1)
UNAVAILABLE = tl.constexpr(-(2**63))  # the key of a lane already taken or padding: below every real key


@triton.jit
def _order_key(values):
    """int32 keys in the order of the fp32 values (NaN must not reach here; -0.0 is made +0.0 so
    that the two zeros tie as they compare)."""
    values = tl.where(values == 0.0, 0.0, values)
    bits = values.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _pick(keys, available, lanes):
    """Per row: the lane of the largest key among the available lanes, first lane on ties (also
    among -inf values: the first available -inf lane where nothing better is left). keys: int32
    [rows, lanes] from _order_key; lanes: the lane numbers [lanes]. One reduction."""
    packed = (keys.to(tl.int64) << LANE_BITS) | (lanes[None, :].to(tl.int64) ^ LANE_MASK)  # low word: mask - lane
    best = tl.max(tl.where(available, packed, UNAVAILABLE), axis=1)
    return ((best & LANE_MASK) ^ LANE_MASK).to(tl.int32)


@triton.jit
def _sigmoid(logits, TORCH_SIGMOID: tl.constexpr):
    if TORCH_SIGMOID:  # torch's CUDA sigmoid: 1 / (1 + expf(-x)), IEEE division
        return tl.math.div_rn(1.0, 1.0 + libdevice.exp(-logits))
    return 1.0 / (1.0 + tl.exp(-logits))  # the interpreter (no libdevice there)


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
    logits_rows = logits_ptr + rows.to(tl.int64) * stride_lt
    group = tl.arange(0, GROUPS_PAD)
    pos = tl.arange(0, GROUP_PAD)
    expert = (group[:, None] * GROUP_SIZE + pos[None, :]).to(tl.int64)      # [GROUPS_PAD, GROUP_PAD]
    expert_ok = (group < GROUPS)[:, None] & (pos < GROUP_SIZE)[None, :]
    logits = tl.load(logits_rows[:, None, None] + expert[None, :, :] * stride_le,
                     mask=row_ok[:, None, None] & expert_ok[None, :, :], other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + expert * stride_b, mask=expert_ok, other=0.0).to(tl.float32)
    # What the selection ranks: the biased scores, NaN first (torch.topk's order), padding never.
    biased = _sigmoid(logits, TORCH_SIGMOID) + bias[None, :, :]
    rank = tl.where(expert_ok[None, :, :], tl.where(biased != biased, float("inf"), biased), float("-inf"))

    # Each group's score: the sum of its two best (a tie counts twice, as topk(2)). The best's key
    # and position from one reduction (padding is -inf, after every real lane), then the second.
    keys = _order_key(rank)
    packed = (keys.to(tl.int64) << LANE_BITS) | (pos[None, None, :].to(tl.int64) ^ LANE_MASK)
    best = tl.max(packed, axis=2)
    first = ((best & LANE_MASK) ^ LANE_MASK).to(tl.int32)
    first_key = (best >> LANE_BITS).to(tl.int32)
    first_value = tl.where(first_key >= 0, first_key, first_key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    second = tl.max(tl.where(pos[None, None, :] == first[:, :, None], float("-inf"), rank), axis=2)
    group_score = first_value + second
    group_score = tl.where(group_score != group_score, float("inf"), group_score)  # inf + -inf

    # The TOPK_GROUPS best groups: their experts stay candidates.
    group_keys = _order_key(group_score)
    group_free = (group < GROUPS)[None, :] & (rows >= 0)[:, None]  # [BLOCK, GROUPS_PAD]
    keep = tl.zeros((BLOCK, GROUPS_PAD), tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        chosen = _pick(group_keys, group_free, group)
        keep = keep | (group[None, :] == chosen[:, None])
        group_free = group_free & (group[None, :] != chosen[:, None])
    free = tl.reshape(keep[:, :, None] & expert_ok[None, :, :], (BLOCK, GROUPS_PAD * GROUP_PAD))
    keys = tl.reshape(keys, (BLOCK, GROUPS_PAD * GROUP_PAD))
    flat = tl.arange(0, GROUPS_PAD * GROUP_PAD)

    # The TOPK best of the kept groups' experts (flat index: group * GROUP_PAD + position).
    slots = tl.arange(0, TOPK_PAD)
    idx = tl.zeros((BLOCK, TOPK_PAD), tl.int32)
    for k in tl.static_range(TOPK):
        chosen = _pick(keys, free, flat)
        free = free & (flat[None, :] != chosen[:, None])
        idx = tl.where(slots[None, :] == k, ((chosen // GROUP_PAD) * GROUP_SIZE + chosen % GROUP_PAD)[:, None], idx)

    # Weighted by their unbiased scores: the chosen logits again (just read: cache hits), the same
    # sigmoid, so the same bits as the scores ranked above.
    out_ok = row_ok[:, None] & (slots < TOPK)[None, :]
    chosen_logits = tl.load(logits_rows[:, None] + idx.to(tl.int64) * stride_le, mask=out_ok, other=0.0)
    weight = tl.where(out_ok, _sigmoid(chosen_logits.to(tl.float32), TORCH_SIGMOID), 0.0)
    if RENORMALIZE:
        total = tl.sum(weight, axis=1)[:, None] + 1e-20
        if TORCH_SIGMOID:
            weight = tl.math.div_rn(weight, total)
        else:
            weight = weight / total
    tl.store(idx_ptr + rows[:, None].to(tl.int64) * stride_it + slots[None, :], idx.to(tl.int64), mask=out_ok)
    tl.store(weight_ptr + rows[:, None].to(tl.int64) * stride_wt + slots[None, :], weight * scaling_factor,
             mask=out_ok)


def _tile() -> tuple[int, int]:
    """(tokens per program, warps): DSKERNELS_ROUTER_TILE="TOKENS,WARPS" (powers of two), or the default."""
    value = os.environ.get("DSKERNELS_ROUTER_TILE", "")
    if not value:
        return BLOCK_T, NUM_WARPS
    try:
        tokens, warps = (int(v) for v in value.split(","))
    except ValueError:
        tokens = warps = 0
    if not (tokens in (1, 2, 4, 8, 16) and warps in (1, 2, 4, 8)):
        raise ValueError(f"DSKERNELS_ROUTER_TILE: expected \"TOKENS,WARPS\" with TOKENS in 1..16 and WARPS in "
                         f"1..8, powers of two, got {value!r}")
    return tokens, warps


def grouped_topk(logits, bias, idx, weight, num_groups: int, topk_groups: int, renormalize: bool,
                 scaling_factor: float) -> None:
    """logits [T, E], bias [E] -> idx int64 [T, K], weight fp32 [T, K] (both contiguous)."""
    tokens, experts = logits.shape
    topk = idx.shape[1]
    if tokens == 0:
        return
    block, warps = _tile()
    grid = ((tokens + block - 1) // block,)
    group_size = experts // num_groups
    fast(_grouped_topk_kernel)[grid](logits, bias, idx, weight, tokens, logits.stride(0), logits.stride(1),
                                     bias.stride(0), idx.stride(0), weight.stride(0), float(scaling_factor),
                                     GROUP_SIZE=group_size, GROUP_PAD=next_power_of_2(group_size),
                                     GROUPS=num_groups, GROUPS_PAD=next_power_of_2(num_groups),
                                     TOPK_GROUPS=topk_groups, TOPK=topk, TOPK_PAD=next_power_of_2(topk),
                                     RENORMALIZE=renormalize, BLOCK=block,
                                     TORCH_SIGMOID=os.environ.get("TRITON_INTERPRET", "0") != "1", num_warps=warps)
