"""Regenerates the performance table of README.md from benchmarks/results/*.json.

    python scripts/perf_table.py          # rewrite the table between the README's markers
    python scripts/perf_table.py --check  # exit 1 if the README's table is stale (CI runs this)
    python scripts/perf_table.py --merge results.json  # a device call's records into the device's file

It also regenerates the table of the issues' performance targets (benchmarks/targets.py) from the
same files, between its own markers.

The results files are what `python benchmarks/run.py --json ...` wrote on a GPU; the table is never
typed by hand. Every peer's rows are shown: a row's "x peer" is against the fastest peer of its
shape, which must be in the table to be checked. A call that ran only some families is merged: its
records replace those of the same (op, backend, params) and the others stay, each record keeping the
git sha and torch version of the run that measured it. Records that failed their check or raised,
the reference backend's, and CPU runs are left out of the table, and so are labels the benchmarks no
longer define (a variant dropped or renamed since it was timed: its row would contradict today's
meaning of the names beside it; the results file keeps it).
"""

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
TARGETS_START, TARGETS_END = "<!-- targets-table:start -->", "<!-- targets-table:end -->"


def fmt(value, pattern):
    return "-" if value is None else pattern.format(value)


def current_labels() -> set[tuple[str, str]]:
    """(op, label) of every backend, variant and peer the benchmarks' GPU grids time today (the
    opt-in variants included, as a device call whose tests passed times them)."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import environment, selected_cases

    flags = ("DSKERNELS_GEMM_TMA_WS_TESTED", "DSKERNELS_GEMM_SPLITK_TESTED", "DSKERNELS_MLA_SEESAW_TESTED",
             "DSKERNELS_MLA_FP8_TMA_TESTED", "DSKERNELS_MLA_NARROW_TESTED", "DSKERNELS_SPARSE_MLA_WIDE_TESTED",
             "DSKERNELS_BATCH_INVARIANT_TESTED", "DSKERNELS_GEMM_RASTER_TESTED")
    labels = set()
    with environment({flag: "1" for flag in flags}):
        for quick in (False, True):
            for _, case in selected_cases("", quick, "cuda"):
                labels |= {(case.op, backend) for backend in case.backends}
                labels |= {(case.op, f"{backend}[{name}]") for backend, variants in
                           (("triton", case.triton_variants), ("cuda", case.cuda_variants),
                            ("auto", case.auto_variants)) for name in variants}
                labels |= {(case.op, f"peer:{name}") for name in case.peers}
    return labels


def shape_text(params: dict) -> str:
    """A record's shape as its table row shows it."""
    return " ".join(f"{k}={v}" for k, v in params.items())


def table() -> str:
    labels = current_labels()
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    rows = []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        meta = data["meta"]
        if not meta.get("ceilings"):  # a CPU run (no ceilings measured): interpreter times, not performance
            continue
        shown = [r for r in data["records"]
                 # not wrong or failed (its failure is in the run's log), nor the oracle itself, nor a
                 # label the benchmarks no longer define
                 if not (r.get("error") or r["ms"] is None or r["ms"] != r["ms"] or r["backend"] == "ref")
                 and (r["op"], r["backend"]) in labels]
        # "x peer" from the peer rows shown beside it, not the record's own x_peer: that one is from
        # the run that timed it, whose peers a later merged run may have replaced.
        best_peer = {}
        for r in shown:
            if r["backend"].startswith("peer:"):
                key = (r["op"], shape_text(r["params"]))
                best_peer[key] = min(best_peer.get(key, r["ms"]), r["ms"])
        for r in shown:
            shape = shape_text(r["params"])
            peer_ms = None if r["backend"].startswith("peer:") else best_peer.get((r["op"], shape))
            x_peer = peer_ms / r["ms"] if peer_ms and r["ms"] > 0 else None
            host = (f"{r['host_ms'] * 1e3:.1f}" + ("" if r.get("queued", True) else " (syncs)")
                    if r.get("host_ms") is not None else None)
            rows.append(f"| {r['op']} | {shape} | {r['backend']} | {r['ms'] * 1e3:.1f} | {host or '-'} | "
                        f"{fmt(r['tflops'], '{:.0f}')} | {fmt(r['gbps'], '{:.0f}')} | "
                        f"{fmt(r['roofline'] and 100 * r['roofline'], '{:.0f}%')} | "
                        f"{fmt(x_peer, '{:.2f}x')} | {meta['device']} | {r.get('git_sha', meta['git_sha'])} |")
    if not rows:
        return ("No GPU results recorded yet: run `bash scripts/gpu_check.sh` on a Hopper GPU and commit its "
                "results.json as benchmarks/results/<device>.json.")
    header = ("| op | shape | backend | us | host us | TFLOPS | GB/s | roofline | x peer | device | git |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


def targets_table() -> str:
    sys.path.insert(0, ROOT)
    from benchmarks import targets

    by_device, copy_gbps = targets.load(sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))))
    return targets.table(by_device, copy_gbps) if by_device else "No GPU results recorded yet."


def _between(text: str, start: str, end: str, body: str) -> str:
    begin, stop = text.index(start) + len(start), text.index(end)
    return text[:begin] + "\n" + body + "\n" + text[stop:]


def _key(record) -> str:
    return json.dumps([record["op"], record["backend"], record["params"]], sort_keys=True)


def merge(new_path: str) -> str:
    """Merges a run's results into benchmarks/results/<device>.json; returns that path."""
    with open(new_path) as f:
        new = json.load(f)
    meta = new["meta"]
    if not meta.get("ceilings"):
        raise SystemExit(f"{new_path}: a CPU run (no ceilings measured); only GPU results are recorded")
    path = os.path.join(ROOT, "benchmarks", "results", meta["device"].lower().replace(" ", "-") + ".json")
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for r in old["records"]:  # stamp the older run's records with that run's sha and torch
            r.setdefault("git_sha", old["meta"]["git_sha"])
            r.setdefault("torch", old["meta"]["torch"])
            records[_key(r)] = r
    for r in new["records"]:
        records[_key(r)] = dict(r, git_sha=meta["git_sha"], torch=meta["torch"])
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": list(records.values())}, f, indent=1)
        f.write("\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--merge", metavar="RESULTS_JSON", help="a device call's results.json to record first")
    args = parser.parse_args()
    if args.merge:
        print("merged into", merge(args.merge))
    readme_path = os.path.join(ROOT, "README.md")
    readme = open(readme_path).read()
    updated = _between(readme, START, END, table())
    updated = _between(updated, TARGETS_START, TARGETS_END, targets_table())
    if args.check:
        if updated != readme:
            print("README.md's performance table is stale: run python scripts/perf_table.py")
            return 1
        return 0
    with open(readme_path, "w") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
