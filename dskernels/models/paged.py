"""Where the new tokens of a decode step go in a paged cache, and writing them there.

Token j of sequence b goes to slot cache_seqlens[b] + j of that sequence, i.e. row
page * page_size + slot % page_size of the cache with page = block_table[b, slot // page_size].
A slot that is negative, lies past the block table, or names a page outside the cache has no row:
on CPU that raises (`check_slots`: reading the values costs nothing there); on CUDA, where reading
them would synchronize with the host, such tokens are skipped (`cache_rows` gives -1, `write_rows`
leaves nothing behind for them), as the Triton write kernel and the attention kernels do.
"""

from __future__ import annotations

import torch


def check_tables(block_table, cache_seqlens, batch: int, device: torch.device) -> None:
    """block_table [batch, max_pages] and cache_seqlens [batch], int32 (or int64: as_int32), on the
    cache's device."""
    for name, t, ndim in (("block_table", block_table, 2), ("cache_seqlens", cache_seqlens, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected dtype int32 (or int64), got {t.dtype}")
        if t.dim() != ndim or t.shape[0] != batch:
            want = f"[{batch}, max_pages]" if ndim == 2 else f"[{batch}]"
            raise ValueError(f"{name}: expected shape {want} (batch {batch}), got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the cache's device), got {t.device}")


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """An int64 table or length tensor as the int32 the kernels take; values past int32's range
    become its ends (still no page of the cache, and a length past any block table), not wrapped."""
    if t.dtype == torch.int32:
        return t
    return t.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)


def check_slots(block_table: torch.Tensor, cache_seqlens: torch.Tensor, new_tokens: int, num_pages: int,
                page_size: int) -> None:
    """CPU tensors only (this reads their values): every sequence's lengths are >= 0, its new
    tokens fit the block table, and every page entry it uses names a page of the cache."""
    # (tolist and plain Python: no torch ops, so the step's kernel count is the GPU's)
    lens, table = cache_seqlens.tolist(), block_table.tolist()
    capacity = block_table.shape[1] * page_size
    for b, (length, pages) in enumerate(zip(lens, table)):
        if length < 0:
            raise ValueError(f"cache_seqlens: expected lengths >= 0, got {length} for sequence {b}")
        if length + new_tokens > capacity:
            raise ValueError(f"cache_seqlens: sequence {b} holds {length} tokens, so its {new_tokens} new ones need "
                             f"slots up to {length + new_tokens - 1}, past the block table's {capacity} "
                             f"({block_table.shape[1]} pages of {page_size})")
        used = -(-(length + new_tokens) // page_size)
        for j, page in enumerate(pages[:used]):
            if not 0 <= page < num_pages:
                raise ValueError(f"block_table: entry [{b}, {j}] = {page} is not a page of the cache "
                                 f"(0 .. {num_pages - 1}); sequence {b} uses its first {used} entries")


def cache_rows(block_table: torch.Tensor, cache_seqlens: torch.Tensor, new_tokens: int, num_pages: int,
               page_size: int) -> torch.Tensor:
    """int64 [B * S]: the cache row of each new token (sequence-major), -1 where it has none."""
    batch, max_pages = block_table.shape
    slots = cache_seqlens.long()[:, None] + torch.arange(new_tokens, device=block_table.device)
    if max_pages == 0:
        return torch.full((batch * new_tokens,), -1, dtype=torch.int64, device=block_table.device)
    entry = torch.div(slots, page_size, rounding_mode="floor")
    inside = (slots >= 0) & (entry < max_pages)
    pages = block_table.long().gather(1, torch.where(inside, entry, 0))
    ok = inside & (pages >= 0) & (pages < num_pages)
    return torch.where(ok, pages * page_size + slots % page_size, -1).reshape(-1)


def write_rows(rows: torch.Tensor, index, values: torch.Tensor) -> None:
    """rows[index] = values, in place and without a host sync, skipping the entries whose (first)
    index is negative. index: an int64 tensor [N], or a tuple of them (rows[i0, i1] = ...); values
    [N, ...] of rows' dtype."""
    index = index if isinstance(index, tuple) else (index,)
    if values.shape[0] == 0 or rows.shape[0] == 0:  # (no rows: every entry is skipped)
        return
    if not torch.compiler.is_compiling() and rows.is_inference() and not torch.is_inference_mode_enabled():
        # A cache a server allocated under torch.inference_mode, written by a step under no_grad
        # (docs/models.md, "Serving"): torch allows the in-place write only in inference mode (the
        # Triton write kernels store through pointers and never asked)
        with torch.inference_mode():
            return write_rows(rows, index, values)
    keep = index[0] >= 0
    # index_put_ cannot skip an entry, so a skipped one repeats the first kept entry's write (the
    # same row, the same values: duplicates that agree), or, with none kept, rewrites row 0 as it is.
    # ([1]-shaped picks, not 0-d indices: torch.compile would read those on the host)
    first, any_kept = keep.int().argmax().view(1), keep.any()
    target = tuple(torch.where(any_kept, i.index_select(0, first), 0) for i in index)
    fill = torch.where(any_kept, values.index_select(0, first), rows[target])
    safe = tuple(torch.where(keep, i, t) for i, t in zip(index, target))
    rows.index_put_(safe, torch.where(keep.view(-1, *[1] * (values.dim() - 1)), values, fill))
