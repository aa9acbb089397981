"""One DeepSeek-V3 decoder layer (dskernels.models) at the real dimensions: decode-step latency
for batch 1..128 at context 4096 and prefill throughput, ours (FP8 checkpoint weights, and bf16
weights) against the same layer in plain PyTorch (python_ref/models.py: transformers' algorithm,
which re-expands the latent cache through kv_b_proj every step and loops over experts).
DeepSeek-V3.2's layer too (config v32: FP8 weights, the FP8 indexer, V3.2's FP8 latent cache and
DeepGEMM's FP8 key pages) at contexts 4096 and 32768, where its top-2048 attention departs from V3.

    python benchmarks/run.py --ops model           # the Case grid, checked and timed
    python benchmarks/bench_model.py [--quick]     # on the GPU: the latency / tokens-per-s table

On CPU, cases() returns the tiny config checked against the oracle (fp32, 1e-4) through every
backend here; the real layer needs ~40 GB of GPU memory (FP8 and bf16 copies of 256 experts).

Counting (per token, as one would for a dense GEMM, 2 FLOPs per multiply-add): every projection
with its real width (q_a, q_b, kv_a, o_proj, W_UK and W_UV absorbed into q / the output, router,
8 routed + 1 shared expert); attention 2 * heads * context * (576 + 512) in decode (the absorbed
latent path, FlashMLA's count) and 2 * heads * (tokens / 2) * (192 + 128) in prefill (per-head keys
and values from kv_b_proj, causal: half the square).
Bytes: the weights that must be read once (attention and shared weights, and the experts B tokens
touch: 256 * (1 - (1 - 8/256)^B) on average, each token missing a given expert with probability
1 - 8/256 where routing is even, as V3's balancing bias keeps it), each in the dtype the layer keeps
it (W_UK / W_UV absorbed in bf16 beside FP8 weights, the router's gate in fp32), plus the latent
cache read once (FlashMLA's count).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import math
import os
import sys

import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dskernels  # noqa: E402
from benchmarks.common import GRAPH_VARIANTS, Case, graph_or_eager  # noqa: E402
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer  # noqa: E402
from python_ref import models as ref_models  # noqa: E402
from python_ref.indexer import paged_k_cache_dequantize  # noqa: E402

CONTEXT = 4096
# Batch-invariant mode (docs/models.md "Batch-invariant decoding"): the default choice's decode step
# (FP8 weights) in the mode, eager and replayed from a CUDA graph, beside auto and auto[graph]: what
# the mode costs a step (the MLA plan per sequence, the fixed-tile matmuls, the GEMMs' one tile).
# Timed only once the mode's GPU tests passed in this device call (scripts/gpu_check.sh sets
# INVARIANT_TESTED_ENV after tests/test_mla_batch_invariant.py and tests/test_gemm_batch_invariant.py):
# the layer runs first in a device call, and a fault there would end the CUDA context for every family.
INVARIANT_TESTED_ENV = "DSKERNELS_BATCH_INVARIANT_TESTED"
INVARIANT_VARIANTS = {"invariant": {"DSKERNELS_BATCH_INVARIANT": "1"},
                      "invariant_graph": {"DSKERNELS_BATCH_INVARIANT": "1", **GRAPH_VARIANTS["graph"]}}
LONG_CONTEXT = 32768  # V3.2 reads 2048 of these latents per query, and indexes all of them
PAGE = 64


def random_checkpoint(cfg: DeepseekV3Config, layer_idx: int, device: str, fp8: bool, seed: int = 0) -> dict:
    """A random layer in the FP8 checkpoint's format (float8_e4m3fn weight + fp32 weight_scale_inv
    per 128x128 block; experts under 5.x fused names) or in bf16, generated on the device one
    matrix at a time. Projections have unit-variance outputs (scale k**-0.5), norms are 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}

    def matrix(n, k):
        w = torch.randn(n, k, generator=g, device=device)
        return w.clamp(-448, 448).to(torch.float8_e4m3fn) if fp8 else (w * k ** -0.5).to(torch.bfloat16)

    def scales(n, k):
        return torch.full((math.ceil(n / 128), math.ceil(k / 128)), k ** -0.5, device=device)

    def linear(name, n, k):
        sd[f"{name}.weight"] = matrix(n, k)
        if fp8:
            sd[f"{name}.weight_scale_inv"] = scales(n, k)

    def experts(name, n, k):
        count = cfg.n_routed_experts
        w = torch.empty(count, n, k, device=device, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
        for e in range(count):
            w[e] = matrix(n, k)
        sd[f"mlp.experts.{name}"] = w
        if fp8:
            sd[f"mlp.experts.{name}_scale_inv"] = scales(n, k).expand(count, -1, -1).contiguous()

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    ones = functools.partial(torch.ones, device=device, dtype=torch.bfloat16)
    sd["input_layernorm.weight"] = ones(h)
    sd["post_attention_layernorm.weight"] = ones(h)
    sd["self_attn.kv_a_layernorm.weight"] = ones(cfg.kv_lora_rank)
    if cfg.q_lora_rank:
        linear("self_attn.q_a_proj", cfg.q_lora_rank, h)
        sd["self_attn.q_a_layernorm.weight"] = ones(cfg.q_lora_rank)
        linear("self_attn.q_b_proj", heads * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        linear("self_attn.q_proj", heads * cfg.qk_head_dim, h)
    linear("self_attn.kv_a_proj_with_mqa", cfg.kv_cache_dim, h)
    linear("self_attn.kv_b_proj", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    linear("self_attn.o_proj", h, heads * cfg.v_head_dim)
    if cfg.index_topk is not None:  # V3.2's indexer (weights_proj stays bf16, as in the checkpoint)
        linear("self_attn.indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
        linear("self_attn.indexer.wk", cfg.index_head_dim, h)
        sd["self_attn.indexer.k_norm.weight"] = ones(cfg.index_head_dim)
        sd["self_attn.indexer.k_norm.bias"] = torch.zeros(cfg.index_head_dim, device=device, dtype=torch.bfloat16)
        sd["self_attn.indexer.weights_proj.weight"] = (
            torch.randn(cfg.index_n_heads, h, generator=g, device=device) * h ** -0.5).to(torch.bfloat16)
    if not cfg.is_moe_layer(layer_idx):
        for name, n, k in (("gate_proj", cfg.intermediate_size, h), ("up_proj", cfg.intermediate_size, h),
                           ("down_proj", h, cfg.intermediate_size)):
            linear(f"mlp.{name}", n, k)
        return sd
    inter = cfg.moe_intermediate_size
    sd["mlp.gate.weight"] = torch.randn(cfg.n_routed_experts, h, generator=g, device=device) * h ** -0.5
    sd["mlp.gate.e_score_correction_bias"] = -0.05 * torch.rand(cfg.n_routed_experts, generator=g, device=device)
    shared = inter * cfg.n_shared_experts
    for name, n, k in (("gate_proj", shared, h), ("up_proj", shared, h), ("down_proj", h, shared)):
        linear(f"mlp.shared_experts.{name}", n, k)
    experts("gate_up_proj", 2 * inter, h)
    experts("down_proj", h, inter)
    return sd


def _config(name: str) -> DeepseekV3Config:
    """v3 / v32: the 671B models' layers; tiny / tiny32: the test model (tiny32 with V3.2's indexer,
    top-16 of 16 heads x 64)."""
    return {"v3": DeepseekV3Config.deepseek_v3_671b, "v32": DeepseekV3Config.deepseek_v32_671b,
            "tiny": DeepseekV3Config.tiny,
            "tiny32": lambda: DeepseekV3Config.tiny(index_topk=16, index_head_dim=64, index_n_heads=16)}[name]()


@functools.lru_cache(maxsize=2)
def _checkpoint(config: str, layer_idx: int, device: str, fp8: bool) -> dict:
    return random_checkpoint(_config(config), layer_idx, device, fp8)


@functools.lru_cache(maxsize=4)
def build(config: str, layer_idx: int, device: str, fp8: bool):
    """(our layer, the plain-PyTorch weights). On the GPU one FP8 checkpoint serves both of our
    layers (fp8=True keeps it as is, sharing its memory; fp8=False dequantizes it to bf16) and the
    peer runs on the bf16 layer's weights, so all three compute with the same values (~35 GB in all
    at the real size). On CPU: fp32 layers from a bf16 checkpoint (V3.2: with transformers' fp32
    indexer, whose selection the oracle shares exactly; the GPU layers score in FP8)."""
    if device == "cpu":
        layer = DeepseekV3DecoderLayer(_config(config), layer_idx, dtype=torch.float32, device=device,
                                       index_fp8=False)
        layer.load_hf_state_dict(_checkpoint(config, layer_idx, device, False))
        return layer, layer.hf_state_dict()
    # (built float, so that the FP8 load takes the checkpoint's tensors instead of copying them into
    # FP8 weights of its own, as an FP8-config layer built fp8 would)
    layer = DeepseekV3DecoderLayer(_config(config), layer_idx, dtype=torch.bfloat16, device=device, fp8=False)
    layer.load_hf_state_dict(_checkpoint(config, layer_idx, device, True), fp8=fp8)
    return layer, (build(config, layer_idx, device, False)[1] if fp8 else layer.hf_state_dict())


@functools.lru_cache(maxsize=2)
def hf_layer(config: str, layer_idx: int, device: str):
    """transformers' DeepseekV3DecoderLayer on the bf16 (CPU: fp32) weights of our float layer,
    sharing their memory, with its defaults for loaded models (sdpa attention, grouped_mm experts);
    None where transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers import DeepseekV3Config as HFConfig
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    layer, weights = build(config, layer_idx, device, False)
    hf_cfg = HFConfig(**layer.cfg.to_hf_dict())
    hf_cfg._attn_implementation, hf_cfg._experts_implementation = "sdpa", "grouped_mm"
    with torch.device("meta"):
        module = hf.DeepseekV3DecoderLayer(hf_cfg, layer_idx)
    module.load_state_dict(weights, assign=True)
    return module.eval(), hf.DeepseekV3RotaryEmbedding(hf_cfg).to(device), hf_cfg


def _float_dtype(weights: dict) -> torch.dtype:
    """The dtype of the weights HF's layer is built from, MoE or dense (a dense layer has no
    mlp.experts.down_proj: its transformers peer raised KeyError)."""
    return weights.get("mlp.experts.down_proj", weights.get("mlp.down_proj.weight")).dtype


def transformers_step(config, layer_idx, x, positions, past=None):
    """One call of HF's layer: a DynamicCache holding `past` (latent [B, T, r], k_rope [B, T, rope])
    gets the new tokens appended (torch.cat, as in HF generation), then attention over all of it."""
    from transformers import DynamicCache
    module, rotary, hf_cfg = hf_layer(config, layer_idx, x.device.type)
    cache = None
    if past is not None:
        cache = DynamicCache(config=hf_cfg)
        cache.update(past[0][:, None], past[1][:, None], layer_idx)
    # (transformers 5.x renamed the argument past_key_values to cache, the old name deprecated)
    cache_arg = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    with torch.no_grad():
        return module(x, position_ids=positions, use_cache=past is not None, position_embeddings=rotary(x, positions),
                      **{cache_arg: cache})


def _flops_bytes(cfg, layer_idx, tokens, context, batch, weight_bytes, prefill=False):
    """context: keys per query (decode: the cache length; prefill: the mean causal length, tokens / 2).
    V3.2 attends in the absorbed form to min(index_topk, context) of them in decode, and in prefill
    to min(index_topk, p + 1) at position p (averaged over the sequence's 2 * context positions),
    reads those latents from its FP8 cache (656 bytes per token) and scores the whole context with
    the indexer (2 * index_n_heads * index_head_dim per key, its cache read once in decode)."""
    h, heads, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    sparse = cfg.index_topk is not None
    # Decode attends over the latent cache (576-wide keys, 512-wide values); prefill expands the
    # new tokens' latents per head and runs SDPA on (qk_head_dim, v_head_dim).
    attn_width = cfg.qk_head_dim + cfg.v_head_dim if prefill and not sparse else cfg.kv_cache_dim + r
    attn_w = h * (cfg.q_lora_rank or 0) + (cfg.q_lora_rank or h) * heads * cfg.qk_head_dim \
        + h * cfg.kv_cache_dim + r * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * h
    attended, index_flops = context, 0
    if sparse:
        attn_w += cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim + h * (cfg.index_head_dim + cfg.index_n_heads)
        # Decode: each query selects min(index_topk, context) cached tokens. Prefill (context = the
        # mean causal length, tokens / 2): the query at position p sees p + 1 tokens and selects
        # min(index_topk, p + 1) of them; min(index_topk, tokens / 2) overstated the mean by a third
        # at 4096 tokens (2048 for 1536).
        if prefill:
            tokens_per_sequence = round(2 * context)
            attended = sum(min(cfg.index_topk, p + 1) for p in range(tokens_per_sequence)) / tokens_per_sequence
        else:
            attended = min(cfg.index_topk, context)
        index_flops = 2 * tokens * cfg.index_n_heads * cfg.index_head_dim * context
    if not cfg.is_moe_layer(layer_idx):
        mlp_active = mlp_read = 3 * h * cfg.intermediate_size
    else:
        expert = 3 * h * cfg.moe_intermediate_size
        mlp_active = (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert + h * cfg.n_routed_experts
        # The experts the tokens touch, on average under even routing (min(E, K * tokens), the upper
        # bound, overstated the bytes by 24% at 16 tokens and 54% at 32: GB/s and roofline with them)
        experts, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        touched = experts * (1 - (1 - k / experts) ** tokens)
        mlp_read = (touched + cfg.n_shared_experts) * expert
    flops = 2 * tokens * (attn_w + mlp_active) + 2 * tokens * heads * attended * attn_width + index_flops
    cache = batch * (attended * 656 + context * (cfg.index_head_dim + 4)) if sparse else batch * context * cfg.kv_cache_dim * 2
    # Weights the layer keeps in another dtype than the checkpoint's: W_UK / W_UV, absorbed from
    # kv_b_proj in the compute dtype (bf16 beside FP8 weights), wherever attention runs absorbed; the
    # router's gate and V3.2's weights_proj in fp32.
    other_dtypes = 0
    if not prefill or sparse:
        other_dtypes += r * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * (max(weight_bytes, 2) - weight_bytes)
    if sparse:
        other_dtypes += h * cfg.index_n_heads * (4 - weight_bytes)
    if cfg.is_moe_layer(layer_idx):
        other_dtypes += 4 * h * cfg.n_routed_experts
    return float(flops), float((attn_w + mlp_read) * weight_bytes + other_dtypes + cache)


def _rel_l2(limit):
    def check(out, expected):
        err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        return None if err <= limit else f"relative L2 error {err:.2e} > {limit:.0e} against python_ref.models"
    return check


def decode_case(config: str, layer_idx: int, batch: int, context: int, fp8: bool, device: str,
                kv_fp8: bool = False, invariant_rows: bool = False) -> Case:
    """kv_fp8: V3 with a float8_e4m3fn latent cache and a per-tensor scale (kv_cache_scale); the
    peers and the oracle read the dequantized cache. invariant_rows: the auto[invariant] and
    auto[invariant_graph] rows too (INVARIANT_VARIANTS), once the mode's GPU tests passed."""
    def make_inputs(dev):
        layer, weights = build(config, layer_idx, dev, fp8)
        cfg = layer.cfg
        g = torch.Generator(device=dev).manual_seed(1)
        pages_per_seq = -(-(context + 1) // PAGE)
        pages = batch * pages_per_seq
        cache = torch.randn(pages, PAGE, 1, cfg.kv_cache_dim, generator=g, device=dev).to(layer.dtype)
        index_cache = None
        if cfg.index_topk is not None:
            indexer = layer.self_attn.indexer
            keys = torch.randn(pages, PAGE, 1, indexer.head_dim, generator=g, device=dev)  # LayerNorm'd: ~unit
            if indexer.fp8:  # V3.2's FP8 caches (the latents' 656-byte layout, DeepGEMM's key pages)
                cache = dskernels.quantize_sparse_kv_cache(cache)
                index_cache = dskernels.paged_k_cache_cast_to_fp8(keys)  # keys as the indexer stores them: rotated
            else:
                index_cache = keys.to(layer.dtype)
        kv_scale = None
        if kv_fp8:  # one scale for the whole cache: its amax maps to e4m3's 448
            kv_scale = (cache.float().abs().amax() / 448).reshape(1)
            cache = (cache.float() / kv_scale).to(torch.float8_e4m3fn)
        table = torch.randperm(pages, generator=g, device=dev).view(batch, pages_per_seq).int()
        lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
        x = torch.randn(batch, 1, cfg.hidden_size, generator=g, device=dev).to(layer.dtype)
        positions = torch.full((batch, 1), context, dtype=torch.long, device=dev)
        return layer, weights, x, positions, (cache, index_cache, kv_scale), table, lens

    def step(layer, weights, x, positions, caches, table, lens):
        with torch.no_grad():
            return layer(x, positions, kv_cache=caches[0], index_cache=caches[1], block_table=table,
                         cache_seqlens=lens, kv_cache_scale=caches[2])

    # The step replayed from a CUDA graph too, as servers run it: the first H200 run (2026-12-04)
    # had the eager layer at batch 1 2.4x slower than transformers', with ~0.14 ms of bytes to move.
    run = graph_or_eager(step)
    history = {}

    def past_of(layer, caches, table, rows):
        """The context's cached latents as contiguous [b, context, r] and [b, context, rope] (the
        peers' own cache layout; gathered once, outside their timing), for V3.2 also its indexer
        keys [b, context, index_head_dim] (FP8 caches dequantized, the keys rotated back)."""
        key = (id(caches[0]), str(rows))
        if key not in history:
            history.clear()
            cfg, (cache, index_cache, kv_scale) = layer.cfg, caches
            pages = table[rows].long()
            latent = cache[pages].flatten(1, 2)[:, :context, 0]   # [b, context, d]
            if latent.dtype == torch.uint8:
                latent = dskernels.dequantize_sparse_kv_cache(latent).to(layer.dtype)
            elif latent.dtype == torch.float8_e4m3fn:
                latent = (latent.float() * kv_scale).to(layer.dtype)
            history[key] = (latent[..., :cfg.kv_lora_rank].contiguous(), latent[..., cfg.kv_lora_rank:].contiguous())
            if index_cache is not None:
                indexer = layer.self_attn.indexer
                if indexer.fp8:
                    keys = paged_k_cache_dequantize(index_cache, indexer.head_dim).float() @ indexer.hadamard.T
                else:
                    keys = index_cache[:, :, 0]
                history[key] += (keys[pages].flatten(1, 2)[:, :context].to(layer.dtype).contiguous(),)
        return history[key]

    def plain_torch(layer, weights, x, positions, caches, table, lens):
        """transformers' algorithm: the whole batch at once, the latent history expanded per head."""
        with torch.no_grad():
            return ref_models.decoder_layer(weights, layer.cfg, layer_idx, x, positions,
                                            past_of(layer, caches, table, slice(None)))[0]

    def transformers_peer(layer, weights, x, positions, caches, table, lens):
        return transformers_step(config, layer_idx, x.to(_float_dtype(weights)), positions,
                                 past_of(layer, caches, table, slice(None)))

    def reference(layer, weights, x, positions, caches, table, lens):
        """The oracle one sequence at a time (bounded memory at batch 128)."""
        with torch.no_grad():
            outs = [ref_models.decoder_layer(weights, layer.cfg, layer_idx, x[b:b + 1], positions[b:b + 1],
                                             past_of(layer, caches, table, slice(b, b + 1)))[0]
                    for b in range(batch)]
        return torch.cat(outs)

    cfg = _config(config)
    flops, moved = _flops_bytes(cfg, layer_idx, batch, context, batch, 1 if fp8 else 2)
    if kv_fp8:  # the latent cache read at 1 byte per value instead of 2
        moved -= batch * context * cfg.kv_cache_dim
    # fp32 on CPU: the same math to rounding; bf16/FP8 on GPU: activation casts (and, rarely, a
    # near-tied expert chosen differently; V3.2: a near-tied token the FP8 indexer ranks otherwise)
    # make this a sanity bound only; tests/test_models*.py hold the accuracy checks. An FP8 cache
    # also holds the new token's own latent in e4m3, which the oracle keeps exact: 1e-2 on CPU
    # (measured 0.3%; a scale left out of the new token's write gives 3% to 25%).
    limit = (1e-2 if kv_fp8 else 1e-4) if device == "cpu" else 0.2
    return Case(op="deepseek_v3_layer_decode",
                params={"config": config, "layer": "moe" if cfg.is_moe_layer(layer_idx) else "dense",
                        "weights": "fp8" if fp8 else "bf16" if device != "cpu" else "fp32",
                        "batch": batch, "context": context, **({"kv_cache": "fp8"} if kv_fp8 else {})},
                make_inputs=make_inputs, run=run, reference=reference, check=_rel_l2(limit), flops=flops,
                bytes=moved, peers=_peers(device, cfg, plain_torch, transformers_peer),
                backends=("ref", "triton") if device == "cpu" else ("triton", "cuda", "auto"),
                compute_dtype="fp8" if fp8 else "bf16", triton_variants=GRAPH_VARIANTS, cuda_variants=GRAPH_VARIANTS,
                auto_variants=GRAPH_VARIANTS | (INVARIANT_VARIANTS if invariant_rows and
                                                os.environ.get(INVARIANT_TESTED_ENV) == "1" else {}))


def _peers(device, cfg, plain_torch, transformers_peer) -> dict:
    """Plain PyTorch, and transformers' V3 layer (not its V3.2 one: its indexer cache lives in
    transformers' own Cache classes, which this benchmark does not build). Declared on every
    device (checked against the oracle in tests on CPU), timed on a GPU only."""
    peers = {"torch": plain_torch}
    if importlib.util.find_spec("transformers") is not None and cfg.index_topk is None:
        peers["transformers"] = transformers_peer
    return peers


def prefill_case(config: str, layer_idx: int, batch: int, tokens: int, fp8: bool, device: str) -> Case:
    def make_inputs(dev):
        layer, weights = build(config, layer_idx, dev, fp8)
        g = torch.Generator(device=dev).manual_seed(2)
        x = torch.randn(batch, tokens, layer.cfg.hidden_size, generator=g, device=dev).to(layer.dtype)
        positions = torch.arange(tokens, device=dev).expand(batch, tokens).contiguous()
        return layer, weights, x, positions

    def run(layer, weights, x, positions):
        with torch.no_grad():
            return layer(x, positions)

    def plain_torch(layer, weights, x, positions):
        with torch.no_grad():
            return ref_models.decoder_layer(weights, layer.cfg, layer_idx, x, positions)[0]

    def transformers_peer(layer, weights, x, positions):
        return transformers_step(config, layer_idx, x.to(_float_dtype(weights)), positions)

    cfg = _config(config)
    flops, moved = _flops_bytes(cfg, layer_idx, batch * tokens, tokens / 2, 0, 1 if fp8 else 2, prefill=True)
    return Case(op="deepseek_v3_layer_prefill",
                params={"config": config, "layer": "moe" if cfg.is_moe_layer(layer_idx) else "dense",
                        "weights": "fp8" if fp8 else "bf16" if device != "cpu" else "fp32",
                        "batch": batch, "tokens": tokens},
                make_inputs=make_inputs, run=run, reference=plain_torch,
                check=_rel_l2(1e-4 if device == "cpu" else 0.2), flops=flops, bytes=moved,
                peers=_peers(device, cfg, plain_torch, transformers_peer),
                backends=("ref", "triton") if device == "cpu" else ("triton", "cuda"),
                compute_dtype="fp8" if fp8 else "bf16")


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":  # the tiny model: every path checked against the oracle in fp32
        return [decode_case("tiny", 1, 3, 37, False, device), decode_case("tiny", 0, 2, 20, False, device),
                decode_case("tiny", 0, 2, 20, False, device, kv_fp8=True),  # dense: an MoE layer's routing
                # would amplify the cache's rounding past any useful bound (one flipped expert: 36%)
                prefill_case("tiny", 1, 2, 23, False, device), decode_case("tiny32", 1, 3, 37, False, device),
                prefill_case("tiny32", 0, 2, 23, False, device)]
    if quick:  # a short device call: the FP8 layer only (each new GEMM shape autotunes 7 tiles)
        return [decode_case("v3", 3, b, CONTEXT, True, device, invariant_rows=True) for b in (1, 64)] + \
            [prefill_case("v3", 3, 1, CONTEXT, True, device)]
    batches = [1, 2, 4, 8, 16, 32, 64, 128]
    found = [decode_case("v3", 3, b, CONTEXT, fp8, device, invariant_rows=fp8) for fp8 in (True, False)
             for b in batches]
    found += [prefill_case("v3", 3, 1, CONTEXT, fp8, device) for fp8 in (True, False)]
    # the FP8 KV cache (e4m3 latents, one scale): half the cache bytes each decode step reads
    found += [decode_case("v3", 3, b, CONTEXT, True, device, kv_fp8=True) for b in (1, 32, 128)]
    # V3.2 (top-2048 sparse attention, FP8 caches): where it departs from V3, at long contexts
    found += [decode_case("v32", 3, b, context, True, device) for context in (CONTEXT, LONG_CONTEXT)
              for b in (1, 32, 128)]
    found += [prefill_case("v32", 3, 1, CONTEXT, True, device)]
    return found


def main() -> int:
    """The GPU table: decode-step latency per batch and prefill tokens/s, ours vs plain PyTorch."""
    from dskernels.testing import bench
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer = bench.bench_gpu if device == "cuda" else bench.bench_cpu
    print(f"DeepSeek-V3 / V3.2 layer on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, backends {dskernels.available_backends()}")
    print("case | shape | ours us | ours host us | plain torch us | transformers us | speedup vs fastest | "
          "ours tokens/s | check")
    status = 0
    for case in cases(args.quick, device):
        inputs = case.make_inputs(device)
        problem = case.check(case.run(*inputs), case.reference(*inputs))
        status |= problem is not None
        state = {}  # on a GPU: the host's time per step beside the device's (bench_gpu)
        ours = timer(lambda: case.run(*inputs), telemetry=state)
        host = f"{state['host_ms'] * 1e3:.0f}" if "host_ms" in state else "-"
        theirs = {}
        for name in ("torch", "transformers"):
            peer = case.peers.get(name) if device == "cuda" else None  # (CPU: ours checked only, as before)
            try:
                theirs[name] = timer(lambda: peer(*inputs)) if peer else float("nan")
            except torch.OutOfMemoryError:  # the expanded cache of a large batch
                theirs[name] = float("nan")
        fastest = min((t for t in theirs.values() if t == t), default=float("nan"))
        tokens = case.params["batch"] * case.params.get("tokens", 1)
        peer_us = [f"{t * 1e3:.0f}" if t == t else "-" for t in (theirs["torch"], theirs["transformers"])]
        speedup = f"{fastest / ours:.2f}x" if fastest == fastest else "-"  # NaN: no peer ran
        print(f"{case.op.removeprefix('deepseek_v3_layer_')} | "
              + " ".join(f"{k}={v}" for k, v in case.params.items())
              + f" | {ours * 1e3:.0f} | {host} | {peer_us[0]} | {peer_us[1]} | {speedup} | {tokens / ours * 1e3:.0f} | "
              + (problem or "ok"), flush=True)
        inputs = None  # the layer's caches: freed before the next case builds its own
        if device == "cuda":
            torch.cuda.empty_cache()
    return status


if __name__ == "__main__":
    sys.exit(main())
