"""A whole model stacked from DeepseekV3DecoderLayer as docs/models.md ("A whole model") builds it,
generating greedily through the paged latent cache, against transformers' DeepseekV3ForCausalLM
generate() on the same random weights: the tokens and every step's logits. Tiny widths (3 layers,
the first dense, grouped routing, YaRN, q LoRA), fp32."""

import importlib.util

import pytest
import torch
from torch import nn

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer, RMSNorm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers (pip install -r requirements-dev.txt)")

# fp32: one layer matches transformers within 1e-4 (tests/test_models.py); three measured ~4e-6 on the
# logits, against greedy margins of at least 0.05 between the two best tokens on these weights
TOL = 1e-4
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [60, 61, 62, 63, 64]]


class DeepseekV3Model(nn.Module):
    """docs/models.md's recipe, as written there (fp32 on CPU here)."""

    def __init__(self, hf_config, state_dict, dtype=torch.float32, device="cpu"):
        super().__init__()
        cfg = self.cfg = DeepseekV3Config.from_hf(hf_config)
        w = lambda key: state_dict[key].to(device, dtype)  # noqa: E731
        self.embed_tokens = nn.Embedding.from_pretrained(w("model.embed_tokens.weight"))
        self.layers = nn.ModuleList()
        for i in range(cfg.num_hidden_layers):
            self.layers.append(DeepseekV3DecoderLayer(cfg, i, dtype=dtype, device=device))
            self.layers[i].load_hf_state_dict(state_dict)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.norm.weight.copy_(w("model.norm.weight"))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype,
                                 device=device).requires_grad_(False)
        self.lm_head.weight.copy_(w("lm_head.weight"))

    def forward(self, ids, positions, kv_caches, block_table, cache_seqlens):
        h = self.embed_tokens(ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, positions, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens)
        return self.lm_head(self.norm(h))


def hf_causal_lm(seed=0):
    """transformers' model: 3 layers (one dense, two MoE with 8 experts in 4 groups), YaRN, q LoRA,
    random weights (norms around 1, a negative score bias: the router's groups and bias matter)."""
    from transformers import DeepseekV3Config as HFConfig
    from transformers import DeepseekV3ForCausalLM

    config = HFConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:  # (the embedding too: unit rows, as the layers' inputs elsewhere in the tests)
                p.copy_(torch.randn_like(p) * (1 if "embed" in name else p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(-0.2 * torch.rand_like(b))
    return model


@pytest.fixture(scope="module")
def hf_and_reference():
    """The HF model and, per prompt alone, its greedy tokens and logits (10 new tokens)."""
    hf = hf_causal_lm()
    reference = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
            reference.append((out.sequences[0, len(prompt):].tolist(), torch.stack([lg[0] for lg in out.logits])))
    return hf, reference


def generate(model, budgets, page_size=4):
    """Greedy generation through NaN-poisoned paged caches: prompt 0 prefilled alone in two chunks,
    prompts 1 and 2 together right-padded to a common length, then decode steps of the live sequences
    (sequence b stops after budgets[b] tokens). Returns each sequence's tokens and logits."""
    cfg, batch = model.cfg, len(PROMPTS)
    max_pages = -(-max(len(p) + n for p, n in zip(PROMPTS, budgets)) // page_size)
    num_pages = batch * max_pages + 2
    kv_caches = torch.full((cfg.num_hidden_layers, num_pages, page_size, 1, cfg.kv_cache_dim), float("nan"))
    g = torch.Generator().manual_seed(3)
    block_table = torch.randperm(num_pages, generator=g)[:batch * max_pages].view(batch, max_pages).to(torch.int32)
    lens = torch.zeros(batch, dtype=torch.int32)
    last = [None] * batch
    ids = torch.tensor(PROMPTS[0])
    for start, end in ((0, 3), (3, len(ids))):  # chunked prefill: the second chunk sees the first in the cache
        logits = model(ids[None, start:end], torch.arange(start, end)[None], kv_caches, block_table[:1], lens[:1])
        lens[0] += end - start
    last[0] = logits[0, -1]
    rows = [1, 2]  # right-padded: each sequence's padding is overwritten by its own next tokens
    n = max(len(PROMPTS[b]) for b in rows)
    ids = torch.tensor([PROMPTS[b] + [0] * (n - len(PROMPTS[b])) for b in rows])
    logits = model(ids, torch.arange(n).expand(len(rows), n), kv_caches, block_table[rows], lens[rows])
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
        logits = model(next_ids[:, None], lens[live].long()[:, None], kv_caches, block_table[live], lens[live])
        lens[live] += 1
        for i, b in enumerate(live):
            last[b] = logits[i, 0]
    return tokens, [torch.stack(s) for s in step_logits]


@pytest.mark.parametrize("backend,budgets", [("ref", (10, 4, 7)), ("triton", (4, 2, 3))])
def test_greedy_generation_matches_transformers(hf_and_reference, backend, budgets):
    if backend not in dskernels.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    hf, reference = hf_and_reference
    model = DeepseekV3Model(hf.config, hf.state_dict())
    with torch.inference_mode(), dskernels.backend(backend):
        tokens, logits = generate(model, budgets)
    for b, n in enumerate(budgets):
        expected_tokens, expected_logits = reference[b]
        assert tokens[b] == expected_tokens[:n], b
        torch.testing.assert_close(logits[b], expected_logits[:n], atol=TOL, rtol=TOL)
