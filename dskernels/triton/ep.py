"""Triton kernels of the expert-parallel family: the dispatch layout, the row movers the Buffer
packs and unpacks its all-to-all payloads with, the low-latency sender's block fill (FP8 cast
fused in) and the receiver's slot placement (python_ref.ep defines them all)."""

import torch
import triton
import triton.language as tl

from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import cast_groups, native_fp8_cast, round_to_bf16
from dskernels.triton.launch import fast


@triton.jit
def _layout_kernel(topk_ptr, per_rank_ptr, per_expert_ptr, in_rank_ptr, num_tokens, num_topk,
                   num_experts, num_ranks, experts_per_rank, stride_t,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # One program: BLOCK_T tokens. Counts are integer atomics, so the result is deterministic.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    token_ok = tokens < num_tokens
    in_block = token_ok[:, None] & (ks[None, :] < num_topk)
    expert = tl.load(topk_ptr + tokens[:, None].to(tl.int64) * stride_t + ks[None, :], mask=in_block, other=-1)
    valid = in_block & (expert >= 0) & (expert < num_experts)
    # Every (token, k) entry counts (a token naming an expert twice: twice), as DeepEP counts
    tl.atomic_add(per_expert_ptr + tl.where(valid, expert, 0), tl.full(expert.shape, 1, tl.int32), mask=valid)
    owner = tl.where(valid, expert // experts_per_rank, -1)
    hit = tl.max((owner[:, :, None] == ranks[None, None, :]).to(tl.int32), axis=1)  # [BLOCK_T, BLOCK_R]
    rank_ok = ranks < num_ranks
    tl.store(in_rank_ptr + tokens[:, None].to(tl.int64) * num_ranks + ranks[None, :], hit.to(tl.int8),
             mask=token_ok[:, None] & rank_ok[None, :])
    tl.atomic_add(per_rank_ptr + ranks, tl.sum(hit, axis=0), mask=rank_ok)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, per_rank: torch.Tensor,
                        per_expert: torch.Tensor, in_rank: torch.Tensor) -> None:
    """Fills per_rank int32 [R] and per_expert int32 [E] (both zeroed here) and in_rank bool [T, R]."""
    num_tokens, num_topk = topk_idx.shape
    per_rank.zero_()
    per_expert.zero_()
    if num_tokens == 0:
        return
    block_k = next_power_of_2(max(num_topk, 1))
    block_r = next_power_of_2(num_ranks)
    block_t = max(1, min(64, 8192 // (block_k * block_r)))
    grid = (cdiv(num_tokens, block_t),)
    fast(_layout_kernel)[grid](topk_idx, per_rank, per_expert, in_rank.view(torch.int8), num_tokens, num_topk,
                               num_experts, num_ranks, num_experts // num_ranks, topk_idx.stride(0),
                               BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)


def _vec(element_size: int, *tensors_and_strides) -> int:
    """Elements per 16 bytes when every base address and row stride allows 16-byte accesses, else 1.
    Passed as a tl.multiple_of hint: Triton only infers divisibility by 16 elements for int
    arguments, and packed rows (e.g. 7392 bytes) are 16-byte but not 64-byte multiples."""
    vec = max(1, 16 // element_size)
    for item in tensors_and_strides:
        value = item.data_ptr() if isinstance(item, torch.Tensor) else item * element_size
        if value % 16:
            return 1
    return vec


@triton.jit
def _copy_rows_kernel(src_ptr, src_idx_ptr, dst_ptr, dst_idx_ptr, stride_src, stride_dst, NUM_COLS: tl.constexpr,
                      HAS_SRC_IDX: tl.constexpr, HAS_DST_IDX: tl.constexpr, VEC: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    # One program: one row x BLOCK_C words; the whole payload of a token moves in one pass.
    row = tl.program_id(0)
    src_row = tl.load(src_idx_ptr + row).to(tl.int64) if HAS_SRC_IDX else row.to(tl.int64)
    dst_row = tl.load(dst_idx_ptr + row).to(tl.int64) if HAS_DST_IDX else row.to(tl.int64)
    src_start = tl.multiple_of(tl.maximum(src_row, 0) * stride_src, VEC)
    dst_start = tl.multiple_of(tl.maximum(dst_row, 0) * stride_dst, VEC)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # A negative index skips the row: fixed-size grids (no host sync) with unused entries.
    ok = (cols < NUM_COLS) & (src_row >= 0) & (dst_row >= 0)
    values = tl.load(src_ptr + src_start + cols, mask=ok)
    tl.store(dst_ptr + dst_start + cols, values, mask=ok)


def copy_rows(src: torch.Tensor, src_idx: torch.Tensor | None, dst: torch.Tensor, dst_idx: torch.Tensor | None,
              num_rows: int) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for i < num_rows, skipping i where an index is negative; 2-D
    tensors of one dtype, unit last stride."""
    num_cols = src.shape[1]
    if num_rows == 0 or num_cols == 0:
        return
    assert src.stride(1) == 1 and dst.stride(1) == 1 and src.dtype == dst.dtype
    block_c = min(next_power_of_2(num_cols), 4096 // src.element_size())
    grid = (num_rows, cdiv(num_cols, block_c))
    vec = _vec(src.element_size(), src, dst, src.stride(0), dst.stride(0))
    fast(_copy_rows_kernel)[grid](src, src if src_idx is None else src_idx, dst, dst if dst_idx is None else dst_idx,
                                  src.stride(0), dst.stride(0), NUM_COLS=num_cols, HAS_SRC_IDX=src_idx is not None,
                                  HAS_DST_IDX=dst_idx is not None, VEC=vec, BLOCK_C=block_c, num_warps=4)


@triton.jit
def _pack_segment(src_ptr, stride_src, src_row, dst_ptr, dst_start, WIDTH: tl.constexpr, OFFSET: tl.constexpr,
                  VEC: tl.constexpr, BLOCK_C: tl.constexpr):
    start = tl.multiple_of(src_row * stride_src, VEC)
    for c in tl.static_range(0, WIDTH, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        ok = cols < WIDTH
        tl.store(dst_ptr + dst_start + OFFSET + cols, tl.load(src_ptr + start + cols, mask=ok), mask=ok)


@triton.jit
def _pack_rows_kernel(dst_ptr, stride_dst, src_idx_ptr,
                      src0, stride0, src1, stride1, src2, stride2, src3, stride3,
                      W0: tl.constexpr, O0: tl.constexpr, W1: tl.constexpr, O1: tl.constexpr,
                      W2: tl.constexpr, O2: tl.constexpr, W3: tl.constexpr, O3: tl.constexpr,
                      B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                      HAS_SRC_IDX: tl.constexpr, VEC: tl.constexpr):
    # One program: one packed row = every payload of one (token, destination) pair, one launch.
    row = tl.program_id(0)
    src_row = tl.load(src_idx_ptr + row).to(tl.int64) if HAS_SRC_IDX else row.to(tl.int64)
    dst_start = tl.multiple_of(row.to(tl.int64) * stride_dst, VEC)
    if W0 > 0:
        _pack_segment(src0, stride0, src_row, dst_ptr, dst_start, W0, O0, VEC, B0)
    if W1 > 0:
        _pack_segment(src1, stride1, src_row, dst_ptr, dst_start, W1, O1, VEC, B1)
    if W2 > 0:
        _pack_segment(src2, stride2, src_row, dst_ptr, dst_start, W2, O2, VEC, B2)
    if W3 > 0:
        _pack_segment(src3, stride3, src_row, dst_ptr, dst_start, W3, O3, VEC, B3)


def pack_rows(segments: list[torch.Tensor], offsets: list[int], src_idx: torch.Tensor | None, dst: torch.Tensor,
              num_rows: int) -> None:
    """dst[i, offsets[j] : offsets[j] + w_j] = segments[j][src_idx[i]] (python_ref.ep.pack_rows), up to 4
    segments of dst's dtype, in one launch."""
    assert 1 <= len(segments) <= 4 and dst.stride(1) == 1
    if num_rows == 0:
        return
    args, widths, vec_items = [], [], [dst, dst.stride(0)]
    for seg, off in zip(segments, offsets):
        assert seg.dtype == dst.dtype and seg.stride(1) == 1
        args += [seg, seg.stride(0)]
        widths += [seg.shape[1], off]
        vec_items += [seg, seg.stride(0), off]
    for _ in range(4 - len(segments)):
        args += [dst, 0]
        widths += [0, 0]
    vec = _vec(dst.element_size(), *vec_items)
    W0, O0, W1, O1, W2, O2, W3, O3 = widths
    # Per-segment block: a 4 KB chunk of the hidden row per step, small fields without idle lanes.
    B0, B1, B2, B3 = (min(next_power_of_2(max(w, 1)), 4096 // dst.element_size()) for w in widths[0::2])
    fast(_pack_rows_kernel)[(num_rows,)](dst, dst.stride(0), dst if src_idx is None else src_idx, *args,
                                         W0=W0, O0=O0, W1=W1, O1=O1, W2=W2, O2=O2, W3=W3, O3=O3,
                                         B0=B0, B1=B1, B2=B2, B3=B3, HAS_SRC_IDX=src_idx is not None, VEC=vec,
                                         num_warps=4)


@triton.jit
def _gather_reduce_kernel(y_ptr, index_ptr, weights_ptr, out_ptr, num_j, num_cols, stride_y, stride_index,
                          stride_weights, stride_out, HAS_WEIGHTS: tl.constexpr, OUT_BF16: tl.constexpr,
                          ACC: tl.constexpr, VEC_Y: tl.constexpr, VEC_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: one output row x BLOCK_C columns; j in order, fp32 sum (fp64 for fp64 rows), as
    # python_ref.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for j in range(num_j):
        src = tl.load(index_ptr + row * stride_index + j).to(tl.int64)
        start = tl.multiple_of(tl.maximum(src, 0) * stride_y, VEC_Y)
        values = tl.load(y_ptr + start + cols, mask=ok & (src >= 0), other=0.0)
        values = values.to(ACC)
        if HAS_WEIGHTS:
            # A skipped entry's weight is not read: a router may leave NaN or inf there (0 * inf is NaN).
            values = values * tl.load(weights_ptr + row * stride_weights + j, mask=src >= 0, other=0.0).to(ACC)
        acc += values
    if OUT_BF16:
        out = round_to_bf16(acc).to(tl.bfloat16)  # by hand: the interpreter truncates in .to(bf16)
    else:
        out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tl.multiple_of(row * stride_out, VEC_OUT) + cols, out, mask=ok)


def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[t] = sum_j weights[t, j] * y[index[t, j]], index -1 skipped (python_ref.ep.gather_reduce)."""
    num_rows, num_cols = out.shape
    if num_rows == 0 or num_cols == 0:
        return
    if y.stride(1) != 1 and num_cols > 1:  # (a caller's rows of other strides: the kernel reads unit stride)
        y = y.contiguous()
    assert out.stride(1) == 1 or num_cols == 1, "gather_reduce: out must have unit stride in its rows"
    block_c = min(next_power_of_2(num_cols), 1024)
    grid = (num_rows, cdiv(num_cols, block_c))
    # y and out may differ in dtype (the low-latency combine reduces bf16 rows into fp32 partials).
    fast(_gather_reduce_kernel)[grid](y, index, y if weights is None else weights, out, index.shape[1], num_cols,
                                      y.stride(0), index.stride(0), 0 if weights is None else weights.stride(0),
                                      out.stride(0), HAS_WEIGHTS=weights is not None,
                                      OUT_BF16=out.dtype == torch.bfloat16,
                                      ACC=tl.float64 if torch.float64 in (y.dtype, out.dtype) else tl.float32,
                                      VEC_Y=_vec(y.element_size(), y, y.stride(0)),
                                      VEC_OUT=_vec(out.element_size(), out, out.stride(0)), BLOCK_C=block_c,
                                      num_warps=4)


@triton.jit
def _low_latency_slots_kernel(ids_ptr, stride_row, write_ptr, return_ptr, count_ptr, num_rows, num_topk, base,
                              num_local, cap, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program: one local expert, scanning all rows in order with a running count (a row's
    # position within the expert), so no cross-program scan is needed. Program 0 also writes -1
    # for the entries that name no local expert; every entry is written by exactly one program.
    expert = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    carry = tl.full([], 0, tl.int32)
    for start in range(0, num_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows < num_rows)[:, None] & (ks < num_topk)[None, :]
        ids = tl.load(ids_ptr + rows[:, None].to(tl.int64) * stride_row + ks[None, :], mask=ok, other=-1)
        here = ok & (ids >= base) & (ids < base + num_local)
        mine = here & (ids - base == expert)
        hit = tl.max(mine.to(tl.int32), axis=1)
        position = carry + tl.cumsum(hit, axis=0) - 1
        slot = (expert.to(tl.int64) * cap + position.to(tl.int64))[:, None] + tl.zeros([BLOCK_R, BLOCK_K], tl.int64)
        first_k = tl.min(tl.where(mine, ks[None, :], BLOCK_K), axis=1)
        write = tl.where(ks[None, :] == first_k[:, None], slot, -1)
        offsets = rows[:, None].to(tl.int64) * num_topk + ks[None, :]
        tl.store(return_ptr + offsets, slot, mask=mine)
        tl.store(write_ptr + offsets, write, mask=mine)
        none = ok & (here == 0) & (expert == 0)
        minus = tl.full([BLOCK_R, BLOCK_K], -1, tl.int64)
        tl.store(return_ptr + offsets, minus, mask=none)
        tl.store(write_ptr + offsets, minus, mask=none)
        carry += tl.sum(hit, axis=0)
    tl.store(count_ptr + expert, carry)


def low_latency_slots(ids: torch.Tensor, base: int, num_local: int, cap: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """python_ref.ep.low_latency_slots in one launch (ids int64 [N, K], unit last stride)."""
    num_rows, num_topk = ids.shape
    write_slot = torch.empty(num_rows * num_topk, dtype=torch.int64, device=ids.device)
    return_slot = torch.empty_like(write_slot)
    recv_count = torch.empty(num_local, dtype=torch.int32, device=ids.device)
    if num_rows == 0 or num_topk == 0:
        return write_slot, return_slot, recv_count.zero_()
    assert ids.stride(1) == 1
    block_k = next_power_of_2(num_topk)
    block_r = max(1, min(256, 4096 // block_k))
    fast(_low_latency_slots_kernel)[(num_local,)](ids, ids.stride(0), write_slot, return_slot, recv_count, num_rows,
                                                  num_topk, base, num_local, cap, BLOCK_R=block_r, BLOCK_K=block_k,
                                                  num_warps=4)
    return write_slot, return_slot, recv_count


@triton.jit
def _low_latency_send_kernel(x_ptr, stride_x, topk_ptr, stride_topk, send_u8, send_f32, send_i64, num_tokens,
                             num_topk, num_ranks, experts_per_rank, num_experts, block_rows, row_bytes,
                             X_OFF: tl.constexpr, SCALE_OFF: tl.constexpr, IDS_OFF: tl.constexpr,
                             X_WIDTH: tl.constexpr, USE_FP8: tl.constexpr, ROUND_SCALE: tl.constexpr,
                             GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                             NATIVE: tl.constexpr):
    # One program: row t of every block, one chunk of the payload (GROUPS x 128 elements cast to
    # fp8, or BLOCK_C bytes of x). x is read once and cast once; the result is stored only into
    # the blocks of ranks holding one of t's experts (the others never read it). The chunk-0
    # program writes t's ids (-1 past the tokens) into every block.
    t = tl.program_id(0)
    chunk = tl.program_id(1)
    is_token = t < num_tokens
    ks = tl.arange(0, BLOCK_K)
    ids = tl.load(topk_ptr + t.to(tl.int64) * stride_topk + ks, mask=is_token & (ks < num_topk), other=-1)
    owner = tl.where((ids >= 0) & (ids < num_experts), ids // experts_per_rank, -1)
    x_row = x_ptr + t.to(tl.int64) * stride_x
    if USE_FP8:
        groups = chunk * GROUPS + tl.arange(0, GROUPS)
        cols = groups[:, None] * 128 + tl.arange(0, 128)[None, :]
        ok = (groups < X_WIDTH // 128)[:, None] & is_token
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        payload, scale = cast_groups(x, ROUND_SCALE, NATIVE)  # per_token_cast_to_fp8's math, bit for bit
    else:
        cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (cols < X_WIDTH) & is_token
        payload = tl.load(x_row + cols, mask=ok)
    for r in range(num_ranks):
        row = (r * block_rows + t).to(tl.int64) * row_bytes  # byte offset of the row in `send`
        tl.store(send_i64 + row // 8 + IDS_OFF // 8 + ks, ids, mask=(ks < num_topk) & (chunk == 0))
        to_rank = tl.max((owner == r).to(tl.int32), axis=0) > 0
        tl.store(send_u8 + row + X_OFF + cols, payload, mask=ok & to_rank)
        if USE_FP8:
            tl.store(send_f32 + row // 4 + SCALE_OFF // 4 + groups, scale,
                     mask=(groups < X_WIDTH // 128) & is_token & to_rank)


def low_latency_send(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, use_fp8: bool, send: torch.Tensor,
                     offsets: list[int], round_scale: bool = False) -> None:
    """python_ref.ep.low_latency_send in one launch: x [T, H] (unit last stride), topk_idx int64 [T, K]
    (unit last stride), send uint8 [R, M, row_bytes] contiguous, byte offsets 16-aligned."""
    num_ranks, block_rows, row_bytes = send.shape
    num_tokens, num_topk = topk_idx.shape
    assert x.stride(1) == 1 and topk_idx.stride(1) == 1 and send.is_contiguous() and row_bytes % 16 == 0
    if use_fp8:
        x_arg, width = x, x.shape[1]
        groups = min(next_power_of_2(max(width // 128, 1)), 8)  # 1024 elements a program
        chunks, block_c = cdiv(width // 128, groups), 1
    else:  # the payload is x's bytes
        x_arg, width = x.view(torch.uint8), x.shape[1] * x.element_size()
        block_c = min(next_power_of_2(max(width, 1)), 4096)
        chunks, groups = cdiv(width, block_c), 1
    scale_off = offsets[1] if use_fp8 else 0
    if num_tokens == 0:  # only the ids (all -1) are written: valid pointers stand in for x and topk_idx
        x_arg, topk_idx = send, send.view(torch.int64)
    fast(_low_latency_send_kernel)[(block_rows, max(chunks, 1))](
        x_arg, x_arg.stride(0), topk_idx, topk_idx.stride(0), send, send.view(torch.float32),
        send.view(torch.int64), num_tokens, num_topk, num_ranks, num_experts // num_ranks, num_experts, block_rows,
        row_bytes, X_OFF=offsets[0], SCALE_OFF=scale_off, IDS_OFF=offsets[-1], X_WIDTH=width, USE_FP8=use_fp8,
        ROUND_SCALE=round_scale and use_fp8, GROUPS=groups, BLOCK_C=block_c,
        BLOCK_K=next_power_of_2(max(num_topk, 1)), NATIVE=use_fp8 and native_fp8_cast(send.device), num_warps=4)
