"""Host-side waits on torch.distributed work that end only once the backend's threads are done with
the work's tensors.

gloo runs a collective on a worker thread, which drops its reference to the work (and so to the
tensors) only after `wait()` has returned here. Dropping a tensor that Python also knows takes the
GIL. If the interpreter is shutting down by then (a rank that returns right after a collective),
that thread exits in the middle of a destructor and the process aborts with "terminate called
without an active exception". Seen on 2 gloo ranks in 1 of about 6 runs of the pipeline tests, and
in about 1 of 3 runs of a 2-rank script that exits right after an async all_gather.

Also the group argument check that EP's Buffer and the pipeline runtimes share.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

_POLL_S = 1e-4
_RELEASE_LIMIT_S = 1.0  # the worker drops its reference microseconds after completing; this is slack


def use_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The tensors' storage-holder reference counts, taken before a collective for
    `wait_released`."""
    return [t._use_count() for t in tensors]


def wait_released(tensors: Sequence[torch.Tensor], counts: Sequence[int]) -> None:
    """Sleeps (GIL released) until the backend's threads hold no references to `tensors`: their
    counts are back to `counts`, taken before the collective. Call it after the work's wait(), with
    no Python reference to the work left (the work object holds the tensors too). CUDA tensors are
    not waited for: NCCL's work holds them until its watchdog thread retires it, which can be much
    later. Gives up after about a second."""
    host = [(t, c) for t, c in zip(tensors, counts) if t.device.type == "cpu"]
    deadline = time.monotonic() + _RELEASE_LIMIT_S
    while any(t._use_count() > c for t, c in host) and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def check_member_group(name: str, group) -> None:
    """Raises ValueError / TypeError naming `name` unless `group` is None (the default group) or a
    ProcessGroup this process belongs to: dist.new_group gives the processes it leaves out a
    placeholder (an int), which would otherwise fail later with an unrelated error."""
    if (isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER) or (
            isinstance(group, dist.ProcessGroup) and dist.get_rank(group) < 0):
        raise ValueError(f"{name}: expected a group this process belongs to, but global rank {dist.get_rank()} "
                         "is not one of its members (dist.new_group returns a placeholder to the others)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed ProcessGroup (or None: the default group), "
                        f"got {type(group).__name__}")
