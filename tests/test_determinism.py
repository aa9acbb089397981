"""The determinism and batch-invariance guarantees of docs/api.md ("Determinism"), checked on the
backends that run here (the reference; Triton under the interpreter). Bitwise (torch.equal)
throughout: these are guarantees about bits, not tolerances. The GPU-only parts of the table (the
sm90 kernels, the GPU's Triton split counts) are read from the code, not tested here.

"Batch invariant" means: a row's (sequence's, token's) result does not change when other rows are
added to the call, or when those rows change."""

import pytest
import torch

import dskernels
from dskernels.ops import mla as mla_ops

BACKENDS = [b for b in ("ref", "triton") if b in dskernels.available_backends()]


def _mla_call(lengths, backend, plan=None, s_q=2, h_q=4, d=64, dv=48, page=16):
    """Sequence 0's (out, lse) and num_splits, sequence 0's q and pages the same for any batch."""
    g = torch.Generator().manual_seed(1)
    pages = max(-(-n // page) for n in lengths)
    k_cache = torch.randn(len(lengths) * pages, page, 1, d, generator=g).bfloat16()
    table = torch.arange(len(lengths) * pages, dtype=torch.int32).reshape(len(lengths), pages)
    q = torch.randn(len(lengths), s_q, h_q, d, generator=g).bfloat16()
    mine = torch.Generator().manual_seed(7)
    q[0] = torch.randn(s_q, h_q, d, generator=mine).bfloat16()
    k_cache[:pages] = torch.randn(pages, page, 1, d, generator=mine).bfloat16()
    lens = torch.tensor(lengths, dtype=torch.int32)
    with dskernels.backend(backend):
        meta, splits = dskernels.get_mla_metadata(lens, s_q * h_q, 1) if plan is None else plan(lens)
        out, lse = dskernels.flash_mla_with_kvcache(q, k_cache, table, lens, dv, meta, splits, causal=True)
    return out[0], lse[0], splits


@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_decode_is_deterministic(backend):
    """The same inputs and plan give the same bits (no atomics: the combine merges a sequence's
    splits in split order)."""
    first = _mla_call([300, 700, 5], backend)
    second = _mla_call([300, 700, 5], backend)
    assert first[2][1] - first[2][0] > 1  # sequence 0 is split: the combine runs
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_mla_reference_is_batch_invariant():
    """The reference computes each sequence alone, whatever its batch."""
    alone = _mla_call([300], "ref")
    for lengths in ([300, 2000], [300, 16, 16, 16]):
        out, lse, _ = _mla_call(lengths, "ref")
        assert torch.equal(out, alone[0]) and torch.equal(lse, alone[1]), lengths


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_mla_split_plan_follows_the_batch():
    """What the docs say is NOT guaranteed: get_mla_metadata cuts the batch's summed cost into
    num_parts slices, so a sequence's splits (here 300 keys: 3, then 2) follow the other lengths,
    and so may its last bits."""
    assert _mla_call([300], "triton")[2].tolist()[:2] != _mla_call([300, 2000], "triton")[2].tolist()[:2]


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_mla_one_partition_plan_is_batch_invariant():
    """The documented knob: a plan of one partition (split_plan(cache_seqlens, 1)) never splits a
    sequence, so the kernel walks each sequence's keys alone, in the same order, in any batch."""
    one = lambda lens: mla_ops.split_plan(lens, 1)  # noqa: E731
    alone = _mla_call([300], "triton", plan=one)
    for lengths in ([300, 2000], [300, 16, 16, 16]):
        out, lse, splits = _mla_call(lengths, "triton", plan=one)
        assert splits.diff().max() == 1
        assert torch.equal(out, alone[0]) and torch.equal(lse, alone[1]), lengths


def _quantized(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    return dskernels.per_token_cast_to_fp8(torch.randn(rows, k, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_cast_is_batch_invariant(backend):
    """Casts work row by row (per 128 columns): a row's bytes and scales do not see other rows."""
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    with dskernels.backend(backend):
        whole = dskernels.per_token_cast_to_fp8(x)
        alone = dskernels.per_token_cast_to_fp8(x[5:6])
    assert torch.equal(whole[0][5:6].view(torch.uint8), alone[0].view(torch.uint8))
    assert torch.equal(whole[1][5:6], alone[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_topk_is_batch_invariant(backend):
    logits = torch.randn(9, 32, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(32, generator=torch.Generator().manual_seed(4))
    with dskernels.backend(backend):
        idx, weights = dskernels.grouped_topk(logits, bias, 4, 2, 4, scaling_factor=2.5)
        idx1, weights1 = dskernels.grouped_topk(logits[3:4], bias, 4, 2, 4, scaling_factor=2.5)
    assert torch.equal(idx[3:4], idx1) and torch.equal(weights[3:4], weights1)


def _dense_row0(m, n=96, k_blocks=12):
    a = _quantized(m, k_blocks * 128, 5)
    a = (torch.cat([_quantized(1, k_blocks * 128, 6)[0], a[0][1:]]),
         torch.cat([_quantized(1, k_blocks * 128, 6)[1], a[1][1:]]))
    g = torch.Generator().manual_seed(9)
    b = dskernels.per_block_cast_to_fp8(torch.randn(n, k_blocks * 128, generator=g))
    out = torch.zeros(m, n)
    with dskernels.backend("triton"):
        dskernels.fp8_gemm_nt(a, b, out, c=out)  # fp32 out: no final bf16 rounding to hide a difference
    return out[0]


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_dense_gemm_batch_invariance(monkeypatch):
    """Without a K split a row's sum runs over the K blocks in order, in whatever tile: the same
    fp32 bits at m = 1 and m = 200. A K split (decode sizes on a GPU: few output tiles for its SMs)
    is deterministic (the last split adds the partials in split order) but follows m: 16 SMs give
    m = 1 three splits and m = 200 none, and the row's bits change."""
    from dskernels.triton import gemm as triton_gemm

    alone = _dense_row0(1)
    assert torch.equal(_dense_row0(200), alone)
    monkeypatch.setattr(triton_gemm, "NO_DEVICE_SMS", 16)
    split = _dense_row0(1)
    assert [triton_gemm._split_count(m, 96, 12, 32, 64, 16) for m in (1, 200)] == [3, 1]
    assert torch.equal(_dense_row0(1), split)  # deterministic
    assert torch.equal(_dense_row0(200), alone) and not torch.equal(split, alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemms_are_batch_invariant(backend):
    """A row of expert 0 gives the same bits whatever the other experts' row counts (contiguous) or
    masked_m and expected_m (masked)."""
    k, n, groups = 256, 80, 3
    g = torch.Generator().manual_seed(3)
    w = [dskernels.per_block_cast_to_fp8(torch.randn(n, k, generator=g)) for _ in range(groups)]
    b = (torch.stack([t[0] for t in w]), torch.stack([t[1] for t in w]))
    mine = _quantized(2, k, 11)
    results = []
    for counts in ((2, 3, 1), (2, 40, 0), (2, 0, 7)):
        other = _quantized(sum(counts) - 2, k, 12)
        a = (torch.cat([mine[0], other[0]]), torch.cat([mine[1], other[1]]))
        idx = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts)])
        out = torch.empty(sum(counts), n, dtype=torch.bfloat16)
        with dskernels.backend(backend):
            dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, out, idx)
        results.append(out[:2])
    m_max = 48
    for masked, expected in (((2, 3, 1), 4), ((2, 48, 0), 4), ((2, 3, 1), 64)):
        other = _quantized(groups * m_max, k, 13)
        a = (other[0].reshape(groups, m_max, k).clone(), other[1].reshape(groups, m_max, -1).clone())
        a[0][0, :2], a[1][0, :2] = mine
        out = torch.empty(groups, m_max, n, dtype=torch.bfloat16)
        with dskernels.backend(backend):
            dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, b, out, torch.tensor(masked, dtype=torch.int32),
                                                            expected)
        results.append(out[0, :2])
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ep_gather_reduce_sums_in_a_fixed_order(backend):
    """EP combine's reduction (ops.ep.gather_reduce): out[t] = sum_j w[t, j] * y[index[t, j]] in fp32
    in j order (the source ranks' order), -1 skipped: the bits of that loop, every call."""
    from dskernels.ops import ep as ep_ops

    g = torch.Generator().manual_seed(5)
    y = (torch.randn(20, 72, generator=g) * 1e3).bfloat16()
    index = torch.randint(-1, 20, (6, 4), generator=g)
    weights = torch.rand(6, 4, generator=g)
    want = torch.zeros(6, 72)
    for j in range(4):
        want = want + torch.where(index[:, j, None] >= 0, weights[:, j, None] * y[index[:, j]].float(), 0.0)
    with dskernels.backend(backend):
        for _ in range(2):
            out = torch.empty(6, 72)
            ep_ops.gather_reduce(y, index, weights, out)
            assert torch.equal(out, want)
