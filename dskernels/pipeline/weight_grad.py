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
        """No weight-gradient work cached or queued."""
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


def _autocast_operands(x, weight, bias):
    """The operands as torch.autocast would give them to F.linear (floating tensors other than
    float64 in the autocast dtype), or unchanged outside autocast."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(x), cast(weight), cast(bias)


class _DeferrableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, deferrable):
        # Under autocast the product runs in the autocast dtype, as nn.Linear's does; the operands
        # are saved cast, so that the backward multiplies like types (its gradients go back in the
        # parameters' dtype).
        xc, wc, bc = _autocast_operands(x, weight, bias)
        ctx.save_for_backward(xc, wc)
        ctx.params = (weight, bias)  # where a deferred gradient accumulates (leaves, see Linear)
        ctx.deferrable = deferrable
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, wc, bc)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        weight_param, bias_param = ctx.params
        need_weight = ctx.needs_input_grad[1]
        need_bias = bias_param is not None and ctx.needs_input_grad[2]  # a frozen bias gets no .grad
        grad_out = grad_out.to(weight.dtype)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None

        def grads():
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])).to(weight_param.dtype) if need_weight else None
            grad_b = g2.sum(0).to(bias_param.dtype) if need_bias else None
            return grad_w, grad_b

        store = WeightGradStore.current()
        if store is None or not ctx.deferrable:
            return grad_x, *grads(), None

        def weight_grad():
            grad_w, grad_b = grads()
            if grad_w is not None:
                _accumulate(weight_param, grad_w)
            if grad_b is not None:
                _accumulate(bias_param, grad_b)

        store.put(weight_grad)
        return grad_x, None, None, None


class Linear(nn.Linear):
    """nn.Linear whose weight gradient is deferred to the W action when run inside a pipeline
    runtime's I action: it then writes `.grad` itself, outside autograd's accumulation. Elsewhere
    (no I action, torch.autograd.grad) and for a weight or bias that is not a leaf (a
    parametrization such as weight_norm, a tied or computed weight: its gradient must flow on
    through autograd) the gradients go through autograd now, as nn.Linear's do. Under autocast it
    computes what nn.Linear does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T + bias, as nn.Linear (see the class docstring for the weight gradient)."""
        weight, bias = self.weight, self.bias  # (a parametrization computes them on each access)
        if not torch.is_grad_enabled() or not (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, weight, bias)
        deferrable = weight.is_leaf and (bias is None or bias.is_leaf)
        return _DeferrableLinearFn.apply(x, weight, bias, deferrable)
