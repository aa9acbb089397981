"""A serving loop allocates its paged caches once under torch.inference_mode() and runs its steps
under torch.no_grad() (docs/models.md, "Serving"): the layer's cache writes must work there on every
backend and cache kind, and give what a cache made outside inference mode gets."""

import importlib.util

import pytest
import torch

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers (the V3.2 config)")

V3 = DeepseekV3Config.tiny()
V32 = DeepseekV3Config.tiny(index_topk=4, index_head_dim=64, index_n_heads=16)


def caches(cfg, layer, kind):
    cache = torch.full((6, 4, 1, cfg.kv_cache_dim), float("nan"))
    if kind == "fp8":
        return dict(kv_cache=cache.to(torch.float8_e4m3fn), kv_cache_scale=torch.tensor([0.5]))
    out = dict(kv_cache=cache)
    if cfg.index_topk is not None:
        indexer = layer.self_attn.indexer
        dtype = torch.uint8 if indexer.fp8 else torch.float32
        out["index_cache"] = torch.full((6, 4, 1, indexer.cache_width), 0xFF if indexer.fp8 else float("nan"),
                                        dtype=dtype)
    return out


def steps(layer, cfg, kw):
    """Prefill 5 tokens, then one: a page boundary crossed, through a shuffled block table."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, cfg.hidden_size, generator=g)
    positions = torch.arange(6)[None] + 1000
    table = torch.tensor([[4, 1, 2 ** 31 - 1]], dtype=torch.int32)
    lens = torch.zeros(1, dtype=torch.int32)
    with torch.no_grad():
        y1 = layer(x[:, :5], positions[:, :5], block_table=table, cache_seqlens=lens, **kw)
        y2 = layer(x[:, 5:], positions[:, 5:], block_table=table, cache_seqlens=lens + 5, **kw)
    return torch.cat([y1, y2], 1)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("case", ["v3-float", "v3-fp8", "v32-float-indexer", "v32-fp8-indexer"])
def test_caches_made_in_inference_mode_written_under_no_grad(backend, case):
    if backend not in dskernels.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    cfg = V32 if case.startswith("v32") else V3
    kwargs = dict(index_fp8=case.endswith("fp8-indexer")) if cfg is V32 else {}
    torch.manual_seed(0)
    layer = DeepseekV3DecoderLayer(cfg, 0, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5)
    layer.refresh_derived_weights()
    layer.weights_loaded = True  # (filled above, not loaded)
    kind = "fp8" if case == "v3-fp8" else "float"
    with dskernels.backend(backend):
        expected = steps(layer, cfg, caches(cfg, layer, kind))
        with torch.inference_mode():
            kw = caches(cfg, layer, kind)
        assert kw["kv_cache"].is_inference()
        got = steps(layer, cfg, kw)  # raised "Inplace update to inference tensor outside InferenceMode"
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
