"""get_mla_metadata / flash_mla_with_kvcache on every backend against python_ref.mla.

CI runs the Triton kernels through the interpreter, so the shapes are tiny (d = 64, dv = 48: a
V part of 48 padded to 64 plus a 16-wide "rope" part, the same split as V3's 512 + 64)."""

import math

import numpy
import pytest
import torch

import dskernels
import python_ref.mla
from dskernels.ops import mla as mla_ops

FP8 = torch.float8_e4m3fn
HUGE_PAGE = 2**31 - 1  # unused block-table slots: any read of one would fault or hit garbage

# Tolerances derived from the math, per q dtype. Both sides round out to q's dtype (up to 1 ulp
# apart: 2^-7 relative for bf16, 2^-10 for fp16); the kernel also rounds the softmax weights to
# q's dtype before P @ V (half an ulp, 2^-8 / 2^-11 relative each, so at most that times max|V|
# after summing a convex combination), and accumulates in fp32 (negligible at these sizes). LSE is
# fp32 only.
TOLERANCES = {
    torch.bfloat16: dict(rtol=2**-7, atol_per_v=2**-8),
    torch.float16: dict(rtol=2**-10, atol_per_v=2**-11),
    torch.float32: dict(rtol=1e-5, atol_per_v=1e-5),
}
LSE_ATOL = 1e-4


def scattered_pages(lengths, page_size, gen, spare_slots=2, spare_pages=3):
    """Pages of each sequence at random places of a cache with spare_pages more: (block_table [b,
    max pages + spare_slots] int32 with HUGE_PAGE in unused slots, owned [num_pages, page_size]:
    the slots some sequence's tokens occupy)."""
    pages_per_seq = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + spare_pages
    order = torch.randperm(num_pages, generator=gen)
    block_table = torch.full((len(lengths), max(pages_per_seq, default=0) + spare_slots), HUGE_PAGE, dtype=torch.int32)
    owned = torch.zeros(num_pages, page_size, dtype=torch.bool)
    used = 0
    for i, (n, pages) in enumerate(zip(lengths, pages_per_seq)):
        ids = order[used:used + pages]
        used += pages
        block_table[i, :pages] = ids.int()
        t = torch.arange(n)
        owned[ids[t // page_size], t % page_size] = True
    return block_table, owned


def make_inputs(lengths, s_q, h_q, h_kv, page_size, dtype, cache_dtype, *, d=64, dv=48, device="cpu",
                seed=0, spare_slots=2, spare_pages=3):
    """A paged cache with the pages of each sequence scattered at random, NaN in every cache slot
    no sequence owns (unused pages and the tail of each last page) and HUGE_PAGE in unused
    block-table slots."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    block_table, owned = scattered_pages(lengths, page_size, gen, spare_slots, spare_pages)
    cache = torch.randn(owned.shape[0], page_size, h_kv, d, generator=gen)
    cache[~owned] = math.nan
    k_scale = None
    if cache_dtype == FP8:
        k_scale = torch.tensor([0.0625])
        k_cache = (cache / k_scale).to(FP8)
    else:
        k_cache = cache.to(cache_dtype)
    q = torch.randn(b, s_q, h_q, d, generator=gen).to(dtype)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    args = [q, k_cache, block_table, cache_seqlens]
    args = [t.to(device) for t in args]
    return (*args, dv, None if k_scale is None else k_scale.to(device))


def skip_cuda_backend(name):
    """The sm90 kernel is built for V3's d = 576 / dv = 512 only; tests/test_mla_sm90.py covers it."""
    if name == "cuda":
        pytest.skip("the sm90 CUDA kernel takes d = 576, dv = 512 only (tests/test_mla_sm90.py)")


def run_op(q, k_cache, block_table, cache_seqlens, dv, k_scale, causal, softmax_scale=None):
    h_q, h_kv = q.shape[2], k_cache.shape[2]
    meta, splits = dskernels.get_mla_metadata(cache_seqlens, q.shape[1] * h_q // h_kv, h_kv)
    return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv, meta, splits,
                                            softmax_scale=softmax_scale, causal=causal, k_scale=k_scale)


def run_unchecked(q, k_cache, block_table, cache_seqlens, dv):
    """The kernels as a GPU runs them, without the host-side check of lengths and page ids: on CPU
    tensors the op reads those values first (free there) and raises as the reference does, so
    here the Triton launcher is called directly."""
    if q.device.type != "cpu":
        return run_op(q, k_cache, block_table, cache_seqlens, dv, None, False)
    from dskernels.triton import mla as triton_mla

    meta, splits = dskernels.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2],
                                              k_cache.shape[2])
    out = q.new_empty(*q.shape[:3], dv)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    triton_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv, meta, splits,
                                      q.shape[-1] ** -0.5, False, None, out, lse)
    return out, lse


def assert_matches_oracle(out, lse, q, k_cache, block_table, cache_seqlens, dv, k_scale, causal,
                          softmax_scale=None):
    ref_out, ref_lse = python_ref.mla.flash_mla_with_kvcache(
        q.cpu(), k_cache.cpu(), block_table.cpu(), cache_seqlens.cpu(), dv, softmax_scale, causal,
        None if k_scale is None else k_scale.cpu())
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, dv) and out.dtype == q.dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    out, lse = out.cpu().float(), lse.cpu()
    ref_out = ref_out.float()
    assert not out.isnan().any(), "NaN in out: a poisoned cache slot or block-table entry was read"
    tol = TOLERANCES[q.dtype]
    vmax = 1.0
    if k_cache.numel():
        values = k_cache[..., :dv].cpu().float()
        values = values[values.isfinite()]
        if values.numel():
            vmax = values.abs().max().item() * (1.0 if k_scale is None else k_scale.item())
    torch.testing.assert_close(out, ref_out, rtol=tol["rtol"], atol=tol["atol_per_v"] * vmax)
    assert torch.equal(lse.isinf(), ref_lse.isinf()), "queries that see no key must get lse = +inf"
    assert (lse[lse.isinf()] > 0).all()
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=LSE_ATOL)
    assert (out[ref_lse.permute(0, 2, 1).isinf()] == 0).all(), "a query with no key must get out = 0"


# Every value of every axis appears; the full cross product would take too long on the interpreter.
# (lengths, s_q, h_q, h_kv, page_size, cache dtype, causal)
GRID = [
    ([70, 0, 5, 200], 1, 4, 1, 16, torch.bfloat16, False),
    ([70, 0, 5, 200], 1, 4, 1, 16, torch.bfloat16, True),
    ([1, 130, 0], 2, 4, 2, 1, torch.bfloat16, True),
    ([64, 61, 122, 3], 3, 2, 1, 61, torch.float16, True),
    ([0, 0], 2, 2, 2, 64, torch.bfloat16, False),
    ([300], 1, 8, 2, 64, FP8, False),
    ([45, 2, 190], 3, 4, 2, 61, FP8, True),
    ([17, 129], 2, 1, 1, 1, torch.float16, False),
    ([250, 1, 0, 64, 65], 1, 16, 1, 64, torch.bfloat16, True),
    ([33, 97], 2, 6, 2, 16, FP8, False),
    ([1000, 3], 3, 32, 1, 64, torch.bfloat16, True),  # 96 rows: two row tiles; 16 key blocks cut in splits
]


@pytest.mark.parametrize("lengths,s_q,h_q,h_kv,page_size,cache_dtype,causal", GRID)
def test_decode_matches_oracle(backend, lengths, s_q, h_q, h_kv, page_size, cache_dtype, causal):
    name, device = backend
    skip_cuda_backend(name)
    dtype = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16
    inputs = make_inputs(lengths, s_q, h_q, h_kv, page_size, dtype, cache_dtype, device=device,
                         seed=len(lengths) * 7 + s_q)
    out, lse = run_op(*inputs, causal)
    assert_matches_oracle(out, lse, *inputs, causal)


@pytest.mark.parametrize("fp8_path", ["native", "bytes"])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_decode_fp8_cache_paths(backend, q_dtype, fp8_path, monkeypatch):
    """The Triton kernel's fp8 paths (fp16 dots, a bf16 q scaled into fp16's range): native e4m3
    loads (with the separate P @ V load), and the path for GPUs whose Triton has no e4m3 type
    (before sm_89): the cache read as bytes and widened in integer arithmetic (e4m3_bits_to_fp16,
    checked on every byte value by tests/test_gemm.py)."""
    name, device = backend
    if name != "triton":
        pytest.skip("these paths are the Triton kernel's")
    if fp8_path == "bytes":
        monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    inputs = make_inputs([45, 2, 190], 3, 4, 2, 61, q_dtype, FP8, device=device, seed=5)
    out, lse = run_op(*inputs, True)
    assert_matches_oracle(out, lse, *inputs, True)


@pytest.mark.parametrize("exponent", [40, -100])
def test_decode_fp8_cache_bf16_queries_outside_fp16_range(backend, exponent):
    """With an fp8 cache the Triton kernel's dots take fp16 operands, whose range a bf16 q can
    leave (65504 and up, or below 2**-24): each row is scaled by its own power of two first. Here
    head 0 is 2**exponent times larger than the others (2**40: every value overflows fp16; 2**-100:
    every value is below its smallest), and the softmax scale undoes it for that head, so its
    scores are ordinary ones; the other heads' scores become flat or peaked: any of them read
    without the scaling gives inf, NaN or zeros."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, cache_seqlens, dv, k_scale = make_inputs(
        [45, 2, 190], 2, 4, 1, 16, torch.bfloat16, FP8, device=device, seed=11)
    q[:, :, 0] *= 2.0 ** exponent
    softmax_scale = q.shape[-1] ** -0.5 * 2.0 ** -exponent
    out, lse = run_op(q, k_cache, block_table, cache_seqlens, dv, k_scale, True, softmax_scale=softmax_scale)
    assert_matches_oracle(out, lse, q, k_cache, block_table, cache_seqlens, dv, k_scale, True,
                          softmax_scale=softmax_scale)


def test_decode_odd_head_dims_and_scale(backend):
    """d == dv (no rope part), a non-default softmax_scale and fp32 queries."""
    name, device = backend
    skip_cuda_backend(name)
    inputs = make_inputs([90, 7], 2, 2, 1, 16, torch.float32, torch.float32, d=32, dv=32, device=device)
    q = inputs[0]
    strided = torch.stack([q, torch.full_like(q, math.nan)], dim=3).flatten(2, 3)[:, :, ::2]  # head stride 2d
    assert strided.stride(2) == 2 * q.shape[3] and torch.equal(strided, q)
    inputs = (strided, *inputs[1:])
    out, lse = run_op(*inputs, True, softmax_scale=0.3)
    assert_matches_oracle(out, lse, *inputs, True, softmax_scale=0.3)


def test_empty_batch(backend):
    name, device = backend
    d, dv = (576, 512) if name == "cuda" else (64, 48)
    q, k_cache, block_table, lens, dv, _ = make_inputs([], 2, 4, 1, 64, torch.bfloat16, torch.bfloat16,
                                                       d=d, dv=dv, device=device)
    meta, splits = dskernels.get_mla_metadata(lens, 8, 1)
    assert splits.tolist() == [0] and (meta[:, 0] == 0).all() and (meta[:, 2] == -1).all()
    out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits)
    assert out.shape == (0, 2, 4, dv) and lse.shape == (0, 4, 2)


def test_batch_offsets_past_int32():
    """A q whose batch stride is below 2**31 elements (so Triton passes it as int32) but whose
    last sequence starts past 2**31: the Triton decode's offsets must be int64 (in int32 the third
    sequence's rows were read from 4 GiB before q). Only q's rows are touched, so the 4.4 GB
    buffer stays virtual."""
    b, s_q, h_q, d, dv = 3, 1, 4, 64, 48
    stride = 1_100_000_000
    try:
        buf = torch.empty(2 * stride + s_q * h_q * d, dtype=torch.float16)
    except RuntimeError as e:  # (an allocation refused outright: nothing to test here)
        pytest.skip(f"cannot reserve {2 * stride * 2 / 1e9:.1f} GB of address space: {e}")
    _, k_cache, block_table, lens, dv, _ = make_inputs([70, 33, 90], s_q, h_q, 1, 16, torch.float16,
                                                       torch.float16, d=d, dv=dv)
    q = buf.as_strided((b, s_q, h_q, d), (stride, h_q * d, d, 1))
    for i in range(b):
        q[i].copy_(torch.randn(s_q, h_q, d, generator=torch.Generator().manual_seed(i)))
    with dskernels.backend("triton"):
        out, lse = run_op(q, k_cache, block_table, lens, dv, None, True)
    assert_matches_oracle(out, lse, q.clone(), k_cache, block_table, lens, dv, None, True)


def test_block_table_offsets_past_int32():
    """A block table whose rows lie 1.1e9 entries apart: its offsets pass 2**31 at the third
    sequence, where the Triton kernel keeps them int32, so the launcher makes it dense first. The
    8.8 GB buffer stays virtual."""
    stride = 1_100_000_000
    try:
        buf = torch.empty(2 * stride + 16, dtype=torch.int32)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {2 * stride * 4 / 1e9:.1f} GB of address space: {e}")
    q, k_cache, block_table, lens, dv, _ = make_inputs([70, 33, 90], 1, 4, 1, 16, torch.float16, torch.float16)
    far = buf.as_strided(block_table.shape, (stride, 1))
    far.copy_(block_table)
    with dskernels.backend("triton"):
        out, lse = run_op(q, k_cache, far, lens, dv, None, True)
    assert_matches_oracle(out, lse, q, k_cache, block_table, lens, dv, None, True)


def test_query_rows_past_the_grid_limits_are_refused():
    """CUDA grids hold at most 65535 programs in y and z: the Triton path says so by name
    instead of failing the launch."""
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16).expand(1, 8200, 128, 16)  # 1.05M rows, no memory
    k_cache = torch.zeros(1, 16, 1, 16, dtype=torch.float16)
    lens = torch.tensor([5], dtype=torch.int32)
    with dskernels.backend("triton"):
        meta, splits = dskernels.get_mla_metadata(lens, 8200 * 128, 1)
        with pytest.raises(ValueError, match="^q: expected at most 1048560 query rows per sequence"):
            dskernels.flash_mla_with_kvcache(q, k_cache, torch.zeros(1, 1, dtype=torch.int32), lens, 16, meta, splits)


def test_no_query_heads(backend):
    """h_q = 0 (a multiple of any h_kv): empty outputs, no launch (a grid of no row tiles failed
    on the sm90 kernel)."""
    name, device = backend
    d, dv = (576, 512) if name == "cuda" else (64, 48)
    q, k_cache, block_table, lens, dv, _ = make_inputs([90, 7], 2, 1, 1, 64, torch.bfloat16, torch.bfloat16,
                                                       d=d, dv=dv, device=device)
    for rows in (2, 0):  # (0: s_q * h_q // h_kv of this q, the documented argument; it was refused)
        meta, splits = dskernels.get_mla_metadata(lens, rows, 1)
        out, lse = dskernels.flash_mla_with_kvcache(q[:, :, :0], k_cache, block_table, lens, dv, meta, splits,
                                                    causal=True)
        assert out.shape == (2, 2, 0, dv) and lse.shape == (2, 0, 2)


def test_flashmla_lazy_metadata_form(backend):
    """FlashMLA's newest calls: get_mla_metadata() with no lengths, num_splits None, the second
    sparse cache's arguments None: the first decode plans the batch, later ones reuse the plan."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, lens, dv, _ = make_inputs([70, 0, 5], 2, 4, 2, 16, torch.bfloat16, torch.bfloat16,
                                                       device=device)
    want = run_op(q, k_cache, block_table, lens, dv, None, True)
    meta, splits = dskernels.get_mla_metadata()
    assert splits is None and meta.plan is None
    for _ in range(2):  # planned, then reused (one plan per decode step, shared by its layers)
        got = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, causal=True,
                                               extra_k_cache=None, extra_indices_in_kvcache=None,
                                               extra_topk_length=None)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert meta.plan is not None
    with pytest.raises(ValueError, match="^tile_scheduler_metadata: planned for"):
        dskernels.flash_mla_with_kvcache(q[:2], k_cache, block_table[:2], lens[:2], dv, meta)
    explicit, _ = dskernels.get_mla_metadata(lens, 4, 2)
    # code written for FlashMLA's newest form passes the first element with no num_splits (vLLM):
    # the batch is planned in the call
    got = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, explicit, causal=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(NotImplementedError, match="^extra_k_cache: "):
        dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, extra_k_cache=k_cache)
    with pytest.raises(TypeError, match="^num_heads_k: expected an int with cache_seqlens"):
        dskernels.get_mla_metadata(lens, 4)


def test_lazy_metadata_form_failed_call_keeps_no_plan(backend):
    """FlashMLA's rule for its newest form: a first call that raises leaves the metadata empty, so a
    valid call with another batch still plans (it used to keep the failed call's plan and refuse
    the next batch); num_splits must be None with it (a tensor was silently ignored)."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, lens, dv, _ = make_inputs([20, 3], 1, 4, 1, 16, torch.bfloat16, torch.bfloat16,
                                                       device=device)
    meta = dskernels.get_mla_metadata()[0]
    with pytest.raises(TypeError, match="^block_table: "):
        dskernels.flash_mla_with_kvcache(q[:1], k_cache, block_table[:1].long(), lens[:1], dv, meta)
    assert meta.plan is None
    want = run_op(q, k_cache, block_table, lens, dv, None, False)
    got = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and meta.plan is not None
    _, splits = dskernels.get_mla_metadata(lens, 4, 1)
    with pytest.raises(ValueError, match="^num_splits: must be None with get_mla_metadata"):
        dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits)


def test_get_mla_metadata_takes_flashmla_first_argument_name(backend):
    """FlashMLA's first name for the query rows per kv head, num_heads_per_head_k, by keyword."""
    name, device = backend
    lens = torch.tensor([70, 0, 5], dtype=torch.int32, device=device)
    want = dskernels.get_mla_metadata(lens, 8, 1)
    got = dskernels.get_mla_metadata(lens, num_heads_per_head_k=8, num_heads_k=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TypeError, match="^num_heads_per_head_k: "):
        dskernels.get_mla_metadata(lens, 8, 1, num_heads_per_head_k=8)


def test_lazy_metadata_form_names_q_and_k_cache(backend):
    """The lazy form checks q and k_cache before it plans (its errors used to name
    get_mla_metadata's arguments, computed from them), and takes h_q = 0 as the explicit form does."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, lens, dv, _ = make_inputs([20, 3], 1, 2, 2, 16, torch.bfloat16, torch.bfloat16,
                                                       device=device)
    for bad_q, bad_cache, match in ((q[:, :, :1], k_cache, "^q: expected h_q to be a multiple of h_kv = 2"),
                                    (q[:, :0], k_cache, r"^q: expected s_q \(dimension 1\) >= 1"),
                                    (q, k_cache[:, :, :0], "^k_cache: expected page_size >= 1 and h_kv >= 1")):
        with pytest.raises(ValueError, match=match):
            dskernels.flash_mla_with_kvcache(bad_q, bad_cache, block_table, lens, dv, dskernels.get_mla_metadata()[0])
    out, lse = dskernels.flash_mla_with_kvcache(q[:, :, :0], k_cache, block_table, lens, dv,
                                                dskernels.get_mla_metadata()[0])
    assert out.shape == (2, 1, 0, dv) and lse.shape == (2, 0, 1)


def test_block_table_of_2_31_keys_or_more():
    """max_pages * page_size past int32 (a wide table of large pages, unused entries huge): the
    Triton kernel capped the keys at a product that wrapped negative and dropped every key."""
    page, d, dv = 65536, 16, 16
    k_cache = torch.randn(1, page, 1, d).bfloat16()
    block_table = torch.full((1, 32769), HUGE_PAGE, dtype=torch.int32)
    block_table[0, 0] = 0
    lens = torch.tensor([100], dtype=torch.int32)
    q = torch.randn(1, 1, 1, d).bfloat16()
    ref_out, ref_lse = python_ref.mla.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv)
    with dskernels.backend("triton"):
        meta, splits = dskernels.get_mla_metadata(lens, 1, 1)
        out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=LSE_ATOL)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol["rtol"],
                               atol=tol["atol_per_v"] * k_cache[0, :100].float().abs().max().item())


def test_oracle_definition():
    """python_ref against the formulas of API.md on one sequence of two keys, by hand."""
    d, dv = 16, 8
    keys = torch.randn(2, d)
    q = torch.randn(1, 2, 1, d)
    k_cache = torch.full((3, 1, 1, d), math.nan)
    k_cache[2, 0, 0] = keys[0]
    k_cache[0, 0, 0] = keys[1]
    block_table = torch.tensor([[2, 0, HUGE_PAGE]], dtype=torch.int32)
    lens = torch.tensor([2], dtype=torch.int32)
    out, lse = python_ref.mla.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, 0.5, causal=True)
    # Token 0 (causal) sees key 0 only; token 1 sees both.
    s0 = 0.5 * q[0, 0, 0] @ keys[0]
    torch.testing.assert_close(lse[0, 0, 0], s0)
    torch.testing.assert_close(out[0, 0, 0], keys[0, :dv])
    s = 0.5 * keys @ q[0, 1, 0]
    torch.testing.assert_close(lse[0, 0, 1], torch.logsumexp(s, 0))
    torch.testing.assert_close(out[0, 1, 0], torch.softmax(s, 0) @ keys[:, :dv])
    out, lse = python_ref.mla.flash_mla_with_kvcache(q, k_cache, block_table, lens * 0, dv)
    assert (out == 0).all() and (lse == math.inf).all()


@pytest.mark.parametrize("split", [False, True])
def test_bf16_out_rounds_to_nearest_on_cpu(backend, split):
    """On CPU tensors both paths keep P in fp32 (IEEE dots under the interpreter), so a bf16 out is
    the fp64 result rounded once: within half an ulp (plus fp32's ~2^-24 relative error). The
    interpreter truncates fp32 -> bf16 conversions, which gave up to one ulp, biased toward zero.
    split: a long sequence cut into several splits, so the combine kernel writes out."""
    name, device = backend
    skip_cuda_backend(name)
    if device != "cpu":
        pytest.skip("a GPU's Triton path rounds P to bf16 before P @ V (TOLERANCES covers it)")
    lengths = [700, 37] if split else [37, 70]
    q, k_cache, block_table, lens, dv, _ = make_inputs(lengths, 2, 4, 1, 16, torch.bfloat16, torch.bfloat16,
                                                       d=48, dv=32)
    out, _ = run_op(q, k_cache, block_table, lens, dv, None, False)
    if split:
        _, splits = dskernels.get_mla_metadata(lens, 2 * 4, 1)
        assert splits[1] - splits[0] > 1, "the long sequence should be split for this test"
    expected, _ = python_ref.mla.flash_mla_with_kvcache(q.double(), k_cache.double(), block_table, lens, dv)
    ulp = 2.0 ** (torch.floor(torch.log2(expected.abs())) - 7)
    assert ((out.double() - expected).abs() <= ulp * (0.5 + 2**-10)).all()


# ---------------------------------------------------------------------------------------------
# The split plan
# ---------------------------------------------------------------------------------------------

def simulate_plan(meta, num_splits, lengths):
    """Walks the plan as the kernel does: returns, per sequence, the list of (split, first key,
    end key) pieces."""
    b = len(lengths)
    pieces = [[] for _ in range(b)]
    for begin_idx, begin_tok, end_idx, end_tok, begin_split, *_ in meta.tolist():
        for i in range(begin_idx, end_idx + 1):
            lo = begin_tok if i == begin_idx else 0
            hi = end_tok if i == end_idx else lengths[i]
            if lo < hi:
                pieces[i].append((begin_split if i == begin_idx else 0, lo, hi))
    return pieces


@pytest.mark.parametrize("lengths,q_rows,h_kv", [
    ([0], 1, 1), ([5], 16, 1), ([0, 0, 0], 2, 2), ([4096] * 4, 128, 1),
    ([1, 70000, 3, 0, 129, 64, 65], 16, 1), (list(range(0, 3000, 37)), 32, 2), ([10] * 300, 64, 1),
])
def test_split_plan_covers_every_key_once(backend, lengths, q_rows, h_kv):
    lens = torch.tensor(lengths, dtype=torch.int32, device=backend[1])
    meta, num_splits = dskernels.get_mla_metadata(lens, q_rows, h_kv)
    meta, num_splits = meta.cpu(), num_splits.cpu()
    b = len(lengths)
    parts = mla_ops.num_partitions(lens.device, q_rows, h_kv)
    assert meta.shape == (parts, 8) and meta.dtype == torch.int32
    assert num_splits.shape == (b + 1,) and num_splits.dtype == torch.int32
    splits = num_splits.tolist()
    assert splits[0] == 0 and all(x <= y for x, y in zip(splits, splits[1:]))
    assert splits[-1] <= b + parts - 1
    pieces = simulate_plan(meta, num_splits, lengths)
    for i, n in enumerate(lengths):
        got = sorted(pieces[i])
        assert [s for s, _, _ in got] == list(range(splits[i + 1] - splits[i])), (i, got)
        covered = [t for _, lo, hi in got for t in (lo, hi)]
        if n == 0:
            assert got == []
        else:  # contiguous pieces from 0 to n, cut on block boundaries
            assert covered[0] == 0 and covered[-1] == n
            assert all(covered[k] == covered[k + 1] for k in range(1, len(covered) - 1, 2))
            assert all(lo % mla_ops.BLOCK_TOKENS == 0 for _, lo, _ in got)


@pytest.mark.parametrize("lengths", [[0], [7], [0, 0, 5], [1] * 300, [8192, 1, 3000] + [0] * 40,
                                     list(range(0, 5000, 3)), [-5, 64, 65]])
@pytest.mark.parametrize("parts", [pytest.param(p, marks=[pytest.mark.gpu] if torch.cuda.is_available() else [])
                                   for p in (1, 7, 8, 66, 132)])
def test_triton_metadata_kernel_equals_split_plan(lengths, parts):
    """The Triton split plan (one program) is split_plan bit for bit: batches past its 256-sequence
    chunks, more partitions than work, negative lengths (counted as 0); poisoned outputs."""
    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    from dskernels.triton import mla as triton_mla

    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    meta = torch.full((parts, mla_ops.METADATA_SIZE), -7, dtype=torch.int32, device=lens.device)
    num_splits = torch.full((len(lengths) + 1,), -7, dtype=torch.int32, device=lens.device)
    triton_mla.get_mla_metadata(lens, meta, num_splits, mla_ops.BLOCK_TOKENS, mla_ops.FIXED_OVERHEAD_BLOCKS)
    expected_meta, expected_splits = mla_ops.split_plan(lens, parts)
    assert torch.equal(meta, expected_meta), (meta, expected_meta)
    assert torch.equal(num_splits, expected_splits)


def test_triton_tile_rule(monkeypatch):
    """GPU tiles of the Triton kernel (no GPU needed: the rule reads the device's shared memory):
    double-buffered keys (5 stages, see DOUBLE_BUFFER_STAGES) where they fit, else one buffer;
    64-key blocks where two fit (the H200's measured best), else 32;
    DSKERNELS_MLA_TRITON_TILE overrides, and a malformed value is named."""
    from types import SimpleNamespace

    from dskernels.triton.mla import tile_config

    cuda = torch.device("cuda", 0)
    for shared, rows, expected in [(232448, 16, (16, 64, 8, 5)), (232448, 256, (32, 64, 8, 5)),
                                   (101376, 16, (16, 32, 8, 5)), (101376, 32, (32, 32, 8, 2))]:
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda *_, s=shared: SimpleNamespace(shared_memory_per_block_optin=s))
        assert tile_config(rows, 512, 64, cuda) == expected, (shared, rows)
    assert tile_config(5, 64, 16, cuda) == (16, 64, 4, 5)  # small heads (these tests' d = 64)
    # fp32 operands (4 bytes): 64-key buffers do not fit twice, 32-key ones do
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *_: SimpleNamespace(shared_memory_per_block_optin=232448))
    assert tile_config(16, 512, 64, cuda, 4) == (16, 32, 8, 5)
    assert tile_config(32, 512, 64, cuda, 4) == (32, 32, 8, 5)
    monkeypatch.setattr(torch.cuda, "get_device_properties",  # an sm_89's 99 KB: one 16-key buffer
                        lambda *_: SimpleNamespace(shared_memory_per_block_optin=101376))
    assert tile_config(16, 512, 64, cuda, 4) == (16, 16, 8, 2)
    assert tile_config(32, 512, 64, cuda, 4) == (16, 16, 8, 2)
    monkeypatch.setenv("DSKERNELS_MLA_TRITON_TILE", "0,64,8,3")
    assert tile_config(32, 512, 64, cuda) == (32, 64, 8, 3)
    assert tile_config(32, 512, 64, torch.device("cpu")) == (32, 64, 4, 1)  # the interpreter's own
    for bad in ["16,32,8", "16,48,8,2", "12,32,8,2", "16,32,3,2", "a,b,c,d"]:
        monkeypatch.setenv("DSKERNELS_MLA_TRITON_TILE", bad)
        with pytest.raises(ValueError, match="DSKERNELS_MLA_TRITON_TILE"):
            tile_config(32, 512, 64, cuda)


def test_split_plan_balances_uneven_lengths():
    """A long sequence beside short ones is spread over the partitions: no partition gets more
    than its even share of the work (key blocks plus the fixed overhead of each sequence)."""
    lengths = [100000, 10, 10, 10, 0, 5000]
    lens = torch.tensor(lengths, dtype=torch.int32)
    parts = 132
    meta, num_splits = mla_ops.split_plan(lens, parts)
    blocks = [-(-n // 64) for n in lengths]
    share = -(-(sum(blocks) + mla_ops.FIXED_OVERHEAD_BLOCKS * len(lengths)) // parts)
    for row in meta.tolist():
        work = 0
        for i in range(row[0], row[2] + 1):
            lo = row[1] if i == row[0] else 0
            hi = row[3] if i == row[2] else lengths[i]
            work += -(-max(hi - lo, 0) // 64)
        assert work <= share, (row, work, share)
    pieces = simulate_plan(meta, num_splits, lengths)
    assert len(pieces[0]) >= 120  # the long sequence is cut across (almost) every partition


def test_metadata_shape_depends_only_on_batch():
    a, sa = dskernels.get_mla_metadata(torch.tensor([0, 0, 0], dtype=torch.int32), 16, 1)
    b, sb = dskernels.get_mla_metadata(torch.tensor([9000, 1, 77], dtype=torch.int32), 16, 1)
    assert a.shape == b.shape and sa.shape == sb.shape


# ---------------------------------------------------------------------------------------------
# Validation, opcheck, torch.compile, CUDA graphs
# ---------------------------------------------------------------------------------------------

def _good_args():
    q, k_cache, block_table, lens, dv, _ = make_inputs([20, 3], 1, 2, 1, 16, torch.bfloat16, torch.bfloat16)
    meta, splits = dskernels.get_mla_metadata(lens, 2, 1)
    return dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=lens, head_dim_v=dv,
                tile_scheduler_metadata=meta, num_splits=splits)


BAD = [
    ("q", lambda a: a["q"][0], ValueError, ["4 dimensions"]),
    ("q", lambda a: a["q"].to(torch.int32), TypeError, ["dtype", "int32"]),
    ("q", lambda a: a["q"][..., :40], ValueError, ["multiple of 16", "40"]),
    ("k_cache", lambda a: a["k_cache"].expand(-1, -1, 3, -1).contiguous(), ValueError, ["h_kv = 3", "h_q = 2"]),
    ("k_cache", lambda a: a["k_cache"].half(), TypeError, ["dtype", "float16"]),
    ("k_cache", lambda a: a["k_cache"][..., :48].contiguous(), ValueError, ["64", "48"]),
    ("k_cache", lambda a: a["k_cache"].to(FP8), ValueError, ["k_scale"]),
    ("head_dim_v", lambda a: 80, ValueError, ["64", "80"]),
    ("block_table", lambda a: a["block_table"].long(), TypeError, ["int32", "int64"]),
    ("block_table", lambda a: a["block_table"][:1], ValueError, ["2 rows"]),
    ("cache_seqlens", lambda a: a["cache_seqlens"].long(), TypeError, ["int32", "int64"]),
    ("cache_seqlens", lambda a: a["cache_seqlens"][:1], ValueError, ["(2,)", "(1,)"]),
    ("num_splits", lambda a: a["num_splits"][:2], ValueError, ["(3,)", "(2,)"]),
    ("tile_scheduler_metadata", lambda a: a["tile_scheduler_metadata"][:, :4], ValueError, ["8"]),
    ("q", lambda a: a["q"].to("meta"), ValueError, ["on cpu (where k_cache, block_table", "meta"]),
    ("cache_seqlens", lambda a: a["cache_seqlens"].to("meta"), ValueError, ["on cpu", "meta"]),
]


@pytest.mark.parametrize("name,mutate,error,words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_named(name, mutate, error, words):
    args = _good_args()
    args[name] = mutate(args)
    if name == "k_cache" and args[name].dtype == FP8:
        name = "k_scale"
    if name == "k_cache" and args[name].shape[2] == 3:
        name = "q"  # h_q % h_kv is reported against q
    with pytest.raises(error) as info:
        dskernels.flash_mla_with_kvcache(**args)
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    for word in words:
        assert word in message, message


def test_bad_metadata_args_are_named():
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(TypeError, match="^cache_seqlens:.*int64"):
        dskernels.get_mla_metadata(lens.long(), 1, 1)
    with pytest.raises(ValueError, match="^num_heads_k:.*>= 1.*0"):
        dskernels.get_mla_metadata(lens, 1, 0)
    with pytest.raises(ValueError, match="^num_q_tokens_per_head_k: expected an int >= 0, got -1"):
        dskernels.get_mla_metadata(lens, -1, 1)
    with pytest.raises(TypeError, match="^num_heads_k: expected an int, got bool"):
        dskernels.get_mla_metadata(lens, 8, True)
    # FlashMLA's sparse arguments are not read, but checked (a wrong type is an argument out of place)
    with pytest.raises(TypeError, match="^is_fp8_kvcache: expected a bool, got int"):
        dskernels.get_mla_metadata(lens, 8, 1, 16, 2048)
    with pytest.raises(TypeError, match="^topk: expected an int, got bool"):
        dskernels.get_mla_metadata(lens, 8, 1, 16, True, True)
    for got, want in zip(dskernels.get_mla_metadata(lens, numpy.int64(8), numpy.int64(1), 16, numpy.bool_(True), 2048),
                         dskernels.get_mla_metadata(lens, 8, 1)):
        assert torch.equal(got, want)
    args = _good_args()
    with pytest.raises(ValueError, match="^k_scale:.*None"):
        dskernels.flash_mla_with_kvcache(**args, k_scale=torch.ones(1))
    with pytest.raises(TypeError, match="^head_dim_v:.*bool"):
        dskernels.flash_mla_with_kvcache(**{**args, "head_dim_v": True})
    with pytest.raises(ValueError, match="^cache_seqlens:.*100"):  # past the block table (oracle)
        args["cache_seqlens"] = torch.tensor([100, 3], dtype=torch.int32)
        with dskernels.backend("ref"):
            dskernels.flash_mla_with_kvcache(**args)


def test_pages_outside_the_cache_are_never_read(backend):
    """A length that reaches block-table slots past a sequence's pages (here filled with 2^31 - 1):
    the reference, and any backend on CPU tensors, names block_table; Triton's kernel drops the keys
    from the first page outside the cache on instead of reading there (a fault on a GPU), so it
    computes the sequence over its valid pages."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, lens, dv, _ = make_inputs([20, 16], 1, 2, 1, 16, torch.bfloat16, torch.bfloat16,
                                                       device=device)
    bad = torch.tensor([20, 40], dtype=torch.int32, device=device)  # sequence 1 owns one full page of 16
    if name == "ref" or device == "cpu":
        with pytest.raises(ValueError, match="^block_table: sequence 1 .*2147483647"):
            run_op(q, k_cache, block_table, bad, dv, None, False)
    if name == "ref":
        return
    out, lse = run_unchecked(q, k_cache, block_table, bad, dv)
    assert_matches_oracle(out, lse, q, k_cache, block_table, torch.tensor([20, 16], dtype=torch.int32), dv,
                          None, False)


def test_a_plan_made_for_other_lengths_is_refused_on_cpu(backend):
    """Lengths that moved on (the next decode step) without a new get_mla_metadata: the plan drops
    the new key (or repeats old ones). On CPU tensors reading it is free, so every backend refuses
    it, the reference too (which needs no plan), so that the mistake shows before a GPU run."""
    name, device = backend
    skip_cuda_backend(name)
    if device != "cpu":
        pytest.skip("checked on CPU tensors only (on a GPU it would sync)")
    q, k_cache, block_table, lens, dv, _ = make_inputs([100, 37], 1, 4, 1, 16, torch.bfloat16, torch.bfloat16)
    meta, splits = dskernels.get_mla_metadata(lens, 4, 1)
    for moved in (lens + 1, lens - 1):
        with pytest.raises(ValueError, match="^tile_scheduler_metadata: the split plan does not cover the .* keys "
                                             "of sequence .* call get_mla_metadata again"):
            dskernels.flash_mla_with_kvcache(q, k_cache, block_table, moved, dv, meta, splits)


def test_a_length_past_the_block_table_walks_only_the_table(backend):
    """A garbage length of 2^30 keys over a block table of two pages: the reference (and any
    backend on CPU tensors) names cache_seqlens; the kernels drop the keys past the table without
    walking them (Triton's loops used to run to the length: past an hour under the interpreter,
    for 2^31 - 1)."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, _, dv, _ = make_inputs([32, 16], 1, 2, 1, 16, torch.bfloat16, torch.bfloat16,
                                                    device=device, spare_slots=0)
    bad = torch.tensor([2**30, 16], dtype=torch.int32, device=device)
    if name == "ref" or device == "cpu":
        with pytest.raises(ValueError, match="^cache_seqlens:"):
            run_op(q, k_cache, block_table, bad, dv, None, False)
    if name == "ref":
        return
    out, lse = run_unchecked(q, k_cache, block_table, bad, dv)
    assert_matches_oracle(out, lse, q, k_cache, block_table, torch.tensor([32, 16], dtype=torch.int32), dv,
                          None, False)


def test_nan_inputs_give_nan_not_an_empty_result(backend):
    """A NaN score (here a NaN query head, and a NaN in a key a sequence owns) makes out and lse NaN
    for the rows that see it, in one split and across splits (the combine); only a query that sees
    no key gets out = 0 and lse = +inf. (`l > 0` read NaN as "nothing seen" before.)"""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, lens, dv, _ = make_inputs([70, 0, 1000], 1, 4, 1, 16, torch.bfloat16,
                                                       torch.bfloat16, device=device)
    q[0, 0, 1, 3] = math.nan  # sequence 0, head 1: its row only
    page, slot = block_table[2, 40].item(), 7  # key 647 of sequence 2: every head of it
    k_cache[page, slot, 0, 5] = math.nan
    meta, splits = dskernels.get_mla_metadata(lens, 4, 1)
    if name == "triton":
        assert (splits[1] - splits[0]).item() == 1 and (splits[3] - splits[2]).item() > 1  # both paths
    out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits)
    out, lse = out.cpu().float(), lse.cpu()
    nan_rows = torch.zeros(3, 4, dtype=torch.bool)  # [b, h_q], s_q = 1
    nan_rows[0, 1] = True
    nan_rows[2] = True
    assert torch.equal(out[:, 0].isnan().all(-1), nan_rows) and not out[:, 0][~nan_rows].isnan().any()
    assert torch.equal(lse[..., 0].isnan(), nan_rows)
    assert (out[1] == 0).all() and (lse[1] == math.inf).all()  # the empty sequence
    ref_out, ref_lse = python_ref.mla.flash_mla_with_kvcache(q.cpu(), k_cache.cpu(), block_table.cpu(),
                                                             lens.cpu(), dv)
    torch.testing.assert_close(out, ref_out.float(), rtol=2**-7, atol=2**-7, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=LSE_ATOL, equal_nan=True)


def test_infinite_score_gives_nan_not_an_empty_result(backend):
    """A +inf score (an inf in a visible key, times a query entry of the same sign) has no finite
    softmax: out and lse NaN on every backend and in the oracle (which said lse = +inf, the "no key
    seen" value, with out NaN); a -inf score only drops its key."""
    name, device = backend
    skip_cuda_backend(name)
    q, k_cache, block_table, lens, dv, _ = make_inputs([70, 0, 40], 1, 2, 1, 16, torch.bfloat16,
                                                       torch.bfloat16, device=device)
    q[:, 0, :, 60] = torch.tensor([1.0, -1.0], dtype=q.dtype)
    page = block_table[0, 2].item()  # keys 32..47 of sequence 0
    k_cache[page, 5, 0, 60] = math.inf  # past dv (in V, 0 * inf would be NaN): +inf for head 0, -inf for head 1
    meta, splits = dskernels.get_mla_metadata(lens, 2, 1)
    outs = [dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits)]
    outs.append(python_ref.mla.flash_mla_with_kvcache(q.cpu(), k_cache.cpu(), block_table.cpu(), lens.cpu(), dv))
    for out, lse in outs:
        out, lse = out.cpu().float(), lse.cpu()
        assert out[0, 0, 0].isnan().all() and lse[0, 0].isnan().all()
        assert not out[0, 0, 1].isnan().any() and lse[0, 1].isfinite().all() and lse[2].isfinite().all()
        assert (out[1] == 0).all() and (lse[1] == math.inf).all()


def test_opcheck():
    args = _good_args()
    lens = args["cache_seqlens"]
    torch.library.opcheck(torch.ops.dskernels.get_mla_metadata, (lens, 2, 1))
    positional = tuple(args.values())
    torch.library.opcheck(torch.ops.dskernels.flash_mla_with_kvcache, positional)
    q, k_cache, block_table, lens, dv, k_scale = make_inputs([20, 0], 2, 2, 1, 16, torch.bfloat16, FP8)
    meta, splits = dskernels.get_mla_metadata(lens, 4, 1)
    torch.library.opcheck(torch.ops.dskernels.flash_mla_with_kvcache,
                          (q, k_cache, block_table, lens, dv, meta, splits),
                          {"softmax_scale": 0.2, "causal": True, "k_scale": k_scale},
                          # test_schema compares inputs before/after with allclose, which torch
                          # does not implement for float8 on CPU; the bf16 call above covers it.
                          test_utils=("test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    def decode(q, k_cache, block_table, lens):
        meta, splits = dskernels.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1)
        out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 48, meta, splits, causal=True)
        return out.float() * 2, lse

    q, k_cache, block_table, lens, dv, _ = make_inputs([37, 0, 5], 2, 4, 1, 16, torch.bfloat16, torch.bfloat16)
    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(q, k_cache, block_table, lens), decode(q, k_cache, block_table, lens)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_torch_compile_dynamic_row_count_does_not_recompile():
    """get_mla_metadata's row count is a SymInt: a compiled decode with dynamic shapes serves every
    s_q from one graph (an int schema specialized it and recompiled per s_q * h_q)."""
    from torch._dynamo.testing import CompileCounter

    def decode(q, k_cache, block_table, lens):
        meta, splits = dskernels.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1)
        return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 48, meta, splits, causal=True)

    counter = CompileCounter()
    compiled = torch.compile(decode, fullgraph=True, backend=counter, dynamic=True)
    for s_q in (2, 3, 5, 40):  # 40 x 4 rows: several Triton row tiles, so a smaller num_parts
        q, k_cache, block_table, lens, _, _ = make_inputs([37, 0, 5], s_q, 4, 1, 16, torch.bfloat16, torch.bfloat16)
        for actual, expected in zip(compiled(q, k_cache, block_table, lens), decode(q, k_cache, block_table, lens)):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("s_q,h_q,cache_dtype", [(1, 16, torch.bfloat16), (2, 128, torch.bfloat16),
                                                 (1, 64, FP8), (2, 32, torch.float16)])
def test_deepseek_v3_shapes_on_gpu(s_q, h_q, cache_dtype):
    """The Triton kernel at V3's d = 576 / dv = 512 (the GPU tile configuration) against the oracle."""
    lengths = [4096, 0, 1, 777, 64, 2500, 1025, 3]
    dtype = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16
    inputs = make_inputs(lengths, s_q, h_q, 1, 64, dtype, cache_dtype, d=576, dv=512, device="cuda")
    with dskernels.backend("triton"):
        out, lse = run_op(*inputs, s_q > 1)
    assert_matches_oracle(out, lse, *inputs, s_q > 1)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_cuda_graph_replay_with_new_lengths(cache_dtype):
    lengths = [1000, 0, 37, 4000]
    q, k_cache, block_table, lens, dv, k_scale = make_inputs(
        lengths, 2, 16, 1, 64, torch.bfloat16, cache_dtype, d=576, dv=512, device="cuda", spare_slots=8)

    def step():
        meta, splits = dskernels.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1)
        return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits,
                                                causal=True, k_scale=k_scale)

    step()  # compile the Triton kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    # New lengths of the same batch (still within each sequence's pages) and new queries.
    lens.copy_(torch.tensor([999, 0, 20, 3871], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_oracle(out, lse, q, k_cache, block_table, lens, dv, k_scale, True)


def _mla_inputs(d=32, h_q=2, page=4, seqlen=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, h_q, d, generator=g).to(dtype)
    k_cache = torch.randn(2, page, 1, d, generator=g).to(dtype)
    block_table = torch.tensor([[1, 0]], dtype=torch.int32)
    lens = torch.tensor([seqlen], dtype=torch.int32)
    meta, splits = dskernels.get_mla_metadata(lens, h_q, 1)
    return q, k_cache, block_table, lens, meta, splits


@pytest.mark.parametrize("case, error, name", [
    ("k_cache_stride", ValueError, "k_cache"),
    ("softmax_scale_inf", ValueError, "softmax_scale"),
    ("k_scale_two", ValueError, "k_scale"),
])
def test_mla_decode_refusals(case, error, name):
    q, k_cache, bt, lens, meta, splits = _mla_inputs()
    kwargs = {}
    if case == "k_cache_stride":
        k_cache = torch.randn(2, 4, 1, 64)[..., ::2]
    elif case == "softmax_scale_inf":
        kwargs["softmax_scale"] = float("inf")
    else:
        k_cache = k_cache.to(torch.float8_e4m3fn)
        kwargs["k_scale"] = torch.ones(2)
    with pytest.raises(error, match=f"^{name}: "):
        dskernels.flash_mla_with_kvcache(q, k_cache, bt, lens, 16, meta, splits, **kwargs)


def test_mla_triton_takes_a_query_without_unit_stride():
    if "triton" not in dskernels.available_backends():
        pytest.skip("needs the Triton backend (TRITON_INTERPRET=1 on CPU)")
    q, k_cache, bt, lens, meta, splits = _mla_inputs(dtype=torch.bfloat16)
    q_strided = torch.empty(*q.shape[:3], 2 * q.shape[3], dtype=q.dtype)[..., ::2]
    q_strided.copy_(q)
    assert q_strided.stride(3) == 2
    with dskernels.backend("ref"):
        out_ref, lse_ref = dskernels.flash_mla_with_kvcache(q, k_cache, bt, lens, 16, meta, splits)
    with dskernels.backend("triton"):
        out, lse = dskernels.flash_mla_with_kvcache(q_strided, k_cache, bt, lens, 16, meta, splits)
    # fp32 accumulation of bf16 inputs on both; out is rounded once to bf16 (2^-8 relative)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2 ** -7, atol=2 ** -7)


def _v3(*shape, dtype=torch.bfloat16):
    """A tensor of V3's head dimension and the given leading shape, expanded from one element per
    row of 576 (no memory for the large shapes)."""
    return torch.zeros(1, 1, 1, 576, dtype=dtype).expand(*shape, 576)


def test_sm90_unsupported_says_why():
    """sm90_unsupported (which picks the sm90 kernel or says why not; CPU-testable): V3's shape in
    bf16/fp16 queries over an aligned bf16/fp16/fp8 cache is taken; every other case is named."""
    q, k_cache = torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16), torch.zeros(3, 64, 1, 576, dtype=torch.bfloat16)
    assert mla_ops.sm90_unsupported(q, k_cache, 512) is None
    assert mla_ops.sm90_unsupported(q.half(), k_cache.half(), 512) is None
    assert mla_ops.sm90_unsupported(q, k_cache.to(FP8), 512) is None
    # the shape the kernel is built for
    for q_d, dv in ((64, 48), (576, 448), (512, 512)):
        with_d = torch.zeros(1, 1, 16, q_d, dtype=torch.bfloat16)
        assert mla_ops.sm90_unsupported(with_d, k_cache, dv) == (
            f"is built for d = 576, dv = 512 (DeepSeek-V3), got d = {q_d}, dv = {dv}")
    assert mla_ops.sm90_unsupported(q.float(), k_cache.float(), 512) == (
        "takes bfloat16 or float16 queries, got torch.float32")
    # grid limits: kv heads (grid.y of the decode) and s_q x h_q rows (grid.y of the combine, 4 a CTA)
    rows_limit = "supports at most 65535 kv heads and row tiles, and 262140 s_q x h_q rows"
    assert mla_ops.sm90_unsupported(_v3(1, 1, 65536), _v3(1, 1, 65536), 512).startswith(rows_limit)
    assert mla_ops.sm90_unsupported(_v3(1, 4, 65535), k_cache, 512) is None         # 262140 rows: the most
    got = mla_ops.sm90_unsupported(_v3(1, 1, 262141), k_cache, 512)
    assert got == f"{rows_limit}, got q (1, 1, 262141, 576), k_cache (3, 64, 1, 576)"
    # 16-byte aligned rows: the start, and the page / token strides where there is more than one
    padded = torch.zeros(3, 64, 1, 580, dtype=torch.bfloat16)[..., :576]            # rows 1160 bytes apart
    assert mla_ops.sm90_unsupported(q, padded, 512) == (
        "needs 16-byte aligned cache rows, got strides (37120, 580, 580, 1) of torch.bfloat16")
    offset = torch.zeros(3 * 64 * 576 + 8, dtype=torch.bfloat16)[1:3 * 64 * 576 + 1].view(3, 64, 1, 576)
    assert mla_ops.sm90_unsupported(q, offset, 512).startswith("needs 16-byte aligned cache rows")
    one_page = torch.zeros(64 * 576 + 8, dtype=torch.bfloat16).as_strided((1, 64, 1, 576), (12345, 576, 576, 1))
    assert mla_ops.sm90_unsupported(q, one_page, 512) is None                       # a stride never stepped
    fp8_rows = torch.zeros(3, 64, 1, 584, dtype=FP8)[..., :576]                     # 584 bytes: 8 past 16
    assert mla_ops.sm90_unsupported(q, fp8_rows, 512).startswith("needs 16-byte aligned cache rows")


def _decode_with_splits(q, k_cache, block_table, lens, dv, num_splits):
    """The Triton launcher with out and lse filled with NaN first (so a row neither kernel writes
    shows) and the caller's num_splits with get_mla_metadata's partitions."""
    from dskernels.triton import mla as triton_mla

    meta, _ = dskernels.get_mla_metadata(lens, q.shape[1] * q.shape[2] // k_cache.shape[2], k_cache.shape[2])
    out = torch.full((*q.shape[:3], dv), math.nan, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), math.nan, device=q.device)
    triton_mla.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, num_splits.to(q.device),
                                      q.shape[-1] ** -0.5, False, None, out, lse)
    return out, lse


def test_negative_num_splits_entry_leaves_no_row_unwritten(backend):
    """A caller's num_splits whose first entry is negative (outside API.md's contract: it starts at
    0): both kernels count sequence i's splits as num_splits[i + 1] - num_splits[i] (python_ref's
    reading), so every row is written by one of them. The combine counted from max(entry, 0): a
    sequence of n >= 2 splits given [1 - n, 1] was left to the decode's partials (neither wrote
    out), and one of 1 split given [-1, 0] had its out overwritten with zeros. (The launcher is
    called directly: on CPU tensors the op refuses such a plan, see check_plan.)"""
    name, device = backend
    if name != "triton":
        pytest.skip("the Triton kernels (the reference reads no plan; sm90: tests/test_mla_sm90.py)")
    # one sequence in n >= 2 splits: partials at slots 1 - n .. 0, all but the last dropped; the
    # combine merges slot 0
    q, k_cache, block_table, lens, dv, _ = make_inputs([100], 1, 4, 1, 16, torch.float32, torch.float32,
                                                       device=device)
    _, splits = dskernels.get_mla_metadata(lens, 4, 1)
    n = int(splits[1])
    assert n >= 2
    out, lse = _decode_with_splits(q, k_cache, block_table, lens, dv, torch.tensor([1 - n, 1], dtype=torch.int32))
    assert not out.isnan().any() and lse.isfinite().all()
    # one sequence in one split: the decode writes out itself, as with the plan's own [0, 1]
    q, k_cache, block_table, lens, dv, _ = make_inputs([50], 1, 4, 1, 16, torch.float32, torch.float32,
                                                       device=device)
    _, splits = dskernels.get_mla_metadata(lens, 4, 1)
    assert splits.tolist() == [0, 1]
    expected = _decode_with_splits(q, k_cache, block_table, lens, dv, splits)
    got = _decode_with_splits(q, k_cache, block_table, lens, dv, torch.tensor([-1, 0], dtype=torch.int32))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
