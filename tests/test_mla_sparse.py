"""Sparse MLA (DeepSeek-V3.2): flash_mla_sparse_decode / flash_mla_sparse_fwd on every backend
against python_ref.mla_sparse, and V3.2's FP8 cache layout.

Poison: every cache slot no valid list entry names holds NaN (in the FP8 layout: NaN latent bytes
and NaN scales), the lists hold -1, other negative ids, ids past the cache and repeats, and the
entries past topk_length point at poisoned slots. A kernel that reads any of them returns NaN."""

import math

import numpy
import pytest
import torch

import dskernels
import python_ref.mla_sparse as ref
from test_mla import LSE_ATOL, TOLERANCES, make_inputs

FP8 = torch.float8_e4m3fn
HUGE = 2**31 - 1


def skip_cuda_backend(name):
    if name == "cuda":
        pytest.skip("no sm90 CUDA kernel for sparse MLA yet: auto runs the Triton kernel on CUDA tensors")


def make_lists(rows, topk, num_slots, gen, lengths=None):
    """[rows, topk] int32 slot lists: mostly real slots (with repeats), some -1, other negatives and
    ids past the cache."""
    idx = torch.randint(0, num_slots, (rows, topk), generator=gen, dtype=torch.int32)
    kind = torch.randint(0, 10, (rows, topk), generator=gen)
    idx[kind == 0] = -1
    idx[kind == 1] = -7
    idx[kind == 2] = num_slots
    idx[kind == 3] = HUGE
    return idx


def poison_unlisted(cache_rows: torch.Tensor, lists: torch.Tensor, num_slots: int, fp8: bool) -> None:
    """NaN in every slot (row of cache_rows [num_slots, h_kv, width]) that no valid entry names."""
    used = torch.zeros(num_slots, dtype=torch.bool)
    valid = lists[(lists >= 0) & (lists < num_slots)].long()
    used[valid] = True
    if fp8:
        raw = cache_rows.view(torch.uint8)
        raw[~used, :, :ref.FP8_SCALE_OFFSET] = 0x7F                     # e4m3 NaN
        raw[~used, :, ref.FP8_SCALE_OFFSET:ref.FP8_ROPE_OFFSET] = 0xFF  # fp32 NaN scales
    else:
        cache_rows[~used] = math.nan


def decode_inputs(b, s_q, h_q, h_kv, page_size, num_pages, topk, dtype, fp8, *, d=64, dv=48, lengths=False,
                  sink=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if fp8:
        d, dv = ref.FP8_HEAD_DIM, ref.FP8_NOPE_DIM
    num_slots = num_pages * page_size
    values = torch.randn(num_pages, page_size, h_kv, d, generator=gen)
    k_cache = ref.quantize_sparse_kv_cache(values) if fp8 else values.to(dtype)
    q = torch.randn(b, s_q, h_q, d, generator=gen).to(dtype)
    indices = make_lists(b * s_q, topk, num_slots, gen).reshape(b, s_q, topk)
    topk_length = None
    if lengths:
        topk_length = torch.randint(0, topk + 1, (b,), generator=gen, dtype=torch.int32)
        topk_length[0] = 0  # a sequence that sees nothing
        if b > 1:
            topk_length[1] = topk + 5  # more than listed: all of them
        # Entries past a sequence's length name slots nobody else lists: they get poisoned below.
        cut = torch.arange(topk)[None, None, :] >= topk_length.long()[:, None, None]
        indices = torch.where(cut, num_slots - 1, indices)
        live = torch.where(cut, -1, indices)
    else:
        live = indices
    poison_unlisted(k_cache.view(num_slots, h_kv, -1), live.reshape(-1), num_slots, fp8)
    attn_sink = None
    if sink:
        attn_sink = torch.randn(h_q, generator=gen)
        attn_sink[0] = math.inf   # this head's out must be 0
        attn_sink[-1] = -math.inf  # and this one's unaffected
    return q, k_cache, indices, dv, fp8, topk_length, attn_sink


def vmax_of(k_cache, dv, fp8):
    values = ref.dequantize_sparse_kv_cache(k_cache) if fp8 else k_cache.float()
    values = values[..., :dv]
    values = values[values.isfinite()]
    return values.abs().max().item() if values.numel() else 1.0


def assert_close_to(out, lse, ref_out, ref_lse, dtype, vmax, max_logits=None, ref_max=None):
    assert out.dtype == dtype and lse.dtype == torch.float32
    out, lse = out.cpu().float(), lse.cpu()
    # A poisoned slot read shows as NaN (out and lse) since NaN scores propagate.
    assert not out.isnan().any() and not lse.isnan().any(), "NaN in out or lse: a poisoned slot was read"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out.float(), rtol=tol["rtol"], atol=tol["atol_per_v"] * vmax)
    assert torch.equal(lse.isinf(), ref_lse.isinf()), "queries with no valid index must get lse = +inf"
    assert (lse[lse.isinf()] > 0).all()
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=LSE_ATOL)
    if max_logits is not None:
        max_logits = max_logits.cpu()
        assert torch.equal(max_logits.isneginf(), ref_max.isneginf())
        seen = ref_max.isfinite()
        torch.testing.assert_close(max_logits[seen], ref_max[seen], rtol=1e-5, atol=LSE_ATOL)


# (b, s_q, h_q, h_kv, page_size, num_pages, topk, q dtype, fp8 cache, topk_length, attn_sink)
DECODE_GRID = [
    (2, 1, 4, 1, 16, 5, 70, torch.bfloat16, False, False, False),
    (3, 2, 4, 2, 1, 61, 33, torch.bfloat16, False, True, True),
    (1, 3, 16, 1, 61, 2, 130, torch.float16, False, True, False),   # 130 entries: split over 3 blocks
    (4, 1, 2, 1, 64, 3, 5, torch.float16, False, False, True),
    (2, 1, 16, 1, 3, 7, 64, torch.bfloat16, True, True, True),      # V3.2's FP8 layout, d = 576
    (1, 2, 32, 1, 64, 2, 100, torch.bfloat16, True, False, False),
    (2, 1, 8, 1, 16, 2, 0, torch.bfloat16, False, False, True),      # topk = 0: nothing to see
    (1, 1, 80, 1, 16, 12, 150, torch.bfloat16, False, True, True),   # two head tiles; a split list with a sink
]


@pytest.mark.parametrize("b,s_q,h_q,h_kv,page_size,num_pages,topk,dtype,fp8,lengths,sink", DECODE_GRID)
def test_sparse_decode_matches_oracle(backend, b, s_q, h_q, h_kv, page_size, num_pages, topk, dtype, fp8, lengths,
                                      sink):
    name, device = backend
    skip_cuda_backend(name)
    inputs = decode_inputs(b, s_q, h_q, h_kv, page_size, num_pages, topk, dtype, fp8, lengths=lengths, sink=sink,
                           seed=b * 31 + topk)
    q, k_cache, indices, dv, _, topk_length, attn_sink = inputs
    moved = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
    out, lse = dskernels.flash_mla_sparse_decode(*moved[:4], is_fp8_kvcache=fp8, topk_length=moved[5],
                                                 attn_sink=moved[6])
    assert out.shape == (b, s_q, h_q, dv) and lse.shape == (b, h_q, s_q)
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv, None, fp8, topk_length, attn_sink)
    assert_close_to(out, lse, ref_out, ref_lse, dtype, vmax_of(k_cache, dv, fp8))
    if sink:
        assert (out[:, :, 0].float() == 0).all(), "attn_sink = +inf must zero the head's output"


# (s_q, s_kv, h_q, h_kv, topk, q dtype, topk_length, attn_sink)
PREFILL_GRID = [
    (5, 40, 4, 1, 24, torch.bfloat16, False, False),
    (3, 61, 8, 2, 70, torch.float16, True, True),
    (1, 1, 2, 1, 3, torch.bfloat16, True, False),
    (4, 0, 4, 2, 8, torch.bfloat16, False, True),                  # an empty kv: every list is invalid
    (2, 33, 16, 1, 200, torch.bfloat16, False, True),               # 200 entries: split
]


@pytest.mark.parametrize("s_q,s_kv,h_q,h_kv,topk,dtype,lengths,sink", PREFILL_GRID)
def test_sparse_prefill_matches_oracle(backend, s_q, s_kv, h_q, h_kv, topk, dtype, lengths, sink):
    name, device = backend
    skip_cuda_backend(name)
    gen = torch.Generator().manual_seed(s_q * 13 + topk)
    d, dv = 64, 48
    kv = torch.randn(s_kv, h_kv, d, generator=gen).to(dtype)
    q = torch.randn(s_q, h_q, d, generator=gen).to(dtype)
    indices = make_lists(s_q * h_kv, topk, max(s_kv, 1), gen).reshape(s_q, h_kv, topk)
    if s_kv == 0:
        indices[...] = 0  # slot 0 does not exist either
    topk_length = torch.randint(0, topk + 1, (s_q,), generator=gen, dtype=torch.int32) if lengths else None
    live = indices
    if topk_length is not None:
        live = torch.where(torch.arange(topk)[None, None, :] >= topk_length.long()[:, None, None], -1, indices)
    if s_kv:
        poison_unlisted(kv, live.reshape(-1), s_kv, False)
    attn_sink = torch.randn(h_q, generator=gen) if sink else None
    if sink:
        attn_sink[0], attn_sink[-1] = math.inf, -math.inf
    scale = 0.3
    out, max_logits, lse = dskernels.flash_mla_sparse_fwd(
        q.to(device), kv.to(device), indices.to(device), scale, dv,
        None if attn_sink is None else attn_sink.to(device), None if topk_length is None else topk_length.to(device))
    assert out.shape == (s_q, h_q, dv) and max_logits.shape == (s_q, h_q) and lse.shape == (s_q, h_q)
    ref_out, ref_max, ref_lse = ref.flash_mla_sparse_fwd(q, kv, indices, scale, dv, attn_sink, topk_length)
    vmax = vmax_of(kv, dv, False) if s_kv else 1.0
    assert_close_to(out, lse, ref_out, ref_lse, dtype, vmax, max_logits, ref_max)


def test_through_flash_mla_with_kvcache(backend):
    """FlashMLA's spelling: flash_mla_with_kvcache(..., indices=..., is_fp8_kvcache=True); the block
    table, lengths and metadata are not read (None allowed)."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, indices, dv, fp8, topk_length, attn_sink = [
        t.to(device) if isinstance(t, torch.Tensor) else t
        for t in decode_inputs(2, 1, 16, 1, 64, 2, 40, torch.bfloat16, True, lengths=True, sink=True, seed=5)]
    out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, None, None, is_fp8_kvcache=True,
                                                indices=indices, topk_length=topk_length, attn_sink=attn_sink)
    expected = dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv, is_fp8_kvcache=True,
                                                 topk_length=topk_length, attn_sink=attn_sink)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_flashmla_positional_form_and_int8_cache(backend):
    """FlashMLA's tests pass all 16 arguments by position (is_fp8_kvcache where dskernels' k_scale
    is, then indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
    extra_topk_length), and take the FP8 bytes as int8 too."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, indices, dv, fp8, topk_length, attn_sink = [
        t.to(device) if isinstance(t, torch.Tensor) else t
        for t in decode_inputs(2, 1, 16, 1, 64, 2, 40, torch.bfloat16, True, lengths=True, sink=True, seed=5)]
    expected = dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv, is_fp8_kvcache=True,
                                                 topk_length=topk_length, attn_sink=attn_sink)
    meta = dskernels.get_mla_metadata()[0]
    for cache in (k_cache, k_cache.view(torch.int8)):
        out, lse = dskernels.flash_mla_with_kvcache(q, cache, None, None, dv, meta, None, None, False, True, indices,
                                                    attn_sink, None, None, topk_length, None)
        assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    with pytest.raises(TypeError, match="^indices: given twice"):
        dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, meta, None, None, False, True, indices,
                                         indices=indices)
    with pytest.raises(TypeError, match="^k_scale: 1 more positional arguments follow it, FlashMLA's order"):
        dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, meta, None, None, False, 1.0, indices)


def test_flashmla_positional_dense_form():
    """The dense decode in FlashMLA's positional order: is_fp8_kvcache=False after causal."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 64, generator=gen).to(torch.bfloat16)
    k_cache = torch.randn(4, 16, 1, 64, generator=gen).to(torch.bfloat16)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lens = torch.tensor([20, 7], dtype=torch.int32)
    meta, splits = dskernels.get_mla_metadata(lens, 4, 1)
    want = dskernels.flash_mla_with_kvcache(q, k_cache, table, lens, 48, meta, splits, None, True)
    got = dskernels.flash_mla_with_kvcache(q, k_cache, table, lens, 48, meta, splits, None, True, False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_flashmla_metadata_call_for_sparse():
    """vLLM-style FlashMLA calls pass the sparse arguments to get_mla_metadata; its result is then
    handed to the sparse decode, which does not need it."""
    q, k_cache, indices, dv, fp8, _, _ = decode_inputs(2, 1, 16, 1, 64, 2, 40, torch.bfloat16, True)
    lens = torch.tensor([64, 100], dtype=torch.int32)
    meta, splits = dskernels.get_mla_metadata(lens, 16, 1, 16, True, 40)
    out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, None, lens, dv, meta, splits, is_fp8_kvcache=True,
                                                indices=indices)
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv, None, True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_all_tokens_listed_equals_dense_decode(backend):
    """Listing every cached token of a sequence (logical position -> slot through the block table,
    as a V3.2 caller maps its indexer's top-k) gives the dense decode's answer."""
    name, device = backend
    skip_cuda_backend(name)
    lengths, page_size = [70, 0, 33], 16
    q, k_cache, block_table, lens, dv, _ = make_inputs(lengths, 2, 4, 1, page_size, torch.bfloat16, torch.bfloat16,
                                                       seed=3)
    k_cache = torch.nan_to_num(k_cache)  # the dense inputs poison unowned slots: the lists name none of them
    topk = max(lengths) + 6
    pos = torch.arange(topk)
    slots = block_table.long().gather(1, (pos // page_size).clamp(max=block_table.shape[1] - 1)[None].expand(3, -1))
    indices = torch.where(pos < lens[:, None], slots * page_size + pos % page_size, -1).int()
    indices = indices[:, None, :].expand(-1, 2, -1).contiguous()        # both query tokens list them all
    args = [t.to(device) for t in (q, k_cache, block_table, lens)]
    meta, splits = dskernels.get_mla_metadata(args[3], 2 * 4, 1)
    dense = dskernels.flash_mla_with_kvcache(*args, dv, meta, splits)
    sparse = dskernels.flash_mla_with_kvcache(args[0], args[1], None, None, dv, None, None, indices=indices.to(device))
    torch.testing.assert_close(sparse[1].cpu(), dense[1].cpu(), rtol=1e-5, atol=LSE_ATOL)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(sparse[0].cpu().float(), dense[0].cpu().float(), rtol=tol["rtol"],
                               atol=tol["atol_per_v"] * k_cache.float().abs().max().item())


def test_backend_choice_on_cpu():
    """auto on CPU tensors is the reference, as for every op."""
    q, k_cache, indices, dv, fp8, topk_length, attn_sink = decode_inputs(1, 1, 4, 1, 16, 2, 8, torch.bfloat16, False)
    out, lse = dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv)
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# ---------------------------------------------------------------------------------------------
# The FP8 layout
# ---------------------------------------------------------------------------------------------

def test_fp8_layout_bytes():
    """656 bytes per token: e4m3 latent, 4 fp32 power-of-two scales (>= amax / 448, floored at
    1e-4, the smallest such power), bf16 rope; dequantize inverts it exactly on representable data."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 1, 576, generator=gen) * torch.tensor([1e-7, 1.0, 300.0])[:, None, None, None]
    x[0, 0, 0, :128] = 0.0
    cache = ref.quantize_sparse_kv_cache(x.to(torch.bfloat16))
    assert cache.shape == (3, 5, 1, 656) and cache.dtype == FP8
    raw = cache.view(torch.uint8).reshape(-1, 656)
    tiles = x.reshape(-1, 576)[:, :512].to(torch.bfloat16).float().reshape(-1, 4, 128)
    scales = raw[:, 512:528].contiguous().view(torch.float32)
    needed = (tiles.abs().amax(dim=2) / 448).clamp(min=1e-4)
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all(), "scales must be powers of two (UE8M0)"
    assert (scales >= needed).all() and (scales / 2 < needed).all()
    nope = raw[:, :512].contiguous().view(FP8).float().reshape(-1, 4, 128)
    torch.testing.assert_close(nope * scales[..., None], tiles, rtol=2**-4, atol=scales.max().item() * 2**-9)
    rope = raw[:, 528:].contiguous().view(torch.bfloat16)
    assert torch.equal(rope, x.reshape(-1, 576)[:, 512:].to(torch.bfloat16))
    back = ref.dequantize_sparse_kv_cache(cache)
    assert torch.equal(ref.quantize_sparse_kv_cache(back).view(torch.uint8), cache.view(torch.uint8))
    for raw_bytes in (cache.view(torch.uint8), cache.view(torch.int8)):  # the sparse decode's byte views
        assert torch.equal(dskernels.dequantize_sparse_kv_cache(raw_bytes), back)
    assert torch.equal(dskernels.quantize_sparse_kv_cache(x).view(torch.uint8),
                       ref.quantize_sparse_kv_cache(x).view(torch.uint8))
    with pytest.raises(TypeError, match="kv: expected a floating-point tensor, got torch.int32"):
        dskernels.quantize_sparse_kv_cache(torch.ones(2, 576, dtype=torch.int32))


def test_fp8_byte_path(backend, monkeypatch):
    """The FP8 layout read as bytes and widened in integer arithmetic: the path for GPUs whose
    Triton has no e4m3 type (before sm_89), forced here."""
    name, device = backend
    skip_cuda_backend(name)
    monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    q, k_cache, indices, dv, fp8, topk_length, attn_sink = decode_inputs(2, 2, 16, 1, 16, 4, 48, torch.bfloat16, True,
                                                                         lengths=True, seed=6)
    out, lse = dskernels.flash_mla_sparse_decode(q.to(device), k_cache.to(device), indices.to(device), dv,
                                                 is_fp8_kvcache=True, topk_length=topk_length.to(device))
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv, None, True, topk_length)
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(k_cache, dv, True))


def test_nan_in_a_listed_row_is_not_hidden(backend):
    """A NaN in a row a query lists makes that query's out and lse NaN (on every backend), rather
    than being reported as "nothing to see" (lse = +inf, out = 0)."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, indices, dv, _, _, _ = decode_inputs(2, 1, 4, 1, 16, 3, 20, torch.bfloat16, False, seed=7)
    num_slots = 3 * 16
    mine = {v for v in indices[0].flatten().tolist() if 0 <= v < num_slots}
    slot = min(mine - set(indices[1].flatten().tolist()))  # listed by sequence 0 only
    k_cache.view(-1, 1, k_cache.shape[-1])[slot] = math.nan
    out, lse = dskernels.flash_mla_sparse_decode(q.to(device), k_cache.to(device), indices.to(device), dv)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert not out[1].isnan().any() and not lse[1].isnan().any()
    # The prefill's max_logits too (a max that drops NaN would report the other scores' maximum),
    # single pass (20 entries) and split over blocks (200)
    for topk in (20, 200):
        kv = torch.randn(256, 1, 64).bfloat16()
        kv[5, 0, 3] = math.nan
        lists = torch.arange(topk, dtype=torch.int32).view(1, 1, topk).expand(2, 1, topk).clone()
        lists[1] = torch.where(lists[1] == 5, -1, lists[1])  # row 1 does not list the NaN row
        out, max_logits, lse = dskernels.flash_mla_sparse_fwd(torch.randn(2, 4, 64).bfloat16().to(device),
                                                              kv.to(device), lists.to(device), 0.1, 48)
        assert out[0].isnan().all() and max_logits[0].isnan().all() and lse[0].isnan().all(), topk
        assert not (out[1].isnan().any() or max_logits[1].isnan().any() or lse[1].isnan().any()), topk


def test_infinite_score_in_a_listed_row_gives_nan(backend):
    """A +inf score (an inf in a listed row's rope part, which the FP8 cache keeps in bf16) makes
    out, lse and max_logits NaN on every backend and in the oracle (which said lse = +inf, the
    "nothing valid" value, with out NaN); a -inf score only drops its key."""
    name, device = backend
    skip_cuda_backend(name)
    kv = torch.randn(2, 1, 576)
    kv[:, 0, 550] = math.inf
    q = torch.randn(1, 1, 2, 576).bfloat16()
    q[0, 0, :, 550] = torch.tensor([1.0, -1.0])   # head 0: +inf scores, head 1: -inf (nothing valid)
    indices = torch.tensor([[[0, 1]]], dtype=torch.int32)
    for fp8 in (False, True):
        cache = ref.quantize_sparse_kv_cache(kv.view(1, 2, 1, 576)) if fp8 else kv.view(1, 2, 1, 576).bfloat16()
        results = [dskernels.flash_mla_sparse_decode(q.to(device), cache.to(device), indices.to(device), 512,
                                                     is_fp8_kvcache=fp8),
                   ref.flash_mla_sparse_decode(q, cache, indices, 512, None, fp8)]
        for out, lse in results:
            out, lse = out.cpu().float(), lse.cpu()
            assert out[0, 0, 0].isnan().all() and lse[0, 0].isnan().all(), fp8
            assert (out[0, 0, 1] == 0).all() and (lse[0, 1] == math.inf).all(), fp8
    flat = kv.bfloat16()
    results = [dskernels.flash_mla_sparse_fwd(q[0].to(device), flat.to(device), indices[0][None].to(device), 0.1),
               ref.flash_mla_sparse_fwd(q[0], flat, indices[0][None], 0.1)]
    for out, max_logits, lse in results:
        assert out[0, 0].isnan().all() and max_logits[0, 0].isnan() and lse[0, 0].isnan()
        assert (out[0, 1] == 0).all() and max_logits[0, 1] == -math.inf and lse[0, 1] == math.inf


def test_gpu_tiles_fit_shared_memory(monkeypatch):
    """The GPU tile rule (no GPU needed to pick one): the first tile whose q tile and gathered
    blocks fit the GPU's shared memory, at 4 bytes an element for fp32 queries (an sm_89's 99 KB
    here); the V3.2 bf16 tile as before; heads too wide for any tile are refused naming q."""
    from dskernels.triton import mla_sparse as triton_sparse

    gpu = torch.device("cuda")
    monkeypatch.setattr(triton_sparse, "_shared_limit", lambda device: 101376)
    assert triton_sparse.tile_config(16, 512, 64, False, gpu, 4) == (16, 16, 8, 2)
    monkeypatch.setattr(triton_sparse, "_shared_limit", lambda device: 232448)  # an H100's
    assert triton_sparse.tile_config(16, 512, 64, True, gpu) == (16, 32, 8, triton_sparse.DOUBLE_BUFFER_STAGES)
    assert triton_sparse.tile_config(128, 512, 64, False, gpu) == (32, 32, 8, triton_sparse.DOUBLE_BUFFER_STAGES)
    h, n, _, stages = triton_sparse.tile_config(64, 128, 512, False, gpu)  # dv = 128 of d = 576
    assert h * 1280 + (2 if stages > 2 else 1) * n * 1280 + 8192 <= 232448
    monkeypatch.setattr(triton_sparse, "_shared_limit", lambda device: 101376)
    with pytest.raises(ValueError, match="^q: float32 queries with these head dimensions need at least"):
        triton_sparse.tile_config(16, 1024, 16, False, gpu, 4)


def test_empty_batches_and_lists(backend):
    """No sequences, no queries, or empty lists: empty outputs, or out 0 and lse +inf (nothing seen)."""
    name, device = backend
    skip_cuda_backend(name)
    cache = torch.randn(4, 4, 1, 576, dtype=torch.bfloat16, device=device)
    out, lse = dskernels.flash_mla_sparse_decode(torch.randn(0, 1, 4, 576, dtype=torch.bfloat16, device=device),
                                                 cache, torch.zeros(0, 1, 8, dtype=torch.int32, device=device), 512)
    assert out.shape == (0, 1, 4, 512) and lse.shape == (0, 4, 1)
    out, max_logits, lse = dskernels.flash_mla_sparse_fwd(
        torch.randn(0, 4, 576, dtype=torch.bfloat16, device=device), cache.view(16, 1, 576),
        torch.zeros(0, 1, 8, dtype=torch.int32, device=device), 0.1)
    assert out.shape == (0, 4, 512) and max_logits.shape == lse.shape == (0, 4)
    out, lse = dskernels.flash_mla_sparse_decode(torch.randn(2, 1, 4, 576, dtype=torch.bfloat16, device=device),
                                                 cache, torch.zeros(2, 1, 0, dtype=torch.int32, device=device), 512)
    assert (out == 0).all() and (lse == math.inf).all()


def test_fp16_queries_with_the_fp8_cache_are_refused():
    q = torch.randn(1, 1, 4, 576, dtype=torch.float16)
    with pytest.raises(TypeError, match="q: .*float16"):
        dskernels.flash_mla_sparse_decode(q, torch.zeros(2, 4, 1, 656, dtype=FP8),
                                          torch.zeros(1, 1, 4, dtype=torch.int32), 512, is_fp8_kvcache=True)


def test_numpy_ints_are_ints():
    """head_dim_v and d_v take numpy's ints, the scales numpy's float32, as FlashMLA's bindings do
    (TypeError before)."""
    q, k_cache, indices, dv, _, _, _ = decode_inputs(1, 1, 16, 1, 64, 2, 40, torch.bfloat16, True, seed=5)
    with dskernels.backend("ref"):
        decode = dskernels.flash_mla_sparse_decode
        for got, want in zip(decode(q, k_cache, indices, numpy.int64(dv), numpy.float32(0.125), is_fp8_kvcache=True),
                             decode(q, k_cache, indices, dv, 0.125, is_fp8_kvcache=True)):
            assert torch.equal(got, want)
        q, kv = torch.randn(2, 4, 64).bfloat16(), torch.randn(30, 1, 64).bfloat16()
        lists = torch.arange(20, dtype=torch.int32).view(1, 1, 20).expand(2, 1, 20)
        for got, want in zip(dskernels.flash_mla_sparse_fwd(q, kv, lists, numpy.float32(0.125), numpy.int32(48)),
                             dskernels.flash_mla_sparse_fwd(q, kv, lists, 0.125, 48)):
            assert torch.equal(got, want)
        with pytest.raises(TypeError, match="^d_v: expected an int, got float"):
            dskernels.flash_mla_sparse_fwd(q, kv, lists, 0.1, 48.0)


def test_fp8_padded_pages(backend):
    """FlashMLA's test caches pad every page by one token (page stride (page_size + 1) * 656)."""
    name, device = backend
    skip_cuda_backend(name)
    gen = torch.Generator().manual_seed(9)
    values = torch.randn(3, 8, 1, 576, generator=gen)
    padded = torch.empty(3, 9, 1, 656, dtype=FP8)
    padded.view(torch.uint8).fill_(0x7F)
    padded[:, :8] = ref.quantize_sparse_kv_cache(values)
    k_cache = padded[:, :8]
    q = torch.randn(2, 1, 16, 576, generator=gen).to(torch.bfloat16)
    indices = torch.randint(0, 24, (2, 1, 20), generator=gen, dtype=torch.int32)
    out, lse = dskernels.flash_mla_sparse_decode(q.to(device), k_cache.to(device), indices.to(device), 512,
                                                 is_fp8_kvcache=True)
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, 512, None, True)
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(k_cache, 512, True))


# ---------------------------------------------------------------------------------------------
# Validation, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def _decode_args():
    q, k_cache, indices, dv, fp8, _, _ = decode_inputs(1, 2, 4, 1, 16, 2, 8, torch.bfloat16, False)
    return q, k_cache, indices, dv


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(indices=a["indices"].long()), TypeError, "indices"),
    (lambda a: a.update(indices=a["indices"][:, :1]), ValueError, "indices"),
    (lambda a: a.update(head_dim_v=200), ValueError, "head_dim_v"),
    (lambda a: a.update(head_dim_v=True), TypeError, "head_dim_v"),
    (lambda a: a.update(head_dim_v=32.0), TypeError, "^head_dim_v: expected an int"),
    (lambda a: a.update(softmax_scale="x"), TypeError, "^softmax_scale: expected a float"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache"),
    (lambda a: a.update(is_fp8_kvcache=True), TypeError, "k_cache"),
    (lambda a: a.update(topk_length=torch.zeros(3, dtype=torch.int32)), ValueError, "topk_length"),
    (lambda a: a.update(attn_sink=torch.zeros(4, dtype=torch.float16)), TypeError, "attn_sink"),
    (lambda a: a.update(softmax_scale=math.inf), ValueError, "softmax_scale"),
    (lambda a: a.update(q=a["q"][..., :40]), ValueError, "q"),
    (lambda a: a.update(attn_sink=torch.zeros(3)), ValueError,
     r"^attn_sink: expected shape \(4,\) \(one per query head\), got \(3,\)"),
    (lambda a: a.update(q=torch.empty(1, 2, 4, 128, dtype=torch.bfloat16)[..., ::2].copy_(a["q"])), ValueError,
     r"^q: expected unit stride in the last dimension, got strides \(1024, 512, 128, 2\)"),
    (lambda a: a.update(q=a["q"][:, :0], indices=a["indices"][:, :0]), ValueError,  # s_q = 0
     r"^q: expected s_q \(dimension 1\) >= 1, got shape \(1, 0, 4, 64\)"),
    (lambda a: a.update(k_cache=torch.zeros(2, 16, 1, 48, dtype=torch.bfloat16)), ValueError,
     r"^k_cache: expected head dimension 64 \(q's d\), got shape \(2, 16, 1, 48\)"),
])
def test_decode_validation(change, exc, match):
    q, k_cache, indices, dv = _decode_args()
    args = dict(q=q, k_cache=k_cache, indices=indices, head_dim_v=dv)
    change(args)
    with pytest.raises(exc, match=match):
        dskernels.flash_mla_sparse_decode(**args)


def test_fp8_layout_validation():
    q = torch.randn(1, 1, 4, 576, dtype=torch.bfloat16)
    indices = torch.zeros(1, 1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_cache.*656"):
        dskernels.flash_mla_sparse_decode(q, torch.zeros(2, 4, 1, 576, dtype=FP8), indices, 512, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="head_dim_v"):
        dskernels.flash_mla_sparse_decode(q, torch.zeros(2, 4, 1, 656, dtype=FP8), indices, 448, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="k_cache.*aligned"):
        misaligned = torch.zeros(2, 4, 1, 657, dtype=FP8)[..., 1:]
        dskernels.flash_mla_sparse_decode(q, misaligned, indices, 512, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match=r"^cache: expected last dimension 656 .*got \(\)"):  # 0-d: named
        dskernels.dequantize_sparse_kv_cache(torch.zeros((), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^kv: expected last dimension 576 .*got \(\)"):
        dskernels.quantize_sparse_kv_cache(torch.zeros(()))


def test_flash_mla_with_kvcache_sparse_keywords_validation():
    q, k_cache, indices, dv = _decode_args()
    with pytest.raises(ValueError, match="causal"):
        dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, None, None, causal=True, indices=indices)
    with pytest.raises(ValueError, match="attn_sink"):
        dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, None, None, attn_sink=torch.zeros(4))


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(sm_scale=None), TypeError, "sm_scale"),
    (lambda a: a.update(indices=a["indices"][:, :1]), ValueError, "indices"),
    (lambda a: a.update(kv=a["kv"].float()), TypeError, "kv"),
    (lambda a: a.update(kv=a["kv"][:, :, :32]), ValueError, "kv"),
    (lambda a: a.update(d_v=65), ValueError, "d_v"),
    (lambda a: a.update(d_v=32.0), TypeError, "^d_v: expected an int"),
    (lambda a: a.update(topk_length=torch.zeros(2, dtype=torch.int64)), TypeError, "topk_length"),
])
def test_prefill_validation(change, exc, match):
    args = dict(q=torch.randn(3, 4, 64, dtype=torch.bfloat16), kv=torch.randn(9, 2, 64, dtype=torch.bfloat16),
                indices=torch.zeros(3, 2, 5, dtype=torch.int32), sm_scale=0.1, d_v=48)
    change(args)
    with pytest.raises(exc, match=match):
        dskernels.flash_mla_sparse_fwd(**args)


def test_opcheck():
    q, k_cache, indices, dv, fp8, topk_length, attn_sink = decode_inputs(2, 1, 4, 1, 16, 2, 8, torch.bfloat16, False,
                                                                         lengths=True, sink=True)
    k_cache = torch.nan_to_num(k_cache)  # opcheck compares runs, NaN != NaN
    torch.library.opcheck(torch.ops.dskernels.flash_mla_sparse_decode,
                          (q, k_cache, indices, dv, None, False, topk_length, attn_sink))
    kv = torch.randn(9, 2, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dskernels.flash_mla_sparse_fwd,
                          (torch.randn(3, 4, 64, dtype=torch.bfloat16), kv, torch.randint(-1, 9, (3, 2, 5),
                                                                                          dtype=torch.int32), 0.2, 48))


def test_opcheck_fp8_cache():
    q, k_cache, indices, dv, fp8, topk_length, _ = decode_inputs(2, 1, 16, 1, 16, 2, 8, torch.bfloat16, True,
                                                                 lengths=True)
    raw = k_cache.view(torch.uint8).clone()
    raw[..., :512] = torch.where(raw[..., :512] == 0x7F, 0, raw[..., :512])  # no NaN: opcheck compares runs
    raw[..., 512:528].view(torch.float32).nan_to_num_(0.0)
    for cache in (raw.view(FP8), raw):  # float8_e4m3fn or uint8 bytes
        torch.library.opcheck(torch.ops.dskernels.flash_mla_sparse_decode,
                              (q, cache, indices, dv, None, True, topk_length, None),
                              test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    q, k_cache, indices, dv, _, topk_length, attn_sink = decode_inputs(2, 1, 4, 1, 16, 2, 8, torch.bfloat16, False,
                                                                       lengths=True, sink=True)

    def step(q, k_cache, indices, topk_length, attn_sink):
        out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, None, None, indices=indices,
                                                    topk_length=topk_length, attn_sink=attn_sink)
        return out.float() * 2, lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(q, k_cache, indices, topk_length, attn_sink),
                                step(q, k_cache, indices, topk_length, attn_sink)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    # V3.2's FP8 cache too (its fake kernel must not ask for an address).
    q8, cache8, indices8, _, _, lengths8, _ = decode_inputs(2, 1, 16, 1, 16, 2, 8, torch.bfloat16, True, lengths=True)

    def step8(q, k_cache, indices, topk_length):
        return dskernels.flash_mla_sparse_decode(q, k_cache, indices, 512, is_fp8_kvcache=True,
                                                 topk_length=topk_length)

    compiled8 = torch.compile(step8, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled8(q8, cache8, indices8, lengths8), step8(q8, cache8, indices8, lengths8)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# On the GPU: V3.2's shapes, and a CUDA graph
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("h_q", [16, 128])
def test_v32_decode_shapes_on_gpu(h_q):
    """DeepSeek-V3.2 decode: top-2048 of an FP8 cache of 64-token pages, 16 (TP8) or 128 heads (two
    and more head tiles), MTP s_q = 2."""
    inputs = decode_inputs(4, 2, h_q, 1, 64, 160, 2048, torch.bfloat16, True, lengths=True, sink=True, seed=h_q)
    q, k_cache, indices, dv, _, topk_length, attn_sink = inputs
    out, lse = dskernels.flash_mla_sparse_decode(q.cuda(), k_cache.cuda(), indices.cuda(), dv, is_fp8_kvcache=True,
                                                 topk_length=topk_length.cuda(), attn_sink=attn_sink.cuda())
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv, None, True, topk_length, attn_sink)
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(k_cache, dv, True))


@pytest.mark.gpu
def test_v32_prefill_shapes_on_gpu():
    gen = torch.Generator().manual_seed(1)
    s_q, s_kv, h_q, topk = 64, 4096, 64, 2048
    q = torch.randn(s_q, h_q, 576, generator=gen).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, 576, generator=gen).to(torch.bfloat16)
    indices = make_lists(s_q, topk, s_kv, gen).reshape(s_q, 1, topk)
    out, max_logits, lse = dskernels.flash_mla_sparse_fwd(q.cuda(), kv.cuda(), indices.cuda(), 576 ** -0.5)
    ref_out, ref_max, ref_lse = ref.flash_mla_sparse_fwd(q, kv, indices, 576 ** -0.5)
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(kv, 512, False), max_logits, ref_max)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_indices():
    """No host synchronization: the decode is captured once and replayed with new lists and lengths."""
    inputs = decode_inputs(2, 1, 16, 1, 64, 8, 256, torch.bfloat16, True, lengths=True, seed=4)
    q, k_cache, indices, dv, _, topk_length, _ = [t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs]

    def step():
        return dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv, is_fp8_kvcache=True, topk_length=topk_length)

    step()  # compile the Triton kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    # New lists: the sequences swap theirs (only listed slots are unpoisoned).
    indices.copy_(indices.flip(0))
    topk_length.copy_(topk_length.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q.cpu(), k_cache.cpu(), indices.cpu(), dv, None, True,
                                                   topk_length.cpu())
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(k_cache.cpu(), dv, True))


def _misaligned_fp8_cache(pages, page_size):
    """A contiguous FP8-layout cache (16-byte multiple strides) whose first byte is 1 past an
    aligned address: its float32 scales could not be read as such."""
    count = pages * page_size * ref.FP8_TOKEN_BYTES
    return torch.zeros(count + 16, dtype=torch.uint8)[1:count + 1].view(pages, page_size, 1, ref.FP8_TOKEN_BYTES)


def test_fp8_cache_with_a_misaligned_start_is_refused():
    """Strides of 16-byte multiples but a start 1 byte off: refused by the kernel (a fake tensor has
    no address, so only the real kernel checks it); the same bytes aligned are taken."""
    q = torch.randn(1, 1, 4, 576, dtype=torch.bfloat16)
    indices = torch.zeros(1, 1, 4, dtype=torch.int32)
    cache = _misaligned_fp8_cache(2, 4)
    assert cache.data_ptr() % 16 and all(s % 16 == 0 for s in cache.stride()[:3])
    with pytest.raises(ValueError, match="^k_cache: expected a 16-byte aligned start in the FP8 layout, got address"):
        dskernels.flash_mla_sparse_decode(q, cache, indices, 512, is_fp8_kvcache=True)
    out, lse = dskernels.flash_mla_sparse_decode(q, cache.clone(), indices, 512, is_fp8_kvcache=True)
    assert out.shape == (1, 1, 4, 512) and lse.isfinite().all()


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(kv=torch.randn(9, 3, 64, dtype=torch.bfloat16), indices=a["indices"][:, :1].expand(3, 3, 5)),
     r"^kv: expected h_kv >= 1 dividing h_q = 4, got shape \(9, 3, 64\)"),
    (lambda a: a.update(kv=torch.randn(9, 0, 64, dtype=torch.bfloat16), indices=a["indices"][:, :0]),
     r"^kv: expected h_kv >= 1 dividing h_q = 4, got shape \(9, 0, 64\)"),
    (lambda a: a.update(kv=torch.empty(9, 2, 128, dtype=torch.bfloat16)[..., ::2]),
     r"^kv: expected unit stride in the last dimension, got strides \(256, 128, 2\)"),
    (lambda a: a.update(attn_sink=torch.zeros(2)),
     r"^attn_sink: expected shape \(4,\) \(one per query head\), got \(2,\)"),
    (lambda a: a.update(topk_length=torch.zeros(2, dtype=torch.int32)),
     r"^topk_length: expected shape \(3,\) \(one per query token\), got \(2,\)"),
])
def test_prefill_validation_more(change, match):
    args = dict(q=torch.randn(3, 4, 64, dtype=torch.bfloat16), kv=torch.randn(9, 2, 64, dtype=torch.bfloat16),
                indices=torch.zeros(3, 2, 5, dtype=torch.int32), sm_scale=0.1, d_v=48)
    change(args)
    with pytest.raises(ValueError, match=match):
        dskernels.flash_mla_sparse_fwd(**args)
