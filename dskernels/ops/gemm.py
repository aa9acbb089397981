"""FP8 block-scaled GEMMs (API.md section 2; DeepGEMM's `gemm_fp8_fp8_bf16_nt`,
`m_grouped_gemm_fp8_fp8_bf16_nt_contiguous` and `m_grouped_gemm_fp8_fp8_bf16_nt_masked`, their
newer names `fp8_gemm_nt`, `m_grouped_fp8_gemm_nt_contiguous`, `m_grouped_fp8_gemm_nt_masked`, and
`get_col_major_tma_aligned_tensor`), and DeepGEMM's `set_num_sms` / `get_num_sms`.

The math, layouts and tuning knobs are in docs/gemm.md; python_ref/gemm.py is the definition.
"""

from __future__ import annotations

import operator

import torch

from dskernels._backend import batch_invariant_enabled, env_choice, select_backend
from dskernels._checks import (as_flag, check_int, check_multiple, check_no_overlap, check_one_device,
                               check_reads_apart, check_tensor, may_share_memory, strides_may_overlap)
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel
from dskernels.ops.mla import CPU_SM_COUNT  # (get_num_sms() without a CUDA device: the CPU plans' count)
from dskernels.ops._sizes import as_sizes, check_sizes, check_sizes_tensor, sizes_on_device
from python_ref import gemm as ref

FP8 = torch.float8_e4m3fn
GROUP_SIZE = 128
_num_sms: int | None = None  # set_num_sms: the SM limit of the sm90 GEMMs (None: all)


# ---- public functions ----

def gemm_fp8_fp8_bf16_nt(lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor],
                         out: torch.Tensor) -> None:
    """out = dequant(lhs) @ dequant(rhs).T in bf16, accumulated in fp32 ("nt": rhs is [n, k]).

    Args:
        lhs: (a, sa), e.g. from per_token_cast_to_fp8:
            a: [m, k] torch.float8_e4m3fn, k % 128 == 0, any strides.
            sa: [m, k / 128] float32, one scale per row per 128 columns, any strides (row-major
                as our casts return it, or DeepGEMM's column-major TMA-aligned layout from
                get_col_major_tma_aligned_tensor). dequant(a)[i, c] = a[i, c] * sa[i, c // 128].
        rhs: (b, sb), e.g. from per_block_cast_to_fp8:
            b: [n, k] torch.float8_e4m3fn (any n >= 0, any strides).
            sb: [ceil(n / 128), k / 128] float32, one scale per 128x128 block, any strides.
                dequant(b)[j, c] = b[j, c] * sb[j // 128, c // 128].
        out: [m, n] bfloat16 on the same device, any strides; overwritten.

    Returns None. Raises TypeError / ValueError naming the argument (a, sa, b, sb, out) for a
    wrong dtype, rank, device or shape, or k not a multiple of 128.
    """
    a, sa = _unpack("lhs", lhs)
    b, sb = _unpack("rhs", rhs)
    torch.ops.dskernels.gemm_fp8_fp8_bf16_nt(a, sa, b, sb, out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: tuple[torch.Tensor, torch.Tensor],
                                              rhs: tuple[torch.Tensor, torch.Tensor],
                                              out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """Grouped GEMM over rows stacked by group (MoE prefill): out[i] = dequant(a)[i] @ dequant(b[g]).T
    with g = m_indices[i].

    Args:
        lhs: (a, sa): a [M, k] torch.float8_e4m3fn, k % 128 == 0; sa [M, k / 128] float32
            (1x128 scales, any strides).
        rhs: (b, sb): b [G, n, k] torch.float8_e4m3fn, one weight matrix per group;
            sb [G, ceil(n / 128), k / 128] float32 (128x128 scales, any strides).
        out: [M, n] bfloat16, overwritten on the rows that belong to a group.
        m_indices: [M] int32 on the same device: the group of each row, -1 for padding rows.
            Rows of one group form one contiguous segment. DeepGEMM's layout (each segment padded
            to a multiple of 128 rows with -1 rows) and unaligned segments both work; groups may
            be empty. Output rows whose index is -1 (or outside [0, G)) are left unspecified.

    Returns None. Reads m_indices on the device (no host sync on the Triton path).
    """
    a, sa = _unpack("lhs", lhs)
    b, sb = _unpack("rhs", rhs)
    torch.ops.dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: tuple[torch.Tensor, torch.Tensor],
                                          rhs: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
                                          masked_m: torch.Tensor, expected_m: int) -> None:
    """Batched GEMM with a per-group row count read on the device (MoE decode, CUDA graphs):
    out[g, i] = dequant(a)[g, i] @ dequant(b[g]).T for i < masked_m[g].

    Args:
        lhs: (a, sa): a [G, m_max, k] torch.float8_e4m3fn, k % 128 == 0;
            sa [G, m_max, k / 128] float32 (1x128 scales, any strides).
        rhs: (b, sb): b [G, n, k] torch.float8_e4m3fn; sb [G, ceil(n / 128), k / 128] float32.
        out: [G, m_max, n] bfloat16; rows i >= masked_m[g] are left unspecified.
        masked_m: [G] int32 on the same device: the valid rows of each group (clamped to
            [0, m_max]). Never read on the host, so the call can be captured in a CUDA graph and
            replayed with new counts.
        expected_m: int (python or numpy), the expected rows per group: a tuning hint only, never a
            bound (any value gives the same result). The sm90 CUDA kernels use 64-row tiles when
            1 <= expected_m <= 64, else 128-row tiles (docs/gemm.md, "Configs").

    Returns None.
    """
    _masked_gemm(lhs, rhs, out, masked_m, expected_m)


def _masked_gemm(lhs, rhs, out, masked_m, expected_m, names: tuple[str, str, str] = ("lhs", "rhs", "out")) -> None:
    """m_grouped_gemm_fp8_fp8_bf16_nt_masked's work; names: what the caller calls lhs, rhs and out
    (DeepGEMM's newer entry: a, b, d)."""
    a, sa = _unpack(names[0], lhs)
    b, sb = _unpack(names[1], rhs)
    expected_m = expected_m_int(expected_m)
    try:
        torch.ops.dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, out, masked_m, expected_m)
    except (TypeError, ValueError):
        if names[2] != "out":  # the op calls it out: a refusal checked again raises it under the caller's name
            _check_masked(a, sa, b, sb, out, masked_m, expected_m, out_name=names[2])
        raise


def expected_m_int(expected_m):
    """expected_m as the ops take it: a Python int, from a numpy integer too (as DeepGEMM's binding
    takes it). (Under torch.compile a symbolic int counts as an int here, and must stay symbolic:
    operator.index would specialize it. isinstance first: torch 2.11's dynamo cannot trace hasattr
    on a symbolic int.)"""
    if not isinstance(expected_m, (int, torch.SymInt, torch.Tensor)) and hasattr(expected_m, "__index__"):
        expected_m = operator.index(expected_m)
    _check_expected_m(expected_m)
    return expected_m


BLOCK_RECIPE = (1, 128, 128)  # DeepGEMM's recipe names: (1x128 a scales, 128x128 b scales)
ROW_RECIPE = (1, 1, 128)  # 1x128 scales on both operands


def recipe_tuple(name: str, value) -> tuple | None:
    """A recipe argument (a tuple or list of ints, or None) as a tuple; TypeError naming it otherwise."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        # (a str here is compiled_dims given by position in DeepGEMM's order before recipe_a/recipe_b)
        hint = " (DeepGEMM's current order: recipe, recipe_a, recipe_b, compiled_dims)" if isinstance(value, str) else ""
        raise TypeError(f"{name}: expected a tuple of ints such as (1, 128, 128){hint}, got {value!r}")
    return tuple(value)


def check_jit_hints(compiled_dims, disable_ue8m0_cast=False) -> None:
    """DeepGEMM's compiled_dims (a str naming the dims its JIT compiles in, such as "nk") and
    disable_ue8m0_cast (a bool) change nothing here, but are still checked: a value of another type
    is an argument given in the wrong place (a 5th positional True meant for use_psum_layout lands
    in compiled_dims), which would otherwise be dropped without a word."""
    if not isinstance(compiled_dims, str):
        raise TypeError(f"compiled_dims: expected a str such as 'nk' (DeepGEMM's JIT hint, ignored here; an "
                        f"argument given in its place?), got {type(compiled_dims).__name__}")
    as_flag("disable_ue8m0_cast", disable_ue8m0_cast)


def _deepgemm_options(recipe, allowed=(BLOCK_RECIPE,), recipe_a=None, recipe_b=None):
    """The options of DeepGEMM's newer entry points: compiled_dims (a JIT hint) and
    disable_ue8m0_cast (Blackwell's packed scales) mean nothing here; recipe must be ours, or
    recipe_a (gran_m, gran_k) with recipe_b (gran_n, gran_k), DeepGEMM's per-operand spelling of
    the same. Returns the recipe asked for (None: read from sb's shape)."""
    recipe, recipe_a, recipe_b = (recipe_tuple(name, v) for name, v in
                                  (("recipe", recipe), ("recipe_a", recipe_a), ("recipe_b", recipe_b)))
    if recipe_a is not None or recipe_b is not None:
        split = (tuple(recipe_a) if recipe_a is not None else (1, 128),
                 tuple(recipe_b) if recipe_b is not None else None)
        if split[0] != (1, 128) or split[1] not in (None, (128, 128), (1, 128)):
            raise ValueError(f"recipe_a, recipe_b: only (1, 128) for a and (128, 128) or (1, 128) for b are "
                             f"supported here, got {recipe_a!r} and {recipe_b!r}")
        joined = None if split[1] is None else (1, *split[1])
        if recipe is not None and joined is not None and tuple(recipe) != joined:
            raise ValueError(f"recipe: {recipe!r} disagrees with recipe_a {recipe_a!r} and recipe_b {recipe_b!r}")
        recipe = recipe if joined is None else joined
    if recipe is not None and tuple(recipe) not in allowed:
        names = " or ".join(str(r) for r in allowed)
        raise ValueError(f"recipe: only {names} (the a and b scales' granularity: (1, 1, 128) for 1x128 "
                         f"scales on both, (1, 128, 128) for 128x128 blocks of b) is supported here, got {recipe!r}")
    return recipe


def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False) -> None:
    """DeepGEMM's general dense GEMM (its argument names), d = c + dequant(a) @ dequant(b).T:
    gemm_fp8_fp8_bf16_nt when d is bf16, c is None and b has 128x128 block scales, and also:

    Args:
        a: (a, sa) as gemm_fp8_fp8_bf16_nt's lhs: a [m, k] fp8, sa [m, k / 128] fp32.
        b: (b, sb): b [n, k] fp8; sb [ceil(n / 128), k / 128] fp32 (128x128 blocks, recipe
            (1, 128, 128)) or [n, k / 128] (1x128 per row, recipe (1, 1, 128): b is an activation
            or a gradient too, as in a weight gradient dy.T @ x). Any strides.
        d: the output [m, n], bfloat16 or float32, any strides.
        c: None (d is overwritten) or [m, n] of d's dtype, added in fp32 before the one rounding
            to d's dtype; c may be d itself (accumulate in place: DeepGEMM's wgrad use).
        recipe: None (read from sb's shape), (1, 128, 128) or (1, 1, 128); checked against sb.
            Or DeepGEMM's newer per-operand spelling (the next two, in DeepGEMM's order): recipe_a
            (1, 128) and recipe_b (128, 128) or (1, 128).
        compiled_dims, disable_ue8m0_cast: DeepGEMM's JIT and Blackwell options, ignored.

    Returns None. The sm90 CUDA kernel covers the bf16, block-scaled, non-accumulating case; the
    others run on Triton (any CUDA GPU) or the reference (CPU).
    """
    check_jit_hints(compiled_dims, disable_ue8m0_cast)
    recipe = _deepgemm_options(recipe, (BLOCK_RECIPE, ROW_RECIPE), recipe_a, recipe_b)
    _general_gemm(a, b, d, c, recipe)


def _general_gemm(lhs, rhs, out, c, recipe, names: tuple[str, str, str] = ("a", "b", "d")) -> None:
    """fp8_gemm_nt's work; names: what the caller calls lhs, rhs and out (DeepGEMM's newer entries
    a, b, d; wgrad_gemm_fp8_fp8_fp32_nt lhs, rhs, out)."""
    a, sa = _unpack(names[0], lhs)
    b, sb = _unpack(names[1], rhs)
    out_name = names[2]
    # before out is written with c (the overlap checks in eager mode: torch.compile leaves them to the op)
    sb_per_row = _check_general(a, sa, b, sb, out, overlap=not torch.compiler.is_compiling(), out_name=out_name)
    # `if` on sb_per_row, not a comparison of it with a python bool: under torch.compile with
    # symbolic shapes that comparison fails inside dynamo
    if recipe is not None and b.shape[0] > 1 and (not sb_per_row if tuple(recipe) == ROW_RECIPE else sb_per_row):
        per = "row of b per 128 columns" if tuple(recipe) == ROW_RECIPE else "128x128 block of b"
        raise ValueError(f"sb: recipe {tuple(recipe)} means one scale per {per}, got shape {tuple(sb.shape)} "
                         f"for b of shape {tuple(b.shape)}")
    _check_c(c, out, out_name)
    if c is not None:
        if not torch.compiler.is_compiling():
            _general_backend(a.device)  # eager: every refusal before out is written
        if c is not out:
            out.copy_(c)  # DeepGEMM's rule too: the kernel adds to out
    torch.ops.dskernels.fp8_gemm_nt(a, sa, b, sb, out, c is not None)


def fp8_gemm_nn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False) -> None:
    """DeepGEMM's fp8_gemm_nn: d = c + A @ B with b = (b [k, n], sb [k / 128, ceil(n / 128)]
    per 128x128 block, or [k / 128, n] per column per 128 rows), i.e. fp8_gemm_nt of (b.T, sb.T)
    (DeepGEMM's own definition). Other arguments as fp8_gemm_nt; shapes in its error messages are
    the nt form's (b.T). On Hopper the Triton path first copies b K-major (one pass over b: its FP8
    wgmma reads K-major tiles only); the sm90 CUDA path does the same. For a weight used across
    calls, make that copy once and call fp8_gemm_nt."""
    t, _ = _unpack("a", a)
    fp8_gemm_nt(a, _transposed("b", b, t.shape[-1] if isinstance(t, torch.Tensor) else None, "b"),
                d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_tn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn",
                disable_ue8m0_cast=False) -> None:
    """DeepGEMM's fp8_gemm_tn: d = c + A.T @ B with a = (a [k, m], sa [k / 128, m]) and b =
    (b [k, n], sb [k / 128, ceil(n / 128)] or [k / 128, n]): fp8_gemm_nt of (a.T, sa.T), (b.T, sb.T),
    e.g. a weight gradient from two token-major operands. As fp8_gemm_nn otherwise."""
    t, st = _transposed("a", a, None, "a")
    fp8_gemm_nt((t, st), _transposed("b", b, t.shape[-1], "b"), d, c, recipe, recipe_a, recipe_b, compiled_dims,
                disable_ue8m0_cast)


def fp8_gemm_tt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn",
                disable_ue8m0_cast=False) -> None:
    """DeepGEMM's fp8_gemm_tt: d = c + A.T @ B.T with a = (a [k, m], sa [k / 128, m]) and b as
    for fp8_gemm_nt: fp8_gemm_nt of (a.T, sa.T), b. As fp8_gemm_nn otherwise."""
    t, st = _transposed("a", a, None, "a")
    u, _ = _unpack("b", b)
    if isinstance(u, torch.Tensor) and u.dim() == 2 and u.shape[-1] != t.shape[-1]:
        raise ValueError(f"b: expected k = {t.shape[-1]} (a's first dimension in this layout) as its last "
                         f"dimension, got shape {tuple(u.shape)}")
    fp8_gemm_nt((t, st), b, d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)


def _transposed(name: str, pair, k, operand: str):
    """(t, s) of an operand held K-outer ([.., k, rows]: a "t" a or an "n" b in DeepGEMM's letters),
    as the nt form's view (the last two dimensions swapped). k: the contraction length the other
    operand fixes (None: not known yet), checked against t's dimension -2."""
    t, s = _unpack(name, pair)
    for label, x in ((operand, t), (f"s{operand}", s)):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"{label}: expected a tensor of at least 2 dimensions (k first in this layout), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if k is not None and t.shape[-2] != k:
        raise ValueError(f"{operand}: expected k = {k} as dimension {t.dim() - 2} (this layout holds "
                         f"{operand} as [.., k, rows]), got shape {tuple(t.shape)}")
    return t.transpose(-1, -2), s.transpose(-1, -2)


def _check_c(c, out, out_name: str = "out") -> None:
    """c (added to the product) is None, out itself, or a tensor of out's shape and dtype that
    shares no memory with it. Eager calls check before out is written (the op checks out again).
    out_name: what the caller calls out (DeepGEMM's newer entries: d)."""
    if c is None:
        return
    check_tensor("c", c, dtypes=(out.dtype,), device=out.device)
    _check_shape("c", c, tuple(out.shape), f"{out_name}'s shape")
    if not torch.compiler.is_compiling():
        check_no_overlap(out_name, out)
        same_view = c.data_ptr() == out.data_ptr() and c.stride() == out.stride()  # c = out[:] is out
        if not same_view and may_share_memory(c, out):
            raise ValueError(f"c: expected {out_name} itself or a tensor that shares no memory with {out_name}, got "
                             f"one that overlaps it (strides {tuple(c.stride())}, {out_name}'s {tuple(out.stride())})")


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor],
                                         out: torch.Tensor, batch_sizes: list[int]) -> None:
    """DeepGEMM's K-grouped weight gradient (its sm90 API): out[g] += A_g @ B_g.T in fp32 for the
    groups of a MoE backward, where group g contracts over its own k_g = batch_sizes[g] tokens.

    Args:
        lhs: (a, sa): a float8_e4m3fn holding the groups' A_g [m, k_g] one after another, each
            row-major (at least m * sum(k_g) elements, contiguous, any shape; the rest unread); sa
            float32 [sum(ceil(k_g / 128)), m]: group g's ceil(k_g / 128) rows are A_g's 1x128
            scales transposed (row j: the scales of columns 128 j .. 128 j + 127 of every row).
        rhs: (b, sb) likewise for B_g [n, k_g], sb [sum(ceil(k_g / 128)), n] (1x128 scales: B_g is
            an activation too, the layer's input as X_g.T).
        out: float32 [G, m, n], accumulated in place (G = len(batch_sizes)).
        batch_sizes: k_g >= 0 per group (ints; 0 leaves out[g] as it is), any k_g (a last
            partial block of 128 counts its k_g columns only).

    One launch for every group (k_grouped_fp8_gemm_nt_contiguous's kernel), fp32 partial sums
    promoted per 128-wide K block as in fp8_gemm_nt. batch_sizes reach the device by one
    asynchronous copy (no host sync).
    """
    a, sa = _unpack("lhs", lhs)
    b, sb = _unpack("rhs", rhs)
    _k_grouped(a, sa, b, sb, out, batch_sizes, None, out, k_major=True, sizes_name="batch_sizes",
               dtypes=(torch.float32,), out_name="out")


def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, ks_tensor=None, c=None, recipe=ROW_RECIPE,
                                     compiled_dims="mn") -> None:
    """DeepGEMM's K-grouped GEMM, K-major layout: d[g] = c[g] + A_g @ B_g.T over group g's own
    k_g = ks[g] tokens (MoE weight gradients), one launch for every group.

    Args:
        a: (data, scales): data float8_e4m3fn holding each group's A_g [m, k_g] row-major one after
            another (contiguous, at least m * sum(ks) elements, any shape); scales float32
            [m, sum(ceil(k_g / 128))] (DeepGEMM passes the per-channel cast's scales transposed;
            any strides): group g's columns are A_g's 1x128 scales, column j covering its tokens
            128 j .. 128 j + 127.
        b: (data, scales) likewise for B_g [n, k_g], scales [n, sum(ceil(k_g / 128))].
        d: [G, m, n] float32 (or bfloat16: the sum in fp32, rounded once).
        ks: k_g >= 0 per group (python ints; any k_g, a last partial block counts its k_g tokens).
        ks_tensor: ks as int32 [G] on d's device, read by the kernel (DeepGEMM's argument); must
            equal ks (checked on CPU tensors, where reading it is free). None: made from ks by one
            asynchronous copy.
        c: None (d = the product; an empty group gives zeros), d itself (accumulate in place) or a
            [G, m, n] tensor of d's dtype sharing no memory with d.
        recipe: (1, 1, 128) only (1x128 scales on both operands). compiled_dims: ignored.
    """
    check_jit_hints(compiled_dims)
    _deepgemm_options(recipe, (ROW_RECIPE,))
    (a, sa), (b, sb) = _unpack("a", a), _unpack("b", b)
    check_tensor("sa", sa, ndim=2)
    check_tensor("sb", sb, ndim=2)
    _k_grouped(a, sa.T, b, sb.T, d, ks, ks_tensor, c, k_major=True, scales_transposed=True)


def k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, ks_tensor=None, c=None, recipe=ROW_RECIPE,
                                     compiled_dims="mn") -> None:
    """DeepGEMM's K-grouped GEMM, token-major layout: d[g] = c[g] + A_g @ B_g.T where A_g is rows
    sum(ks[:g]) .. + ks[g] of a [tokens, m], transposed: the weight gradient dy_g.T @ x_g straight
    from the activations as the forward pass stored them (cast by per_channel_cast_to_fp8; the
    caller makes no transposing copy: on Hopper the launcher makes one, docs/gemm.md). DeepGEMM
    has this form on sm100 only; here it runs wherever Triton does.

    Args:
        a: (data, scales): data float8_e4m3fn [>= sum(ks), m], any strides (rows past sum(ks)
            unread); scales float32 [sum(ceil(k_g / 128)), m], any strides: group g's rows are its
            per-channel 128x1 scales (row j covers the group's tokens 128 j .. 128 j + 127).
        b: (data, scales) likewise with n.
        d, ks, ks_tensor, c, recipe, compiled_dims: as for k_grouped_fp8_gemm_nt_contiguous.
    """
    check_jit_hints(compiled_dims)
    _deepgemm_options(recipe, (ROW_RECIPE,))
    (a, sa), (b, sb) = _unpack("a", a), _unpack("b", b)
    _k_grouped(a, sa, b, sb, d, ks, ks_tensor, c, k_major=False)


def _k_grouped(a, sa, b, sb, out, ks, ks_tensor, c, *, k_major: bool, sizes_name: str = "ks",
               dtypes=(torch.float32, torch.bfloat16), scales_transposed: bool = False, out_name: str = "d") -> None:
    ks = as_sizes(sizes_name, ks)
    _check_k_grouped(a, sa, b, sb, out, ks, ks_tensor, k_major, sizes_name=sizes_name, dtypes=dtypes,
                     overlap=not torch.compiler.is_compiling(), scales_transposed=scales_transposed,
                     out_name=out_name)
    _check_c(c, out, out_name)
    env_choice("DSKERNELS_GEMM_TOKEN_MAJOR", ("direct", "transpose"))  # a typo raises here, on every path
    if c is not None and c is not out:
        if not torch.compiler.is_compiling():
            _k_grouped_backend(out.device)  # eager: every refusal before out is written
        out.copy_(c)
    torch.ops.dskernels.k_grouped_fp8_gemm(a, sa, b, sb, out, ks, ks_tensor, k_major, c is not None)


def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout=None, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                     ensure_zero_padding=True, expected_m_for_psum_layout=None, *,
                                     m_indices=None) -> None:
    """DeepGEMM's newer name for m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, under DeepGEMM's newer
    argument names (a, b, d for lhs, rhs, out), plus its trailing options (block-scaled b only)
    and its psum layout:

    Args:
        grouped_layout: (or m_indices=, DeepGEMM 2.0's keyword) one group id per row ([M] int32, -1 for none), or
            with use_psum_layout=True one cumulative row end per group ([G] int32, read on the
            device): group g owns rows align(ends[g - 1], 128) .. ends[g] - 1 (group 0 from row 0),
            the rows between a group's end and the next 128-aligned start, and any past the last
            end, belong to none (DeepEP v2's receive layout; python_ref.gemm.psum_to_m_indices).
            The ends must not decrease (else the rows' groups are unspecified, reads stay inside).
        ensure_zero_padding: write zeros into the rows of no group (True by default, as in DeepGEMM;
            False leaves them unspecified, as the core op does, for one pass less over them).
        expected_m_for_psum_layout: rows per group to tune for (psum layout only; a hint).
    """
    check_jit_hints(compiled_dims, disable_ue8m0_cast)
    _deepgemm_options(recipe, recipe_a=recipe_a, recipe_b=recipe_b)
    grouped_layout = _layout_argument(grouped_layout, m_indices)
    use_psum_layout, ensure_zero_padding, expected_m = psum_options(use_psum_layout, ensure_zero_padding,
                                                                    expected_m_for_psum_layout)
    a, sa = _unpack("a", a)
    b, sb = _unpack("b", b)
    check_layout_by_its_name(grouped_layout, m_indices, a, b, use_psum_layout, expected_m, sa=sa, sb=sb, d=d)
    try:
        torch.ops.dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, d, grouped_layout,
                                                                      use_psum_layout, ensure_zero_padding, expected_m)
    except (TypeError, ValueError):
        # The op calls d "out": a refusal is checked again under the caller's name, which raises
        # the same error naming d. (Only on a refusal: no cost on valid calls.)
        _check_contiguous(a, sa, b, sb, d, grouped_layout, use_psum_layout, expected_m, out_name="d",
                          layout_name="grouped_layout" if m_indices is None else "m_indices")
        raise


def _layout_argument(grouped_layout, m_indices):
    """The contiguous layout under either of DeepGEMM's names (grouped_layout; m_indices in 2.0)."""
    if (grouped_layout is None) == (m_indices is None):
        raise TypeError("grouped_layout: expected the contiguous layout under exactly one of the names "
                        "grouped_layout and m_indices")
    return m_indices if grouped_layout is None else grouped_layout


def check_layout_by_its_name(layout, m_indices, a, b, use_psum_layout, expected_m, **others) -> None:
    """The layout checked under the name the caller gave it (the op calls its argument m_indices),
    where a and b have the ranks the check reads (else the op names them). others: the call's other
    tensors by name, for the message of a device mismatch."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 3:
        name = "grouped_layout" if m_indices is None else "m_indices"
        try:
            check_grouped_layout(name, layout, a.device, a.shape[0], b.shape[0], use_psum_layout, expected_m)
        except ValueError:
            # The layout is compared with a's device: where a is the tensor on another GPU, name a
            # (the odd one out), not the layout. (Only on a refusal: no cost on valid calls.)
            check_one_device(a=a, b=b, **{name: layout}, **others)
            raise


def psum_options(use_psum_layout, ensure_zero_padding, expected_m_for_psum_layout) -> tuple[bool, bool, int]:
    """Checks DeepGEMM's contiguous-layout options; returns them as the op takes them (the flags as
    Python bools, the expected_m hint an int, 0: none)."""
    use_psum_layout = as_flag("use_psum_layout", use_psum_layout)
    ensure_zero_padding = as_flag("ensure_zero_padding", ensure_zero_padding)
    if expected_m_for_psum_layout is None:
        return use_psum_layout, ensure_zero_padding, 0
    if not use_psum_layout:
        raise ValueError("expected_m_for_psum_layout: only with use_psum_layout=True (DeepGEMM's rule), got "
                         f"{expected_m_for_psum_layout!r} with the per-row layout")
    if isinstance(expected_m_for_psum_layout, bool) or not isinstance(expected_m_for_psum_layout, (int, torch.SymInt)):
        raise TypeError(f"expected_m_for_psum_layout: expected a python int, got "
                        f"{type(expected_m_for_psum_layout).__name__}")
    if expected_m_for_psum_layout < 1:
        raise ValueError(f"expected_m_for_psum_layout: expected a positive row count, got {expected_m_for_psum_layout}")
    return use_psum_layout, ensure_zero_padding, expected_m_for_psum_layout


def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims="nk", disable_ue8m0_cast=False) -> None:
    """DeepGEMM's newer name for m_grouped_gemm_fp8_fp8_bf16_nt_masked, under DeepGEMM's newer
    argument names (a, b, d for lhs, rhs, out), plus its trailing options (block-scaled b only)."""
    check_jit_hints(compiled_dims, disable_ue8m0_cast)
    _deepgemm_options(recipe, recipe_a=recipe_a, recipe_b=recipe_b)
    _masked_gemm(a, b, d, masked_m, expected_m, names=("a", "b", "d"))


fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked  # DeepGEMM's legacy name (sglang imports it)


def m_grouped_fp8_gemm_nn_contiguous(a, b, d, grouped_layout=None, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                     ensure_zero_padding=True, *, m_indices=None) -> None:
    """DeepGEMM's m_grouped_fp8_gemm_nn_contiguous: as m_grouped_fp8_gemm_nt_contiguous with b =
    (b [G, k, n], sb [G, k / 128, ceil(n / 128)]): row i is A[i] @ B[g] (the experts' input gradient
    from the forward weights' transposed copy), i.e. the nt form of (b, sb) with the last two
    dimensions swapped. On Hopper the Triton and CUDA paths copy b K-major first, on every call: for
    weights used across calls (all G experts' b, gigabytes for V3), make that copy once
    (b.transpose(1, 2).contiguous()) and call m_grouped_fp8_gemm_nt_contiguous instead."""
    t, _ = _unpack("a", a)
    m_grouped_fp8_gemm_nt_contiguous(a, _transposed("b", b, t.shape[-1] if isinstance(t, torch.Tensor) else None,
                                                    "b"),
                                     d, grouped_layout, recipe, recipe_a, recipe_b, compiled_dims,
                                     disable_ue8m0_cast, use_psum_layout, ensure_zero_padding, m_indices=m_indices)


def get_m_alignment_for_contiguous_layout() -> int:
    """DeepGEMM's row alignment of contiguous-layout segments (128). Our grouped GEMMs accept
    unaligned segments too; callers that pad to it get DeepGEMM's layout."""
    return 128


get_mk_alignment_for_contiguous_layout = get_m_alignment_for_contiguous_layout  # DeepGEMM's newer name


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    """DeepGEMM's cap on the contiguous layout's alignment (its BLOCK_M), which serving code sets
    to the padding it chose from `get_theoretical_mk_alignment_for_contiguous_layout` (vLLM's
    `mk_alignment_scope`). The m-grouped GEMMs here take any segment alignment and the psum
    layout's groups start at multiples of 128, so 128 is the one value: another raises."""
    new_value = check_int("new_value", new_value, 1)
    if new_value != 128:
        raise ValueError(f"new_value: the contiguous layouts here align groups to 128 rows (the m-grouped "
                         f"GEMMs also take unaligned segments), got {new_value}")


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None,
                                                       num_groups: int | None = None) -> int:
    """DeepGEMM's per-call padding hint for the contiguous layout: the alignment to pad each
    group's rows to. Here always the layout's 128 (the kernels have no smaller block to prefer)."""
    for name, value in (("expected_m", expected_m), ("num_groups", num_groups)):
        if value is not None:
            check_int(name, value, 0)
    return 128


# DeepGEMM's runtime switches: programmatic dependent launch and the tensor-core utilisation cap.
# Kept and reported, so code that sets them and reads them back works; the kernels here do not
# read them (their launches are plain; the SM limit is set_num_sms).
_runtime_flags = {"pdl": False, "tc_util": 100}


def set_pdl(new_enable_pdl: bool) -> None:
    """DeepGEMM's PDL switch (kept; changes nothing here)."""
    _runtime_flags["pdl"] = as_flag("new_enable_pdl", new_enable_pdl)


def get_pdl() -> bool:
    return _runtime_flags["pdl"]


def set_tc_util(new_tc_util: int) -> None:
    """DeepGEMM's tensor-core utilisation cap in percent (kept; changes nothing here)."""
    _runtime_flags["tc_util"] = check_int("new_tc_util", new_tc_util, 1)


def get_tc_util() -> int:
    return _runtime_flags["tc_util"]


def set_num_sms(num_sms: int | None) -> None:
    """Limits the SMs the sm90 CUDA GEMMs use, as DeepGEMM's set_num_sms does: their persistent
    grids get at most num_sms CTAs, leaving the other SMs to kernels that run beside them (an
    all-to-all overlapped with the experts' GEMMs). None: every SM again. Process-wide, read at
    each launch (a CUDA graph keeps the value it was captured with). The Triton GEMMs launch one
    program per output tile and leave the sharing to the hardware, so they are not affected."""
    if num_sms is not None:
        num_sms = check_int("num_sms", num_sms, 1)
    global _num_sms
    _num_sms = num_sms
    if torch.ops.dskernels._build_info() == "cuda":
        torch.ops.dskernels._sm90_gemm_set_num_sms(num_sms or 0)


def get_num_sms(device: torch.device | int | None = None) -> int:
    """The SMs the sm90 CUDA GEMMs use on device (default: the current CUDA device): the device's
    count, or less after set_num_sms. Without a CUDA device: the set_num_sms value, else 8 (the
    count the CPU paths plan with)."""
    if not torch.cuda.is_available():
        # No GPU: the count the CPU (reference / interpreter) paths plan with, the MLA split plan's
        # CPU_SM_COUNT, so code that sizes schedules with get_num_sms() runs unchanged on CPU.
        return CPU_SM_COUNT if _num_sms is None else _num_sms
    total = torch.cuda.get_device_properties(device).multi_processor_count
    return total if _num_sms is None else min(total, _num_sms)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out) -> None:
    """DeepGEMM's dense weight-gradient GEMM: out [m, n] float32 += dequant(lhs) @ dequant(rhs).T
    with both operands cast 1x128 per row (lhs (a [m, k], sa [m, k / 128]), rhs (b [n, k], sb
    [n, k / 128]), any scale strides), accumulated in place: fp8_gemm_nt(lhs, rhs, out, c=out,
    recipe=(1, 1, 128))."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"out: expected the float32 gradient accumulated into, got {got}")
    _general_gemm(lhs, rhs, out, out, ROW_RECIPE, names=("lhs", "rhs", "out"))  # (errors name its arguments)


def ceil_div(x: int, y: int) -> int:
    """DeepGEMM's helper: x / y rounded up."""
    return (x + y - 1) // y


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's similarity measure as its package exports it: 1 - 2 sum(x y) / sum(x^2 + y^2) in
    float64, a 0-d tensor on the inputs' device (NaN for two all-zero tensors). Our tests use
    dskernels.testing.calc_diff, a python float with 0 for that case."""
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum() / (x * x + y * y).sum()


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up so that x elements of element_size bytes fill whole 16-byte TMA units."""
    if isinstance(element_size, bool) or not isinstance(element_size, int) or element_size < 1 or 16 % element_size:
        raise ValueError(f"element_size: expected a divisor of 16 (bytes per element: 1, 2, 4, 8 or 16), got "
                         f"{element_size!r}")
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"x: expected a number of elements (an int >= 0), got {x!r}")
    alignment = 16 // element_size
    return (x + alignment - 1) // alignment * alignment


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's scale layout: the same values as x ([m, c] or [G, m, c]) in a column-major
    layout whose columns start on 16-byte boundaries: strides (1, m') or (c * m', 1, m'), with
    m' = m rounded up to a multiple of 16 / element_size (4 for fp32 scales).

    Returns x itself when it already has that layout, else a new tensor. Our kernels accept any
    strides, so this exists for compatibility with code written for DeepGEMM.
    """
    check_tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected 2 or 3 dimensions, got shape {tuple(x.shape)}")
    m, cols = x.shape[-2], x.shape[-1]
    aligned_m = get_tma_aligned_size(m, x.element_size())
    squeeze = x.dim() == 2
    batched = x.unsqueeze(0) if squeeze else x
    if batched.stride(1) == 1 and batched.stride(2) == aligned_m and (
            batched.shape[0] == 1 or batched.stride(0) == aligned_m * cols):
        return x
    aligned = torch.empty(batched.shape[0], cols, aligned_m, dtype=x.dtype, device=x.device).transpose(1, 2)
    aligned[:, :m, :] = batched
    aligned = aligned[:, :m, :]
    return aligned.squeeze(0) if squeeze else aligned


get_mn_major_tma_aligned_tensor = get_col_major_tma_aligned_tensor  # DeepGEMM's newer name


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None,
                                      is_sfa: bool | None = False, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """DeepGEMM's scale-layout helper (serving engines call it once per weight at load time), as
    its sm90 build does it for fp32 scales: 1x128 scales (sfa, or sfb with recipe (1, 1, 128)) come
    back MN-major and TMA-aligned (get_col_major_tma_aligned_tensor), 128x128 weight scales as they
    are. The values never change, and our GEMMs read any strides, so the result is only a layout.

    Args:
        sf: float32 [(num_groups,) ceil(mn / gran_mn), ceil(k / gran_k)].
        mn, k: the operand's rows and columns. recipe: (gran_m, gran_n, gran_k), or DeepGEMM's
            per-operand (gran_mn, gran_k). is_sfa: sf belongs to a (gran_m) rather than b (gran_n).
        disable_ue8m0_cast: Blackwell's packed UE8M0 scales: never made here (fp32 stays fp32).
    """
    check_tensor("sf", sf, dtypes=(torch.float32,))
    recipe = recipe_tuple("recipe", recipe)
    if recipe is None or len(recipe) not in (2, 3):
        raise ValueError(f"recipe: expected (gran_m, gran_n, gran_k) or (gran_mn, gran_k), got {recipe!r}")
    gran = (recipe[0] if is_sfa else recipe[1], recipe[2]) if len(recipe) == 3 else recipe
    if gran not in ((1, GROUP_SIZE), (GROUP_SIZE, GROUP_SIZE)):
        raise ValueError(f"recipe: only 1x128 and 128x128 scales exist here, got {gran[0]}x{gran[1]} for "
                         f"{'sfa' if is_sfa else 'sfb'} (recipe {recipe!r})")
    expected = ((num_groups,) if num_groups is not None else ()) + (-(-mn // gran[0]), -(-k // gran[1]))
    _check_shape("sf", sf, expected, f"{'' if num_groups is None else 'num_groups x '}ceil(mn / {gran[0]}) x "
                                     f"ceil(k / {gran[1]}) scales")
    return get_col_major_tma_aligned_tensor(sf) if gran[0] == 1 else sf


# ---- validation (shared by the real and fake kernels) ----

def _unpack(name, pair):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        got = f"{type(pair).__name__} of length {len(pair)}" if isinstance(pair, (tuple, list)) else type(pair).__name__
        raise TypeError(f"{name}: expected a tuple (fp8 tensor, fp32 scales), got {got}")
    return pair


def _check_shape(name: str, t: torch.Tensor, expected: tuple, why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({why}), got {tuple(t.shape)}")


def _check_operands(a, sa, b, sb, out, *, grouped_a: bool, grouped_b: bool, general: bool = False,
                    overlap: bool = True, out_name: str = "out"):
    """a [(G,) m, k], sa, b [(G,) n, k], sb, out [(G,) m, n]; returns (groups or None, m, n, k).
    general (fp8_gemm_nt): sb may also be [n, k / 128] and out float32. overlap=False leaves out's
    self-overlap to the op (a check torch.compile cannot trace outside one). out_name: what the
    caller calls out (DeepGEMM's names: d)."""
    check_one_device(a=a, sa=sa, b=b, sb=sb, **{out_name: out})
    check_tensor("a", a, ndim=3 if grouped_a else 2, dtypes=(FP8,))
    device = a.device
    m, k = a.shape[-2], a.shape[-1]
    check_multiple("a", k, GROUP_SIZE, "the last dimension (k)")
    check_tensor("b", b, ndim=3 if grouped_b else 2, dtypes=(FP8,), device=device)
    if b.shape[-1] != k:
        raise ValueError(f"b: expected k = {k} (the last dimension of a) as its last dimension, "
                         f"got shape {tuple(b.shape)}")
    n = b.shape[-2]
    groups = b.shape[0] if grouped_b else None
    if grouped_a and a.shape[0] != groups:
        raise ValueError(f"a: expected {groups} groups (the first dimension of b) as its first dimension, "
                         f"got shape {tuple(a.shape)}")
    check_tensor("sa", sa, dtypes=(torch.float32,), device=device)
    _check_shape("sa", sa, (*a.shape[:-1], k // GROUP_SIZE), "one scale per row per 128 columns of a")
    check_tensor("sb", sb, dtypes=(torch.float32,), device=device)
    per_block = (*b.shape[:-2], (n + GROUP_SIZE - 1) // GROUP_SIZE, k // GROUP_SIZE)
    sb_shape = tuple(sb.shape)
    # (per_row only where general takes it: one tuple less on the other GEMMs' calls)
    if sb_shape != per_block and not (general and sb_shape == (*b.shape[:-2], n, k // GROUP_SIZE)):
        # (the message is built only here: torch.compile traces the check, not an unused string)
        per_row = (*b.shape[:-2], n, k // GROUP_SIZE)
        also = f", or {per_row}: one per row of b per 128 columns" if general else ""
        raise ValueError(f"sb: expected shape {per_block} (one scale per 128x128 block of b{also}), "
                         f"got {tuple(sb.shape)}")
    check_tensor(out_name, out, dtypes=(torch.bfloat16, torch.float32) if general else (torch.bfloat16,),
                 device=device)
    _check_shape(out_name, out, (*a.shape[:-1], n), "a's rows by b's rows")
    if overlap:
        check_no_overlap(out_name, out)
        check_reads_apart(out_name, out, a=a, b=b, sa=sa, sb=sb)
    return groups, m, n, k


def _check_dense(a, sa, b, sb, out):
    _check_operands(a, sa, b, sb, out, grouped_a=False, grouped_b=False)


def _check_general(a, sa, b, sb, out, overlap: bool = True, out_name: str = "out") -> bool:
    """fp8_gemm_nt's operands; returns whether sb holds one scale per row of b (n > 1: for n = 1
    the two layouts are the same)."""
    _, _, n, k = _check_operands(a, sa, b, sb, out, grouped_a=False, grouped_b=False, general=True,
                                 overlap=overlap, out_name=out_name)
    return n > 1 and tuple(sb.shape) == (n, k // GROUP_SIZE)


def _check_batched(a, sa, b, sb, out) -> bool:
    """fp8_bmm_nt's operands (fp8_gemm_nt's per batch); returns whether sb is per row of b."""
    _, _, n, k = _check_operands(a, sa, b, sb, out, grouped_a=True, grouped_b=True, general=True)
    return n > 1 and tuple(sb.shape) == (b.shape[0], n, k // GROUP_SIZE)


def _check_contiguous(a, sa, b, sb, out, m_indices, use_psum_layout=False, expected_m=0, out_name: str = "out",
                      layout_name: str = "m_indices"):
    """out_name, layout_name: what the caller calls out and m_indices (DeepGEMM's newer names: d,
    grouped_layout)."""
    groups, m, _, _ = _check_operands(a, sa, b, sb, out, grouped_a=False, grouped_b=True, out_name=out_name)
    check_grouped_layout(layout_name, m_indices, a.device, m, groups, use_psum_layout, expected_m)
    check_reads_apart(out_name, out, **{layout_name: m_indices})


def check_grouped_layout(name: str, layout, device, m: int, groups: int, use_psum_layout: bool, expected_m) -> None:
    """A contiguous grouped GEMM's layout: [m] group ids, or (psum) [G] cumulative row ends."""
    check_tensor(name, layout, ndim=1, dtypes=(torch.int32,), device=device)
    if use_psum_layout:
        _check_shape(name, layout, (groups,), "use_psum_layout: one cumulative row end per group")
    else:
        _check_shape(name, layout, (m,), "one group id per row of a")
    _check_expected_m(expected_m)


def _check_masked(a, sa, b, sb, out, masked_m, expected_m, out_name: str = "out"):
    check_one_device(a=a, sa=sa, b=b, sb=sb, **{out_name: out}, masked_m=masked_m)
    groups, _, _, _ = _check_operands(a, sa, b, sb, out, grouped_a=True, grouped_b=True, out_name=out_name)
    check_tensor("masked_m", masked_m, ndim=1, dtypes=(torch.int32,), device=a.device)
    _check_shape("masked_m", masked_m, (groups,), "one row count per group")
    check_reads_apart(out_name, out, masked_m=masked_m)
    _check_expected_m(expected_m)


def _check_expected_m(expected_m) -> None:
    if isinstance(expected_m, bool) or not isinstance(expected_m, (int, torch.SymInt)):
        raise TypeError(f"expected_m: expected a python int, got {type(expected_m).__name__}")


def _check_k_grouped(a, sa, b, sb, out, ks, ks_tensor, k_major: bool, *, sizes_name: str = "ks",
                     dtypes=(torch.float32, torch.bfloat16), overlap: bool = True,
                     scales_transposed: bool = False, out_name: str = "out") -> None:
    """The K-grouped GEMM's operands (k_grouped_fp8_gemm in csrc/torch_bindings.cpp)."""
    check_one_device(a=a, sa=sa, b=b, sb=sb, **{out_name: out}, ks_tensor=ks_tensor)
    check_tensor(out_name, out, ndim=3, dtypes=dtypes)
    if overlap:
        check_no_overlap(out_name, out)
    groups, m, n = out.shape
    check_sizes(sizes_name, ks, groups, f"{out_name}'s groups")
    total = sum(ks)
    total_blocks = sum((k + GROUP_SIZE - 1) // GROUP_SIZE for k in ks)
    for name, t, scales, rows in (("a", a, sa, m), ("b", b, sb, n)):
        check_tensor(name, t, dtypes=(FP8,), device=out.device)
        if k_major and (t.numel() < rows * total or not t.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous tensor of at least {rows} * sum({sizes_name}) = "
                             f"{rows * total} elements (the groups' [{rows}, k_g] blocks one after another), got "
                             f"shape {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
        if not k_major and (t.dim() != 2 or t.shape[1] != rows or t.shape[0] < total):
            raise ValueError(f"{name}: expected shape (>= {total}, {rows}) (the groups' sum({sizes_name}) tokens "
                             f"by {out_name}'s {'m' if name == 'a' else 'n'}), got {tuple(t.shape)}")
        check_tensor(f"s{name}", scales, ndim=2, dtypes=(torch.float32,), device=out.device)
        expected = (rows, total_blocks) if scales_transposed else (total_blocks, rows)
        _check_shape(f"s{name}", scales.T if scales_transposed else scales, expected,
                     f"one 1x128 scale per row of {name} per 128 tokens (started) of every group")
        if overlap:  # (an fp8 view of out's bytes, or fp32 scales in it: a race on a GPU)
            check_reads_apart(out_name, out, **{name: t, f"s{name}": scales})
    check_sizes_tensor(ks_tensor, groups, out.device, sizes_name, ks=ks)
    if overlap:
        check_reads_apart(out_name, out, ks_tensor=ks_tensor)


# ---- registered kernels ----

# The sm90 CUDA GEMMs (csrc/gemm/, issue 9) passed tests/test_gemm_sm90.py and compute-sanitizer's
# memcheck on an H200 (2026-12-04; racecheck's one report, in CUTLASS's scale loads, is in issue 9's
# notes), so `auto` runs them on Hopper. False would keep `auto` on Triton.
_CUDA_GEMM_VERIFIED = True


def _backend(op: str, device: torch.device) -> str:
    return select_backend(op, device, has_cuda=True, has_triton=True, cuda_verified=_CUDA_GEMM_VERIFIED)


# ---- the sm90 CUDA kernels' operand layouts (docs/gemm.md, "The sm90 CUDA path") ----

def _tma_ready(t: torch.Tensor) -> bool:
    """Unit last stride, other strides and the base 16-byte aligned (what TMA needs), and rows that
    do not overlap (an expanded view's stride 0 is not what TMA boxes assume: copied too)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or strides_may_overlap(t):
        return False
    return all(size <= 1 or stride * t.element_size() % 16 == 0
               for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def _cuda_operand(t: torch.Tensor) -> torch.Tensor:
    if _tma_ready(t):
        return t
    # A contiguous view at a misaligned offset stays itself under contiguous(): clone it then.
    packed = t.contiguous()
    return packed if _tma_ready(packed) else t.clone(memory_format=torch.contiguous_format)


def _cuda_sa(sa: torch.Tensor) -> torch.Tensor:
    """CUTLASS's sm90 collectives read activation scales column-major (unit stride along the rows);
    the dense kernel loads them with TMA, so also DeepGEMM's 16-byte aligned columns. Our casts
    return row-major scales: this is one small copy (m * k / 128 floats) per call."""
    aligned = get_col_major_tma_aligned_tensor(sa)
    if aligned.numel() and aligned.data_ptr() % 16:
        aligned = get_col_major_tma_aligned_tensor(sa.clone())
    return aligned


def _cuda_sb(sb: torch.Tensor) -> torch.Tensor:
    """Weight scales with unit stride along the 128-row blocks of b and a K-block stride of exactly
    ceil(n/128) ([.., k/128, n/128] packed in memory: CUTLASS's grouped collective reads them that
    way whatever strides it is given); a copy of ceil(n/128) * k/128 floats per group when they
    come row-major."""
    blocks, kblocks = sb.shape[-2], sb.shape[-1]
    if (blocks <= 1 or sb.stride(-2) == 1) and (kblocks <= 1 or sb.stride(-1) == blocks):
        return sb
    return sb.transpose(-1, -2).contiguous().transpose(-1, -2)


def _cuda_out(out: torch.Tensor):
    """(buffer the kernel writes, whether to copy it into out): TMA stores need 16-byte aligned
    rows, so an out whose row stride is not a multiple of 8 (odd n, contiguous) goes through a
    padded buffer."""
    if _tma_ready(out):
        return out, False
    n = out.shape[-1]
    padded = torch.empty(*out.shape[:-1], (n + 7) // 8 * 8, dtype=out.dtype, device=out.device)[..., :n]
    # out's own values first: rows the GEMM does not write (masked and -1 padding rows) are copied
    # back too, and must come back as they were, as on the direct path.
    return padded.copy_(out), True


def _run_cuda(op, a, sa, b, sb, out, *rest):
    if out.numel() == 0:  # m = 0, n = 0 or no groups: nothing to write (TMA takes no empty tensor)
        return
    if a.shape[-1] == 0:  # k = 0: an empty sum (the kernels need at least one K block)
        out.zero_()
        return
    target, copy_back = _cuda_out(out)
    sa = _cuda_sa(sa)
    getattr(torch.ops.dskernels, op)(_cuda_operand(a), sa, _cuda_operand(b), _cuda_sb(sb), target, *rest)
    if copy_back:
        out.copy_(target)


@torch.library.register_kernel("dskernels::gemm_fp8_fp8_bf16_nt", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("gemm_fp8_fp8_bf16_nt", writes=("out",))
def _gemm_fp8_fp8_bf16_nt(a, sa, b, sb, out):
    _check_dense(a, sa, b, sb, out)
    _run_dense(a, sa, b, sb, out)


def _run_dense(a, sa, b, sb, out):
    chosen = _backend("gemm_fp8_fp8_bf16_nt", a.device)
    if chosen == "ref":
        out.copy_(ref.gemm_fp8_fp8_bf16_nt(a, sa, b, sb))
        return
    if chosen == "cuda":
        # Batch-invariant mode reaches the config choice in C++ (one config for every m, no K cut);
        # off, the call is the one it always was.
        _run_cuda("_sm90_gemm_fp8_fp8_bf16_nt", a, sa, b, sb, out, *((True,) if batch_invariant_enabled() else ()))
        return
    from dskernels.triton import gemm as triton_gemm

    triton_gemm.gemm_fp8_fp8_bf16_nt(a, sa, b, sb, out)


def _general_backend(device: torch.device, op: str = "fp8_gemm_nt") -> str:
    """Where fp8_gemm_nt's (or fp8_bmm_nt's) general form runs (no sm90 CUDA kernel for it); raises
    if it cannot."""
    return select_backend(f"{op} (fp32 out, accumulate or per-row sb)", device, has_cuda=False, has_triton=True)


@torch.library.register_kernel("dskernels::fp8_gemm_nt", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("fp8_gemm_nt", writes=("out",))
def _fp8_gemm_nt(a, sa, b, sb, out, accumulate=False):
    sb_per_row = _check_general(a, sa, b, sb, out)
    if out.dtype == torch.bfloat16 and not accumulate and not sb_per_row:
        _run_dense(a, sa, b, sb, out)  # gemm_fp8_fp8_bf16_nt, with its sm90 CUDA kernel
        return
    chosen = _general_backend(a.device)
    if chosen == "ref":
        out.copy_(ref.fp8_gemm_nt(a, sa, b, sb, out.dtype, c=out if accumulate else None))
        return
    from dskernels.triton import gemm as triton_gemm

    triton_gemm.fp8_gemm_nt(a, sa, b, sb, out, accumulate)


@torch.library.register_kernel("dskernels::fp8_bmm_nt", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("fp8_bmm_nt", writes=("out",))
def _fp8_bmm_nt(a, sa, b, sb, out, accumulate=False):
    sb_per_row = _check_batched(a, sa, b, sb, out)
    if out.dtype == torch.bfloat16 and not accumulate and not sb_per_row:
        # The masked grouped GEMM with every row valid (and its sm90 CUDA kernel).
        masked_m = torch.full((a.shape[0],), a.shape[1], dtype=torch.int32, device=a.device)
        _run_masked(a, sa, b, sb, out, masked_m, a.shape[1])
        return
    chosen = _general_backend(a.device, "fp8_bmm_nt")
    if chosen == "ref":
        out.copy_(ref.fp8_bmm_nt(a, sa, b, sb, out.dtype, c=out if accumulate else None))
        return
    from dskernels.triton import gemm as triton_gemm

    triton_gemm.fp8_bmm_nt(a, sa, b, sb, out, accumulate)


@torch.library.register_kernel("dskernels::m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", writes=("out",))
def _m_grouped_contiguous(a, sa, b, sb, out, m_indices, use_psum_layout=False, ensure_zero_padding=False,
                          expected_m=0):
    _check_contiguous(a, sa, b, sb, out, m_indices, use_psum_layout, expected_m)
    chosen = _backend("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", a.device)
    if chosen == "triton":  # reads either layout itself
        from dskernels.triton import gemm as triton_gemm

        triton_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, out, m_indices, use_psum_layout,
                                                              ensure_zero_padding, expected_m)
        return
    rows = ref.psum_to_m_indices(m_indices, a.shape[0]) if use_psum_layout else m_indices
    if chosen == "ref":  # rows of no group come back as zeros
        out.copy_(ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, rows))
        return
    _run_cuda("_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", a, sa, b, sb, out, rows)
    if ensure_zero_padding:
        out.masked_fill_(((rows < 0) | (rows >= b.shape[0]))[:, None], 0)


@torch.library.register_kernel("dskernels::m_grouped_gemm_fp8_fp8_bf16_nt_masked", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("m_grouped_gemm_fp8_fp8_bf16_nt_masked", writes=("out",))
def _m_grouped_masked(a, sa, b, sb, out, masked_m, expected_m):
    _check_masked(a, sa, b, sb, out, masked_m, expected_m)
    _run_masked(a, sa, b, sb, out, masked_m, expected_m)


def _run_masked(a, sa, b, sb, out, masked_m, expected_m):
    chosen = _backend("m_grouped_gemm_fp8_fp8_bf16_nt_masked", a.device)
    if chosen == "ref":
        out.copy_(ref.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, masked_m))
        return
    if chosen == "cuda":
        # expected_m picks the config (64-row tiles for 1..64); batch-invariant mode drops the hint,
        # leaving the contiguous kernel's rule (by n): one config whatever the batch.
        hint = 0 if batch_invariant_enabled() else expected_m
        _run_cuda("_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_masked", a, sa, b, sb, out, masked_m, hint)
        return
    from dskernels.triton import gemm as triton_gemm

    triton_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, out, masked_m, expected_m)


@torch.library.register_fake("dskernels::gemm_fp8_fp8_bf16_nt")
def _gemm_fp8_fp8_bf16_nt_fake(a, sa, b, sb, out):
    _check_dense(a, sa, b, sb, out)


@torch.library.register_fake("dskernels::fp8_gemm_nt")
def _fp8_gemm_nt_fake(a, sa, b, sb, out, accumulate=False):
    _check_general(a, sa, b, sb, out)


@torch.library.register_fake("dskernels::fp8_bmm_nt")
def _fp8_bmm_nt_fake(a, sa, b, sb, out, accumulate=False):
    _check_batched(a, sa, b, sb, out)


@torch.library.register_fake("dskernels::m_grouped_gemm_fp8_fp8_bf16_nt_contiguous")
def _m_grouped_contiguous_fake(a, sa, b, sb, out, m_indices, use_psum_layout=False, ensure_zero_padding=False,
                               expected_m=0):
    _check_contiguous(a, sa, b, sb, out, m_indices, use_psum_layout, expected_m)


@torch.library.register_fake("dskernels::m_grouped_gemm_fp8_fp8_bf16_nt_masked")
def _m_grouped_masked_fake(a, sa, b, sb, out, masked_m, expected_m):
    _check_masked(a, sa, b, sb, out, masked_m, expected_m)


@torch.library.register_kernel("dskernels::k_grouped_fp8_gemm", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("k_grouped_fp8_gemm", writes=("out",))
def _k_grouped_fp8_gemm(a, sa, b, sb, out, ks, ks_tensor, k_major, accumulate):
    _check_k_grouped(a, sa, b, sb, out, ks, ks_tensor, k_major)
    chosen = _k_grouped_backend(a.device)
    if chosen == "ref":
        out.copy_(ref.k_grouped_fp8_gemm(a, sa, b, sb, ks, k_major, c=out if accumulate else None))
        return
    from dskernels.triton import gemm as triton_gemm

    if ks_tensor is None:
        ks_tensor = sizes_on_device(ks, out.device)
    triton_gemm.k_grouped_fp8_gemm(a.reshape(-1) if k_major else a, sa, b.reshape(-1) if k_major else b, sb, out,
                                   ks, ks_tensor, k_major, accumulate)


def _k_grouped_backend(device: torch.device) -> str:
    return select_backend("k_grouped_fp8_gemm", device, has_cuda=False, has_triton=True)


@torch.library.register_fake("dskernels::k_grouped_fp8_gemm")
def _k_grouped_fp8_gemm_fake(a, sa, b, sb, out, ks, ks_tensor, k_major, accumulate):
    _check_k_grouped(a, sa, b, sb, out, ks, ks_tensor, k_major)
