"""Pure-PyTorch oracles: the definition of every dskernels op, written for clarity, not speed.

Tests compare every backend with these; they are also the CPU kernels of the registered ops.
"""

from python_ref.fp8 import FP8_MAX, GROUP_SIZE, per_block_cast_to_fp8, per_token_cast_to_fp8

__all__ = ["FP8_MAX", "GROUP_SIZE", "per_block_cast_to_fp8", "per_token_cast_to_fp8"]
