"""DeepEP's `deep_ep.utils` names, for code that imports them from there (Megatron-LM's fused
all-to-all: `from deep_ep.utils import EventHandle, EventOverlap`)."""

from __future__ import annotations

import torch.distributed as dist

from dskernels.ep.events import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """DeepEP checks that PCIe GPUs of the group are NVLink-paired before its NVLink kernels. The
    Buffer here moves data with torch.distributed collectives, which need no NVLink: nothing to
    check."""
