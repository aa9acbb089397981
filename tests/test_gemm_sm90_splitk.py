"""The split-K config of the sm90 dense FP8 GEMM (`m64_splitk`, fp8_gemm::DenseConfig::kM64SplitK)
against python_ref.gemm with tests/test_gemm.py's bounds (GPU). In a file of its own while it has
never run on a GPU (written 2026-12-04 without one): a fault here must not end the CUDA context of
tests/test_gemm_sm90.py. scripts/gpu_check.sh benchmarks and sanitizes the config
(DSKERNELS_GEMM_SPLITK_TESTED) only once this file has passed in the same device call."""

import pytest
import torch

import dskernels
from test_gemm import (FP8_NAN, assert_close_to_bf16_product, assert_close_to_oracle, empty_out,
                       quantized_pair)
from test_gemm_sm90 import check_dense_against_oracle, check_dense_graph_replays
from test_gemm_sm90 import cuda_backend  # noqa: F401  (the fixture: every test under the forced "cuda" backend)

pytestmark = pytest.mark.gpu


# test_gemm_sm90.py's dense shapes with the config forced: where it does not split (one run, kM64
# itself) and where it does (two runs at k = 1024).
@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (1, 123, 256), (7, 129, 256), (61, 123, 512), (63, 256, 384),
                                   (64, 200, 256), (65, 200, 256), (130, 200, 256), (256, 384, 1024),
                                   (1, 4096, 7168), (65, 2112, 7168), (128, 24576, 1536)])
def test_forced_on_every_dense_shape(cuda_backend, monkeypatch, m, n, k):
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", "m64_splitk")
    check_dense_against_oracle(m, n, k)


@pytest.mark.parametrize("m,n,k", [(1, 123, 1024), (7, 129, 2048), (61, 200, 4096), (64, 2112, 7168),
                                   (33, 576, 7168), (2, 1536, 7168), (100, 300, 2048)])
def test_dense_split_k(cuda_backend, monkeypatch, m, n, k):
    """m64_splitk where it really splits (2 to 14 runs of K): exact against the oracle, in NaN-padded
    strided views, and the same bits on a second call (the runs are summed in a fixed order)."""
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", "m64_splitk")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert torch.ops.dskernels._sm90_gemm_dense_splits(m, n, k, sms) > 1
    x, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    w, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    b_wide = torch.full((n, k + 128), FP8_NAN, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    b_wide[:, :k] = b
    out_wide = empty_out(m, n + 16, device="cuda")
    out = out_wide[:, 8:8 + n]
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b_wide[:, :k], sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    assert_close_to_bf16_product([(out, x, w)])
    assert out_wide[:, :8].isnan().all() and out_wide[:, 8 + n:].isnan().all()
    again = empty_out(m, n, device="cuda")
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), again)
    assert torch.equal(again.view(torch.int16), out.contiguous().view(torch.int16))


def test_split_k_cuda_graph_replay_with_new_inputs(cuda_backend, monkeypatch):
    """m64_splitk captured in a CUDA graph (servers replay decode steps): the partials' workspace
    comes from the graph's pool and the sum kernel follows the batched GEMM in the graph; replays
    with new values in the same buffers match the oracle, twice."""
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", "m64_splitk")
    m, n, k = 7, 576, 2048  # 5 tiles, 16 K blocks: 4 runs of 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert torch.ops.dskernels._sm90_gemm_dense_splits(m, n, k, sms) > 1
    check_dense_graph_replays(m, n, k)
