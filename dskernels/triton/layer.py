"""The DeepSeek-V3 layer's small fused kernels (dskernels.models uses them where
models.linear.triton_fusable allows; torch's ops are the definition):

- RMSNorm (`rms_norm`): HF's DeepseekV3RMSNorm, weight * (x * rsqrt(mean(x^2) + eps)) with the
  normalization in fp32 rounded to x's dtype, then the product with the weight rounded again: one
  kernel for torch's four (fp32 copy, F.rms_norm, cast back, multiply). The sum of squares is a
  tree reduction (torch's order differs: fp32 rounding apart, the same value). Optionally the
  residual add before it (the sum kept too) and the FP8 cast of its output after it.
- Rotary embedding of the query and key rope parts (`rope_qk`): the angles from the positions,
  cos and sin, both rotations, for torch's ~22 kernels. torch's arithmetic step by step: angle =
  float(position) * inv_freq in fp32, cos and sin (libdevice) times attention_factor rounded to
  the data's dtype, each product rounded to that dtype and the difference (sum) rounded again;
  fp32 data without contracting a * b - c * d into an FMA (enable_fp_fusion=False).
- The MoE's rows sorted by expert (`moe_sort_rows`): each (token, slot) pair's row in the
  layout the contiguous grouped GEMM reads (a stable sort by expert, experts elsewhere last), the
  group of each row, and the token's FP8 row and scales copied there: one kernel for torch's ~10
  (key, sort, group ids, token ids, the row gather, the per-row cast, the combine's inverse
  permutation), for up to MAX_SORTED_PAIRS pairs (decode; its work grows with their square).
- The MoE combine (`moe_combine`): each token's weighted sum of its experts' output rows (in the
  experts' sorted order), summed in fp32 in the order of its top-k slots and rounded once: one
  kernel for torch's seven (gather of the weights, fp32 copy, multiply, mask, zeros, index_add_,
  cast), and deterministic where CUDA's index_add_ adds with atomics in any order; then, in the
  same kernel, the tensors added after it (the shared experts' output, the residual), each sum
  rounded as torch's add rounds it.
- The paged latent cache write (`write_latent_cache`): [latent | k_rope] of each new token into
  its slot (cache_seqlens[b] + j through the block table), cast to the cache's dtype or, for a
  float8_e4m3fn cache, clamp(value / scale, -448, 448) rounded to e4m3: one kernel for the ~12
  of the slot arithmetic, concatenation and index_copy_.

Under the interpreter (CI) bf16 results are rounded by round_to_bf16 first (its conversion
truncates) and e4m3 ones by e4m3_bits (its fp8 cast rounds wrongly)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dskernels._device import on_tensor_device
from dskernels.triton import TL_DTYPES, next_power_of_2
from dskernels.triton.fp8_math import (cast_groups, ceil_to_power_of_two, max_nan, native_fp8_cast,
                                      reciprocal_scales, round_to_bf16, rounded_to, to_e4m3_bits)
from dskernels.triton.launch import fast


def _round_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


# ---- RMSNorm ----

@triton.jit
def _normalized_row(x_ptr, weight_ptr, out_ptr, addend_ptr, sum_ptr, row, dim, stride_x, stride_out, stride_addend,
                    stride_sum, eps, BLOCK: tl.constexpr, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
                    ADD: tl.constexpr):
    """Stores row `row` of the norm and returns it (fp32 values of DTYPE, [BLOCK], 0 past dim). ADD:
    the norm of x + addend, rounded to DTYPE as torch's add rounds it, and that sum stored too."""
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        x = rounded_to(x + tl.load(addend_ptr + row * stride_addend + cols, mask=ok, other=0.0).to(tl.float32),
                       DTYPE, ROUND_BF16)
        tl.store(sum_ptr + row * stride_sum + cols, x.to(DTYPE), mask=ok)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = rounded_to(x * inv_rms, DTYPE, ROUND_BF16)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = rounded_to(weight * normed, DTYPE, ROUND_BF16)
    tl.store(out_ptr + row * stride_out + cols, y.to(DTYPE), mask=ok)
    return y


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, addend_ptr, sum_ptr, dim, stride_x, stride_out, stride_addend,
                     stride_sum, eps, BLOCK: tl.constexpr, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
                     ADD: tl.constexpr):
    _normalized_row(x_ptr, weight_ptr, out_ptr, addend_ptr, sum_ptr, tl.program_id(0).to(tl.int64), dim, stride_x,
                    stride_out, stride_addend, stride_sum, eps, BLOCK, DTYPE, ROUND_BF16, ADD)


@triton.jit
def _rms_norm_cast_kernel(x_ptr, weight_ptr, out_ptr, addend_ptr, sum_ptr, fp8_ptr, scale_ptr, dim, stride_x,
                          stride_out, stride_addend, stride_sum, stride_fp8, stride_scale, eps, BLOCK: tl.constexpr,
                          DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, ADD: tl.constexpr,
                          ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    # The norm's row, then per_token_cast_to_fp8 of the values stored (dim % 128 == 0): its 128-wide
    # groups as the rows of cast_groups (those past dim are zeros, not stored).
    row = tl.program_id(0).to(tl.int64)
    y = _normalized_row(x_ptr, weight_ptr, out_ptr, addend_ptr, sum_ptr, row, dim, stride_x, stride_out,
                        stride_addend, stride_sum, eps, BLOCK, DTYPE, ROUND_BF16, ADD)
    bits, scale = cast_groups(tl.reshape(y, (BLOCK // 128, 128)), ROUND_SCALE, NATIVE)
    cols = tl.reshape(tl.arange(0, BLOCK), (BLOCK // 128, 128))
    tl.store(fp8_ptr + row * stride_fp8 + cols, bits, mask=cols < dim)
    groups = tl.arange(0, BLOCK // 128)
    tl.store(scale_ptr + row * stride_scale + groups, scale, mask=groups * 128 < dim)


@on_tensor_device
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_round_scale: bool | None = None,
             addend: torch.Tensor | None = None):
    """x [..., dim] (unit last stride, rows at any one stride), weight [dim] of x's dtype ->
    a new contiguous tensor of x's shape and dtype. cast_round_scale (not None; dim % 128 == 0):
    also per_token_cast_to_fp8 of the result's rows with that round_scale, in the same kernel:
    returns (result, (fp8 [rows, dim], scales [rows, dim / 128])), both contiguous. addend (x's
    shape and dtype, unit last stride, rows at any one stride): the norm of x + addend (torch's add,
    rounded to x's dtype), that sum returned first, as a new contiguous tensor: (sum, result) or
    (sum, result, (fp8, scales))."""
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)  # a view for the attention's strided latents too
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    add = addend is not None
    if add:
        assert addend.shape == x.shape and addend.dtype == x.dtype
        addend_rows = addend.reshape(-1, dim)
        total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    else:
        addend_rows = total = out  # (placeholders the kernel does not touch)
    cast = cast_round_scale is not None
    if cast:
        assert dim % 128 == 0
        fp8 = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty(rows.shape[0], dim // 128, dtype=torch.float32, device=x.device)
    if rows.shape[0] and dim:
        assert rows.stride(1) == 1 and addend_rows.stride(1) == 1 and weight.is_contiguous()
        block = next_power_of_2(dim)
        meta = dict(BLOCK=block, DTYPE=TL_DTYPES[x.dtype], ROUND_BF16=_round_bf16(x.dtype), ADD=add,
                    num_warps=8 if block >= 4096 else 4)
        args = (rows, weight, out, addend_rows, total)
        strides = (rows.stride(0), out.stride(0), addend_rows.stride(0), total.stride(0))
        if cast:
            fast(_rms_norm_cast_kernel)[(rows.shape[0],)](
                *args, fp8.view(torch.uint8), scale, dim, *strides, fp8.stride(0), scale.stride(0), float(eps),
                ROUND_SCALE=cast_round_scale, NATIVE=native_fp8_cast(x.device), **meta)
        else:
            fast(_rms_norm_kernel)[(rows.shape[0],)](*args, dim, *strides, float(eps), **meta)
    result = (out.view(x.shape), (fp8, scale)) if cast else (out.view(x.shape),)
    if add:
        return (total.view(x.shape), *result)
    return result if cast else result[0]


# ---- rotary embedding ----

@triton.jit
def _rotate(x_ptr, out_ptr, stride_xh, stride_oh, heads, cos, sin, INTERLEAVE: tl.constexpr,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, DTYPE: tl.constexpr,
            ROUND_BF16: tl.constexpr):
    """One token's [heads, 2 * HALF] rope values (unit stride along the last dimension) rotated
    into out: pairs (2i, 2i + 1) with INTERLEAVE, else (i, i + HALF); out is [evens', odds'] either
    way (models/rope.py's apply_rope)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (h < heads) & (j < HALF)
    first = 2 * j if INTERLEAVE else j
    second = 2 * j + 1 if INTERLEAVE else j + HALF
    x1 = tl.load(x_ptr + h * stride_xh + first, mask=ok, other=0.0)
    x2 = tl.load(x_ptr + h * stride_xh + second, mask=ok, other=0.0)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # every product and sum rounded to the data's dtype, as torch's bf16/fp16 ops round each result
    a = rounded_to(x1 * cos, DTYPE, ROUND_BF16) - rounded_to(x2 * sin, DTYPE, ROUND_BF16)
    b = rounded_to(x2 * cos, DTYPE, ROUND_BF16) + rounded_to(x1 * sin, DTYPE, ROUND_BF16)
    tl.store(out_ptr + h * stride_oh + j, rounded_to(a, DTYPE, ROUND_BF16).to(DTYPE), mask=ok)
    tl.store(out_ptr + h * stride_oh + HALF + j, rounded_to(b, DTYPE, ROUND_BF16).to(DTYPE), mask=ok)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, inv_freq_ptr, attention_factor, heads,
                    stride_qt, stride_qh, stride_kt, stride_qot, stride_qoh, stride_kot,
                    INTERLEAVE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Program t: token t's query heads [heads, 2 * HALF] and its one key [2 * HALF]."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    angle = tl.load(positions_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    cos = rounded_to(tl.cos(angle) * attention_factor, DTYPE, ROUND_BF16)
    sin = rounded_to(tl.sin(angle) * attention_factor, DTYPE, ROUND_BF16)
    _rotate(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, heads, cos, sin,
            INTERLEAVE, HALF, BLOCK_H, BLOCK_HALF, DTYPE, ROUND_BF16)
    _rotate(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, 0, 0, 1, cos, sin, INTERLEAVE, HALF, 1, BLOCK_HALF,
            DTYPE, ROUND_BF16)


@on_tensor_device
def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            attention_factor: float, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, dim], k [T, dim] (unit stride along dim, any other strides), positions int64 [T],
    inv_freq fp32 [dim / 2] -> rotated (q [T, heads, dim], k [T, dim]), new contiguous tensors."""
    tokens, heads, dim = q.shape
    q_out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(tokens, dim, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    assert q.stride(2) == 1 and k.stride(1) == 1 and positions.stride(0) == 1 and inv_freq.is_contiguous()
    half = dim // 2
    fast(_rope_qk_kernel)[(tokens,)](q, k, q_out, k_out, positions, inv_freq, float(attention_factor), heads,
                                     q.stride(0), q.stride(1), k.stride(0), q_out.stride(0), q_out.stride(1),
                                     k_out.stride(0), INTERLEAVE=interleave, HALF=half, BLOCK_H=next_power_of_2(heads),
                                     BLOCK_HALF=next_power_of_2(half), DTYPE=TL_DTYPES[q.dtype],
                                     ROUND_BF16=_round_bf16(q.dtype),
                                     num_warps=4, enable_fp_fusion=False)
    return q_out, k_out

# ---- the paged cache writes ----

@triton.jit
def _cache_slot(table_ptr, seqlens_ptr, t, s, page_size, max_pages, num_pages, stride_tb, stride_te):
    """New token t = (sequence b, j): (page, offset in it, whether it has a slot) of cache slot
    cache_seqlens[b] + j through the block table. A negative slot, one past the block table or a
    page id outside the cache has none (as the torch path, models/paged.py: nothing is written)."""
    b = t // s
    slot = tl.load(seqlens_ptr + b) + t % s
    entry = slot // page_size
    inside = (slot >= 0) & (entry < max_pages)  # (// and % truncate toward zero: a negative slot is out)
    page = tl.load(table_ptr + b.to(tl.int64) * stride_tb + entry * stride_te, mask=inside, other=-1).to(tl.int64)
    return page, slot % page_size, inside & (page >= 0) & (page < num_pages)


@triton.jit
def _le_bytes(bits, WIDTH: tl.constexpr):
    """int32 [n] -> their WIDTH low bytes, little-endian, as uint8 [n, WIDTH] (a value's bytes in memory)."""
    shifts = 8 * tl.arange(0, WIDTH)
    return ((bits[:, None] >> shifts[None, :]) & 0xFF).to(tl.uint8)


@triton.jit
def _write_latent_cache_kernel(latent_ptr, rope_ptr, cache_ptr, table_ptr, seqlens_ptr, scale_ptr, s, page_size,
                               max_pages, num_pages, stride_lt, stride_rt, stride_tb, stride_te, stride_cp,
                               RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                               FP8: tl.constexpr, NATIVE: tl.constexpr):
    """Program t = (sequence b, new token j): its latent [RANK] and roped key [ROPE] into cache row
    page * page_size + offset (_cache_slot; nothing where it has no slot)."""
    t = tl.program_id(0)
    page, offset, ok = _cache_slot(table_ptr, seqlens_ptr, t, s, page_size, max_pages, num_pages, stride_tb,
                                   stride_te)
    row = cache_ptr + (page * page_size + offset) * stride_cp
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    latent = tl.load(latent_ptr + t.to(tl.int64) * stride_lt + r, mask=r < RANK, other=0.0)
    rope = tl.load(rope_ptr + t.to(tl.int64) * stride_rt + p, mask=p < ROPE, other=0.0)
    if FP8:  # the e4m3 cache stores clamp(value / scale) (div_rn: torch's IEEE division), as bytes
        scale = tl.load(scale_ptr)
        # NaN stays NaN (torch's clamp keeps it; e4m3's NaN byte), not +-448
        latent = tl.clamp(tl.math.div_rn(latent.to(tl.float32), tl.full((BLOCK_R,), 1.0, tl.float32) * scale),
                          -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        rope = tl.clamp(tl.math.div_rn(rope.to(tl.float32), tl.full((BLOCK_P,), 1.0, tl.float32) * scale),
                        -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(row + r, to_e4m3_bits(latent, NATIVE), mask=ok & (r < RANK))
        tl.store(row + RANK + p, to_e4m3_bits(rope, NATIVE), mask=ok & (p < ROPE))
    else:
        tl.store(row + r, latent.to(cache_ptr.dtype.element_ty), mask=ok & (r < RANK))
        tl.store(row + RANK + p, rope.to(cache_ptr.dtype.element_ty), mask=ok & (p < ROPE))


@on_tensor_device
def write_latent_cache(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, scale: torch.Tensor | None) -> None:
    """latent [B, S, rank], k_rope [B, S, rope] (unit last stride, rows at one stride each) of the
    cache's dtype (float caches) or any float dtype (a float8_e4m3fn cache, with scale: fp32 [1]
    on the device, positive);
    kv_cache [num_pages, page_size, 1, rank + rope] contiguous; block_table int32 [B, max_pages];
    cache_seqlens int32 [B]. Token j of sequence b goes to slot
    cache_seqlens[b] + j."""
    b, s, rank = latent.shape
    rope = k_rope.shape[-1]
    if b * s == 0:
        return
    latent2, rope2 = latent.reshape(b * s, rank), k_rope.reshape(b * s, rope)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    cache = kv_cache.view(torch.uint8) if fp8 else kv_cache
    assert fp8 or latent.dtype == k_rope.dtype == kv_cache.dtype  # stored as they are, no rounding
    assert latent2.stride(1) == 1 and rope2.stride(1) == 1 and kv_cache.is_contiguous()
    fast(_write_latent_cache_kernel)[(b * s,)](
        latent2, rope2, cache, block_table, cache_seqlens.contiguous(), scale if fp8 else cache_seqlens, s,
        kv_cache.shape[1], block_table.shape[1], kv_cache.shape[0], latent2.stride(0), rope2.stride(0),
        block_table.stride(0), block_table.stride(1), kv_cache.stride(1), RANK=rank, ROPE=rope, BLOCK_R=next_power_of_2(rank),
        BLOCK_P=next_power_of_2(rope), FP8=fp8, NATIVE=fp8 and native_fp8_cast(kv_cache.device), num_warps=4)


# V3.2's FP8 latent cache (python_ref/mla_sparse.py): per token 512 e4m3 latents, 4 fp32 scales (one
# per 128, powers of two, floored at 1e-4), 64 bf16 rope values: 656 bytes.
SPARSE_RANK, SPARSE_ROPE, SPARSE_TILE, SPARSE_TOKEN_BYTES = 512, 64, 128, 656


@triton.jit
def _write_sparse_latent_kernel(latent_ptr, rope_ptr, cache_ptr, table_ptr, seqlens_ptr, s, page_size, max_pages,
                                num_pages, stride_lt, stride_rt, stride_tb, stride_te, stride_cp, RANK: tl.constexpr,
                                ROPE: tl.constexpr, TILE: tl.constexpr, ROPE_BITS: tl.constexpr,
                                ROUND_BF16: tl.constexpr, NATIVE: tl.constexpr):
    """Program t: its [latent | rope] quantized into V3.2's layout (quantize_sparse_kv_cache's math)
    at its cache row (_cache_slot; nothing where it has no slot). ROPE_BITS: the rope is bf16
    already, read as its int16 bits and stored as they are."""
    t = tl.program_id(0)
    page, offset, ok = _cache_slot(table_ptr, seqlens_ptr, t, s, page_size, max_pages, num_pages, stride_tb,
                                   stride_te)
    row = cache_ptr + (page * page_size + offset) * stride_cp
    cols = tl.reshape(tl.arange(0, RANK), (RANK // TILE, TILE))
    tiles = tl.load(latent_ptr + t.to(tl.int64) * stride_lt + cols).to(tl.float32)
    scale = tl.math.div_rn(max_nan(tl.abs(tiles), 1), tl.full((RANK // TILE,), 448.0, tl.float32))
    scale = ceil_to_power_of_two(tl.maximum(scale, 1e-4, propagate_nan=tl.PropagateNan.ALL))
    multiplier = tl.math.div_rn(tl.full((RANK // TILE,), 1.0, tl.float32), scale)
    tl.store(row + cols, to_e4m3_bits(tiles * multiplier[:, None], NATIVE), mask=ok)
    tile_bytes = tl.arange(0, RANK // TILE)[:, None] * 4 + tl.arange(0, 4)[None, :]
    tl.store(row + RANK + tile_bytes, _le_bytes(scale.to(tl.int32, bitcast=True), 4), mask=ok)
    p = tl.arange(0, ROPE)
    rope = tl.load(rope_ptr + t.to(tl.int64) * stride_rt + p)
    if ROPE_BITS:
        rope_bits = rope.to(tl.int32)
    elif ROUND_BF16:  # the interpreter's bf16 conversion truncates: rounded by hand
        rope_bits = round_to_bf16(rope.to(tl.float32)).to(tl.int32, bitcast=True) >> 16
    else:
        rope_bits = rope.to(tl.float32).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
    rope_bytes = p[:, None] * 2 + tl.arange(0, 2)[None, :]
    tl.store(row + RANK + 4 * (RANK // TILE) + rope_bytes, _le_bytes(rope_bits, 2), mask=ok)


@on_tensor_device
def write_sparse_latent_cache(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor,
                              block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """V3.2's FP8 cache: latent [B, S, 512], k_rope [B, S, 64] (bf16, fp16 or fp32; unit last
    stride, rows at one stride each) quantized as quantize_sparse_kv_cache does into kv_cache
    [num_pages, page_size, 1, 656] (uint8 or float8_e4m3fn, contiguous) at slot cache_seqlens[b] + j
    through block_table (int32 [B, max_pages]; cache_seqlens int32 [B])."""
    b, s, rank = latent.shape
    if b * s == 0:
        return
    assert rank == SPARSE_RANK and k_rope.shape[-1] == SPARSE_ROPE and kv_cache.shape[-1] == SPARSE_TOKEN_BYTES
    latent2, rope2 = latent.reshape(b * s, rank), k_rope.reshape(b * s, SPARSE_ROPE)
    assert latent2.stride(1) == 1 and rope2.stride(1) == 1 and kv_cache.is_contiguous()
    rope_bits = rope2.dtype == torch.bfloat16  # (no conversion: the interpreter's loses bf16 subnormals)
    fast(_write_sparse_latent_kernel)[(b * s,)](
        latent2, rope2.view(torch.int16) if rope_bits else rope2, kv_cache.view(torch.uint8), block_table, cache_seqlens.contiguous(), s, kv_cache.shape[1],
        block_table.shape[1], kv_cache.shape[0], latent2.stride(0), rope2.stride(0), block_table.stride(0),
        block_table.stride(1), kv_cache.stride(1), RANK=SPARSE_RANK, ROPE=SPARSE_ROPE, TILE=SPARSE_TILE,
        ROPE_BITS=rope_bits, ROUND_BF16=os.environ.get("TRITON_INTERPRET") == "1", NATIVE=native_fp8_cast(kv_cache.device), num_warps=4)


@triton.jit
def _write_index_keys_kernel(k_ptr, cache_ptr, table_ptr, seqlens_ptr, s, page_size, max_pages, num_pages, dim,
                             stride_kt, stride_page, stride_tb, stride_te, BLOCK_D: tl.constexpr,
                             ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    """Program t: its indexer key [dim] cast per_custom_dims_cast_to_fp8(k, (0,)) does it into
    DeepGEMM's paged layout (per page: page_size rows of dim e4m3 bytes, then page_size fp32 scales)
    at its slot (_cache_slot)."""
    t = tl.program_id(0)
    page, offset, ok = _cache_slot(table_ptr, seqlens_ptr, t, s, page_size, max_pages, num_pages, stride_tb,
                                   stride_te)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + d, mask=d < dim, other=0.0).to(tl.float32)
    amax = tl.maximum(max_nan(tl.abs(k[None, :]), 1), 1e-4, propagate_nan=tl.PropagateNan.ALL)  # [1]
    multiplier, scale = reciprocal_scales(amax, ROUND_SCALE)
    base = cache_ptr + page * stride_page
    tl.store(base + offset * dim + d, to_e4m3_bits(k * multiplier, NATIVE), mask=ok & (d < dim))
    b = tl.arange(0, 4)
    tl.store(base + page_size * dim + offset * 4 + b[None, :], _le_bytes(scale.to(tl.int32, bitcast=True), 4),
             mask=ok)


@on_tensor_device
def write_index_keys(k: torch.Tensor, index_cache: torch.Tensor, block_table: torch.Tensor,
                     cache_seqlens: torch.Tensor, round_scale: bool) -> None:
    """V3.2's indexer keys k [B, S, D] (bf16, fp16 or fp32, unit last stride, rows at one stride)
    cast to FP8 (one scale per key; round_scale: a power of two) into index_cache [num_pages,
    page_size, 1, D + 4] (uint8, contiguous: DeepGEMM's paged layout) at slot cache_seqlens[b] + j."""
    b, s, dim = k.shape
    if b * s == 0:
        return
    k2 = k.reshape(b * s, dim)
    assert k2.stride(1) == 1 and index_cache.is_contiguous() and index_cache.shape[-1] == dim + 4
    fast(_write_index_keys_kernel)[(b * s,)](
        k2, index_cache.view(torch.uint8), block_table, cache_seqlens.contiguous(), s, index_cache.shape[1],
        block_table.shape[1], index_cache.shape[0], dim, k2.stride(0), index_cache.stride(0), block_table.stride(0),
        block_table.stride(1), BLOCK_D=next_power_of_2(dim), ROUND_SCALE=round_scale,
        NATIVE=native_fp8_cast(index_cache.device), num_warps=4)


# ---- the MoE's rows sorted by expert ----

MAX_SORTED_PAIRS = 8192  # (token, slot) pairs moe_sort_rows takes (1024 tokens of 8 experts)


@triton.jit
def _moe_sort_rows_kernel(idx_ptr, x_ptr, sx_ptr, a_ptr, sa_ptr, m_indices_ptr, position_ptr, pairs, experts,
                          row_bytes, scale_cols, stride_it, stride_ik, stride_x, stride_sxt, stride_sxc, stride_a,
                          stride_sat, stride_sac, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
                          BLOCK_BYTES: tl.constexpr, BLOCK_SCALES: tl.constexpr):
    """Program t: token t's K pairs p = t * K + k. A pair's key is its expert, or `experts` for an id
    outside [0, experts); its row is the number of pairs ordered before it by (key, p): torch's
    stable sort by key. Writes position[p] = row, m_indices[row] = key, and token t's FP8 row
    (bytes) and scales (as int32 bits) into each of its K rows."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    in_token = slot < K
    mine = t * K + slot
    e = tl.load(idx_ptr + t * stride_it + slot * stride_ik, mask=in_token, other=-1)
    key = tl.where((e >= 0) & (e < experts), e, experts)
    row = tl.zeros((K_PAD,), dtype=tl.int64)
    for start in range(0, pairs, BLOCK_PAIRS):
        q = start + tl.arange(0, BLOCK_PAIRS).to(tl.int64)
        e_q = tl.load(idx_ptr + (q // K) * stride_it + (q % K) * stride_ik, mask=q < pairs, other=-1)
        key_q = tl.where((e_q >= 0) & (e_q < experts), e_q, experts)  # (lanes past the pairs: `experts`, after all)
        before = (key_q[None, :] < key[:, None]) | ((key_q[None, :] == key[:, None]) & (q[None, :] < mine[:, None]))
        row += tl.sum(before.to(tl.int64), axis=1)
    tl.store(position_ptr + mine, row, mask=in_token)
    tl.store(m_indices_ptr + row, key.to(tl.int32), mask=in_token)
    for start in range(0, row_bytes, BLOCK_BYTES):
        cols = start + tl.arange(0, BLOCK_BYTES)
        ok = cols < row_bytes
        values = tl.load(x_ptr + t * stride_x + cols, mask=ok, other=0)
        tl.store(a_ptr + row[:, None] * stride_a + cols[None, :],
                 tl.broadcast_to(values[None, :], (K_PAD, BLOCK_BYTES)), mask=in_token[:, None] & ok[None, :])
    c = tl.arange(0, BLOCK_SCALES)
    scales = tl.load(sx_ptr + t * stride_sxt + c * stride_sxc, mask=c < scale_cols, other=0)
    tl.store(sa_ptr + row[:, None] * stride_sat + c[None, :] * stride_sac,
             tl.broadcast_to(scales[None, :], (K_PAD, BLOCK_SCALES)),
             mask=in_token[:, None] & (c < scale_cols)[None, :])


@on_tensor_device
def moe_sort_rows(x_fp8: torch.Tensor, scales: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """x_fp8 [T, H] float8_e4m3fn and its scales fp32 [T, H / 128] (any strides),
    topk_idx int [T, K] (ids outside [0, num_experts), e.g. -1: no expert here), T * K <=
    MAX_SORTED_PAIRS -> ((a [T * K, H], sa [T * K, H / 128]), m_indices int32 [T * K], positions
    int64 [T * K]): what Experts.forward's torch ops make (models/moe.py): the pairs sorted stably
    by expert, those of no expert last (m_indices: the expert, num_experts for those), each row
    token t's cast row for pair (t, k) at row positions[t * K + k]. sa in DeepGEMM's column-major
    TMA-aligned layout (get_col_major_tma_aligned_tensor's: the sm90 GEMMs take it without a copy)."""
    tokens, k = topk_idx.shape
    hidden, groups = x_fp8.shape[1], scales.shape[1]
    pairs = tokens * k
    assert pairs <= MAX_SORTED_PAIRS and x_fp8.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert x_fp8.shape == (tokens, hidden) and scales.shape == (tokens, -(-hidden // 128)) and hidden % 128 == 0
    assert topk_idx.dtype in (torch.int64, torch.int32)
    x_fp8 = x_fp8 if x_fp8.stride(1) == 1 else x_fp8.contiguous()
    device = x_fp8.device
    a = torch.empty(pairs, hidden, dtype=torch.float8_e4m3fn, device=device)
    aligned = -(-pairs // 4) * 4  # 16-byte columns of fp32
    sa = torch.empty(groups, aligned, dtype=torch.float32, device=device).t()[:pairs]
    m_indices = torch.empty(pairs, dtype=torch.int32, device=device)
    positions = torch.empty(pairs, dtype=torch.int64, device=device)
    if pairs:
        a_bytes, sx_bits, sa_bits = a.view(torch.uint8), scales.view(torch.int32), sa.view(torch.int32)
        fast(_moe_sort_rows_kernel)[(tokens,)](
            topk_idx, x_fp8.view(torch.uint8), sx_bits, a_bytes, sa_bits, m_indices, positions, pairs, num_experts,
            hidden, groups, topk_idx.stride(0), topk_idx.stride(1), x_fp8.stride(0), sx_bits.stride(0),
            sx_bits.stride(1), a_bytes.stride(0), sa_bits.stride(0), sa_bits.stride(1), K=k,
            K_PAD=next_power_of_2(k), BLOCK_PAIRS=min(256, next_power_of_2(pairs)),
            BLOCK_BYTES=min(1024, next_power_of_2(hidden)), BLOCK_SCALES=next_power_of_2(groups), num_warps=4)
    return (a, sa), m_indices, positions


# ---- the MoE combine ----

@triton.jit
def _moe_combine_kernel(y_ptr, position_ptr, idx_ptr, weight_ptr, first_ptr, second_ptr, out_ptr, hidden, experts,
                        stride_y, stride_idx, stride_w, stride_first, stride_second, stride_out, K: tl.constexpr,
                        ADDENDS: tl.constexpr, BLOCK_H: tl.constexpr, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Program (token t, column block): out[t] = sum over slots k with 0 <= idx[t, k] < experts of
    weight[t, k] * y[position[t * K + k]], in fp32, slot by slot, rounded to DTYPE; then plus
    first[t] (ADDENDS >= 1) and second[t] (ADDENDS == 2), each sum rounded to DTYPE."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        expert = tl.load(idx_ptr + t * stride_idx + k)
        weight = tl.load(weight_ptr + t * stride_w + k)
        row = tl.load(position_ptr + t * K + k).to(tl.int64)
        if (expert >= 0) & (expert < experts):  # a slot routed elsewhere (-1) adds nothing: its row holds no result
            acc += tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32) * weight
    out = rounded_to(acc, DTYPE, ROUND_BF16)
    if ADDENDS >= 1:
        out = rounded_to(out + tl.load(first_ptr + t * stride_first + cols, mask=ok, other=0.0).to(tl.float32),
                         DTYPE, ROUND_BF16)
    if ADDENDS >= 2:
        out = rounded_to(out + tl.load(second_ptr + t * stride_second + cols, mask=ok, other=0.0).to(tl.float32),
                         DTYPE, ROUND_BF16)
    tl.store(out_ptr + t * stride_out + cols, out.to(DTYPE), mask=ok)


@on_tensor_device
def moe_combine(y: torch.Tensor, positions: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                num_experts: int, out_dtype: torch.dtype, addends: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """y [T * K, H] (the experts' output rows, unit last stride), positions int64 [T * K] (the row
    of y holding slot t * K + k), topk_idx [T, K] (ids outside [0, num_experts), e.g. -1: no expert
    here, as Experts.forward's padding rows), topk_weights fp32 [T, K] -> out [T, H] in out_dtype
    (bf16, fp16 or fp32). addends: up to two [T, H] tensors of out_dtype, added in order after the
    weighted sum, each sum rounded to out_dtype (torch's `out + addend`)."""
    tokens, k = topk_idx.shape
    hidden = y.shape[1]
    out = torch.empty(tokens, hidden, dtype=out_dtype, device=y.device)
    if tokens == 0 or hidden == 0:
        return out
    assert y.stride(1) == 1 and positions.is_contiguous() and topk_weights.dtype == torch.float32
    assert len(addends) <= 2 and all(t.dtype == out_dtype and t.shape == out.shape for t in addends)
    addends = tuple(t if t.stride(1) == 1 else t.contiguous() for t in addends)
    first, second = (*addends, out, out)[:2]  # (out: a placeholder the kernel does not read)
    topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()  # (views as they come: no copy)
    block = min(1024, next_power_of_2(hidden))
    fast(_moe_combine_kernel)[(tokens, -(-hidden // block))](
        y, positions, topk_idx, topk_weights, first, second, out, hidden, num_experts, y.stride(0), topk_idx.stride(0),
        topk_weights.stride(0), first.stride(0), second.stride(0), out.stride(0), K=k, ADDENDS=len(addends),
        BLOCK_H=block, DTYPE=TL_DTYPES[out_dtype], ROUND_BF16=_round_bf16(out_dtype), num_warps=4)
    return out
