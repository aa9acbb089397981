"""Offsets past 2**31 elements in the Triton kernels: production caches (tens of GiB of paged
latents), MoE rows and GEMM outputs pass int32's range, where a product of two int32 values (a
program id, a loaded page id, an int32 stride) wraps. Each test runs a kernel on tensors whose
touched rows lie past 2**31 elements (a big buffer that stays virtual: only those rows are
written) and compares it with the same call on a compact copy of the same rows: the same kernel on
the same values, so the results must agree bit for bit.

Triton's interpreter computes in numpy's int32 where the GPU does (test_interpreter_wraps_int32),
so a missing int64 cast shows here as a wrong or faulting read."""

import pytest
import torch
import triton
import triton.language as tl

import dskernels

# CPU tensors under the interpreter (a GPU run would need the big buffers committed on the device)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs Triton's interpreter on CPU tensors")

FAR = 2**31 + 4096  # elements: past int32's range, with room for a page or row before it
FP8 = torch.float8_e4m3fn


def big_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of numel elements that stays virtual until written (skips where the address
    space is refused)."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {numel * dtype.itemsize / 1e9:.1f} GB of address space: {e}")


def far_rows(compact: torch.Tensor, first_far: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compact [n, ...] placed in a big contiguous tensor whose rows from first_far on start past
    FAR elements: rows 0 .. first_far - 1 at the front, the rest at its end. Returns the big
    tensor and the row each compact row went to (int64 [n])."""
    n = compact.shape[0]
    row = compact[0].numel()
    total = max(-(-FAR // row) + n - first_far, n) + 1
    big = big_empty(total * row, compact.dtype).view(total, *compact.shape[1:])
    where = torch.cat([torch.arange(first_far), torch.arange(total - (n - first_far), total)])
    big[where] = compact
    assert where[-1] * row >= 2**31
    return big, where


def moved_table(table: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A block table's page ids moved as far_rows moved the pages; entries naming no page (unused
    slots hold 2**31 - 1) stay as they are."""
    valid = (table >= 0) & (table < where.shape[0])
    return torch.where(valid, where[table.clamp(0, where.shape[0] - 1).long()], table.long()).to(torch.int32)


def strided_rows(compact: torch.Tensor, stride: int = 1_100_000_000) -> torch.Tensor:
    """compact [n, c] (n >= 3) as rows `stride` elements apart: row 2 starts past 2**31."""
    n, c = compact.shape
    big = big_empty((n - 1) * stride + c, compact.dtype).as_strided((n, c), (stride, 1))
    big.copy_(compact)
    return big


@triton.jit
def _product_kernel(out_ptr, a, b):
    x = tl.program_id(0) + a
    tl.store(out_ptr + tl.arange(0, 1), (x * b).to(tl.int64))
    tl.store(out_ptr + 1 + tl.arange(0, 1), x.to(tl.int64) * b)


def test_interpreter_wraps_int32():
    """The premise of this file: int32 products wrap under Triton's interpreter as on a GPU, and
    the int64 cast keeps them."""
    out = torch.zeros(2, dtype=torch.int64)
    _product_kernel[(1,)](out, 70_000, 40_000)
    assert out.tolist() == [2_800_000_000 - 2**32, 2_800_000_000]


@pytest.mark.parametrize("page_size", [16, 64])  # keys of several pages per block, and of one (SAME_PAGE)
def test_mla_decode_pages_past_int32(page_size):
    """A bf16 cache of more than 2**31 elements: pages past it must be read through an int64
    page offset."""
    from test_mla import make_inputs, run_op

    q, k_cache, block_table, lens, dv, _ = make_inputs([70, 33, 190], 2, 8, 1, page_size, torch.bfloat16,
                                                       torch.bfloat16)
    big, where = far_rows(k_cache, 2)
    with dskernels.backend("triton"):
        want = run_op(q, k_cache, block_table, lens, dv, None, True)
        got = run_op(q, big, moved_table(block_table, where), lens, dv, None, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_sparse_decode_fp8_pages_past_int32():
    """V3.2's FP8 cache (656 bytes a slot) past 2**31 bytes: the gathered rows' offsets, and the
    scale and rope pointers cast from them, must be int64."""
    from test_mla_sparse import decode_inputs

    q, k_cache, indices, dv, fp8, _, _ = decode_inputs(2, 1, 16, 1, 64, 4, 70, torch.bfloat16, True, seed=3)
    big, where = far_rows(k_cache, 1)
    page_size = k_cache.shape[1]
    valid = (indices >= 0) & (indices < k_cache.shape[0] * page_size)
    slot = torch.where(valid, indices, 0).long()
    moved = where[slot // page_size] * page_size + slot % page_size
    far_indices = torch.where(valid, moved, -1).to(torch.int32)  # (an id past the compact cache names a far slot)
    assert (far_indices.long() * 656 >= 2**31).any()
    with dskernels.backend("triton"):
        want = dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv, is_fp8_kvcache=True)
        got = dskernels.flash_mla_sparse_decode(q, big, far_indices, dv, is_fp8_kvcache=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_paged_mqa_logits_pages_past_int32():
    """The V3.2 indexer's paged key cache (D + 4 bytes a slot) past 2**31 bytes."""
    from test_indexer import paged_inputs

    q, kv_cache, weights, context_lens, block_table = paged_inputs([150, 90], 2, 16, 32, 16, seed=19)
    max_len = 160
    big, where = far_rows(kv_cache, 1)
    with dskernels.backend("triton"):
        want = dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, None, max_len)
        got = dskernels.fp8_paged_mqa_logits(q, big, weights, context_lens, moved_table(block_table, where), None,
                                             max_len)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def fp8_operands(m, n, k, groups=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(*(() if groups is None else (groups,)), n, k, generator=gen)
    a_fp8, sa = dskernels.per_token_cast_to_fp8(a)
    b_fp8, sb = zip(*[dskernels.per_block_cast_to_fp8(w) for w in (b if groups else b[None])])
    return a_fp8, sa, torch.stack(b_fp8) if groups else b_fp8[0], torch.stack(sb) if groups else sb[0]


def test_gemm_rows_past_int32():
    """Dense and contiguous grouped GEMMs whose a rows and out rows lie past 2**31 elements."""
    m, n, k = 4, 136, 256
    a, sa, b, sb = fp8_operands(m, n, k)
    far_a = strided_rows(a.view(torch.uint8)).view(FP8)
    with dskernels.backend("triton"):
        want = torch.empty(m, n, dtype=torch.bfloat16)
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), want)
        got = strided_rows(torch.zeros(m, n, dtype=torch.bfloat16))
        dskernels.gemm_fp8_fp8_bf16_nt((far_a, sa), (b, sb), got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)

        a, sa, b, sb = fp8_operands(m, n, k, groups=2, seed=1)
        far_a = strided_rows(a.view(torch.uint8)).view(FP8)
        m_indices = torch.tensor([1, 1, 0, -1], dtype=torch.int32)
        want = torch.zeros(m, n, dtype=torch.bfloat16)
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), want, m_indices)
        got = strided_rows(torch.zeros(m, n, dtype=torch.bfloat16))
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((far_a, sa), (b, sb), got, m_indices)
        torch.testing.assert_close(got[:3], want[:3], rtol=0, atol=0)


def test_masked_gemm_groups_past_int32():
    """The masked grouped GEMM with a group stride past 2**31 elements in a and out."""
    groups, m_max, n, k = 3, 4, 136, 256
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(groups, m_max, k, generator=gen)
    b = torch.randn(groups, n, k, generator=gen)
    a_fp8, sa = dskernels.per_token_cast_to_fp8(a.reshape(-1, k))
    a_fp8, sa = a_fp8.view(groups, m_max, k), sa.view(groups, m_max, -1)
    b_fp8, sb = (torch.stack(t) for t in zip(*[dskernels.per_block_cast_to_fp8(w) for w in b]))
    stride = 1_100_000_000
    far_a = big_empty(2 * stride + m_max * k, torch.uint8).as_strided(a_fp8.shape, (stride, k, 1)).view(FP8)
    far_a.copy_(a_fp8)
    masked_m = torch.tensor([4, 2, 3], dtype=torch.int32)
    with dskernels.backend("triton"):
        want = torch.zeros(groups, m_max, n, dtype=torch.bfloat16)
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a_fp8, sa), (b_fp8, sb), want, masked_m, m_max)
        got = big_empty(2 * stride + m_max * n, torch.bfloat16).as_strided(want.shape, (stride, n, 1))
        got.zero_()
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((far_a, sa), (b_fp8, sb), got, masked_m, m_max)
    for g, rows in enumerate(masked_m.tolist()):
        torch.testing.assert_close(got[g, :rows], want[g, :rows], rtol=0, atol=0)


def test_per_token_cast_rows_past_int32():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with dskernels.backend("triton"):
        want = dskernels.per_token_cast_to_fp8(x)
        got = dskernels.per_token_cast_to_fp8(strided_rows(x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0)


def test_latent_cache_write_past_int32():
    """The paged cache write (write_latent_cache) into pages past 2**31 elements of a contiguous
    cache: the torch path's rows are the oracle."""
    from dskernels.models.paged import cache_rows, write_rows
    from dskernels.triton import layer as triton_layer

    b, s, rank, rope, page_size = 2, 3, 48, 16, 4
    gen = torch.Generator().manual_seed(11)
    latent = torch.randn(b, s, rank, generator=gen).to(torch.bfloat16)
    k_rope = torch.randn(b, s, rope, generator=gen).to(torch.bfloat16)
    num_pages = -(-FAR // (page_size * (rank + rope))) + 2
    cache = big_empty(num_pages * page_size * (rank + rope), torch.bfloat16).view(num_pages, page_size, 1, rank + rope)
    table = torch.tensor([[num_pages - 1, 0], [5, num_pages - 2]], dtype=torch.int32)
    lens = torch.tensor([2, 3], dtype=torch.int32)
    rows = cache_rows(table, lens, s, num_pages, page_size)
    assert rows.max() * (rank + rope) >= 2**31
    flat = cache.view(-1, rank + rope)
    flat[rows] = 0
    triton_layer.write_latent_cache(latent, k_rope, cache, table, lens, None)
    got = flat[rows].clone()
    flat[rows] = 0
    write_rows(flat, rows, torch.cat([latent, k_rope], -1).reshape(b * s, -1))
    torch.testing.assert_close(got, flat[rows], rtol=0, atol=0)


def test_moe_combine_rows_past_int32():
    from dskernels.triton import layer as triton_layer

    tokens, k, hidden = 3, 2, 64
    gen = torch.Generator().manual_seed(13)
    y = torch.randn(tokens * k, hidden, generator=gen).to(torch.bfloat16)
    positions = torch.randperm(tokens * k, generator=gen)
    idx = torch.tensor([[0, 1], [1, -1], [2, 0]])
    weights = torch.rand(tokens, k, generator=gen)
    want = triton_layer.moe_combine(y, positions, idx, weights, 4, torch.bfloat16)
    got = triton_layer.moe_combine(strided_rows(y), positions, idx, weights, 4, torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ep_row_movers_past_int32():
    """copy_rows and gather_reduce (the Buffer's pack and combine) with rows past 2**31 elements."""
    from dskernels.triton import ep as triton_ep

    gen = torch.Generator().manual_seed(17)
    src = torch.randn(4, 96, generator=gen)
    far_src = strided_rows(src, 800_000_000)
    dst = torch.zeros(4, 96)
    far_dst = strided_rows(dst, 800_000_000)
    order = torch.tensor([3, 0, 2, 1])
    triton_ep.copy_rows(far_src, order, far_dst, order.flip(0), 4)
    triton_ep.copy_rows(src, order, dst, order.flip(0), 4)
    torch.testing.assert_close(far_dst.clone(), dst, rtol=0, atol=0)
    index = torch.tensor([[3, -1, 0], [2, 2, 1]])
    weights = torch.rand(2, 3, generator=gen)
    want, got = torch.zeros(2, 96), torch.zeros(2, 96)
    triton_ep.gather_reduce(src, index, weights, want)
    triton_ep.gather_reduce(far_src, index, weights, got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
