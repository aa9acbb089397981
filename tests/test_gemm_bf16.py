"""DeepGEMM's bf16 GEMMs (dskernels/ops/gemm_bf16.py): the dense layouts (cuBLAS or the reference),
and the grouped ones (contiguous with either layout, masked, K-grouped) on every backend against
the fp64 product, with a bound from the math; poisoned rows that must not be read."""

import numpy
import pytest
import torch

import dskernels
from dskernels.testing import calc_diff
from python_ref import gemm as ref
from test_gemm import OPCHECK_UTILS, assert_only_output_changes, contiguous_layout, psum_layout

BF16 = torch.bfloat16
_ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []


@pytest.fixture(params=[pytest.param("ref", marks=_ON_GPU), pytest.param("triton", marks=_ON_GPU)])
def backend(request):
    """conftest's backend fixture without "cuda": the grouped bf16 GEMMs have no CUDA kernel (the
    auto backend runs Triton on every GPU; test_cuda_backend_is_refused_by_name checks the refusal)."""
    if request.param not in dskernels.available_backends():
        pytest.skip(f"backend {request.param!r} is not available here")
    with dskernels.backend(request.param):
        yield request.param, device_here()


def device_here() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_randn(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(BF16)


def assert_close_to_product(out, a, b, c=None):
    """out [m, n] against a @ b.T (+ c) in fp64 (a [m, k], b [n, k] bf16: exact in fp32 products).

    Every backend sums the k products in fp32 (bf16 tensor cores accumulate in fp32), in some
    order: at most ~(k + 8) 2^-24 sum |terms| each way, c one more term, then one rounding to out's
    dtype (2^-8 relative for bf16, 2^-24 for fp32)."""
    rounding = 2**-8 if out.dtype == BF16 else 2**-24
    a, b = a.double(), b.double()
    exact, magnitude = a @ b.T, a.abs() @ b.abs().T
    if c is not None:
        exact, magnitude = exact + c.double(), magnitude + c.double().abs()
    bound = exact.abs() * rounding + 2 * (a.shape[1] + 8) * 2**-24 * magnitude
    excess = (out.double() - exact).abs() - bound
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} elements off by more than the bound"
    assert calc_diff(out.double(), exact) < 2**-16


# ---- dense: cuBLAS on a GPU, the reference on CPU ----

LAYOUTS = {  # name: (a's shape from (m, k), b's shape from (n, k), how a and b become [m, k], [n, k])
    "nt": (lambda m, k: (m, k), lambda n, k: (n, k), lambda a: a, lambda b: b),
    "nn": (lambda m, k: (m, k), lambda n, k: (k, n), lambda a: a, lambda b: b.T),
    "tn": (lambda m, k: (k, m), lambda n, k: (k, n), lambda a: a.T, lambda b: b.T),
    "tt": (lambda m, k: (k, m), lambda n, k: (n, k), lambda a: a.T, lambda b: b),
}


@pytest.mark.parametrize("c_kind", [None, "separate", "in_place"])
@pytest.mark.parametrize("out_dtype", [BF16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_gemm_dense(layout, out_dtype, c_kind, request):
    device = device_here()
    if device == "cuda":  # cuBLAS may otherwise round split-K partial sums to bf16 (torch's default; docs/gemm.md)
        matmul = torch.backends.cuda.matmul
        previous = matmul.allow_bf16_reduced_precision_reduction
        matmul.allow_bf16_reduced_precision_reduction = False
        request.addfinalizer(lambda: setattr(matmul, "allow_bf16_reduced_precision_reduction", previous))
    m, n, k = 7, 129, 200
    shape_a, shape_b, as_mk, as_nk = LAYOUTS[layout]
    a, b = bf16_randn(*shape_a(m, k), device=device), bf16_randn(*shape_b(n, k), device=device)
    c = bf16_randn(m, n, device=device, scale=10).to(out_dtype) if c_kind else None
    d = c.clone() if c_kind == "in_place" else torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
    getattr(dskernels, f"bf16_gemm_{layout}")(a, b, d, c=d if c_kind == "in_place" else c)
    assert d.dtype == out_dtype
    assert_close_to_product(d, as_mk(a), as_nk(b), c)


def test_bf16_gemm_dense_empty_and_bad_input():
    a, b = bf16_randn(4, 0, device="cpu"), bf16_randn(5, 0, device="cpu")
    d = torch.full((4, 5), float("nan"))
    dskernels.bf16_gemm_nt(a, b, d)
    assert not d.any()
    a, b = bf16_randn(4, 16, device="cpu"), bf16_randn(5, 16, device="cpu")
    with pytest.raises(TypeError, match="^a: expected dtype bfloat16, got torch.float16"):
        dskernels.bf16_gemm_nt(a.half(), b, torch.empty(4, 5))
    with pytest.raises(ValueError, match=r"^b: expected k = 16 .* got shape \(5, 8\)"):
        dskernels.bf16_gemm_nt(a, b[:, :8], torch.empty(4, 5))
    with pytest.raises(ValueError, match=r"^d: expected shape \(4, 5\)"):
        dskernels.bf16_gemm_nt(a, b, torch.empty(5, 4))
    with pytest.raises(TypeError, match="^d: expected dtype bfloat16 or float32"):
        dskernels.bf16_gemm_nt(a, b, torch.empty(4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="^c: expected shape"):
        dskernels.bf16_gemm_nt(a, b, torch.empty(4, 5), c=torch.empty(5, 4))
    with pytest.raises(ValueError, match="^b: expected 2 dimensions"):
        dskernels.bf16_gemm_nn(a, b[None], torch.empty(4, 5))
    # the other layouts' messages speak of the tensors as the caller holds them
    with pytest.raises(ValueError, match=r"^b: expected k = 16 \(a's rows\) as its first dimension \(bf16_gemm_tn: "
                                         r"b is \[k, n\]\), got shape \(5, 16\)"):
        dskernels.bf16_gemm_tn(a.T, b, torch.empty(4, 5))
    with pytest.raises(ValueError, match=r"^d: expected shape \(4, 5\) \(m by n: a's columns by b's columns\)"):
        dskernels.bf16_gemm_tn(a.T, b.T, torch.empty(5, 4))
    with pytest.raises(ValueError, match=r"^b: expected k = 16 \(a's columns\) as its first dimension"):
        dskernels.bf16_gemm_nn(a, b, torch.empty(4, 5))
    with pytest.raises(ValueError, match=r"^b: expected k = 16 .* as dimension 1 \(this layout holds b as \[G, k, n\]\)"):
        dskernels.m_grouped_bf16_gemm_nn_contiguous(a, bf16_randn(2, 5, 16, device="cpu"), torch.empty(4, 5),
                                                    m_indices=torch.zeros(4, dtype=torch.int32))


# ---- contiguous grouped ----

def poisoned_rows(total, k, no_group, device):
    a = bf16_randn(total, k, device=device)
    a[no_group] = float("nan")
    return a


@pytest.mark.parametrize("zero_pad", [False, True], ids=["as_is", "zero_padding"])
@pytest.mark.parametrize("layout", ["aligned128", "unaligned", "psum"])
def test_m_grouped_contiguous(backend, layout, zero_pad):
    """Groups of [7, 0, 130, 1] rows in each layout (per-row ids in a shuffled group order, or
    psum ends), rows of no group NaN in a; each group against the product, the rows of no group
    zeros with ensure_zero_padding and untouched on Triton without (d starts as -inf: a row
    computed from the poison would be NaN)."""
    name, device = backend
    sizes, n, k = [7, 0, 130, 1], 72, 200
    if layout == "psum":
        grouped_layout, ranges, total = psum_layout(sizes, device)
        owner = ref.psum_to_m_indices(grouped_layout, total)
    else:
        grouped_layout, ranges = contiguous_layout(sizes, layout == "aligned128", device)
        owner, total = grouped_layout, grouped_layout.numel()
    a = poisoned_rows(total, k, owner == -1, device)
    b = bf16_randn(len(sizes), n, k, device=device)
    d = torch.full((total, n), float("-inf"), dtype=BF16, device=device)
    dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout=layout == "psum",
                                                ensure_zero_padding=zero_pad)
    for g, (lo, hi) in ranges.items():
        if hi > lo:
            assert_close_to_product(d[lo:hi], a[lo:hi], b[g])
    if zero_pad:
        assert not d[owner == -1].any()
    elif name == "triton":
        assert (d[owner == -1] == float("-inf")).all()


def test_m_grouped_contiguous_zeroes_rows_of_no_group_by_default(backend):
    """DeepGEMM's default, ensure_zero_padding=True, in both layouts."""
    _, device = backend
    grouped_layout, _ = contiguous_layout([7, 0, 130, 1], False, device)
    owner = grouped_layout
    a = poisoned_rows(owner.numel(), 128, owner == -1, device)
    b = bf16_randn(4, 40, 128, device=device)
    for name, weights in (("m_grouped_bf16_gemm_nt_contiguous", b), ("m_grouped_bf16_gemm_nn_contiguous",
                                                                     b.transpose(1, 2))):
        d = torch.full((owner.numel(), 40), float("-inf"), dtype=BF16, device=device)
        getattr(dskernels, name)(a, weights, d, grouped_layout)
        assert not d[owner == -1].any(), name


def test_m_grouped_nn_contiguous_and_strided_operands(backend):
    """The "nn" form (b [G, k, n], as the experts' input gradient reads the same weights) and
    strided a and d: every operand is read through its strides."""
    _, device = backend
    grouped_layout, ranges = contiguous_layout([20, 40], aligned=False, device=device)
    total, n, k = grouped_layout.numel(), 40, 96
    a = bf16_randn(total, 2 * k, device=device)[:, ::2]
    b_kn = bf16_randn(2, k, n, device=device)
    d = torch.full((total, 2 * n), float("nan"), dtype=BF16, device=device)[:, n:]
    dskernels.m_grouped_bf16_gemm_nn_contiguous(a, b_kn, d, grouped_layout)
    for g, (lo, hi) in ranges.items():
        assert_close_to_product(d[lo:hi], a[lo:hi], b_kn[g].T)
    again = torch.full_like(d, float("nan"))  # DeepGEMM 2.0's keyword for the layout
    dskernels.m_grouped_bf16_gemm_nn_contiguous(a, b_kn, again, m_indices=grouped_layout)
    for lo, hi in ranges.values():  # (rows of no group are left unspecified)
        assert torch.equal(again[lo:hi], d[lo:hi])
    with pytest.raises(TypeError, match="^grouped_layout: expected the contiguous layout under exactly one"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b_kn.transpose(1, 2), again)


def test_k_grouped_refusal_leaves_d_untouched():
    """A backend that cannot run the op refuses before c is copied into d."""
    tokens_a, tokens_b = bf16_randn(4, 5, device="cpu"), bf16_randn(4, 7, device="cpu")
    d = torch.zeros(2, 5, 7)
    with dskernels.backend("cuda"), pytest.raises((ValueError, NotImplementedError), match="k_grouped_bf16"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens_a, tokens_b, d, [1, 3], c=torch.ones(2, 5, 7))
    assert d.eq(0).all()


# ---- masked grouped ----

def test_m_grouped_masked(backend):
    name, device = backend
    masked, m_max, n, k = [7, 0, 130, 1], 130, 72, 200
    a = bf16_randn(len(masked), m_max, k, device=device)
    for g, rows in enumerate(masked):
        a[g, rows:] = float("nan")
    b = bf16_randn(len(masked), n, k, device=device)
    d = torch.full((len(masked), m_max, n), float("-inf"), dtype=BF16, device=device)
    counts = torch.tensor([[rows, -1] for rows in masked], dtype=torch.int32, device=device)  # a strided view
    dskernels.m_grouped_bf16_gemm_nt_masked(a, b, d, counts[:, 0], 32)
    for g, rows in enumerate(masked):
        if rows:
            assert_close_to_product(d[g, :rows], a[g, :rows], b[g])
        if name == "triton":  # rows past masked_m are neither computed (they would be NaN) nor written
            assert (d[g, rows:] == float("-inf")).all()


# ---- K-grouped (weight gradients) ----

@pytest.mark.parametrize("c_kind", [None, "separate", "in_place"])
@pytest.mark.parametrize("out_dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_k_grouped_tn(backend, out_dtype, c_kind):
    """d[g] = c[g] + A_g.T @ B_g over groups of 0, 1, 37, 129 and 200 tokens (any sizes), with the
    rows past sum(ks) NaN; ks_tensor given or made from ks."""
    _, device = backend
    ks, m, n = [37, 0, 1, 129, 200], 33, 21
    total = sum(ks)
    a, b = bf16_randn(total + 5, m, device=device), bf16_randn(total + 5, n, device=device)
    a[total:], b[total:] = float("nan"), float("nan")
    c = torch.randn(len(ks), m, n, device=device).to(out_dtype) if c_kind else None
    for ks_tensor in (None, torch.tensor(ks, dtype=torch.int32, device=device)):
        d = c.clone() if c_kind == "in_place" else torch.full((len(ks), m, n), float("nan"), dtype=out_dtype,
                                                               device=device)
        dskernels.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, ks_tensor, c=d if c_kind == "in_place" else c)
        first = 0
        for g, size in enumerate(ks):
            assert_close_to_product(d[g], a[first:first + size].T, b[first:first + size].T,
                                    None if c is None else c[g])
            first += size


# ---- bad input ----

def _grouped(groups=3, m=4, n=8, k=16):
    return bf16_randn(m, k, device="cpu"), bf16_randn(groups, n, k, device="cpu"), torch.empty(m, n, dtype=BF16)


def test_bad_input_is_named():
    a, b, d = _grouped()
    rows = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="^a: expected dtype bfloat16"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a.float(), b, d, rows)
    with pytest.raises(ValueError, match=r"^b: expected k = 16 .* got shape \(3, 8, 12\)"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b[..., :12], d, rows)
    with pytest.raises(TypeError, match="^d: expected dtype bfloat16, got torch.float32"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d.float(), rows)
    with pytest.raises(ValueError, match=r"^grouped_layout: expected shape \(4,\) \(one group id per row"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, rows[:3])
    with pytest.raises(ValueError, match=r"^grouped_layout: expected shape \(3,\) \(use_psum_layout"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, rows, use_psum_layout=True)
    with pytest.raises(ValueError, match="^expected_m_for_psum_layout: only with use_psum_layout=True"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, rows, expected_m_for_psum_layout=8)
    # DeepGEMM's order puts compiled_dims 5th: a positional True meant for use_psum_layout was dropped
    with pytest.raises(TypeError, match="^compiled_dims: expected a str such as 'nk'"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, rows, True)
    with pytest.raises(TypeError, match="^compiled_dims: expected a str"):
        dskernels.bf16_gemm_nt(a, b[0], torch.empty(4, 8, dtype=BF16), None, 1)
    a3 = bf16_randn(3, 4, 16, device="cpu")
    d3 = torch.empty(3, 4, 8, dtype=BF16)
    with pytest.raises(ValueError, match=r"^masked_m: expected shape \(3,\)"):
        dskernels.m_grouped_bf16_gemm_nt_masked(a3, b, d3, torch.ones(2, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="^expected_m: expected a python int"):
        dskernels.m_grouped_bf16_gemm_nt_masked(a3, b, d3, torch.ones(3, dtype=torch.int32), 4.0)
    dskernels.m_grouped_bf16_gemm_nt_masked(a3, b, d3, torch.ones(3, dtype=torch.int32), numpy.int64(4))  # as fp8's
    with pytest.raises(ValueError, match=r"^a: expected 3 groups .* \(2, 4, 16\)"):
        dskernels.m_grouped_bf16_gemm_nt_masked(a3[:2], b, d3, torch.ones(3, dtype=torch.int32), 4)
    tokens = bf16_randn(10, 4, device="cpu")
    out = torch.empty(2, 4, 4)
    with pytest.raises(ValueError, match=r"^a: expected shape \(>= 12, 4\)"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens, tokens, out, [5, 7])
    with pytest.raises(ValueError, match="^ks: expected 2 sizes"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens, tokens, out, [5])
    with pytest.raises(ValueError, match="^ks: expected sizes >= 0"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens, tokens, out, [5, -1])
    with pytest.raises(ValueError, match=r"^ks_tensor: expected shape \(2,\)"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens, tokens, out, [5, 5], torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^ks_tensor: expected ks's values \[5, 5\]"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens, tokens, out, [5, 5], torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="^d: expected an output whose elements do not share memory"):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens, tokens, torch.empty(1, 4, 4).expand(2, 4, 4), [5, 5])
    # an output sharing memory with an operand (same dtype: an in-place call) is refused
    square = bf16_randn(8, 8, device="cpu")
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with a"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(square, bf16_randn(1, 8, 8, device="cpu"), square,
                                                    torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with b"):
        dskernels.m_grouped_bf16_gemm_nt_masked(bf16_randn(1, 8, 8, device="cpu"), square[None], square[None],
                                                torch.ones(1, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with a"):
        dskernels.bf16_gemm_nt(square, bf16_randn(8, 8, device="cpu"), square)


@pytest.mark.gpu
def test_cuda_backend_is_refused_by_name():
    a, b = bf16_randn(4, 16, device="cuda"), bf16_randn(2, 8, 16, device="cuda")
    d = torch.empty(4, 8, dtype=BF16, device="cuda")
    with dskernels.backend("cuda"), pytest.raises(NotImplementedError,
                                                  match="^m_grouped_bf16_gemm_nt_contiguous: no CUDA kernel yet"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, torch.zeros(4, dtype=torch.int32, device="cuda"))


# ---- torch.library / torch.compile ----

def _op_samples():
    a, b, d = _grouped(m=9)
    rows = torch.tensor([0, 0, 2, 2, 2, -1, 1, 1, 1], dtype=torch.int32)
    a3 = bf16_randn(3, 7, 16, device="cpu")
    tokens_a, tokens_b = bf16_randn(12, 5, device="cpu"), bf16_randn(12, 6, device="cpu")
    return [
        (torch.ops.dskernels.m_grouped_bf16_gemm_nt_contiguous, (a, b, d, rows)),
        (torch.ops.dskernels.m_grouped_bf16_gemm_nt_contiguous,
         (a, b, torch.zeros_like(d), torch.tensor([5, 128, 128], dtype=torch.int32), True, True, 4)),
        (torch.ops.dskernels.m_grouped_bf16_gemm_nt_masked,
         (a3, b, torch.zeros(3, 7, 8, dtype=BF16), torch.tensor([3, 0, 7], dtype=torch.int32), 4)),
        (torch.ops.dskernels.k_grouped_bf16_gemm_tn_contiguous,
         (tokens_a, tokens_b, torch.randn(2, 5, 6), [5, 7], None, True)),
    ]


def test_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_mutations_follow_schema(backend):
    assert_only_output_changes(_op_samples(), 2, backend[1])


def test_torch_compile_fullgraph():
    def experts(a, b, rows, a3, masked_m, tokens_a, tokens_b):
        contiguous = torch.zeros(a.shape[0], b.shape[1], dtype=BF16)
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, contiguous, rows)
        masked = torch.zeros(a3.shape[0], a3.shape[1], b.shape[1], dtype=BF16)
        dskernels.m_grouped_bf16_gemm_nt_masked(a3, b, masked, masked_m, a3.shape[1])
        grads = torch.empty(2, tokens_a.shape[1], tokens_b.shape[1])
        dskernels.k_grouped_bf16_gemm_tn_contiguous(tokens_a, tokens_b, grads, [5, 7])
        dense = torch.empty(a.shape[0], b.shape[1])
        dskernels.bf16_gemm_nt(a, b[0], dense)
        return contiguous, masked, grads, dense

    a, b, _ = _grouped(m=9)
    rows = torch.tensor([0, 0, 2, 2, 2, -1, 1, 1, 1], dtype=torch.int32)
    args = (a, b, rows, bf16_randn(3, 7, 16, device="cpu"), torch.tensor([3, 0, 7], dtype=torch.int32),
            bf16_randn(12, 5, device="cpu"), bf16_randn(12, 6, device="cpu"))
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(*args), experts(*args)):
        assert torch.equal(actual, expected)


@pytest.mark.gpu
def test_masked_cuda_graph_replay_with_new_counts():
    """The masked GEMM reads masked_m on the device: captured once, replayed with new counts."""
    groups, m_max, n, k = 4, 64, 256, 512
    a, b = bf16_randn(groups, m_max, k, device="cuda"), bf16_randn(groups, n, k, device="cuda")
    d = torch.zeros(groups, m_max, n, dtype=BF16, device="cuda")
    masked_m = torch.tensor([5, 0, 64, 17], dtype=torch.int32, device="cuda")
    with dskernels.backend("triton"):
        dskernels.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 32)  # warm-up (compiles, tunes)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dskernels.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 32)
    for counts in ([1, 64, 0, 33], [64, 2, 9, 0]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for g, rows in enumerate(counts):
            if rows:
                assert_close_to_product(d[g, :rows], a[g, :rows], b[g])
