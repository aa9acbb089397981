"""DeepSeek-V3.2's indexer logits (fp8_mqa_logits, fp8_paged_mqa_logits) on DeepGEMM's shapes.

Counted as DeepGEMM's tests/test_attention.py counts them, with `seen` the number of (query, key)
pairs a query sees:
    fp8_mqa_logits:       FLOPs = 2 * seen * H * D
                          bytes = q + k + k scales + weights + ks + ke + 4 * seen (logits written)
    fp8_paged_mqa_logits: FLOPs = 2 * sum(context_lens) * next_n * H * D
                          bytes = q + weights + context_lens + sum(lens) * (D + 4) + 4 * sum(lens) /
                                  page_size (the block table) + 4 * sum(lens) * next_n (logits)
Peer: PyTorch widens the fp8 operands to bf16, one einsum over all heads, relu, weights, sum.
Checked against python_ref before it is timed (_peer_check): its bf16 einsum rounds each score.
"""

from __future__ import annotations

import math

import torch

import dskernels
import python_ref.indexer as ref
from benchmarks.common import Case
from dskernels.testing import calc_diff


def _check(out, expected):
    """-inf in the same places; elsewhere calc_diff < 1e-5 (DeepGEMM's tests allow 1e-3 against
    the bf16 inputs; against the dequantized ones the fp32 sums differ far less)."""
    out, expected = out.float(), expected.float().to(out.device)
    if out.shape != expected.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    unseen = expected.isneginf()
    if not torch.equal(out.isneginf(), unseen):
        return "-inf (unseen keys) in different places than python_ref"
    diff = calc_diff(out.masked_fill(unseen, 0.0), expected.masked_fill(unseen, 0.0))
    return None if diff < 1e-5 else f"calc_diff {diff:.3g} >= 1e-5"


def _peer_check(relative):
    """check(peer_output, expected, *inputs) for a torch peer whose bf16 einsum rounds each score
    (and, relative = 2^-7, whose keys are also rounded to bf16 first): score h of a logit moves by at
    most 2^-9 * sum_d |q_hd k_d| per rounding, so the logit by relative * sum_h |w_h| sum_d |q_hd k_d|
    (the peer's own math on |q|, |k|, |w| in fp32: magnitude=True), the bound doubled for the fp32
    sums' order; -inf (unseen keys) in the same places."""
    def check(out, expected, *inputs):
        peer = torch_mqa if len(inputs) == 5 else torch_paged
        if out.shape != expected.shape:
            return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
        out, expected = out.float(), expected.float().to(out.device)
        unseen = expected.isneginf()
        if not torch.equal(out.isneginf(), unseen):
            return "-inf (unseen keys) in different places than python_ref"
        bound = relative * peer(*inputs, magnitude=True).masked_fill(unseen, 0.0)
        off = ((out - expected).masked_fill(unseen, 0.0).abs() > bound).sum().item()
        return None if off == 0 else f"{off} logits beyond the bf16 scores' rounding of python_ref's"
    return check


def torch_mqa(q, kv, weights, ks, ke, magnitude=False):
    """magnitude: sum_h |w_h| * k_scale * sum_d |q_hd k_d| in fp32 instead (the check's bound)."""
    k, k_scale = kv
    dtype = torch.float32 if magnitude else torch.bfloat16
    if magnitude:
        q, k, weights = q.float().abs(), k.float().abs(), weights.abs()
    scores = torch.einsum("mhd,nd->mhn", q.to(dtype), k.to(dtype)).float() * k_scale
    logits = (scores.relu_() * weights[..., None]).sum(dim=1)
    cols = torch.arange(k.shape[0], device=q.device)
    return logits.masked_fill((cols < ks[:, None]) | (cols >= ke[:, None]), -math.inf)


def _mqa_case(m, n, heads, dim, seed=0):
    def windows(device):
        # DeepGEMM's "no context parallelism" case: query i sees keys [0, n - m + i].
        ks = torch.zeros(m, dtype=torch.int32)
        ke = torch.arange(m, dtype=torch.int32) + (n - m + 1)
        return ks.to(device), ke.to(device)

    ks, ke = windows("cpu")
    seen = int((ke.clamp(max=n) - ks.clamp(min=0)).clamp(min=0).sum())
    flops = 2.0 * seen * heads * dim
    moved = float(m * heads * dim + n * dim + 4 * n + 4 * m * heads + 8 * m + 4 * seen)

    def make_inputs(device):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(m, heads, dim, generator=gen).to(torch.float8_e4m3fn)
        k, k_scale = ref.per_custom_dims_cast_to_fp8(torch.randn(n, dim, generator=gen), (0,))
        weights = torch.randn(m, heads, generator=gen)
        return (q.to(device), (k.to(device), k_scale.to(device)), weights.to(device), *windows(device))

    def run(q, kv, weights, ks, ke):
        return dskernels.fp8_mqa_logits(q, kv, weights, ks, ke)

    def reference(q, kv, weights, ks, ke):
        return ref.fp8_mqa_logits(q, kv[0], kv[1], weights, ks, ke)

    return Case(op="fp8_mqa_logits", params={"m": m, "n": n, "h": heads, "d": dim}, make_inputs=make_inputs,
                run=run, reference=reference, check=_check, flops=flops, bytes=moved, peers={"torch": torch_mqa},
                peer_checks={"torch": _peer_check(2**-8)},
                backends=("ref", "triton"), compute_dtype="fp8")


def torch_paged(q, kv_cache, weights, context_lens, block_table, max_len, magnitude=False):
    """magnitude: as torch_mqa's (the check's bound)."""
    b, next_n, heads, dim = q.shape
    page_size = kv_cache.shape[1]
    pages = block_table[:, : -(-max_len // page_size)].long().clamp(0, kv_cache.shape[0] - 1)
    keys = ref.paged_k_cache_dequantize(kv_cache, dim)[pages].reshape(b, -1, dim)[:, :max_len]
    dtype = torch.float32 if magnitude else torch.bfloat16
    if magnitude:
        q, keys, weights = q.float().abs(), keys.float().abs(), weights.abs()
    scores = torch.einsum("bjhd,btd->bjht", q.to(dtype), keys.to(dtype)).float()
    logits = (scores.relu_() * weights.reshape(b, next_n, heads, 1)).sum(dim=2)
    limit = context_lens[:, None] - next_n + 1 + torch.arange(next_n, device=q.device)
    logits = logits.masked_fill(torch.arange(keys.shape[1], device=q.device) >= limit[..., None], -math.inf)
    return logits.reshape(b * next_n, -1)


def _paged_case(b, next_n, heads, dim, avg_len, page_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.7 * avg_len), int(1.3 * avg_len) + 1, (b,), generator=gen)
    max_len = int(lengths.max())
    total = int(lengths.sum())
    flops = 2.0 * total * next_n * heads * dim
    moved = float(b * next_n * heads * (dim + 4) + 4 * b + total * (dim + 4) + 4 * total / page_size
                  + 4 * total * next_n)

    def make_inputs(device):
        g = torch.Generator().manual_seed(seed + 1)
        pages_per_seq = [-(-int(n) // page_size) for n in lengths]
        num_pages = sum(pages_per_seq)
        order = torch.randperm(num_pages, generator=g).int()
        block_table = torch.zeros(b, max(pages_per_seq), dtype=torch.int32)
        used = 0
        for i, pages in enumerate(pages_per_seq):
            block_table[i, :pages] = order[used:used + pages]
            used += pages
        kv_cache = ref.paged_k_cache_cast_to_fp8(torch.randn(num_pages, page_size, 1, dim, generator=g))
        q = torch.randn(b, next_n, heads, dim, generator=g).to(torch.float8_e4m3fn)
        weights = torch.randn(b * next_n, heads, generator=g)
        return (q.to(device), kv_cache.to(device), weights.to(device), lengths.int().to(device),
                block_table.to(device), max_len)

    def run(q, kv_cache, weights, context_lens, block_table, max_len):
        return dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, None, max_len, True)

    def reference(q, kv_cache, weights, context_lens, block_table, max_len):
        return ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_len)

    params = {"b": b, "next_n": next_n, "h": heads, "d": dim, "avg_len": avg_len, "page": page_size}
    return Case(op="fp8_paged_mqa_logits", params=params, make_inputs=make_inputs, run=run, reference=reference,
                check=_check, flops=flops, bytes=moved, peers={"torch": torch_paged},
                peer_checks={"torch": _peer_check(2**-7)}, backends=("ref", "triton"),
                compute_dtype="fp8")


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":
        return [_mqa_case(6, 70, 4, 32), _paged_case(3, 2, 4, 32, 60, 16)]
    found = [_mqa_case(2048, 8192, 64, 128), _paged_case(64, 1, 64, 128, 8192, 64),
             _paged_case(64, 2, 64, 128, 8192, 64)]
    if not quick:
        found += [_mqa_case(4096, 8192, 64, 128), _paged_case(128, 1, 64, 128, 32768, 64),
                  _paged_case(64, 1, 64, 128, 8192, 32)]
    return found
