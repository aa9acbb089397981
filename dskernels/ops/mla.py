"""MLA decode over a paged KV cache (API.md section 1; FlashMLA's `get_mla_metadata` and
`flash_mla_with_kvcache`). The math is python_ref/mla.py; the split plan is `split_plan` below."""

from __future__ import annotations

import math
import os

import numpy
import torch

import python_ref.mla
from dskernels._backend import (batch_invariant_enabled, cuda_kernels_built, current_backend, is_hopper,
                                select_backend, triton_installed)
from dskernels._checks import as_flag, check_int, check_multiple, check_one_device, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel

FP8 = torch.float8_e4m3fn
METADATA_SIZE = 8        # ints per partition row of tile_scheduler_metadata
BLOCK_TOKENS = 64        # split points fall on multiples of this many keys (FlashMLA's block_n)
FIXED_OVERHEAD_BLOCKS = 5  # cost of starting a sequence (Q load, epilogue), in key blocks (FlashMLA's value)
TILE_ROWS = 32           # query rows (tokens x heads of one kv head) per tile of the Triton kernel (d=576)
SM90_TILE_ROWS = 64      # ... and of the sm90 CUDA kernel
SM90_HEAD_DIM, SM90_HEAD_DIM_V = 576, 512  # the one shape the sm90 kernel is built for (V3's)
SM90_COMBINE_ROWS_PER_CTA = 4  # the sm90 combine kernel's warps per CTA (mla::kCombineWarps)
# The sm90 kernels (csrc/mla/) passed tests/test_mla_sm90.py and compute-sanitizer on an H200
# (2026-12-04): `auto` runs them (and their split plan) on Hopper. False would keep Triton. Changed
# since, not yet rerun on a GPU: NaN scores give NaN, no split buffers for a one-partition plan, the
# combine's single-split test (checked in a thread-level emulation, 2026-12-07; README "Status").
_CUDA_MLA_VERIFIED = True
CPU_SM_COUNT = 8         # partitions on CPU tensors: fixed, so the fake kernel knows the shape
# Batch-invariant mode (`invariant_split_plan`; the reasoning behind the numbers: docs/mla.md).
INVARIANT_SPLITS_ENV = "DSKERNELS_MLA_INVARIANT_SPLITS"  # K, the most pieces of one sequence
DEFAULT_INVARIANT_SPLITS = 4
INVARIANT_MIN_PIECE = 1024      # keys: a sequence is cut into pieces of at least this many keys ...
INVARIANT_ROW_KEYS = 32         # ... and this many per query row (a split's combine traffic: <= 1/9)
_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

class MLASchedulerMetadata:
    """FlashMLA's newest form (its FlashMLASchedMeta): `get_mla_metadata()` with no lengths returns
    this, empty, and the first `flash_mla_with_kvcache` call given it plans its batch (the same
    device-side plan) and keeps the plan here; later calls with it reuse that plan. One per decode
    step, shared by the step's layers, as in FlashMLA (the lengths must not change in between)."""

    def __init__(self):
        self.plan: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key: tuple | None = None

    # FlashMLA's FlashMLASchedMeta fields, which serving code reads and resets (None to the tensors
    # or config, False to have_initialized, to have the next call plan again): views of the plan.
    # Such a reset drops the plan; a tensor is refused, since a table made elsewhere (FlashMLA's own
    # planner) does not describe this library's partitions.
    @property
    def have_initialized(self) -> bool:
        return self.plan is not None

    @have_initialized.setter
    def have_initialized(self, value) -> None:
        # FlashMLA's fields are plain attributes: SGLang resets a plan with `have_initialized = False`
        # (before a CUDA-graph capture, so that the plan is made inside it), others also set config
        if as_flag("have_initialized", value):
            if self.plan is None:
                raise ValueError("have_initialized: True is set by the flash_mla_with_kvcache call that plans; "
                                 "only False (drop the plan) may be assigned to an empty one")
        else:
            self.plan = self.key = None

    @property
    def config(self) -> tuple | None:
        return self.key

    @config.setter
    def config(self, value) -> None:
        self._reset("config", value)

    @property
    def tile_scheduler_metadata(self) -> torch.Tensor | None:
        return None if self.plan is None else self.plan[0]

    @tile_scheduler_metadata.setter
    def tile_scheduler_metadata(self, value) -> None:
        self._reset("tile_scheduler_metadata", value)

    @property
    def num_splits(self) -> torch.Tensor | None:
        return None if self.plan is None else self.plan[1]

    @num_splits.setter
    def num_splits(self, value) -> None:
        self._reset("num_splits", value)

    def _reset(self, name: str, value) -> None:
        if value is not None:
            raise NotImplementedError(f"{name}: only None may be assigned (the next flash_mla_with_kvcache call "
                                      f"then plans again); got {type(value).__name__}: this library plans its own "
                                      "splits, and a table made elsewhere does not describe them")
        self.plan = self.key = None


FlashMLASchedMeta = MLASchedulerMetadata  # FlashMLA's name (flash_mla.flash_mla_interface)


def get_mla_metadata(cache_seqlens: torch.Tensor | None = None, num_q_tokens_per_head_k: int | None = None,
                     num_heads_k: int | None = None, num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None, *, num_heads_per_head_k: int | None = None):
    """Plans how the decode kernel splits the keys of a batch over the GPU's SMs.

    Computed on the device (one kernel on the Triton and CUDA backends, `split_plan`'s tensor ops
    on the reference), with no host synchronization, so it can be captured in a CUDA graph
    together with `flash_mla_with_kvcache` and replayed with new lengths.

    Args:
        cache_seqlens: [b] int32, the number of cached tokens of each sequence (0 allowed).
        num_q_tokens_per_head_k: query rows that share one kv head: s_q * h_q // h_kv (0 allowed: an
            empty q). FlashMLA's name; for V3, h_kv = 1, it is s_q * h_q.
        num_heads_k: h_kv, the number of kv heads.

    Returns:
        tile_scheduler_metadata: [num_parts, 8] int32 on cache_seqlens' device. num_parts =
            max(1, sm_count // (num_heads_k * ceil(num_q_tokens_per_head_k / 32))), where
            sm_count is the CUDA device's SM count, or 8 (`CPU_SM_COUNT`) for CPU tensors; it
            depends on the shapes only, never on the lengths. Row p describes partition p:
            [begin_idx, begin_token, end_idx, end_token, begin_split, 0, 0, 0]: it processes keys
            [begin_token, ...) of sequence begin_idx, every key of the sequences in between, and
            keys [..., end_token) of sequence end_idx (inclusive index); begin_split is the split
            number (within its sequence) of its first piece. An idle partition has
            begin_idx = b, end_idx = b - 1.
        num_splits: [b + 1] int32, an exclusive prefix sum: sequence i is cut into
            num_splits[i + 1] - num_splits[i] splits (0 for an empty sequence), whose partial
            results occupy slots num_splits[i] ... of the combine buffers. Starts at 0 and never
            decreases; num_splits[b] <= b + num_parts - 1.

    The plan: every sequence costs ceil(n / 64) key blocks plus 5 blocks of fixed overhead; the
    concatenated costs are cut into num_parts equal slices (FlashMLA's balancing), so a long
    sequence is spread over many SMs and many short ones share one.

    In batch-invariant mode (`dskernels.batch_invariant()`), on every backend: num_parts =
    max(1, b * K), K = DSKERNELS_MLA_INVARIANT_SPLITS (default 4), and partition i * K + j is
    piece j of sequence i, cut by that sequence's length alone (`invariant_split_plan`), so a
    sequence's output bits do not depend on the rest of the batch. Plan inside the mode (a
    MLASchedulerMetadata planned outside it is refused inside it).

    num_heads_q, is_fp8_kvcache and topk are FlashMLA's arguments for its sparse kernels, accepted
    for drop-in use and not needed here: the sparse decode (flash_mla_with_kvcache with indices)
    plans its own splits from the shapes and does not read this metadata.

    num_heads_per_head_k: FlashMLA's first name for num_q_tokens_per_head_k, still taken by keyword.

    With no cache_seqlens (FlashMLA's newest call, `get_mla_metadata()`): returns
    (MLASchedulerMetadata(), None), a plan filled by the first flash_mla_with_kvcache call.
    """
    if num_heads_per_head_k is not None:
        if num_q_tokens_per_head_k is not None:
            raise TypeError("num_heads_per_head_k: FlashMLA's old name for num_q_tokens_per_head_k; pass one of "
                            "the two, not both")
        num_q_tokens_per_head_k = num_heads_per_head_k
    # FlashMLA's sparse arguments change nothing here, but a wrong type is an argument out of place
    for name, value in (("num_heads_q", num_heads_q), ("topk", topk)):
        if value is not None:
            check_int(name, value, 1)
    as_flag("is_fp8_kvcache", is_fp8_kvcache)
    if cache_seqlens is None:
        return MLASchedulerMetadata(), None
    for name, value in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if value is None:
            raise TypeError(f"{name}: expected an int with cache_seqlens (or no arguments at all: the plan "
                            f"is then made by the first flash_mla_with_kvcache call), got None")
    # (checked here: the schema takes a bool as an int, so True would mean 1)
    num_q_tokens_per_head_k = check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    num_heads_k = check_int("num_heads_k", num_heads_k)
    if batch_invariant_enabled():  # (read here as well: under torch.compile a guard, so a switch recompiles)
        invariant_max_splits()  # a bad knob is named here, before any kernel
    return torch.ops.dskernels.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int,
                           tile_scheduler_metadata, num_splits: torch.Tensor | None = None,
                           softmax_scale: float | None = None, causal: bool = False,
                           k_scale: torch.Tensor | None = None, *flashmla_args, is_fp8_kvcache: bool = False,
                           indices: torch.Tensor | None = None, topk_length: torch.Tensor | None = None,
                           attn_sink: torch.Tensor | None = None, extra_k_cache=None,
                           extra_indices_in_kvcache=None, extra_topk_length=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention decode over a paged KV cache (FlashMLA's API).

    Args:
        q: [b, s_q, h_q, d] bfloat16 or float16 (float32 too; on the Triton path its dots are
            IEEE fp32). d = 576 for DeepSeek-V3 (512 latent + 64 rope); any d % 16 == 0 works.
            Any strides (one without unit stride in d is copied first).
        k_cache: [num_pages, page_size, h_kv, d], q's dtype or torch.float8_e4m3fn (then
            k_scale is required). Token t of sequence i is k_cache[block_table[i, t // page_size],
            t % page_size]. V is k_cache[..., :head_dim_v]: MLA keeps one latent per token.
            Unit stride in the last dimension; page_size may be anything >= 1.
        block_table: [b, max_pages_per_seq] int32, page ids of each sequence; entries past a
            sequence's last page are never read (they may hold anything).
        cache_seqlens: [b] int32, cached tokens per sequence, 0 <= n <= max_pages_per_seq *
            page_size (checked on the reference; the Triton kernel ignores keys past the table).
        head_dim_v: dv, the value width, 1 <= dv <= d (512 for V3).
        tile_scheduler_metadata, num_splits: from `get_mla_metadata(cache_seqlens,
            s_q * h_q // h_kv, h_kv)` for the same batch (the lengths may have changed since only
            if the metadata was recomputed, e.g. inside the same CUDA graph); or FlashMLA's newest
            form, `get_mla_metadata()`'s MLASchedulerMetadata and None: planned by the first
            call that gets it, reused by later ones. Code written for that form may also pass
            get_mla_metadata(cache_seqlens, ...)'s first tensor with num_splits left None: the
            batch is then planned in this call.
        softmax_scale: scale of q.k, default d ** -0.5.
        causal: False: every query of sequence i sees keys [0, cache_seqlens[i]). True: query
            token j sees keys [0, cache_seqlens[i] - s_q + j + 1) (the queries are the last s_q
            cached tokens: speculative / MTP decode).
        k_scale: [1] (or scalar) float32 for an fp8 cache: key = k_cache.float() * k_scale.

    Returns:
        out: [b, s_q, h_q, head_dim_v] in q's dtype, softmax(scale * q K^T) V with query head h
            reading kv head h // (h_q // h_kv).
        lse: [b, h_q, s_q] float32, natural log of the sum of exp(scaled scores).
        A query that sees no key (empty sequence, or causal with cache_seqlens[i] < s_q) gets
        out = 0 and lse = +inf.

    Sparse attention (DeepSeek-V3.2, FlashMLA's keywords): with `indices` [b, s_q, topk] int32
    each query token attends only to the cache slots it lists (slot = page * page_size + offset;
    block_table, cache_seqlens and the metadata are then not read and may be None), optionally
    with `topk_length`, `attn_sink` and V3.2's FP8 cache (`is_fp8_kvcache`): this is
    `flash_mla_sparse_decode` (dskernels/ops/mla_sparse.py), whose docstring has the details.
    causal and k_scale do not apply there.

    extra_k_cache, extra_indices_in_kvcache, extra_topk_length: FlashMLA's second sparse cache;
    only None is taken here.

    FlashMLA's own positional form works too: a bool after causal is its is_fp8_kvcache (where
    k_scale sits here), and what follows it is indices, attn_sink, extra_k_cache,
    extra_indices_in_kvcache, topk_length, extra_topk_length, in FlashMLA's order.

    Raises TypeError / ValueError whose message starts with the argument's name for wrong
    shapes, dtypes or devices.
    """
    if isinstance(head_dim_v, bool):  # checked here: the op's schema would pass it on as an int
        raise TypeError("head_dim_v: expected an int, got bool")
    causal = as_flag("causal", causal)
    is_fp8_kvcache = as_flag("is_fp8_kvcache", is_fp8_kvcache)
    if isinstance(k_scale, (bool, numpy.bool_)) or flashmla_args:  # FlashMLA's positional form (docstring)
        given = dict(indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
                     extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
                     extra_topk_length=extra_topk_length)
        k_scale, is_fp8_kvcache, given = _flashmla_positional(k_scale, flashmla_args, is_fp8_kvcache, given)
        indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length = given.values()
    for name, value in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                        ("extra_topk_length", extra_topk_length)):
        if value is not None:
            raise NotImplementedError(f"{name}: FlashMLA's second sparse KV cache is not implemented here; "
                                      "pass None")
    if indices is not None:
        if causal:
            raise ValueError("causal: sparse attention (indices given) has no causal mask: the indices say "
                             "what each query sees")
        if k_scale is not None:
            raise ValueError("k_scale: sparse attention reads V3.2's FP8 layout (is_fp8_kvcache=True), whose "
                             "scales are in the cache; expected None")
        from dskernels.ops.mla_sparse import flash_mla_sparse_decode  # (it imports this module)
        return flash_mla_sparse_decode(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8_kvcache, topk_length,
                                       attn_sink)
    if is_fp8_kvcache or topk_length is not None or attn_sink is not None:
        given = [name for name, value in (("is_fp8_kvcache", is_fp8_kvcache), ("topk_length", topk_length),
                                          ("attn_sink", attn_sink)) if value is not None and value is not False]
        raise ValueError(f"{given[0]}: applies to sparse attention only (pass indices); dense decode reads an "
                         "fp8 cache with a per-tensor k_scale")
    if not isinstance(tile_scheduler_metadata, MLASchedulerMetadata):
        if num_splits is None:
            # FlashMLA's newest interface: its get_mla_metadata returns (FlashMLASchedMeta, None)
            # whatever it is given, and callers written for it (vLLM's FlashMLA backend) pass the
            # first element as tile_scheduler_metadata with no num_splits. Ours returned the
            # tensors for those arguments: plan this batch here (on the device, no host sync).
            if not isinstance(tile_scheduler_metadata, torch.Tensor):
                raise TypeError("tile_scheduler_metadata: expected get_mla_metadata's tensor (with num_splits) or "
                                f"its MLASchedulerMetadata, got {type(tile_scheduler_metadata).__name__}")
            plan, _ = _lazy_plan(MLASchedulerMetadata(), q, k_cache, block_table, cache_seqlens, head_dim_v, k_scale)
            return torch.ops.dskernels.flash_mla_with_kvcache(
                q, k_cache, block_table, cache_seqlens, head_dim_v, *plan, softmax_scale, causal, k_scale)
        return torch.ops.dskernels.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            softmax_scale, causal, k_scale)
    if num_splits is not None:
        raise ValueError("num_splits: must be None with get_mla_metadata()'s MLASchedulerMetadata (its plan holds "
                         f"the splits), got {type(num_splits).__name__}")
    meta = tile_scheduler_metadata
    plan, key = _lazy_plan(meta, q, k_cache, block_table, cache_seqlens, head_dim_v, k_scale)
    result = torch.ops.dskernels.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, *plan, softmax_scale, causal, k_scale)
    if meta.plan is None:  # kept once a call has taken it: a call that raised leaves meta empty (FlashMLA's rule)
        meta.plan, meta.key = plan, key
    return result


def _flashmla_positional(is_fp8, rest: tuple, is_fp8_keyword: bool, given: dict):
    """FlashMLA's positional arguments after causal: is_fp8_kvcache (a bool, where k_scale sits
    in dskernels' order), then the sparse ones in `given`'s order. Returns (k_scale None, the bool,
    given with the positional values in)."""
    if not isinstance(is_fp8, (bool, numpy.bool_)):
        raise TypeError(f"k_scale: {len(rest)} more positional arguments follow it, FlashMLA's order, whose "
                        f"is_fp8_kvcache (a bool) sits here; got {type(is_fp8).__name__}")
    if is_fp8_keyword:
        raise TypeError("is_fp8_kvcache: given twice, by position (after causal) and by keyword")
    if len(rest) > len(given):
        raise TypeError(f"flash_mla_with_kvcache: takes at most {10 + len(given)} positional arguments, got "
                        f"{10 + len(rest)}")
    for name, value in zip(given, rest):
        if given[name] is not None:
            raise TypeError(f"{name}: given twice, by position and by keyword")
        given[name] = value
    return None, bool(is_fp8), given


def _lazy_plan(meta: MLASchedulerMetadata, q, k_cache, block_table, cache_seqlens, head_dim_v, k_scale):
    """(plan, key): the plan kept in `meta`, or a new one on its first use (the batch's shapes must
    stay the same), and the shapes it is for."""
    # q's and the cache's shapes first: their errors name them, not get_mla_metadata's arguments
    # computed from them.
    try:
        _check_query_and_cache(q, k_cache, head_dim_v)
    except ValueError:
        # The cache is compared with q's device: where q is the tensor on another GPU, name q (the
        # odd one out), not k_cache. (Only on a refusal: no cost on this per-step path.)
        check_one_device(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens, k_scale=k_scale)
        raise
    check_tensor("cache_seqlens", cache_seqlens, ndim=1)
    # (no query heads: an empty output, planned as one row)
    rows, h_kv = max(q.shape[1] * q.shape[2] // k_cache.shape[2], 1), k_cache.shape[2]
    # (the mode too: a plan kept from outside batch-invariant mode would follow the batch inside it)
    key = (tuple(cache_seqlens.shape), rows, h_kv, cache_seqlens.device, batch_invariant_enabled())
    if meta.plan is None:
        return get_mla_metadata(cache_seqlens, rows, h_kv), key
    if meta.key != key:
        raise ValueError(f"tile_scheduler_metadata: planned for (batch, q rows per kv head, kv heads, device, "
                         f"batch-invariant mode) = {meta.key}, now used for {key}: call get_mla_metadata() again "
                         "for this batch")
    return meta.plan, key


# ---------------------------------------------------------------------------------------------
# The split plan
# ---------------------------------------------------------------------------------------------

def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).multi_processor_count
    return CPU_SM_COUNT


def _sm90_runs(device: torch.device) -> bool:
    """Whether the sm90 CUDA kernels serve this device under the current backend choice."""
    if device.type != "cuda" or not cuda_kernels_built() or not is_hopper(device):
        return False
    asked = current_backend()
    return asked == "cuda" or (asked == "auto" and _CUDA_MLA_VERIFIED)


def num_partitions(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """FlashMLA's num_sm_parts: one partition per group of SMs that covers all kv heads and all
    row tiles of queries, so the decode grid (parts x kv heads x tiles) fills the GPU about once.
    Tiles have 64 rows in the sm90 kernel (FlashMLA's; with its opt-in 2-CTA clusters,
    DSKERNELS_MLA_CLUSTER=1, an odd count above one is padded to pairs), 32 in the Triton kernel (16 when s_q * h_q / h_kv <= 16). Any partition
    count works with either kernel; this one fills the GPU."""
    num_q_tokens_per_head_k = torch.sym_max(1, num_q_tokens_per_head_k)  # (an empty q's plan: any works)
    if _sm90_runs(device):
        tiles = -(-num_q_tokens_per_head_k // SM90_TILE_ROWS)
        if os.environ.get("DSKERNELS_MLA_CLUSTER") == "1":  # 2-CTA clusters: tiles padded to pairs
            tiles = torch.sym_ite(tiles > 1, 2 * (-(-tiles // 2)), tiles)
    else:
        tiles = -(-num_q_tokens_per_head_k // TILE_ROWS)
    # sym_max/sym_ite: with symbolic sizes (torch.compile) the count stays an expression, no guard.
    return torch.sym_max(1, sm_count(device) // (num_heads_k * tiles))


def split_plan(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The metadata of get_mla_metadata, from tensor ops on cache_seqlens' device (no sync).

    Positions on one line: sequence i occupies [start_i, start_i + cost_i) with cost_i =
    FIXED_OVERHEAD_BLOCKS + blocks_i, its key blocks at the end of that range (from key_i =
    start_i + overhead). Partition p takes positions [p * P, (p + 1) * P), P = ceil(total /
    num_parts). The cuts inside a sequence's key blocks are the multiples of P in (key_i, key_i +
    blocks_i), which gives each sequence's split count and each partition's first split number.
    """
    device = cache_seqlens.device
    b = cache_seqlens.shape[0]
    meta = torch.zeros(num_parts, METADATA_SIZE, dtype=torch.int32, device=device)
    if b == 0:
        meta[:, 0] = 0
        meta[:, 2] = -1
        return meta, torch.zeros(1, dtype=torch.int32, device=device)
    lengths = cache_seqlens.long().clamp(min=0)
    blocks = (lengths + BLOCK_TOKENS - 1) // BLOCK_TOKENS
    ends = torch.cumsum(blocks + FIXED_OVERHEAD_BLOCKS, 0)               # exclusive end of each sequence
    key_start = ends - blocks                                            # first key-block position
    total = ends[-1:]                                                    # [1], stays on the device
    per_part = torch.clamp((total + num_parts - 1) // num_parts, min=1)  # P
    parts = torch.arange(num_parts, device=device)
    first = parts * per_part                                             # [num_parts]
    last = torch.minimum(first + per_part, total) - 1                    # inclusive
    idle = first >= total
    begin_idx = torch.searchsorted(ends, first, right=True).clamp(max=b - 1)
    end_idx = torch.searchsorted(ends, last.clamp(min=0), right=True).clamp(max=b - 1)
    begin_block = (first - key_start[begin_idx]).clamp(min=0).minimum(blocks[begin_idx])
    end_block = (last + 1 - key_start[end_idx]).clamp(min=0).minimum(blocks[end_idx])
    begin_split = (parts - key_start[begin_idx] // per_part).clamp(min=0)
    meta[:, 0] = torch.where(idle, b, begin_idx).int()
    meta[:, 1] = torch.where(idle, 0, begin_block * BLOCK_TOKENS).int()
    meta[:, 2] = torch.where(idle, b - 1, end_idx).int()
    meta[:, 3] = torch.where(idle, 0, torch.minimum(end_block * BLOCK_TOKENS, lengths[end_idx])).int()
    meta[:, 4] = torch.where(idle, 0, begin_split).int()
    splits = torch.where(blocks > 0, (key_start + blocks - 1) // per_part - key_start // per_part + 1, 0)
    num_splits = torch.zeros(b + 1, dtype=torch.int32, device=device)
    num_splits[1:] = torch.cumsum(splits, 0).int()
    return meta, num_splits


def invariant_max_splits() -> int:
    """K: the most pieces one sequence is cut into in batch-invariant mode (DSKERNELS_MLA_INVARIANT_SPLITS,
    default DEFAULT_INVARIANT_SPLITS; 1 is FlashAttention-3's num_splits = 1, vLLM's batch-invariant
    choice). The sparse decode takes it for the splits of a top-k list too."""
    text = os.environ.get(INVARIANT_SPLITS_ENV, "")
    if not text:
        return DEFAULT_INVARIANT_SPLITS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:  # (the sm90 decode's grid.z holds b * K partitions)
        raise ValueError(f"{INVARIANT_SPLITS_ENV}: expected an integer from 1 to 65535, got {text!r}")
    return value


def invariant_min_piece(num_q_tokens_per_head_k: int) -> int:
    """The shortest piece (in keys, a multiple of BLOCK_TOKENS) of the batch-invariant plan for
    this many query rows per kv head: a shape of every row, never of the batch."""
    keys = max(INVARIANT_MIN_PIECE, INVARIANT_ROW_KEYS * num_q_tokens_per_head_k)
    return -(-keys // BLOCK_TOKENS) * BLOCK_TOKENS


def invariant_partitions(batch, max_splits: int):
    """The batch-invariant plan's partition count: K per sequence (one, idle, for an empty batch)."""
    return torch.sym_max(1, batch * max_splits)


def invariant_split_plan(cache_seqlens: torch.Tensor, max_splits: int,
                         min_piece: int) -> tuple[torch.Tensor, torch.Tensor]:
    """get_mla_metadata's plan in batch-invariant mode: each sequence cut by its own length alone.

    Partition p = i * K + j (K = max_splits) is piece j of sequence i. A sequence of n > 0 keys
    is cut into S = clamp(n // min_piece, 1, K) pieces of P = ceil(n / S) keys rounded up to a
    multiple of BLOCK_TOKENS (so no piece but the last is shorter than min_piece; ceil(n / P) <= S
    of them are busy, none for n = 0); the other partitions are idle (begin_idx = b, end_idx =
    b - 1). So the keys a split covers, the number of splits and the order the combine merges them
    in depend on n only: the sequence's bits do not change with the rest of the batch. Same table
    format as split_plan (every kernel walks it as it is), tensor ops on cache_seqlens' device (no
    sync), shapes fixed by b and K."""
    device = cache_seqlens.device
    b = cache_seqlens.shape[0]
    parts = invariant_partitions(b, max_splits)
    meta = torch.zeros(parts, METADATA_SIZE, dtype=torch.int32, device=device)
    num_splits = torch.zeros(b + 1, dtype=torch.int32, device=device)
    if b == 0:
        meta[:, 2] = -1
        return meta, num_splits
    lengths = cache_seqlens.long().clamp(min=0)
    wanted = torch.clamp(lengths // min_piece, min=1, max=max_splits)                      # S (n > 0)
    per_piece = (lengths + wanted - 1) // wanted                                           # ceil(n / S)
    per_piece = ((per_piece + BLOCK_TOKENS - 1) // BLOCK_TOKENS * BLOCK_TOKENS).clamp(min=BLOCK_TOKENS)
    splits = (lengths + per_piece - 1) // per_piece                                        # busy pieces
    piece = torch.arange(max_splits, device=device)
    begin = piece[None, :] * per_piece[:, None]                                            # [b, K]
    end = torch.minimum(begin + per_piece[:, None], lengths[:, None])
    busy = piece[None, :] < splits[:, None]
    seq = torch.arange(b, device=device)[:, None].expand(b, max_splits)
    meta[:, 0] = torch.where(busy, seq, b).reshape(-1).int()
    meta[:, 1] = torch.where(busy, begin, 0).reshape(-1).int()
    meta[:, 2] = torch.where(busy, seq, b - 1).reshape(-1).int()
    meta[:, 3] = torch.where(busy, end, 0).reshape(-1).int()
    meta[:, 4] = torch.where(busy, piece[None, :], 0).reshape(-1).int()
    num_splits[1:] = torch.cumsum(splits, 0).int()
    return meta, num_splits


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k) -> None:
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, 0)  # (0: an empty q, h_q = 0)
    check_int("num_heads_k", num_heads_k, 1)


def check_cache_heads(q, k_cache, head_dim_v) -> None:
    """The page and head geometry of a [num_pages, page_size, h_kv, row] cache against q [.., h_q, d]
    (the dense and the sparse decode share it)."""
    _, page_size, h_kv, _ = k_cache.shape
    h_q, d = q.shape[-2:]
    if page_size < 1 or h_kv < 1:
        raise ValueError(f"k_cache: expected page_size >= 1 and h_kv >= 1, got shape {tuple(k_cache.shape)}")
    if h_q % h_kv:
        raise ValueError(f"q: expected h_q to be a multiple of h_kv = {h_kv} (k_cache dimension 2), got h_q = {h_q}")
    if k_cache.stride(3) != 1 and k_cache.numel() > 0:
        raise ValueError(f"k_cache: expected unit stride in the last dimension, got strides {k_cache.stride()}")
    check_int("head_dim_v", head_dim_v, 1)
    if head_dim_v > d:
        raise ValueError(f"head_dim_v: expected at most d = {d}, got {head_dim_v}")


def _check_query_and_cache(q, k_cache, head_dim_v) -> None:
    check_tensor("q", q, ndim=4, dtypes=_Q_DTYPES)
    s_q, d = q.shape[1], q.shape[3]
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype, FP8), device=q.device)
    check_multiple("q", d, 16, "the head dimension d (last dimension)")
    if s_q < 1:
        raise ValueError(f"q: expected s_q (dimension 1) >= 1, got shape {tuple(q.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected head dimension {d} (q's d), got shape {tuple(k_cache.shape)}")
    check_cache_heads(q, k_cache, head_dim_v)


def _check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                       num_splits, softmax_scale, causal, k_scale) -> None:
    check_one_device(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                     tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits, k_scale=k_scale)
    _check_query_and_cache(q, k_cache, head_dim_v)
    b = q.shape[0]
    device = q.device
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    check_tensor("tile_scheduler_metadata", tile_scheduler_metadata, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("num_splits", num_splits, ndim=1, dtypes=(torch.int32,), device=device)
    if block_table.shape[0] != b:
        raise ValueError(f"block_table: expected {b} rows (q's batch), got shape {tuple(block_table.shape)}")
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens: expected shape ({b},) (q's batch), got {tuple(cache_seqlens.shape)}")
    if tile_scheduler_metadata.shape[1] != METADATA_SIZE or tile_scheduler_metadata.shape[0] < 1:
        raise ValueError(f"tile_scheduler_metadata: expected shape (num_parts >= 1, {METADATA_SIZE}) from "
                         f"get_mla_metadata, got {tuple(tile_scheduler_metadata.shape)}")
    if num_splits.shape[0] != b + 1:
        raise ValueError(f"num_splits: expected shape ({b + 1},) (batch + 1) from get_mla_metadata, "
                         f"got {tuple(num_splits.shape)}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale}")
    if k_cache.dtype == FP8:
        if k_scale is None:
            raise ValueError("k_scale: expected a float32 tensor of one element for the float8_e4m3fn "
                             "k_cache, got None")
        check_tensor("k_scale", k_scale, dtypes=(torch.float32,), device=device)
        if k_scale.numel() != 1:
            raise ValueError(f"k_scale: expected one element, got shape {tuple(k_scale.shape)}")
    elif k_scale is not None:
        raise ValueError(f"k_scale: expected None for a {k_cache.dtype} k_cache (only an fp8 cache has a "
                         f"scale), got a tensor of shape {tuple(k_scale.shape)}")


# ---------------------------------------------------------------------------------------------
# Registered kernels
# ---------------------------------------------------------------------------------------------

@torch.library.register_kernel("dskernels::get_mla_metadata", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("get_mla_metadata")
def _get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    _check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    device = cache_seqlens.device
    b = cache_seqlens.shape[0]
    chosen = select_backend("get_mla_metadata", device, has_cuda=True, has_triton=True,
                            cuda_verified=_CUDA_MLA_VERIFIED)
    if batch_invariant_enabled():  # every backend's kernels walk this plan unchanged
        max_splits, min_piece = invariant_max_splits(), invariant_min_piece(num_q_tokens_per_head_k)
        if chosen == "ref" or b == 0 or not triton_installed():
            return invariant_split_plan(cache_seqlens, max_splits, min_piece)  # the definition: ~30 tensor ops
        from dskernels.triton import mla as triton_mla

        # the same plan in one Triton program, for the sm90 kernels too (it has no CUDA twin)
        meta = torch.empty(invariant_partitions(b, max_splits), METADATA_SIZE, dtype=torch.int32, device=device)
        num_splits = torch.empty(b + 1, dtype=torch.int32, device=device)
        triton_mla.invariant_split_plan(cache_seqlens.contiguous(), meta, num_splits, max_splits, min_piece,
                                        BLOCK_TOKENS)
        return meta, num_splits
    parts = num_partitions(device, num_q_tokens_per_head_k, num_heads_k)
    if chosen == "ref" or b == 0:
        return split_plan(cache_seqlens, parts)  # tensor ops on the device: the plan's definition
    meta = torch.empty(parts, METADATA_SIZE, dtype=torch.int32, device=device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=device)
    if chosen == "cuda":
        torch.ops.dskernels._sm90_get_mla_metadata(cache_seqlens.contiguous(), meta, num_splits)
    else:  # the same plan in one Triton program (split_plan is ~40 small kernels)
        from dskernels.triton import mla as triton_mla

        triton_mla.get_mla_metadata(cache_seqlens.contiguous(), meta, num_splits, BLOCK_TOKENS, FIXED_OVERHEAD_BLOCKS)
    return meta, num_splits


@torch.library.register_fake("dskernels::get_mla_metadata")
def _get_mla_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    _check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    b = cache_seqlens.shape[0]
    if batch_invariant_enabled():
        parts = invariant_partitions(b, invariant_max_splits())
    else:
        parts = num_partitions(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k)
    return (cache_seqlens.new_empty(parts, METADATA_SIZE, dtype=torch.int32),
            cache_seqlens.new_empty(b + 1, dtype=torch.int32))


def sm90_unsupported(q: torch.Tensor, k_cache: torch.Tensor, head_dim_v: int) -> str | None:
    """Why the sm90 kernel cannot take these (validated) inputs, or None if it can."""
    if q.shape[-1] != SM90_HEAD_DIM or head_dim_v != SM90_HEAD_DIM_V:
        return (f"is built for d = {SM90_HEAD_DIM}, dv = {SM90_HEAD_DIM_V} (DeepSeek-V3), "
                f"got d = {q.shape[-1]}, dv = {head_dim_v}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"takes bfloat16 or float16 queries, got {q.dtype}"
    h_kv = k_cache.shape[2]
    if (h_kv > 65535 or -(-q.shape[1] * (q.shape[2] // h_kv) // SM90_TILE_ROWS) > 65535
            or q.shape[1] * q.shape[2] > 65535 * SM90_COMBINE_ROWS_PER_CTA):  # the decode's and the combine's grid.y
        return (f"supports at most 65535 kv heads and row tiles, and {65535 * SM90_COMBINE_ROWS_PER_CTA} "
                f"s_q x h_q rows, got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    element = k_cache.element_size()
    if k_cache.data_ptr() % 16 or any(k_cache.stride(i) * element % 16 for i in range(3) if k_cache.shape[i] > 1):
        return f"needs 16-byte aligned cache rows, got strides {k_cache.stride()} of {k_cache.dtype}"
    return None


def _new_outputs(q, head_dim_v):
    b, s_q, h_q, _ = q.shape
    return (q.new_empty(b, s_q, h_q, head_dim_v),
            q.new_empty(b, h_q, s_q, dtype=torch.float32))


@torch.library.register_kernel("dskernels::flash_mla_with_kvcache", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("flash_mla_with_kvcache")
def _flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                            num_splits, softmax_scale=None, causal=False, k_scale=None):
    _check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                       num_splits, softmax_scale, causal, k_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if q.numel() == 0:  # b = 0 or h_q = 0: empty outputs (a GPU grid of no rows is not a launch)
        return _new_outputs(q, head_dim_v)
    unsupported = sm90_unsupported(q, k_cache, head_dim_v)
    if unsupported and q.device.type == "cuda" and current_backend() == "cuda":
        raise NotImplementedError(f"flash_mla_with_kvcache: the sm90 CUDA kernel {unsupported}; "
                                  "use the 'triton' or 'ref' backend")
    backend = select_backend("flash_mla_with_kvcache", q.device, has_cuda=unsupported is None, has_triton=True,
                             cuda_verified=_CUDA_MLA_VERIFIED)
    if backend == "cuda":
        if q.stride(3) != 1 or any(q.stride(i) % 8 for i in range(3)) or q.data_ptr() % 16:
            q = q.contiguous()  # the kernel reads 16-byte pieces of each q row
            if q.data_ptr() % 16:  # a contiguous view at a misaligned offset stays itself
                q = q.clone()
        block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        out, lse = _new_outputs(q, head_dim_v)
        torch.ops.dskernels._sm90_flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens.contiguous(), tile_scheduler_metadata.contiguous(),
            num_splits.contiguous(), scale, causal, k_scale, out, lse)
        return out, lse
    if q.device.type == "cpu" and (backend == "ref" or os.environ.get("TRITON_INTERPRET") == "1"):
        # Reading the values is free here: bad lengths or pages raise, as on the reference, and so
        # does a plan made for other lengths. (Not on dskernels.testing.fake_gpu's CPU tensors, which
        # stand in for a GPU's: its plan was never computed, and a GPU call reads no values.)
        lengths = python_ref.mla.check_pages(k_cache, block_table, cache_seqlens)
        python_ref.mla.check_plan(tile_scheduler_metadata, num_splits, lengths)
    if backend == "ref":
        return python_ref.mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                     scale, causal, k_scale)
    from dskernels.triton import mla as triton_mla

    if q.stride(3) != 1:
        q = q.contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    out, lse = _new_outputs(q, head_dim_v)
    triton_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens.contiguous(), head_dim_v,
                                      tile_scheduler_metadata.contiguous(), num_splits.contiguous(), scale,
                                      causal, k_scale, out, lse)
    return out, lse


@torch.library.register_fake("dskernels::flash_mla_with_kvcache")
def _flash_mla_with_kvcache_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                 num_splits, softmax_scale=None, causal=False, k_scale=None):
    _check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                       num_splits, softmax_scale, causal, k_scale)
    return _new_outputs(q, head_dim_v)
