"""torch.ops.dskernels.dualpipe_schedule (C++) against the Python generators."""

import pytest
import torch

import dskernels  # noqa: F401
from dskernels.ops import pipeline as ops_pipeline
from dskernels.pipeline import schedule as S

if not ops_pipeline._op_is_built():
    pytest.skip("dskernels._C predates dualpipe_schedule: rebuild with scripts/build.sh",
                allow_module_level=True)

CASES = ([("dualpipev", P, N) for P in range(1, 11) for N in range(2 * P, 2 * P + 7)]
         + [("dualpipe", P, N) for P in range(2, 17, 2) for N in range(2 * P, 2 * P + 13, 2)]
         + [(k, P, N) for k in ("1f1b", "zb1p") for P in range(1, 11) for N in (1, 2, P, 2 * P + 1, 3 * P)])


def test_cpp_equals_python():
    for kind, P, N in CASES:
        rows = torch.ops.dskernels.dualpipe_schedule(kind, P, N)
        assert rows.dtype == torch.int32 and rows.dim() == 2 and rows.shape[1] == 6
        expected = S.generate(kind, P, N)
        assert ops_pipeline.decode_schedule(rows) == expected, (kind, P, N)
        assert torch.equal(ops_pipeline.encode_schedule(expected), rows), (kind, P, N)


def test_zb1p_many_ranks():
    # P^2 unit steps would take hours at this size; both generators step only ranks that can act.
    P = 1 << 14
    rows = torch.ops.dskernels.dualpipe_schedule("zb1p", P, 2)
    assert rows.shape == (6 * P, 6)
    assert ops_pipeline.decode_schedule(rows) == S.zb1p(P, 2)


def test_one_f_one_b_alias():
    """The Python helper's name works as the kind too, in the op, its fake and generate."""
    assert torch.equal(torch.ops.dskernels.dualpipe_schedule("one_f_one_b", 3, 5),
                       torch.ops.dskernels.dualpipe_schedule("1f1b", 3, 5))
    assert S.generate("one_f_one_b", 3, 5) == S.one_f_one_b(3, 5)
    torch.library.opcheck(torch.ops.dskernels.dualpipe_schedule.default, ("one_f_one_b", 3, 5))


def test_encoding_layout():
    rows = torch.ops.dskernels.dualpipe_schedule("dualpipev", 2, 4)
    # rank 0 starts with 0F0, 0F1, 0F2, 3F0, 3I0, 3W0 and its 8th action is (0F3;3B1)OVERLAP_F_B
    assert rows[:6].tolist() == [[0, 0, 0, 0, -1, -1], [0, 0, 0, 1, -1, -1], [0, 0, 0, 2, -1, -1],
                                 [0, 0, 3, 0, -1, -1], [0, 2, 3, 0, -1, -1], [0, 3, 3, 0, -1, -1]]
    assert rows[7].tolist() == [0, 4, 0, 3, 3, 1]
    assert (rows[:, 0].diff() >= 0).all()  # grouped by rank


@pytest.mark.parametrize("kind,P,N,match", [("dualpipe", 3, 12, r"P \(ranks\) must be even"),
                                            ("dualpipe", 4, 9, r"N \(chunks\) must be even"),
                                            ("dualpipev", 4, 7, r"N \(chunks\) must be >= 2\*P = 8"),
                                            ("gpipe", 2, 4, "kind: expected one of"),
                                            ("1f1b", 0, 4, "P and N"),
                                            ("1f1b", 10**6, 10**6, r"P \* N <= 1048576"),
                                            ("zb1p", 4096, 2**20, r"P \* N <= 1048576")])
def test_bad_arguments(kind, P, N, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.dskernels.dualpipe_schedule(kind, P, N)


def test_opcheck_and_compile():
    torch.library.opcheck(torch.ops.dskernels.dualpipe_schedule.default, ("dualpipe", 4, 8))
    torch.library.opcheck(torch.ops.dskernels.dualpipe_schedule.default, ("zb1p", 3, 5))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return torch.ops.dskernels.dualpipe_schedule("dualpipev", 2, 4).sum() + x

    x = torch.zeros(())
    assert f(x).item() == torch.ops.dskernels.dualpipe_schedule("dualpipev", 2, 4).sum().item()


def test_decode_schedule_refuses_bad_rows():
    from dskernels.ops.pipeline import decode_schedule, encode_schedule

    rows = encode_schedule([["0F0", "(0F1;1B0)OVERLAP_F_B"], ["1F0"]])
    assert decode_schedule(rows) == [["0F0", "(0F1;1B0)OVERLAP_F_B"], ["1F0"]]
    with pytest.raises(ValueError, match=r"^rows: expected shape \[A, 6\]"):
        decode_schedule(rows[:, :5])
    bad = rows.clone()
    bad[0, 1] = 9
    with pytest.raises(ValueError, match="^rows: unknown action kind 9"):
        decode_schedule(bad)
