"""Expert-parallel communication (API.md section 3): DeepEP's `Buffer` on torch.distributed."""

import torch

from dskernels.ep.buffer import Buffer, Config, DispatchHandle, EPCommError, LowLatencyHandle
from dskernels.ep import utils  # noqa: F401  (DeepEP's deep_ep.utils names)
from dskernels.ep.events import EventOverlap

# DeepEP's dtype for topk_idx (its tests cast with it): int64, as API.md fixes.
topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "DispatchHandle", "EPCommError", "EventOverlap", "LowLatencyHandle", "topk_idx_t"]
