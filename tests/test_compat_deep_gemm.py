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


def _fp8(*shape):
    return torch.randn(*shape).to(torch.float8_e4m3fn)


def _d_calls():
    """(call with the output d and the layout, its layout's name) for each m-grouped entry taking d."""
    bf16 = torch.bfloat16
    a, b = (_fp8(8, 128), torch.ones(8, 1)), (_fp8(2, 16, 128), torch.ones(2, 1, 1))
    a3 = (_fp8(2, 8, 128), torch.ones(2, 8, 1))
    bn = (_fp8(2, 128, 16), torch.ones(2, 1, 1))
    ab, bb = torch.randn(8, 128, dtype=bf16), torch.randn(2, 16, 128, dtype=bf16)
    ab3 = torch.randn(2, 8, 128, dtype=bf16)
    rows, counts = torch.zeros(8, dtype=torch.int32), torch.full((2,), 8, dtype=torch.int32)
    return [
        (lambda d, x=rows: dskernels.m_grouped_fp8_gemm_nt_contiguous(a, b, d, x), (8, 16), "grouped_layout"),
        (lambda d, x=rows: dskernels.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices=x), (8, 16), "m_indices"),
        (lambda d, x=rows: dskernels.m_grouped_fp8_gemm_nn_contiguous(a, bn, d, x), (8, 16), "grouped_layout"),
        (lambda d, x=counts: dskernels.m_grouped_fp8_gemm_nt_masked(a3, b, d, x, 8), (2, 8, 16), "masked_m"),
        (lambda d, x=counts: dskernels.fp8_m_grouped_gemm_nt_masked(a3, b, d, x, 8), (2, 8, 16), "masked_m"),
        (lambda d, x=rows: dskernels.m_grouped_bf16_gemm_nt_contiguous(ab, bb, d, x), (8, 16), "grouped_layout"),
        (lambda d, x=counts: dskernels.m_grouped_bf16_gemm_nt_masked(ab3, bb, d, x, 8), (2, 8, 16), "masked_m"),
    ]


@pytest.mark.parametrize("kind", ["shape", "dtype", "device", "self_overlap", "overlaps_layout"])
@pytest.mark.parametrize("case", range(7))
def test_m_grouped_errors_name_d(case, kind):
    """DeepGEMM's m-grouped entries take the output as d: every refusal of it says d (the ops they
    call name it out), and a layout that d overlaps is named as the caller passed it."""
    call, shape, layout_name = _d_calls()[case]
    call(torch.empty(shape, dtype=torch.bfloat16))  # the call runs with a proper d
    if kind == "overlaps_layout":  # d's bytes hold the layout (int32 view of bf16 storage)
        d = torch.zeros(shape, dtype=torch.bfloat16)
        layout = d.view(-1)[:2 * (8 if layout_name != "masked_m" else 2)].view(torch.int32)
        with pytest.raises(ValueError, match=f"^d: .*{layout_name}"):
            call(d, layout)
        return
    d = {"shape": torch.empty(*shape[:-1], 17, dtype=torch.bfloat16),
         "dtype": torch.empty(shape, dtype=torch.float32),
         "device": torch.empty(shape, dtype=torch.bfloat16, device="meta"),
         "self_overlap": torch.empty(1, dtype=torch.bfloat16).expand(shape)}[kind]
    with pytest.raises((TypeError, ValueError), match="^d: "):
        call(d)


@pytest.mark.parametrize("which", ["a", "b"])
def test_m_grouped_masked_names_a_and_b(which):
    """m_grouped_fp8_gemm_nt_masked(a, b, d, ...): a bare tensor for a pair is named a or b (the
    older entry it used to go through calls them lhs and rhs)."""
    a = (_fp8(2, 8, 128), torch.ones(2, 8, 1))
    b = (_fp8(2, 16, 128), torch.ones(2, 1, 1))
    args = {"a": a, "b": b}
    args[which] = args[which][0]
    with pytest.raises(TypeError, match=f"^{which}: expected a tuple"):
        dskernels.m_grouped_fp8_gemm_nt_masked(args["a"], args["b"], torch.empty(2, 8, 16, dtype=torch.bfloat16),
                                               torch.full((2,), 8, dtype=torch.int32), 8)


def test_wgrad_gemm_errors_name_lhs_rhs_out():
    """wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out) runs fp8_gemm_nt's work, whose names are a, b, d:
    its refusals name lhs, rhs and out as the caller passed them."""
    lhs, rhs = (_fp8(8, 128), torch.ones(8, 1)), (_fp8(16, 128), torch.ones(16, 1))
    dskernels.wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, torch.zeros(8, 16))
    with pytest.raises(ValueError, match="^out: expected shape"):
        dskernels.wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, torch.zeros(8, 17))
    with pytest.raises(ValueError, match="^out: expected an output whose elements do not share memory"):
        dskernels.wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, torch.zeros(1, 16).expand(8, 16))
    with pytest.raises(ValueError, match="^out: expected a tensor on cpu"):
        dskernels.wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, torch.zeros(8, 16, device="meta"))
    for which in ("lhs", "rhs"):
        args = {"lhs": lhs, "rhs": rhs}
        args[which] = args[which][0]
        with pytest.raises(TypeError, match=f"^{which}: expected a tuple"):
            dskernels.wgrad_gemm_fp8_fp8_fp32_nt(args["lhs"], args["rhs"], torch.zeros(8, 16))
