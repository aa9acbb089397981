"""ep_get_dispatch_layout and the Buffer's row movers on every backend against python_ref (one process)."""

import pytest
import torch

import dskernels
from dskernels.ops.ep import (_mover_backend, copy_rows, ep_get_dispatch_layout, gather_reduce, low_latency_send,
                              low_latency_slots, pack_rows)
from python_ref import ep as ref_ep
from python_ref.fp8 import per_token_cast_to_fp8
import python_ref


def random_topk(num_tokens, num_topk, num_experts, *, device="cpu", seed=0, none_rate=0.2):
    """Distinct experts per token (as a router gives), some entries -1 and some rows all -1."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    topk = scores.topk(min(num_topk, num_experts), dim=1).indices
    topk[torch.rand(topk.shape, generator=g) < none_rate] = -1
    if num_tokens > 2:
        topk[num_tokens // 2] = -1
    return topk.to(device)


@pytest.mark.parametrize("T,K,E,R", [(1, 1, 1, 1), (61, 8, 256, 8), (123, 6, 48, 4), (7, 3, 12, 3),
                                     (130, 8, 64, 64), (0, 8, 16, 2), (33, 9, 40, 5)])
def test_layout_matches_oracle(backend, T, K, E, R):
    _, device = backend
    topk = random_topk(T, K, E, device=device, seed=T + K)
    got = ep_get_dispatch_layout(topk, E, R)
    want = ref_ep.get_dispatch_layout(topk.cpu(), E, R)
    for name, a, b in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b), name


def test_layout_repeated_expert_counts_every_entry(backend):
    """DeepEP's counts: every (token, k) entry (its test's (topk_idx == e).sum()), while a token goes
    to each rank once."""
    _, device = backend
    topk = torch.tensor([[3, 3, -1, 5], [-1, -1, -1, -1], [0, 7, 3, 7]], device=device)
    per_rank, per_expert, in_rank = ep_get_dispatch_layout(topk, 8, 2)
    assert per_expert.cpu().tolist() == [(topk == e).sum().item() for e in range(8)] == [1, 0, 0, 3, 0, 1, 0, 2]
    assert in_rank.cpu().tolist() == [[True, True], [False, False], [True, True]]
    assert per_rank.cpu().tolist() == [2, 2]


def test_layout_strided_input(backend):
    _, device = backend
    wide = random_topk(40, 16, 32, device=device, seed=3)
    topk = wide[:, ::2]  # not contiguous
    got = ep_get_dispatch_layout(topk, 32, 4)
    for a, b in zip(got, ref_ep.get_dispatch_layout(topk.cpu().contiguous(), 32, 4)):
        assert torch.equal(a.cpu(), b)


def mover_device(backend):
    """The row movers have no CUDA kernel (Triton is their GPU path, tested in the triton case)."""
    name, device = backend
    if name == "cuda":
        pytest.skip("the row movers have no CUDA kernel; a forced cuda backend runs their Triton kernels")
    return device


def test_movers_run_triton_under_a_forced_cuda_backend():
    """A user forcing "cuda" for the public ops still gets working Buffer calls: the movers take
    their Triton kernels on CUDA tensors (and still refuse CPU tensors, as every op does)."""
    with dskernels.backend("cuda"):
        assert _mover_backend("ep_copy_rows", torch.device("cuda")) == "triton"
        with pytest.raises(ValueError, match="ep_copy_rows: the 'cuda' backend needs CUDA tensors"):
            _mover_backend("ep_copy_rows", torch.device("cpu"))


@pytest.mark.parametrize("dtype,cols", [(torch.int32, 37), (torch.uint8, 5), (torch.bfloat16, 300)])
def test_copy_rows_gather_and_scatter(backend, dtype, cols):
    device = mover_device(backend)
    src = torch.randint(0, 100, (11, cols + 3), dtype=torch.int32).to(dtype).to(device)[:, :cols]
    src_idx = torch.tensor([4, 0, 10, 4, 7], device=device)
    dst_idx = torch.tensor([2, 6, 0, 5, 3], device=device)
    dst = torch.full((8, cols), 99, dtype=torch.int32).to(dtype).to(device)
    want = dst.cpu().clone()
    ref_ep.copy_rows(src.cpu(), src_idx.cpu(), want, dst_idx.cpu())
    copy_rows(src, src_idx, dst, dst_idx)
    assert torch.equal(dst.cpu(), want)
    dst2 = torch.zeros(5, cols, dtype=dtype, device=device)
    copy_rows(src, src_idx, dst2, None)
    assert torch.equal(dst2.cpu(), src.cpu()[src_idx.cpu()])


def test_copy_rows_negative_index_skips(backend):
    """-1 in src_idx or dst_idx skips the row (the low-latency path's fixed-size grids): the dst row
    keeps its value, nothing else moves."""
    device = mover_device(backend)
    src = torch.randint(0, 1000, (6, 13), dtype=torch.int32).to(device)
    src_idx = torch.tensor([3, -1, 0, 5, 2, 1], device=device)
    dst_idx = torch.tensor([7, 0, -1, 2, -1, 4], device=device)
    dst = torch.full((8, 13), -99, dtype=torch.int32, device=device)
    want = dst.cpu().clone()
    for s, d in zip(src_idx.tolist(), dst_idx.tolist()):
        if s >= 0 and d >= 0:
            want[d] = src.cpu()[s]
    copy_rows(src, src_idx, dst, dst_idx)
    assert torch.equal(dst.cpu(), want)
    gathered = torch.full((6, 13), -99, dtype=torch.int32, device=device)
    copy_rows(src, src_idx, gathered, None)  # gather only: -1 sources leave their row alone
    want = torch.where(src_idx.cpu()[:, None] >= 0, src.cpu()[src_idx.cpu().clamp(min=0)], -99)
    assert torch.equal(gathered.cpu(), want)
    copy_rows(src[:0], torch.full((4,), -1, device=device), dst, torch.full((4,), -1, device=device))


@pytest.mark.parametrize("rows,topk,num_local,base", [(61, 8, 4, 8), (300, 3, 5, 0), (7, 1, 1, 2)])
def test_low_latency_slots(backend, rows, topk, num_local, base):
    """Each row's position within each local expert (row order), repeats written once, counts: a
    plain loop says what python_ref.ep.low_latency_slots must return; every backend must match."""
    device = mover_device(backend)
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(-1, base + 2 * num_local, (rows, topk + 2), generator=g)[:, 1: topk + 1]  # strided
    ids[rows // 2, :] = -1
    if topk > 1:
        ids[1, 1] = ids[1, 0] = base  # a repeated local expert
    cap = rows
    want_write, want_return = [-1] * (rows * topk), [-1] * (rows * topk)
    count = [0] * num_local
    for n in range(rows):
        seen = set()
        for k in range(topk):
            e = int(ids[n, k]) - base
            if 0 <= e < num_local:
                want_return[n * topk + k] = e * cap + count[e]  # rows before n that name e
                if e not in seen:
                    want_write[n * topk + k] = e * cap + count[e]
                    seen.add(e)
        for e in seen:
            count[e] += 1
    got = low_latency_slots(ids.to(device), base, num_local, cap)
    assert got[0].tolist() == want_write and got[1].tolist() == want_return
    assert got[2].dtype == torch.int32 and got[2].tolist() == count


@pytest.mark.parametrize("num_segments", [1, 2, 4])
def test_pack_rows(backend, num_segments):
    device = mover_device(backend)
    widths = [1800, 56, 16, 8][:num_segments]  # fp8 x (7200 B), scales, topk ids, weights as int32 words
    segments = [torch.randint(-2**31, 2**31 - 1, (13, w + 4), dtype=torch.int32).to(device)[:, :w] for w in widths]
    offsets, at = [], 0
    for w in widths:
        offsets.append(at)
        at += -(-w // 4) * 4
    src_idx = torch.tensor([12, 0, 5, 5, 7, 1, 12], device=device)
    dst = torch.full((9, at), -7, dtype=torch.int32, device=device)  # 2 rows more than packed
    pack_rows(segments, offsets, src_idx, dst, 7)
    want = torch.full((9, at), -7, dtype=torch.int32)
    ref_ep.pack_rows([s.cpu() for s in segments], offsets, src_idx.cpu(), want[:7])
    assert torch.equal(dst.cpu(), want)
    for seg, off in zip(segments, offsets):
        assert torch.equal(dst[:7, off: off + seg.shape[1]].cpu(), seg.cpu()[src_idx.cpu()])


# (y, out) dtypes: the low-latency combine reduces bf16 expert rows into fp32 partials, then those
# into bf16 tokens.
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_reduce(backend, dtype, out_dtype, weighted):
    device = mover_device(backend)
    y = torch.randn(9, 200).to(dtype).to(device)
    y[8] = float("nan")  # never indexed: must not leak
    index = torch.tensor([[0, -1, 3], [2, 7, 1], [-1, -1, -1], [5, 5, 0]], device=device)
    weights = torch.rand(4, 3, device=device) if weighted else None
    out = torch.empty(4, 200, dtype=out_dtype, device=device)
    gather_reduce(y, index, weights, out)
    want = torch.empty(4, 200, dtype=out_dtype)
    ref_ep.gather_reduce(y.cpu(), index.cpu(), None if weights is None else weights.cpu(), want)
    if weighted and device == "cuda":  # the GPU may fuse multiply-add: one rounding fewer
        torch.testing.assert_close(out.cpu(), want)
    else:
        assert torch.equal(out.cpu(), want)
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("bad,error,words", [
    ((torch.zeros(4, 2, dtype=torch.int32), 8, 2), TypeError, ["topk_idx:", "int64", "int32"]),
    ((torch.zeros(4, dtype=torch.int64), 8, 2), ValueError, ["topk_idx:", "2 dimensions", "(4,)"]),
    ((torch.zeros(4, 2, dtype=torch.int64), 9, 2), ValueError, ["num_experts:", "multiple", "2", "9"]),
    ((torch.zeros(4, 2, dtype=torch.int64), 8, 0), ValueError, ["num_ranks:", "0"]),
    ((torch.full((4, 2), 8, dtype=torch.int64), 8, 2), ValueError, ["topk_idx:", "[-1, 8)", "8"]),
])
def test_layout_bad_input_is_named(bad, error, words):
    with pytest.raises(error) as info:
        ep_get_dispatch_layout(*bad)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_layout_opcheck():
    topk = random_topk(29, 4, 16, seed=1)
    torch.library.opcheck(torch.ops.dskernels.ep_get_dispatch_layout, (topk, 16, 4))


def test_layout_torch_compile_fullgraph():
    def routed(topk):
        per_rank, per_expert, in_rank = ep_get_dispatch_layout(topk, 32, 4)
        return per_rank * 2, per_expert, in_rank.sum(1)

    compiled = torch.compile(routed, fullgraph=True, backend="aot_eager")
    topk = random_topk(45, 6, 32, seed=2)
    for a, b in zip(compiled(topk), routed(topk)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_layout_cuda_graph_capture():
    topk = random_topk(512, 8, 256, device="cuda", seed=5)
    ep_get_dispatch_layout(topk, 256, 8)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ep_get_dispatch_layout(topk, 256, 8)
    topk.copy_(random_topk(512, 8, 256, device="cuda", seed=6))
    graph.replay()
    for a, b in zip(out, ref_ep.get_dispatch_layout(topk.cpu(), 256, 8)):
        assert torch.equal(a.cpu(), b)


def _send_offsets(widths):
    """Byte offsets of fields of `widths` bytes, each 16-byte aligned (the Buffer's row layout)."""
    offsets, at = [], 0
    for w in widths:
        offsets.append(at)
        at += -(-w // 16) * 16
    return offsets, max(at, 16)


@pytest.mark.parametrize("use_fp8,dtype,T,M,H,K,E,R", [
    (True, torch.bfloat16, 7, 9, 384, 3, 12, 3),     # rows past T, tokens with no expert
    (True, torch.float32, 5, 5, 1152, 2, 8, 4),      # 9 groups: a partial chunk of groups
    (True, torch.float16, 0, 4, 128, 2, 4, 2),       # no tokens: ids only
    (False, torch.bfloat16, 6, 8, 200, 4, 16, 2),    # bf16 payload, H not a multiple of 128
    (False, torch.float32, 3, 3, 33, 1, 1, 1),       # one rank, one expert
])
def test_low_latency_send(backend, use_fp8, dtype, T, M, H, K, E, R):
    """The low-latency send blocks (python_ref.ep.low_latency_send) on every backend, byte for byte
    over the whole poisoned buffer: what must not be written keeps the poison. Checked against the
    definition too: ids (-1 past T) in every block, the payload (per_token_cast_to_fp8's bytes with
    use_fp8) only in the blocks of ranks that hold one of the token's experts."""
    device = mover_device(backend)
    g = torch.Generator().manual_seed(T * 100 + H)
    x = (torch.randn(T, H, generator=g) * 300).to(dtype)
    if T > 1 and use_fp8:
        x[1, 130] = float("nan")  # one group's scale and values become NaN, the others stay finite
        x[0, :128] = 0            # an all-zero group: the 1e-4 floor
    topk = torch.randint(-1, E, (T, K), generator=g)
    if T > 2:
        topk[2] = -1  # a token that goes nowhere
    widths = ([H, 4 * (H // 128)] if use_fp8 else [H * x.element_size()]) + [8 * K]
    offsets, row_bytes = _send_offsets(widths)
    poison = torch.randint(0, 256, (R, M, row_bytes), generator=g, dtype=torch.uint8)
    send = poison.clone().to(device)
    low_latency_send(x.to(device), topk.to(device), E, use_fp8, send, offsets)
    want = poison.clone()
    ref_ep.low_latency_send(x, topk, E, use_fp8, want, offsets)
    got, expected = send.cpu(), want.clone()
    if use_fp8:  # a NaN scale's bits differ between devices (GPUs give 0x7FFFFFFF): one NaN for both
        for buf in (got, expected):
            scales = buf[..., offsets[1]: offsets[1] + 4 * (H // 128)].view(torch.float32)
            scales.masked_fill_(scales.isnan(), float("nan"))
    assert torch.equal(got, expected)

    payloads = [t.view(torch.uint8).reshape(T, t.shape[1] * t.element_size())
                for t in (per_token_cast_to_fp8(x) if use_fp8 else [x])]
    for r in range(R):
        for t in range(M):
            ids = want[r, t, offsets[-1]: offsets[-1] + 8 * K].view(torch.int64)
            assert ids.tolist() == (topk[t].tolist() if t < T else [-1] * K)
            goes = t < T and any(0 <= e < E and e // (E // R) == r for e in topk[t].tolist())
            for payload, at in zip(payloads, offsets):
                field = want[r, t, at: at + payload.shape[1]]
                assert torch.equal(field, payload[t] if goes else poison[r, t, at: at + payload.shape[1]]), (r, t)


def test_deepep_module_helpers():
    """What DeepEP's tests ask of the module before they dispatch: FP8 support (Buffer.is_sm90_compiled,
    here on every device) and the dtype of topk_idx (deep_ep.topk_idx_t)."""
    from dskernels.ep import Buffer, topk_idx_t
    assert Buffer.is_sm90_compiled() is True
    assert topk_idx_t == torch.int64


def test_triton_dispatch_layout_of_a_column_strided_topk_idx():
    if "triton" not in dskernels.available_backends():
        pytest.skip("needs the Triton backend (TRITON_INTERPRET=1 on CPU)")
    ids = torch.tensor([[0, 5, -1, 3], [7, 7, 2, -1], [-1, -1, -1, -1]], dtype=torch.int64)
    strided = torch.empty(3, 8, dtype=torch.int64)[:, ::2]
    strided.copy_(ids)
    want = python_ref.ep.get_dispatch_layout(ids, 8, 4)
    with dskernels.backend("triton"):
        got = dskernels.ep_get_dispatch_layout(strided, 8, 4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_dispatch_layout_float_counts_are_refused_by_name():
    with pytest.raises((TypeError, RuntimeError), match="num_experts"):
        dskernels.ep_get_dispatch_layout(torch.tensor([[0, 1]]), 2.0, 1)
    with pytest.raises((TypeError, RuntimeError), match="num_ranks"):
        dskernels.ep_get_dispatch_layout(torch.tensor([[0, 1]]), 2, 1.0)


@pytest.mark.parametrize("num_experts, num_ranks, name", [(True, 1, "num_experts"), (2, True, "num_ranks")])
def test_dispatch_layout_refuses_bool_counts(num_experts, num_ranks, name):
    """The op schema takes a bool as an int, so True ran as 1 (num_experts=True gave a layout for one
    expert, or the misleading "topk_idx: expected expert ids in [-1, 1)"): refused by name, as
    get_mla_metadata, grouped_topk and Buffer.get_dispatch_layout refuse them."""
    with pytest.raises(TypeError, match=f"^{name}: expected an int"):
        dskernels.ep_get_dispatch_layout(torch.tensor([[0, 0]]), num_experts, num_ranks)
