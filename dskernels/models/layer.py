"""`DeepseekV3DecoderLayer`: pre-norm MLA + (dense MLP | MoE), loading Hugging Face weights."""

from __future__ import annotations

import re

import torch
from torch import nn

from dskernels.models.attention import MLAttention
from dskernels.models.config import DeepseekV3Config
from dskernels.models.indexer import LayerNorm
from dskernels.models.linear import BLOCK, FP8, MLP, Linear, RMSNorm, dequantize_block_fp8
from dskernels.models.moe import Experts, MoE

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.*)$")
_EXPERT_KEY = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.activation_scale)$"
                      r"|^(embed_tokens|enorm|hnorm|eh_proj|shared_head)\.")  # the MTP layer's extra modules


def _check_weight_shape(key: str, value: torch.Tensor, shape, layer_idx: int) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"state_dict: {key!r} of layer {layer_idx}: expected shape {tuple(shape)}, "
                         f"got {tuple(value.shape)}")


class DeepseekV3DecoderLayer(nn.Module):
    """One DeepSeek-V3 decoder layer (API.md section 5).

    Args:
        cfg: DeepseekV3Config.
        layer_idx: the MoE replaces the dense MLP when layer_idx >= cfg.first_k_dense_replace (or
            where cfg.mlp_layer_types says "sparse").
        dtype: compute dtype of activations and float weights (bf16 by default; fp32 works, and is
            what the tests compare with transformers in). FP8 weights stay FP8 (see load_hf_state_dict).
        device: where the weights live.
        ep_buffer: a `dskernels.ep.Buffer`: this rank then holds experts
            [rank * E/R, (rank + 1) * E/R) and each MoE call dispatches its tokens to the ranks that
            hold their experts and combines the results (attention and shared experts stay local).
        ep_low_latency_tokens: with ep_buffer, calls with at most this many tokens per rank (decode)
            use the buffer's low-latency dispatch/combine (DeepEP's num_max_dispatch_tokens_per_rank)
            and the masked grouped GEMM; larger calls use the normal dispatch.
        index_fp8: DeepSeek-V3.2 configs only (index_topk set): the indexer scores in FP8 as
            DeepSeek's inference code does (Hadamard-rotated q and k cast to FP8, DeepGEMM's
            fp8_mqa_logits / fp8_paged_mqa_logits; its key cache in DeepGEMM's paged FP8 layout),
            or with False in fp32 over keys cached in the layer's dtype, as transformers does.

    Forward: `layer(x, positions)` or `layer(x, positions, kv_cache=, block_table=, cache_seqlens=)`,
    see `forward`.
    """

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, *, dtype: torch.dtype = torch.bfloat16,
                 device=None, ep_buffer=None, ep_low_latency_tokens: int | None = None, index_fp8: bool = True):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(cfg, dtype, device, index_fp8)
        if self.is_moe:
            self.mlp = MoE(cfg, dtype, device, ep_buffer, ep_low_latency_tokens)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        for module in self.modules():  # every FP8 cast of the layer follows the checkpoint's scale format
            if isinstance(module, (Linear, Experts)):
                module.round_scale = cfg.fp8_round_scale

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the norms' (so `.float()` / `.to(torch.bfloat16)` change it)."""
        return self.input_layernorm.weight.dtype

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                index_cache: torch.Tensor | None = None, kv_cache_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, hidden] (the layer's dtype), positions int64 [B, S] (rope positions).

        Without kv_cache: causal attention over the S tokens. With kv_cache
        [num_pages, page_size, 1, kv_lora_rank + qk_rope_head_dim] (the layer's dtype),
        block_table int32 [B, max_pages] and cache_seqlens int32 [B]: the latents of the S tokens
        are written at slots cache_seqlens[b] .. + S - 1 of sequence b, and token j attends over
        slots [0, cache_seqlens[b] + j + 1) with flash_mla_with_kvcache. cache_seqlens is not
        modified. Returns [B, S, hidden].

        DeepSeek-V3.2 (cfg.index_topk): token j attends to the index_topk of those slots its
        indexer scores highest (all of them while they are fewer). With kv_cache it also needs
        index_cache [num_pages, page_size, 1, W] under the same block table: the indexer's keys,
        W = index_head_dim + 4 bytes (uint8, DeepGEMM's paged FP8 layout) with index_fp8, else
        index_head_dim values in the layer's dtype. kv_cache may then also be V3.2's FP8 latent
        cache: uint8 [num_pages, page_size, 1, 656] (FlashMLA's layout, kv_lora_rank 512 + rope 64).

        FP8 KV cache for dense attention (V3): kv_cache may be float8_e4m3fn of the same shape, with
        kv_cache_scale a float32 tensor of one element, positive and finite (None: 1.0): the latents are stored as
        clamp(value / scale, -448, 448) in e4m3 and flash_mla_with_kvcache dequantizes them with
        k_scale = scale, at half a bf16 cache's memory and bytes read per decode step."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"x: expected [B, S, {self.cfg.hidden_size}], got {list(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x: expected the layer's dtype {self.dtype}, got {x.dtype}")
        if kv_cache is not None and kv_cache.dtype not in (self.dtype, FP8):
            if self.cfg.index_topk is None or kv_cache.dtype != torch.uint8:
                fp8 = (" or float8_e4m3fn (an FP8 cache with kv_cache_scale)" if self.cfg.index_topk is None
                       else " (or uint8 / float8_e4m3fn: V3.2's 656-byte FP8 layout)")
                raise TypeError(f"kv_cache: expected the layer's dtype {self.dtype}{fp8}, got {kv_cache.dtype}")
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64, torch.int32):
            got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise TypeError(f"positions: expected an int64 tensor [B, S] (rope positions), got {got}")
        if tuple(positions.shape) != tuple(x.shape[:2]):
            raise ValueError(f"positions: expected shape {list(x.shape[:2])}, got {list(positions.shape)}")
        if positions.device != x.device:
            raise ValueError(f"positions: expected a tensor on {x.device} (x's device), got {positions.device}")
        h = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, block_table, cache_seqlens, index_cache,
                               kv_cache_scale)
        return h + self.mlp(self.post_attention_layernorm(h))

    # ---- weights ----
    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict:
        """This layer's weights under Hugging Face 5.x names (fused experts), FP8 ones dequantized to
        dtype (default: the layer's); float weights already in dtype are returned without a copy.
        With an EP buffer only this rank's experts are in it."""
        dtype = dtype or self.dtype
        out = {"input_layernorm.weight": self.input_layernorm.weight.to(dtype),
               "post_attention_layernorm.weight": self.post_attention_layernorm.weight.to(dtype)}
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                out[f"{name}.weight"] = module.dequantized(dtype)
            elif isinstance(module, RMSNorm) and name.startswith("self_attn."):
                out[f"{name}.weight"] = module.weight.to(dtype)
            elif isinstance(module, LayerNorm):  # the V3.2 indexer's k_norm
                out[f"{name}.weight"], out[f"{name}.bias"] = module.weight.to(dtype), module.bias.to(dtype)
        if self.is_moe:
            experts = self.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                w, s = getattr(experts, name), getattr(experts, f"{name}_scale_inv")
                out[f"mlp.experts.{name}"] = dequantize_block_fp8(w, s, dtype) if s is not None else w.to(dtype)
            out["mlp.gate.weight"] = self.mlp.gate_weight
            out["mlp.gate.e_score_correction_bias"] = self.mlp.e_score_correction_bias
            if self.mlp.shared_experts is None:  # transformers keeps the module, 0 wide
                hidden, device = self.cfg.hidden_size, self.input_layernorm.weight.device
                for name, shape in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
                    out[f"mlp.shared_experts.{name}.weight"] = torch.empty(shape, dtype=dtype, device=device)
        return out

    def load_hf_state_dict(self, state_dict: dict, fp8: bool | None = None, strict: bool = True) -> None:
        """Loads Hugging Face weights of this layer.

        Keys: a DeepseekV3DecoderLayer's own (`self_attn.q_a_proj.weight`, ...) or a whole model's
        (`model.layers.{i}.…`; other layers' keys are skipped). Experts as transformers 4.x / the
        checkpoint files name them (`mlp.experts.{e}.gate_proj.weight`, ...) or 5.x fused
        (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]). The FP8 checkpoint
        format is used as is: float8_e4m3fn `weight` plus fp32 `weight_scale_inv` per 128x128 block
        (5.x fused: `gate_up_proj_scale_inv`, `down_proj_scale_inv`).

        fp8: None keeps each weight's format, True quantizes float weights to FP8 (128x128 blocks),
        False dequantizes FP8 weights to the layer's dtype. Norms, the router and the score bias stay
        float. strict: raise on missing or unexpected keys (without it, what is there is loaded, but
        the routed experts only when all of this layer's are there). A tensor of the wrong shape
        raises ValueError naming its key."""
        sd = {}
        for key, value in state_dict.items():
            m = _LAYER_KEY.match(key)
            if m:
                if int(m.group(1)) != self.layer_idx:
                    continue
                key = m.group(2)
            if not _IGNORED.search(key):
                sd[key] = value
        used: set[str] = set()

        def take(key, shape=None):
            if key not in sd:
                if strict:
                    raise KeyError(f"state_dict: missing {key!r} for layer {self.layer_idx}")
                return None
            used.add(key)
            if shape is not None:
                _check_weight_shape(key, sd[key], shape, self.layer_idx)
            return sd[key]

        def take_opt(key):
            if key in sd:
                used.add(key)
                return sd[key]
            return None

        device = self.input_layernorm.weight.device

        def norm(module: RMSNorm | LayerNorm, key):
            w = take(key, module.weight.shape)
            if w is not None:
                module.weight = w.to(device=device, dtype=self.dtype).clone()

        def linear(module: Linear, prefix, fp8=fp8):
            w = take(prefix + ".weight", (module.out_features, module.in_features))
            if w is not None:
                scale = take_opt(prefix + ".weight_scale_inv")
                if scale is not None:  # 128 x 128 blocks
                    _check_weight_shape(prefix + ".weight_scale_inv", scale,
                                        (-(-module.out_features // 128), -(-module.in_features // 128)),
                                        self.layer_idx)
                module.set_weight(w, scale, self.dtype, fp8)

        norm(self.input_layernorm, "input_layernorm.weight")
        norm(self.post_attention_layernorm, "post_attention_layernorm.weight")
        attn = self.self_attn
        names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        names += ["q_a_proj", "q_b_proj"] if self.cfg.q_lora_rank else ["q_proj"]
        for name in names:
            linear(getattr(attn, name), f"self_attn.{name}")
        if self.cfg.q_lora_rank:
            norm(attn.q_a_layernorm, "self_attn.q_a_layernorm.weight")
        norm(attn.kv_a_layernorm, "self_attn.kv_a_layernorm.weight")
        attn.w_uk = attn.w_uv = None
        if attn.indexer is not None:  # DeepSeek-V3.2
            for name in ("wq_b", "wk"):
                linear(getattr(attn.indexer, name), f"self_attn.indexer.{name}")
            # the head weights stay float as the checkpoint has them (DeepSeek and transformers score in fp32)
            linear(attn.indexer.weights_proj, "self_attn.indexer.weights_proj", fp8=False if fp8 is False else None)
            norm(attn.indexer.k_norm, "self_attn.indexer.k_norm.weight")
            bias = take("self_attn.indexer.k_norm.bias", attn.indexer.k_norm.bias.shape)
            if bias is not None:
                attn.indexer.k_norm.bias = bias.to(device=device, dtype=self.dtype).clone()
        if not self.is_moe:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear(getattr(self.mlp, name), f"mlp.{name}")
        else:
            moe = self.mlp
            w = take("mlp.gate.weight", moe.gate_weight.shape)
            if w is not None:
                moe.gate_weight = w.to(device=device, dtype=torch.float32).clone()
            b = take_opt("mlp.gate.e_score_correction_bias")
            if b is not None:
                _check_weight_shape("mlp.gate.e_score_correction_bias", b, moe.e_score_correction_bias.shape,
                                    self.layer_idx)
                moe.e_score_correction_bias = b.to(device=device, dtype=torch.float32).clone()
            if moe.shared_experts is not None:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    linear(getattr(moe.shared_experts, name), f"mlp.shared_experts.{name}")
            else:  # n_shared_experts = 0: transformers still saves the (empty) module
                used.update(k for k in sd if k.startswith("mlp.shared_experts.") and sd[k].numel() == 0)
            self._load_experts(sd, used, fp8, strict)
        unexpected = sorted(set(sd) - used)
        if strict and unexpected:
            raise KeyError(f"state_dict: unexpected keys for layer {self.layer_idx}: {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}")

    def _load_experts(self, sd: dict, used: set, fp8: bool | None, strict: bool) -> None:
        moe, cfg = self.mlp, self.cfg
        experts = moe.experts
        lo, hi = moe.first_expert, moe.first_expert + moe.num_local_experts
        inter = cfg.moe_intermediate_size
        if "mlp.experts.gate_up_proj" in sd or "mlp.experts.down_proj" in sd:  # transformers 5.x: fused
            used.update(k for k in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                    "mlp.experts.gate_up_proj_scale_inv", "mlp.experts.down_proj_scale_inv")
                        if k in sd)
            for key, shape in (("mlp.experts.gate_up_proj", (cfg.n_routed_experts, 2 * inter, cfg.hidden_size)),
                               ("mlp.experts.down_proj", (cfg.n_routed_experts, cfg.hidden_size, inter))):
                if key not in sd:
                    if strict:
                        raise KeyError(f"state_dict: missing {key!r} for layer {self.layer_idx}")
                    return
                _check_weight_shape(key, sd[key], shape, self.layer_idx)
            gate_up = sd["mlp.experts.gate_up_proj"][lo:hi]
            down = sd["mlp.experts.down_proj"][lo:hi]
            gate_up_s = sd.get("mlp.experts.gate_up_proj_scale_inv")
            down_s = sd.get("mlp.experts.down_proj_scale_inv")
            gate_up_s = gate_up_s[lo:hi] if gate_up_s is not None else None
            down_s = down_s[lo:hi] if down_s is not None else None
        else:  # 4.x / checkpoint files: one module per expert; other ranks' experts are skipped
            for key in sd:
                m = _EXPERT_KEY.match(key)
                if m and not lo <= int(m.group(1)) < hi:
                    used.add(key)
            parts = {}
            for name in ("gate_proj", "up_proj", "down_proj"):
                ws, ss = [], []
                for e in range(lo, hi):
                    prefix = f"mlp.experts.{e}.{name}"
                    if prefix + ".weight" not in sd:
                        if strict:
                            raise KeyError(f"state_dict: missing {prefix + '.weight'!r} for layer {self.layer_idx}")
                        return
                    used.add(prefix + ".weight")
                    shape = (cfg.hidden_size, inter) if name == "down_proj" else (inter, cfg.hidden_size)
                    _check_weight_shape(prefix + ".weight", sd[prefix + ".weight"], shape, self.layer_idx)
                    ws.append(sd[prefix + ".weight"])
                    if prefix + ".weight_scale_inv" in sd:
                        used.add(prefix + ".weight_scale_inv")
                        ss.append(sd[prefix + ".weight_scale_inv"])
                parts[name] = (torch.stack(ws), torch.stack(ss) if ss else None)
            (g, gs), (u, us), (down, down_s) = parts["gate_proj"], parts["up_proj"], parts["down_proj"]
            if g.dtype == FP8 and inter % BLOCK:  # gate and up blocks would straddle: go through float
                g, u, gs, us = dequantize_block_fp8(g, gs), dequantize_block_fp8(u, us), None, None
            gate_up = torch.cat([g, u], dim=1)
            gate_up_s = torch.cat([gs, us], dim=1) if gs is not None else None
        experts.gate_up_proj, experts.gate_up_proj_scale_inv = self._expert_weights(gate_up, gate_up_s, fp8)
        experts.down_proj, experts.down_proj_scale_inv = self._expert_weights(down, down_s, fp8)

    def _expert_weights(self, w: torch.Tensor, scale: torch.Tensor | None, fp8: bool | None):
        import dskernels
        device = self.input_layernorm.weight.device
        if w.dtype == FP8 and scale is None:
            raise ValueError("state_dict: FP8 expert weights need their *_scale_inv block scales")
        want_fp8 = (w.dtype == FP8) if fp8 is None else fp8
        if want_fp8:
            if w.shape[-1] % BLOCK:
                raise ValueError(f"fp8: expert GEMMs need k % {BLOCK} == 0, got k={w.shape[-1]}")
            if w.dtype != FP8:
                pairs = [dskernels.per_block_cast_to_fp8(e.to(device=device, dtype=torch.bfloat16).contiguous(),
                                                         round_scale=self.cfg.fp8_round_scale) for e in w]
                w, scale = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            return w.to(device).contiguous(), scale.to(device=device, dtype=torch.float32).contiguous()
        if w.dtype == FP8:
            w = dequantize_block_fp8(w, scale, self.dtype)
        return w.to(device=device, dtype=self.dtype).contiguous(), None
