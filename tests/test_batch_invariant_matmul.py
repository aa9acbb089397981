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
