// get_mla_metadata on the device: the split plan of dskernels/ops/mla.py `split_plan`, bit for bit,
// in one launch of one CTA (two block-wide scans over the batch, then a binary search per
// partition), so computing it never synchronizes with the host and can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "dskernels/sm90_mla_decode.h"

namespace dskernels::mla {

constexpr int kMetaThreads = 1024;
constexpr int kOverheadBlocks = 5;  // FlashMLA's fixed cost of a sequence, in key blocks

// Inclusive prefix sum over the CTA; `carry` (shared) holds the running total across chunks.
__device__ __forceinline__ int64_t block_inclusive_scan(int64_t v, int64_t* warp_sums, int64_t& carry) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int64_t n = __shfl_up_sync(0xffffffff, v, d);
    if (lane >= d) v += n;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < kMetaThreads / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int64_t n = __shfl_up_sync(0xffffffff, s, d);
      if (lane >= d) s += n;
    }
    warp_sums[lane] = s;  // inclusive per warp
  }
  __syncthreads();
  const int64_t result = carry + v + (warp > 0 ? warp_sums[warp - 1] : 0);
  __syncthreads();
  if (threadIdx.x == kMetaThreads - 1) carry = result;
  __syncthreads();
  return result;
}

__device__ __forceinline__ int64_t key_blocks(const int* seqlens, int i) {
  return (int64_t(max(seqlens[i], 0)) + kBlockN - 1) / kBlockN;
}

__global__ void __launch_bounds__(kMetaThreads) metadata_kernel(const __grid_constant__ MetadataParams p) {
  __shared__ int64_t warp_sums[32];
  __shared__ int64_t carry;
  const int b = p.batch;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  // ends[i]: exclusive end of sequence i on the cost line (blocks + overhead, cumulated).
  for (int chunk = 0; chunk < b; chunk += kMetaThreads) {
    const int i = chunk + threadIdx.x;
    const int64_t cost = i < b ? key_blocks(p.seqlens, i) + kOverheadBlocks : 0;
    const int64_t end = block_inclusive_scan(cost, warp_sums, carry);
    if (i < b) p.ends[i] = end;
  }
  __syncthreads();
  const int64_t total = p.ends[b - 1];
  const int64_t per_part = max((total + p.num_parts - 1) / p.num_parts, int64_t(1));
  // num_splits: how many multiples of per_part cut each sequence's key blocks, prefix-summed.
  if (threadIdx.x == 0) {
    carry = 0;
    p.num_splits[0] = 0;
  }
  __syncthreads();
  for (int chunk = 0; chunk < b; chunk += kMetaThreads) {
    const int i = chunk + threadIdx.x;
    int64_t splits = 0;
    if (i < b) {
      const int64_t blocks = key_blocks(p.seqlens, i);
      const int64_t key_start = p.ends[i] - blocks;
      splits = blocks > 0 ? (key_start + blocks - 1) / per_part - key_start / per_part + 1 : 0;
    }
    const int64_t running = block_inclusive_scan(splits, warp_sums, carry);
    if (i < b) p.num_splits[i + 1] = static_cast<int>(running);
  }
  // One row per partition: searchsorted(ends, x, right=True) = the number of ends <= x.
  auto count_le = [&](int64_t x) {
    int lo = 0, hi = b;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (p.ends[mid] <= x) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  for (int part = threadIdx.x; part < p.num_parts; part += kMetaThreads) {
    int* row = p.meta + part * kMetaInts;
    const int64_t first = part * per_part;
    for (int k = 5; k < kMetaInts; ++k) row[k] = 0;
    if (first >= total) {  // idle
      row[0] = b;
      row[1] = 0;
      row[2] = b - 1;
      row[3] = 0;
      row[4] = 0;
      continue;
    }
    const int64_t last = min(first + per_part, total) - 1;
    const int begin_idx = min(count_le(first), b - 1);
    const int end_idx = min(count_le(last), b - 1);
    const int64_t begin_blocks = key_blocks(p.seqlens, begin_idx);
    const int64_t end_blocks = key_blocks(p.seqlens, end_idx);
    const int64_t begin_key = p.ends[begin_idx] - begin_blocks;
    const int64_t end_key = p.ends[end_idx] - end_blocks;
    const int64_t begin_block = min(max(first - begin_key, int64_t(0)), begin_blocks);
    const int64_t end_block = min(max(last + 1 - end_key, int64_t(0)), end_blocks);
    row[0] = begin_idx;
    row[1] = static_cast<int>(begin_block * kBlockN);
    row[2] = end_idx;
    row[3] = static_cast<int>(min(end_block * kBlockN, int64_t(max(p.seqlens[end_idx], 0))));
    row[4] = static_cast<int>(max(int64_t(part) - begin_key / per_part, int64_t(0)));
  }
}

}  // namespace dskernels::mla
