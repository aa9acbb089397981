"""The sm90 MLA decode's opt-in seesaw consumers (DSKERNELS_MLA_SEESAW=1) against python_ref.mla, on
the device only: both consumer warp groups score alternate key blocks of a pair and each keeps one
half of O (csrc/include/dskernels/sm90_mla_decode_seesaw.cuh, seesaw_group), so a sequence's block count
being odd or even, one block or none, matters to it in a way it does not to the default path.

Never run on a GPU before its first device call, so kept apart: a trap there ends only this file's
CUDA context. scripts/gpu_check.sh times the `cuda[seesaw]` rows and sanitizes the path once this
file has passed in the same call.
"""

import re

import pytest
import torch

import dskernels
from dskernels.ops import mla as mla_ops
from test_mla_sm90 import (D, DV, FP8, TOLERANCES, _need_cuda_backend, check, check_graph_replays, decode,
                           kernels_launched, make_cache)
from test_mla_sm90 import test_keys_outside_the_cache_add_nothing as keys_outside_the_cache_add_nothing

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def seesaw(monkeypatch):
    monkeypatch.setenv("DSKERNELS_MLA_SEESAW", "1")


def decode_instantiations(names) -> set[tuple[str, ...]]:
    """The template arguments (Element, kFp8, kCluster, kSeesaw) of every decode_kernel among the
    launched kernels' names (the narrow kernel is another template)."""
    found = set()
    for name in names:
        for args in re.findall(r"(?<![\w])decode_kernel<([^>]*)>", name):
            found.add(tuple(arg.strip() for arg in args.split(",")))
    return found


def assert_seesaw_ran(names):
    """The seesaw instantiation ran, unclustered, and no other decode_kernel did: a switch whose
    plumbing broke would otherwise pass every test here on the default consumers."""
    ran = decode_instantiations(names)
    assert ran and all(args[-1] == "true" and args[2] == "1" for args in ran), sorted(names)


# Block counts per sequence (64 keys each): 1, 2, 3 (a pair and a lone x), an even and an odd run,
# 0 (an empty sequence), partial last blocks; splits of the long ones start anywhere in a pair.
LENGTHS = [64, 128, 129, 1000, 0, 4096, 65, 191]


# (page size, h_q, h_kv, s_q, causal, cache dtype): the TMA path (page 64, 128) and the register
# path (page 61, fp8), one and two row tiles (s_q * h_q / h_kv > 64), MTP rows, two kv heads.
CASES = [(64, 16, 1, 1, False, torch.bfloat16), (64, 128, 1, 2, True, torch.bfloat16),
         (128, 64, 2, 3, True, torch.bfloat16), (61, 32, 1, 2, True, torch.bfloat16),
         (64, 16, 1, 1, False, FP8), (64, 48, 1, 4, True, FP8)]


@pytest.mark.parametrize("page_size,h_q,h_kv,s_q,causal,cache_dtype", CASES)
def test_seesaw_matches_oracle(page_size, h_q, h_kv, s_q, causal, cache_dtype):
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache(LENGTHS, h_kv, page_size, cache_dtype, seed=page_size + h_q)
    q = torch.randn(len(LENGTHS), s_q, h_q, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        (out, lse), names = kernels_launched(lambda: decode(q, k_cache, block_table, lens, k_scale, causal))
    assert_seesaw_ran(names)
    check(out, lse, q, k_cache, block_table, lens, k_scale, causal)


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])  # the TMA path (page 64), the register path
def test_seesaw_few_partitions_walk_many_items(parts, cache_dtype):
    """The device's plan gives these batches items of one to four blocks. split_plan's few partitions
    make each CTA walk several sequences back to back instead: long runs of pairs, items of an odd
    block count followed by another item (whose pairs then start on stage 1), a split of 36 blocks
    and one of 28 (3 partitions), and with one partition no split at all, every sequence written
    straight to out with no partial slots allocated (the launcher's max_slots = 0)."""
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache(LENGTHS, 1, 64, cache_dtype, seed=parts)
    q = torch.randn(len(LENGTHS), 2, 32, D, device="cuda").to(torch.bfloat16)  # 64 rows: one tile
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device="cuda")
    meta, splits = mla_ops.split_plan(lens, parts)
    with dskernels.backend("cuda"):
        (out, lse), names = kernels_launched(lambda: dskernels.flash_mla_with_kvcache(
            q, k_cache, block_table, lens, DV, meta, splits, causal=True, k_scale=k_scale))
    assert_seesaw_ran(names)
    check(out, lse, q, k_cache, block_table, lens, k_scale, True)


def test_seesaw_float16_and_one_sequence_per_split():
    """fp16 queries; a batch too small to split (each sequence in one partition, written directly)
    and one long sequence split across many partitions (combined)."""
    _need_cuda_backend()
    for lengths in ([3, 70], [8192]):
        k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.float16, seed=len(lengths))
        q = torch.randn(len(lengths), 2, 64, D, device="cuda").to(torch.float16)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        with dskernels.backend("cuda"):
            out, lse = decode(q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)
        check(out, lse, q, k_cache, block_table, lens, k_scale, True, softmax_scale=0.05)


def test_seesaw_agrees_with_the_default_consumers(monkeypatch):
    """The same products in the same order per half of O; only the row sums are added in another
    order (each group's part, then both): out within one ulp of q's dtype, lse within fp32 rounding."""
    _need_cuda_backend()
    lengths = [640, 5, 2048, 130]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=11)
    q = torch.randn(len(lengths), 2, 128, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        (out, lse), seesaw_names = kernels_launched(lambda: decode(q, k_cache, block_table, lens, k_scale, True))
        monkeypatch.setenv("DSKERNELS_MLA_SEESAW", "0")
        (ref_out, ref_lse), default_names = kernels_launched(
            lambda: decode(q, k_cache, block_table, lens, k_scale, True))
    assert_seesaw_ran(seesaw_names)
    assert all(args[-1] == "false" for args in decode_instantiations(default_names)), sorted(default_names)
    # One bf16 ulp (2^-7 of the value) apart, with an absolute floor far below the values' scale, so a
    # half of O scaled wrongly cannot hide among the small outputs. (This assumes wgmma gives the same
    # bits for P from registers as from shared memory; the oracle tests above do not depend on it.)
    rtol, _ = TOLERANCES[torch.bfloat16]
    apart = (out.float() - ref_out.float()).abs() / ref_out.float().abs().clamp(min=2**-20)
    assert torch.allclose(out.float(), ref_out.float(), rtol=rtol, atol=2**-20), \
        f"up to {apart.max().item():.2e} of the value apart (one bf16 ulp: up to {rtol:.2e})"
    assert torch.allclose(lse, ref_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("block", [2, 3])  # the two blocks of the second pair: one per consumer group
def test_seesaw_nan_score_gives_nan(block):
    """A NaN in a key the query sees gives NaN out and lse, as on the default path."""
    _need_cuda_backend()
    k_cache, block_table, k_scale = make_cache([300], 1, 64, torch.bfloat16, seed=3)
    k_cache[block_table[0, block].long(), 5, 0, 0] = float("nan")  # key 64 * block + 5
    q = torch.randn(1, 1, 16, D, device="cuda").to(torch.bfloat16)
    lens = torch.tensor([300], dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        out, lse = decode(q, k_cache, block_table, lens, k_scale, False)
    assert out.isnan().all() and lse.isnan().all()


@pytest.mark.parametrize("h_q", [16, 128])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_seesaw_keys_outside_the_cache_add_nothing(page_size, cache_dtype, h_q):
    """test_mla_sm90's case under the seesaw consumers: keys on pages outside the cache are masked
    in whichever group scores their block."""
    keys_outside_the_cache_add_nothing(page_size, cache_dtype, h_q)


def test_seesaw_cuda_graph_replay_with_new_lengths():
    _need_cuda_backend()
    check_graph_replays([500, 64, 1300], ([1400, 1, 777], [63, 1024, 65]), capacity=1400, seed=5)


def test_seesaw_takes_precedence_over_clusters(monkeypatch):
    """DSKERNELS_MLA_CLUSTER=1 beside it: the seesaw kernel runs unclustered (its stages are released
    in its own CTA only), with two row tiles that would otherwise form a cluster."""
    _need_cuda_backend()
    monkeypatch.setenv("DSKERNELS_MLA_CLUSTER", "1")
    lengths = [700, 0, 129]
    k_cache, block_table, k_scale = make_cache(lengths, 1, 64, torch.bfloat16, seed=13)
    q = torch.randn(len(lengths), 2, 48, D, device="cuda").to(torch.bfloat16)  # 96 rows: two tiles
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with dskernels.backend("cuda"):
        (out, lse), names = kernels_launched(lambda: decode(q, k_cache, block_table, lens, k_scale, True))
    assert_seesaw_ran(names)
    check(out, lse, q, k_cache, block_table, lens, k_scale, True)
