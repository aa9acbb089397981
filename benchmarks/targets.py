"""The issues' performance targets, and how far the recorded results are from them.

    python benchmarks/targets.py [results.json ...]   # default: benchmarks/results/*.json
    python benchmarks/run.py --targets --json t.json  # on a GPU: time just the cases below

Each target names an op, the backend whose number counts, the shapes (each a subset of a case's
params in the families' full grid), a metric and a goal. Several shapes are combined by their
geometric mean (DeepGEMM's way of summing up its grid), or by their minimum where every shape must
reach the goal. A ratio metric divides a peer's time by ours, shape by shape. `candidates` are
other labels of the same backend (opt-in variants) reported beside it: a candidate that meets the
goal where the default does not is the case for making it the default.

The issues state their goals for an H100 (SXM); results from other devices are evaluated per device
and say which one measured them. A bandwidth goal (GB/s) does not carry over to another memory
system as it stands (an H200's HBM3e copies ~40% faster than an H100's HBM3), so on any other device
it is scaled by that device's measured copy bandwidth over an H100's (H100_COPY_GBPS): the same
fraction of what the memory can do. The H100 PCIe and NVL are other devices here (is_goal_device).
Compute goals (TFLOPS) stand as stated: the H200 has the H100's SMs and clocks.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DeepGEMM's dense (n, k) grid, as in benchmarks/bench_gemm.py (a test checks they agree).
DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
# Device-to-device copy (bytes read + written) measured on an H100 of the lent machines
# (../shared/GPU.md: ~3.0 TB/s): the memory system the bandwidth goals were set for.
H100_COPY_GBPS = 3000.0
MLA_BOUND_BY_MEMORY = {"b": 128, "s_q": 1, "h_q": 16, "h_kv": 1, "seqlen": 4096, "varlen": False, "page": 64,
                       "cache": "bfloat16"}
MLA_BOUND_BY_COMPUTE = {"b": 128, "s_q": 2, "h_q": 128, "h_kv": 1, "seqlen": 4096, "varlen": False, "page": 64,
                        "cache": "bfloat16", "causal": True}


@dataclass(frozen=True)
class Target:
    issue: int
    what: str
    op: str
    backend: str                # the record label whose number counts ("triton", "cuda")
    shapes: tuple[dict, ...]    # each a subset of one case's params
    metric: str                 # "gbps", "tflops", or "x peer:<name>" (the peer's time / ours)
    goal: float
    combine: str = "geomean"    # over the shapes: "geomean" or "min" (every shape must reach the goal)
    candidates: tuple[str, ...] = field(default_factory=tuple)

    def labels(self) -> set[str]:
        """Every record label this target reads: its backend, its candidates, its peer."""
        peer = {self.metric[2:]} if self.metric.startswith("x ") else set()
        return {self.backend, *self.candidates, *peer}


TARGETS = (
    Target(3, "Triton MLA decode, bf16 cache, b=128 s_q=1 h_q=16 seqlen 4096", "flash_mla_with_kvcache", "triton",
           (MLA_BOUND_BY_MEMORY,), "gbps", 1800),
    Target(8, "sm90 MLA decode, bf16 cache, b=128 s_q=1 h_q=16 seqlen 4096", "flash_mla_with_kvcache", "cuda",
           (MLA_BOUND_BY_MEMORY,), "gbps", 2800, candidates=("cuda[narrow]", "cuda[seesaw]")),
    Target(8, "sm90 MLA decode, causal b=128 s_q=2 h_q=128 seqlen 4096", "flash_mla_with_kvcache", "cuda",
           (MLA_BOUND_BY_COMPUTE,), "tflops", 580, candidates=("cuda[seesaw]",)),
    Target(4, "Triton dense FP8 GEMM, m=4096, geomean of DeepGEMM's six (n, k)", "gemm_fp8_fp8_bf16_nt", "triton",
           tuple({"m": 4096, "n": n, "k": k} for n, k in DENSE_NK), "tflops", 700,
           candidates=("triton[tma_ws_auto]", "triton[tma_ws]")),
    Target(9, "sm90 dense FP8 GEMM, m=4096, geomean of DeepGEMM's six (n, k)", "gemm_fp8_fp8_bf16_nt", "cuda",
           tuple({"m": 4096, "n": n, "k": k} for n, k in DENSE_NK), "tflops", 1150),
    Target(9, "sm90 contiguous grouped GEMM, 4 x 8192 rows, n=4096 k=7168",
           "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "cuda",
           ({"groups": 4, "m_per_group": 8192, "n": 4096, "k": 7168},), "tflops", 1250,
           candidates=("cuda[raster_n]",)),
    Target(9, "sm90 masked grouped GEMM, 1 x 1024 rows, n=4096 k=7168", "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
           "cuda", ({"groups": 1, "expected_m": 1024, "n": 4096, "k": 7168},), "tflops", 1100,
           candidates=("cuda[raster_n]",)),
    Target(9, "sm90 dense FP8 GEMM, m=64 and 128, every one of the six (n, k), against torch._scaled_mm",
           "gemm_fp8_fp8_bf16_nt", "cuda", tuple({"m": m, "n": n, "k": k} for m in (64, 128) for n, k in DENSE_NK),
           "x peer:torch._scaled_mm", 1.2, combine="min",
           # the rule picks stream-K at 65..128 rows, never timed there: m = 64 measured it slowest
           candidates=("cuda[m64_splitk]", "cuda[m64]", "cuda[m128]")),
)


def matches(params: dict, shape: dict) -> bool:
    return all(params.get(key) == value for key, value in shape.items())


def _latest(target: Target, name: str, shape: dict, records: list[dict]) -> dict | None:
    """The latest record of `name` (a backend label or "peer:...") on one shape, None if there is
    none or that one failed (a later failed run is no measurement)."""
    found = [r for r in records if r["op"] == target.op and r["backend"] == name and matches(r["params"], shape)]
    if not found:
        return None
    latest = found[-1]
    ok = not latest.get("error") and latest.get("ms") is not None and latest["ms"] == latest["ms"] and latest["ms"] > 0
    return latest if ok else None


def _value(target: Target, label: str, shape: dict, records: list[dict]) -> float | None:
    """The metric of one shape for one label from `records` (one device's), None if not measured."""
    ours = _latest(target, label, shape, records)
    if ours is None:
        return None
    if target.metric.startswith("x "):
        peer = _latest(target, target.metric[2:], shape, records)
        return peer["ms"] / ours["ms"] if peer else None
    return ours.get(target.metric)


def _clocks(target: Target, label: str, records: list[dict]) -> str:
    """The SM clocks (MHz) NVML read while the deciding records of `label` were timed, with any
    slowdown reasons: "1755-1980 (sw_power_cap)"; "" where none was read."""
    states = [r["gpu"] for r in (_latest(target, label, shape, records) for shape in target.shapes)
              if r and r.get("gpu")]
    if not states:
        return ""
    low, high = min(g["sm_mhz"] for g in states), max(g["sm_mhz"] for g in states)
    slowdowns = sorted({reason for g in states for reason in g.get("slowdowns", ())})
    return (f"{low}" if low == high else f"{low}-{high}") + (f" ({', '.join(slowdowns)})" if slowdowns else "")


def is_goal_device(device: str) -> bool:
    """Whether `device` (torch's name for it) is the H100 the goals were stated for: the SXM5 board
    with HBM3 ("NVIDIA H100 80GB HBM3"), not the H100 PCIe (HBM2e, ~2.0 TB/s, lower clocks) or NVL
    (~3.9 TB/s), which share the "H100" in their names but not its memory system."""
    name = device.upper()
    return "H100" in name and ("HBM3" in name or "SXM" in name) and not any(w in name for w in ("PCIE", "NVL"))


def device_goal(target: Target, device: str, copy_gbps: float | None) -> float:
    """The goal on `device`: as stated on the H100 SXM (is_goal_device; and for compute goals
    everywhere); a bandwidth goal elsewhere, other H100 models included, scaled by the device's
    measured copy bandwidth over that H100's. A device whose copy bandwidth was not measured keeps
    the stated goal."""
    if target.metric != "gbps" or is_goal_device(device) or not copy_gbps:
        return target.goal
    return target.goal * copy_gbps / H100_COPY_GBPS


def evaluate(target: Target, label: str, records: list[dict], goal: float | None = None) -> dict:
    """{"value": combined metric over the measured shapes or None, "measured": n, "shapes": total,
    "met": True/False/None (None: not every shape measured), "clocks": the SM clocks they ran at}.
    goal: the device's goal (device_goal), by default the stated one."""
    goal = target.goal if goal is None else goal
    values = [_value(target, label, shape, records) for shape in target.shapes]
    measured = [v for v in values if v is not None and v > 0]
    if not measured:
        value = None
    elif target.combine == "min":
        value = min(measured)
    else:
        value = math.prod(measured) ** (1 / len(measured))
    complete = len(measured) == len(target.shapes)
    met = (value >= goal) if complete else (False if target.combine == "min" and value is not None
                                           and value < goal else None)
    return {"value": value, "measured": len(measured), "shapes": len(target.shapes), "met": met,
            "clocks": _clocks(target, label, records)}


def _unit(target: Target) -> str:
    return {"gbps": "GB/s", "tflops": "TFLOPS"}.get(target.metric, "x " + target.metric.split(":", 1)[-1])


def table(records_by_device: dict[str, list[dict]], copy_gbps_by_device: dict[str, float] | None = None) -> str:
    """A markdown table: one row per target (and measured candidate) per device; bandwidth goals
    judged on each device's own copy bandwidth (device_goal) where it is given."""
    lines = ["| issue | target | backend | measured | goal (H100) | met | SM MHz | device |",
             "|---|---|---|---|---|---|---|---|"]
    for device, records in records_by_device.items():
        copy_gbps = (copy_gbps_by_device or {}).get(device)
        for target in TARGETS:
            goal = device_goal(target, device, copy_gbps)
            scaled = f" ({goal:.0f} at this device's {copy_gbps:.0f} GB/s copy)" if goal != target.goal else ""
            for label in (target.backend, *target.candidates):
                result = evaluate(target, label, records, goal)
                if label != target.backend and result["value"] is None:
                    continue  # a candidate not timed in these results
                value = "not measured" if result["value"] is None else f"{result['value']:.{2 if target.metric.startswith('x ') else 0}f}"
                if result["value"] is not None and result["measured"] < result["shapes"]:
                    value += f" ({result['measured']} of {result['shapes']} shapes)"
                how = "min" if target.combine == "min" else ("geomean" if len(target.shapes) > 1 else "")
                met = {True: "yes", False: "no", None: "-"}[result["met"]]
                lines.append(f"| #{target.issue} | {target.what} | {label} | {value} | "
                             f"{how + ' ' if how else ''}>= {target.goal:g} {_unit(target)}{scaled} | {met} | "
                             f"{result['clocks'] or '-'} | {device} |")
    return "\n".join(lines)


def load(paths: list[str]) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Records of GPU runs (results files with ceilings) by device, and each device's measured copy
    bandwidth (GB/s; its latest file's)."""
    by_device: dict[str, list[dict]] = {}
    copy_gbps: dict[str, float] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        ceilings = data["meta"].get("ceilings")
        if not ceilings:
            continue  # a CPU run: no throughput
        for r in data["records"]:
            by_device.setdefault(r.get("device") or data["meta"]["device"], []).append(r)
        if ceilings.get("copy_gbps"):
            copy_gbps[data["meta"]["device"]] = ceilings["copy_gbps"]
    return by_device, copy_gbps


def main(argv: list[str]) -> int:
    paths = argv or sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    by_device, copy_gbps = load(paths)
    if not by_device:
        print("no GPU results in " + ", ".join(paths))
        return 1
    print(table(by_device, copy_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
