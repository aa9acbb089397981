"""Host microseconds per call of the decode path's ops, without a GPU.

    python scripts/host_overhead.py [--repeats 31] [--calls 200] [--json out.json]

Each op runs on CPU tensors through the Triton backend under dskernels.testing.fake_gpu: Triton
compiles for sm_90a and runs its whole launch path (and ours, dskernels/triton/launch.py) up to
the compiled kernel's launcher, which records instead of launching. What remains is the host's
share of an eager call: argument checks, backend choice, allocations, the launch bookkeeping.
The calls are the ones a decode step of the tiny FP8 MoE layer makes (captured from one step of
scripts/host_profile.py's layer, replayed alone), beside gemm_fp8_fp8_bf16_nt and
flash_mla_with_kvcache at V3's shapes, a Triton launch through Triton's own path and through
ours, and yardsticks (torch.empty, torch.add: what any op call costs).

Not in it: the sm90 CUDA backend's C++ launch and torch.cuda's own calls (the fake GPU answers
get_device_capability / get_device_properties from a lambda: on a real GPU each costs a few
microseconds more). Values are medians over --repeats runs of --calls calls each, per call;
the CPU's speed and load move them, so compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # Triton's compiler and launch path, not its interpreter

import dskernels  # noqa: E402
from dskernels.testing.fake_gpu import fake_gpu  # noqa: E402

for _family in ("fp8_cast", "gemm", "layer", "mla", "moe"):  # defined now, compiled: imported lazily, a later
    importlib.import_module(f"dskernels.triton.{_family}")    # TRITON_INTERPRET would make them interpreted

# What a decode step calls: (module, name) wrapped to capture one call of each.
CAPTURED = [("dskernels", "get_mla_metadata"), ("dskernels", "flash_mla_with_kvcache"),
            ("dskernels", "per_token_cast_to_fp8"), ("dskernels", "gemm_fp8_fp8_bf16_nt"),
            ("dskernels", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"),
            ("dskernels", "m_grouped_gemm_fp8_fp8_bf16_nt_masked"), ("dskernels", "grouped_topk"),
            ("dskernels.triton.layer", "rms_norm"), ("dskernels.triton.layer", "rope_qk"),
            ("dskernels.triton.layer", "moe_sort_rows"), ("dskernels.triton.layer", "moe_combine"),
            ("dskernels.triton.layer", "write_latent_cache")]


def per_call_us(fn, repeats: int, calls: int) -> float:
    """Median over `repeats` runs of the mean time of `calls` calls, in microseconds."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - began) / calls * 1e6)
    return statistics.median(runs)


@contextlib.contextmanager
def capturing(calls: list):
    """Wraps CAPTURED where every dskernels module binds them; appends (label, fn, args, kwargs)
    of each first call to `calls`."""
    patched = []
    for module_name, name in CAPTURED:
        original = getattr(importlib.import_module(module_name), name)
        label = name if module_name == "dskernels" else f"triton.layer.{name}"

        def wrapper(*args, _original=original, _label=label, **kwargs):
            if all(c[0] != _label for c in calls):
                calls.append((_label, _original, args, kwargs))
            return _original(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("dskernels") and getattr(module, name, None) is original:
                patched.append((module, name, original))
                setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def v3_cases() -> list[tuple[str, object]]:
    """gemm_fp8_fp8_bf16_nt (q_a / kv_a's n = 2112 at k = 7168, m = 1) and flash_mla_with_kvcache
    (128 heads, d 576, a 4096-token context in pages of 64) at V3's shapes, batch 1; the split plan
    at batch 1, and in batch-invariant mode at batch 1 and 128."""
    fp8 = torch.float8_e4m3fn
    a = torch.randn(1, 7168).to(fp8)
    sa = torch.rand(1, 56)
    b = torch.randn(2112, 7168).to(fp8)
    sb = torch.rand(17, 56)
    out = torch.empty(1, 2112, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 128, 576).bfloat16()
    cache = torch.randn(65, 64, 1, 576).bfloat16()
    table = torch.arange(65, dtype=torch.int32).view(1, 65)
    lens = torch.tensor([4097], dtype=torch.int32)
    meta, splits = dskernels.get_mla_metadata(lens, 128, 1)
    x = torch.randn(1, 7168).bfloat16()
    lens_128 = torch.randint(1, 8192, (128,), dtype=torch.int32)

    def invariant_plan(lengths):  # the mode's plan (dskernels.batch_invariant(): the `with` included)
        with dskernels.batch_invariant():
            return dskernels.get_mla_metadata(lengths, 128, 1)
    return [("gemm_fp8_fp8_bf16_nt v3 m=1 n=2112 k=7168",
             lambda: dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)),
            ("flash_mla_with_kvcache v3 h=128 ctx=4096",
             lambda: dskernels.flash_mla_with_kvcache(q, cache, table, lens, 512, meta, splits, causal=True)),
            ("get_mla_metadata v3 b=1", lambda: dskernels.get_mla_metadata(lens, 128, 1)),
            ("get_mla_metadata v3 b=1 batch-invariant", lambda: invariant_plan(lens)),
            ("get_mla_metadata v3 b=128 batch-invariant", lambda: invariant_plan(lens_128)),
            ("per_token_cast_to_fp8 v3 [1, 7168]", lambda: dskernels.per_token_cast_to_fp8(x))]


def launch_cases() -> list[tuple[str, object]]:
    """One Triton kernel (the per-token cast's, 12 arguments) launched through Triton's own path
    (JITFunction.run) and through ours (launch.fast), the same arguments."""
    from dskernels.triton import fp8_cast
    from dskernels.triton.launch import fast

    x = torch.randn(1, 7168).bfloat16()
    out, scale = torch.empty(1, 7168, dtype=torch.uint8), torch.empty(1, 56)
    args = (x, out, scale, 1, x.stride(0), out.stride(0), scale.stride(0), scale.stride(1))
    kwargs = dict(BLOCK_M=fp8_cast.BLOCK_ROWS, GROUP=128, ROUND_SCALE=False, NATIVE=True, num_warps=4)
    kernel = fp8_cast._per_token_cast_kernel
    grid = (1, 56)
    try:
        kernel[grid](*args, **kwargs)
    except Exception as e:  # (the kernel's parameters moved: this yardstick is left out, the rest runs)
        print(f"launch yardstick skipped: {type(e).__name__}: {e}")
        return []
    return [("triton launch, Triton's path (JITFunction.run), 12 args", lambda: kernel[grid](*args, **kwargs)),
            ("triton launch, ours (launch.fast), 12 args", lambda: fast(kernel)[grid](*args, **kwargs))]


def profile(label: str, fn, calls: int) -> None:
    """cProfile of `calls` calls of fn: the functions with the most own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    print(f"--- {label}: {calls} calls, by own time (cProfile's overhead included) ---")
    pstats.Stats(profiler).strip_dirs().sort_stats("tottime").print_stats(25)


def yardsticks() -> list[tuple[str, object]]:
    a, b = torch.randn(1, 7168).bfloat16(), torch.randn(1, 7168).bfloat16()
    return [("torch.empty(1, 7168, bf16)", lambda: torch.empty(1, 7168, dtype=torch.bfloat16)),
            ("torch.add(a, b) [1, 7168] bf16", lambda: torch.add(a, b)),
            ("torch.ops.aten.add.Tensor(a, b)", lambda: torch.ops.aten.add.Tensor(a, b))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300, help="layer steps per repeat")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, help="cProfile the calls whose label contains this text")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import host_profile  # (the layer's fake-GPU step)

    os.environ.pop("TRITON_INTERPRET", None)  # (host_profile sets it where no GPU is and --fake-gpu is not given)

    torch.set_num_threads(1)  # the few torch ops run on the GPU there: no thread pool handoffs here
    rows = []
    with fake_gpu(cpu_tensors=True, keep=1) as gpu, dskernels.backend("triton"), torch.inference_mode():
        gpu.on_launch.append(host_profile._valid_router_ids)
        _, _, step = host_profile.fake_gpu_step(1, 37)
        calls: list = []
        with capturing(calls):
            step()
        launched = gpu.count
        step()
        launches = gpu.count - launched
        cases = [*yardsticks(), *launch_cases()]
        cases += [(f"{label} (layer step's call)", lambda f=fn, a=a, k=k: f(*a, **k)) for label, fn, a, k in calls]
        cases += v3_cases()
        for label, fn in cases:
            before = gpu.count
            fn()
            launches_per_call = gpu.count - before
            rows.append((label, per_call_us(fn, args.repeats, args.calls), launches_per_call))
            if args.profile and args.profile in label:
                profile(label, fn, args.calls * 10)
        step_us = per_call_us(step, max(args.repeats // 3, 5), args.steps // 10 or 1)
        rows.append(("whole layer decode step (tiny FP8 MoE, batch 1)", step_us, launches))
    width = max(len(r[0]) for r in rows)
    print(f"{'call':{width}} | host us (median) | launches")
    for label, us, n in rows:
        print(f"{label:{width}} | {us:16.1f} | {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"call": label, "host_us": us, "launches": n} for label, us, n in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
