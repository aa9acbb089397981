// The small kernels that fill the grouped GEMM's per-group arguments on the device, before either
// config runs. Included by csrc/gemm/sm90_fp8_gemm_grouped.cu only (plain __global__ functions: a
// second translation unit including them would define them twice).
#pragma once

#include "dskernels/sm90_fp8_gemm_grouped.cuh"

namespace dskernels::fp8_gemm {

// Contiguous layout: the [start, end) row range of each group from m_indices. Rows of one group
// form one segment (API.md), so only a segment's first and last rows write; the atomics only make
// a broken input (a group split in two) span both parts instead of racing. seg_start must be
// preset to a large value and seg_end to 0 (run_grouped memsets 0x7f and 0x00 bytes).
__global__ void find_segments_kernel(const int32_t* __restrict__ m_indices, int32_t m, int32_t groups,
                                     int32_t* seg_start, int32_t* seg_end) {
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < m; i += gridDim.x * blockDim.x) {
    const int32_t g = m_indices[i];
    if (g < 0 || g >= groups) continue;  // -1: padding row, never computed
    if (i == 0 || m_indices[i - 1] != g) atomicMin(seg_start + g, i);
    if (i == m - 1 || m_indices[i + 1] != g) atomicMax(seg_end + g, i + 1);
  }
}

// sa into the packed per-group layout the ptr-array collective reads (GroupedArgs), rows fastest
// (sa has unit stride along the rows, so reads coalesce). Only rows inside a group are copied:
// masked rows >= m_g and rows whose id is not a group stay unread (the tests poison them), and the
// GEMM never loads scales past m_g.
// Masked: one (group, K block) column per block iteration, its threads over the m_g rows only (a
// decode call with m_max = 4096 and a few rows per group then costs a few rows, not m_max).
// Contiguous: one thread per (row, K block) of sa.
__global__ void pack_sfa_kernel(GroupedProblem p, GroupedArgs args) {
  const int32_t kblocks = p.k / kScaleBlock;
  if (p.masked_m != nullptr) {
    for (int64_t column = blockIdx.x; column < int64_t(p.groups) * kblocks; column += gridDim.x) {
      const int32_t g = static_cast<int32_t>(column / kblocks), kb = static_cast<int32_t>(column % kblocks);
      const int32_t rows = min(max(p.masked_m[g], 0), p.m_max);
      const float* src = p.sa + g * p.sa_group_stride + int64_t(kb) * p.sa_k_stride;
      float* dst = args.sfa_packed + int64_t(g) * p.m_max * kblocks + int64_t(kb) * rows;
      for (int32_t r = threadIdx.x; r < rows; r += blockDim.x) dst[r] = src[r];
    }
    return;
  }
  const int64_t total = int64_t(p.m_max) * kblocks;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t kb = static_cast<int32_t>(i / p.m_max), r = static_cast<int32_t>(i % p.m_max);
    const int32_t g = p.m_indices[r];
    if (g < 0 || g >= p.groups) continue;
    const int32_t row0 = args.seg_start[g], rows = args.seg_end[g] - row0;  // r has id g: row0 <= r < end
    args.sfa_packed[int64_t(row0) * kblocks + int64_t(kb) * rows + (r - row0)] = p.sa[int64_t(kb) * p.sa_k_stride + r];
  }
}

// One thread per group: problem shape, pointers, strides and scale layouts of that group.
__global__ void fill_grouped_args_kernel(GroupedProblem p, GroupedArgs args) {
  const int32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  int32_t rows, row0;
  if (p.masked_m != nullptr) {
    rows = min(max(p.masked_m[g], 0), p.m_max);
    row0 = 0;
  } else {
    const int32_t start = args.seg_start[g], end = args.seg_end[g];
    rows = end > start ? end - start : 0;
    row0 = rows > 0 ? start : 0;
  }
  const int32_t kblocks = p.k / kScaleBlock;
  args.shapes[g] = grouped::Shape3{rows, p.n, p.k};
  args.ptr_a[g] = static_cast<const ElementA*>(p.a) + g * p.a_group_stride + int64_t(row0) * p.a_row_stride;
  args.ptr_b[g] = static_cast<const ElementB*>(p.b) + g * p.b_group_stride;
  // The packed sa (pack_sfa_kernel); contiguous groups start at row0 * kblocks.
  args.ptr_sfa[g] = args.sfa_packed + (p.masked_m != nullptr ? int64_t(g) * p.m_max : int64_t(row0)) * kblocks;
  args.ptr_sfb[g] = p.sb + g * p.sb_group_stride;
  args.ptr_d[g] = static_cast<ElementD*>(p.out) + g * p.out_group_stride + int64_t(row0) * p.out_row_stride;
  grouped::StrideA stride_a{};
  get<0>(stride_a) = p.a_row_stride;
  args.stride_a[g] = stride_a;
  grouped::StrideB stride_b{};
  get<0>(stride_b) = p.b_row_stride;
  args.stride_b[g] = stride_b;
  grouped::StrideD stride_d{};
  get<0>(stride_d) = p.out_row_stride;
  args.stride_d[g] = stride_d;
  // What the collective reads (it rebuilds these itself; see GroupedArgs).
  args.layout_sfa[g] = make_layout_sfa(rows, kblocks, rows);
  args.layout_sfb[g] = make_layout_sfb(p.n, kblocks, (p.n + kScaleBlock - 1) / kScaleBlock);
}

}  // namespace dskernels::fp8_gemm
