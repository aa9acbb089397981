"""Host-side waits on torch.distributed work that end only once the backend's threads are done with
the work's tensors.

gloo runs a collective on a worker thread, which drops its reference to the work (and so to the
tensors) only after `wait()` has returned here. Dropping a tensor that Python also knows takes the
GIL. If the interpreter is shutting down by then (a rank that returns right after a collective),
that thread exits in the middle of a destructor and the process aborts with "terminate called
without an active exception". Seen on 2 gloo ranks in 1 of about 6 runs of the pipeline tests, and
in about 1 of 3 runs of a 2-rank script that exits right after an async all_gather.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

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
