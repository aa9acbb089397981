"""DeepSeek-V3's router after its gate GEMM (dskernels.grouped_topk): 256 experts in 8 groups, top-4
groups, top-8 experts, at decode (1 and 128 tokens) and prefill (8192) sizes.

Memory-bound: bytes = the fp32 logits read (4 * T * E) and the ids and weights written (12 * T * K);
no FLOPs counted. Peers: the same math as torch ops (python_ref.moe, HF's router) eager and under
torch.compile, checked as ours are before they are timed. Decode sizes are also replayed from a CUDA graph (launch cost apart)."""

from __future__ import annotations

import torch

import dskernels
import python_ref
from benchmarks.common import GRAPH_VARIANTS, Case, graph_or_eager

V3 = dict(experts=256, groups=8, topk_groups=4, topk=8)
# (tokens per program, warps) of the Triton kernel besides its default (8, 4): at decode sizes its
# time is reduction latency, which fewer warps (shuffles, no shared-memory round trips) and fewer
# idle rows may cut; at 8192 tokens, throughput. Timed as triton[tile=T,W] rows, or
# triton[graph tile=T,W] where the case is graph-replayed.
ROUTER_TILES = ("1,1", "1,2", "2,4", "4,2")


def _case(tokens, experts, groups, topk_groups, topk):
    def make_inputs(device):
        return torch.randn(tokens, experts, device=device) * 2, torch.randn(experts, device=device) * 0.1

    def step(logits, bias):
        return dskernels.grouped_topk(logits, bias, groups, topk_groups, topk, True, 2.5)

    def reference(logits, bias):
        return python_ref.grouped_topk(logits, bias, groups, topk_groups, topk, True, 2.5)

    def check(outputs, expected):
        """The same experts per token (random logits: no ties), weights within fp32 rounding."""
        (idx, weights), (ref_idx, ref_weights) = outputs, (t.to(outputs[0].device) for t in expected)
        order, ref_order = idx.argsort(-1), ref_idx.argsort(-1)
        if not torch.equal(idx.gather(1, order), ref_idx.gather(1, ref_order)):
            return "different experts chosen than python_ref"
        diff = (weights.gather(1, order) - ref_weights.gather(1, ref_order)).abs().max().item() if idx.numel() else 0
        return None if diff <= 1e-5 else f"weights off by {diff:.1e} (bound 1e-5)"

    compiled = None

    def torch_compile_peer(logits, bias):
        nonlocal compiled
        compiled = compiled or torch.compile(python_ref.grouped_topk)
        return compiled(logits, bias, groups, topk_groups, topk, True, 2.5)

    graph = GRAPH_VARIANTS if tokens <= 128 else {}
    # the other tiles graph-replayed where the default is (decode: launch cost apart), else eager
    replay = graph.get("graph", {})
    variants = {**graph, **{("graph " if replay else "") + f"tile={tile}": {**replay, "DSKERNELS_ROUTER_TILE": tile}
                            for tile in ROUTER_TILES}}
    return Case(op="grouped_topk", params={"T": tokens, "E": experts, "groups": groups, "topk_groups": topk_groups,
                                           "topk": topk},
                make_inputs=make_inputs, run=graph_or_eager(step), reference=reference, check=check, flops=0.0,
                bytes=4 * tokens * experts + 12 * tokens * topk,
                peers={"torch": reference, "torch.compile": torch_compile_peer}, backends=("ref", "triton"),
                triton_variants=variants)


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":  # the interpreter: small
        return [_case(7, **V3), _case(37, 160, 8, 3, 6)]
    sizes = [1, 8192] if quick else [1, 128, 8192]
    return [_case(t, **V3) for t in sizes]
