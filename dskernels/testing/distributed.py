"""Spawns a torch.distributed process group on this machine (2 to N local ranks).

    def body(rank, world_size, x):            # a module-level function (it is pickled)
        ...uses torch.distributed...
    run_distributed(body, 4, x, backend="gloo", timeout_s=120)

The ranks meet at a TCPStore that this process serves on 127.0.0.1 at a port the OS picks when the
store binds it (no window in which a parallel test could take it). A rank that raises makes the call raise
(with that rank's traceback); a run that does not finish in `timeout_s` is killed and raises
TimeoutError naming the ranks still alive, instead of hanging the caller.
"""

from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, body, world_size, port, backend, timeout_s, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared by all ranks
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    if backend == "gloo":
        # Gloo connects every pair inside init; a rank that returns first and leaves (a body with nothing
        # to do) closes its sockets while a slower peer is still connecting, and that peer fails with
        # "connectFullMesh ... Connection closed by peer" instead of the body's own error.
        dist.barrier()
    try:
        body(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(body, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Runs body(rank, world_size, *args) on world_size spawned ranks; see the module docstring."""
    if world_size < 1:
        raise ValueError(f"world_size: expected at least 1, got {world_size}")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    context = mp.start_processes(
        _rank_main, args=(body, world_size, store.port, backend, timeout_s, args),
        nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=0.5):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"run_distributed: ranks {alive} of {world_size} still running after "
                               f"{timeout_s:.0f} s (a collective waiting for a peer that never came?)")
