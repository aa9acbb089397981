"""Group sizes of the K-grouped ops (MoE experts' token counts): checked on the host, and put on
the device for kernels that read them there."""

from __future__ import annotations

import operator

import torch
from torch._subclasses.fake_tensor import is_fake

from dskernels._checks import check_tensor


def as_sizes(name: str, ks) -> list:
    """ks as a list of ints (python or, under torch.compile, symbolic: operator.index would turn a
    symbolic size into a constant, and every new set of sizes into a recompile)."""
    if torch.compiler.is_compiling():
        return list(ks)
    try:
        if any(isinstance(k, bool) for k in ks):
            raise TypeError
        return [operator.index(k) for k in ks]
    except TypeError:
        raise TypeError(f"{name}: expected a list of ints (tokens per group), got {ks!r}") from None


def check_sizes(name: str, ks: list, groups: int | None = None, groups_of: str = "out's groups") -> None:
    if groups is not None and len(ks) != groups:
        raise ValueError(f"{name}: expected {groups} sizes ({groups_of}), got {len(ks)}")
    for g, k in enumerate(ks):
        if k < 0:
            raise ValueError(f"{name}: expected sizes >= 0, got {k} for group {g}")


def check_sizes_tensor(ks_tensor, groups: int, device: torch.device, sizes_name: str = "ks", ks=None) -> None:
    """ks_tensor's type and shape; on CPU tensors its values too (reading them is free there; on a
    GPU it would sync): one that disagrees with ks would make the backends differ, as the reference
    reads ks and the Triton kernel ks_tensor."""
    if ks_tensor is not None:
        check_tensor("ks_tensor", ks_tensor, ndim=1, dtypes=(torch.int32,), device=device)
        if tuple(ks_tensor.shape) != (groups,):
            raise ValueError(f"ks_tensor: expected shape ({groups},) ({sizes_name} on the device, one size per "
                             f"group), got {tuple(ks_tensor.shape)}")
        if (ks is not None and ks_tensor.device.type == "cpu" and not torch.compiler.is_compiling()
                and not is_fake(ks_tensor) and ks_tensor.tolist() != list(ks)):
            raise ValueError(f"ks_tensor: expected {sizes_name}'s values {list(ks)} (the same sizes on the device), "
                             f"got {ks_tensor.tolist()}")


def sizes_on_device(ks: list[int], device: torch.device) -> torch.Tensor:
    """ks as int32 on device without a host sync: an asynchronous copy from pinned memory (the
    caching host allocator keeps it until the copy is done), or, while a CUDA graph is being
    captured, one fill per group (graph nodes that replay; no host memory to keep alive)."""
    host = torch.tensor(ks, dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        sizes = torch.empty(len(ks), dtype=torch.int32, device=device)
        for g, k in enumerate(ks):
            sizes[g].fill_(k)
        return sizes
    return host.pin_memory().to(device, non_blocking=True)
