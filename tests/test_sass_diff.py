"""scripts/sass_diff.py's comparison rules on hand-written SASS (its compile step needs nvcc and is
run by hand: see its docstring)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from sass_diff import compare, normalize  # noqa: E402

KERNEL = ["IMAD R2, R3.reuse, R4, RZ", "@!P0 BRA 0x1f0", "BAR.SYNC.DEFER_BLOCKING 0x9, 0x80",
          "LDS.128 R8, [R2+0x100]", "UIADD3 UR4, UR5, 0x10, URZ", "EXIT"]


def test_register_numbers_reuse_hints_and_branch_targets_do_not_count():
    renamed = ["IMAD R12, R13, R14, RZ", "@!P3 BRA 0x2a0", "BAR.SYNC.DEFER_BLOCKING 0x9, 0x80",
               "LDS.128 R20, [R12+0x100]", "UIADD3 UR8, UR9, 0x10, URZ", "EXIT"]
    assert normalize(KERNEL[0]) == "IMAD R, R, R, RZ" and normalize(KERNEL[1]) == "@!P BRA ADDR"
    assert compare(KERNEL, renamed) == "identical"
    assert compare(KERNEL, [renamed[1], renamed[0], *renamed[2:]]) == "reordered"


def test_immediates_and_opcodes_do_count():
    other_barrier = [*KERNEL[:2], "BAR.SYNC.DEFER_BLOCKING 0xa, 0x80", *KERNEL[3:]]
    assert compare(KERNEL, other_barrier) == "differs (6 -> 6 instructions)"  # same opcodes, another id
    other_offset = [*KERNEL[:3], "LDS.128 R8, [R2+0x180]", *KERNEL[4:]]
    assert compare(KERNEL, other_offset).startswith("differs")
    extra = [*KERNEL[:3], "LDS.128 R8, [R2+0x100]", *KERNEL[3:]]
    assert compare(KERNEL, extra) == "differs (6 -> 7 instructions; LDS.128 +1)"
