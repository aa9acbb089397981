"""DeepSeek-V3.2's lightning indexer logits: DeepGEMM's `fp8_mqa_logits` (prefill) and
`fp8_paged_mqa_logits` (decode over a paged FP8 key cache), with its helpers
`get_paged_mqa_logits_metadata` and `per_custom_dims_cast_to_fp8`. The math and the cache layout
are python_ref/indexer.py; the Triton kernels dskernels/triton/indexer.py. No sm90 CUDA kernel yet:
`auto` runs Triton on CUDA tensors and the reference on CPU tensors.

Their top-k (`torch.topk(logits, 2048)`) is the `indices` of the sparse MLA decode
(dskernels/ops/mla_sparse.py), once mapped through the block table.
"""

from __future__ import annotations

import math
import numbers

import torch

import python_ref.indexer as ref
from dskernels._backend import current_backend, select_backend
from dskernels._checks import as_flag, check_int, check_multiple, check_one_device, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel

FP8 = torch.float8_e4m3fn


def paged_k_cache_cast_to_fp8(k_cache: torch.Tensor) -> torch.Tensor:
    """k_cache [num_pages, page_size, 1, D] (bf16, fp16 or fp32) -> uint8 [num_pages, page_size, 1,
    D + 4] in DeepGEMM's paged layout (per page: the e4m3 rows, then one fp32 scale per token);
    python_ref.indexer's torch ops on every device."""
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    _check_head_dim("k_cache", k_cache.shape[-1])  # as fp8_paged_mqa_logits (its scales stay 4-byte aligned)
    return ref.paged_k_cache_cast_to_fp8(k_cache)


def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's helper: one fp32 scale per index of the kept `dims` (a tuple of distinct
    dimensions of x), over all other dimensions; scale = max(amax, 1e-4) / 448, rounded up to a
    power of two with use_ue8m0. Returns (x in e4m3, shaped like x; scales [x.shape[d] for d in
    dims], indexed in the order of `dims`: with (1, 0), scale[j, i] is x[i, j]'s; DeepGEMM's helper
    returns them in x's order, the same for dims in increasing order, as its callers pass them).
    An empty reduced dimension gives the 1e-4 floor's scale, as an all-zero slice. One Triton
    kernel where the kept dimensions lead (the indexer's q [M, H, D] with (0, 1) and k [N, D] with
    (0,)) and the Triton backend runs (eagerly); python_ref.indexer's torch ops otherwise, the same
    bits."""
    check_tensor("x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                                                      for d in dims):
        raise TypeError(f"dims: expected a tuple of ints (the dimensions that keep one scale per index), got {dims!r}")
    dims = [int(d) for d in dims]  # (numpy's too, as the other integer arguments)
    if any(not -x.dim() <= d < x.dim() for d in dims) or len({d % x.dim() for d in dims}) != len(dims):
        raise ValueError(f"dims: expected distinct dimensions of x ({x.dim()} dimensions), got {tuple(dims)}")
    use_ue8m0 = as_flag("use_ue8m0", use_ue8m0)
    dims = tuple(d % x.dim() for d in dims)
    kept = x.shape[:len(dims)]
    rows, cols = math.prod(kept), math.prod(x.shape[len(dims):])  # (Size.numel() would specialize under export)
    if (dims == tuple(range(len(dims))) and rows and cols and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad) and _row_cast_backend(x.device) == "triton"):
        from dskernels.triton import fp8_cast as triton_fp8

        if cols <= triton_fp8.MAX_ROW_CAST_COLS:
            return _per_row_cast(x, rows, cols, kept, use_ue8m0)
    return ref.per_custom_dims_cast_to_fp8(x, dims, use_ue8m0)


def _row_cast_backend(device: torch.device) -> str:
    """Triton or the reference (a helper beside the ops: under a forced "cuda" backend, which has no
    kernel for it, the reference)."""
    if current_backend() == "cuda":
        return "ref"
    return select_backend("per_custom_dims_cast_to_fp8", device, has_cuda=False, has_triton=True)


@on_tensor_device
def _per_row_cast(x: torch.Tensor, rows: int, cols: int, kept: torch.Size, use_ue8m0: bool):
    from dskernels.triton import fp8_cast as triton_fp8

    x2 = x.reshape(rows, cols)
    if x2.stride(1) != 1:  # (one column: contiguous() would keep its stride, as a size-1 dimension's)
        x2 = x2.contiguous() if cols > 1 else x2.as_strided((rows, 1), (x2.stride(0), 1))
    fp8 = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(kept, dtype=torch.float32, device=x.device)
    triton_fp8.per_row_cast_to_fp8(x2, fp8.view(rows, cols), scale.view(rows), use_ue8m0)
    return fp8, scale


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def _one_of(name: str, value, alias: str, alias_value, rows: int, device: torch.device):
    """An argument given under DeepGEMM's name or its tests' (exactly one of the two): [rows] int32
    on q's device, checked here so that an error names the argument as the caller spelled it."""
    if (value is None) == (alias_value is None):
        raise TypeError(f"{name}: expected a tensor under exactly one of the names {name} and {alias}")
    given, t = (alias, alias_value) if value is None else (name, value)
    check_tensor(given, t, ndim=1, dtypes=(torch.int32,), device=device)
    if t.shape[0] != rows:
        raise ValueError(f"{given}: expected shape ({rows},) (one per query), got {tuple(t.shape)}")
    return t


def _logits_dtype(logits_dtype) -> torch.dtype:
    """DeepGEMM's logits_dtype (its fp8_fp4_* entries): float32 (computed as such) or bfloat16 (the
    float32 logits rounded once)."""
    if not isinstance(logits_dtype, torch.dtype):
        raise TypeError(f"logits_dtype: expected torch.float32 or torch.bfloat16, got {type(logits_dtype).__name__}")
    if logits_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"logits_dtype: expected torch.float32 or torch.bfloat16, got {logits_dtype}")
    return logits_dtype


def _check_schedule_meta(schedule_meta) -> None:
    """Not read (see fp8_paged_mqa_logits), but what DeepGEMM takes there or None: an int32 [n, 2]."""
    if schedule_meta is None:
        return
    check_tensor("schedule_meta", schedule_meta, ndim=2, dtypes=(torch.int32,))
    if schedule_meta.shape[1] != 2:
        raise ValueError(f"schedule_meta: expected get_paged_mqa_logits_metadata's int32 [num_sms + 1, 2], got "
                         f"shape {tuple(schedule_meta.shape)}")


def _check_indices(indices, batch: int, device) -> None:
    """DeepGEMM's varlen `indices`: int32 [B], the request (block-table row) of each of the B rows of
    context_lens."""
    check_tensor("indices", indices, ndim=1, dtypes=(torch.int32,), device=device)
    if indices.shape[0] != batch:
        raise ValueError(f"indices: expected one request per row of context_lens ({batch}), got shape "
                         f"{tuple(indices.shape)}")


def _request_block_table(indices, block_table: torch.Tensor, batch: int) -> torch.Tensor:
    """block_table's rows in the order of `indices` (each query row's request), gathered on the
    device. An index outside the table raises ValueError on CPU tensors (reading them is free); on a
    GPU its row gets page -1, whose keys the kernel gives -inf, as for any page id out of range."""
    _check_indices(indices, batch, block_table.device)
    rows = block_table.shape[0]
    if indices.device.type == "cpu" and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= rows:
            raise ValueError(f"indices: expected requests in [0, {rows}) (block_table's rows), got values in "
                             f"[{low}, {high}]")
    if rows == 0:
        return block_table.new_full((batch, block_table.shape[1]), -1)
    valid = (indices >= 0) & (indices < rows)
    gathered = block_table.index_select(0, indices.clamp(0, rows - 1))
    return torch.where(valid[:, None], gathered, -1)


def _plain_q(q):
    """Newer DeepGEMM passes q as (values, scales or None) (FP4 queries carry scales): the FP8 form
    (q, None) is taken; scaled queries are not implemented."""
    if isinstance(q, (tuple, list)):
        if len(q) != 2 or not isinstance(q[0], torch.Tensor):
            raise TypeError(f"q: expected a float8_e4m3fn tensor (or DeepGEMM's (q, None)), got a {type(q).__name__} "
                            f"of {len(q)} items")
        if q[1] is not None:
            raise NotImplementedError("q: a (values, scales) pair is DeepGEMM's FP4 query form; dskernels takes "
                                      "float8_e4m3fn q (or (q, None))")
        return q[0]
    return q


def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seq_len_k_start: torch.Tensor | None = None, cu_seq_len_k_end: torch.Tensor | None = None,
                   clean_logits: bool = True, max_seqlen_k: int = 0, *, cu_seqlen_ks: torch.Tensor | None = None,
                   cu_seqlen_ke: torch.Tensor | None = None) -> torch.Tensor:
    """The indexer's prefill logits (DeepGEMM's `fp8_mqa_logits`).

    Args:
        q: [M, H, D] float8_e4m3fn queries (unit last stride; no scale: fold it into weights), or
            newer DeepGEMM's spelling (q, None).
        kv: (k [N, D] float8_e4m3fn, k_scale [N] float32): key t is k[t] * k_scale[t]
            (`per_custom_dims_cast_to_fp8(k, (0,))` makes it).
        weights: [M, H] float32, the per-(query, head) weights.
        cu_seq_len_k_start, cu_seq_len_k_end (DeepGEMM's names; or cu_seqlen_ks, cu_seqlen_ke,
            those of its tests): [M] int32: query i sees keys [ks[i], ke[i]) (clamped to [0, N);
            empty if ks >= ke).
        clean_logits: DeepGEMM leaves unseen positions unwritten when False; here they are -inf
            either way.
        max_seqlen_k: 0, or the compressed layout's width: out[i, c] is key ks[i] + c.

    Returns:
        logits: float32 [M, N] (or [M, max_seqlen_k]): sum_h weights[i, h] * relu(q[i, h] . key t),
        -inf for keys query i does not see.
    """
    q = _plain_q(q)
    _check_fp8("q", q, 3)
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError(f"kv: expected a tuple (k float8_e4m3fn [N, D], k_scale float32 [N]), got {type(kv).__name__}")
    try:
        ks = _one_of("cu_seq_len_k_start", cu_seq_len_k_start, "cu_seqlen_ks", cu_seqlen_ks, q.shape[0], q.device)
        ke = _one_of("cu_seq_len_k_end", cu_seq_len_k_end, "cu_seqlen_ke", cu_seqlen_ke, q.shape[0], q.device)
    except ValueError:
        # The bounds are compared with q's device: where q is the tensor on another GPU, name q (the
        # odd one out), not the bounds. (Only on a refusal: no cost on valid calls.)
        check_one_device(q=q, k=kv[0], k_scale=kv[1], weights=weights, cu_seq_len_k_start=cu_seq_len_k_start,
                         cu_seqlen_ks=cu_seqlen_ks, cu_seq_len_k_end=cu_seq_len_k_end, cu_seqlen_ke=cu_seqlen_ke)
        raise
    cu_seqlen_ks, cu_seqlen_ke = ks, ke
    # (a wrong type: TypeError here, not the schema's RuntimeError)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, 0)
    clean_logits = as_flag("clean_logits", clean_logits)
    return torch.ops.dskernels.fp8_mqa_logits(q, kv[0], kv[1], weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits,
                                               max_seqlen_k)


def fp8_fp4_mqa_logits(q, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                       cu_seq_len_k_start: torch.Tensor | None = None, cu_seq_len_k_end: torch.Tensor | None = None,
                       clean_logits: bool = True, max_seqlen_k: int = 0, logits_dtype: torch.dtype = torch.float32,
                       schedule_meta=None, *, cu_seqlen_ks: torch.Tensor | None = None,
                       cu_seqlen_ke: torch.Tensor | None = None) -> torch.Tensor:
    """DeepGEMM's current name of `fp8_mqa_logits`: q as (q, None) (FP8; its FP4 form with scales
    is not implemented) or a bare tensor, and the logits in logits_dtype (float32 or bfloat16).
    schedule_meta (DeepGEMM's SM100 plan) is accepted and not read."""
    logits_dtype = _logits_dtype(logits_dtype)
    _check_schedule_meta(schedule_meta)
    logits = fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k,
                            cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke)
    return logits if logits_dtype == torch.float32 else logits.to(logits_dtype)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor, schedule_meta,
                         max_context_len: int, clean_logits: bool = False, indices=None) -> torch.Tensor:
    """The indexer's decode logits over a paged FP8 key cache (DeepGEMM's `fp8_paged_mqa_logits`).

    Args:
        q: [B, next_n, H, D] float8_e4m3fn (next_n query tokens per sequence: MTP), or (q, None).
        kv_cache: [num_pages, page_size, 1, D + 4] uint8 (or float8_e4m3fn) in DeepGEMM's layout:
            each page holds page_size rows of D e4m3 bytes, then page_size float32 scales
            (`paged_k_cache_cast_to_fp8` writes it). Each page contiguous; pages 4-byte aligned.
        weights: [B * next_n, H] float32.
        context_lens: [B] int32 (row j of sequence b sees keys [0, context_lens[b] - next_n + j + 1))
            or [B, next_n] int32 (row j sees [0, context_lens[b, j])).
        block_table: [B, max_pages] int32: key t of sequence b is in page block_table[b, t //
            page_size]. Entries past the keys a sequence's rows see are never read. A page id
            outside the cache raises ValueError on CPU tensors (any backend: reading the table is
            free there); on a GPU, where that check would synchronize, its keys get -inf.
        schedule_meta: `get_paged_mqa_logits_metadata`'s plan, for drop-in use; not read (the Triton
            kernel's grid covers every (sequence, key block) pair).
        max_context_len: the width of the result.
        clean_logits: as in fp8_mqa_logits (-inf for unseen keys either way).
        indices: None, or newer DeepGEMM's varlen form: int32 [B], the request of each of the B
            sequences of q and context_lens: sequence b reads its keys through block_table row
            indices[b] (several query rows of one request, each with its own context length, as
            vLLM's varlen MTP passes them).

    Returns:
        logits: float32 [B * next_n, max_context_len].
    """
    q = _plain_q(q)
    if indices is not None:
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        check_tensor("context_lens", context_lens, dtypes=(torch.int32,))
        b = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
        if context_lens.dim() not in (1, 2) or b is not None and context_lens.shape[0] != b:
            raise ValueError(f"context_lens: expected [B] or [B, next_n] with B = {b} (q's batch), got shape "
                             f"{tuple(context_lens.shape)}")
        try:
            block_table = _request_block_table(indices, block_table, context_lens.shape[0])
        except ValueError:
            # indices is compared with block_table's device: where block_table (or another tensor)
            # is the one on another GPU, name it rather than indices. (Only on a refusal.)
            check_one_device(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens,
                             block_table=block_table, indices=indices)
            raise
    _check_schedule_meta(schedule_meta)
    max_context_len = check_int("max_context_len", max_context_len, 0)
    clean_logits = as_flag("clean_logits", clean_logits)
    return torch.ops.dskernels.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table,
                                                     max_context_len, clean_logits)


def fp8_fp4_paged_mqa_logits(q, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                             block_table: torch.Tensor, schedule_meta, max_context_len: int,
                             clean_logits: bool = False, logits_dtype: torch.dtype = torch.float32,
                             indices=None) -> torch.Tensor:
    """DeepGEMM's current name of `fp8_paged_mqa_logits`: q as (q, None) or a bare tensor, and the
    logits in logits_dtype (float32 or bfloat16)."""
    logits_dtype = _logits_dtype(logits_dtype)
    logits = fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                                  clean_logits, indices)
    return logits if logits_dtype == torch.float32 else logits.to(logits_dtype)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, *args, block_kv: int | None = None,
                                  num_sms: int | None = None, indices=None) -> torch.Tensor:
    """A balanced schedule for `fp8_paged_mqa_logits`, computed on the device without a host sync.

    Called as DeepGEMM's (context_lens, block_kv, num_sms) or its older (context_lens, num_sms)
    (then block_kv = 64), by position or by keyword (a lone second argument by position is the older
    form's num_sms, so block_kv by keyword needs num_sms too). The key blocks (block_kv keys) of all
    sequences, in order, are cut into num_sms shares that differ by at most one block (share s
    starts at s * q + min(s, r) for total = q * num_sms + r); returns int32 [num_sms + 1, 2]: row s
    = (sequence, key block within it) where share s starts, row num_sms the end. A [B, next_n]
    context_lens counts its last column (the row that sees the most). Same shape and idea as
    DeepGEMM's plan, not its exact split (DeepGEMM's kernel reads its own); dskernels's kernel does
    not read it (see fp8_paged_mqa_logits).
    """
    block_kv, num_sms, indices = _metadata_args(args, block_kv, num_sms, indices)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,))
    if context_lens.dim() not in (1, 2) or (context_lens.dim() == 2 and context_lens.shape[1] < 1):
        raise ValueError(f"context_lens: expected [B] or [B, next_n >= 1], got shape {tuple(context_lens.shape)}")
    if indices is not None:  # (the plan counts keys per row of context_lens, whichever request they are of)
        _check_indices(indices, context_lens.shape[0], context_lens.device)
    block_kv, num_sms = check_int("block_kv", block_kv, 1), check_int("num_sms", num_sms, 1)
    lens = context_lens if context_lens.dim() == 1 else context_lens[:, -1]
    blocks = (lens.long().clamp(min=0) + block_kv - 1) // block_kv
    ends = torch.cumsum(blocks, 0)
    total = ends[-1:] if ends.numel() else blocks.new_zeros(1)
    share, extra = total // num_sms, total % num_sms
    s = torch.arange(num_sms + 1, device=lens.device)
    start = s * share + torch.minimum(s, extra)
    seq = torch.searchsorted(ends, start, right=True)                 # b: past the last sequence
    first_block = torch.cat([ends - blocks, total])[seq]              # where sequence seq's blocks start
    return torch.stack([seq, start - first_block], dim=1).int()


def _metadata_args(args: tuple, block_kv, num_sms, indices):
    """get_paged_mqa_logits_metadata's (block_kv, num_sms, indices) from its positional and keyword
    arguments, in either of DeepGEMM's two signatures."""
    if len(args) > 3:
        raise TypeError(f"get_paged_mqa_logits_metadata: expected at most 4 arguments, got {1 + len(args)}")
    if len(args) == 1 and block_kv is None and num_sms is None:
        return 64, args[0], indices                       # the older (context_lens, num_sms)
    keywords = {"block_kv": block_kv, "num_sms": num_sms, "indices": indices}
    for name, value in zip(keywords, args):
        if keywords[name] is not None:
            raise TypeError(f"get_paged_mqa_logits_metadata: got multiple values for argument {name!r}")
        keywords[name] = value
    if keywords["num_sms"] is None:
        raise TypeError("num_sms: required (DeepGEMM's (context_lens, block_kv, num_sms)), got None")
    if keywords["block_kv"] is None:
        keywords["block_kv"] = 64                         # the older form, by keyword
    return keywords["block_kv"], keywords["num_sms"], keywords["indices"]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_fp8(name: str, t, ndim: int, device=None) -> None:
    check_tensor(name, t, ndim=ndim, dtypes=(FP8,), device=device)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got strides {t.stride()}")


def _check_weights(weights, rows: int, heads: int, device) -> None:
    check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,), device=device)
    if tuple(weights.shape) != (rows, heads):
        raise ValueError(f"weights: expected shape ({rows}, {heads}), got {tuple(weights.shape)}")


def _check_head_dim(name: str, dim: int) -> None:
    check_multiple(name, dim, 16, "the head dimension D (last dimension)")
    if dim == 0:
        raise ValueError(f"{name}: expected a head dimension D (last dimension) of at least 16, got 0")


def _check_mqa_args(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits, max_seqlen_k):
    check_one_device(q=q, k=k, k_scale=k_scale, weights=weights, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke)
    _check_fp8("q", q, 3)
    m, heads, dim = q.shape
    device = q.device
    _check_head_dim("q", dim)
    _check_fp8("k", k, 2, device)
    if k.shape[1] != dim:
        raise ValueError(f"k: expected shape (N, {dim}) (q's D), got {tuple(k.shape)}")
    check_tensor("k_scale", k_scale, ndim=1, dtypes=(torch.float32,), device=device)
    if k_scale.shape[0] != k.shape[0]:
        raise ValueError(f"k_scale: expected shape ({k.shape[0]},) (one per key), got {tuple(k_scale.shape)}")
    _check_weights(weights, m, heads, device)
    for name, t in (("cu_seqlen_ks", cu_seqlen_ks), ("cu_seqlen_ke", cu_seqlen_ke)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=device)
        if t.shape[0] != m:
            raise ValueError(f"{name}: expected shape ({m},) (one per query), got {tuple(t.shape)}")
    check_int("max_seqlen_k", max_seqlen_k, 0)


def _check_paged_args(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits):
    check_one_device(q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table)
    _check_fp8("q", q, 4)
    b, next_n, heads, dim = q.shape
    device = q.device
    _check_head_dim("q", dim)
    if next_n < 1:
        raise ValueError(f"q: expected next_n (dimension 1) >= 1, got shape {tuple(q.shape)}")
    check_tensor("kv_cache", kv_cache, ndim=4, dtypes=(torch.uint8, FP8), device=device)
    num_pages, page_size, kv_heads, row = kv_cache.shape
    if kv_heads != 1 or row != dim + 4 or page_size < 1:
        raise ValueError(f"kv_cache: expected shape (num_pages, page_size >= 1, 1, {dim + 4}) (D e4m3 bytes and "
                         f"one float32 scale per key), got {tuple(kv_cache.shape)}")
    if kv_cache.stride(3) != 1 or (page_size > 1 and kv_cache.stride(1) != row) or (num_pages > 1 and
                                                                                    kv_cache.stride(0) % 4):
        raise ValueError(f"kv_cache: expected every page contiguous and 4-byte aligned (its scales are float32), "
                         f"got strides {kv_cache.stride()}")
    _check_weights(weights, b * next_n, heads, device)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), device=device)
    if tuple(context_lens.shape) not in ((b,), (b, next_n)):
        raise ValueError(f"context_lens: expected shape ({b},) or ({b}, {next_n}), got {tuple(context_lens.shape)}")
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device)
    if block_table.shape[0] != b:
        raise ValueError(f"block_table: expected {b} rows (q's batch), got shape {tuple(block_table.shape)}")
    check_int("max_context_len", max_context_len, 0)


# ---------------------------------------------------------------------------------------------
# Registered kernels
# ---------------------------------------------------------------------------------------------

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@torch.library.register_kernel("dskernels::fp8_mqa_logits", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("fp8_mqa_logits")
def _fp8_mqa_logits(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=True, max_seqlen_k=0):
    _check_mqa_args(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits, max_seqlen_k)
    backend = select_backend("fp8_mqa_logits", q.device, has_cuda=False, has_triton=True)
    if backend == "ref":
        return ref.fp8_mqa_logits(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits, max_seqlen_k)
    from dskernels.triton import indexer as triton_indexer

    out = q.new_empty(q.shape[0], max_seqlen_k if max_seqlen_k > 0 else k.shape[0], dtype=torch.float32)
    triton_indexer.mqa_logits(q, k, k_scale, weights, cu_seqlen_ks.contiguous(), cu_seqlen_ke.contiguous(),
                              max_seqlen_k, out)
    return out


@torch.library.register_fake("dskernels::fp8_mqa_logits")
def _fp8_mqa_logits_fake(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=True, max_seqlen_k=0):
    _check_mqa_args(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits, max_seqlen_k)
    return q.new_empty(q.shape[0], max_seqlen_k if max_seqlen_k > 0 else k.shape[0], dtype=torch.float32)


@torch.library.register_kernel("dskernels::fp8_paged_mqa_logits", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("fp8_paged_mqa_logits")
def _fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits=False):
    _check_paged_args(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits)
    if kv_cache.data_ptr() % 4:  # here, not in the fake: a fake tensor has no address
        raise ValueError(f"kv_cache: expected a 4-byte aligned start (its scales are float32), got address "
                         f"{kv_cache.data_ptr():#x}")
    backend = select_backend("fp8_paged_mqa_logits", q.device, has_cuda=False, has_triton=True)
    if backend == "ref":
        return ref.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits)
    from dskernels.triton import indexer as triton_indexer

    if q.device.type == "cpu":  # (the interpreter) reading the values is free here: pages outside
        # the cache raise, as on the reference
        ref.check_pages(kv_cache.shape[0], kv_cache.shape[1], context_lens, block_table, max_context_len)
    out = q.new_empty(q.shape[0] * q.shape[1], max_context_len, dtype=torch.float32)
    triton_indexer.paged_mqa_logits(q, kv_cache, weights, context_lens, _unit_last(block_table), out)
    return out


@torch.library.register_fake("dskernels::fp8_paged_mqa_logits")
def _fp8_paged_mqa_logits_fake(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits=False):
    _check_paged_args(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits)
    return q.new_empty(q.shape[0] * q.shape[1], max_context_len, dtype=torch.float32)
