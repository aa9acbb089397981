"""dskernels.models on a GPU (run on the device: pytest -m gpu): the layer at the V3 head shapes
(d = 576 latent cache, the FlashMLA fast path) through the CUDA / Triton kernels against the
plain-PyTorch oracle (python_ref/models.py; it matches transformers in tests/test_models.py), and
the decode step captured in a CUDA graph. No transformers needed here."""

import pytest
import torch

import dskernels

from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer
from python_ref.models import decoder_layer

pytestmark = pytest.mark.gpu

# V3's attention and routing shapes (kv_lora_rank 512, rope 64, nope 128, v 128, 8 groups / top-4
# groups / top-8 experts), narrower elsewhere so the test stays small
CFG = DeepseekV3Config.deepseek_v3_671b(hidden_size=1024, intermediate_size=1024, moe_intermediate_size=256,
                                        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=256,
                                        n_routed_experts=32, first_k_dense_replace=1)


def make_layer(layer_idx: int, fp8: bool, seed: int = 0):
    torch.manual_seed(seed)
    layer = DeepseekV3DecoderLayer(CFG, layer_idx, dtype=torch.bfloat16, device="cuda", fp8=fp8)
    sd = {}
    for name, t in layer.hf_state_dict(torch.float32).items():  # names and shapes of an empty layer
        if name.endswith("norm.weight"):
            sd[name] = 1 + 0.1 * torch.randn(t.shape, device="cuda")
        elif name.endswith("e_score_correction_bias"):
            sd[name] = -0.05 * torch.rand(t.shape, device="cuda")
        else:
            sd[name] = torch.randn(t.shape, device="cuda") * t.shape[-1] ** -0.5
    layer.load_hf_state_dict(sd, fp8=fp8)
    return layer


def rel_error(got, expected):
    """On the CPU: a GPU result against a CPU oracle (or a replay of the layer there) too."""
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).norm() / expected.norm()).item()


def record_routes(monkeypatch):
    """The expert sets the layer's router and the oracle's pick, call by call ([tokens, K], sorted)."""
    import dskernels.models.moe as layer_moe
    import python_ref.models as oracle

    calls = {"layer": [], "oracle": []}
    for name, module in (("layer", layer_moe), ("oracle", oracle)):
        def recording(*args, real=module.route, name=name, **kwargs):
            idx, weights = real(*args, **kwargs)
            calls[name].append(idx.sort(dim=-1).values)
            return idx, weights
        monkeypatch.setattr(module, "route", recording)
    return calls


def rel_error_where(got, expected, keep):
    """rel_error over the tokens [batch, seq] where keep holds."""
    return rel_error(got[keep], expected[keep])


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["dense", "moe"])
def test_prefill_and_paged_decode_match_oracle_bf16(layer_idx, monkeypatch):
    """bf16 prefill, then prefill through the paged cache and two decode steps, against the fp32
    oracle over the whole sequence (2e-2 relative: bf16 weights and activations throughout).

    MoE: the paged path's absorbed attention moves the router's input by ~0.5%, which flips a few
    near-tied expert choices (2-8 of 216 tokens on CPU over 8 draws, each then 15-30% off: another
    expert's output, not a kernel error; 0.020-0.044 over all tokens, 0.0052 over the rest). Tokens
    whose expert set differs from the oracle's are left out of the bound, and at most 10% may
    differ; a wrong kernel moves far more."""
    routes = record_routes(monkeypatch)
    layer = make_layer(layer_idx, fp8=False)
    weights = layer.hf_state_dict()
    batch, prompt, page = 3, 70, 64
    x = torch.randn(batch, prompt + 2, CFG.hidden_size, device="cuda").bfloat16()
    positions = torch.randint(0, 100000, (batch, 1), device="cuda") + torch.arange(prompt + 2, device="cuda")
    cache = torch.full((batch * 2 + 1, page, 1, CFG.kv_cache_dim), float("nan"), device="cuda").bfloat16()
    table = torch.randperm(batch * 2 + 1, device="cuda")[:batch * 2].view(batch, 2).int()
    lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    with torch.no_grad():
        expected, _ = decoder_layer(weights, CFG, layer_idx, x, positions)
        prefill = layer(x[:, :prompt], positions[:, :prompt])
        cached = layer(x[:, :prompt], positions[:, :prompt], kv_cache=cache, block_table=table, cache_seqlens=lens)
        step1 = layer(x[:, prompt:prompt + 1], positions[:, prompt:prompt + 1], kv_cache=cache, block_table=table,
                      cache_seqlens=lens + prompt)
        step2 = layer(x[:, prompt + 1:], positions[:, prompt + 1:], kv_cache=cache, block_table=table,
                      cache_seqlens=lens + prompt + 1)
    paged = torch.cat([cached, step1, step2], 1)
    same_prefill = torch.ones(batch, prompt, dtype=torch.bool, device="cuda")
    same_paged = torch.ones(batch, prompt + 2, dtype=torch.bool, device="cuda")
    if layer_idx >= CFG.first_k_dense_replace:
        want = routes["oracle"][0].view(batch, prompt + 2, -1)
        got_prefill, got_cached, got_step1, got_step2 = (r.view(batch, -1, want.shape[-1]) for r in routes["layer"])
        same_prefill = (got_prefill == want[:, :prompt]).all(-1)
        same_paged = (torch.cat([got_cached, got_step1, got_step2], 1) == want).all(-1)
        for same in (same_prefill, same_paged):
            assert same.float().mean() >= 0.9, f"{(~same).sum().item()} of {same.numel()} tokens routed elsewhere"
    assert rel_error_where(prefill, expected[:, :prompt], same_prefill) < 2e-2
    assert rel_error_where(paged, expected, same_paged) < 2e-2


def test_fp8_decode_step_in_a_cuda_graph():
    """The FP8 MoE layer's decode step has no host sync: captured once, replayed with new tokens
    and new cache_seqlens, it equals the eager step."""
    step, x, positions, lens = decode_step(make_layer(1, fp8=True, seed=1))
    replays_equal_eager(step, x, positions, lens, ([7, 1, 120, 160], [0, 63, 64, 190]))


def decode_step(layer):
    """(step, x, positions, lens): one decode token for each of 4 sequences of a bf16 paged cache
    (pages of 64); step() runs the layer on them, the others are its inputs to change."""
    batch, page, pages = 4, 64, 3
    cache = torch.randn(batch * pages, page, 1, CFG.kv_cache_dim, device="cuda").bfloat16()
    table = torch.arange(batch * pages, device="cuda").view(batch, pages).int()
    x = torch.randn(batch, 1, CFG.hidden_size, device="cuda").bfloat16()
    positions = torch.full((batch, 1), 100, device="cuda")
    lens = torch.tensor([5, 64, 100, 150], dtype=torch.int32, device="cuda")

    def step():
        with torch.no_grad():
            return layer(x, positions, kv_cache=cache, block_table=table, cache_seqlens=lens)

    return step, x, positions, lens


def test_fp8_decode_graph_follows_weight_updates():
    """A decode step captured in a CUDA graph reads the layer's weights and the copies derived from
    them (W_UK / W_UV, the GEMMs' block-major scales) where they are: after torch's load_state_dict,
    after writes through .data and refresh_derived_weights(), and after a load_hf_state_dict in the
    format the layer holds (written in place), a replay equals the eager step of the new weights."""
    layer, other = make_layer(1, fp8=True, seed=1), make_layer(1, fp8=True, seed=3)
    step, *_ = decode_step(layer)
    graph, out = captured(step)
    first = out.clone()
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    hf_weights = make_layer(1, fp8=False, seed=4).hf_state_dict(torch.float32)

    def restore_through_data():  # (no version counter moves)
        with torch.no_grad():
            for mine, theirs in zip(layer.state_dict().values(), original.values()):
                mine.data.copy_(theirs)
        layer.refresh_derived_weights()

    for update in (lambda: layer.load_state_dict(other.state_dict()), restore_through_data,
                   lambda: layer.load_hf_state_dict(hf_weights, fp8=True)):
        update()
        graph.replay()
        expected = step()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    assert rel_error(out, first) > 0.1  # (the weights did change)


def test_fp8_kv_cache_decode_step_in_a_cuda_graph():
    """V3 with an FP8 KV cache (float8_e4m3fn, kv_cache_scale): the decode step (quantizing write,
    flash_mla_with_kvcache with k_scale) captured once and replayed with new tokens and lengths
    equals the eager step; the default scale (None: a 1.0 made on the device) captures too."""
    layer = make_layer(0, fp8=False, seed=2)
    batch, page, pages = 4, 64, 3
    cache = torch.randn(batch * pages, page, 1, CFG.kv_cache_dim, device="cuda").to(torch.float8_e4m3fn)
    table = torch.arange(batch * pages, device="cuda").view(batch, pages).int()
    x = torch.randn(batch, 1, CFG.hidden_size, device="cuda").bfloat16()
    positions = torch.full((batch, 1), 100, device="cuda")
    lens = torch.tensor([5, 64, 100, 150], dtype=torch.int32, device="cuda")
    for scale in (torch.tensor([0.5], device="cuda"), None):
        def step():
            with torch.no_grad():
                return layer(x, positions, kv_cache=cache, block_table=table, cache_seqlens=lens,
                             kv_cache_scale=scale)

        replays_equal_eager(step, x, positions, lens, ([7, 1, 120, 160], [0, 63, 64, 190]))


def captured(step):
    """(graph, its output) of step() captured in a CUDA graph after two warm-up calls (absorbed
    weights, Triton compilation / autotuning)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def replays_equal_eager(step, x, positions, lens, new_lens_list):
    """Captures step() in a CUDA graph, then for each new lengths: new tokens at positions = lens,
    one replay, compared with the eager step on the same inputs."""
    graph, out = captured(step)
    for new_lens in new_lens_list:
        x.copy_(torch.randn_like(x))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        positions.copy_(lens[:, None].long())
        graph.replay()
        expected = step()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


# ---- DeepSeek-V3.2: the indexer's top-64 of 150-token sequences, V3.2's FP8 caches ----

CFG32 = DeepseekV3Config.deepseek_v32_671b(hidden_size=1024, intermediate_size=1024, moe_intermediate_size=256,
                                           num_attention_heads=16, num_key_value_heads=16, q_lora_rank=256,
                                           n_routed_experts=32, first_k_dense_replace=1, index_topk=64)


def make_v32_layer(layer_idx: int, fp8: bool, seed: int = 0, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    layer = DeepseekV3DecoderLayer(CFG32, layer_idx, dtype=dtype, device=device, fp8=fp8)
    sd = {}
    for name, t in layer.hf_state_dict(torch.float32).items():
        if name.endswith("norm.weight"):
            sd[name] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("norm.bias"):
            sd[name] = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            sd[name] = -0.05 * torch.rand(t.shape, generator=g)
        else:
            sd[name] = torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5
    layer.load_hf_state_dict(sd, fp8=fp8)
    return layer


def v32_caches(layer, batch, pages_per_seq, page=64):
    """NaN-poisoned (0xFF bytes) FP8 latent and indexer caches under a shuffled block table."""
    num_pages = batch * pages_per_seq + 1
    cache = torch.full((num_pages, page, 1, 656), 0xFF, dtype=torch.uint8, device="cuda")
    index_cache = torch.full((num_pages, page, 1, layer.self_attn.indexer.cache_width), 0xFF, dtype=torch.uint8,
                             device="cuda")
    table = torch.randperm(num_pages, device="cuda")[:batch * pages_per_seq].view(batch, pages_per_seq).int()
    return cache, index_cache, table


def replayed_on_cpu(layer, selected, x, positions):
    """The same weights in an fp32 CPU layer whose indexer is made to select `selected` (positions
    [B, S, k], -1 none): its attention block over all tokens of x, selection aside."""
    cpu = DeepseekV3DecoderLayer(CFG32, layer.layer_idx, dtype=torch.float32, fp8=False)
    cpu.load_hf_state_dict(layer.hf_state_dict(torch.float32), fp8=False)
    cpu.self_attn.indexer.select_new_tokens = lambda *args: selected.cpu()
    with torch.no_grad():
        return cpu.self_attn(cpu.input_layernorm(x.float().cpu()), positions.cpu())


def record(layer, name):
    calls, original = [], getattr(layer.self_attn.indexer, name)
    setattr(layer.self_attn.indexer, name, lambda *a: (calls.append(original(*a)), calls[-1])[1])
    return calls


def test_v32_prefill_and_fp8_paged_decode_attend_where_they_select():
    """FP8 indexer (Hadamard, fp8_mqa_logits / fp8_paged_mqa_logits) and the FP8 latent cache on the
    GPU: the attention block's outputs equal an fp32 one attending to the same selections (bf16
    rounding without a cache, FP8 latents with one); each query selects min(64, what it sees)."""
    layer = make_v32_layer(0, fp8=False)
    batch, prompt = 3, 150
    x = torch.randn(batch, prompt + 2, CFG32.hidden_size, device="cuda").bfloat16()
    positions = torch.randint(0, 100000, (batch, 1), device="cuda") + torch.arange(prompt + 2, device="cuda")
    prefill_calls, paged_calls = record(layer, "select_new_tokens"), record(layer, "select_paged")
    cache, index_cache, table = v32_caches(layer, batch, 3)
    lens = torch.zeros(batch, dtype=torch.int32, device="cuda")

    def attention(x, positions, **paged):
        return layer.self_attn(layer.input_layernorm(x), positions, **paged)

    with torch.no_grad():
        prefill = attention(x[:, :prompt], positions[:, :prompt])
        cached = [attention(x[:, :prompt], positions[:, :prompt], kv_cache=cache, index_cache=index_cache,
                            block_table=table, cache_seqlens=lens)]
        for t in (prompt, prompt + 1):
            cached.append(attention(x[:, t:t + 1], positions[:, t:t + 1], kv_cache=cache, index_cache=index_cache,
                                    block_table=table, cache_seqlens=lens + t))
    (selected,) = prefill_calls
    seen = torch.arange(1, prompt + 1, device="cuda").clamp(max=64)
    assert torch.equal((selected >= 0).sum(-1), seen.expand(batch, -1))
    assert rel_error(prefill, replayed_on_cpu(layer, selected, x[:, :prompt], positions[:, :prompt])) < 2e-2
    paged_selected = torch.cat(paged_calls, dim=1)
    assert paged_selected.shape == (batch, prompt + 2, 64)
    # e4m3 latents: ~2.5% rms rounding per value, in the scores and the values alike (3.9% measured
    # with the same test on CPU tensors); tests/test_models.py's FP8_TOL
    assert rel_error(torch.cat(cached, 1), replayed_on_cpu(layer, paged_selected, x, positions)) < 8e-2


def test_v32_fp8_decode_step_in_a_cuda_graph():
    """The V3.2 FP8 MoE layer's decode step (indexer logits over the whole block table, top-k,
    sparse decode over the FP8 latent cache) has no host sync: replayed with new tokens and
    lengths it equals the eager step."""
    layer = make_v32_layer(1, fp8=True, seed=2)
    batch = 4
    cache, index_cache, table = v32_caches(layer, batch, 4)
    # Finite contents of a realistic size (random bytes would put scales up to 1e33 into the FP8
    # latent cache: outputs near 1e35, whose RMSNorm overflowed to a zero MoE input): the latent
    # cache quantized from randn, the indexer's e4m3 bytes random with per-token scales near 1/448.
    latent = torch.randn(*cache.shape[:-1], 576, device="cuda")
    cache.view(torch.uint8).copy_(dskernels.quantize_sparse_kv_cache(latent).view(torch.uint8))
    page, dim = index_cache.shape[1], layer.self_attn.indexer.head_dim
    pages = index_cache.view(torch.uint8).view(index_cache.shape[0], -1)  # per page: e4m3 rows, then fp32 scales
    pages[:, :page * dim] = torch.randint(0, 120, (pages.shape[0], page * dim), device="cuda", dtype=torch.uint8)
    pages[:, page * dim:].view(torch.float32).copy_((1 + torch.rand(pages.shape[0], page, device="cuda")) / 448)
    x = torch.randn(batch, 1, CFG32.hidden_size, device="cuda").bfloat16()
    positions = torch.full((batch, 1), 100, device="cuda")
    lens = torch.tensor([5, 64, 100, 150], dtype=torch.int32, device="cuda")

    def step():
        with torch.no_grad():
            return layer(x, positions, kv_cache=cache, index_cache=index_cache, block_table=table, cache_seqlens=lens)

    replays_equal_eager(step, x, positions, lens, ([7, 1, 120, 160], [0, 63, 64, 250]))
