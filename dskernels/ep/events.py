"""DeepEP-style stream/event plumbing: `EventOverlap` and the communication stream.

On CUDA, an op called with `async_finish=True` (or a `previous_event`) runs on the Buffer's
communication stream: that stream first waits for `previous_event` (else for the caller's current
stream), the op's kernels and collectives run there, and the returned `EventOverlap` records its
end; `event.current_stream_wait()` makes the caller's stream wait for it. Without `async_finish` the
caller's stream waits before the op returns. On CPU tensors everything is synchronous and the event
is a no-op (DeepEP has no CPU path; this keeps user code identical).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from dskernels._checks import as_flag


class EventOverlap:
    """A CUDA event (or nothing) plus tensors to keep alive until it has been waited on.

    `with event:` waits on exit, as DeepEP's EventOverlap does (for overlap-then-join code)."""

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: tuple | None = None,
                 device: torch.device | None = None):
        self.event = event
        self.extra_tensors = extra_tensors
        self.device = device  # the op's: its tensors' next users run on that device's current stream

    def current_stream_wait(self) -> None:
        """Makes the current CUDA stream of the op's device wait for the op (the current device's
        where the op named none); a no-op on CPU."""
        event = cuda_event(self.event)  # (DeepEP's EventHandle wraps one)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False


class EventHandle:
    """DeepEP's `deep_ep.utils.EventHandle` (its C++ `EventHandle()`): an event recorded on the
    current CUDA stream when made (nothing to record without a CUDA device: then a no-op), with
    `current_stream_wait()`. Training code builds `EventOverlap(EventHandle())` as the
    `previous_event` of a Buffer op (Megatron's fused dispatch); the op's stream waits for it."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.event: torch.cuda.Event | None = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))

    def current_stream_wait(self) -> None:
        """Makes the current CUDA stream wait for the recorded point; a no-op without CUDA."""
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)


def cuda_event(event):
    """The torch.cuda.Event behind an EventOverlap's event (an EventHandle's, or itself), or None."""
    return event.event if isinstance(event, EventHandle) else event


def capture(device: torch.device | None = None) -> EventOverlap:
    """An event recorded on the current stream now (DeepEP's `Buffer.capture()`); no-op on CPU."""
    if device is not None and device.type != "cuda" or not torch.cuda.is_available():
        return EventOverlap()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return EventOverlap(event, device=device)


class StreamScope:
    """Runs a Buffer op on the comm stream when asked (see the module docstring)."""

    def __init__(self, comm_stream_owner, device: torch.device, previous_event: EventOverlap | None,
                 async_finish: bool, allocate_on_comm_stream: bool, inputs: tuple = ()):
        """inputs: the op's arguments (tensors, tuples of them, handles): with async_finish the
        comm stream may still read them after the op returns, so the caching allocator is told
        (record_stream) not to hand their memory to the caller's stream before that."""
        async_finish = as_flag("async_finish", async_finish)
        allocate_on_comm_stream = as_flag("allocate_on_comm_stream", allocate_on_comm_stream)
        self.use_stream = device.type == "cuda" and (async_finish or previous_event is not None
                                                     or allocate_on_comm_stream)
        self.device = device
        self.inputs = inputs
        self.previous_event = previous_event
        self.async_finish = async_finish
        self.owner = comm_stream_owner
        self.event = EventOverlap()
        self._ctx = contextlib.nullcontext()

    def __enter__(self):
        if self.use_stream:
            self.caller = torch.cuda.current_stream(self.device)
            stream = self.stream = self.owner._comm_stream(self.device)
            previous = None if self.previous_event is None else cuda_event(self.previous_event.event)
            if previous is not None:
                stream.wait_event(previous)
            else:
                stream.wait_stream(self.caller)
            self._ctx = torch.cuda.stream(stream)
            self._ctx.__enter__()
        return self

    def finish(self, tensors, handle=None) -> EventOverlap:
        """Records the end of the op; keeps `tensors`, and the tensors of the handle it made (on
        the comm stream, read later by a combine on the caller's), valid for the caller's stream."""
        if not self.use_stream:
            return EventOverlap()
        stream = torch.cuda.current_stream(self.device)
        for t in _cuda_tensors((tensors, handle)):
            t.record_stream(self.caller)
        event = torch.cuda.Event()
        event.record(stream)
        self.event = EventOverlap(event, tuple(t for t in tensors if isinstance(t, torch.Tensor)), self.device)
        return self.event

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        if not self.use_stream:
            return False
        if self.async_finish:
            for t in _cuda_tensors(self.inputs):
                t.record_stream(self.stream)
        elif self.event.event is not None:
            # The caller's stream itself: the current device may be another one than the op's.
            self.caller.wait_event(self.event.event)
        return False


def _cuda_tensors(values):
    """The CUDA tensors in values: tensors, tuples and lists of them, and dataclasses (handles)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.is_cuda:
                yield v
        elif isinstance(v, (tuple, list)):
            yield from _cuda_tensors(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            yield from _cuda_tensors([getattr(v, f.name) for f in dataclasses.fields(v)])
