"""dskernels.ep.Buffer's input validation on 2 spawned gloo ranks: arguments the ranks disagree on,
combine inputs that do not fit their handle, layout arguments that contradict topk_idx, and the
smaller local checks. Every case must raise a clear error (never abort the process, hang, or
return garbage), and the group must stay usable after a cross-rank error."""

import math
import os
import time

import numpy
import pytest
import torch
import torch.distributed as dist

from dskernels.ep import Buffer, EPCommError
from dskernels.testing import run_distributed
from python_ref import ep as ref_ep
from test_ep_buffer import _raises

E = 8  # experts: 4 per rank


def _args(rank, *, tokens=5, hidden=128, dtype=torch.bfloat16, topk=2, num_experts=E, weights=True, fp8=False,
          worst=0):
    """dispatch's keyword arguments on `rank`: token t names experts (t + rank + j) % num_experts."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    if fp8:
        x = (x.to(torch.float8_e4m3fn), torch.rand(tokens, -(-hidden // 128), generator=g))
    ids = (torch.arange(tokens)[:, None] + rank + torch.arange(topk)[None, :]) % num_experts
    args = dict(x=x, topk_idx=ids, num_experts=num_experts, num_worst_tokens=worst)
    if weights:
        args["topk_weights"] = torch.rand(tokens, topk, generator=g)
    return args


def _still_usable(buf, rank, world):
    """A matching dispatch + combine after an error: the group is in step, the data right."""
    args = [_args(r) for r in range(world)]
    recv_x, _, _, _, handle, _ = buf.dispatch(**args[rank])
    want = ref_ep.dispatch_oracle([a["x"] for a in args], [a["topk_idx"] for a in args],
                                  [a["topk_weights"] for a in args], E, rank)[0]
    assert torch.equal(recv_x, want)
    combined, _, _ = buf.combine(recv_x, handle)
    assert combined.shape == args[rank]["x"].shape


def _disagree_body(rank, world):
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    first = rank == 0
    # (per-rank arguments, the error on every rank) for normal dispatches the ranks disagree on
    for kwargs, words in [
            (dict(hidden=128 if first else 256), ["x:", "hidden", "128 on rank 0, 256 on rank 1"]),
            (dict(topk=2 if first else 3), ["topk_idx:", "2 on rank 0, 3 on rank 1"]),
            (dict(num_experts=E if first else 2 * E), ["num_experts:", f"{E} on rank 0, {2 * E} on rank 1"]),
            (dict(dtype=torch.bfloat16 if first else torch.float16),  # same row bytes: was silent garbage
             ["x:", "dtype", "torch.bfloat16 on rank 0, torch.float16 on rank 1"]),
            (dict(fp8=not first), ["x:", "a tensor on rank 0, an (fp8, scales) tuple on rank 1"]),
            (dict(weights=first), ["topk_weights:", "a tensor on rank 0, None on rank 1"])]:
        _raises(ValueError, words + ["every rank"], lambda: buf.dispatch(**_args(rank, **kwargs)))
        _still_usable(buf, rank, world)

    # A new num_experts on every rank (the count exchange widens): agreed, so it just works.
    args = [_args(r, num_experts=4 * E) for r in range(world)]
    recv_x, _, _, counts, _, _ = buf.dispatch(**args[rank])
    want_x, _, _, want_counts = ref_ep.dispatch_oracle([a["x"] for a in args], [a["topk_idx"] for a in args],
                                                       [a["topk_weights"] for a in args], 4 * E, rank)
    assert torch.equal(recv_x, want_x) and counts == want_counts
    _still_usable(buf, rank, world)

    # One rank in num_worst_tokens mode, the other not: the normal rank names it on the host, the
    # fixed-block rank on the device (RuntimeError for CPU tensors), before any data moves.
    if first:
        _raises(ValueError, ["num_worst_tokens:", "0 on rank 0, 16 on rank 1"],
                lambda: buf.dispatch(**_args(rank)))
    else:
        _raises(RuntimeError, ["num_worst_tokens:"], lambda: buf.dispatch(**_args(rank, worst=16)))
    _still_usable(buf, rank, world)
    # Both in fixed-block mode, different hidden sizes: each rank names its own on the device.
    _raises(RuntimeError, ["num_worst_tokens:", "hidden size", f"rank {rank} has", f"hidden size {128 * (rank + 1)}"],
            lambda: buf.dispatch(**_args(rank, hidden=128 * (rank + 1), worst=16)))
    _still_usable(buf, rank, world)


def test_dispatch_ranks_disagree_raise_on_every_rank():
    run_distributed(_disagree_body, 2, timeout_s=240)


def _combine_body(rank, world):
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(**_args(rank))
    n, hidden = recv_x.shape
    assert n > 1
    # Exactly the rows dispatch delivered (extra rows used to be ignored).
    _raises(ValueError, ["x:", f"[{n}, H]", f"({n + 1}, {hidden})"],
            lambda: buf.combine(torch.cat([recv_x, recv_x[:1]]), handle))
    # Another hidden size or dtype than the dispatch's, the same on every rank, is DeepEP's to use
    # (fp32 expert outputs of a bf16 dispatch): combined as it is.
    assert buf.combine(recv_x[:, :64], handle)[0].shape == (5, 64)
    assert buf.combine(recv_x.float(), handle)[0].dtype == torch.float32
    _raises(ValueError, ["topk_weights:", f"[{n}, 2]", f"({n}, 1)"],
            lambda: buf.combine(recv_x, handle, topk_weights=recv_w[:, :1]))
    _raises(ValueError, ["topk_weights:", f"[{n}, 2]", f"({n + 1}, 2)"],
            lambda: buf.combine(recv_x, handle, topk_weights=torch.cat([recv_w, recv_w[:1]])))
    # A handle from another dispatch (fewer tokens).
    _, _, _, _, other, _ = buf.dispatch(**_args(rank, tokens=2))
    _raises(ValueError, ["x:", f"({n}, {hidden})"], lambda: buf.combine(recv_x, other))
    # Cached dispatch: another hidden size, the same on every rank, too.
    assert buf.dispatch(_args(rank, hidden=64)["x"], handle=handle)[0].shape == (n, 64)
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    assert combined.shape == (5, hidden) and combined_w.shape == (5, 2)
    recv8, _, _, _, handle8, _ = buf.dispatch(**_args(rank, fp8=True))
    buf.combine(recv_x.new_zeros(recv8[0].shape[0], hidden), handle8)

    # low_latency_combine: the dispatch's hidden size.
    args = _args(rank)
    ll_x, _, ll_handle, _, _ = buf.low_latency_dispatch(args["x"], args["topk_idx"], 8, E, use_fp8=False)
    _raises(ValueError, ["x:", f"{hidden}", "64"],
            lambda: buf.low_latency_combine(ll_x[..., :64], args["topk_idx"], args["topk_weights"], ll_handle))
    out, _, _ = buf.low_latency_combine(ll_x, args["topk_idx"], args["topk_weights"], ll_handle)
    assert out.shape == (5, hidden)


def test_combine_checks_its_input_against_the_handle():
    run_distributed(_combine_body, 2, timeout_s=240)


def _layout_body(rank, world):
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    args = _args(rank, tokens=6)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(args["topk_idx"], E)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    # is_token_in_rank with two tokens' rows swapped: the column sums still match num_tokens_per_rank.
    token_a, token_b = next((a, b) for a in range(6) for b in range(6) if not torch.equal(in_rank[a], in_rank[b]))
    swapped = in_rank.clone()
    swapped[[token_a, token_b]] = in_rank[[token_b, token_a]]
    # num_tokens_per_expert with two different counts swapped: same total.
    e_a, e_b = next((a, b) for a in range(E) for b in range(E) if per_expert[a] != per_expert[b])
    permuted = per_expert.clone()
    permuted[[e_a, e_b]] = per_expert[[e_b, e_a]]
    for worst in (0, 16):  # the normal dispatch (host check) and num_worst_tokens (device check)
        error = ValueError if worst == 0 else RuntimeError
        for name, bad, words in [
                ("is_token_in_rank", swapped, [f"token {min(token_a, token_b)}"] if worst == 0 else []),
                ("num_tokens_per_expert", permuted, [f"expert {min(e_a, e_b)}"] if worst == 0 else []),
                ("num_tokens_per_rank", per_rank.flip(0) + torch.tensor([1, 0], dtype=per_rank.dtype),
                 [str((per_rank.flip(0) + torch.tensor([1, 0])).tolist())] if worst == 0 else [])]:
            given = dict(args, num_worst_tokens=worst, **layout)
            given[name] = bad
            # (the device check, one assert for the three, names them all)
            named = f"{name}:" if worst == 0 else name
            _raises(error, [named, "topk_idx"] + words, lambda: buf.dispatch(**given))
            # Given alone (the others computed), it is checked too.
            alone = dict(args, num_worst_tokens=worst)
            alone[name] = bad
            _raises(error, [named, "topk_idx"], lambda: buf.dispatch(**alone))
    # The right layout passes.
    buf.dispatch(**args, **layout)
    _still_usable(buf, rank, world)


def test_layout_arguments_must_match_topk_idx():
    run_distributed(_layout_body, 2, timeout_s=240)


def _local_body(rank, world):
    for bad, error, words in [("2", TypeError, ["timeout_s:", "str"]), (True, TypeError, ["timeout_s:", "bool"]),
                              (0, ValueError, ["timeout_s:", "positive", "0"]),
                              (-1.5, ValueError, ["timeout_s:", "-1.5"]),
                              (math.nan, ValueError, ["timeout_s:", "nan"])]:
        _raises(error, words, lambda: Buffer(dist.group.WORLD, timeout_s=bad))
    _raises(TypeError, ["group: expected a torch.distributed ProcessGroup", "list"], lambda: Buffer([0, 1]))
    _raises(TypeError, ["num_sms: expected an int", "str"], lambda: Buffer.set_num_sms("lots"))
    _raises(ValueError, ["num_nvl_bytes: expected an int >= 0", "-1"], lambda: Buffer(None, -1))
    _raises(TypeError, ["num_rdma_bytes: expected an int", "float"], lambda: Buffer(None, 0, 1.5))
    # DeepEP's constructor by position (group .. allow_mnnvl, use_fabric, explicitly_destroy, enable_shrink),
    # and its set_num_sms keyword; unknown keywords are said, a communicator instead of a group refused
    assert Buffer(dist.group.WORLD, 0, 0, False, 24, True, False, False, True, False).group_size == world
    Buffer.set_num_sms(new_num_sms=24)
    with pytest.warns(RuntimeWarning, match=r"ignoring keyword arguments it does not know: \['low_latancy_mode'\]"):
        Buffer(dist.group.WORLD, low_latancy_mode=True)
    _raises(ValueError, ["comm: an mpi4py communicator is not supported"], lambda: Buffer(None, comm=object()))
    alone = dist.new_group([0])  # every rank must call new_group; rank 1 gets a placeholder
    if rank == 0:
        assert Buffer(alone).group_size == 1
    else:
        _raises(ValueError, ["group: expected a group this process belongs to", f"global rank {rank}"],
                lambda: Buffer(alone))
    buf = Buffer(dist.group.WORLD, timeout_s=2)  # an int is a number of seconds
    args = _args(rank)
    _raises(ValueError, ["x:", "hidden", "(5, 0)"], lambda: buf.dispatch(**dict(args, x=args["x"][:, :0])))
    _raises(ValueError, ["x[0]:", "hidden", "(5, 0)"],
            lambda: buf.dispatch(**dict(args, x=(args["x"][:, :0].to(torch.float8_e4m3fn), torch.rand(5, 0)))))
    _raises(ValueError, ["x:", "hidden", "(5, 0)"],
            lambda: buf.low_latency_dispatch(args["x"][:, :0], args["topk_idx"], 8, E, use_fp8=False))
    meta = torch.device("meta")
    _raises(ValueError, ["topk_idx:", "cpu", "meta"],
            lambda: buf.dispatch(**dict(args, topk_idx=args["topk_idx"].to(meta))))
    _raises(ValueError, ["topk_weights:", "cpu", "meta"],
            lambda: buf.dispatch(**dict(args, topk_weights=args["topk_weights"].to(meta))))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(args["topk_idx"], E)
    _raises(ValueError, ["is_token_in_rank:", "cpu", "meta"],
            lambda: buf.dispatch(**args, is_token_in_rank=in_rank.to(meta)))
    # Flags: a numpy bool is a bool (as DeepEP's bindings take it), anything else is refused by name
    # before any exchange ("no" was True to the old truthiness test).
    _raises(TypeError, ["async_finish: expected a bool, got str"], lambda: buf.dispatch(**args, async_finish="no"))
    _raises(TypeError, ["allocate_on_comm_stream: expected a bool, got int"],
            lambda: buf.get_dispatch_layout(args["topk_idx"], E, allocate_on_comm_stream=1))
    _raises(TypeError, ["use_fp8: expected a bool, got str"],
            lambda: buf.low_latency_dispatch(args["x"], args["topk_idx"], 8, E, use_fp8="no"))
    recv, _, handle, _, _ = buf.low_latency_dispatch(args["x"], args["topk_idx"], 8, E, use_fp8=numpy.bool_(False),
                                                     async_finish=numpy.bool_(False))
    assert recv.dtype == args["x"].dtype  # (not the FP8 pair)
    _raises(TypeError, ["use_logfmt: expected a bool, got int"],
            lambda: buf.low_latency_combine(recv, args["topk_idx"], args["topk_weights"], handle, use_logfmt=0))
    buf.low_latency_combine(recv, args["topk_idx"], args["topk_weights"], handle, use_logfmt=numpy.bool_(True))
    _still_usable(buf, rank, world)


def test_local_argument_checks():
    run_distributed(_local_body, 2, timeout_s=240)


def _review_body(rank, world):
    """Cases a review found (2026-12-05), each failing before its fix."""
    import time

    import dskernels

    # low_latency_combine: a NaN weight at a -1 entry (a router's softmax over masked logits) is
    # not read, on either backend (the Triton reduce multiplied it in: the token came back NaN).
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    topk = torch.tensor([[0, -1], [0, E - 1]])
    w = torch.tensor([[1.0, float("nan")], [1.0, 2.0]])
    for backend in ("ref", "triton"):
        with dskernels.backend(backend):
            buf = Buffer(dist.group.WORLD, timeout_s=60)
            recv, _, handle, _, _ = buf.low_latency_dispatch(x, topk, 4, E, use_fp8=False)
            out, _, _ = buf.low_latency_combine(recv, topk, w, handle)
            assert out[:, 0].tolist() == [1.0, 3.0], (backend, out[:, 0].tolist())
            # Expert outputs stored H-major (a view whose rows are not unit-stride) combine the same.
            strided = recv.transpose(1, 2).contiguous().transpose(1, 2)
            assert strided.stride(-1) != 1
            assert torch.equal(buf.low_latency_combine(strided, topk, w, handle)[0], out), backend
    buf = Buffer(dist.group.WORLD, timeout_s=60)
    _raises(TypeError, ["x:", "floating", "torch.int32"],
            lambda: buf.low_latency_dispatch(x.to(torch.int32), topk, 4, E, use_fp8=False))

    # Cached dispatch takes no topk or layout arguments, and num_worst_tokens only as its handle had it.
    args = _args(rank)
    recv_x, _, _, _, handle, _ = buf.dispatch(**args)
    layout = buf.get_dispatch_layout(args["topk_idx"], E)
    for name, value in (("topk_idx", args["topk_idx"]), ("topk_weights", args["topk_weights"]),
                        ("num_tokens_per_rank", layout[0]), ("is_token_in_rank", layout[3]),
                        ("num_tokens_per_expert", layout[2])):
        _raises(ValueError, [f"{name}: expected None with a handle"],
                lambda: buf.dispatch(args["x"], handle=handle, **{name: value}))
    _raises(ValueError, ["num_worst_tokens: expected 0", "got 16"],
            lambda: buf.dispatch(args["x"], handle=handle, num_worst_tokens=16))
    assert torch.equal(buf.dispatch(args["x"], handle=handle)[0], recv_x)

    # Fixed blocks: rank 0 receives 8 tokens, more than num_worst_tokens = 4, rank 1 none. Rank 0
    # raises once the payload has moved; rank 1 completes instead of waiting out its timeout.
    buf = Buffer(dist.group.WORLD, timeout_s=20)
    tokens = torch.randn(4, 128).to(torch.bfloat16)
    ids = torch.full((4, 1), rank)  # experts 0 and 1: both on rank 0

    def overflowing():
        return buf.dispatch(tokens, topk_idx=ids, num_experts=E, num_worst_tokens=4)

    start = time.monotonic()
    if rank == 0:
        _raises(RuntimeError, ["num_worst_tokens:", "expected at least", "got 4"], overflowing)
    else:
        assert overflowing()[0].shape == (4, 128)
    assert time.monotonic() - start < 15
    _still_usable(buf, rank, world)


def test_review_cases():
    run_distributed(_review_body, 2, timeout_s=240)


def _fuzzer_body(rank, world):
    """Cases a fuzzer found (2026-12-06), each failing before its fix."""
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    # Fixed blocks without topk_idx: num_tokens_per_rank must count what is_token_in_rank sends
    # (rows of tokens never sent arrived instead). Here only token 0 goes anywhere.
    x = torch.arange(32, dtype=torch.float32).reshape(4, 8) + 100 * rank
    mask = torch.zeros(4, world, dtype=torch.bool)
    mask[0] = True
    per_expert = torch.zeros(2 * world, dtype=torch.int32)
    _raises(RuntimeError, ["num_tokens_per_rank: expected the tokens is_token_in_rank sends"],
            lambda: buf.dispatch(x, num_tokens_per_rank=torch.full((world,), 3, dtype=torch.int32),
                                 is_token_in_rank=mask, num_tokens_per_expert=per_expert, num_worst_tokens=16))
    recv = buf.dispatch(x, num_tokens_per_rank=torch.ones(world, dtype=torch.int32), is_token_in_rank=mask,
                        num_tokens_per_expert=per_expert, num_worst_tokens=16)[0]
    assert recv[:world, 0].tolist() == [100.0 * r for r in range(world)]

    # A fixed-block handle of a dispatch of no tokens takes its own num_worst_tokens again.
    empty, no_ids = torch.empty(0, 8), torch.empty(0, 1, dtype=torch.int64)
    handle = buf.dispatch(empty, topk_idx=no_ids, num_experts=4, num_worst_tokens=4)[4]
    assert buf.dispatch(empty, handle=handle, num_worst_tokens=4)[0].shape == (4, 8)

    # One element of stride 0 (an expanded scalar; autograd's gradient of a sum) as the payload,
    # forward and backward: torch calls it contiguous, and viewing its bytes failed.
    ids = torch.full((1, 1), 2 * rank, dtype=torch.int64)  # rank r's token to rank r: recv_x [1, 1]
    assert buf.dispatch(torch.tensor(3.0).expand(1, 1), topk_idx=ids, num_experts=4)[0].tolist() == [[3.0]]
    leaf = torch.ones(1, 1, requires_grad=True)
    buf.dispatch(leaf, topk_idx=ids, num_experts=4)[0].sum().backward()
    assert leaf.grad.tolist() == [[1.0]]

    # combine's bias: added to the fp32 sum before its one rounding (DeepEP's), in x's dtype
    # whatever the bias's: 1 + 2^-7 plus two quarter ulps rounded once is 1 + 2^-6 (each add
    # rounded to bf16 lost both); an fp32 bias made the result fp32.
    x = torch.full((1, 2), 1 + 2**-7, dtype=torch.bfloat16)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=torch.zeros(1, 1, dtype=torch.int64), num_experts=2)
    quarter = torch.full((1, 2), 2**-9, dtype=torch.bfloat16)
    assert buf.combine(recv_x, handle, bias=(quarter, quarter))[0].tolist() == [[1 + 2**-6] * 2]
    assert buf.combine(recv_x, handle, bias=torch.zeros(1, 2))[0].dtype == torch.bfloat16
    leaf = recv_x.float().requires_grad_()
    out = buf.combine(leaf, handle, bias=(quarter, None))[0]
    out.sum().backward()
    assert out.dtype == torch.float32 and torch.equal(leaf.grad, torch.ones_like(leaf))
    _raises(TypeError, ["bias: expected a float dtype", "torch.int32"],
            lambda: buf.combine(recv_x, handle, bias=torch.zeros(1, 2, dtype=torch.int32)))
    # Only float rows are summed: integer or fp8 ones wrapped or lost their scale.
    _raises(TypeError, ["x: expected a float dtype", "torch.int32"],
            lambda: buf.combine(recv_x.to(torch.int32), handle))
    args = _args(rank)
    ll_x, _, ll_handle, _, _ = buf.low_latency_dispatch(args["x"], args["topk_idx"], 8, E, use_fp8=False)
    _raises(TypeError, ["x: expected a float dtype", "torch.float8_e4m3fn"],
            lambda: buf.low_latency_combine(ll_x.to(torch.float8_e4m3fn), args["topk_idx"], args["topk_weights"],
                                            ll_handle))
    _still_usable(buf, rank, world)


def test_fuzzer_cases():
    run_distributed(_fuzzer_body, 2, timeout_s=240)


def _check_exchanges_body(rank, world):
    """Sizes that no exchange carries: without check_exchanges they abort gloo (or leave a rank with
    partly written rows); with it (a gloo group's default) every rank raises ValueError and the
    group stays usable."""
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    assert buf.check_exchanges and not Buffer(dist.group.WORLD, check_exchanges=False).check_exchanges
    os.environ["DSKERNELS_EP_CHECK"] = "0"  # the environment's word, as a launcher would set it
    assert not Buffer(dist.group.WORLD).check_exchanges
    assert Buffer(dist.group.WORLD, check_exchanges=True).check_exchanges
    os.environ["DSKERNELS_EP_CHECK"] = "on"
    _raises(ValueError, ["DSKERNELS_EP_CHECK: expected 1/0", "'on'"], lambda: Buffer(dist.group.WORLD))
    os.environ["DSKERNELS_EP_CHECK"] = "1"
    assert Buffer(dist.group.WORLD).check_exchanges
    _still_usable(buf, rank, world)  # matching calls: the same results as without the check
    args = _args(rank)
    recv_x, _, _, _, handle, _ = buf.dispatch(**args)
    wide = torch.zeros(recv_x.shape[0], 256 if rank == 1 else 128, dtype=recv_x.dtype)
    _raises(ValueError, ["Buffer.combine: the ranks disagree", "bytes to rank", "combine's hidden size"],
            lambda: buf.combine(wide, handle))
    _still_usable(buf, rank, world)
    x = torch.zeros(args["x"].shape[0], 256 if rank == 0 else 128, dtype=args["x"].dtype)
    _raises(ValueError, ["Buffer.dispatch (cached): the ranks disagree", "a cached dispatch's x"],
            lambda: buf.dispatch((x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], x.shape[1] // 128)),
                                 handle=handle))
    _still_usable(buf, rank, world)
    _raises(ValueError, ["Buffer.low_latency_dispatch: the ranks disagree", "low-latency M"],
            lambda: buf.low_latency_dispatch(args["x"], args["topk_idx"], 8 if rank == 0 else 16, E, use_fp8=False))
    _still_usable(buf, rank, world)
    # mismatches of the same bytes (wrong rows without the check): num_experts, bf16 against fp16
    _raises(ValueError, ["Buffer.low_latency_dispatch: the ranks disagree", "other arguments", "num_experts"],
            lambda: buf.low_latency_dispatch(args["x"], args["topk_idx"], 8, E * (rank + 1), use_fp8=False))
    _still_usable(buf, rank, world)
    y = recv_x.to(torch.float16) if rank == 1 else recv_x
    _raises(ValueError, ["Buffer.combine: the ranks disagree", "other arguments", "dtypes"],
            lambda: buf.combine(y, handle))
    _still_usable(buf, rank, world)
    # different ops: every rank names the odd one out, whichever op it is in itself
    call = (lambda: buf.combine(recv_x, handle)) if rank == 0 else (lambda: buf.dispatch(**args))
    _raises(ValueError, ["the ranks disagree", "rank 1 runs another exchange than rank 0"], call)
    _still_usable(buf, rank, world)
    _raises(TypeError, ["check_exchanges: expected None, True or False"],
            lambda: Buffer(dist.group.WORLD, check_exchanges="yes"))


def test_check_exchanges_catches_sizes_no_exchange_carries():
    run_distributed(_check_exchanges_body, 2, timeout_s=240)


def _one_rank_refuses_body(rank, world):
    """Arguments refused on one rank only (a gloo group checks its exchanges by default): that rank
    raises its own error, the others EPCommError naming it, at once (not after timeout_s), in every
    op, and the group stays usable; without the check the others wait out the timeout."""
    buf = Buffer(dist.group.WORLD, timeout_s=120)
    args = _args(rank)
    recv_x, _, _, _, handle, _ = buf.dispatch(**args)
    ll_x, _, ll_handle, _, _ = buf.low_latency_dispatch(args["x"], args["topk_idx"], 8, E, use_fp8=False)
    bad = rank == world - 1
    calls = {
        "dispatch": (TypeError, ["topk_idx: expected dtype int64"],
                     lambda: buf.dispatch(**dict(args, topk_idx=args["topk_idx"].int() if bad else args["topk_idx"]))),
        "dispatch (cached)": (ValueError, ["topk_idx: expected None with a handle"],
                              lambda: buf.dispatch(args["x"], handle=handle,
                                                   topk_idx=args["topk_idx"] if bad else None)),
        "combine": (ValueError, ["x: expected"], lambda: buf.combine(recv_x[:-1] if bad else recv_x, handle)),
        "low_latency_dispatch": (ValueError, ["x: use_fp8 casts groups of 128 columns"],
                                 lambda: buf.low_latency_dispatch(args["x"][:, :100] if bad else args["x"],
                                                                  args["topk_idx"], 8, E, use_fp8=True)),
        "low_latency_combine": (TypeError, ["topk_weights:"],
                                lambda: buf.low_latency_combine(ll_x, args["topk_idx"],
                                                                None if bad else args["topk_weights"], ll_handle)),
    }
    for op, (error, words, call) in calls.items():
        begin = time.monotonic()
        if bad:
            _raises(error, words, call)
        else:
            _raises(EPCommError, [f"Buffer.{op.split()[0]}", f"rank {world - 1} of {world} refused its arguments",
                                  "the group stays usable"], call)
        assert time.monotonic() - begin < 60, op  # not the 120 s timeout
        _still_usable(buf, rank, world)
    quiet = Buffer(dist.new_group(backend="gloo"), timeout_s=2, check_exchanges=False)  # (left mid-exchange)
    if bad:
        _raises(TypeError, ["topk_idx: expected dtype int64"],
                lambda: quiet.dispatch(**dict(args, topk_idx=args["topk_idx"].int())))
    else:
        _raises(TimeoutError, ["longer than 2 s"], lambda: quiet.dispatch(**args))
    dist.barrier()  # the refusing rank waits here (were it gone, the others would see EPCommError instead)


def test_one_rank_refusing_its_arguments_stops_every_rank():
    for world in (2, 4):
        run_distributed(_one_rank_refuses_body, world, timeout_s=240)


def test_buffer_needs_an_initialized_process_group():
    """No process group in this (pytest) process: the constructor says so before anything else."""
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match=r"^Buffer: torch.distributed is not initialized \(call "
                                           r"init_process_group first\)"):
        Buffer()
    with pytest.raises(RuntimeError, match="^Buffer: torch.distributed is not initialized"):
        Buffer(None, -1)  # (before the argument checks, which need the group)


def _low_latency_combine_checks_body(rank, world):
    """low_latency_combine's local checks: the handle, topk_idx's columns (the dispatch's K), and
    out's dtype / shape / type. Each raises on every rank (before any exchange), and the group
    stays usable."""
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    args = _args(rank)
    topk, weights = args["topk_idx"], args["topk_weights"]  # T = 5, K = 2, H = 128
    recv, _, handle, _, _ = buf.low_latency_dispatch(args["x"], topk, 8, E, use_fp8=False)
    with pytest.raises(TypeError, match="^handle: expected the handle returned by low_latency_dispatch, got tuple"):
        buf.low_latency_combine(recv, topk, weights, (recv, topk))
    with pytest.raises(ValueError, match=r"^topk_idx: expected 2 columns \(those of the dispatch\), got 1"):
        buf.low_latency_combine(recv, topk[:, :1], weights[:, :1], handle)
    for bad, got in ((torch.empty(5, 128), r"torch.float32 \(5, 128\) on cpu"),
                     (torch.empty(4, 128, dtype=torch.bfloat16), r"torch.bfloat16 \(4, 128\) on cpu"),
                     (torch.empty(5, 128, dtype=torch.bfloat16, device="meta"), r"torch.bfloat16 \(5, 128\) on meta"),
                     ([[0.0] * 128] * 5, "list")):
        with pytest.raises(ValueError, match=r"^out: expected a torch.bfloat16 tensor of shape \(5, 128\) on cpu, "
                                             rf"got {got}$"):
            buf.low_latency_combine(recv, topk, weights, handle, out=bad)
    out = torch.empty(5, 128, dtype=torch.bfloat16)
    got, _, _ = buf.low_latency_combine(recv, topk, weights, handle, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, buf.low_latency_combine(recv, topk, weights, handle)[0])
    _still_usable(buf, rank, world)


def test_low_latency_combine_local_checks():
    run_distributed(_low_latency_combine_checks_body, 2, timeout_s=120)
