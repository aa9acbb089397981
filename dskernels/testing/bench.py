"""GPU timing: CUDA events around each run, L2 flushed before each, median reported.

DeepGEMM and flashinfer time the same way; the flush keeps a kernel from reading what the
previous run left in the 50 MB L2, which would overstate memory-bound kernels.

The events time the device only while the host stays ahead of it. A call whose host work (Python,
argument checks, launches) outlasts its kernels leaves the device idle between them, and the events
then time the host: the H200 run of 2026-12-04 timed a Triton GEMM at m = 64 at 91 us eagerly and
19 us replayed from a CUDA graph, when only the 256 MB flush (~80 us of device time) kept the host
ahead. So the timed loop is queued behind a spin kernel (`torch.cuda._sleep`) sized to outlast the
host's queuing of it, and an event after the spin proves it did (still pending once the loop is
queued); otherwise the loop is queued again in shorter stretches behind longer spins. The time
reported is the device's, as a CUDA graph's replay or a server's queued steps see it, and each
call's host time is measured in the same loop and reported beside it (`host_ms`): an eager caller
waits for the longer of the two. A call that waits on the device itself (a host sync) cannot be
queued: it is timed as it runs, host included, and said so (`queued` False).

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


def _readings_until(done, begin=None) -> list[dict | None]:
    """NVML readings every millisecond from when `begin` has run (the spin ahead of a timed loop)
    until `done` has run (the loop's last event): the loop is queued ahead of the device, so they
    fall inside it (a loop shorter than one reading gets one taken just after it)."""
    while begin is not None and not begin.query():
        time.sleep(1e-4)
    readings = [gpu_reading()]
    while readings[0] is not None and len(readings) < _MAX_READINGS and not done.query():
        time.sleep(1e-3)
        readings.append(gpu_reading())
    return readings


class _CudaTimeline:
    """The device and host clocks `timed_loop` works with (the tests give it a simulated one)."""

    clock = staticmethod(time.perf_counter)  # host seconds

    @staticmethod
    def event():
        return torch.cuda.Event(enable_timing=True)

    @staticmethod
    def spin(ms: float):
        """Queues a kernel that keeps the device busy for about `ms` milliseconds."""
        torch.cuda._sleep(max(1, int(ms * _spin_cycles_per_ms(torch.cuda.current_device()))))

    @staticmethod
    def synchronize():
        torch.cuda.synchronize()

    @staticmethod
    def readings(done, begin) -> list[dict | None]:
        return _readings_until(done, begin)


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms(index: int) -> float:
    """Clock cycles torch.cuda._sleep spins per millisecond on device `index`: its SM clock, at
    least the highest NVML reports (a spin sized at a throttled clock would be short once the clock
    rises; a lower clock only makes a spin longer, the safe side)."""
    cycles, ms = 1 << 20, 0.0
    for _ in range(2):  # the first run may include loading the kernel
        start, end = _CudaTimeline.event(), _CudaTimeline.event()
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    reading = gpu_reading(index)
    return max(cycles / ms, reading["max_sm_mhz"] * 1e3 if reading else 0.0)


# (iterations queued behind one spin: a fraction of the loop, the spin's margin over the host's
# estimated queuing time) for each try. Shorter stretches stay within the driver's queue of
# pending launches (a full queue blocks the host until the spin ends); longer margins cover a host
# slower than its estimate. A call that fails even the last waits on the device itself.
_QUEUE_TRIES = ((1, 2.0), (8, 8.0), (None, 32.0))  # None: one call per spin
_MAX_SPIN_MS = 2000.0


def timed_loop(fn: Callable[[], object], before: Callable[[], object], iters: int,
               timeline=_CudaTimeline) -> dict:
    """Times `iters` runs of fn() (each after before(), untimed) queued behind spins, as the module's
    docstring says. Returns {"device_ms": [...], "host_ms": [...], "queued": bool, "readings": [...]}:
    each run's device time between its events and host time of the call."""
    begin = timeline.clock()
    for _ in range(2):  # the host's time per run, to size the spins
        before()
        fn()
    host_estimate_ms = (timeline.clock() - begin) * 1e3 / 2
    timeline.synchronize()
    result = {"device_ms": [], "host_ms": [], "queued": True, "readings": []}
    tries, confirming = list(_QUEUE_TRIES), False
    while len(result["device_ms"]) < iters:
        fraction, margin = tries[0] if tries else (None, 0.0)
        left = iters - len(result["device_ms"])
        n = left if not tries else min(left, 1 if fraction is None else max(1, iters // fraction))
        spun = None
        if tries:
            timeline.spin(min(_MAX_SPIN_MS, margin * n * host_estimate_ms + 0.2))
            spun = timeline.event()
            spun.record()
        events, host_ms = [], []
        for _ in range(n):
            before()
            start, end = timeline.event(), timeline.event()
            start.record()
            call = timeline.clock()
            fn()
            host_ms.append((timeline.clock() - call) * 1e3)
            end.record()
            events.append((start, end))
            if len(events) == 1 and spun is not None and spun.query():
                # One call outlasted a spin sized for n of them: it waits on the device (a host sync),
                # or the host stalled once (a GC pause, preemption). One call behind a long spin
                # tells them apart, then queuing goes on or gives up.
                tries = [None] if confirming else [None, (None, max(64.0, 10.0 / max(host_estimate_ms, 1e-3)))]
                confirming = True
                break
        if spun is not None and spun.query():  # the device caught up with the host: times not the device's
            timeline.synchronize()
            tries.pop(0)
            if not tries:  # timed as it runs from here on: no mix with the queued times of before
                result.update(device_ms=[], host_ms=[], queued=False)
            continue
        result["readings"] += timeline.readings(events[-1][1], spun)
        if confirming:  # it was a stall: queue as before
            tries, confirming = list(_QUEUE_TRIES), False
        timeline.synchronize()
        result["device_ms"] += [start.elapsed_time(end) for start, end in events]
        result["host_ms"] += host_ms
    return result


def bench_gpu(fn: Callable[[], object], *, warmup: int = 5, iters: int = 30, flush_l2: bool = True,
              telemetry: dict | None = None) -> float:
    """Median milliseconds of fn() on the current CUDA device (the device's time: see the module's
    docstring). telemetry: a dict that receives the median host time of a call ("host_ms"),
    whether the loop stayed queued behind the host ("queued"), and the device's state over the timed
    runs (summarize_readings' fields) where NVML can be read."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    loop = timed_loop(fn, flush.zero_ if flush is not None else (lambda: None), iters)
    if telemetry is not None:
        telemetry.update(summarize_readings(loop["readings"]) or {})
        telemetry.update(host_ms=statistics.median(loop["host_ms"]), queued=loop["queued"])
    return statistics.median(loop["device_ms"])


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
