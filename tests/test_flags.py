"""Every public flag (a bool argument of an op wrapper) takes numpy's bool as it takes Python's, as
DeepGEMM's and FlashMLA's bindings do, and refuses anything else (an int included) with a
TypeError naming the flag. Checked on the ref backend: the flags are read before any kernel."""

import numpy
import pytest
import torch

import dskernels
from test_gemm import _grouped_args
from test_mla_sparse import decode_inputs


def _gemm_contiguous(flag_name):
    g = _grouped_args()
    ends = torch.tensor([1, 3, 4], dtype=torch.int32)

    def call(value):
        out = torch.full_like(g["out"], float("nan"))
        options = {"use_psum_layout": True, flag_name: value}  # the psum layout: ends, not per-row ids
        dskernels.m_grouped_fp8_gemm_nt_contiguous((g["a"], g["sa"]), (g["b"], g["sb"]), out, ends, **options)
        return out
    return call


def _sparse_decode(value):
    q, k_cache, indices, dv, _, _, _ = decode_inputs(1, 1, 16, 1, 64, 2, 40, torch.bfloat16, True, seed=5)
    return dskernels.flash_mla_sparse_decode(q, k_cache, indices, dv, is_fp8_kvcache=value)


def _router(value):
    gen = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen)
    return dskernels.grouped_topk(logits, bias, 4, 2, 4, value)


X = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
CALLS = {
    "round_scale": lambda v: dskernels.per_token_cast_to_fp8(X, round_scale=v),
    "round_scale (silu_and_mul_cast_to_fp8)": lambda v: dskernels.silu_and_mul_cast_to_fp8(X, round_scale=v),
    "use_ue8m0": lambda v: dskernels.per_custom_dims_cast_to_fp8(X, (0,), v),
    "use_psum_layout": _gemm_contiguous("use_psum_layout"),
    "ensure_zero_padding": _gemm_contiguous("ensure_zero_padding"),
    "is_fp8_kvcache": _sparse_decode,
    "renormalize": _router,
}
ONLY_TRUE = {"use_psum_layout": (True,), "is_fp8_kvcache": (True,)}  # (the inputs are for True)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("flag", CALLS)
def test_numpy_bool_is_a_bool(flag):
    call = CALLS[flag]
    with dskernels.backend("ref"):
        for value in ONLY_TRUE.get(flag, (False, True)):
            for got, want in zip(_as_tuple(call(numpy.bool_(value))), _as_tuple(call(value)), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("flag", CALLS)
def test_int_is_not_a_bool(flag):
    name = flag.split(" ")[0]
    with dskernels.backend("ref"), pytest.raises(TypeError, match=f"^{name}: expected a bool, got int"):
        CALLS[flag](1)
