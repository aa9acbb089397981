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

from dskernels.triton import cdiv, next_power_of_2
from dskernels.triton.fp8_math import e4m3_bits_to_fp16, native_fp8
from dskernels.triton.mla import (DOUBLE_BUFFER_STAGES, _shared_limit, latent_scores, load_key_rows,
                                  online_softmax_step)

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # read inside the kernels
CPU_SM_COUNT = 8  # the interpreter's pretend SM count: small test shapes then take the split path too


@triton.jit
def _store_result(o, lse, max_logit, seen, out_ptr, lse_ptr, max_ptr, sink_ptr, row, head, head_ok, dv_offs, dv_ok,
                  lse_div, stride_or, stride_oh, stride_l0, stride_l1, stride_lh, stride_mr, stride_mh,
                  HAS_SINK: tl.constexpr, HAS_MAX: tl.constexpr):
    """The final out (times the sink's share), lse (+inf where nothing was seen) and max_logits of
    one row's heads; lse and max_logit natural, o normalized."""
    if HAS_SINK:
        sink = tl.load(sink_ptr + head, mask=head_ok, other=0.0)
        o = o * tl.where(seen, 1.0 / (1.0 + tl.exp(sink - tl.where(seen, lse, 0.0))), 0.0)[:, None]
    tl.store(out_ptr + row * stride_or + head[:, None] * stride_oh + dv_offs[None, :],
             o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + (row // lse_div) * stride_l0 + (row % lse_div) * stride_l1 + head * stride_lh,
             tl.where(seen, lse, float("inf")), mask=head_ok)
    if HAS_MAX:  # NaN where lse is (a NaN score): the running maxima's tl.maximum drops NaN
        tl.store(max_ptr + row * stride_mr + head * stride_mh, tl.where(lse == lse, max_logit, lse), mask=head_ok)


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
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // head_tiles
    local = (tl.program_id(1) % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = local < heads_per_kv
    head = kv_head * heads_per_kv + local
    split = tl.program_id(2)
    dv_offs = tl.arange(0, BLOCK_DV)
    dv_ok = dv_offs < HEAD_DIM_V
    dr_offs = HEAD_DIM_V + tl.arange(0, BLOCK_DR)
    dr_ok = dr_offs < HEAD_DIM

    n = topk
    if HAS_LEN:
        n = tl.minimum(tl.maximum(tl.load(len_ptr + row // rows_per_len), 0), topk)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n)

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
        pos = start + tl.arange(0, BLOCK_N)
        slot = tl.load(idx_row + pos, mask=pos < hi, other=-1)
        ok = (slot >= 0) & (slot < num_slots)  # -1 and ids past the cache: no key, never read
        slot = tl.where(ok, slot, 0).to(tl.int64)
        k_rows = kv_ptr + (slot // page_size) * stride_kp + (slot % page_size) * stride_kt + kv_head * stride_kh
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
        base = split.to(tl.int64) * stride_stat_split
        tl.store(out_acc_ptr + split.to(tl.int64) * stride_acc_split + flat[:, None] * stride_acc_row
                 + dv_offs[None, :], o, mask=head_ok[:, None] & dv_ok[None, :])
        tl.store(stat_acc_ptr + base + 2 * flat, lse2, mask=head_ok)
        tl.store(stat_acc_ptr + base + 2 * flat + 1, m_i, mask=head_ok)
    else:
        _store_result(o, lse2 * LN2, m_i * LN2, seen, out_ptr, lse_ptr, max_ptr, sink_ptr, row, head, head_ok,
                      dv_offs, dv_ok, lse_div, stride_or, stride_oh, stride_l0, stride_l1, stride_lh, stride_mr,
                      stride_mh, HAS_SINK, HAS_MAX)


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


def num_splits_for(work: int, topk: int, block_n: int, device: torch.device) -> int:
    """Splits of each list: enough programs to fill the GPU about twice, at least one block each."""
    blocks = max(1, cdiv(topk, block_n))
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
    block_h, block_n, num_warps, num_stages = tile_config(heads_per_kv, block_dv, block_dr, fp8_v32, q.device,
                                                          4 if q.dtype == torch.float32 else 2)
    head_tiles = cdiv(heads_per_kv, block_h)
    splits = num_splits_for(rows * h_kv * head_tiles, topk, block_n, q.device)
    chunk = cdiv(cdiv(max(topk, 1), splits), block_n) * block_n
    splits = cdiv(max(topk, 1), chunk)
    split = splits > 1
    if split:
        out_acc = torch.empty(splits, rows * h_q, head_dim_v, dtype=torch.float32, device=q.device)
        stat_acc = torch.empty(splits, rows * h_q, 2, dtype=torch.float32, device=q.device)
    else:
        out_acc = stat_acc = lse  # unread pointers
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    max_arg = max_logits if max_logits is not None else lse
    sink_arg = attn_sink if attn_sink is not None else lse
    len_arg = topk_length if topk_length is not None else indices
    rows_per_len = rows // topk_length.shape[0] if topk_length is not None and topk_length.shape[0] else 1
    # FP8 bytes as e4m3 (or raw bytes where Triton has no fp8 type); the scales and rope part are
    # read through pointers cast to their types.
    kv_arg = kv.view(torch.uint8 if fp8_bytes else torch.float8_e4m3fn) if fp8_v32 else kv
    _sparse_mla_kernel[(rows, h_kv * head_tiles, splits)](
        q, kv_arg, indices, len_arg, sink_arg,
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
        h_q,
        FP8_V32=fp8_v32, FP8_BYTES=fp8_bytes, FP32_DOT=fp32_dot,
        HAS_LEN=topk_length is not None, HAS_SINK=attn_sink is not None, HAS_MAX=max_logits is not None,
        SPLIT=split, HEAD_DIM=d, HEAD_DIM_V=head_dim_v,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
        num_warps=num_warps, num_stages=num_stages)
    if split:
        block_r = max(1, min(16, 4096 // block_dv))
        _sparse_mla_combine_kernel[(rows, cdiv(h_q, block_r))](
            out, lse, max_arg, sink_arg, out_acc, stat_acc,
            h_q, head_dim_v, splits, lse_div,
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), lse.stride(2),
            max_arg.stride(0), max_arg.stride(1),
            out_acc.stride(0), out_acc.stride(1), stat_acc.stride(0),
            HAS_SINK=attn_sink is not None, HAS_MAX=max_logits is not None,
            BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4)
