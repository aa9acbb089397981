"""dskernels.grouped_topk (DeepSeek-V3's router after the gate GEMM) on every backend against
python_ref.moe.grouped_topk, which the model's layer tests hold to transformers' router."""

import numpy
import pytest
import torch

import dskernels
import python_ref

# (experts, groups, topk_groups, topk): V3's 256 / 8 / 4 / 8; fewer and odd group sizes (160 / 8:
# groups of 20, V2's shape); one group (no group limit); the tiny test model's 16 / 4 / 2 / 4.
# topk = every expert of the kept groups: (16, 4, 2, 8).
SHAPES = [(256, 8, 4, 8), (160, 8, 3, 6), (64, 1, 1, 16), (16, 4, 2, 4), (72, 6, 6, 5), (16, 4, 2, 8)]
_ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []


@pytest.fixture(params=[pytest.param("ref", marks=_ON_GPU), pytest.param("triton", marks=_ON_GPU)])
def backend(request):
    """The backends that implement grouped_topk (no CUDA kernel: test_cuda_backend_refuses)."""
    if request.param not in dskernels.available_backends():
        pytest.skip(f"backend {request.param!r} is not available here")
    with dskernels.backend(request.param):
        yield request.param, "cuda" if torch.cuda.is_available() else "cpu"


def _logits(tokens, experts, device, dtype=torch.float32):
    """Router logits in NaN-padded rows (the kernel must read only the view), and a bias on the
    scale of the sigmoid scores' spread, so that it moves the selection."""
    wide = torch.full((tokens, experts + 9), float("nan"), device=device, dtype=dtype)
    wide[:, 3:3 + experts] = (torch.randn(tokens, experts, device=device) * 2).to(dtype)
    return wide[:, 3:3 + experts], torch.randn(experts, device=device) * 0.1


def _by_expert(idx, weights):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), weights.gather(1, order)


def assert_routes_equal(idx, weights, logits, bias, groups, topk_groups, topk, renormalize, scaling):
    ref_idx, ref_weights = python_ref.grouped_topk(logits, bias, groups, topk_groups, topk, renormalize, scaling)
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert idx.shape == weights.shape == (logits.shape[0], topk)
    (idx, weights), (ref_idx, ref_weights) = _by_expert(idx, weights), _by_expert(ref_idx, ref_weights.float())
    assert torch.equal(idx.cpu(), ref_idx.cpu())  # random scores: no ties to break differently
    # sigmoid and the normalizing sum in fp32 on both sides: a few ulps apart
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 7, 130])
@pytest.mark.parametrize("experts,groups,topk_groups,topk", SHAPES)
@pytest.mark.parametrize("renormalize,scaling", [(True, 2.5), (False, 1.0)])
def test_grouped_topk_matches_oracle(backend, tokens, experts, groups, topk_groups, topk, renormalize, scaling):
    _, device = backend
    torch.manual_seed(tokens * 1000 + experts)
    logits, bias = _logits(tokens, experts, device)
    idx, weights = dskernels.grouped_topk(logits, bias, groups, topk_groups, topk, renormalize, scaling)
    assert_routes_equal(idx, weights, logits, bias, groups, topk_groups, topk, renormalize, scaling)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.full((tokens,), scaling, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_topk_half_logits(backend, dtype):
    _, device = backend
    logits, bias = _logits(37, 256, device, dtype)
    idx, weights = dskernels.grouped_topk(logits, bias.to(dtype), 8, 4, 8, True, 2.5)
    assert_routes_equal(idx, weights, logits, bias.to(dtype), 8, 4, 8, True, 2.5)


def test_group_limit_is_applied(backend):
    """The best experts by score sit in groups that lose on their top-2 sums: they must not be
    chosen (a kernel that skipped the group step would pick them)."""
    _, device = backend
    logits = torch.full((2, 16), -4.0, device=device)
    logits[:, 0] = 6.0        # group 0: one very good expert, the rest poor (top-2 sum ~1.0)
    logits[:, 4:6] = 3.0      # group 1: two good ones (top-2 sum ~1.9)
    logits[:, 8:12] = 2.5     # group 2: four fair ones (top-2 sum ~1.85)
    idx, _ = dskernels.grouped_topk(logits, torch.zeros(16, device=device), 4, 2, 4, True, 1.0)
    chosen = set(idx[0].tolist())
    assert 0 not in chosen and {4, 5} <= chosen and len(chosen & {8, 9, 10, 11}) == 2


def test_bias_steers_selection_not_weights(backend):
    _, device = backend
    logits = torch.zeros(1, 16, device=device)
    bias = torch.zeros(16, device=device)
    bias[[3, 7]] = 1.0
    idx, weights = dskernels.grouped_topk(logits, bias, 4, 4, 2, False, 1.0)
    assert sorted(idx[0].tolist()) == [3, 7]
    torch.testing.assert_close(weights, torch.full((1, 2), 0.5, device=device))  # sigmoid(0), unbiased


@pytest.mark.parametrize("bias_layout", ["strided", "expanded"])
def test_bias_in_any_strides(backend, bias_layout):
    _, device = backend
    logits, bias = _logits(37, 256, device)
    bias = torch.randn(256, 3, device=device)[:, 1] if bias_layout == "strided" else bias[:1].expand(256)
    idx, weights = dskernels.grouped_topk(logits, bias, 8, 4, 8, True, 2.5)
    assert_routes_equal(idx, weights, logits, bias, 8, 4, 8, True, 2.5)


def test_nan_ranks_first(backend):
    """As torch.topk ranks it: a NaN logit's expert is chosen (its group too), its weight NaN."""
    _, device = backend
    logits, bias = _logits(3, 256, device)
    logits = logits.contiguous()
    logits[0, 37] = float("nan")
    idx, weights = dskernels.grouped_topk(logits, bias, 8, 4, 8, False, 1.0)
    ref_idx, _ = python_ref.grouped_topk(logits, bias, 8, 4, 8, False, 1.0)
    assert torch.equal(idx.sort(-1).values.cpu(), ref_idx.sort(-1).values.cpu())
    assert 37 in idx[0].tolist() and weights[0].isnan().sum() == 1 and not weights[1:].isnan().any()


def test_all_minus_inf_still_distinct_experts(backend):
    """Every biased score -inf (a -inf bias): still topk distinct ids in range, from kept groups."""
    _, device = backend
    for experts, groups, topk_groups, topk in [(16, 4, 2, 4), (12, 6, 3, 6), (160, 8, 3, 6)]:
        logits, _ = _logits(5, experts, device)
        idx, _ = dskernels.grouped_topk(logits, torch.full((experts,), float("-inf"), device=device), groups,
                                        topk_groups, topk, True, 1.0)
        for row in idx.tolist():
            assert len(set(row)) == topk and all(0 <= e < experts for e in row), row
            assert len({e // (experts // groups) for e in row}) <= topk_groups, row


def test_kept_groups_fill_topk_before_dropped_ones(backend):
    """Two kept groups hold only four finite scores for topk = 6: the other two picks are -inf
    experts of the kept groups, never of the dropped groups (-inf too; torch.topk's order among
    such ties once made the oracle pick them)."""
    _, device = backend
    bias = torch.full((16,), float("-inf"), device=device)
    bias[[0, 1, 4, 5]] = 0.0                    # groups 0 and 1 each have two finite scores
    idx, _ = dskernels.grouped_topk(torch.zeros(3, 16, device=device), bias, 4, 2, 6, False, 1.0)
    ref_idx, _ = python_ref.grouped_topk(torch.zeros(3, 16, device=device), bias, 4, 2, 6, False, 1.0)
    for row in idx.tolist() + ref_idx.tolist():
        assert {0, 1, 4, 5} <= set(row) and len(set(row)) == 6 and all(e < 8 for e in row), row


@pytest.mark.parametrize("tile", [pytest.param(tile, marks=_ON_GPU) for tile in ("1,1", "2,4", "16,8")])
def test_triton_tiles(tile, monkeypatch):
    """The Triton kernel's other (tokens per program, warps) choices (benchmarks/bench_moe.py times
    them): the same routes as the oracle."""
    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton here")
    monkeypatch.setenv("DSKERNELS_ROUTER_TILE", tile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for tokens, (experts, groups, topk_groups, topk) in ((5, SHAPES[1]), (19, SHAPES[0])):
        torch.manual_seed(tokens)
        logits, bias = _logits(tokens, experts, device)
        with dskernels.backend("triton"):
            idx, weights = dskernels.grouped_topk(logits, bias, groups, topk_groups, topk, True, 2.5)
        assert_routes_equal(idx, weights, logits, bias, groups, topk_groups, topk, True, 2.5)


def test_triton_tile_knob_is_checked(monkeypatch):
    from dskernels.triton import moe

    monkeypatch.setenv("DSKERNELS_ROUTER_TILE", "3,4")
    with pytest.raises(ValueError, match="DSKERNELS_ROUTER_TILE: expected"):
        moe._tile()


def test_float64(backend):
    """A float64 layer's router: scores in fp32 on every backend (as the reference and HF compute)."""
    _, device = backend
    logits, bias = _logits(9, 64, device, torch.float64)
    idx, weights = dskernels.grouped_topk(logits, bias.double(), 4, 2, 6, True, 2.5)
    assert_routes_equal(idx, weights, logits, bias.double(), 4, 2, 6, True, 2.5)


@pytest.mark.gpu
def test_cuda_backend_refuses():
    if "cuda" not in dskernels.available_backends():
        pytest.skip("the CUDA kernels are not available here")
    logits, bias = _logits(4, 256, "cuda")
    with dskernels.backend("cuda"), pytest.raises(NotImplementedError, match="grouped_topk: no CUDA kernel"):
        dskernels.grouped_topk(logits, bias, 8, 4, 8, True, 2.5)


def test_no_tokens(backend):
    _, device = backend
    idx, weights = dskernels.grouped_topk(torch.empty(0, 256, device=device), torch.zeros(256, device=device),
                                          8, 4, 8, True, 2.5)
    assert idx.shape == weights.shape == (0, 8)


@pytest.mark.parametrize("args,error,match", [
    ((torch.zeros(2, 16, dtype=torch.int32), torch.zeros(16), 4, 2, 4), TypeError, "logits: expected dtype"),
    ((torch.zeros(16), torch.zeros(16), 4, 2, 4), ValueError, "logits: expected 2 dimensions"),
    ((torch.zeros(2, 16), torch.zeros(15), 4, 2, 4), ValueError, r"bias: expected shape \(16,\)"),
    ((torch.zeros(2, 16), torch.zeros(16), 5, 2, 4), ValueError, "num_groups: expected a divisor of the 16"),
    ((torch.zeros(2, 16), torch.zeros(16), 16, 2, 2), ValueError, "leaving at least two per group"),
    ((torch.zeros(2, 16), torch.zeros(16), 4, 5, 4), ValueError, r"topk_groups: expected 1..4"),
    ((torch.zeros(2, 16), torch.zeros(16), 4, 2, 9), ValueError, r"topk: expected 1..8"),
    ((torch.zeros(2, 64), torch.zeros(64), 1, 1, 17), ValueError, r"topk: expected 1..16"),
    ((torch.zeros(2, 16), torch.zeros(16), 4.0, 2, 4), TypeError, "num_groups: expected an int"),
    ((torch.zeros(2, 16), torch.zeros(16), 4, 2, 4, True, "2.5"), TypeError, "scaling_factor: expected a number"),
])
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        dskernels.grouped_topk(*args)


def test_numpy_scalars(backend):
    """num_groups, topk_groups, topk and renormalize from numpy (a config read through it), as the
    DeepSeek bindings take them (a TypeError before)."""
    _, device = backend
    gen = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(5, 16, generator=gen).to(device), torch.randn(16, generator=gen).to(device)
    got = dskernels.grouped_topk(logits, bias, numpy.int64(4), numpy.int32(2), numpy.int64(4), numpy.bool_(True))
    want = dskernels.grouped_topk(logits, bias, 4, 2, 4, True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_opcheck_and_compile(backend):
    _, device = backend
    logits, bias = _logits(5, 64, device)
    logits = logits.contiguous()
    torch.library.opcheck(torch.ops.dskernels.grouped_topk, (logits, bias, 4, 2, 6, True, 2.5))

    def route(x):
        return dskernels.grouped_topk(x, bias, 4, 2, 6, True, 2.5)

    idx, weights = torch.compile(route, fullgraph=True, backend="aot_eager")(logits)
    eager_idx, eager_weights = route(logits)
    assert torch.equal(idx, eager_idx) and torch.equal(weights, eager_weights)


@pytest.mark.gpu
def test_cuda_graph_replay():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    logits, bias = _logits(64, 256, "cuda")
    logits = logits.contiguous()
    idx, weights = dskernels.grouped_topk(logits, bias, 8, 4, 8, True, 2.5)  # warm (compile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_idx, g_weights = dskernels.grouped_topk(logits, bias, 8, 4, 8, True, 2.5)
    logits.copy_(torch.randn_like(logits) * 2)
    graph.replay()
    assert_routes_equal(g_idx, g_weights, logits, bias, 8, 4, 8, True, 2.5)


def test_op_schema_has_the_functions_defaults():
    """torch.ops.dskernels.grouped_topk takes the Python function's defaults (renormalize=True,
    scaling_factor=1.0), as do the other ops whose functions have them (fp8_gemm_nt's and
    fp8_bmm_nt's accumulate, k_grouped_bf16_gemm_tn_contiguous's ks_tensor and accumulate)."""
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(5, 16, generator=g), torch.randn(16, generator=g)
    for got, want in zip(torch.ops.dskernels.grouped_topk(logits, bias, 4, 2, 3),
                         dskernels.grouped_topk(logits, bias, 4, 2, 3)):
        assert torch.equal(got, want)
    schemas = {name: str(getattr(torch.ops.dskernels, name).default._schema)
               for name in ("fp8_gemm_nt", "fp8_bmm_nt", "k_grouped_bf16_gemm_tn_contiguous")}
    assert all("bool accumulate=False" in s for s in schemas.values()), schemas
    assert "Tensor? ks_tensor=None" in schemas["k_grouped_bf16_gemm_tn_contiguous"]
    a, b = torch.randn(10, 8, generator=g).bfloat16(), torch.randn(10, 6, generator=g).bfloat16()
    out = torch.full((2, 8, 6), float("nan"))
    torch.ops.dskernels.k_grouped_bf16_gemm_tn_contiguous(a, b, out, [4, 6])
    torch.testing.assert_close(out[1], a[4:].double().T.mm(b[4:].double()).float(), rtol=1e-5, atol=1e-5)
