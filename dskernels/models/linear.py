"""The building blocks shared by attention and the MLPs: RMSNorm, a linear layer that runs either
on float weights (F.linear) or on FP8 weights with 128x128 block scales (the checkpoint's
weight + weight_scale_inv) through our casts and `gemm_fp8_fp8_bf16_nt`, and the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dskernels
from dskernels._backend import current_backend, select_backend
from dskernels.ops.invariant import FLOAT_DTYPES, invariant_linear, invariant_path

FP8 = torch.float8_e4m3fn
BLOCK = 128  # the checkpoint's weight_block_size and our ops' scale granularity


def weight_parameter(t: torch.Tensor | None) -> nn.Parameter | None:
    """How the layer keeps a weight: a Parameter, as transformers keeps its (layer.parameters()
    lists it: optimizers, FSDP, device and size queries), that needs no grad (the ops are inference
    kernels; requires_grad_() it to train a float path)."""
    return None if t is None else nn.Parameter(t, requires_grad=False)


class RMSNorm(nn.Module):
    """HF's DeepseekV3RMSNorm: normalize in fp32, round to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = weight_parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_fusable(x, self.weight):  # one kernel (dskernels/triton/layer.py) for the four below
            from dskernels.triton import layer as triton_layer

            return triton_layer.rms_norm(x, self.weight, self.eps)
        # F.rms_norm: the same fp32 math as HF's pow / mean / rsqrt / mul (bit for bit on CPU), in one
        # op instead of five (four norms per layer: launches are most of a decode step's small ops)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def dequantize_block_fp8(w: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """w [..., n, k] fp8, scale [..., ceil(n/128), ceil(k/128)] -> w * scale per 128x128 block."""
    if w.dim() > 2:  # one matrix at a time: 256 experts' fp32 temporaries would not fit anywhere
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        for i in range(w.shape[0]):
            out[i] = dequantize_block_fp8(w[i], scale[i], dtype)
        return out
    n, k = w.shape[-2:]
    s = scale.float().repeat_interleave(BLOCK, dim=-2)[..., :n, :].repeat_interleave(BLOCK, dim=-1)[..., :k]
    return (w.float() * s).to(dtype)


class BlockMajorScales:
    """Weight scales [..., ceil(n/128), k/128] in the layout the sm90 GEMMs read (unit stride along
    the 128-row blocks; every backend takes any strides), transposed once per value of the buffer
    instead of once per call (a kernel launch per Linear and expert GEMM saved in each decode step).
    Cached against the Parameter itself (held, so its memory cannot come back as another tensor),
    its memory and its version counter: in-place loads (load_state_dict's copy_) bump the counter,
    module moves and casts (`.to()`, `_apply`) give the same Parameter new memory. Writes the
    counter does not see (through `.data`, a collective into the Parameter) need `refresh`. Rebuilt
    into the same memory where the layout allows: a CUDA graph captured with the copy reads the
    new scales. Under torch.compile, and for inference tensors (no version counter), the scale goes
    as it is and the op converts it."""

    def __init__(self):
        self.source, self.state, self.value = None, None, None

    def __call__(self, scale: torch.Tensor | None) -> torch.Tensor | None:
        if scale is None or torch.compiler.is_compiling() or scale.is_inference():
            return scale
        state = (scale._version, scale.untyped_storage().data_ptr(), scale.device)
        if scale is not self.source or state != self.state:
            self._build(scale)
            self.source, self.state = scale, state
        return self.value

    def _build(self, scale: torch.Tensor) -> None:
        old = self.value
        if scale.transpose(-1, -2).is_contiguous():  # already block-major: no copy
            self.value = scale
        elif old is not self.source and writable_in_place(old, scale.shape, scale.dtype, scale.device,
                                                          contiguous=False):
            old.copy_(scale)  # (old is block-major: copy_ transposes)
        else:
            self.value = scale.transpose(-1, -2).contiguous().transpose(-1, -2)

    def refresh(self, scale: torch.Tensor | None) -> None:
        """Rebuilds the copy now (in place where it can) if there is one: after a write to `scale`
        its version counter does not show, or before replaying a CUDA graph captured with it."""
        if self.value is not None and scale is not None and not scale.is_inference():
            self.state = None
            self(scale)

    def clear(self) -> None:
        """Forgets the copy (a module move or cast: not left behind on the old device)."""
        self.source, self.state, self.value = None, None, None


def owned(t: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """t, or a copy of it where it is still the caller's `source` memory (a `.to()` or
    `.contiguous()` that had nothing to do): a loaded layer owns its weights, as load_state_dict's
    copies do, so a loader that reuses or frees its buffers leaves the layer as it was."""
    if source is not None and t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return t.clone()
    return t


def writable_in_place(current, shape, dtype: torch.dtype, device, contiguous: bool = True) -> bool:
    """Whether values of this shape, dtype and device can be copied into `current` in place: a tensor
    of that shape, dtype and device, contiguous unless contiguous=False (a layer's weight: any
    strides for a derived copy), and an inference tensor only inside inference mode (where torch
    allows writing it)."""
    return (isinstance(current, torch.Tensor) and tuple(current.shape) == tuple(shape) and current.dtype == dtype
            and current.device == torch.device(device) and (not contiguous or current.is_contiguous())
            and (torch.is_inference_mode_enabled() or not current.is_inference()))


def store_weight(module: nn.Module, name: str, value: torch.Tensor | None, source: torch.Tensor | None = None) -> None:
    """module.<name> (a Parameter or buffer, or None) given value's values: written into the tensor
    it holds where that has value's shape, dtype and device (a reload keeps the weights' memory, so
    a CUDA graph captured with them reads the new values), else a new one (a Parameter for a
    parameter) owning its memory (owned: never source's, the caller's tensor)."""
    current = getattr(module, name)
    if value is not None and writable_in_place(current, value.shape, value.dtype, value.device):
        with torch.no_grad():
            current.copy_(value)
        return
    value = None if value is None else owned(value, source)
    setattr(module, name, weight_parameter(value) if name in module._parameters else value)


def load_weight(module: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype, device,
                source: torch.Tensor | None = None) -> None:
    """module.<name> given value's values in dtype on device: copied straight into the tensor it
    holds where that has value's shape, the dtype and the device (copy_ converts as .to() rounds,
    with no converted copy of the whole weight first), else store_weight of the converted value
    (source: the caller's tensor, which the layer must not keep)."""
    current = getattr(module, name)
    if writable_in_place(current, value.shape, dtype, device):
        with torch.no_grad():
            current.copy_(value)
        return
    store_weight(module, name, value.to(device=device, dtype=dtype).contiguous(), source)


def device_moves_only(fn, exempt):
    """`fn` as nn.Module._apply passes it, applied to the tensors for which exempt(t) holds only as
    the device move it makes: a module cast (.float(), .to(torch.bfloat16)) must not turn FP8 weights
    into their unscaled values, round their fp32 scales or the rope frequencies. Other fns (and
    other tensors) apply as they are."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        if exempt(t):
            target = fn(t.new_empty(0))
            if target.dtype != t.dtype:
                return t.to(target.device)
        return fn(t)
    return apply


def refuse_format_change(state_dict, prefix: str, names, fp8: bool, error_msgs: list) -> None:
    """torch's load_state_dict copies values into the buffers as they are: FP8 bytes into a float
    weight (its scales dropped), or float values into an FP8 one (under the old scales), whatever
    `strict` says. Refused (load_hf_state_dict converts between the formats)."""
    for name in names:
        given = state_dict.get(prefix + name)
        if isinstance(given, torch.Tensor) and (given.dtype == FP8) != fp8:
            error_msgs.append(f"{prefix}{name}: a {given.dtype} tensor for a{'n FP8' if fp8 else ' float'} weight "
                              f"(load_state_dict keeps each buffer's format; load_hf_state_dict converts, and "
                              f"DeepseekV3DecoderLayer(..., fp8=False) builds float weights for an FP8 config)")


class Linear(nn.Module):
    """y = x @ W.T (+ b where bias: the attention's projections under config.attention_bias, which
    V3's checkpoints leave False). The bias stays in the layer's dtype and is added to the product.

    Float: `weight` [n, k] in the layer's dtype. FP8: `weight` [n, k] float8_e4m3fn and
    `weight_scale_inv` [ceil(n/128), k/128] fp32 (the checkpoint's names and meaning: dequantized
    = weight * scale); x is cast per token (1x128) with `per_token_cast_to_fp8` and multiplied by
    `gemm_fp8_fp8_bf16_nt` into bf16, which is then cast to x's dtype. round_scale: power-of-two
    FP8 scales for those casts and for float weights quantized here (config.fp8_round_scale). fp8:
    built in the FP8 format (float8_e4m3fn weight, fp32 scales, unfilled) where in_features is a
    multiple of 128, so that an FP8 checkpoint loads into it in place (no float weight of twice its
    size first)."""

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None, bias: bool = False,
                 fp8: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.round_scale = False
        # True: a float weight stays fp32 through module casts (V3.2's head weights, computed in fp32:
        # a rounded copy would be cast back at every call)
        self.keep_fp32 = False
        fp8 = fp8 and in_features % BLOCK == 0
        self.weight = weight_parameter(torch.empty(out_features, in_features, dtype=FP8 if fp8 else dtype,
                                                   device=device))
        self.register_parameter("weight_scale_inv", weight_parameter(
            torch.empty(-(-out_features // BLOCK), in_features // BLOCK, dtype=torch.float32, device=device))
            if fp8 else None)
        self.register_parameter("bias", weight_parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)
        self._gemm_scales = BlockMajorScales()

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8

    def _apply(self, fn, recurse=True):
        fp8, bias, keep = self.is_fp8, self.bias, getattr(self, "keep_fp32", False)
        module = super()._apply(device_moves_only(fn, lambda t: t is not bias and (
            fp8 or (keep and t.dtype == torch.float32))), recurse)
        self._gemm_scales.clear()
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        refuse_format_change(state_dict, prefix, ("weight",), self.is_fp8, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh_derived()  # (now, not at the next call: a CUDA graph may be replayed first)

    def refresh_derived(self) -> None:
        """Rebuilds what this layer derives from its weights (the GEMM's block-major scales)."""
        self._gemm_scales.refresh(self.weight_scale_inv)

    def set_bias(self, bias: torch.Tensor) -> None:
        if self.bias is None:
            raise ValueError("bias: this projection has none (config.attention_bias is False)")
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias: expected [{self.out_features}], got {list(bias.shape)}")
        load_weight(self, "bias", bias, self.bias.dtype, self.bias.device, bias)

    def set_weight(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, fp8: bool | None):
        """Loads a float weight or an FP8 (weight, scale) pair; fp8=True quantizes a float weight,
        fp8=False dequantizes an FP8 one, None keeps the checkpoint's format."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected [{self.out_features}, {self.in_features}], got {list(weight.shape)}")
        source, source_scale = weight, scale  # the caller's: what this layer must not keep
        device = self.weight.device
        if weight.dtype == FP8 and scale is None:
            raise ValueError("weight_scale_inv: an FP8 weight needs its 128x128 block scales")
        if fp8 is None:
            fp8 = weight.dtype == FP8
        if fp8 and self.in_features % BLOCK:
            raise ValueError(f"fp8: in_features must be a multiple of {BLOCK} for the FP8 GEMM, "
                             f"got {self.in_features}")
        if fp8 and weight.dtype != FP8:
            weight, scale = dskernels.per_block_cast_to_fp8(weight.to(device=device, dtype=torch.bfloat16).contiguous(),
                                                            round_scale=self.round_scale)
        elif not fp8 and weight.dtype == FP8:  # on the layer's device (the bytes travel, the GPU computes)
            weight, scale = dequantize_block_fp8(weight.to(device), scale.to(device), dtype), None
        if fp8:
            load_weight(self, "weight", weight, FP8, device, source)
            load_weight(self, "weight_scale_inv", scale, torch.float32, device, source_scale)
        else:
            load_weight(self, "weight", weight, dtype, device, source)
            self.weight_scale_inv = None

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        if self.is_fp8:
            return dequantize_block_fp8(self.weight, self.weight_scale_inv, dtype)
        return self.weight.to(dtype)

    def cast_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., k] -> the per-token (1x128) FP8 cast of its rows that this FP8 layer's GEMM reads,
        (x_fp8 [rows, k], scales [rows, k / 128]); one cast can serve every FP8 Linear that reads
        the same x with the same round_scale (shared_cast)."""
        refuse_gradient("an FP8 Linear", x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype not in (torch.bfloat16, torch.float32):
            x2 = x2.to(torch.bfloat16)
        return dskernels.per_token_cast_to_fp8(x2.contiguous(), round_scale=self.round_scale)

    def gemm_into(self, x_fp8: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> None:
        """out [rows, out_features] (bfloat16, any strides) = the FP8 layer's product of cast_input's pair."""
        if out.shape[0]:
            dskernels.gemm_fp8_fp8_bf16_nt(x_fp8, (self.weight, self._gemm_scales(self.weight_scale_inv)), out)

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype. x_fp8: x's rows already cast
        (shared_cast's pair), used by an FP8 layer, ignored by a float one."""
        if not self.is_fp8:
            # dskernels.batch_invariant(): the kernel's dtypes (a float64 layer keeps F.linear, as the
            # layer's other float matmuls do)
            if x.dtype in FLOAT_DTYPES and invariant_path(x.device, x, self.weight, self.bias):
                return invariant_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        # math.prod, not torch.Size.numel(): that one makes symbolic sizes constants under torch.export
        if x_fp8 is None and math.prod(x.shape[:-1]):
            x_fp8 = self.cast_input(x)
        return self.from_fp8(x_fp8, x.shape[:-1], x.dtype)

    def from_fp8(self, x_fp8: tuple[torch.Tensor, torch.Tensor] | None, lead_shape, dtype: torch.dtype) -> torch.Tensor:
        """The FP8 layer on rows already cast (x_fp8: cast_input's or silu_and_mul_cast_to_fp8's
        pair; None for no rows) -> [*lead_shape, out_features] in dtype (plus the bias)."""
        out = torch.empty(math.prod(lead_shape), self.out_features, dtype=torch.bfloat16, device=self.weight.device)
        if x_fp8 is not None:
            self.gemm_into(x_fp8, out)
        out = out.to(dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.reshape(*lead_shape, self.out_features)


def shared_cast(x: torch.Tensor, *layers: Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One FP8 cast of x for the layers that all read it (q_a_proj and kv_a_proj_with_mqa, an MLP's
    gate and up projections): a cast kernel fewer per extra FP8 layer. Pass it to each of them
    (Linear.forward ignores it in a float layer). None where none of them is FP8, their round_scale
    differ, or x has no rows."""
    fp8 = [layer for layer in layers if layer.is_fp8]
    if not fp8 or any(layer.round_scale != fp8[0].round_scale for layer in fp8) or not math.prod(x.shape[:-1]):
        return None
    return fp8[0].cast_input(x)


def norm_and_cast(norm: RMSNorm, x: torch.Tensor, *layers: Linear):
    """(norm(x), shared_cast(norm(x), *layers)) in one kernel where the fused Triton norm takes x
    (triton_fusable; a bf16 or fp32 x, as the FP8 cast reads them, dim % 128 == 0) and norm is a
    plain RMSNorm without hooks (the kernel stands in for its call): its cast is
    per_token_cast_to_fp8's bit for bit, of the values it stores. Else the two ops."""
    return _norm_and_cast(norm, x, None, layers)


def add_norm_and_cast(norm: RMSNorm, x: torch.Tensor, addend: torch.Tensor, *layers: Linear):
    """(h, norm(h), shared_cast(norm(h), *layers)) with h = x + addend (the residual connection),
    the add in the norm's kernel too where it runs (an addend of x's shape), rounded as torch's."""
    return _norm_and_cast(norm, x, addend, layers)


def _norm_and_cast(norm: RMSNorm, x: torch.Tensor, addend: torch.Tensor | None, layers: tuple[Linear, ...]):
    fp8 = [layer for layer in layers if layer.is_fp8]
    castable = bool(fp8 and all(layer.round_scale == fp8[0].round_scale for layer in fp8) and math.prod(x.shape[:-1])
                    and x.dtype in (torch.bfloat16, torch.float32) and x.shape[-1] % BLOCK == 0)
    addends = () if addend is None else (addend,)
    fusable = (_called_plainly(norm) and all(t.shape == x.shape for t in addends)
               and triton_fusable(x, norm.weight, *addends))
    if fusable and (castable or addends):
        from dskernels.triton import layer as triton_layer

        out = triton_layer.rms_norm(x, norm.weight, norm.eps, cast_round_scale=fp8[0].round_scale if castable else None,
                                    addend=addend)
        if castable:
            return out
        total, normed = out
        return total, normed, shared_cast(normed, *layers)
    if addends:
        x = x + addend
    normed = norm(x)
    return (*((x,) if addends else ()), normed, shared_cast(normed, *layers))


def _called_plainly(module: nn.Module) -> bool:
    """Whether calling module runs its forward alone: an RMSNorm itself (not a subclass) without
    hooks (unhooked)."""
    return type(module) is RMSNorm and unhooked(module)


def unhooked(module: nn.Module) -> bool:
    """Whether module has no hooks of its own and no global ones (torch's own test for its call's
    fast path): a call of it that does more than its own work (a norm's kernel that also casts, an
    MoE that also adds the residual) is seen by nothing."""
    hooks = torch.nn.modules.module
    return not (module._backward_hooks or module._backward_pre_hooks or module._forward_hooks
                or module._forward_pre_hooks or hooks._global_backward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def refuse_gradient(what: str, *tensors) -> None:
    """Raises where autograd would record through inference kernels (the FP8 GEMMs and casts, MLA
    decode, V3.2's sparse attention): they run under no_grad, so a backward would silently leave
    their share out of the gradients."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"{what} has no gradient (dskernels' ops are inference kernels): run it under "
                           "torch.no_grad() or torch.inference_mode(); gradients flow through a layer with "
                           "float weights in the prefill without a cache (V3's dense attention)")


def triton_fusable(*tensors: torch.Tensor) -> bool:
    """Whether the layer's small fused Triton kernels (dskernels/triton/layer.py: RMSNorm, rope, the
    paged cache write, the MoE combine) take these tensors in place of their torch ops (the
    definition): eager (under torch.compile inductor fuses the torch ops itself), no gradient to
    keep (inference kernels), one float dtype (bf16, fp16, fp32), unit last stride, and the Triton
    backend chosen for their device (CUDA tensors under auto; CPU ones only with the triton backend
    forced under the interpreter; not under a forced "cuda" backend)."""
    first = tensors[0]
    if torch.compiler.is_compiling() or first.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(t.dtype != first.dtype or t.stride(-1) != 1 for t in tensors) or not triton_only_ops():
        return False
    return select_backend("fused layer ops", first.device, has_cuda=False, has_triton=True) == "triton"


def triton_only_ops() -> bool:
    """The fused SwiGLU ops (silu_and_mul, its FP8-cast form), grouped_topk and the bf16 masked GEMM
    have no CUDA kernel; under a forced "cuda" backend, which runs CUDA kernels only, the layer
    takes torch's ops (and per_token_cast_to_fp8, which has one) instead."""
    return current_backend() != "cuda"


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers' MLP and the shared experts.

    FP8 weights: x is cast once for both gate and up, whose GEMMs write the two halves of one
    [rows, 2I] buffer, and `silu_and_mul_cast_to_fp8` turns it into the down projection's FP8 input
    in one pass (the SwiGLU in fp32: no bf16 rounding of silu(gate) or of the product)."""

    def __init__(self, hidden: int, intermediate: int, dtype=None, device=None, fp8: bool = False):
        super().__init__()
        self.intermediate = intermediate
        self.gate_proj = Linear(hidden, intermediate, dtype, device, fp8=fp8)
        self.up_proj = Linear(hidden, intermediate, dtype, device, fp8=fp8)
        self.down_proj = Linear(intermediate, hidden, dtype, device, fp8=fp8)

    def input_layers(self) -> tuple[Linear, ...]:
        """The projections that read the MLP's input (norm_and_cast's layers)."""
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_fp8: x's rows already cast for input_layers() (norm_and_cast's), or None."""
        if x_fp8 is None:
            x_fp8 = shared_cast(x, self.gate_proj, self.up_proj)
        if not (self.gate_proj.is_fp8 and self.up_proj.is_fp8 and self.down_proj.is_fp8) or x_fp8 is None \
                or not triton_only_ops():
            return self.down_proj(F.silu(self.gate_proj(x, x_fp8)) * self.up_proj(x, x_fp8))
        h = torch.empty(x_fp8[0].shape[0], 2 * self.intermediate, dtype=torch.bfloat16, device=x.device)
        self.gate_proj.gemm_into(x_fp8, h[:, :self.intermediate])
        self.up_proj.gemm_into(x_fp8, h[:, self.intermediate:])
        act = dskernels.silu_and_mul_cast_to_fp8(h, round_scale=self.down_proj.round_scale)
        return self.down_proj.from_fp8(act, x.shape[:-1], x.dtype)
