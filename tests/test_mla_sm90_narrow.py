"""The sm90 MLA decode's opt-in narrow kernel (DSKERNELS_MLA_NARROW=1) against python_ref.mla, on
the device only. For s_q * h_q / h_kv <= 32 query rows it puts the keys on wgmma's M and the rows
on N (16 or 32) instead of padding the rows to 64, and its two consumer warp groups take alternate
key blocks, each with its own softmax state, merged at the end of each sequence
(csrc/include/dskernels/sm90_mla_decode_narrow.cuh). So the block count per sequence (odd, even,
one: a group with no block), the rows against N (8 < rows < 16, 16 < rows <= 32, heads of two kv
heads) and the splits matter to it in a way they do not to the default path.

Never run on a GPU before its first device call, so kept apart: a trap there ends only this file's
CUDA context. scripts/gpu_check.sh times the `cuda[narrow]` rows and profiles and sanitizes the
path once this file has passed in the same call.
"""

import pytest
import torch

import dskernels
from dskernels.ops import mla as mla_ops
from test_mla_sm90 import (D, DV, FP8, _need_cuda_backend, check, check_graph_replays, decode, kernels_launched,
                           make_cache)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    monkeypatch.setenv("DSKERNELS_MLA_NARROW", "1")


def decode_in_parts(q, k_cache, block_table, lens, k_scale, causal, parts, softmax_scale=None):
    """decode() with the split plan of `parts` partitions (None: the device's, one per SM). On the
    device's plan these small batches give most partitions a block or two, so most items have one
    block and only one group scores it (the one whose turn it is by block parity); a few partitions
    give long items, where both groups take turns."""
    if parts is None:
        return decode(q, k_cache, block_table, lens, k_scale, causal, softmax_scale)
    meta, splits = mla_ops.split_plan(lens, parts)
    return dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits,
                                            softmax_scale=softmax_scale, causal=causal, k_scale=k_scale)


# Block counts per sequence (64 keys each): 1, 2, 3, many (even and odd), 0 (an empty sequence),
# partial last blocks, a single key; the long ones are split, their splits start on either group.
LENGTHS = [64, 128, 129, 1000, 0, 4096, 65, 191, 1]


# (page size, h_q, h_kv, s_q, causal, cache dtype): N = 16 (16 heads; 12 rows of two kv heads;
# 15 rows of 5 heads x 3 tokens; 8 heads, V3 at 16-way tensor parallelism; 2 rows) and N = 32 (MTP
# rows; 32 heads; 24 and 20 rows, padded to 32; 32 rows of each of two kv heads); the TMA path
# (page 64, 128), the register path (page 61, 1; fp8).
CASES = [(64, 16, 1, 1, False, torch.bfloat16), (64, 16, 1, 2, True, torch.bfloat16),
         (61, 16, 1, 1, False, torch.bfloat16), (128, 8, 2, 3, True, torch.bfloat16),
         (64, 5, 1, 3, True, torch.bfloat16), (1, 16, 1, 1, True, torch.bfloat16),
         (64, 8, 1, 1, False, torch.bfloat16), (64, 1, 1, 2, True, torch.bfloat16),
         (64, 8, 1, 3, True, torch.bfloat16), (61, 20, 1, 1, False, torch.bfloat16),
         (64, 64, 2, 1, False, torch.bfloat16),
         (64, 16, 1, 1, False, FP8), (64, 32, 1, 1, False, FP8)]


@pytest.mark.parametrize("page_size,h_q,h_kv,s_q,causal,cache_dtype", CASES)
def test_narrow_matches_oracle(page_size, h_q, h_kv, s_q, causal, cache_dtype):
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache(LENGTHS, h_kv, page_size, cache_dtype, seed=page_size + h_q + s_q)
    q = torch.randn(len(LENGTHS), s_q, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        # 1: one CTA walks every sequence, none split: all written straight to out, no partial slots
        for parts in (None, 3, 1):
            out, lse = decode_in_parts(q, k_cache, block_table, lens, k_scale, causal, parts)
            check(out, lse, q, k_cache, block_table, lens, k_scale, causal)


@pytest.mark.parametrize("h_q", [16, 8])  # N = 32 and 16
@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8])
def test_narrow_float16_and_one_sequence_per_split(h_q, cache_dtype):
    """fp16 queries, 2 tokens of h_q heads, on an fp16 or fp8 cache; two short sequences (on the
    device's plan the second is split in two, on two partitions neither is: written directly) and
    one long sequence split across many partitions (combined)."""
    _need_cuda_backend()
    for lengths in ([3, 70], [8192]):
        k_cache, block_table, k_scale = make_cache(lengths, 1, 64, cache_dtype, seed=len(lengths) + h_q)
        q = torch.randn(len(lengths), 2, h_q, D, device="cuda").to(torch.float16)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        with dskernels.backend("cuda"):
            for parts in (None, 2):
                out, lse = decode_in_parts(q, k_cache, block_table, lens, k_scale, True, parts, softmax_scale=0.05)
                check(out, lse, q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)


@pytest.mark.parametrize("h_q", [16, 32])  # N = 16 and 32
def test_narrow_fp8_tma_path(monkeypatch, h_q):
    """An fp8 cache's whole blocks by TMA, widened in place (the producer's opt-in path)."""
    _need_cuda_backend()
    monkeypatch.setenv("DSKERNELS_MLA_FP8_TMA", "1")
    monkeypatch.setenv("DSKERNELS_MLA_REQUIRE_TMA", "1")
    k_cache, block_table, k_scale = make_cache(LENGTHS, 1, 64, FP8, seed=17)
    q = torch.randn(len(LENGTHS), 1, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        for parts in (None, 3):
            out, lse = decode_in_parts(q, k_cache, block_table, lens, k_scale, False, parts)
            check(out, lse, q, k_cache, block_table, lens, k_scale, False)


@pytest.mark.parametrize("block", [2, 3])
def test_narrow_nan_score_gives_nan(block):
    """A NaN in a key the query sees gives NaN out and lse, whichever group scores its block (one
    partition: blocks 0, 2, 4 go to WG1, 1, 3 to WG2)."""
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache([300], 1, 64, torch.bfloat16, seed=3)
    k_cache[block_table[0, block].long(), 5, 0, 0] = float("nan")
    q = torch.randn(1, 1, 16, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor([300], dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode_in_parts(q, k_cache, block_table, lens, k_scale, False, 1)
    assert out.isnan().all() and lse.isnan().all()


def test_narrow_cuda_graph_replay_with_new_lengths():
    _need_cuda_backend()
    check_graph_replays([500, 64, 1300], ([1400, 1, 777], [63, 1024, 65], [0, 128, 129]), capacity=1400, seed=5)


@pytest.mark.parametrize("h_q,s_q", [(16, 1), (16, 2), (33, 1)])
def test_narrow_runs_where_it_serves_and_takes_precedence(monkeypatch, h_q, s_q):
    """16 and 32 rows run the narrow kernel even with the seesaw and cluster switches set; 33 rows
    run the default one (the flag changes nothing there), correct either way. (The switches only
    where the narrow kernel serves: at 33 rows they would run the seesaw consumers, whose own file
    tests them, and a fault there must not count against this one.)"""
    _need_cuda_backend()
    if s_q * h_q <= 32:
        monkeypatch.setenv("DSKERNELS_MLA_SEESAW", "1")
        monkeypatch.setenv("DSKERNELS_MLA_CLUSTER", "1")
    lengths = [700, 0, 129]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=13)
    q = torch.randn(len(lengths), s_q, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        (out, lse), names = kernels_launched(lambda: decode(q, k_cache, block_table, lens, k_scale, True))
    check(out, lse, q, k_cache, block_table, lens, k_scale, True)
    narrow_ran = any("narrow_decode_kernel" in name for name in names)
    assert narrow_ran == (s_q * h_q <= 32), sorted(names)
