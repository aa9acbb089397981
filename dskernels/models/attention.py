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

DeepSeek-V3.2 (cfg.index_topk set): the indexer (models/indexer.py) picks the tokens each query
attends to, and attention runs in the absorbed form over those only: `flash_mla_sparse_fwd` over the
new tokens' latents without a cache, `flash_mla_sparse_decode` over the paged cache (which may then
also be V3.2's FP8 layout, 656 bytes per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dskernels
from dskernels.models.config import DeepseekV3Config
from dskernels.models.indexer import Indexer
from dskernels.models.linear import (Linear, RMSNorm, device_moves_only, norm_and_cast, refuse_gradient,
                                      shared_cast, triton_fusable, writable_in_place)
from dskernels.models.paged import as_int32, cache_rows, check_slots, check_tables, write_rows
from dskernels.models.rope import rope_inv_freq, rope_qk
from dskernels.ops.invariant import FLOAT_DTYPES, invariant_mm, invariant_path

_LORA_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps
FP8 = torch.float8_e4m3fn
_ATTENTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # flash_mla_with_kvcache's / the sparse ops' q
_FP8_CACHE_BYTES = 656  # V3.2's FP8 latent cache: 512 e4m3, 4 fp32 tile scales, 64 bf16 rope values per token


def _after_load(module: "MLAttention", incompatible_keys) -> None:
    """load_state_dict's post hook (a function, not a lambda: the layer pickles)."""
    module.refresh_derived()
    if module.inv_freq.is_meta and not module.kv_b_proj.weight.is_meta:
        # load_state_dict(assign=True) into a meta-built layer (accelerate's way) gives the loaded
        # tensors; the rope frequencies are in no state dict: made again where the weights went
        module.reset_inv_freq(module.kv_b_proj.weight.device)
        if module.indexer is not None:
            module.indexer.rebuild_hadamard(module.kv_b_proj.weight.device)


def _in_place(*tensors: torch.Tensor) -> bool:
    """Whether _per_head_nt may write into a caller's buffer: eagerly, and no tensor needs a
    gradient (bmm's out= has none; under torch.compile inductor plans the buffers itself)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not (torch.compiler.is_compiling() or needs_grad)


def _per_head_nt(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per head h: x[:, :, h] @ w[h].T, x [b, s, h, k], w [h, n, k] -> [b, s, h, n] (the absorbed
    W_UK and W_UV). With `out` (a [b, s, h, n] view whose b and s merge; only where _in_place): one
    batched GEMM over the heads that writes the product there, in the layout the caller reads.
    dskernels.batch_invariant(): the fixed-tile kernel, whose row sums don't follow b * s as bmm's do."""
    b, s, h, k = x.shape
    n = w.shape[1]
    heads_first = x.reshape(b * s, h, k).transpose(0, 1)  # [h, b * s, k]
    invariant = x.dtype in FLOAT_DTYPES and invariant_path(x.device, x, w)
    if out is None:
        if invariant:
            return invariant_mm(heads_first, w, x.dtype).transpose(0, 1).reshape(b, s, h, n)
        return torch.einsum("bshk,hnk->bshn", x, w)
    out_heads_first = out.view(b * s, h, n).transpose(0, 1)
    if invariant:
        from dskernels.triton import matmul as triton_matmul

        triton_matmul.matmul_nt(heads_first, w, out_heads_first)
    else:
        torch.bmm(heads_first, w.transpose(1, 2), out=out_heads_first)
    return out


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, dtype=None, device=None, index_fp8: bool = True,
                 fp8_weights: bool = False):
        super().__init__()
        self.cfg = cfg
        self.num_heads = h = cfg.num_attention_heads
        fp8, bias = fp8_weights, cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype, device, bias=bias, fp8=fp8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LORA_NORM_EPS, dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, dtype, device, fp8=fp8)
        else:
            self.q_proj = Linear(cfg.hidden_size, h * cfg.qk_head_dim, dtype, device, fp8=fp8)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_cache_dim, dtype, device, bias=bias, fp8=fp8)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, _LORA_NORM_EPS, dtype, device)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, device, fp8=fp8)
        self.o_proj = Linear(h * cfg.v_head_dim, cfg.hidden_size, dtype, device, bias=bias, fp8=fp8)
        inv_freq, self.attention_factor = rope_inv_freq(cfg.rope_parameters, cfg.qk_rope_head_dim,
                                                        cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.softmax_scale = cfg.softmax_scale
        self.w_uk = self.w_uv = None  # absorbed up-projections, built from kv_b_proj on first cached call
        self._absorbed_from = ()  # kv_b_proj's tensors and version counters they were built from
        self.indexer = Indexer(cfg, dtype, device, index_fp8, fp8) if cfg.index_topk is not None else None
        # load_state_dict copies into kv_b_proj in place: a compiled step (which cannot read the version
        # counters), inference tensors (which have none) and a captured CUDA graph would keep the old
        # W_UK / W_UV
        self.register_load_state_dict_post_hook(_after_load)

    def refresh_derived(self) -> None:
        """Builds W_UK / W_UV from kv_b_proj again: now and in place where they exist (a CUDA graph
        captured with them reads the new values), else at the next cached call. Needed only after an
        in-place change to kv_b_proj that the version counters cannot show (a write through `.data`,
        a collective into the Parameter, a compiled layer's steps, an inference tensor):
        load_state_dict and load_hf_state_dict call it themselves."""
        w = self.kv_b_proj.weight
        if self.w_uk is not None and not w.is_meta and w.device == self.w_uk.device:
            self.absorb(self.w_uk.dtype)
        else:
            self.w_uk = self.w_uv = None
            self._absorbed_from = ()

    def _apply(self, fn, recurse=True):
        module = super()._apply(device_moves_only(fn, lambda t: t is self.inv_freq), recurse)  # rope stays fp32
        self.w_uk = self.w_uv = None  # (derived copies: not left behind on the old device or in the old dtype)
        self._absorbed_from = ()
        # not in the state dict: recomputed where it went, so to_empty() of a meta-built layer leaves it exact
        self.reset_inv_freq(self.inv_freq.device)
        return module

    def reset_inv_freq(self, device: torch.device) -> None:
        inv_freq, _ = rope_inv_freq(self.cfg.rope_parameters, self.cfg.qk_rope_head_dim,
                                    self.cfg.max_position_embeddings)
        self.inv_freq = inv_freq.to(device)

    def absorb(self, dtype: torch.dtype) -> None:
        """W_UK [h, nope, r] and W_UV [h, v, r] from kv_b_proj (dequantized for an FP8 checkpoint, as
        DeepSeek's inference code does), in the compute dtype."""
        cfg = self.cfg
        w = self.kv_b_proj.dequantized(dtype).view(self.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                                   cfg.kv_lora_rank)
        uk, uv = w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]
        if (not torch.compiler.is_compiling()
                and writable_in_place(self.w_uk, uk.shape, uk.dtype, uk.device, contiguous=False)
                and writable_in_place(self.w_uv, uv.shape, uv.dtype, uv.device, contiguous=False)):
            # in place: a CUDA graph captured with them reads the new values
            self.w_uk.copy_(uk)
            self.w_uv.copy_(uv)
        else:
            self.w_uk, self.w_uv = uk.contiguous(), uv.contiguous()
        self._absorbed_from = () if torch.compiler.is_compiling() else self._kv_b_state()

    def _kv_b_state(self) -> tuple:
        """kv_b_proj's weight (and scale) with their version counters and memory: what W_UK / W_UV
        were built from. An in-place update (load_state_dict's copy_, a trainer's weight sync) bumps
        a counter, a module move or cast gives the Parameter new memory, a new Parameter changes the
        identity; each makes the next cached call absorb again. (Inference tensors have no counter.)"""
        tensors = (self.kv_b_proj.weight, self.kv_b_proj.weight_scale_inv)
        return tuple((t, None if t is None else (None if t.is_inference() else t._version,
                                                 t.untyped_storage().data_ptr())) for t in tensors)

    def _absorbed_stale(self, dtype: torch.dtype, device: torch.device) -> bool:
        if self.w_uk is None or self.w_uk.dtype != dtype or self.w_uk.device != device:
            return True
        if torch.compiler.is_compiling():  # a compiled step reads the weights it was traced with
            return False
        return not self._absorbed_from or any(
            t is not old or version != old_version
            for (t, version), (old, old_version) in zip(self._kv_b_state(), self._absorbed_from))

    def input_layers(self) -> tuple[Linear, ...]:
        """The projections that read the attention's input x (V3.2: the indexer's too)."""
        indexer = (self.indexer.wk, self.indexer.weights_proj) if self.indexer is not None else ()
        return self.q_a_proj if self.cfg.q_lora_rank else self.q_proj, self.kv_a_proj_with_mqa, *indexer

    def _project(self, x: torch.Tensor, positions: torch.Tensor, x_fp8):
        cfg = self.cfg
        b, s, _ = x.shape
        q_resid = q_resid_fp8 = None
        # One FP8 cast of each input however many projections read it, in the norm's kernel where it can
        if x_fp8 is None:
            x_fp8 = shared_cast(x, *self.input_layers())
        if cfg.q_lora_rank:
            q_resid, q_resid_fp8 = norm_and_cast(self.q_a_layernorm, self.q_a_proj(x, x_fp8), self.q_b_proj,
                                                 *([self.indexer.wq_b] if self.indexer is not None else []))
            q = self.q_b_proj(q_resid, q_resid_fp8)
        else:
            q = self.q_proj(x, x_fp8)
        q = q.view(b, s, self.num_heads, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x, x_fp8).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope, k_rope = rope_qk(q_rope, k_rope, positions, self.inv_freq, self.attention_factor, cfg.rope_interleave)
        rope = (positions, self.inv_freq, self.attention_factor)  # the indexer rotates its q and k by these angles
        return q_nope, q_rope, latent, k_rope, (x, q_resid, rope, x_fp8, q_resid_fp8)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                index_cache: torch.Tensor | None = None, kv_cache_scale: torch.Tensor | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_fp8: x's rows already cast for input_layers() (the layer's norm_and_cast), or None."""
        # Cache arguments without a cache would be ignored by the prefill from scratch: refused instead
        tables = [name for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens))
                  if t is not None]
        if tables and kv_cache is None:
            raise ValueError(f"{', '.join(tables)}: expected only with a kv_cache (the paged path; without one the "
                             f"layer attends over x's tokens alone), got kv_cache=None")
        if index_cache is not None and (self.indexer is None or kv_cache is None):
            raise ValueError("index_cache: only a DeepSeek-V3.2 layer (config index_topk) reads one, "
                             "beside its kv_cache")
        if kv_cache_scale is not None and (kv_cache is None or kv_cache.dtype != FP8 or self.indexer is not None):
            raise ValueError("kv_cache_scale: only with a float8_e4m3fn kv_cache of a dense-attention (V3) layer "
                             "(its per-tensor scale; V3.2's FP8 layout carries its own scales)")
        if (kv_cache is not None or self.indexer is not None) and x.dtype not in _ATTENTION_DTYPES:
            # checked before the cache write: a call that raises leaves the cache as it was
            raise TypeError(f"x: the {'paged' if kv_cache is not None else 'V3.2 sparse'} attention's kernels take "
                            f"bfloat16, float16 or float32, got a {x.dtype} layer (its prefill without a cache "
                            f"runs in any float dtype)")
        if (kv_cache is not None or self.indexer is not None) and torch.is_grad_enabled():
            # the weights too: one that requires grad (x does not) lost the decode kernel's share
            refuse_gradient("the paged (kv_cache) attention" if kv_cache is not None
                            else "DeepSeek-V3.2's sparse attention", x, *self.parameters())
        if kv_cache is not None:
            out = self._attend_paged(x, positions, x_fp8, kv_cache, block_table, cache_seqlens, index_cache,
                                     kv_cache_scale)
            return self.o_proj(out.flatten(2))
        q_nope, q_rope, latent, k_rope, indexer_inputs = self._project(x, positions, x_fp8)
        if self.indexer is None:
            out = self._attend_new_tokens(q_nope, q_rope, latent, k_rope)
        elif q_nope.numel() == 0:  # no tokens: nothing to select from or attend to
            out = q_nope.new_zeros(*q_nope.shape[:3], self.cfg.v_head_dim)
        else:
            selected = self.indexer.select_new_tokens(*indexer_inputs)
            out = self._attend_selected_new_tokens(q_nope, q_rope, latent, k_rope, selected)
        return self.o_proj(out.flatten(2))

    @staticmethod
    def _check_kv_cache_scale(scale, device) -> torch.Tensor:
        """A dense FP8 cache's per-tensor scale (dequantized = fp8 * scale): float32, one element on
        the cache's device; None means 1.0 (as serving engines default it without calibration). It
        must be positive and finite, which is not checked (that would read it on the host)."""
        if scale is None:
            return torch.ones(1, dtype=torch.float32, device=device)
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise TypeError(f"kv_cache_scale: expected a float32 tensor, got {got}")
        if scale.numel() != 1 or scale.device != device:
            raise ValueError(f"kv_cache_scale: expected one element on {device} (the cache's device), got shape "
                             f"{tuple(scale.shape)} on {scale.device}")
        return scale.reshape(1)

    def _absorbed_query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """[q_nope W_UK | q_rope]: scores against [latent | k_rope] equal q_nope . k_nope + q_rope . k_rope."""
        if self._absorbed_stale(q_nope.dtype, q_nope.device):
            self.absorb(q_nope.dtype)
        w = self.w_uk.transpose(1, 2)  # [h, r, n]
        if not _in_place(q_nope, q_rope, w):
            return torch.cat([_per_head_nt(q_nope, w), q_rope], dim=-1)
        # The product goes straight into the first r columns of the result, q_rope behind it: no
        # [h, b * s, r] temporary beside the concatenation (4 GiB next to its 4.5 GiB at a 32K-token
        # prefill chunk of 128 heads).
        b, s, h, _ = q_nope.shape
        r = w.shape[1]
        q = torch.empty(b, s, h, r + q_rope.shape[-1], dtype=q_nope.dtype, device=q_nope.device)
        _per_head_nt(q_nope, w, out=q[..., :r])
        q[..., r:].copy_(q_rope)
        return q

    def _values(self, latents: torch.Tensor) -> torch.Tensor:
        """Each head's output latent [b, s, h, r] through W_UV: its values [b, s, h, v], contiguous
        (o_proj reads them flattened per token)."""
        if not _in_place(latents, self.w_uv):
            return _per_head_nt(latents, self.w_uv)
        b, s, h, _ = latents.shape
        values = torch.empty(b, s, h, self.w_uv.shape[1], dtype=latents.dtype, device=latents.device)
        return _per_head_nt(latents, self.w_uv, out=values)

    def _attend_selected_new_tokens(self, q_nope, q_rope, latent, k_rope, selected) -> torch.Tensor:
        """V3.2 without a cache: token i of sequence b attends to the positions selected[b, i] (-1:
        none) among the S new tokens, with flash_mla_sparse_fwd over the batch's latents."""
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        q = self._absorbed_query(q_nope, q_rope).reshape(b * s, h, cfg.kv_cache_dim)
        kv = torch.cat([latent, k_rope], dim=-1).reshape(b * s, 1, cfg.kv_cache_dim)
        first = (torch.arange(b, device=selected.device, dtype=torch.int32) * s)[:, None, None]
        indices = torch.where(selected >= 0, selected + first, -1).reshape(b * s, 1, selected.shape[-1])
        out, _, _ = dskernels.flash_mla_sparse_fwd(q.contiguous(), kv, indices, self.softmax_scale,
                                                   d_v=cfg.kv_lora_rank)
        return self._values(out.view(b, s, h, cfg.kv_lora_rank).to(q_nope.dtype))

    def _attend_new_tokens(self, q_nope, q_rope, latent, k_rope) -> torch.Tensor:
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(b, s, h, cfg.qk_rope_head_dim)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if b > 1 and invariant_path(q.device, q, k, v):
            # dskernels.batch_invariant(): one call per sequence. The kernel SDPA runs (and how it
            # splits its work) may follow the batch: CPU's gives a sequence other bits beside others.
            out = v.new_empty(b, h, s, cfg.v_head_dim)
            for i in range(b):
                out[i:i + 1] = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], is_causal=True,
                                                               scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.transpose(1, 2)  # [b, s, h, v]

    def _attend_paged(self, x, positions, x_fp8, kv_cache, block_table, cache_seqlens, index_cache,
                      kv_cache_scale=None) -> torch.Tensor:
        # The projections are this frame's alone (not the caller's, not an argument tuple's), so they
        # are dropped once the cache is written and the absorbed query built: a long prefill chunk's
        # q is [b, s, h, 192] beside the attention's own buffers (1.6 GiB at 32768 tokens, 128 heads)
        q_nope, q_rope, latent, k_rope, indexer_inputs = self._project(x, positions, x_fp8)
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        d = cfg.kv_cache_dim
        if block_table is None or cache_seqlens is None:
            raise ValueError("block_table, cache_seqlens: required with kv_cache")
        # V3 (dense attention): a float8_e4m3fn cache of d values per token with one per-tensor scale
        # (flash_mla_with_kvcache's k_scale); V3.2: its own 656-byte FP8 layout (fp8_cache).
        dense_fp8 = self.indexer is None and kv_cache.dtype == FP8
        fp8_cache = kv_cache.dtype in (torch.uint8, FP8) and not dense_fp8
        if dense_fp8:  # checked before any early return
            kv_cache_scale = self._check_kv_cache_scale(kv_cache_scale, kv_cache.device)
        width = _FP8_CACHE_BYTES if fp8_cache else d
        if fp8_cache and (self.indexer is None or (cfg.kv_lora_rank, cfg.qk_rope_head_dim) != (512, 64)):
            raise ValueError(f"kv_cache: the FP8 layout ({_FP8_CACHE_BYTES} bytes per token) is DeepSeek-V3.2's "
                             f"(kv_lora_rank 512, qk_rope_head_dim 64, sparse attention); got a {kv_cache.dtype} "
                             f"cache for kv_lora_rank {cfg.kv_lora_rank}, qk_rope_head_dim {cfg.qk_rope_head_dim}"
                             f"{'' if self.indexer is not None else ', dense attention'}")
        if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != width:
            what = f"{_FP8_CACHE_BYTES} (V3.2's FP8 layout)" if fp8_cache else f"{d} (kv_lora_rank + qk_rope_head_dim)"
            raise ValueError(f"kv_cache: expected [num_pages, page_size, 1, {what}], got {list(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache: expected a contiguous tensor (written in place)")
        if tuple(block_table.shape[:1]) != (b,) or tuple(cache_seqlens.shape) != (b,):
            raise ValueError(f"block_table, cache_seqlens: expected batch {b}, got {list(block_table.shape)} "
                             f"and {list(cache_seqlens.shape)}")
        check_tables(block_table, cache_seqlens, b, kv_cache.device)
        if d % 16:
            raise ValueError(f"kv_cache: the paged path needs kv_lora_rank + qk_rope_head_dim to be a multiple "
                             f"of 16 (flash_mla_with_kvcache's head dimension), got {d}")
        if fp8_cache and q_nope.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"kv_cache: V3.2's FP8 layout needs a bfloat16 or float32 layer (its dequantized "
                            f"latents pass float16's range), got a {q_nope.dtype} layer")
        page_size = kv_cache.shape[1]
        if self.indexer is not None:
            self._check_index_cache(index_cache, kv_cache.shape[0], page_size, q_nope.dtype)
        if s == 0:
            return q_nope.new_zeros(b, 0, h, cfg.v_head_dim)
        if kv_cache.device.type == "cpu" and not torch.compiler.is_compiling():  # free there: bad lengths
            # or pages raise before any write (under torch.compile the graph cannot read values)
            check_slots(block_table, cache_seqlens, s, kv_cache.shape[0], page_size)
        block_table, cache_seqlens = as_int32(block_table), as_int32(cache_seqlens)
        # 1. write [latent | k_rope] of the new tokens at slots lens[b] .. lens[b] + s - 1 (no host sync)
        flat = None
        # (the kernel stores a float cache's values as they are: its dtype must be the layer's)
        if self.indexer is None and (dense_fp8 or kv_cache.dtype == latent.dtype) and triton_fusable(latent, k_rope):
            from dskernels.triton import layer as triton_layer  # one kernel for _write_cache's ~12

            triton_layer.write_latent_cache(latent, k_rope, kv_cache, block_table, cache_seqlens,
                                            kv_cache_scale if dense_fp8 else None)
        elif fp8_cache and triton_fusable(latent, k_rope):  # V3.2's layout: quantized in the same kernel
            from dskernels.triton import layer as triton_layer

            triton_layer.write_sparse_latent_cache(latent, k_rope, kv_cache, block_table, cache_seqlens)
        else:
            flat = self._write_cache(latent, k_rope, kv_cache, block_table, cache_seqlens, kv_cache_scale, fp8_cache)
        # 2. absorbed query: q_nope W_UK lives in the latent space, so scores = q_lat . latent + q_rope . k_rope
        q = self._absorbed_query(q_nope, q_rope)
        out_dtype = q_nope.dtype
        del q_nope, q_rope, latent, k_rope  # (dead from here: see the top)
        if self.indexer is None:
            del indexer_inputs  # (q_resid and its FP8 cast)
        seqlens = (cache_seqlens + s).to(torch.int32)
        if self.indexer is None:
            metadata, num_splits = dskernels.get_mla_metadata(seqlens, s * h, 1)
            out, _ = dskernels.flash_mla_with_kvcache(q if dense_fp8 else q.to(kv_cache.dtype), kv_cache, block_table,
                                                      seqlens, cfg.kv_lora_rank, metadata, num_splits,
                                                      softmax_scale=self.softmax_scale, causal=True,
                                                      k_scale=kv_cache_scale if dense_fp8 else None)
        else:  # V3.2: the indexer's positions (causal by construction) become cache slots
            selected = self.indexer.select_paged(*indexer_inputs, index_cache, block_table, cache_seqlens, flat)
            if triton_fusable(q) and selected.is_contiguous():
                from dskernels.triton import layer as triton_layer

                indices = triton_layer.selected_slots(selected, block_table, page_size)
            else:
                page = block_table.long().gather(1, (selected.long().clamp(min=0) // page_size).flatten(1))
                cache_slots = page.view(selected.shape) * page_size + selected % page_size
                indices = torch.where(selected >= 0, cache_slots, -1).to(torch.int32)
            out, _ = dskernels.flash_mla_sparse_decode(q.contiguous(), kv_cache, indices, cfg.kv_lora_rank,
                                                       self.softmax_scale, fp8_cache)
        # 3. the output latent through W_UV gives each head's value vector
        return self._values(out.to(out_dtype))

    @staticmethod
    def _write_cache(latent, k_rope, kv_cache, block_table, cache_seqlens, kv_cache_scale,
                     fp8_cache: bool) -> torch.Tensor:
        """Token j of sequence b into slot cache_seqlens[b] + j (through the block table) of a float
        cache, a float8_e4m3fn one with kv_cache_scale, or V3.2's FP8 layout (fp8_cache: 656 bytes
        per token), in torch's ops (for the first two, the definition of the Triton
        layer.write_latent_cache). Returns the flat cache rows [B * S] (-1: a slot with no row,
        not written; models/paged.py)."""
        b, s, _ = latent.shape
        flat = cache_rows(block_table, cache_seqlens, s, kv_cache.shape[0], kv_cache.shape[1])
        new = torch.cat([latent, k_rope], dim=-1).reshape(b * s, latent.shape[-1] + k_rope.shape[-1])
        width = kv_cache.shape[-1]
        if fp8_cache:
            write_rows(kv_cache.view(torch.uint8).view(-1, width), flat,
                       dskernels.quantize_sparse_kv_cache(new).view(torch.uint8))
        elif kv_cache.dtype == FP8:
            # e4m3 saturates at 448: a latent past 448 * scale is clamped rather than made NaN
            values = (new.float() / kv_cache_scale).clamp(-448, 448).to(FP8)
            write_rows(kv_cache.view(torch.uint8).view(-1, width), flat, values.view(torch.uint8))
        else:
            write_rows(kv_cache.view(-1, width), flat, new.to(kv_cache.dtype).contiguous())
        return flat

    def _check_index_cache(self, index_cache, num_pages: int, page_size: int, dtype: torch.dtype) -> None:
        indexer = self.indexer
        if index_cache is None:
            raise ValueError("index_cache: a DeepSeek-V3.2 layer needs its indexer's key cache with kv_cache")
        want = (torch.uint8, torch.float8_e4m3fn) if indexer.fp8 else (dtype,)
        layout = (f"{indexer.head_dim} e4m3 bytes + a 4-byte scale per token, DeepGEMM's paged layout"
                  if indexer.fp8 else f"index_head_dim {indexer.head_dim} values per token")
        if index_cache.dtype not in want:
            raise TypeError(f"index_cache: expected {' or '.join(str(t) for t in want)} ({layout}), "
                            f"got {index_cache.dtype}")
        if tuple(index_cache.shape) != (num_pages, page_size, 1, indexer.cache_width):
            raise ValueError(f"index_cache: expected [{num_pages}, {page_size}, 1, {indexer.cache_width}] (kv_cache's "
                             f"pages and page size: one block table indexes both; {layout}), "
                             f"got {list(index_cache.shape)}")
        if not index_cache.is_contiguous():
            raise ValueError("index_cache: expected a contiguous tensor (written in place)")
