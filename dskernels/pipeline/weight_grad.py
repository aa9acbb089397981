"""Zero-bubble weight-gradient deferral: a per-runtime WeightGradStore and a Linear that uses it.

During an I action (input gradient only) the runtime makes its store the active one; a `Linear`
whose backward runs then computes the input gradient at once and puts a closure computing its
weight (and bias) gradient into the store. `flush()` after the backward groups those closures as
one chunk's W; the matching W action `pop()`s and runs them, in FIFO order (DualPipe's
WeightGradStore, but one per runtime instead of class-level state). DualPipe's class-level calls
(`WeightGradStore.enabled = True`, `.put`, `.flush`, `.pop`, `.clear`, `.cache`, `.funcs_queue`)
reach the running runtime's store during its `step` (enabled only during I actions, as DualPipe's
step sets it), and outside a step a process-wide store, as DualPipe's own class-level state (for
code that drives its own schedule with it). A step neither uses nor changes the process-wide store.

Modules without a deferrable Linear still work: their weight gradients are simply computed during
the I action, and the W action has nothing to run.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightGradStore", "Linear"]


class _StoreMeta(type):
    """DualPipe's class-level attributes, on the store class-level calls reach (_target)."""

    @property
    def enabled(cls) -> bool:
        """Class-level `WeightGradStore.enabled` (DualPipe's API): is deferral on now?"""
        return cls.current() is not None

    @enabled.setter
    def enabled(cls, value: bool) -> None:
        cls._target().enabled = bool(value)

    @property
    def cache(cls) -> list:
        return cls._target().cache

    @cache.setter
    def cache(cls, value: list) -> None:
        cls._target().cache = value

    @property
    def funcs_queue(cls) -> queue.Queue:
        return cls._target().funcs_queue

    @funcs_queue.setter
    def funcs_queue(cls, value: queue.Queue) -> None:
        cls._target().funcs_queue = value


class _ActiveOrBound:
    """A method that, called on the class (DualPipe's class-level API, e.g.
    `WeightGradStore.put(fn)` in a user's autograd Function), acts on the active store (a running
    step's), or outside a step on the process-wide one."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        if obj is not None:
            return self.func.__get__(obj, cls)
        func = self.func

        def on_target(*args, **kwargs):
            return func(cls._target(), *args, **kwargs)
        return on_target


class WeightGradStore(metaclass=_StoreMeta):
    """FIFO of deferred weight-gradient work, one group per I action.

    Each runtime owns one. DualPipe's class-level calls still work inside a step:
    `WeightGradStore.enabled` and `WeightGradStore.put(fn)` reach the running runtime's store."""

    _active: WeightGradStore | None = None  # the store of the step now running, if any
    _process_wide: WeightGradStore | None = None  # the class-level calls' store outside a step

    def __init__(self):
        self.enabled = False
        self.cache: list[Callable[[], None]] = []
        self.funcs_queue: queue.Queue = queue.Queue()

    @classmethod
    def current(cls) -> WeightGradStore | None:
        """The store that takes deferred work right now: the running step's during an I action, or
        the process-wide one if `WeightGradStore.enabled = True` was set and no step runs; None
        otherwise."""
        store = cls._target()
        return store if store.enabled else None

    @classmethod
    def _target(cls) -> WeightGradStore:
        if cls._active is not None:
            return cls._active
        if cls._process_wide is None:
            cls._process_wide = WeightGradStore()
        return cls._process_wide

    @_ActiveOrBound
    def put(self, func: Callable[[], None]) -> None:
        # Checked here: a bad item would otherwise only fail at the W action that pops it.
        if not callable(func):
            raise TypeError(f"func: expected a callable (the deferred weight-gradient work), "
                            f"got {type(func).__name__}")
        self.cache.append(func)

    @_ActiveOrBound
    def flush(self) -> None:
        """Closes the group of work put since the last flush (one chunk's W)."""
        self.funcs_queue.put(self.cache)
        self.cache = []

    @_ActiveOrBound
    def pop(self) -> None:
        """Runs the oldest group."""
        if self.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no deferred weight gradient to run "
                               "(a W action without its I?)")
        for func in self.funcs_queue.get():
            func()

    @_ActiveOrBound
    def clear(self) -> None:
        self.cache = []
        self.funcs_queue = queue.Queue()

    def empty(self) -> bool:
        return not self.cache and self.funcs_queue.empty()

    def activate(self, enabled: bool = True):
        """Context manager: this store is the one class-level calls reach, with deferral `enabled`
        (on for one I action's backward; off for a whole step, so that nothing else, e.g. a
        process-wide `WeightGradStore.enabled = True`, takes the step's weight gradients)."""
        store = self

        class _Scope:
            def __enter__(self):
                self.previous = WeightGradStore._active, store.enabled
                WeightGradStore._active = store
                store.enabled = enabled
                return store

            def __exit__(self, *exc):
                WeightGradStore._active, store.enabled = self.previous
                return False

        return _Scope()


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _DeferrableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        bias = ctx.bias

        need_bias = bias is not None and ctx.needs_input_grad[2]  # a frozen bias gets no .grad

        def weight_grad():
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            _accumulate(weight, g2.t() @ x.reshape(-1, x.shape[-1]))
            if need_bias:
                _accumulate(bias, g2.sum(0))

        store = WeightGradStore.current()
        if store is not None:
            store.put(weight_grad)
        else:
            weight_grad()
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class Linear(nn.Linear):
    """nn.Linear whose weight gradient is deferred to the W action when run inside a pipeline
    runtime's I action (it writes `.grad` itself, outside autograd's accumulation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _DeferrableLinearFn.apply(x, self.weight, self.bias)
