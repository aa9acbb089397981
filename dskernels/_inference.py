"""The ops are inference kernels, as FlashMLA's and DeepGEMM's: each runs under no_grad, so no
gradient flows through an op on any backend. (Without it the reference's tensor ops recorded one on
CPU that Triton, CUDA and compiled graphs did not give.) A call made with grad mode on and an input
that requires grad warns, once per op and process (in eager mode; not under torch.compile): its
outputs do not require grad, so a gradient that should reach that input would be lost without a
word (a training loop whose weights behind the op never move). EP's dispatch/combine have their
own autograd (dskernels.ep).

An op that writes into a caller's tensor (`out`) takes an inference tensor there outside
inference mode too (buffers a server allocated under torch.inference_mode, written by a step under
no_grad), as DeepGEMM's bindings do: the kernel then runs under inference_mode, where
torch allows the in-place writes of the reference path (and of the other backends' small torch
ops, such as a k = 0 GEMM's zero fill) that it refuses outside; the Triton and CUDA kernels
write through pointers and never asked."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings

import torch

_warned: set[str] = set()
_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside dskernels and torch (the caller's line, past the
    dispatcher and our wrappers), for the warning to point at."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _requires_grad(values) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif isinstance(value, (list, tuple)) and _requires_grad(value):
            return True
    return False


def _grad_lost_warning(op: str, args, kwargs, hint: str = "") -> None:
    """Warns (once per op) where an input requires grad and grad mode is on: see the docstring.
    hint: a sentence added to the message (where a differentiable alternative exists)."""
    # (not under torch.compile: Dynamo would break the graph on it, and a compiled graph runs the
    # registered kernels with grad off, so it cannot tell)
    if not torch.compiler.is_compiling() and op not in _warned and (
            _requires_grad(args) or _requires_grad(kwargs.values())):
        _warned.add(op)
        warnings.warn(f"dskernels.{op}: an input requires grad, but this op is an inference kernel: no "
                      "gradient flows through it (its outputs do not require grad). Call it under "
                      "torch.no_grad() or torch.inference_mode(), or detach its inputs, to say that this is "
                      "meant (this warning is given once per op)." + (f" {hint}" if hint else ""), UserWarning,
                      stacklevel=_caller_stacklevel())


def _writes_inference_tensor(written: tuple[tuple[int, str], ...], args: tuple, kwargs: dict) -> bool:
    if torch.compiler.is_compiling():  # (Dynamo traces the Python-level ops: is_inference breaks its graph)
        return False
    for position, name in written:
        t = args[position] if position < len(args) else kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.is_inference():
            return not torch.is_inference_mode_enabled()
    return False


def inference_kernel(op: str, writes: tuple[str, ...] = ()):
    """Decorates op's kernel (or public function): it runs under no_grad, warning as the module's
    docstring says. writes: the parameters the op writes into (its schema's Tensor(a!) ones), where
    an inference tensor makes it run under inference_mode."""

    def wrap(fn):
        params = list(inspect.signature(fn).parameters)
        written = tuple((params.index(name), name) for name in writes)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if written and _writes_inference_tensor(written, args, kwargs):
                if torch.is_grad_enabled():
                    _grad_lost_warning(op, args, kwargs)
                with torch.inference_mode():
                    return fn(*args, **kwargs)
            if not torch.is_grad_enabled():
                return fn(*args, **kwargs)
            _grad_lost_warning(op, args, kwargs)
            with torch.no_grad():
                return fn(*args, **kwargs)

        return run

    return wrap
