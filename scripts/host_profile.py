"""Where the host's time goes in one eager decode step of the DeepSeek-V3 layer.

    python scripts/host_profile.py [--config v3] [--batch 1] [--steps 20] [--backend auto]

The H200 run of 2026-12-04 timed the FP8 layer's eager decode step at batch 1 at 6.3 ms, for ~0.14 ms
of bytes: the GPU waits on the host (launches, argument checks, Python). This runs the step of
benchmarks/bench_model.py (`decode_case`) `--steps` times under cProfile, with no synchronization
in between (as an eager server loop runs), and prints the wall time per step and the functions that took the most host time:
their own time (tottime) and with what they call (cumtime). On CPU (`--config tiny`) it runs the
same code path on the reference or Triton's interpreter: a smoke test of the script, not a profile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

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
        sync()
        wall_ms = (time.perf_counter() - began) * 1e3 / args.steps

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            case.run(*inputs)
        sync()
        profiler.disable()

    shape = " ".join(f"{k}={v}" for k, v in case.params.items())
    print(f"host profile: {case.op} {shape} backend={args.backend} on {device}: {wall_ms:.3f} ms per step "
          f"eagerly ({args.steps} steps, no sync between; run.py's --profile gives the kernels' own time)")
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.strip_dirs().sort_stats(order).print_stats(args.rows)
        print(f"--- by {order} (cProfile's overhead included; {args.steps} steps) ---")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
