"""DeepseekV3DecoderLayer under dskernels.batch_invariant(): one sequence's decode step gives the
same output bits alone and inside batches of 3 and 5 sequences of other lengths, on the Triton
backend (interpreted on CPU), for float and FP8 weights, dense and MoE layers.

Which parts make that hold: the float matmuls (dskernels/ops/invariant.py: float Linear weights,
the router's fp32 gate GEMM, the absorbed MLA projections, float experts), MLA decode's split plan
(dskernels/ops/mla.py) and the FP8 GEMMs (dskernels/ops/gemm.py). `test_decode_step_is_batch_invariant`
checks the whole layer; `test_float_matmuls_are_batch_invariant` replaces the last two with
stand-ins that are invariant by construction (one partition per sequence; the FP8 GEMMs one row at
a time) and so checks the float matmuls and everything per token (norms, rope, casts, routing, the
expert sort and combine) alone."""

import contextlib
import importlib.util

import pytest
import torch

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer
from dskernels.ops import mla as mla_ops

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="needs transformers (pip install -r requirements-dev.txt)"),
    pytest.mark.skipif("triton" not in dskernels.available_backends(),
                       reason="needs the Triton backend (TRITON_INTERPRET=1 on CPU)"),
]

CFG = DeepseekV3Config.tiny()
# The float-matmul check: short sequences (MLA's plan stands in, invariant_stand_ins); the target
# first, the others of other lengths (odd sizes, one page short of the table)
SHORT = dict(lens=[13, 3, 29, 7, 21], page=8, pages_per_seq=5)
# The whole layer: long enough that MLA's plan over the CPU's 8 assumed SMs (mla.CPU_SM_COUNT) cuts the
# target's keys in some batches and not in others (its splits follow the other lengths)
LONG = dict(lens=[300, 40, 2000, 16, 700], page=64, pages_per_seq=32)


def make_layer(layer_idx: int, weights: str) -> DeepseekV3DecoderLayer:
    """A layer on random transformers weights: float32 or bfloat16 float weights, or the FP8
    checkpoint (block-scaled weights, bf16 activations)."""
    from tests.test_models import fp8_checkpoint, make_reference, per_expert_names

    state = per_expert_names(make_reference(CFG, layer_idx, seed=3).state_dict(), CFG)
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    layer = DeepseekV3DecoderLayer(CFG, layer_idx, dtype=dtype)
    layer.load_hf_state_dict(fp8_checkpoint(state)[0] if weights == "fp8" else state)
    return layer


def decode_inputs(dtype, lens, page, pages_per_seq):
    """The sequences' cache (NaN in every slot no sequence holds), block table, lengths, the decode
    step's x and positions; sequence 0 is the target."""
    g = torch.Generator().manual_seed(17)
    b = len(lens)
    cache = torch.full((b * pages_per_seq + 3, page, 1, CFG.kv_cache_dim), float("nan"), dtype=dtype)
    table = torch.randperm(cache.shape[0], generator=g)[:b * pages_per_seq].view(b, pages_per_seq).to(torch.int32)
    for i, n in enumerate(lens):
        rows = cache[table[i].long()].view(-1, CFG.kv_cache_dim)
        rows[:n] = torch.randn(n, CFG.kv_cache_dim, generator=g).to(dtype)
        cache[table[i].long()] = rows.view(pages_per_seq, page, 1, -1)
    x = torch.randn(b, 1, CFG.hidden_size, generator=g).to(dtype)
    positions = torch.tensor(lens)[:, None] + torch.randint(0, 1000, (b, 1), generator=g)
    return cache, table, torch.tensor(lens, dtype=torch.int32), x, positions


# The target's place in each batch: alone; second of 3; fourth of 5 (the others in another order)
BATCHES = [[0], [1, 0, 2], [3, 4, 1, 0, 2]]


def outputs_per_batch(layer, inputs):
    """The target's decode-step output in each of BATCHES (each on a fresh copy of the cache)."""
    cache, table, lens, x, positions = inputs
    outs = []
    for order in BATCHES:
        idx = torch.tensor(order)
        y = layer(x[idx], positions[idx], kv_cache=cache.clone(), block_table=table[idx].contiguous(),
                  cache_seqlens=lens[idx].contiguous())
        outs.append(y[order.index(0)])
    return outs


LAYERS = [(0, "fp32"), (1, "fp32"), (1, "bf16"), (0, "fp8"), (1, "fp8")]
IDS = ["dense-fp32", "moe-fp32", "moe-bf16", "dense-fp8", "moe-fp8"]


@pytest.mark.parametrize("layer_idx,weights", LAYERS, ids=IDS)
def test_decode_step_is_batch_invariant(layer_idx, weights):
    """The whole layer: the target's output bits alone = in a batch of 3 = in a batch of 5. Needs
    MLA's invariant plan and the FP8 GEMMs' invariant forms under the mode (the other parts of the
    feature) as well as the float matmuls."""
    layer = make_layer(layer_idx, weights)
    inputs = decode_inputs(layer.dtype, **LONG)
    with torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant():
        alone, *batched = outputs_per_batch(layer, inputs)
    assert not alone.isnan().any()
    for i, y in enumerate(batched):
        assert torch.equal(y, alone), f"batch {BATCHES[i + 1]}: the target's output changed"


@contextlib.contextmanager
def invariant_stand_ins(monkeypatch):
    """MLA's plan one partition per sequence (no sequence split: batch invariant, mla.md) and the
    FP8 GEMMs one row (dense) or one (token, expert) row (grouped) at a time: each row's call is the
    same whatever the batch. What the layer's float matmuls do is then all that can differ."""
    monkeypatch.setattr(dskernels, "get_mla_metadata", lambda seqlens, *a, **k: mla_ops.split_plan(seqlens, 1))
    dense, grouped = dskernels.gemm_fp8_fp8_bf16_nt, dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous

    def dense_by_rows(a, b, out, *args, **kwargs):
        for i in range(out.shape[0]):
            dense((a[0][i:i + 1], a[1][i:i + 1]), b, out[i:i + 1], *args, **kwargs)

    def grouped_by_rows(a, b, out, m_indices, *args, **kwargs):
        for i in range(out.shape[0]):
            grouped((a[0][i:i + 1], a[1][i:i + 1]), b, out[i:i + 1], m_indices[i:i + 1], *args, **kwargs)

    monkeypatch.setattr(dskernels, "gemm_fp8_fp8_bf16_nt", dense_by_rows)
    monkeypatch.setattr(dskernels, "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", grouped_by_rows)
    yield


@pytest.mark.parametrize("layer_idx,weights", LAYERS, ids=IDS)
def test_float_matmuls_are_batch_invariant(layer_idx, weights, monkeypatch):
    """The layer with invariant stand-ins for MLA's plan and the FP8 GEMMs (invariant_stand_ins):
    the target's bits are the same in every batch with the mode. Without it the float layers'
    torch matmuls (CPU BLAS, whose kernel follows m) change them."""
    layer = make_layer(layer_idx, weights)
    inputs = decode_inputs(layer.dtype, **SHORT)
    with invariant_stand_ins(monkeypatch), torch.no_grad(), dskernels.backend("triton"):
        with dskernels.batch_invariant():
            alone, *batched = outputs_per_batch(layer, inputs)
        assert not alone.isnan().any()
        for i, y in enumerate(batched):
            assert torch.equal(y, alone), f"batch {BATCHES[i + 1]}: the target's output changed"
        # the mode off: within rounding of the mode's result, and (float weights) not bit for bit
        off_alone, *off_batched = outputs_per_batch(layer, inputs)
    tol = dict(atol=1e-4, rtol=1e-4) if layer.dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(off_alone, alone, **tol)
    if weights == "fp32":
        assert any(not torch.equal(y, off_alone) for y in off_batched), \
            "torch's CPU matmuls no longer change the target's bits by batch: pick sizes where they do"


V32 = DeepseekV3Config.tiny(index_topk=4, index_head_dim=64, index_n_heads=16)


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["dense", "moe"])
def test_v32_float_indexer_decode_step_is_batch_invariant(layer_idx, monkeypatch):
    """DeepSeek-V3.2 with the float indexer (its fp32 head weights, fp32 scores over the paged keys):
    the target's output bits in every batch with the mode (fp32 weights; the FP8 GEMM stand-ins as
    above, which fp32 weights do not call)."""
    from tests.test_models_v32 import make_layer as make_v32_layer
    from tests.test_models_v32 import make_reference as make_v32_reference

    layer = make_v32_layer(V32, layer_idx, make_v32_reference(V32, layer_idx, seed=5), index_fp8=False)
    cache, table, lens, x, positions = decode_inputs(torch.float32, **SHORT)
    g = torch.Generator().manual_seed(23)
    index_cache = torch.randn(*cache.shape[:3], V32.index_head_dim, generator=g)
    with invariant_stand_ins(monkeypatch), torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant():
        outs = []
        for order in BATCHES:
            idx = torch.tensor(order)
            y = layer(x[idx], positions[idx], kv_cache=cache.clone(), block_table=table[idx].contiguous(),
                      cache_seqlens=lens[idx].contiguous(), index_cache=index_cache.clone())
            outs.append(y[order.index(0)])
    assert not outs[0].isnan().any()
    for order, y in zip(BATCHES[1:], outs[1:]):
        assert torch.equal(y, outs[0]), f"batch {order}: the target's output changed"
