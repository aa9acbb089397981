"""DeepseekV3DecoderLayer under dskernels.batch_invariant(): one sequence's decode step gives the
same output bits alone and inside batches of 3 and 5 sequences of other lengths, on the Triton
backend (interpreted on CPU), for float and FP8 weights, dense and MoE layers.

Which parts make that hold: the float matmuls (dskernels/ops/invariant.py: float Linear weights,
the router's fp32 gate GEMM, the absorbed MLA projections, float experts), MLA decode's split plan
(dskernels/ops/mla.py) and the FP8 GEMMs (dskernels/ops/gemm.py). `test_decode_step_is_batch_invariant`
checks the whole layer; `test_float_matmuls_are_batch_invariant` replaces the last two with
stand-ins that are invariant by construction (one partition per sequence; the FP8 GEMMs one row at
a time) and so checks the float matmuls and everything per token (norms, rope, casts, routing, the
expert sort and combine) alone.

Beyond the eager decode step: the compiled step (aot_eager and inductor; the opaque matmul op's
opcheck), prefill without a cache (SDPA per sequence in the mode), several tokens through the
paged cache (chunked prefill, MTP verify), V3.2's prefill, a float64 layer, and a 2-rank EP layer."""

import contextlib
import importlib.util

import pytest
import torch

import dskernels
from dskernels._requirements import torch_release
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


# (float weights only: the FP8 layers' float matmuls are few, and the whole-layer test covers them)
@pytest.mark.parametrize("layer_idx,weights", LAYERS[:3], ids=IDS[:3])
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


def test_v32_paged_selection_does_not_follow_the_table_width(monkeypatch):
    """The sparse decode splits a top-k list by its width (mla_sparse.num_splits_for), and the
    indexer's width over the paged cache is min(index_topk, the block table's capacity): a batch
    whose longest sequence widens the table would change a short sequence's splits (a review's
    repro: 1400 entries at widths 1408 and 2048 gave lse 1e-6 apart). With the mode the list is
    index_topk wide whatever the table, in position order, and the target's bits stay."""
    from tests.test_models_v32 import make_layer as make_v32_layer
    from tests.test_models_v32 import make_reference as make_v32_reference

    cfg = DeepseekV3Config.tiny(index_topk=64, index_head_dim=64, index_n_heads=16)
    layer = make_v32_layer(cfg, 0, make_v32_reference(cfg, 0, seed=5), index_fp8=False)
    cache, table, lens, x, positions = decode_inputs(torch.float32, **SHORT)  # capacity 5 x 8 < 64
    g = torch.Generator().manual_seed(23)
    index_cache = torch.randn(*cache.shape[:3], cfg.index_head_dim, generator=g)
    lists = []
    sparse_decode = dskernels.flash_mla_sparse_decode

    def spy(q, kv_cache, indices, *args, **kwargs):
        lists.append(indices.clone())
        return sparse_decode(q, kv_cache, indices, *args, **kwargs)

    monkeypatch.setattr(dskernels, "flash_mla_sparse_decode", spy)
    outs = []
    with torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant():
        for extra_pages in (0, 3):  # the same sequence, its table 3 unused (NaN) pages wider
            wide = torch.cat([table[:1], table[1:2, :extra_pages]], dim=1).contiguous()
            outs.append(layer(x[:1], positions[:1], kv_cache=cache.clone(), block_table=wide,
                              cache_seqlens=lens[:1].contiguous(), index_cache=index_cache.clone()))
    assert [tuple(t.shape[-1:]) for t in lists] == [(64,), (64,)]
    assert torch.equal(lists[0], lists[1])  # the same cache slots in the same order, -1 past them
    assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any()


# ---- beyond the eager decode step: torch.compile, prefill, expert parallelism ----

def test_invariant_mm_op_passes_opcheck():
    """The opaque op torch.compile traces for the mode's float matmuls: schema, fake kernel (its
    shapes and dtype), no autograd kernel, and AOT dispatch with dynamic shapes. Row-grouped
    inputs fill every row (the op leaves rows past ends[-1] unwritten, which opcheck would compare)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(2, 5, 40, generator=g), torch.randn(2, 7, 40, generator=g), torch.randn(2, 5, 7, generator=g)
    ends = torch.tensor([3, 10], dtype=torch.int32)
    op = torch.ops.dskernels._batch_invariant_mm.default
    for args in [(a, b, None, None, torch.float32), (a, b, c, None, torch.float32),
                 (a.bfloat16(), b.bfloat16(), c.bfloat16(), None, torch.bfloat16),
                 (a.half().mT.contiguous().mT[..., :33], b.half()[..., :33], None, None, torch.float16),  # strided
                 (a.reshape(10, 40), b, None, ends, torch.float32)]:
        torch.library.opcheck(op, args)


def no_fused_layer_kernels(monkeypatch):
    """The eager layer without its small fused Triton kernels (RMSNorm, rope, cache write, MoE
    combine: models/linear.py triton_fusable), which a compiled layer leaves to the compiler: the
    eager step then runs the compiled one's torch ops, so the two can be compared bit for bit."""
    from dskernels.models import attention, indexer, linear, moe, rope

    for module in (attention, indexer, linear, moe, rope):
        if hasattr(module, "triton_fusable"):
            monkeypatch.setattr(module, "triton_fusable", lambda *tensors: False)


def called(graph) -> set:
    """The functions and methods a Dynamo graph calls, by name."""
    return {str(node.target) for node in graph.graph.nodes if node.op in ("call_function", "call_method")}


def torch_matmuls(names) -> set:
    return {name for name in names if not name.startswith("dskernels.")
            and any(op in name for op in ("mm", "linear", "matmul", "einsum"))}


@pytest.mark.parametrize("layer_idx,weights,dynamic", [(0, "fp32", False), (1, "fp8", True)],
                         ids=["dense-fp32-static", "moe-fp8-dynamic"])
def test_compiled_decode_step_is_batch_invariant(layer_idx, weights, dynamic, monkeypatch):
    """torch.compile (aot_eager, fullgraph) of the decode step under the mode: the float matmuls
    trace as dskernels::_batch_invariant_mm (no torch matmul left in the graph), the target's bits
    are the same in every batch, and equal the eager mode step's (fused layer kernels off in both,
    no_fused_layer_kernels). Static shapes: one graph per batch size; dynamic: batch 1 is a graph
    of its own (Dynamo specializes sizes 0 and 1), 3 and 5 share one. Without the mode the target's
    bits change with the batch (MLA's plan over LONG's lengths; fp32: CPU BLAS)."""
    import torch._dynamo

    no_fused_layer_kernels(monkeypatch)
    layer = make_layer(layer_idx, weights)
    inputs = decode_inputs(layer.dtype, **LONG)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    frames = []
    with torch.no_grad(), dskernels.backend("triton"):
        for invariant in (True, False):
            torch._dynamo.reset()
            compiled = torch.compile(layer, backend=recording, fullgraph=True, dynamic=dynamic)
            with dskernels.batch_invariant(invariant):
                cache, table, lens, x, positions = inputs
                got, want = [], []
                for order in BATCHES:
                    idx = torch.tensor(order)
                    args = x[idx], positions[idx]
                    kwargs = dict(block_table=table[idx].contiguous(), cache_seqlens=lens[idx].contiguous())
                    got.append(compiled(*args, kv_cache=cache.clone(), **kwargs)[order.index(0)])
                    frames.append(len(graphs))
                    if invariant:
                        want.append(layer(*args, kv_cache=cache.clone(), **kwargs)[order.index(0)])
            if invariant:
                assert not got[0].isnan().any()
                for order, y, e in zip(BATCHES, got, want):
                    assert torch.equal(y, e), f"batch {order}: compiled and eager steps differ"
                    assert torch.equal(y, got[0]), f"batch {order}: the target's output changed"
                names = set().union(*map(called, graphs))
                assert "dskernels._batch_invariant_mm" in names and not torch_matmuls(names), names
                assert frames[2] == frames[1] if dynamic else frames == [1, 2, 3], frames
            else:
                assert any(not torch.equal(y, got[0]) for y in got[1:]), "no batch changes the bits: pick others"


def test_inductor_decode_step_is_batch_invariant_without_cpu_vectors():
    """inductor compiles the torch ops between the opaque matmuls itself. Its CPU code runs a vector
    loop and a scalar tail (sin, cos, exp, sums): an element's bits follow where the batch puts it,
    so the mode needs torch._inductor.config.cpp.simdlen = 1 there (docs/models.md). The target's
    bits in every batch with it; not without (checked, so the note stays true)."""
    import torch._dynamo
    import torch._inductor.config

    layer = make_layer(0, "fp32")
    cache, table, lens, x, positions = decode_inputs(layer.dtype, **SHORT)
    results = {}
    for simdlen in (1, None):
        torch._dynamo.reset()
        with torch._inductor.config.patch({"cpp.simdlen": simdlen}), torch.no_grad(), dskernels.backend("triton"), \
                dskernels.batch_invariant():
            compiled = torch.compile(layer, backend="inductor", fullgraph=True, dynamic=False)
            results[simdlen] = [compiled(x[idx], positions[idx], kv_cache=cache.clone(),
                                         block_table=table[idx].contiguous(),
                                         cache_seqlens=lens[idx].contiguous())[order.index(0)]
                                for order, idx in ((o, torch.tensor(o)) for o in BATCHES)]
    alone, *batched = results[1]
    for order, y in zip(BATCHES[1:], batched):
        assert torch.equal(y, alone), f"batch {order}: the target's output changed"
    changed = any(not torch.equal(y, results[None][0]) for y in results[None][1:])
    # Seen with torch 2.14's inductor; 2.11's happens to keep this graph's bits (2.12, 2.13 untried):
    # checked where it was seen, so that docs/models.md's note stays true there.
    if torch_release(torch.__version__) >= (2, 14):
        assert changed, "inductor's vectorized CPU code no longer changes the bits by batch: update docs/models.md"


def prefill_outputs(layer, dtype, s, paged=None, index_cache=None):
    """The target's s-token call in each of BATCHES: without a cache (prefill from scratch; every
    sequence s new tokens) or, paged = LONG or SHORT, a chunk of s tokens after each sequence's
    cached ones (chunked prefill; MTP's verify step for small s)."""
    g = torch.Generator().manual_seed(29)
    x = torch.randn(5, s, CFG.hidden_size, generator=g).to(dtype)
    if paged is not None:
        cache, table, lens, _, _ = decode_inputs(dtype, **{**paged, "pages_per_seq": paged["pages_per_seq"] + 1})
        positions = lens.long()[:, None] + torch.arange(s)
    else:
        positions = torch.randint(0, 1000, (5, 1), generator=g) + torch.arange(s)
    outs = []
    for order in BATCHES:
        idx = torch.tensor(order)
        kwargs = {}
        if paged is not None:
            kwargs = dict(kv_cache=cache.clone(), block_table=table[idx].contiguous(),
                          cache_seqlens=lens[idx].contiguous())
            if index_cache is not None:
                kwargs["index_cache"] = index_cache.clone()
        outs.append(layer(x[idx], positions[idx], **kwargs)[order.index(0)])
    return outs


def assert_invariant(outs, layer, check_mode_off, *args, **kwargs):
    alone, *batched = outs
    assert not alone.isnan().any()
    for order, y in zip(BATCHES[1:], batched):
        assert torch.equal(y, alone), f"batch {order}: the target's output changed"
    if check_mode_off:  # the case exercises what the mode changes
        with dskernels.batch_invariant(False):
            off = prefill_outputs(layer, *args, **kwargs)
        assert any(not torch.equal(y, off[0]) for y in off[1:]), "the bits hold without the mode: pick other sizes"


@pytest.mark.parametrize("layer_idx,weights", [(0, "fp32"), (1, "bf16")], ids=["dense-fp32", "moe-bf16"])
def test_prefill_without_cache_is_batch_invariant(layer_idx, weights):
    """layer(x, positions): 9 new tokens per sequence, the target's bits alone = beside 2 and 4
    other sequences. The mode runs torch's SDPA once per sequence: CPU's kernel over this batch
    gave the fp32 target other bits in the batches of 3 and 5 (and CUDA's pick theirs by the batch)."""
    layer = make_layer(layer_idx, weights)
    with torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant():
        assert_invariant(prefill_outputs(layer, layer.dtype, 9), layer, weights == "fp32", layer.dtype, 9)


def test_prefill_sdpa_per_sequence_only_in_the_mode(monkeypatch):
    """The mode's per-sequence SDPA: one call per sequence, each of batch 1; the mode off, one call
    over the batch (unchanged), with the same result within fp32 rounding."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    layer = make_layer(0, "fp32")
    x = torch.randn(3, 6, CFG.hidden_size)
    positions = torch.arange(6).expand(3, 6)
    with torch.no_grad(), dskernels.backend("triton"):
        with dskernels.batch_invariant():
            on = layer(x, positions)
        assert calls == [1, 1, 1]
        off = layer(x, positions)
    assert calls == [1, 1, 1, 3]
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def test_float64_layer_in_the_mode():
    """A float64 layer (its prefill without a cache takes any float dtype) keeps torch's matmuls in
    the mode, which has no float64 kernel: float Linear layers raised the kernel's TypeError."""
    from dskernels.models import DeepseekV3DecoderLayer
    from tests.test_models import make_reference

    layer = DeepseekV3DecoderLayer(CFG, 0, dtype=torch.float64)
    layer.load_hf_state_dict(make_reference(CFG, 0, seed=3).state_dict())
    x = torch.randn(2, 5, CFG.hidden_size, dtype=torch.float64)
    positions = torch.arange(5).expand(2, 5)
    with torch.no_grad(), dskernels.backend("triton"):
        with dskernels.batch_invariant():
            on = layer(x, positions)
        off = layer(x, positions)
    torch.testing.assert_close(on, off, atol=1e-12, rtol=1e-12)  # the same ops, SDPA per sequence


@pytest.mark.parametrize("s", [2, 5], ids=["mtp-verify", "chunk"])
@pytest.mark.parametrize("layer_idx,weights", [(0, "fp32"), (1, "fp8")], ids=["dense-fp32", "moe-fp8"])
def test_paged_multi_token_step_is_batch_invariant(layer_idx, weights, s):
    """s > 1 new tokens through the paged cache (chunked prefill; MTP's verify, s_q > 1 causal
    through the decode kernel): the target's bits alone = in the batches, with LONG's lengths (MLA's
    plan splits the target's keys in some batches without the mode)."""
    layer = make_layer(layer_idx, weights)
    with torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant():
        assert_invariant(prefill_outputs(layer, layer.dtype, s, LONG), layer, weights == "fp32", layer.dtype, s, LONG)


# (the FP8 indexer's prefill too was invariant before the mode: its logits are a dot per (query, key);
# left out for CI's time, 35 s)
@pytest.mark.parametrize("case", ["no-cache-float-indexer", "paged-float-indexer"])
def test_v32_prefill_is_batch_invariant(case):
    """DeepSeek-V3.2: prefill without a cache (the indexer over the new tokens, query chunks that
    follow the batch; flash_mla_sparse_fwd over the batch's latents) and a 3-token chunk through the
    paged caches (flash_mla_sparse_decode, s_q = 3): the target's bits in every batch."""
    from tests.test_models_v32 import make_layer as make_v32_layer
    from tests.test_models_v32 import make_reference as make_v32_reference

    layer = make_v32_layer(V32, 1, make_v32_reference(V32, 1, seed=5), index_fp8=case.endswith("fp8-indexer"))
    with torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant():
        if case.startswith("paged"):
            shape = (5 * (SHORT["pages_per_seq"] + 1) + 3, SHORT["page"], 1, V32.index_head_dim)
            index_cache = torch.randn(shape, generator=torch.Generator().manual_seed(23))
            args = (torch.float32, 3, SHORT, index_cache)
        else:
            args = (torch.float32, 9)
        assert_invariant(prefill_outputs(layer, *args), layer, True, *args)


def _ep_body(rank, world_size, cases):
    import torch.distributed as dist

    from dskernels.ep import Buffer
    from dskernels.models import DeepseekV3DecoderLayer
    from tests.test_models import fp8_checkpoint, make_reference, per_expert_names

    buffer = Buffer(dist.group.WORLD)
    state = per_expert_names(make_reference(CFG, 1, seed=3).state_dict(), CFG)
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(16, 1, CFG.hidden_size, generator=g)  # the same on both ranks: token 0 the target
    positions = torch.randint(0, 1000, (16, 1), generator=g)
    # (weights, ep_low_latency_tokens, mode): the float experts with each exchange, FP8's masked
    # GEMM behind the low-latency one; the mode off must change the target's bits (fp32: CPU BLAS)
    for weights, low_latency, invariant in (("fp32", None, True), ("fp32", 8, True), ("fp8", 8, True),
                                            ("fp32", None, False)):
        dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        layer = DeepseekV3DecoderLayer(CFG, 1, dtype=dtype, ep_buffer=buffer, ep_low_latency_tokens=low_latency)
        layer.load_hf_state_dict(fp8_checkpoint(state)[0] if weights == "fp8" else state)
        outs = []
        with torch.no_grad(), dskernels.backend("triton"), dskernels.batch_invariant(invariant):
            for case in cases:
                idx = torch.tensor(case[rank], dtype=torch.long)
                y = layer(tokens[idx].to(dtype), positions[idx])  # every token its own 1-token sequence
                outs.append(y[case[0].index(0)] if rank == 0 else None)
        if rank == 0:
            same = [torch.equal(y, outs[0]) for y in outs[1:]]
            what = f"{weights}, ep_low_latency_tokens={low_latency}"
            assert all(same) if invariant else not all(same), f"{what}, mode {invariant}: {same}"


def test_expert_parallel_token_is_batch_invariant():
    """A 2-rank EP layer (gloo, Buffer): the target token on rank 0 alone (rank 1 sends nothing),
    beside others on rank 0 and on rank 1, and last of 7: its output bits are the same in the mode,
    through the normal and the low-latency exchange. What a rank's experts compute for a received
    row follows the row alone (the mode's grouped GEMMs) and combine sums a token's rows in rank
    order."""
    from dskernels.testing import run_distributed

    cases = [([0], []), ([3, 0, 4], [5, 6, 7, 8, 9]), ([1, 2, 3, 4, 5, 6, 0], [7, 8])]
    run_distributed(_ep_body, 2, cases, timeout_s=600)
