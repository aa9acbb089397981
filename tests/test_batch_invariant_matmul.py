"""Batch-invariant mode's float matmuls (dskernels/ops/invariant.py, dskernels/triton/matmul.py):
the dense bf16 GEMMs and `einsum` give a row the same bits alone and inside bigger m, with the
mode on the Triton backend (interpreted on CPU tensors). Without the mode the same calls run
torch's CPU matmul (the reference), whose kernel follows m (m = 1 is a matrix-vector product):
the tests check that their shapes do differ there, so that they would fail without the mode."""

import pytest
import torch

import dskernels
from dskernels.ops.invariant import invariant_linear, invariant_mm

pytestmark = pytest.mark.skipif("triton" not in dskernels.available_backends(),
                                reason="needs the Triton backend (TRITON_INTERPRET=1 on CPU)")

M, K, N = 37, 200, 96  # 200: a K tail in the last block; 96: a column tail


def poisoned(shape, dtype, seed, pad=3):
    """Random values in a NaN-padded buffer (a strided view: rows apart, NaN between them)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype)
    view = buf[..., :shape[-1]]
    view.copy_(torch.randn(shape, generator=g).to(dtype))
    return view


def _rows_alone_and_in_batches(compute, m_total, subsets):
    """compute(lo, hi) -> rows lo..hi-1 of the output (first dimension); returns the full result and
    the mismatches of each subset's rows against the full call's."""
    full = compute(0, m_total)
    bad = [(lo, hi) for lo, hi in subsets if not torch.equal(compute(lo, hi), full[lo:hi])]
    return full, bad


SUBSETS = [(0, 1), (5, 6), (36, 37), (3, 5), (10, 15), (1, 32)]  # alone, pairs, 5 rows, most rows


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("out_dtype,with_c", [(torch.float32, False), (torch.bfloat16, False),
                                              (torch.float32, True)])
def test_bf16_gemm_rows_keep_their_bits(layout, out_dtype, with_c):
    """bf16_gemm_{layout}: rows alone, in pairs, in 5 and in 31 equal those rows of the 37-row call,
    bit for bit, with the mode; the result within fp32 rounding of the reference. Without the
    mode (the reference: torch's CPU matmul) an fp32 d differs between m = 1 and m = 37."""
    a = poisoned((M, K), torch.bfloat16, 1)
    b = poisoned((N, K), torch.bfloat16, 2)
    c = poisoned((M, N), out_dtype, 3) if with_c else None
    a_arg = a if layout[0] == "n" else a.T  # "t": a given [k, m]
    b_arg = b if layout[1] == "t" else b.T  # "n": b given [k, n]
    gemm = getattr(dskernels, f"bf16_gemm_{layout}")

    def compute(lo, hi):
        d = torch.full((hi - lo, N), float("nan"), dtype=out_dtype)
        a_rows = a_arg[lo:hi] if layout[0] == "n" else a_arg[:, lo:hi]
        gemm(a_rows, b_arg, d, None if c is None else c[lo:hi])
        return d

    with dskernels.backend("triton"):
        with dskernels.batch_invariant():
            full, bad = _rows_alone_and_in_batches(compute, M, SUBSETS)
        assert not bad, f"rows {bad} changed with m under batch_invariant()"
        expected = a.float() @ b.float().T + (c.float() if with_c else 0)
        torch.testing.assert_close(full.float(), expected, atol=1e-4 if out_dtype == torch.float32 else 2e-2,
                                   rtol=1e-5 if out_dtype == torch.float32 else 8e-3)
        if out_dtype == torch.float32:  # the case the mode is for: without it the bits follow m
            _, bad = _rows_alone_and_in_batches(compute, M, SUBSETS)
            assert bad, "torch's CPU matmul no longer differs by m: pick shapes where it does"


def test_bf16_gemm_accumulates_in_place_invariantly():
    """c = d (in-place accumulation) under the mode: the row's bits as in the full call."""
    a, b = poisoned((M, K), torch.bfloat16, 4), poisoned((N, K), torch.bfloat16, 5)
    start = poisoned((M, N), torch.float32, 6)
    with dskernels.backend("triton"), dskernels.batch_invariant():
        d = start.clone()
        dskernels.bf16_gemm_nt(a, b, d, c=d)
        row = start[7:8].clone()
        dskernels.bf16_gemm_nt(a[7:8], b, row, c=row)
    assert torch.equal(row, d[7:8])
    torch.testing.assert_close(d, start + a.float() @ b.float().T, atol=1e-4, rtol=1e-5)


# (a_shape, b_shape, whether torch's CPU einsum gives a token other bits in other batches: MKL's
# batched GEMM with b [h, d, r] row-major happens to keep them, measured with torch 2.14)
EXPRS = {
    "bhd,hdr->bhr": ((M, 3, 40), (3, 40, 72), False),  # MLA's absorbed query: b tokens, h heads
    "bhr,hdr->bhd": ((M, 3, 72), (3, 40, 72), True),  # its output through W_UV
    "bsk,nk->bsn": ((M, 2, 100), (50, 100), True),  # two row letters, no batch letter
}


@pytest.mark.parametrize("expr", list(EXPRS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_einsum_rows_keep_their_bits(expr, out_dtype):
    """einsum: a token's (first letter's) slice alone and inside bigger batches of tokens has the
    same bits with the mode; within fp32 rounding of torch.einsum; without it (the reference) an
    fp32 d differs."""
    a_shape, b_shape, differs_without = EXPRS[expr]
    a, b = poisoned(a_shape, torch.bfloat16, 7), poisoned(b_shape, torch.bfloat16, 8)
    out_letters = expr.split("->")[1]
    sizes = dict(zip(expr.split(",")[0], a_shape)) | dict(zip(expr.split(",")[1].split("-")[0], b_shape))

    def compute(lo, hi):
        d = torch.full((hi - lo, *[sizes[x] for x in out_letters[1:]]), float("nan"), dtype=out_dtype)
        dskernels.einsum(expr, a[lo:hi], b, d)
        return d

    with dskernels.backend("triton"):
        with dskernels.batch_invariant():
            full, bad = _rows_alone_and_in_batches(compute, M, SUBSETS)
        assert not bad, f"tokens {bad} changed with the batch under batch_invariant()"
        expected = torch.einsum(expr, a.float(), b.float())
        torch.testing.assert_close(full.float(), expected, atol=1e-4 if out_dtype == torch.float32 else 2e-2,
                                   rtol=1e-5 if out_dtype == torch.float32 else 8e-3)
        if out_dtype == torch.float32 and differs_without:
            _, bad = _rows_alone_and_in_batches(compute, M, SUBSETS)
            assert bad, "torch's CPU einsum no longer differs by batch: pick shapes where it does"


def test_einsum_with_c_under_the_mode():
    """c added in fp32 before the one rounding, c = d too."""
    expr = "bhd,hdr->bhr"
    a, b = poisoned((5, 3, 40), torch.bfloat16, 9), poisoned((3, 40, 72), torch.bfloat16, 10)
    c = torch.randn(5, 3, 72)
    with dskernels.backend("triton"), dskernels.batch_invariant():
        d = torch.empty(5, 3, 72, dtype=torch.bfloat16)
        dskernels.einsum(expr, a, b, d, c.bfloat16())
        d2 = c.clone()
        dskernels.einsum(expr, a, b, d2, d2)
    expected = torch.einsum(expr, a.float(), b.float()) + c
    torch.testing.assert_close(d2, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.float(), torch.einsum(expr, a.float(), b.float()) + c.bfloat16().float(),
                               atol=2e-2, rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_invariant_linear_and_row_groups(dtype):
    """The layer's entry points: invariant_linear (fp32 operands: the router's gate GEMM, an IEEE
    fp32 dot) keeps a row's bits in any m; the row-grouped form (float experts: rows sorted by
    expert, ends on the device) gives each row the bits it has when its group holds it alone."""
    x, w = poisoned((M, K), dtype, 11), poisoned((N, K), dtype, 12)
    with dskernels.backend("triton"), dskernels.batch_invariant():
        full = invariant_linear(x, w)
        for lo, hi in SUBSETS:
            assert torch.equal(invariant_linear(x[lo:hi], w), full[lo:hi]), (lo, hi)
        experts = poisoned((4, N, K), dtype, 13)
        ends = torch.tensor([3, 3, 20, 37], dtype=torch.int32)  # an empty group, odd sizes
        grouped = invariant_mm(x, experts, torch.float32, ends=ends)
        for g, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 20), (20, 37)]):
            for row in range(lo, hi, 4):  # the row alone in its group
                alone = invariant_mm(x[row:row + 1], experts, torch.float32,
                                     ends=torch.tensor([0] * g + [1] * (4 - g), dtype=torch.int32))
                assert torch.equal(alone, grouped[row:row + 1]), (g, row)
            torch.testing.assert_close(grouped[lo:hi], x[lo:hi].float() @ experts[g].float().T, atol=1e-3,
                                       rtol=1e-4)
    torch.testing.assert_close(full.float(), x.float() @ w.float().T, atol=2e-2 if dtype != torch.float32 else 1e-4,
                               rtol=8e-3 if dtype != torch.float32 else 1e-5)


def test_mode_off_and_ref_backend_keep_torch():
    """The mode off, or the reference backend with it on, runs the reference as before (bit for bit)."""
    a, b = poisoned((M, K), torch.bfloat16, 14), poisoned((N, K), torch.bfloat16, 15)
    expected = (a.float() @ b.float().T)
    for mode in (False, True):
        with dskernels.backend("ref"), dskernels.batch_invariant(mode):
            d = torch.empty(M, N)
            dskernels.bf16_gemm_nt(a, b, d)
        assert torch.equal(d, expected)
    with dskernels.backend("triton"):
        d = torch.empty(M, N)
        dskernels.bf16_gemm_nt(a, b, d)
    assert torch.equal(d, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rows_keep_their_bits(dtype):
    """On a GPU (the compiled kernel: bf16 tensor-core dots, IEEE fp32 FMA dots): rows alone and in
    bigger m, and with other groups of rows before them, keep their bits; the dense bf16 GEMM too."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 7168, device="cuda", generator=g).to(dtype)
    w = torch.randn(256, 7168, device="cuda", generator=g).to(dtype)
    with dskernels.batch_invariant():
        full = invariant_linear(x, w)
        for lo, hi in [(0, 1), (17, 18), (3, 8), (5, 69), (0, 257)]:
            assert torch.equal(invariant_linear(x[lo:hi], w), full[lo:hi]), (lo, hi)
        if dtype == torch.bfloat16:
            d = torch.empty(300, 256, device="cuda")
            dskernels.bf16_gemm_nt(x, w, d)
            row = torch.empty(1, 256, device="cuda")
            dskernels.bf16_gemm_nt(x[17:18], w, row)
            assert torch.equal(row, d[17:18])
            torch.testing.assert_close(d, x.float() @ w.float().T, atol=1e-2, rtol=1e-3)


# ---- the row-grouped form (float MoE experts): a tile map on the device, one flat grid axis ----

def _grouped(x, experts, ends, out, c=None):
    """matmul_nt's row-grouped form into out as given (rows past ends[-1] must stay as they are)."""
    from dskernels.triton import matmul as triton_matmul

    triton_matmul.matmul_nt(x, experts, out, c, ends=torch.tensor(ends, dtype=torch.int32))
    return out


def _assert_within_fp32_sum(got, x, w, c=None):
    """got = c + x @ w.T summed in fp32 in any order, rounded once to fp32: within (k + 1) * 2**-24
    of the sum of |products| (and |c|) per element (the exact sum in float64: 16-bit values widen
    exactly, their products are exact in float64)."""
    exact = x.double() @ w.double().T + (0 if c is None else c.double())
    scale = x.double().abs() @ w.double().abs().T + (0 if c is None else c.double().abs())
    bound = (x.shape[-1] + 1) * 2.0 ** -24 * scale + 1e-30
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max().item():.3g}"


# (ends, rows in a): tile edges (64, 65, 127 rows), empty groups first / in the middle / last, one
# group holding every row, rows past ends[-1] (never written)
GROUPINGS = [
    ([0, 64, 129, 129, 256], 256),
    ([1, 1, 128, 200, 200], 203),
    ([0, 0, 150, 150, 150], 150),
    ([77], 80),
    ([5, 6, 7, 8, 9, 10, 11, 12], 12),
]


@pytest.mark.parametrize("ends,m", GROUPINGS)
@pytest.mark.parametrize("dtype,with_c", [(torch.bfloat16, False), (torch.float32, True)])
def test_row_groups_against_the_reference(ends, m, dtype, with_c):
    """Each group's rows are a @ b[g].T (+ c) within fp32 summation; rows past ends[-1] and the
    buffer's columns past n (NaN) stay as they were."""
    k, n = 70, 72  # a K tail and a column tail
    x, experts = poisoned((m, k), dtype, 20), poisoned((len(ends), n, k), dtype, 21)
    c = poisoned((m, n), torch.float32, 22) if with_c else None
    out = poisoned((m, n), torch.float32, 23)
    out.fill_(float("nan"))
    _grouped(x, experts, ends, out, c)
    for g, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
        _assert_within_fp32_sum(out[lo:hi], x[lo:hi], experts[g], None if c is None else c[lo:hi])
    assert out[ends[-1]:].isnan().all()
    assert out._base[:, n:].isnan().all()


def test_row_groups_never_write_past_the_rows_of_a():
    """ends past a's M rows are cut at M (no read or write past the operands): the buffer's rows
    after out's stay NaN. The former grid ran cdiv(M, 64) row tiles from each group's start."""
    k, n, m = 16, 8, 70
    x = poisoned((m, k), torch.bfloat16, 24)
    experts = poisoned((3, n, k), torch.bfloat16, 25)
    buf = torch.full((m + 100, n), float("nan"))
    out = _grouped(x, experts, [30, 60, 150], buf[:m])
    assert buf[m:].isnan().all()
    for g, (lo, hi) in enumerate([(0, 30), (30, 60), (60, 70)]):
        _assert_within_fp32_sum(out[lo:hi], x[lo:hi], experts[g])


def test_row_group_keeps_its_bits_when_the_others_grow():
    """A group's rows have the same bits whatever the sizes of the groups before and after it
    (other tile maps, other M, other grids)."""
    k, n = 200, 96
    mine = poisoned((23, k), torch.bfloat16, 26)
    experts = poisoned((3, n, k), torch.bfloat16, 27)
    results = []
    for before, after in [(0, 0), (1, 0), (64, 5), (130, 200)]:
        x = torch.cat([poisoned((before, k), torch.bfloat16, 28), mine, poisoned((after, k), torch.bfloat16, 29)])
        ends = [before, before + 23, before + 23 + after]
        out = _grouped(x, experts, ends, torch.full((x.shape[0], n), float("nan")))
        results.append(out[before:before + 23])
    assert all(torch.equal(r, results[0]) for r in results[1:])
    _assert_within_fp32_sum(results[0], mine, experts[1])


def _record_grids(monkeypatch, launch: bool):
    """The grids of matmul.py's launches (the tile map's and the matmul's), launched or not."""
    from dskernels.triton import matmul as triton_matmul

    grids, real = [], triton_matmul.fast

    def recording(kernel):
        class Recorder:
            def __getitem__(_, grid):
                grids.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, tuple(grid)))
                return real(kernel)[grid] if launch else (lambda *args, **kwargs: None)
        return Recorder()

    monkeypatch.setattr(triton_matmul, "fast", recording)
    return grids


def test_row_grouped_grid_follows_the_rows_not_groups_times_rows(monkeypatch):
    """256 experts, 300 rows: at most cdiv(M, 64) + one partial tile per group with rows (the host's
    bound), times the column tiles, not cdiv(M, 64) x column tiles x G (1280 row tiles)."""
    grids = _record_grids(monkeypatch, launch=True)
    k, n, m, groups = 8, 96, 300, 256
    x, experts = poisoned((m, k), torch.float32, 30), poisoned((groups, n, k), torch.float32, 31)
    sizes = torch.zeros(groups, dtype=torch.int64)
    singles = [g for g in torch.randperm(groups, generator=torch.Generator().manual_seed(0)).tolist()
               if g not in (7, 100, 255)][:40]
    sizes[singles] = 1
    sizes[7], sizes[100], sizes[255] = 70, 64, m - 70 - 64 - 40  # (the last 126 rows: a partial tile)
    ends = sizes.cumsum(0).tolist()
    out = _grouped(x, experts, ends, torch.full((m, n), float("nan")))
    (_, map_grid), (_, grid) = grids
    assert map_grid == (1,) and len(grid) == 1
    assert grid[0] == (m + 63 * min(groups, m)) // 64 * 2 <= (5 + 256) * 2
    for g, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
        _assert_within_fp32_sum(out[lo:hi], x[lo:hi], experts[g])
    assert out[ends[-1]:].isnan().all()


def test_row_groups_past_the_grid_dimension_limit():
    """70000 groups (more than CUDA's 65535 of a grid's y or z: the former limit of this form), a
    few with rows, the first, a middle and the last among them."""
    k, n, groups = 4, 8, 70_000
    x = poisoned((9, k), torch.float32, 32)
    experts = poisoned((groups, n, k), torch.float32, 33)
    sizes = torch.zeros(groups, dtype=torch.int64)
    sizes[0], sizes[40_000], sizes[groups - 1] = 2, 3, 4
    ends = sizes.cumsum(0).tolist()
    out = _grouped(x, experts, ends, torch.full((9, n), float("nan")))
    for g, lo, hi in [(0, 0, 2), (40_000, 2, 5), (groups - 1, 5, 9)]:
        _assert_within_fp32_sum(out[lo:hi], x[lo:hi], experts[g])


def test_column_tiles_past_the_grid_dimension_limit(monkeypatch):
    """n past 65535 column tiles of 64 (CUDA's limit on grid y, where the column tiles were): row
    tiles x column tiles on grid axis 0 (2**31 - 1), in both forms; grids checked, not launched."""
    grids = _record_grids(monkeypatch, launch=False)
    from dskernels.triton import matmul as triton_matmul

    n, k = 65536 * 64 + 1, 8
    b = torch.zeros(1, 1, k).expand(1, n, k)  # (no memory)
    a = torch.zeros(100, k)
    out = torch.zeros(1, 1).expand(100, n)
    triton_matmul.matmul_nt(a.unsqueeze(0), b, out.unsqueeze(0))
    triton_matmul.matmul_nt(a, b, out, ends=torch.tensor([100], dtype=torch.int32))
    assert [name for name, _ in grids] == ["_matmul_kernel", "_tile_map_kernel", "_matmul_kernel"]
    assert all(max(grid[1:], default=1) <= 65535 for _, grid in grids), grids
    assert grids[0][1][0] == 2 * 65537 and grids[2][1][0] == 2 * 65537


def test_more_tiles_than_a_grid_holds_are_refused_by_name(monkeypatch):
    """Past 2**31 - 1 tiles (grid axis 0) a clear error, not a failed launch."""
    _record_grids(monkeypatch, launch=False)
    from dskernels.triton import matmul as triton_matmul

    n, m = 2**31, 64 * 65
    b = torch.zeros(1, 1, 8).expand(1, n, 8)
    out = torch.zeros(1, 1).expand(m, n)
    with pytest.raises(ValueError, match=r"a, b: at most 2147483647 tiles"):
        triton_matmul.matmul_nt(torch.zeros(1, m, 8), b, out.unsqueeze(0))


@pytest.mark.gpu
def test_gpu_row_groups_keep_their_bits():
    """On a GPU: 256 experts (bf16 tensor-core dots), a group's rows with the same bits alone and
    beside other groups' rows (other tile maps, grids and M); within fp32 summation of the exact."""
    g = torch.Generator(device="cuda").manual_seed(1)
    experts = torch.randn(256, 512, 7168, device="cuda", generator=g).bfloat16()
    x = torch.randn(700, 7168, device="cuda", generator=g).bfloat16()
    sizes = torch.zeros(256, dtype=torch.int64)
    sizes[[0, 3, 100, 101, 255]] = torch.tensor([1, 130, 64, 300, 205])
    ends = sizes.cumsum(0).to(torch.int32).cuda()
    with dskernels.batch_invariant():
        full = invariant_mm(x, experts, torch.float32, ends=ends)
        alone = invariant_mm(x[131:195], experts, torch.float32,
                             ends=torch.tensor([0] * 100 + [64] * 156, dtype=torch.int32, device="cuda"))
    assert torch.equal(alone, full[131:195])  # expert 100's rows
    _assert_within_fp32_sum(full[195:495].cpu(), x[195:495].cpu(), experts[101].cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_k_ranges_split_or_looped_keep_a_rows_bits(dtype, monkeypatch):
    """K cut into ranges fixed by n and k (n = 96: 2 column tiles; k = 808: 13 steps of 64 values,
    the last partial, in 3 uneven ranges): 8 SMs split m = 1 and 64 into one program per range (2
    and 4 tiles fill at most half of them), m = 300 loops over the ranges in one program. A row
    keeps its bits, with c added in place too, within fp32's summation bound. fp32 operands: one
    range (their looped ranges spill)."""
    from dskernels.triton import gemm as triton_gemm
    from dskernels.triton import matmul as triton_matmul

    monkeypatch.setattr(triton_gemm, "NO_DEVICE_SMS", 8)
    launches = []
    real = triton_matmul.fast

    def recording(kernel):
        launcher = real(kernel)

        class Recorder:
            def __getitem__(_, grid):
                def launch(*args, **meta):
                    launches.append((grid, meta.get("K_RANGES"), meta.get("SPLIT")))
                    return launcher[grid](*args, **meta)
                return launch
        return Recorder()

    monkeypatch.setattr(triton_matmul, "fast", recording)
    n, k = 96, 808
    a = poisoned((300, k), dtype, 1)
    b = poisoned((n, k), dtype, 2)
    c = torch.randn(300, n, generator=torch.Generator().manual_seed(3))
    ranges = 3
    assert triton_matmul._k_ranges(n, k, dtype) == ranges
    assert triton_matmul._k_ranges(n, k, torch.float32) == 1
    rows, rows_c = [], []
    for m in (1, 64, 300):
        out = torch.full((1, m, n), float("nan"))
        triton_matmul.matmul_nt(a[None, :m], b[None], out)
        rows.append(out[0, 0].clone())
        assert launches[-1][1:] == (ranges, m < 300)
        assert launches[-1][0][1] == (ranges if m < 300 else 1)
        d = c[None, :m].clone()
        triton_matmul.matmul_nt(a[None, :m], b[None], d, d)  # c is out itself
        rows_c.append(d[0, 0].clone())
        exact = a[:m].double() @ b.double().T
        bound = (k + 2) * 2.0**-24 * (a[:m].double().abs() @ b.double().abs().T)
        assert ((out[0].double() - exact).abs() <= bound).all()
    assert all(torch.equal(row, rows[0]) for row in rows[1:])
    assert all(torch.equal(row, rows_c[0]) for row in rows_c[1:])
