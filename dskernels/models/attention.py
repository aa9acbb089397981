"""Multi-head latent attention (MLA) of DeepSeek-V3.

Projections (HF names): q = q_b_proj(RMSNorm(q_a_proj(x))) split per head into [nope | rope];
kv_a_proj_with_mqa(x) = [latent (kv_lora_rank) | k_rope (qk_rope_head_dim, shared by all heads)],
latent normalized by kv_a_layernorm; kv_b_proj(latent) = per head [k_nope | v].

Two ways to compute the same attention:
- no cache (prefill from scratch): expand the latents through kv_b_proj and run causal
  scaled-dot-product attention over the S new tokens (the MHA form; HF's own computation);
- paged latent cache: write [latent | roped k] of the new tokens into the cache, absorb the
  up-projections (q_nope W_UK into the latent space, the output latent through W_UV) and attend with
  `flash_mla_with_kvcache` (one kv head of d = kv_lora_rank + rope, dv = kv_lora_rank), which never
  expands the cache: DeepSeek's "absorb" mode and FlashMLA's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dskernels
from dskernels.models.config import DeepseekV3Config
from dskernels.models.linear import Linear, RMSNorm, device_moves_only
from dskernels.models.rope import apply_rope, rope_cos_sin, rope_inv_freq

_LORA_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.num_heads = h = cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LORA_NORM_EPS, dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, dtype, device)
        else:
            self.q_proj = Linear(cfg.hidden_size, h * cfg.qk_head_dim, dtype, device)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_cache_dim, dtype, device)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, _LORA_NORM_EPS, dtype, device)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, device)
        self.o_proj = Linear(h * cfg.v_head_dim, cfg.hidden_size, dtype, device)
        inv_freq, self.attention_factor = rope_inv_freq(cfg.rope_parameters, cfg.qk_rope_head_dim,
                                                        cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.softmax_scale = cfg.softmax_scale
        self.w_uk = self.w_uv = None  # absorbed up-projections, built from kv_b_proj on first cached call

    def _apply(self, fn, recurse=True):
        return super()._apply(device_moves_only(fn, lambda t: t is self.inv_freq), recurse)  # rope stays fp32

    def absorb(self, dtype: torch.dtype) -> None:
        """W_UK [h, nope, r] and W_UV [h, v, r] from kv_b_proj (dequantized for an FP8 checkpoint, as
        DeepSeek's inference code does), in the compute dtype."""
        cfg = self.cfg
        w = self.kv_b_proj.dequantized(dtype).view(self.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                                   cfg.kv_lora_rank)
        self.w_uk = w[:, :cfg.qk_nope_head_dim].contiguous()
        self.w_uv = w[:, cfg.qk_nope_head_dim:].contiguous()

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        cfg = self.cfg
        b, s, _ = x.shape
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(b, s, self.num_heads, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.attention_factor, x.dtype)
        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, cfg.rope_interleave)
        return q_nope, q_rope, latent, k_rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q_nope, q_rope, latent, k_rope = self._project(x, positions)
        if kv_cache is None:
            out = self._attend_new_tokens(q_nope, q_rope, latent, k_rope)
        else:
            out = self._attend_paged(q_nope, q_rope, latent, k_rope, kv_cache, block_table, cache_seqlens)
        return self.o_proj(out.flatten(2))

    def _attend_new_tokens(self, q_nope, q_rope, latent, k_rope) -> torch.Tensor:
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(b, s, h, cfg.qk_rope_head_dim)], dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.softmax_scale)
        return out.transpose(1, 2)  # [b, s, h, v]

    def _attend_paged(self, q_nope, q_rope, latent, k_rope, kv_cache, block_table, cache_seqlens) -> torch.Tensor:
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        d = cfg.kv_cache_dim
        if block_table is None or cache_seqlens is None:
            raise ValueError("block_table, cache_seqlens: required with kv_cache")
        if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != d:
            raise ValueError(f"kv_cache: expected [num_pages, page_size, 1, {d}] (kv_lora_rank + "
                             f"qk_rope_head_dim), got {list(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache: expected a contiguous tensor (written in place)")
        if tuple(block_table.shape[:1]) != (b,) or tuple(cache_seqlens.shape) != (b,):
            raise ValueError(f"block_table, cache_seqlens: expected batch {b}, got {list(block_table.shape)} "
                             f"and {list(cache_seqlens.shape)}")
        if d % 16:
            raise ValueError(f"kv_cache: the paged path needs kv_lora_rank + qk_rope_head_dim to be a multiple "
                             f"of 16 (flash_mla_with_kvcache's head dimension), got {d}")
        if s == 0:
            return q_nope.new_zeros(b, 0, h, cfg.v_head_dim)
        if self.w_uk is None or self.w_uk.dtype != q_nope.dtype or self.w_uk.device != q_nope.device:
            self.absorb(q_nope.dtype)
        # 1. write [latent | k_rope] of the new tokens at slots lens[b] .. lens[b] + s - 1 (no host sync)
        page_size = kv_cache.shape[1]
        slots = cache_seqlens.long()[:, None] + torch.arange(s, device=kv_cache.device)
        pages = block_table.long().gather(1, slots // page_size)
        flat = (pages * page_size + slots % page_size).reshape(-1)
        new = torch.cat([latent, k_rope], dim=-1).reshape(b * s, d).to(kv_cache.dtype)
        kv_cache.view(-1, d).index_copy_(0, flat, new)
        # 2. absorbed query: q_nope W_UK lives in the latent space, so scores = q_lat . latent + q_rope . k_rope
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, self.w_uk)
        q = torch.cat([q_latent, q_rope], dim=-1).to(kv_cache.dtype)
        seqlens = (cache_seqlens + s).to(torch.int32)
        metadata, num_splits = dskernels.get_mla_metadata(seqlens, s * h, 1)
        out, _ = dskernels.flash_mla_with_kvcache(q, kv_cache, block_table, seqlens, cfg.kv_lora_rank,
                                                  metadata, num_splits, softmax_scale=self.softmax_scale,
                                                  causal=True)
        # 3. the output latent through W_UV gives each head's value vector
        return torch.einsum("bshc,hvc->bshv", out.to(q_nope.dtype), self.w_uv)
