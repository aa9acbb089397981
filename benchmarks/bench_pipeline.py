"""Pipeline schedules: DualPipe's README table from the simulator, and CPU/gloo step time.

    python benchmarks/bench_pipeline.py [--ranks 2] [--chunks 8] [--dim 256] [--steps 5] [--no-wall]

Schedules are not per-op kernels, so this family declares no `Case`s (`cases()` returns [] and
benchmarks/run.py skips it); `main()` prints

1. for PP in {4, 8, 16}: bubble (simulated, and the published formula), parameter copies and
   peak activations of 1F1B, ZB1P, DualPipe and DualPipeV. Costs: F = W = 1, B = 2 and an
   overlapped F&B of 2.5 (the overlap hiding half of a forward); chunks = 4 PP (DualPipe
   counts both directions). Everything in units of a 1F1B stage (1/PP of the model): DualPipeV,
   whose 2 PP stages are half as deep, is simulated with half the costs and half the activation
   per chunk.
2. wall time per training step on CPU with gloo: dskernels' DualPipeV against
   torch.distributed.pipelining's ScheduleDualPipeV on the same MLP stages (same chunks).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dskernels.pipeline import schedule as S  # noqa: E402

COSTS = dict(F=1.0, B=2.0, W=1.0, FB=2.5)


def cases(quick: bool = False, device: str = "cpu") -> list:
    """No per-op cases: schedules are benchmarked by main() (module docstring)."""
    return []


def table(costs=COSTS) -> list[tuple]:
    """(PP, method, bubble, formula, params, peak activations, makespan) per schedule.

    Units are those of a 1F1B stage (1/PP of the model) throughout: DualPipeV cuts the model into
    2 PP stages, so it is simulated with half the costs and its activations (chunks of half a
    stage) are halved."""
    F, B, W, FB = costs["F"], costs["B"], costs["W"], costs["FB"]
    half = {k: v / 2 for k, v in costs.items()}
    rows = []
    for P in (4, 8, 16):
        N = 4 * P
        for name, order, formula, params, c, act_scale in (
                ("1F1B", S.one_f_one_b(P, N), (P - 1) * (F + B), "1x", costs, 1),
                ("ZB1P", S.zb1p(P, N), (P - 1) * (F + B - 2 * W), "1x", costs, 1),
                ("DualPipe", S.dualpipe(P, N), (P / 2 - 1) * (FB + B - 3 * W), "2x", costs, 1),
                ("DualPipeV", S.dualpipev(P, N), None, "1x", half, 0.5)):
            r = S.simulate(order, **c)
            rows.append((P, name, r.bubble, formula, params, max(r.peak_activations) * act_scale, r.makespan))
    return rows


def print_table(costs=COSTS):
    print(f"simulated with F={costs['F']:g} B={costs['B']:g} W={costs['W']:g} F&B={costs['FB']:g}, "
          "chunks = 4 PP")
    head = ("PP", "method", "bubble (sim)", "bubble (formula)", "params", "peak act", "makespan")
    print(" | ".join(head))
    for P, name, bubble, formula, params, act, span in table(costs):
        f = "-" if formula is None else f"{formula:g}"
        print(f"{P} | {name} | {bubble:g} | {f} | {params} | {act} | {span:g}")


# ---- wall time on CPU/gloo ---------------------------------------------------------------------

def _mlp(dim, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


def _wall_body(rank, world_size, dim, chunks, steps, result_path):
    import torch.distributed as dist

    from dskernels.pipeline import DualPipeV
    from dskernels.pipeline.weight_grad import Linear

    torch.set_num_threads(1)
    P = world_size
    stages = [_mlp(dim, s) for s in range(2 * P)]
    batch = chunks * 16
    x = torch.randn(batch, dim)
    y = torch.randn(batch, dim)

    def mse(out, label):
        return ((out - label) ** 2).mean()

    def deferrable(m):
        m = copy.deepcopy(m)
        for i, layer in enumerate(m):
            if isinstance(layer, nn.Linear):
                new = Linear(layer.in_features, layer.out_features)
                new.load_state_dict(layer.state_dict())
                m[i] = new
        return m

    def ours_step():
        if rank == 0:
            ours.step(x, num_chunks=chunks, criterion=mse, labels=[y])
        else:
            ours.step(num_chunks=chunks)

    def torch_step():
        if rank == 0:
            sched.step(x, target=y, losses=[])
        else:
            sched.step()

    ours = DualPipeV((deferrable(stages[rank]), deferrable(stages[2 * P - 1 - rank])))
    runners = {"dskernels DualPipeV": ours_step}
    times = {}
    try:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import ScheduleDualPipeV
        local = [copy.deepcopy(stages[rank]), copy.deepcopy(stages[2 * P - 1 - rank])]
        pstages = [PipelineStage(m, s, 2 * P, torch.device("cpu"))
                   for m, s in zip(local, (rank, 2 * P - 1 - rank))]
        sched = ScheduleDualPipeV(pstages, chunks, loss_fn=mse)
        runners["torch ScheduleDualPipeV"] = torch_step
    except Exception as e:  # report, do not hide ours
        times["torch ScheduleDualPipeV"] = f"failed: {type(e).__name__}: {e}"
    # Interleaved rounds, so load from other processes hits both alike; wall and rank 0's CPU.
    samples = {name: ([], []) for name in runners}
    for run in runners.values():
        run()  # warm-up (torch's schedule infers shapes on its first step)
    for _ in range(steps):
        for name, run in runners.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            cpu = time.process_time() - c0
            dist.barrier()
            samples[name][0].append(time.perf_counter() - t0)
            samples[name][1].append(cpu)
    for name, (wall, cpu) in samples.items():
        times[name] = (statistics.median(wall), statistics.median(cpu))
    if rank == 0:
        import json
        with open(result_path, "w") as f:
            json.dump(times, f)


def wall_time(ranks, dim, chunks, steps) -> dict:
    import json
    import tempfile

    from dskernels.testing import run_distributed
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        run_distributed(_wall_body, ranks, dim, chunks, steps, path, timeout_s=300)
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-wall", action="store_true", help="only the simulated table")
    args = parser.parse_args(argv)
    for name in ("ranks", "chunks", "dim", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    print_table()
    if not args.no_wall:
        print(f"\nwall time per step, CPU/gloo, {args.ranks} ranks, {args.chunks} chunks of 16 rows, "
              f"2 x Linear({args.dim}) per stage, median of {args.steps} interleaved rounds:")
        for name, t in wall_time(args.ranks, args.dim, args.chunks, args.steps).items():
            print(f"  {name}: " + (f"wall {t[0] * 1e3:.1f} ms, rank 0 CPU {t[1] * 1e3:.1f} ms"
                                   if isinstance(t, list) else t))
        print(f"  (load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
