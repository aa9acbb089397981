"""The float matmuls of batch-invariant mode (dskernels.batch_invariant): the dense bf16 GEMMs,
`einsum` and the model layer's float matmuls (float Linear weights, the MoE router's fp32 gate
GEMM, the absorbed MLA projections, float experts, V3.2's indexer) run
dskernels/triton/matmul.py's fixed-tile kernel instead of torch's matmuls, which pick their
kernel (and so a row's summation order) by shape. docs/api.md, "Determinism and batch invariance".

`invariant_path` says where it runs: the mode on, on a CUDA device on any backend but "ref", and
on CPU tensors only with the Triton backend forced under TRITON_INTERPRET=1 (the tests); the
reference backend keeps torch's matmuls. Where a gradient must flow the layer keeps torch's ops
too (the kernel is an inference kernel, as every op here).
"""

from __future__ import annotations

import torch

from dskernels._backend import batch_invariant_enabled, current_backend, triton_installed, triton_interpret

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def invariant_path(device: torch.device, *tensors) -> bool:
    """Whether batch-invariant mode's matmul runs for tensors on `device` (module docstring); tensors:
    the operands, none of which may need a gradient (else torch's ops, which have one)."""
    if not batch_invariant_enabled():
        return False
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return False
    asked = current_backend()
    if asked == "ref":
        return False
    if device.type == "cpu":
        return asked == "triton" and triton_installed() and triton_interpret()
    if device.type != "cuda":
        return False
    if not triton_installed():
        raise RuntimeError("dskernels.batch_invariant: the float matmuls run a Triton kernel in this mode, and "
                           "triton cannot run here; install triton or leave the mode off")
    return True


def invariant_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, c: torch.Tensor | None = None,
                 ends: torch.Tensor | None = None) -> torch.Tensor:
    """c + a @ b.T per group in fp32, rounded once to out_dtype: a [G, m, k] and b [G, n, k] ->
    [G, m, n]; with ends (int32 [G], cumulative row ends) a [M, k] in groups of rows times b[g] ->
    [M, n] (rows past ends[-1] unspecified). a and b: one dtype of FLOAT_DTYPES (b is cast to a's
    where they differ), any strides. An opaque op under torch.compile."""
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if torch.compiler.is_compiling():
        return torch.ops.dskernels._batch_invariant_mm(a, b, c, ends, out_dtype)
    return _invariant_mm(a, b, c, ends, out_dtype)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., k] @ weight[n, k].T (+ bias, added after the rounding, as the FP8 Linear adds it) ->
    [..., n] in out_dtype (x's by default): F.linear's result, row by row the same bits whatever
    the number of rows."""
    rows = x.reshape(1, -1, x.shape[-1])
    out = invariant_mm(rows, weight.unsqueeze(0), out_dtype or x.dtype).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.to(out.dtype)


def _check(a, b, c, ends, out_dtype) -> tuple[int, ...]:
    if a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
        raise TypeError(f"a, b: expected one dtype of {FLOAT_DTYPES}, got {a.dtype} and {b.dtype}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {FLOAT_DTYPES}, got {out_dtype}")
    if b.dim() != 3 or a.dim() != (2 if ends is not None else 3) or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a, b: expected [{'M' if ends is not None else 'G, m'}, k] and [G, n, k], got "
                         f"{list(a.shape)} and {list(b.shape)}")
    if ends is None and a.shape[0] != b.shape[0]:
        raise ValueError(f"a: expected {b.shape[0]} groups (b's first dimension), got {list(a.shape)}")
    if ends is not None and (ends.dtype != torch.int32 or tuple(ends.shape) != (b.shape[0],)):
        raise ValueError(f"ends: expected int32 [{b.shape[0]}], got {ends.dtype} {list(ends.shape)}")
    shape = (*a.shape[:-1], b.shape[1])
    if c is not None and tuple(c.shape) != shape:
        raise ValueError(f"c: expected shape {list(shape)}, got {list(c.shape)}")
    return shape


def _invariant_mm(a, b, c, ends, out_dtype) -> torch.Tensor:
    shape = _check(a, b, c, ends, out_dtype)
    out = torch.empty(shape, dtype=out_dtype, device=a.device)
    if a.device.type == "meta":
        return out
    if a.shape[-1] == 0:  # (no K loop: the kernel would store c or zeros too; this skips the launch)
        return out.copy_(c) if c is not None else out.zero_()
    from dskernels.triton import matmul as triton_matmul

    triton_matmul.matmul_nt(a, b, out, c, ends)
    return out


@torch.library.custom_op("dskernels::_batch_invariant_mm", mutates_args=())
def _batch_invariant_mm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, ends: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    return _invariant_mm(a, b, c, ends, out_dtype)


@_batch_invariant_mm.register_fake
def _(a, b, c, ends, out_dtype):
    return a.new_empty(_check(a, b, c, ends, out_dtype), dtype=out_dtype)
