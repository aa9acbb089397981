"""DeepGEMM's `deep_gemm.utils` names, for code that imports its helpers from there: the casts and
layout helpers (the same functions as `dskernels.<name>`), and its small integer and scale helpers.
As in DeepGEMM, they are also importable from the submodules `layout` (alignment and scale-layout
helpers: SGLang's `from deep_gemm.utils.layout import get_mn_major_tma_aligned_tensor`) and `math`
(the casts and integer helpers)."""

from __future__ import annotations

import torch

from dskernels.ops.fp8 import per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8
from dskernels.ops.gemm import (calc_diff, ceil_div, get_col_major_tma_aligned_tensor,
                                get_m_alignment_for_contiguous_layout, get_mk_alignment_for_contiguous_layout,
                                get_mn_major_tma_aligned_tensor, get_tma_aligned_size)
from dskernels.ops.indexer import per_custom_dims_cast_to_fp8
from python_ref.fp8 import ceil_to_power_of_two

__all__ = ["align", "calc_diff", "ceil_div", "ceil_to_ue8m0", "get_col_major_tma_aligned_tensor",
           "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
           "get_mn_major_tma_aligned_tensor", "get_tma_aligned_size", "per_block_cast_to_fp8",
           "per_channel_cast_to_fp8", "per_custom_dims_cast_to_fp8", "per_token_cast_to_fp8"]


def align(x: int, y: int) -> int:
    """x rounded up to a multiple of y."""
    return ceil_div(x, y) * y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= |x| for float32 x (a UE8M0 scale), as DeepGEMM rounds its scales
    with use_ue8m0; exact (on the bits, not through log2)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x: expected a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return ceil_to_power_of_two(x.abs())


from dskernels.utils import layout, math  # noqa: E402,F401  (DeepGEMM's submodules; after the helpers they import)
