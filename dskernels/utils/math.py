"""DeepGEMM's `deep_gemm.utils.math` names: the casts and the small integer and scale helpers."""

from dskernels.ops.fp8 import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8
from dskernels.ops.gemm import ceil_div
from dskernels.ops.indexer import per_custom_dims_cast_to_fp8
from dskernels.utils import align, ceil_to_ue8m0

__all__ = ["align", "ceil_div", "ceil_to_ue8m0", "per_block_cast_to_fp8", "per_channel_cast_to_fp8",
           "per_custom_dims_cast_to_fp8", "per_token_cast_to_fp8"]
