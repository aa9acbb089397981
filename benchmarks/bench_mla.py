"""MLA decode (flash_mla_with_kvcache) on FlashMLA's benchmark shapes.

Counted as FlashMLA's tests/test_flash_mla.py counts them, with total = sum of the lengths:
    FLOPs = 2 * s_q * h_q * (d + dv) * total          (= b*h_q*s_q*(2d + 2dv)*seqlen for fixed lengths)
    bytes = (total * h_kv * d + b * s_q * h_q * d + b * s_q * h_q * dv) * element size
i.e. the KV cache read once, q read once, out written once (LSE and the split buffers not counted).
The metadata is computed once per case, backend and variant (the sm90 kernel's tiles have 64 rows,
the Triton kernel's 32; batch-invariant mode and its K plan b * K partitions), outside the timed
region (as FlashMLA does).

Peer: a batched PyTorch decode (gather every page of the block table, masked softmax in fp32, two
bf16 matmuls), not the per-sequence oracle. With variable lengths it pads every sequence to the
longest, as a batched PyTorch decode must (about 2x the keys of sum(lengths) in FlashMLA's varlen
draw): its "x peer" there includes that padding, which ours never reads. The peers are checked
against python_ref before they are timed, within bounds that follow from their bf16 scores
(_attend_bounds).

Sparse MLA (DeepSeek-V3.2; flash_mla_sparse_decode / flash_mla_sparse_fwd), counted per listed
entry, with rows = b * s_q (decode) or s_q (prefill):
    FLOPs = 2 * rows * h_q * topk * (d + dv)
    bytes = rows * h_kv * topk * (bytes per cached token: 656 in V3.2's FP8 layout, 2 d in bf16)
            + rows * h_q * (d + dv) * 2
i.e. every listed token read once per query row (rows that share a token read it again) and the
list itself not counted. Each query row gets its own list (MTP's two rows of a sequence included),
so that the counted reads are not served by L2. Peer: PyTorch gathers the listed rows
(dequantizing the FP8 ones), masks and runs two bf16 matmuls.
"""

from __future__ import annotations

import math
import os

import torch

import dskernels
import python_ref.mla
import python_ref.mla_sparse
from benchmarks.common import Case
from dskernels.ops import mla as mla_ops

FP8 = torch.float8_e4m3fn

# The sm90 kernel's bring-up switches (docs/mla.md), timed beside the default path: how much the
# TMA page loads and the 2-CTA clusters each bring.
MLA_CUDA_VARIANTS = {"no_tma": {"DSKERNELS_MLA_NO_TMA": "1"}, "cluster": {"DSKERNELS_MLA_CLUSTER": "1"}}
# fp8 caches: the opt-in TMA path (raw blocks widened in place; REQUIRE_TMA: an error rather than a
# silent register path if the driver refuses the tensor map), timed only when the environment says
# its tests passed in this device call (scripts/gpu_check.sh sets DSKERNELS_MLA_FP8_TMA_TESTED after
# tests/test_mla_sm90_fp8_tma.py): a path never run before may trap and end the CUDA context.
MLA_FP8_CUDA_VARIANTS = {"fp8_tma": {"DSKERNELS_MLA_FP8_TMA": "1", "DSKERNELS_MLA_REQUIRE_TMA": "1"}}
# The opt-in seesaw consumers (both warp groups score alternate key blocks), likewise timed only once
# tests/test_mla_sm90_seesaw.py passed in this device call (DSKERNELS_MLA_SEESAW_TESTED).
MLA_SEESAW_CUDA_VARIANTS = {"seesaw": {"DSKERNELS_MLA_SEESAW": "1"}}
# The opt-in narrow kernel (keys on wgmma's M, for s_q * h_q / h_kv <= 32 rows; elsewhere the flag
# changes nothing), likewise timed only once tests/test_mla_sm90_narrow.py passed in this device
# call (DSKERNELS_MLA_NARROW_TESTED).
MLA_NARROW_CUDA_VARIANTS = {"narrow": {"DSKERNELS_MLA_NARROW": "1"}}
# Batch-invariant mode (docs/mla.md "Batch invariance"): each sequence cut by its own length into
# at most K pieces, K = 4 (the default) and K = 1 (one split per sequence, vLLM's choice), timed
# beside the default plan to measure what the mode costs (the triton[invariant] / cuda[invariant] rows).
MLA_INVARIANT_VARIANTS = {"invariant": {"DSKERNELS_BATCH_INVARIANT": "1"},
                          "invariant_k1": {"DSKERNELS_BATCH_INVARIANT": "1", "DSKERNELS_MLA_INVARIANT_SPLITS": "1"}}
# The sparse decode in the mode: its splits follow topk and the heads, not the rows (K at its default).
SPARSE_INVARIANT_VARIANT = {"invariant": {"DSKERNELS_BATCH_INVARIANT": "1"}}
# Sparse MLA's opt-in wide Triton tiles (up to 64 heads; V3.2's FP8 cache with its scales applied
# to scores and probabilities), timed only once tests/test_mla_sparse_wide.py passed in this device
# call (DSKERNELS_SPARSE_MLA_WIDE_TESTED).
SPARSE_WIDE_TRITON_VARIANTS = {"wide": {"DSKERNELS_SPARSE_MLA_TILE": "wide"}}


def _sparse_variants(d: int) -> dict:
    """The sparse cases' Triton variants: the wide tiles (for d = 576) once their tests passed."""
    tested = os.environ.get("DSKERNELS_SPARSE_MLA_WIDE_TESTED") == "1"
    return SPARSE_WIDE_TRITON_VARIANTS if d == 576 and tested else {}


# The Triton kernel's tile (dskernels/triton/mla.py tile_config; BLOCK_M 0 = the default rule's):
# 32-key blocks (the default until an H200 measured 64 keys 1.4x faster, 2026-12-04), 64 keys in
# one buffer, and 64 keys over 16 warps (twice the registers per tile: do the spills matter?).
# (Dropped after that run: 32 keys in one or three buffers, 16 keys; all slower.)
MLA_TRITON_VARIANTS = {name: {"DSKERNELS_MLA_TRITON_TILE": tile} for name, tile in
                       [("keys32", "0,32,8,5"), ("keys64_one_buffer", "0,64,8,2"), ("keys64_16_warps", "0,64,16,5")]}


def _attend(queries, keys, hidden, scale, dv, keys_rounded=False):
    """The peers' attention: scores of bf16 matmuls (rounded to bf16), masked softmax in fp32, P
    rounded to bf16, times V (keys[..., :dv]). queries [..., rows, d], keys [..., L, d], hidden:
    broadcast to the scores [..., rows, L], True where a key is not seen. -> (out, lse; +inf where
    no key is seen). keys_rounded: for _attend_bounds (keys dequantized and rounded to bf16)."""
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)
    out = torch.matmul(probs.to(queries.dtype), keys[..., :dv])
    return out, lse.masked_fill(lse == -math.inf, math.inf)


def _attend_bounds(queries, keys, hidden, scale, dv, keys_rounded=False):
    """How far _attend's answer may be from the exact one, per output element and per lse, in the
    shapes _attend returns. Score j, summed in fp32 (error <= d 2^-24 A_j, A_j = sum_d |q_d k_jd|)
    and rounded to bf16 (<= 2^-9 |s_j|), moves by at most delta_j = scale * (2^-9 |s_j| + d 2^-23
    A_j) (the fp32 term doubled: second-order and margin). keys_rounded (keys given in fp32, which
    the peer rounds to bf16 first): plus the exact change that rounding makes, |q . (bf16(k_j) -
    k_j)|, times 1 + 2^-8 (its share of the score's own rounding). So lse moves by at most D =
    max_j delta_j over the seen keys, each p_j by a factor within e^(+-2D), and out by
    (e^(2D) - 1) sum_j p_j |v_j|, plus P's bf16 rounding and a rounded V's (2^-9 sum_j p_j |v_j|
    each: 2^-7 here, with margin). In fp32 from the same gathered operands, a few rows of the
    leading dimension at a time (fp32 scores of a whole V3 batch at 32K keys take GBs each)."""
    hidden = hidden.expand(*queries.shape[:-1], keys.shape[-2])
    step = max(1, 2**27 // max(1, hidden[0].numel()))
    parts = [_attend_bounds_rows(queries[i:i + step], keys[i:i + step], hidden[i:i + step], scale, dv, keys_rounded)
             for i in range(0, queries.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _attend_bounds_rows(queries, keys, hidden, scale, dv, keys_rounded):
    q32, k32 = queries.float(), keys.float()
    exact = q32 @ k32.transpose(-1, -2)
    magnitude = q32.abs() @ k32.abs().transpose(-1, -2)
    delta = 2**-9 * exact.abs() + q32.shape[-1] * 2**-23 * magnitude
    if keys_rounded:
        delta += (q32 @ (k32.to(torch.bfloat16).float() - k32).transpose(-1, -2)).abs() * (1 + 2**-8)
    delta = (scale * delta).masked_fill(hidden, 0.0).amax(-1)
    probs = torch.softmax((exact * scale).masked_fill(hidden, -math.inf), dim=-1).nan_to_num_(0.0)
    spread = probs @ k32[..., :dv].abs()
    return (torch.expm1(2 * delta)[..., None] + 2**-7) * spread, delta


def _peer_check(peer):
    """check(peer_output, expected, *inputs) for a peer built on _attend: lse within the case's 1e-3
    plus its score rounding's bound, out within a bf16 rounding of python_ref's (2^-7 relative) plus
    its bound (_attend_bounds), +inf lse (no key seen) in the same places."""
    def check(outputs, expected, *inputs):
        out, lse = (t.float().cpu() for t in outputs)
        ref_out, ref_lse = (t.float().cpu() for t in expected)
        if out.shape != ref_out.shape or lse.shape != ref_lse.shape:
            return (f"shape {tuple(out.shape)}/{tuple(lse.shape)}, expected "
                    f"{tuple(ref_out.shape)}/{tuple(ref_lse.shape)}")
        out_bound, lse_bound = (t.cpu() for t in peer(*inputs, attend=_attend_bounds))
        if not torch.equal(lse.isinf(), ref_lse.isinf()):
            return "lse: +inf (no visible key) in different places than python_ref"
        finite = ref_lse.isfinite()
        if not torch.all((lse - ref_lse).abs()[finite] <= 1e-3 + lse_bound[finite]):
            return "lse: beyond its bf16 scores' bound of python_ref's"
        off = ((out - ref_out).abs() > 2**-7 * ref_out.abs() + out_bound).sum().item()
        return None if off == 0 else f"out: {off} values beyond their bf16 bound of python_ref's"
    return check


def torch_batched_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, causal=False, k_scale=None,
                         attend=_attend):
    """The plain PyTorch way: pad every sequence to the block table's width. attend: _attend, or
    _attend_bounds for its check."""
    b, s_q, h_q, d = q.shape
    num_pages, page_size, h_kv, _ = k_cache.shape
    group = h_q // h_kv
    keys = k_cache[block_table.long().clamp(0, num_pages - 1)]          # [b, pages, page, h_kv, d]
    keys = keys.reshape(b, -1, h_kv, d).transpose(1, 2)                  # [b, h_kv, L, d]
    if k_cache.dtype == FP8:
        keys = (keys.float() * k_scale).to(q.dtype)
    queries = q.reshape(b, s_q, h_kv, group, d).permute(0, 2, 1, 3, 4).reshape(b, h_kv, s_q * group, d)
    t = torch.arange(keys.shape[2], device=q.device)
    j = torch.arange(s_q, device=q.device).repeat_interleave(group)
    limit = cache_seqlens[:, None].long() - (s_q - 1 - j[None, :] if causal else 0)  # [b, s_q*group]
    hidden = t[None, None, None, :] >= limit[:, None, :, None]
    out, lse = attend(queries, keys, hidden, d ** -0.5, head_dim_v)    # [b, h_kv, s_q*group, dv], [.., s_q*group]
    out = out.reshape(b, h_kv, s_q, group, head_dim_v).permute(0, 2, 1, 3, 4).reshape(b, s_q, h_q, head_dim_v)
    return out, lse.reshape(b, h_kv, s_q, group).permute(0, 1, 3, 2).reshape(b, h_q, s_q)


def _check(outputs, expected):
    out, lse = (t.cpu() for t in outputs)
    ref_out, ref_lse = (t.cpu() for t in expected)
    if out.shape != ref_out.shape or lse.shape != ref_lse.shape:
        return f"shape {tuple(out.shape)}/{tuple(lse.shape)}, expected {tuple(ref_out.shape)}/{tuple(ref_lse.shape)}"
    if not torch.equal(lse.isinf(), ref_lse.isinf()):
        return "lse: +inf (no visible key) in different places than python_ref"
    finite = ref_lse.isfinite()
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    if not lse_err <= 1e-3:
        return f"lse: max error {lse_err:.3g} > 1e-3"
    # bf16 out: 1 ulp (2^-7 relative) from the final rounding, 2^-8 * max|V| from rounding P to bf16.
    err = (out.float() - ref_out.float()).abs()
    bound = ref_out.float().abs() * 2**-7 + 2**-8 * ref_out.float().abs().max().clamp(min=1.0)
    if not torch.all(err <= bound):
        return f"out: max error {err.max().item():.3g} beyond the bf16 bound"
    return None


def _lengths(b, seqlen, varlen, seed):
    if not varlen:
        return [seqlen] * b
    gen = torch.Generator().manual_seed(seed)
    # FlashMLA's varlen benchmark: normal around the mean, std mean / 2.
    lengths = torch.normal(float(seqlen), seqlen / 2, (b,), generator=gen).clamp(1, 2 * seqlen).int()
    return lengths.tolist()


def _case(b, s_q, h_q, h_kv, d, dv, seqlen, varlen, page_size, cache_dtype, causal, seed=0):
    lengths = _lengths(b, seqlen, varlen, seed)
    total = sum(lengths)
    element = torch.empty((), dtype=cache_dtype).element_size()
    flops = 2.0 * s_q * h_q * (d + dv) * total
    moved = float(total * h_kv * d * element + b * s_q * h_q * (d + dv) * 2)

    def make_inputs(device):
        gen = torch.Generator().manual_seed(seed + 1)
        pages_per_seq = [-(-n // page_size) for n in lengths]
        max_pages = max(pages_per_seq)
        num_pages = sum(pages_per_seq)
        order = torch.randperm(num_pages, generator=gen).int()
        block_table = torch.zeros(b, max_pages, dtype=torch.int32)
        used = 0
        for i, pages in enumerate(pages_per_seq):
            block_table[i, :pages] = order[used:used + pages]
            used += pages
        cache = torch.randn(num_pages, page_size, h_kv, d, generator=gen)
        k_scale = None
        if cache_dtype == FP8:
            k_scale = torch.tensor([1 / 64.0], device=device)
            k_cache = (cache * 64).to(FP8).to(device)
        else:
            k_cache = cache.to(cache_dtype).to(device)
        q = torch.randn(b, s_q, h_q, d, generator=gen).to(torch.bfloat16).to(device)
        lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        return q, k_cache, block_table.to(device), lens, dv, causal, k_scale

    # (metadata, num_splits), planned once (untimed) per backend and variant: the plan follows the
    # backend's tile rows and a variant's knobs (DSKERNELS_MLA_CLUSTER pads the tiles to pairs)
    plans = {}

    def run(q, k_cache, block_table, lens, dv, causal, k_scale):
        # (the mode and its K: however the mode was switched on, a plan of the other kind is not reused)
        invariant = dskernels.batch_invariant_enabled()
        key = (dskernels.current_backend(), invariant, invariant and mla_ops.invariant_max_splits(),
               *(os.environ.get(name) for name in knobs))
        if key not in plans:
            plans[key] = dskernels.get_mla_metadata(lens, s_q * h_q // h_kv, h_kv)
        meta, splits = plans[key]
        return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits,
                                                causal=causal, k_scale=k_scale)

    def reference(q, k_cache, block_table, lens, dv, causal, k_scale):
        return python_ref.mla.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, None, causal, k_scale)

    params = {"b": b, "s_q": s_q, "h_q": h_q, "h_kv": h_kv, "d": d, "dv": dv, "seqlen": seqlen,
              "varlen": varlen, "page": page_size, "cache": str(cache_dtype).removeprefix("torch."),
              "causal": causal}
    cuda_variants = (MLA_CUDA_VARIANTS | (MLA_FP8_CUDA_VARIANTS if cache_dtype == FP8 and
                                          os.environ.get("DSKERNELS_MLA_FP8_TMA_TESTED") == "1" else {})
                     | (MLA_SEESAW_CUDA_VARIANTS if os.environ.get("DSKERNELS_MLA_SEESAW_TESTED") == "1" else {})
                     | (MLA_NARROW_CUDA_VARIANTS if os.environ.get("DSKERNELS_MLA_NARROW_TESTED") == "1" and
                        s_q * h_q // h_kv <= 32 else {}))
    cuda_variants |= MLA_INVARIANT_VARIANTS
    triton_variants = (MLA_TRITON_VARIANTS if (d, dv) == (576, 512) else {}) | MLA_INVARIANT_VARIANTS
    # the variables the variants set (a few lookups per call, not a scan of the environment)
    knobs = sorted({name for env in (*cuda_variants.values(), *triton_variants.values()) for name in env})
    return Case(op="flash_mla_with_kvcache", params=params, make_inputs=make_inputs, run=run,
                reference=reference, check=_check, flops=flops, bytes=moved,
                peers={"torch": torch_batched_decode}, peer_checks={"torch": _peer_check(torch_batched_decode)},
                backends=("ref", "triton", "cuda") if (d, dv) == (576, 512) else ("ref", "triton"),
                cuda_variants=cuda_variants, triton_variants=triton_variants)


def torch_sparse(q, kv, indices, sm_scale, dv, fp8, attend=_attend):
    """The plain PyTorch way: gather every listed row (q [R, h_q, d], kv [S, h_kv, width],
    indices [R, h_kv, topk]), dequantize, masked softmax in fp32, two bf16 matmuls (attend: as
    torch_batched_decode's)."""
    rows, h_q, d = q.shape
    num_slots, h_kv, _ = kv.shape
    valid = (indices >= 0) & (indices < num_slots)
    rows_kv = kv[indices.long().clamp(0, max(num_slots - 1, 0)), torch.arange(h_kv, device=q.device)[None, :, None]]
    keys = python_ref.mla_sparse.dequantize_sparse_kv_cache(rows_kv) if fp8 else rows_kv
    if attend is _attend or not fp8:  # (the bounds read the fp32 keys the peer rounds to bf16)
        keys = keys.to(q.dtype)
    queries = q.reshape(rows, h_kv, h_q // h_kv, d)
    out, lse = attend(queries, keys, ~valid[:, :, None, :], sm_scale, dv, keys_rounded=fp8)  # [R, h_kv, group, ..]
    return out.reshape(rows, h_q, dv), lse.reshape(rows, h_q)


def _sparse_lists(rows, h_kv, topk, num_slots, gen):
    """Distinct slots per list (as an indexer's top-k gives), a few -1 holes."""
    idx = torch.argsort(torch.rand(rows * h_kv, num_slots, generator=gen), dim=1)[:, :topk].int()
    idx[torch.rand(idx.shape, generator=gen) < 0.01] = -1
    return idx.reshape(rows, h_kv, topk)


def _sparse_decode_case(b, s_q, h_q, topk, seqlen, fp8, d=576, dv=512, page_size=64, seed=0):
    rows = b * s_q
    token_bytes = python_ref.mla_sparse.FP8_TOKEN_BYTES if fp8 else 2 * d
    flops = 2.0 * rows * h_q * topk * (d + dv)
    moved = float(rows * topk * token_bytes + rows * h_q * (d + dv) * 2)

    def make_inputs(device):
        gen = torch.Generator().manual_seed(seed + 2)
        num_pages = b * -(-seqlen // page_size)
        values = torch.randn(num_pages, page_size, 1, d, generator=gen)
        k_cache = python_ref.mla_sparse.quantize_sparse_kv_cache(values) if fp8 else values.to(torch.bfloat16)
        q = torch.randn(b, s_q, h_q, d, generator=gen).to(torch.bfloat16)
        # Each sequence lists slots of its own pages (the block table already applied).
        # One list per query row (MTP's rows included): bytes count every row's gathers, so rows
        # sharing a list would be credited with reads that L2 serves.
        local = _sparse_lists(b * s_q, 1, topk, seqlen, gen).reshape(b, s_q, topk)
        first = (torch.arange(b) * -(-seqlen // page_size) * page_size).int()[:, None, None]
        indices = torch.where(local >= 0, local + first, -1)
        return q.to(device), k_cache.to(device), indices.to(device), dv, fp8

    def run(q, k_cache, indices, dv, fp8):
        return dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv, is_fp8_kvcache=fp8)

    def reference(q, k_cache, indices, dv, fp8):
        return python_ref.mla_sparse.flash_mla_sparse_decode(q, k_cache, indices, dv, None, fp8)

    def peer(q, k_cache, indices, dv, fp8, attend=_attend):
        flat = k_cache.reshape(-1, 1, k_cache.shape[-1])
        out, lse = torch_sparse(q.reshape(rows, h_q, d), flat, indices.reshape(rows, 1, topk), d ** -0.5, dv, fp8,
                                attend)
        return out.reshape(b, s_q, h_q, dv), lse.reshape(b, s_q, h_q).transpose(1, 2)

    params = {"b": b, "s_q": s_q, "h_q": h_q, "h_kv": 1, "d": d, "dv": dv, "topk": topk, "seqlen": seqlen,
              "page": page_size, "cache": "fp8_v32" if fp8 else "bfloat16"}
    return Case(op="flash_mla_sparse_decode", params=params, make_inputs=make_inputs, run=run,
                reference=reference, check=_check, flops=flops, bytes=moved, peers={"torch": peer},
                peer_checks={"torch": _peer_check(peer)}, backends=("ref", "triton"),
                triton_variants=_sparse_variants(d) | SPARSE_INVARIANT_VARIANT)


def _sparse_prefill_case(s_q, s_kv, h_q, topk, d=576, dv=512, seed=0):
    flops = 2.0 * s_q * h_q * topk * (d + dv)
    moved = float(s_q * topk * d * 2 + s_q * h_q * (d + dv) * 2)

    def make_inputs(device):
        gen = torch.Generator().manual_seed(seed + 3)
        q = torch.randn(s_q, h_q, d, generator=gen).to(torch.bfloat16)
        kv = torch.randn(s_kv, 1, d, generator=gen).to(torch.bfloat16)
        return q.to(device), kv.to(device), _sparse_lists(s_q, 1, topk, s_kv, gen).to(device), d ** -0.5, dv

    def run(q, kv, indices, sm_scale, dv):
        return dskernels.flash_mla_sparse_fwd(q, kv, indices, sm_scale, dv)[::2]  # (out, lse)

    def reference(q, kv, indices, sm_scale, dv):
        return python_ref.mla_sparse.flash_mla_sparse_fwd(q, kv, indices, sm_scale, dv)[::2]

    def peer(q, kv, indices, sm_scale, dv, attend=_attend):
        return torch_sparse(q, kv, indices, sm_scale, dv, False, attend)

    params = {"s_q": s_q, "s_kv": s_kv, "h_q": h_q, "h_kv": 1, "d": d, "dv": dv, "topk": topk}
    return Case(op="flash_mla_sparse_fwd", params=params, make_inputs=make_inputs, run=run,
                reference=reference, check=_check, flops=flops, bytes=moved, peers={"torch": peer},
                peer_checks={"torch": _peer_check(peer)}, backends=("ref", "triton"),
                triton_variants=_sparse_variants(d))


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":
        return [_case(3, 2, 4, 1, 64, 48, 70, True, 16, torch.bfloat16, True),
                _case(2, 1, 4, 2, 64, 48, 90, False, 61, FP8, False),
                _sparse_decode_case(2, 2, 4, 40, 100, False, d=64, dv=48, page_size=16),
                _sparse_prefill_case(3, 50, 4, 24, d=64, dv=48)]
    if quick:  # the two targets (memory-bound and compute-bound) and a varlen batch
        shapes = [(1, 16, 4096, False), (1, 16, 4096, True), (2, 128, 4096, False)]
    else:
        shapes = [(s_q, h_q, seqlen, varlen) for s_q in (1, 2) for h_q in (16, 32, 64, 128)
                  for seqlen in (1024, 4096, 16384) for varlen in (False, True)]
    found = [_case(128, s_q, h_q, 1, 576, 512, seqlen, varlen, 64, torch.bfloat16, s_q > 1)
             for s_q, h_q, seqlen, varlen in shapes]
    found.append(_case(128, 1, 16, 1, 576, 512, 4096, False, 64, FP8, False))
    if not quick:  # page sizes off the TMA path
        found += [_case(128, 1, 16, 1, 576, 512, 4096, False, page, torch.bfloat16, False) for page in (16, 61)]
    # DeepSeek-V3.2 (DSA): top-2048 lists over an FP8 cache; 128 heads (one rank of a
    # data-parallel attention deployment) and 16 (TP8); then the prefill kernel.
    found += [_sparse_decode_case(128, 1, 128, 2048, 8192, True), _sparse_decode_case(64, 2, 16, 2048, 8192, True)]
    found.append(_sparse_prefill_case(512, 8192, 128, 2048))
    return found
