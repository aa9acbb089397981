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
    # Public wrappers that check one argument against another before the op's own device check
    # (which named that argument when the one compared against was the misplaced tensor):
    # the bounds against q,
    ("q", lambda m: dskernels.fp8_mqa_logits(m(_fp8(3, 4, 32)), (_fp8(16, 32), torch.ones(16)), torch.ones(3, 4),
                                             torch.zeros(3, dtype=torch.int32),
                                             torch.full((3,), 16, dtype=torch.int32))),
    # the grouped layout against a,
    ("a", lambda m: dskernels.m_grouped_fp8_gemm_nt_contiguous(
        (m(_fp8(4, 128)), torch.ones(4, 1)), (_fp8(2, 8, 128), torch.ones(2, 1, 1)), torch.empty(4, 8, dtype=BF16),
        torch.zeros(4, dtype=torch.int32))),
    ("a", lambda m: dskernels.m_grouped_bf16_gemm_nt_contiguous(m(torch.randn(4, 8, dtype=BF16)),
                                                                torch.randn(2, 6, 8, dtype=BF16),
                                                                torch.empty(4, 6, dtype=BF16),
                                                                m_indices=torch.zeros(4, dtype=torch.int32))),
    # the varlen indices against block_table,
    ("block_table", lambda m: dskernels.fp8_paged_mqa_logits(
        _fp8(2, 1, 4, 32), torch.zeros(3, 4, 1, 36, dtype=torch.uint8), torch.ones(2, 4),
        torch.tensor([3, 5], dtype=torch.int32), m(torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)), None, 8,
        indices=torch.tensor([1, 0], dtype=torch.int32))),
    # and the cache against q where the call plans the batch itself (FlashMLA's newer forms).
    ("q", lambda m: dskernels.flash_mla_with_kvcache(m(torch.randn(2, 1, 2, 64, dtype=BF16)),
                                                     torch.randn(3, 16, 1, 64, dtype=BF16),
                                                     torch.tensor([[0, 1], [2, 0]], dtype=torch.int32),
                                                     torch.tensor([20, 5], dtype=torch.int32), 32,
                                                     dskernels.get_mla_metadata()[0], None)),
    ("q", lambda m: dskernels.flash_mla_with_kvcache(
        m(torch.randn(2, 1, 2, 64, dtype=BF16)), torch.randn(3, 16, 1, 64, dtype=BF16),
        torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), torch.tensor([20, 5], dtype=torch.int32), 32,
        dskernels.get_mla_metadata(torch.tensor([20, 5], dtype=torch.int32), 2, 1)[0], None)),
]


@pytest.mark.parametrize("name,call", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_the_misplaced_tensor_is_named(name, call):
    call(lambda t: t)  # the same call with every tensor on the CPU runs
    with pytest.raises(ValueError, match=f"^{name}: expected a tensor on cpu \\(where .*\\), got meta"):
        call(_meta)
