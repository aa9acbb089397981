"""Schedule generators, validator, simulator and renderer (dskernels.pipeline.schedule)."""

import json
import sys

import pytest

from dskernels.pipeline import schedule as S


# ---- golden schedules ------------------------------------------------------------------------

def test_golden_dualpipev_2_4():
    # Matches torch's ScheduleDualPipeV(P=2, N=4) (checked against torch below as well).
    assert S.dualpipev(2, 4) == [
        ["0F0", "0F1", "0F2", "3F0", "3I0", "3W0", "3F1", "(0F3;3B1)OVERLAP_F_B", "(3F2;0B0)OVERLAP_F_B",
         "3B2", "(3F3;0B1)OVERLAP_F_B", "3B3", "0I2", "0W2", "0I3", "0W3"],
        ["1F0", "2F0", "1F1", "2F1", "1F2", "2B0", "(2F2;1B0)OVERLAP_F_B", "(1F3;2B1)OVERLAP_F_B",
         "(2F3;1B1)OVERLAP_F_B", "2B2", "1B2", "2I3", "1I3", "2W3", "1W3"],
    ]


def test_golden_dualpipe_2_4():
    # P=2: each rank is its own "half"; rank 1 starts the reverse pipeline (stages 2, 3).
    assert S.dualpipe(2, 4) == [
        ["0F0", "3F0", "0F1", "3B0", "(3F1;0B0)OVERLAP_F_B", "3B1", "0I1", "0W1"],
        ["2F0", "1F0", "2F1", "1B0", "(1F1;2B0)OVERLAP_F_B", "1B1", "2I1", "2W1"],
    ]


def test_golden_dualpipe_4_8_rank0():
    # Rank 0 of DualPipe's 4-rank figure (8 chunks): warm-up, zero-bubble I/W, overlapped steady state.
    assert S.dualpipe(4, 8)[0] == [
        "0F0", "0F1", "0F2", "7F0", "7I0", "7W0", "7F1", "(0F3;7B1)OVERLAP_F_B", "(7F2;0B0)OVERLAP_F_B",
        "7B2", "(7F3;0B1)OVERLAP_F_B", "7B3", "0I2", "0W2", "0I3", "0W3"]


def test_golden_1f1b_and_zb1p():
    assert S.one_f_one_b(3, 4) == [
        ["0F0", "0F1", "0F2", "0B0", "0F3", "0B1", "0B2", "0B3"],
        ["1F0", "1F1", "1B0", "1F2", "1B1", "1F3", "1B2", "1B3"],
        ["2F0", "2B0", "2F1", "2B1", "2F2", "2B2", "2F3", "2B3"],
    ]
    z = S.zb1p(3, 4)
    assert z[2][:3] == ["2F0", "2I0", "2W0"] or z[2][:2] == ["2F0", "2I0"]
    assert sorted(a for a in z[0] if "W" in a) == ["0W0", "0W1", "0W2", "0W3"]


# ---- properties over many (P, N) -------------------------------------------------------------

DUAL_V = [(P, N) for P in range(1, 9) for N in range(2 * P, 2 * P + 9)]
DUAL = [(P, N) for P in range(2, 13, 2) for N in range(2 * P, 2 * P + 13, 2)]
SINGLE = [(P, N) for P in range(1, 9) for N in (1, 2, 3, P, 2 * P + 1, 3 * P)]


def _counts(order):
    out = {}
    for acts in order:
        for a in acts:
            for s, k, m in S.parse_action(a):
                out[(s, k, m)] = out.get((s, k, m), 0) + 1
    return out


@pytest.mark.parametrize("kind,cases", [("dualpipev", DUAL_V), ("dualpipe", DUAL),
                                        ("1f1b", SINGLE), ("zb1p", SINGLE)])
def test_valid_over_many_sizes(kind, cases):
    for P, N in cases:
        order = S.generate(kind, P, N)
        assert S.validate(order), (kind, P, N)
        assert len(order) == P
        per_pipe = N // 2 if kind == "dualpipe" else N
        stages = 2 * P if kind.startswith("dualpipe") else P
        counts = _counts(order)
        for s in range(stages):
            for m in range(per_pipe):
                assert counts[(s, "F", m)] == 1
                assert counts.get((s, "B", m), 0) + counts.get((s, "I", m), 0) == 1
                assert counts.get((s, "I", m), 0) == counts.get((s, "W", m), 0)
        assert not any(m >= per_pipe for (_, _, m) in counts)
        if kind.startswith("dualpipe"):  # rank r holds stages r and 2P-1-r
            for r, acts in enumerate(order):
                assert {s for a in acts for s, _, _ in S.parse_action(a)} == {r, 2 * P - 1 - r}


def test_bad_sizes_name_the_constraint():
    with pytest.raises(ValueError, match=r"N \(chunks\) must be >= 2\*P = 8"):
        S.dualpipev(4, 7)
    with pytest.raises(ValueError, match=r"P \(ranks\) must be even"):
        S.dualpipe(3, 12)
    with pytest.raises(ValueError, match=r"N \(chunks\) must be even"):
        S.dualpipe(4, 9)
    with pytest.raises(ValueError, match=r"N \(chunks\) must be >= 2\*P = 8"):
        S.dualpipe(4, 6)
    with pytest.raises(ValueError, match="^P: expected an int >= 1, got 0"):
        S.one_f_one_b(0, 4)
    with pytest.raises(ValueError, match="^N: expected an int >= 1, got 0"):
        S.zb1p(2, 0)
    for generate in (S.one_f_one_b, S.zb1p, S.dualpipev, S.dualpipe):  # not minutes of string building
        with pytest.raises(ValueError, match=r"P \* N <= 1048576, got P=1000000, N=1000000"):
            generate(10**6, 10**6)
    for P, N in ((2.0, 4), (True, 4), (2, "4")):  # a TypeError, and the ValueError API.md names for a bad (P, N)
        for error in (TypeError, ValueError):
            with pytest.raises(error, match="^[PN]: expected an int"):
                S.dualpipev(P, N)
    with pytest.raises(ValueError, match="kind"):
        S.generate("gpipe", 2, 4)


def test_validate_rejects_broken_orders():
    good = [list(r) for r in S.one_f_one_b(2, 2)]
    with pytest.raises(ValueError, match="expected one F"):
        S.validate([good[0] + ["0F1"], good[1]])
    with pytest.raises(ValueError, match="one B, or one I and one W"):
        S.validate([[a for a in good[0] if a != "0B1"], good[1]])
    with pytest.raises(ValueError, match="deadlock"):
        # rank 1 wants chunk 1's forward first; rank 0 sends it only after B0, which needs rank 1
        S.validate([["0F0", "0B0", "0F1", "0B1"], ["1F1", "1F0", "1B0", "1B1"]])
    with pytest.raises(ValueError, match="deadlock"):
        S.validate([["0F0", "0W0", "0I0"], ["1F0", "1B0"]])
    with pytest.raises(ValueError, match="action"):
        S.validate([["0X0"]])
    with pytest.raises(ValueError, match="one rank"):
        S.validate([["0F0", "0B0"], ["0F0", "0B0"]])


# ---- torch's ScheduleDualPipeV ---------------------------------------------------------------

def _torch_dualpipev(P, N):
    """torch's ScheduleDualPipeV.pipeline_order, computed without a process group: the per-rank
    generator only reads the group size and the number of micro-batches."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    if not hasattr(schedules, "ScheduleDualPipeV"):
        pytest.skip("this torch has no ScheduleDualPipeV")
    sched = schedules.ScheduleDualPipeV.__new__(schedules.ScheduleDualPipeV)
    sched.pp_group_size = P
    sched._n_microbatches = N
    return [[str(a) for a in sched._calculate_single_rank_operations(r)] for r in range(P)]


@pytest.mark.parametrize("P", range(1, 9))
def test_dualpipev_equals_torch(P):
    for N in range(2 * P, 2 * P + 10):
        assert S.dualpipev(P, N) == _torch_dualpipev(P, N), (P, N)


def test_dualpipev_parses_with_torch_action():
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    for acts in S.dualpipev(3, 7):
        for a in acts:
            assert str(schedules._Action.from_str(a)) == a


# ---- simulator vs the published formulas ------------------------------------------------------

@pytest.mark.parametrize("P", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("F,B,W,FB", [(1, 2, 1, 3), (1, 2, 1, 2.5), (1, 2, 1, 2), (1.5, 3, 1.5, 4), (1, 2, 1, None)])
def test_dualpipe_bubble_formula(P, F, B, W, FB):
    # DualPipe README: bubble (PP/2-1)(F&B + B - 3W); activations PP+1. These are the README's unit
    # costs (F = B - W = W); the exact region is checked below (docs/pipeline.md).
    for N in (2 * P, 3 * P, 4 * P + 2):
        if N % 2:
            continue
        r = S.simulate(S.dualpipe(P, N), F=F, B=B, W=W, FB=FB)
        fb = F + B if FB is None else FB
        assert max(r.idle) == pytest.approx((P / 2 - 1) * (fb + B - 3 * W)), (P, N)
        assert max(r.peak_activations) == P + 1
        assert all(b + i == pytest.approx(r.makespan) for b, i in zip(r.busy, r.idle))


def _dualpipe_gap(order, F, W, FB):
    """Simulated bubble minus (PP/2-1)(F&B + B - 3W) at B = F + W (input-gradient part = F)."""
    B = F + W
    P = len(order)
    return S.simulate(order, F=F, B=B, W=W, FB=FB).bubble - (P / 2 - 1) * (FB + B - 3 * W)


@pytest.mark.parametrize("P", [2, 4, 6, 8, 10, 16])
def test_dualpipe_bubble_formula_exact_region(P):
    # The formula holds exactly on the whole region  B - W = F,  0 <= W <= F,  B <= F&B <= F + B.
    # Proof per (P, N): with comm = 0 every event time is a max over dependency chains of sums of
    # costs (max-plus), so the bubble max_r(makespan - busy_r) is a convex function of the costs,
    # positively homogeneous; the formula is linear. At fixed F the region is the parallelogram
    # (W, F&B) in {(0, F), (0, 2F), (F, 2F), (F, 3F)}: a convex function <= 0 at its corners and
    # == 0 at its centre (F/2, 2F) is == 0 on all of it.
    for N in sorted({2 * P, 2 * P + 2, 3 * P + (3 * P) % 2, 4 * P + 6}):
        order = S.dualpipe(P, N)
        for F in (1.0, 2.5):
            corners = [(0.0, F), (0.0, 2 * F), (F, 2 * F), (F, 3 * F)]
            for W, FB in corners + [(F / 2, 2 * F)] + [(0.25 * F, 1.5 * F), (0.75 * F, 2.5 * F)]:
                assert _dualpipe_gap(order, F, W, FB) == pytest.approx(0.0, abs=1e-9), (P, N, F, W, FB)


def test_dualpipe_bubble_formula_needs_input_grad_equal_to_forward():
    # W = F alone is not enough: the formula writes the input-gradient time B - W where the chain
    # it counts has F (docs/pipeline.md), so it is exact only when B - W = F. P = 8, N = 32
    # (docs/pipeline.md's table): (F, B, W, F&B) -> simulated bubble, formula.
    order = S.dualpipe(8, 32)
    for (F, B, W, FB), sim, formula in [((1, 3, 1, 3), 8, 9), ((1.5, 3.5, 1.5, 4), 7.5, 9),
                                        ((2, 3, 2, 5), 12, 6), ((1, 1.5, 1, 2.5), 6, 3),
                                        ((1, 3, 1, 4), 11, 12)]:
        r = S.simulate(order, F=F, B=B, W=W, FB=FB)
        assert r.bubble == pytest.approx(sim) and 3 * (FB + B - 3 * W) == pytest.approx(formula)
    # ... and outside W <= F or B <= F&B <= F + B it fails even with B - W = F.
    assert _dualpipe_gap(order, F=1.0, W=1.5, FB=3.0) != pytest.approx(0.0)
    assert _dualpipe_gap(order, F=1.0, W=0.5, FB=1.25) != pytest.approx(0.0)
    assert _dualpipe_gap(order, F=1.0, W=0.5, FB=3.0) != pytest.approx(0.0)


def test_dualpipe_bubble_chain_lower_bound():
    # For any costs, the bubble is at least (PP/2-1)(F + F&B - 2W), which is the published formula
    # when B - W = F (the middle rank's wait for chunk 0, its cooldown waits and the step's tail).
    import random
    rng = random.Random(0)
    for _ in range(60):
        P = rng.choice([2, 4, 6, 8, 12])
        N = 2 * P + 2 * rng.randrange(4)
        F, B = rng.uniform(0.1, 3), rng.uniform(0.1, 4)
        W, FB = rng.uniform(0, B), rng.uniform(0, F + B + 2)
        r = S.simulate(S.dualpipe(P, N), F=F, B=B, W=W, FB=FB)
        assert r.bubble >= (P / 2 - 1) * (F + FB - 2 * W) - 1e-9, (P, N, F, B, W, FB)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("F,B", [(1, 2), (1.5, 2.5), (1, 1)])
def test_1f1b_bubble_formula(P, F, B):
    for N in (1, P, 2 * P + 3):
        r = S.simulate(S.one_f_one_b(P, N), F=F, B=B, W=0.5 * F)
        assert max(r.idle) == pytest.approx((P - 1) * (F + B))
        assert r.makespan == pytest.approx(N * (F + B) + (P - 1) * (F + B))
        assert r.peak_activations == [min(P - k, N) for k in range(P)]


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8, 16])
def test_zb1p_bubble_formula(P):
    # ZB1P (ZB-H1): (PP-1)(F+B-2W) with F = W = B/2 (the paper's unit costs), same activations as 1F1B.
    for N in (P, 2 * P, 3 * P + 1):
        r = S.simulate(S.zb1p(P, N), F=1, B=2, W=1)
        assert max(r.idle) == pytest.approx((P - 1) * (1 + 2 - 2 * 1))
        assert max(r.peak_activations) == P
        assert max(r.peak_deferred_w) <= P


def _zb1p_every_rank_every_step(P, N):
    """The greedy stated in zb1p's docstring, literally: every rank decides at every unit step."""
    ranks, f_done, i_done, pending = [[] for _ in range(P)], [0] * P, [0] * P, [[] for _ in range(P)]
    while any(i_done[r] < N or pending[r] for r in range(P)):
        picks = []
        for r in range(P):
            up_f = N if r == 0 else f_done[r - 1]
            down_i = f_done[r] if r == P - 1 else i_done[r + 1]
            if i_done[r] < f_done[r] and i_done[r] < down_i:
                picks.append("I")
            elif len(pending[r]) > P - 1:
                picks.append("W")
            elif f_done[r] < up_f and f_done[r] - i_done[r] < P - r:
                picks.append("F")
            else:
                picks.append("W" if pending[r] else None)
        for r, pick in enumerate(picks):
            if pick == "I":
                pending[r].append(i_done[r])
                ranks[r].append(f"{r}I{i_done[r]}")
                i_done[r] += 1
            elif pick == "F":
                ranks[r].append(f"{r}F{f_done[r]}")
                f_done[r] += 1
            elif pick == "W":
                ranks[r].append(f"{r}W{pending[r].pop(0)}")
    return ranks


def test_zb1p_steps_only_ranks_that_can_act():
    # zb1p steps only the ranks next to one that acted; the result is the every-rank greedy's.
    for P in range(1, 25):
        for N in sorted({1, 2, 3, 5, P - 1, P, P + 1, 2 * P, 3 * P + 1} - {0}):
            assert S.zb1p(P, N) == _zb1p_every_rank_every_step(P, N), (P, N)
    # Many ranks, one chunk: the every-rank greedy makes O(P^2) rank decisions (minutes here).
    order = S.zb1p(1 << 14, 1)
    assert [len(acts) for acts in order] == [3] * (1 << 14)
    assert order[-1] == [f"{(1 << 14) - 1}F0", f"{(1 << 14) - 1}I0", f"{(1 << 14) - 1}W0"]


def test_simulator_comm_and_overlap():
    base = S.simulate(S.one_f_one_b(4, 8))
    slow = S.simulate(S.one_f_one_b(4, 8), comm=0.5)
    assert slow.makespan > base.makespan
    # at least the (P-1) hops forward and back of the first chunk each pay comm
    assert slow.makespan >= base.makespan + 2 * 3 * 0.5
    dp = S.simulate(S.dualpipe(4, 16), FB=2.0)      # overlap hides a third of F+B
    dp0 = S.simulate(S.dualpipe(4, 16))
    assert dp.makespan < dp0.makespan
    with pytest.raises(ValueError, match="W <= B"):
        S.simulate(S.one_f_one_b(2, 2), B=1, W=2)


def test_simulate_infers_dualpipe_from_plain_lists():
    order = S.dualpipe(4, 8)
    plain = [list(r) for r in order]
    assert S.simulate(plain).makespan == S.simulate(order).makespan
    plainv = [list(r) for r in S.dualpipev(4, 8)]
    assert S.simulate(plainv).makespan == S.simulate(S.dualpipev(4, 8)).makespan


def test_render(tmp_path):
    # the Chrome trace alone (no matplotlib needed: the device machine has none)
    assert S.render(S.dualpipe(4, 8), str(tmp_path / "dualpipe.json")) == [str(tmp_path / "dualpipe.json")]
    trace = json.loads((tmp_path / "dualpipe.json").read_text())
    names = [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(names) == sum(len(r) for r in S.dualpipe(4, 8))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # (test_render_without_matplotlib covers that case)
        return
    paths = S.render(S.dualpipe(4, 8), str(tmp_path / "dualpipe.png"))
    assert paths == [str(tmp_path / "dualpipe.json"), str(tmp_path / "dualpipe.png")]
    assert json.loads((tmp_path / "dualpipe.json").read_text()) == trace
    png = tmp_path / "dualpipe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the path as given, in the format its suffix names (an svg was drawn as <root>.png before)
    assert S.render(S.dualpipe(4, 8), tmp_path / "v.svg") == [str(tmp_path / "v.json"), str(tmp_path / "v.svg")]
    assert (tmp_path / "v.svg").read_text().lstrip().startswith("<?xml")
    assert S.render(S.one_f_one_b(2, 4), tmp_path / "t.json") == [str(tmp_path / "t.json")]
    assert S.render(S.one_f_one_b(2, 4), tmp_path / "plain")[1] == str(tmp_path / "plain")  # PNG, no suffix
    assert (tmp_path / "plain").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="^path: expected .json or an image suffix"):
        S.render(S.one_f_one_b(2, 4), tmp_path / "x.txt")
    assert not (tmp_path / "x.json").exists()  # refused before anything was written


def test_render_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(ImportError, match="^path: drawing .* needs matplotlib"):
        S.render(S.one_f_one_b(2, 4), tmp_path / "x.png")
    assert (tmp_path / "x.json").exists()  # the trace is written first
    assert S.render(S.one_f_one_b(2, 4), tmp_path / "y.json") == [str(tmp_path / "y.json")]


def test_simulate_unpacks_in_api_order():
    """API.md: simulate "returns per-rank busy and idle time, the makespan and peak live activations"."""
    result = S.simulate(S.dualpipe(4, 8))
    busy, idle, makespan, peak = result
    assert (busy, idle, makespan, peak) == (result.busy, result.idle, result.makespan, result.peak_activations)


def test_simulate_checks_every_cost():
    order = S.one_f_one_b(2, 4)
    for name, value in (("F", -1), ("FB", -5), ("FB", float("nan")), ("FB", float("inf")), ("F", True),
                        ("comm", float("inf"))):
        with pytest.raises(ValueError, match=rf"^{name}: expected a finite number >= 0, got {value!r}"):
            S.simulate(order, **{name: value})
    assert S.simulate(order, FB=0).makespan > 0


@pytest.mark.parametrize("order, match", [
    ([], "^order: expected a non-empty list"),
    ([["0F0", "0B0"], ["2F0", "2B0"]], "^order: stages must be 0..S-1"),
    ([["0F0", "0B0", "0F2", "0B2"], ["1F0", "1B0", "1F2", "1B2"]], r"^stage \d: expected chunks 0..1"),
])
def test_schedule_validate_names_the_problem(order, match):
    from dskernels.pipeline import schedule

    with pytest.raises(ValueError, match=match):
        schedule.validate(order)
