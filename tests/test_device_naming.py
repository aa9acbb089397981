"""A tensor on another device than the rest of an op's tensors is named itself (`check_one_device`:
against the device most of them are on), the first argument and the output included, rather than
the argument checked after it. Meta tensors stand for "another device" here (no GPU in CI)."""

import pytest
import torch

import dskernels

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def _meta(t):
    return t.to("meta")


def _fp8(*shape):
    return torch.randn(*shape).to(FP8)


CASES = [  # (misplaced argument, call with it on meta)
    ("a", lambda m: dskernels.bf16_gemm_nt(m(torch.randn(4, 8, dtype=BF16)), torch.randn(6, 8, dtype=BF16),
                                           torch.empty(4, 6, dtype=BF16))),
    ("d", lambda m: dskernels.einsum("bhr,hdr->bhd", torch.randn(2, 3, 4, dtype=BF16), torch.randn(3, 5, 4, dtype=BF16),
                                     m(torch.empty(2, 3, 5, dtype=BF16)))),
    ("a", lambda m: dskernels.m_grouped_bf16_gemm_nt_masked(m(torch.randn(2, 4, 8, dtype=BF16)),
                                                            torch.randn(2, 6, 8, dtype=BF16),
                                                            torch.empty(2, 4, 6, dtype=BF16),
                                                            torch.ones(2, dtype=torch.int32), 4)),
    ("masked_m", lambda m: dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked(
        (_fp8(2, 4, 128), torch.ones(2, 4, 1)), (_fp8(2, 8, 128), torch.ones(2, 1, 1)),
        torch.empty(2, 4, 8, dtype=BF16), m(torch.ones(2, dtype=torch.int32)), 4)),
    ("q", lambda m: dskernels.flash_mla_sparse_fwd(m(torch.randn(3, 2, 64, dtype=BF16)),
                                                   torch.randn(5, 1, 64, dtype=BF16),
                                                   torch.zeros(3, 1, 4, dtype=torch.int32), 64 ** -0.5, 32)),
]


@pytest.mark.parametrize("name,call", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_the_misplaced_tensor_is_named(name, call):
    call(lambda t: t)  # the same call with every tensor on the CPU runs
    with pytest.raises(ValueError, match=f"^{name}: expected a tensor on cpu \\(where .*\\), got meta"):
        call(_meta)
