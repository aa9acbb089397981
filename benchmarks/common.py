"""What a benchmark family declares: its cases. benchmarks/run.py does the rest.

A family is a module benchmarks/bench_<family>.py with a function

    def cases(quick: bool, device: str) -> list[Case]

returning the shapes to run: on "cuda" the shapes the issues name (fewer with quick), on "cpu"
tiny ones that check every backend against the oracle through Triton's interpreter.

Peers (other implementations of the same math, timed beside ours for "x peer") are checked against
the oracle before they are timed, as ours are: a peer that computed less, or something else, would
make "x peer" meaningless. Case.peer_checks says, per peer, either how to check its output
(check(peer_output, expected, *inputs) -> None if right, else why not: an adapter to the expected
form and a tolerance that follows from the peer's own rounding) or, as a string, why it is not
checked (a peer timed on random operands of the same shape). A peer not named there is checked by
the case's own check on its output as it is (a peer that runs the oracle's own math).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    op: str                                  # the registered op name (torch.ops.dskernels.<op>)
    params: dict[str, Any]                   # the shape, as recorded in the JSON results
    make_inputs: Callable[[str], tuple]      # device -> the arguments of run/reference/peers
    run: Callable[..., Any]                  # runs the op on the backend run.py has forced
    reference: Callable[..., Any]            # python_ref's answer for the same inputs
    check: Callable[[Any, Any], str | None]  # (outputs, expected) -> None if right, else why not
    flops: float                             # as the anchor library counts them (say so where defined)
    bytes: float                             # bytes the op must move at least, as the anchor counts them
    peers: dict[str, Callable[..., Any]] = field(default_factory=dict)  # timed on GPU only
    # peer name -> its check (peer_output, expected, *inputs) -> None | why wrong, or the reason it is
    # not checked (str); peers not named: case.check(peer_output, expected). See the module's docstring.
    peer_checks: dict[str, Callable[..., str | None] | str] = field(default_factory=dict)
    # The backends that implement the op; "auto" (no backend forced: each op's default, e.g. the
    # model layer's CUDA GEMMs beside its Triton glue kernels on Hopper) is timed where listed.
    backends: tuple[str, ...] = ("ref", "triton", "cuda")
    compute_dtype: str = "bf16"              # which matmul ceiling bounds it: "bf16" or "fp8"
    # Configurations of the cuda (triton) backend, each forced through environment variables
    # (label -> {variable: value}), timed and checked like a backend and recorded as "cuda[label]"
    # ("triton[label]"): one device run then answers the tuning questions.
    cuda_variants: dict[str, dict[str, str]] = field(default_factory=dict)
    triton_variants: dict[str, dict[str, str]] = field(default_factory=dict)
    auto_variants: dict[str, dict[str, str]] = field(default_factory=dict)


# A variant that times a case's run replayed from a CUDA graph (as servers run decode steps), beside
# the eager run: the difference is the host's cost (argument checks, launches), which eager timing
# includes wherever it exceeds the GPU time. A case opts in with run=graph_or_eager(run) and
# GRAPH_VARIANTS among its triton_variants / cuda_variants ("triton[graph]", "cuda[graph]" rows).
GRAPH_ENV = "DSKERNELS_BENCH_CUDA_GRAPH"
GRAPH_VARIANTS = {"graph": {GRAPH_ENV: "1"}}


def graph_key(inputs) -> tuple:
    """What a captured graph is kept for: the backend, the DSKERNELS_* knobs (a variant that forces a
    tile or config, DSKERNELS_ROUTER_TILE or DSKERNELS_GEMM_DENSE_CONFIG, must capture its own
    kernels, not replay the last variant's graph) and the input tensors."""
    import torch

    import dskernels

    knobs = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("DSKERNELS_")))
    return (dskernels.current_backend(), knobs,
            *((t.data_ptr(), t.shape) if isinstance(t, torch.Tensor) else id(t) for t in inputs))


def graph_or_eager(step: Callable[..., Any]) -> Callable[..., Any]:
    """run(*inputs): step(*inputs), or under GRAPH_ENV=1 on CUDA inputs the replay of a graph of it,
    captured after a warm-up call on a side stream (compiles and autotuning stay outside the
    capture) and kept for the same graph_key (one graph at a time: a new key frees the last one's
    memory pool). Returns the graph's own output tensors. The warm-up leaves right
    answers in outputs that are also inputs (a GEMM's out): the outputs are NaN-filled before the
    first replay, so a graph that writes nothing still fails run.py's check."""
    import torch

    graphs = {}

    def run(*inputs):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        if os.environ.get(GRAPH_ENV) != "1" or not tensors or not tensors[0].is_cuda:
            return step(*inputs)
        key = graph_key(inputs)
        if key not in graphs:
            graphs.clear()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(*inputs)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.fill_(float("nan"))
            graphs[key] = graph, out
        graph, out = graphs[key]
        graph.replay()
        return out

    return run
