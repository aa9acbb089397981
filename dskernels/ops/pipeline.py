"""Python side of `torch.ops.dskernels.dualpipe_schedule` (API.md section 4).

    rows = torch.ops.dskernels.dualpipe_schedule(kind, P, N)   # int32 [A, 6] on the CPU
    order = decode_schedule(rows)                              # per-rank action strings

`kind` is "dualpipe", "dualpipev", "1f1b" (or "one_f_one_b") or "zb1p"; the op is the C++ twin (csrc/pipeline/
schedule.cpp) of `dskernels.pipeline.schedule.generate(kind, P, N)`. Each row is

    (rank, kind, stage, mb, stage2, mb2)

with kind 0 = F, 1 = B (full backward), 2 = I (input gradient), 3 = W (weight gradient) (stage2 =
mb2 = -1), and 4 = OVERLAP_F_B: forward of (stage, mb) run together with the full backward of
(stage2, mb2). Rows are grouped by rank in rank order, each rank's in execution order.

The kernel is host C++ registered under CompositeExplicitAutograd (it has no tensor inputs, so
the dispatcher would find no device key); the fake kernel below gives the shape for tracing by
counting the Python generator's actions.
"""

from __future__ import annotations

import torch

__all__ = ["dualpipe_schedule", "decode_schedule", "encode_schedule"]

_KIND_CODES = {"F": 0, "B": 1, "I": 2, "W": 3}
_CODE_KINDS = {v: k for k, v in _KIND_CODES.items()}
OVERLAP_F_B = 4


def _dualpipe_schedule_fake(kind, P, N):
    from dskernels.pipeline import schedule

    order = schedule.generate(kind, P, N)
    return torch.empty((sum(len(r) for r in order), 6), dtype=torch.int32, device="cpu")


def _op_is_built() -> bool:
    try:
        torch.ops.dskernels.dualpipe_schedule.default
    except (AttributeError, RuntimeError):
        return False
    return True


# A _C built before this op existed lacks the schema; the rest of dskernels must still import.
if _op_is_built():
    torch.library.register_fake("dskernels::dualpipe_schedule")(_dualpipe_schedule_fake)


def dualpipe_schedule(kind: str, P: int, N: int) -> list[list[str]]:
    """The compiled generator's schedule, decoded to per-rank action strings."""
    return decode_schedule(torch.ops.dskernels.dualpipe_schedule(kind, P, N))


def decode_schedule(rows: torch.Tensor) -> list[list[str]]:
    """int32 [A, 6] rows (module docstring) -> one list of action strings per rank."""
    if rows.dim() != 2 or rows.shape[1] != 6:
        raise ValueError(f"rows: expected shape [A, 6], got {list(rows.shape)}")
    table = rows.tolist()
    num_ranks = max((r[0] for r in table), default=-1) + 1
    order: list[list[str]] = [[] for _ in range(num_ranks)]
    for rank, kind, stage, mb, stage2, mb2 in table:
        if kind == OVERLAP_F_B:
            order[rank].append(f"({stage}F{mb};{stage2}B{mb2})OVERLAP_F_B")
        elif kind in _CODE_KINDS:
            order[rank].append(f"{stage}{_CODE_KINDS[kind]}{mb}")
        else:
            raise ValueError(f"rows: unknown action kind {kind} (expected 0..4)")
    return order


def encode_schedule(order) -> torch.Tensor:
    """Per-rank action strings -> int32 [A, 6] rows (the op's encoding)."""
    from dskernels.pipeline.schedule import parse_action

    table = []
    for rank, acts in enumerate(order):
        for a in acts:
            subs = parse_action(a)
            if len(subs) == 2:
                (fs, _, fm), (bs, _, bm) = subs
                table.append([rank, OVERLAP_F_B, fs, fm, bs, bm])
            else:
                s, k, m = subs[0]
                table.append([rank, _KIND_CODES[k], s, m, -1, -1])
    return torch.tensor(table, dtype=torch.int32).reshape(-1, 6)
