"""The ops are inference kernels, as FlashMLA's and DeepGEMM's: each runs under no_grad, so no
gradient flows through an op on any backend. (Without it the reference's tensor ops recorded one on
CPU that Triton, CUDA and compiled graphs did not give.) A call made with grad mode on and an input
that requires grad warns, once per op and process (in eager mode; not under torch.compile): its
outputs do not require grad, so a gradient that should reach that input would be lost without a
word (a training loop whose weights behind the op never move). EP's dispatch/combine have their
own autograd (dskernels.ep)."""

from __future__ import annotations

import functools
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


def inference_kernel(op: str):
    """Decorates op's kernel (or public function): it runs under no_grad, warning as the module's
    docstring says."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return fn(*args, **kwargs)
            # (not under torch.compile: Dynamo would break the graph on it, and a compiled graph runs
            # the registered kernels with grad off, so it cannot tell)
            if not torch.compiler.is_compiling() and op not in _warned and (
                    _requires_grad(args) or _requires_grad(kwargs.values())):
                _warned.add(op)
                warnings.warn(f"dskernels.{op}: an input requires grad, but this op is an inference kernel: no "
                              "gradient flows through it (its outputs do not require grad). Call it under "
                              "torch.no_grad() or torch.inference_mode(), or detach its inputs, to say that this is "
                              "meant (this warning is given once per op).", UserWarning,
                              stacklevel=_caller_stacklevel())
            with torch.no_grad():
                return fn(*args, **kwargs)

        return run

    return wrap
