"""A whole model stacked from DeepseekV3DecoderLayer as docs/models.md ("A whole model") builds it,
generating greedily through the paged latent cache, against transformers' DeepseekV3ForCausalLM /
DeepseekV32ForCausalLM generate() on the same random weights: the tokens and every step's logits.
Tiny widths (3 layers, the first dense, grouped routing, YaRN, q LoRA; V3.2: top-4 of up to 17
tokens), fp32. V3.2's FP8 indexer may rank near ties otherwise than transformers' float one, so its
model is checked against transformers attending where ours selected. Speculative decoding: drafts
verified in one step, the rejected tokens' cache entries left behind and rolled back over."""

import functools
import importlib.util

import pytest
import torch
from torch import nn

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer, RMSNorm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers (pip install -r requirements-dev.txt)")

# fp32: one layer matches transformers within 1e-4 (tests/test_models.py); three measured ~4e-6 on the
# logits, against greedy margins of at least 0.05 (V3.2: 0.039) between the two best tokens on these weights
TOL = 1e-4
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [60, 61, 62, 63, 64]]
NEW_TOKENS = 10


class DeepseekV3Model(nn.Module):
    """docs/models.md's recipe, as written there (fp32 on CPU here)."""

    def __init__(self, hf_config, state_dict, dtype=torch.float32, device="cpu", index_fp8=True):
        super().__init__()
        cfg = self.cfg = DeepseekV3Config.from_hf(hf_config)
        w = lambda key: state_dict[key].to(device, dtype)  # noqa: E731
        self.embed_tokens = nn.Embedding.from_pretrained(w("model.embed_tokens.weight"))
        self.layers = nn.ModuleList()
        v32 = {"index_fp8": index_fp8} if cfg.index_topk else {}
        for i in range(cfg.num_hidden_layers):
            self.layers.append(DeepseekV3DecoderLayer(cfg, i, dtype=dtype, device=device, **v32))
            self.layers[i].load_hf_state_dict(state_dict)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.norm.weight.copy_(w("model.norm.weight"))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype,
                                 device=device).requires_grad_(False)
        self.lm_head.weight.copy_(w("lm_head.weight"))

    def forward(self, ids, positions, kv_caches, block_table, cache_seqlens, index_caches=None):
        h = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, kv_cache=kv_caches[i], block_table=block_table, cache_seqlens=cache_seqlens,
                      index_cache=None if index_caches is None else index_caches[i])
        return self.lm_head(self.norm(h))


def poisoned_caches(model, num_pages, page_size):
    """One NaN-filled latent cache per layer and, for V3.2, one indexer key cache per layer (the FP8
    indexer's uint8 rows: 0xFF is NaN in e4m3 and fp32 alike), as docs/models.md allocates them."""
    cfg, n = model.cfg, model.cfg.num_hidden_layers
    kv_caches = torch.full((n, num_pages, page_size, 1, cfg.kv_cache_dim), float("nan"))
    if not cfg.index_topk:
        return kv_caches, None
    if model.layers[0].self_attn.indexer.fp8:
        return kv_caches, torch.full((n, num_pages, page_size, 1, cfg.index_head_dim + 4), 0xFF, dtype=torch.uint8)
    return kv_caches, torch.full((n, num_pages, page_size, 1, cfg.index_head_dim), float("nan"))


def hf_causal_lm(arch="v3", seed=0):
    """transformers' model: 3 layers (one dense, two MoE with 8 experts in 4 groups), YaRN, q LoRA,
    random weights (norms around 1, a negative score bias: the router's groups and bias matter).
    arch "v32": DeepSeek-V3.2, each token attending to the top 4 its indexer picks (16 heads of 32:
    with few heads exact ties at score 0 decide the selection, see tests/test_models_v32.py)."""
    import transformers

    v32 = dict(index_topk=4, index_n_heads=16, index_head_dim=32) if arch == "v32" else {}
    config = getattr(transformers, "DeepseekV32Config" if v32 else "DeepseekV3Config")(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        pad_token_id=0, bos_token_id=None, eos_token_id=None, **v32)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, "DeepseekV32ForCausalLM" if v32 else "DeepseekV3ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.bias"):  # the indexer's k_norm (a LayerNorm)
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:  # (the embedding too: unit rows, as the layers' inputs elsewhere in the tests)
                p.copy_(torch.randn_like(p) * (1 if "embed" in name else p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(-0.2 * torch.rand_like(b))
    return model


@pytest.fixture(scope="module", params=["v3", "v32"])
def hf_and_reference(request):
    return hf_reference(request.param)


@functools.lru_cache
def hf_reference(arch):
    """The HF model and, per prompt alone, its greedy tokens and logits (NEW_TOKENS new tokens)."""
    hf = hf_causal_lm(arch)
    reference = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
            reference.append((out.sequences[0, len(prompt):].tolist(), torch.stack([lg[0] for lg in out.logits])))
    return hf, reference


def generate(model, budgets, page_size=4):
    """Greedy generation through NaN-poisoned paged caches: prompt 0 prefilled alone in two chunks,
    prompts 1 and 2 together right-padded to a common length, then decode steps of the live sequences
    (sequence b stops after budgets[b] tokens). Returns each sequence's tokens and logits, and per
    model call the sequences of its rows and their first positions (the order of the layers' calls)."""
    batch = len(PROMPTS)
    max_pages = -(-max(len(p) + n for p, n in zip(PROMPTS, budgets)) // page_size)
    num_pages = batch * max_pages + 2
    kv_caches, index_caches = poisoned_caches(model, num_pages, page_size)
    calls = []

    def model_call(ids, positions, rows, lens):
        calls.append((rows, lens.tolist()))
        return model(ids, positions, kv_caches, block_table[rows], lens, index_caches)
    g = torch.Generator().manual_seed(3)
    block_table = torch.randperm(num_pages, generator=g)[:batch * max_pages].view(batch, max_pages).to(torch.int32)
    lens = torch.zeros(batch, dtype=torch.int32)
    last = [None] * batch
    ids = torch.tensor(PROMPTS[0])
    for start, end in ((0, 3), (3, len(ids))):  # chunked prefill: the second chunk sees the first in the cache
        logits = model_call(ids[None, start:end], torch.arange(start, end)[None], [0], lens[:1])
        lens[0] += end - start
    last[0] = logits[0, -1]
    rows = [1, 2]  # right-padded: each sequence's padding is overwritten by its own next tokens
    n = max(len(PROMPTS[b]) for b in rows)
    ids = torch.tensor([PROMPTS[b] + [0] * (n - len(PROMPTS[b])) for b in rows])
    logits = model_call(ids, torch.arange(n).expand(len(rows), n), rows, lens[rows])
    for i, b in enumerate(rows):
        last[b] = logits[i, len(PROMPTS[b]) - 1]
        lens[b] = len(PROMPTS[b])
    tokens, step_logits = [[] for _ in range(batch)], [[] for _ in range(batch)]
    live = list(range(batch))
    while live:
        for b in live:
            step_logits[b].append(last[b])
            tokens[b].append(int(last[b].argmax()))
        live = [b for b in live if len(tokens[b]) < budgets[b]]  # finished sequences leave the batch
        if not live:
            break
        next_ids = torch.tensor([tokens[b][-1] for b in live])
        logits = model_call(next_ids[:, None], lens[live].long()[:, None], live, lens[live])
        lens[live] += 1
        for i, b in enumerate(live):
            last[b] = logits[i, 0]
    return tokens, [torch.stack(s) for s in step_logits], calls


def forced_backend(name):
    if name not in dskernels.available_backends():
        pytest.skip(f"backend {name!r} is not available here")
    return dskernels.backend(name)


@pytest.mark.parametrize("backend,budgets", [("ref", (10, 4, 7)), ("triton", (4, 2, 3))])
def test_greedy_generation_matches_transformers(hf_and_reference, backend, budgets):
    """V3, and V3.2 with the float indexer (transformers' math: the same selections, so the same logits)."""
    hf, reference = hf_and_reference
    model = DeepseekV3Model(hf.config, hf.state_dict(), index_fp8=False)
    with torch.inference_mode(), forced_backend(backend):
        tokens, logits, _ = generate(model, budgets)
    for b, n in enumerate(budgets):
        expected_tokens, expected_logits = reference[b]
        assert tokens[b] == expected_tokens[:n], b
        torch.testing.assert_close(logits[b], expected_logits[:n], atol=TOL, rtol=TOL)


# ---- V3.2's FP8 indexer: where it may rank near ties otherwise, transformers attends where it selected ----

def record_selections(model):
    """Wraps every layer's indexer selection (select_new_tokens / select_paged): their outputs [B, S, k]
    in call order (one per layer per model call)."""
    calls = []
    for layer in model.layers:
        indexer = layer.self_attn.indexer
        for name in ("select_new_tokens", "select_paged"):
            def recorded(*args, _original=getattr(indexer, name), **kwargs):
                calls.append(_original(*args, **kwargs))
                return calls[-1]
            setattr(indexer, name, recorded)
    return calls


def per_position(selections, calls, lengths, num_layers):
    """record_selections' outputs of generate()'s model calls -> per sequence per layer [n_b, k]: the
    selection of each position, from the last call that computed it (a right-padded prefill computed
    positions past a short prompt that decode steps computed again)."""
    out = [[[None] * n for _ in range(num_layers)] for n in lengths]
    for c, (rows, starts) in enumerate(calls):
        for layer in range(num_layers):
            selected = selections[c * num_layers + layer]
            for i, b in enumerate(rows):
                for j in range(selected.shape[1]):
                    if starts[i] + j < lengths[b]:
                        out[b][layer][starts[i] + j] = selected[i, j]
    return [[torch.stack(rows) for rows in layers] for layers in out]


def hf_attending_where(hf, ids, selected):
    """transformers' logits over ids [T] (no cache) with layer l's indexer returning selected[l] [T, k]
    (-1: a repeat of a selected position), and per layer the exact scores [T, T] of its own float
    indexer with the bound e4m3 rounding of the rotated q and k puts on the FP8 scores
    (tests/test_models_v32.py: sum_h |w_h| (2 * 2**-4 + 2**-8) sum_d |q_hd k_d|, rotated)."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    from dskernels.models.indexer import hadamard_matrix

    scores = []

    def attend(indexer, chosen):
        def forward(hidden_states, q_resid, position_embeddings, *args, **kwargs):
            b, s, _ = hidden_states.shape
            r, heads, dim = indexer.qk_rope_head_dim, indexer.n_heads, indexer.head_dim
            q = indexer.wq_b(q_resid).view(b, s, heads, dim)
            k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], *position_embeddings, unsqueeze_dim=2)
            q = torch.cat([q_rot, q[..., r:]], -1)[0].double()
            k = torch.cat([k_rot, k[..., r:]], -1)[0, :, 0].double()
            w = indexer.weights_proj(hidden_states)[0].double() * heads ** -0.5 * dim ** -0.5
            exact = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", q, k).clamp(min=0), w)
            rotation = hadamard_matrix(dim).double()
            bound = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", (q @ rotation).abs(), (k @ rotation).abs()),
                                 w.abs()) * (2 * 2 ** -4 + 2 ** -8) + 1e-6
            scores.append((exact, bound))
            return torch.where(chosen >= 0, chosen, chosen.max(-1, keepdim=True).values)[None]
        return forward

    try:
        for layer, chosen in zip(hf.model.layers, selected):
            layer.self_attn.indexer.forward = attend(layer.self_attn.indexer, chosen)
        with torch.no_grad():
            logits = hf(torch.tensor(ids)[None], use_cache=False).logits[0]
    finally:
        for layer in hf.model.layers:
            layer.self_attn.indexer.__dict__.pop("forward", None)
    return logits, scores


@pytest.mark.parametrize("backend,budgets", [("ref", (10, 4, 7)), ("triton", (4, 2, 3))])
def test_fp8_indexer_generation_attends_where_it_selects(backend, budgets):
    """The FP8 indexer (DeepSeek's) ranks two tokens whose scores are within FP8 rounding either way,
    so its tokens may leave transformers' (docs/models.md, V3.2's accuracy). Through the per-layer
    FP8 key caches: every selection equals our no-cache prefill's over the same history (the cached
    keys are the ones it casts), holds top-k of the positions each query sees, differs from the exact
    top-k only where e4m3's bound allows, and transformers attending there gives our logits (1e-4)."""
    hf = hf_reference("v32")[0]
    model = DeepseekV3Model(hf.config, hf.state_dict(), index_fp8=True)
    selections = record_selections(model)
    with torch.inference_mode(), forced_backend(backend):
        tokens, logits, calls = generate(model, budgets)
        histories = [prompt + generated[:-1] for prompt, generated in zip(PROMPTS, tokens)]
        paged = per_position(selections, calls, [len(h) for h in histories], len(model.layers))
        del selections[:]
        n = max(len(h) for h in histories)  # right-padded: causal, so the padding changes no selection before it
        model(torch.tensor([h + [0] * (n - len(h)) for h in histories]), torch.arange(n).expand(len(histories), n),
              [None] * len(model.layers), None, None)
        from_scratch = [[s[b, :len(h)] for s in selections] for b, h in enumerate(histories)]
    k = model.cfg.index_topk
    for b, ids in enumerate(histories):
        n = len(ids)
        hf_logits, scores = hf_attending_where(hf, ids, paged[b])
        torch.testing.assert_close(logits[b], hf_logits[len(PROMPTS[b]) - 1:], atol=TOL, rtol=TOL)
        seen = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        for layer, (selected, (exact, bound)) in enumerate(zip(paged[b], scores)):
            picked, again = (torch.zeros(n, n + 1, dtype=torch.bool).scatter_(1, s.long() % (n + 1), True)[:, :n]
                             for s in (selected, from_scratch[b][layer]))  # (-1 -> column n, dropped)
            assert torch.equal(picked, again), (b, layer)
            assert torch.equal(picked.sum(-1), seen.sum(-1).clamp(max=k)) and not (picked & ~seen).any(), (b, layer)
            # a picked position's exact score may trail an unpicked one's by at most their two bounds
            worst = torch.where(picked, exact + bound, float("inf")).min(-1).values
            beaten = torch.where(seen & ~picked, exact - bound, float("-inf")).max(-1).values
            assert (worst >= beaten).all(), (b, layer)


# ---- speculative decoding: a verify step of s_q = k + 1, then the cache's length rolled back ----

def speculate(model, drafts, budget, ks, seed, page_size=4):
    """Greedy generation of PROMPTS as one batch by speculative (MTP-style) decoding, through
    NaN-poisoned caches. Each step feeds every live sequence's pending token and k = ks[step] drafts
    (drafts[b]'s next tokens, one of them made wrong at a place that varies, or none) at positions
    lens[b] .. lens[b] + k; the sequence accepts its drafts up to the first that differs from the
    model's greedy token there, takes that token as the next pending one, and its length moves past
    the accepted tokens only: the rejected ones' latents and indexer keys stay in the caches past
    the length until later steps overwrite them (a shorter step leaves some for several steps).
    Returns each sequence's first `budget` tokens and their logits."""
    batch, vocab = len(PROMPTS), model.cfg.vocab_size
    max_pages = -(-(max(map(len, PROMPTS)) + budget + max(ks)) // page_size)
    num_pages = batch * max_pages + 2
    kv_caches, index_caches = poisoned_caches(model, num_pages, page_size)
    block_table = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))[:batch * max_pages]
    block_table = block_table.view(batch, max_pages).to(torch.int32)
    lens = torch.zeros(batch, dtype=torch.int32)
    tokens, step_logits = [], []
    for b, prompt in enumerate(PROMPTS):
        logits = model(torch.tensor(prompt)[None], torch.arange(len(prompt))[None], kv_caches, block_table[b:b + 1],
                       lens[b:b + 1], index_caches)
        lens[b] = len(prompt)
        tokens.append([int(logits[0, -1].argmax())])
        step_logits.append([logits[0, -1]])
    live, step, rejected, outlived = list(range(batch)), 0, 0, 0
    while live:
        k = ks[step % len(ks)]
        step += 1
        proposals = []
        for b in live:
            proposal = (drafts[b] + [0] * budget)[len(tokens[b]):len(tokens[b]) + k]
            wrong = (2 * step + b) % (k + 1)  # k: all k drafts right
            if wrong < k:
                proposal[wrong] = (proposal[wrong] + 1) % vocab
            proposals.append(proposal)
        ids = torch.tensor([[tokens[b][-1]] + d for b, d in zip(live, proposals)])
        positions = lens[live].long()[:, None] + torch.arange(k + 1)
        logits = model(ids, positions, kv_caches, block_table[live], lens[live], index_caches)
        for i, b in enumerate(live):
            greedy = logits[i].argmax(-1).tolist()
            accepted = 0
            while accepted < k and proposals[i][accepted] == greedy[accepted]:
                accepted += 1
            rejected += k - accepted
            outlived += accepted + 1 + ks[step % len(ks)] < k  # stale entries past the next step's tokens
            tokens[b] += greedy[:accepted + 1]
            step_logits[b] += list(logits[i, :accepted + 1])
            lens[b] += accepted + 1  # the rejected drafts' cache entries stay, past the length
        live = [b for b in live if len(tokens[b]) < budget]
    assert rejected and outlived, (rejected, outlived)
    return [t[:budget] for t in tokens], [torch.stack(s[:budget]) for s in step_logits]


def check_selections_within_length(model):
    """Wraps every layer's select_paged: no query selects a position past what it sees, cache_seqlens[b] + j."""
    for layer in model.layers:
        indexer = layer.self_attn.indexer

        def checked(*args, _original=indexer.select_paged, **kwargs):
            selected = _original(*args, **kwargs)
            lens = args[7].long()[:, None, None]
            assert (selected < lens + torch.arange(1, selected.shape[1] + 1)[:, None]).all()
            return selected
        indexer.select_paged = checked


@pytest.mark.parametrize("arch,index_fp8,backend,budget", [
    ("v3", False, "ref", 10), ("v3", False, "triton", 5), ("v32", False, "ref", 10), ("v32", False, "triton", 5),
    ("v32", True, "ref", 10), ("v32", True, "triton", 5)], ids=str)
def test_speculative_decoding_rolls_back_rejected_tokens(arch, index_fp8, backend, budget):
    """Drafts verified k + 1 tokens at a time (k = 3, 1, 2: rejected entries outlive the next step),
    each accepted token's logits equal a from-scratch run over the accepted history: transformers'
    generate (float indexer: the same tokens), or, with the FP8 indexer, our model without a cache
    (the same FP8 casts of the same keys) over the tokens it chose. No stale entry is read: it would
    move the logits (a rejected draft's latent is another token's), and the V3.2 indexer selects
    nothing past a query's length."""
    hf, reference = hf_reference(arch)
    model = DeepseekV3Model(hf.config, hf.state_dict(), index_fp8=index_fp8)
    if arch == "v32":
        check_selections_within_length(model)
    drafts = [tokens for tokens, _ in reference]
    with torch.inference_mode(), forced_backend(backend):
        tokens, logits = speculate(model, drafts, budget, ks=(3, 1, 2), seed=11)
        if index_fp8:  # our model without a cache over each history, right-padded (causal)
            histories = [prompt + generated[:-1] for prompt, generated in zip(PROMPTS, tokens)]
            n = max(map(len, histories))
            again = model(torch.tensor([h + [0] * (n - len(h)) for h in histories]),
                          torch.arange(n).expand(len(histories), n), [None] * len(model.layers), None, None)
            expected = [again[b, len(p) - 1:len(h)] for b, (p, h) in enumerate(zip(PROMPTS, histories))]
    for b in range(len(PROMPTS)):
        if not index_fp8:
            assert tokens[b] == reference[b][0][:budget], b
            expected_logits = reference[b][1][:budget]
        else:
            expected_logits = expected[b]
        torch.testing.assert_close(logits[b], expected_logits, atol=TOL, rtol=TOL)
