"""What the ops and the layer allocate, beyond their results (CPU, the Triton path under the
interpreter): buffers that are never written, temporaries beside the result, intermediates kept
alive past their last read. At V3's widths each was gigabytes in a long prefill chunk (docs/models.md,
"Memory")."""

import gc
import os
import weakref
from collections.abc import Mapping

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dskernels
import dskernels.triton.layer as triton_layer
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer
from dskernels.models.attention import MLAttention
from dskernels.models.linear import dequantize_block_fp8
from dskernels.models.moe import Experts

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on CPU tensors")


# ---- MLA decode: no split-KV buffers where the plan splits no sequence ----

def _decode(b, s_q, h_q, lens, d=64, dv=32, page=16):
    torch.manual_seed(0)
    pages_per_seq = -(-max(lens) // page) + 1
    cache = torch.randn(b * pages_per_seq + 1, page, 1, d, dtype=torch.float16)
    table = torch.randperm(b * pages_per_seq).view(b, pages_per_seq).to(torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, s_q, h_q, d, dtype=torch.float16)
    meta, splits = dskernels.get_mla_metadata(seqlens, s_q * h_q, 1)
    return q, cache, table, seqlens, dv, meta, splits


def _largest_alloc(monkeypatch, fn):
    sizes = []
    real = torch.empty

    def spy(*shape, **kw):
        t = real(*shape, **kw)
        sizes.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", spy)
    out = fn()
    monkeypatch.setattr(torch, "empty", real)
    return out, max(sizes, default=0)


@pytest.mark.parametrize("lens", [[40, 0, 5], [70]])
def test_one_partition_plan_allocates_no_split_buffers(monkeypatch, lens):
    """A plan of one partition (every prefill chunk of 128 heads) splits no sequence: the decode
    kernel writes every output itself, and no split-KV partials are allocated (they were
    [b + 1, h_q * s_q, dv] fp32: 2 GiB at a 4096-token chunk, 4x the output)."""
    b, s_q, h_q = len(lens), 2, 136  # 272 query rows: 9 row tiles of 32 > CPU_SM_COUNT = 8 -> one partition
    q, cache, table, seqlens, dv, meta, splits = _decode(b, s_q, h_q, lens)
    assert meta.shape[0] == 1
    with torch.no_grad(), dskernels.backend("triton"):
        (out, lse), largest = _largest_alloc(monkeypatch, lambda: dskernels.flash_mla_with_kvcache(
            q, cache, table, seqlens, dv, meta, splits, causal=True))
    out_bytes = out.numel() * out.element_size()
    assert largest <= out_bytes, f"largest allocation {largest} B > the output's {out_bytes} B"
    with torch.no_grad(), dskernels.backend("ref"):
        ref_out, ref_lse = dskernels.flash_mla_with_kvcache(q, cache, table, seqlens, dv, meta, splits, causal=True)
    # fp16 out: half an ulp of values below 4 is 1e-3, the two sums' orders differ by about as much
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_split_plans_still_combine():
    """Several partitions (few rows): sequences split and their partials are merged as before."""
    lens = [300, 0, 7, 129]
    q, cache, table, seqlens, dv, meta, splits = _decode(len(lens), 1, 4, lens)
    assert meta.shape[0] > 1 and int(splits[-1]) > len([n for n in lens if n])  # some sequence splits
    with torch.no_grad(), dskernels.backend("triton"):
        out, lse = dskernels.flash_mla_with_kvcache(q, cache, table, seqlens, dv, meta, splits, causal=False)
    with torch.no_grad(), dskernels.backend("ref"):
        ref_out, ref_lse = dskernels.flash_mla_with_kvcache(q, cache, table, seqlens, dv, meta, splits)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


# ---- the layer: intermediates freed after their last read; the absorbed query in one buffer ----

def _layer(seed=0):
    torch.manual_seed(seed)
    cfg = DeepseekV3Config.tiny()
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16)
    sd = {}
    for k, v in layer.state_dict().items():
        if "norm" in k:
            sd[k] = 1 + 0.1 * torch.randn(v.shape)
        elif k.endswith("e_score_correction_bias"):
            sd[k] = -0.2 * torch.rand(v.shape)
        else:
            sd[k] = torch.randn(v.shape) * max(v.shape[-1], 1) ** -0.5
    layer.load_hf_state_dict(sd, fp8=True)
    return cfg, layer


@pytest.mark.parametrize("sort_in_kernel", [True, False], ids=["triton_sort", "torch_sort"])
def test_moe_intermediates_are_freed_before_the_down_gemm(monkeypatch, sort_in_kernel):
    cfg, layer = _layer()
    if not sort_in_kernel:
        monkeypatch.setattr(triton_layer, "MAX_SORTED_PAIRS", 0)
    calls, seen = [], {}
    real = dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous

    def spy(lhs, rhs, out, m_indices):
        if calls:  # the down GEMM: what the first one read and wrote, and the attention's output
            gc.collect()  # (Triton's interpreter leaves numpy views of its arguments in reference cycles)
            seen["up_input"] = calls[0][0]() is not None
            seen["up_output"] = calls[0][1]() is not None
            seen["attended"] = attended[0]() is not None
        # (storages: a view of a tensor keeps its storage alive, not its Python object)
        calls.append((weakref.ref(lhs[0].untyped_storage()), weakref.ref(out.untyped_storage())))
        return real(lhs, rhs, out, m_indices)

    attended = []
    layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: attended.append(weakref.ref(o.untyped_storage())))
    monkeypatch.setattr(dskernels, "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", spy)
    x = torch.randn(3, 5, cfg.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(5).expand(3, 5).contiguous()
    with torch.no_grad(), dskernels.backend("triton"):
        layer(x, positions)
    assert len(calls) == 2
    assert seen == {"up_input": False, "up_output": False, "attended": False}, seen


def test_query_projection_is_freed_before_the_paged_attention(monkeypatch):
    # prefill into the cache: q_b_proj's output [b, s, h, 192] must not stay alive beside the MLA
    # decode op's buffers once the absorbed query is built (1.6 GiB at a 32768-token chunk)
    cfg, layer = _layer()
    b, s, page = 2, 7, 16
    seen, projected = [], []
    # (the storage: views of the output keep it alive, not the output tensor object)
    layer.self_attn.q_b_proj.register_forward_hook(lambda m, i, o: projected.append(weakref.ref(o.untyped_storage())))
    real = dskernels.flash_mla_with_kvcache

    def spy(*args, **kwargs):
        gc.collect()  # (as above)
        seen.append(projected[0]() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(dskernels, "flash_mla_with_kvcache", spy)
    kv_cache = torch.zeros(2 * b, page, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=torch.bfloat16)
    block_table = torch.arange(2 * b, dtype=torch.int32).view(b, 2)
    lens = torch.zeros(b, dtype=torch.int32)
    x = torch.randn(b, s, cfg.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(s).expand(b, s).contiguous()
    with torch.no_grad(), dskernels.backend("triton"):
        layer(x, positions, kv_cache=kv_cache, block_table=block_table, cache_seqlens=lens)
    assert seen == [False]


class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                inputs.add(o.untyped_storage().data_ptr())
                self.bytes += o.untyped_storage().nbytes()
        return out


def test_absorbed_query_allocates_only_its_result():
    cfg, layer = _layer()
    attn = layer.self_attn
    b, s, h = 3, 4, cfg.num_attention_heads
    q = torch.randn(b, s, h, cfg.qk_head_dim, dtype=torch.bfloat16)
    q_nope, _ = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    q_rope = torch.randn(b, s, h, cfg.qk_rope_head_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        attn.absorb(torch.bfloat16)
        expected = torch.cat([torch.einsum("bshn,hnc->bshc", q_nope, attn.w_uk), q_rope], dim=-1)
        mode = _Allocations()
        with mode:
            got = MLAttention._absorbed_query(attn, q_nope, q_rope)
    assert torch.equal(got, expected)
    assert mode.bytes <= got.numel() * got.element_size(), (mode.bytes, got.numel() * got.element_size())


# ---- expert parallelism: the experts get the valid (token, expert) pairs only ----

@pytest.mark.parametrize("sort_in_kernel", [True, False], ids=["triton_sort", "torch_sort"])
def test_experts_take_only_the_valid_pairs(monkeypatch, sort_in_kernel):
    """With expert parallelism most of a received token's K slots name experts elsewhere (-1); given
    the valid count the dispatch returns, the grouped GEMMs get those rows only, same output."""
    torch.manual_seed(0)
    if not sort_in_kernel:
        monkeypatch.setattr(triton_layer, "MAX_SORTED_PAIRS", 0)
    L, H, I, N, K = 4, 256, 128, 12, 8
    experts = Experts(L, H, I, dtype=torch.bfloat16)
    with torch.no_grad():
        gu, sgu = zip(*(dskernels.per_block_cast_to_fp8(torch.randn(2 * I, H, dtype=torch.bfloat16) / 16)
                        for _ in range(L)))
        dn, sdn = zip(*(dskernels.per_block_cast_to_fp8(torch.randn(H, I, dtype=torch.bfloat16) / 11)
                        for _ in range(L)))
        experts.gate_up_proj = torch.nn.Parameter(torch.stack(gu), requires_grad=False)
        experts.gate_up_proj_scale_inv = torch.nn.Parameter(torch.stack(sgu), requires_grad=False)
        experts.down_proj = torch.nn.Parameter(torch.stack(dn), requires_grad=False)
        experts.down_proj_scale_inv = torch.nn.Parameter(torch.stack(sdn), requires_grad=False)
    x = torch.randn(N, H, dtype=torch.bfloat16)
    idx = torch.randint(0, 4 * L, (N, K))  # 4 ranks' experts: 3 in 4 elsewhere
    idx = torch.where(idx < L, idx, -1)
    weights = torch.rand(N, K)
    valid = int((idx >= 0).sum())
    rows = []
    real = dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous

    def spy(lhs, rhs, out, m_indices):
        rows.append(out.shape[0])
        return real(lhs, rhs, out, m_indices)

    monkeypatch.setattr(dskernels, "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", spy)
    with torch.no_grad(), dskernels.backend("triton"):
        full = experts(x, idx, weights, torch.bfloat16)
        rows.clear()
        got = experts(x, idx, weights, torch.bfloat16, valid_pairs=valid)
    assert rows == [valid, valid]
    assert torch.equal(got, full)


def test_experts_refuse_a_wrong_valid_pair_count():
    """valid_pairs cuts the sorted rows: a count below the real one would leave pairs whose rows the
    combine still reads (past the end of the experts' output on a GPU)."""
    experts = Experts(4, 256, 128, dtype=torch.float32)
    idx = torch.tensor([[0, -1], [3, 1], [-1, -1]])
    x, weights = torch.randn(3, 256), torch.rand(3, 2)
    for wrong, match in ((2, r"^valid_pairs: expected the number of topk_idx entries in \[0, 4\) \(3\), got 2"),
                         (7, "^valid_pairs: expected at most topk_idx's 6 entries, got 7"),
                         (-1, "^valid_pairs: expected an int >= 0")):
        with pytest.raises(ValueError, match=match), torch.no_grad():
            experts(x, idx, weights, torch.float32, valid_pairs=wrong)


# ---- loading checkpoints: no copy of all the experts beside the weights ----

class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes that ops run inside the mode allocate and that are still alive (each
    storage counted once, from its first op to its release)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def _free(self, ptr):
        self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                storage = o.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                if size and ptr not in inputs and ptr not in self.sizes:
                    self.sizes[ptr] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr)
        return out


def _checkpoint(cfg, fmt, dtype):
    """A random checkpoint of MoE layer 1: fmt "fused" (transformers 5.x) or "per_expert" (4.x and
    the checkpoint files), "_fp8" for float8_e4m3fn weights with their block scales."""
    gen = torch.Generator().manual_seed(0)
    fp8 = fmt.endswith("_fp8")
    sd = {}
    for k, v in DeepseekV3DecoderLayer(cfg, 1, dtype=dtype, fp8=fp8, device="meta").state_dict().items():
        if v.dtype == torch.float8_e4m3fn:  # any finite e4m3 bytes (NaN is 0x7f / 0xff)
            sd[k] = torch.randint(-126, 126, v.shape, dtype=torch.int8, generator=gen).view(v.dtype)
        elif k.endswith("scale_inv"):
            sd[k] = torch.rand(v.shape, generator=gen) * 1e-3 + 1e-4
        else:
            sd[k] = (torch.randn(v.shape, generator=gen) * 0.1 + ("norm" in k)).to(v.dtype)
    fused = {k: sd[k] for k in sd if k.startswith("mlp.experts.")}
    if fmt.startswith("per_expert"):
        inter = cfg.moe_intermediate_size
        for key, t in fused.items():
            del sd[key]
            name, suffix = key[len("mlp.experts."):].partition("_scale_inv")[:2]
            cut = inter if not suffix else inter // 128
            for e in range(t.shape[0]):
                if name == "down_proj":
                    sd[f"mlp.experts.{e}.down_proj.weight{suffix}"] = t[e].clone()
                else:
                    sd[f"mlp.experts.{e}.gate_proj.weight{suffix}"] = t[e, :cut].clone()
                    sd[f"mlp.experts.{e}.up_proj.weight{suffix}"] = t[e, cut:].clone()
    return sd, fused


@pytest.mark.parametrize("fmt, checkpoint_dtype, fp8", [
    ("per_expert_fp8", None, None), ("fused_fp8", None, None), ("per_expert", torch.bfloat16, None),
    ("fused", torch.bfloat16, None), ("per_expert", torch.float32, None), ("fused", torch.float32, None),
    ("per_expert", torch.bfloat16, True), ("per_expert_fp8", None, False)])
def test_checkpoint_load_allocates_at_most_one_expert(fmt, checkpoint_dtype, fp8):
    """load_hf_state_dict into a layer built in the format it keeps writes each expert straight into
    the fused weights: what it allocates beside them stays under one expert plus a tenth of the
    layer. The per-expert names were torch.stack-ed and then cat-ed (gate | up): 1.4x the layer at
    the peak (3.7x from an fp32 checkpoint, whose values were also converted whole before the copy),
    10.7 GiB per layer of V3's FP8 experts."""
    cfg = DeepseekV3Config.tiny()
    sd, fused = _checkpoint(cfg, fmt, checkpoint_dtype or torch.bfloat16)
    keeps_fp8 = fmt.endswith("_fp8") if fp8 is None else fp8
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=keeps_fp8)
    weights = {name: t.untyped_storage().data_ptr() for name, t in layer.named_parameters()}
    gc.collect()
    mode = _LiveBytes()
    with mode, torch.no_grad():
        layer.load_hf_state_dict(sd, fp8=fp8)
    gc.collect()
    assert {name: t.untyped_storage().data_ptr() for name, t in layer.named_parameters()} == weights  # in place
    experts = layer.mlp.experts
    total = sum(t.nbytes for t in layer.parameters())
    one_expert = sum(t[0].nbytes for t in (experts.gate_up_proj, experts.down_proj))
    one_expert *= 4 // experts.gate_up_proj.element_size()  # a conversion's fp32 temporary
    assert mode.peak <= total // 10 + one_expert, (mode.peak, total, one_expert)
    # each expert's rows where they belong, converted as .to() / dequantization converts
    for name in ("gate_up_proj", "down_proj"):
        want, scale = fused[f"mlp.experts.{name}"], fused.get(f"mlp.experts.{name}_scale_inv")
        got = getattr(experts, name)
        if fp8 is True:  # quantized per expert here: the same blocks as the whole matrix's cast
            want, scale = map(torch.stack, zip(*(dskernels.per_block_cast_to_fp8(w) for w in want)))
        if fp8 is False:
            want = dequantize_block_fp8(want, scale, torch.bfloat16)
        assert torch.equal(got.view(torch.uint8), want.to(got.dtype).view(torch.uint8)), name
        if keeps_fp8:
            assert torch.equal(getattr(experts, f"{name}_scale_inv"), scale)


class _WeightCopies(TorchDispatchMode):
    """Ops that read one of `weights` (storage pointer -> name) and allocate at least half its
    bytes: a copy, cast or transpose of the weight (a few tokens' GEMM outputs are far smaller)."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.copies = weights, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage(): None for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(a, torch.Tensor)}
        read = [(self.weights[s.data_ptr()], s.nbytes()) for s in inputs if s.data_ptr() in self.weights]
        out = func(*args, **(kwargs or {}))
        ptrs = {s.data_ptr() for s in inputs}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ptrs:
                self.copies += [(str(func), name) for name, size in read if o.untyped_storage().nbytes() >= size // 2]
        return out


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("cached", [True, False], ids=["paged", "no_cache"])
def test_forward_copies_no_weights(fp8, cached):
    """A step reads the weights as they are stored: no per-call cast, transpose or contiguous copy of
    a weight (the FP8 GEMMs' block-major scales and W_UK / W_UV are built once, at the first call,
    and kept; the router's weight is kept in fp32)."""
    cfg = DeepseekV3Config.tiny()
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=fp8)
    layer.load_hf_state_dict(_checkpoint(cfg, "fused_fp8" if fp8 else "fused", torch.bfloat16)[0])
    b = 2
    x = torch.randn(b, 1, cfg.hidden_size, dtype=torch.bfloat16)
    positions = torch.full((b, 1), 5)
    kwargs = {}
    if cached:
        kwargs = dict(kv_cache=torch.zeros(2 * b, 16, 1, cfg.kv_cache_dim, dtype=torch.bfloat16),
                      block_table=torch.arange(2 * b, dtype=torch.int32).view(b, 2),
                      cache_seqlens=torch.full((b,), 5, dtype=torch.int32))
    with torch.no_grad(), dskernels.backend("triton"):
        layer(x, positions, **kwargs)  # builds the derived copies
        weights = {t.untyped_storage().data_ptr(): name for name, t in [*layer.named_parameters(),
                                                                        *layer.named_buffers()]}
        derived = [("w_uk", layer.self_attn.w_uk), ("w_uv", layer.self_attn.w_uv)]
        derived += [(f"{name}'s block-major scales", cache.value) for name, module in layer.named_modules()
                    for cache in (getattr(module, attr, None) for attr in ("_gemm_scales", "_gate_up_scales",
                                                                            "_down_scales"))
                    if cache is not None and cache.value is not None]
        assert len(derived) > 2 or not fp8
        weights.update({t.untyped_storage().data_ptr(): name for name, t in derived if t is not None})
        mode = _WeightCopies({p: n for p, n in weights.items()})
        with mode:
            layer(x, positions, **kwargs)
    # (the score-correction bias, [E] fp32, is as small as grouped_topk's [tokens, k] outputs)
    assert [c for c in mode.copies if c[1] != "mlp.gate.e_score_correction_bias"] == []


@pytest.mark.parametrize("v32", [False, True], ids=["v3", "v32"])
def test_forward_after_a_module_cast_copies_no_weights(v32):
    """A layer built in fp32 (torch's default) and cast with .to(torch.bfloat16): the router's weight
    and bias, and V3.2's head weights (weights_proj), stay fp32 (only moved by module casts, as
    transformers keeps them in a bf16 model), so the fp32 gate / head GEMMs read them as stored.
    The cast rounded them before, and every step cast them back to fp32 (7.3 MiB per V3 layer)."""
    cfg = DeepseekV3Config.tiny(**(dict(index_topk=4, index_head_dim=64, index_n_heads=16) if v32 else {}))
    layer = DeepseekV3DecoderLayer(cfg, 1, index_fp8=False)
    layer.load_hf_state_dict(_checkpoint(cfg, "fused", torch.float32)[0])
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
    fp32 = [layer.mlp.gate.weight, layer.mlp.gate.e_score_correction_bias]
    fp32 += [layer.self_attn.indexer.weights_proj.weight] if v32 else []
    assert all(t.dtype == torch.float32 for t in fp32)
    b = 2
    x = torch.randn(b, 1, cfg.hidden_size, dtype=torch.bfloat16)
    positions = torch.full((b, 1), 5)
    with torch.no_grad(), dskernels.backend("triton"):
        layer(x, positions)  # builds the derived copies (W_UK / W_UV)
        weights = {t.untyped_storage().data_ptr(): name for name, t in [*layer.named_parameters(),
                                                                        *layer.named_buffers()]}
        weights.update({t.untyped_storage().data_ptr(): name for name, t in (
            ("w_uk", layer.self_attn.w_uk), ("w_uv", layer.self_attn.w_uv)) if t is not None})
        mode = _WeightCopies(weights)
        with mode:
            layer(x, positions)
    # (vectors of a few hundred bytes, as small as the step's outputs: the score bias [E], V3.2's
    # key-norm weight and bias [index_head_dim] and rope frequencies [qk_rope_head_dim / 2])
    small = {"mlp.gate.e_score_correction_bias", "self_attn.indexer.k_norm.weight", "self_attn.indexer.k_norm.bias",
             "self_attn.inv_freq"}
    assert [c for c in mode.copies if c[1] not in small] == []
    # .float() and back: the fp32 weights keep their values (nothing rounded them)
    gate = layer.mlp.gate.weight.clone()
    layer.half().float()
    assert torch.equal(layer.mlp.gate.weight, gate)


# ---- loading from safetensors files: each tensor read right before its copy ----

class _ReadMeter:
    """The bytes of the checkpoint's tensors read from the files and still alive, and their peak."""

    def __init__(self):
        self.live = self.peak = self.reads = 0

    def _free(self, size):
        self.live -= size

    def read(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.reads += 1
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, storage.nbytes())
        return t


class _CountedSlice:
    """A real safetensors slice whose reads the meter counts (duck-typed as one: get_shape, get_dtype,
    [index])."""

    def __init__(self, inner, meter):
        self.inner, self.meter = inner, meter

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, index):
        return self.meter.read(self.inner[index])


class _Files(Mapping):
    """A lazy mapping over a checkpoint's safetensors files: a value is read on access (get_tensor),
    get_slice(key) gives it unread."""

    def __init__(self, handles, meter):
        self.where = {k: h for h in handles for k in h.keys()}
        self.meter = meter

    def __getitem__(self, key):
        return self.meter.read(self.where[key].get_tensor(key))

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)

    def get_slice(self, key):
        return _CountedSlice(self.where[key].get_slice(key), self.meter)


def _save_files(sd: dict, directory, files: int, prefix="model.layers.1."):
    """sd in `files` safetensors files under directory, module by module in turn (a weight beside its
    scale; the experts spread over the files); returns their paths."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    modules = sorted({k.removesuffix("_scale_inv") for k in sd})
    paths = []
    for i in range(files):
        mine = {prefix + k: sd[k].contiguous() for m in modules[i::files] for k in (m, m + "_scale_inv") if k in sd}
        paths.append(os.path.join(directory, f"model-{i + 1:05d}-of-{files:05d}.safetensors"))
        safetensors_torch.save_file(mine, paths[-1])
    return paths


def _open(paths):
    safetensors = pytest.importorskip("safetensors")
    # pread: a read allocates the tensor (as a GPU device= does); the default mmap maps the whole file
    return [safetensors.safe_open(p, "pt", backend="pread") for p in paths]


def _medium():
    return DeepseekV3Config.tiny(hidden_size=1024, moe_intermediate_size=256, n_routed_experts=64, n_group=8,
                                 topk_group=4, num_experts_per_tok=8, q_lora_rank=256, kv_lora_rank=256)


def _largest_read(sd: dict) -> int:
    """The most checkpoint bytes one step of a load reads at once: a weight and its scale."""
    pairs = {k: v.nbytes + (sd[k + "_scale_inv"].nbytes if k + "_scale_inv" in sd else 0)
             for k, v in sd.items() if not k.endswith("_scale_inv")}
    return max(pairs.values())


@pytest.mark.parametrize("how", ["lazy_mapping", "slices", "handle_per_file"])
@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_safetensors_load_reads_each_tensor_before_its_copy(tmp_path, how, size):
    """Loading from safetensors files, the values are checked from the files' headers (shape, dtype)
    and each tensor is read right before its copy and dropped after it: the checkpoint bytes alive at
    once stay under the largest weight and its scale (one expert's matrix for the experts), not the
    whole layer's (a lazy mapping's values were all read, then checked, before the first copy: ~2x
    the layer at the peak, 11 GB of V3's FP8 MoE layer). how: a lazy mapping over the files that
    offers get_slice, a dict of safetensors slices, or each file's safe_open handle in turn
    (strict=False, the experts split across the files)."""
    cfg = DeepseekV3Config.tiny() if size == "tiny" else _medium()
    sd, _ = _checkpoint(cfg, "per_expert_fp8", torch.bfloat16)
    paths = _save_files(sd, tmp_path, 3)
    whole = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=True)
    whole.load_hf_state_dict(sd)
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=True)
    layer_bytes = sum(t.nbytes for t in sd.values())
    meter, handles = _ReadMeter(), _open(paths)
    gc.collect()
    if how == "lazy_mapping":
        layer.load_hf_state_dict(_Files(handles, meter))
    elif how == "slices":
        layer.load_hf_state_dict({k: _CountedSlice(h.get_slice(k), meter) for h in handles for k in h.keys()})
    else:
        for h in handles:
            layer.load_hf_state_dict(_Files([h], meter), strict=False)
            gc.collect()
            assert meter.live == 0  # (nothing of the file kept: each expert's matrix went in with its scale)
        assert not layer._expert_parts
    gc.collect()
    assert meter.reads >= len(sd) and meter.live == 0
    assert meter.peak <= _largest_read(sd) < layer_bytes // 4, (meter.peak, _largest_read(sd), layer_bytes)
    for (name, got), want in zip(layer.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


_RSS_SCRIPT = """
import gc, sys, torch
sys.path.insert(0, sys.argv[1])
import test_memory_footprint as t
cfg, paths = t._medium(), sys.argv[2:]
layer = t.DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=True)
handles = t._open(paths)
layer.load_hf_state_dict(t._Files(handles, t._ReadMeter()))  # (first: the weights' pages touched)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM back to the current RSS
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
before = status("VmRSS:")
layer.load_hf_state_dict(t._Files(handles, t._ReadMeter()))
print(status("VmHWM:") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS reset")
def test_safetensors_load_peak_resident_memory(tmp_path):
    """The same in the process's resident memory (a medium layer, 52 MB of FP8 checkpoint): a
    second load's peak above its start (the weights' pages already touched) stays under a quarter of
    the checkpoint's bytes: 0.4 MB measured (it was 53 MB: every tensor read first). In a process
    of its own whose malloc gives freed buffers back (a fixed mmap threshold: glibc's moving one
    keeps them in the heap, where the peak would not show)."""
    import subprocess
    import sys

    cfg = _medium()
    sd, _ = _checkpoint(cfg, "per_expert_fp8", torch.bfloat16)
    paths = _save_files(sd, tmp_path, 2)
    layer_bytes = sum(t.nbytes for t in sd.values())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, os.path.dirname(__file__), *paths], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    assert peak < layer_bytes // 4, (peak, layer_bytes)


def _kept_bytes(layer) -> int:
    """The bytes of expert tensors a shard-by-shard load keeps between calls (written ones are notes)."""
    return sum(v.nbytes for v in layer._expert_parts.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("fmt, fp8, split", [
    ("per_expert_fp8", None, "modules"), ("fused_fp8", None, "modules"), ("per_expert", True, "modules"),
    ("per_expert", None, "modules"), ("per_expert_fp8", False, "modules"), ("per_expert_fp8", None, "scales_apart")])
def test_shard_by_shard_load_writes_the_experts_straight_in(fmt, fp8, split):
    """strict=False per file, the experts split across the files: each expert matrix goes into the
    fused weights in the call that brings it (with its scale; converted where the format changes),
    so nothing of the experts is kept between calls (copies of them were, up to the layer's experts
    in host memory). A weight whose scale is in another file waits for it (kept), then goes in. The
    result is the whole load's."""
    cfg = DeepseekV3Config.tiny()
    sd, _ = _checkpoint(cfg, fmt, torch.bfloat16)
    keeps_fp8 = fmt.endswith("_fp8") if fp8 is None else fp8
    whole = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=keeps_fp8)
    whole.load_hf_state_dict(sd, fp8=fp8)
    modules = sorted({k.removesuffix("_scale_inv") for k in sd})
    if split == "modules":  # 3 files, a weight beside its scale
        files = [[k for m in modules[i::3] for k in (m, m + "_scale_inv") if k in sd] for i in range(3)]
    else:  # expert e's weights in file e % 2, their scales in the other (other FP8 weights need theirs beside them)
        def file_of(k):
            parts = k.split(".")
            return 0 if not k.startswith("mlp.experts.") else (int(parts[2]) + k.endswith("_scale_inv")) % 2
        files = [[k for k in sd if file_of(k) == i] for i in range(2)]
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=keeps_fp8)
    for i, keys in enumerate(files):
        layer.load_hf_state_dict({k: sd[k].clone() for k in keys}, fp8=fp8, strict=False)
        last = i == len(files) - 1
        if split == "modules" or last:
            assert _kept_bytes(layer) == 0, _kept_bytes(layer)
        else:  # the FP8 weights, waiting for their scales
            assert 0 < _kept_bytes(layer) <= sum(sd[k].nbytes for k in keys if k.startswith("mlp.experts."))
    assert not layer._expert_parts
    for (name, got), want in zip(layer.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


def test_shard_by_shard_load_keeps_one_format():
    """Expert matrices written by an earlier call were converted to its format: a later call asking
    for another (fp8 changed half-way) raises, naming fp8, and leaves the layer as it was."""
    cfg = DeepseekV3Config.tiny()
    sd, _ = _checkpoint(cfg, "per_expert_fp8", torch.bfloat16)
    modules = sorted({k.removesuffix("_scale_inv") for k in sd})
    first = {k: sd[k] for m in modules[::2] for k in (m, m + "_scale_inv") if k in sd}
    second = {k: sd[k] for m in modules[1::2] for k in (m, m + "_scale_inv") if k in sd}
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=True)
    layer.load_hf_state_dict(first, strict=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"^fp8: 'mlp\.experts\.\d+\.\w+\.weight' of layer 1 was loaded by an "
                                         r"earlier call as FP8; a shard-by-shard load passes every call the same fp8"):
        layer.load_hf_state_dict(second, fp8=False, strict=False)
    assert all(torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)) for k, v in layer.state_dict().items())
    layer.load_hf_state_dict(second, strict=False)
    assert not layer._expert_parts


def test_load_from_safe_open_handles(tmp_path):
    """Each file's safetensors handle itself (keys() and get_slice(), not a Mapping), the default mmap
    backend, strict=False per file, 5.x fused experts split across the files: the whole load's layer."""
    safetensors = pytest.importorskip("safetensors")
    cfg = DeepseekV3Config.tiny()
    sd, _ = _checkpoint(cfg, "fused_fp8", torch.bfloat16)
    whole = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=True)
    whole.load_hf_state_dict(sd)
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, fp8=True)
    for path in _save_files(sd, tmp_path, 3):
        with safetensors.safe_open(path, "pt") as handle:
            missing, unexpected = layer.load_hf_state_dict(handle, strict=False)
        assert not unexpected
    assert not missing or not any(k.startswith("mlp.experts.") for k in missing)
    assert not layer._expert_parts and layer.weights_loaded
    for (name, got), want in zip(layer.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
