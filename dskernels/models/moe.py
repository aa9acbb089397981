"""DeepSeek-V3's mixture of experts: the router, the routed experts as grouped GEMMs, the shared
experts, and expert parallelism through `dskernels.ep.Buffer`.

Router (HF's DeepseekV3TopkRouter, in fp32): s = sigmoid(x W_gate^T); selection uses
s + e_score_correction_bias: the n_group groups are ranked by the sum of their top-2 biased scores,
the best topk_group kept, and the top num_experts_per_tok experts chosen among them; the weights are
the unbiased s of the chosen experts, normalized to sum 1 (norm_topk_prob), times
routed_scaling_factor.

Experts: the (token, expert) pairs are sorted by expert (no host sync: argsort, not nonzero), so
each expert's rows form one contiguous segment, and each of the two GEMMs is one grouped GEMM over
[num_local_experts, n, k] weights: `m_grouped_gemm_fp8_fp8_bf16_nt_contiguous` for FP8 weights
(activations cast 1x128 by `per_token_cast_to_fp8`), `torch._grouped_mm` for float weights (API.md
has no bf16 grouped GEMM; a per-expert loop where _grouped_mm is missing; under torch.compile both
run inside the opaque op `dskernels::_moe_grouped_mm_float`). Rows of -1 (experts on other ranks)
are carried as padding rows and masked out. Every shape depends on the token count only, so the
layer without EP traces into one graph and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dskernels
import python_ref.moe
from dskernels._backend import triton_installed
from dskernels._checks import check_int
from dskernels.models.config import DeepseekV3Config
from dskernels.models.linear import (BLOCK, FP8, MLP, BlockMajorScales, Linear, device_moves_only, refuse_format_change,
                                     refuse_gradient, triton_fusable, triton_only_ops, unhooked, weight_parameter)
from dskernels.ops.invariant import FLOAT_DTYPES, invariant_linear, invariant_mm, invariant_path

_GROUPED_MM = hasattr(torch, "_grouped_mm")


def route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, cfg: DeepseekV3Config):
    """x [T, H] -> (topk_idx int64 [T, K], topk_weights fp32 [T, K]); HF's math, see the module doc.
    After the fp32 gate GEMM, `grouped_topk` does the rest in one kernel; torch's ops (the same
    math: python_ref.moe) where a gradient must flow, under a forced "cuda" backend, or for a config
    the kernel does not take (groups of one expert, more than 16 groups or experts chosen, or more
    experts chosen than the kept groups hold: then, as in transformers, the rest come from dropped
    groups)."""
    if invariant_path(x.device, x, gate_weight):  # dskernels.batch_invariant(): an IEEE fp32 dot, fixed tile
        logits = invariant_linear(x.float(), gate_weight.float())
    else:
        logits = F.linear(x.float(), gate_weight.float())
    args = (bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
            cfg.routed_scaling_factor)
    per_group = cfg.n_routed_experts // cfg.n_group
    fits = (per_group >= 2 and max(cfg.topk_group, cfg.num_experts_per_tok) <= 16
            and cfg.num_experts_per_tok <= cfg.topk_group * per_group)
    if _needs_grad(logits) or not triton_only_ops() or not fits:
        return python_ref.moe.grouped_topk(logits, *args)
    return dskernels.grouped_topk(logits, *args)


class Router(nn.Module):
    """HF's DeepseekV3TopkRouter, under its name in the MoE (`gate`), so the layer's state_dict keys
    are transformers': `weight` [E, H] and `e_score_correction_bias` [E], kept in fp32 whatever the
    layer's dtype: module casts (.bfloat16(), .to(dtype)) only move them, as transformers'
    _keep_in_fp32_modules_strict keeps them in a bf16 / fp16 model (a rounded copy would be cast
    back to fp32 for the gate GEMM at every call: 7.3 MiB per V3 layer and step)."""

    def __init__(self, cfg: DeepseekV3Config, device=None):
        super().__init__()
        self.cfg = cfg
        self.weight = weight_parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32,
                                                   device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, device=device))

    def _apply(self, fn, recurse=True):
        return super()._apply(device_moves_only(fn, lambda t: t.dtype == torch.float32), recurse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_idx int64 [T, K], topk_weights fp32 [T, K])."""
        return route(x, self.weight, self.e_score_correction_bias, self.cfg)


def _grouped_float_eager(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[g-1], offsets[g]) of x times w[g].T; rows past offsets[-1] unspecified."""
    if x.device.type == "meta":  # (the loop below reads the offsets; torch._grouped_mm's meta takes bf16 only)
        return x.new_empty(x.shape[0], w.shape[1])
    if _GROUPED_MM and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        try:
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
        except (RuntimeError, NotImplementedError):
            pass
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offsets.tolist()):  # host sync: fallback only
        if end > start:
            out[start:end] = x[start:end] @ w[g].T
        start = end
    return out


def _check_grouped_float(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(f"x, w: expected [M, K] and [G, N, K], got {list(x.shape)} and {list(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"w: expected x's dtype {x.dtype}, got {w.dtype}")
    if offsets.dtype != torch.int32 or tuple(offsets.shape) != (w.shape[0],):
        raise ValueError(f"offsets: expected int32 [{w.shape[0]}], got {offsets.dtype} {list(offsets.shape)}")


# The float expert GEMM as an opaque op for torch.compile: the output is [M, N] whatever the
# routing, but neither path traces (the meta of torch._grouped_mm takes bf16 only, while the CPU
# kernel also runs fp32; the per-expert fallback reads the offsets on the host).
@torch.library.custom_op("dskernels::_moe_grouped_mm_float", mutates_args=())
def _moe_grouped_mm_float(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    _check_grouped_float(x, w, offsets)
    return _grouped_float_eager(x, w, offsets)


@_moe_grouped_mm_float.register_fake
def _(x, w, offsets):
    _check_grouped_float(x, w, offsets)
    return x.new_empty(x.shape[0], w.shape[1])


def _grouped_float_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, groups: int) -> torch.Tensor:
    """[G, N, K]: grad[rows of g].T @ x[rows of g] for each group (0 for a group without rows)."""
    if _GROUPED_MM and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        try:
            return torch._grouped_mm(grad.t(), x, offs=offsets)
        except (RuntimeError, NotImplementedError):
            pass
    out = x.new_zeros(groups, grad.shape[1], x.shape[1])
    start = 0
    for g, end in enumerate(offsets.tolist()):  # host sync: fallback only
        if end > start:
            out[g] = grad[start:end].t() @ x[start:end]
        start = end
    return out


# Its backward, opaque for the same reasons: a compiled training step (float experts keep their
# gradient, models.md) failed with "no autograd formula was registered" for the op above.
@torch.library.custom_op("dskernels::_moe_grouped_mm_float_backward", mutates_args=())
def _moe_grouped_mm_float_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                                   offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = _grouped_float_eager(grad, w.transpose(1, 2), offsets)
    # rows past the last offset have no output (unspecified): no gradient, whatever the GEMM left there
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    grad_x = torch.where(rows < offsets[-1:].to(torch.int64), grad_x, 0) if offsets.numel() else grad_x.zero_()
    return grad_x, _grouped_float_weight_grad(grad, x, offsets, w.shape[0])


@_moe_grouped_mm_float_backward.register_fake
def _(grad, x, w, offsets):
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _grouped_mm_float_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_float_grad(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x, grad_w = _moe_grouped_mm_float_backward(grad.contiguous(), x, w, offsets)
    return grad_x, grad_w, None


_moe_grouped_mm_float.register_autograd(_grouped_mm_float_grad, setup_context=_grouped_mm_float_setup)


def _grouped_float(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x.dtype in FLOAT_DTYPES and x.dtype == w.dtype and invariant_path(x.device, x, w):
        # dskernels.batch_invariant(): torch._grouped_mm's per-expert GEMMs follow each expert's row count
        return invariant_mm(x, w, x.dtype, ends=offsets)
    if torch.compiler.is_compiling():
        return _moe_grouped_mm_float(x, w, offsets)
    return _grouped_float_eager(x, w, offsets)  # eager: same code, without the op's dispatch cost


def _needs_grad(t) -> bool:
    return torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] for float experts: the fused op (fp32 inside, one pass),
    or torch's ops where a gradient must flow (the ops are inference kernels), for dtypes the op
    does not take (float64), or under a forced "cuda" backend (triton_only_ops)."""
    if _needs_grad(h) or h.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not triton_only_ops():
        gate, up = h.split(h.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up
    return dskernels.silu_and_mul(h)


class Experts(nn.Module):
    """num_local_experts SwiGLU experts stored fused as HF 5.x does: gate_up_proj [L, 2I, H]
    (gate rows first) and down_proj [L, H, I]; FP8: float8_e4m3fn plus *_scale_inv with one fp32 per
    128x128 block ([L, 2I/128, H/128] and [L, H/128, I/128]). round_scale: power-of-two scales for
    the activation casts (config.fp8_round_scale)."""

    def __init__(self, num_local_experts: int, hidden: int, intermediate: int, dtype=None, device=None,
                 fp8: bool = False):
        super().__init__()
        self.num_local_experts, self.hidden, self.intermediate = num_local_experts, hidden, intermediate
        self.round_scale = False
        fp8 = fp8 and hidden % BLOCK == 0 and intermediate % BLOCK == 0  # (the FP8 format the loader keeps)
        wdtype = FP8 if fp8 else dtype
        self.gate_up_proj = weight_parameter(torch.empty(num_local_experts, 2 * intermediate, hidden,
                                                         dtype=wdtype, device=device))
        self.down_proj = weight_parameter(torch.empty(num_local_experts, hidden, intermediate, dtype=wdtype,
                                                      device=device))
        for name, (n, k) in (("gate_up_proj", (2 * intermediate, hidden)), ("down_proj", (hidden, intermediate))):
            self.register_parameter(f"{name}_scale_inv", weight_parameter(
                torch.empty(num_local_experts, n // BLOCK, k // BLOCK, dtype=torch.float32, device=device))
                if fp8 else None)
        self._gate_up_scales, self._down_scales = BlockMajorScales(), BlockMajorScales()
        self._expert_ids = None  # arange(num_local_experts) on the device last used (_row_ends)

    @property
    def is_fp8(self) -> bool:
        return self.gate_up_proj.dtype == FP8

    def _apply(self, fn, recurse=True):
        fp8 = self.is_fp8
        module = super()._apply(device_moves_only(fn, lambda t: fp8), recurse)
        self._gate_up_scales.clear()
        self._down_scales.clear()
        self._expert_ids = None
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        refuse_format_change(state_dict, prefix, ("gate_up_proj", "down_proj"), self.is_fp8, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh_derived()

    def refresh_derived(self) -> None:
        """Rebuilds the grouped GEMMs' block-major scales now (see linear.BlockMajorScales)."""
        self._gate_up_scales.refresh(self.gate_up_proj_scale_inv)
        self._down_scales.refresh(self.down_proj_scale_inv)

    def _gemm(self, x, w, scale, m_indices, offsets) -> torch.Tensor:
        if scale is None:
            return _grouped_float(x, w, offsets)
        a, sa = x if isinstance(x, tuple) else dskernels.per_token_cast_to_fp8(x.contiguous(), self.round_scale)
        out = torch.empty(a.shape[0], w.shape[1], dtype=torch.bfloat16, device=a.device)
        if a.shape[0]:
            dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (w, scale), out, m_indices)
        return out

    def forward(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor, out_dtype: torch.dtype,
                addends: tuple[torch.Tensor, ...] = (), valid_pairs: int | None = None) -> torch.Tensor:
        """x [N, H] (or an FP8 (x, scales) pair), topk_idx int64 [N, K] local expert ids or -1,
        topk_weights fp32 [N, K] -> sum_k topk_weights[t, k] * expert_k(x[t]), [N, H] in out_dtype,
        plus each of `addends` ([N, H] tensors of out_dtype: the shared experts' output, the
        residual) in order, each sum rounded to out_dtype as torch's add rounds it.
        valid_pairs: the number of topk_idx entries in [0, num_local_experts), where the caller
        knows it on the host (EP's normal dispatch returns it): the grouped GEMMs then get those
        rows only, not N * K rows of which the -1 ones are padding (with 8 EP ranks about 3 in 4 of
        a received token's slots name experts elsewhere)."""
        if self.is_fp8:
            refuse_gradient("FP8 experts", x)
        num_tokens, k = topk_idx.shape
        experts = self.num_local_experts
        if valid_pairs is not None:  # (rows past it are dropped: too small a count loses pairs the combine reads)
            valid_pairs = check_int("valid_pairs", valid_pairs, 0)
            if valid_pairs > num_tokens * k:
                raise ValueError(f"valid_pairs: expected at most topk_idx's {num_tokens * k} entries, "
                                 f"got {valid_pairs}")
            if topk_idx.device.type == "cpu" and not torch.compiler.is_compiling():  # (free there)
                named = int(((topk_idx >= 0) & (topk_idx < experts)).sum())
                if named != valid_pairs:
                    raise ValueError(f"valid_pairs: expected the number of topk_idx entries in [0, {experts}) "
                                     f"({named}), got {valid_pairs}")
        if self._sorts_in_kernels(x, topk_idx, topk_weights, out_dtype, addends):
            # Decode: the sort, the row copies and the combine (with the additions) in Triton kernels,
            # the same bits as the torch ops below (one cast of each token's row, not of each copy)
            from dskernels.triton import layer as triton_layer

            if not self.is_fp8:
                rows = (x, None)
            elif isinstance(x, tuple):
                rows = x
            else:
                rows = dskernels.per_token_cast_to_fp8(x.contiguous(), self.round_scale)
            xs, m_indices, positions = triton_layer.moe_sort_rows(*rows, topk_idx, experts)
            del rows
            if valid_pairs is not None:  # the padding rows sort last: the GEMMs and their outputs skip them
                xs = tuple(t[:valid_pairs] for t in xs) if isinstance(xs, tuple) else xs[:valid_pairs]
                m_indices = m_indices[:valid_pairs]
            sorted_rows = [xs]  # handed over: freed once the first GEMM has read them (_expert_mlp)
            del xs
            y = self._expert_mlp(sorted_rows, m_indices, None if self.is_fp8 else self._row_ends(m_indices))
            return triton_layer.moe_combine(y, positions, topk_idx, topk_weights, experts, out_dtype, addends)
        flat = topk_idx.reshape(-1)
        # -1 (and ids past the last expert) sort last as `experts`: padding rows to every grouped GEMM
        key = torch.where((flat >= 0) & (flat < experts), flat, experts)
        sorted_key, order = torch.sort(key, stable=True)
        if valid_pairs is not None:  # the padding pairs sort last: no rows for them
            sorted_key, order = sorted_key[:valid_pairs], order[:valid_pairs]
        valid = sorted_key < experts
        m_indices = sorted_key.to(torch.int32)
        offsets = None
        if not self.is_fp8:  # the float GEMMs take each expert's row end instead
            # scatter_add, not bincount: bincount on CUDA reads max(key) on the host
            counts = torch.zeros(experts + 1, dtype=torch.int64, device=key.device).scatter_add_(
                0, key, torch.ones_like(key))[:experts]
            offsets = counts.cumsum(0).to(torch.int32)
        token = order // k
        xs = tuple(t[token] for t in x) if isinstance(x, tuple) else x[token]
        if not self.is_fp8 and isinstance(xs, tuple):
            raise TypeError("x: FP8 activations need FP8 expert weights")
        if not self.is_fp8:
            xs = xs.to(self.gate_up_proj.dtype)
            if _needs_grad(xs):  # torch._grouped_mm leaves rows past the last offset unspecified in its
                xs = torch.where(valid[:, None], xs, 0)  # backward too: no gradient from padding rows
        sorted_rows = [xs]  # handed over: freed once the first GEMM has read them (_expert_mlp)
        del xs
        y = self._expert_mlp(sorted_rows, m_indices, offsets)
        # (pairs left out by valid_pairs name no expert here: the combine never reads their row)
        positions = torch.zeros(flat.numel(), dtype=torch.int64, device=order.device).scatter_(
            0, order, torch.arange(order.numel(), device=order.device))
        # One kernel for the ops below, and the same summation order (no gradient to the weights
        # through it: the router's, which x's gradient also flows through, keep torch's ops)
        if self._combines_in_kernel(topk_weights, out_dtype, addends, y):
            from dskernels.triton import layer as triton_layer

            return triton_layer.moe_combine(y, positions, topk_idx, topk_weights, experts, out_dtype, addends)
        # fp32, slot by slot (moe_combine's order, so its bits): index_add_ added in the sorted rows'
        # order, and on CUDA with atomics in any order (a token's bits could change from run to run)
        named = (topk_idx >= 0) & (topk_idx < experts)
        rows = positions.view(num_tokens, k)
        out = torch.zeros(num_tokens, self.hidden, dtype=torch.float32, device=y.device)
        for slot in range(k if y.shape[0] else 0):  # (no rows, valid_pairs=0: no pair to gather, nothing to add)
            term = y[rows[:, slot]].float() * topk_weights[:, slot, None].float()
            out = out + torch.where(named[:, slot, None], term, 0.0)
        out = out.to(out_dtype)
        for addend in addends:
            out = out + addend
        return out

    def _row_ends(self, m_indices: torch.Tensor) -> torch.Tensor:
        """Each expert's row end in rows sorted by expert (m_indices ascending, padding rows last as
        `experts`): the float GEMMs' offsets, int32 [experts], as the counts' cumsum gives them."""
        ids = self._expert_ids
        if ids is None or ids.device != m_indices.device:
            ids = self._expert_ids = torch.arange(self.num_local_experts, dtype=torch.int32, device=m_indices.device)
        return torch.searchsorted(m_indices, ids, right=True, out_int32=True)

    def _expert_mlp(self, sorted_rows: list, m_indices: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """sorted_rows: [xs], rows sorted by expert (m_indices: each row's expert, padding rows outside
        [0, experts); offsets: each expert's row end, for float weights) -> each row's expert output
        [rows, H] (bf16 for FP8 weights; padding rows unspecified). The list is emptied, and the
        intermediate freed, as soon as each is read: at the down GEMM only its input and output are
        live ([rows, H] FP8 rows and [rows, 2I] bf16 were kept through it: 15 KiB per (token, expert)
        pair at V3's widths, 3.75 GiB for a 32K-token prefill)."""
        h = self._gemm(sorted_rows.pop(), self.gate_up_proj, self._gate_up_scales(self.gate_up_proj_scale_inv),
                       m_indices, offsets)
        if self.is_fp8 and triton_only_ops():  # SwiGLU in fp32 and the FP8 cast in one pass
            act = dskernels.silu_and_mul_cast_to_fp8(h, round_scale=self.round_scale)
        elif self.is_fp8:  # cast by _gemm straight from fp32
            gate, up = h.float().split(self.intermediate, dim=-1)
            act = F.silu(gate) * up
            del gate, up
        else:
            act = _swiglu(h)
        del h
        return self._gemm(act, self.down_proj, self._down_scales(self.down_proj_scale_inv), m_indices, offsets)

    def _combines_in_kernel(self, topk_weights: torch.Tensor, out_dtype: torch.dtype, addends: tuple[torch.Tensor, ...],
                            on: torch.Tensor) -> bool:
        """Whether moe_combine takes the weighted sum and the additions after it (on: a tensor on
        the device it would run on, for models.linear.triton_fusable)."""
        shape = (topk_weights.shape[0], self.hidden)
        return (out_dtype in (torch.bfloat16, torch.float16, torch.float32) and topk_weights.dtype == torch.float32
                and not _needs_grad(topk_weights) and len(addends) <= 2
                and all(t.dtype == out_dtype and tuple(t.shape) == shape and t.device == on.device
                        and not _needs_grad(t) for t in addends)
                and triton_fusable(on))

    def _sorts_in_kernels(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor, out_dtype: torch.dtype,
                          addends: tuple[torch.Tensor, ...]) -> bool:
        """Whether forward takes the Triton path from the routing to the combine: up to
        MAX_SORTED_PAIRS (token, slot) pairs, x of their shape (else torch's ops, whose GEMMs name
        what is wrong), FP8 experts (x float or an FP8 pair) or float ones (x of their dtype, no
        gradient), and the combine's conditions."""
        if not triton_installed():  # (the reference path needs no Triton installed)
            return False
        # Compiled, triton_fusable says no anyway: asked first, the pair count below would be a guard on the
        # token count (a recompile of a dynamic graph past MAX_SORTED_PAIRS).
        if torch.compiler.is_compiling():
            return False
        from dskernels.triton.layer import MAX_SORTED_PAIRS

        if topk_idx.dtype not in (torch.int64, torch.int32) or topk_idx.numel() > MAX_SORTED_PAIRS:
            return False
        tokens, groups = topk_idx.shape[0], self.hidden // 128
        rows = x[0] if isinstance(x, tuple) else x
        if not isinstance(rows, torch.Tensor) or rows.device != topk_idx.device:
            return False
        if not self.is_fp8:
            fits = (not isinstance(x, tuple) and x.dtype == self.gate_up_proj.dtype and not _needs_grad(x)
                    and not _needs_grad(self.gate_up_proj) and not _needs_grad(self.down_proj))
        elif isinstance(x, tuple):
            fits = (len(x) == 2 and x[0].dtype == FP8 and x[1].dtype == torch.float32
                    and tuple(x[1].shape) == (tokens, groups) and self.hidden % 128 == 0)
        else:
            fits = self.hidden % 128 == 0
        return (fits and rows.dim() == 2 and tuple(rows.shape) == (tokens, self.hidden)
                and self._combines_in_kernel(topk_weights, out_dtype, addends, topk_weights))

    def forward_masked(self, x, counts: torch.Tensor, expected_m: int, out_dtype: torch.dtype) -> torch.Tensor:
        """The low-latency layout: x [L, M, H] (or an FP8 (x, scales [L, M, H/128]) pair), expert l's
        tokens in rows [0, counts[l]) -> unweighted expert outputs [L, M, H] in out_dtype (rows past
        counts unspecified). Counts stay on the device. FP8: `m_grouped_gemm_fp8_fp8_bf16_nt_masked`;
        bf16: `m_grouped_bf16_gemm_nt_masked` (the valid rows only); other float weights: a batched
        matmul over all M rows."""
        if not self.is_fp8 and isinstance(x, tuple):
            raise TypeError("x: FP8 activations need FP8 expert weights")
        if self.is_fp8:
            refuse_gradient("FP8 experts", x)
        if self.gate_up_proj.dtype == torch.bfloat16 and triton_only_ops() and not _needs_grad(x):
            return self._masked_bf16(x.to(torch.bfloat16), counts, expected_m).to(out_dtype)
        if not self.is_fp8:
            x = x.to(self.gate_up_proj.dtype)
            if x.dtype in FLOAT_DTYPES and invariant_path(x.device, x, self.gate_up_proj, self.down_proj):
                h = invariant_mm(x, self.gate_up_proj, x.dtype)  # dskernels.batch_invariant()
                return invariant_mm(_swiglu(h), self.down_proj, x.dtype).to(out_dtype)
            h = torch.bmm(x, self.gate_up_proj.transpose(1, 2))
            return torch.bmm(_swiglu(h), self.down_proj.transpose(1, 2)).to(out_dtype)
        a, sa = x if isinstance(x, tuple) else self._cast3d(x)
        experts, rows, _ = a.shape
        h = torch.empty(experts, rows, 2 * self.intermediate, dtype=torch.bfloat16, device=a.device)
        gate_up = (self.gate_up_proj, self._gate_up_scales(self.gate_up_proj_scale_inv))
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), gate_up, h, counts, expected_m)
        if triton_only_ops():
            act = dskernels.silu_and_mul_cast_to_fp8(h, counts, self.round_scale)  # rows past counts skipped
        else:
            gate, up = h.float().split(self.intermediate, dim=-1)
            act = self._cast3d(F.silu(gate) * up)
        y = torch.empty(experts, rows, self.hidden, dtype=torch.bfloat16, device=a.device)
        down = (self.down_proj, self._down_scales(self.down_proj_scale_inv))
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked(act, down, y, counts, expected_m)
        return y.to(out_dtype)

    def _masked_bf16(self, x: torch.Tensor, counts: torch.Tensor, expected_m: int) -> torch.Tensor:
        experts, rows, _ = x.shape
        h = torch.empty(experts, rows, 2 * self.intermediate, dtype=torch.bfloat16, device=x.device)
        dskernels.m_grouped_bf16_gemm_nt_masked(x, self.gate_up_proj, h, counts, expected_m)
        y = torch.empty(experts, rows, self.hidden, dtype=torch.bfloat16, device=x.device)
        dskernels.m_grouped_bf16_gemm_nt_masked(dskernels.silu_and_mul(h, counts), self.down_proj, y, counts,
                                                expected_m)
        return y

    def _cast3d(self, x: torch.Tensor):
        experts, rows, k = x.shape
        a, sa = dskernels.per_token_cast_to_fp8(x.reshape(experts * rows, k).contiguous(), self.round_scale)
        return a.view(experts, rows, k), sa.view(experts, rows, -1)


class MoE(nn.Module):
    """Routed experts (this rank's share with an EP buffer) plus the shared experts."""

    def __init__(self, cfg: DeepseekV3Config, dtype=None, device=None, ep_buffer=None,
                 ep_low_latency_tokens: int | None = None, fp8_weights: bool = False):
        super().__init__()
        self.cfg = cfg
        self.ep_buffer = ep_buffer
        self.ep_low_latency_tokens = ep_low_latency_tokens
        self.num_ranks = ep_buffer.group_size if ep_buffer is not None else 1
        self.rank = ep_buffer.rank if ep_buffer is not None else 0
        if cfg.n_routed_experts % self.num_ranks:
            raise ValueError(f"ep_buffer: n_routed_experts={cfg.n_routed_experts} is not divisible by the "
                             f"{self.num_ranks} ranks of the group")
        self.num_local_experts = cfg.n_routed_experts // self.num_ranks
        self.first_expert = self.rank * self.num_local_experts
        self.gate = Router(cfg, device)
        self.experts = Experts(self.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype, device,
                               fp8=fp8_weights)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, device,
                                   fp8=fp8_weights) if cfg.n_shared_experts else None)

    def input_layers(self) -> tuple[Linear, ...]:
        """The projections that read x as it comes (the shared experts'; the routed ones read its
        rows by expert), for the layer's norm_and_cast."""
        return self.shared_experts.input_layers() if self.shared_experts is not None else ()

    def forward(self, x: torch.Tensor, ep_low_latency: bool | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """ep_low_latency: with an EP buffer, which exchange this call takes (DeepseekV3DecoderLayer.forward).
        x_fp8: x's rows already cast for input_layers(), or None. residual: a tensor of x's shape and
        dtype added last (the layer's residual connection: residual + (routed + shared), each sum
        rounded as torch's add), in the combine's kernel where it runs."""
        if self.experts.is_fp8:  # (said before the shared experts' own refusal, which names their Linear)
            refuse_gradient("FP8 experts", x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        topk_idx, topk_weights = self.gate(x2)
        addends = ()
        if self.shared_experts is not None:
            addends += (self.shared_experts(x2, x_fp8),)
        if residual is not None:
            addends += (residual.reshape(x2.shape),)
        plain_experts = type(self.experts) is Experts and unhooked(self.experts)
        if self.ep_buffer is None and plain_experts:  # the additions and the shared cast handed to the experts
            return self.experts(self._routed_input(x2, x_fp8), topk_idx, topk_weights, x.dtype, addends).reshape(shape)
        if self.ep_buffer is None:  # (a hook on the experts, or another module, sees only their own work)
            routed = self.experts(x2, topk_idx, topk_weights, x.dtype)
        else:
            routed = self._routed_ep(x2, topk_idx, topk_weights, self._low_latency(x2, ep_low_latency, topk_weights))
        for addend in addends:
            routed = routed + addend
        return routed.reshape(shape)

    def _low_latency(self, x2: torch.Tensor, ep_low_latency: bool | None, topk_weights: torch.Tensor) -> bool:
        """Which EP exchange this call takes (see forward). The low-latency one has no backward
        (DeepEP's neither): where a gradient must flow (x, the routing weights or the experts' weights
        require grad; the same on every rank in a training step) the choice by token count takes the
        normal one, and ep_low_latency=True raises. (A training step of few tokens lost the routed
        share of every gradient without a word.)"""
        low_latency = ep_low_latency
        if low_latency is None:  # this rank's own count: right where every rank has as many tokens
            low_latency = self.ep_low_latency_tokens is not None and x2.shape[0] <= self.ep_low_latency_tokens
            return low_latency and not any(_needs_grad(t) for t in (x2, topk_weights, *self.experts.parameters()))
        if low_latency and (self.ep_low_latency_tokens is None or x2.shape[0] > self.ep_low_latency_tokens):
            raise ValueError(f"ep_low_latency: the low-latency exchange takes at most ep_low_latency_tokens="
                             f"{self.ep_low_latency_tokens} tokens per rank (the layer's), got {x2.shape[0]}")
        if low_latency:
            refuse_gradient("the low-latency EP exchange (ep_low_latency=True)", x2, topk_weights,
                            *self.experts.parameters())
        return low_latency

    def _routed_input(self, x2: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None):
        """The routed experts' input: x_fp8 (the shared experts' cast of the same rows) where it is the
        cast they would make themselves (FP8 experts, the same round_scale, a bf16 or fp32 x, which
        Linear.cast_input casts as it is), else x2."""
        fp8_inputs = [layer for layer in self.input_layers() if layer.is_fp8]
        if (x_fp8 is not None and self.experts.is_fp8 and x2.dtype in (torch.bfloat16, torch.float32)
                and fp8_inputs and all(layer.round_scale == self.experts.round_scale for layer in fp8_inputs)):
            return x_fp8
        return x2

    # torch.compile runs this part eagerly, between graphs: the buffer's exchanges
    # are asynchronous torch.distributed calls waited on with a host-side deadline, and the normal
    # dispatch sizes its receive buffers from counts read on the host.
    @torch.compiler.disable(reason="expert parallelism: torch.distributed exchanges through dskernels.ep.Buffer")
    def _routed_ep(self, x2: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                   low_latency: bool) -> torch.Tensor:
        if self.experts.is_fp8:  # (both exchanges cast x2 before the send: its gradient would be cut unseen)
            refuse_gradient("FP8 experts", x2)
        if low_latency:
            # decode: DeepEP's low-latency kernels into the per-expert masked layout (the tokens are
            # cast to FP8 before the send when the experts are FP8), weighted sum in the combine
            num_experts = self.cfg.n_routed_experts
            recv_x, recv_count, handle, _, hook = self.ep_buffer.low_latency_dispatch(
                x2.contiguous(), topk_idx, self.ep_low_latency_tokens, num_experts, use_fp8=self.experts.is_fp8,
                round_scale=self.experts.is_fp8 and self.experts.round_scale)
            hook()
            expected_m = max(1, self.ep_low_latency_tokens * self.num_ranks * self.cfg.num_experts_per_tok
                             // num_experts)
            y = self.experts.forward_masked(recv_x, recv_count, expected_m, x2.dtype)
            routed, _, hook = self.ep_buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
            hook()
            return routed
        # FP8 experts: send the 1x128-cast tokens (half the bytes; the first GEMM takes them as is)
        payload = (dskernels.per_token_cast_to_fp8(x2.contiguous(), self.experts.round_scale) if self.experts.is_fp8
                   else x2)
        recv_x, recv_idx, recv_weights, per_expert, handle, _ = self.ep_buffer.dispatch(
            payload, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=self.cfg.n_routed_experts)
        del payload
        # (the host has the counts already: the pairs that name a local expert, with expert_alignment 1)
        rows = {"valid_pairs": sum(per_expert)} if type(self.experts) is Experts else {}
        y = self.experts(recv_x, recv_idx, recv_weights, x2.dtype, **rows)
        del recv_x
        routed, _, _ = self.ep_buffer.combine(y, handle)
        return routed
