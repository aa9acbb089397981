"""DeepSeek-V3.2 layers (config index_topk: MLA over the indexer's top-k tokens) against
transformers' DeepseekV32DecoderLayer on random weights, in fp32.

The float indexer is transformers' math, so the whole layer must match (selection included). The
FP8 indexer (DeepSeek's inference path) may pick a different token where two scores are within
FP8 rounding of each other, so it is checked in two parts: its logits against the exact scores of
the same queries and keys within the bound FP8 rounding allows, and the layer against
transformers made to attend where our indexer selected."""

import importlib.util

import numpy
import pytest
import torch

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers (pip install -r requirements-dev.txt)")

TOL = 1e-4
# top-4 of up to 9 tokens: most queries attend to a strict subset of what they may see. 16 indexer
# heads: with few, every head's relu is 0 for some keys often enough that exact ties (score 0) decide
# the selection, and topk breaks ties in no specified order
CFG = DeepseekV3Config.tiny(index_topk=4, index_head_dim=64, index_n_heads=16)
# V3.2's latent widths (512 + 64: the FP8 latent cache's layout), small elsewhere
WIDE = DeepseekV3Config.tiny(index_topk=4, index_head_dim=64, index_n_heads=16, kv_lora_rank=512,
                             qk_rope_head_dim=64, num_attention_heads=2, num_key_value_heads=2)


def hf_module():
    from transformers.models.deepseek_v32 import modeling_deepseek_v32
    return modeling_deepseek_v32


def hf_config(cfg: DeepseekV3Config):
    from transformers import DeepseekV32Config
    config = DeepseekV32Config(**cfg.to_hf_dict())
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def make_reference(cfg: DeepseekV3Config, layer_idx: int, seed: int = 0):
    """transformers' layer in fp32 with random weights (norm weights around 1, k_norm's bias small,
    a negative score bias)."""
    torch.manual_seed(seed)
    ref = hf_module().DeepseekV32DecoderLayer(hf_config(cfg), layer_idx).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * max(p.shape[-1], 1) ** -0.5)
        if cfg.is_moe_layer(layer_idx):
            ref.mlp.gate.e_score_correction_bias.copy_(-0.2 * torch.rand(cfg.n_routed_experts))
    return ref


def reference_forward(ref, cfg, x, positions, selected=None):
    """HF's layer over all tokens of x with a causal mask. selected [B, S, k] (positions, -1 none):
    HF's attention then attends there instead of where its own indexer would."""
    b, s = x.shape[:2]
    rotary = hf_module().DeepseekV32RotaryEmbedding(hf_config(cfg))
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None].expand(b, 1, s, s)
    if selected is not None:  # -1 -> a repeat of a selected position (marking it twice changes nothing)
        chosen = torch.where(selected >= 0, selected, selected.max(-1, keepdim=True).values)
        ref.self_attn.indexer.forward = lambda *args, **kwargs: chosen
    try:
        with torch.no_grad():
            return ref(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary(x, positions))
    finally:
        ref.self_attn.indexer.__dict__.pop("forward", None)


def spread_positions(b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150000, (b, 1), generator=g) + torch.arange(s)


def forced_backend(name):
    if name not in dskernels.available_backends():
        pytest.skip(f"backend {name!r} is not available here")
    return dskernels.backend(name)


def make_layer(cfg, layer_idx, ref, index_fp8, dtype=torch.float32):
    layer = DeepseekV3DecoderLayer(cfg, layer_idx, dtype=dtype, index_fp8=index_fp8)
    layer.load_hf_state_dict(ref.state_dict())
    return layer


def record_selection(layer, name):
    """Wraps layer.self_attn.indexer.<name> (select_new_tokens / select_paged): the positions it returns."""
    calls = []
    original = getattr(layer.self_attn.indexer, name)

    def recorded(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]
    setattr(layer.self_attn.indexer, name, recorded)
    return calls


def paged_caches(cfg, layer, num_pages, page_size, batch, pages_per_seq, fp8_latents=False, seed=5):
    """NaN-poisoned latent and indexer caches (0xFF bytes: NaN in e4m3 and fp32 alike) under a
    block table of shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    if fp8_latents:
        cache = torch.full((num_pages, page_size, 1, 656), 0xFF, dtype=torch.uint8)
    else:
        cache = torch.full((num_pages, page_size, 1, cfg.kv_cache_dim), float("nan"))
    indexer = layer.self_attn.indexer
    if indexer.fp8:
        index_cache = torch.full((num_pages, page_size, 1, indexer.cache_width), 0xFF, dtype=torch.uint8)
    else:
        index_cache = torch.full((num_pages, page_size, 1, indexer.cache_width), float("nan"))
    table = torch.randperm(num_pages, generator=g)[:batch * pages_per_seq].view(batch, pages_per_seq)
    return cache, index_cache, table.to(torch.int32).contiguous()


# ---- config ----

def test_config_from_hf_and_presets():
    v32 = DeepseekV3Config.deepseek_v32_671b()
    assert (v32.index_topk, v32.index_head_dim, v32.index_n_heads, v32.kv_cache_dim) == (2048, 128, 64, 576)
    assert v32.fp8_round_scale  # V3.1's power-of-two scales
    ours = DeepseekV3Config.from_hf(hf_config(v32))
    for name in ("index_topk", "index_head_dim", "index_n_heads", "hidden_size", "q_lora_rank", "n_group",
                 "first_k_dense_replace", "max_position_embeddings"):
        assert getattr(ours, name) == getattr(v32, name), name
    assert ours.rope_parameters == v32.rope_parameters and ours.rope_interleave  # V3.2's MLA interleaves
    assert ours.mlp_layer_types[:4] == ["dense", "dense", "dense", "sparse"]
    assert [ours.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert DeepseekV3Config.from_hf(DeepseekV3Config.deepseek_v3_671b().to_hf_dict()).index_topk is None
    mixed = DeepseekV3Config.tiny(mlp_layer_types=["sparse", "dense"])
    assert [mixed.is_moe_layer(i) for i in (0, 1)] == [True, False]
    assert DeepseekV3DecoderLayer(mixed, 0, dtype=torch.float32).is_moe
    # The MTP layer past the main ones (transformers' list covers num_hidden_layers): MoE, as DeepSeek's
    assert ours.num_hidden_layers == len(ours.mlp_layer_types) == 61 and ours.is_moe_layer(61)
    assert mixed.is_moe_layer(2) == (2 >= mixed.first_k_dense_replace)
    assert DeepseekV3DecoderLayer(mixed, 2, dtype=torch.float32).is_moe == mixed.is_moe_layer(2)
    with pytest.raises(ValueError, match="^layer_idx: expected >= 0"):
        mixed.is_moe_layer(-1)
    with pytest.raises(ValueError, match="^mlp_layer_types:"):
        DeepseekV3Config.tiny(mlp_layer_types=["moe"])
    with pytest.raises(ValueError, match="^index_topk:"):
        DeepseekV3Config.tiny(index_topk=0)
    with pytest.raises(TypeError, match="^index_topk:"):
        DeepseekV3Config.tiny(index_topk=4.0)
    assert DeepseekV3Config.tiny(index_topk=numpy.int64(4)).index_topk == 4  # as every other int field
    with pytest.raises(ValueError, match="^q_lora_rank: DeepSeek-V3.2's indexer"):
        DeepseekV3Config.tiny(index_topk=8, q_lora_rank=None)
    with pytest.raises(ValueError, match="^index_head_dim: expected at least qk_rope_head_dim=32"):
        DeepseekV3Config.tiny(index_topk=8, index_head_dim=16)
    with pytest.raises(ValueError, match="^rope_interleave: DeepSeek-V3.2's attention always ropes interleaved"):
        DeepseekV3Config.tiny(index_topk=8, rope_interleave=False)
    with pytest.raises(ValueError, match="^index_head_dim: the FP8 indexer's Hadamard rotation needs a power of two"):
        DeepseekV3DecoderLayer(DeepseekV3Config.tiny(index_topk=8, index_head_dim=96), 0)
    small = DeepseekV3Config.tiny(index_topk=8, index_head_dim=8, qk_rope_head_dim=8)
    with pytest.raises(ValueError, match="^index_head_dim: the FP8 indexer's logits .* at least 16, got 8"):
        DeepseekV3DecoderLayer(small, 0)  # (it failed at the first forward, naming q)
    DeepseekV3DecoderLayer(small, 0, index_fp8=False)


def test_state_dict_round_trip():
    """The indexer's weights load under HF's names (self_attn.indexer.*) and come back unchanged;
    quantizing on load (fp8=True) makes wq_b and wk FP8 and keeps the head weights float."""
    ref = make_reference(CFG, 1, seed=3)
    layer = make_layer(CFG, 1, ref, index_fp8=True)
    back = layer.hf_state_dict()
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    quantized = DeepseekV3DecoderLayer(CFG, 1, dtype=torch.bfloat16)
    quantized.load_hf_state_dict(ref.state_dict(), fp8=True)
    indexer = quantized.self_attn.indexer
    assert indexer.wq_b.is_fp8 and indexer.wk.is_fp8 and not indexer.weights_proj.is_fp8
    # the head weights stay fp32 in a bf16 layer (transformers' _keep_in_fp32_modules): not rounded
    key = "self_attn.indexer.weights_proj.weight"
    assert indexer.weights_proj.weight.dtype == torch.float32
    assert torch.equal(indexer.weights_proj.weight, ref.state_dict()[key].float())
    with pytest.raises(KeyError, match="missing 'self_attn.indexer.k_norm.bias'"):
        layer.load_hf_state_dict({k: v for k, v in ref.state_dict().items() if k != "self_attn.indexer.k_norm.bias"})
    with pytest.raises(ValueError, match="^state_dict: 'self_attn.indexer.wk.weight' of layer 1: expected shape"):
        layer.load_hf_state_dict({**ref.state_dict(), "self_attn.indexer.wk.weight": torch.ones(3, 3)})
    # built on meta and loaded with assign=True: the Hadamard matrix (in no state dict) is made again
    meta = DeepseekV3DecoderLayer(CFG, 1, dtype=torch.float32, index_fp8=True, device="meta")
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert not meta.self_attn.indexer.hadamard.is_meta and not meta.self_attn.inv_freq.is_meta
    x, positions = torch.randn(2, 3, CFG.hidden_size), spread_positions(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(meta(x, positions), layer(x, positions), atol=0, rtol=0)


# ---- the float indexer: transformers' math, selection included ----

@pytest.mark.parametrize("layer_idx", [0, 1], ids=["dense", "moe"])
def test_prefill_matches_transformers(layer_idx):
    ref = make_reference(CFG, layer_idx)
    x, positions = torch.randn(2, 9, CFG.hidden_size), spread_positions(2, 9)
    layer = make_layer(CFG, layer_idx, ref, index_fp8=False)
    selections = record_selection(layer, "select_new_tokens")
    with torch.no_grad():
        got = layer(x, positions)
    torch.testing.assert_close(got, reference_forward(ref, CFG, x, positions), atol=TOL, rtol=TOL)
    (selected,) = selections
    assert selected.shape == (2, 9, 4)
    assert ((selected >= 0).sum(-1) == torch.arange(1, 10).clamp(max=4)).all()  # top-4 of what each sees
    # the sparse mask matters: attending to everything each token sees gives another output
    dense = make_layer(DeepseekV3Config.tiny(index_topk=9, index_head_dim=64, index_n_heads=16), layer_idx, ref, False)
    with torch.no_grad():
        assert (dense(x, positions) - got).abs().max() > 1e-2


def test_plain_torch_oracle_matches_transformers():
    """python_ref/models.py's V3.2 path (the benchmark's plain-PyTorch peer and check), continued
    from a past that holds the indexer keys, is transformers' math too."""
    from python_ref.models import decoder_layer
    for layer_idx in (0, 1):
        ref = make_reference(CFG, layer_idx, seed=17)
        x, positions = torch.randn(2, 9, CFG.hidden_size), spread_positions(2, 9, seed=8)
        with torch.no_grad():
            first, past = decoder_layer(ref.state_dict(), CFG, layer_idx, x[:, :5], positions[:, :5])
            rest, past = decoder_layer(ref.state_dict(), CFG, layer_idx, x[:, 5:], positions[:, 5:], past)
        assert [t.shape[1] for t in past] == [9, 9, 9] and past[2].shape[-1] == CFG.index_head_dim
        torch.testing.assert_close(torch.cat([first, rest], 1), reference_forward(ref, CFG, x, positions),
                                   atol=TOL, rtol=TOL)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("layer_idx", [0, 1], ids=["dense", "moe"])
def test_prefill_then_decode_through_paged_cache(backend, layer_idx):
    """Two sequences prefilled one by one into NaN-poisoned paged caches (page size 5), then
    decoded together (2 tokens at once, then 1); every output equals HF's layer over the whole
    sequence, whose indexer sees the same tokens."""
    ref = make_reference(CFG, layer_idx, seed=7)
    layer = make_layer(CFG, layer_idx, ref, index_fp8=False)
    got = decode_through_cache(layer, CFG, backend, seed=2)
    for b, (x, positions, y) in enumerate(got):
        torch.testing.assert_close(y, reference_forward(ref, CFG, x, positions)[0], atol=TOL, rtol=TOL)


def decode_through_cache(layer, cfg, backend, seed, fp8_latents=False, selections=None):
    """Prefills [6, 3] tokens, decodes 2 then 1 token per sequence; returns per sequence
    (x [1, n, hidden], positions [1, n], the layer's outputs [n, hidden])."""
    prompt_lens, total = [6, 3], 9
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, total, cfg.hidden_size, generator=g)
    positions = spread_positions(2, total, seed=seed)
    cache, index_cache, table = paged_caches(cfg, layer, num_pages=9, page_size=5, batch=2, pages_per_seq=3,
                                             fp8_latents=fp8_latents)
    table[:, 2] = 2 ** 30  # 9 tokens at most: the third page is never reached, so never read
    got = [[None] * total for _ in range(2)]
    kwargs = dict(kv_cache=cache, index_cache=index_cache)
    with torch.no_grad(), forced_backend(backend):
        for b, n in enumerate(prompt_lens):
            y = layer(x[b:b + 1, :n], positions[b:b + 1, :n], block_table=table[b:b + 1],
                      cache_seqlens=torch.zeros(1, dtype=torch.int32), **kwargs)
            got[b][:n] = list(y[0])
        lens = torch.tensor(prompt_lens, dtype=torch.int32)
        for step in (2, 1):
            idx = lens.long()[:, None] + torch.arange(step)
            xs = torch.stack([x[b, idx[b]] for b in range(2)])
            ps = torch.stack([positions[b, idx[b]] for b in range(2)])
            y = layer(xs, ps, block_table=table, cache_seqlens=lens, **kwargs)
            for b in range(2):
                for j in range(step):
                    got[b][int(idx[b, j])] = y[b, j]
            lens = lens + step
    return [(x[b:b + 1, :int(lens[b])], positions[b:b + 1, :int(lens[b])], torch.stack(got[b][:int(lens[b])]))
            for b in range(2)]


# ---- the FP8 indexer ----

def selections_per_sequence(calls, prompt_lens=(6, 3)):
    """select_paged's outputs of decode_through_cache -> per sequence [n, k] (positions, -1 none)."""
    rows = [[calls[0][0, j] for j in range(prompt_lens[0])], [calls[1][0, j] for j in range(prompt_lens[1])]]
    for call in calls[2:]:
        for b in range(2):
            rows[b].extend(call[b, j] for j in range(call.shape[1]))
    return [torch.stack(r) for r in rows]


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_fp8_indexer_layer_attends_where_it_selects(backend):
    """With the FP8 indexer, prefill from scratch and decode through the FP8 key cache: each output
    equals HF's layer attending where ours selected."""
    ref = make_reference(CFG, 1, seed=9)
    layer = make_layer(CFG, 1, ref, index_fp8=True)
    prefill_calls = record_selection(layer, "select_new_tokens")
    x, positions = torch.randn(2, 9, CFG.hidden_size), spread_positions(2, 9, seed=3)
    with torch.no_grad(), forced_backend(backend):
        got = layer(x, positions)
    torch.testing.assert_close(got, reference_forward(ref, CFG, x, positions, prefill_calls[0]), atol=TOL, rtol=TOL)
    paged_calls = record_selection(layer, "select_paged")
    per_sequence = decode_through_cache(layer, CFG, backend, seed=4)
    for (x, positions, y), selected in zip(per_sequence, selections_per_sequence(paged_calls)):
        torch.testing.assert_close(y, reference_forward(ref, CFG, x, positions, selected[None])[0],
                                   atol=TOL, rtol=TOL)


def test_fp8_indexer_logits_within_rounding_of_exact_scores():
    """The FP8 logits (prefill: fp8_mqa_logits; paged: fp8_paged_mqa_logits over the cached FP8 keys)
    differ from the exact scores (transformers' math: the float indexer's q and k, not rotated) by
    at most what e4m3 rounding of the rotated q and k allows: each is off by <= 2**-4 relative (3
    mantissa bits) plus subnormal steps, so |error| <= sum_h |w_h| (2 * 2**-4 + 2**-8)
    sum_d |q_hd k_d| (rotated) + a subnormal floor. Unseen positions are -inf in both."""
    ref = make_reference(CFG, 0, seed=13)
    layer = make_layer(CFG, 0, ref, index_fp8=True)
    exact_indexer = make_layer(CFG, 0, ref, index_fp8=False).self_attn.indexer
    indexer = layer.self_attn.indexer
    logits_seen, inputs_seen, exact_seen = [], [], []
    top, project = indexer._top, indexer.project
    indexer._top = lambda logits: (logits_seen.append(logits), top(logits))[1]

    def recorded_project(*args):
        exact_seen.append(exact_indexer.project(*args))
        inputs_seen.append(project(*args))
        return inputs_seen[-1]
    indexer.project = recorded_project
    x, positions = torch.randn(2, 9, CFG.hidden_size), spread_positions(2, 9, seed=6)
    cache, index_cache, table = paged_caches(CFG, layer, num_pages=6, page_size=4, batch=2, pages_per_seq=3)
    with torch.no_grad():
        layer(x, positions)
        layer(x[:, :7], positions[:, :7], kv_cache=cache, index_cache=index_cache, block_table=table,
              cache_seqlens=torch.zeros(2, dtype=torch.int32))
        layer(x[:, 7:], positions[:, 7:], kv_cache=cache, index_cache=index_cache, block_table=table,
              cache_seqlens=torch.full((2,), 7, dtype=torch.int32))
    for n, (logits, (q, k, w), (q_exact, k_exact, w_exact)) in enumerate(zip(logits_seen, inputs_seen, exact_seen)):
        if n == 2:  # the decode step scores against the keys cached by the call before
            k, k_exact = torch.cat([inputs_seen[1][1], k], dim=1), torch.cat([exact_seen[1][1], k_exact], dim=1)
        s, t = q.shape[1], k.shape[1]
        seen = torch.arange(t)[None, :] <= torch.arange(t - s, t)[:, None]          # [s, t]
        dots = torch.einsum("bshd,btd->bsht", q_exact.double(), k_exact.double())
        exact = torch.einsum("bsht,bsh->bst", dots.clamp(min=0), w_exact.double())
        bound = torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q.double().abs(), k.double().abs()),
                             w.double().abs()) * (2 * 2 ** -4 + 2 ** -8) + 1e-6
        got = logits[..., :t].double()
        assert torch.equal(torch.isinf(got), ~seen.expand_as(got)), n
        assert (logits[..., t:] == float("-inf")).all()  # past the sequence: the block table's spare room
        err = (got - exact).abs()[seen.expand_as(got)]
        assert (err <= bound[seen.expand_as(got)]).all(), (n, (err / bound[seen.expand_as(got)]).max())
        assert err.max() > 0  # it did go through FP8


# ---- V3.2's FP8 latent cache ----

@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_fp8_latent_cache(backend):
    """Decode through V3.2's FP8 latent cache (656 bytes per token: e4m3 latents with a power-of-two
    scale per 128 values, bf16 rope): within FP8 rounding of HF's layer. e4m3 keeps 3 mantissa bits
    (<= 6.25% per latent value, ~2% rms); scores and values both carry it. (Triton: the cache
    written by write_sparse_latent_cache.)"""
    ref = make_reference(WIDE, 0, seed=15)
    layer = make_layer(WIDE, 0, ref, index_fp8=False)  # transformers' selection: the same tokens
    attention_only = []
    for x, positions, y in decode_through_cache(layer, WIDE, backend, seed=6, fp8_latents=True):
        expected = reference_forward(ref, WIDE, x, positions)[0]
        attention_only.append(((y - expected).norm() / (expected - x[0]).norm()).item())
    assert max(attention_only) < 0.05, attention_only


def _slot_rows(table, lens, s, num_pages, page_size):
    from dskernels.models.paged import cache_rows

    return cache_rows(table, lens, s, num_pages, page_size).tolist()


def _write_case(seed, batch=3, s=2, num_pages=7, page_size=5):
    """A block table and lengths whose new tokens land in pages, past the table (sequence 1's second
    token) and nowhere (sequence 2, a negative length)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(num_pages, generator=g)[:batch * 2].view(batch, 2).int().contiguous()
    lens = torch.tensor([3, 9, -4], dtype=torch.int32)
    return g, table, lens


@pytest.mark.parametrize("dtype", [pytest.param(dtype, marks=[pytest.mark.gpu] if torch.cuda.is_available() else [])
                                   for dtype in (torch.bfloat16, torch.float32)])
def test_sparse_latent_cache_write_matches_quantize(dtype):
    """write_sparse_latent_cache against quantize_sparse_kv_cache plus a write at each token's slot,
    byte for byte: latents over a wide range, a NaN and an inf (their tiles' scales and values: e4m3's
    NaN byte), an all-zero tile (the 1e-4 scale floor), a subnormal rope value; random bytes
    elsewhere stay, slots past the table or negative are not written; strided latent and rope views."""
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g, table, lens = _write_case(1)
    new = (torch.randn(3, 2, 576, generator=g) * torch.exp(3 * torch.randn(3, 2, 1, generator=g))).to(dtype)
    new[0, 0, 5] = float("nan")
    new[0, 1, 128:256] = 0
    new[1, 0, 300] = float("inf")
    new[0, 0, 520] = 1e-39
    cache = torch.randint(0, 256, (7, 5, 1, 656), generator=g, dtype=torch.uint8)
    expected = cache.clone()
    quantized = dskernels.quantize_sparse_kv_cache(new).view(torch.uint8).reshape(6, 656)
    for i, row in enumerate(_slot_rows(table, lens, 2, 7, 5)):
        if row >= 0:
            expected.view(-1, 656)[row] = quantized[i]
    got = cache.to(device)
    triton_layer.write_sparse_latent_cache(new[..., :512].to(device), new[..., 512:].to(device), got,
                                           table.to(device), lens.to(device))
    assert torch.equal(got.cpu(), expected)


def _indexer_case(seed, dtype, heads, dim, rope, batch=3, s=2, round_scale=False):
    """An FP8 indexer (random k_norm) and its projections' outputs for [batch, s] tokens: q over a
    wide range per head, keys with an offset (k_norm removes it), one of them constant, the
    attention's YaRN angles at spread positions."""
    from dskernels.models.indexer import Indexer
    from dskernels.models.rope import rope_inv_freq

    cfg = DeepseekV3Config.tiny(index_topk=4, index_head_dim=dim, index_n_heads=heads, qk_rope_head_dim=rope,
                                qk_nope_head_dim=32, quantization_config={"scale_fmt": "ue8m0"} if round_scale else None)
    indexer = Indexer(cfg, dtype=dtype, fp8=True)
    g = torch.Generator().manual_seed(seed)
    indexer.k_norm.weight.copy_(1 + 0.2 * torch.randn(dim, generator=g))
    indexer.k_norm.bias.copy_(0.2 * torch.randn(dim, generator=g))
    q = (torch.randn(batch, s, heads, dim, generator=g) * torch.exp(2 * torch.randn(batch, s, heads, 1, generator=g)))
    k = 3 * torch.randn(batch, s, dim, generator=g) + 2
    k[-1, 0] = 2  # no variance: LayerNorm's eps alone keeps it finite (its output is k_norm's bias)
    weights = torch.randn(batch, s, heads, generator=g)
    inv_freq, attention_factor = rope_inv_freq(cfg.rope_parameters, rope, cfg.max_position_embeddings)
    rope_args = (spread_positions(batch, s, seed=seed), inv_freq, attention_factor)
    return indexer, q.to(dtype), k.to(dtype), weights, rope_args


def _dequantized(fp8, scale):
    return fp8.float() * scale.unsqueeze(-1)


def _assert_fp8_close(got, got_scale, expected, expected_scale, what, scale_rtol=2 ** -7):
    """Two FP8 casts of values computed in a different fp32 order (the rotation's sums, LayerNorm's
    statistics): each rounding step agrees except where a value lies within fp32 rounding of a
    rounding boundary, so almost all bytes are identical (a step left out or rounded otherwise makes
    most of them differ), and the rest is within two e4m3 half-steps (2 * 2**-4 relative), the
    dtype's rounding of the rotated value (2**-8 for bf16) and a subnormal step of the scale. The
    scales (amax / 448) differ by the rounding of the largest value: scale_rtol (bf16's step, or
    fp32's order of summation)."""
    same = (got.view(torch.uint8) == expected.view(torch.uint8)).float().mean().item()
    assert same > 0.99, (what, same)
    torch.testing.assert_close(got_scale, expected_scale, rtol=scale_rtol, atol=0)
    a, b = _dequantized(got, got_scale), _dequantized(expected, expected_scale)
    bound = (2 * 2 ** -4 + 2 ** -7) * b.abs() + expected_scale.unsqueeze(-1) * 2 ** -8
    assert ((a - b).abs() <= bound).all(), (what, ((a - b).abs() / bound).max())


ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []


@pytest.mark.parametrize("heads,dim,rope", [(64, 128, 64), (5, 64, 32)], ids=["v32", "odd-heads"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=ON_GPU, id="bf16"),
                                   pytest.param(torch.float32, marks=ON_GPU, id="fp32")])
@pytest.mark.parametrize("round_scale", [False, True], ids=["fp32-scale", "ue8m0"])
def test_indexer_qk_kernel_matches_the_torch_steps(heads, dim, rope, dtype, round_scale):
    """The fused indexer kernel (k_norm, rope, Hadamard rotation, FP8 casts, the head weights' scale;
    keys returned) against the torch steps it replaces (Indexer._rotate then _cast, on CPU) on the
    same projections' outputs."""
    check_indexer_qk_kernel(heads, dim, rope, dtype, round_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_indexer_qk_kernel_gpu_products_on_cpu(monkeypatch, dtype):
    """The rotation's products as a GPU computes them (bf16 operands; fp32 data as three bf16 parts)
    through an exact bf16 interpreter dot (dskernels.testing.interpreter), against the torch steps."""
    from dskernels.testing.interpreter import exact_bf16_dots
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends() or torch.cuda.is_available():
        pytest.skip("the interpreter's (CPU); on a GPU the test above runs these products")
    exact_bf16_dots(monkeypatch)
    monkeypatch.setattr(triton_layer, "rotation_dots", lambda d: (torch.bfloat16, d == torch.float32))
    check_indexer_qk_kernel(64, 128, 64, dtype, False)


def check_indexer_qk_kernel(heads, dim, rope, dtype, round_scale):
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    indexer, q, k, weights, rope_args = _indexer_case(3, dtype, heads, dim, rope, round_scale=round_scale)
    with torch.no_grad(), dskernels.backend("ref"):
        q8, w, k8, k_scale = indexer._cast(*indexer._rotate(q, k, weights, rope_args), None)
    positions, inv_freq, factor = rope_args
    on = [t.to(device) for t in (q, k, weights, indexer.k_norm.weight, indexer.k_norm.bias)]
    got = triton_layer.indexer_qk(*on, indexer.k_norm.eps, positions.to(device), inv_freq.to(device), factor,
                                  indexer.hadamard.to(device), indexer.weight_scale, round_scale)
    got_q8, got_w, got_k8, got_k_scale = (t.cpu() for t in got)
    q_scale = w / (weights * indexer.weight_scale)
    got_q_scale = got_w / (weights * indexer.weight_scale)
    # (ue8m0 scales: a power of two apart where the amax straddles one)
    scale_rtol = 1.0 if round_scale else 2 ** -7 if dtype == torch.bfloat16 else 2 ** -20
    _assert_fp8_close(got_q8, got_q_scale, q8, q_scale, "q", scale_rtol)
    torch.testing.assert_close(got_w, w, rtol=scale_rtol, atol=0)
    _assert_fp8_close(got_k8, got_k_scale, k8, k_scale, "k", scale_rtol)
    if round_scale:  # powers of two
        assert (torch.frexp(got_k_scale).mantissa == 0.5).all() and (torch.frexp(got_q_scale).mantissa == 0.5).all()


@pytest.mark.parametrize("round_scale", [pytest.param(False, marks=ON_GPU, id="fp32-scale"),
                                         pytest.param(True, marks=ON_GPU, id="ue8m0")])
def test_indexer_qk_kernel_writes_keys_into_the_paged_cache(round_scale):
    """indexer_qk's cache form: each key in DeepGEMM's paged layout (a page's e4m3 rows, then its
    fp32 scales) at its token's slot, as the torch steps write it (within _assert_fp8_close's bound);
    random bytes elsewhere kept, slots past the table or negative not written. A NaN in a key's
    projection spreads through the rotation: e4m3's NaN byte everywhere, a NaN scale."""
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    g, table, lens = _write_case(2)
    dim, page_size = 128, 5
    indexer, q, k, weights, rope_args = _indexer_case(4, torch.bfloat16, 16, dim, 64, round_scale=round_scale)
    k[0, 1, 7] = float("nan")
    cache = torch.randint(0, 256, (7, page_size, 1, dim + 4), generator=g, dtype=torch.uint8)
    expected = cache.clone()
    with torch.no_grad(), dskernels.backend("ref"):
        indexer._cast(*indexer._rotate(q, k, weights, rope_args), (expected, table, lens, None))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = cache.to(device)
    positions, inv_freq, factor = rope_args
    on = [t.to(device) for t in (q, k, weights, indexer.k_norm.weight, indexer.k_norm.bias)]
    out = triton_layer.indexer_qk(*on, indexer.k_norm.eps, positions.to(device), inv_freq.to(device), factor,
                                  indexer.hadamard.to(device), indexer.weight_scale, round_scale, got,
                                  table.to(device), lens.to(device))
    assert out[2] is None and out[3] is None
    got = got.cpu()
    rows = [row for row in _slot_rows(table, lens, 2, 7, page_size)]
    assert sum(r >= 0 for r in rows) == 3  # sequence 1's second token (past the table) and sequence 2: none
    written = torch.zeros(7, page_size * (dim + 4), dtype=torch.bool)
    keys, scales = [], []
    for cache_bytes in (got, expected):
        pages = cache_bytes.view(7, page_size * (dim + 4))
        keys.append(torch.stack([pages[r // page_size, r % page_size * dim:][:dim] for r in rows if r >= 0]))
        at = [page_size * dim + 4 * (r % page_size) for r in rows if r >= 0]
        scales.append(torch.stack([pages[r // page_size, a:a + 4] for r, a in zip([r for r in rows if r >= 0], at)]))
    for r in rows:
        if r >= 0:
            written[r // page_size, r % page_size * dim:(r % page_size + 1) * dim] = True
            written[r // page_size, page_size * dim + 4 * (r % page_size):][:4] = True
    untouched = ~written
    assert torch.equal(got.view(7, -1)[untouched], cache.view(7, -1)[untouched])
    assert torch.equal(expected.view(7, -1)[untouched], cache.view(7, -1)[untouched])
    got_keys, expected_keys = keys[0].view(torch.float8_e4m3fn), keys[1].view(torch.float8_e4m3fn)
    got_scales, expected_scales = scales[0].contiguous().view(torch.float32)[:, 0], scales[1].contiguous().view(torch.float32)[:, 0]
    assert (got_keys[1].view(torch.uint8) == 0x7F).all() and got_scales[1].isnan()  # token (0, 1): the NaN key
    assert torch.equal(expected_keys[1].view(torch.uint8) & 0x7F, got_keys[1].view(torch.uint8))
    finite = [0, 2]
    _assert_fp8_close(got_keys[finite], got_scales[finite], expected_keys[finite], expected_scales[finite], "k",
                      1.0 if round_scale else 2 ** -7)


def test_fused_indexer_only_where_it_computes_the_same(monkeypatch):
    """The Triton backend takes the fused indexer kernel only where it does the torch steps' work:
    not with explicit slots (slots of -1 write nothing), not past MAX_INDEXER_DIM (index_head_dim
    256 would not fit a GPU's shared memory), and not when k_norm has a hook (the hook runs and
    changes the keys as on the reference backend)."""
    from dskernels.models.indexer import Indexer
    from dskernels.models.rope import rope_inv_freq
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    fused, kernel = [], triton_layer.indexer_qk
    monkeypatch.setattr(triton_layer, "indexer_qk", lambda *a: fused.append(1) or kernel(*a))

    def case(dim, seed=0):
        cfg = DeepseekV3Config.tiny(index_topk=4, index_head_dim=dim, index_n_heads=4, qk_rope_head_dim=32)
        indexer = Indexer(cfg, dtype=torch.bfloat16, fp8=True)
        g = torch.Generator().manual_seed(seed)
        for name, weight in indexer.named_parameters():  # (the weights are Parameters, not buffers)
            if not name.startswith("k_norm"):
                weight.copy_(0.05 * torch.randn(weight.shape, generator=g))
        x = torch.randn(2, 3, cfg.hidden_size, generator=g).bfloat16()
        q_resid = torch.randn(2, 3, cfg.q_lora_rank, generator=g).bfloat16()
        inv_freq, factor = rope_inv_freq(cfg.rope_parameters, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
        return indexer, x, q_resid, (torch.arange(3).expand(2, 3), inv_freq, factor)

    indexer, x, q_resid, rope = case(64)
    table, lens = torch.arange(4, dtype=torch.int32).view(2, 2), torch.tensor([1, 2], dtype=torch.int32)
    cache = torch.zeros(4, 4, 1, 68, dtype=torch.uint8)
    with torch.no_grad(), dskernels.backend("triton"):
        indexer._fp8_inputs(x, q_resid, rope, None, None, (cache, table, lens, torch.full((6,), -1)))
        assert not fused and not cache.any()
        indexer._fp8_inputs(x, q_resid, rope, None, None, (cache, table, lens, None))
        assert fused and cache.any()
        fused.clear()
        wide, *inputs = case(256)
        wide._fp8_inputs(*inputs, None, None)  # (would fit no GPU's shared memory fused)
        assert not fused
        calls = []
        indexer.k_norm.register_forward_hook(lambda module, args, out: calls.append(1) or -out)
        _, _, k8, k_scale = indexer._fp8_inputs(x, q_resid, rope, None, None)
        assert not fused and calls
    with torch.no_grad(), dskernels.backend("ref"):
        _, _, ref_k8, ref_scale = indexer._fp8_inputs(x, q_resid, rope, None, None)
    assert torch.equal(k8.view(torch.uint8), ref_k8.view(torch.uint8)) and torch.equal(k_scale, ref_scale)


@pytest.mark.parametrize("k", [pytest.param(k, marks=ON_GPU) for k in (1, 5, 16)])
def test_selection_kernels_match_torch(k):
    """topk_positions and selected_slots (the V3.2 decode's selection into cache slots) against the
    torch ops they replace, exactly: -inf scores give -1, NaN ones keep their position; -1
    positions give -1 slots, others their page's slot through each sequence's block table."""
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    g = torch.Generator().manual_seed(k)
    b, s, capacity, page_size = 3, 2, 24, 5
    logits = torch.randn(b, s, capacity, generator=g)
    logits[0, 0, 3:] = float("-inf")
    logits[1, 1, 7] = float("nan")
    logits[2, 0] = float("-inf")
    values, positions = logits.topk(k, dim=-1)
    expected = torch.where(values == float("-inf"), -1, positions).to(torch.int32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    selected = triton_layer.topk_positions(values.to(device), positions.to(device)).cpu()
    assert torch.equal(selected, expected)
    table = torch.randperm(40, generator=g)[:b * 5].view(b, 5).int()
    page = table.long().gather(1, (selected.long().clamp(min=0) // page_size).flatten(1))
    slots = torch.where(selected >= 0, page.view(selected.shape) * page_size + selected % page_size, -1).int()
    assert (slots == -1).any() and (slots >= 0).any()
    assert torch.equal(triton_layer.selected_slots(selected.to(device), table.to(device), page_size).cpu(), slots)


def test_cache_writes_with_an_empty_block_table():
    """A block table of no pages (accepted by the layer's checks) gives no token a slot: the three
    write kernels write nothing and read no table entry (the table's pointer is then no memory)."""
    from dskernels.triton import layer as triton_layer

    if "triton" not in dskernels.available_backends():
        pytest.skip("no Triton backend here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table, lens = torch.empty(2, 0, dtype=torch.int32, device=device), torch.zeros(2, dtype=torch.int32, device=device)
    new = torch.randn(2, 1, 576, device=device)
    indexer, q, k, weights, (positions, inv_freq, factor) = _indexer_case(5, torch.float32, 16, 128, 64, batch=2, s=1)
    index_inputs = (q.to(device), k.to(device), weights.to(device), indexer.k_norm.weight.to(device),
                    indexer.k_norm.bias.to(device), 1e-6, positions.to(device), inv_freq.to(device), factor,
                    indexer.hadamard.to(device), indexer.weight_scale, False)
    for cache, write in (
            (torch.zeros(3, 4, 1, 656, dtype=torch.uint8, device=device),
             lambda c: triton_layer.write_sparse_latent_cache(new[..., :512], new[..., 512:], c, table, lens)),
            (torch.zeros(3, 4, 1, 132, dtype=torch.uint8, device=device),
             lambda c: triton_layer.indexer_qk(*index_inputs, c, table, lens)),
            (torch.zeros(3, 4, 1, 576, device=device),
             lambda c: triton_layer.write_latent_cache(new[..., :512], new[..., 512:], c, table, lens, None))):
        write(cache)
        assert not cache.any()


def test_fp8_decode_step_kernel_count():
    """A V3.2 FP8 decode step (V3.2's latent and indexer widths, FP8 weights and caches, batch 2) on
    the Triton backend launches at most 10 torch kernels and 28 Triton ones (before the fused
    indexer kernel and the selection kernels: 81 and 27; the rope angles, k_norm, both ropes and
    rotations, the head weights' scaling, DeepGEMM's unread schedule and the slot arithmetic ran in
    torch). Counted as tests/test_models.py's V3 count is: torch ops that dispatch (views and
    allocations excluded) and Triton launches under the interpreter."""
    if "triton" not in dskernels.available_backends() or torch.cuda.is_available():
        pytest.skip("counts the interpreter's launches (CPU)")
    from dskernels.testing.launches import count_launches

    cfg = DeepseekV3Config.tiny(index_topk=4, index_head_dim=128, index_n_heads=16, kv_lora_rank=512,
                                qk_rope_head_dim=64, num_attention_heads=4, num_key_value_heads=4)
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16)
    layer.load_hf_state_dict(make_reference(cfg, 1, seed=8).state_dict(), fp8=True)
    page_size = 16
    cache = dskernels.quantize_sparse_kv_cache(torch.randn(8, page_size, 1, cfg.kv_cache_dim))
    index_cache = dskernels.paged_k_cache_cast_to_fp8(torch.randn(8, page_size, 1, cfg.index_head_dim))
    step = dict(kv_cache=cache, index_cache=index_cache, block_table=torch.arange(8, dtype=torch.int32).view(2, 4),
                cache_seqlens=torch.tensor([3, 9], dtype=torch.int32))
    x, positions = torch.randn(2, 1, cfg.hidden_size).bfloat16(), torch.tensor([[3], [9]])
    with torch.no_grad(), dskernels.backend("triton"):
        layer(x, positions, **step)  # absorbs W_UK / W_UV once
        with count_launches() as launched:
            layer(x, positions, **step)
    assert "_indexer_qk_kernel" in launched.triton and launched.triton.count("_selection_kernel") == 2
    assert len(launched.torch) <= 10, " ".join(sorted(launched.torch))
    assert len(launched.triton) <= 28, " ".join(sorted(launched.triton))


# ---- bad input ----

def test_bad_inputs():
    ref = make_reference(CFG, 0, seed=1)
    layer = make_layer(CFG, 0, ref, index_fp8=True)
    x, positions = torch.randn(1, 2, CFG.hidden_size), torch.zeros(1, 2, dtype=torch.long)
    cache, index_cache, table = paged_caches(CFG, layer, 4, 4, 1, 2)
    lens = torch.zeros(1, dtype=torch.int32)
    call = dict(kv_cache=cache, block_table=table, cache_seqlens=lens)
    with pytest.raises(ValueError, match="^index_cache: a DeepSeek-V3.2 layer needs"):
        layer(x, positions, **call)
    with pytest.raises(TypeError, match=r"^index_cache: expected torch.uint8 or torch.float8_e4m3fn \(64 e4m3"):
        layer(x, positions, index_cache=torch.zeros(4, 4, 1, 68), **call)
    with pytest.raises(ValueError, match=r"^index_cache: expected \[4, 4, 1, 68\] \(kv_cache's pages and page size"):
        layer(x, positions, index_cache=index_cache[:, :2].contiguous(), **call)
    with pytest.raises(ValueError, match=r"^index_cache: expected \[4, 4, 1, 68\] \(kv_cache's pages"):
        layer(x, positions, index_cache=index_cache[:2].contiguous(), **call)  # fewer pages than kv_cache
    with pytest.raises(ValueError, match="^index_cache: only a DeepSeek-V3.2 layer"):
        layer(x, positions, index_cache=index_cache)
    wide = DeepseekV3DecoderLayer(WIDE, 0, dtype=torch.float16)
    with pytest.raises(TypeError, match="^kv_cache: V3.2's FP8 layout needs a bfloat16 or float32 layer"):
        wide(x.half(), positions, kv_cache=torch.zeros(4, 4, 1, 656, dtype=torch.uint8), block_table=table,
             cache_seqlens=lens, index_cache=torch.zeros(4, 4, 1, 68, dtype=torch.uint8))
    with pytest.raises(ValueError, match="^kv_cache: the FP8 layout .* kv_lora_rank 128"):
        layer(x, positions, index_cache=index_cache, **{**call, "kv_cache": torch.zeros(4, 4, 1, 656, dtype=torch.uint8)})
    v3 = DeepseekV3Config.tiny()
    with pytest.raises(ValueError, match="^index_cache: only a DeepSeek-V3.2 layer"):
        DeepseekV3DecoderLayer(v3, 0, dtype=torch.float32)(x, positions, index_cache=index_cache, **call)
    with pytest.raises(TypeError, match=r"^kv_cache: expected the layer's dtype torch.float32 or float8_e4m3fn "
                                        r"\(an FP8 cache with kv_cache_scale\), got torch.uint8"):
        DeepseekV3DecoderLayer(v3, 0, dtype=torch.float32)(x, positions, **{**call, "kv_cache": cache.byte()})


@pytest.mark.parametrize("index_fp8", [True, False], ids=["fp8-indexer", "fp32-indexer"])
def test_no_tokens(index_fp8):
    """Empty batches and empty calls give empty outputs, with and without the caches."""
    layer = make_layer(CFG, 0, make_reference(CFG, 0, seed=2), index_fp8=index_fp8)
    cache, index_cache, table = paged_caches(CFG, layer, 4, 4, 2, 2)
    with torch.no_grad():
        for b, s in ((2, 0), (0, 3)):
            x, positions = torch.randn(b, s, CFG.hidden_size), torch.zeros(b, s, dtype=torch.long)
            assert layer(x, positions).shape == (b, s, CFG.hidden_size)
        for b, s in ((2, 0), (0, 1)):
            y = layer(torch.randn(b, s, CFG.hidden_size), torch.zeros(b, s, dtype=torch.long), kv_cache=cache,
                      index_cache=index_cache, block_table=table[:b], cache_seqlens=torch.zeros(b, dtype=torch.int32))
            assert y.shape == (b, s, CFG.hidden_size)


@pytest.mark.parametrize("index_fp8", [True, False], ids=["fp8-indexer", "fp32-indexer"])
def test_long_prompts_are_scored_in_query_chunks(monkeypatch, index_fp8):
    """With room for one query's scores at a time, prefill and paged selection go query chunk by
    chunk (each chunk's causal window its own) and select what the unchunked indexer selects."""
    import dskernels.models.indexer as indexer_module
    ref = make_reference(CFG, 0, seed=19)
    runs = []
    for budget in (indexer_module._SCORE_BUDGET, 1):
        monkeypatch.setattr(indexer_module, "_SCORE_BUDGET", budget)
        layer = make_layer(CFG, 0, ref, index_fp8=index_fp8)
        prefill_calls, paged_calls = record_selection(layer, "select_new_tokens"), record_selection(layer, "select_paged")
        x, positions = torch.randn(2, 9, CFG.hidden_size, generator=torch.Generator().manual_seed(3)), spread_positions(2, 9)
        with torch.no_grad():
            layer(x, positions)
        decode_through_cache(layer, CFG, "ref", seed=8)
        runs.append(prefill_calls + paged_calls)
    assert len(runs[0]) == len(runs[1]) == 5
    for chunked, whole in zip(runs[1], runs[0]):
        assert torch.equal(chunked, whole)


def test_built_on_the_meta_device():
    """A layer built on the meta device, materialized with to_empty() and loaded equals one built
    normally: the tensors outside the state dict (rope frequencies, the indexer's Hadamard matrix)
    are rebuilt, not left uninitialized."""
    ref = make_reference(CFG, 0, seed=23)
    with torch.device("meta"):
        layer = DeepseekV3DecoderLayer(CFG, 0, dtype=torch.float32)
    layer = layer.to_empty(device="cpu")
    layer.load_hf_state_dict(ref.state_dict())
    normal = make_layer(CFG, 0, ref, index_fp8=True)
    assert torch.equal(layer.self_attn.indexer.hadamard, normal.self_attn.indexer.hadamard)
    x, positions = torch.randn(1, 6, CFG.hidden_size), spread_positions(1, 6)
    with torch.no_grad():
        assert torch.equal(layer(x, positions), normal(x, positions))


def _ep_body(rank, world_size, state_dict, x, positions, expected):
    """Each rank runs its own sequence (prefill, then a step through its own caches) with half of
    the experts; the FP8 indexer and low-latency dispatch (8 tokens per rank at most) included."""
    import torch.distributed as dist

    from dskernels.ep import Buffer
    buffer = Buffer(dist.group.WORLD)
    mine = slice(rank, rank + 1)
    for low_latency in (None, 8):
        layer = DeepseekV3DecoderLayer(CFG, 1, dtype=torch.float32, ep_buffer=buffer, ep_low_latency_tokens=low_latency)
        layer.load_hf_state_dict(state_dict)
        assert layer.mlp.experts.gate_up_proj.shape[0] == CFG.n_routed_experts // world_size
        cache, index_cache, table = paged_caches(CFG, layer, 4, 4, 1, 2)
        with torch.no_grad():
            prefill = layer(x[mine, :6], positions[mine, :6])
            cached = layer(x[mine, :6], positions[mine, :6], kv_cache=cache, index_cache=index_cache,
                           block_table=table, cache_seqlens=torch.zeros(1, dtype=torch.int32))
            step = layer(x[mine, 6:], positions[mine, 6:], kv_cache=cache, index_cache=index_cache,
                         block_table=table, cache_seqlens=torch.full((1,), 6, dtype=torch.int32))
        for name, got, want in (("prefill", prefill, expected[mine, :6]), ("cached", cached, expected[mine, :6]),
                                ("step", step, expected[mine, 6:])):
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL,
                                       msg=lambda m: f"{name} low_latency={low_latency}: {m}")


def test_expert_parallel_two_ranks_equals_single_process():
    from dskernels.testing import run_distributed
    ref = make_reference(CFG, 1, seed=25)
    x, positions = torch.randn(2, 7, CFG.hidden_size), spread_positions(2, 7, seed=9)
    layer = make_layer(CFG, 1, ref, index_fp8=True)
    with torch.no_grad():
        expected = layer(x, positions)
    run_distributed(_ep_body, 2, ref.state_dict(), x, positions, expected)
