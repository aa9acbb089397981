"""Triton sparse MLA (python_ref/mla_sparse.py): every query row attends to its own top-k cache slots.

Decode and prefill are one kernel over flat rows: query row r (a (sequence, token) pair in decode,
a token in prefill), kv head g, and the list indices[r, g, :]. Program (r, g and a tile of its
heads, split) walks its split's part of the list in blocks of BLOCK_N entries: the entries' slots
are gathered (slot -> page slot // page_size, offset slot % page_size, so a decode cache keeps its
page stride), scored against all heads of the tile at once (V3.2 decode has one kv head: every
head of a token shares each gathered row), and folded into an online softmax. One split writes
out / lse / max_logits itself; several leave normalized partials with their log2-LSE and maximum,
merged by `_sparse_mla_combine_kernel`, which also applies attn_sink.

Splits: the list is cut into equal chunks of whole BLOCK_N blocks so that rows x kv heads x head
tiles x splits fills the GPU about twice (decode batches are small and top-k = 2048 is long).

V3.2's FP8 cache (FP8_V32; 656 bytes per token): the 512 latent bytes are widened to fp32 and
multiplied by their tile's scale (4 per token), then rounded to q's dtype (exact for the
power-of-two scales the format uses); the 64 rope values are read as bf16. The same registers
serve as V for P @ V.
"""

import os

import torch
import triton
import triton.language as tl

from dskernels._backend import batch_invariant_enabled, env_choice
from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import as_element_type, e4m3_bits_to_fp16, native_fp8
from dskernels.triton.mla import (DOUBLE_BUFFER_STAGES, _shared_limit, latent_scores, load_key_rows,
                                  online_softmax_step)
from dskernels.triton.launch import fast

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # read inside the kernels
CPU_SM_COUNT = 8  # the interpreter's pretend SM count: small test shapes then take the split path too


@triton.jit
def _sink_share(lse, seen, sink_ptr, head, head_ok):
    """The share of each head's output that attn_sink leaves (1 / (1 + exp(sink - lse)); 0 where
    nothing was seen); lse natural."""
    sink = tl.load(sink_ptr + head, mask=head_ok, other=0.0)
    return tl.where(seen, 1.0 / (1.0 + tl.exp(sink - tl.where(seen, lse, 0.0))), 0.0)


@triton.jit
def _store_stats(lse, max_logit, seen, lse_ptr, max_ptr, row, head, head_ok, lse_div, stride_l0, stride_l1,
                 stride_lh, stride_mr, stride_mh, HAS_MAX: tl.constexpr):
    """lse (+inf where nothing was seen) and max_logits of one row's heads, both natural."""
    tl.store(lse_ptr + (row // lse_div) * stride_l0 + (row % lse_div) * stride_l1 + head * stride_lh,
             tl.where(seen, lse, float("inf")), mask=head_ok)
    if HAS_MAX:  # NaN where lse is (a NaN score): the running maxima's tl.maximum drops NaN
        tl.store(max_ptr + row * stride_mr + head * stride_mh, tl.where(lse == lse, max_logit, lse), mask=head_ok)


@triton.jit
def _store_result(o, lse, max_logit, seen, out_ptr, lse_ptr, max_ptr, sink_ptr, row, head, head_ok, dv_offs, dv_ok,
                  lse_div, stride_or, stride_oh, stride_l0, stride_l1, stride_lh, stride_mr, stride_mh,
                  HAS_SINK: tl.constexpr, HAS_MAX: tl.constexpr):
    """The final out (times the sink's share), lse (+inf where nothing was seen) and max_logits of
    one row's heads; lse and max_logit natural, o normalized."""
    if HAS_SINK:
        o = o * _sink_share(lse, seen, sink_ptr, head, head_ok)[:, None]
    tl.store(out_ptr + row * stride_or + head[:, None] * stride_oh + dv_offs[None, :],
             as_element_type(o, out_ptr), mask=head_ok[:, None] & dv_ok[None, :])
    _store_stats(lse, max_logit, seen, lse_ptr, max_ptr, row, head, head_ok, lse_div, stride_l0, stride_l1,
                 stride_lh, stride_mr, stride_mh, HAS_MAX)


@triton.jit
def _program_rows(len_ptr, heads_per_kv, head_tiles, topk, chunk, rows_per_len, HAS_LEN: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """This program's query row, kv head, heads (and which of them exist), split, and the part
    [lo, hi) of the row's list that split walks."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // head_tiles
    local = (tl.program_id(1) % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = local < heads_per_kv
    head = kv_head * heads_per_kv + local
    split = tl.program_id(2)
    n = topk
    if HAS_LEN:
        n = tl.minimum(tl.maximum(tl.load(len_ptr + row // rows_per_len), 0), topk)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n)
    return row, kv_head, head, head_ok, split, lo, hi


@triton.jit
def _gathered_rows(idx_row, start, hi, num_slots, kv_ptr, page_size, stride_kp, stride_kt, kv_head, stride_kh,
                   BLOCK_N: tl.constexpr):
    """The cache rows of list entries start .. start + BLOCK_N - 1 (below hi), and which exist:
    -1 and ids past the cache name no key and are never read (their rows point at slot 0)."""
    pos = start + tl.arange(0, BLOCK_N)
    slot = tl.load(idx_row + pos, mask=pos < hi, other=-1)
    ok = (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0).to(tl.int64)
    return kv_ptr + (slot // page_size) * stride_kp + (slot % page_size) * stride_kt + kv_head * stride_kh, ok


@triton.jit
def _store_partial_stats(stat_acc_ptr, split, stride_stat_split, flat, lse2, m_i, head_ok):
    """A split's log2-LSE and maximum per head, for _sparse_mla_combine_kernel."""
    base = stat_acc_ptr + split.to(tl.int64) * stride_stat_split + 2 * flat
    tl.store(base, lse2, mask=head_ok)
    tl.store(base + 1, m_i, mask=head_ok)


@triton.jit
def _sparse_mla_kernel(
        q_ptr, kv_ptr, idx_ptr, len_ptr, sink_ptr,
        out_ptr, lse_ptr, max_ptr, out_acc_ptr, stat_acc_ptr,
        qk_scale_log2, heads_per_kv, head_tiles, topk, chunk, num_slots, page_size, rows_per_len, lse_div,
        stride_qr, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_ir, stride_ih,
        stride_or, stride_oh,
        stride_l0, stride_l1, stride_lh,
        stride_mr, stride_mh,
        stride_acc_split, stride_acc_row, stride_stat_split,
        h_q,
        FP8_V32: tl.constexpr, FP8_BYTES: tl.constexpr, FP32_DOT: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr, HAS_MAX: tl.constexpr, SPLIT: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr):
    row, kv_head, head, head_ok, split, lo, hi = _program_rows(len_ptr, heads_per_kv, head_tiles, topk, chunk,
                                                              rows_per_len, HAS_LEN, BLOCK_H)
    dv_offs = tl.arange(0, BLOCK_DV)
    dv_ok = dv_offs < HEAD_DIM_V
    dr_offs = HEAD_DIM_V + tl.arange(0, BLOCK_DR)
    dr_ok = dr_offs < HEAD_DIM

    q_rows = q_ptr + row * stride_qr + head * stride_qh
    q_v = tl.load(q_rows[:, None] + dv_offs[None, :], mask=head_ok[:, None] & dv_ok[None, :], other=0.0)
    q_r = tl.load(q_rows[:, None] + dr_offs[None, :], mask=head_ok[:, None] & dr_ok[None, :], other=0.0)
    if FP32_DOT:
        q_v = q_v.to(tl.float32)
        q_r = q_r.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    idx_row = idx_ptr + row * stride_ir + kv_head * stride_ih
    for start in range(lo, hi, BLOCK_N):
        k_rows, ok = _gathered_rows(idx_row, start, hi, num_slots, kv_ptr, page_size, stride_kp, stride_kt, kv_head,
                                    stride_kh, BLOCK_N)
        if FP8_V32:
            # k_rows points at bytes: [0, 512) e4m3 latent, [512, 528) 4 fp32 scales, [528, 656) bf16 rope.
            if FP8_BYTES:
                raw = tl.load(k_rows[:, None] + dv_offs[None, :], mask=ok[:, None], other=0)
                nope = e4m3_bits_to_fp16(raw).to(tl.float32)
            else:
                raw = tl.load(k_rows[:, None] + dv_offs[None, :], mask=ok[:, None], other=0.0)
                nope = raw.to(tl.float32)
            scales = tl.load((k_rows + 512).to(tl.pointer_type(tl.float32))[:, None] + tl.arange(0, 4)[None, :],
                             mask=ok[:, None], other=0.0)
            nope = tl.reshape(tl.reshape(nope, (BLOCK_N, 4, 128)) * scales[:, :, None], (BLOCK_N, 512))
            k_v = nope.to(q_v.dtype)
            k_r = tl.load((k_rows + 528).to(tl.pointer_type(tl.bfloat16))[:, None] + tl.arange(0, BLOCK_DR)[None, :],
                          mask=ok[:, None], other=0.0).to(q_v.dtype)
        else:
            k_v, _, k_r = load_key_rows(k_rows, ok, dv_offs, dv_ok, dr_offs, dr_ok, HEAD_DIM, HEAD_DIM_V, BLOCK_DV,
                                        BLOCK_DR)
            k_v = k_v.to(q_v.dtype)
            k_r = k_r.to(q_v.dtype)
        s = tl.where(ok[None, :], latent_scores(q_v, q_r, k_v, k_r, FP32_DOT) * qk_scale_log2, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, k_v, FP32_DOT)

    seen = l_i != 0.0  # NaN counts as seen: a NaN score comes out as NaN, not as "no key"
    o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    if SPLIT:
        flat = row * h_q + head
        tl.store(out_acc_ptr + split.to(tl.int64) * stride_acc_split + flat[:, None] * stride_acc_row
                 + dv_offs[None, :], o, mask=head_ok[:, None] & dv_ok[None, :])
        _store_partial_stats(stat_acc_ptr, split, stride_stat_split, flat, lse2, m_i, head_ok)
    else:
        _store_result(o, lse2 * LN2, m_i * LN2, seen, out_ptr, lse_ptr, max_ptr, sink_ptr, row, head, head_ok,
                      dv_offs, dv_ok, lse_div, stride_or, stride_oh, stride_l0, stride_l1, stride_lh, stride_mr,
                      stride_mh, HAS_SINK, HAS_MAX)


@triton.jit
def _fp8_tile(k_rows, ok, t: tl.constexpr, dtype: tl.constexpr, FP8_BYTES: tl.constexpr):
    """Latent columns 128 t .. 128 t + 127 of the gathered rows of V3.2's FP8 layout, widened to
    dtype (exact: e4m3 values are bf16, fp16 and fp32 values), and their tile scale [N] in fp32."""
    cols = t * 128 + tl.arange(0, 128)
    if FP8_BYTES:
        k = e4m3_bits_to_fp16(tl.load(k_rows[:, None] + cols[None, :], mask=ok[:, None], other=0)).to(dtype)
    else:
        k = tl.load(k_rows[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(dtype)
    scale = tl.load((k_rows + 512).to(tl.pointer_type(tl.float32)) + t, mask=ok, other=0.0)
    # An infinite scale dequantizes to infinities of both signs (and NaN at zeros), whose scores are
    # NaN: applied to a tile's dot it would give one infinity and hide the row (-inf) instead.
    scale = tl.where(tl.abs(scale) == float("inf"), float("nan"), scale)
    return k, scale


@triton.jit
def _tile_scores(q_t, k_t, scale_t, FP32_DOT: tl.constexpr):
    """q_t . dequant(k_t) over one 128-column tile: the product of the e4m3 values, times each
    key's tile scale (the scale factors out of the tile's dot)."""
    if FP32_DOT:
        return tl.dot(q_t, tl.trans(k_t), input_precision="ieee") * scale_t[None, :]
    return tl.dot(q_t, tl.trans(k_t)) * scale_t[None, :]


@triton.jit
def _tile_values(acc_t, alpha, p, k_t, scale_t, FP32_DOT: tl.constexpr):
    """acc_t * alpha + p @ dequant(k_t) over one 128-column tile, the key's scale folded into p
    (p * scale rounds as p does where the scale is a power of two, as the format's are)."""
    if FP32_DOT:
        return acc_t * alpha[:, None] + tl.dot(p * scale_t[None, :], k_t, input_precision="ieee")
    return acc_t * alpha[:, None] + tl.dot((p * scale_t[None, :]).to(k_t.dtype), k_t)


@triton.jit
def _store_tile(o_t, t: tl.constexpr, ptr, row_offsets, head_ok, split_out: tl.constexpr):
    cols = t * 128 + tl.arange(0, 128)
    value = o_t if split_out else as_element_type(o_t, ptr)
    tl.store(ptr + row_offsets[:, None] + cols[None, :], value, mask=head_ok[:, None])


@triton.jit
def _sparse_mla_fp8_kernel(
        q_ptr, kv_ptr, idx_ptr, len_ptr, sink_ptr,
        out_ptr, lse_ptr, max_ptr, out_acc_ptr, stat_acc_ptr,
        qk_scale_log2, heads_per_kv, head_tiles, topk, chunk, num_slots, page_size, rows_per_len, lse_div,
        stride_qr, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_ir, stride_ih,
        stride_or, stride_oh,
        stride_l0, stride_l1, stride_lh,
        stride_mr, stride_mh,
        stride_acc_split, stride_acc_row, stride_stat_split,
        h_q,
        FP8_BYTES: tl.constexpr, FP32_DOT: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr, HAS_MAX: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """_sparse_mla_kernel for V3.2's FP8 layout (d = 576, dv = 512) with wide head tiles (the
    "wide" tiles, wide_tiles): the latent is never dequantized as a tile. Its four 128-column tiles
    go to the dots as e4m3 values widened to q's dtype, and each key's tile scale multiplies that
    tile's scores (q . k) and the probabilities it weighs (p @ v) instead: no fp32 [N, 512]
    tile in registers, whose pressure held _sparse_mla_kernel to 16 heads a program (each gathering
    and dequantizing every row again, 8 times at V3.2's 128 heads). Four accumulators of
    [BLOCK_H, 128] hold out. Arguments as _sparse_mla_kernel's."""
    row, kv_head, head, head_ok, split, lo, hi = _program_rows(len_ptr, heads_per_kv, head_tiles, topk, chunk,
                                                              rows_per_len, HAS_LEN, BLOCK_H)
    q_rows = q_ptr + row * stride_qr + head * stride_qh
    c128 = tl.arange(0, 128)
    c64 = tl.arange(0, 64)
    dtype = tl.float32 if FP32_DOT else q_ptr.dtype.element_ty  # the dots' operand type
    q_mask = head_ok[:, None]
    q0 = tl.load(q_rows[:, None] + c128[None, :], mask=q_mask, other=0.0).to(dtype)
    q1 = tl.load(q_rows[:, None] + 128 + c128[None, :], mask=q_mask, other=0.0).to(dtype)
    q2 = tl.load(q_rows[:, None] + 256 + c128[None, :], mask=q_mask, other=0.0).to(dtype)
    q3 = tl.load(q_rows[:, None] + 384 + c128[None, :], mask=q_mask, other=0.0).to(dtype)
    q_r = tl.load(q_rows[:, None] + 512 + c64[None, :], mask=q_mask, other=0.0).to(dtype)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, 128], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, 128], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H, 128], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_H, 128], dtype=tl.float32)
    idx_row = idx_ptr + row * stride_ir + kv_head * stride_ih
    for start in range(lo, hi, BLOCK_N):
        # bytes: [0, 512) e4m3 latent, [512, 528) 4 fp32 tile scales, [528, 656) bf16 rope
        k_rows, ok = _gathered_rows(idx_row, start, hi, num_slots, kv_ptr, page_size, stride_kp, stride_kt, kv_head,
                                    stride_kh, BLOCK_N)
        k0, s0 = _fp8_tile(k_rows, ok, 0, dtype, FP8_BYTES)
        k1, s1 = _fp8_tile(k_rows, ok, 1, dtype, FP8_BYTES)
        k2, s2 = _fp8_tile(k_rows, ok, 2, dtype, FP8_BYTES)
        k3, s3 = _fp8_tile(k_rows, ok, 3, dtype, FP8_BYTES)
        k_r = tl.load((k_rows + 528).to(tl.pointer_type(tl.bfloat16))[:, None] + c64[None, :],
                      mask=ok[:, None], other=0.0).to(dtype)
        if FP32_DOT:
            s = tl.dot(q_r, tl.trans(k_r), input_precision="ieee")
        else:
            s = tl.dot(q_r, tl.trans(k_r))
        s += _tile_scores(q0, k0, s0, FP32_DOT)
        s += _tile_scores(q1, k1, s1, FP32_DOT)
        s += _tile_scores(q2, k2, s2, FP32_DOT)
        s += _tile_scores(q3, k3, s3, FP32_DOT)
        s = tl.where(ok[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # online softmax as online_softmax_step's
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc0 = _tile_values(acc0, alpha, p, k0, s0, FP32_DOT)
        acc1 = _tile_values(acc1, alpha, p, k1, s1, FP32_DOT)
        acc2 = _tile_values(acc2, alpha, p, k2, s2, FP32_DOT)
        acc3 = _tile_values(acc3, alpha, p, k3, s3, FP32_DOT)
        m_i = m_new

    seen = l_i != 0.0  # NaN counts as seen: a NaN score comes out as NaN, not as "no key"
    inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    if SPLIT:
        flat = row * h_q + head
        rows = split.to(tl.int64) * stride_acc_split + flat * stride_acc_row
        _store_tile(acc0 * inv[:, None], 0, out_acc_ptr, rows, head_ok, True)
        _store_tile(acc1 * inv[:, None], 1, out_acc_ptr, rows, head_ok, True)
        _store_tile(acc2 * inv[:, None], 2, out_acc_ptr, rows, head_ok, True)
        _store_tile(acc3 * inv[:, None], 3, out_acc_ptr, rows, head_ok, True)
        _store_partial_stats(stat_acc_ptr, split, stride_stat_split, flat, lse2, m_i, head_ok)
    else:
        lse = lse2 * LN2
        if HAS_SINK:
            inv *= _sink_share(lse, seen, sink_ptr, head, head_ok)
        rows = row * stride_or + head * stride_oh
        _store_tile(acc0 * inv[:, None], 0, out_ptr, rows, head_ok, False)
        _store_tile(acc1 * inv[:, None], 1, out_ptr, rows, head_ok, False)
        _store_tile(acc2 * inv[:, None], 2, out_ptr, rows, head_ok, False)
        _store_tile(acc3 * inv[:, None], 3, out_ptr, rows, head_ok, False)
        _store_stats(lse, m_i * LN2, seen, lse_ptr, max_ptr, row, head, head_ok, lse_div, stride_l0, stride_l1,
                     stride_lh, stride_mr, stride_mh, HAS_MAX)


@triton.jit
def _sparse_mla_combine_kernel(
        out_ptr, lse_ptr, max_ptr, sink_ptr, out_acc_ptr, stat_acc_ptr,
        h_q, dv, num_splits, lse_div,
        stride_or, stride_oh, stride_l0, stride_l1, stride_lh, stride_mr, stride_mh,
        stride_acc_split, stride_acc_row, stride_stat_split,
        HAS_SINK: tl.constexpr, HAS_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    head_ok = head < h_q
    flat = row * h_q + head
    dv_offs = tl.arange(0, BLOCK_DV)
    dv_ok = dv_offs < dv
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    max_logit = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for k in range(0, num_splits):
        base = stat_acc_ptr + k * stride_stat_split + 2 * flat
        m = tl.maximum(m, tl.load(base, mask=head_ok, other=float("-inf")))
        max_logit = tl.maximum(max_logit, tl.load(base + 1, mask=head_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for k in range(0, num_splits):
        w = tl.math.exp2(tl.load(stat_acc_ptr + k * stride_stat_split + 2 * flat, mask=head_ok,
                                 other=float("-inf")) - m_safe)
        part = tl.load(out_acc_ptr + k * stride_acc_split + flat[:, None] * stride_acc_row + dv_offs[None, :],
                       mask=head_ok[:, None] & dv_ok[None, :], other=0.0)
        total += w
        acc += w[:, None] * part
    seen = total != 0.0
    o = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
    lse = (m_safe + tl.math.log2(tl.where(seen, total, 1.0))) * LN2
    _store_result(o, lse, max_logit * LN2, seen, out_ptr, lse_ptr, max_ptr, sink_ptr, row, head, head_ok, dv_offs,
                  dv_ok, lse_div, stride_or, stride_oh, stride_l0, stride_l1, stride_lh, stride_mr, stride_mh,
                  HAS_SINK, HAS_MAX)


def ieee_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels widen their dot operands to fp32 (FP32_DOT, IEEE products): for fp32
    queries, and for bf16 ones under Triton's interpreter, whose bf16 tl.dot returns garbage."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _pow2(n: int, floor: int = 16) -> int:
    return max(next_power_of_2(max(n, 1)), floor)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def tile_config(heads_per_kv: int, block_dv: int, block_dr: int, fp8_v32: bool, device: torch.device,
                element_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_H heads, BLOCK_N list entries, num_warps, num_stages).

    On a GPU the dense decode kernel's d = 576 tiles (dskernels/triton/mla.py tile_config: 16 or 32
    rows x 32 keys, 8 warps); more heads per kv head take more head tiles, each gathering the same
    rows again (an L2 hit when the tiles run together). The first tile whose shared memory fits the
    GPU, estimated as the dense kernel's: the q tile and one or two gathered blocks of
    (block_dv + block_dr) elements a row, at element_bytes each (4 for fp32 q: its operands stay
    fp32), and 8 KB for the rest. Not yet timed on a GPU.
    """
    if device.type == "cpu":  # the interpreter: few, big tiles
        return min(_pow2(heads_per_kv), 64), 64, 4, 1
    row = (block_dv + block_dr) * element_bytes
    fits = lambda h, n, buffers: h * row + buffers * n * row + 8192 <= _shared_limit(device)  # noqa: E731
    if block_dv >= 256:
        # The FP8 layout's dequantization (an fp32 [32, 512] tile before the rounding) needs more
        # registers: 16 heads use 220 and do not spill; 32 heads spilled 476-504 bytes with 32 or 16
        # list entries per block, 1424 with 16 warps (ptxas sm_90a, triton 3.8, 2026-12-03).
        first_h, warps = (16 if heads_per_kv <= 16 or fp8_v32 else 32), 8
        blocks = ((32, 2), (32, 1), (16, 1))
    else:
        first_h, warps = min(_pow2(heads_per_kv), 64), 4
        blocks = ((64, 2), (32, 2), (32, 1), (16, 1))
    heads = dict.fromkeys(h for h in (first_h, first_h // 2, first_h // 4, 16) if 16 <= h <= first_h)
    options = [(h, n, buffers) for h in heads for n, buffers in blocks]
    block_h, block_n, buffers = next((o for o in options if fits(*o)), options[-1])
    if 2 * 16 * row > _shared_limit(device):  # the smallest tile's operands alone (16 heads, 16 entries)
        raise ValueError(f"q: {'float32' if element_bytes == 4 else '16-bit'} queries with these head dimensions "
                         f"need at least {2 * 16 * row} bytes of shared memory per block, this GPU has "
                         f"{_shared_limit(device)}; pass bfloat16 queries (and cache)")
    # Two gathered blocks in flight take 5 stages (the list load before every gather is a level of
    # indirection that takes its share, as in the dense kernel); one buffer, 2.
    return block_h, block_n, warps, DOUBLE_BUFFER_STAGES if buffers == 2 else 2


TILE_KNOB = "DSKERNELS_SPARSE_MLA_TILE"


def wide_tiles() -> bool:
    """DSKERNELS_SPARSE_MLA_TILE: `narrow` (the default until a device run has checked and timed
    the other) keeps tile_config's tiles; `wide` takes wide_tile_config's for d = 576 caches with
    16-bit queries: V3.2's FP8 layout on _sparse_mla_fp8_kernel (scales applied to the scores and
    probabilities), bf16 caches on _sparse_mla_kernel."""
    return env_choice(TILE_KNOB, ("narrow", "wide")) == "wide"


WIDE_SHARED_BYTES = 160 * 1024  # 64 heads take 113-131 KB (sm_90a); GPUs of ~100 KB get 32 (45-75 KB)


def wide_tile_config(heads_per_kv: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_H heads, BLOCK_N list entries, num_warps, num_stages) of the wide tiles: up to 64
    heads where the tensor cores take 64-row tiles (wgmma, sm_90; sm_100 too) and a block has the
    shared memory for them, so V3.2's 128 heads run in two tiles, each gathering the rows once
    (tile_config's FP8 tiles: 8); 32 elsewhere (mma.sync's 64-head tiles spill 244-288 bytes).
    8 warps from 32 heads on, 16 entries a block, 5 stages (two gathered blocks in flight, as
    tile_config's). On sm_90a (ptxas through Triton 3.8, 2026-12-05), 64 heads: the FP8 kernel
    255 registers, 113 KB shared memory, its non-split form keeping two values in local memory
    across the main loop (four through Triton 3.6; none accessed inside; 32 entries spilled 12-32
    bytes); bf16 caches 223-255 registers, 131 KB, no spills in the split form (a review compiled
    the non-split bf16 form, sparse prefill's, under Triton 3.6 on 2026-12-06: 8 bytes spilled
    outside the main loop; the compile check does not build that form). Not yet run on a GPU."""
    wide = device.type == "cpu" or (torch.cuda.get_device_capability(device)[0] >= 9
                                    and _shared_limit(device) >= WIDE_SHARED_BYTES)
    block_h = min(_pow2(heads_per_kv), 64 if wide else 32)
    if device.type == "cpu":  # the interpreter
        return block_h, 64, 4, 1
    return block_h, 16, 8 if block_h >= 32 else 4, DOUBLE_BUFFER_STAGES


# Batch-invariant mode: no split of fewer list entries than this, nor than 32 per head of a kv head
# (dskernels.ops.mla.INVARIANT_ROW_KEYS): a split's combine traffic, heads x dv fp32 written and read
# back per row (4 KiB a head), then stays under ~1/5 of its 656-byte FP8 rows' bytes.
INVARIANT_MIN_CHUNK = 512


def num_splits_for(work: int, topk: int, block_n: int, device: torch.device, invariant_heads: int = 0) -> int:
    """Splits of each list: enough programs to fill the GPU about twice, at least one block each.
    With invariant_heads (batch-invariant mode: the heads per kv head) a function of the list
    length and that alone, never of the row count `work` follows: clamp(topk // min_chunk, 1, K),
    min_chunk = max(INVARIANT_MIN_CHUNK, 32 x heads), K = DSKERNELS_MLA_INVARIANT_SPLITS."""
    blocks = max(1, cdiv(topk, block_n))
    if invariant_heads:
        from dskernels.ops import mla as ops_mla  # (the ops import these modules, not the reverse)

        min_chunk = max(INVARIANT_MIN_CHUNK, ops_mla.INVARIANT_ROW_KEYS * invariant_heads)
        return max(1, min(blocks, ops_mla.invariant_max_splits(), topk // min_chunk))
    return max(1, min(blocks, cdiv(2 * _sm_count(device), max(work, 1))))


def sparse_mla(q, kv, indices, topk_length, attn_sink, sm_scale, head_dim_v, page_size, num_slots, fp8_v32,
               out, lse, lse_div, max_logits=None) -> None:
    """q [R, h_q, d] (unit last stride), kv [num_pages, page_size, h_kv, row] (row: d elements, or
    656 bytes with fp8_v32) holding num_slots valid slots, indices [R, h_kv, topk] (any strides but
    a unit last one; stride 0 over h_kv shares a list), topk_length [R // rows_per_len] or None
    (contiguous, as attn_sink); writes out [R, h_q, dv] (row-major view), lse at (r // lse_div,
    r % lse_div, h) of a 3-d view, max_logits [R, h_q] if given."""
    rows, h_q, d = q.shape
    h_kv = kv.shape[2]
    topk = indices.shape[2]
    if rows == 0:
        return
    heads_per_kv = h_q // h_kv
    fp8_bytes = fp8_v32 and not native_fp8(q.device)
    block_dv = 512 if fp8_v32 else _pow2(head_dim_v)
    block_dr = 64 if fp8_v32 else _pow2(d - head_dim_v)
    # (fp32 queries keep tile_config's tiles: IEEE dots without tensor cores, whose fp32 operands
    # the wide tiles would spill by the kilobyte)
    wide = q.dtype != torch.float32 and d == 576 and wide_tiles()
    if wide:
        block_h, block_n, num_warps, num_stages = wide_tile_config(heads_per_kv, q.device)
    else:
        block_h, block_n, num_warps, num_stages = tile_config(heads_per_kv, block_dv, block_dr, fp8_v32, q.device,
                                                              4 if q.dtype == torch.float32 else 2)
    head_tiles = cdiv(heads_per_kv, block_h)
    splits = num_splits_for(rows * h_kv * head_tiles, topk, block_n, q.device,
                            max(heads_per_kv, 1) if batch_invariant_enabled() else 0)
    chunk = cdiv(cdiv(max(topk, 1), splits), block_n) * block_n
    splits = cdiv(max(topk, 1), chunk)
    split = splits > 1
    if split:
        out_acc = torch.empty(splits, rows * h_q, head_dim_v, dtype=torch.float32, device=q.device)
        stat_acc = torch.empty(splits, rows * h_q, 2, dtype=torch.float32, device=q.device)
    else:
        out_acc = stat_acc = lse  # unread pointers
    fp32_dot = ieee_dots(q.dtype)
    max_arg = max_logits if max_logits is not None else lse
    sink_arg = attn_sink if attn_sink is not None else lse
    len_arg = topk_length if topk_length is not None else indices
    rows_per_len = rows // topk_length.shape[0] if topk_length is not None and topk_length.shape[0] else 1
    # FP8 bytes as e4m3 (or raw bytes where Triton has no fp8 type); the scales and rope part are
    # read through pointers cast to their types.
    kv_arg = kv.view(torch.uint8 if fp8_bytes else torch.float8_e4m3fn) if fp8_v32 else kv
    args = (q, kv_arg, indices, len_arg, sink_arg,
            out, lse, max_arg, out_acc, stat_acc,
            sm_scale * LOG2E, heads_per_kv, head_tiles, topk, chunk, num_slots, page_size, rows_per_len,
            lse_div,
            q.stride(0), q.stride(1),
            kv_arg.stride(0), kv_arg.stride(1), kv_arg.stride(2),
            indices.stride(0), indices.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0), lse.stride(1), lse.stride(2),
            max_arg.stride(0), max_arg.stride(1),
            out_acc.stride(0) if split else 0, out_acc.stride(1) if split else 0, stat_acc.stride(0) if split else 0,
            h_q)
    switches = dict(FP8_BYTES=fp8_bytes, FP32_DOT=fp32_dot, HAS_LEN=topk_length is not None,
                    HAS_SINK=attn_sink is not None, HAS_MAX=max_logits is not None, SPLIT=split,
                    BLOCK_H=block_h, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    if wide and fp8_v32:
        fast(_sparse_mla_fp8_kernel)[(rows, h_kv * head_tiles, splits)](*args, **switches)
    else:
        fast(_sparse_mla_kernel)[(rows, h_kv * head_tiles, splits)](
            *args, FP8_V32=fp8_v32, HEAD_DIM=d, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
            **switches)
    if split:
        block_r = max(1, min(16, 4096 // block_dv))
        fast(_sparse_mla_combine_kernel)[(rows, cdiv(h_q, block_r))](
            out, lse, max_arg, sink_arg, out_acc, stat_acc,
            h_q, head_dim_v, splits, lse_div,
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), lse.stride(2),
            max_arg.stride(0), max_arg.stride(1),
            out_acc.stride(0), out_acc.stride(1), stat_acc.stride(0),
            HAS_SINK=attn_sink is not None, HAS_MAX=max_logits is not None,
            BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4)
