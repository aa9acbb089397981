"""DeepSeek-V3.2's indexer logits: fp8_mqa_logits / fp8_paged_mqa_logits on every backend against
python_ref.indexer, and the helpers (per_custom_dims_cast_to_fp8, paged_k_cache_cast_to_fp8,
get_paged_mqa_logits_metadata).

Poison: keys no query sees hold NaN (e4m3 NaN bytes and NaN scales) and unused block-table slots
2^31 - 1 (test_mla.scattered_pages): none may leak into a logit a query sees (a NaN key read for a
column every row masks stays invisible: that costs bandwidth, not correctness). Windows past the
last key (ke > N) and block tables shorter than the lengths would read out of bounds.

Tolerance from the math: each logit is sum_h w_h relu(scale_t * sum_d q_hd k_td); the kernel's
products are exact (e4m3 x e4m3 fits fp32) and its fp32 sums over D and H and two products round
at most (D + H + 2) times by 2^-24 relative to the same sum of absolute values, `magnitude` below.
Hopper's fp8 tensor cores accumulate with fewer bits (DeepGEMM's README: about 14), and Triton's
fp8 tl.dot on sm_90 keeps the whole D = 128 sum in them (no fp32 promotion), so on a GPU the bound is
test_gemm.assert_close_to_oracle's for one 128-wide K block: 2^-9 of the magnitude (4 MMA steps that
each truncate, scripts/fp8_mma_error_models.py). relu and the fp32 sum over heads do not grow it:
|relu(a) - relu(b)| <= |a - b|. (The bound was 2^-12 until the H200 run of 2026-12-04, which
failed 5 of these tests; that run's logs were lost, so which bound they crossed is not known.)"""

import math

import numpy

import pytest
import torch

import dskernels
import python_ref.indexer as ref
from test_mla import HUGE_PAGE, scattered_pages

FP8 = torch.float8_e4m3fn


def skip_cuda_backend(name):
    if name == "cuda":
        pytest.skip("no sm90 CUDA kernel for the indexer logits yet: auto runs the Triton kernel on CUDA tensors")


def magnitude(q, keys, weights):
    """sum_h |w| * sum_d |q| |k| in float64: q [M, H, D] (values), keys [N, D] (scaled), weights [M, H]."""
    return torch.einsum("mhd,nd,mh->mn", q.float().double().abs(), keys.double().abs(), weights.double().abs())


def assert_logits_close(out, expected, mag, dim, heads):
    on_gpu = out.is_cuda  # (before the copy below: the bound is the GPU's fp8 MMA one there)
    out = out.cpu()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert not out.isnan().any(), "NaN in the logits: a poisoned key was read"
    assert torch.equal(out.isneginf(), expected.isneginf()), "-inf (unseen keys) in different places"
    seen = expected.isfinite()
    rel = 2.0**-9 if on_gpu else (dim + heads + 2) * 2.0**-24
    bound = rel * mag[seen] + 1e-30
    err = (out[seen].double() - expected[seen].double()).abs()
    assert torch.all(err <= bound), f"max error {err.max().item():.3g} beyond the bound {bound.max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# fp8_mqa_logits
# ---------------------------------------------------------------------------------------------

def mqa_inputs(m, n, heads, dim, seed, compressed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(m, heads, dim, generator=gen).to(FP8)
    k, k_scale = ref.per_custom_dims_cast_to_fp8(torch.randn(n, dim, generator=gen) * 3, (0,))
    weights = torch.randn(m, heads, generator=gen)
    ks = torch.randint(-3, n, (m,), generator=gen, dtype=torch.int32)
    ke = (ks + torch.randint(-2, n // 2 + 2, (m,), generator=gen, dtype=torch.int32)).clamp(max=n + 5).int()
    ks[0], ke[0] = 0, n             # a row that sees everything
    if m > 1:
        ks[1], ke[1] = 5, 5         # one that sees nothing
    if m > 2:
        ks[2], ke[2] = max(n - 3, 0), n + 4  # and a window past the last key
    seen = torch.zeros(n, dtype=torch.bool)
    cols = torch.arange(n)
    for lo, hi in zip(ks.tolist(), ke.tolist()):
        seen |= (cols >= lo) & (cols < hi)
    k.view(torch.uint8)[~seen] = 0x7F
    k_scale[~seen] = math.nan
    return q, k, k_scale, weights, ks, ke


# (M, N, H, D, max_seqlen_k)
MQA_GRID = [(5, 70, 4, 32, 0), (3, 100, 64, 128, 0), (7, 33, 6, 48, 0), (4, 90, 3, 16, 40), (2, 20, 8, 32, 64),
            (1, 1, 1, 16, 0)]


@pytest.mark.parametrize("m,n,heads,dim,max_seqlen_k", MQA_GRID)
def test_mqa_logits_matches_oracle(backend, m, n, heads, dim, max_seqlen_k):
    name, device = backend
    skip_cuda_backend(name)
    q, k, k_scale, weights, ks, ke = mqa_inputs(m, n, heads, dim, seed=m * 11 + n)
    out = dskernels.fp8_mqa_logits(q.to(device), (k.to(device), k_scale.to(device)), weights.to(device),
                                   ks.to(device), ke.to(device), clean_logits=max_seqlen_k == 0,
                                   max_seqlen_k=max_seqlen_k)
    expected = ref.fp8_mqa_logits(q, k, k_scale, weights, ks, ke, True, max_seqlen_k)
    keys = torch.nan_to_num(k.float() * k_scale[:, None], nan=0.0)
    mag = magnitude(q, keys, weights)
    if max_seqlen_k:
        idx = (ks.long()[:, None] + torch.arange(max_seqlen_k)).clamp(0, n - 1)
        mag = torch.gather(mag, 1, idx)
    assert_logits_close(out, expected, mag, dim, heads)


def test_mqa_logits_definition():
    """The oracle itself, on one hand-checkable entry: relu per head, then the weighted sum."""
    q = torch.tensor([[[1.0, 2.0], [1.0, -2.0]]]).repeat(1, 1, 8).to(FP8)                # M=1, H=2, D=16
    k = torch.tensor([[1.0, 1.0]]).repeat(1, 8).to(FP8)                                   # N=1
    out = ref.fp8_mqa_logits(q, k, torch.tensor([0.5]), torch.tensor([[2.0, 3.0]]),
                             torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
    assert out.item() == 2.0 * (24 * 0.5) + 3.0 * 0.0  # head 1's score -8 * 0.5 is cut by relu


def test_mqa_logits_nan_key_scale_of_a_seen_key_stays_nan(backend):
    """relu(NaN) is NaN, as the oracle's clamp gives: a plain max turned a seen key's NaN scale into
    a plausible finite logit (0 from every head), which top-k would then rank as a real score."""
    name, device = backend
    skip_cuda_backend(name)
    q, k, k_scale, weights, _, _ = mqa_inputs(2, 8, 4, 32, seed=3)
    ks, ke = torch.zeros(2, dtype=torch.int32), torch.full((2,), 8, dtype=torch.int32)
    k_scale[3] = math.nan
    out = dskernels.fp8_mqa_logits(q.to(device), (k.to(device), k_scale.to(device)), weights.to(device),
                                   ks.to(device), ke.to(device)).cpu()
    expected = ref.fp8_mqa_logits(q, k, k_scale, weights, ks, ke)
    assert expected[:, 3].isnan().all() and out[:, 3].isnan().all()
    assert out[:, [0, 1, 2, 4, 5, 6, 7]].isfinite().all()


# ---------------------------------------------------------------------------------------------
# fp8_paged_mqa_logits
# ---------------------------------------------------------------------------------------------

def paged_inputs(lengths, next_n, heads, dim, page_size, seed, lens_2d=False):
    """DeepGEMM's paged layout with each sequence's pages scattered; NaN keys in every slot no row
    sees (unused pages, the tail of each last page), 2^31 - 1 in unused block-table slots."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    block_table, owned = scattered_pages(lengths, page_size, gen, spare_slots=2, spare_pages=2)
    num_pages = owned.shape[0]
    kv_cache = ref.paged_k_cache_cast_to_fp8(torch.randn(num_pages, page_size, 1, dim, generator=gen) * 2)
    raw = kv_cache.view(num_pages, page_size * (dim + 4))
    values = raw[:, :page_size * dim].view(num_pages, page_size, dim)
    scales = raw[:, page_size * dim:].view(torch.float32)
    values[~owned] = 0x7F
    scales[~owned] = math.nan
    q = torch.randn(b, next_n, heads, dim, generator=gen).to(FP8)
    weights = torch.randn(b * next_n, heads, generator=gen)
    context_lens = torch.tensor(lengths, dtype=torch.int32)
    if lens_2d:  # row j sees a prefix of its own, the last row the whole sequence
        context_lens = (context_lens[:, None] * torch.rand(b, next_n, generator=gen)).int()
        context_lens[:, -1] = torch.tensor(lengths, dtype=torch.int32)
    return q, kv_cache, weights, context_lens, block_table


# (lengths, next_n, H, D, page size, 2-d lengths, max_context_len)
PAGED_GRID = [
    ([70, 1, 130], 1, 4, 32, 16, False, 140),
    ([64, 0, 61, 3], 2, 8, 16, 61, False, 80),     # an empty sequence; lengths < next_n
    ([200, 17], 3, 6, 48, 1, True, 230),
    ([150, 90], 2, 64, 128, 64, False, 100),        # V3.2's heads; max_context_len cuts the first
    ([33, 96, 5], 1, 3, 32, 16, True, 96),
    # more query rows than one tile holds (rows x heads = 64 on CPU, 128 on a GPU): a prefill
    # written through the paged cache (the model's V3.2 layer), in several row blocks
    ([40, 75], 9, 16, 32, 16, False, 80),
    ([30, 100], 7, 32, 32, 61, True, 110),
    ([200], 150, 64, 128, 64, False, 200),          # V3.2's heads: all 150 rows in one tile is 2^21 values
]


@pytest.mark.parametrize("lengths,next_n,heads,dim,page_size,lens_2d,max_len", PAGED_GRID)
def test_paged_mqa_logits_matches_oracle(backend, lengths, next_n, heads, dim, page_size, lens_2d, max_len):
    name, device = backend
    skip_cuda_backend(name)
    q, kv_cache, weights, context_lens, block_table = paged_inputs(lengths, next_n, heads, dim, page_size,
                                                                    seed=len(lengths) + next_n, lens_2d=lens_2d)
    meta = dskernels.get_paged_mqa_logits_metadata(context_lens.to(device), page_size, 4)
    out = dskernels.fp8_paged_mqa_logits(q.to(device), kv_cache.to(device), weights.to(device),
                                         context_lens.to(device), block_table.to(device), meta, max_len,
                                         clean_logits=True)
    expected = ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_len)
    assert_logits_close(out, expected, paged_magnitude(q, kv_cache, weights, block_table, max_len), dim, heads)


def paged_magnitude(q, kv_cache, weights, block_table, max_len):
    """magnitude() per (row, key) through the block table (unowned slots count 0): q [B, next_n, H, D]."""
    batch, next_n, _, dim = q.shape
    page_size = kv_cache.shape[1]
    keys = torch.nan_to_num(ref.paged_k_cache_dequantize(kv_cache, dim), nan=0.0)
    mag = torch.zeros(batch * next_n, max_len, dtype=torch.float64)
    width = min(block_table.shape[1] * page_size, max_len)
    for i in range(batch):
        pages = block_table[i, : -(-width // page_size)].clamp(max=kv_cache.shape[0] - 1).long()
        seq_keys = keys[pages].reshape(-1, dim)[:width]
        mag[i * next_n:(i + 1) * next_n, :width] = magnitude(q[i], seq_keys, weights[i * next_n:(i + 1) * next_n])
    return mag


def test_strided_inputs(backend):
    """Weights, scales, windows and lengths in any strides (transposed, expanded, column views)."""
    name, device = backend
    skip_cuda_backend(name)
    q, k, k_scale, weights, ks, ke = mqa_inputs(5, 70, 4, 32, seed=8)
    k_scale = torch.nan_to_num(k_scale, nan=1.0)
    shared_scale = k_scale[:1].expand(70)
    weights_t = weights.t().contiguous().t()
    windows = torch.stack([ks, ke], dim=1)
    out = dskernels.fp8_mqa_logits(q.to(device), (k.to(device), shared_scale.to(device)), weights_t.to(device),
                                   windows[:, 0].to(device), windows[:, 1].to(device))
    expected = ref.fp8_mqa_logits(q, k, shared_scale, weights, ks, ke)
    keys = torch.nan_to_num(k.float() * shared_scale[:, None], nan=0.0)
    assert_logits_close(out, expected, magnitude(q, keys, weights), 32, 4)

    q, kv_cache, weights, context_lens, block_table = paged_inputs([40, 70], 2, 4, 32, 16, seed=9, lens_2d=True)
    lens_t = context_lens.t().contiguous().t()          # [B, next_n] with strides (1, B)
    weights_t = weights.t().contiguous().t()
    table = torch.stack([block_table, block_table], dim=2)[..., 0]  # the same ids at stride 2
    out = dskernels.fp8_paged_mqa_logits(q.to(device), kv_cache.to(device), weights_t.to(device), lens_t.to(device),
                                         table.to(device), None, 80, True)
    expected = ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, 80)
    assert_logits_close(out, expected, paged_magnitude(q, kv_cache, weights, block_table, 80), 32, 4)


def test_paged_keys_past_the_table_and_bad_pages(backend):
    """Lengths past what the block table holds: those keys are -inf on both backends. A page id
    outside the cache inside a sequence's range: the reference, and any backend on CPU tensors,
    raises; the Triton kernel (called directly here on CPU) gives its keys -inf and reads nothing
    there."""
    name, device = backend
    skip_cuda_backend(name)
    q, kv_cache, weights, context_lens, block_table = paged_inputs([30, 20], 1, 4, 32, 16, seed=10)
    short = block_table[:, :2].contiguous()             # 32 keys of room
    lens = torch.tensor([60, 20], dtype=torch.int32)    # sequence 0 claims 60
    out = dskernels.fp8_paged_mqa_logits(q.to(device), kv_cache.to(device), weights.to(device), lens.to(device),
                                         short.to(device), None, 64, True)
    expected = ref.fp8_paged_mqa_logits(q, kv_cache, weights, lens, short, 64)
    assert expected[0, 32:].isneginf().all()
    # keys 30, 31 of sequence 0: poisoned slots its claimed length reaches (NaN in the reference;
    # the Triton kernel's relu, a max, may drop a NaN score): not compared
    nan = expected.isnan()
    assert_logits_close(out.masked_fill(nan.to(out.device), 0.0), expected.masked_fill(nan, 0.0),
                        paged_magnitude(q, kv_cache, weights, short, 64), 32, 4)
    if name == "ref" or device == "cpu":
        bad = short.clone()
        bad[0, 1] = kv_cache.shape[0]
        with pytest.raises(ValueError, match="^block_table: sequence 0 names pages outside the cache's"):
            dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, bad, None, 32, True)
    if name == "ref":
        return
    bad = short.clone()
    bad[0, 1] = HUGE_PAGE                               # keys 16..29 of sequence 0
    if device == "cpu":
        from dskernels.triton import indexer as triton_indexer

        out = torch.empty(q.shape[0] * q.shape[1], 32)
        triton_indexer.paged_mqa_logits(q, kv_cache, weights, context_lens, bad, out)
    else:
        out = dskernels.fp8_paged_mqa_logits(q.to(device), kv_cache.to(device), weights.to(device),
                                             context_lens.to(device), bad.to(device), None, 32, True)
    expected = ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, short, 32)
    expected[0, 16:] = -math.inf
    assert_logits_close(out, expected, paged_magnitude(q, kv_cache, weights, short, 32), 32, 4)


def test_newer_deepgemm_query_pair():
    """Newer DeepGEMM passes q as (values, None) (its FP4 form carries scales: refused by name)."""
    q, kv_cache, weights, context_lens, block_table = paged_inputs([20, 9], 1, 4, 32, 16, seed=11)
    plain = dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, None, 32, True)
    paired = dskernels.fp8_paged_mqa_logits((q, None), kv_cache, weights, context_lens, block_table, None, 32, True)
    assert torch.equal(plain, paired)
    with pytest.raises(NotImplementedError, match="^q: "):
        dskernels.fp8_paged_mqa_logits((q, torch.ones(1)), kv_cache, weights, context_lens, block_table, None, 32)
    with pytest.raises(TypeError, match=r"^q: expected a float8_e4m3fn tensor .* got a list of 1 items"):
        dskernels.fp8_paged_mqa_logits([[1]], kv_cache, weights, context_lens, block_table, None, 32)


def test_paged_layout_bytes():
    """Per page: page_size rows of D e4m3 bytes, then page_size float32 scales (DeepGEMM's layout)."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(3, 5, 1, 32, generator=gen)
    cache = dskernels.paged_k_cache_cast_to_fp8(k)
    assert cache.shape == (3, 5, 1, 36) and cache.dtype == torch.uint8
    page = cache[1].reshape(-1)
    scales = page[5 * 32:].view(torch.float32)
    torch.testing.assert_close(scales, k[1, :, 0].abs().amax(dim=1) / 448)
    values = page[:5 * 32].view(FP8).float().reshape(5, 32)
    torch.testing.assert_close(values * scales[:, None], k[1, :, 0], rtol=2**-4, atol=1e-3)
    with pytest.raises(ValueError, match="^k_cache: expected the head dimension D .* multiple of 16, got 7"):
        dskernels.paged_k_cache_cast_to_fp8(k[..., :7])  # its scales would not be 4-byte aligned


def test_per_custom_dims_cast_to_fp8():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=gen)
    x[2] = 0.0
    fp8, scale = dskernels.per_custom_dims_cast_to_fp8(x, (0,), False)
    assert fp8.shape == x.shape and fp8.dtype == FP8 and scale.shape == (6,)
    torch.testing.assert_close(scale, x.abs().amax(dim=1).clamp(min=1e-4) / 448)
    assert (fp8.float().abs().amax(dim=1)[scale > 1e-4 / 448] == 448).all()
    _, pow2 = dskernels.per_custom_dims_cast_to_fp8(x, (0,), True)
    assert (torch.frexp(pow2)[0] == 0.5).all() and (pow2 >= scale).all() and (pow2 < 2 * scale).all()
    _, per_col = dskernels.per_custom_dims_cast_to_fp8(x, (-1,))
    assert per_col.shape == (40,)
    # kept dims out of x's order: the scales are indexed in the order of dims (they were x's order
    # reshaped to dims' shape before, a fuzzer's find: scale[j, i] held another slice's scale)
    y = torch.randn(4, 6, 8, generator=gen)
    _, kept_2_0 = dskernels.per_custom_dims_cast_to_fp8(y, (2, 0))
    assert torch.equal(kept_2_0, (y.abs().amax(dim=1).clamp(min=1e-4) / 448).T)
    _, kept_1_0 = dskernels.per_custom_dims_cast_to_fp8(x, (1, 0))
    assert torch.equal(kept_1_0, dskernels.per_custom_dims_cast_to_fp8(x, (0, 1))[1].T)
    assert torch.equal(kept_1_0, dskernels.per_custom_dims_cast_to_fp8(x, [numpy.int64(1), numpy.int32(0)])[1])
    # nothing to reduce over: the floor's scale, as for an all-zero row (torch's amax raised)
    empty, floor = dskernels.per_custom_dims_cast_to_fp8(torch.zeros(3, 0), (0,))
    assert empty.shape == (3, 0) and torch.equal(floor, torch.full((3,), 1e-4) / 448)
    for dims, error, words in ((0, TypeError, "^dims: expected a tuple of ints"),
                               ((5,), ValueError, r"^dims: expected distinct dimensions of x \(2 dimensions\)"),
                               ((0, -2), ValueError, "^dims: expected distinct"), ((0.0,), TypeError, "^dims:")):
        with pytest.raises(error, match=words):
            dskernels.per_custom_dims_cast_to_fp8(x, dims)
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        dskernels.per_custom_dims_cast_to_fp8(x.tolist(), (0,))
    with pytest.raises(ValueError, match="^k_cache: expected 4 dimensions"):
        dskernels.paged_k_cache_cast_to_fp8(torch.randn(2, 4, 32))
    with pytest.raises(TypeError, match="^k_cache: expected dtype"):
        dskernels.paged_k_cache_cast_to_fp8(torch.ones(2, 4, 1, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="^cache: expected dtype uint8 or int8 or float8_e4m3fn"):
        dskernels.dequantize_sparse_kv_cache(torch.zeros(2, 656))


def test_per_custom_dims_cast_to_fp8_exports_with_dynamic_rows():
    """The kept dimensions' product was torch.Size.numel(), which under torch.export (non-strict)
    turns symbolic sizes into constants: the V3.2 layer's exported step silently held b * s fixed
    (its runtime assert failed on a new batch). math.prod keeps them symbolic."""
    from torch.export import Dim

    class Cast(torch.nn.Module):
        def forward(self, q):
            return dskernels.per_custom_dims_cast_to_fp8(q, (0, 1))

    gen = torch.Generator().manual_seed(3)
    exported = torch.export.export(Cast(), (torch.randn(6, 4, 64, generator=gen),),
                                   dynamic_shapes=({0: Dim("m", min=2, max=1024)},))
    q = torch.randn(9, 4, 64, generator=gen)
    for got, want in zip(exported.module()(q), dskernels.per_custom_dims_cast_to_fp8(q, (0, 1))):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)


@pytest.mark.parametrize("shape,dims,dtype", [
    pytest.param(*case, marks=[pytest.mark.gpu] if torch.cuda.is_available() else [])
    for case in (((5, 3, 128), (0, 1), torch.bfloat16), ((37, 128), (0,), torch.float32),
                 ((4, 6, 64), (0,), torch.float16),
                 ((3, 5), (0, 1), torch.float32), ((2, 300), (-2,), torch.bfloat16), ((4, 3, 64), (1,), torch.float32),
                 ((0, 128), (0,), torch.float32), ((2, 9000), (0,), torch.float32))])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_custom_dims_cast_kernel_matches_the_reference(shape, dims, dtype, use_ue8m0):
    """The Triton row cast (kept dimensions leading: the indexer's q with (0, 1) and k with (0,))
    against python_ref's torch ops, bit for bit: values over a wide range, a NaN (its row's scale
    and values NaN), an all-zero row (the 1e-4 floor), a strided x; kept dimensions not leading,
    no rows, and rows past the kernel's tile (9000 columns) take the reference; every dimension
    kept: one scale per element (the reference reduced over all of them before)."""
    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(sum(shape))
    values = torch.randn(*shape, generator=gen) * torch.exp(4 * torch.randn(*shape[:-1], 1, generator=gen))
    x = torch.full((*shape[:-1], shape[-1] + 8), float("nan"), dtype=dtype)[..., 4:4 + shape[-1]]  # poisoned gaps
    x.copy_(values)
    if x.numel():
        x[(0,) * x.dim()] = float("nan")
        x[-1] = 0.0
        if x.shape[0] > 2:
            x[(1,) * x.dim()] = float("inf")  # its row's scale inf: NaN values (e4m3's NaN byte)
    expected, expected_scale = ref.per_custom_dims_cast_to_fp8(x, tuple(d % x.dim() for d in dims), use_ue8m0)
    with dskernels.backend("triton"):
        got, scale = dskernels.per_custom_dims_cast_to_fp8(x.to(device), dims, use_ue8m0)
    assert got.shape == x.shape and scale.shape == expected_scale.shape
    assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale.cpu().nan_to_num(7), expected_scale.nan_to_num(7))
    if len(dims) == x.dim() and x.numel() and not use_ue8m0:
        assert scale.shape == x.shape and scale.cpu()[-1].eq(torch.tensor(1e-4) / 448).all()
    # one column whose stride is not 1 (a transposed row): contiguous() keeps such a stride
    column = torch.randn(1, 5, generator=gen).to(dtype).t()
    with dskernels.backend("triton"):
        got, scale = dskernels.per_custom_dims_cast_to_fp8(column.to(device), (0,), use_ue8m0)
    expected, expected_scale = ref.per_custom_dims_cast_to_fp8(column, (0,), use_ue8m0)
    assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale.cpu(), expected_scale)


def test_paged_metadata():
    """A device plan from tensor ops: num_sms + 1 rows of (sequence, block), ordered, equal shares,
    ending past the last sequence; both of DeepGEMM's call forms."""
    lens = torch.tensor([130, 0, 64, 1, 500], dtype=torch.int32)
    meta = dskernels.get_paged_mqa_logits_metadata(lens, 64, 4)
    assert meta.shape == (5, 2) and meta.dtype == torch.int32
    blocks = [3, 0, 1, 1, 8]  # 13 key blocks over 4 SMs: shares 4, 3, 3, 3
    starts = [sum(blocks[:s]) + blk for s, blk in meta.tolist()]
    assert starts == [0, 4, 7, 10, 13] and meta[-1].tolist() == [5, 0]
    lens_2d = torch.stack([lens // 2, lens], dim=1)  # the last column counts
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens_2d, 64, 4), meta)
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens, 4), meta)
    # by keyword: block_kv= is not the older form's num_sms (it used to give 16 shares of 64 keys)
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens, block_kv=64, num_sms=4), meta)
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens, num_sms=4), meta)
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens, 64, num_sms=4), meta)
    with pytest.raises(TypeError, match="^num_sms: required"):
        dskernels.get_paged_mqa_logits_metadata(lens, block_kv=16)
    with pytest.raises(TypeError, match="multiple values for argument 'block_kv'"):
        dskernels.get_paged_mqa_logits_metadata(lens, 64, 4, block_kv=64)
    assert dskernels.get_paged_mqa_logits_metadata(torch.zeros(0, dtype=torch.int32), 64, 2).tolist() == [[0, 0]] * 3


# ---------------------------------------------------------------------------------------------
# Validation, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(q=a["q"].float()), TypeError, "q"),
    (lambda a: a.update(kv=a["kv"][0]), TypeError, "kv"),
    (lambda a: a.update(kv=(a["kv"][0][:, :16], a["kv"][1])), ValueError, "k"),
    (lambda a: a.update(kv=(a["kv"][0], a["kv"][1][:3])), ValueError, "k_scale"),
    (lambda a: a.update(weights=a["weights"][:, :2]), ValueError, "weights"),
    (lambda a: a.update(cu_seqlen_ks=a["cu_seqlen_ks"].long()), TypeError, "cu_seqlen_ks"),
    (lambda a: a.update(cu_seqlen_ke=a["cu_seqlen_ke"][:2]), ValueError, "cu_seqlen_ke"),
    (lambda a: a.update(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    (lambda a: a.update(max_seqlen_k=2.0), TypeError, "^max_seqlen_k: expected an int"),
    (lambda a: a.update(q=a["q"][..., :0], kv=(a["kv"][0][:, :0], a["kv"][1])), ValueError, "^q: .* at least 16"),
    (lambda a: a.update(cu_seqlen_ke=a["cu_seqlen_ke"].to("meta")), ValueError, "^cu_seqlen_ke: expected a tensor on"),
])
def test_mqa_validation(change, exc, match):
    q, k, k_scale, weights, ks, ke = mqa_inputs(5, 70, 4, 32, seed=1)
    args = dict(q=q, kv=(k, k_scale), weights=weights, cu_seqlen_ks=ks, cu_seqlen_ke=ke)
    change(args)
    with pytest.raises(exc, match=match):
        dskernels.fp8_mqa_logits(**args)


def test_deepgemm_keyword_names():
    """DeepGEMM's own keywords (cu_seq_len_k_start / _end, indices=None) as well as its tests'."""
    q, k, k_scale, weights, ks, ke = mqa_inputs(5, 70, 4, 32, seed=1)
    want = dskernels.fp8_mqa_logits(q, (k, k_scale), weights, ks, ke)
    got = dskernels.fp8_mqa_logits(q=q, kv=(k, k_scale), weights=weights, cu_seq_len_k_start=ks, cu_seq_len_k_end=ke)
    assert torch.equal(got, want)
    assert torch.equal(dskernels.fp8_mqa_logits(q, (k, k_scale), weights, cu_seqlen_ks=ks, cu_seqlen_ke=ke), want)
    with pytest.raises(TypeError, match="^cu_seq_len_k_start: expected a tensor under exactly one of the names"):
        dskernels.fp8_mqa_logits(q, (k, k_scale), weights, ks, ke, cu_seqlen_ks=ks)
    lens = torch.tensor([130, 5], dtype=torch.int32)
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens, 64, 4, indices=None),
                       dskernels.get_paged_mqa_logits_metadata(lens, 64, 4))
    assert torch.equal(dskernels.get_paged_mqa_logits_metadata(lens, 64, 4, indices=torch.zeros(2, dtype=torch.int32)),
                       dskernels.get_paged_mqa_logits_metadata(lens, 64, 4))
    with pytest.raises(ValueError, match="^indices: expected one request per row of context_lens"):
        dskernels.get_paged_mqa_logits_metadata(lens, 64, 4, indices=torch.zeros(3, dtype=torch.int32))


def test_paged_varlen_indices(backend):
    """DeepGEMM's varlen form (vLLM's MTP with a per-request token count): `indices` names each query
    row's request, whose block-table row it reads, with its own context length."""
    name, device = backend
    skip_cuda_backend(name)
    lengths, heads, dim, page, max_len = [70, 5, 130], 4, 32, 16, 140
    q3, kv_cache, w3, _, block_table = paged_inputs(lengths, 1, heads, dim, page, seed=7)
    requests = torch.tensor([2, 0, 2, 1, 2], dtype=torch.int32)     # 3 rows of request 2 (MTP), one each
    context_lens = torch.tensor([[128], [70], [129], [5], [130]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(5, 1, heads, dim, generator=gen).to(FP8)
    weights = torch.randn(5, heads, generator=gen)
    on = [t.to(device) for t in (q, kv_cache, weights, context_lens, block_table, requests)]
    meta = dskernels.get_paged_mqa_logits_metadata(on[3], page, 4, indices=on[5])
    out = dskernels.fp8_paged_mqa_logits(*on[:5], meta, max_len, clean_logits=True, indices=on[5])
    rows_table = block_table[requests.long()]                      # each row's own request's pages
    expected = ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, rows_table, max_len)
    assert_logits_close(out, expected, paged_magnitude(q, kv_cache, weights, rows_table, max_len), dim, heads)
    assert torch.isinf(out[3, 5:]).all() and torch.isfinite(out[3, :5]).all()
    with pytest.raises(ValueError, match=r"^indices: expected requests in \[0, 3\)"):
        dskernels.fp8_paged_mqa_logits(*on[:5], meta, max_len, indices=torch.tensor([0, 3, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="^indices: "):
        dskernels.fp8_paged_mqa_logits(*on[:5], meta, max_len, indices=requests.long())
    for bad in (on[3][0, 0], on[3][:4], on[3][:, :, None]):  # context_lens' errors name it, not indices
        with pytest.raises(ValueError, match="^context_lens: expected"):
            dskernels.fp8_paged_mqa_logits(on[0], on[1], on[2], bad, on[4], meta, max_len, indices=on[5])


def _padded_rows(cache):
    """The same pages with each row padded by 4 bytes: pages no longer contiguous."""
    padded = torch.zeros(*cache.shape[:3], cache.shape[3] + 4, dtype=cache.dtype)[..., :cache.shape[3]]
    return padded.copy_(cache)


def _odd_page_stride(cache):
    """The same pages one byte apart more: page stride 577, its float32 scales misaligned."""
    pages, page_bytes = cache.shape[0], cache[0].numel()
    spread = torch.zeros(pages * (page_bytes + 1), dtype=cache.dtype).as_strided(
        cache.shape, (page_bytes + 1, *cache.stride()[1:]))
    return spread.copy_(cache)


def _misaligned_start(cache):
    """The same bytes, contiguous, starting 1 byte past an aligned address."""
    raw = torch.zeros(cache.numel() + 4, dtype=cache.dtype)[1:cache.numel() + 1].view(cache.shape)
    return raw.copy_(cache)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :-1]), ValueError, "kv_cache"),
    (lambda a: a.update(kv_cache=a["kv_cache"].float()), TypeError, "kv_cache"),
    (lambda a: a.update(weights=a["weights"][:1]), ValueError, "weights"),
    (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError, "context_lens"),
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    (lambda a: a.update(max_context_len=True), TypeError, "max_context_len"),
    (lambda a: a.update(max_context_len=None), TypeError, "^max_context_len: expected an int"),
    (lambda a: a.update(clean_logits="yes"), TypeError, "^clean_logits: expected a bool"),
    (lambda a: a.update(schedule_meta="plan"), TypeError, "^schedule_meta: "),
    (lambda a: a.update(schedule_meta=torch.zeros(5, 2)), TypeError, "^schedule_meta: "),
    (lambda a: a.update(schedule_meta=torch.zeros(5, dtype=torch.int32)), ValueError, "^schedule_meta: "),
    (lambda a: a.update(q=a["q"][..., :0], kv_cache=a["kv_cache"][..., :4]), ValueError, "^q: .* at least 16"),
    (lambda a: a.update(q=a["q"][:, :0], weights=a["weights"][:0]), ValueError,  # next_n = 0
     r"^q: expected next_n \(dimension 1\) >= 1, got shape \(2, 0, 4, 32\)"),
    (lambda a: a.update(kv_cache=_padded_rows(a["kv_cache"])), ValueError,
     r"^kv_cache: expected every page contiguous and 4-byte aligned .*got strides \(640, 40, 40, 1\)"),
    (lambda a: a.update(kv_cache=_odd_page_stride(a["kv_cache"])), ValueError,
     r"^kv_cache: expected every page contiguous and 4-byte aligned .*got strides \(577, 36, 36, 1\)"),
    (lambda a: a.update(kv_cache=_misaligned_start(a["kv_cache"])), ValueError,  # strides fine: the kernel's check
     r"^kv_cache: expected a 4-byte aligned start \(its scales are float32\), got address 0x"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError,
     r"^block_table: expected 2 rows \(q's batch\), got shape \(1, 4\)"),
    (lambda a: a.update(context_lens=a["context_lens"].view(2, 1).expand(2, 3)), ValueError,
     r"^context_lens: expected shape \(2,\) or \(2, 1\), got \(2, 3\)"),
])
def test_paged_validation(change, exc, match):
    q, kv_cache, weights, context_lens, block_table = paged_inputs([20, 9], 1, 4, 32, 16, seed=1)
    args = dict(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table,
                schedule_meta=None, max_context_len=32)
    change(args)
    with pytest.raises(exc, match=match):
        dskernels.fp8_paged_mqa_logits(**args)


def test_deepgemm_current_names():
    """DeepGEMM's current entries, fp8_fp4_mqa_logits / fp8_fp4_paged_mqa_logits: (q, None) queries
    and logits_dtype (bfloat16: the float32 logits rounded once); numpy integers where its bindings
    take ints; errors name cu_seq_len_k_start / _end as the caller spelled them."""
    numpy = pytest.importorskip("numpy")
    q, k, k_scale, weights, ks, ke = mqa_inputs(5, 70, 4, 32, seed=1)
    want = dskernels.fp8_mqa_logits(q, (k, k_scale), weights, ks, ke, False, 40)
    got = dskernels.fp8_fp4_mqa_logits((q, None), (k, k_scale), weights, ks, ke, False, numpy.int64(40))
    assert torch.equal(got, want)
    got = dskernels.fp8_fp4_mqa_logits((q, None), (k, k_scale), weights, ks, ke, False, 40, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    with pytest.raises(ValueError, match="^logits_dtype: "):
        dskernels.fp8_fp4_mqa_logits(q, (k, k_scale), weights, ks, ke, logits_dtype=torch.float16)
    with pytest.raises(TypeError, match="^logits_dtype: "):
        dskernels.fp8_fp4_mqa_logits(q, (k, k_scale), weights, ks, ke, logits_dtype="float32")
    with pytest.raises(TypeError, match="^cu_seq_len_k_start: expected dtype int32"):
        dskernels.fp8_mqa_logits(q, (k, k_scale), weights, cu_seq_len_k_start=ks.long(), cu_seq_len_k_end=ke)
    with pytest.raises(ValueError, match=r"^cu_seqlen_ke: expected shape \(5,\)"):
        dskernels.fp8_mqa_logits(q, (k, k_scale), weights, cu_seqlen_ks=ks, cu_seqlen_ke=ke[:3])
    with pytest.raises(ValueError, match="^cu_seq_len_k_end: expected a tensor on"):
        dskernels.fp8_mqa_logits(q, (k, k_scale), weights, cu_seq_len_k_start=ks, cu_seq_len_k_end=ke.to("meta"))
    for bad in (torch.zeros(5), torch.zeros(5, 3, dtype=torch.int32)):  # not read, but checked as on the paged op
        with pytest.raises((TypeError, ValueError), match="^schedule_meta: "):
            dskernels.fp8_fp4_mqa_logits((q, None), (k, k_scale), weights, ks, ke, schedule_meta=bad)
    assert torch.equal(dskernels.fp8_mqa_logits(q, (k, k_scale), weights, ks, ke, numpy.bool_(False), 40), want)

    q, kv_cache, weights, context_lens, block_table = paged_inputs([20, 9], 1, 4, 32, 16, seed=11)
    plan = dskernels.get_paged_mqa_logits_metadata(context_lens, numpy.int32(16), numpy.int64(4))
    assert torch.equal(plan, dskernels.get_paged_mqa_logits_metadata(context_lens, 16, 4))
    want = dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, plan, 32, True)
    got = dskernels.fp8_fp4_paged_mqa_logits((q, None), kv_cache, weights, context_lens, block_table, plan,
                                             numpy.int64(32), True, torch.bfloat16)
    assert torch.equal(got, want.to(torch.bfloat16))


# test_schema compares the inputs with allclose, which fp8 tensors lack (as in tests/test_gemm.py);
# the ops mutate nothing (their schemas say so), checked by the CPU runs comparing against the oracle.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck(backend):
    name, device = backend
    skip_cuda_backend(name)
    q, k, k_scale, weights, ks, ke = (t.to(device) for t in mqa_inputs(3, 40, 4, 32, seed=4))
    k_scale = torch.nan_to_num(k_scale)
    torch.library.opcheck(torch.ops.dskernels.fp8_mqa_logits, (q, k, k_scale, weights, ks, ke, True, 0),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.dskernels.fp8_mqa_logits, (q, k, k_scale, weights, ks, ke, False, 16),
                          test_utils=OPCHECK_UTILS)
    q, kv_cache, weights, context_lens, block_table = (t.to(device) for t in
                                                       paged_inputs([20, 9], 2, 4, 32, 16, seed=2))
    kv_cache = torch.where(kv_cache == 0x7F, 0, kv_cache)  # no NaN: opcheck compares runs
    raw = kv_cache.view(kv_cache.shape[0], -1)
    raw[:, 16 * 32:].view(torch.float32).nan_to_num_(0.0)
    torch.library.opcheck(torch.ops.dskernels.fp8_paged_mqa_logits,
                          (q, kv_cache, weights, context_lens, block_table.clamp(max=kv_cache.shape[0] - 1), 32, True),
                          test_utils=OPCHECK_UTILS)


def test_torch_compile_fullgraph(backend):
    name, device = backend
    skip_cuda_backend(name)
    q, kv_cache, weights, context_lens, block_table = (t.to(device) for t in
                                                       paged_inputs([20, 9], 2, 4, 32, 16, seed=3))

    def top_keys(q, kv_cache, weights, context_lens, block_table):
        logits = dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, None, 24, True)
        return logits.topk(4, dim=1).indices

    compiled = torch.compile(top_keys, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, kv_cache, weights, context_lens, block_table),
                       top_keys(q, kv_cache, weights, context_lens, block_table))


# ---------------------------------------------------------------------------------------------
# On the GPU: V3.2's shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_v32_mqa_shapes_on_gpu():
    q, k, k_scale, weights, ks, ke = mqa_inputs(256, 4096, 64, 128, seed=7)
    out = dskernels.fp8_mqa_logits(q.cuda(), (k.cuda(), k_scale.cuda()), weights.cuda(), ks.cuda(), ke.cuda())
    expected = ref.fp8_mqa_logits(q, k, k_scale, weights, ks, ke)
    keys = torch.nan_to_num(k.float() * k_scale[:, None], nan=0.0)
    assert_logits_close(out, expected, magnitude(q, keys, weights), 128, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2])
def test_v32_paged_shapes_on_gpu(next_n):
    gen = torch.Generator().manual_seed(next_n)
    lengths = torch.randint(1500, 4000, (8,), generator=gen).tolist()
    q, kv_cache, weights, context_lens, block_table = paged_inputs(lengths, next_n, 64, 128, 64, seed=next_n)
    meta = dskernels.get_paged_mqa_logits_metadata(context_lens.cuda(), 64, 132)
    out = dskernels.fp8_paged_mqa_logits(q.cuda(), kv_cache.cuda(), weights.cuda(), context_lens.cuda(),
                                         block_table.cuda(), meta, 4096, clean_logits=True)
    expected = ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, 4096)
    keys = torch.nan_to_num(ref.paged_k_cache_dequantize(kv_cache, 128), nan=0.0)
    mag = torch.zeros(expected.shape, dtype=torch.float64)
    for i, n in enumerate(lengths):
        pages = block_table[i, : -(-n // 64)].long()
        mag[i * next_n:(i + 1) * next_n, :n] = magnitude(q[i], keys[pages].reshape(-1, 128)[:n],
                                                         weights[i * next_n:(i + 1) * next_n])
    assert_logits_close(out, expected, mag, 128, 64)


def test_metadata_refuses_bad_lengths_and_extra_arguments():
    """get_paged_mqa_logits_metadata: context_lens neither [B] nor [B, next_n >= 1], and more
    arguments than DeepGEMM's (context_lens, block_kv, num_sms, indices)."""
    lens = torch.tensor([130, 5], dtype=torch.int32)
    for bad, shape in ((lens.view(1, 1, 2), r"\(1, 1, 2\)"), (lens.view(2, 1)[:, :0], r"\(2, 0\)"),
                       (torch.tensor(7, dtype=torch.int32), r"\(\)")):
        with pytest.raises(ValueError, match=r"^context_lens: expected \[B\] or \[B, next_n >= 1\], got shape "
                                             + shape):
            dskernels.get_paged_mqa_logits_metadata(bad, 64, 4)
    with pytest.raises(TypeError, match="^get_paged_mqa_logits_metadata: expected at most 4 arguments, got 5"):
        dskernels.get_paged_mqa_logits_metadata(lens, 64, 4, None, 1)
    with pytest.raises(TypeError, match="^context_lens: expected dtype int32, got torch.int64"):
        dskernels.get_paged_mqa_logits_metadata(lens.long(), 64, 4)


def test_mqa_refuses_fp8_inputs_without_unit_last_stride():
    """q and k are read in 16-byte pieces along D: a view whose last stride is not 1 is refused by
    name (not read at the wrong addresses)."""
    q, k, k_scale, weights, ks, ke = mqa_inputs(5, 70, 4, 32, seed=1)
    q_strided = torch.empty(5, 4, 64, dtype=FP8)[..., ::2]
    q_strided.copy_(q)
    with pytest.raises(ValueError, match=r"^q: expected unit stride in the last dimension, got strides \(256, 64, 2\)"):
        dskernels.fp8_mqa_logits(q_strided, (k, k_scale), weights, ks, ke)
    k_strided = torch.empty(70, 64, dtype=FP8)[:, ::2]
    k_strided.copy_(k)
    with pytest.raises(ValueError, match=r"^k: expected unit stride in the last dimension, got strides \(64, 2\)"):
        dskernels.fp8_mqa_logits(q, (k_strided, k_scale), weights, ks, ke)
    q4, kv_cache, weights4, context_lens, block_table = paged_inputs([20, 9], 1, 4, 32, 16, seed=1)
    q4_strided = torch.empty(2, 1, 4, 64, dtype=FP8)[..., ::2]
    q4_strided.copy_(q4)
    with pytest.raises(ValueError, match="^q: expected unit stride in the last dimension"):
        dskernels.fp8_paged_mqa_logits(q4_strided, kv_cache, weights4, context_lens, block_table, None, 32)


def test_mqa_registered_op_checks_the_windows():
    """torch.ops.dskernels.fp8_mqa_logits (public too) checks the windows itself: the Python entry's
    checks of cu_seq_len_k_start / _end do not guard a direct call."""
    q, k, k_scale, weights, ks, ke = mqa_inputs(5, 70, 4, 32, seed=1)
    for name, args in (("cu_seqlen_ks", (ks[:3], ke)), ("cu_seqlen_ke", (ks, ke[:4]))):
        rows = args[0 if name == "cu_seqlen_ks" else 1].shape[0]
        with pytest.raises(ValueError, match=rf"^{name}: expected shape \(5,\) \(one per query\), got \({rows},\)"):
            torch.ops.dskernels.fp8_mqa_logits(q, k, k_scale, weights, *args, True, 0)
    with pytest.raises(TypeError, match="^cu_seqlen_ke: expected dtype int32, got torch.int64"):
        torch.ops.dskernels.fp8_mqa_logits(q, k, k_scale, weights, ks, ke.long(), True, 0)
