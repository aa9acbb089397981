"""`no_host_sync()`: makes every Python-level way of reading device values on the host raise.

    with no_host_sync():
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, 128, 256)

Works on CPU tensors too (it looks at what the code calls, not at a device), so a CPU-only CI
catches a `.tolist()` that would stall a CUDA stream and break CUDA-graph capture. Inside the
block these raise `HostSyncError`: `Tensor.item / tolist / cpu / numpy / __bool__ / __int__ /
__float__ / __index__`, `.to("cpu")`, `nonzero`, `argwhere`, `unique`, `bincount`, `masked_select`,
one-argument `torch.where`, `repeat_interleave` with tensor repeats and no `output_size`,
`torch.equal / allclose / is_nonzero`, indexing with a bool tensor, and `torch.cuda.synchronize`.
It cannot see C++ code that syncs internally (on a GPU, pair it with
`torch.cuda.set_sync_debug_mode("error")` and a CUDA-graph capture). `torch._assert_async` is
allowed: on CUDA it is a device-side check that does not wait.
"""

from __future__ import annotations

import contextlib

import torch


class HostSyncError(RuntimeError):
    """Code inside `no_host_sync()` asked for device values on the host."""


_MISSING = object()

# Always a host read of values (or an output shape that depends on them).
_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                   "__complex__", "__array__", "nonzero", "argwhere", "unique", "unique_consecutive", "bincount",
                   "masked_select")
_TORCH_FUNCTIONS = ("nonzero", "argwhere", "unique", "unique_consecutive", "bincount", "masked_select", "equal",
                    "allclose", "is_nonzero")


def _fail(name: str):
    raise HostSyncError(f"no_host_sync: {name} reads device values on the host (a host synchronization on "
                        "CUDA; breaks CUDA-graph capture)")


def _raiser(name: str):
    def raise_(*args, **kwargs):
        _fail(name)
    return raise_


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_cpu(device) -> bool:
    return (isinstance(device, torch.device) and device.type == "cpu") or (isinstance(device, str)
                                                                          and device.startswith("cpu"))


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, the host-synchronizing calls listed in the module docstring raise HostSyncError."""
    saved: list[tuple[object, str, object]] = []

    def patch(owner, name, value):
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    tensor_getitem, tensor_setitem, tensor_to = torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.to
    tensor_repeat, torch_repeat, torch_where = torch.Tensor.repeat_interleave, torch.repeat_interleave, torch.where

    def getitem(self, index):
        if _has_bool_index(index):
            _fail("indexing with a bool tensor (boolean mask)")
        return tensor_getitem(self, index)

    def setitem(self, index, value):
        if _has_bool_index(index):
            _fail("index assignment with a bool tensor (boolean mask)")
        return tensor_setitem(self, index, value)

    def to(self, *args, **kwargs):
        if self.device.type != "cpu" and (any(_is_cpu(a) for a in args) or _is_cpu(kwargs.get("device"))):
            _fail("Tensor.to('cpu')")
        return tensor_to(self, *args, **kwargs)

    def repeat_checked(original, name):
        def repeat(*args, **kwargs):
            # torch.repeat_interleave(repeats) alone is the repeats-only form: value-dependent too.
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
            if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                _fail(f"{name} with tensor repeats and no output_size")
            return original(*args, **kwargs)
        return repeat

    def where(*args, **kwargs):
        if len(args) + len(kwargs) == 1:
            _fail("torch.where(condition) (a nonzero)")
        return torch_where(*args, **kwargs)

    try:
        for name in _TENSOR_METHODS:
            patch(torch.Tensor, name, _raiser(f"Tensor.{name}()"))
        for name in _TORCH_FUNCTIONS:
            patch(torch, name, _raiser(f"torch.{name}()"))
        patch(torch.Tensor, "__getitem__", getitem)
        patch(torch.Tensor, "__setitem__", setitem)
        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "repeat_interleave", repeat_checked(tensor_repeat, "Tensor.repeat_interleave"))
        patch(torch, "repeat_interleave", repeat_checked(torch_repeat, "torch.repeat_interleave"))
        patch(torch, "where", where)
        patch(torch.cuda, "synchronize", _raiser("torch.cuda.synchronize()"))
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
