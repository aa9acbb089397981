"""FP8 block-scaled GEMMs (DeepGEMM's `*_fp8_fp8_bf16_nt`): dequantize, multiply in fp32, round.

    dequant(a, sa)[i, k] = a[i, k].float() * sa[i, k // 128]            1x128 activation scales
    dequant(b, sb)[j, k] = b[j, k].float() * sb[j // 128, k // 128]     128x128 weight scales
    out = bf16(dequant(a, sa) @ dequant(b, sb).T)                         "nt": b is [n, k]

fp8_gemm_nt is DeepGEMM's general form D = C + A @ B.T (fp32 or bf16 D; B's scales per 128x128
block or, for a weight gradient where both operands are activations, per row).

The kernels apply the scales per 128-wide K block instead (DeepGEMM's promotion), which is the same
sum in another order: results agree to fp32 rounding before the final bf16 rounding.

DeepGEMM's bf16 GEMMs are the same products without scales (grouped_rows, masked_rows,
bf16_gemm_nt, k_grouped_bf16_gemm); psum_to_m_indices defines its psum contiguous layout.
einsum and fp8_einsum are DeepGEMM's batched GEMMs named by einsum expressions (MLA's absorbed
projections and their weight gradient), written with torch.einsum over the dequantized operands.
"""

import torch

GROUP_SIZE = 128


def dequantize_activations(a: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
    """a [..., m, k] fp8, sa [..., m, k / 128] fp32 -> [..., m, k] fp32."""
    return a.float() * sa.float().repeat_interleave(GROUP_SIZE, dim=-1)


def dequantize_weights(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """b [..., n, k] fp8, sb [..., ceil(n / 128), k / 128] fp32 -> [..., n, k] fp32."""
    n = b.shape[-2]
    expanded = sb.float().repeat_interleave(GROUP_SIZE, dim=-2)[..., :n, :]
    return b.float() * expanded.repeat_interleave(GROUP_SIZE, dim=-1)


def dequantize_rhs(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """b [n, k] fp8 with sb per 128x128 block ([ceil(n/128), k/128]) or per row ([n, k/128], the
    1x128 scales of an activation) -> [n, k] fp32. (For n = 1 the two shapes, and values, agree.)"""
    if sb.shape[-2] == b.shape[-2]:
        return dequantize_activations(b, sb)
    return dequantize_weights(b, sb)


def fp8_gemm_nt(a, sa, b, sb, out_dtype: torch.dtype, c=None) -> torch.Tensor:
    """DeepGEMM's D = C + A @ B.T: a [m, k], sa [m, k/128], b [n, k] with sb per 128x128 block or per
    row, c [m, n] or None -> [m, n] in out_dtype; the sum in fp32, rounded once."""
    d = dequantize_activations(a, sa) @ dequantize_rhs(b, sb).T
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


def k_grouped_fp8_gemm(a, sa, b, sb, ks, k_major: bool, c=None) -> torch.Tensor:
    """K-grouped GEMM (MoE weight gradients): per group g, over its own k_g = ks[g] tokens,
    A_g [m, k_g] @ B_g.T [k_g, n], plus c[g] if given; returns [G, m, n] fp32.

    Group g owns tokens first_g = sum(ks[:g]) .. first_g + k_g and scale rows
    sum(ceil(ks[:g] / 128)) .. + ceil(k_g / 128) of sa [blocks, m] and sb [blocks, n] (1x128 scales:
    scale row j covers the group's tokens 128 j .. 128 j + 127). k_major (DeepGEMM's "nt"): a is
    flat, A_g the [m, k_g] row-major block at element m * first_g; else a is [tokens, m] and A_g
    its rows first_g .. first_g + k_g transposed (DeepGEMM's "tn"). b likewise with n.
    """
    m, n = sa.shape[1], sb.shape[1]
    result = torch.zeros(len(ks), m, n, device=sa.device) if c is None else c.float().clone()

    def group_operand(x, scales, rows, first, first_block, k):
        blocks = -(-k // GROUP_SIZE)
        if k_major:
            values = x.reshape(-1)[rows * first:rows * (first + k)].view(rows, k)
        else:
            values = x[first:first + k].T
        expanded = scales[first_block:first_block + blocks].T.float().repeat_interleave(GROUP_SIZE, dim=-1)
        return values.float() * expanded[:, :k]

    first = first_block = 0
    for g, k in enumerate(ks):
        k = int(k)
        lhs = group_operand(a, sa, m, first, first_block, k)
        rhs = group_operand(b, sb, n, first, first_block, k)
        result[g] += lhs @ rhs.T
        first, first_block = first + k, first_block + -(-k // GROUP_SIZE)
    return result


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, sa, b, sb, out, batch_sizes) -> torch.Tensor:
    """DeepGEMM's sm90 K-grouped weight gradient: the k_major layout above, added to out."""
    return k_grouped_fp8_gemm(a, sa, b, sb, batch_sizes, k_major=True, c=out)


def gemm_fp8_fp8_bf16_nt(a, sa, b, sb) -> torch.Tensor:
    """a [m, k], sa [m, k/128], b [n, k], sb [ceil(n/128), k/128] -> out [m, n] bf16."""
    return (dequantize_activations(a, sa) @ dequantize_weights(b, sb).T).to(torch.bfloat16)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, m_indices) -> torch.Tensor:
    """a [M, k], sa [M, k/128], b [G, n, k], sb [G, ceil(n/128), k/128], m_indices int [M] ->
    out [M, n] bf16; row i uses group m_indices[i]; rows with m_indices -1 come back as zeros."""
    return grouped_rows(dequantize_activations(a, sa), dequantize_weights(b, sb), m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, masked_m) -> torch.Tensor:
    """a [G, m_max, k], sa [G, m_max, k/128], b [G, n, k], sb [G, ceil(n/128), k/128],
    masked_m int [G] -> out [G, m_max, n] bf16; rows >= masked_m[g] come back as zeros."""
    return masked_rows(dequantize_activations(a, sa), dequantize_weights(b, sb), masked_m)


def grouped_rows(lhs: torch.Tensor, rhs: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
    """lhs [M, k], rhs [G, n, k] (any float dtype), m_indices int [M] -> [M, n] bf16: row i is
    lhs[i] @ rhs[m_indices[i]].T summed in fp32; rows of no group (-1, or outside [0, G)) are zeros."""
    out = torch.zeros(lhs.shape[0], rhs.shape[1], dtype=torch.bfloat16, device=lhs.device)
    indices = m_indices.long()
    for group in range(rhs.shape[0]):
        rows = (indices == group).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = (lhs[rows].float() @ rhs[group].float().T).to(torch.bfloat16)
    return out


def masked_rows(lhs: torch.Tensor, rhs: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
    """lhs [G, m_max, k], rhs [G, n, k], masked_m int [G] -> [G, m_max, n] bf16: the first
    masked_m[g] rows (clamped to [0, m_max]) of group g, in fp32; the others zeros."""
    groups, m_max, _ = lhs.shape
    out = torch.zeros(groups, m_max, rhs.shape[1], dtype=torch.bfloat16, device=lhs.device)
    for group, rows in enumerate(masked_m.tolist()):
        rows = max(0, min(rows, m_max))
        out[group, :rows] = (lhs[group, :rows].float() @ rhs[group].float().T).to(torch.bfloat16)
    return out


def psum_to_m_indices(grouped_layout: torch.Tensor, m: int) -> torch.Tensor:
    """DeepGEMM's psum contiguous layout -> one group id per row (int32 [m], -1 for no group).

    grouped_layout int [G] holds cumulative row ends: group g owns rows align(ends[g - 1], 128) ..
    ends[g] - 1 (group 0 from row 0), so each group starts at a multiple of 128 and the rows between
    a group's end and the next start (or past the last end) belong to none. Tensor ops only: on a
    GPU no host sync. The ends must not decrease; for ends that do, the rows' groups here (and in
    the kernels, which may differ) are unspecified.
    """
    ends = grouped_layout.long().clamp(min=0)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    starts = (starts + GROUP_SIZE - 1) // GROUP_SIZE * GROUP_SIZE
    rows = torch.arange(m, device=grouped_layout.device)
    # The owner of a row: the last group starting at or before it (empty groups share their start
    # with the next one), if the row lies before that group's end.
    owner = (torch.searchsorted(starts, rows, right=True) - 1).clamp(min=0)
    inside = rows < ends[owner] if len(ends) else torch.zeros_like(rows, dtype=torch.bool)
    return torch.where(inside, owner, -1).to(torch.int32)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, c=None) -> torch.Tensor:
    """DeepGEMM's bf16 D = C + A @ B.T: a [m, k], b [n, k], c [m, n] or None -> [m, n] in out_dtype,
    summed in fp32 and rounded once."""
    d = a.float() @ b.float().T
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


def k_grouped_bf16_gemm(a: torch.Tensor, b: torch.Tensor, ks, c=None) -> torch.Tensor:
    """DeepGEMM's bf16 K-grouped "tn" GEMM: a [tokens, m], b [tokens, n]; group g owns tokens
    sum(ks[:g]) .. + ks[g]; returns [G, m, n] fp32 with out[g] = (c[g] or 0) + A_g.T @ B_g."""
    m, n = a.shape[1], b.shape[1]
    result = torch.zeros(len(ks), m, n, device=a.device) if c is None else c.float().clone()
    first = 0
    for g, k in enumerate(ks):
        k = int(k)
        result[g] += a[first:first + k].float().T @ b[first:first + k].float()
        first += k
    return result


def fp8_bmm_nt(a, sa, b, sb, out_dtype: torch.dtype, c=None) -> torch.Tensor:
    """fp8_gemm_nt per batch: a [B, m, k], sa [B, m, k/128], b [B, n, k] with sb per 128x128 block
    ([B, ceil(n/128), k/128]) or per row ([B, n, k/128]), c [B, m, n] or None -> [B, m, n]."""
    d = dequantize_activations(a, sa) @ dequantize_rhs(b, sb).transpose(-1, -2)
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


def dequantize_blocks(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t (fp8) times its scales s, each scale covering one element along the dimensions where s has
    t's size and 128 elements (the last block: what is left) along the others."""
    scales = s.float()
    for dim, (size, blocks) in enumerate(zip(t.shape, s.shape)):
        if blocks != size:
            scales = scales.repeat_interleave(GROUP_SIZE, dim=dim).narrow(dim, 0, size)
    return t.float() * scales


def fp8_einsum(expr: str, a, sa, b, sb, out_dtype: torch.dtype, c=None) -> torch.Tensor:
    """DeepGEMM's fp8_einsum: torch.einsum(expr) of the dequantized operands in fp32 (+ c), rounded
    once to out_dtype. Scales as dequantize_blocks reads them (the contracted dimension and, for
    128x128-scaled b, its other non-batch dimension in blocks of 128)."""
    d = torch.einsum(expr, dequantize_blocks(a, sa), dequantize_blocks(b, sb))
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)


def einsum(expr: str, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, c=None) -> torch.Tensor:
    """DeepGEMM's bf16 einsum: torch.einsum(expr) in fp32 (+ c), rounded once to out_dtype."""
    d = torch.einsum(expr, a.float(), b.float())
    if c is not None:
        d = d + c.float()
    return d.to(out_dtype)
