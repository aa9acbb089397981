"""When one of our gloo collectives returns, gloo's threads must hold none of its tensors.

gloo's worker thread drops its references to a collective's tensors after wait() has returned, and
doing so takes the GIL; during interpreter shutdown that thread exits mid-destructor and the process
aborts ("terminate called without an active exception"). It needs the process group to outlive
destroy_process_group, as it does when a script keeps its runtime or buffer in a global: a 2-rank
script that exits right after an async all_gather aborted in 9 of 30 runs here, and the pipeline
runtime test in about 1 of 6. The waits in dskernels/_collectives.py end only once the worker is
done. That race is rare, so the test plays the slow worker itself: it holds the collective's
tensors a while longer, and the call must not return before it lets go.
"""

import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dskernels._collectives import use_counts, wait_released
from dskernels.ep import Buffer
from dskernels.pipeline import DualPipeV
from dskernels.testing import run_distributed

_KEPT = []  # what a script keeps in globals: with it, the process group lives until shutdown


def _recording(name, given):
    """dist.<name> that notes each tensor it is given with its count before the call, and acts as
    a slow gloo worker: views of those tensors (references held the same way) let go 0.2 s later."""
    original = getattr(dist, name)

    def call(*args, **kwargs):
        late = []
        for a in [*args, *kwargs.values()]:
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor):
                    given.append((t, t._use_count()))
                    late.append(t.view_as(t))
        threading.Timer(0.2, late.clear).start()
        return original(*args, **kwargs)
    return call


def _check_released(name, op):
    given = []
    setattr(dist, name, _recording(name, given))
    op()
    assert given, f"no dist.{name} ran"
    held = [(tuple(t.shape), c, t._use_count()) for t, c in given if t._use_count() > c]
    assert not held, f"dist.{name} returned with its tensors still held elsewhere: (shape, before, now) {held}"


def _pipeline_body(rank, world):
    pipe = DualPipeV((nn.Linear(4, 4), nn.Linear(4, 4)))
    _KEPT.append(pipe)

    def op():  # rejected on every rank, right after the start-of-step all_gather
        with pytest.raises(ValueError, match="num_chunks"):
            pipe.step(num_chunks=2 * world - 1)
    _check_released("all_gather", op)


def _ep_body(rank, world):
    buf = Buffer(dist.group.WORLD)
    _KEPT.append(buf)
    x = torch.randn(3, 128 if rank == 0 else 256).to(torch.bfloat16)

    def op():  # the ranks disagree on hidden: every rank raises right after the count exchange
        with pytest.raises(ValueError, match="every rank"):
            buf.dispatch(x, topk_idx=torch.tensor([[0], [1], [2]]), num_experts=4)
    _check_released("all_to_all_single", op)


@pytest.mark.parametrize("body", [_pipeline_body, _ep_body], ids=["pipeline", "ep"])
def test_collectives_return_with_their_tensors_released(body):
    run_distributed(body, 2, timeout_s=60)


def test_wait_released_waits_for_the_last_outside_reference():
    """The wait ends when the tensor's count is back to the one taken before, not earlier (a view
    stands in for the worker's reference: it holds the tensor the same way)."""
    t = torch.zeros(4)
    counts = use_counts([t])
    holder = [t.view(2, 2)]
    assert t._use_count() > counts[0]
    released = threading.Event()

    def drop():  # (the event first: the wait may return, and the assert run, right after the clear)
        released.set()
        holder.clear()
    threading.Timer(0.05, drop).start()
    wait_released([t], counts)
    assert released.is_set() and t._use_count() == counts[0]
