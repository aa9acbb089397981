"""Launching our Triton kernels again without Triton's per-launch Python.

A decode step of the V3 layer launches ~24 Triton kernels that each run for microseconds on the
GPU. Triton's launch path binds and specializes every argument, builds its cache key, reads its
knobs and checks the kernel's globals on every call (JITFunction.run: ~13 us for a 35-argument
kernel on this project's 2-core CI host), and an autotuned kernel adds the autotuner's own key
(~20 us more); the launch itself, the compiled kernel's launcher, is a fraction of that. In an
eager step that is host time the GPU waits for (the H200's Triton GEMM at m = 64: 91 us per call
eager, 19 us replayed from a CUDA graph, 2026-12-04).

`fast(kernel)[grid](*args, **kwargs)` takes the place of `kernel[grid](*args, **kwargs)` for a
JITFunction or an autotuned one. Its first launch for each argument signature goes through Triton
(compiling, tuning and launching as usual) and keeps the compiled kernel it returns; later launches
with the same signature call that kernel's launcher directly, with the arguments and grid Triton
would pass: this call's own arguments, and the tuned config's values and defaults it kept. The
signature is finer than Triton's specialization, so it never reuses a kernel Triton would have
specialized otherwise: each argument (positional or keyword) by kind, a tensor by dtype and 16-byte
alignment, an int, bool, float (-0.0 apart from 0.0), str or dtype by type and value (the
autotuners' keys, the grids and constexprs read them); the keywords' names, the current device,
Triton's debug, instrumentation and stages-inspection knobs. Anything else (another argument type,
a pre-run hook, a stages-inspection hook set) takes Triton's path every time, as does a launch
whose int or float arguments take new values (our kernels' floats, eps and scales, are a model's
constants; their ints, shapes and strides).

Under Triton's interpreter `fast` returns the kernel itself. DSKERNELS_TRITON_LAUNCH_CACHE=0 (read
at import; `ENABLED` after it) sends every launch through Triton's path.
"""

from __future__ import annotations

import inspect
import os
import threading

import torch
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

ENABLED = os.environ.get("DSKERNELS_TRITON_LAUNCH_CACHE", "1") != "0"
_Tensor = torch.Tensor  # (one global lookup per argument, not torch's and then its attribute)
MAX_SIGNATURES = 1024  # per kernel; past it the oldest go (ints keyed by value vary: batch sizes, table widths)


def _keys(values, key: list) -> bool:
    """Appends each value's key to key; False at a value of a kind the signature does not cover."""
    append = key.append  # (per argument of every launch: the common kinds first, by identity)
    for value in values:
        kind = type(value)
        if kind is int:
            append(value)
        elif kind is _Tensor:
            append((value.dtype, value.data_ptr() % 16 == 0))
        elif kind is bool:
            append((kind, value))
        elif isinstance(value, _Tensor):  # (a subclass: after the exact kinds, no bool is a tensor)
            append((value.dtype, value.data_ptr() % 16 == 0))
        elif kind is float:
            append(value.hex())  # a constexpr's value matters; -0.0 == 0.0 would merge them
        elif value is None:
            append(None)
        elif isinstance(value, (tl.dtype, torch.dtype, str)):
            append((kind, value))
        else:
            return False
    return True


def _signature(args: tuple, kwargs: dict, device=None):
    """The launch's key (see the module docstring), or None where an argument is of a kind it
    does not cover. device: the current device, where the caller has read it already."""
    key = []
    if not _keys(args, key) or not _keys(kwargs.values(), key):
        return None
    if device is None:
        device = driver.active.get_current_device()
    return (*key, *kwargs, device, knobs.runtime.debug,
            knobs.compilation.instrumentation_mode,
            getattr(knobs.runtime, "add_stages_inspection_hook", None))  # (Triton 3.8's)


class _Plan:
    """What a cached launch reuses: the compiled kernel, and for the parameters past the positional
    arguments (in the kernel's order) the values the call does not pass as keywords: the tuned
    config's and the defaults."""

    __slots__ = ("compiled", "rest", "kept")

    def __init__(self, compiled, rest: tuple[str, ...], kept: dict):
        self.compiled, self.rest, self.kept = compiled, rest, kept


class FastLauncher:
    """One kernel's cached launches (see the module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.tuner = kernel if isinstance(kernel, Autotuner) else None
        self.jit = kernel.fn if self.tuner is not None else kernel
        self.names = self.jit.arg_names
        self.defaults = {p.name: p.default for p in self.jit.params if p.default is not inspect.Parameter.empty}
        self.plans: dict[tuple, _Plan] = {}
        # Triton's path and the autotuner's best_config that _keep reads right after it are the
        # kernel's shared state: a thread launching with another key in between would pair one
        # config's compiled kernel with the other's values (and two first calls of one autotuned
        # kernel break Triton's own tuner). First launches only: the cached ones take no lock.
        self.lock = threading.RLock()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args: tuple, kwargs: dict):
        if not ENABLED:
            return self.kernel[grid](*args, **kwargs)
        device = driver.active.get_current_device()  # (read once: the key's and the launch's)
        key = _signature(args, kwargs, device)
        plan = self.plans.get(key) if key is not None else None
        if plan is None or self.jit.pre_run_hooks:
            with self.lock:
                compiled = self.kernel[grid](*args, **kwargs)
                if key is not None:
                    self._keep(key, compiled, args, kwargs)
            return compiled
        compiled, kept = plan.compiled, plan.kept
        values = (*args, *[kwargs[name] if name in kwargs else kept[name] for name in plan.rest])
        if callable(grid):
            grid = grid(dict(zip(self.names, values)))
        # As JITFunction.run launches (Triton 3.6 through 3.8).
        stream = driver.active.get_current_stream(device)
        metadata = compiled.launch_metadata(grid, stream, *values)
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, metadata, knobs.runtime.launch_enter_hook,
                     knobs.runtime.launch_exit_hook, *values)
        return compiled

    def _keep(self, key: tuple, compiled, args: tuple, kwargs: dict) -> None:
        """Caches the kernel Triton's path just compiled and launched, where a later launch can
        pass the same arguments without it."""
        if compiled is None or not hasattr(compiled, "packed_metadata") \
                or getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None:
            return
        kept = dict(self.defaults)
        if self.tuner is not None:
            config = self.tuner.best_config
            if config is None or config.pre_hook is not None:
                return
            kept.update(config.all_kwargs())
        rest = tuple(self.names[len(args):])
        if any(name not in kwargs and name not in kept for name in rest):
            return
        while len(self.plans) >= MAX_SIGNATURES:  # the oldest first (dicts keep their insertion order): a
            del self.plans[next(iter(self.plans))]   # server past the bound keeps its recent signatures
        self.plans[key] = _Plan(compiled, rest, {name: kept[name] for name in rest if name not in kwargs})


def fast(kernel):
    """kernel (a JITFunction or triton.autotune's wrapper of one) with cached launches; the kernel
    itself under the interpreter."""
    launcher = getattr(kernel, "_dskernels_launcher", None)
    if launcher is None:
        # (the interpreter's kernels are InterpretedFunctions, autotuned or not)
        base = kernel.fn if isinstance(kernel, Autotuner) else kernel
        launcher = FastLauncher(kernel) if type(base) is JITFunction else kernel
        kernel._dskernels_launcher = launcher
    return launcher
