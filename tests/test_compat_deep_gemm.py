"""DeepGEMM names SGLang and vLLM import or call: deep_gemm.utils submodules, runtime knobs."""

import pytest
import torch

import dskernels


def test_deep_gemm_utils_submodules():
    from dskernels.utils.layout import get_mn_major_tma_aligned_tensor, get_mk_alignment_for_contiguous_layout
    from dskernels.utils.math import align, ceil_div, ceil_to_ue8m0, per_token_cast_to_fp8  # noqa: F401
    assert get_mn_major_tma_aligned_tensor is dskernels.get_mn_major_tma_aligned_tensor
    assert get_mk_alignment_for_contiguous_layout() == 128 and align(5, 4) == 8 and ceil_div(5, 2) == 3
    assert dskernels.utils.ceil_to_ue8m0 is ceil_to_ue8m0


def test_cublaslt_names():
    a, b = torch.randn(5, 32, dtype=torch.bfloat16), torch.randn(7, 32, dtype=torch.bfloat16)
    d, want = torch.empty(5, 7, dtype=torch.bfloat16), torch.empty(5, 7, dtype=torch.bfloat16)
    dskernels.cublaslt_gemm_nt(a, b, d)
    dskernels.bf16_gemm_nt(a, b, want)
    assert torch.equal(d, want) and dskernels.cublaslt_gemm_tt is dskernels.bf16_gemm_tt


def test_deep_gemm_runtime_knobs():
    if not torch.cuda.is_available():
        assert dskernels.get_num_sms() == 8  # SGLang's configure_deep_gemm_num_sms round trip
    before = dskernels.get_num_sms()
    dskernels.set_num_sms(4)
    assert dskernels.get_num_sms() == min(4, before) or not torch.cuda.is_available()
    dskernels.set_num_sms(None if torch.cuda.is_available() else before)
    dskernels.set_num_sms(None)
    assert dskernels.get_theoretical_mk_alignment_for_contiguous_layout(1000, 8) == 128
    dskernels.set_mk_alignment_for_contiguous_layout(dskernels.get_mk_alignment_for_contiguous_layout())
    with pytest.raises(ValueError, match="new_value"):
        dskernels.set_mk_alignment_for_contiguous_layout(64)
    old = dskernels.get_pdl()
    dskernels.set_pdl(True)
    assert dskernels.get_pdl() is True
    dskernels.set_pdl(old)
    dskernels.set_tc_util(90)
    assert dskernels.get_tc_util() == 90
    dskernels.set_tc_util(100)
