"""GPU timing: CUDA events around each run, L2 flushed before each, median reported.

DeepGEMM and flashinfer time the same way; the flush keeps a kernel from reading what the
previous run left in the 50 MB L2, which would overstate memory-bound kernels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

_L2_FLUSH_BYTES = 256 << 20  # several times Hopper's L2


def bench_gpu(fn: Callable[[], object], *, warmup: int = 5, iters: int = 30, flush_l2: bool = True) -> float:
    """Median milliseconds of fn() on the current CUDA device."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bench_cpu(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3) -> float:
    """Median wall milliseconds of fn() on the CPU (for the interpreter and reference paths)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def measure_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_gpu(lambda: dst.copy_(src), flush_l2=False)
    return 2 * nbytes / ms / 1e6


def measure_matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    ms = bench_gpu(lambda: a @ b, flush_l2=False)
    return 2 * n**3 / ms / 1e9


def measure_fp8_matmul_tflops(n: int = 8192) -> float | None:
    """FP8 e4m3 rate through torch._scaled_mm, or None where this torch or GPU has none."""
    try:
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        run = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        run()
    except (RuntimeError, TypeError, AttributeError):
        return None
    return 2 * n**3 / bench_gpu(run, flush_l2=False) / 1e9
