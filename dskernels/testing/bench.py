"""GPU timing: CUDA events around each run, L2 flushed before each, median reported.

DeepGEMM and flashinfer time the same way; the flush keeps a kernel from reading what the
previous run left in the 50 MB L2, which would overstate memory-bound kernels.

The GPU's state while it runs the timed loop goes with the time where NVML can be read
(nvidia-ml-py's pynvml): Hopper lowers its SM clock under its power or thermal limits, so a
kernel timed cold and the same kernel timed after heavy GEMMs may differ. (The H200 run of
2026-12-04 timed one grouped GEMM config at 1.75 ms as the default and at 2.00 ms forced, moments
later, on both contiguous shapes; nothing recorded the clock.) A result then reads
against its clock and the limits that were active.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

_L2_FLUSH_BYTES = 256 << 20  # several times Hopper's L2

# NVML's clock event reasons that slow the SMs down (the others: idle, application clocks, sync
# boost, display clocks), by the names the records carry.
SLOWDOWN_REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                    0x80: "hw_power_brake"}
_MAX_READINGS = 256


@functools.lru_cache(maxsize=None)
def _nvml_device(index: int):
    """(pynvml, the NVML handle of CUDA device `index`), or None where NVML cannot be read."""
    try:
        import pynvml

        pynvml.nvmlInit()
        # By UUID: NVML numbers the devices its own way (CUDA_VISIBLE_DEVICES does not apply to it)
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
        return pynvml, handle
    except Exception:  # no nvidia-ml-py, no NVML library, or a device it does not list
        return None


def gpu_reading(index: int | None = None) -> dict | None:
    """The SM clock (MHz), board power (W), temperature (C) and active clock event reasons (NVML's
    bit mask) of a CUDA device now; None where NVML cannot be read."""
    nvml = _nvml_device(torch.cuda.current_device() if index is None else index)
    if nvml is None:
        return None
    pynvml, handle = nvml
    reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
               or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)  # the name before NVML 12.5
    try:
        return {"sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "max_sm_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                "temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                "reasons": int(reasons(handle))}
    except pynvml.NVMLError:
        return None


def summarize_readings(readings: list[dict | None]) -> dict | None:
    """Readings taken over a timed loop -> its lowest SM clock, the device's highest, the highest
    power and temperature, and the slowdown reasons active at any reading; None without readings."""
    readings = [r for r in readings if r]
    if not readings:
        return None
    active = 0
    for r in readings:
        active |= r["reasons"]
    return {"sm_mhz": min(r["sm_mhz"] for r in readings), "max_sm_mhz": max(r["max_sm_mhz"] for r in readings),
            "power_w": round(max(r["power_w"] for r in readings), 1), "temp_c": max(r["temp_c"] for r in readings),
            "slowdowns": [name for bit, name in sorted(SLOWDOWN_REASONS.items()) if active & bit],
            "readings": len(readings)}


def _readings_until(done: torch.cuda.Event) -> dict | None:
    """NVML readings every millisecond until `done` has run, summarized: the timed loop is queued
    ahead of the device, so they fall inside it (a loop shorter than one reading, or one bound by
    the host, gets one taken just after it)."""
    readings = [gpu_reading()]
    while readings[0] is not None and len(readings) < _MAX_READINGS and not done.query():
        time.sleep(1e-3)
        readings.append(gpu_reading())
    return summarize_readings(readings)


def bench_gpu(fn: Callable[[], object], *, warmup: int = 5, iters: int = 30, flush_l2: bool = True,
              telemetry: dict | None = None) -> float:
    """Median milliseconds of fn() on the current CUDA device. telemetry: a dict that receives the
    device's state over the timed runs (summarize_readings' fields), where NVML can be read."""
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
    if telemetry is not None:
        telemetry.update(_readings_until(ends[-1]) or {})
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bench_cpu(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3, telemetry: dict | None = None) -> float:
    """Median wall milliseconds of fn() on the CPU (for the interpreter and reference paths);
    telemetry is left as it is (no GPU)."""
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


def measure_matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, telemetry: dict | None = None) -> float:
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    ms = bench_gpu(lambda: a @ b, flush_l2=False, telemetry=telemetry)
    return 2 * n**3 / ms / 1e9


def measure_fp8_matmul_tflops(n: int = 8192, telemetry: dict | None = None) -> float | None:
    """FP8 e4m3 rate through torch._scaled_mm, or None where this torch or GPU has none."""
    try:
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        run = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        run()
    except (RuntimeError, TypeError, AttributeError):
        return None
    return 2 * n**3 / bench_gpu(run, flush_l2=False, telemetry=telemetry) / 1e9
