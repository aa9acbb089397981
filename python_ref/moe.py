"""DeepSeek-V3's router: group-limited top-k over sigmoid scores (HF's DeepseekV3TopkRouter after
its gate GEMM), the oracle of dskernels.grouped_topk."""

from __future__ import annotations

import torch


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor, num_groups: int, topk_groups: int, topk: int,
                 renormalize: bool, scaling_factor: float):
    """Sigmoid scores s of logits [T, E]; selection on s + bias among the topk_groups of num_groups
    groups with the largest sum of their two best biased scores; weights = the unbiased s of the
    chosen experts, normalized to sum 1 (renormalize), times scaling_factor."""
    scores = logits.float().sigmoid()
    biased = scores + bias.float()
    tokens, experts = logits.shape
    per_group = biased.view(tokens, num_groups, experts // num_groups)
    group_score = per_group.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_groups, dim=-1).indices, True)
    # The experts of dropped groups rank below every expert of a kept one, even a kept -inf: in
    # float64, kept -inf becomes -1e300 (below any float32) and dropped experts -inf. (With fp32 -inf
    # for both, torch.topk's order among the ties, which differs on CUDA, could pick a dropped group.)
    kept = per_group.double().clamp(min=-1e300)  # NaN stays NaN, and ranks first as in torch.topk
    choice = kept.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)
    idx = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, idx)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return idx, weights * scaling_factor
