"""Helpers shared by tests, benchmarks and users' own checks."""

from dskernels.testing.distributed import run_distributed
from dskernels.testing.numeric import calc_diff

__all__ = ["calc_diff", "run_distributed"]
