"""The sm90 MLA decode's opt-in fp8 TMA path (DSKERNELS_MLA_FP8_TMA=1) against python_ref.mla, on
the device only: whole 64-key blocks of a float8_e4m3fn cache come raw by TMA into the upper half of
the stage and are widened there in place (csrc/include/dskernels/sm90_mla_decode_producer.cuh,
widen_fp8_tile); partial blocks keep the register path.

A file of its own: written off the device, this path may fault or trap the first time it runs,
which ends the process's CUDA context; here that costs this file only, and scripts/gpu_check.sh
benchmarks the path (the `cuda[fp8_tma]` rows) only when this file passed.
"""

import pytest
import torch

import dskernels
from test_mla_sm90 import D, FP8, HUGE_PAGE, _need_cuda_backend, check, decode, make_cache

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def fp8_tma(monkeypatch):
    monkeypatch.setenv("DSKERNELS_MLA_FP8_TMA", "1")
    # A tensor map the driver refuses would otherwise fall back to the register path silently (one
    # warning per process): these tests would then pass without running the TMA path.
    monkeypatch.setenv("DSKERNELS_MLA_REQUIRE_TMA", "1")


# (page size, cache row width in bytes, h_q, s_q, causal): pages of one and of several blocks,
# packed and padded rows (640 bytes: the descriptor's strides), one and two row tiles, MTP rows.
CASES = [(64, D, 16, 1, False), (64, 640, 128, 2, True), (128, D, 64, 3, True), (192, 640, 1, 1, False)]


@pytest.mark.parametrize("page_size,width,h_q,s_q,causal", CASES)
def test_fp8_tma_matches_oracle(page_size, width, h_q, s_q, causal):
    """Lengths on and off the block grid (a partial last block takes the register path in the same
    sequence), an empty sequence, one block exactly, a long one; NaN everywhere no sequence owns."""
    _need_cuda_backend()
    lengths = [1000, 0, 129, 64, 4096]
    k_cache, block_table, k_scale = make_cache(lengths, 1, page_size, FP8, seed=page_size + h_q, d_alloc=width)
    q = torch.randn(len(lengths), s_q, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, causal)
    check(out, lse, q, k_cache, block_table, lens, k_scale, causal)


def test_fp8_tma_float16_queries_and_two_kv_heads():
    _need_cuda_backend()
    lengths = [300, 64, 700]
    k_cache, block_table, k_scale = make_cache(lengths, 2, 64, FP8, seed=7)
    q = torch.randn(len(lengths), 2, 32, D, device="cuda").to(torch.float16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)
    check(out, lse, q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)


def test_fp8_tma_keys_outside_the_cache_add_nothing():
    """A page id outside the cache: its box is zero-filled and its keys masked, as on the 16-bit
    TMA path (tests/test_mla_sm90.py::test_keys_outside_the_cache_add_nothing)."""
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache([128, 256], 1, 64, FP8, seed=64)
    q = torch.randn(2, 1, 16, D, device="cuda").to(torch.bfloat16)
    bad_table = block_table.clone()
    bad_table[1, 1] = -5
    bad_lens = torch.tensor([200, 256], dtype=torch.int32, device="cuda")  # 200 reaches HUGE_PAGE slots
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, bad_table, bad_lens, k_scale, False)
    clean_table = block_table.clone()
    clean_table[1, 1:3] = block_table[1, 2:4]
    clean_table[1, 3] = HUGE_PAGE
    clean_lens = torch.tensor([128, 192], dtype=torch.int32, device="cuda")
    check(out, lse, q, k_cache, clean_table, clean_lens, k_scale, False)


def test_fp8_tma_equals_register_path(monkeypatch):
    """Both load paths widen the same bytes exactly, so they give the same bits."""
    _need_cuda_backend()
    lengths = [640, 5, 2048]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, FP8, seed=9)
    q = torch.randn(len(lengths), 1, 64, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, False)
        monkeypatch.setenv("DSKERNELS_MLA_FP8_TMA", "0")
        monkeypatch.setenv("DSKERNELS_MLA_REQUIRE_TMA", "0")
        ref_out, ref_lse = decode(q, k_cache, block_table, lens, k_scale, False)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
