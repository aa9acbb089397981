"""torch.compile of DeepseekV3DecoderLayer: the compiled layer equals the eager one, as one graph
(fullgraph=True) per input shape, for prefill from scratch and for steps through the paged cache,
dense and MoE, fp32 / bf16 / FP8 weights. The expert-parallel layer compiles with graph breaks
around its torch.distributed exchanges. Weights are random (no transformers needed: the eager
layer is checked against transformers in tests/test_models.py)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer
from dskernels.testing import run_distributed

CFG = DeepseekV3Config.tiny()
PAGE_SIZE = 5


def make_layer(layer_idx: int, weights: str, seed: int = 0, **kwargs) -> DeepseekV3DecoderLayer:
    """weights: "fp32" (fp32 layer), "bf16" (bf16 layer and weights), "fp8" (bf16 layer, FP8
    128x128-block weights)."""
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    sd = {}
    # names and shapes of an empty layer holding every expert (with EP each rank takes its share)
    for name, t in DeepseekV3DecoderLayer(CFG, layer_idx, dtype=dtype).hf_state_dict(torch.float32).items():
        if name.endswith("norm.weight"):
            sd[name] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            sd[name] = -0.2 * torch.rand(t.shape, generator=g)
        else:
            sd[name] = torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5
    layer = DeepseekV3DecoderLayer(CFG, layer_idx, dtype=dtype, **kwargs)
    layer.load_hf_state_dict(sd, fp8=weights == "fp8")
    return layer


def steps(dtype, seed=1):
    """(x, positions, cache kwargs or None) of each call: prefill from scratch (S=7), then through a
    paged cache holding other latents: a 4-token chunk at lens [0, 3], then two 1-token decode steps
    (the second must reuse the first one's graph)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(8, generator=g)[:6].view(2, 3).to(torch.int32)
    out = [(torch.randn(2, 7, CFG.hidden_size, generator=g).to(dtype),
            torch.randint(0, 150000, (2, 1), generator=g) + torch.arange(7), None)]
    for s, lens in ((4, [0, 3]), (1, [4, 7]), (1, [5, 8])):
        out.append((torch.randn(2, s, CFG.hidden_size, generator=g).to(dtype),
                    torch.tensor(lens)[:, None] + torch.arange(s),
                    dict(block_table=table, cache_seqlens=torch.tensor(lens, dtype=torch.int32))))
    return out


def new_cache(dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, PAGE_SIZE, 1, CFG.kv_cache_dim, generator=g).to(dtype)


def test_compiled_layer_sees_new_weights():
    """W_UK / W_UV are absorbed from kv_b_proj once; a compiled step cannot read the version
    counters that tell eager mode of an in-place change, so load_state_dict drops them itself (a
    hook) and an in-place change made otherwise is followed by refresh_derived()."""
    torch._dynamo.reset()
    layer, other = make_layer(0, "fp32"), make_layer(0, "fp32", seed=5)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=False)
    (x, positions, paged), = steps(torch.float32)[2:3]
    with torch.no_grad():
        for _ in range(2):
            compiled(x, positions, kv_cache=new_cache(torch.float32), **paged)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(compiled(x, positions, kv_cache=new_cache(torch.float32), **paged),
                                   other(x, positions, kv_cache=new_cache(torch.float32), **paged), atol=0, rtol=0)
        layer.self_attn.kv_b_proj.weight.mul_(2)
        layer.self_attn.refresh_derived()
        torch.testing.assert_close(compiled(x, positions, kv_cache=new_cache(torch.float32), **paged),
                                   layer(x, positions, kv_cache=new_cache(torch.float32), **paged), atol=0, rtol=0)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("layer_idx", [0, 1], ids=["dense", "moe"])
def test_compiled_layer_equals_eager(layer_idx, weights):
    """aot_eager runs the same kernels as eager mode, so the results are bit-identical; the compiled
    layer runs first, so it also traces the first cached call's absorption of W_UK / W_UV."""
    torch._dynamo.reset()
    layer = make_layer(layer_idx, weights)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    dtype = layer.dtype
    cache_c, cache_e = new_cache(dtype), new_cache(dtype)
    with torch.no_grad():
        for i, (x, positions, paged) in enumerate(steps(dtype)):
            if paged is None:
                got, want = compiled(x, positions), layer(x, positions)
            else:
                got = compiled(x, positions, kv_cache=cache_c, **paged)
                want = layer(x, positions, kv_cache=cache_e, **paged)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"call {i}: {m}")
            torch.testing.assert_close(cache_c, cache_e, atol=0, rtol=0, msg=lambda m: f"cache after call {i}: {m}")
    # one graph each: prefill, the 4-token chunk, the 1-token step (new lengths are data, not guards)
    assert counter.frame_count == 3


def test_compiled_layer_with_fp8_kv_cache_equals_eager():
    """V3's FP8 KV cache (float8_e4m3fn, per-tensor kv_cache_scale) through the compiled layer:
    the quantizing write and the decode with k_scale trace in one graph per shape, bit-identical
    to eager (compared as bytes)."""
    torch._dynamo.reset()
    layer = make_layer(0, "bf16")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    cache_c, cache_e = (new_cache(torch.float32).to(torch.float8_e4m3fn) for _ in range(2))
    scale = torch.tensor([0.5])
    with torch.no_grad():
        for i, (x, positions, paged) in enumerate(steps(layer.dtype)[1:]):
            got = compiled(x, positions, kv_cache=cache_c, kv_cache_scale=scale, **paged)
            want = layer(x, positions, kv_cache=cache_e, kv_cache_scale=scale, **paged)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"call {i}: {m}")
            assert torch.equal(cache_c.view(torch.uint8), cache_e.view(torch.uint8)), f"cache after call {i}"
    assert counter.frame_count == 2  # the 4-token chunk and the 1-token step


V32 = DeepseekV3Config.tiny(index_topk=4, index_head_dim=64, index_n_heads=16)


def make_v32_layer(dtype, index_fp8: bool, g: torch.Generator) -> DeepseekV3DecoderLayer:
    sd = {name: (1 + 0.1 * torch.randn(t.shape, generator=g)) if name.endswith("norm.weight")
          else torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5
          for name, t in DeepseekV3DecoderLayer(V32, 1, dtype=dtype).hf_state_dict(torch.float32).items()}
    layer = DeepseekV3DecoderLayer(V32, 1, dtype=dtype, index_fp8=index_fp8)
    layer.load_hf_state_dict(sd)
    return layer


@pytest.mark.parametrize("index_fp8,weights", [(True, "bf16"), (False, "fp32")], ids=["fp8-indexer", "fp32-indexer"])
def test_compiled_v32_layer_equals_eager(index_fp8, weights):
    """DeepSeek-V3.2 (the indexer's top-4 of up to 9 tokens): one graph per input shape for prefill
    and for steps through the latent and indexer caches, bit-identical to eager, caches included."""
    torch._dynamo.reset()
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(5)
    layer = make_v32_layer(dtype, index_fp8, g)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    width = layer.self_attn.indexer.cache_width
    first = (torch.randn(8, PAGE_SIZE, 1, V32.kv_cache_dim, generator=g).to(dtype),
             torch.zeros(8, PAGE_SIZE, 1, width, dtype=torch.uint8 if index_fp8 else dtype))
    caches = [first, tuple(c.clone() for c in first)]
    with torch.no_grad():
        for i, (x, positions, paged) in enumerate(steps(dtype)):
            if paged is None:
                got, want = compiled(x, positions), layer(x, positions)
            else:
                (kv_c, index_c), (kv_e, index_e) = caches
                got = compiled(x, positions, kv_cache=kv_c, index_cache=index_c, **paged)
                want = layer(x, positions, kv_cache=kv_e, index_cache=index_e, **paged)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"call {i}: {m}")
            for c, e in zip(*caches):
                assert torch.equal(c, e), f"cache after call {i}"
    assert counter.frame_count == 3


def compiled_dynamic(layer_idx, weights):
    """(layer, its graph counter, the layer compiled with dynamic shapes and fullgraph), Dynamo reset."""
    torch._dynamo.reset()
    layer = make_layer(layer_idx, weights)
    counter = CompileCounterWithBackend("aot_eager")
    return layer, counter, torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)


def test_dynamic_shapes_serve_every_batch_from_one_graph():
    """Under torch.compile(dynamic=True) a decode step through the paged cache keeps one graph for
    every batch size and token count (MTP): nothing in the layer or its ops specializes on them.
    (The first call absorbs W_UK / W_UV and the second traces once more without that.)"""
    layer, counter, compiled = compiled_dynamic(1, "fp8")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (b, s) in enumerate(((2, 2), (3, 2), (4, 3), (5, 2), (3, 4))):
            cache = torch.randn(4 * b, PAGE_SIZE, 1, CFG.kv_cache_dim, generator=g).to(layer.dtype)
            cache_eager = cache.clone()
            table = torch.randperm(4 * b, generator=g)[:3 * b].view(b, 3).to(torch.int32)
            lens = torch.randint(0, 8, (b,), generator=g).to(torch.int32)
            x = torch.randn(b, s, CFG.hidden_size, generator=g).to(layer.dtype)
            positions = lens.long()[:, None] + torch.arange(s)
            got = compiled(x, positions, kv_cache=cache, block_table=table, cache_seqlens=lens)
            want = layer(x, positions, kv_cache=cache_eager, block_table=table, cache_seqlens=lens)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"call {i}: {m}")
            if i == 1:
                graphs = counter.frame_count
    assert counter.frame_count == graphs


def test_dynamic_shapes_v32_from_one_graph():
    """The same for DeepSeek-V3.2 (FP8 indexer cache). It failed on the first call (the sparse ops'
    scale check read the traced float), and once past that every token count was a new graph (the
    indexer's query chunking iterated over S): the 9th raised Dynamo's recompile limit. Outputs
    within fp32 rounding, not bit-identical: with symbolic shapes and 2 CPU threads some product
    of the V3.2 path sums in another order (1.6e-6 here; exact with 1 thread or dynamic=False)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    layer = make_v32_layer(torch.float32, True, g)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    width = layer.self_attn.indexer.cache_width
    with torch.no_grad():
        for i, (b, s) in enumerate(((2, 2), (3, 2), (2, 3), (4, 5), (3, 4), (2, 6))):  # (1s: own graphs)
            kv = torch.randn(4 * b, PAGE_SIZE, 1, V32.kv_cache_dim, generator=g)
            index = torch.zeros(4 * b, PAGE_SIZE, 1, width, dtype=torch.uint8)
            kv_eager, index_eager = kv.clone(), index.clone()
            table = torch.randperm(4 * b, generator=g)[:3 * b].view(b, 3).to(torch.int32)
            lens = torch.randint(0, 8, (b,), generator=g).to(torch.int32)
            x = torch.randn(b, s, V32.hidden_size, generator=g)
            positions = lens.long()[:, None] + torch.arange(s)
            paged = dict(block_table=table, cache_seqlens=lens)
            got = compiled(x, positions, kv_cache=kv, index_cache=index, **paged)
            want = layer(x, positions, kv_cache=kv_eager, index_cache=index_eager, **paged)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"call {i}: {m}")
            assert torch.equal(kv, kv_eager) and torch.equal(index, index_eager), f"caches after call {i}"
            if i == 1:
                graphs = counter.frame_count
    assert counter.frame_count == graphs


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_moe_float_experts_op(weights):
    """The float expert GEMM's op (opaque to torch.compile: _grouped_mm's meta takes bf16 only)."""
    from dskernels.models.moe import _moe_grouped_mm_float
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    x, w = torch.randn(13, 128, dtype=dtype), torch.randn(3, 64, 128, dtype=dtype)
    # rows past the last offset are unspecified (padding), so opcheck gets offsets that cover all rows
    torch.library.opcheck(_moe_grouped_mm_float, (x, w, torch.tensor([5, 5, 13], dtype=torch.int32)))
    offsets = torch.tensor([5, 5, 11], dtype=torch.int32)  # an empty group; rows 11, 12 are padding
    out = _moe_grouped_mm_float(x, w, offsets)
    assert out.shape == (13, 64)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for g, (lo, hi) in enumerate(((0, 5), (5, 5), (5, 11))):
        torch.testing.assert_close(out[lo:hi], x[lo:hi] @ w[g].T, **tol)
    # its backward (a compiled training step needs it): the op's own, with inputs that require grad
    torch.library.opcheck(_moe_grouped_mm_float, (x.requires_grad_(), w.requires_grad_(),
                                                  torch.tensor([5, 5, 13], dtype=torch.int32)))
    x.requires_grad_(False), w.requires_grad_(False)
    with pytest.raises(ValueError, match="offsets"):
        _moe_grouped_mm_float(x, w, offsets.long())
    with pytest.raises(TypeError, match="w:"):
        _moe_grouped_mm_float(x, w.double(), offsets)


def test_moe_float_experts_op_gradient():
    """gradcheck in float64 (the per-expert loop); rows past the last offset get no gradient."""
    from dskernels.models.moe import _moe_grouped_mm_float
    x, w = torch.randn(7, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    offsets = torch.tensor([2, 2, 6], dtype=torch.int32)  # an empty group; row 6 is padding
    torch.autograd.gradcheck(lambda a, b: _moe_grouped_mm_float(a, b, offsets)[:6],
                             (x.requires_grad_(), w.requires_grad_()))
    _moe_grouped_mm_float(x, w, offsets)[:6].sum().backward()
    assert torch.equal(x.grad[6], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_compiled_training_step_equals_eager(layer_idx):
    """The float prefill keeps its gradients (models.md) compiled too: the MoE layer's failed in the
    backward with "no autograd formula was registered" for dskernels::_moe_grouped_mm_float (an
    auditor's find)."""
    grads = []
    for compiled in (False, True):
        torch._dynamo.reset()
        layer = make_layer(layer_idx, "fp32").requires_grad_()
        (x, positions, _), = steps(torch.float32)[:1]
        x = x.requires_grad_()
        run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
        (run(x, positions) * torch.linspace(-1, 1, CFG.hidden_size)).sum().backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_inductor_moe_decode_step():
    """inductor on CPU (C++ codegen) for one MoE decode step: fused fp32 arithmetic, so equal to
    eager within fp32 rounding."""
    torch._dynamo.reset()
    layer = make_layer(1, "fp32", seed=3)
    x, positions, paged = steps(torch.float32, seed=4)[2]
    cache_c, cache_e = new_cache(torch.float32), new_cache(torch.float32)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = layer(x, positions, kv_cache=cache_e, **paged)
        got = compiled(x, positions, kv_cache=cache_c, **paged)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cache_c, cache_e, atol=2e-5, rtol=2e-5)


# ---- expert parallelism: compiles with graph breaks ----

def _ep_body(rank, world_size, weights):
    import torch.distributed as dist

    from dskernels.ep import Buffer
    buffer = Buffer(dist.group.WORLD)
    for low_latency in (None, 8):  # 6 tokens per rank: normal dispatch, then the low-latency path
        torch._dynamo.reset()
        layer = make_layer(1, weights, ep_buffer=buffer, ep_low_latency_tokens=low_latency)
        x, positions, _ = steps(layer.dtype, seed=10 + rank)[0]
        x, positions = x[:, :3], positions[:, :3]
        with torch.no_grad():
            want = layer(x, positions)
            counter = CompileCounterWithBackend("aot_eager")
            got = torch.compile(layer, backend=counter, dynamic=False)(x, positions)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"low_latency={low_latency}: {m}")
            # the exchange runs eagerly; Dynamo resumes each enclosing frame after it: attention,
            # router and shared experts || the MoE's additions (shared experts, residual) | the return
            assert counter.frame_count == 3, counter.frame_count
            with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
                torch._dynamo.reset()
                torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)(x, positions)


def test_expert_parallel_compiles_with_graph_breaks():
    run_distributed(_ep_body, 2, "fp32")  # FP8 experts change nothing about the breaks


def test_dynamic_moe_graph_has_no_token_bound():
    """The MoE's choice of its Triton sort kernels (up to MAX_SORTED_PAIRS (token, expert) pairs) is
    an eager one: compiled, it read the pair count first, a guard on the token count, so a dynamic
    graph recompiled for a batch past 8192 pairs (a long prefill chunk)."""
    from dskernels.triton.layer import MAX_SORTED_PAIRS
    layer, counter, compiled = compiled_dynamic(1, "fp32")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in (2, 3, MAX_SORTED_PAIRS // CFG.num_experts_per_tok // 2 + 1):  # the last: past the pair limit
            x = torch.randn(2, s, CFG.hidden_size, generator=g)
            compiled(x, torch.arange(s).expand(2, s))
            if s == 3:
                graphs = counter.frame_count
    assert counter.frame_count == graphs


def test_export_fp8_layer_keeps_dynamic_tokens():
    """torch.export (non-strict, its default) of a layer with FP8 weights, batch and token count
    dynamic: torch.Size.numel() of symbolic sizes made them constants there (a constraint error
    naming both), where math.prod keeps them symbolic. The exported program equals eager on a new
    shape."""
    from torch.export import Dim
    torch._dynamo.reset()
    layer = make_layer(0, "fp8")

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, positions):
            return self.layer(x, positions)

    g = torch.Generator().manual_seed(8)
    dims = {0: Dim("b", min=2, max=64), 1: Dim("s", min=2, max=64)}
    x = torch.randn(3, 2, CFG.hidden_size, generator=g).to(layer.dtype)
    with torch.no_grad():
        exported = torch.export.export(Prefill(), (x, torch.arange(2).expand(3, 2)), dynamic_shapes=(dims, dims))
        x = torch.randn(2, 5, CFG.hidden_size, generator=g).to(layer.dtype)
        positions = torch.arange(5).expand(2, 5)
        torch.testing.assert_close(exported.module()(x, positions), layer(x, positions), atol=0, rtol=0)
