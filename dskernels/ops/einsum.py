"""DeepGEMM's einsum entries: `einsum(expr, a, b, d, c=None)` on bf16 operands and
`fp8_einsum(expr, (a, sa), (b, sb), d, c=None, recipe=(1, 128, 128))` on FP8 ones: batched GEMMs
named by an einsum expression. DeepSeek's MLA uses them for its absorbed projections
(`bhd,hdr->bhr`: the query through W_UK into the latent space; `bhr,hdr->bhd`: the attention output
back through W_UV) and their weight gradient (`bhd,bhr->hdr`); `bmk,bnk->mn` sums a batch of
products into one weight gradient.

DeepGEMM accepts those four strings. Here any expression of the same kind works. Every letter must
name a dimension of exactly two operands, or of all three. A letter of a, b and d is a batch
dimension, one of a and b only is contracted, one of a and d only is a row of the product, and one
of b and d only is a column. The operands are permuted (and, with several letters per role,
reshaped) into one batched GEMM, as torch.einsum does. docs/gemm.md, "einsum".
"""

from __future__ import annotations

import math
import re

import torch

from dskernels._backend import current_backend
from dskernels._checks import as_flag, check_no_overlap, check_one_device, check_reads_apart, check_tensor
from dskernels._inference import inference_kernel
from dskernels.ops.invariant import invariant_mm, invariant_path
from dskernels.ops.gemm import BLOCK_RECIPE, FP8, GROUP_SIZE, ROW_RECIPE, _check_c, _general_backend, _unpack, recipe_tuple
from python_ref import gemm as ref

BF16 = torch.bfloat16
MAX_BATCH = 65535  # fp8_einsum's batches: grid dimension 1 of the masked kernels (CUDA's limit)


@inference_kernel("einsum", writes=("d",))
def einsum(expr: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None,
           use_cublaslt: bool = False) -> None:
    """d = c + torch.einsum(expr, a, b) on bf16 operands, summed in fp32 and rounded once to d's dtype.

    Args:
        expr: "a_letters,b_letters->d_letters", e.g. DeepGEMM's "bhr,hdr->bhd", "bhd,hdr->bhr",
            "bhd,bhr->hdr" or "bmk,bnk->mn" (module docstring: which expressions work).
        a, b: bfloat16 tensors with one dimension per letter, on one device, any strides.
        d: bfloat16 or float32, with d_letters' sizes, overwritten.
        c: None, d itself (accumulate in place) or a tensor of d's shape and dtype sharing no
            memory with d.
        use_cublaslt: DeepGEMM's choice between its own kernel and cuBLASLt; accepted for a drop-in,
            and the same either way here (below).

    On a GPU this is cuBLAS (torch.bmm with fp32 accumulation; torch's
    allow_bf16_reduced_precision_reduction applies to a bf16 d, as for bf16_gemm_nt). On CPU, or with
    backend("ref"), the reference. Under dskernels.batch_invariant() (not on the "ref" backend) the
    same batched GEMM on a Triton kernel of one fixed tile with K summed in order: a row's bits do
    not depend on the other rows or batches (as bf16_gemm_nt).
    """
    as_flag("use_cublaslt", use_cublaslt)
    roles = _parse(expr, (a, b, d), ("a", "b", "d"))
    check_one_device(a=a, b=b, d=d, c=c)
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t, dtypes=(BF16,), device=d.device)
    check_tensor("d", d, dtypes=(BF16, torch.float32))
    if not torch.compiler.is_compiling():  # eager (not traceable); compiled, torch's copy_ into d refuses it
        check_no_overlap("d", d)
    _check_c(c, d, "d")
    if invariant_path(d.device):
        _einsum_invariant(roles, a, b, d, c)
        return
    if d.device.type != "cuda" or current_backend() == "ref":
        d.copy_(ref.einsum(expr, a, b, d.dtype, c))
        return
    _einsum_bmm(roles, a, b, d, c)


def _einsum_bmm(roles, a, b, d, c) -> None:
    """einsum's GPU path: one torch.bmm (cuBLAS) over the operands permuted and reshaped by role."""
    lhs, rhs, view = _as_bmm(roles, a, b)
    batch, m, n, k = (math.prod(roles["sizes"][x] for x in roles[role]) for role in ("batch", "m", "n", "k"))
    lhs, rhs = lhs.reshape(batch, m, k), rhs.reshape(batch, n, k).transpose(1, 2)  # several letters: a copy
    if d.dtype == BF16 and c is None:
        product = torch.bmm(lhs, rhs)
    else:
        product = torch.bmm(lhs, rhs, out_dtype=torch.float32)
        if c is not None:  # in fp32, before the one rounding to d's dtype
            product = product + view(c).reshape(batch, m, n)
    view(d).copy_(product.reshape(view(d).shape))


def _einsum_invariant(roles, a, b, d, c) -> None:
    """einsum under dskernels.batch_invariant(): the batched GEMM of _einsum_bmm on the fixed-tile
    kernel (dskernels/ops/invariant.py), c added in fp32 before the one rounding to d's dtype."""
    lhs, rhs, view = _as_bmm(roles, a, b)
    batch, m, n, k = (math.prod(roles["sizes"][x] for x in roles[role]) for role in ("batch", "m", "n", "k"))
    c3 = None if c is None else view(c).reshape(batch, m, n)  # (read before d is written: c may be d)
    product = invariant_mm(lhs.reshape(batch, m, k), rhs.reshape(batch, n, k), d.dtype, c3)
    view(d).copy_(product.reshape(view(d).shape))


def fp8_einsum(expr: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               d: torch.Tensor, c: torch.Tensor | None = None, recipe=BLOCK_RECIPE) -> None:
    """d = c + torch.einsum(expr, dequant(a), dequant(b)) on FP8 operands with 1x128 / 128x128 scales,
    summed in fp32 (promoted per 128-wide block of the contracted dimension, as every FP8 GEMM here)
    and rounded once to d's dtype.

    Args:
        expr: "a_letters,b_letters->d_letters" with one contracted letter, at most one batch letter
            and one row (a, d) and one column (b, d) letter, e.g. "bhr,hdr->bhd" (r contracted, h
            the batch), "bhd,hdr->bhr" or "bhd,bhr->hdr".
        a: (a, sa): a float8_e4m3fn with one dimension per letter; sa float32 of a's shape with the
            contracted dimension k in blocks of 128 (k / 128; k must be a multiple of 128): 1x128
            scales along k.
        b: (b, sb): b float8_e4m3fn; sb float32 of b's shape with k / 128 and, with recipe
            (1, 128, 128), its column dimension n in blocks of 128 (ceil(n / 128): 128x128 blocks,
            a weight); with (1, 1, 128) n itself (1x128 scales, b an activation too). The batch
            letter (optional) may name at most 65535 batches (a grid dimension of the kernels).
        d: bfloat16 or float32, with d_letters' sizes, overwritten; c as for einsum.
        recipe: (1, 128, 128) (DeepGEMM's default) or (1, 1, 128), checked against sb's shape.

    Any strides. Runs as one batched GEMM (fp8_bmm_nt): on the masked grouped GEMM's kernels for a
    bf16 d with 128x128 b scales and no c, on Triton (any CUDA GPU) or the reference (CPU) for the
    rest. An operand whose contracted dimension is not its last is copied K-major first on Hopper
    (its FP8 wgmma reads K-major tiles only), as for fp8_gemm_nn.
    """
    a, sa = _unpack("a", a)
    b, sb = _unpack("b", b)
    roles = _parse(expr, (a, b, d), ("a", "b", "d"))
    if len(roles["k"]) != 1 or len(roles["m"]) != 1 or len(roles["n"]) != 1 or len(roles["batch"]) > 1:
        raise ValueError(f"expr: fp8_einsum takes one contracted, one row (a and d), one column (b and d) and at "
                         f"most one batch letter (a, b and d), got {expr!r}")
    recipe = recipe_tuple("recipe", recipe)
    if recipe is None or recipe not in (BLOCK_RECIPE, ROW_RECIPE):
        raise ValueError(f"recipe: expected {BLOCK_RECIPE} (128x128 scales on b) or {ROW_RECIPE} (1x128 on b), "
                         f"got {recipe!r}")
    check_one_device(a=a, sa=sa, b=b, sb=sb, d=d, c=c)
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t, dtypes=(FP8,), device=d.device)
    check_tensor("d", d, dtypes=(BF16, torch.float32))
    if not torch.compiler.is_compiling():  # (the op checks again, traceably)
        check_no_overlap("d", d)
    for letter in roles["batch"]:
        if roles["sizes"][letter] > MAX_BATCH:
            raise ValueError(f"expr: the batch letter {letter!r} names {roles['sizes'][letter]} batches, more than "
                             f"the {MAX_BATCH} the kernels' grid holds; make it a row letter of a and d instead")
    (k_letter,), (n_letter,) = roles["k"], roles["n"]
    k = a.shape[roles["a"].index(k_letter)]
    if k % GROUP_SIZE:
        raise ValueError(f"a: expected the contracted dimension {k_letter!r} to be a multiple of {GROUP_SIZE} "
                         f"(its scales cover 128 elements each), got {k}")
    blocks = {k_letter: k // GROUP_SIZE}
    _check_scales("sa", sa, a, roles["a"], blocks, "1x128 scales along the contracted dimension", d.device)
    if tuple(recipe) == BLOCK_RECIPE:
        blocks[n_letter] = math.ceil(b.shape[roles["b"].index(n_letter)] / GROUP_SIZE)
        what = f"recipe {BLOCK_RECIPE}: 128x128 blocks of b over {k_letter!r} and {n_letter!r}"
    else:
        what = f"recipe {ROW_RECIPE}: 1x128 scales along {k_letter!r}"
    _check_scales("sb", sb, b, roles["b"], blocks, what, d.device)
    _check_c(c, d, "d")
    lhs, rhs, view = _as_bmm(roles, a, b)
    scales_a, scales_b, _ = _as_bmm(roles, sa, sb)
    if c is not None:
        if not torch.compiler.is_compiling():  # eager: every refusal before d is written (c: the general form)
            _general_backend(d.device, "fp8_bmm_nt")
            check_reads_apart("d", d, a=a, sa=sa, b=b, sb=sb)  # (the op checks too, after the copy)
        if c is not d:
            d.copy_(c)  # the kernel adds to d
    torch.ops.dskernels.fp8_bmm_nt(lhs, scales_a, rhs, scales_b, view(d), c is not None)


# ---- the expression ----

def _parse(expr, tensors, names) -> dict:
    """Letters of each operand, their sizes, and the roles of the letters: batch (in a, b, d), m (a, d),
    n (b, d), k (a, b), in d's order for batch, m, n and a's for k. Checks each tensor's rank and
    that a letter has one size wherever it appears."""
    if not isinstance(expr, str):
        raise TypeError(f"expr: expected a str 'a_letters,b_letters->d_letters', got {type(expr).__name__}")
    if expr.count(",") != 1 or expr.count("->") != 1:
        raise ValueError(f"expr: expected 'a_letters,b_letters->d_letters', got {expr!r}")
    inputs, out = expr.replace(" ", "").split("->")
    letters = dict(zip(names, (*inputs.split(","), out)))
    sizes = {}
    for name, t in zip(names, tensors):
        word = letters[name]
        if not re.fullmatch("[a-zA-Z]*", word) or len(set(word)) != len(word):
            raise ValueError(f"expr: expected distinct letters for {name}, got {word!r} in {expr!r}")
        check_tensor(name, t, ndim=len(word))
        for letter, size in zip(word, t.shape):
            if sizes.setdefault(letter, (size, name))[0] != size:
                first_size, first = sizes[letter]
                raise ValueError(f"{name}: expected {letter!r} = {first_size} (as in {first}), got shape "
                                 f"{tuple(t.shape)} for {word!r}")
    a, b, d = (letters[name] for name in names)
    for letter in sizes:
        if (letter in a) + (letter in b) + (letter in d) < 2:
            raise ValueError(f"expr: every letter must name a dimension of two or three operands (no sums or "
                             f"broadcasts within one), got {letter!r} in {expr!r}")
    return {"a": a, "b": b, "d": d, "sizes": {letter: size for letter, (size, _) in sizes.items()},
            "batch": [x for x in d if x in a and x in b], "m": [x for x in d if x in a and x not in b],
            "n": [x for x in d if x in b and x not in a], "k": [x for x in a if x in b and x not in d]}


def _as_bmm(roles, a, b):
    """a as [batch..., m..., k...], b as [batch..., n..., k...] (permuted views) and a function giving
    a tensor of d's letters as [batch..., m..., n...]; with no batch letter, a batch of one."""
    def permuted(t, word, order):
        t = t.permute(*[word.index(x) for x in order])
        return t if roles["batch"] else t.unsqueeze(0)

    batch, m, n, k = roles["batch"], roles["m"], roles["n"], roles["k"]
    return (permuted(a, roles["a"], batch + m + k), permuted(b, roles["b"], batch + n + k),
            lambda t: permuted(t, roles["d"], batch + m + n))


def _check_scales(name, s, t, word, blocks, what, device) -> None:
    check_tensor(name, s, dtypes=(torch.float32,), device=device)
    expected = tuple(blocks.get(letter, size) for letter, size in zip(word, t.shape))
    if tuple(s.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} ({what}), got {tuple(s.shape)}")
