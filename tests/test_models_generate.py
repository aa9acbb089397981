"""A whole model stacked from DeepseekV3DecoderLayer as docs/models.md ("A whole model") builds it,
generating greedily through the paged latent cache, against transformers' DeepseekV3ForCausalLM /
DeepseekV32ForCausalLM generate() on the same random weights: the tokens and every step's logits.
Tiny widths (3 layers, the first dense, grouped routing, YaRN, q LoRA; V3.2: top-4 of up to 17
tokens), fp32. V3.2's FP8 indexer may rank near ties otherwise than transformers' float one, so its
model is checked against transformers attending where ours selected. Speculative decoding: drafts
verified in one step, the rejected tokens' cache entries left behind and rolled back over; drafts
by the MTP module (docs/models.md's recipe: checkpoint layer num_hidden_layers), with its own cache."""

import functools
import importlib.util

import pytest
import torch
from torch import nn

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer, Linear, RMSNorm

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

    def hidden(self, ids, positions, kv_caches, block_table, cache_seqlens, index_caches=None):
        h = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, kv_cache=kv_caches[i], block_table=block_table, cache_seqlens=cache_seqlens,
                      index_cache=None if index_caches is None else index_caches[i])
        return self.norm(h)

    def forward(self, *args, **kwargs):
        return self.lm_head(self.hidden(*args, **kwargs))


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


# ---- the MTP module (DeepSeek-V3's checkpoint layer num_hidden_layers) drafting for speculative decoding ----

class DeepseekV3MTP(nn.Module):
    """docs/models.md's MTP recipe, as written there (fp32 on CPU here)."""

    def __init__(self, hf_config, state_dict, dtype=torch.float32, device="cpu"):
        super().__init__()
        cfg = self.cfg = DeepseekV3Config.from_hf(hf_config)
        i, hidden = cfg.num_hidden_layers, cfg.hidden_size
        p = f"model.layers.{i}."

        def w(key, shared=None):  # embed_tokens / shared_head.head: the main model's where the file has none
            return state_dict[p + key if shared is None or p + key in state_dict else shared].to(device, dtype)
        self.embed_tokens = nn.Embedding.from_pretrained(w("embed_tokens.weight", "model.embed_tokens.weight"))
        self.enorm, self.hnorm, self.norm = (RMSNorm(hidden, cfg.rms_norm_eps, dtype, device) for _ in range(3))
        for norm, key in ((self.enorm, "enorm"), (self.hnorm, "hnorm"), (self.norm, "shared_head.norm")):
            norm.weight.copy_(w(key + ".weight"))
        self.eh_proj = Linear(2 * hidden, hidden, dtype=dtype, device=device)
        self.eh_proj.round_scale = cfg.fp8_round_scale
        self.eh_proj.set_weight(state_dict[p + "eh_proj.weight"], state_dict.get(p + "eh_proj.weight_scale_inv"),
                                dtype, fp8=None)  # FP8 (with its scales) or float, as the checkpoint holds it
        self.layer = DeepseekV3DecoderLayer(cfg, i, dtype=dtype, device=device)
        self.layer.load_hf_state_dict(state_dict)  # reads model.layers.{i}. only, skips the keys above
        self.head = nn.Linear(hidden, cfg.vocab_size, bias=False, dtype=dtype, device=device).requires_grad_(False)
        self.head.weight.copy_(w("shared_head.head.weight", "lm_head.weight"))

    def forward(self, ids, h, positions, kv_cache, block_table, cache_seqlens):
        """ids [B, S]: the token after each position of h [B, S, hidden] (the main model's last hidden
        states after its final norm, or this module's own output g for a chained draft) -> logits of
        the token after ids, and g (before shared_head.norm)."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(ids)), self.hnorm(h)], dim=-1))
        g = self.layer(x, positions, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens)
        return self.head(self.norm(g)), g


def mtp_checkpoint(hf, fp8_eh_proj=False, seed=1):
    """A whole checkpoint in DeepSeek-V3's naming: the main model's keys and the MTP module's under
    model.layers.{num_hidden_layers}. (per-expert names, embed_tokens and shared_head.head copies of
    the main model's, as the 671B checkpoint holds them). Random weights: the decoder layer's are a
    transformers DeepseekV3DecoderLayer's (returned: the oracle's), drawn as hf_causal_lm draws them.
    fp8_eh_proj: eh_proj as float8_e4m3fn + weight_scale_inv (in_features 2 * 64: one 128 block)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer as HFLayer

    from test_models import per_expert_names

    config, i = hf.config, hf.config.num_hidden_layers
    torch.manual_seed(seed)
    layer = HFLayer(config, i).float().eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
        layer.mlp.gate.e_score_correction_bias.copy_(-0.2 * torch.rand_like(layer.mlp.gate.e_score_correction_bias))
    hidden = config.hidden_size
    mtp = {"embed_tokens.weight": hf.model.embed_tokens.weight, "shared_head.head.weight": hf.lm_head.weight,
           "enorm.weight": 1 + 0.1 * torch.randn(hidden), "hnorm.weight": 1 + 0.1 * torch.randn(hidden),
           "shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden),
           "eh_proj.weight": torch.randn(hidden, 2 * hidden) * (2 * hidden) ** -0.5}
    if fp8_eh_proj:
        mtp["eh_proj.weight"], mtp["eh_proj.weight_scale_inv"] = dskernels.per_block_cast_to_fp8(mtp["eh_proj.weight"])
    mtp |= per_expert_names(layer.state_dict(), DeepseekV3Config.from_hf(config))
    state_dict = dict(hf.state_dict()) | {f"model.layers.{i}.{k}": v.detach().clone() for k, v in mtp.items()}
    return state_dict, layer


def mtp_oracle(state_dict, hf_layer, config, ids, h):
    """Plain PyTorch of the MTP formula over one sequence from scratch (causal, positions 0..S-1):
    logits = head(norm_s(layer(eh_proj @ [norm_e(embed(ids)) | norm_h(h)]))), each RMSNorm
    transformers' (fp32 mean of squares). An FP8 eh_proj: its dequantized weight times the rows
    cast as the layer casts them (python_ref's per-token 1x128 e4m3), summed in fp32, rounded to
    bf16 (the FP8 GEMM's output)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    import python_ref.fp8
    from dskernels.models.linear import dequantize_block_fp8

    p = f"model.layers.{config.num_hidden_layers}."

    def rms(x, key):
        return state_dict[p + key] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))
    x = torch.cat([rms(state_dict[p + "embed_tokens.weight"][ids], "enorm.weight"), rms(h, "hnorm.weight")], -1)
    weight = state_dict[p + "eh_proj.weight"]
    if weight.dtype == torch.float8_e4m3fn:
        weight = dequantize_block_fp8(weight, state_dict[p + "eh_proj.weight_scale_inv"])
        x_fp8, scale = python_ref.fp8.per_token_cast_to_fp8(x)
        x = (x_fp8.float().view(len(ids), -1, 128) * scale[..., None]).view(len(ids), -1)
        x = (x @ weight.T).bfloat16().float()
    else:
        x = x @ weight.T
    s, positions = len(ids), torch.arange(len(ids))[None]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    g = hf_layer(x[None], attention_mask=mask, position_ids=positions,
                 position_embeddings=DeepseekV3RotaryEmbedding(config)(x[None], positions))[0]
    return rms(g, "shared_head.norm.weight") @ state_dict[p + "shared_head.head.weight"].T


def speculate_with_mtp(model, mtp, budget, ks, seed, hints=None, page_size=4):
    """Greedy generation of PROMPTS by speculative decoding with the MTP module's drafts. Sequence
    b's main cache holds seq[:-1] (its last token pending) and the MTP cache the same number of
    pairs, slot i = (h_i, seq[i + 1]); the last pair's output drafts d1, and each further draft
    chains the module on its own output g at the next slot. A verify step feeds [pending, d1..dk]
    to the main model (s_q = k + 1), accepts the drafts up to the first that differs from its
    greedy token there, adds a + 1 to the main length; the MTP then rolls back to where its pairs
    were real (its chained slots are overwritten) and takes the a + 1 new pairs in one call. Both
    caches are NaN-poisoned, with their own block tables. hints (the greedy tokens per sequence):
    most drafts replaced by the right token (random weights draft almost nothing right), so that
    steps accept 0..k drafts and the MTP takes up to k + 1 pairs at once. Returns the tokens and
    logits per sequence (and all its accepted tokens), the accepted and rejected draft counts and
    every MTP call (b, lens, real, ids, h, logits): real, the main model's length then (the MTP
    slots below it must hold real pairs)."""
    batch = len(PROMPTS)
    max_pages = -(-(max(map(len, PROMPTS)) + budget + max(ks) + 1) // page_size)
    num_pages = batch * max_pages + 2
    kv_caches, _ = poisoned_caches(model, num_pages, page_size)
    mtp_cache = torch.full((num_pages, page_size, 1, model.cfg.kv_cache_dim), float("nan"))
    g = torch.Generator().manual_seed(seed)
    block_table, mtp_table = (torch.randperm(num_pages, generator=g)[:batch * max_pages].view(batch, max_pages)
                              .to(torch.int32) for _ in range(2))
    lens = torch.zeros(batch, dtype=torch.int32)
    tokens, step_logits, drafts, calls = [], [], [None] * batch, []
    accepted_total = rejected_total = 0

    def draft(b, j, logits):  # the j-th draft of sequence b's step (predicting its token len + j)
        if hints is not None and (step + b + j) % 4:
            return (hints[b] + [0] * budget)[len(tokens[b]) + j]
        return int(logits.argmax())

    def mtp_call(rows, ids, h, lens_rows):
        logits, g = mtp(ids, h, lens_rows.long()[:, None] + torch.arange(ids.shape[1]), mtp_cache, mtp_table[rows],
                        lens_rows)
        calls.extend((b, int(lens_rows[i]), min(int(lens[b]), int(lens_rows[i])), ids[i].tolist(), h[i], logits[i])
                     for i, b in enumerate(rows))
        return logits, g

    for b, prompt in enumerate(PROMPTS):
        n = len(prompt)
        h = model.hidden(torch.tensor(prompt)[None], torch.arange(n)[None], kv_caches, block_table[b:b + 1],
                         lens[b:b + 1])
        logits = model.lm_head(h[0, -1])
        tokens.append([int(logits.argmax())])
        step_logits.append([logits])
        lens[b] = n
        mtp_logits, g = mtp_call([b], torch.tensor([prompt[1:] + tokens[b][:1]]), h, lens[b:b + 1] * 0)
        drafts[b] = (mtp_logits[0, -1], g[:, -1:])
    live, step = list(range(batch)), 0
    while live:
        k = ks[step % len(ks)]
        step += 1
        proposals = {b: [draft(b, 0, drafts[b][0])] for b in live}
        for j in range(1, k):  # chained drafts: the module on its own output, one slot further each
            ids = torch.tensor([[proposals[b][-1]] for b in live])
            mtp_logits, g = mtp_call(live, ids, torch.cat([drafts[b][1] for b in live]), lens[live] + j - 1)
            for i, b in enumerate(live):
                proposals[b].append(draft(b, j, mtp_logits[i, 0]))
                drafts[b] = (drafts[b][0], g[i:i + 1])
        ids = torch.tensor([[tokens[b][-1]] + proposals[b][:k] for b in live])
        positions = lens[live].long()[:, None] + torch.arange(k + 1)
        h = model.hidden(ids, positions, kv_caches, block_table[live], lens[live])
        logits = model.lm_head(h)
        for i, b in enumerate(live):
            greedy = logits[i].argmax(-1).tolist()
            a = 0
            while a < k and proposals[b][a] == greedy[a]:
                a += 1
            accepted_total, rejected_total = accepted_total + a, rejected_total + k - a
            tokens[b] += greedy[:a + 1]
            step_logits[b] += list(logits[i, :a + 1])
            # the MTP's a + 1 real pairs, from its rolled-back length (the main one's before this step)
            mtp_logits, g = mtp_call([b], torch.tensor([tokens[b][-a - 1:]]), h[i:i + 1, :a + 1], lens[b:b + 1])
            lens[b] += a + 1
            drafts[b] = (mtp_logits[0, -1], g[:, -1:])
        live = [b for b in live if len(tokens[b]) < budget]
    return ([t[:budget] for t in tokens], [torch.stack(s[:budget]) for s in step_logits], tokens, accepted_total,
            rejected_total, calls)


def mtp_history_logits(calls, state_dict, hf, hf_layer, sequences):
    """Per MTP call, mtp_oracle's logits of its rows over the pairs that call's cache held below its
    length (the last call that wrote each slot: rolled back over chained and rejected ones) plus its
    own: what a from-scratch run of the module over that history gives. The slots below the main
    model's length must hold the real pairs of sequences[b] (checked): (transformers' last hidden
    state after the final norm at i, the token at i + 1)."""
    history, expected, real_pairs = {}, [], {}
    with torch.no_grad():
        for b, seq in enumerate(sequences):
            real_pairs[b] = (seq[1:], hf.model(torch.tensor([seq])).last_hidden_state[0])
        for b, lens, real, ids, h, _ in calls:
            history[b] = history.get(b, [])[:lens] + list(zip(ids, h))
            assert [t for t, _ in history[b][:real]] == real_pairs[b][0][:real], (b, lens)
            if real:
                torch.testing.assert_close(torch.stack([x for _, x in history[b][:real]]), real_pairs[b][1][:real],
                                           atol=TOL, rtol=TOL)
            tokens, hidden = torch.tensor([t for t, _ in history[b]]), torch.stack([x for _, x in history[b]])
            expected.append(mtp_oracle(state_dict, hf_layer, hf.config, tokens, hidden)[lens:])
    return expected


@pytest.mark.parametrize("fp8_eh_proj", [False, True], ids=["float", "fp8_eh_proj"])
def test_mtp_layer_loads_from_the_whole_checkpoint(fp8_eh_proj):
    """DeepseekV3DecoderLayer(cfg, num_hidden_layers) takes the MTP module's decoder layer out of a
    whole checkpoint in DeepSeek-V3's naming, strictly: the module's own keys beside it (embed_tokens,
    enorm, hnorm, eh_proj with its FP8 scales, shared_head) are skipped, not unexpected; the recipe's
    module loads them (an FP8 eh_proj kept FP8)."""
    hf = hf_reference("v3")[0]
    state_dict, hf_layer = mtp_checkpoint(hf, fp8_eh_proj)
    cfg, i = DeepseekV3Config.from_hf(hf.config), hf.config.num_hidden_layers
    assert any(k.startswith(f"model.layers.{i}.eh_proj.") for k in state_dict) and cfg.is_moe_layer(i)
    layer = DeepseekV3DecoderLayer(cfg, i, dtype=torch.float32)
    assert layer.load_hf_state_dict(state_dict) == ([], [])
    torch.testing.assert_close(layer.mlp.experts.gate_up_proj, hf_layer.mlp.experts.gate_up_proj, atol=0, rtol=0)
    torch.testing.assert_close(layer.self_attn.kv_b_proj.weight, hf_layer.self_attn.kv_b_proj.weight, atol=0, rtol=0)
    mtp = DeepseekV3MTP(hf.config, state_dict)
    p = f"model.layers.{i}."
    assert mtp.eh_proj.is_fp8 == fp8_eh_proj
    if fp8_eh_proj:
        assert torch.equal(mtp.eh_proj.weight.view(torch.uint8), state_dict[p + "eh_proj.weight"].view(torch.uint8))
        assert torch.equal(mtp.eh_proj.weight_scale_inv, state_dict[p + "eh_proj.weight_scale_inv"])
    else:
        assert torch.equal(mtp.eh_proj.weight, state_dict[p + "eh_proj.weight"])
    for got, key in ((mtp.enorm, "enorm"), (mtp.hnorm, "hnorm"), (mtp.norm, "shared_head.norm"),
                     (mtp.head, "shared_head.head"), (mtp.embed_tokens, "embed_tokens")):
        assert torch.equal(got.weight, state_dict[p + key + ".weight"]), key
    # a checkpoint without the module's copies of the shared weights: the main model's
    copies = (p + "embed_tokens.weight", p + "shared_head.head.weight")
    shared = {k: v for k, v in state_dict.items() if k not in copies}
    mtp = DeepseekV3MTP(hf.config, shared)
    assert torch.equal(mtp.head.weight, hf.lm_head.weight) and torch.equal(mtp.embed_tokens.weight,
                                                                        hf.model.embed_tokens.weight)


@pytest.mark.parametrize("fp8_eh_proj", [False, True], ids=["float", "fp8_eh_proj"])
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_mtp_module_matches_plain_pytorch(backend, fp8_eh_proj):
    """The recipe's MTP module, from scratch and through its paged cache (a 3-token chunk, then 2,
    then 1: MTP-style causal steps), against mtp_oracle (plain PyTorch and transformers' layer) on
    the same pairs, fp32 (an FP8 eh_proj: the oracle casts its input rows as the GEMM does)."""
    hf = hf_reference("v3")[0]
    state_dict, hf_layer = mtp_checkpoint(hf, fp8_eh_proj)
    mtp = DeepseekV3MTP(hf.config, state_dict)
    torch.manual_seed(4)
    n, hidden = 6, hf.config.hidden_size
    ids, h = torch.randint(0, hf.config.vocab_size, (n,)), torch.randn(n, hidden)
    expected = mtp_oracle(state_dict, hf_layer, hf.config, ids, h)
    cache = torch.full((5, 2, 1, mtp.cfg.kv_cache_dim), float("nan"))
    table = torch.tensor([[3, 0, 4, 1]], dtype=torch.int32)
    with torch.inference_mode(), forced_backend(backend):
        logits, _ = mtp(ids[None], h[None], torch.arange(n)[None], None, None, None)
        torch.testing.assert_close(logits[0], expected, atol=TOL, rtol=TOL)
        for start, end in ((0, 3), (3, 5), (5, 6)):
            logits, _ = mtp(ids[None, start:end], h[None, start:end], torch.arange(start, end)[None], cache, table,
                            torch.tensor([start], dtype=torch.int32))
            torch.testing.assert_close(logits[0], expected[start:end], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("fp8_eh_proj,hinted,backend,budget", [
    (False, False, "ref", 10), (False, True, "ref", 10), (True, True, "ref", 10), (False, True, "triton", 4)],
    ids=["float-mtp-ref", "float-hinted-ref", "fp8_eh_proj-hinted-ref", "float-hinted-triton"])
def test_speculative_decoding_with_mtp_drafts(fp8_eh_proj, hinted, backend, budget):
    """Greedy speculative decoding with the MTP module drafting k = 3, 1, 2 tokens (chained on its own
    output), the main model verifying k + 1 at once and both caches rolled back over what was not
    accepted: the tokens of plain greedy decoding (transformers' generate, as our plain decoding
    gives them), logits within 1e-4, and every MTP call's logits equal to the module run from scratch
    over the pairs its cache should hold (so no rolled-back entry of the MTP cache is read either).
    Random weights draft almost nothing right; hinted: most drafts replaced by the right token, so
    steps accept 0..k drafts (the MTP then takes up to k + 1 pairs in one call)."""
    hf, reference = hf_reference("v3")
    state_dict, hf_layer = mtp_checkpoint(hf, fp8_eh_proj)
    model, mtp = DeepseekV3Model(hf.config, state_dict), DeepseekV3MTP(hf.config, state_dict)
    hints = [tokens for tokens, _ in reference] if hinted else None
    with torch.inference_mode(), forced_backend(backend):
        tokens, logits, generated, accepted, rejected, calls = speculate_with_mtp(model, mtp, budget, (3, 1, 2),
                                                                                  seed=11, hints=hints)
    assert rejected and (accepted or not hinted), (accepted, rejected)
    if hinted:
        assert max(len(ids) for _, lens, _, ids, _, _ in calls if lens) == 4  # a step that accepted all 3 drafts
    for b in range(len(PROMPTS)):
        assert tokens[b] == reference[b][0][:budget], b
        torch.testing.assert_close(logits[b], reference[b][1][:budget], atol=TOL, rtol=TOL)
    sequences = [prompt + new for prompt, new in zip(PROMPTS, generated)]
    for (b, lens, *_, got), expected in zip(calls, mtp_history_logits(calls, state_dict, hf, hf_layer, sequences)):
        torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL, msg=lambda m: f"{b} {lens}: {m}")


def test_fp8_mtp_layer_loads_from_the_whole_checkpoint():
    """The same at widths where every projection is FP8 (DeepseekV3Config.tiny: multiples of 128), as
    the 671B checkpoint stores layer 61: its weights FP8 with 128x128 scales, kept FP8; the module's
    FP8 eh_proj scales skipped by the layer and taken by the recipe's Linear."""
    from test_models import fp8_checkpoint, hf_config, make_reference, per_expert_names

    cfg = DeepseekV3Config.tiny()
    i, hidden = cfg.num_hidden_layers, cfg.hidden_size
    fp8, _ = fp8_checkpoint(per_expert_names(make_reference(cfg, i, seed=2).state_dict(), cfg))
    eh_proj = dskernels.per_block_cast_to_fp8(torch.randn(hidden, 2 * hidden) * (2 * hidden) ** -0.5)
    mtp_keys = {"eh_proj.weight": eh_proj[0], "eh_proj.weight_scale_inv": eh_proj[1],
                "enorm.weight": torch.ones(hidden), "hnorm.weight": torch.ones(hidden),
                "shared_head.norm.weight": torch.ones(hidden),
                "shared_head.head.weight": torch.randn(cfg.vocab_size, hidden),
                "embed_tokens.weight": torch.randn(cfg.vocab_size, hidden)}
    state_dict = {f"model.layers.{i}.{k}": v for k, v in (fp8 | mtp_keys).items()}
    state_dict |= {"model.layers.0.input_layernorm.weight": torch.ones(hidden),
                   "model.embed_tokens.weight": torch.ones(1), "model.norm.weight": torch.ones(1),
                   "lm_head.weight": torch.ones(1)}
    layer = DeepseekV3DecoderLayer(cfg, i, dtype=torch.bfloat16)
    assert layer.load_hf_state_dict(state_dict) == ([], []) and layer.is_moe
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        module = getattr(layer.self_attn, name)
        assert module.is_fp8 and torch.equal(module.weight.view(torch.uint8),
                                             fp8[f"self_attn.{name}.weight"].view(torch.uint8)), name
    assert layer.mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    mtp = DeepseekV3MTP(hf_config(cfg), state_dict, dtype=torch.bfloat16)
    assert mtp.eh_proj.is_fp8 and torch.equal(mtp.eh_proj.weight_scale_inv, eh_proj[1])
