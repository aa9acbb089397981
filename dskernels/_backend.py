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

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dskernels_backend", default=None)
# The same choice as a module global, read in its place while torch.compile traces: the Dynamo of
# torch 2.11 (the GPU machine's) cannot trace ContextVar.get (a graph break, an error under
# fullgraph=True), and a global it reads becomes a guard, so a call under another backend
# recompiles. Unlike the ContextVar it is shared by threads: a thread that compiles while another
# is inside a `backend(...)` block sees that block's choice.
_forced_while_tracing: str | None = None
# The open `backend(...)` blocks of every thread, oldest first: each exit removes its own, and the
# global is the newest one still open. (Restoring the value seen at entry went wrong where two
# threads' blocks overlapped without nesting: "ref" stayed after both had exited.)
_open_blocks: list[tuple[object, str]] = []


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Runs the ops inside the `with` block on backend `name` ("auto", "ref", "triton", "cuda")."""
    global _forced_while_tracing
    token = _forced.set(_check_name(name, "dskernels.backend"))
    block = (object(), name)
    _open_blocks.append(block)
    _forced_while_tracing = name
    try:
        yield
    finally:
        _forced.reset(token)
        _open_blocks.remove(block)
        _forced_while_tracing = _open_blocks[-1][1] if _open_blocks else None


def current_backend() -> str:
    """The backend asked for: the innermost `dskernels.backend(...)`, else DSKERNELS_BACKEND, else auto."""
    forced = _forced_while_tracing if torch.compiler.is_compiling() else _forced.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get("DSKERNELS_BACKEND", "auto") or "auto", "DSKERNELS_BACKEND")


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
