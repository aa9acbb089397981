"""Input checks shared by every op: each message names the argument, what was expected and what came."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy
import torch
from torch._subclasses.fake_tensor import is_fake


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the other inputs are), got {t.device}")
    return t


def check_one_device(**tensors) -> None:
    """The tensors among the named arguments all on one device. The odd one out is named against
    the device most of them are on (with a tie, the first's), so a misplaced first argument is
    named itself rather than every argument after it."""
    first = None
    for t in tensors.values():  # (per GEMM call on the host: the plain loop, until a device differs)
        if isinstance(t, torch.Tensor):
            if first is None:
                first = t.device
            elif t.device != first:
                break
    else:
        return
    present = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = [t.device for t in present.values()]
    usual = max(devices, key=devices.count)  # (max keeps the first of equal counts)
    name, odd = next((n, t) for n, t in present.items() if t.device != usual)
    others = ", ".join(n for n, t in present.items() if t.device == usual)
    raise ValueError(f"{name}: expected a tensor on {usual} (where {others} {'is' if ',' not in others else 'are'}), "
                     f"got {odd.device}")


def check_no_overlap(name: str, out: torch.Tensor) -> None:
    """An output whose elements share memory (an expanded view) would be written by several
    programs at once: a race on a GPU, whatever the last write was elsewhere."""
    overlap = torch._debug_has_internal_overlap(out)  # 1: overlaps, 0: does not, 2: cannot tell
    if overlap == 1 or (overlap == 2 and strides_may_overlap(out)):
        raise ValueError(f"{name}: expected an output whose elements do not share memory, got strides "
                         f"{tuple(out.stride())} for shape {tuple(out.shape)} (an expanded view, or rows "
                         "closer together than their length?)")


def strides_may_overlap(t: torch.Tensor) -> bool:
    """Judged on the strides alone: some dimension's stride falls inside the span of the dimensions
    with smaller strides (a stride of 0 included). Layouts that interleave without overlapping
    also answer True; no output of ours needs one."""
    span = 1
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def check_int(name: str, value, minimum: int | None = None):
    """value as the int the op schemas take: a Python int, numpy's (the DeepSeek libraries' bindings
    take them), or a symbolic int under torch.compile (kept symbolic); never a bool. minimum: the
    least value allowed (None: no bound, the caller checks the range)."""
    if isinstance(value, torch.SymInt):  # a compare would guard (fails on data-dependent sizes)
        if minimum is not None:
            torch._check(value >= minimum, lambda: f"{name}: expected an int >= {minimum}, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int{_traced_numpy_hint(value)}, got "
                        f"{type(value).__name__} {_short_repr(value)}".rstrip())
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _short_repr(value) -> str:
    if torch.compiler.is_compiling():
        return ""  # (Dynamo cannot repr what it traces as a tensor: numpy's scalars)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _traced_numpy_hint(value) -> str:
    """Dynamo traces a numpy scalar as an array (torch._numpy's ndarray), so under torch.compile
    numpy's ints and bools cannot be read as Python's: say so where one is refused."""
    if torch.compiler.is_compiling() and type(value).__name__ == "ndarray":
        return " (Python's under torch.compile, which traces numpy's scalars as arrays)"
    return ""


def as_flag(name: str, value, none_ok: bool = False) -> bool | None:
    """A bool, or numpy's (DeepGEMM's, FlashMLA's and DeepEP's bindings take both), as the Python
    bool the op schemas take; with none_ok, None too. Anything else is refused, 0 and 1 included
    (those bindings would take them: a count passed for a flag is more likely a mistake than a
    spelling of False or True)."""
    if isinstance(value, numpy.bool_):
        return bool(value)
    if not (isinstance(value, bool) or (none_ok and value is None)):
        expected = "None, True or False" if none_ok else "a bool"
        raise TypeError(f"{name}: expected {expected}{_traced_numpy_hint(value)}, got {type(value).__name__}")
    return value


def check_multiple(name: str, value: int, factor: int, what: str) -> None:
    if value % factor != 0:
        raise ValueError(f"{name}: expected {what} to be a multiple of {factor}, got {value}")


def check_reads_apart(out_name: str, out: torch.Tensor, **reads) -> None:
    """out shares no memory with any tensor of `reads` (name=tensor; None is skipped): a kernel
    that wrote out while reading one of them (an operand, its scales, a layout of group ids) would
    read what it had already written."""
    # out's side of may_share_memory once, not per read (a GEMM call checks four): its answer is
    # False for every read where out is empty, fake or has no storage to compare
    if out.numel() == 0 or _maybe_fake(out):
        return
    try:
        out_storage = out.untyped_storage().data_ptr()
    except RuntimeError:
        return
    for name, t in reads.items():
        if t is not None and _may_share_memory_with(out, out_storage, t):
            raise ValueError(f"{out_name}: expected an output that shares no memory with {name} (the GEMM reads "
                             f"{name} while it writes {out_name}), got overlapping tensors")


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _maybe_fake(t: torch.Tensor) -> bool:
    """is_fake(t), without its ~2 us for the eager case: a plain tensor is fake only when
    functionalization wraps a fake one (a GEMM's checks ask this of ~70 tensor pairs per decode step).
    An nn.Parameter likewise (a model's weights): one made of a fake tensor is a FakeTensor itself
    (Parameter.__new__ keeps a non-plain tensor's type)."""
    if type(t) in _PLAIN_TENSOR_TYPES and not torch._is_functional_tensor(t):
        return False
    return is_fake(t)


def may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether writing a could change b: the same storage, intersecting byte ranges, and torch's
    overlap test not ruling it out (it answers "may" for any non-dense view; the byte ranges settle
    the common case of disjoint slices of one buffer)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    # Fake tensors (fake kernels, tracing) have no memory to compare: the real call checks. (Their
    # data_ptr() warns, an error under -W error, and is to raise in a later torch.)
    if _maybe_fake(a) or _maybe_fake(b):
        return False
    try:
        a_storage = a.untyped_storage().data_ptr()
    except RuntimeError:  # functional tensors (tracing): likewise
        return False
    return _may_share_memory_with(a, a_storage, b)


def _may_share_memory_with(a: torch.Tensor, a_storage: int, b: torch.Tensor) -> bool:
    """may_share_memory(a, b) for an a already found non-empty and real, its storage's address
    a_storage."""
    if b.numel() == 0 or _maybe_fake(b):
        return False
    try:
        if a_storage != b.untyped_storage().data_ptr():
            return False
    except RuntimeError:  # functional tensors (tracing): likewise
        return False

    def extent(t):
        first = t.storage_offset() * t.element_size()
        span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride > 0)
        return first, first + (span + 1) * t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = extent(a), extent(b)
    return a_lo < b_hi and b_lo < a_hi and bool(torch._C._overlaps(a, b))
