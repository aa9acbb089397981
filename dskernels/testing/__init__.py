"""Helpers shared by tests, benchmarks and users' own checks."""

from dskernels.testing import bench
from dskernels.testing.distributed import run_distributed
from dskernels.testing.numeric import calc_diff
from dskernels.testing.sync import HostSyncError, no_host_sync

__all__ = ["HostSyncError", "bench", "calc_diff", "no_host_sync", "run_distributed"]
