"""Runs the benchmark families (benchmarks/bench_<family>.py) and reports them.

    python benchmarks/run.py [--ops fp8_cast,mla] [--quick | --targets] [--json results.json]

On a GPU: measures the two ceilings first (device-to-device copy bandwidth, 8192^3 bf16 and fp8
matmul rates), then times every case on every backend that runs here (L2 flushed, median of CUDA
event timings; a case's backends, variants and peers (PyTorch eager and torch.compile of the same
math) in alternating rounds, so that none is always timed last on a GPU whose clocks sink as it
heats; the peers in the CUDA runs' rounds where the case has them), and prints

    op | backend | shape | us | host us | TFLOPS | GB/s | % of roofline | x peer | SM MHz

where us is the device's time (each run queued behind a spin that keeps the host ahead of the
device, dskernels/testing/bench.py: what a CUDA graph's replay or a server's queued steps see),
host us the host's time per call (an eager caller waits for the longer of the two; "(syncs)": a
call that waits on the device, or launches more than the driver queues, timed as it runs),
% of roofline = the time the ceilings allow / the measured time, x peer = the fastest
peer's time / ours (each peer is checked against the oracle first, where its case says how: a wrong
one is reported as WRONG and left out of x peer; records' peer_unchecked says why one was not),
and SM MHz the lowest SM clock NVML read during the timed runs, with the slowdown reasons it
reported (power cap, thermal; records' "gpu" field; empty without pynvml).
Without a GPU it runs each op on tiny shapes through every backend available
(the reference, Triton's interpreter), checks it against the oracle and reports CPU times only:
throughput needs a Hopper GPU. Every output is checked against python_ref; the exit status is 1
if any is wrong. On a GPU the report ends with the issues' performance targets
(benchmarks/targets.py) as far as this run measured them; --targets runs just their shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton kernels are defined

import dskernels  # noqa: E402
from benchmarks import targets  # noqa: E402
from dskernels.testing import bench  # noqa: E402

# A case's runs on a GPU are timed in 4 rounds (forward, backward, backward, forward: timing_orders)
# of 8 calls each: about bench_gpu's 30 calls per run, as before the rounds.
TIMING_ROUNDS, ITERS_PER_ROUND = 4, 8


def families() -> list[str]:
    return sorted(os.path.basename(p)[len("bench_"):-3]
                  for p in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


def git_sha(root: str = ROOT) -> str:
    """HEAD's short sha, "+dirty" where tracked files differ from it: a device call runs the working
    tree it was given, uncommitted edits included, and the records must not credit HEAD with them."""
    def git(*args):
        return subprocess.check_output(["git", *args], cwd=root, text=True, stderr=subprocess.DEVNULL).strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def shape_text(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


class Report:
    COLUMNS = ("op", "backend", "shape", "us", "host us", "TFLOPS", "GB/s", "% roofline", "x peer", "SM MHz")

    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cells):
        self.rows.append(tuple(str(c) for c in cells))
        print(" | ".join(self.rows[-1]), flush=True)

    def table(self) -> str:
        widths = [max(len(r[i]) for r in [self.COLUMNS, *self.rows]) for i in range(len(self.COLUMNS))]
        lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [self.COLUMNS, *self.rows]]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="", help="comma-separated families or op names, run in that order "
                        f"(default: all); families: {', '.join(f for f in families() if f != 'pipeline')} "
                        "(pipeline's schedule table: python benchmarks/bench_pipeline.py)")
    parser.add_argument("--quick", action="store_true", help="one or two shapes per op")
    parser.add_argument("--targets", action="store_true", help="only the issues' target shapes and the backends, "
                        "candidates and peers they are judged by (benchmarks/targets.py), then their table; GPU only")
    parser.add_argument("--json", default=None, help="write one record per op, backend and shape here")
    parser.add_argument("--backends", default="", help="comma-separated subset of ref,triton,cuda")
    parser.add_argument("--variants", default="", help="comma-separated variant labels to time besides each "
                        "backend's default run (graph: the triton[graph] and cuda[graph] rows); none: no variants; "
                        "default: all (a full grid's variants cost several times its default runs' device time)")
    parser.add_argument("--no-cuda", default="", help="families or ops whose cuda backend is not run (their "
                        "GPU tests failed: scripts/gpu_check.sh fills it in)")
    parser.add_argument("--profile", default="", help="families or ops whose first case is also profiled once "
                        "per backend and variant (torch.profiler): where its time goes, kernel by kernel; "
                        "NAME@TEXT profiles the first case whose shape has TEXT's words (gemm_fp8_fp8_bf16_nt@m=64)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    # A misspelt name must not silently skip a family (--ops) or let a failed kernel run (--no-cuda).
    cases_by_family = {family: _family_cases(family, args.quick, device) for family in families()}
    names = {w for family, cases in cases_by_family.items() if cases for w in (family, *(c.op for c in cases))}
    for flag, value, known in (("--ops", args.ops, names), ("--no-cuda", args.no_cuda, names),
                               ("--profile", ",".join(w.split("@")[0] or "(empty name)" for w in _words(args.profile)), names),
                               ("--backends", args.backends, {"ref", "triton", "cuda"})):
        unknown = sorted(set(_words(value)) - known)
        if unknown:
            # A family without per-op cases (pipeline: schedules, not kernels) has its own script.
            hints = "".join(f"; {w} has no per-op cases: run python benchmarks/bench_{w}.py"
                            for w in unknown if w in cases_by_family)
            print(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}{hints}")
            return 2
    if args.targets and not on_gpu:
        print("--targets times the issues' target shapes, which needs a GPU; "
              "python benchmarks/targets.py evaluates recorded results")
        return 2
    available = dskernels.available_backends()
    if args.backends:
        if not (usable := [b for b in available if b in _words(args.backends)]):
            print(f"--backends {args.backends}: none of them runs here (this machine has: {', '.join(available)}; "
                  "cuda needs a Hopper GPU and a CUDA build, triton a GPU or TRITON_INTERPRET=1)")
            return 2
        available = usable
    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()})"
    meta = {"device": device_name, "git_sha": git_sha(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv])}
    print(f"dskernels benchmarks on {device_name}; backends: {', '.join(available)}; "
          f"torch {torch.__version__}; git {meta['git_sha']}")

    ceilings = {}
    if on_gpu:
        states = {"bf16": {}, "fp8": {}}  # the matmul rates hold at the clock they ran at
        ceilings = {"copy_gbps": bench.measure_copy_gbps(),
                    "bf16_tflops": bench.measure_matmul_tflops(telemetry=states["bf16"]),
                    "fp8_tflops": bench.measure_fp8_matmul_tflops(telemetry=states["fp8"])}
        meta["ceilings_gpu"] = {k: v for k, v in states.items() if v}
        print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['bf16_tflops']:.0f} "
              f"TFLOPS{clock_note(states['bf16'])}, fp8 matmul {ceilings['fp8_tflops'] or float('nan'):.0f} "
              f"TFLOPS{clock_note(states['fp8'])}")
    else:
        print("no GPU: checking every backend against the oracle on tiny shapes and reporting CPU times; "
              "TFLOPS, GB/s and roofline figures need a Hopper GPU (run scripts/gpu_check.sh there)")

    report, records, failures = Report(), [], []
    no_cuda = set(_words(args.no_cuda))
    # Each --profile request profiles the first case it matches (NAME: the family or op; TEXT: words
    # of the shape, each a whole word: m=64 is not m=640), once.
    unprofiled = {w: w.partition("@") for w in _words(args.profile)}
    variants = set(_words(args.variants)) - {"none"} if args.variants else None
    selection = (target_cases(args.ops, device) if args.targets
                 else [(family, case, None) for family, case in selected_cases(args.ops, args.quick, device)])
    for family, case, only in selection:
        shape_words = set(shape_text(case.params).split())
        matched = [w for w, (name, _, text) in unprofiled.items()
                   if name in (family, case.op) and set(text.split()) <= shape_words]
        run_case(case, device, available, ceilings, meta, report, records, failures,
                 no_cuda=bool(no_cuda & {family, case.op}), profile=bool(matched), only=only, variants=variants)
        for w in matched:
            del unprofiled[w]
        if args.json:  # after every case: a run stopped at a device call's time limit keeps what it measured
            write_json(args.json, meta, ceilings, records)

    print()
    print(report.table())
    if on_gpu:  # how far this run's numbers are from the issues' goals
        print()
        print(targets.table({device_name: records}, {device_name: ceilings.get("copy_gbps")}))
    for w in unprofiled:  # a misspelt shape must not pass for a profile that showed nothing
        print(f"--profile {w}: no case of this run matched it")
    for label in sorted((variants or set()) - seen_variants(selection)):  # nor a misspelt variant
        print(f"--variants {label}: no case of this run has it")
    if args.json:
        write_json(args.json, meta, ceilings, records)
        print(f"wrote {len(records)} records to {args.json}")
    if failures:
        print(f"\n{len(failures)} WRONG OR FAILED:\n  " + "\n  ".join(failures))
        return 1
    if not records:
        print("no benchmark case matched --ops/--backends")
        return 1
    return 0


def _words(value: str) -> list[str]:
    return [w.strip() for w in value.split(",") if w.strip()]


def seen_variants(selection) -> set[str]:
    """The variant labels (the words in brackets: "graph" of "cuda[graph]") the selected cases have."""
    return {label for _, case, _ in selection
            for label in (*case.triton_variants, *case.cuda_variants, *case.auto_variants)}


def _family_cases(family: str, quick: bool, device: str):
    return importlib.import_module(f"benchmarks.bench_{family}").cases(quick, device)


def selected_cases(ops: str, quick: bool, device: str):
    """(family, case) pairs matching --ops (family or op names), in the order --ops names them
    (the first things named run first, for a device call with little time); all when empty."""
    wanted = _words(ops)
    picked = []
    for family in families():
        for case in _family_cases(family, quick, device):
            ranks = [i for i, w in enumerate(wanted) if w in (family, case.op)]
            if ranks or not wanted:
                picked.append((min(ranks, default=0), family, case))
    picked.sort(key=lambda item: item[0])  # stable: within one name, the family's own order
    return [(family, case) for _, family, case in picked]


def target_cases(ops: str, device: str):
    """(family, case, labels) for every case of the full grids that a target of benchmarks/targets.py
    names (and --ops, if given, also names), in the targets' order; labels: the backends, candidate
    variants and peers those targets read (nothing else of the case is run)."""
    wanted = set(_words(ops))
    picked = {}
    for family in families():
        for case in _family_cases(family, False, device):
            if wanted and not wanted & {family, case.op}:
                continue
            for rank, target in enumerate(targets.TARGETS):
                if target.op == case.op and any(targets.matches(case.params, s) for s in target.shapes):
                    entry = picked.setdefault(id(case), [rank, family, case, set()])
                    entry[3] |= target.labels()
    return [(family, case, labels) for _, family, case, labels in sorted(picked.values(), key=lambda e: e[0])]


def write_json(path, meta, ceilings, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    strict = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in records]  # NaN: null
    with open(path + ".part", "w") as f:
        json.dump({"meta": {**meta, "ceilings": ceilings}, "records": strict}, f, indent=1)
    os.replace(path + ".part", path)


def run_case(case, device, available, ceilings, meta, report, records, failures, no_cuda=False, profile=False,
             only=None, variants=None):
    """Checks and times `case` on every backend, variant and peer available (only: the labels to run,
    "triton", "cuda[m64]", "peer:torch._scaled_mm"; None: all; variants: the variant labels to run,
    "graph" for triton[graph] and cuda[graph]; None: all)."""
    shape = shape_text(case.params)
    # Inputs (FP8 casts of random data, a model's weights) and the oracle are set up off the CUDA
    # kernels, which `auto` picks on Hopper: those run last, checked, and only where not --no-cuda.
    setup = "triton" if device == "cuda" and "triton" in available else None
    try:
        with dskernels.backend(setup) if setup else contextlib.nullcontext():
            inputs = case.make_inputs(device)
            expected = case.reference(*inputs)
    except Exception as e:  # a case that cannot be set up is reported; the next cases still run
        traceback.print_exc()
        failures.append(f"{case.op} {shape}: inputs or reference raised {type(e).__name__}: {e}")
        return
    backends = [b for b in ("ref", "triton", "cuda") if b in available and b in case.backends]
    if "auto" in case.backends and device == "cuda" and "triton" in available:  # the default choice
        backends.append("auto")
    for runs_cuda in ("cuda", "auto"):
        if no_cuda and runs_cuda in backends:  # its GPU tests failed: a fault would end the whole run
            backends.remove(runs_cuda)
            print(f"{case.op} {shape}: {runs_cuda} backend skipped (--no-cuda)")
    runs = [(b, b, {}) for b in backends]
    for backend, backend_variants in (("triton", case.triton_variants), ("cuda", case.cuda_variants),
                                      ("auto", case.auto_variants)):
        if backend in backends and device == "cuda":
            runs += [(backend, f"{backend}[{label}]", env) for label, env in backend_variants.items()
                     if variants is None or label in variants]
    if only is not None:
        runs = [run for run in runs if run[1] in only]

    # Every backend is checked before any is timed, and each checked output is poisoned before the
    # next runs: the next run's outputs reuse that memory (the caching allocator's freed blocks, or
    # the same `out` argument), so a kernel that writes nothing cannot pass on what an earlier,
    # correct run left there. (Timed runs would leave correct outputs behind again.)
    # CUDA kernels come last, checked and timed after every other backend: a fault there (a never-run
    # kernel) ends the process's CUDA context, and must not take the Triton and reference numbers.
    problems, ours = {}, {}  # ours: backend (or "cuda[variant]") -> its record
    timer = bench.bench_gpu if device == "cuda" else bench.bench_cpu
    # (auto runs the CUDA kernels on Hopper: it goes with them)
    others, cuda_runs = [r for r in runs if r[0] not in ("cuda", "auto")], [r for r in runs if r[0] in ("cuda", "auto")]
    rounds = TIMING_ROUNDS if device == "cuda" else 1  # (CPU times are the interpreter's: no clocks to drift)
    # The peers (timed on a GPU only) go in the alternating rounds too, with the CUDA runs where there
    # are any (else with the others): timed after every run of ours, on a GPU whose clocks had sunk,
    # they came out slower than they are and flattered "x peer".
    peers = {}  # peer name -> its record
    peer_calls = {name: peer for name, peer in case.peers.items()
                  if device == "cuda" and (only is None or f"peer:{name}" in only)}
    # Each peer is checked against the oracle once before any run is timed (as ours are, and its
    # output poisoned likewise): a wrong one is timed and reported (WRONG) but left out of x peer;
    # one that raises is reported and not timed.
    peer_problems, peer_unchecked = {}, {}
    for name in list(peer_calls):
        peer_problems[name], peer_unchecked[name] = check_peer(case, name, inputs, expected)
        if (peer_problems[name] or "").startswith("raised"):
            del peer_calls[name]
        if peer_problems[name]:
            print(f"peer:{name} on {case.op} {shape}: {peer_problems[name]} (left out of x peer)")
    with_peers = {"peers": peer_calls, "peer_records": peers}
    check_and_time(case, others, inputs, expected, timer, problems, ours, ceilings, meta, failures, shape, rounds,
                   **({} if cuda_runs else with_peers))
    if others and cuda_runs and not (problems[others[0][1]] or "").startswith("raised"):
        # The timed runs left correct outputs behind: one more run, poisoned, before the cuda checks.
        with dskernels.backend(others[0][0]), environment(others[0][2]):
            poison(case.run(*inputs))
    check_and_time(case, cuda_runs, inputs, expected, timer, problems, ours, ceilings, meta, failures, shape,
                   rounds, **(with_peers if cuda_runs else {}))
    if profile:
        for backend, label, env in runs:
            if not (problems.get(label) or "").startswith("raised"):
                with environment(env):
                    print_profile(case.op, shape, label, lambda: case.run(*inputs), device, backend)
        if device == "cuda":  # the peers too: where their time goes, beside ours
            for name, peer in case.peers.items():
                print_profile(case.op, shape, f"peer:{name}", lambda peer=peer: peer(*inputs), device)

    for name, problem in peer_problems.items():
        if name not in peers and problem:  # raised when checked (one that raised when timed: printed there)
            peers[name] = record(case, f"peer:{name}", float("nan"), ceilings, meta, problem)
        if name in peers:
            peers[name]["error"] = problem
            peers[name]["peer_unchecked"] = peer_unchecked[name]  # the reason it was not checked, if so
    best_peer_ms = min((r["ms"] for r in peers.values() if not r["error"] and r["ms"] == r["ms"]), default=None)

    for rec in ours.values():
        ms = rec["ms"]
        rec["x_peer"] = best_peer_ms / ms if best_peer_ms and ms == ms else None
    for rec in [*ours.values(), *peers.values()]:
        label = ("WRONG " if rec["error"] else "") + rec["backend"]
        x_peer = fmt(rec["x_peer"], "{:.2f}x") if not rec["backend"].startswith("peer:") else (
            "1.00x" if rec["ms"] == best_peer_ms and not rec["error"] else "")
        report.add(case.op, label, shape, f"{rec['ms'] * 1e3:.1f}", host_text(rec), fmt(rec["tflops"]),
                   fmt(rec["gbps"]),
                   fmt(rec["roofline"] and 100 * rec["roofline"]), x_peer, clock_text(rec.get("gpu")))
        records.append(rec)


def check_peer(case, name: str, inputs: tuple, expected) -> tuple[str | None, str | None]:
    """(problem, unchecked): runs peer `name` once on `inputs` and checks its output as
    case.peer_checks says (problem: None if right, else why not; "raised ..." if it raised), or
    (None, the reason) for a peer declared unchecked (not run)."""
    how = case.peer_checks.get(name)
    if isinstance(how, str):
        return None, how
    try:
        out = case.peers[name](*inputs)
        problem = case.check(out, expected) if how is None else how(out, expected, *inputs)
    except Exception as e:  # reported beside the peer, never fatal
        return f"raised {type(e).__name__}: {e}", None
    poison(out)  # an output it shares with ours (an out argument) must not pass ours a right answer
    return problem, None


def timing_orders(n: int, rounds: int) -> list[list[int]]:
    """The order the n runs of a case are timed in, per round: forward, backward, backward, forward,
    ... With a multiple of 4 rounds every run has the same mean position, so a clock that drifts
    linearly over the case biases none of them (a curved drift still can: the mean square position
    differs between runs); one round is just the runs in order."""
    return [list(range(n)) if r % 4 in (0, 3) else list(range(n))[::-1] for r in range(rounds)]


def merge_telemetry(states: list[dict]) -> dict:
    """One run's telemetry over its rounds: the median host time, queued only if every round was,
    and the device's state over them all (lowest SM clock, highest power and temperature, every
    slowdown reason)."""
    states = [s for s in states if s]
    if len(states) <= 1:
        return dict(states[0]) if states else {}
    merged = {}
    for key, pick in (("host_ms", statistics.median), ("queued", all), ("sm_mhz", min), ("max_sm_mhz", max),
                      ("power_w", max), ("temp_c", max), ("readings", sum)):
        values = [s[key] for s in states if key in s]
        if values:
            merged[key] = pick(values)
    if any("slowdowns" in s for s in states):
        merged["slowdowns"] = sorted({reason for s in states for reason in s.get("slowdowns", ())})
    return merged


def check_and_time(case, runs, inputs, expected, timer, problems, ours, ceilings, meta, failures, shape, rounds=1,
                   peers=None, peer_records=None):
    """Checks every run of `runs`, then times those that did not raise; fills problems and ours.
    rounds > 1: the runs are timed in alternating rounds (timing_orders) of ITERS_PER_ROUND calls each
    and a run's time is the mean of its rounds' medians, so that none of them (the variants after the
    default) is always timed last, on a GPU whose clocks have sunk as it heated. peers: name ->
    callable, timed in the same rounds (not checked: each returns its own form) into peer_records;
    one that raises is reported and left out."""
    for backend, label, env in runs:
        try:
            with dskernels.backend(backend), environment(env):
                result = case.run(*inputs)
                problems[label] = case.check(result, expected)
                poison(result)
                del result
        except Exception as e:  # report and go on: one broken backend must not hide the others
            traceback.print_exc()
            problems[label] = f"raised {type(e).__name__}: {e}"
    timed = [(backend, label, env, lambda: case.run(*inputs)) for backend, label, env in runs
             if not (problems[label] or "").startswith("raised")]
    timed += [(None, f"peer:{name}", {}, lambda peer=peer: peer(*inputs)) for name, peer in (peers or {}).items()]
    times, states, raised = {t[1]: [] for t in timed}, {t[1]: [] for t in timed}, {}
    options = {"iters": ITERS_PER_ROUND} if rounds > 1 else {}
    for order in timing_orders(len(timed), rounds):
        for backend, label, env, call in (timed[j] for j in order):
            if label in raised:
                continue
            state = {}
            try:
                with dskernels.backend(backend) if backend else contextlib.nullcontext(), environment(env):
                    times[label].append(timer(call, telemetry=state, **options))
                    states[label].append(state)
            except Exception as e:
                if backend is None:  # a peer that cannot run this shape is reported, not fatal
                    print(f"{label} failed on {case.op} {shape}: {type(e).__name__}: {e}")
                else:
                    traceback.print_exc()
                raised[label] = f"raised {type(e).__name__} when timed: {e}"
    for name in peers or {}:
        label = f"peer:{name}"
        if label not in raised and times[label]:
            peer_records[name] = record(case, label, statistics.mean(times[label]), ceilings, meta, None,
                                        merge_telemetry(states[label]))
    for backend, label, env in runs:
        problem, ms, state = problems[label], float("nan"), {}
        if label in raised:
            problem = raised[label]
        elif label in times:
            ms, state = statistics.mean(times[label]), merge_telemetry(states[label])
        if problem:
            failures.append(f"{case.op} [{label}] {shape}: {problem}")
        ours[label] = record(case, label, ms, ceilings, meta, problem, state)


def print_profile(op, shape, label, call, device, backend=None, rows=20):
    """One warm call (under `backend`, if given) profiled by torch.profiler: the kernels (CPU ops
    without a GPU) that took the most time, how many ran, and how much of the call's wall time the
    device was busy: a call far longer than its kernels waits on the host (launches, Python, syncs)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    try:
        with dskernels.backend(backend) if backend else contextlib.nullcontext():
            call()  # warm: autotuning, first-call setup
            sync()
            start = time.perf_counter()
            with profiler(activities=activities) as prof:
                call()
                sync()
            wall_ms = (time.perf_counter() - start) * 1e3
    except Exception as e:  # the numbers above stand without it
        print(f"profile {op} {shape} [{label}] failed: {type(e).__name__}: {e}")
        return
    summary = f"profile {op} {shape} [{label}]: {wall_ms:.3f} ms wall (profiler on)"
    if on_gpu:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.device_time for e in kernels) / 1e3
        summary += f", {len(kernels)} kernels, device busy {busy_ms:.3f} ms"
    print(summary)
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70))


def poison(result) -> None:
    """Overwrites a checked output (tensors, also inside tuples and lists): NaN in floating tensors,
    every flag flipped in bool ones, an unlikely pattern in the rest (fp8 and integer tensors)."""
    if isinstance(result, (tuple, list)):
        for item in result:
            poison(item)
    elif isinstance(result, torch.Tensor) and result.numel():
        if result.dtype == torch.bool:
            result.logical_not_()
        elif result.element_size() == 1:
            result.view(torch.uint8).fill_(0xA5)
        elif result.is_floating_point():
            result.fill_(float("nan"))
        else:
            result.fill_(torch.iinfo(result.dtype).max // 3)


@contextlib.contextmanager
def environment(overrides):
    """Sets the given environment variables for the duration (the kernels read them per call)."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def clock_text(state: dict | None) -> str:
    """A record's "gpu" field in the report: its lowest SM clock and any slowdown reasons."""
    if not state or "sm_mhz" not in state:  # no NVML readings (the state may hold bench_gpu's host time)
        return ""
    return f"{state['sm_mhz']}" + (f" ({', '.join(state['slowdowns'])})" if state["slowdowns"] else "")


def clock_note(state: dict | None) -> str:
    return f" at {clock_text(state)} MHz" if clock_text(state) else ""


def host_text(rec: dict) -> str:
    """A record's host time per call in the report; "(syncs)" where the call could not be queued
    ahead of the device (it waits on it), so its "us" is the eager time, host included."""
    if rec.get("host_ms") is None:
        return "-"
    return f"{rec['host_ms'] * 1e3:.1f}" + ("" if rec.get("queued", True) else " (syncs)")


def record(case, backend, ms, ceilings, meta, error, gpu=None):
    """One timed run as the JSON keeps it. gpu: bench_gpu's telemetry (its host time and queueing
    go to fields of their own, the device's state to "gpu")."""
    gpu = dict(gpu or {})
    host_ms, queued = gpu.pop("host_ms", None), gpu.pop("queued", None)
    throughput = ceilings and ms == ms and ms > 0
    tflops = case.flops / ms / 1e9 if throughput and case.flops else None
    gbps = case.bytes / ms / 1e6 if throughput else None
    roofline = None
    if throughput:
        peak = ceilings["fp8_tflops"] if case.compute_dtype == "fp8" and ceilings["fp8_tflops"] else ceilings["bf16_tflops"]
        bound_ms = max(case.flops / (peak * 1e9), case.bytes / (ceilings["copy_gbps"] * 1e6))
        roofline = bound_ms / ms
    return {"op": case.op, "backend": backend, "device": meta["device"], "params": case.params,
            "ms": ms, "tflops": tflops, "gbps": gbps, "roofline": roofline, "x_peer": None,
            "error": error, "git_sha": meta["git_sha"], "torch": meta["torch"], "date": meta["date"],
            "gpu": gpu or None, "host_ms": host_ms, "queued": queued}


def fmt(value, pattern="{:.1f}"):
    return "-" if value is None else pattern.format(value)


if __name__ == "__main__":
    sys.exit(main())
