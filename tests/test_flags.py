"""Every public flag (a bool argument of an op wrapper) takes numpy's bool as it takes Python's, as
DeepGEMM's and FlashMLA's bindings do, and refuses anything else (an int included) with a
TypeError naming the flag. Checked on the ref backend: the flags are read before any kernel."""

import numpy
import pytest
import torch

import dskernels
from test_gemm import _grouped_args
from test_mla import make_inputs
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


def _dense_decode(value):
    q, k_cache, block_table, cache_seqlens, dv, _ = make_inputs([5, 9], 2, 4, 1, 16, torch.float32, torch.float32)
    meta, num_splits = dskernels.get_mla_metadata(cache_seqlens, 2 * 4, 1)
    return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv, meta, num_splits,
                                            causal=value)


def _sparse_decode_flashmla_order(value):
    """FlashMLA's positional form: is_fp8_kvcache where dskernels' k_scale is."""
    q, k_cache, indices, dv, _, _, _ = decode_inputs(1, 1, 16, 1, 64, 2, 40, torch.bfloat16, True, seed=5)
    return dskernels.flash_mla_with_kvcache(q, k_cache, None, None, dv, dskernels.get_mla_metadata()[0], None,
                                            None, False, value, indices)


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
    "causal": _dense_decode,
    "is_fp8_kvcache (FlashMLA's positional form)": _sparse_decode_flashmla_order,
    "renormalize": _router,
}
# the inputs of these are for True only
ONLY_TRUE = {flag: (True,) for flag in CALLS if flag.startswith(("use_psum_layout", "is_fp8_kvcache"))}


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
    name, expected = flag.split(" ")[0], "expected a bool, got int"
    if flag.endswith("positional form)"):  # (an int there is read as k_scale, which is then refused)
        name, expected = "k_scale", "1 more positional arguments follow it"
    with dskernels.backend("ref"), pytest.raises(TypeError, match=f"^{name}: {expected}"):
        CALLS[flag](1)


def test_numpy_scalars_under_compile_are_named():
    """Dynamo (torch 2.14) traces numpy's scalars as arrays, so inside torch.compile they cannot be
    read as Python's: the refusal says so (it said "got ndarray" alone). A Dynamo that reads them
    as constants must give eager's result instead."""
    torch._dynamo.reset()
    with dskernels.backend("ref"):
        for call in (lambda: dskernels.per_token_cast_to_fp8(X, round_scale=numpy.bool_(True)),
                     lambda: dskernels.grouped_topk(torch.zeros(3, 16), torch.zeros(16), numpy.int64(4), 2, 4)):
            want = call()
            try:
                got = torch.compile(call, backend="aot_eager", fullgraph=True)()
            except Exception as e:  # noqa: BLE001 (Dynamo wraps our TypeError in its own exception)
                assert "Python's under torch.compile, which traces numpy's scalars" in str(e), str(e)
            else:
                assert all(torch.equal(g.view(torch.uint8), w.view(torch.uint8)) for g, w in zip(got, want))
