"""Triton MLA decode: split-KV flash-decoding over a paged cache, then a combine pass.

Work split (see dskernels/ops/mla.py `split_plan` and docs/mla.md): the metadata cuts the
concatenated key blocks of all sequences into `num_parts` equal slices. Program (part, kv head,
m-tile) walks its slice: for every sequence in it, one online-softmax pass over the keys of the
slice. A sequence that lies in one slice only (num_splits[i + 1] - num_splits[i] == 1) is written
straight to `out`/`lse`; the other ones leave a normalized partial output and its log2-LSE per
split, which `_mla_combine_kernel` merges.

Tile: the rows of one program are (query token, query head) pairs of one kv head, s_q * h_q / h_kv
of them (V3: h_kv = 1, so every head and MTP token shares each key load). The head dimension is
split in the V part [0, dv) (padded to a power of two; the same registers serve as V for P @ V, so
the latent is read once) and the rest [dv, d) (the rope part for V3).

FP8 e4m3 caches: keys are loaded as fp8 and widened to fp16 (exact: e4m3 is a subset of fp16), in
one instruction per two values (cvt.rn.f16x2.e4m3x2; to bf16 it takes three). Both dots then take
fp16 operands: a bf16 q is brought into fp16's range row by row by a power of two (`fp16_rows`;
exact except in rows spanning over ~2**20, see there) whose inverse scales the scores, and P @ V reads P in fp16 (finer than bf16 on [0, 1]). The
per-tensor scale multiplies the scores and the output instead of every key element. On GPUs whose
Triton has no fp8 type (before sm_89) the keys are read as bytes and widened by e4m3_bits_to_fp16
(FP8_BYTES).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import as_element_type, e4m3_bits_to_fp16, native_fp8
from dskernels.triton.launch import fast

LOG2E = 1.4426950408889634
# Block-table entries checked per step before a sequence's key loop (with 16, 64 or 128, ptxas
# spilled 64-148 bytes more in the 32-row d = 576 tiles on sm_90a; 32 leaves them as they were).
PAGE_SCAN = tl.constexpr(32)
# Lanes of the batch-invariant plan kernel: sequences per prefix-sum step, partitions per row step
# (b = 128 at K = 4 in one step; more loop in the one program, as the balanced plan's chunks do).
INVARIANT_PLAN_BLOCK = 512


@triton.jit
def load_key_rows(k_rows, key_ok, dv_offs, dv_ok, dr_offs, dr_ok, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr):
    """The V part [N, BLOCK_DV] (with its load mask) and the rest [N, BLOCK_DR] of the key rows at
    k_rows (pointers to row starts); rows with key_ok False read as 0. Head-dim masks only where
    the dims are padded: a mask that varies along the row blocks 16-byte vector loads (ptxas then
    spilled 400+ bytes at d=576, sm_90a)."""
    v_mask = key_ok[:, None]
    if BLOCK_DV != HEAD_DIM_V:
        v_mask = v_mask & dv_ok[None, :]
    r_mask = key_ok[:, None]
    if BLOCK_DR != HEAD_DIM - HEAD_DIM_V:
        r_mask = r_mask & dr_ok[None, :]
    k_v = tl.load(k_rows[:, None] + dv_offs[None, :], mask=v_mask, other=0.0)
    k_r = tl.load(k_rows[:, None] + dr_offs[None, :], mask=r_mask, other=0.0)
    return k_v, v_mask, k_r


@triton.jit
def latent_scores(q_v, q_r, k_v, k_r, FP32_DOT: tl.constexpr):
    """q . k over both parts of the head dimension (the V part, then the rest): [M, N] fp32."""
    if FP32_DOT:
        s = tl.dot(q_v, tl.trans(k_v), input_precision="ieee")
        s += tl.dot(q_r, tl.trans(k_r), input_precision="ieee")
    else:
        s = tl.dot(q_v, tl.trans(k_v))
        s += tl.dot(q_r, tl.trans(k_r))
    return s


@triton.jit
def fp16_rows(q_v, q_r):
    """q's two parts as fp16 dot operands, and per row the factor that undoes their scaling.

    An fp16 q is returned as it is (factor 1). A bf16 row is multiplied by the power of two that
    brings its largest |value| into [2**14, 2**15), below fp16's largest (65504): exact for every
    value down to 2**-28 of that largest (fp16's normal range); smaller ones keep fewer bits and
    those below ~2**-38 of it become 0. That is below the rounding of any score the largest value
    takes part in, but a score it does not take part in (its key's channel an exact 0) is then made
    of the lost values alone: a row spanning more than ~2**20 in magnitude can change such scores
    (a review's repro: 2**30 moved lse by 1e-3, 2**45 flattened it). Real query rows span far less;
    a bf16 cache keeps bf16 dots. The exponent comes from the fp32 bits of the row's largest
    |value|: clamped so that a zero row keeps a finite factor and an inf row a nonzero one.
    """
    if q_v.dtype == tl.float16:
        return q_v, q_r, tl.full([q_v.shape[0]], 1.0, dtype=tl.float32)
    q_v = q_v.to(tl.float32)
    q_r = q_r.to(tl.float32)
    largest = tl.maximum(tl.max(tl.abs(q_v), axis=1), tl.max(tl.abs(q_r), axis=1))
    biased = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF  # fp32's biased exponent E
    biased = tl.minimum(tl.maximum(biased, 15), 254)
    up = ((268 - biased) << 23).to(tl.float32, bitcast=True)  # 2**(14 - (E - 127))
    down = ((biased - 14) << 23).to(tl.float32, bitcast=True)  # its inverse, 2**(E - 141)
    return (q_v * up[:, None]).to(tl.float16), (q_r * up[:, None]).to(tl.float16), down


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, v, FP32_DOT: tl.constexpr):
    """Folds one block of log2-scaled scores s [M, N] (-inf: masked) and its values v [N, DV] into
    the running max m_i, sum l_i and unnormalized output acc; a row with nothing seen keeps
    m_i = -inf, l_i = 0, acc = 0. Returns (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _mla_decode_splitkv_kernel(
        q_ptr, k_ptr, block_table_ptr, seqlens_ptr, meta_ptr, num_splits_ptr, k_scale_ptr,
        out_ptr, lse_ptr, out_acc_ptr, lse_acc_ptr,
        qk_scale_log2, batch, s_q, heads_per_kv, page_size, max_pages, table_keys, num_pages, max_slots,
        stride_qb, stride_qs, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_bt,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh,
        stride_acc_split, stride_acc_row,
        stride_lacc_split,
        CAUSAL: tl.constexpr, IS_FP8: tl.constexpr, FP8_BYTES: tl.constexpr, FP32_DOT: tl.constexpr,
        SAME_PAGE: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr):
    part = tl.program_id(0)
    kv_head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < s_q * heads_per_kv
    token = rows // heads_per_kv                      # query token j of each row
    head = kv_head * heads_per_kv + rows % heads_per_kv
    dv_offs = tl.arange(0, BLOCK_DV)
    dv_ok = dv_offs < HEAD_DIM_V
    dr_offs = HEAD_DIM_V + tl.arange(0, BLOCK_DR)
    dr_ok = dr_offs < HEAD_DIM

    meta = meta_ptr + part * 8
    begin_idx = tl.load(meta + 0)
    begin_tok = tl.load(meta + 1)
    end_idx = tl.load(meta + 2)
    end_tok = tl.load(meta + 3)
    begin_split = tl.load(meta + 4)

    k_scale = 1.0
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
    scale = qk_scale_log2 * k_scale

    # Clamped so that metadata from other lengths (a caller's bug) gives wrong numbers, never a
    # read or write out of bounds.
    for i in range(tl.maximum(begin_idx, 0), tl.minimum(end_idx, batch - 1) + 1):
        seqlen = tl.load(seqlens_ptr + i)
        # q's and out's batch offsets in int64: they pass 2**31 elements at ~29K rows x 128 heads
        # (the block table's stay int32, checked by the launcher)
        i64 = tl.cast(i, tl.int64)
        lo = tl.maximum(tl.where(i == begin_idx, begin_tok, 0), 0)
        hi = tl.minimum(tl.where(i == end_idx, end_tok, seqlen), seqlen)
        split = tl.where(i == begin_idx, begin_split, 0)
        split_base = tl.load(num_splits_ptr + i)
        n_split = tl.load(num_splits_ptr + i + 1) - split_base
        if lo < hi:
            # Keys past the block table are dropped: a garbage length costs no loop past it (the
            # split is still written, empty where nothing is left). table_keys: max_pages *
            # page_size capped at 2**31 - 1 by the launcher (the int32 product would wrap).
            hi = tl.minimum(hi, table_keys)
            # Keys from the first page id outside the cache on (a bad table or length) are dropped,
            # found before the key loop: a load mask on the loaded ids made Triton pipeline the key
            # loads into 4 buffers, past an sm_89's shared memory.
            for first in range(lo // page_size, (hi - 1) // page_size + 1, PAGE_SCAN):
                idx = first + tl.arange(0, PAGE_SCAN)
                in_range = (idx <= (hi - 1) // page_size) & (idx < max_pages)
                ids = tl.load(block_table_ptr + i * stride_bt + idx, mask=in_range, other=0)
                bad = in_range & ((ids < 0) | (ids >= num_pages))
                first_bad = tl.min(tl.where(bad, idx, max_pages))
                # (first_bad * page_size <= hi - 1 where there is one: no int32 wrap)
                hi = tl.where(first_bad < max_pages, tl.minimum(hi, first_bad * page_size), hi)
            q_rows = q_ptr + i64 * stride_qb + token * stride_qs + head * stride_qh
            q_v = tl.load(q_rows[:, None] + dv_offs[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            q_r = tl.load(q_rows[:, None] + dr_offs[None, :], mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
            if FP32_DOT:
                q_v = q_v.to(tl.float32)
                q_r = q_r.to(tl.float32)
            elif IS_FP8:  # fp16 dots (the module's docstring); row_scale: the scores' factor per row
                q_v, q_r, row_scale = fp16_rows(q_v, q_r)
                row_scale = row_scale * scale
            if CAUSAL:
                limit = seqlen - s_q + token + 1
            else:
                limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            for start in range(lo, hi, BLOCK_N):
                keys = start + tl.arange(0, BLOCK_N)
                page_idx = keys // page_size
                key_ok = (keys < hi) & (page_idx < max_pages)  # never read past the block table
                if SAME_PAGE:
                    # start is a multiple of BLOCK_N, which divides page_size: one page per tile,
                    # one block-table load, and rows at a constant stride.
                    first_page = start // page_size
                    page = tl.load(block_table_ptr + i * stride_bt + first_page, mask=first_page < max_pages,
                                   other=0)
                    k_rows = (k_ptr + page.to(tl.int64) * stride_kp + kv_head * stride_kh
                              + (keys - first_page * page_size) * stride_kt)
                else:
                    page = tl.load(block_table_ptr + i * stride_bt + page_idx, mask=key_ok, other=0)
                    k_rows = (k_ptr + page.to(tl.int64) * stride_kp + (keys % page_size) * stride_kt
                              + kv_head * stride_kh)
                k_v, v_mask, k_r = load_key_rows(k_rows, key_ok, dv_offs, dv_ok, dr_offs, dr_ok, HEAD_DIM,
                                                 HEAD_DIM_V, BLOCK_DV, BLOCK_DR)
                # k_pv: the V part as the operand of P @ V.
                if FP8_BYTES:
                    k_v = e4m3_bits_to_fp16(k_v).to(q_v.dtype)
                    k_r = e4m3_bits_to_fp16(k_r).to(q_v.dtype)
                    k_pv = k_v
                elif IS_FP8 and not FP32_DOT:
                    # One fp8 tile in shared memory cannot feed both dots (P @ V reads it transposed,
                    # and ldmatrix has no transposed 8-bit form), so Triton would load it without
                    # cp.async pipelining; a second load for P @ V (an L2 hit: the first brought it
                    # in) keeps both pipelined for 512 more L2 bytes per key (PTX, sm_90a, triton 3.8).
                    k_pv = tl.load(k_rows[:, None] + dv_offs[None, :], mask=v_mask, other=0.0,
                                   eviction_policy="evict_first").to(tl.float16)
                    k_v = k_v.to(tl.float16)
                    k_r = k_r.to(tl.float16)
                elif IS_FP8 or FP32_DOT:
                    k_v = k_v.to(tl.float32).to(q_v.dtype)
                    k_r = k_r.to(tl.float32).to(q_v.dtype)
                    k_pv = k_v
                else:
                    k_pv = k_v
                s = latent_scores(q_v, q_r, k_v, k_r, FP32_DOT)
                if IS_FP8 and not FP32_DOT:
                    s = s * row_scale[:, None]
                else:
                    s = s * scale
                visible = key_ok[None, :] & (keys[None, :] < limit[:, None])
                s = tl.where(visible, s, float("-inf"))
                m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, k_pv, FP32_DOT)
            seen = l_i != 0.0  # NaN (a NaN score) stays NaN, not "no key seen"
            o = tl.where(seen[:, None], acc * k_scale / tl.where(seen, l_i, 1.0)[:, None], 0.0)
            lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            if n_split == 1:
                o_ptrs = out_ptr + i64 * stride_ob + token * stride_os + head * stride_oh
                tl.store(o_ptrs[:, None] + dv_offs[None, :], as_element_type(o, out_ptr),
                         mask=row_ok[:, None] & dv_ok[None, :])
                lse = tl.where(seen, lse2 * 0.6931471805599453, float("inf"))
                tl.store(lse_ptr + i64 * stride_lb + head * stride_lh + token, lse, mask=row_ok)
            else:
                flat = head * s_q + token
                slot = (split_base + split).to(tl.int64)
                slot_ok = (slot >= 0) & (slot < max_slots)
                tl.store(out_acc_ptr + slot * stride_acc_split + flat[:, None] * stride_acc_row + dv_offs[None, :],
                         o, mask=row_ok[:, None] & dv_ok[None, :] & slot_ok)
                tl.store(lse_acc_ptr + slot * stride_lacc_split + flat, lse2, mask=row_ok & slot_ok)


@triton.jit
def _mla_combine_kernel(out_ptr, lse_ptr, out_acc_ptr, lse_acc_ptr, num_splits_ptr,
                        s_q, h_q, dv, max_slots,
                        stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                        stride_acc_split, stride_acc_row, stride_lacc_split,
                        BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    i = tl.program_id(0)
    flat = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = head * s_q + token
    row_ok = flat < h_q * s_q
    head = flat // s_q
    token = flat % s_q
    dv_offs = tl.arange(0, BLOCK_DV)
    dv_ok = dv_offs < dv
    split_start = tl.load(num_splits_ptr + i)
    split_end = tl.load(num_splits_ptr + i + 1)
    # Slots below 0 are never written (the decode kernel drops them), so never read.
    split_base = tl.maximum(split_start, 0)
    # n_read: the splits read back, cut to the slots allocated (none where the plan has one
    # partition: then no sequence splits, and the launcher allocates no slots)
    n_read = tl.minimum(split_end, max_slots) - split_base
    # One split: the decode kernel wrote out/lse itself. The same test as its (the raw difference,
    # python_ref's count): with a clamped start a caller's negative entry left rows to neither.
    if split_end - split_start != 1:
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for k in range(0, n_read):
            part_lse = tl.load(lse_acc_ptr + (split_base + k).to(tl.int64) * stride_lacc_split + flat,
                               mask=row_ok, other=float("-inf"))
            m = tl.maximum(m, part_lse)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
        for k in range(0, n_read):
            slot = (split_base + k).to(tl.int64)
            part_lse = tl.load(lse_acc_ptr + slot * stride_lacc_split + flat, mask=row_ok, other=float("-inf"))
            w = tl.math.exp2(part_lse - m_safe)
            part = tl.load(out_acc_ptr + slot * stride_acc_split + flat[:, None] * stride_acc_row + dv_offs[None, :],
                           mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            total += w
            acc += w[:, None] * part
        seen = total != 0.0  # NaN stays NaN, as in the decode kernel
        o = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
        lse = tl.where(seen, (m_safe + tl.math.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453,
                       float("inf"))
        o_ptrs = out_ptr + i.to(tl.int64) * stride_ob + token * stride_os + head * stride_oh
        tl.store(o_ptrs[:, None] + dv_offs[None, :], as_element_type(o, out_ptr),
                 mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(lse_ptr + i.to(tl.int64) * stride_lb + head * stride_lh + token, lse, mask=row_ok)


@triton.jit
def _count_at_most(sorted_ptr, x, valid, n, steps):
    """Per lane: how many of the n ascending values at sorted_ptr are <= x (searchsorted with
    right=True), by binary search; steps >= n.bit_length()."""
    lo = tl.zeros(x.shape, dtype=tl.int32)
    hi = tl.zeros(x.shape, dtype=tl.int32) + n
    for _ in range(steps):
        mid = (lo + hi) // 2
        on = valid & (lo < hi)
        right = on & (tl.load(sorted_ptr + mid, mask=on, other=0) <= x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(on & ~right, mid, hi)
    return lo


@triton.jit
def _key_blocks(seqlens_ptr, i, mask, BLOCK_TOKENS: tl.constexpr):
    """Key blocks of sequences i: ceil(max(length, 0) / BLOCK_TOKENS), int64 (0 where masked)."""
    return (tl.maximum(tl.load(seqlens_ptr + i, mask=mask, other=0), 0).to(tl.int64) + BLOCK_TOKENS - 1) // BLOCK_TOKENS


@triton.jit
def _mla_metadata_kernel(seqlens_ptr, ends_ptr, meta_ptr, num_splits_ptr, b, num_parts, search_steps,
                         BLOCK_TOKENS: tl.constexpr, OVERHEAD: tl.constexpr, META: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """ops.mla.split_plan in one program (its docstring has the plan): the sequences' cost line in
    chunks of BLOCK_B (a running prefix sum, kept in ends_ptr, int64 [b]), the splits per
    sequence, then one row per partition found by binary search over the ends."""
    offs = tl.arange(0, BLOCK_B)
    total = tl.zeros((), dtype=tl.int64)
    for chunk in range(0, b, BLOCK_B):
        i = chunk + offs
        ok = i < b
        blocks = _key_blocks(seqlens_ptr, i, ok, BLOCK_TOKENS)
        cost = tl.where(ok, blocks + OVERHEAD, 0)
        tl.store(ends_ptr + i, total + tl.cumsum(cost, 0), mask=ok)
        total += tl.sum(cost, 0)
    per_part = tl.maximum((total + num_parts - 1) // num_parts, 1)
    tl.debug_barrier()  # the ends stored above are read by other threads below
    tl.store(num_splits_ptr, 0)
    splits_before = tl.zeros((), dtype=tl.int64)
    for chunk in range(0, b, BLOCK_B):
        i = chunk + offs
        ok = i < b
        blocks = _key_blocks(seqlens_ptr, i, ok, BLOCK_TOKENS)
        key_start = tl.load(ends_ptr + i, mask=ok, other=0) - blocks
        splits = tl.where(ok & (blocks > 0), (key_start + blocks - 1) // per_part - key_start // per_part + 1, 0)
        tl.store(num_splits_ptr + 1 + i, (splits_before + tl.cumsum(splits, 0)).to(tl.int32), mask=ok)
        splits_before += tl.sum(splits, 0)
    parts = tl.arange(0, BLOCK_P)
    part_ok = parts < num_parts
    first = parts.to(tl.int64) * per_part
    last = tl.maximum(tl.minimum(first + per_part, total) - 1, 0)
    idle = first >= total
    begin_idx = tl.minimum(_count_at_most(ends_ptr, first, part_ok, b, search_steps), b - 1)
    end_idx = tl.minimum(_count_at_most(ends_ptr, last, part_ok, b, search_steps), b - 1)
    end_len = tl.maximum(tl.load(seqlens_ptr + end_idx, mask=part_ok, other=0), 0).to(tl.int64)
    begin_blocks = _key_blocks(seqlens_ptr, begin_idx, part_ok, BLOCK_TOKENS)
    end_blocks = _key_blocks(seqlens_ptr, end_idx, part_ok, BLOCK_TOKENS)
    begin_key = tl.load(ends_ptr + begin_idx, mask=part_ok, other=0) - begin_blocks
    end_key = tl.load(ends_ptr + end_idx, mask=part_ok, other=0) - end_blocks
    begin_block = tl.minimum(tl.maximum(first - begin_key, 0), begin_blocks)
    end_block = tl.minimum(tl.maximum(last + 1 - end_key, 0), end_blocks)
    begin_split = tl.maximum(parts - begin_key // per_part, 0)
    row = meta_ptr + parts * META
    tl.store(row, tl.where(idle, b, begin_idx), mask=part_ok)
    tl.store(row + 1, tl.where(idle, 0, begin_block * BLOCK_TOKENS).to(tl.int32), mask=part_ok)
    tl.store(row + 2, tl.where(idle, b - 1, end_idx), mask=part_ok)
    tl.store(row + 3, tl.where(idle, 0, tl.minimum(end_block * BLOCK_TOKENS, end_len)).to(tl.int32), mask=part_ok)
    tl.store(row + 4, tl.where(idle, 0, begin_split).to(tl.int32), mask=part_ok)
    for k in tl.static_range(5, META):
        tl.store(row + k, tl.zeros((BLOCK_P,), dtype=tl.int32), mask=part_ok)


def get_mla_metadata(cache_seqlens: torch.Tensor, meta: torch.Tensor, num_splits: torch.Tensor, block_tokens: int,
                     overhead_blocks: int) -> None:
    """Fills meta [num_parts, 8] and num_splits [b + 1] (int32, contiguous) with ops.mla.split_plan's
    plan for cache_seqlens [b] (b >= 1): one launch instead of split_plan's ~40 small ones."""
    b = cache_seqlens.shape[0]
    num_parts = meta.shape[0]
    ends = torch.empty(b, dtype=torch.int64, device=cache_seqlens.device)
    fast(_mla_metadata_kernel)[(1,)](cache_seqlens, ends, meta, num_splits, b, num_parts, b.bit_length(),
                                     BLOCK_TOKENS=block_tokens, OVERHEAD=overhead_blocks, META=meta.shape[1],
                                     BLOCK_B=256, BLOCK_P=_pow2(num_parts), num_warps=4, num_stages=1)


@triton.jit
def _invariant_pieces(seqlens_ptr, i, mask, max_splits, min_piece, BLOCK_TOKENS: tl.constexpr):
    """Sequence i's length n (negative as 0, int64), piece length P and busy pieces ceil(n / P)
    (0 where masked), as ops.mla.invariant_split_plan defines them."""
    n = tl.maximum(tl.load(seqlens_ptr + i, mask=mask, other=0), 0).to(tl.int64)
    wanted = tl.minimum(tl.maximum(n // min_piece, 1), max_splits)
    per_piece = (n + wanted - 1) // wanted
    per_piece = tl.maximum((per_piece + BLOCK_TOKENS - 1) // BLOCK_TOKENS * BLOCK_TOKENS, BLOCK_TOKENS)
    return n, per_piece, (n + per_piece - 1) // per_piece


@triton.jit
def _mla_invariant_plan_kernel(seqlens_ptr, meta_ptr, num_splits_ptr, b, num_parts, max_splits, min_piece,
                               BLOCK_TOKENS: tl.constexpr, META: tl.constexpr, BLOCK: tl.constexpr):
    """ops.mla.invariant_split_plan in one program (its docstring has the plan): num_splits' prefix
    sum over chunks of BLOCK sequences, then the b * K partition rows in chunks of BLOCK
    (partition p: piece p % K of sequence p // K, each lane reading its sequence's length)."""
    offs = tl.arange(0, BLOCK)
    tl.store(num_splits_ptr, 0)
    splits_before = tl.zeros((), dtype=tl.int64)
    for chunk in range(0, b, BLOCK):
        i = chunk + offs
        ok = i < b
        _, _, splits = _invariant_pieces(seqlens_ptr, i, ok, max_splits, min_piece, BLOCK_TOKENS)
        tl.store(num_splits_ptr + 1 + i, (splits_before + tl.cumsum(splits, 0)).to(tl.int32), mask=ok)
        splits_before += tl.sum(splits, 0)
    for chunk in range(0, num_parts, BLOCK):
        parts = chunk + offs.to(tl.int64)  # (int64: parts * META passes 2**31 from b * K = 2**28 on)
        part_ok = parts < num_parts
        seq = parts // max_splits
        piece = parts - seq * max_splits
        n, per_piece, splits = _invariant_pieces(seqlens_ptr, seq, part_ok, max_splits, min_piece, BLOCK_TOKENS)
        begin = piece * per_piece
        busy = piece < splits
        row = meta_ptr + parts * META
        tl.store(row, tl.where(busy, seq, b).to(tl.int32), mask=part_ok)
        tl.store(row + 1, tl.where(busy, begin, 0).to(tl.int32), mask=part_ok)
        tl.store(row + 2, tl.where(busy, seq, b - 1).to(tl.int32), mask=part_ok)
        tl.store(row + 3, tl.where(busy, tl.minimum(begin + per_piece, n), 0).to(tl.int32), mask=part_ok)
        tl.store(row + 4, tl.where(busy, piece, 0).to(tl.int32), mask=part_ok)
        for k in tl.static_range(5, META):
            tl.store(row + k, tl.zeros((BLOCK,), dtype=tl.int32), mask=part_ok)


def invariant_split_plan(cache_seqlens: torch.Tensor, meta: torch.Tensor, num_splits: torch.Tensor, max_splits: int,
                         min_piece: int, block_tokens: int) -> None:
    """Fills meta [b * max_splits, 8] and num_splits [b + 1] (int32, contiguous) with
    ops.mla.invariant_split_plan's plan for cache_seqlens [b] (b >= 1): one launch instead of its
    ~30 small ones (~0.3 ms of host time per eager call)."""
    b = cache_seqlens.shape[0]
    fast(_mla_invariant_plan_kernel)[(1,)](cache_seqlens, meta, num_splits, b, meta.shape[0], max_splits, min_piece,
                                           BLOCK_TOKENS=block_tokens, META=meta.shape[1], BLOCK=INVARIANT_PLAN_BLOCK,
                                           num_warps=4, num_stages=1)


def _min_int32_max(n):
    """min(n, 2**31 - 1), symbolic for a symbolic n (torch.sym_min: ~0.6 us of host time on an int)."""
    return min(n, 2**31 - 1) if type(n) is int else torch.sym_min(n, 2**31 - 1)


def _pow2(n: int, floor: int = 16) -> int:
    return max(next_power_of_2(max(n, 1)), floor)


TILE_ENV = "DSKERNELS_MLA_TRITON_TILE"


def _forced_tile() -> tuple[int, int, int, int] | None:
    """DSKERNELS_MLA_TRITON_TILE="BLOCK_M,BLOCK_N,num_warps,num_stages" (GPU launches; BLOCK_M 0:
    the default rule's): for tuning on the device (benchmarks/bench_mla.py times such variants
    beside the default)."""
    text = os.environ.get(TILE_ENV, "")
    if not text:
        return None
    try:
        block_m, block_n, warps, stages = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{TILE_ENV}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages' (four integers), "
                         f"got {text!r}") from None
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    # BLOCK_N must divide 64: partitions start on multiples of 64 keys (split_plan).
    if not ((block_m == 0 or pow2(block_m) and block_m >= 16) and pow2(block_n) and 16 <= block_n <= 64 and warps in (1, 2, 4, 8, 16)
            and stages >= 1):
        raise ValueError(f"{TILE_ENV}: expected BLOCK_M 0 or a power of two >= 16, BLOCK_N in (16, 32, 64), "
                         f"num_warps in (1, 2, 4, 8, 16), num_stages >= 1; got {text!r}")
    return block_m, block_n, warps, stages


# Stages: the block-table load in front of every key load is a second level of indirection, and
# Triton's pipeliner splits num_stages over the levels: 2 stages gave one key buffer whose next copy
# was issued after its last use and waited for at once (no overlap at all); 5 give two buffers, so
# the copy of key block i + 1 runs under the math of block i (TTGIR, sm_90a, triton 3.8).
DOUBLE_BUFFER_STAGES = 5


def _shared_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)  # older torch builds lack it
    return limit if limit is not None else props.shared_memory_per_block


def tile_config(rows: int, block_dv: int, block_dr: int, device: torch.device,
                element_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) of the decode kernel.

    BLOCK_N must divide the metadata's 64-key granularity (splits start on multiples of 64).
    d = 576 / dv = 512: 16 or 32 query rows, 8 warps (4 warps or 64-row tiles spill hundreds of
    bytes, scripts/check_triton_compile.py); keys double-buffered where they fit the GPU's shared
    memory, else one buffer; 64 keys per block where two such buffers fit, else 32. The 64-key
    tiles sit at 255 registers and spill up to 260 bytes (triton 3.8), yet on an H200
    (benchmarks/bench_mla.py, 2026-12-04) ran 1.38x-1.44x faster than the spill-free 32-key ones
    on every decode case, bf16 and fp8 caches, h_q 16 and 128. DSKERNELS_MLA_TRITON_TILE forces
    another tile.
    """
    if device.type == "cpu":  # the interpreter: few, big tiles (its cost is per operation)
        return min(_pow2(rows), 64), 64, 4, 1
    # The rule's answer per shape and shared-memory limit (both read on every call, the forced tile too)
    tile = _default_tile(rows, block_dv, block_dr, element_bytes, _shared_limit(device))
    forced = _forced_tile()
    if forced is not None:
        tile = (forced[0] or tile[0], *forced[1:])
    return tile


@functools.lru_cache(maxsize=1024)  # (decode calls the same few shapes; ~2 us of host time per call)
def _default_tile(rows: int, block_dv: int, block_dr: int, element_bytes: int,
                  shared_limit: int) -> tuple[int, int, int, int]:
    """tile_config's rule for a GPU of shared_limit bytes of shared memory per block."""
    # Shared memory at element_bytes per element (2; 4 where q or the cache is fp32, whose operands
    # stay fp32): the Q tile, and two key buffers (an fp8 cache's second V load for P @ V makes its
    # two about as big); 8 KB for the rest (measured: 1-3 KB).
    row = (block_dv + block_dr) * element_bytes
    fits = lambda m, n, buffers: m * row + buffers * n * row + 8192 <= shared_limit  # noqa: E731
    if block_dv >= 256:
        # The first that fits: 64 keys twice, 32 keys twice, 32 once, 16 once; then 16 query rows.
        options = [(m, n, buffers) for m in dict.fromkeys((16 if rows <= 16 else 32, 16))
                   for n, buffers in ((64, 2), (32, 2), (32, 1), (16, 1))]
        block_m, block_n, buffers = next((o for o in options if fits(*o)), options[-1])
        tile = block_m, block_n, 8, DOUBLE_BUFFER_STAGES if buffers == 2 else 2
    else:
        block_m, block_n = min(_pow2(rows), 64), 64
        tile = block_m, block_n, 4, DOUBLE_BUFFER_STAGES if fits(block_m, block_n, 2) else 2
    return tile


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits, softmax_scale, causal, k_scale, out, lse) -> None:
    """Fills out [b, s_q, h_q, dv] and lse [b, h_q, s_q] (both preallocated, contiguous).

    q's last dimension and k_cache's last dimension must have unit stride."""
    b, s_q, h_q, d = q.shape
    _, page_size, h_kv, _ = k_cache.shape
    heads_per_kv = h_q // h_kv
    rows = s_q * heads_per_kv
    num_parts = tile_scheduler_metadata.shape[0]
    if b == 0:
        return
    is_fp8 = k_cache.dtype == torch.float8_e4m3fn
    fp8_bytes = is_fp8 and not native_fp8(q.device)
    block_dv = _pow2(head_dim_v)
    block_dr = _pow2(d - head_dim_v)
    wide = q.dtype == torch.float32 or k_cache.dtype == torch.float32
    block_m, block_n, num_warps, num_stages = tile_config(rows, block_dv, block_dr, q.device, 4 if wide else 2)
    # The kernel's block-table offsets stay int32 (an int64 one spilled 40 more bytes in the
    # h_q = 128 tile): a table whose offsets pass 2**31 is made dense, and past that refused.
    if (b - 1) * block_table.stride(0) + block_table.shape[1] >= 2**31:
        block_table = block_table.contiguous()
        if b * block_table.shape[1] >= 2**31:
            raise ValueError(f"block_table: expected fewer than 2**31 entries for the Triton kernel, got shape "
                             f"{tuple(block_table.shape)}")
    block_r = max(1, min(16, 4096 // block_dv))  # the combine's rows per program
    # CUDA limits grid y and z to 65535 (else a bare "invalid argument" at launch): the decode's z
    # counts row tiles per kv head, the combine's y row groups.
    most = 65535 * min(block_m * h_kv, block_r)
    if s_q * h_q > most:
        raise ValueError(f"q: expected at most {most} query rows per sequence (s_q x h_q, for the Triton "
                         f"kernels' grids), got s_q = {s_q}, h_q = {h_q}")
    # Partial outputs: at most one split per sequence plus one per cut between partitions. A plan of
    # one partition (s_q * h_q past ~4 * SMs row tiles: every prefill chunk at 128 heads) splits no
    # sequence: every one is written straight to out, so no slots (at s_q = 4096, h_q = 128, b = 1
    # the two slots were 2 GiB of fp32 for a 512 MiB output, never written).
    max_splits = b + num_parts if num_parts > 1 else 0
    out_acc = torch.empty(max_splits, h_q * s_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse_acc = torch.empty(max_splits, h_q * s_q, dtype=torch.float32, device=q.device)
    k_scale_arg = k_scale if is_fp8 else lse_acc  # any pointer; unread unless IS_FP8
    # fp32 operands and IEEE dots for fp32 q, and for bf16 under the interpreter, whose tl.dot reads
    # bf16 operands as garbage (triton 3.8: products off by 1e10); fp16 keeps the GPU's path there,
    # and so do fp8 caches (fp16 dots for a bf16 q too).
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not is_fp8
                                            and os.environ.get("TRITON_INTERPRET") == "1")
    grid = (num_parts, h_kv, cdiv(rows, block_m))
    fast(_mla_decode_splitkv_kernel)[grid](
        q, k_cache.view(torch.uint8) if fp8_bytes else k_cache, block_table, cache_seqlens,
        tile_scheduler_metadata, num_splits, k_scale_arg,
        out, lse, out_acc, lse_acc,
        softmax_scale * LOG2E, b, s_q, heads_per_kv, page_size, block_table.shape[1],
        _min_int32_max(block_table.shape[1] * page_size), k_cache.shape[0], max_splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        out_acc.stride(0), out_acc.stride(1), lse_acc.stride(0),
        CAUSAL=causal, IS_FP8=is_fp8, FP8_BYTES=fp8_bytes, FP32_DOT=fp32_dot, SAME_PAGE=page_size % block_n == 0,
        HEAD_DIM=d, HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
        num_warps=num_warps, num_stages=num_stages)
    fast(_mla_combine_kernel)[(b, cdiv(h_q * s_q, block_r))](
        out, lse, out_acc, lse_acc, num_splits, s_q, h_q, head_dim_v, max_splits,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        out_acc.stride(0), out_acc.stride(1), lse_acc.stride(0),
        BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4)
