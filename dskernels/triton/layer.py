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
  group of each row, and the token's row (FP8 with its scales, or float) copied there: one kernel
  for torch's ~10 (key, sort, group ids, token ids, the row gather, the per-row cast, the combine's
  inverse permutation), for up to MAX_SORTED_PAIRS pairs (decode; its work grows with their square).
- The MoE combine (`moe_combine`): each token's weighted sum of its experts' output rows (in the
  experts' sorted order), summed in fp32 in the order of its top-k slots and rounded once: one
  kernel for torch's gathers, multiplies, masks and adds in the same order (Experts.forward's
  fallback, which used index_add_: on CUDA atomics in any order); then, in the
  same kernel, the tensors added after it (the shared experts' output, the residual), each sum
  rounded as torch's add rounds it.
- The paged latent cache write (`write_latent_cache`): [latent | k_rope] of each new token into
  its slot (cache_seqlens[b] + j through the block table), cast to the cache's dtype or, for a
  float8_e4m3fn cache, clamp(value / scale, -448, 448) rounded to e4m3: one kernel for the ~12
  of the slot arithmetic, concatenation and index_copy_. V3.2's FP8 latent layout likewise
  (`write_sparse_latent_cache`).
- V3.2's FP8 indexer after its projections (`indexer_qk`): k_norm, the rope of q and k, the
  Hadamard rotation, the FP8 casts (q's scales folded into the head weights) and the key's write
  into its cache slot, for torch's ~40 kernels; its selection's post-processing
  (`topk_positions`, `selected_slots`: positions to cache slots through the block table).

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


# ---- V3.2's indexer: its FP8 queries and keys from the projections ----

@triton.jit
def _rotation_signs(rotation_ptr, first, count, dim, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """The signs (+-1, exact in any float type) of rows [first, first + count) of the [dim, dim]
    Hadamard rotation (entries +-dim**-0.5) as [BLOCK, BLOCK_D] in DOT, zero past them."""
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK_D)[None, :]
    entry = tl.load(rotation_ptr + (first + r) * dim + c, mask=(r < count) & (c < dim), other=0.0)
    return tl.where(entry > 0, 1.0, tl.where(entry < 0, -1.0, 0.0)).to(DOT)


@triton.jit
def _signed_sum(x, signs, acc, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """acc + x @ signs on the tensor cores. Values times +-1 are exact in DOT (bf16 / fp16 data) and
    summed in fp32; SPLIT: fp32 data as three bf16 parts (8 + 8 + 8 of its 24 bits, each exact)."""
    if SPLIT:
        high = x.to(DOT)
        rest = x - high.to(tl.float32)
        middle = rest.to(DOT)
        acc = tl.dot(high, signs, acc, input_precision="ieee")
        acc = tl.dot(middle, signs, acc, input_precision="ieee")
        return tl.dot((rest - middle.to(tl.float32)).to(DOT), signs, acc, input_precision="ieee")
    return tl.dot(x.to(DOT), signs, acc, input_precision="ieee")


@triton.jit
def _rotated(x1, x2, rest, signs1, signs2, signs3, norm, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """[x1 | x2 | rest] @ rotation: three products with its signs (_signed_sum), times its norm
    (dim**-0.5, fp32): torch's fp32 product to rounding."""
    out = _signed_sum(x1, signs1, None, DOT, SPLIT)
    out = _signed_sum(x2, signs2, out, DOT, SPLIT)
    return _signed_sum(rest, signs3, out, DOT, SPLIT) * norm


@triton.jit
def _rotate_half(x1, x2, cos, sin, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """apply_rope's rotate_half pairs (x1[i], x2[i]) as torch rounds them: each product, then the
    difference (sum), rounded to the data's dtype."""
    a = rounded_to(x1 * cos, DTYPE, ROUND_BF16) - rounded_to(x2 * sin, DTYPE, ROUND_BF16)
    b = rounded_to(x2 * cos, DTYPE, ROUND_BF16) + rounded_to(x1 * sin, DTYPE, ROUND_BF16)
    return rounded_to(a, DTYPE, ROUND_BF16), rounded_to(b, DTYPE, ROUND_BF16)


@triton.jit
def _layer_normed(k_ptr, w_ptr, b_ptr, at, ok, mean, rstd, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """k_norm's output (fp32 math, rounded to the data's dtype) at the columns `at` of one key."""
    k = tl.load(k_ptr + at, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + at, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + at, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, rounded_to((k - mean) * rstd * w + b, DTYPE, ROUND_BF16), 0.0)


@triton.jit
def _indexer_key(key, norm_w_ptr, norm_b_ptr, k8_ptr, k_scale_ptr, cache_ptr, table_ptr, seqlens_ptr, t, cos, sin,
                 signs1, signs2, signs3, norm, eps, dim, s, page_size, max_pages, num_pages, stride_page, stride_tb,
                 stride_te, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                 BLOCK_D: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr,
                 ROUND_BF16: tl.constexpr, ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """_indexer_qk_kernel's key of token t (wk's output row at `key`): LayerNorm's statistics over
    the row, then the query's steps on one row, and its cast stored."""
    i = tl.arange(0, BLOCK_HALF)
    c = tl.arange(0, BLOCK_REST)
    d = tl.arange(0, BLOCK_D)
    rest = dim - 2 * HALF
    raw = tl.load(key + d[None, :], mask=d[None, :] < dim, other=0.0).to(tl.float32)  # [1, BLOCK_D]
    width = tl.full((1,), dim, tl.float32)
    mean = tl.math.div_rn(tl.sum(raw, 1), width)  # [1]
    centered = tl.where(d[None, :] < dim, raw - mean[:, None], 0.0)
    variance = tl.math.div_rn(tl.sum(centered * centered, 1), width)
    rstd = tl.math.div_rn(tl.full((1,), 1.0, tl.float32), tl.math.sqrt_rn(variance + eps))
    k1 = _layer_normed(key, norm_w_ptr, norm_b_ptr, i, i < HALF, mean, rstd, DTYPE, ROUND_BF16)
    k2 = _layer_normed(key, norm_w_ptr, norm_b_ptr, HALF + i, i < HALF, mean, rstd, DTYPE, ROUND_BF16)
    kr = _layer_normed(key, norm_w_ptr, norm_b_ptr, 2 * HALF + c, c < rest, mean, rstd, DTYPE, ROUND_BF16)
    k1, k2 = _rotate_half(k1, k2, cos, sin, DTYPE, ROUND_BF16)
    # rotated as q is: the key is row 0 of a 16-row tile (the tensor cores' least)
    first = tl.arange(0, 16)[:, None] == 0
    k = _rotated(tl.where(first, k1[None, :], 0.0), tl.where(first, k2[None, :], 0.0), tl.where(first, kr[None, :], 0.0),
                 signs1, signs2, signs3, norm, DOT, SPLIT)
    k = rounded_to(tl.sum(tl.where(first, k, 0.0), 0), DTYPE, ROUND_BF16)
    k_amax = tl.maximum(max_nan(tl.abs(k[None, :]), 1), 1e-4, propagate_nan=tl.PropagateNan.ALL)  # [1]
    k_multiplier, k_scale = reciprocal_scales(k_amax, ROUND_SCALE)
    bits = to_e4m3_bits(k * k_multiplier, NATIVE)
    if WRITE_CACHE:  # per page: page_size rows of dim e4m3 bytes, then page_size fp32 scales
        page, offset, ok = _cache_slot(table_ptr, seqlens_ptr, t, s, page_size, max_pages, num_pages, stride_tb,
                                       stride_te)
        base = cache_ptr + page * stride_page
        tl.store(base + offset * dim + d, bits, mask=ok & (d < dim))
        b = tl.arange(0, 4)
        tl.store(base + page_size * dim + offset * 4 + b[None, :], _le_bytes(k_scale.to(tl.int32, bitcast=True), 4),
                 mask=ok)
    else:
        tl.store(k8_ptr + t.to(tl.int64) * dim + d, bits, mask=d < dim)
        tl.store(k_scale_ptr + t.to(tl.int64) + tl.arange(0, 1), k_scale)


@triton.jit
def _indexer_qk_kernel(q_ptr, k_ptr, weights_ptr, norm_w_ptr, norm_b_ptr, positions_ptr, inv_freq_ptr, rotation_ptr,
                       q8_ptr, weights_out_ptr, k8_ptr, k_scale_ptr, cache_ptr, table_ptr, seqlens_ptr,
                       attention_factor, weight_scale, eps, heads, dim, s, page_size, max_pages, num_pages,
                       stride_qt, stride_qh, stride_kt, stride_wt, stride_page, stride_tb, stride_te,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                       BLOCK_D: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr,
                       ROUND_BF16: tl.constexpr, ROUND_SCALE: tl.constexpr, NATIVE: tl.constexpr,
                       WRITE_CACHE: tl.constexpr):
    """Program (t, g): token t's indexer query heads [g * BLOCK_H, (g + 1) * BLOCK_H) and (g = 0)
    its key (_indexer_key) from wq_b's and wk's outputs, the torch path's steps (models/indexer.py):
    k_norm (the key), rope on the first 2 * HALF columns (rotate_half pairs), the rotation (q @
    rotation in fp32, rounded to the data's dtype), then the FP8 casts: q one scale per head (folded
    into the head weights, with weight_scale), the key one scale, stored at its cache slot
    (WRITE_CACHE: DeepGEMM's paged layout, _cache_slot) or in k8 / k_scale. The three column ranges
    (rope halves, the rest) are loaded apart, so that the rotation is three products summed
    (_rotated: the same value as torch's one product, to fp32 rounding)."""
    t = tl.program_id(0)
    t64 = t.to(tl.int64)
    rest = dim - 2 * HALF
    i = tl.arange(0, BLOCK_HALF)
    angle = tl.load(positions_ptr + t64).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    cos = rounded_to(tl.cos(angle) * attention_factor, DTYPE, ROUND_BF16)
    sin = rounded_to(tl.sin(angle) * attention_factor, DTYPE, ROUND_BF16)
    signs1 = _rotation_signs(rotation_ptr, 0, HALF, dim, BLOCK_HALF, BLOCK_D, DOT)
    signs2 = _rotation_signs(rotation_ptr, HALF, HALF, dim, BLOCK_HALF, BLOCK_D, DOT)
    signs3 = _rotation_signs(rotation_ptr, 2 * HALF, rest, dim, BLOCK_REST, BLOCK_D, DOT)
    norm = tl.abs(tl.load(rotation_ptr))
    d = tl.arange(0, BLOCK_D)
    c = tl.arange(0, BLOCK_REST)

    # this program's query heads [BLOCK_H, ...]
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    row = q_ptr + t64 * stride_qt + h * stride_qh
    half_ok = (h < heads) & (i[None, :] < HALF)
    q1 = tl.load(row + i[None, :], mask=half_ok, other=0.0).to(tl.float32)
    q2 = tl.load(row + HALF + i[None, :], mask=half_ok, other=0.0).to(tl.float32)
    qr = tl.load(row + 2 * HALF + c[None, :], mask=(h < heads) & (c[None, :] < rest), other=0.0).to(tl.float32)
    q1, q2 = _rotate_half(q1, q2, cos[None, :], sin[None, :], DTYPE, ROUND_BF16)
    q = rounded_to(_rotated(q1, q2, qr, signs1, signs2, signs3, norm, DOT, SPLIT), DTYPE, ROUND_BF16)
    amax = tl.maximum(max_nan(tl.abs(q), 1), 1e-4, propagate_nan=tl.PropagateNan.ALL)  # [BLOCK_H]
    multiplier, scale = reciprocal_scales(amax, ROUND_SCALE)
    tl.store(q8_ptr + (t64 * heads + h) * dim + d[None, :], to_e4m3_bits(q * multiplier[:, None], NATIVE),
             mask=(h < heads) & (d[None, :] < dim))
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    w = tl.load(weights_ptr + t64 * stride_wt + head, mask=head < heads, other=0.0)
    tl.store(weights_out_ptr + t64 * heads + head, (w * weight_scale) * scale, mask=head < heads)
    if tl.program_id(1) == 0:  # the key, once per token
        _indexer_key(k_ptr + t64 * stride_kt, norm_w_ptr, norm_b_ptr, k8_ptr, k_scale_ptr, cache_ptr, table_ptr,
                     seqlens_ptr, t, cos, sin, signs1, signs2, signs3, norm, eps, dim, s, page_size, max_pages,
                     num_pages, stride_page, stride_tb, stride_te, HALF, BLOCK_HALF, BLOCK_REST, BLOCK_D, DTYPE, DOT,
                     SPLIT, ROUND_BF16, ROUND_SCALE, NATIVE, WRITE_CACHE)


# indexer_qk holds the rotation's sign tiles [rows, index_head_dim] at once: V3.2's 128 fits every
# GPU's shared memory without spills (scripts/check_triton_compile.py); 256 would not
MAX_INDEXER_DIM = 128


def rotation_dots(dtype: torch.dtype) -> tuple[torch.dtype, bool]:
    """indexer_qk's rotation products for dtype data: (their operands' dtype, whether fp32 data is
    split into three bf16 parts). On a GPU the data's own dtype, fp32 as bf16 parts; fp32 products
    under Triton's interpreter, whose bf16 and fp16 tl.dot return garbage."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.float32, False
    return (torch.bfloat16, True) if dtype == torch.float32 else (dtype, False)


@on_tensor_device
def indexer_qk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, norm_weight: torch.Tensor,
               norm_bias: torch.Tensor, eps: float, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float, rotation: torch.Tensor, weight_scale: float, round_scale: bool,
               index_cache: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
               cache_seqlens: torch.Tensor | None = None):
    """V3.2's FP8 indexer inputs in one kernel for the torch path's ~40 kernels (models/indexer.py:
    k_norm, the rope of q and k, their rotation, the casts, the head weights' scaling).

    q [B, S, H, D] (wq_b's output), k [B, S, D] (wk's, before k_norm), both of one float dtype with
    a unit last stride and rows at one stride; weights [B, S, H] fp32 (weights_proj's, unscaled);
    norm_weight, norm_bias [D] (k_norm's); positions int64 [B, S]; inv_freq fp32 [rope / 2] (the
    first rope columns are rotated, rotate_half pairs); rotation fp32 [D, D] (the normalized
    Hadamard matrix). Returns q8 [B, S, H, D] float8_e4m3fn and the head weights [B, S, H] fp32
    (times weight_scale and q's scale per head), then the keys per_custom_dims_cast_to_fp8(k, (0,))
    as (k8 [B * S, D], k_scale [B * S]), or, given index_cache [num_pages, page_size, 1, D + 4]
    (uint8, contiguous: DeepGEMM's paged layout), block_table int32 [B, max_pages] and cache_seqlens
    int32 [B], written at slot cache_seqlens[b] + j (none where it has no slot) as (None, None)."""
    b, s, heads, dim = q.shape
    tokens = b * s
    half = inv_freq.shape[0]
    assert dim <= MAX_INDEXER_DIM and k.dtype == q.dtype and k.shape == (b, s, dim)
    q8 = torch.empty(b, s, heads, dim, dtype=torch.float8_e4m3fn, device=q.device)
    weights_out = torch.empty(b, s, heads, dtype=torch.float32, device=q.device)
    write = index_cache is not None
    k8 = None if write else torch.empty(tokens, dim, dtype=torch.float8_e4m3fn, device=q.device)
    k_scale = None if write else torch.empty(tokens, dtype=torch.float32, device=q.device)
    if tokens == 0:
        return q8, weights_out, k8, k_scale
    q3, k2, w2 = q.reshape(tokens, heads, dim), k.reshape(tokens, dim), weights.reshape(tokens, heads)
    assert q3.stride(2) == 1 and k2.stride(1) == 1 and w2.stride(1) == 1 and w2.dtype == torch.float32
    assert rotation.shape == (dim, dim) and rotation.is_contiguous() and rotation.dtype == torch.float32
    assert 2 * half <= dim and inv_freq.is_contiguous() and norm_weight.is_contiguous() and norm_bias.is_contiguous()
    if write:
        assert index_cache.is_contiguous() and index_cache.shape[-1] == dim + 4
        cache, table, seqlens = index_cache.view(torch.uint8), block_table, cache_seqlens.contiguous()
        page_size, max_pages, num_pages = index_cache.shape[1], block_table.shape[1], index_cache.shape[0]
        stride_page, stride_tb, stride_te = index_cache.stride(0), block_table.stride(0), block_table.stride(1)
    else:  # (placeholders the kernel never reads)
        cache = table = seqlens = weights_out
        page_size = max_pages = num_pages = stride_page = stride_tb = stride_te = 1
    dot_dtype, split = rotation_dots(q.dtype)
    block_h = min(max(16, next_power_of_2(heads)), 32 if split else 64)
    fast(_indexer_qk_kernel)[(tokens, triton.cdiv(heads, block_h))](
        q3, k2, w2, norm_weight, norm_bias, positions.reshape(tokens).contiguous(), inv_freq, rotation,
        q8.view(torch.uint8), weights_out, k8.view(torch.uint8) if k8 is not None else cache, k_scale if k8 is not None
        else weights_out, cache, table, seqlens, float(attention_factor), float(weight_scale), float(eps), heads, dim,
        s, page_size, max_pages, num_pages, q3.stride(0), q3.stride(1), k2.stride(0), w2.stride(0), stride_page,
        stride_tb, stride_te, HALF=half, BLOCK_H=block_h,
        BLOCK_HALF=max(16, next_power_of_2(half)), BLOCK_REST=max(16, next_power_of_2(dim - 2 * half)),
        BLOCK_D=max(16, next_power_of_2(dim)), DTYPE=TL_DTYPES[q.dtype], DOT=TL_DTYPES[dot_dtype],
        SPLIT=split, ROUND_BF16=_round_bf16(q.dtype),
        ROUND_SCALE=round_scale, NATIVE=native_fp8_cast(q.device), WRITE_CACHE=write, num_warps=8,
        enable_fp_fusion=False)
    return q8, weights_out, k8, k_scale


@triton.jit
def _selection_kernel(values_ptr, positions_ptr, table_ptr, out_ptr, k, s, page_size, max_pages, stride_v, stride_p,
                      stride_tb, stride_te, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """Row r (query token (b, j) of a [B * S, k] top-k): its positions as int32, -1 where the score
    is -inf (a position the query does not see); SLOTS: positions (-1: none) made cache slots
    through sequence b's block table (page * page_size + offset), -1 where none."""
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < k
    position = tl.load(positions_ptr + r * stride_p + i, mask=ok, other=-1)
    if SLOTS:
        entry = tl.maximum(position, 0) // page_size
        page = tl.load(table_ptr + (r // s) * stride_tb + entry * stride_te, mask=ok & (entry < max_pages),
                       other=-1).to(tl.int64)
        out = tl.where(position >= 0, page * page_size + position % page_size, -1)
    else:
        value = tl.load(values_ptr + r * stride_v + i, mask=ok, other=0.0)
        out = tl.where(value == float("-inf"), -1, position)
    tl.store(out_ptr + r * k + i, out.to(tl.int32), mask=ok)


@on_tensor_device
def topk_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """topk's (values, positions) [..., k] -> int32 positions, -1 where the value is -inf: one kernel
    for torch's three (models/indexer.py's selection)."""
    out = torch.empty(positions.shape, dtype=torch.int32, device=positions.device)
    k = positions.shape[-1]
    if out.numel() == 0:
        return out
    v2, p2 = values.reshape(-1, k), positions.reshape(-1, k)
    assert v2.stride(1) == 1 and p2.stride(1) == 1
    fast(_selection_kernel)[(p2.shape[0],)](v2, p2, p2, out, k, 1, 1, 1, v2.stride(0), p2.stride(0), 0, 0,
                                            BLOCK=next_power_of_2(k), SLOTS=False, num_warps=4)
    return out


@on_tensor_device
def selected_slots(selected: torch.Tensor, block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """selected int32 [B, S, k] (positions in each sequence, -1: none) -> int32 cache slots
    block_table[b, p // page_size] * page_size + p % page_size, -1 where none: one kernel for
    torch's eleven (the sparse attention's indices, models/attention.py)."""
    b, s, k = selected.shape
    out = torch.empty(b, s, k, dtype=torch.int32, device=selected.device)
    if out.numel() == 0:
        return out
    p2 = selected.reshape(b * s, k)
    assert p2.stride(1) == 1
    fast(_selection_kernel)[(b * s,)](p2, p2, block_table, out, k, s, page_size, block_table.shape[1], 0, p2.stride(0),
                                      block_table.stride(0), block_table.stride(1), BLOCK=next_power_of_2(k),
                                      SLOTS=True, num_warps=4)
    return out


# ---- the MoE's rows sorted by expert ----

MAX_SORTED_PAIRS = 8192  # (token, slot) pairs moe_sort_rows takes (1024 tokens of 8 experts)


@triton.jit
def _moe_sort_rows_kernel(idx_ptr, x_ptr, sx_ptr, a_ptr, sa_ptr, m_indices_ptr, position_ptr, pairs, experts,
                          row_bytes, scale_cols, stride_it, stride_ik, stride_x, stride_sxt, stride_sxc, stride_a,
                          stride_sat, stride_sac, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
                          BLOCK_BYTES: tl.constexpr, BLOCK_SCALES: tl.constexpr):
    """Program t: token t's K pairs p = t * K + k. A pair's key is its expert, or `experts` for an id
    outside [0, experts); its row is the number of pairs ordered before it by (key, p): torch's
    stable sort by key. Writes position[p] = row, m_indices[row] = key, and token t's row (bytes)
    and its scales (as int32 bits; none where scale_cols is 0) into each of its K rows."""
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
def moe_sort_rows(x: torch.Tensor, scales: torch.Tensor | None, topk_idx: torch.Tensor, num_experts: int):
    """x [T, H]: FP8 (float8_e4m3fn, with its scales fp32 [T, H / 128]) or float rows (scales None),
    any strides; topk_idx int [T, K] (ids outside [0, num_experts), e.g. -1: no expert here), T * K
    <= MAX_SORTED_PAIRS -> (the sorted rows, m_indices int32 [T * K], positions int64 [T * K]): what
    Experts.forward's torch ops make (models/moe.py): the pairs sorted stably by expert, those of no
    expert last (m_indices: the expert, num_experts for those), each row token t's row for pair
    (t, k) at row positions[t * K + k]. The sorted rows: (a [T * K, H], sa [T * K, H / 128]) for FP8,
    sa in DeepGEMM's column-major TMA-aligned layout (get_col_major_tma_aligned_tensor's: the sm90
    GEMMs take it without a copy); [T * K, H] of x's dtype for float rows."""
    tokens, k = topk_idx.shape
    hidden = x.shape[1]
    pairs = tokens * k
    fp8 = scales is not None
    assert pairs <= MAX_SORTED_PAIRS and x.shape == (tokens, hidden) and topk_idx.dtype in (torch.int64, torch.int32)
    if fp8:
        assert x.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 and hidden % 128 == 0
        assert scales.shape == (tokens, hidden // 128)
    x = x if x.stride(1) == 1 else x.contiguous()
    device = x.device
    a = torch.empty(pairs, hidden, dtype=x.dtype, device=device)
    m_indices = torch.empty(pairs, dtype=torch.int32, device=device)
    positions = torch.empty(pairs, dtype=torch.int64, device=device)
    groups = hidden // 128 if fp8 else 0
    aligned = -(-pairs // 4) * 4  # 16-byte columns of fp32
    sa = torch.empty(groups, aligned, dtype=torch.float32, device=device).t()[:pairs] if fp8 else None
    if pairs:
        a_bytes, x_bytes = a.view(torch.uint8), x.view(torch.uint8)
        # (float rows: no scales; the kernel's scale loop is masked off, its pointers any int32 tensor)
        sx_bits, sa_bits = (scales.view(torch.int32), sa.view(torch.int32)) if fp8 else (m_indices, m_indices[:, None])
        fast(_moe_sort_rows_kernel)[(tokens,)](
            topk_idx, x_bytes, sx_bits, a_bytes, sa_bits, m_indices, positions, pairs, num_experts, x_bytes.shape[1],
            groups, topk_idx.stride(0), topk_idx.stride(1), x_bytes.stride(0), sx_bits.stride(0) if fp8 else 0,
            sx_bits.stride(1) if fp8 else 0, a_bytes.stride(0), sa_bits.stride(0), sa_bits.stride(1), K=k,
            K_PAD=next_power_of_2(k), BLOCK_PAIRS=min(256, next_power_of_2(pairs)),
            BLOCK_BYTES=min(1024, next_power_of_2(x_bytes.shape[1])), BLOCK_SCALES=next_power_of_2(max(groups, 1)),
            num_warps=4)
    return ((a, sa) if fp8 else a), m_indices, positions


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
