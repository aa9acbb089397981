"""DualPipe / DualPipeV on bad input (2 gloo ranks): a clear error naming the argument on every
rank, a bounded wait instead of a hang, and never silently wrong gradients."""

import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dskernels.pipeline import DualPipe, DualPipeV, WeightGradStore
from dskernels.pipeline import runtime
from dskernels.pipeline.runtime import _scatter
from dskernels.testing import run_distributed
from test_pipeline_runtime import D, Block, HookBlock, assert_grads, criterion, reference

P = 2


def rows(n):
    return torch.randn(n, D, dtype=torch.float64)


def v_step(pipe, rank, x, labels, num_chunks, **kw):
    """A DualPipeV step: inputs and labels on rank 0, nothing elsewhere."""
    if rank == 0:
        return pipe.step(x, num_chunks=num_chunks, criterion=criterion, labels=[labels], **kw)
    return pipe.step(num_chunks=num_chunks, **kw)


def expect_on(rank, bad_rank, exc, match, call):
    """`call` raises exc on bad_rank; the other rank learns it was rejected and raises too."""
    if rank == bad_rank:
        with pytest.raises(exc, match=match):
            call()
    else:
        with pytest.raises(RuntimeError, match=rf"pipeline ranks \[{bad_rank}\] rejected their step arguments"):
            call()


# -- 1. the process-wide WeightGradStore does not take a step's weight gradients --

def check_process_wide_store_left_on(rank, runtime, block_cls, seed):
    torch.manual_seed(seed)
    dual = runtime is DualPipe
    S = P if dual else 2 * P
    num_chunks = 2 * P
    blocks = [block_cls() for _ in range(S)]
    x, labels = rows(3 * num_chunks), rows(3 * num_chunks)
    ref = copy.deepcopy(blocks)
    loss_ref, _ = reference(ref, x, labels, num_chunks)  # before enabling: the reference's Linear defers nothing
    pipe = runtime((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[S - 1 - rank])))
    WeightGradStore.enabled = True  # left on by code that drives its own schedule
    try:
        if dual:
            half = num_chunks // 2
            xs, ls = x.tensor_split(2), labels.tensor_split(2)
            loss, _ = pipe.step(xs[rank], num_chunks=num_chunks, criterion=criterion, labels=[ls[1 - rank]])
            torch.testing.assert_close(loss, loss_ref[half:] if rank == 0 else loss_ref[:half],
                                       rtol=1e-12, atol=1e-14)
        else:
            loss, _ = v_step(pipe, rank, x, labels, num_chunks)
            if rank == 0:
                torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
        # the step neither used nor changed the process-wide store
        assert WeightGradStore.enabled
        assert WeightGradStore.cache == [] and WeightGradStore.funcs_queue.empty()
    finally:
        WeightGradStore.enabled = False
    if dual:
        pipe.sync_mirrored_grads()
    assert_grads(pipe.module[0], ref[rank])
    assert_grads(pipe.module[1], ref[S - 1 - rank])


class StrayPut(Block):
    """Puts work into the class-level store without checking WeightGradStore.enabled."""

    def forward(self, x):
        WeightGradStore.put(lambda: None)
        return super().forward(x)


def check_leftover_weight_grad_work_raises(rank):
    # Forward only: no I or W action runs, so the put work can only be left over.
    pipe = DualPipeV((StrayPut(), Block()) if rank == 0 else (Block(), Block()))
    with torch.no_grad():
        if rank == 0:
            with pytest.raises(RuntimeError, match="4 weight-gradient closures put outside an I action .* left in "
                                                   "this runtime's WeightGradStore"):
                v_step(pipe, rank, rows(8), rows(8), 4)
        else:
            v_step(pipe, rank, None, None, 4)  # this rank is unaffected
    assert WeightGradStore.cache == [] and WeightGradStore.funcs_queue.empty()


# -- 2. ranks that disagree on the step's arguments --

def check_disagreement(rank):
    torch.manual_seed(20)
    blocks = [Block() for _ in range(2 * P)]
    pipe = DualPipeV((copy.deepcopy(blocks[rank]), copy.deepcopy(blocks[2 * P - 1 - rank])))
    x, labels = rows(12), rows(12)
    v_step(pipe, rank, x, labels, 4)  # caches the message layouts for 4 chunks
    with pytest.raises(ValueError, match=r"num_chunks: expected the same value on every rank, "
                                         r"got 4 on pipeline ranks \[0\], 6 on pipeline ranks \[1\]"):
        v_step(pipe, rank, x, labels, 4 if rank == 0 else 6)
    with pytest.raises(RuntimeError, match=r"grad mode: expected the same on every rank, got training on "
                                           r"pipeline ranks \[0\], forward only \(torch.no_grad\(\)\) on "
                                           r"pipeline ranks \[1\]"):
        with torch.set_grad_enabled(rank == 0):
            v_step(pipe, rank, x, labels, 4)
    other = DualPipe((Block(), Block())) if rank == 0 else DualPipeV((Block(), Block()))
    with pytest.raises(RuntimeError, match=r"modules: expected the same runtime on every rank, got DualPipe on "
                                           r"pipeline ranks \[0\], DualPipeV on pipeline ranks \[1\]"):
        other.step(*([x] if rank == 0 else []), num_chunks=4, criterion=criterion, labels=[labels])
    # rank_mapping read differently: both processes took pipeline rank 0 and waited out the timeout
    # for a pipeline rank 1 that nothing ran (an auditor's find)
    swapped = DualPipeV((Block(), Block()), rank_mapping=[0, 1] if rank == 0 else [1, 0])
    with pytest.raises(ValueError, match=r"^rank_mapping: expected the same on every rank, got "
                                         + (r"\[0, 1\] on group rank 0, while group rank 1 runs as pipeline rank 0"
                                            if rank == 0 else
                                            r"\[1, 0\] on group rank 1, while group rank 0 runs as pipeline rank 0")):
        swapped.step(*([x] if swapped.rank == 0 else []), num_chunks=4, criterion=criterion, labels=[labels])
    # Nothing ran: the runtime goes on, its layout caches still in step with the peer's.
    pipe.zero_grad(set_to_none=True)
    ref = copy.deepcopy(blocks)
    loss_ref, _ = reference(ref, x, labels, 4)
    loss, _ = v_step(pipe, rank, x, labels, 4)
    if rank == 0:
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    assert_grads(pipe.module[0], ref[rank])
    assert pipe.fast_messages > 0


# -- 5. argument errors that name the argument, raised on every rank --

def check_argument_errors(rank):
    torch.manual_seed(21)
    x, labels = rows(8), rows(8)
    pipe = DualPipeV((Block(), Block()))
    expect_on(rank, 0, ValueError, r"batch_dim: expected a dimension of every tensor of inputs, got 5 for the "
                                   r"2-d tensor at position 0",
              lambda: v_step(DualPipeV((Block(), Block()), batch_dim=5), rank, x, labels, 4))
    expect_on(rank, 0, TypeError, "labels: expected tensors \\(or None\\), got str at position 0",
              lambda: pipe.step(*([x] if rank == 0 else []), num_chunks=4, criterion=criterion, labels=["y"]))
    expect_on(rank, 0, ValueError, "inputs: expected the input tensors on pipeline rank 0",
              lambda: pipe.step(num_chunks=4, criterion=criterion, labels=[labels]))
    expect_on(rank, 0, TypeError, "criterion: expected a callable",
              lambda: pipe.step(*([x] if rank == 0 else []), num_chunks=4, criterion="mse" if rank == 0 else None,
                                labels=[labels]))
    with pytest.raises(TypeError, match="^num_chunks: expected an int, got float"):  # on both ranks
        v_step(pipe, rank, x, labels, 4.0)
    with pytest.raises(TypeError, match="^return_outputs: expected a bool, got str"):  # ("no" was True)
        v_step(pipe, rank, x, labels, 4, return_outputs="no")
    with pytest.raises(ValueError, match=r"^num_chunks: dualpipev: N \(chunks\) must be >= 2\*P = 4"):
        v_step(pipe, rank, x, labels, 3)
    # DualPipe's split (Tensor.chunk): 6 rows in chunks of 2 make 3 micro-batches, not 4
    expect_on(rank, 0, ValueError, r"^inputs: dimension 0 has 6 rows, which DualPipe's split \(Tensor.chunk: pieces "
                                   r"of ceil\(6 / 4\) rows\) makes 3 micro-batches, not num_chunks=4",
              lambda: v_step(pipe, rank, rows(6), rows(6), 4))
    dual = DualPipe((Block(), Block()))
    x0, x1 = x.tensor_split(2)
    l0, l1 = labels.tensor_split(2)
    expect_on(rank, 1, ValueError, "inputs: expected the input tensors of the reverse direction on pipeline rank 1",
              lambda: dual.step(*([x0] if rank == 0 else []), num_chunks=4, criterion=criterion,
                                labels=[l1 if rank == 0 else l0]))
    # Labels with other row counts than the inputs they go with: rejected on every rank before any
    # P2P (chunk i of one would meet chunk i of the other). DualPipeV: both on rank 0; DualPipe:
    # rank 0's labels go with rank 1's inputs; a label tuple whose tensors differ, on one rank.
    with pytest.raises(ValueError, match=r"^labels: expected as many rows along batch_dim as the inputs they go "
                                         r"with, got 7 on pipeline rank 0 for 8 input rows$"):
        v_step(pipe, rank, x, labels[:7], 4)
    with pytest.raises(ValueError, match=r"^labels: .* got 4 on pipeline rank 0 for 6 input rows \(their inputs "
                                         r"enter on pipeline rank 1\)"):
        dual.step(x0 if rank == 0 else rows(6), num_chunks=4, criterion=criterion, labels=[l1 if rank == 0 else l0])
    expect_on(rank, 1, ValueError, r"labels: expected the same number of rows along batch_dim in every tensor, got \[3, 4\]",
              lambda: dual.step(x0 if rank == 0 else x1, num_chunks=4, criterion=lambda o, a, b: criterion(o, a),
                                labels=[l1, l1] if rank == 0 else [l0, l0[:3]]))
    # No P2P ran: both runtimes still work.
    v_step(pipe, rank, x, labels, 4)
    dual.step(x0 if rank == 0 else x1, num_chunks=4, criterion=criterion, labels=[l1 if rank == 0 else l0])


def check_group_arguments(rank):
    """DualPipe names the process group when it has an odd rank count (one rank here), and a group
    this rank is not in, or not a group at all; rank_mapping takes ints only."""
    solos = [dist.new_group([r], backend="gloo") for r in range(P)]  # (every rank creates both)
    solo = solos[rank]
    for runtime in (DualPipe, DualPipeV):
        with pytest.raises(ValueError, match=rf"^process_group: expected a group this process belongs to, but "
                                             rf"global rank {rank} is not one of its members"):
            runtime((Block(), Block()), process_group=solos[1 - rank])
        with pytest.raises(TypeError, match="^process_group: expected a torch.distributed ProcessGroup .* got str"):
            runtime((Block(), Block()), process_group="world")
    with pytest.raises(ValueError, match=r"^process_group: DualPipe needs an even number of ranks >= 2 .* got 1"):
        DualPipe((Block(), Block()), process_group=solo)
    DualPipeV((Block(), Block()), process_group=solo)  # one rank is a V
    for mapping in ([0.0, 1.0], [True, False]):
        with pytest.raises(ValueError, match=r"^rank_mapping: expected a permutation of 0..1"):
            DualPipeV((Block(), Block()), rank_mapping=mapping)


def _healthy_body(rank, world_size):
    torch.set_num_threads(1)
    check_group_arguments(rank)
    check_process_wide_store_left_on(rank, DualPipeV, Block, seed=1)
    check_process_wide_store_left_on(rank, DualPipe, HookBlock, seed=2)  # B inside the hook too
    check_leftover_weight_grad_work_raises(rank)
    check_disagreement(rank)
    check_argument_errors(rank)


def test_argument_and_store_checks():
    run_distributed(_healthy_body, P, timeout_s=170)


# -- 3 and 4. a module returns what cannot be sent / a rank fails: clear error there, bounded wait on the peer --

class ComplexOut(nn.Module):
    def forward(self, x):
        return torch.complex(x.float(), x.float())


class DictOut(nn.Module):
    def forward(self, x):
        return {"hidden": x}


def failing_criterion(out, label):
    raise ArithmeticError("criterion failed on purpose")


def check_failure(rank, module0, call, exc, match, waiting_at):
    """Rank 0 fails with exc in a step (rank 1 is fine): rank 0 raises it, rank 1 raises
    TimeoutError naming rank 0 and `waiting_at` within timeout_s, and neither runs another step."""
    group = dist.new_group(backend="gloo")  # gloo closes a connection whose wait timed out
    pipe = DualPipeV((module0 if rank == 0 else nn.Identity(), nn.Identity()), process_group=group, timeout_s=3)
    start = time.monotonic()
    if rank == 0:
        with pytest.raises(exc, match=match):
            call(pipe)
    else:
        with pytest.raises(TimeoutError, match=r"^pipeline rank 1: waited longer than timeout_s=3 s for pipeline "
                                               r"rank\(s\) \[0\] at the exchange before " + waiting_at):
            pipe.step(num_chunks=4)
        assert time.monotonic() - start < 60
    with pytest.raises(RuntimeError, match="an earlier step failed mid-way on this rank"):
        pipe.step(num_chunks=4)
    dist.barrier()  # rank 0 stays until rank 1 timed out (else rank 1 sees rank 0's exit instead)


def _failure_body(rank, world_size):
    torch.set_num_threads(1)
    x, labels = rows(8), rows(8)

    def run(pipe, crit=criterion):
        return pipe.step(x, num_chunks=4, criterion=crit, labels=[labels])

    check_failure(rank, ComplexOut(), run, ValueError,
                  r"^modules\[0\] \(stage 0\) output: expected tensors of at most 6 dims with a dtype among "
                  r"float32, .* to send to pipeline rank 1, got a 2-d torch.complex64 tensor at position 0",
                  r"'1F0', receiving output of stage 0 chunk 0")
    check_failure(rank, DictOut(), run, TypeError,
                  r"^modules\[0\]: expected a tensor or a tuple/list of tensors \(None allowed\) as the output "
                  r"of stage 0, got dict", r"'1F0', receiving output of stage 0 chunk 0")
    check_failure(rank, Block(), lambda pipe: run(pipe, failing_criterion), ArithmeticError, "on purpose",
                  r"'\d+[FBIW]\d+'")


def test_failed_rank_makes_peer_time_out():
    run_distributed(_failure_body, P, timeout_s=170)


# -- local checks (no process group) --

def test_constructor_arguments():
    with pytest.raises(TypeError, match=r"^modules: expected a pair \(module0, module1\) of nn.Module, one per "
                                        r"stage of this rank, got a single Linear"):
        DualPipeV(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"^modules\[1\]: expected an nn.Module, got str"):
        DualPipe((nn.Linear(2, 2), "layer"))
    with pytest.raises(ValueError, match="^modules: expected two modules"):
        DualPipeV([nn.Linear(2, 2)] * 3)
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)  # DualPipe's own example passes an nn.Sequential
    assert runtime._check_modules(nn.Sequential(first, second)) == (first, second)
    assert runtime._check_modules(nn.ModuleList([first, second])) == (first, second)
    with pytest.raises(TypeError, match="^batch_dim: expected an int, got str"):
        DualPipeV((nn.Linear(2, 2), nn.Linear(2, 2)), batch_dim="0")
    with pytest.raises(ValueError, match=r"^timeout_s: expected a number of seconds > 0 \(or None\), got 0"):
        DualPipeV((nn.Linear(2, 2), nn.Linear(2, 2)), timeout_s=0)


def test_scatter_names_the_argument():
    x = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="^labels: expected tensors \\(or None\\), got list at position 1"):
        _scatter([x, [1, 2]], 2, 0, "labels")
    with pytest.raises(ValueError, match="^batch_dim: expected a dimension of every tensor of inputs, got -3"):
        _scatter(x, 2, -3)
    assert [c[0].shape for c in _scatter(x, 2, -1)] == [(4, 2), (4, 1)]


def test_weight_grad_store_put_checks_callable():
    with pytest.raises(TypeError, match="^func: expected a callable .*, got int"):
        WeightGradStore.put(3)
    with pytest.raises(TypeError, match="^func: expected a callable"):
        WeightGradStore().put(None)
    assert WeightGradStore.cache == []


# -- 6. a schedule that differs between ranks, mirrored copies that differ, an oversized message --

def check_schedule_fingerprints_differ(rank):
    """Ranks whose schedules differ for the same arguments (another dskernels version on one rank,
    imitated by changing rank 1's cached fingerprint): both raise before any P2P, naming each
    rank's fingerprint; nothing ran, so the runtime goes on once they agree."""
    torch.manual_seed(22)
    pipe = DualPipeV((Block(), Block()))
    x, labels = rows(8), rows(8)
    v_step(pipe, rank, x, labels, 4)  # caches this rank's plan and its fingerprint
    program, fingerprint = pipe._plans[(4, False)]
    if rank == 1:
        pipe._plans[(4, False)] = (program, fingerprint ^ 1)
    with pytest.raises(RuntimeError, match=rf"^pipeline: the ranks' schedules differ for the same arguments, "
                                           rf"fingerprint {fingerprint:#x} on pipeline ranks \[0\], fingerprint "
                                           rf"{fingerprint ^ 1:#x} on pipeline ranks \[1\] \(different dskernels "
                                           r"versions\?\)$"):
        v_step(pipe, rank, x, labels, 4)
    pipe._plans[(4, False)] = (program, fingerprint)
    v_step(pipe, rank, x, labels, 4)


def check_mirrored_copies_differ(rank):
    """DualPipe's sync_mirrored_grads pairs rank 0's modules[0] with rank 1's modules[1]: a pair
    with other parameter counts raises on both ranks (no transfer of mismatched sizes)."""
    other = nn.Linear(D, D, dtype=torch.float64)  # 2 parameters, 42 elements; a Block has 4 and 84
    pipe = DualPipe((Block(), Block()) if rank == 0 else (Block(), other))
    here, there = ("[4, 84] / [4, 84]", r"\[2, 42\] / \[4, 84\]") if rank == 0 else \
        ("[4, 84] / [2, 42]", r"\[4, 84\] / \[4, 84\]")
    with pytest.raises(RuntimeError, match=rf"^sync_mirrored_grads: the copies of a layer differ between ranks {rank} "
                                           rf"and its peer: \(parameters, elements\) {re_list(here)} here, {there} "
                                           r"there$"):
        pipe.sync_mirrored_grads()


def re_list(text):
    return text.replace("[", r"\[").replace("]", r"\]")


class ManyOutputs(nn.Module):
    """Returns one tensor more than a message carries (runtime._MAX_TENSORS)."""

    def forward(self, x):
        return (x,) * (runtime._MAX_TENSORS + 1)


def _disagreement_body(rank, world_size):
    torch.set_num_threads(1)
    check_schedule_fingerprints_differ(rank)
    check_mirrored_copies_differ(rank)
    x, labels = rows(8), rows(8)
    check_failure(rank, ManyOutputs(), lambda pipe: pipe.step(x, num_chunks=4, criterion=criterion, labels=[labels]),
                  ValueError, rf"^modules\[0\] \(stage 0\) output: expected at most {runtime._MAX_TENSORS} tensors "
                              rf"to send to pipeline rank 1, got {runtime._MAX_TENSORS + 1}$",
                  r"'1F0', receiving output of stage 0 chunk 0")


def test_schedule_and_mirror_disagreements_and_oversized_messages():
    run_distributed(_disagreement_body, P, timeout_s=90)


def _mirror_layouts_body(rank, world_size):
    """Copies with the same parameter and element counts but other shapes, or other dtypes: the
    copies of a layer differ, and sync_mirrored_grads must say so on both ranks, as it does for
    other counts. (Before: shapes Linear(4, 2) / Linear(1, 5), 8 + 2 and 5 + 5 elements, added
    the peer's bias gradient into this rank's weight; dtypes float32 / float64 aborted rank 0 in
    gloo, "gloo::EnforceNotMet", and gave rank 1 float32 bytes read as float64.)"""
    for mine in ((nn.Linear(4, 2), nn.Linear(1, 5)),
                 (nn.Linear(3, 3), nn.Linear(3, 3, dtype=torch.float64))):
        mine = mine[rank]
        pipe = DualPipe((mine, nn.Linear(3, 3)) if rank == 0 else (nn.Linear(3, 3), mine))  # the other pair matches
        for p in pipe.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="^sync_mirrored_grads: the copies of a layer differ"):
            pipe.sync_mirrored_grads()
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in pipe.parameters())  # left as they were


def test_mirrored_copies_of_other_shapes_or_dtypes_are_refused():
    run_distributed(_mirror_layouts_body, P, timeout_s=60)
