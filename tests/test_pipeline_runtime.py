"""DualPipe / DualPipeV runtimes end to end on gloo (2 and 4 ranks): loss, outputs and every
gradient against the same model run unpipelined, chunk by chunk."""

import copy
import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dskernels.pipeline import DualPipe, DualPipeV, Linear, WeightGradStore
from dskernels.pipeline import schedule, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dskernels.testing import run_distributed

D = 6


class Block(nn.Module):
    """A deferrable Linear (its weight gradient goes through the W actions) and a plain one."""

    def __init__(self):
        super().__init__()
        self.a = Linear(D, D, dtype=torch.float64)
        self.b = nn.Linear(D, D, dtype=torch.float64)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class HookBlock(Block):
    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1,
                                    outputs1, output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:  # autograd's engine itself, as DualPipe's run_backward calls it: tuples only
            assert isinstance(outputs1, tuple) and isinstance(output_grads1, tuple)
            torch.autograd.Variable._execution_engine.run_backward(
                outputs1, output_grads1, keep_graph=False, create_graph=False, allow_unreachable=True,
                accumulate_grad=True)
        return outputs0, loss0


class TupleBlock(Block):
    """Two outputs: the activation and an int64 position tensor passed along (no gradient)."""

    def forward(self, x, pos):
        return super().forward(x) * (1 + 0.01 * pos.unsqueeze(-1)), pos


class InplaceTupleBlock(TupleBlock):
    """Changes the received position tensor in place (a stage updating its mask or positions)."""

    def forward(self, x, pos):
        pos.add_(0)
        return super().forward(x, pos)


class NoneBlock(Block):
    """A second output that is None (an optional side input passed on), sent as absent."""

    def forward(self, x, extra=None):
        assert extra is None
        return super().forward(x), None


def none_criterion(out, extra, label):
    return criterion(out, label)


class ScalarBlock(Block):
    """A second output that is 0-d (a per-chunk statistic): passed on, not joinable by return_outputs."""

    def forward(self, x, stat=None):
        return super().forward(x), x.detach().square().mean()


def tuple_criterion(out, pos, label):
    return ((out - label) ** 2).mean() + 0 * pos.sum()


def criterion(out, label):
    return ((out - label) ** 2).mean()


class RoutedBlock(nn.Module):
    """MoE-like: which of two parameters a chunk uses depends on its data, so the two copies of a
    layer in DualPipe can hold gradients for different parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D, dtype=torch.float64)
        self.p = nn.Parameter(1 + 0.1 * torch.randn(D, dtype=torch.float64))
        self.q = nn.Parameter(1 + 0.1 * torch.randn(D, dtype=torch.float64))

    def forward(self, x):
        return (x + torch.tanh(self.a(x))) * (self.p if x.mean() > 0 else self.q)


def reference(blocks, x, labels, num_chunks):
    """Per-chunk loss and backward through the whole model (grads accumulate in blocks); chunks as
    DualPipe cuts them (Tensor.chunk)."""
    losses, outs = [], []
    for xc, lc in zip(x.chunk(num_chunks), labels.chunk(num_chunks)):
        h = xc
        for m in blocks:
            h = m(h)
        loss = criterion(h, lc)
        loss.backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    return torch.stack(losses), torch.cat(outs)


def assert_grads(local, ref):
    for (name, p), q in zip(local.named_parameters(), ref.parameters()):
        if not p.requires_grad:  # (a frozen one has none)
            assert p.grad is None and q.grad is None, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def check_dualpipev(group_rank, P, num_chunks, block_cls, seed, rank_mapping=None):
    rank = rank_mapping[group_rank] if rank_mapping else group_rank  # pipeline rank (DualPipe's convention)
    torch.manual_seed(seed)
    blocks = [block_cls() for _ in range(2 * P)]
    x = torch.randn(num_chunks * 3, D, dtype=torch.float64)
    labels = torch.randn(num_chunks * 3, D, dtype=torch.float64)
    ref = copy.deepcopy(blocks)
    loss_ref, out_ref = reference(ref, x, labels, num_chunks)
    pipe = DualPipeV((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[2 * P - 1 - rank])),
                     rank_mapping=rank_mapping)
    if rank == 0:
        loss, out = pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=[labels],
                              return_outputs=True)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-14)
    else:
        loss, out = pipe.step(num_chunks=num_chunks)
        assert loss is None and out is None
    assert_grads(pipe.module[0], ref[rank])
    assert_grads(pipe.module[1], ref[2 * P - 1 - rank])
    assert pipe.weight_grad_store.empty()

    # forward only (no_grad): same losses, no gradients touched
    pipe.zero_grad(set_to_none=True)
    with torch.no_grad():
        if rank == 0:
            loss, _ = pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=[labels])
            torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
        else:
            pipe.step(num_chunks=num_chunks)
    assert all(p.grad is None for p in pipe.parameters())


def check_dualpipe(group_rank, P, num_chunks, block_cls, seed, rank_mapping=None):
    rank = rank_mapping[group_rank] if rank_mapping else group_rank
    torch.manual_seed(seed)
    blocks = [block_cls() for _ in range(P)]
    x = torch.randn(num_chunks * 2, D, dtype=torch.float64)
    labels = torch.randn(num_chunks * 2, D, dtype=torch.float64)
    ref = copy.deepcopy(blocks)
    loss_ref, out_ref = reference(ref, x, labels, num_chunks)
    pipe = DualPipe((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[P - 1 - rank])), rank_mapping=rank_mapping)
    x0, x1 = x.tensor_split(2)
    l0, l1 = labels.tensor_split(2)
    o0, o1 = out_ref.tensor_split(2)
    half = num_chunks // 2
    if rank == 0:  # feeds direction 0, ends direction 1 (fed from rank P-1 with the second half)
        loss, out = pipe.step(x0, num_chunks=num_chunks, criterion=criterion, labels=[l1], return_outputs=True)
        torch.testing.assert_close(loss, loss_ref[half:], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out, o1, rtol=1e-12, atol=1e-14)
    elif rank == P - 1:
        loss, out = pipe.step(x1, num_chunks=num_chunks, criterion=criterion, labels=[l0], return_outputs=True)
        torch.testing.assert_close(loss, loss_ref[:half], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out, o0, rtol=1e-12, atol=1e-14)
    else:
        loss, out = pipe.step(num_chunks=num_chunks)
        assert loss is None and out is None
    pipe.sync_mirrored_grads()
    assert_grads(pipe.module[0], ref[rank])
    assert_grads(pipe.module[1], ref[P - 1 - rank])
    assert DualPipe.grad_sync_pairs(P) == [(r, P - 1 - r) for r in range(P // 2)]

    with torch.no_grad():  # forward only: the same losses in both directions
        if rank in (0, P - 1):
            loss, _ = pipe.step(x0 if rank == 0 else x1, num_chunks=num_chunks, criterion=criterion,
                                labels=[l1 if rank == 0 else l0])
            torch.testing.assert_close(loss, loss_ref[half:] if rank == 0 else loss_ref[:half],
                                       rtol=1e-12, atol=1e-14)
        else:
            pipe.step(num_chunks=num_chunks)


def check_tuple_dualpipev(rank, P, num_chunks, seed, block_cls=TupleBlock, steps=1):
    """Multi-tensor messages (an int64 tensor whose gradient is None) and uneven chunks; `steps`
    steps of one runtime (from the second on, each message arrives as one buffer)."""
    torch.manual_seed(seed)
    blocks = [block_cls() for _ in range(2 * P)]
    pipe = DualPipeV((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[2 * P - 1 - rank])))
    rows = num_chunks * 3 - 1  # Tensor.chunk (DualPipe's split): chunks of 3 rows, the last of 2
    for _ in range(steps):
        x = torch.randn(rows, D, dtype=torch.float64)
        pos = torch.randint(0, 5, (rows,))
        labels = torch.randn(rows, D, dtype=torch.float64)
        ref = copy.deepcopy(blocks)
        losses = []
        for xc, pc, lc in zip(x.chunk(num_chunks), pos.chunk(num_chunks), labels.chunk(num_chunks)):
            h = (xc, pc.clone())
            for m in ref:
                h = m(*h)
            loss = tuple_criterion(*h, lc)
            loss.backward()
            losses.append(loss.detach())
        pipe.zero_grad(set_to_none=True)
        if rank == 0:
            loss, out = pipe.step(x, pos, num_chunks=num_chunks, criterion=tuple_criterion, labels=[labels],
                                  return_outputs=True)
            torch.testing.assert_close(loss, torch.stack(losses), rtol=1e-12, atol=1e-14)
            assert isinstance(out, tuple) and torch.equal(out[1], pos)
        else:
            pipe.step(num_chunks=num_chunks)
        assert_grads(pipe.module[0], ref[rank])
        assert_grads(pipe.module[1], ref[2 * P - 1 - rank])


def check_none_messages(rank, P, num_chunks, seed):
    """Stages whose outputs hold a None (the contract allows it): the receiving stage crashed on it
    (a fuzzer's find), whether the hand-over crossed ranks or stayed on one at the turn of the V."""
    torch.manual_seed(seed)
    blocks = [NoneBlock() for _ in range(2 * P)]
    pipe = DualPipeV((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[2 * P - 1 - rank])))
    x, labels = torch.randn(2, 2 * num_chunks, D, dtype=torch.float64)
    ref, losses = copy.deepcopy(blocks), []
    for xc, lc in zip(x.chunk(num_chunks), labels.chunk(num_chunks)):
        h = (xc,)
        for m in ref:
            h = m(*h)
        loss = none_criterion(*h, lc)
        loss.backward()
        losses.append(loss.detach())
    if rank == 0:
        loss, out = pipe.step(x, num_chunks=num_chunks, criterion=none_criterion, labels=[labels],
                              return_outputs=True)
        torch.testing.assert_close(loss, torch.stack(losses), rtol=1e-12, atol=1e-14)
        assert out[1] is None and out[0].shape == x.shape  # a None output stays None
    else:
        pipe.step(num_chunks=num_chunks)
    assert_grads(pipe.module[0], ref[rank])
    assert_grads(pipe.module[1], ref[2 * P - 1 - rank])
    # A 0-d output of the last stage cannot be joined along batch_dim: named (torch.cat's error before)
    pipe = DualPipeV((ScalarBlock(), ScalarBlock()))
    if rank == 0:
        with pytest.raises(ValueError, match="^return_outputs: .* output 1 is a 0-d tensor"):
            pipe.step(x, num_chunks=num_chunks, criterion=none_criterion, labels=[labels], return_outputs=True)
    else:
        pipe.step(num_chunks=num_chunks)


def check_repeated_steps(rank, P, num_chunks, seed, runtime=DualPipeV, block_cls=Block):
    """Later steps reuse the message layouts of the first (one flat message each); a changed
    batch size falls back to a header. Every step must still match the reference."""
    torch.manual_seed(seed)
    dual = runtime is DualPipe
    S = P if dual else 2 * P
    blocks = [block_cls() for _ in range(S)]
    pipe = runtime((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[S - 1 - rank])))
    half = num_chunks // 2
    for rows in (num_chunks * 2, num_chunks * 2, num_chunks * 3 + 2, num_chunks * 3 + 2):
        x = torch.randn(rows, D, dtype=torch.float64)
        labels = torch.randn(rows, D, dtype=torch.float64)
        ref = copy.deepcopy(blocks)
        # rank 0 feeds the first half, rank P-1 the second, each cut into `half` chunks there
        xs, ls = x.tensor_split(2), labels.tensor_split(2)
        if dual:  # (3 * num_chunks + 2 rows: halves of 3P + 1 rows, chunks of 4, the last shorter)
            loss_ref = torch.cat([reference(ref, xs[d], ls[d], half)[0] for d in (0, 1)])
        else:  # (chunks of 4, the last of 2)
            loss_ref, _ = reference(ref, x, labels, num_chunks)
        pipe.zero_grad(set_to_none=True)
        if dual and rank in (0, P - 1):
            mine, theirs = (0, 1) if rank == 0 else (1, 0)
            loss, _ = pipe.step(xs[mine], num_chunks=num_chunks, criterion=criterion, labels=[ls[theirs]])
            torch.testing.assert_close(loss, loss_ref[half:] if rank == 0 else loss_ref[:half],
                                       rtol=1e-12, atol=1e-14)
        elif not dual and rank == 0:
            loss, _ = pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=[labels])
            torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
        else:
            pipe.step(num_chunks=num_chunks)
        if dual:
            pipe.sync_mirrored_grads()
        assert_grads(pipe.module[0], ref[rank])
        assert_grads(pipe.module[1], ref[S - 1 - rank])
    # steps 2 and 4 took the one-message path, step 3 saw the layout change
    assert pipe.fast_messages > 0 and pipe.layout_changes > 0


def _strip_tags(counter):
    """dist.batch_isend_irecv with every tag forced to 0: gloo then matches sends and receives
    between two ranks by issue order alone, as NCCL does, so an order mismatch between the two
    sides shows (a size error, a hang, or wrong data) instead of being hidden by tags."""
    original = dist.batch_isend_irecv

    def batch_isend_irecv(ops):
        for op in ops:
            op.tag = 0
        counter[0] += len(ops)
        return original(ops)

    return batch_isend_irecv


def _body(rank, world_size):
    torch.set_num_threads(1)
    counter = [0]
    dist.batch_isend_irecv = _strip_tags(counter)  # this spawned process only
    _checks(rank, world_size)
    assert counter[0] > 0  # the runtimes' P2P went through the tag-free wrapper


def _checks(rank, world_size):
    set_p2p_tensor_shapes([(1, D)])   # compatibility no-ops
    set_p2p_tensor_dtype(torch.float64)
    P = world_size
    check_dualpipev(rank, P, 2 * P + 3, HookBlock, seed=2)
    assert HookBlock.calls > 0
    check_dualpipe(rank, P, 2 * P, Block, seed=3)
    check_repeated_steps(rank, P, 2 * P, seed=8, runtime=DualPipe, block_cls=HookBlock)
    check_dualpipe_routed(rank, P)
    # The hook only where both modules are of its class (as DualPipe decides).
    assert not DualPipeV((HookBlock(), Block())).overlapped_forward_backward
    assert DualPipeV((HookBlock(), HookBlock())).overlapped_forward_backward
    if P == 4:  # mappings that are not their own inverse: rank_mapping[group rank] = pipeline rank
        check_dualpipev(rank, P, 2 * P, Block, seed=9, rank_mapping=[1, 2, 3, 0])
        check_dualpipe(rank, P, 2 * P, Block, seed=10, rank_mapping=[2, 0, 3, 1])
    if P == 2:  # the other block kind and chunk counts, a rank mapping, the NCCL path; bad chunk counts
        check_dualpipev(rank, P, 2 * P, Block, seed=1, rank_mapping=[1, 0])
        check_dualpipev(rank, P, 2 * P + 1, Block, seed=5)
        check_dualpipe(rank, P, 2 * P + 4, HookBlock, seed=4)
        check_tuple_dualpipev(rank, P, 2 * P + 1, seed=6)
        check_none_messages(rank, P, 2 * P, seed=13)
        # Two steps: from the second on a message arrives as one buffer, whose tensors must not
        # share a version counter (the in-place update of pos would fail x's backward).
        check_tuple_dualpipev(rank, P, 2 * P + 1, seed=11, block_cls=InplaceTupleBlock, steps=2)
        check_repeated_steps(rank, P, 2 * P, seed=7)
        pipe = DualPipeV((Block(), Block()))
        with pytest.raises(ValueError, match="N \\(chunks\\) must be >= 2\\*P"):
            pipe.step(num_chunks=2 * P - 1)
        if rank == 0:  # step is collective: the other rank learns of the rejection and raises too
            with pytest.raises(ValueError, match="criterion: required"):
                pipe.step(torch.zeros(8, D, dtype=torch.float64), num_chunks=4)
        else:
            with pytest.raises(RuntimeError, match=r"pipeline ranks \[0\] rejected their step arguments"):
                pipe.step(num_chunks=4)
        with pytest.raises(ValueError, match="must be even"):
            DualPipe((Block(), Block())).step(num_chunks=2 * P + 1)


def check_dualpipe_routed(rank, P):
    """sync_mirrored_grads when the copies of a layer got gradients for different parameters
    (positive inputs one way use p, negative ones the other way use q), beside a frozen FP8 one
    (its zeros were concatenated with the float grads: an error); labels as a bare tensor."""
    torch.manual_seed(12)
    blocks = [RoutedBlock() for _ in range(P)]
    for block in blocks:  # frozen weights (an inference layer's FP8 ones) are left out of the sync
        block.frozen = torch.nn.Parameter(torch.zeros(1 << 10, dtype=torch.float8_e4m3fn), requires_grad=False)
    x = torch.cat([torch.randn(2 * P, D, dtype=torch.float64) + 5, torch.randn(2 * P, D, dtype=torch.float64) - 5])
    labels = torch.randn(4 * P, D, dtype=torch.float64)
    ref = copy.deepcopy(blocks)
    reference(ref, x, labels, 2 * P)
    pipe = DualPipe((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[P - 1 - rank])))
    x0, x1 = x.tensor_split(2)
    l0, l1 = labels.tensor_split(2)
    if rank == 0:
        pipe.step(x0, num_chunks=2 * P, criterion=criterion, labels=l1)
    elif rank == P - 1:
        pipe.step(x1, num_chunks=2 * P, criterion=criterion, labels=l0)
    else:
        pipe.step(num_chunks=2 * P)
    pipe.sync_mirrored_grads()
    assert_grads(pipe.module[0], ref[rank])
    assert_grads(pipe.module[1], ref[P - 1 - rank])


def test_constructor_signatures():
    """API.md: DualPipe(modules=(m0, m1), batch_dim=0, process_group=None, rank_mapping=None), and
    DualPipeV(...) the same (DualPipe's showed (*args, **kwargs) before)."""
    expected = ["modules", "batch_dim", "process_group", "rank_mapping", "timeout_s"]
    for cls in (DualPipe, DualPipeV):
        parameters = inspect.signature(cls).parameters
        assert list(parameters) == expected, cls
        assert [parameters[name].default for name in expected[1:4]] == [0, None, None], cls


def test_local_pieces():
    """Without a process group: a frozen bias of the deferrable Linear gets no gradient; None
    inputs and a bare label tensor chunk as DualPipe's scatter does; class-level clear()."""
    from dskernels.pipeline.runtime import _scatter
    layer = Linear(D, D, dtype=torch.float64)
    layer.bias.requires_grad_(False)
    layer(torch.randn(3, D, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is None
    x = torch.arange(8.0)
    assert [(c[0].tolist(), c[1]) for c in _scatter((x, None), 2, 0)] == [([0, 1, 2, 3], None), ([4, 5, 6, 7], None)]
    assert [c[0].tolist() for c in _scatter(x, 2, 0)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    WeightGradStore.clear()  # DualPipe's class-level call: no store is active, nothing to clear


@pytest.mark.parametrize("world_size", [2, 4])
def test_runtimes_match_unpipelined(world_size):
    run_distributed(_body, world_size, timeout_s=170)


def _plans(cls, P, N, forward_only=False):
    """Every rank's program (_plan) without a process group."""
    order = schedule.generate(cls._KIND, P, N)
    if forward_only:
        order = [[f"{s}F{m}" for a in acts for s, k, m in schedule.parse_action(a) if k == "F"]
                 for acts in order]
    plans = []
    for rank in range(P):
        pipe = cls.__new__(cls)
        nn.Module.__init__(pipe)
        pipe.num_ranks, pipe.rank = P, rank
        pipe._neighbours = schedule._neighbours(pipe._chains())
        plans.append(pipe._plan(order))
    return pipe, plans


@pytest.mark.parametrize("cls", [DualPipeV, DualPipe])
def test_exchange_plan_pairs_up(cls):
    """The NCCL-safety of the P2P, checked on the plans of all ranks: every exchange a rank posts
    has the mirror exchange on each peer it talks to, at the same boundary, with the same
    messages in the same order (so matching by issue order per pair is right and no batch waits
    for one posted later), and every message arrives before the action that needs it."""
    for P in (2, 4, 6, 8):
        for N in range(2 * P, 4 * P + 3):
            if cls is DualPipe and N % 2:
                continue
            for forward_only in (False, True):
                pipe, plans = _plans(cls, P, N, forward_only)
                exchanges = {}
                for rank, plan in enumerate(plans):
                    boundaries = [e[3] for e in plan if e[0] == "x"]
                    assert boundaries == sorted(set(boundaries))
                    exchanges.update({(rank, e[3]): (e[1], e[2]) for e in plan if e[0] == "x"})
                    arrived = set()
                    for e in plan:
                        if e[0] == "x":
                            arrived |= {k for _, k in e[2]}
                        else:
                            for _, k in pipe._messages(e[1], rank)[1]:
                                arrived.remove(k)  # KeyError: needed before it arrives
                    assert not arrived
                for (rank, t), (sends, recvs) in exchanges.items():
                    for peer in {p for p, _ in sends + recvs}:
                        p_sends, p_recvs = exchanges[(peer, t)]
                        assert [k for d, k in sends if d == peer] == [k for s, k in p_recvs if s == rank]
                        assert [k for s, k in recvs if s == peer] == [k for d, k in p_sends if d == rank]


class DualPipeStyleLinearFn(torch.autograd.Function):
    """Written against DualPipe's class-level WeightGradStore API (its example's LinearFunc)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors

        def grad_weight_fn():
            g = grad_out.t() @ x
            weight.grad = g if weight.grad is None else weight.grad + g

        if WeightGradStore.enabled:
            WeightGradStore.put(grad_weight_fn)
        else:
            grad_weight_fn()
        return grad_out @ weight, None


def test_weight_grad_store_class_level_api():
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert not WeightGradStore.enabled
    # Outside a runtime: DualPipe's process-wide class-level state, driven by the caller
    WeightGradStore.enabled = True
    try:
        assert WeightGradStore.enabled and WeightGradStore.cache == []
        DualPipeStyleLinearFn.apply(x, w).sum().backward()
        assert w.grad is None and len(WeightGradStore.cache) == 1
        WeightGradStore.flush()
        assert WeightGradStore.cache == [] and WeightGradStore.funcs_queue.qsize() == 1
        WeightGradStore.pop()
        torch.testing.assert_close(w.grad, torch.ones(5, 3, dtype=torch.float64).t() @ x.detach())
        with pytest.raises(RuntimeError, match="^WeightGradStore.pop: no deferred weight gradient"):
            WeightGradStore.pop()
        WeightGradStore.put(lambda: None)
        WeightGradStore.clear()
        assert WeightGradStore.cache == [] and WeightGradStore.funcs_queue.empty()
    finally:
        WeightGradStore.enabled = False
    assert not WeightGradStore.enabled
    w.grad = None
    store = WeightGradStore()
    with store.activate():
        assert WeightGradStore.enabled
        DualPipeStyleLinearFn.apply(x, w).sum().backward()
    store.flush()
    assert w.grad is None
    store.pop()
    torch.testing.assert_close(w.grad, torch.ones(5, 3, dtype=torch.float64).t() @ x.detach())
    DualPipeStyleLinearFn.apply(x, w).sum().backward()  # no active store: computed at once
    torch.testing.assert_close(w.grad, 2 * torch.ones(5, 3, dtype=torch.float64).t() @ x.detach())


@pytest.mark.parametrize("deferred", [False, True])
def test_linear_under_autocast_computes_what_nn_linear_does(deferred):
    torch.manual_seed(0)
    ref, lin = nn.Linear(8, 8), Linear(8, 8)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = lin(x), ref(xr)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    out_ref.float().square().sum().backward()
    store = WeightGradStore()
    with store.activate(enabled=deferred):
        out.float().square().sum().backward()
    if deferred:
        store.flush()
        assert lin.weight.grad is None
        store.pop()
    for ours, theirs in ((x.grad, xr.grad), (lin.weight.grad, ref.weight.grad), (lin.bias.grad, ref.bias.grad)):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=2**-7 * theirs.abs().max().item())


def test_linear_gradients_go_through_autograd_where_they_cannot_wait():
    """A computed weight (weight_norm's parametrization) and torch.autograd.grad get their
    gradients from autograd, inside an I action's store too: nothing written to .grad on the side."""
    torch.manual_seed(0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(5, 3, dtype=torch.float64))
    lin = nn.utils.parametrizations.weight_norm(Linear(5, 3, dtype=torch.float64))
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    store = WeightGradStore()
    with store.activate():
        lin(x).square().sum().backward()
    assert store.empty()  # nothing deferred: the weight is not a leaf
    ref(x).square().sum().backward()
    for (name, p), q in zip(lin.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    plain = Linear(5, 3, dtype=torch.float64)
    (grad_w,) = torch.autograd.grad(plain(x).sum(), plain.weight)
    torch.testing.assert_close(grad_w, torch.ones(4, 3, dtype=torch.float64).t() @ x)
    assert plain.weight.grad is None


def test_weight_grad_store_defers_linear():
    torch.manual_seed(0)
    lin = Linear(4, 3, dtype=torch.float64)
    ref = nn.Linear(4, 3, dtype=torch.float64)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    store = WeightGradStore()
    with store.activate():
        lin(x).square().sum().backward()
    store.flush()
    assert lin.weight.grad is None and x.grad is not None  # input grad now, weight grad deferred
    store.pop()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)
    assert store.empty() and WeightGradStore.current() is None
    with pytest.raises(RuntimeError, match="no deferred"):
        store.pop()


def test_run_backward_is_dualpipes():
    """dskernels.pipeline.run_backward (DualPipe's utils.run_backward, for hooks): gradients of
    outputs given their output gradients, accumulated into .grad; tuples or lists; none: nothing."""
    from dskernels.pipeline import run_backward
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    g = torch.randn(2, 3, dtype=torch.float64)
    run_backward((x @ w,), (g,))
    run_backward([x @ w], [g])
    torch.testing.assert_close(w.grad, 2 * x.T @ g)
    run_backward((), ())


def test_weight_grad_store_class_attributes_are_settable():
    from dskernels.pipeline import WeightGradStore

    saved = (WeightGradStore.cache, WeightGradStore.funcs_queue)
    try:
        WeightGradStore.cache = []
        assert WeightGradStore.cache == []
        import queue
        q = queue.Queue()
        WeightGradStore.funcs_queue = q
        assert WeightGradStore.funcs_queue is q
    finally:
        WeightGradStore.cache, WeightGradStore.funcs_queue = saved
