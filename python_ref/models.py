"""A DeepSeek-V3 decoder layer in plain PyTorch, written for clarity: the oracle of
dskernels.models (besides transformers itself, which the tests use) and the "plain PyTorch" peer
of benchmarks/bench_model.py. It computes what transformers' DeepseekV3DecoderLayer computes:

    h = x + o_proj(MHA(q, k, v))            q, k, v from the MLA projections, causal, YaRN rope
    y = h + MLP(norm(h))                    dense layers
    y = h + sum_k w_k expert_k(norm(h)) + shared(norm(h))     MoE layers (router: see route)

Attention always takes the expanded (non-absorbed) form: the cached latents of earlier tokens are
projected through kv_b_proj into per-head keys and values every call, as transformers' cache does.
DeepSeek-V3.2 (cfg.index_topk set): transformers' DeepseekV32Indexer in fp32 (see index_scores)
keeps the index_topk best-scored tokens of those each query sees; attention is masked to them.
Weights are a dict with Hugging Face 5.x names (fused experts), float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dskernels.models.rope import rope_inv_freq
from python_ref.moe import grouped_topk


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, cfg, interleave: bool | None = None) -> torch.Tensor:
    """x [B, S, heads, d]: pairs (x_2i, x_2i+1) (interleave, default cfg.rope_interleave) or
    (x_i, x_i+d/2) rotated by position * inv_freq_i; the output is [rotated firsts | rotated
    seconds] either way."""
    inv_freq, factor = rope_inv_freq(cfg.rope_parameters, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
    angle = positions[..., None].float() * inv_freq.to(x.device)
    cos = (angle.cos() * factor).to(x.dtype)[:, :, None]
    sin = (angle.sin() * factor).to(x.dtype)[:, :, None]
    if cfg.rope_interleave if interleave is None else interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, cfg):
    """DeepSeek-V3's router on x [T, H]: grouped_topk of the fp32 logits x W_gate^T."""
    return grouped_topk(x.float() @ gate_weight.float().T, bias, cfg.n_group, cfg.topk_group,
                        cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)


def swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def index_scores(w: dict, cfg, h: torch.Tensor, q_resid: torch.Tensor, positions: torch.Tensor,
                 past_keys: torch.Tensor | None = None):
    """DeepSeek-V3.2's indexer as transformers computes it: q = wq_b(q_resid) per head, one key
    k = LayerNorm(wk(h)), both roped (rotate_half pairs) on their first qk_rope_head_dim dims;
    score[s, t] = sum_h weights_proj(h)[h] * n_heads**-0.5 * relu(q_h . k_t * index_head_dim**-0.5).
    Returns (scores fp32 [B, S, T + S] over the past keys [B, T, D] and the new ones, the keys)."""
    b, s, _ = h.shape
    heads, dim, rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    q = F.linear(q_resid, w["self_attn.indexer.wq_b.weight"]).view(b, s, heads, dim)
    k = F.layer_norm(F.linear(h, w["self_attn.indexer.wk.weight"]).float(), (dim,),
                     w["self_attn.indexer.k_norm.weight"].float(), w["self_attn.indexer.k_norm.bias"].float(),
                     1e-6).to(h.dtype)
    q = torch.cat([rope(q[..., :rope_dim], positions, cfg, interleave=False), q[..., rope_dim:]], dim=-1)
    k = torch.cat([rope(k[:, :, None, :rope_dim], positions, cfg, interleave=False)[:, :, 0], k[..., rope_dim:]], -1)
    if past_keys is not None:
        k = torch.cat([past_keys, k], 1)
    weights = F.linear(h.float(), w["self_attn.indexer.weights_proj.weight"].float()) * heads ** -0.5
    dots = torch.einsum("bshd,btd->bsht", q.float(), k.float()) * dim ** -0.5
    return torch.einsum("bsht,bsh->bst", dots.clamp(min=0), weights), k


def decoder_layer(w: dict, cfg, layer_idx: int, x: torch.Tensor, positions: torch.Tensor,
                  past: tuple[torch.Tensor, ...] | None = None):
    """x [B, S, H], positions [B, S]; past = (latent [B, T, kv_lora_rank], k_rope [B, T, rope]) of
    T earlier tokens (normalized, roped: what a latent cache holds), plus for V3.2 their indexer
    keys [B, T, index_head_dim] (roped), or None.
    Returns (y [B, S, H], the same tuple for the T + S tokens). Token j sees the T past tokens
    and new tokens 0..j (V3.2: the index_topk of those its indexer scores highest)."""
    b, s, _ = x.shape
    heads, nope, rope_dim, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    h = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
    if cfg.q_lora_rank:
        q_resid = rms_norm(F.linear(h, w["self_attn.q_a_proj.weight"]), w["self_attn.q_a_layernorm.weight"], 1e-6)
        q = F.linear(q_resid, w["self_attn.q_b_proj.weight"])
    else:
        q = F.linear(h, w["self_attn.q_proj.weight"])
    q = q.view(b, s, heads, nope + rope_dim)
    q = torch.cat([q[..., :nope], rope(q[..., nope:], positions, cfg)], dim=-1)
    kv = F.linear(h, w["self_attn.kv_a_proj_with_mqa.weight"])
    latent = rms_norm(kv[..., :cfg.kv_lora_rank], w["self_attn.kv_a_layernorm.weight"], 1e-6)
    k_rope = rope(kv[..., None, cfg.kv_lora_rank:], positions, cfg)[:, :, 0]
    if past is not None:
        latent, k_rope = torch.cat([past[0], latent], 1), torch.cat([past[1], k_rope], 1)
    cached = (latent, k_rope)
    t = latent.shape[1]
    kv = F.linear(latent, w["self_attn.kv_b_proj.weight"]).view(b, t, heads, nope + vd)
    k = torch.cat([kv[..., :nope], k_rope[:, :, None].expand(b, t, heads, rope_dim)], dim=-1)
    v = kv[..., nope:]
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * cfg.softmax_scale
    visible = torch.arange(t, device=x.device)[None, :] <= (t - s + torch.arange(s, device=x.device))[:, None]
    visible = visible.expand(b, s, t)
    if cfg.index_topk is not None:  # V3.2: only the indexer's top-k of what each query sees
        index, keys = index_scores(w, cfg, h, q_resid, positions, past[2] if past is not None else None)
        top = index.masked_fill(~visible, float("-inf")).topk(min(cfg.index_topk, t), dim=-1).indices
        visible = visible & torch.zeros_like(visible).scatter_(-1, top, True)
        cached += (keys,)
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    attn = torch.einsum("bhst,bthd->bshd", probs, v.float()).to(x.dtype).reshape(b, s, heads * vd)
    x = x + F.linear(attn, w["self_attn.o_proj.weight"])

    h = rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    if not cfg.is_moe_layer(layer_idx):
        return x + swiglu(h, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"]), cached
    flat = h.reshape(b * s, -1)
    idx, weights = route(flat, w["mlp.gate.weight"], w["mlp.gate.e_score_correction_bias"], cfg)
    out = torch.zeros_like(flat, dtype=torch.float32)
    inter = cfg.moe_intermediate_size
    for e in idx.unique().tolist():
        token, slot = (idx == e).nonzero(as_tuple=True)
        gate_up = w["mlp.experts.gate_up_proj"][e]
        y = swiglu(flat[token], gate_up[:inter], gate_up[inter:], w["mlp.experts.down_proj"][e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    out = out.to(x.dtype)
    if cfg.n_shared_experts:
        out = out + swiglu(flat, w["mlp.shared_experts.gate_proj.weight"], w["mlp.shared_experts.up_proj.weight"],
                           w["mlp.shared_experts.down_proj.weight"])
    return x + out.view(b, s, -1), cached
