"""Pure-PyTorch oracles: the definition of every dskernels op, written for clarity, not speed.

Tests compare every backend with these; they are also the CPU kernels of the registered ops.
One module per family: fp8 (casts), gemm, mla, ep, moe (the router), models (the whole decoder
layer).
"""

from python_ref.ep import get_dispatch_layout
from python_ref.fp8 import (FP8_MAX, GROUP_SIZE, per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8,
                            silu_and_mul, silu_and_mul_cast_to_fp8)
from python_ref.gemm import (fp8_gemm_nt, gemm_fp8_fp8_bf16_nt, m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
                             m_grouped_gemm_fp8_fp8_bf16_nt_masked)
from python_ref.mla import flash_mla_with_kvcache
from python_ref.moe import grouped_topk

__all__ = [
    "FP8_MAX",
    "GROUP_SIZE",
    "flash_mla_with_kvcache",
    "fp8_gemm_nt",
    "gemm_fp8_fp8_bf16_nt",
    "get_dispatch_layout",
    "grouped_topk",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_token_cast_to_fp8",
    "silu_and_mul",
    "silu_and_mul_cast_to_fp8",
]
