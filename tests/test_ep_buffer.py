"""dskernels.ep.Buffer across spawned gloo ranks (2 and 4) against python_ref.ep.dispatch_oracle.

Spawning is the slow part on a small CI machine, so each spawned run checks many things: every rank
draws every rank's inputs from one seed, so each can compute its own oracle locally.
"""

import contextlib
import time

import numpy
import pytest
import torch
import torch.distributed as dist

import dskernels
from dskernels.ep import Buffer, EPCommError, EventOverlap
from dskernels.testing import HostSyncError, no_host_sync, run_distributed
from python_ref import ep as ref_ep

HIDDEN = 256


@contextlib.contextmanager
def sync_free(buf):
    """no_host_sync() over the path a GPU runs: without check_exchanges (a host read per exchange),
    which gloo groups have by default and NCCL ones do not. (Set on every rank alike: the ranks
    must agree on it.)"""
    saved, buf.check_exchanges = buf.check_exchanges, False
    try:
        with no_host_sync():
            yield
    finally:
        buf.check_exchanges = saved


def _inputs(world, num_tokens, num_topk, num_experts, seed, *, avoid_last_rank=False):
    """Every rank's (x bf16, topk_idx, topk_weights): distinct experts per token, some -1 entries,
    one token per rank with no expert at all; rank s has num_tokens + s tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    usable = num_experts - (num_experts // world if avoid_last_rank else 0)
    for s in range(world):
        t = num_tokens + s
        x = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
        topk = torch.rand(t, usable, generator=g).topk(min(num_topk, usable), dim=1).indices
        topk[torch.rand(topk.shape, generator=g) < 0.25] = -1
        topk[t // 3] = -1  # a token that goes nowhere
        w = torch.rand(topk.shape, generator=g)
        out.append((x, topk, w))
    return out


def _same(a, b, what):
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b), f"{what}: {(a != b).sum().item()} values differ"


def _raises(error, words, fn):
    try:
        fn()
    except error as e:
        for w in words:
            assert w in str(e), f"{w!r} not in {e}"
        return
    raise AssertionError(f"expected {error} with {words}")


def _check_dispatch_combine(buf, rank, world, num_experts, seed, avoid_last_rank=False, device="cpu"):
    num_local = num_experts // world
    data = _inputs(world, 13, 4, num_experts, seed, avoid_last_rank=avoid_last_rank)
    x_c, topk_c, w_c = data[rank]  # CPU copies for the expectations
    x, topk, w = (t.to(device) for t in data[rank])
    xs, topks, ws = [d[0] for d in data], [d[1] for d in data], [d[2] for d in data]

    # Layout against the oracle.
    per_rank, rdma, per_expert, in_rank, event = buf.get_dispatch_layout(topk, num_experts)
    assert rdma is None and isinstance(event, EventOverlap)
    for got, want in zip((per_rank, per_expert, in_rank), ref_ep.get_dispatch_layout(topk_c, num_experts, world)):
        _same(got, want, "layout")

    # Dispatch with the layout given, expert_alignment 4.
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk, topk_weights=w, expert_alignment=4)
    event.current_stream_wait()
    want_x, want_idx, want_w, want_counts = ref_ep.dispatch_oracle(xs, topks, ws, num_experts, rank, 4)
    _same(recv_x, want_x, "recv_x")
    _same(recv_idx, want_idx, "recv_topk_idx")
    _same(recv_w, want_w, "recv_topk_weights")
    assert counts == want_counts and all(c % 4 == 0 for c in counts) and len(counts) == num_local
    assert torch.all(recv_idx.ge(-1) & recv_idx.lt(num_local))
    assert torch.all(recv_w[recv_idx < 0] == 0)
    if avoid_last_rank and rank == world - 1:
        assert recv_x.shape == (0, HIDDEN) and counts == [0] * num_local

    # The same with only num_experts (layout computed inside), and without weights.
    recv_x2, recv_idx2, recv_w2, counts2, _, _ = buf.dispatch(x, topk_idx=topk, num_experts=num_experts)
    _same(recv_x2, want_x, "recv_x (num_experts only)")
    _same(recv_idx2, want_idx, "recv_topk_idx (num_experts only)")
    assert recv_w2 is None and counts2 == ref_ep.dispatch_oracle(xs, topks, ws, num_experts, rank)[3]

    # Combine: each token comes back once per rank it went to; weights come back whole.
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    hits = in_rank.cpu().sum(1, dtype=torch.float32)[:, None]
    _same(combined, (x_c.float() * hits).to(torch.bfloat16), "combine(dispatch(x))")
    _same(combined_w, torch.where(topk_c >= 0, w_c, 0.0), "combined topk_weights")

    # Cached dispatch: same routing, new payload.
    x_new = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + rank)).to(torch.bfloat16).to(device)
    xs_new = [torch.randn(d[0].shape, generator=torch.Generator().manual_seed(seed + s)).to(torch.bfloat16)
              for s, d in enumerate(data)]
    cached = buf.dispatch(x_new, handle=handle)
    _same(cached[0], ref_ep.dispatch_oracle(xs_new, topks, ws, num_experts, rank)[0], "cached recv_x")
    assert cached[1] is None and cached[2] is None and cached[3] is None

    # Without top-k (DeepEP's intranode test does both): the layout alone routes the tokens; no ids
    # or weights come back, the per-expert counts still do, and combine sums each token's copies.
    config = dskernels.ep.Config(Buffer.num_sms, 8, 256)  # DeepEP's test builds one; nothing to tune here
    assert config.get_nvl_buffer_size_hint(HIDDEN * 2, world) > 0 and config.get_rdma_buffer_size_hint(HIDDEN * 2, world) == 0
    recv_x4, recv_idx4, recv_w4, counts4, handle4, event4 = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        config=config, async_finish=False)
    _same(recv_x4, want_x, "recv_x (no top-k)")
    assert recv_idx4 is None and recv_w4 is None and isinstance(event4, EventOverlap)
    assert counts4 == ref_ep.dispatch_oracle(xs, topks, ws, num_experts, rank)[3]
    combined4, combined_w4, _ = buf.combine(recv_x4, handle4, config=Buffer.get_combine_config(world))
    _same(combined4, (x_c.float() * hits).to(torch.bfloat16), "combine(dispatch(x)) without top-k")
    assert combined_w4 is None
    _raises(ValueError, ["topk_idx:", "num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert"],
            lambda: buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert))
    _raises(TypeError, ["config:", "a Config (dskernels.ep's or deep_ep's)", "dict"],
            lambda: buf.dispatch(x, topk_idx=topk, num_experts=num_experts, config={}))
    _raises(ValueError, ["topk_weights:", "without topk_idx"],
            lambda: buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                 num_tokens_per_expert=per_expert, topk_weights=w))

    # FP8 payload: bytes and scales arrive unchanged (random bytes, NaN patterns included).
    gen = torch.Generator().manual_seed(seed + 100)
    fp8s = [(torch.randint(0, 256, (d[0].shape[0], HIDDEN), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn),
             torch.rand(d[0].shape[0], HIDDEN // 128, generator=gen)) for d in data]
    fp8_here = tuple(t.to(device) for t in fp8s[rank])
    recv_fp8, recv_idx3, _, counts3, handle3, _ = buf.dispatch(fp8_here, topk_idx=topk, num_experts=num_experts)
    want_fp8 = ref_ep.dispatch_oracle(fp8s, topks, ws, num_experts, rank)[0]
    assert isinstance(recv_fp8, tuple)
    _same(recv_fp8[0], want_fp8[0], "fp8 payload")
    _same(recv_fp8[1], want_fp8[1], "fp8 scales")
    cached_fp8 = buf.dispatch(fp8_here, handle=handle3)[0]
    _same(cached_fp8[0], want_fp8[0], "cached fp8 payload")

    _check_fixed_block(buf, rank, world, num_experts, seed + 50, avoid_last_rank, device)

    # Autograd: d/dx 0.5 |dispatch(x)|^2 = x * hits; d/dy <combine(y), x> = dispatch(x).
    xg = x.float().requires_grad_()
    wg = w.clone().requires_grad_()
    rx, _, rw, _, h, _ = buf.dispatch(xg, topk_idx=topk, topk_weights=wg, num_experts=num_experts)
    (0.5 * rx.pow(2).sum() + rw.sum()).backward()
    torch.testing.assert_close(xg.grad.cpu(), x_c.float() * hits, rtol=0, atol=0)
    _same(wg.grad, (topk_c >= 0).float(), "grad of topk_weights")
    y = rx.detach().clone().requires_grad_()
    out, _, _ = buf.combine(y, h)
    (out * x.float()).sum().backward()
    _same(y.grad, rx.detach(), "grad of combine")

    # Low latency, bf16: the per-expert layout, then a weighted combine with identity experts.
    max_tokens = 16
    # The low-latency calls run under no_host_sync: not one host read of a device value.
    with sync_free(buf):
        ll_x, ll_count, ll_handle, ll_event, hook = buf.low_latency_dispatch(x, topk, max_tokens, num_experts,
                                                                             use_fp8=False)
    hook()
    cap = max_tokens * world
    assert ll_x.shape == (num_local, cap, HIDDEN) and ll_count.dtype == torch.int32
    for local in range(num_local):
        e = rank * num_local + local
        want_rows = torch.cat([xs[s][(topks[s] == e).any(1)] for s in range(world)])
        assert ll_count[local].item() == want_rows.shape[0]
        _same(ll_x[local, : want_rows.shape[0]], want_rows, f"low-latency rows of expert {e}")
    with sync_free(buf):
        ll_out, _, _ = buf.low_latency_combine(ll_x, topk, w, ll_handle)
    want_ll = x_c.float() * torch.where(topk_c >= 0, w_c, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(ll_out.float().cpu(), want_ll, rtol=1e-2, atol=1e-2)
    assert torch.all(ll_out[(topk < 0).all(1)] == 0)

    # Low latency with the FP8 cast fused into the send: the bytes of per_token_cast_to_fp8, with
    # plain and with power-of-two scales (DeepEP's round_scale).
    for round_scale in (True, False):  # the plain one's outputs feed the combine below
        with sync_free(buf):
            (f8, sc), f8_count, f8_handle, _, _ = buf.low_latency_dispatch(x, topk, max_tokens, num_experts,
                                                                           use_fp8=True, round_scale=round_scale)
        assert sc.shape == (num_local, cap, HIDDEN // 128)
        casts = [dskernels.per_token_cast_to_fp8(xs[s], round_scale=round_scale) for s in range(world)]
        for local in range(num_local):
            e = rank * num_local + local
            pick = [(topks[s] == e).any(1) for s in range(world)]
            n_e = f8_count[local].item()
            _same(f8[local, :n_e], torch.cat([casts[s][0][pick[s]] for s in range(world)]), "ll fp8")
            _same(sc[local, :n_e], torch.cat([casts[s][1][pick[s]] for s in range(world)]), "ll scales")
    deq = (f8.float() * sc.repeat_interleave(128, dim=2)).to(torch.bfloat16)
    with sync_free(buf):
        ll_out8, _, _ = buf.low_latency_combine(deq, topk, w, f8_handle)
    torch.testing.assert_close(ll_out8.float().cpu(), want_ll, rtol=0.1, atol=0.1)


def _check_fixed_block(buf, rank, world, num_experts, seed, avoid_last_rank=False, device="cpu"):
    """dispatch/combine with num_worst_tokens (DeepEP's CUDA-graph mode) under no_host_sync: the same
    rows as the oracle, padded (x 0, ids -1, weights 0), an empty per-expert list; combine, cached
    dispatch, FP8 and autograd through the fixed blocks. Every rank has the same T here (the mode
    requires it)."""
    data = [(x[:11], topk[:11], w[:11])
            for x, topk, w in _inputs(world, 11, 4, num_experts, seed, avoid_last_rank=avoid_last_rank)]
    xs, topks, ws = [d[0] for d in data], [d[1] for d in data], [d[2] for d in data]
    x_c, topk_c, w_c = data[rank]
    x, topk, w = (t.to(device) for t in data[rank])
    want_x, want_idx, want_w, _ = ref_ep.dispatch_oracle(xs, topks, ws, num_experts, rank)
    n = want_x.shape[0]
    worst = 11 * world + 3  # more than any rank can receive
    with sync_free(buf):
        px, pidx, pw, counts, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=num_experts,
                                                       num_worst_tokens=worst)
        combined, combined_w, _ = buf.combine(px, handle, topk_weights=pw)
    assert counts == [] and px.shape == (worst, HIDDEN) and pidx.shape == pw.shape == (worst, 4)
    _same(px[:n], want_x, "fixed-block recv_x")
    _same(pidx[:n], want_idx, "fixed-block recv_topk_idx")
    _same(pw[:n], want_w, "fixed-block recv_topk_weights")
    assert torch.all(px[n:] == 0) and torch.all(pidx[n:] == -1) and torch.all(pw[n:] == 0)
    hits = torch.stack([(topk_c >= 0) & (topk_c // (num_experts // world) == r) for r in range(world)], 2).any(1)
    _same(combined, (x_c.float() * hits.sum(1, dtype=torch.float32)[:, None]).to(torch.bfloat16),
          "fixed-block combine(dispatch(x))")
    _same(combined_w, torch.where(topk_c >= 0, w_c, 0.0), "fixed-block combined topk_weights")

    # Cached dispatch and an FP8 payload through the same fixed blocks.
    gen = torch.Generator().manual_seed(seed + 1)
    fp8s = [(torch.randint(0, 256, (11, HIDDEN), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn),
             torch.rand(11, HIDDEN // 128, generator=gen)) for _ in range(world)]
    fp8_here = tuple(t.to(device) for t in fp8s[rank])
    with sync_free(buf):
        cached = buf.dispatch(fp8_here, handle=handle)[0]
    want_fp8 = ref_ep.dispatch_oracle(fp8s, topks, ws, num_experts, rank)[0]
    _same(cached[0][:n], want_fp8[0], "fixed-block cached fp8 payload")
    _same(cached[1][:n], want_fp8[1], "fixed-block cached fp8 scales")
    assert torch.all(cached[0][n:].view(torch.uint8) == 0) and torch.all(cached[1][n:] == 0)

    # Autograd: d/dx 0.5 |dispatch(x)|^2 = x * hits; d/dy <combine(y), x> = dispatch(x).
    xg = x.float().requires_grad_()
    rx, _, _, _, h, _ = buf.dispatch(xg, topk_idx=topk, num_experts=num_experts, num_worst_tokens=worst)
    (0.5 * rx.pow(2).sum()).backward()
    torch.testing.assert_close(xg.grad.cpu(), x_c.float() * hits.sum(1, dtype=torch.float32)[:, None], rtol=0, atol=0)
    y = rx.detach().clone().requires_grad_()
    out, _, _ = buf.combine(y, h)
    (out * x.float()).sum().backward()
    _same(y.grad, rx.detach(), "fixed-block grad of combine")

    # Every rank must send the same T; too small a num_worst_tokens is caught (on every rank here).
    # (On CPU a different T raises on every rank at once, after the count exchange; too small a
    # num_worst_tokens on the ranks that receive more, after the payload exchange, so the others
    # complete theirs: tests/test_ep_validation.py's review cases. The group stays usable.)
    if device == "cpu" and world > 1:
        _raises(RuntimeError, ["num_worst_tokens:", "the number of tokens", f"rank {rank} has", f"tokens {11 + rank}"],
                lambda: buf.dispatch(x_c.repeat(2, 1)[: 11 + rank], topk_idx=topk_c.repeat(2, 1)[: 11 + rank],
                                     num_experts=num_experts, num_worst_tokens=worst))
    received = [ref_ep.dispatch_oracle(xs, topks, ws, num_experts, r)[0].shape[0] for r in range(world)]
    if device == "cpu" and min(received) > 1:
        _raises(RuntimeError, ["num_worst_tokens:", "expected at least", "got 1"],
                lambda: buf.dispatch(x_c, topk_idx=topk_c, num_experts=num_experts, num_worst_tokens=1))


def _weighted_sum(x, topk, w, num_local, world):
    """The low-latency combine of identity experts: on each rank r, the fp32 sum over k in order of
    the terms of r's experts (the partial r returns); the partials added in rank order; rounded once."""
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for r in range(world):
        partial = torch.zeros(x.shape, dtype=torch.float32)
        for k in range(topk.shape[1]):
            mine = (topk[:, k: k + 1] >= 0) & (topk[:, k: k + 1] // num_local == r)
            partial += torch.where(mine, x.float() * w[:, k: k + 1], 0.0)
        acc += partial
    return acc.to(x.dtype)


def _check_low_latency_sync_free(buf, rank, world, num_experts, seed):
    """Low latency under no_host_sync (which is shown to catch the normal dispatch's host reads),
    with a token naming one expert twice, T different per rank and M > T (empty rows in each block)."""
    num_local = num_experts // world
    data = _inputs(world, 5, 3, num_experts, seed)
    for s, (_, topk, _) in enumerate(data):
        topk[2, 1] = topk[2, 0] = s % num_experts  # token 2 names one expert twice
    x, topk, w = data[rank]
    max_tokens = 9  # > T on every rank: rows past T in each block carry no token
    with sync_free(buf):
        _raises(HostSyncError, ["no_host_sync"], lambda: buf.dispatch(x, topk_idx=topk, num_experts=num_experts))
        ll_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk, max_tokens, num_experts, use_fp8=False)
        stats = torch.zeros(num_local, dtype=torch.int32)
        _, count8, handle8, _, _ = buf.low_latency_dispatch(x, topk, max_tokens, num_experts, use_fp8=True,
                                                            cumulative_local_expert_recv_stats=stats)
        out, _, _ = buf.low_latency_combine(ll_x, topk, w, handle)
        fresh = torch.empty_like(out)
        out2, _, _ = buf.low_latency_combine(ll_x, topk, w, handle8, out=fresh)
        # DeepEP's zero-copy spelling: the outputs written into the buffer the Buffer hands out.
        staged = buf.get_next_low_latency_combine_buffer(handle)
        staged.copy_(ll_x)
        out3, _, _ = buf.low_latency_combine(staged, topk, w, handle, zero_copy=True)
        # DeepEP's current signature: the wait statistics (6th positional, and combine's keyword)
        # are taken and left as they are; UE8M0 scales: the exponent bytes of the power-of-two
        # scales, four to an int32.
        waits = torch.full((world,), 7, dtype=torch.int64)
        wide = torch.randn(x.shape[0], 512, generator=torch.Generator().manual_seed(seed + rank)).to(torch.bfloat16)
        (f8r, scales), count_r, _, _, _ = buf.low_latency_dispatch(wide, topk, max_tokens, num_experts, None, waits,
                                                                   use_fp8=True, round_scale=True)
        (f8u, packed), count_u, _, _, _ = buf.low_latency_dispatch(wide, topk, max_tokens, num_experts, None, waits,
                                                                   True, True, True)
        buf.low_latency_combine(ll_x, topk, w, handle, combine_wait_recv_cost_stats=waits)
        # An entry set to -1 at the combine is left out, as DeepEP skips it
        masked = topk.clone()
        masked[:, -1] = -1
        out4, _, _ = buf.low_latency_combine(ll_x, masked, w, handle)
    assert torch.equal(waits, torch.full((world,), 7, dtype=torch.int64))
    assert packed.dtype == torch.int32 and packed.shape == (num_local, max_tokens * world, 1)
    for local in range(num_local):
        rows = count_u[local].item()
        assert rows == count_r[local].item()
        _same(f8u[local, :rows], f8r[local, :rows], "fp8 rows with use_ue8m0")
        exponents = packed[local, :rows].view(torch.uint8).reshape(rows, 4).long()
        assert torch.equal(torch.pow(2.0, exponents - 127), scales[local, :rows].double())
    for local in range(num_local):
        e = rank * num_local + local
        want = torch.cat([d[0][(d[1] == e).any(1)] for d in data])  # a repeated expert: one row
        assert count[local].item() == want.shape[0] == count8[local].item() == stats[local].item()
        _same(ll_x[local, : want.shape[0]], want, f"low-latency rows of expert {e} (repeated ids)")
    _same(out, _weighted_sum(x, topk, w, num_local, world), "low-latency combine (both weights of a repeated expert)")
    assert out2.data_ptr() == fresh.data_ptr()
    _same(out2, out, "low-latency combine into out=")
    assert staged.shape == ll_x.shape and staged.dtype == torch.bfloat16
    _same(out3, out, "low-latency combine from get_next_low_latency_combine_buffer (zero_copy)")
    _same(out4, _weighted_sum(x, masked, w, num_local, world), "low-latency combine with an entry masked there")


def _check_bad_inputs(buf, world):
    x = torch.randn(5, HIDDEN).to(torch.bfloat16)
    topk = torch.zeros(5, 2, dtype=torch.int64)
    _raises(TypeError, ["topk_idx:", "int64", "int32"],
            lambda: buf.dispatch(x, topk_idx=topk.int(), num_experts=4 * world))
    _raises(ValueError, ["topk_idx:", "2 dimensions", "(10,)"],
            lambda: buf.dispatch(x, topk_idx=topk.reshape(-1), num_experts=4 * world))
    _raises(ValueError, ["num_experts:", f"({world})", str(4 * world + 1)],
            lambda: buf.dispatch(x, topk_idx=topk, num_experts=4 * world + 1))
    _raises(ValueError, ["num_experts:", str(4 * world + 1)], lambda: buf.get_dispatch_layout(topk, 4 * world + 1))
    _raises(ValueError, ["topk_idx:", "5 rows", "4"], lambda: buf.dispatch(x, topk_idx=topk[:4], num_experts=4 * world))
    _raises(ValueError, ["topk_idx:", f"[-1, {4 * world})"],
            lambda: buf.dispatch(x, topk_idx=topk + 4 * world, num_experts=4 * world))
    _raises(ValueError, ["topk_weights:", "(5, 2)", "(5, 3)"],
            lambda: buf.dispatch(x, topk_idx=topk, topk_weights=torch.rand(5, 3), num_experts=4 * world))
    _raises(ValueError, ["x:", "at most", "4"], lambda: buf.low_latency_dispatch(x, topk, 4, 4 * world))
    _raises(ValueError, ["num_max_dispatch_tokens_per_rank:", ">= 1", "got 0"],
            lambda: buf.low_latency_dispatch(x, topk, 0, 4 * world))
    _raises(RuntimeError, ["topk_idx:", f"[-1, {4 * world})"],
            lambda: buf.low_latency_dispatch(x, topk + 4 * world, 8, 4 * world))
    _raises(ValueError, ["num_experts:", str(4 * world + 1)],
            lambda: buf.low_latency_dispatch(x, topk, 8, 4 * world + 1))
    _raises(ValueError, ["x:", "use_fp8", "128", "200"],
            lambda: buf.low_latency_dispatch(torch.randn(5, 200), topk, 8, 4 * world, use_fp8=True))
    _raises(ValueError, ["round_scale:", "use_fp8=True"],
            lambda: buf.low_latency_dispatch(x, topk, 8, 4 * world, use_fp8=False, round_scale=True))
    _raises(ValueError, ["use_ue8m0:", "round_scale=True"],
            lambda: buf.low_latency_dispatch(x, topk, 8, 4 * world, use_ue8m0=True))
    _raises(ValueError, ["x:", "use_ue8m0", "512", str(HIDDEN)],
            lambda: buf.low_latency_dispatch(x, topk, 8, 4 * world, round_scale=True, use_ue8m0=True))
    _raises(ValueError, ["dispatch_wait_recv_cost_stats:", "torch.int64", f"[{world}]", "torch.int32"],
            lambda: buf.low_latency_dispatch(x, topk, 8, 4 * world, None, torch.zeros(world, dtype=torch.int32)))
    _raises(ValueError, ["cumulative_local_expert_recv_stats:", "torch.int32", "[4]", "(3,)"],
            lambda: buf.low_latency_dispatch(x, topk, 8, 4 * world, torch.zeros(3, dtype=torch.int32)))
    _raises(ValueError, ["x:", "use_fp8", "torch.int32"],
            lambda: buf.low_latency_dispatch(torch.ones(5, 128, dtype=torch.int32), topk, 8, 4 * world))
    _raises(TypeError, ["x[1]:", "float32"],
            lambda: buf.dispatch((x.to(torch.float8_e4m3fn), torch.rand(5, 2).half()), topk_idx=topk,
                                 num_experts=4 * world))
    _raises(ValueError, ["x[1]:", "[5, 2]", "of x[0]'s 256", "[5, 5]"],  # HIDDEN / 128 = 2 scales per row
            lambda: buf.dispatch((x.to(torch.float8_e4m3fn), torch.rand(5, 5)), topk_idx=topk, num_experts=4 * world))
    _raises(TypeError, ["num_worst_tokens:", "2.5"],
            lambda: buf.dispatch(x, topk_idx=topk, num_experts=4 * world, num_worst_tokens=2.5))
    # get_dispatch_layout's outputs passed back wrong (each raises before any exchange, on every rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, 4 * world)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    for name, bad, error, words in [
            ("num_tokens_per_rank", torch.cat([per_rank, per_rank]), ValueError, [f"({world},)", f"({2 * world},)"]),
            ("num_tokens_per_rank", per_rank.float(), TypeError, ["int32 or int64", "float32"]),
            ("num_tokens_per_rank", per_rank + 1, ValueError, ["topk_idx sends"]),
            ("num_tokens_per_expert", per_expert[:4 * world - world], ValueError, [f"{4 * world} counts"]),
            ("is_token_in_rank", in_rank[:4], ValueError, [f"(5, {world})", f"(4, {world})"])]:
        _raises(error, [f"{name}:"] + words,
                lambda: buf.dispatch(x, topk_idx=topk, num_experts=4 * world, **dict(layout, **{name: bad})))
    _raises(ValueError, ["num_tokens_per_expert:", f"({world})", str(4 * world - 1)],  # E from its length
            lambda: buf.dispatch(x, topk_idx=topk, **dict(layout, num_tokens_per_expert=per_expert[:-1])))
    # combine's inputs: 1-D weights, a bias of another shape; low_latency_combine into an expanded out
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=torch.rand(5, 2),
                                                   num_experts=4 * world)
    _raises(ValueError, ["topk_weights:", "2 dimensions"], lambda: buf.combine(recv_x, handle, topk_weights=recv_w[:, 0]))
    _raises(ValueError, ["bias:", f"(5, {HIDDEN})", "(5, 1, 2)"],
            lambda: buf.combine(recv_x, handle, bias=torch.zeros(5, 1, 2)))
    ll_x, _, ll_handle, _, _ = buf.low_latency_dispatch(x, topk, 8, 4 * world, use_fp8=False)
    weights = torch.rand(5, 2)
    _raises(ValueError, ["out:", "share memory"],
            lambda: buf.low_latency_combine(ll_x, topk, weights, ll_handle, out=torch.empty(1, HIDDEN).to(x.dtype).expand(5, HIDDEN)))
    want, _, _ = buf.low_latency_combine(ll_x, topk, weights, ll_handle)
    column_major = torch.empty(HIDDEN, 5, dtype=x.dtype).t()  # any strides: rows copied in
    got, _, _ = buf.low_latency_combine(ll_x, topk, weights, ll_handle, out=column_major)
    assert got.data_ptr() == column_major.data_ptr() and torch.equal(got, want)


def _check_edge_routing(buf, rank, world, num_experts):
    """Top-1 routing where every rank but 0 receives nothing ([N, 1] tensors are contiguous with any
    last stride), fixed blocks with no token anywhere, fp64 sums (gradcheck), argument types."""
    # (equal T on every rank: gradcheck calls the ops once per element, all ranks must call alike)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    topk = torch.zeros(x.shape[0], 1, dtype=torch.int64)
    w = torch.rand(x.shape[0], 1, dtype=torch.float32).requires_grad_()
    rx, _, rw, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=num_experts)
    assert rx.shape[0] == (4 * world if rank == 0 else 0)
    out, out_w, _ = buf.combine(rx, handle, topk_weights=rw)
    assert torch.equal(out, x) and torch.equal(out_w, w)  # each token reached one rank: sums are exact
    out_w.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    # fp64 all the way (combine sums in fp64 for fp64 rows): the ops' derivatives, numerically.
    xg = x.clone().requires_grad_()
    torch.autograd.gradcheck(lambda t: buf.combine(buf.dispatch(t, handle=handle)[0], handle)[0], (xg,))

    # Fixed blocks with T = 0 on every rank.
    none = torch.empty(0, 1, dtype=torch.int64)
    px, _, _, _, fixed, _ = buf.dispatch(torch.empty(0, 8).requires_grad_(), topk_idx=none, num_experts=num_experts,
                                         num_worst_tokens=4)
    back, _, _ = buf.combine(px, fixed)
    assert px.shape == (4, 8) and back.shape == (0, 8)
    back.sum().backward()

    # Ints: numpy's are ints (as DeepEP's bindings take them), read as Python's; floats, bools and
    # None are refused by name.
    np_rx, _, _, _, np_handle, _ = buf.dispatch(x, topk_idx=topk, num_experts=numpy.int64(num_experts),
                                                expert_alignment=numpy.int32(1), num_worst_tokens=numpy.int64(0))
    assert torch.equal(np_rx, rx) and np_handle.num_recv_tokens == handle.num_recv_tokens
    layout = buf.get_dispatch_layout(topk, numpy.int16(num_experts))
    assert torch.equal(layout[2], buf.get_dispatch_layout(topk, num_experts)[2])
    _raises(TypeError, ["num_experts:", "expected an int", "float"],
            lambda: buf.dispatch(x, topk_idx=topk, num_experts=float(num_experts)))
    _raises(TypeError, ["num_experts:", "expected an int", "bool"],
            lambda: buf.get_dispatch_layout(topk, True))
    _raises(TypeError, ["expert_alignment:", "expected an int", "NoneType"],
            lambda: buf.dispatch(x, topk_idx=topk, num_experts=num_experts, expert_alignment=None))
    _raises(ValueError, ["expert_alignment:", ">= 1", "got 0"],
            lambda: buf.dispatch(x, topk_idx=topk, num_experts=num_experts, expert_alignment=0))
    _raises(ValueError, ["topk_idx:", "num_topk >= 1", "(5, 0)"],
            lambda: buf.dispatch(torch.ones(5, 8), topk_idx=torch.empty(5, 0, dtype=torch.int64),
                                 num_experts=num_experts))
    with sync_free(buf):
        ll_x, ll_count, ll_handle, _, _ = buf.low_latency_dispatch(x.float(), topk, 8, num_experts, use_fp8=False)
        np_ll, np_count, np_ll_handle, _, _ = buf.low_latency_dispatch(x.float(), topk, numpy.int64(8),
                                                                      numpy.int32(num_experts), use_fp8=False)
    assert torch.equal(np_count, ll_count)
    for expert, count in enumerate(ll_count.tolist()):  # (rows past the count are not written)
        assert torch.equal(np_ll[expert, :count], ll_x[expert, :count])
    assert type(np_ll_handle.num_max_dispatch_tokens_per_rank) is int and type(np_ll_handle.num_experts) is int
    for bad, error, words in ((8.0, TypeError, ["num_max_dispatch_tokens_per_rank:", "float"]),
                              (0, ValueError, ["num_max_dispatch_tokens_per_rank:", ">= 1", "got 0"])):
        _raises(error, words, lambda: buf.low_latency_dispatch(x.float(), topk, bad, num_experts, use_fp8=False))
    _raises(TypeError, ["topk_weights:", "None"], lambda: buf.low_latency_combine(ll_x, topk, None, ll_handle))


def _body(rank, world, seed):
    torch.manual_seed(seed)
    buf = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20)
    assert buf.rank == rank and buf.group_size == world
    num_experts = 8 if world <= 4 else 2 * world
    _check_dispatch_combine(buf, rank, world, num_experts, seed)
    _check_dispatch_combine(buf, rank, world, num_experts, seed + 1, avoid_last_rank=True)  # last rank gets none
    _check_low_latency_sync_free(buf, rank, world, num_experts, seed + 2)
    _check_bad_inputs(buf, world)
    _check_edge_routing(buf, rank, world, num_experts)
    # async_finish/previous_event are accepted on CPU; the event is a no-op.
    _, _, _, _, event = buf.get_dispatch_layout(torch.zeros(3, 1, dtype=torch.int64), num_experts,
                                                previous_event=Buffer.capture(), async_finish=True)
    with event:
        pass
    # Rows whose byte width is not a multiple of 4 travel as bytes (fp16 [T, 3] = 6 bytes a row).
    data = _inputs(world, 5, 2, num_experts, seed + 7)
    odd = [torch.randn(d[0].shape[0], 3, generator=torch.Generator().manual_seed(s)).half() for s, d in enumerate(data)]
    got = buf.dispatch(odd[rank], topk_idx=data[rank][1], num_experts=num_experts)
    _same(got[0], ref_ep.dispatch_oracle(odd, [d[1] for d in data], [d[2] for d in data], num_experts, rank)[0],
          "odd-width rows")
    # A rank with no tokens at all.
    empty = buf.dispatch(torch.empty(0, HIDDEN).to(torch.bfloat16), topk_idx=torch.empty(0, 2, dtype=torch.int64),
                         num_experts=num_experts) if rank == 0 else \
        buf.dispatch(torch.ones(3, HIDDEN).to(torch.bfloat16), topk_idx=torch.zeros(3, 2, dtype=torch.int64),
                     num_experts=num_experts)
    combined, _, _ = buf.combine(empty[0], empty[4])
    if rank == 0:
        assert empty[0].shape[0] == 3 * (world - 1) and combined.shape == (0, HIDDEN)
    else:
        assert empty[0].shape == (0, HIDDEN) and torch.all(combined == 1)
    # The same in low-latency mode: rank 0 sends nothing, every other rank sends 3 tokens to expert 0.
    tokens = 0 if rank == 0 else 3
    ll_topk = torch.tensor([[0, -1]] * tokens, dtype=torch.int64).reshape(tokens, 2)
    with sync_free(buf):
        ll_x, ll_count, ll_handle, _, _ = buf.low_latency_dispatch(torch.ones(tokens, HIDDEN).to(torch.bfloat16),
                                                                   ll_topk, 4, num_experts, use_fp8=False)
        ll_out, _, _ = buf.low_latency_combine(ll_x, ll_topk, torch.full((tokens, 2), 0.5), ll_handle)
    assert ll_count.tolist() == ([3 * (world - 1)] + [0] * (num_experts // world - 1) if rank == 0
                                 else [0] * (num_experts // world))
    assert ll_out.shape == (tokens, HIDDEN) and torch.all(ll_out == 0.5)


def _timeout_body(rank, world):
    import datetime

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=30))
    buf = Buffer(group, timeout_s=1.5)
    # An error raised here before any exchange (splits that do not add up) keeps the backend's words
    # and is not called a timeout. (On a Buffer of its own: torch 2.14's gloo raises it from the call,
    # 2.11's from the pending work, after which the Buffer refuses further calls, as after any
    # failed exchange.)
    _raises(EPCommError, ["dskernels.ep.Buffer.dispatch", f"rank {rank} of 2", "failed in all_to_all",
                          "backend said: Split sizes"],
            lambda: Buffer(group, timeout_s=1.5)._all_to_all(torch.empty(3), torch.empty(2), [1, 1], [1, 1],
                                                             "dispatch"))
    if rank == 0:
        begin = time.monotonic()
        _raises(TimeoutError, ["dskernels.ep.Buffer.dispatch", "rank 0 of 2", "longer than 1.5 s", "peer"],
                lambda: buf.dispatch(torch.ones(2, 128), topk_idx=torch.ones(2, 1, dtype=torch.int64),
                                     num_experts=2))
        assert time.monotonic() - begin < 25  # the first op call imports torch._dynamo: seconds on CI
        # A retry would pair with the abandoned exchange (gloo aborted the process: an auditor's find)
        _raises(RuntimeError, ["dskernels.ep.Buffer.dispatch", "cannot be used any more", "timed out after 1.5 s"],
                lambda: buf.dispatch(torch.ones(2, 128), topk_idx=torch.ones(2, 1, dtype=torch.int64),
                                     num_experts=2))
    dist.barrier()  # rank 1 never joins the dispatch: it waits here for rank 0 to give up
    other = Buffer(group)
    other.destroy()  # DeepEP's explicit release: the Buffer refuses later calls
    _raises(RuntimeError, ["cannot be used any more: destroy() was called"],
            lambda: other.dispatch(torch.ones(2, 128), topk_idx=torch.ones(2, 1, dtype=torch.int64), num_experts=2))


def _body_triton(rank, world, seed):
    with dskernels.backend("triton"):  # the Triton pack/reduce kernels under the interpreter
        buf = Buffer(dist.group.WORLD)
        _check_dispatch_combine(buf, rank, world, 8, seed)
        _check_edge_routing(buf, rank, world, 8)
        _check_bad_inputs(buf, world)  # also low_latency_combine into an out of other strides


def _body_gpu(rank, world, seed):
    torch.cuda.set_device(rank)
    buf = Buffer(dist.group.WORLD)
    _check_dispatch_combine(buf, rank, world, 8, seed, device="cuda")
    # Streams: async_finish runs on the comm stream; previous_event orders it after the caller's work.
    topk = torch.randint(-1, 8, (64, 4), device="cuda")
    x = torch.randn(64, HIDDEN, device="cuda").to(torch.bfloat16)
    _, _, _, _, event = buf.get_dispatch_layout(topk, 8, previous_event=Buffer.capture(), async_finish=True)
    event.current_stream_wait()
    recv_x, _, _, _, handle, event = buf.dispatch(x, topk_idx=topk, num_experts=8, async_finish=True,
                                                  previous_event=Buffer.capture())
    event.current_stream_wait()
    combined, _, event = buf.combine(recv_x, handle, async_finish=True)
    event.current_stream_wait()
    hits = (topk >= 0).any(1, keepdim=True).float()  # one rank: a token goes there or nowhere
    torch.testing.assert_close(combined.float(), x.float() * hits, rtol=0, atol=0)


def _body_gpu_graph(rank, world, seed):
    """Low-latency dispatch + combine, the normal ones with num_worst_tokens and the dispatch layout
    under sync debug mode "error", then captured in a CUDA graph and replayed on new routings: each
    replay must equal an eager run (same kernels, same order)."""
    torch.cuda.set_device(rank)
    buf = Buffer(dist.group.WORLD)
    num_tokens, num_topk, num_experts, max_tokens = 13, 4, 8, 16
    gen = torch.Generator().manual_seed(seed)

    def draw():
        x = torch.randn(num_tokens, HIDDEN, generator=gen).to(torch.bfloat16)
        topk = torch.rand(num_tokens, num_experts, generator=gen).topk(num_topk, dim=1).indices
        topk[torch.rand(topk.shape, generator=gen) < 0.25] = -1
        topk[num_tokens // 3] = -1
        return x.cuda(), topk.cuda(), torch.rand(topk.shape, generator=gen).cuda()

    static = draw()

    def step():
        x, topk, w = static
        (f8, sc), count, handle, _, _ = buf.low_latency_dispatch(x, topk, max_tokens, num_experts, use_fp8=True)
        deq = (f8.float().unflatten(2, (-1, 128)) * sc[..., None]).flatten(2).to(torch.bfloat16)  # identity experts
        out, _, _ = buf.low_latency_combine(deq, topk, w, handle)
        rx, _, rw, _, fixed_handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=num_experts,
                                                     num_worst_tokens=num_tokens * world)
        combined, combined_w, _ = buf.combine(rx, fixed_handle, topk_weights=rw)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, num_experts)  # no host read on CUDA
        return count, deq, out, rx, combined, combined_w, per_rank, per_expert, in_rank

    side = torch.cuda.Stream()  # warm-up (Triton compiles, NCCL communicator) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with sync_free(buf):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread's event queries must not void this thread's capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            captured = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for _ in range(3):
        for buf_t, new in zip(static, draw()):
            buf_t.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        count, deq, out, rx, combined, combined_w, *layout = (t.clone() for t in captured)
        want_count, want_deq, want_out, want_rx, want_combined, want_combined_w, *want_layout = step()
        for got, want in zip(layout, want_layout):
            _same(got, want, "replayed dispatch layout")
        _same(count, want_count, "replayed recv_count")
        for local in range(num_experts):
            n = want_count[local].item()
            _same(deq[local, :n], want_deq[local, :n], "replayed recv rows")
        _same(out, want_out, "replayed combine")
        _same(rx, want_rx, "replayed fixed-block dispatch")
        _same(combined, want_combined, "replayed fixed-block combine")
        _same(combined_w, want_combined_w, "replayed fixed-block combined weights")
        x, topk, w = static
        hit = (topk >= 0).any(1, keepdim=True)  # one rank: a token goes here or nowhere
        _same(combined, torch.where(hit, x, 0), "fixed-block combine(dispatch(x))")
        torch.testing.assert_close(out.float(), _weighted_sum(x.cpu(), topk.cpu(), w.cpu(), num_experts, 1).float().cuda(),
                                   rtol=0.1, atol=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo carries CPU tensors: Triton runs on them only "
                    "under the interpreter (the GPU machine runs test_buffer_nccl_world1 instead)")
def test_buffer_distributed_triton_kernels():
    run_distributed(_body_triton, 2, 99, timeout_s=240)


# The GPU tests: under 100 s each, so that a hang reports itself before scripts/gpu_check.sh kills the
# file (150 s); the plain world-1 run first.
@pytest.mark.gpu
def test_buffer_nccl_world1():
    run_distributed(_body_gpu, 1, 7, backend="nccl", timeout_s=100)


@pytest.mark.gpu
def test_sync_free_calls_cuda_graph():
    run_distributed(_body_gpu_graph, 1, 11, backend="nccl", timeout_s=100)


@pytest.mark.parametrize("world", [2, 4])
def test_buffer_distributed(world):
    run_distributed(_body, world, 1234 + world, timeout_s=240)


def test_buffer_peer_gone_times_out():
    run_distributed(_timeout_body, 2, timeout_s=60)


def test_event_overlap_is_a_noop_on_cpu():
    """EventOverlap and capture() (DeepEP's event API) do nothing on CPU tensors and raise nothing."""
    from dskernels.ep.events import capture

    event = capture(torch.device("cpu"))
    assert isinstance(event, EventOverlap) and event.event is None
    event.current_stream_wait()
    with event as same:
        assert same is event
    if not torch.cuda.is_available():
        assert Buffer.capture().event is None


def test_rdma_buffer_size_hint_past_one_node():
    """Config.get_rdma_buffer_size_hint: 0 on one node (<= 8 ranks); past it, two rings per channel
    (two SMs) and remote node of num_max_rdma_chunked_recv_tokens rows, rounded up to 128 bytes."""
    config = dskernels.ep.Config()  # 20 SMs (10 channels), 256 rows
    hidden_bytes = 7168 * 2         # V3's hidden size in bf16
    assert config.get_rdma_buffer_size_hint(hidden_bytes, 8) == 0
    assert config.get_rdma_buffer_size_hint(hidden_bytes, 16) == 2 * 10 * 2 * 256 * hidden_bytes
    assert config.get_rdma_buffer_size_hint(hidden_bytes, 64) == 2 * 10 * 8 * 256 * hidden_bytes
    small = dskernels.ep.Config(num_sms=2, num_max_rdma_chunked_recv_tokens=3)
    assert small.get_rdma_buffer_size_hint(5, 16) == 128  # 2 * 1 * 2 * 3 * 5 = 60 bytes, rounded up
    assert small.get_rdma_buffer_size_hint(5, 64) == 256  # 240 bytes
