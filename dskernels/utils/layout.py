"""DeepGEMM's `deep_gemm.utils.layout` names: alignment and scale-layout helpers."""

from dskernels.ops.gemm import (get_col_major_tma_aligned_tensor, get_m_alignment_for_contiguous_layout,
                                get_mk_alignment_for_contiguous_layout, get_mn_major_tma_aligned_tensor,
                                get_tma_aligned_size)

get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout  # DeepGEMM's alias

__all__ = ["get_col_major_tma_aligned_tensor", "get_k_alignment_for_contiguous_layout",
           "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
           "get_mn_major_tma_aligned_tensor", "get_tma_aligned_size"]
