"""One small call of every CUDA-backed op, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py

Odd sizes on purpose (tails of vectors and blocks). Families add their ops to CASES.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import dskernels  # noqa: E402


def fp8_casts():
    x = torch.randn(61, 384, device="cuda", dtype=torch.bfloat16)
    dskernels.per_token_cast_to_fp8(x)
    dskernels.per_block_cast_to_fp8(torch.randn(130, 256, device="cuda"))


CASES = [fp8_casts]

if __name__ == "__main__":
    for backend in [b for b in ("cuda", "triton") if b in dskernels.available_backends()]:
        with dskernels.backend(backend):
            for case in CASES:
                case()
                torch.cuda.synchronize()
                print(f"ran {case.__name__} on {backend}")
