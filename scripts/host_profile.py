"""Where the host's time goes in one eager decode step of the DeepSeek-V3 layer.

    python scripts/host_profile.py [--config v3] [--batch 1] [--steps 20] [--backend auto]

The H200 run of 2026-12-04 timed the FP8 layer's eager decode step at batch 1 at 6.3 ms, for ~0.14 ms
of bytes: the GPU waits on the host (launches, argument checks, Python). This runs the step of
benchmarks/bench_model.py (`decode_case`) `--steps` times under cProfile, with no synchronization
in between (as an eager server loop runs), and prints the wall time per step and the functions that took the most host time:
their own time (tottime) and with what they call (cumtime). On a GPU it first splits the step's
time three ways, to tell a host-bound step from a GPU-bound one or one that waits on the device:
the host's time to enqueue a step, the device's busy time per step (torch.profiler's kernels), and
the synchronizing calls in one step (torch.cuda.set_sync_debug_mode). On CPU (`--config tiny`) it
runs the same code path on the reference or Triton's interpreter: a smoke test of the script, not
a profile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dskernels  # noqa: E402
from benchmarks import bench_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="bench_model's config name (default: v3 on a GPU, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default: "
                        "bench_model.CONTEXT on a GPU, 37 on CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto", help="auto (no backend forced), triton, cuda or ref")
    parser.add_argument("--rows", type=int, default=30, help="functions listed per table")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    config = args.config or ("v3" if on_gpu else "tiny")
    context = args.context or (bench_model.CONTEXT if on_gpu else 37)
    case = bench_model.decode_case(config, 3 if config.startswith("v3") else 1, args.batch, context, True, device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    with dskernels.backend(args.backend):
        inputs = case.make_inputs(device)
        for _ in range(3):  # compiles, autotuning, first-call setup
            case.run(*inputs)
        sync()

        began = time.perf_counter()
        for _ in range(args.steps):
            case.run(*inputs)
        enqueue_ms = (time.perf_counter() - began) * 1e3 / args.steps
        sync()
        wall_ms = (time.perf_counter() - began) * 1e3 / args.steps
        split = None
        if on_gpu:
            try:
                split = split_step(lambda: case.run(*inputs), args.steps)
            except Exception as e:  # never run on a GPU yet: the profile below stands without it
                print(f"host profile: the device split failed: {type(e).__name__}: {e}")

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            case.run(*inputs)
        sync()
        profiler.disable()

    shape = " ".join(f"{k}={v}" for k, v in case.params.items())
    print(f"host profile: {case.op} {shape} backend={args.backend} on {device}: {wall_ms:.3f} ms per step "
          f"eagerly ({args.steps} steps, no sync between; run.py's --profile gives the kernels' own time)")
    print(f"host profile: enqueueing a step took {enqueue_ms:.3f} ms of host time"
          + (f"; the device was busy {split['busy_ms']:.3f} ms per step ({split['kernels']:.0f} kernels); "
             f"{split['syncs']} synchronizing call(s) in one step{': ' + split['first'] if split['first'] else ''}"
             if split else " (no device split: " + ("it failed)" if on_gpu else "GPU only)")))
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.strip_dirs().sort_stats(order).print_stats(args.rows)
        print(f"--- by {order} (cProfile's overhead included; {args.steps} steps) ---")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
    return 0


def split_step(step, steps: int) -> dict:
    """The device's busy time and kernel count per step (torch.profiler over `steps` steps), and the
    host synchronizations of one step (torch.cuda.set_sync_debug_mode's warnings: .item(),
    nonzero, a blocking copy...). A step far longer than both its enqueue time and its busy time
    waits on such a call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"busy_ms": busy_ms, "kernels": len(kernels) / steps, "syncs": len(syncs),
            "first": syncs[0] if syncs else ""}


if __name__ == "__main__":
    sys.exit(main())
