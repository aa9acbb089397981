"""Expert-parallel communication (API.md section 3): DeepEP's `Buffer` on torch.distributed."""

from dskernels.ep.buffer import Buffer, Config, DispatchHandle, EPCommError, LowLatencyHandle
from dskernels.ep.events import EventOverlap

__all__ = ["Buffer", "Config", "DispatchHandle", "EPCommError", "EventOverlap", "LowLatencyHandle"]
