"""`DeepseekV3DecoderLayer`: pre-norm MLA + (dense MLP | MoE), loading Hugging Face weights."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from dskernels._checks import as_flag, check_int
from dskernels.models.attention import MLAttention
from dskernels.models.config import DeepseekV3Config
from dskernels.models.indexer import LayerNorm
from dskernels.models.linear import (BLOCK, FP8, MLP, Linear, RMSNorm, add_norm_and_cast, dequantize_block_fp8,
                                     load_weight, norm_and_cast, store_weight, unhooked, writable_in_place)
from dskernels.models.moe import Experts, MoE

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.*)$")
_EXPERT_KEY = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_FUSED_EXPERT_KEY = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)(_scale_inv)?$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.activation_scale)$"
                      r"|^(embed_tokens|enorm|hnorm|eh_proj|shared_head)\.")  # the MTP layer's extra modules


# safetensors' dtype names (a slice's get_dtype()) -> torch's
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class _Unread:
    """A checkpoint tensor not read yet: a safetensors slice (`safe_open(...).get_slice(name)`),
    whose shape and dtype come from the file's header. load_hf_state_dict checks it from those and
    reads it (read()) right before its copy into the layer, so only one tensor of the checkpoint is
    in memory at a time. [i] / [a:b] on the first dimension give the unread rows (one expert of a
    fused tensor, one rank's experts)."""

    is_meta = False

    def __init__(self, source, key: str, rows=None, shape=None, dtype=None):
        self.source, self.rows = source, rows
        if shape is None:
            name = source.get_dtype()
            if name not in _SAFETENSORS_DTYPES:
                raise TypeError(f"state_dict: {key!r}: a safetensors slice of an unknown dtype {name!r}")
            shape, dtype = torch.Size(source.get_shape()), _SAFETENSORS_DTYPES[name]
        self.shape, self.dtype = shape, dtype

    def __getitem__(self, index):
        if isinstance(self.rows, int):  # (only row ranges take an index)
            raise IndexError(f"an unread checkpoint tensor's row [i] takes no further index, got {index!r}")
        start = 0 if self.rows is None else self.rows.start
        if isinstance(index, int) and 0 <= index < self.shape[0]:
            return self._part(start + index, self.shape[1:])
        if isinstance(index, slice) and index.step is None:
            lo, hi, _ = index.indices(self.shape[0])
            return self._part(slice(start + lo, start + max(lo, hi)), (max(hi - lo, 0), *self.shape[1:]))
        raise IndexError(f"an unread checkpoint tensor takes an int or a row range, got {index!r}")

    def _part(self, rows, shape) -> _Unread:
        """The source's rows (an int: one; a slice: a range), of that shape, unread."""
        return _Unread(self.source, "", rows, shape, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self) -> torch.Tensor:
        t = self.source[self.rows if self.rows is not None else slice(None)]
        if tuple(t.shape) != tuple(self.shape) or t.dtype != self.dtype:  # (a file changed since it was opened)
            raise ValueError(f"state_dict: a safetensors slice read as {t.dtype} {list(t.shape)}, its header said "
                             f"{self.dtype} {list(self.shape)}")
        return t


class _Written(_Unread):
    """An expert tensor of an earlier shard-by-shard call (strict=False), already copied into the
    layer's fused weights (its shape and dtype kept for the checks of the call that completes the
    experts, which copies it no more)."""

    def __init__(self, shape, dtype: torch.dtype, as_fp8: bool, rows=None):
        super().__init__(None, "", rows, torch.Size(shape), dtype)
        self.as_fp8 = as_fp8  # (the format it was written in)

    def _part(self, rows, shape) -> _Written:
        return _Written(shape, self.dtype, self.as_fp8, rows)

    def read(self):
        raise AssertionError("an expert tensor already written is not read again")


def _read(value):
    """value's tensor: read now where it is an _Unread one."""
    return value.read() if isinstance(value, _Unread) else value


def _stored_value(state_dict, key: str):
    """state_dict's value of key, unread where it can be: a safetensors slice, or the mapping's (or
    safe_open handle's) get_slice(key) where it has one (a mapping over a checkpoint's files)."""
    get_slice = getattr(state_dict, "get_slice", None)
    value = get_slice(key) if callable(get_slice) else state_dict[key]
    if (not isinstance(value, torch.Tensor) and callable(getattr(value, "get_shape", None))
            and callable(getattr(value, "get_dtype", None)) and hasattr(value, "__getitem__")):
        return _Unread(value, key)
    return value


def _mark_weights_loaded(module, incompatible_keys) -> None:
    """load_state_dict's post hook (a function, not a lambda: the layer pickles). Experts loaded
    that way replace what a shard-by-shard load_hf_state_dict kept of them."""
    module.weights_loaded = True
    if not any(".experts." in key for key in incompatible_keys.missing_keys):
        module._expert_parts = {}


def _load_read(module, name: str, value, dtype: torch.dtype, device) -> None:
    """load_weight of value, read first where it is unread (the layer must not keep the caller's
    tensor: source)."""
    value = _read(value)
    load_weight(module, name, value, dtype, device, value)


def _check_weight_shape(key: str, value: torch.Tensor, shape, layer_idx: int) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"state_dict: {key!r} of layer {layer_idx}: expected shape {tuple(shape)}, "
                         f"got {tuple(value.shape)}")


def _check_tensor(key: str, value, kind: str, layer_idx: int, device: torch.device) -> None:
    """A state-dict entry this layer loads. kind: "weight" (a projection: float or float8_e4m3fn),
    "scale" (block scales: any float dtype, ue8m0's float8_e8m0fnu included) or "float" (norms,
    router: float, not FP8)."""
    where = f"state_dict: {key!r} of layer {layer_idx}"
    if not isinstance(value, (torch.Tensor, _Unread)):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(value).__name__}")
    if value.is_meta and device.type != "meta":  # (no values to copy: fails half-way through otherwise)
        raise ValueError(f"{where}: expected a tensor with data, got one on the meta device")
    dtype = value.dtype
    if kind == "weight" and not (dtype == FP8 or (dtype.is_floating_point and dtype.itemsize > 1)):
        raise TypeError(f"{where}: expected a float tensor or float8_e4m3fn (an FP8 weight), got {dtype}")
    if kind == "scale" and not dtype.is_floating_point:
        raise TypeError(f"{where}: expected a float tensor (block scales), got {dtype}")
    if kind == "float" and not (dtype.is_floating_point and dtype.itemsize > 1):
        raise TypeError(f"{where}: expected a float tensor, got {dtype}")


def _check_scale(key: str, scale, weight: torch.Tensor, weight_key: str, shape, layer_idx: int,
                 device: torch.device) -> None:
    """weight's block scales: there for an FP8 weight (KeyError otherwise, strict or not: the weight
    means nothing without them), of the given shape, and absent for a float one (they would be
    ignored: a float weight with scales is likely an FP8 one cast without them)."""
    if scale is None:
        if weight.dtype == FP8:
            raise KeyError(f"state_dict: missing {key!r} for layer {layer_idx}: the block scales of its "
                           f"float8_e4m3fn weight {weight_key!r}")
        return
    _check_tensor(key, scale, "scale", layer_idx, device)
    _check_weight_shape(key, scale, shape, layer_idx)
    if weight.dtype != FP8:
        raise ValueError(f"state_dict: {key!r} of layer {layer_idx}: expected no scale for the {weight.dtype} weight "
                         f"{weight_key!r} (block scales belong to float8_e4m3fn weights), got one")


class DeepseekV3DecoderLayer(nn.Module):
    """One DeepSeek-V3 decoder layer (API.md section 5).

    Args:
        cfg: DeepseekV3Config.
        layer_idx: the MoE replaces the dense MLP when layer_idx >= cfg.first_k_dense_replace (or
            where cfg.mlp_layer_types says "sparse").
        dtype: compute dtype of activations and float weights: by default torch's default dtype
            (float32 unless changed), as torch's and transformers' modules are built, so the layer
            matches transformers' built the same way; serving passes torch.bfloat16. FP8 weights
            stay FP8 (see load_hf_state_dict).
        device: where the weights live.
        ep_buffer: a `dskernels.ep.Buffer`: this rank then holds experts
            [rank * E/R, (rank + 1) * E/R) and each MoE call dispatches its tokens to the ranks that
            hold their experts and combines the results (attention and shared experts stay local).
        ep_low_latency_tokens: with ep_buffer, calls with at most this many tokens per rank (decode)
            use the buffer's low-latency dispatch/combine (DeepEP's num_max_dispatch_tokens_per_rank)
            and the masked grouped GEMM; larger calls use the normal dispatch. The two are different
            exchanges, so every rank must make the same choice in a step: by default each rank
            decides from its own token count, right where every rank has as many tokens (a decode
            batch padded to a fixed size, as CUDA graphs need); where counts differ across ranks
            (DP attention), pass forward's ep_low_latency, the same on every rank. The low-latency
            exchange has no backward: where a gradient must flow the normal one is taken (and
            ep_low_latency=True raises).
        fp8: build the projections and experts in the FP8 checkpoint's format (float8_e4m3fn weights,
            fp32 128x128 block scales, where their k is a multiple of 128), so that loading an FP8
            checkpoint writes into them in place instead of replacing float weights of twice the
            size (a 671B MoE layer: 10.7 GiB instead of 21.4 + 10.7 at the load's peak); a
            `device="meta"` layer's `to_empty` + load, or `load_state_dict(..., assign=True)`, then
            never holds float ones. None (default): where cfg.quantization_config is an FP8 one
            (DeepSeek's FP8 checkpoints). load_hf_state_dict's fp8 still decides the loaded format.
        index_fp8: DeepSeek-V3.2 configs only (index_topk set): the indexer scores in FP8 as
            DeepSeek's inference code does (Hadamard-rotated q and k cast to FP8, DeepGEMM's
            fp8_mqa_logits / fp8_paged_mqa_logits; its key cache in DeepGEMM's paged FP8 layout),
            or with False in fp32 over keys cached in the layer's dtype, as transformers does.

    Forward: `layer(x, positions)` or `layer(x, positions, kv_cache=, block_table=, cache_seqlens=)`,
    see `forward`. The weights are uninitialized until `load_hf_state_dict` (or torch's
    `load_state_dict`) fills them. `DeepseekV3Config()` is the 671B model's (one MoE layer: ~46 GB
    in fp32); `DeepseekV3Config.tiny()` builds a small one that exercises every path.
    """

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, *, dtype: torch.dtype | None = None,
                 device=None, ep_buffer=None, ep_low_latency_tokens: int | None = None, index_fp8: bool = True,
                 fp8: bool | None = None):
        super().__init__()
        if not isinstance(cfg, DeepseekV3Config):  # (a dict or transformers' config has other attribute names)
            raise TypeError(f"cfg: expected a DeepseekV3Config (DeepseekV3Config.from_hf converts a transformers "
                            f"config, a dict or a config.json path), got {type(cfg).__name__}")
        layer_idx = check_int("layer_idx", layer_idx, 0)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            raise TypeError(f"dtype: expected a floating-point torch.dtype (torch.bfloat16, torch.float16, "
                            f"torch.float32), got {dtype!r}")
        index_fp8 = as_flag("index_fp8", index_fp8)
        fp8 = as_flag("fp8", fp8, none_ok=True)
        if ep_low_latency_tokens is not None:
            ep_low_latency_tokens = check_int("ep_low_latency_tokens", ep_low_latency_tokens, 1)
        cfg._validate(moe=False)  # again: a config's fields may have been changed since it was built
        self.cfg, self.layer_idx = cfg, layer_idx
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            cfg._validate(moe=True)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if fp8 is None:
            fp8 = (cfg.quantization_config or {}).get("quant_method") == "fp8"
        self.self_attn = MLAttention(cfg, dtype, device, index_fp8, fp8_weights=fp8)
        if self.is_moe:
            self.mlp = MoE(cfg, dtype, device, ep_buffer, ep_low_latency_tokens, fp8_weights=fp8)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device, fp8=fp8)
        for module in self.modules():  # every FP8 cast of the layer follows the checkpoint's scale format
            if isinstance(module, (Linear, Experts)):
                module.round_scale = cfg.fp8_round_scale
        # The weights are torch.empty until loaded (load_hf_state_dict, or torch's load_state_dict):
        # a forward before that says so once instead of returning NaN or garbage without a word.
        self.weights_loaded = False
        self.register_load_state_dict_post_hook(_mark_weights_loaded)
        # A shard-by-shard load_hf_state_dict(strict=False) keeps the routed experts' tensors of the
        # shards so far (copies) until the last one completes them: checkpoints split a layer's
        # experts across files.
        self._expert_parts: dict[str, torch.Tensor] = {}
        self._expert_parts_said = False

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the norms' (so `.float()` / `.to(torch.bfloat16)` change it)."""
        return self.input_layernorm.weight.dtype

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                index_cache: torch.Tensor | None = None, kv_cache_scale: torch.Tensor | None = None,
                ep_low_latency: bool | None = None) -> torch.Tensor:
        """x [B, S, hidden] (the layer's dtype), positions int64 [B, S] (rope positions).

        Without kv_cache: causal attention over the S tokens. With kv_cache
        [num_pages, page_size, 1, kv_lora_rank + qk_rope_head_dim] (the layer's dtype),
        block_table int32 [B, max_pages] and cache_seqlens int32 [B] (int64 ones are converted, one
        small kernel each: int32 saves it): the latents of the S tokens
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
        k_scale = scale, at half a bf16 cache's memory and bytes read per decode step.

        ep_low_latency (MoE layers with an EP buffer; ignored elsewhere): True sends this call's
        tokens through the low-latency exchange (at most ep_low_latency_tokens of them), False through
        the normal one, None picks by this rank's token count (see the class's ep_low_latency_tokens)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor [B, S, {self.cfg.hidden_size}], got {type(x).__name__}")
        for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens),
                        ("index_cache", index_cache), ("kv_cache_scale", kv_cache_scale)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor or None, got {type(t).__name__}")
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
        ep_low_latency = as_flag("ep_low_latency", ep_low_latency, none_ok=True)
        # Each norm casts its output for the FP8 projections that read it (the post-attention one also adds
        # the residual first), in its own kernel where it can
        normed, x_fp8 = norm_and_cast(self.input_layernorm, x, *self.self_attn.input_layers())
        attended = self.self_attn(normed, positions, kv_cache, block_table, cache_seqlens, index_cache, kv_cache_scale,
                                  x_fp8)
        del normed, x_fp8  # (dead from here: not kept through the MLP, 3 bytes per hidden value)
        h, h2, h2_fp8 = add_norm_and_cast(self.post_attention_layernorm, x, attended, *self.mlp.input_layers())
        del attended
        if self.is_moe and type(self.mlp) is MoE and unhooked(self.mlp):  # the residual added in the combine's kernel
            out = self.mlp(h2, ep_low_latency, h2_fp8, residual=h)
        elif self.is_moe:
            out = h + self.mlp(h2, ep_low_latency, h2_fp8)
        else:
            out = h + self.mlp(h2, h2_fp8)
        if not self.weights_loaded and x.device.type != "meta" and not torch.compiler.is_compiling():
            # (after the arguments' checks, which come first)
            warnings.warn(f"DeepseekV3DecoderLayer {self.layer_idx}: forward before any weights were loaded: they "
                          "are uninitialized memory (call load_hf_state_dict, or load_state_dict, first; after "
                          "filling the weights another way, set layer.weights_loaded = True)", RuntimeWarning,
                          stacklevel=2)
            self.weights_loaded = True  # (said once)
        if self._expert_parts and not self._expert_parts_said and not torch.compiler.is_compiling():
            warnings.warn(f"DeepseekV3DecoderLayer {self.layer_idx}: forward with its routed experts loaded in part "
                          f"({len(self._expert_parts)} of their tensors came; the experts are uninitialized memory "
                          "until load_hf_state_dict gets the rest)", RuntimeWarning, stacklevel=2)
            self._expert_parts_said = True
        return out

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
                if module.bias is not None:
                    out[f"{name}.bias"] = module.bias.to(dtype)
            elif isinstance(module, RMSNorm) and name.startswith("self_attn."):
                out[f"{name}.weight"] = module.weight.to(dtype)
            elif isinstance(module, LayerNorm):  # the V3.2 indexer's k_norm
                out[f"{name}.weight"], out[f"{name}.bias"] = module.weight.to(dtype), module.bias.to(dtype)
        if self.is_moe:
            experts = self.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                w, s = getattr(experts, name), getattr(experts, f"{name}_scale_inv")
                out[f"mlp.experts.{name}"] = dequantize_block_fp8(w, s, dtype) if s is not None else w.to(dtype)
            out["mlp.gate.weight"] = self.mlp.gate.weight
            out["mlp.gate.e_score_correction_bias"] = self.mlp.gate.e_score_correction_bias
            if self.mlp.shared_experts is None:  # transformers keeps the module, 0 wide
                hidden, device = self.cfg.hidden_size, self.input_layernorm.weight.device
                for name, shape in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
                    out[f"mlp.shared_experts.{name}.weight"] = torch.empty(shape, dtype=dtype, device=device)
        return out

    def load_hf_state_dict(self, state_dict: dict, fp8: bool | None = None, strict: bool = True):
        """Loads Hugging Face weights of this layer.

        Keys: a DeepseekV3DecoderLayer's own (`self_attn.q_a_proj.weight`, ...) or a whole model's
        (`model.layers.{i}.…`; other layers' keys and the model's own, such as `lm_head.weight`,
        are skipped, and only this layer's values are read: a lazy mapping over a whole checkpoint
        reads no other layer's tensors; strict: KeyError where no key is this layer's).
        Experts as transformers 4.x / the checkpoint files name them
        (`mlp.experts.{e}.gate_proj.weight`, ...) or 5.x fused (`mlp.experts.gate_up_proj` [E, 2I, H],
        `mlp.experts.down_proj` [E, H, I]). The FP8 checkpoint format is used as is: float8_e4m3fn
        `weight` plus fp32 `weight_scale_inv` per 128x128 block (5.x fused: `gate_up_proj_scale_inv`,
        `down_proj_scale_inv`). The layer keeps copies: the caller's tensors can be reused or freed.
        Values may also be unread safetensors slices (`safe_open(...).get_slice(key)`), and
        state_dict a mapping with a `get_slice(key)` method or a `safe_open` handle itself: then
        the checks read the files' headers only, and each tensor is read right before its copy and
        dropped after it (one weight and its scale in memory at a time, not the layer's checkpoint).

        fp8: None keeps each weight's format, True quantizes float weights to FP8 (128x128 blocks),
        False dequantizes FP8 weights to the layer's dtype. Norms, the router and the score bias stay
        float. strict: raise on missing or unexpected keys. Without it what is there is loaded: in a
        shard-by-shard load (one call per checkpoint file, strict=False) each routed expert matrix
        goes into the fused weights in the call that brings it with its scale (a weight whose scale
        has not come yet is kept, a copy, until it does; every call must want the same format, fp8),
        and the experts are complete once all of this layer's have come (a forward before then
        warns). A tensor of the wrong shape raises ValueError naming its key, an FP8 weight without
        its scale KeyError; everything is checked before anything is copied, so a call that raises
        leaves the layer as it was (save for a file's read failing half-way through).

        Returns torch's (missing_keys, unexpected_keys) named tuple, as load_state_dict does: the
        layer's keys this call left unloaded (experts kept for a later call among them) and the keys
        it did not use."""
        if not isinstance(state_dict, Mapping) and not (callable(getattr(state_dict, "keys", None))
                                                       and callable(getattr(state_dict, "get_slice", None))):
            raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__} "
                            f"(or an object with keys() and get_slice(), such as safetensors' safe_open handle)")
        names = list(state_dict.keys())  # (a safe_open handle is not iterable)
        fp8 = as_flag("fp8", fp8, none_ok=True)
        strict = as_flag("strict", strict)
        sd = {}
        for key in names:
            if not isinstance(key, str):
                raise TypeError(f"state_dict: expected str keys, got {type(key).__name__} {key!r}")
        # A whole model's dict (layer-prefixed keys) also holds the model's own tensors (embeddings,
        # final norm, lm_head): they belong to no layer, so they are not this one's unexpected keys.
        whole_model = any(_LAYER_KEY.match(key) for key in names)
        layers_given = set()
        for given in names:  # (keys first: a lazy mapping reads only this layer's tensors)
            key, m = given, _LAYER_KEY.match(given)
            if m:
                layers_given.add(int(m.group(1)))
                if int(m.group(1)) != self.layer_idx:
                    continue
                key = m.group(2)
            elif whole_model:
                continue
            if not _IGNORED.search(key):
                sd[key] = _stored_value(state_dict, given)  # (a safetensors slice: not read yet)
        if strict and whole_model and self.layer_idx not in layers_given:
            shown = sorted(layers_given)
            raise KeyError(f"state_dict: no keys of layer {self.layer_idx} (its layer keys are of layers "
                           f"{shown[:8]}{' ...' if len(shown) > 8 else ''}): the layer's layer_idx must be the "
                           f"checkpoint's index, model.layers.{{layer_idx}}.")
        used: set[str] = set()
        missing: list[str] = []
        device = self.input_layernorm.weight.device
        if device.type == "meta":  # (the values would be dropped: meta tensors hold none)
            raise ValueError("state_dict: this layer is on the meta device, where loaded values are not kept: give "
                             "it memory first (layer.to_empty(device=...)), or use load_state_dict(..., assign=True)")
        if self.is_moe:  # the experts' tensors of earlier shards (this call's win)
            sd = {**self._expert_parts, **sd}
        # Every check runs before the first of these: a state dict that raises leaves the layer as it was
        steps = []

        def check(key, shape=None, kind="float"):
            _check_tensor(key, sd[key], kind, self.layer_idx, device)
            if shape is not None:
                _check_weight_shape(key, sd[key], shape, self.layer_idx)
            return sd[key]

        def take(key, shape=None, kind="float"):
            if key not in sd:
                if strict:
                    raise KeyError(f"state_dict: missing {key!r} for layer {self.layer_idx}")
                missing.append(key)
                return None
            used.add(key)
            return check(key, shape, kind)

        def take_scale(key, weight, weight_key, shape):
            scale = sd.get(key)
            if scale is not None:
                used.add(key)
            _check_scale(key, scale, weight, weight_key, shape, self.layer_idx, device)
            return scale

        def norm(module: RMSNorm | LayerNorm, key, attr="weight"):
            w = take(key, getattr(module, attr).shape)
            if w is not None:
                steps.append(lambda: _load_read(module, attr, w, self.dtype, device))

        def linear(module: Linear, prefix, fp8=fp8, dtype=None):
            w = take(prefix + ".weight", (module.out_features, module.in_features), kind="weight")
            if w is None:
                return
            scale = take_scale(prefix + ".weight_scale_inv", w, prefix + ".weight",
                               (-(-module.out_features // BLOCK), -(-module.in_features // BLOCK)))
            if (w.dtype == FP8 if fp8 is None else fp8) and module.in_features % BLOCK:
                raise ValueError(f"fp8: {prefix + '.weight'!r} of layer {self.layer_idx} as FP8 needs in_features "
                                 f"to be a multiple of {BLOCK} (the FP8 GEMM's k), got {module.in_features}")
            steps.append(lambda: module.set_weight(_read(w), _read(scale), dtype or self.dtype, fp8))
            if module.bias is not None:  # config.attention_bias
                b = take(prefix + ".bias", (module.out_features,))
                if b is not None:
                    steps.append(lambda: module.set_bias(_read(b)))

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
        if attn.indexer is not None:  # DeepSeek-V3.2
            for name in ("wq_b", "wk"):
                linear(getattr(attn.indexer, name), f"self_attn.indexer.{name}")
            # the head weights stay float, kept in fp32 as transformers keeps them (_keep_in_fp32_modules;
            # DeepSeek and transformers score in fp32): an fp32 checkpoint's values are not rounded
            linear(attn.indexer.weights_proj, "self_attn.indexer.weights_proj", fp8=False if fp8 is False else None,
                   dtype=torch.float32)
            norm(attn.indexer.k_norm, "self_attn.indexer.k_norm.weight")
            norm(attn.indexer.k_norm, "self_attn.indexer.k_norm.bias", attr="bias")
        if not self.is_moe:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear(getattr(self.mlp, name), f"mlp.{name}")
        else:
            moe = self.mlp
            w = take("mlp.gate.weight", moe.gate.weight.shape)
            if w is not None:
                steps.append(lambda: _load_read(moe.gate, "weight", w, torch.float32, device))
            b = take("mlp.gate.e_score_correction_bias", moe.gate.e_score_correction_bias.shape)
            if b is not None:
                steps.append(lambda: _load_read(moe.gate, "e_score_correction_bias", b, torch.float32, device))
            if moe.shared_experts is not None:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    linear(getattr(moe.shared_experts, name), f"mlp.shared_experts.{name}")
            else:  # n_shared_experts = 0: transformers still saves the (empty) module
                used.update(k for k, v in sd.items() if k.startswith("mlp.shared_experts.")
                            and isinstance(v, (torch.Tensor, _Unread)) and math.prod(v.shape) == 0)
            self._check_written_format(sd, fp8)
            experts = self._check_experts(sd, used, fp8, strict, missing)
            if experts is not None:
                steps.append(lambda: self._load_experts(*experts, fp8))
                steps.append(lambda: self._keep_expert_parts({}))
            else:  # some not there (strict=False): each matrix whose scale is there too goes straight into
                # the fused weights now (the parts bookkeeping notes it), the others are kept (copies, host
                # memory for a CPU checkpoint) for the call that completes them
                writes, want_fp8 = self._plan_expert_writes(sd, fp8)
                written = {key for unit in writes for key in unit[:2]}
                kept = {k: v for k, v in sd.items() if k in used and self._own_expert_key(k)}
                steps.append(lambda: self._write_experts(writes, want_fp8))
                steps.append(lambda: self._keep_expert_parts({
                    k: _Written(v.shape, v.dtype, want_fp8) if k in written else v if self._expert_parts.get(k) is v
                    else v.read() if isinstance(v, _Unread) else v.detach().clone() for k, v in kept.items()}))
        unexpected = sorted(set(sd) - used)
        if strict and unexpected:
            raise KeyError(f"state_dict: unexpected keys for layer {self.layer_idx}: {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}")
        for step in steps:
            step()
        self.refresh_derived_weights()
        self.weights_loaded = True
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def refresh_derived_weights(self) -> None:
        """Rebuilds, now and in place, the copies the layer derives from its weights: the absorbed
        W_UK / W_UV and the FP8 GEMMs' block-major scales. The layer notices in-place changes
        through the weights' version counters, and load_state_dict and load_hf_state_dict refresh
        them themselves; call this after writes the counters do not show (through `param.data`,
        a collective such as dist.broadcast into the Parameters, inference tensors, a compiled
        layer's steps), and before replaying CUDA graphs captured with the old weights."""
        for module in self.modules():
            if isinstance(module, (Linear, Experts, MLAttention)):
                module.refresh_derived()

    def _keep_expert_parts(self, parts: dict) -> None:
        self._expert_parts, self._expert_parts_said = parts, False

    def _expert_units(self, sd: dict) -> list:
        """The routed experts' matrices in sd, this rank's: (weight key, scale key, fused name, local
        expert or None for a fused tensor of all, first row in the fused matrix, expected shape)."""
        moe, cfg = self.mlp, self.cfg
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        units = []
        for key in sd:
            m = _EXPERT_KEY.match(key)
            if m and m.group(3) == "weight" and self._own_expert_key(key):
                name = m.group(2)
                units.append((key, key + "_scale_inv", "down_proj" if name == "down_proj" else "gate_up_proj",
                              int(m.group(1)) - moe.first_expert, inter if name == "up_proj" else 0,
                              (hidden, inter) if name == "down_proj" else (inter, hidden)))
            elif key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
                units.append((key, key + "_scale_inv", key[len("mlp.experts."):], None, 0,
                              (cfg.n_routed_experts, *((2 * inter, hidden) if "gate_up" in key else (hidden, inter)))))
        return units

    def _check_written_format(self, sd: dict, fp8: bool | None) -> None:
        """Expert tensors an earlier strict=False call wrote into the fused weights were converted
        to that call's format: this call must want the same (fp8 may not change half-way)."""
        for key, v in sd.items():
            if isinstance(v, _Written) and not key.endswith("_scale_inv"):
                want = (v.dtype == FP8) if fp8 is None else fp8
                if want != v.as_fp8:
                    raise ValueError(f"fp8: {key!r} of layer {self.layer_idx} was loaded by an earlier call "
                                     f"{'as' if v.as_fp8 else 'without'} FP8; a shard-by-shard load passes every "
                                     f"call the same fp8, got {fp8}")
                return

    def _plan_expert_writes(self, sd: dict, fp8: bool | None):
        """Of the experts' matrices in sd (this call's and those kept from earlier ones), those that can
        be written into the fused weights now: every check passes, an FP8 one's scale is there, and
        all the experts' weights so far share one dtype (else all are kept: the call that completes
        them raises as a strict one would). Returns (writes, want_fp8)."""
        idx, device = self.layer_idx, self.input_layernorm.weight.device
        units = [u for u in self._expert_units(sd) if not isinstance(sd[u[0]], _Written)]
        dtypes = {v.dtype for k, v in sd.items() if self._own_expert_key(k) and not k.endswith("_scale_inv")}
        if not units or len(dtypes) != 1:
            return [], False
        (dtype,) = dtypes
        want_fp8 = dtype == FP8 if fp8 is None else fp8
        writes = []
        for key, scale_key, name, expert, row, shape in units:
            w, scale = sd[key], sd.get(scale_key)
            if want_fp8 and shape[-1] % BLOCK or (dtype == FP8 and scale is None):
                continue  # (k: the call that completes them raises; the scale: a later call brings it)
            try:
                _check_tensor(key, w, "weight", idx, device)
                _check_weight_shape(key, w, shape, idx)
                _check_scale(scale_key, scale, w, key, (*shape[:-2], -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK)),
                             idx, device)
            except (TypeError, ValueError, KeyError):
                continue  # (kept: the call that completes the experts raises, naming it)
            if expert is None:  # fused: this rank's experts
                lo, hi = self.mlp.first_expert, self.mlp.first_expert + self.mlp.num_local_experts
                w, scale = w[lo:hi], None if scale is None else scale[lo:hi]
            writes.append((key, scale_key if scale is not None else None, name, expert, row, w, scale))
        return writes, want_fp8

    def _write_experts(self, writes: list, want_fp8: bool) -> None:
        """_plan_expert_writes' matrices into the fused weights (made in the format first where the
        layer holds another: the experts are incomplete until the last shard anyway)."""
        if not writes:
            return
        experts, device, cfg = self.mlp.experts, self.input_layernorm.weight.device, self.cfg
        inter, hidden, count = cfg.moe_intermediate_size, cfg.hidden_size, self.mlp.num_local_experts
        dtype = FP8 if want_fp8 else self.dtype
        targets = {}
        for name, shape in (("gate_up_proj", (count, 2 * inter, hidden)), ("down_proj", (count, hidden, inter))):
            scale_shape = (count, -(-shape[1] // BLOCK), -(-shape[2] // BLOCK))
            scale = (name + "_scale_inv", scale_shape, torch.float32)
            for attr, want_shape, want_dtype in ((name, shape, dtype), scale):
                t = getattr(experts, attr)
                if attr.endswith("_scale_inv") and not want_fp8:
                    continue
                if not writable_in_place(t, want_shape, want_dtype, device):
                    store_weight(experts, attr, torch.empty(want_shape, dtype=want_dtype, device=device))
            targets[name] = (getattr(experts, name), getattr(experts, name + "_scale_inv") if want_fp8 else None)
        if not want_fp8:
            for name in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
                store_weight(experts, name, None)
        for _, _, name, expert, row, w, scale in writes:
            one = expert is not None  # (one expert's matrix, or a fused tensor of all)
            self._copy_experts([(row, [w] if one else w, None if scale is None else ([scale] if one else scale))],
                               *targets[name], want_fp8, experts=[expert] if one else None)

    def _own_expert_key(self, key: str) -> bool:
        """Whether key names a routed expert tensor this layer keeps (fused, or one of its experts'
        on this EP rank)."""
        if _FUSED_EXPERT_KEY.match(key):
            return True
        m = _EXPERT_KEY.match(key)
        return m is not None and self.mlp.first_expert <= int(m.group(1)) < self.mlp.first_expert + \
            self.mlp.num_local_experts

    def _check_experts(self, sd: dict, used: set, fp8: bool | None, strict: bool, missing: list):
        """Checks the routed experts' tensors (fused 5.x or per-expert names) and returns what
        _load_experts takes: ((gate_up, gate_up scale), (down, down scale)), each a tensor [L, n, k]
        or a list of L per-expert [n, k] parts ((gate, up) lists for gate_up); None when some are
        missing and not strict (their keys appended to missing; those there marked used)."""
        moe, cfg, idx = self.mlp, self.cfg, self.layer_idx
        lo, hi = moe.first_expert, moe.first_expert + moe.num_local_experts
        inter, hidden, experts = cfg.moe_intermediate_size, cfg.hidden_size, cfg.n_routed_experts
        device = self.input_layernorm.weight.device
        first = None  # (key, dtype) of the first expert weight: the others must match it

        def same_format(key, t, fp8_only):
            nonlocal first
            if first is None:
                first = (key, t.dtype)
            elif (t.dtype == FP8) != (first[1] == FP8) or (not fp8_only and t.dtype != first[1]):
                # (FP8 next to float cannot be stacked or run as one grouped GEMM)
                raise ValueError(f"state_dict: {key!r} of layer {idx}: expected {first[1]} like {first[0]!r} "
                                 f"(the experts' weights share one format), got {t.dtype}")

        def want_fp8(key, t):
            if (t.dtype == FP8 if fp8 is None else fp8) and t.shape[-1] % BLOCK:
                raise ValueError(f"fp8: {key!r} of layer {idx} as FP8 needs k % {BLOCK} == 0 for the expert GEMMs, "
                                 f"got k={t.shape[-1]}")

        fused = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
        if any(k in sd for k in fused):  # transformers 5.x
            used.update(k for k in (*fused, *(k + "_scale_inv" for k in fused)) if k in sd)
            out = []
            absent = [key for key in fused if key not in sd]
            if absent and strict:
                raise KeyError(f"state_dict: missing {absent[0]!r} for layer {idx}")
            if absent:
                missing.extend(absent)
                return None
            for key, (n, k) in zip(fused, ((2 * inter, hidden), (hidden, inter))):
                w = sd[key]
                _check_tensor(key, w, "weight", idx, device)
                _check_weight_shape(key, w, (experts, n, k), idx)
                same_format(key, w, fp8_only=True)
                scale = sd.get(key + "_scale_inv")
                _check_scale(key + "_scale_inv", scale, w, key, (experts, -(-n // BLOCK), -(-k // BLOCK)), idx, device)
                want_fp8(key, w)
                out.append((w[lo:hi], scale[lo:hi] if scale is not None else None))
            return tuple(out)
        # 4.x / checkpoint files: one module per expert; other ranks' experts are skipped (ids past
        # the config's experts are not another rank's: left unused, so strict loading refuses them)
        for key in sd:
            m = _EXPERT_KEY.match(key)
            if m and int(m.group(1)) < experts and not lo <= int(m.group(1)) < hi:
                used.add(key)
        absent = [f"mlp.experts.{e}.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")
                  for e in range(lo, hi) if f"mlp.experts.{e}.{name}.weight" not in sd]
        if absent and strict:
            raise KeyError(f"state_dict: missing {absent[0]!r} for layer {idx}")
        if absent:
            missing.extend(absent)
            used.update(k for k in sd if (m := _EXPERT_KEY.match(k)) and lo <= int(m.group(1)) < hi)
            return None
        parts, scale_dtype = {}, None
        for name in ("gate_proj", "up_proj", "down_proj"):
            shape = (hidden, inter) if name == "down_proj" else (inter, hidden)
            ws, ss = [], []
            for e in range(lo, hi):
                key = f"mlp.experts.{e}.{name}.weight"
                used.add(key)
                w = sd[key]
                _check_tensor(key, w, "weight", idx, device)
                _check_weight_shape(key, w, shape, idx)
                same_format(key, w, fp8_only=False)
                scale_key = key + "_scale_inv"
                scale = sd.get(scale_key)
                if scale is not None:
                    used.add(scale_key)
                _check_scale(scale_key, scale, w, key, (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)), idx, device)
                if scale is not None:
                    if scale_dtype is None:
                        scale_dtype = (scale_key, scale.dtype)
                    elif scale.dtype != scale_dtype[1]:  # (torch.stack cannot promote between FP8 kinds)
                        raise ValueError(f"state_dict: {scale_key!r} of layer {idx}: expected {scale_dtype[1]} like "
                                         f"{scale_dtype[0]!r} (the experts' scales share one dtype), got {scale.dtype}")
                ws.append(w)
                ss.append(scale)
            want_fp8(f"mlp.experts.{lo}.{name}.weight", ws[0])
            parts[name] = (ws, ss if ss[0] is not None else None)
        return (parts["gate_proj"], parts["up_proj"]), parts["down_proj"]

    def _load_experts(self, gate_up, down, fp8: bool | None) -> None:
        """Writes _check_experts' tensors (checked already) into the experts' weights one expert at a
        time: each expert's matrices (gate and up into their rows of gate_up) go straight into the
        layer's fused [L, n, k] tensors, converted on the way where the format changes. Only one
        expert's converted matrix exists beside the weights (no torch.stack / cat of all experts: at
        V3's size those were 1.7x the experts' 10.7 GiB at the load's peak). Into the tensors the
        layer holds where they have the stored format, else into new ones that replace them."""
        inter = self.cfg.moe_intermediate_size
        if isinstance(gate_up[0], tuple):  # per-expert parts: gate rows then up rows
            (g, gs), (u, us) = gate_up
            gate_up = [(0, g, gs), (inter, u, us)]
        else:
            gate_up = [(0, *gate_up)]
        for name, parts in (("gate_up_proj", gate_up), ("down_proj", [(0, *down)])):
            self._store_expert_parts(name, parts, fp8)

    def _store_expert_parts(self, name: str, parts: list, fp8: bool | None) -> None:
        """parts: (first row, weights, scales or None) whose rows fill experts.<name>; weights [L, n, k]
        (a tensor, or a list of L [n, k] tensors) in the checkpoint's format."""
        experts, device = self.mlp.experts, self.input_layernorm.weight.device
        src = parts[0][1][0]
        want_fp8 = (src.dtype == FP8) if fp8 is None else fp8
        count = len(parts[0][1])
        rows = sum(w[0].shape[0] for _, w, _ in parts)
        shape = (count, rows, src.shape[-1])
        dtype = FP8 if want_fp8 else self.dtype
        current, current_scale = getattr(experts, name), getattr(experts, name + "_scale_inv")
        scale_shape = (count, -(-rows // BLOCK), -(-shape[2] // BLOCK))

        def reuse(t, shape, dtype):  # the tensor the layer holds, where the values can go into it
            return t if writable_in_place(t, shape, dtype, device) else torch.empty(shape, dtype=dtype, device=device)

        out = reuse(current, shape, dtype)
        out_scale = reuse(current_scale, scale_shape, torch.float32) if want_fp8 else None
        self._copy_experts(parts, out, out_scale, want_fp8)
        if out is not current:
            store_weight(experts, name, out)
        if out_scale is not current_scale:
            store_weight(experts, name + "_scale_inv", out_scale)

    def _copy_experts(self, parts: list, out: torch.Tensor, out_scale: torch.Tensor | None, want_fp8: bool,
                      experts=None) -> None:
        """Copies parts (as _store_expert_parts takes them) into out / out_scale, the fused weights in
        their final format; experts: the local experts parts hold (default: all of out's, in order);
        tensors already written (_Written) are skipped."""
        import dskernels
        device = out.device
        with torch.no_grad():
            for row, ws, ss in parts:
                # fused, the stored format: one copy (converted without a temporary on one device)
                if (isinstance(ws, torch.Tensor) and row == 0 and ws.shape == out.shape
                        and want_fp8 == (ws.dtype == FP8) and (ws.dtype == out.dtype or ws.device == device)):
                    out.copy_(ws)
                    if want_fp8:
                        out_scale.copy_(ss)
                    continue
                for i, e in enumerate(range(out.shape[0]) if experts is None else experts):
                    if isinstance(ws[i], _Written):
                        continue
                    # (an unread one read here: one expert's matrix of the checkpoint in memory at a time)
                    w, scale = _read(ws[i]), None if ss is None else _read(ss[i])
                    n = w.shape[0]
                    if want_fp8 and w.dtype != FP8:  # quantized per expert (row % 128 == 0: the same blocks)
                        w, scale = dskernels.per_block_cast_to_fp8(w.to(device=device, dtype=torch.bfloat16)
                                                                   .contiguous(), round_scale=self.cfg.fp8_round_scale)
                    elif not want_fp8 and w.dtype == FP8:  # the FP8 bytes travel, the layer's device computes
                        w = dequantize_block_fp8(w.to(device), scale.to(device), self.dtype)
                    out[e, row:row + n].copy_(w)  # (copy_ converts a float dtype as .to() rounds)
                    if want_fp8:
                        out_scale[e, row // BLOCK:row // BLOCK + scale.shape[0]].copy_(scale)
                    del w, scale
