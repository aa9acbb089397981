"""Where the host's time goes in one eager decode step of the DeepSeek-V3 layer.

    python scripts/host_profile.py [--config v3] [--batch 1] [--steps 20] [--backend auto]
    python scripts/host_profile.py --fake-gpu [--batch 1] [--steps 200]   # without a GPU

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

--fake-gpu (no GPU needed) times the host's share for real: the tiny model's FP8 layer (bf16
activations, FP8 weights, the GPU's code path) on CPU tensors through the Triton backend, with
Triton compiling for sm_90a and running its whole launch path up to the launcher, which records
instead of launching (dskernels.testing.fake_gpu). Nothing is computed (the router's ids are made
valid so the step's host code can go on); the host time is what the same Python costs on a GPU
machine's CPU, the real config's as well (the same launches, other sizes). CUDA ops (cuBLAS, the
sm90 kernels) are not in it: the CPU runs torch's own kernels for the few torch ops, their compute
included (einsum, mm; tiny at this size).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import os
import pstats
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "--fake-gpu" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # Triton's compiler and launch path, not its interpreter
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dskernels  # noqa: E402
from benchmarks import bench_model  # noqa: E402
from dskernels.models import DeepseekV3DecoderLayer  # noqa: E402
from dskernels.testing.fake_gpu import fake_gpu  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="bench_model's config name (default: v3 on a GPU, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default: "
                        "bench_model.CONTEXT on a GPU, 37 on CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto", help="auto (no backend forced), triton, cuda or ref")
    parser.add_argument("--rows", type=int, default=30, help="functions listed per table")
    parser.add_argument("--fake-gpu", action="store_true", help="no GPU: the GPU's code path on CPU tensors, "
                        "Triton's launches recorded, not run (see above)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.fake_gpu
    device = "cuda" if on_gpu else "cpu"
    config = args.config or ("v3" if on_gpu else "tiny")
    context = args.context or (bench_model.CONTEXT if on_gpu else 37)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    with contextlib.ExitStack() as scope:
        if args.fake_gpu:
            if config != "tiny":
                parser.error("--fake-gpu: the tiny config only (the real one's weights take ~40 GB of memory)")
            gpu = scope.enter_context(fake_gpu(cpu_tensors=True, keep=1))
            gpu.on_launch.append(_valid_router_ids)
            args.backend = "triton"  # (auto takes the reference on CPU tensors)
            # the torch ops computing here run on the GPU there: no thread pool handoffs in the time
            torch.set_num_threads(1)
            op, shape, step = fake_gpu_step(args.batch, context)
        else:
            case = bench_model.decode_case(config, 3 if config.startswith("v3") else 1, args.batch, context, True,
                                           device)
            op, shape = case.op, " ".join(f"{k}={v}" for k, v in case.params.items())
            step = functools.partial(case.run, *case.make_inputs(device))
        scope.enter_context(dskernels.backend(args.backend))
        for _ in range(3):  # compiles, autotuning, first-call setup
            step()
        sync()

        launched = gpu.count if args.fake_gpu else 0
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        enqueue_ms = (time.perf_counter() - began) * 1e3 / args.steps
        launched = (gpu.count - launched) / args.steps if args.fake_gpu else None
        sync()
        wall_ms = (time.perf_counter() - began) * 1e3 / args.steps
        split = None
        if on_gpu:
            try:
                split = split_step(step, args.steps)
            except Exception as e:  # never run on a GPU yet: the profile below stands without it
                print(f"host profile: the device split failed: {type(e).__name__}: {e}")

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        sync()
        profiler.disable()

    where = "a fake sm_90a GPU (Triton's launches recorded, not run)" if args.fake_gpu else device
    print(f"host profile: {op} {shape} backend={args.backend} on {where}: {wall_ms:.3f} ms per step "
          f"eagerly ({args.steps} steps, no sync between; run.py's --profile gives the kernels' own time)")
    print(f"host profile: enqueueing a step took {enqueue_ms:.3f} ms of host time"
          + (f"; the device was busy {split['busy_ms']:.3f} ms per step ({split['kernels']:.0f} kernels); "
             f"{split['syncs']} synchronizing call(s) in one step{': ' + split['first'] if split['first'] else ''}"
             if split else " (no device split: " + ("it failed)" if on_gpu else "GPU only)"))
          + (f"; {launched:.0f} Triton launches per step" if launched is not None else ""))
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.strip_dirs().sort_stats(order).print_stats(args.rows)
        print(f"--- by {order} (cProfile's overhead included; {args.steps} steps) ---")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
    return 0


def fake_gpu_step(batch: int, context: int):
    """(op, shape, step) of the tiny model's FP8 MoE layer decoding on CPU tensors as it would on a
    GPU (bf16 activations, FP8 weights, a bf16 paged cache of page 64), for --fake-gpu."""
    cfg = bench_model._config("tiny")
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, device="cpu")
    layer.load_hf_state_dict(bench_model.random_checkpoint(cfg, 1, "cpu", True), fp8=True)
    pages = -(-(context + 1) // bench_model.PAGE)
    cache = torch.randn(batch * pages, bench_model.PAGE, 1, cfg.kv_cache_dim).to(torch.bfloat16)
    table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32)
    x = torch.randn(batch, 1, cfg.hidden_size).to(torch.bfloat16)
    positions = torch.full((batch, 1), context, dtype=torch.long)

    def step():
        with torch.no_grad():
            return layer(x, positions, kv_cache=cache, block_table=table, cache_seqlens=lens)

    shape = f"config=tiny layer=moe weights=fp8 batch={batch} context={context}"
    return "deepseek_v3_layer_decode", shape, step


def _valid_router_ids(launch) -> None:
    """The router's outputs, which a fake GPU does not compute, made valid (experts 0..k-1, equal
    weights): the step's host code sorts tokens by them."""
    if launch.kernel == "_grouped_topk_kernel":
        ids, weights = launch.args[2], launch.args[3]
        ids.copy_(torch.arange(ids.shape[1]).expand_as(ids))
        weights.fill_(1 / ids.shape[1])


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
