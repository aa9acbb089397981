"""`count_launches()`: the kernels one piece of code launches, counted on CPU.

    with count_launches() as launched:
        layer(x, positions, **step)
    launched.torch, launched.triton   # aten op names, Triton kernel names

Each launch costs host time when run eagerly and a few microseconds of GPU time even replayed from
a CUDA graph, so tests pin how many a decode step makes. Counted without a GPU: the torch ops
that dispatch (views and allocations, which launch nothing, excluded) and the Triton kernels that
run under the interpreter (TRITON_INTERPRET=1); the interpreter's own torch ops inside a launch
are not counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no kernel (views, allocations; an fp8 tensor's .view(torch.uint8) dispatches a detach)
NO_KERNEL = frozenset({"view", "_unsafe_view", "permute", "unsqueeze", "squeeze", "slice", "select", "t", "transpose",
                       "expand", "split", "split_with_sizes", "as_strided", "alias", "empty", "empty_like",
                       "scalar_tensor", "detach"})


@dataclass
class Launches:
    torch: list[str] = field(default_factory=list)
    triton: list[str] = field(default_factory=list)


@contextlib.contextmanager
def count_launches():
    """Counts what runs inside the block (see the module docstring); Triton must run interpreted."""
    import triton.runtime.interpreter as interpreter

    launched, inside = Launches(), []
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launched.triton.append(self.fn.__name__)
        inside.append(True)
        try:
            return run(self, *args, **kwargs)
        finally:
            inside.pop()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespace, name = str(func.overloadpacket).split(".")[-2:]
            if namespace == "aten" and name not in NO_KERNEL and not inside:
                launched.torch.append(name)
            return func(*args, **(kwargs or {}))

    interpreter.InterpretedFunction.run = counted_run
    try:
        with Count():
            yield launched
    finally:
        interpreter.InterpretedFunction.run = run
