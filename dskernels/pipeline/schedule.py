"""Pipeline schedules as data: generators, a validator, a cost simulator and a renderer.

A schedule ("order") is a list with one entry per rank: the rank's compute actions in execution
order, as strings in torch.distributed.pipelining's action format:

    "{stage}F{mb}"   forward of micro-batch (chunk) mb through stage
    "{stage}B{mb}"   full backward (input and weight gradients)
    "{stage}I{mb}"   input-gradient backward only (zero-bubble split)
    "{stage}W{mb}"   the deferred weight-gradient backward of an earlier I
    "({s}F{m};{s2}B{m2})OVERLAP_F_B"   a forward and a full backward run together (DualPipe's
                     overlapped forward-backward chunk, which hides one's communication under the
                     other's compute)

Stage layouts (API.md section 4):
  one_f_one_b, zb1p   stages 0..P-1, stage r on rank r, chunks 0..N-1.
  dualpipev           stages 0..2P-1 in one V: rank r holds r and 2P-1-r, chunks 0..N-1
                      (torch's ScheduleDualPipeV order, action for action).
  dualpipe            two pipelines running in opposite directions over the same ranks: stages
                      0..P-1 (stage r on rank r) and P..2P-1 (stage P+j on rank P-1-j); chunks
                      0..N/2-1 in each direction.

DualPipe and DualPipeV share one 8-phase rank program (deepseek-ai/DualPipe, dualpipe.py and
dualpipev.py `step`): with R "ranks" in the half-pipeline, h this rank's index in it and C chunks
per pipeline:
  1. 2(R-h-1) x F0            warm-up of the first-phase stage
  2. h+1 x (F0, F1)
  3. R-h-1 x (I1, W, F1)      zero bubble: the weight gradient fills the wait
  4. C-2R+h+1 x (F0&B1, F1&B0) steady state, each pair overlapped (the very first F0&B1 of
                              the rank at the turn of the V runs unoverlapped as F0, B1)
  5. R-h-1 x (B1, F1&B0)
  6. h+1 x (B1, B0)           the second half switches to I (weight gradient deferred)
  7. R-h-1 x (W, I0)
  8. h+1 x W
"Phase 0" is the stage a rank's own inputs reach first, "phase 1" the other one. W pops the oldest
deferred weight gradient of the rank (FIFO over both stages).
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field

from dskernels._checks import check_int

__all__ = [
    "dualpipe", "dualpipev", "one_f_one_b", "zb1p", "generate", "parse_action", "validate",
    "simulate", "SimResult", "render", "KINDS",
]

KINDS = ("dualpipe", "dualpipev", "1f1b", "zb1p")

_SIMPLE = re.compile(r"^(\d+)([FBIW])(\d+)$")
_OVERLAP = re.compile(r"^\((\d+)F(\d+);(\d+)B(\d+)\)OVERLAP_F_B$")


class Schedule(list):
    """A per-rank list of action strings that also knows its pipelines' stage chains.

    It compares equal to the plain list of lists; `chains` lists each pipeline's stages in data
    order (one chain for 1F1B, ZB1P and DualPipeV, two for DualPipe)."""

    def __init__(self, ranks, chains):
        super().__init__(ranks)
        self.chains = [list(c) for c in chains]


# A schedule holds a few actions per (rank, chunk): P * N past this would build hundreds of
# millions of them (the C++ op, csrc/pipeline/schedule.cpp, has the same bound).
MAX_RANKS_TIMES_CHUNKS = 1 << 20


class ScheduleSizeError(ValueError, TypeError):
    """A P or N that is not an int: a TypeError as for any op's argument, and the ValueError that
    API.md promises for every bad (P, N)."""


def _check_count(name: str, value, minimum: int) -> int:
    try:
        return check_int(name, value, minimum)
    except TypeError as e:
        raise ScheduleSizeError(str(e)) from None


def _check_size(P, N):
    if P * N > MAX_RANKS_TIMES_CHUNKS:
        raise ValueError(f"P and N: expected P * N <= {MAX_RANKS_TIMES_CHUNKS}, got P={P}, N={N}")


def _action(stage, kind, mb):
    return f"{stage}{kind}{mb}"


def _overlap(fstage, fmb, bstage, bmb):
    return f"({fstage}F{fmb};{bstage}B{bmb})OVERLAP_F_B"


def _dual_rank_program(num_ranks, rank, num_chunks, stage0, stage1, unoverlapped_first):
    """The shared DualPipe/DualPipeV rank program (module docstring) for one rank.

    num_ranks/rank: the half-pipeline size and index (DualPipeV: P and r; DualPipe: P/2 and
    min(r, P-1-r)); stage0/stage1: the stages of phase 0 and 1; unoverlapped_first: whether this
    rank runs its first F0&B1 as two separate actions (the rank at the turn of the V)."""
    out = []
    fwd = {stage0: 0, stage1: 0}
    bwd = {stage0: 0, stage1: 0}
    deferred = []  # FIFO of (stage, mb) whose weight gradient waits for a W

    def stage_of(phase):
        return stage1 if phase else stage0

    def f(phase):
        s = stage_of(phase)
        out.append(_action(s, "F", fwd[s]))
        fwd[s] += 1

    def b(phase, zero_bubble=False):
        s = stage_of(phase)
        if zero_bubble:
            out.append(_action(s, "I", bwd[s]))
            deferred.append((s, bwd[s]))
        else:
            out.append(_action(s, "B", bwd[s]))
        bwd[s] += 1

    def w():
        s, m = deferred.pop(0)
        out.append(_action(s, "W", m))

    def fb(fphase, bphase):
        fs, bs = stage_of(fphase), stage_of(bphase)
        out.append(_overlap(fs, fwd[fs], bs, bwd[bs]))
        fwd[fs] += 1
        bwd[bs] += 1

    R, h = num_ranks, rank
    for _ in range(2 * (R - h - 1)):
        f(0)
    for _ in range(h + 1):
        f(0)
        f(1)
    for _ in range(R - h - 1):
        b(1, zero_bubble=True)
        w()
        f(1)
    for i in range(num_chunks - 2 * R + h + 1):
        if i == 0 and unoverlapped_first:
            f(0)
            b(1)
        else:
            fb(0, 1)
        fb(1, 0)
    for _ in range(R - h - 1):
        b(1)
        fb(1, 0)
    zb = False
    steps = h + 1
    for i in range(steps):
        if i == steps // 2 and h % 2 == 1:
            zb = True
        b(1, zb)
        if i == steps // 2 and h % 2 == 0:
            zb = True
        b(0, zb)
    for _ in range(R - h - 1):
        w()
        b(0, zero_bubble=True)
    for _ in range(h + 1):
        w()
    assert not deferred
    return out


def dualpipev(P: int, N: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe): one V of 2P stages over P ranks, N chunks.

    Requires P >= 1 and N >= 2P (the steady state needs every stage busy), as DualPipe's
    dualpipev.py and torch's ScheduleDualPipeV do."""
    P = _check_count("P", P, 1)
    N = _check_count("N", N, 1)
    _check_size(P, N)
    if N < 2 * P:
        raise ValueError(f"dualpipev: N (chunks) must be >= 2*P = {2 * P} (number of stages), got N={N}")
    ranks = [_dual_rank_program(P, r, N, r, 2 * P - 1 - r, unoverlapped_first=(r == P - 1))
             for r in range(P)]
    return Schedule(ranks, [list(range(2 * P))])


def dualpipe(P: int, N: int) -> Schedule:
    """DualPipe: two P-stage pipelines in opposite directions over the same P ranks, N chunks in
    all (N/2 per direction).

    Requires P even and >= 2, N even and N >= 2P (DualPipe's dualpipe.py asserts the same)."""
    P = _check_count("P", P, 2)
    N = _check_count("N", N, 1)
    _check_size(P, N)
    if P % 2:
        raise ValueError(f"dualpipe: P (ranks) must be even, got P={P}")
    if N % 2:
        raise ValueError(f"dualpipe: N (chunks) must be even (N/2 per direction), got N={N}")
    if N < 2 * P:
        raise ValueError(f"dualpipe: N (chunks) must be >= 2*P = {2 * P}, got N={N}")
    ranks = []
    for r in range(P):
        half = min(r, P - 1 - r)
        forward_stage, reverse_stage = r, 2 * P - 1 - r
        # Ranks of the first half meet their own inputs' direction (0..P-1) first.
        s0, s1 = (forward_stage, reverse_stage) if r < P // 2 else (reverse_stage, forward_stage)
        ranks.append(_dual_rank_program(P // 2, half, N // 2, s0, s1,
                                        unoverlapped_first=(half == P // 2 - 1)))
    return Schedule(ranks, [list(range(P)), list(range(P, 2 * P))])


def one_f_one_b(P: int, N: int) -> Schedule:
    """1F1B (PipeDream-flush): P - r - 1 warm-up forwards on rank r, then F/B pairs, then the
    remaining backwards. Requires P >= 1, N >= 1."""
    P = _check_count("P", P, 1)
    N = _check_count("N", N, 1)
    _check_size(P, N)
    ranks = []
    for r in range(P):
        warm = min(P - r - 1, N)
        acts = [_action(r, "F", m) for m in range(warm)]
        fm, bm = warm, 0
        while fm < N:
            acts.append(_action(r, "F", fm))
            acts.append(_action(r, "B", bm))
            fm += 1
            bm += 1
        acts += [_action(r, "B", m) for m in range(bm, N)]
        ranks.append(acts)
    return Schedule(ranks, [list(range(P))])


def zb1p(P: int, N: int) -> Schedule:
    """ZB1P (ZB-H1 of Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B's activation
    limit (rank r holds at most P - r chunks between F and I) with the backward split into I and
    W, the W's deferred to fill 1F1B's waits.

    Built like the paper's heuristic scheduler: all ranks advance in unit steps (F = I = W = 1);
    each free rank runs, in this priority, an I whose output gradient has arrived; its oldest W
    if more than P - 1 are deferred; an F whose input has arrived and the activation limit allows;
    its oldest deferred W. With N >= P the bubble is (P-1)(F+B-2W) for F = W = B/2 (tested), at
    most P deferred W's per rank (their GEMM inputs stay alive until then: P, not P - 1, as an I
    that can run goes before the W that P - 1 held ones call for).
    Requires P >= 1, N >= 1."""
    P = _check_count("P", P, 1)
    N = _check_count("N", N, 1)
    _check_size(P, N)
    ranks = [[] for _ in range(P)]
    f_done = [0] * P   # chunks each rank has run F for (in chunk order)
    i_done = [0] * P
    pending = [deque() for _ in range(P)]
    left = 2 * P * N   # I's and W's still to run
    # Only a rank that acted, or whose neighbour acted, can pick differently from the last step:
    # stepping just those keeps the cost O(P * N) (all P ranks every step was O(P * (N + P))).
    active = [0]
    while left:
        if not active:
            raise RuntimeError("zb1p: internal error, no rank can act")
        picks = []
        for r in active:
            up_f = N if r == 0 else f_done[r - 1]          # chunks whose input has arrived
            down_i = f_done[r] if r == P - 1 else i_done[r + 1]
            if i_done[r] < f_done[r] and i_done[r] < down_i:
                picks.append((r, "I"))
            elif len(pending[r]) > P - 1:
                picks.append((r, "W"))
            elif f_done[r] < up_f and f_done[r] - i_done[r] < P - r:
                picks.append((r, "F"))
            elif pending[r]:
                picks.append((r, "W"))
        touched = set()
        for r, pick in picks:
            if pick == "I":
                ranks[r].append(_action(r, "I", i_done[r]))
                pending[r].append(i_done[r])
                i_done[r] += 1
                left -= 1
            elif pick == "F":
                ranks[r].append(_action(r, "F", f_done[r]))
                f_done[r] += 1
            else:
                ranks[r].append(_action(r, "W", pending[r].popleft()))
                left -= 1
            touched.update((r - 1, r, r + 1))
        active = [t for t in touched if 0 <= t < P]
    return Schedule(ranks, [list(range(P))])


def generate(kind: str, P: int, N: int) -> Schedule:
    """The schedule named kind ("dualpipe", "dualpipev", "1f1b" or "zb1p"; "one_f_one_b" too,
    the helper's name)."""
    table = {"dualpipe": dualpipe, "dualpipev": dualpipev, "1f1b": one_f_one_b, "zb1p": zb1p}
    kind = "1f1b" if kind == "one_f_one_b" else kind
    if kind not in table:
        raise ValueError(f"kind: expected one of {list(table)} (or one_f_one_b), got {kind!r}")
    return table[kind](P, N)


# ---------------------------------------------------------------------------------------------
# Parsing, structure and validation

def parse_action(action: str) -> list[tuple[int, str, int]]:
    """The (stage, kind, mb) sub-actions of one action string (two for OVERLAP_F_B)."""
    m = _SIMPLE.match(action)
    if m:
        return [(int(m.group(1)), m.group(2), int(m.group(3)))]
    m = _OVERLAP.match(action)
    if m:
        return [(int(m.group(1)), "F", int(m.group(2))), (int(m.group(3)), "B", int(m.group(4)))]
    raise ValueError(f"action: expected '{{stage}}F{{mb}}' (F, B, I or W) or "
                     f"'({{s}}F{{m}};{{s2}}B{{m2}})OVERLAP_F_B', got {action!r}")


def _infer_chains(order, stage_rank):
    if hasattr(order, "chains"):
        return order.chains
    S = len(stage_rank)
    P = len(order)
    if S == 2 * P and all(stage_rank.get(r) == r and stage_rank.get(2 * P - 1 - r) == r for r in range(P)):
        # DualPipe and DualPipeV place stages alike; DualPipe's rank P-1 starts the reverse
        # pipeline (stage P) with its own inputs, before stage P-1's chunk 0 can have reached it.
        first = {}
        for i, a in enumerate(order[P - 1]):
            for s, k, m in parse_action(a):
                if k == "F" and m == 0:
                    first.setdefault(s, i)
        if P % 2 == 0 and first.get(P, 0) < first.get(P - 1, 0):
            return [list(range(P)), list(range(P, 2 * P))]
    return [list(range(S))]


def _structure(order):
    """(actions per rank as lists of sub-action lists, stage -> rank, chains)."""
    if not isinstance(order, (list, tuple)) or not order:
        raise ValueError("order: expected a non-empty list with one list of actions per rank")
    parsed, stage_rank = [], {}
    for r, acts in enumerate(order):
        row = []
        for a in acts:
            subs = parse_action(a)
            for s, _, _ in subs:
                if stage_rank.setdefault(s, r) != r:
                    raise ValueError(f"order: stage {s} appears on ranks {stage_rank[s]} and {r}; "
                                     "a stage must live on one rank")
            row.append(subs)
        parsed.append(row)
    if sorted(stage_rank) != list(range(len(stage_rank))):
        raise ValueError(f"order: stages must be 0..S-1, got {sorted(stage_rank)}")
    return parsed, stage_rank, _infer_chains(order, stage_rank)


def _neighbours(chains):
    prev, nxt = {}, {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            nxt[a], prev[b] = b, a
    return prev, nxt


def validate(order) -> bool:
    """Checks a schedule; returns True or raises ValueError saying what is wrong.

    Every (stage, chunk) has one F and either one B or one I and one W; all stages run the same
    chunks 0..M-1; and the ranks, each running its actions in order, can complete them all given
    the data dependencies (F after the previous stage's F, backward after this stage's F and the
    next stage's backward, W after I): no deadlock."""
    parsed, stage_rank, chains = _structure(order)
    counts = {}
    for row in parsed:
        for subs in row:
            for s, k, m in subs:
                counts.setdefault((s, m), {"F": 0, "B": 0, "I": 0, "W": 0})[k] += 1
    mbs = {}
    for (s, m), c in sorted(counts.items()):
        mbs.setdefault(s, set()).add(m)
        if c["F"] != 1:
            raise ValueError(f"stage {s} chunk {m}: expected one F, got {c['F']}")
        if not ((c["B"] == 1 and c["I"] == 0 and c["W"] == 0) or (c["B"] == 0 and c["I"] == 1 and c["W"] == 1)):
            raise ValueError(f"stage {s} chunk {m}: expected one B, or one I and one W; got "
                             f"B={c['B']} I={c['I']} W={c['W']}")
    want = set(range(len(mbs[0])))
    for s, ms in mbs.items():
        if ms != want:
            raise ValueError(f"stage {s}: expected chunks 0..{len(want) - 1}, got {sorted(ms)}")
    _timeline(parsed, stage_rank, chains, {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}, None, 0.0)
    return True


# ---------------------------------------------------------------------------------------------
# Simulation

@dataclass
class SimResult:
    """What `simulate` returns. Times are in the units of F, B and W; activations in chunks of one
    stage (a rank holding two stages counts both)."""
    makespan: float
    busy: list[float]
    idle: list[float]                      # makespan - busy, per rank
    peak_activations: list[int]            # per rank: chunks whose F ran and whose B (or I) not yet
    peak_deferred_w: list[int]             # per rank: most I's waiting for their W at once
    events: list[list[tuple[float, float, str]]] = field(default_factory=list)  # (start, end, action)

    @property
    def bubble(self) -> float:
        """The largest per-rank idle time (the pipeline bubble of the slowest rank)."""
        return max(self.idle)

    def __iter__(self):
        """`busy, idle, makespan, peak_activations = simulate(...)`: API.md's order."""
        return iter((self.busy, self.idle, self.makespan, self.peak_activations))


def _timeline(parsed, stage_rank, chains, cost, fb_cost, comm):
    prev, nxt = _neighbours(chains)
    done = {}  # (kind, stage, mb) -> end time; kind "B" covers B and I (input gradient ready)
    P = len(parsed)
    pos = [0] * P
    free = [0.0] * P
    events = [[] for _ in range(P)]
    live = [0] * P
    peak = [0] * P
    deferred = [0] * P
    peak_deferred = [0] * P
    busy = [0.0] * P

    def ready_time(r, s, k, m):
        """When the inputs of sub-action (s, k, m) on rank r are ready, or None if not yet."""
        deps = []
        if k == "F" and s in prev:
            deps.append(("F", prev[s], m))
        elif k in "BI":
            deps.append(("F", s, m))
            if s in nxt:
                deps.append(("B", nxt[s], m))
        elif k == "W":
            deps.append(("I", s, m))
        t = 0.0
        for key in deps:  # ("B", s, m): the input gradient of (s, m) exists (after its B or I)
            if key not in done:
                return None
            extra = comm if stage_rank[key[1]] != r else 0.0
            t = max(t, done[key] + extra)
        return t

    remaining = sum(len(row) for row in parsed)
    while remaining:
        progressed = False
        for r in range(P):
            while pos[r] < len(parsed[r]):
                subs = parsed[r][pos[r]]
                times = [ready_time(r, *sub) for sub in subs]
                if any(t is None for t in times):
                    break
                start = max([free[r]] + times)
                if len(subs) == 2:
                    dur = fb_cost if fb_cost is not None else cost["F"] + cost["B"]
                else:
                    dur = cost[subs[0][1]]
                end = start + dur
                for s, k, m in subs:
                    if k == "F":
                        live[r] += 1
                        peak[r] = max(peak[r], live[r])
                for s, k, m in subs:
                    if k in "BI":
                        live[r] -= 1
                    if k == "I":
                        deferred[r] += 1
                        peak_deferred[r] = max(peak_deferred[r], deferred[r])
                    if k == "W":
                        deferred[r] -= 1
                for s, k, m in subs:
                    if k in "BI":
                        done[("B", s, m)] = end
                        if k == "I":
                            done[("I", s, m)] = end
                    else:
                        done[(k, s, m)] = end
                name = order_name(subs)
                events[r].append((start, end, name))
                busy[r] += dur
                free[r] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: order_name(parsed[r][pos[r]]) for r in range(P) if pos[r] < len(parsed[r])}
            raise ValueError(f"order: deadlock; each rank's next action waits on data that never "
                             f"comes: {stuck}")
    makespan = max(free)
    return SimResult(makespan, busy, [makespan - b for b in busy], peak, peak_deferred, events)


def order_name(subs):
    if len(subs) == 2:
        (fs, _, fm), (bs, _, bm) = subs
        return _overlap(fs, fm, bs, bm)
    s, k, m = subs[0]
    return _action(s, k, m)


def simulate(order, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None,
             comm: float = 0.0) -> SimResult:
    """Runs the schedule on an ideal machine: each rank executes its actions in order, each as
    soon as the rank is free and its inputs exist (plus `comm` for an input from another rank).

    F: forward time of one chunk through one stage; B: full backward (input + weight gradient);
    W: weight-gradient part of B (so I takes B - W); FB: an OVERLAP_F_B action (default F + B, no
    overlap gain). Returns a SimResult (makespan, per-rank busy/idle, peak live activations and
    the event list `render` draws)."""
    for name, v in (("F", F), ("B", B), ("W", W), ("comm", comm)) + ((("FB", FB),) if FB is not None else ()):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if W > B:
        raise ValueError(f"W: expected W <= B (W is part of the full backward B), got W={W} > B={B}")
    parsed, stage_rank, chains = _structure(order)
    return _timeline(parsed, stage_rank, chains, {"F": F, "B": B, "I": B - W, "W": W},
                     FB, comm)


# ---------------------------------------------------------------------------------------------
# Rendering

_COLORS = {"F": "#4c9be8", "B": "#e8724c", "I": "#f0b34a", "W": "#7bc96f", "O": "#a77bd9"}


def _kind(name):
    return "O" if name.startswith("(") else parse_action(name)[0][1]


def render(order, path, **costs) -> list[str]:
    """Draws the simulated timeline of `order` (costs as in `simulate`) to `path` (a str or a
    path-like), in the format its suffix names: ".json" a Chrome trace (chrome://tracing,
    Perfetto), else an image through matplotlib (".png", ".svg", ".pdf", ...; PNG without a
    suffix), with the Chrome trace beside it (the suffix replaced by ".json"). Returns the paths
    written. Where an image is asked for and matplotlib is not installed: the trace, then an
    ImportError naming matplotlib; a suffix matplotlib does not write: ValueError, nothing written."""
    import os
    path = os.fspath(path)
    result = simulate(order, **costs)
    root, suffix = os.path.splitext(path)
    trace_path = path if suffix.lower() == ".json" else root + ".json"
    plt = None
    if trace_path != path:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            pass
        else:
            image_format = suffix[1:].lower() if suffix else "png"
            if image_format not in FigureCanvasBase.get_supported_filetypes():
                raise ValueError(f"path: expected .json or an image suffix matplotlib writes "
                                 f"({', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))}), got {path!r}")
    trace = {"traceEvents": [], "displayTimeUnit": "ms"}
    for r, evs in enumerate(result.events):
        trace["traceEvents"].append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                                     "args": {"name": f"rank {r}"}})
        for start, end, name in evs:
            trace["traceEvents"].append({"name": name, "cat": _kind(name), "ph": "X", "pid": 0,
                                         "tid": r, "ts": start * 1000.0, "dur": (end - start) * 1000.0})
    with open(trace_path, "w") as f:
        json.dump(trace, f)
    written = [trace_path]
    if trace_path == path:
        return written
    if plt is None:
        raise ImportError(f"path: drawing {path!r} needs matplotlib (pip install matplotlib); the Chrome "
                          f"trace is in {trace_path!r}, or pass a .json path for the trace alone")
    P = len(result.events)
    fig, ax = plt.subplots(figsize=(max(6.0, result.makespan * 0.35), 0.5 * P + 1.2))
    for r, evs in enumerate(result.events):
        for start, end, name in evs:
            ax.broken_barh([(start, end - start)], (r - 0.4, 0.8), facecolors=_COLORS[_kind(name)],
                           edgecolors="black", linewidth=0.4)
            label = name.replace(")OVERLAP_F_B", ")").replace(";", "&")
            ax.text((start + end) / 2, r, label, ha="center", va="center", fontsize=5)
    ax.set_yticks(range(P), [f"rank {r}" for r in range(P)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"makespan {result.makespan:g}, bubble {result.bubble:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=150, format=image_format)
    plt.close(fig)
    written.append(path)
    return written
