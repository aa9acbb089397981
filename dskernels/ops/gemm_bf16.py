"""DeepGEMM's bf16 GEMMs: `bf16_gemm_{nt,nn,tn,tt}` (dense), `m_grouped_bf16_gemm_{nt,nn}_contiguous`,
`m_grouped_bf16_gemm_nt_masked` and `k_grouped_bf16_gemm_tn_contiguous` (MoE experts in bf16 and
their weight gradients), with DeepGEMM's arguments.

The dense ones are cuBLAS's job, as in DeepGEMM (which calls cuBLASLt for them by default): they
run torch's matmul with fp32 accumulation. The grouped ones are registered ops on the FP8 grouped
GEMMs' Triton kernels without the scales (dskernels/triton/gemm.py), with python_ref/gemm.py as
the oracle. Layout letters as in DeepGEMM: "n" is row-major [rows, k] for a and [n, k] for b
(K-major), "t" its transpose. docs/gemm.md, "bf16 GEMMs".
"""

from __future__ import annotations

import torch

from dskernels._backend import current_backend, select_backend
from dskernels._checks import check_no_overlap, check_one_device, check_reads_apart, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel
from dskernels.ops.invariant import invariant_mm, invariant_path
from dskernels.ops._sizes import as_sizes, check_sizes, check_sizes_tensor, sizes_on_device
from dskernels.ops.gemm import (_check_c, _check_expected_m, _check_shape, _layout_argument, check_grouped_layout,
                                check_jit_hints, check_layout_by_its_name, expected_m_int, psum_options)
from python_ref import gemm as ref

BF16 = torch.bfloat16


# ---- public functions ----

def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None,
                 compiled_dims: str = "nk") -> None:
    """d = c + a @ b.T, summed in fp32 and rounded once to d's dtype (cuBLAS: see below).

    Args:
        a: [m, k] bfloat16, any strides.
        b: [n, k] bfloat16, any strides.
        d: [m, n] bfloat16 or float32 on a's device, overwritten.
        c: None, d itself (accumulate in place) or an [m, n] tensor of d's dtype sharing no memory
            with d.
        compiled_dims: DeepGEMM's JIT hint, ignored.

    On a GPU this is cuBLAS (torch.mm / addmm) as torch configures it: with torch's default
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True a bf16 d may come from
    split-K partial sums rounded to bf16; set it False for fp32 sums throughout. On CPU, or with
    backend("ref"), the reference. Under dskernels.batch_invariant() (not on the "ref" backend) a
    Triton kernel of one fixed tile with K summed in order instead: a row's bits do not depend on
    m (dskernels/ops/invariant.py; on CPU tensors with the Triton backend forced, interpreted).
    """
    check_jit_hints(compiled_dims)
    _check_dense(a, b, d, "nt")
    _bf16_gemm(a, b, d, c)


@inference_kernel("bf16_gemm_{nt,nn,tn,tt}", writes=("d",))
def _bf16_gemm(a, b, d, c) -> None:
    """bf16_gemm_nt's work on checked operands (the other layouts pass their nt views)."""
    _check_c(c, d, "d")
    if invariant_path(d.device):  # batch-invariant mode: one fixed tile, K in order (dskernels/ops/invariant.py)
        c3 = None if c is None else c.unsqueeze(0)
        if torch.compiler.is_compiling():  # (an opaque op there)
            d.copy_(invariant_mm(a.unsqueeze(0), b.unsqueeze(0), d.dtype, c3)[0])
            return
        from dskernels.triton import matmul as triton_matmul

        triton_matmul.matmul_nt(a.unsqueeze(0), b.unsqueeze(0), d.unsqueeze(0), c3)  # straight into d
        return
    if d.device.type != "cuda" or current_backend() == "ref":
        d.copy_(ref.bf16_gemm_nt(a, b, d.dtype, c))
        return
    if d.dtype == BF16:  # cuBLAS reads c, sums in fp32, rounds once
        if c is None:
            torch.mm(a, b.T, out=d)
        elif c is d:
            d.addmm_(a, b.T)
        else:
            torch.addmm(c, a, b.T, out=d)
        return
    product = torch.mm(a, b.T, out_dtype=torch.float32)
    if c is None:
        d.copy_(product)
    else:
        torch.add(c, product, out=d)


def bf16_gemm_nn(a, b, d, c=None, compiled_dims: str = "nk") -> None:
    """d = c + a @ b with b [k, n] (a [m, k]); otherwise as bf16_gemm_nt."""
    check_jit_hints(compiled_dims)
    _check_dense(a, b, d, "nn")
    _bf16_gemm(a, b.T, d, c)


def bf16_gemm_tn(a, b, d, c=None, compiled_dims: str = "nk") -> None:
    """d = c + a.T @ b with a [k, m] and b [k, n] (a weight gradient); otherwise as bf16_gemm_nt."""
    check_jit_hints(compiled_dims)
    _check_dense(a, b, d, "tn")
    _bf16_gemm(a.T, b.T, d, c)


def bf16_gemm_tt(a, b, d, c=None, compiled_dims: str = "nk") -> None:
    """d = c + a.T @ b.T with a [k, m] and b [n, k]; otherwise as bf16_gemm_nt."""
    check_jit_hints(compiled_dims)
    _check_dense(a, b, d, "tt")
    _bf16_gemm(a.T, b, d, c)


# DeepGEMM's names for the dense bf16 GEMMs it hands to cuBLASLt (a, b, d, c=None): the same calls here
cublaslt_gemm_nt, cublaslt_gemm_nn = bf16_gemm_nt, bf16_gemm_nn
cublaslt_gemm_tn, cublaslt_gemm_tt = bf16_gemm_tn, bf16_gemm_tt


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor | None = None, compiled_dims: str = "nk",
                                      use_psum_layout: bool = False, ensure_zero_padding: bool = True,
                                      expected_m_for_psum_layout: int | None = None, *,
                                      m_indices: torch.Tensor | None = None) -> None:
    """Grouped GEMM over rows stacked by group (MoE experts in bf16): d[i] = a[i] @ b[g].T for the
    rows i of group g, summed in fp32.

    Args:
        a: [M, k] bfloat16 (any strides).
        b: [G, n, k] bfloat16, one weight per group (any strides).
        d: [M, n] bfloat16; rows of no group get zeros (ensure_zero_padding, True by default as in
            DeepGEMM; False leaves them unspecified).
        grouped_layout: int32 on a's device, read there (no host sync): one group id per row
            ([M], -1 for none; segments aligned to 128 rows or not), or with use_psum_layout one
            cumulative row end per group ([G]; group g owns rows align(ends[g - 1], 128) ..
            ends[g] - 1), exactly as for m_grouped_fp8_gemm_nt_contiguous (m_indices=: the same,
            under DeepGEMM 2.0's keyword).
        compiled_dims: ignored. expected_m_for_psum_layout: rows per group to tune for (a hint).
    """
    check_jit_hints(compiled_dims)
    grouped_layout = _layout_argument(grouped_layout, m_indices)
    use_psum_layout, ensure_zero_padding, expected_m = psum_options(use_psum_layout, ensure_zero_padding,
                                                                    expected_m_for_psum_layout)
    check_layout_by_its_name(grouped_layout, m_indices, a, b, use_psum_layout, expected_m, d=d)
    torch.ops.dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout,
                                                          ensure_zero_padding, expected_m)


def m_grouped_bf16_gemm_nn_contiguous(a, b, d, grouped_layout=None, compiled_dims: str = "nk",
                                      use_psum_layout: bool = False, ensure_zero_padding: bool = True,
                                      expected_m_for_psum_layout: int | None = None, *, m_indices=None) -> None:
    """As m_grouped_bf16_gemm_nt_contiguous with b [G, k, n] (d[i] = a[i] @ b[g]: the input
    gradient of the experts, from the same weights)."""
    check_tensor("b", b, ndim=3)
    if isinstance(a, torch.Tensor) and a.dim() == 2 and b.shape[1] != a.shape[1]:
        raise ValueError(f"b: expected k = {a.shape[1]} (the last dimension of a) as dimension 1 (this layout "
                         f"holds b as [G, k, n]), got shape {tuple(b.shape)}")
    m_grouped_bf16_gemm_nt_contiguous(a, b.transpose(1, 2), d, grouped_layout, compiled_dims, use_psum_layout,
                                      ensure_zero_padding, expected_m_for_psum_layout, m_indices=m_indices)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int, compiled_dims: str = "nk") -> None:
    """Batched GEMM with a per-group row count read on the device (MoE decode in bf16, CUDA graphs):
    d[g, i] = a[g, i] @ b[g].T for i < masked_m[g].

    Args:
        a: [G, m_max, k] bfloat16; b: [G, n, k] bfloat16 (any strides).
        d: [G, m_max, n] bfloat16; rows i >= masked_m[g] are left unspecified.
        masked_m: [G] int32 on a's device (clamped to [0, m_max]), never read on the host.
        expected_m: expected rows per group (a Python or numpy int), a tuning hint only.
            compiled_dims: ignored.
    """
    check_jit_hints(compiled_dims)
    torch.ops.dskernels.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m_int(expected_m))


def k_grouped_bf16_gemm_tn_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks,
                                      ks_tensor: torch.Tensor | None = None, c: torch.Tensor | None = None,
                                      compiled_dims: str = "mn") -> None:
    """K-grouped GEMM (MoE weight gradients in bf16): d[g] = c[g] + A_g.T @ B_g, where A_g is rows
    sum(ks[:g]) .. + ks[g] of a [tokens, m] and B_g those of b [tokens, n]: dW_g = dY_g.T @ X_g from
    the token-major activations, one launch for every group.

    Args:
        a: [>= sum(ks), m] bfloat16, b: [>= sum(ks), n] bfloat16 (rows past sum(ks) unread).
        d: [G, m, n] float32 or bfloat16 (the sum in fp32, rounded once).
        ks: tokens per group (python ints >= 0; any sizes).
        ks_tensor: ks as int32 [G] on d's device (DeepGEMM's grouped_layout), must equal ks
            (checked on CPU tensors); None: one asynchronous copy of ks.
        c: None (d = the product; an empty group gives zeros), d itself (accumulate) or a [G, m, n]
            tensor of d's dtype sharing no memory with d. compiled_dims: ignored.
    """
    check_jit_hints(compiled_dims)
    ks = as_sizes("ks", ks)
    _check_k_grouped(a, b, d, ks, ks_tensor, overlap=not torch.compiler.is_compiling())
    _check_c(c, d, "d")
    if c is not None and c is not d:
        if not torch.compiler.is_compiling():
            _backend("k_grouped_bf16_gemm_tn_contiguous", d.device)  # eager: every refusal before d is written
        d.copy_(c)
    torch.ops.dskernels.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, ks_tensor, c is not None)


# ---- validation (shared by the real and fake kernels) ----

def _check_dense(a, b, d, layout: str) -> None:
    """The dense GEMM's operands as the caller holds them, in DeepGEMM's letters: a [m, k] ("n") or
    [k, m] ("t"), b [n, k] ("t") or [k, n] ("n"); messages in those terms."""
    check_one_device(a=a, b=b, d=d)
    check_tensor("a", a, ndim=2, dtypes=(BF16,))
    check_tensor("b", b, ndim=2, dtypes=(BF16,), device=a.device)
    a_k, b_k = (1 if layout[0] == "n" else 0), (1 if layout[1] == "t" else 0)  # where k is in each
    a_rows = ("columns", "rows")[a_k]  # what m is of a: its rows when k is its columns
    k = a.shape[a_k]
    if b.shape[b_k] != k:
        raise ValueError(f"b: expected k = {k} (a's {('rows', 'columns')[a_k]}) as its {('first', 'last')[b_k]} "
                         f"dimension (bf16_gemm_{layout}: b is [{'n, k' if b_k else 'k, n'}]), got shape "
                         f"{tuple(b.shape)}")
    check_tensor("d", d, ndim=2, dtypes=(BF16, torch.float32), device=a.device)
    _check_shape("d", d, (a.shape[1 - a_k], b.shape[1 - b_k]),
                 f"m by n: a's {a_rows} by b's {('columns', 'rows')[b_k]}")
    if not torch.compiler.is_compiling():
        _check_output_apart("d", d, a, b)


def _check_output_apart(name: str, out, *inputs) -> None:
    """out's elements are distinct and share no memory with an input: bf16 operands and outputs
    have one dtype, so an in-place call is easy to write, and output tiles would overwrite rows
    other tiles still read (eager only: torch.compile cannot trace the test)."""
    check_no_overlap(name, out)
    check_reads_apart(name, out, **dict(zip("ab", inputs)))


def _check_grouped(a, b, out, *, grouped_a: bool) -> tuple[int, int, int]:
    """a [(G,) m, k], b [G, n, k], out [(G,) m, n], all bf16; returns (G, m, n)."""
    check_one_device(a=a, b=b, d=out)
    check_tensor("a", a, ndim=3 if grouped_a else 2, dtypes=(BF16,))
    check_tensor("b", b, ndim=3, dtypes=(BF16,), device=a.device)
    groups, n, k = b.shape
    if k != a.shape[-1]:
        raise ValueError(f"b: expected k = {a.shape[-1]} (the last dimension of a) as its last dimension, "
                         f"got shape {tuple(b.shape)}")
    if grouped_a and a.shape[0] != groups:
        raise ValueError(f"a: expected {groups} groups (the first dimension of b) as its first dimension, "
                         f"got shape {tuple(a.shape)}")
    check_tensor("d", out, dtypes=(BF16,), device=a.device)
    _check_shape("d", out, (*a.shape[:-1], n), "a's rows by b's rows")
    if not torch.compiler.is_compiling():
        _check_output_apart("d", out, a, b)
    return groups, a.shape[-2], n


def _check_contiguous(a, b, out, grouped_layout, use_psum_layout, expected_m) -> None:
    groups, m, _ = _check_grouped(a, b, out, grouped_a=False)
    check_grouped_layout("grouped_layout", grouped_layout, a.device, m, groups, use_psum_layout, expected_m)
    check_reads_apart("d", out, grouped_layout=grouped_layout)


def _check_masked(a, b, out, masked_m, expected_m) -> None:
    check_one_device(a=a, b=b, d=out, masked_m=masked_m)
    groups, _, _ = _check_grouped(a, b, out, grouped_a=True)
    check_tensor("masked_m", masked_m, ndim=1, dtypes=(torch.int32,), device=a.device)
    _check_shape("masked_m", masked_m, (groups,), "one row count per group")
    check_reads_apart("d", out, masked_m=masked_m)
    _check_expected_m(expected_m)


def _check_k_grouped(a, b, out, ks, ks_tensor, overlap: bool = True) -> None:
    check_one_device(a=a, b=b, d=out, ks_tensor=ks_tensor)
    check_tensor("d", out, ndim=3, dtypes=(torch.float32, BF16))
    groups, m, n = out.shape
    check_sizes("ks", ks, groups, "d's groups")
    total = sum(ks)
    for name, t, cols in (("a", a, m), ("b", b, n)):
        check_tensor(name, t, ndim=2, dtypes=(BF16,), device=out.device)
        if t.shape[1] != cols or t.shape[0] < total:
            raise ValueError(f"{name}: expected shape (>= {total}, {cols}) (the groups' sum(ks) tokens by d's "
                             f"{'m' if name == 'a' else 'n'}), got {tuple(t.shape)}")
    check_sizes_tensor(ks_tensor, groups, out.device, ks=ks)
    if overlap:
        _check_output_apart("d", out, a, b)
        check_reads_apart("d", out, ks_tensor=ks_tensor)


# ---- registered kernels ----

def _backend(op: str, device: torch.device) -> str:
    return select_backend(op, device, has_cuda=False, has_triton=True)


@torch.library.register_kernel("dskernels::m_grouped_bf16_gemm_nt_contiguous", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("m_grouped_bf16_gemm_nt_contiguous", writes=("out",))
def _contiguous(a, b, out, grouped_layout, use_psum_layout=False, ensure_zero_padding=False, expected_m=0):
    _check_contiguous(a, b, out, grouped_layout, use_psum_layout, expected_m)
    if _backend("m_grouped_bf16_gemm_nt_contiguous", a.device) == "ref":
        rows = ref.psum_to_m_indices(grouped_layout, a.shape[0]) if use_psum_layout else grouped_layout
        out.copy_(ref.grouped_rows(a, b, rows))  # rows of no group: zeros
        return
    from dskernels.triton import gemm as triton_gemm

    triton_gemm.m_grouped_bf16_gemm_contiguous(a, b, out, grouped_layout, use_psum_layout, ensure_zero_padding,
                                               expected_m)


@torch.library.register_fake("dskernels::m_grouped_bf16_gemm_nt_contiguous")
def _contiguous_fake(a, b, out, grouped_layout, use_psum_layout=False, ensure_zero_padding=False, expected_m=0):
    _check_contiguous(a, b, out, grouped_layout, use_psum_layout, expected_m)


@torch.library.register_kernel("dskernels::m_grouped_bf16_gemm_nt_masked", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("m_grouped_bf16_gemm_nt_masked", writes=("out",))
def _masked(a, b, out, masked_m, expected_m):
    _check_masked(a, b, out, masked_m, expected_m)
    if _backend("m_grouped_bf16_gemm_nt_masked", a.device) == "ref":
        out.copy_(ref.masked_rows(a, b, masked_m))
        return
    from dskernels.triton import gemm as triton_gemm

    triton_gemm.m_grouped_bf16_gemm_masked(a, b, out, masked_m, expected_m)


@torch.library.register_fake("dskernels::m_grouped_bf16_gemm_nt_masked")
def _masked_fake(a, b, out, masked_m, expected_m):
    _check_masked(a, b, out, masked_m, expected_m)


@torch.library.register_kernel("dskernels::k_grouped_bf16_gemm_tn_contiguous", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("k_grouped_bf16_gemm_tn_contiguous", writes=("out",))
def _k_grouped(a, b, out, ks, ks_tensor=None, accumulate=False):
    _check_k_grouped(a, b, out, ks, ks_tensor)
    if _backend("k_grouped_bf16_gemm_tn_contiguous", a.device) == "ref":
        out.copy_(ref.k_grouped_bf16_gemm(a, b, ks, c=out if accumulate else None))
        return
    from dskernels.triton import gemm as triton_gemm

    if ks_tensor is None:
        ks_tensor = sizes_on_device(ks, out.device)
    triton_gemm.k_grouped_bf16_gemm(a, b, out, ks, ks_tensor, accumulate)


@torch.library.register_fake("dskernels::k_grouped_bf16_gemm_tn_contiguous")
def _k_grouped_fake(a, b, out, ks, ks_tensor=None, accumulate=False):
    _check_k_grouped(a, b, out, ks, ks_tensor)
