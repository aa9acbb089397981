"""Expert-parallel dispatch/combine: the single-process kernels, and a model of the network part.

Kernels (`cases`, driven by benchmarks/run.py): all memory-bound, so GB/s against the copy
bandwidth is the figure of merit. Bytes are counted as read + written once:
  - ep_get_dispatch_layout: topk_idx read (T*K*8), is_token_in_rank (T*R) and the counts written;
  - ep_pack (dispatch's one-launch gather into the send buffer): (T + S) * payload bytes, each
    token's payload read once and S = (token, destination rank) payloads written, payload = H fp8
    bytes + H/128 fp32 scales + K int64 ids + K fp32 weights (alignment padding not counted). A
    token read again for its next destination comes from L2 (T payloads: ~31 MB at DeepEP's
    shape), so counting S reads would credit the kernel with traffic DRAM never sees;
  - ep_combine_reduce (combine's fused gather-sum back to token order): S*H*2 read + T*H*2 written;
  - ep_low_latency_send (low_latency_dispatch's send blocks, FP8 cast fused): M*H*2 read, and for
    each of the P (token, rank) pairs that carry a payload H fp8 + H/128 fp32 scale bytes written,
    plus R*M*K int64 ids written. Decode shape: M = 128 tokens per rank (DeepEP's low-latency
    benchmark), the same routing.
Shapes: DeepEP's settings (4096 tokens, hidden 7168, top-8 of 256 experts, 8 ranks) on CUDA.
Peers (eager PyTorch) are checked against python_ref before they are timed: exactly, but for the
combine's, whose sums run in another order (a bf16 rounding apart).

The network part cannot be measured on one GPU, so `main()` prints an analytic model (see
`traffic_model`): bytes each rank sends for EP8/16/32/64 under DeepEP's routing settings, the time
that takes at a given link bandwidth, beside the bandwidths DeepEP publishes.

    python benchmarks/bench_ep.py [--nvlink-gbps 160] [--rdma-gbps 50]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Case  # noqa: E402
from python_ref import ep as ref_ep  # noqa: E402

HIDDEN = 7168
GPUS_PER_NODE = 8


def _routing(num_tokens, num_topk, num_experts, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=g).topk(num_topk, dim=1).indices.to(device)


def _same(actual, expected):
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (a, w) in enumerate(zip(actual, expected)):
        a, w = a.cpu(), w.cpu()
        if a.dtype == torch.float8_e4m3fn:
            a, w = a.view(torch.uint8), w.view(torch.uint8)
        if a.shape != w.shape or not torch.equal(a, w):
            return f"output {i}: differs from python_ref"
    return None


def _layout_case(num_tokens, num_topk, num_experts, num_ranks):
    from dskernels.ops.ep import _has_cuda_layout_kernel, ep_get_dispatch_layout

    moved = num_tokens * num_topk * 8 + num_tokens * num_ranks + 4 * (num_experts + num_ranks)
    return Case(op="ep_get_dispatch_layout",
                params={"T": num_tokens, "K": num_topk, "E": num_experts, "R": num_ranks},
                make_inputs=lambda device: (_routing(num_tokens, num_topk, num_experts, device=device),),
                run=lambda t: ep_get_dispatch_layout(t, num_experts, num_ranks),
                reference=lambda t: ref_ep.get_dispatch_layout(t.cpu(), num_experts, num_ranks),
                check=_same, flops=0.0, bytes=moved,
                backends=("ref", "triton", "cuda") if _has_cuda_layout_kernel() else ("ref", "triton"))


def _send_plan(num_tokens, num_topk, num_experts, num_ranks, device):
    topk = _routing(num_tokens, num_topk, num_experts, device="cpu")
    in_rank = ref_ep.get_dispatch_layout(topk, num_experts, num_ranks)[2]
    dest_token = in_rank.t().nonzero()
    combine_index = torch.full((num_ranks, num_tokens), -1, dtype=torch.int64)
    combine_index[dest_token[:, 0], dest_token[:, 1]] = torch.arange(dest_token.shape[0])
    return dest_token[:, 1].contiguous().to(device), combine_index.t().contiguous().to(device)


def _pack_case(num_tokens, hidden, num_topk, num_experts, num_ranks):
    """The dispatch send buffer: (fp8 x | fp32 scales | int64 topk ids | fp32 weights) of every
    (token, destination) pair, as int32 words, 16-byte aligned fields: Buffer.dispatch's pack."""
    from dskernels.ops.ep import pack_rows

    words = [hidden // 4, hidden // 128, 2 * num_topk, num_topk]
    offsets, at = [], 0
    for w in words:
        offsets.append(at)
        at += -(-w // 4) * 4
    row_bytes = 4 * at
    src_idx_cpu, _ = _send_plan(num_tokens, num_topk, num_experts, num_ranks, "cpu")
    sends = src_idx_cpu.shape[0]

    def make_inputs(device):
        g = torch.Generator().manual_seed(1)
        segments = [torch.randint(-2**31, 2**31 - 1, (num_tokens, w), generator=g, dtype=torch.int32).to(device)
                    for w in words]
        return (*segments, src_idx_cpu.to(device))

    def run(*args):
        *segments, src_idx = args
        out = torch.empty(src_idx.shape[0], at, dtype=torch.int32, device=src_idx.device)
        pack_rows(segments, offsets, src_idx, out)
        return out

    def reference(*args):
        *segments, src_idx = args
        out = torch.zeros(src_idx.shape[0], at, dtype=torch.int32)
        ref_ep.pack_rows([s.cpu() for s in segments], offsets, src_idx.cpu(), out)
        return out

    def check(actual, expected):  # padding words between fields are never written: compare fields only
        for off, w in zip(offsets, words):
            if not torch.equal(actual[:, off: off + w].cpu(), expected[:, off: off + w]):
                return f"field at word {off} differs from python_ref"
        return None

    def torch_peer(*args):  # what eager PyTorch needs: one index_select per field, then a cat
        *segments, src_idx = args
        return torch.cat([s.index_select(0, src_idx) for s in segments], dim=1)

    def peer_check(packed, expected, *args):  # the peer's fields side by side, unpadded: placed, then compared
        if tuple(packed.shape) != (sends, sum(words)):
            return f"shape {tuple(packed.shape)}, expected {(sends, sum(words))}"
        starts = [sum(words[:i]) for i in range(len(words))]
        for off, start, w in zip(offsets, starts, words):
            if not torch.equal(packed[:, start: start + w].cpu(), expected[:, off: off + w]):
                return f"field at word {off} differs from python_ref"
        return None

    return Case(op="ep_pack", params={"T": num_tokens, "H": hidden, "K": num_topk, "E": num_experts,
                                      "R": num_ranks, "S": sends, "row_bytes": row_bytes},
                make_inputs=make_inputs, run=run, reference=reference, check=check, flops=0.0,
                bytes=float(num_tokens + sends) * 4 * sum(words), peers={"torch index_select+cat": torch_peer},
                peer_checks={"torch index_select+cat": peer_check},
                backends=("ref", "triton"))


def _combine_case(num_tokens, hidden, num_topk, num_experts, num_ranks):
    from dskernels.ops.ep import gather_reduce

    src_idx, index = _send_plan(num_tokens, num_topk, num_experts, num_ranks, "cpu")
    sends = src_idx.shape[0]

    def make_inputs(device):
        g = torch.Generator().manual_seed(2)
        y = torch.randn(sends, hidden, generator=g).to(torch.bfloat16)
        return y.to(device), index.to(device)

    def run(y, idx):
        out = torch.empty(idx.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
        gather_reduce(y, idx, None, out)
        return out

    def reference(y, idx):
        out = torch.empty(idx.shape[0], y.shape[1], dtype=y.dtype)
        ref_ep.gather_reduce(y.cpu(), idx.cpu(), None, out)
        return out

    def torch_peer(y, idx):  # the same math in eager PyTorch: gather, mask, sum
        rows = y[idx.clamp(min=0)].float() * (idx >= 0)[..., None]
        return rows.sum(1).to(y.dtype)

    def peer_check(out, expected, y, idx):
        """torch's sum(1) adds a token's rows in another order than python_ref's (in order, fp32):
        each fp32 sum is within (R - 1) * 2^-24 * sum|y| of the exact one, and each is rounded to
        bf16 once (half an ulp: <= 2^-9 relative), so |out - expected| <= 2 * 2^-9 |sum| + 2 (R - 1)
        2^-24 sum|y|; bounded by 2^-7 |expected| + R * 2^-23 sum|y| (|sum| <= (1 + 2^-8) |expected|)."""
        if out.shape != expected.shape or out.dtype != expected.dtype:
            return f"{out.dtype} {tuple(out.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
        magnitude = (y.float().abs()[idx.clamp(min=0)] * (idx >= 0)[..., None]).sum(1).cpu()
        err = (out.float().cpu() - expected.float()).abs()
        off = (err > 2**-7 * expected.float().abs() + idx.shape[1] * 2**-23 * magnitude).sum().item()
        return None if off == 0 else f"{off} values beyond the bf16 rounding of python_ref's sums"

    return Case(op="ep_combine_reduce", params={"T": num_tokens, "H": hidden, "R": num_ranks, "S": sends},
                make_inputs=make_inputs, run=run, reference=reference, check=_same, flops=0.0,
                bytes=2.0 * (sends + num_tokens) * hidden, peers={"torch": torch_peer},
                peer_checks={"torch": peer_check},
                backends=("ref", "triton"))


def _low_latency_send_case(max_tokens, hidden, num_topk, num_experts, num_ranks):
    """low_latency_dispatch's send blocks, FP8: x read once, cast, and written to the blocks of the
    ranks that hold one of each token's experts, plus every row's ids in every block (M = T rows)."""
    from dskernels.ops.ep import low_latency_send

    offsets = [0, hidden, hidden + -(-(hidden // 32) // 16) * 16]
    row_bytes = offsets[2] + -(-8 * num_topk // 16) * 16
    topk = _routing(max_tokens, num_topk, num_experts, seed=3)
    to_rank = ref_ep.get_dispatch_layout(topk, num_experts, num_ranks)[2].t()  # [R, T]
    pairs = int(to_rank.sum())  # (token, rank) pairs that carry a payload
    # The bytes the definition fixes: every row's ids, and the payload (x and scales) of the rows of
    # the ranks holding one of the token's experts; the other payload bytes are never read.
    specified = torch.zeros(num_ranks, max_tokens, row_bytes, dtype=torch.bool)
    specified[:, :, offsets[2]: offsets[2] + 8 * num_topk] = True
    specified[:, :, : offsets[2]] = to_rank[:, :, None]
    specified[:, :, hidden + hidden // 32: offsets[2]] = False  # padding after the scales

    def make_inputs(device):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(max_tokens, hidden, generator=g).to(torch.bfloat16).to(device)
        send = torch.empty(num_ranks, max_tokens, row_bytes, dtype=torch.uint8, device=device)
        return x, topk.to(device), send

    def run(x, idx, send):  # fills the same buffer each time, as the dispatch fills a fresh one
        low_latency_send(x, idx, num_experts, True, send, offsets)
        return send

    def reference(x, idx, send):
        want = torch.zeros(send.shape, dtype=torch.uint8)
        ref_ep.low_latency_send(x.cpu(), idx.cpu(), num_experts, True, want, offsets)
        return want

    def check(actual, expected):
        return None if torch.equal(actual.cpu()[specified], expected[specified]) else "differs from python_ref"

    def torch_peer(x, idx, send):  # the reference's torch ops on the GPU: cast, then a masked copy per field
        ref_ep.low_latency_send(x, idx, num_experts, True, send, offsets)
        return send

    moved = max_tokens * hidden * 2 + pairs * (hidden + hidden // 32) + num_ranks * max_tokens * 8 * num_topk
    return Case(op="ep_low_latency_send", params={"M": max_tokens, "H": hidden, "K": num_topk, "E": num_experts,
                                                  "R": num_ranks, "pairs": pairs, "fp8": True},
                make_inputs=make_inputs, run=run, reference=reference, check=check, flops=0.0, bytes=float(moved),
                peers={"torch": torch_peer}, backends=("ref", "triton"))


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":
        return [_layout_case(61, 8, 64, 8), _pack_case(37, 256, 4, 32, 4), _combine_case(37, 256, 4, 32, 4),
                _low_latency_send_case(9, 384, 3, 12, 3)]
    found = [_layout_case(4096, 8, 256, 8), _pack_case(4096, HIDDEN, 8, 256, 8),
             _combine_case(4096, HIDDEN, 8, 256, 8), _low_latency_send_case(128, HIDDEN, 8, 256, 8)]
    if not quick:
        found += [_layout_case(4096, 8, 256, 64), _layout_case(128, 8, 256, 8),
                  _pack_case(128, HIDDEN, 8, 256, 8), _combine_case(128, HIDDEN, 8, 256, 8)]
    return found


# ---- the analytic model of the all-to-all ----

# DeepEP's published normal-kernel bottleneck bandwidths (GB/s; dispatch, combine), from the DeepEP
# README's normal-kernel table (the V1 table, kept in its docs/legacy.md after V2): H800 (~160 GB/s
# NVLink) with ConnectX-7 400 Gb/s InfiniBand (~50 GB/s), 4096 tokens per batch, hidden 7168,
# top-4 groups, top-8 experts, FP8 dispatch and BF16 combine. EP8 is NVLink, the rest RDMA.
DEEPEP_NORMAL_GBPS = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}


def _p_hit(pool: int, own: int, k: int) -> float:
    """P(a set of `own` experts gets at least one of k drawn without replacement from `pool`)."""
    if pool - own < k:
        return 1.0
    return 1.0 - math.comb(pool - own, k) / math.comb(pool, k)


def traffic_model(ep: int, num_tokens: int = 4096, hidden: int = HIDDEN, num_topk: int = 8,
                  num_experts: int = 256, topk_groups: int = 4) -> dict:
    """Expected bytes one rank sends in a dispatch (received is the same, by symmetry).

    Routing as DeepEP benchmarks it: experts grouped by node (8 GPUs per node); each token picks
    min(topk_groups, nodes) nodes, then top-K experts uniformly among those nodes' experts.
    - dest_ranks: E[ranks holding >= 1 of a token's experts] (ours and DeepEP's NVLink traffic:
      one copy per destination rank); dest_nodes: E[nodes hit] (DeepEP's RDMA traffic: one copy
      per remote node, forwarded over NVLink inside it).
    - dispatch row: FP8 hidden + fp32 scale per 128 (DeepEP counts the same, `(1 + 4/128) H`);
      combine row: BF16 hidden (2H).
    - ours_bytes: what this library sends over the inter-node link (torch.distributed all-to-all
      sends per destination rank, so a token reaching 3 ranks of a remote node crosses 3 times).
    - ours_fixed_dispatch_bytes: the same with num_worst_tokens (host-sync free, CUDA-graph mode):
      a block of num_tokens rows to every other rank (every rank off the node, across nodes),
      whatever the routing.
    """
    nodes = max(1, ep // GPUS_PER_NODE)
    chosen = min(topk_groups, nodes)
    pool = num_experts * chosen // nodes
    per_rank = num_experts // ep
    ranks_in_pool = pool // per_rank
    dest_ranks = ranks_in_pool * _p_hit(pool, per_rank, num_topk)
    dest_nodes = chosen * _p_hit(pool, num_experts // nodes, num_topk)
    dispatch_row = hidden * (1 + 4 / 128)
    combine_row = hidden * 2
    if nodes == 1:  # NVLink all-to-all: every remote rank counts
        remote_ranks = dest_ranks * (ep - 1) / ep
        deepep_copies = remote_ranks
        fixed_copies = ep - 1
    else:  # the inter-node link is the bottleneck: copies leaving the node
        remote_ranks = dest_ranks * (nodes - 1) / nodes
        deepep_copies = dest_nodes * (nodes - 1) / nodes
        fixed_copies = ep * (nodes - 1) / nodes
    return {"ep": ep, "nodes": nodes, "dest_ranks": dest_ranks, "dest_nodes": dest_nodes,
            "ours_dispatch_bytes": num_tokens * remote_ranks * dispatch_row,
            "ours_fixed_dispatch_bytes": num_tokens * fixed_copies * dispatch_row,
            "ours_combine_bytes": num_tokens * remote_ranks * combine_row,
            "deepep_dispatch_bytes": num_tokens * deepep_copies * dispatch_row,
            "deepep_combine_bytes": num_tokens * deepep_copies * combine_row}


def model_table(nvlink_gbps: float = 160.0, rdma_gbps: float = 50.0) -> str:
    head = ("EP | nodes | ranks/token | nodes/token | link | ours dispatch MB | ours t_disp us | ours combine MB | "
            "ours t_comb us | ours fixed-block disp MB | DeepEP disp MB | DeepEP published GB/s (disp, comb) | "
            "DeepEP t_disp us | DeepEP t_comb us")
    lines = [head, "-" * len(head)]
    for ep in (8, 16, 32, 64):
        m = traffic_model(ep)
        link = nvlink_gbps if m["nodes"] == 1 else rdma_gbps
        pub_d, pub_c = DEEPEP_NORMAL_GBPS[ep]
        lines.append(" | ".join([
            f"{ep}", f"{m['nodes']}", f"{m['dest_ranks']:.2f}", f"{m['dest_nodes']:.2f}",
            f"{'NVLink' if m['nodes'] == 1 else 'RDMA'} {link:.0f} GB/s",
            f"{m['ours_dispatch_bytes'] / 1e6:.1f}", f"{m['ours_dispatch_bytes'] / link / 1e3:.0f}",
            f"{m['ours_combine_bytes'] / 1e6:.1f}", f"{m['ours_combine_bytes'] / link / 1e3:.0f}",
            f"{m['ours_fixed_dispatch_bytes'] / 1e6:.1f}",
            f"{m['deepep_dispatch_bytes'] / 1e6:.1f}", f"{pub_d}, {pub_c}",
            f"{m['deepep_dispatch_bytes'] / pub_d / 1e3:.0f}", f"{m['deepep_combine_bytes'] / pub_c / 1e3:.0f}"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvlink-gbps", type=float, default=160.0, help="per-GPU NVLink bandwidth (H800: ~160)")
    parser.add_argument("--rdma-gbps", type=float, default=50.0, help="per-GPU NIC bandwidth (CX7 400 Gb/s: ~50)")
    args = parser.parse_args()
    print("Per-rank all-to-all traffic, 4096 tokens, hidden 7168, top-8 of 256 experts, top-4 node groups;\n"
          "FP8 dispatch ((1 + 4/128) H bytes per copy), BF16 combine (2H). 'ours' = this library over\n"
          "torch.distributed (one copy per destination rank; 'fixed-block' = dispatch with num_worst_tokens,\n"
          "a block of every token to every rank); 'DeepEP' = one copy per remote node over RDMA\n"
          "(NVLink forwarding inside the node), timed at DeepEP's published bandwidths (H800, CX7; README).\n")
    print(model_table(args.nvlink_gbps, args.rdma_gbps))


if __name__ == "__main__":
    main()
