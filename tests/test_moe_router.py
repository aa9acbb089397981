"""dskernels.grouped_topk (DeepSeek-V3's router after the gate GEMM) on every backend against
python_ref.moe.grouped_topk, which the model's layer tests hold to transformers' router."""

import pytest
import torch

import dskernels
import python_ref

# (experts, groups, topk_groups, topk): V3's 256 / 8 / 4 / 8; fewer and odd group sizes (160 / 8:
# groups of 20, V2's shape); one group (no group limit); the tiny test model's 16 / 4 / 2 / 4.
SHAPES = [(256, 8, 4, 8), (160, 8, 3, 6), (64, 1, 1, 16), (16, 4, 2, 4), (72, 6, 6, 5)]


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
])
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        dskernels.grouped_topk(*args)


def test_opcheck_and_compile():
    logits, bias = _logits(5, 64, "cpu")
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
