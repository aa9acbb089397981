"""The sm90 grouped FP8 GEMMs with their tiles walked along N (DSKERNELS_GEMM_GROUPED_RASTER=along_n,
fp8_gemm::GroupedRaster::kAlongN; CUTLASS's group scheduler walks along M by default) against
python_ref.gemm with tests/test_gemm.py's bounds, and bit for bit against the default order: the
order only decides which CTA computes a tile and when, never a tile's arithmetic (GPU). In a file of
its own while it has never run on a GPU (written 2026-12-07 without one): a fault here must not end
the CUDA context of tests/test_gemm_sm90.py. scripts/gpu_check.sh benchmarks the order
(DSKERNELS_GEMM_RASTER_TESTED) only once this file has passed in the same device call."""

import pytest
import torch

import dskernels
from test_gemm import (assert_segments_close, contiguous_layout, empty_out, grouped_weights, poison_rows,
                       quantized_pair)
from test_gemm_sm90 import cuda_backend  # noqa: F401  (the fixture: every test under the forced "cuda" backend)
from test_gemm_sm90 import grouped_config_forced  # noqa: F401  (the fixture: each grouped config and the rule)
from test_gemm_sm90 import run_masked_against_oracle

pytestmark = pytest.mark.gpu


def contiguous_in_both_orders(monkeypatch, sizes, aligned, n, k):
    """One contiguous call along N, checked against the oracle, and the same call along M: the same
    bits (the padding rows' outputs are unspecified: compared where a group owns the row)."""
    m_indices, ranges = contiguous_layout(sizes, aligned, "cuda")
    total = m_indices.numel()
    x, a, sa = quantized_pair(total, k, "cuda", per_block=False, scale_layout="row")
    poison_rows(a, sa, m_indices == -1)
    w, b, sb = grouped_weights(len(sizes), n, k, "cuda", "row")
    outs = {}
    for raster in ("along_n", "along_m"):
        monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_RASTER", raster)
        outs[raster] = empty_out(total, n, device="cuda")
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), outs[raster], m_indices)
    assert_segments_close(outs["along_n"], ranges, x, a, sa, w, b, sb)
    owned = m_indices >= 0
    assert torch.equal(outs["along_n"][owned].view(torch.int16), outs["along_m"][owned].view(torch.int16))


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned128", "unaligned"])
@pytest.mark.parametrize("n", [144, 300])
def test_contiguous(cuda_backend, grouped_config_forced, monkeypatch, aligned, n):
    # group 1 is empty, group 3 has one row; n = 300: an odd count of N tiles (multicast clusters)
    contiguous_in_both_orders(monkeypatch, [7, 0, 130, 1], aligned, n, 256)


def test_contiguous_many_row_tiles(cuda_backend, grouped_config_forced, monkeypatch):
    """Groups of several row tiles and N tiles (the shape the order is for, scaled down): every
    CTA walks more than one tile of each group, across group boundaries."""
    contiguous_in_both_orders(monkeypatch, [1000, 640, 77, 513], True, 1024, 512)


@pytest.mark.parametrize("expected_m", [32, 256], ids=["tile64", "tile128"])
@pytest.mark.parametrize("n", [136, 300])
def test_masked(cuda_backend, grouped_config_forced, monkeypatch, n, expected_m):
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_RASTER", "along_n")
    run_masked_against_oracle([7, 0, 130, 1], 130, n, 256, "tma", expected_m)


def test_masked_many_experts_few_rows(cuda_backend, grouped_config_forced, monkeypatch):
    """DeepEP's low-latency layout (most of 96 experts without a row): the scheduler skips the empty
    groups along N too."""
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_RASTER", "along_n")
    counts = [0] * 96
    for g, rows in zip(range(5, 96, 9), [1, 9, 4, 2, 7, 3, 1, 8, 5, 6, 2]):
        counts[g] = rows
    counts[-1] = 3
    run_masked_against_oracle(counts, 16, 256, 256, "tma", 4)


@pytest.mark.parametrize("num_sms", [1, 7])
def test_num_sms_limit(cuda_backend, grouped_config_forced, monkeypatch, num_sms):
    """set_num_sms: the persistent grid along N (grid.y instead of grid.x) still holds whole
    clusters within the limit (scripts/check_gemm_grid.cu checks CUTLASS's grid functions on the
    host for both orders)."""
    dskernels.set_num_sms(num_sms)
    try:
        contiguous_in_both_orders(monkeypatch, [7, 0, 130, 1], False, 300, 256)
    finally:
        dskernels.set_num_sms(None)
