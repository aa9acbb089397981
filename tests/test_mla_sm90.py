"""The sm90 CUDA MLA decode (csrc/mla/) against python_ref.mla, on the device only.

The decode grid follows FlashMLA's test (b, s_q, seqlen, h_q, h_kv, varlen, causal, cache dtype):
every (b, s_q, seqlen, h_q) combination runs, and the other axes cycle through their values so
each appears with each of the others. Caches are NaN everywhere no sequence owns (unused pages,
tails of last pages) and unused block-table slots hold a huge page id, so reading anything outside
a sequence shows up as NaN or a fault. The oracle runs on the GPU in fp32.
"""

import itertools
import math

import pytest
import torch

import dskernels
import python_ref.mla
from dskernels.ops import mla as mla_ops

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
D, DV = 576, 512
HUGE_PAGE = 2**31 - 1
# out: both sides round to q's dtype (1 ulp: 2^-7 / 2^-10 relative) and the kernel rounds the
# softmax weights to q's dtype before P @ V (2^-8 / 2^-11 of max|V| after the convex sum). LSE is
# fp32 with exp2/log2 approximations (a few ulp) over up to 8192 terms.
TOLERANCES = {torch.bfloat16: (2**-7, 2**-8), torch.float16: (2**-10, 2**-11)}
LSE_RTOL, LSE_ATOL = 1e-5, 1e-4


def _need_cuda_backend():
    if "cuda" not in dskernels.available_backends():
        pytest.skip("the sm90 kernels need a Hopper GPU and a CUDA build of dskernels")


def make_cache(lengths, h_kv, page_size, cache_dtype, *, seed, d_alloc=D, spare_slots=2):
    """k_cache [pages, page_size, h_kv, D] (a view of a d_alloc-wide buffer when d_alloc > D),
    block_table, k_scale; generated on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lengths)
    pages_per_seq = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + 3
    max_pages = max(pages_per_seq, default=0) + spare_slots
    order = torch.randperm(num_pages, generator=gen, device="cuda").int()
    block_table = torch.full((b, max_pages), HUGE_PAGE, dtype=torch.int32, device="cuda")
    owned = torch.zeros(num_pages, page_size, dtype=torch.bool, device="cuda")
    used = 0
    for i, (n, pages) in enumerate(zip(lengths, pages_per_seq)):
        ids = order[used:used + pages]
        used += pages
        block_table[i, :pages] = ids
        t = torch.arange(n, device="cuda")
        owned[ids[t // page_size].long(), t % page_size] = True
    cache = torch.randn(num_pages, page_size, h_kv, d_alloc, generator=gen, device="cuda")
    cache[~owned] = math.nan
    k_scale = None
    if cache_dtype == FP8:
        k_scale = torch.tensor([0.0625], device="cuda")
        cache = (cache / k_scale).to(FP8)
    else:
        cache = cache.to(cache_dtype)
    return cache[..., :D], block_table, k_scale


def decode(q, k_cache, block_table, lens, k_scale, causal, softmax_scale=None):
    h_q, h_kv = q.shape[2], k_cache.shape[2]
    meta, splits = dskernels.get_mla_metadata(lens, q.shape[1] * h_q // h_kv, h_kv)
    return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits,
                                            softmax_scale=softmax_scale, causal=causal, k_scale=k_scale)


def check_graph_replays(lengths, replays, *, capacity, seed):
    """One decode (16 heads, one token, bf16 cache of `capacity` keys per sequence) captured in a
    CUDA graph at `lengths`, replayed for each list of `replays` lengths, each checked."""
    k_cache, block_table, k_scale = make_cache([capacity] * len(lengths), 1, 64, torch.bfloat16, seed=seed)
    q = torch.randn(len(lengths), 1, 16, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        decode(q, k_cache, block_table, lens, k_scale, False)  # warm: tensor maps, first-call setup
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = decode(q, k_cache, block_table, lens, k_scale, False)
        for new in replays:
            lens.copy_(torch.tensor(new, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            check(out, lse, q, k_cache, block_table, lens, k_scale, False)


def kernels_launched(fn):
    """(fn(), the names of the CUDA kernels it launched): which instantiation an opt-in switch ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return result, {event.name for event in prof.events()}


def check(out, lse, q, k_cache, block_table, lens, k_scale, causal, softmax_scale=None):
    ref_out, ref_lse = python_ref.mla.flash_mla_with_kvcache(
        q.float(), k_cache, block_table, lens, DV, softmax_scale, causal, k_scale)
    assert out.shape == ref_out.shape and out.dtype == q.dtype and lse.shape == ref_lse.shape
    assert not out.isnan().any(), "NaN in out: a poisoned cache slot or block-table entry was read"
    rtol, atol_per_v = TOLERANCES[q.dtype]
    values = k_cache[..., :DV].float()
    vmax = values[values.isfinite()].abs().max().item() if values.isfinite().any() else 1.0
    vmax *= 1.0 if k_scale is None else k_scale.item()
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=rtol, atol=atol_per_v * vmax)
    assert torch.equal(lse.isinf(), ref_lse.isinf()), "queries that see no key must get lse = +inf"
    assert (lse[lse.isinf()] > 0).all()
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=LSE_RTOL, atol=LSE_ATOL)
    assert (out.float()[ref_lse.permute(0, 2, 1).isinf()] == 0).all()


def _lengths(b, seqlen, varlen, gen):
    if not varlen:
        return [seqlen] * b
    # FlashMLA's varlen: normal around the mean (std mean / 2), at least 1; plus an empty one.
    lengths = torch.normal(float(seqlen), seqlen / 2, (b,), generator=gen).clamp(1, 2 * seqlen).int().tolist()
    if b > 1:
        lengths[b // 2] = 0
    return lengths


def _grid():
    cases = []
    cycle = itertools.cycle(itertools.product([1, 2], [False, True], [False, True], [torch.bfloat16, FP8]))
    for b, s_q, seqlen, h_q in itertools.product([1, 2, 6, 64], [1, 2, 4], [20, 140, 4096], [1, 16, 64, 128]):
        h_kv, varlen, causal, cache_dtype = next(cycle)
        if h_q == 1:
            h_kv = 1
        if b * seqlen > 64 * 4096 // 2 and s_q > 1 and h_q < 64:
            continue  # keep the run short: the largest memory-bound shapes are covered at s_q = 1
        cases.append(pytest.param(b, s_q, seqlen, h_q, h_kv, varlen, causal, cache_dtype,
                                  id=f"b{b}-sq{s_q}-n{seqlen}-hq{h_q}-hkv{h_kv}-{'var' if varlen else 'fix'}-"
                                     f"{'causal' if causal else 'full'}-{str(cache_dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("b,s_q,seqlen,h_q,h_kv,varlen,causal,cache_dtype", _grid())
def test_decode_grid(b, s_q, seqlen, h_q, h_kv, varlen, causal, cache_dtype):
    _need_cuda_backend()
    gen = torch.Generator().manual_seed(b * 1000 + seqlen + s_q)
    lengths = _lengths(b, seqlen, varlen, gen)
    k_cache, block_table, k_scale = make_cache(lengths, h_kv, 64, cache_dtype, seed=b + s_q + h_q)
    q = torch.randn(b, s_q, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, causal)
    check(out, lse, q, k_cache, block_table, lens, k_scale, causal)


@pytest.mark.parametrize("page_size", [1, 16, 61, 64, 128])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, FP8])
def test_any_page_size_and_strided_cache(page_size, cache_dtype):
    """Odd pages take the register path, multiples of 64 the TMA path (with a padded row stride)."""
    _need_cuda_backend()
    lengths = [300, 1, 0, 130, 64]
    k_cache, block_table, k_scale = make_cache(lengths, 2, page_size, cache_dtype, seed=page_size, d_alloc=640)
    q_dtype = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16
    q = torch.randn(len(lengths), 2, 20, D, device="cuda").to(q_dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)
    check(out, lse, q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)


@pytest.mark.parametrize("h_q", [16, 128])  # 128: two row tiles, a 2-CTA cluster sharing the key blocks
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_keys_outside_the_cache_add_nothing(page_size, cache_dtype, h_q):
    """A page id outside the cache inside a sequence, or a length that reaches unused block-table
    slots, breaks the contract (the reference raises). The kernel masks those keys out of the
    softmax: the result is the attention over the sequence's valid pages (non-causal attention
    does not depend on the order of the keys). Page 64 takes the TMA path for whole blocks (an
    out-of-bounds box is zero-filled), 16 the register path."""
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache([128, 256], 1, page_size, cache_dtype, seed=page_size)
    q = torch.randn(2, 1, h_q, D, device="cuda").to(torch.bfloat16)
    pages = 256 // page_size
    bad_table = block_table.clone()
    bad_table[1, 1] = -5  # sequence 1's second page
    bad_lens = torch.tensor([200, 256], dtype=torch.int32, device="cuda")  # 0 reaches HUGE_PAGE slots
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, bad_table, bad_lens, k_scale, False)
    clean_table = block_table.clone()
    clean_table[1, 1:pages - 1] = block_table[1, 2:pages]
    clean_table[1, pages - 1] = HUGE_PAGE
    clean_lens = torch.tensor([128, 256 - page_size], dtype=torch.int32, device="cuda")
    check(out, lse, q, k_cache, clean_table, clean_lens, k_scale, False)


@pytest.mark.parametrize("clusters", [False, True])
@pytest.mark.parametrize("h_q,s_q", [(64, 1), (65, 1), (32, 3), (128, 2), (16, 5), (64, 3)])
def test_rows_across_tiles(h_q, s_q, clusters, monkeypatch):
    """s_q * h_q / h_kv rows that fill 64-row tiles exactly, cross a multiple of 64, or leave a
    nearly empty last tile; one CTA per tile, and (DSKERNELS_MLA_CLUSTER) two or more tiles as
    2-CTA clusters sharing the key blocks by multicast (three tiles: a padding CTA with no rows);
    strided q (a wider head stride)."""
    _need_cuda_backend()
    monkeypatch.setenv("DSKERNELS_MLA_CLUSTER", "1" if clusters else "0")
    lengths = [1000, 7, 2049]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=h_q)
    q = torch.randn(len(lengths), s_q, h_q, 2 * D, device="cuda").to(torch.bfloat16)[..., :D]
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, s_q > 1)
    check(out, lse, q, k_cache, block_table, lens, k_scale, s_q > 1)


@pytest.mark.parametrize("switch", ["DSKERNELS_MLA_NO_TMA", "DSKERNELS_MLA_CLUSTER"])
def test_bring_up_switches(switch, monkeypatch):
    """The register path on whole page-64 blocks, and 2-CTA clusters, give the same answers."""
    _need_cuda_backend()
    monkeypatch.setenv(switch, "1")
    lengths = [700, 0, 129]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=11)
    q = torch.randn(len(lengths), 2, 48, D, device="cuda").to(torch.bfloat16)  # 96 rows: two tiles
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, True)
    check(out, lse, q, k_cache, block_table, lens, k_scale, True)


@pytest.mark.parametrize("lengths", [[0], [0, 0, 5], [1] * 300, [8192, 1, 3000] + [0] * 40, list(range(0, 5000, 3))])
def test_metadata_kernel_equals_split_plan(lengths):
    """The device kernel reproduces mla_ops.split_plan bit for bit, for several partition counts
    (batches beyond one CTA's 1024 threads included)."""
    _need_cuda_backend()
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    for parts in (1, 7, 66, 132):
        meta = torch.full((parts, 8), -7, dtype=torch.int32, device="cuda")
        splits = torch.full((len(lengths) + 1,), -7, dtype=torch.int32, device="cuda")
        torch.ops.dskernels._sm90_get_mla_metadata(lens, meta, splits)
        ref_meta, ref_splits = mla_ops.split_plan(lens, parts)
        assert torch.equal(meta, ref_meta), (parts, meta, ref_meta)
        assert torch.equal(splits, ref_splits), parts


def test_metadata_is_64_row_tiles_under_cuda():
    _need_cuda_backend()
    lens = torch.tensor([100, 200], dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with dskernels.backend("cuda"):
        meta, _ = dskernels.get_mla_metadata(lens, 128, 1)
    assert meta.shape == (max(1, sms // 2), 8)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_nan_score_gives_nan_not_an_empty_result(cache_dtype):
    """A NaN query head, and a NaN in a key a sequence owns, make out and lse NaN for the rows that
    see them, in one split and across splits (the combine); the empty sequence keeps 0 and +inf."""
    _need_cuda_backend()
    lens = torch.tensor([70, 0, 8000], dtype=torch.int32, device="cuda")
    k_cache, block_table, k_scale = make_cache(lens.tolist(), 1, 64, cache_dtype, seed=5)
    q = torch.randn(3, 1, 16, D, dtype=torch.bfloat16, device="cuda")
    q[0, 0, 1, 3] = math.nan
    k_cache[block_table[2, 40].item(), 7, 0, 5] = math.nan
    with dskernels.backend("cuda"):
        meta, splits = dskernels.get_mla_metadata(lens, 16, 1)
        assert (splits[1] - splits[0]).item() == 1 and (splits[3] - splits[2]).item() > 1
        out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits, k_scale=k_scale)
    nan_rows = torch.zeros(3, 16, dtype=torch.bool, device="cuda")
    nan_rows[0, 1] = True
    nan_rows[2] = True
    assert torch.equal(out[:, 0].isnan().all(-1), nan_rows) and not out[:, 0][~nan_rows].isnan().any()
    assert torch.equal(lse[..., 0].isnan(), nan_rows)
    assert (out[1] == 0).all() and (lse[1] == math.inf).all()


def test_one_partition_plan_writes_out_directly_with_no_partials():
    """More 64-row tiles than SMs (a prefill chunk at 128 heads) plans one partition, which splits
    no sequence: every result goes straight to out, and the launcher allocates no split partials
    (they were b + 1 slots of [s_q * h_q, 512] fp32, never written)."""
    _need_cuda_backend()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    s_q, h_q = 64 * sms // 128 + 8, 128
    lengths = [300, 0, 2 * s_q + 900]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=11)
    q = torch.randn(len(lengths), s_q, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        meta, splits = dskernels.get_mla_metadata(lens, s_q * h_q, 1)
        assert meta.shape[0] == 1 and (splits.diff() <= 1).all()
        decode(q, k_cache, block_table, lens, k_scale, True)  # warm: tensor maps, allocator pools
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits,
                                                    causal=True, k_scale=k_scale)
        torch.cuda.synchronize()
    results = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    one_slot = s_q * h_q * (DV + 1) * 4
    assert torch.cuda.max_memory_allocated() - before < results + one_slot // 4
    check(out, lse, q, k_cache, block_table, lens, k_scale, True)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_cuda_graph_replay_with_new_lengths(cache_dtype):
    _need_cuda_backend()
    lengths = [1000, 0, 37, 4000]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, cache_dtype, seed=3, spare_slots=8)
    q = torch.randn(len(lengths), 2, 16, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        decode(q, k_cache, block_table, lens, k_scale, True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = decode(q, k_cache, block_table, lens, k_scale, True)
    lens.copy_(torch.tensor([999, 0, 20, 3871], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    check(out, lse, q, k_cache, block_table, lens, k_scale, True)


def test_unsupported_shapes_name_the_reason():
    _need_cuda_backend()
    q = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(2, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    block_table = torch.zeros(1, 2, dtype=torch.int32, device="cuda")
    lens = torch.tensor([20], dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"), pytest.raises(NotImplementedError, match="d = 576"):
        meta, splits = dskernels.get_mla_metadata(lens, 4, 1)
        dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 48, meta, splits)


def test_raw_op_rejects_bad_inputs():
    _need_cuda_backend()
    k_cache, block_table, _ = make_cache([100], 1, 64, torch.bfloat16, seed=0)
    lens = torch.tensor([100], dtype=torch.int32, device="cuda")
    meta, splits = mla_ops.split_plan(lens, 4)
    q = torch.randn(1, 1, 16, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 1, 16, DV, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(1, 16, 1, device="cuda")
    raw = torch.ops.dskernels._sm90_flash_mla_with_kvcache
    with pytest.raises(RuntimeError, match="k_scale"):
        raw(q, k_cache, block_table, lens, meta, splits, 0.1, False, torch.ones(1, device="cuda"), out, lse)
    with pytest.raises(RuntimeError, match="^q:"):
        raw(q[..., :512], k_cache, block_table, lens, meta, splits, 0.1, False, None, out, lse)
    with pytest.raises(RuntimeError, match="out:"):
        raw(q, k_cache, block_table, lens, meta, splits, 0.1, False, None, out[..., :256], lse)
    misaligned = torch.empty(1, 1, 16, D + 1, device="cuda", dtype=torch.bfloat16)[..., 1:]
    with pytest.raises(RuntimeError, match="16-byte"):
        raw(misaligned, k_cache, block_table, lens, meta, splits, 0.1, False, None, out, lse)


def test_opcheck_under_cuda_backend():
    """Schemas, fake kernels and the raw ops' declared mutations, with the sm90 kernels running."""
    _need_cuda_backend()
    lengths = [130, 0, 7]
    # bf16 and no NaN poison: opcheck's schema test compares inputs before and after with allclose.
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=5)
    k_cache = torch.nan_to_num(k_cache)
    q = torch.randn(len(lengths), 2, 40, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        torch.library.opcheck(torch.ops.dskernels.get_mla_metadata, (lens, 80, 1))
        meta, splits = dskernels.get_mla_metadata(lens, 80, 1)
        torch.library.opcheck(torch.ops.dskernels.flash_mla_with_kvcache,
                              (q, k_cache, block_table, lens, DV, meta, splits),
                              {"causal": True, "k_scale": k_scale})
        out = torch.empty(len(lengths), 2, 40, DV, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(len(lengths), 40, 2, device="cuda")
        torch.library.opcheck(torch.ops.dskernels._sm90_flash_mla_with_kvcache,
                              (q, k_cache, block_table, lens, meta, splits, 0.04, True, k_scale, out, lse))


@pytest.mark.parametrize("narrow", [False, True])
def test_negative_num_splits_entry_leaves_no_row_unwritten(narrow, monkeypatch):
    """A caller's num_splits with a negative first entry (outside API.md's contract): the decode
    kernels and the combine both count num_splits[i + 1] - num_splits[i] splits (python_ref's
    reading), so one of them writes every row. The combine counted from max(entry, 0): [1 - n, 1]
    for n >= 2 splits left out unwritten, [-1, 0] for one split overwrote it with zeros."""
    _need_cuda_backend()
    monkeypatch.setenv("DSKERNELS_MLA_NARROW", "1" if narrow else "0")
    raw = torch.ops.dskernels._sm90_flash_mla_with_kvcache
    for length in (4096, 50):
        k_cache, block_table, _ = make_cache([length], 1, 64, torch.bfloat16, seed=3)
        lens = torch.tensor([length], dtype=torch.int32, device="cuda")
        q = torch.randn(1, 1, 16, D, device="cuda", dtype=torch.bfloat16)
        with dskernels.backend("cuda"):
            meta, splits = dskernels.get_mla_metadata(lens, 16, 1)
        n = int(splits[1])
        assert (n >= 2) == (length == 4096)

        def run(num_splits):
            out = torch.full((1, 1, 16, DV), math.nan, device="cuda", dtype=torch.bfloat16)
            lse = torch.full((1, 16, 1), math.nan, device="cuda")
            raw(q, k_cache, block_table, lens, meta, num_splits, D ** -0.5, False, None, out, lse)
            return out, lse

        out, lse = run(torch.tensor([1 - n, 1], dtype=torch.int32, device="cuda"))
        assert not out.isnan().any() and lse.isfinite().all()
        if n == 1:
            expected = run(splits)
            got = run(torch.tensor([-1, 0], dtype=torch.int32, device="cuda"))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


# Batch-invariant mode on each sm90 variant: (switches, h_q, s_q, causal, page size, cache dtype).
# The narrow kernel takes <= 32 rows; clusters pair the two row tiles of 128 heads (TMA path, 16-bit
# cache); the fp8 TMA path widens whole blocks in place; page 61 takes the register path.
INVARIANT_VARIANTS = {
    "default": ({}, 128, 1, False, 64, torch.bfloat16),
    "default-mtp-fp8": ({}, 16, 2, True, 61, FP8),
    "seesaw": ({"DSKERNELS_MLA_SEESAW": "1"}, 64, 1, True, 64, torch.bfloat16),
    "narrow": ({"DSKERNELS_MLA_NARROW": "1"}, 16, 2, True, 64, torch.bfloat16),
    "narrow-fp8": ({"DSKERNELS_MLA_NARROW": "1"}, 16, 1, False, 61, FP8),
    "cluster": ({"DSKERNELS_MLA_CLUSTER": "1"}, 128, 1, False, 64, torch.float16),
    "fp8-tma": ({"DSKERNELS_MLA_FP8_TMA": "1", "DSKERNELS_MLA_REQUIRE_TMA": "1"}, 64, 1, False, 64, FP8),
}


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("variant", list(INVARIANT_VARIANTS))
def test_invariant_plan_is_batch_invariant(variant, k, monkeypatch):
    """The batch-invariant plan (b * K partitions, one piece each, many idle) on each kernel variant:
    a 9000-key sequence alone and inside batches with other lengths (0, 1, odd, long; its pages
    elsewhere, NaN in every unowned cache slot) gives the same out and lse bits, within the oracle's
    tolerance, and the variant's kernel is the one that ran."""
    _need_cuda_backend()
    switches, h_q, s_q, causal, page_size, cache_dtype = INVARIANT_VARIANTS[variant]
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(mla_ops.INVARIANT_SPLITS_ENV, str(k))
    q_dtype = torch.float16 if variant == "cluster" else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(k)
    n = 9000  # K = 4 cuts it into 4 pieces at 16 to 64 rows, 2 at 128 (invariant_min_piece)
    q_t = torch.randn(s_q, h_q, D, generator=gen, device="cuda").to(q_dtype)
    keys_t = torch.randn(n, 1, D, generator=gen, device="cuda")
    keys_t = (keys_t * 16).to(FP8) if cache_dtype == FP8 else keys_t.to(cache_dtype)
    results = []
    with dskernels.backend("cuda"), dskernels.batch_invariant():
        for lengths, pos in (([n], 0), ([0, n, 1], 1), ([777, 1, 20000, 0, 64, n], 5), ([n] + [129] * 40, 0)):
            k_cache, block_table, k_scale = make_cache(lengths, 1, page_size, cache_dtype, seed=len(results))
            t = torch.arange(n, device="cuda")
            pages = block_table[pos, t // page_size].long()
            k_cache.view(torch.uint8)[pages, t % page_size] = keys_t.view(torch.uint8)
            q = torch.randn(len(lengths), s_q, h_q, D, device="cuda").to(q_dtype)
            q[pos] = q_t
            lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
            (out, lse), names = kernels_launched(lambda: decode(q, k_cache, block_table, lens, k_scale, causal))
            check(out, lse, q, k_cache, block_table, lens, k_scale, causal)
            results.append((out[pos], lse[pos]))
            if "NARROW" in str(switches):
                assert any("narrow" in name for name in names), sorted(names)
            elif "SEESAW" in str(switches):
                assert any("decode_kernel<" in name and "true>" in name for name in names), sorted(names)
            elif "CLUSTER" in str(switches):
                assert any("decode_kernel<" in name and ", 2" in name for name in names), sorted(names)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
