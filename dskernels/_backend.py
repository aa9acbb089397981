"""Backend choice: which implementation of an op runs.

`auto` (the default) runs the sm90 CUDA kernel on Hopper, the Triton kernel on other CUDA GPUs (or
where the op has no CUDA kernel yet) and the pure-PyTorch reference on CPU tensors. A backend can be
forced with `with dskernels.backend("ref" | "triton" | "cuda"):` or with the environment variable
DSKERNELS_BACKEND; the context manager wins. With TRITON_INTERPRET=1 (set before triton is first
imported) the Triton backend also runs on CPU tensors, through Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re

import torch

BACKENDS = ("auto", "ref", "triton", "cuda")


class _ScopedSetting:
    """A choice made by the innermost open `with` block of the calling thread, else read from an
    environment variable (by `default`).

    While torch.compile traces, `while_tracing` is read in place of the ContextVar: the Dynamo of
    torch 2.11 (the GPU machine's) cannot trace ContextVar.get (a graph break, an error under
    fullgraph=True), and an attribute it reads becomes a guard, so a call under another choice
    recompiles. Unlike the ContextVar it is shared by threads: a thread that compiles while another
    is inside a block sees that block's choice. `open_blocks` holds every thread's open blocks,
    oldest first: each exit removes its own and `while_tracing` is the newest one still open.
    (Restoring the value seen at entry went wrong where two threads' blocks overlapped without
    nesting: the older value stayed after both had exited.)
    """

    def __init__(self, name: str, default):
        self._forced = contextvars.ContextVar(name, default=None)
        self._default = default
        self.while_tracing = None
        self.open_blocks: list[tuple[object, object]] = []

    @contextlib.contextmanager
    def scope(self, value):
        token = self._forced.set(value)
        block = (object(), value)
        self.open_blocks.append(block)
        self.while_tracing = value
        try:
            yield
        finally:
            self._forced.reset(token)
            self.open_blocks.remove(block)
            self.while_tracing = self.open_blocks[-1][1] if self.open_blocks else None

    def get(self):
        forced = self.while_tracing if torch.compiler.is_compiling() else self._forced.get()
        return forced if forced is not None else self._default()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_BACKEND = _ScopedSetting("dskernels_backend", lambda: _check_name(
    os.environ.get("DSKERNELS_BACKEND", "auto") or "auto", "DSKERNELS_BACKEND"))


def backend(name: str):
    """Runs the ops inside the `with` block on backend `name` ("auto", "ref", "triton", "cuda")."""
    return _BACKEND.scope(_check_name(name, "dskernels.backend"))


def current_backend() -> str:
    """The backend asked for: the innermost `dskernels.backend(...)`, else DSKERNELS_BACKEND, else auto."""
    return _BACKEND.get()


def _invariance_from_environment() -> bool:
    text = os.environ.get("DSKERNELS_BATCH_INVARIANT", "0") or "0"
    if text not in ("0", "1"):
        raise ValueError(f"DSKERNELS_BATCH_INVARIANT: expected 0 or 1, got {text!r}")
    return text == "1"


_BATCH_INVARIANT = _ScopedSetting("dskernels_batch_invariant", _invariance_from_environment)


def batch_invariant(enabled: bool = True):
    """Inside the `with` block (or everywhere with DSKERNELS_BATCH_INVARIANT=1) the ops whose work
    split follows the batch (MLA decode's split plan, the dense FP8 GEMM's K split and tile choice)
    split each row's work by that row alone, so a token's or a sequence's output keeps its bits
    whatever else is in the batch. It costs some speed: docs/api.md, "Determinism and batch
    invariance", has what each op does and what it costs."""
    if not isinstance(enabled, bool):
        raise TypeError(f"dskernels.batch_invariant: enabled must be a bool, got {type(enabled).__name__}")
    return _BATCH_INVARIANT.scope(enabled)


def batch_invariant_enabled() -> bool:
    """Whether batch-invariant mode is on: the innermost `dskernels.batch_invariant(...)`, else
    DSKERNELS_BATCH_INVARIANT=1."""
    return _BATCH_INVARIANT.get()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    """Why the Triton backend cannot run here (None: it can): `import triton` fails, or, under
    TRITON_INTERPRET=1, numpy is missing or too new for this Triton's interpreter."""
    try:
        import triton
        if triton_interpret():
            import numpy
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    too_new_numpy = triton_interpret() and version_tuple(numpy.__version__) >= (2, 4)
    if too_new_numpy and version_tuple(triton.__version__) < (3, 7):
        # Triton <= 3.6's interpreter reads a loop bound with int() of a one-element array, which
        # numpy 2.4 refuses (triton-lang/triton#9171): every kernel with a run-time loop would fail.
        return (f"Triton {triton.__version__}'s interpreter does not work with numpy {numpy.__version__} "
                "(triton-lang/triton#9171); install numpy<2.4 or triton>=3.7")
    return None


def version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in text.split(".")[:2])


# Constant for the process: torch.compile calls these while tracing and keeps the result, instead of
# tracing into their cached helpers (which it would do, warning that it ignores the cache). The result
# is baked in without a guard: code that changes what they read (a test monkeypatching
# _triton_import_error or calling its cache_clear(), _is_sm90) must torch._dynamo.reset() before
# compiling again; is_hopper of a device without an index reads the current device at trace time.
def _constant_while_compiling(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (2 of the 4 s of
    `import dskernels`): the mark it sets, which tests/test_backend.py checks is still all it does."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_while_compiling
def triton_installed() -> bool:
    return _triton_import_error() is None


@_constant_while_compiling
def cuda_kernels_built() -> bool:
    """Whether dskernels._C was compiled with the sm_90a kernels (needs nvcc at build time)."""
    return _cuda_kernels_built()


@functools.cache
def _cuda_kernels_built() -> bool:
    from dskernels import _C  # noqa: F401

    return torch.ops.dskernels._build_info() == "cuda"


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@_constant_while_compiling
def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and _is_sm90(device.index if device.index is not None else torch.cuda.current_device())


def available_backends() -> list[str]:
    """The backends that can run here: "ref" always; "triton" with a CUDA GPU or TRITON_INTERPRET=1;
    "cuda" when the sm_90a kernels were built and a Hopper GPU is visible."""
    found = ["ref"]
    if triton_installed() and (torch.cuda.is_available() or triton_interpret()):
        found.append("triton")
    if cuda_kernels_built() and torch.cuda.is_available():
        if any(_is_sm90(i) for i in range(torch.cuda.device_count())):
            found.append("cuda")
    return found


def select_backend(op: str, device: torch.device, *, has_cuda: bool, has_triton: bool,
                   cuda_verified: bool = True) -> str:
    """The backend that runs `op` on tensors of `device`; raises if the forced one cannot.

    cuda_verified=False keeps `auto` off a CUDA kernel that has been compiled but not yet checked
    on a GPU; forcing the "cuda" backend still runs it (that is how the device tests reach it).
    """
    asked = current_backend()
    if asked == "ref" or device.type not in ("cpu", "cuda"):
        return "ref"
    if device.type == "cpu":
        if asked == "auto":
            return "ref"
        if asked == "cuda":
            raise ValueError(f"{op}: the 'cuda' backend needs CUDA tensors, got tensors on {device}")
        _require_triton(op, has_triton)
        if not triton_interpret():
            raise RuntimeError(
                f"{op}: the 'triton' backend runs on CPU tensors only under Triton's interpreter; "
                "set TRITON_INTERPRET=1 before triton is imported")
        return "triton"
    if asked == "triton":
        _require_triton(op, has_triton)
        return "triton"
    if asked == "cuda":
        if not has_cuda:
            raise NotImplementedError(f"{op}: no CUDA kernel yet; use the 'triton' or 'ref' backend")
        if not cuda_kernels_built():
            raise RuntimeError(f"{op}: dskernels was built without its CUDA kernels (no CUDA toolkit found, or "
                               "DSKERNELS_CPU_ONLY set); rebuild with CUDA_HOME naming the toolkit and "
                               "DSKERNELS_CPU_ONLY unset")
        if not is_hopper(device):
            raise RuntimeError(f"{op}: the CUDA kernels need a Hopper (sm_90) GPU, got "
                               f"{torch.cuda.get_device_name(device)}")
        return "cuda"
    hopper = has_cuda and cuda_kernels_built() and is_hopper(device)  # (asked for ops with a built CUDA kernel only)
    return auto_choice(has_cuda=has_cuda, has_triton=has_triton, cuda_verified=cuda_verified, hopper=hopper)[0]


def auto_choice(*, has_cuda: bool, has_triton: bool, cuda_verified: bool, hopper: bool) -> tuple[str, str]:
    """What `auto` runs on a GPU's tensors (hopper: whether it is sm_90), and why: the rule of
    select_backend, also behind `python -m dskernels`'s report."""
    if has_cuda and cuda_kernels_built() and hopper and cuda_verified:
        return "cuda", "the sm90 CUDA kernel"
    if not has_cuda:
        why = "no CUDA kernel for it"
    elif not cuda_kernels_built():
        why = "this build has no CUDA kernels (built without a CUDA toolkit, or with DSKERNELS_CPU_ONLY)"
    elif not hopper:
        why = "its CUDA kernel needs a Hopper (sm_90) GPU"
    else:
        why = "its CUDA kernel has not yet passed its tests on a GPU (forcing the 'cuda' backend runs it)"
    if has_triton and triton_installed():
        return "triton", why
    return "ref", why + ("; no Triton kernel" if not has_triton
                         else f"; triton not usable here: {_triton_import_error()}")


def _require_triton(op: str, has_triton: bool) -> None:
    if not has_triton:
        raise NotImplementedError(f"{op}: no Triton kernel; use the 'ref' backend")
    if not triton_installed():
        raise RuntimeError(f"{op}: the 'triton' backend cannot run here (it needs the triton package, and numpy "
                           f"for its interpreter, TRITON_INTERPRET=1): {_triton_import_error()}")


def env_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """The value of the environment knob `name` (None when unset or empty); raises on a value not
    in choices, so a typo is an error rather than the default."""
    value = os.environ.get(name, "")
    if not value:
        return None
    if value not in choices:
        raise ValueError(f"{name}: expected {' or '.join(repr(c) for c in choices)}, got {value!r}")
    return value
