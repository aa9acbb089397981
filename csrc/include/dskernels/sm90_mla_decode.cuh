// MLA decode on Hopper (FlashMLA's job) for DeepSeek-V3's shape: d = 576 (512 latent + 64 rope),
// dv = 512, V = the first 512 columns of K. Device code only, no torch.
//
// One CTA = (64-row query tile, kv head, partition of the split plan). The 64 rows are
// (query token, query head) pairs of one kv head, s_q * h_q / h_kv of them in all, so every head
// and MTP token that shares a kv head reads each key block once. The CTA walks the sequences of
// its partition (tile_scheduler_metadata) in 64-key blocks with an online softmax.
//
// Warp groups (384 threads):
//   producer (WG0, 88 registers): fills the Q tile once per sequence and the K tile of each key
//     block into a two-stage ring: TMA (one thread, nine 64x64 boxes) for full blocks of a 16-bit
//     cache whose page size is a multiple of 64; otherwise every thread loads 16-byte pieces through
//     registers (any page size, zero rows past the sequence, fp8 e4m3 widened exactly to q's type)
//     and stores them in the same swizzled layout. FP8 caches with DSKERNELS_MLA_FP8_TMA=1 (opt-in
//     until timed on a GPU): full blocks come raw by TMA into the upper half of the stage and are
//     widened there in place (widen_fp8_tile).
//   softmax (WG1, 208 registers): S = Q K^T (36 x wgmma 64x64x16 from shared memory), masks,
//     online softmax in the log2 domain, P to registers (bf16/fp16) and to shared memory, then
//     O[:, 0:256] += P V[:, 0:256] (wgmma 64x256x16, P from registers).
//   second half (WG2, 208 registers): O[:, 256:512] += P V[:, 256:512] with P and the row rescale
//     factors taken from shared memory. It overlaps WG1's QK^T and softmax of the next block.
//   With DSKERNELS_MLA_SEESAW=1 (opt-in until timed on a GPU) both consumer groups instead score
//   alternate key blocks and keep one half of O each (seesaw_group,
//   sm90_mla_decode_seesaw.cuh).
//   (DSKERNELS_MLA_NARROW=1, for up to 32 query rows: another kernel with keys on wgmma's M and
//   this producer, sm90_mla_decode_narrow.cuh.)
//
// Shared memory (all tiles 128-byte swizzled, the layout TMA's SWIZZLE_128B writes and wgmma's
// descriptors read): Q [9 chunks][64 rows][128 B], two K stages of the same shape, P [64][128 B].
// A key block's rows are K-major for S = Q K^T; the same bytes are the MN-major B operand of P V.
//
// FP8 caches: keys are widened e4m3 -> q's type exactly (every e4m3 value is a bf16 and an fp16
// value); k_scale multiplies the scores and the final output instead of every key.
//
// Output: a sequence that lies in one split is written to out (q's type) and lse (natural log)
// directly; a split one writes its normalized partial output and log2-LSE to out_acc/lse_acc
// (slot num_splits[i] + split), which the combine kernel merges. Same buffers and format as the
// Triton path (dskernels/triton/mla.py).
#pragma once

#include "dskernels/sm90_mla_decode_common.cuh"
#include "dskernels/sm90_mla_decode_producer.cuh"
#include "dskernels/sm90_mla_decode_consumers.cuh"
#include "dskernels/sm90_mla_decode_seesaw.cuh"

namespace dskernels::mla {

// grid (row tiles, h_kv, num_parts): the row tiles of one partition and kv head run side by side.
// kCluster = 2 (16-bit caches on the TMA path, two or more row tiles): pairs of row tiles form a
// cluster and share every key block through TMA multicast, so crossing a multiple of 64 rows does
// not double the key traffic per SM (grid.x is rounded up to even; a padding tile has no rows).
// kSeesaw: the seesaw consumers (sm90_mla_decode_seesaw.cuh) instead of the softmax / second-half
// pair; never clustered.
template <typename Element, bool kFp8, int kCluster, bool kSeesaw = false>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap tmap) {
  static_assert(!kSeesaw || kCluster == 1, "the seesaw consumers release stages in their own CTA only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int m_tile = blockIdx.x, kv_head = blockIdx.y, part = blockIdx.z;
  const int group = threadIdx.x / 128, tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    cutlass::arch::ClusterBarrier::init(&smem.q_full, 128);
    cutlass::arch::ClusterBarrier::init(&smem.q_empty, kSeesaw ? 256 : 128);  // the groups that read Q
    cutlass::arch::ClusterBarrier::init(&smem.p_full, 128);
    cutlass::arch::ClusterBarrier::init(&smem.p_empty, 128);
    for (int s = 0; s < 2; ++s) {
      cutlass::arch::ClusterBarrier::init(&smem.kv_full[s], 128);
      cutlass::arch::ClusterBarrier::init(&smem.kv_empty[s], 8 * kCluster);  // consumer warps of the cluster
      cutlass::arch::ClusterBarrier::init(&smem.kv_raw[s], 1);
    }
    cutlass::arch::fence_barrier_init();
    if (p.use_tma) cute::prefetch_tma_descriptor(&tmap);
  }
  if constexpr (kCluster > 1) {  // no multicast or remote arrive before the peer's barriers exist
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
  } else {
    __syncthreads();
  }
  // Programmatic dependent launch: the combine grid may be scheduled now; it still waits
  // (griddepcontrol.wait) until this grid has finished and its writes are visible.
  asm volatile("griddepcontrol.launch_dependents;");

  if (group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    producer<Element, kFp8, kCluster>(p, &tmap, smem, part, kv_head, m_tile, tid);
  } else if constexpr (kSeesaw) {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    if (group == 1) {
      seesaw_group<Element, kFp8, false>(p, smem, part, kv_head, m_tile, tid);
    } else {
      seesaw_group<Element, kFp8, true>(p, smem, part, kv_head, m_tile, tid);
    }
  } else if (group == 1) {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    softmax_group<Element, kFp8, kCluster>(p, smem, part, kv_head, m_tile, tid);
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    second_half_group<Element, kCluster>(p, smem, part, kv_head, m_tile, tid);
  }
  if constexpr (kCluster > 1) {  // stay until the peer can no longer multicast into or arrive on us
    cute::cluster_arrive();
    cute::cluster_wait();
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Combine: merge the partial outputs of split sequences (one warp per (head, token) row).
// ---------------------------------------------------------------------------------------------

template <typename Element>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(const __grid_constant__ CombineParams p) {
  // Launched as a programmatic dependent of the decode grid: wait for its results.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int i = blockIdx.x;
  const int flat = blockIdx.y * kCombineWarps + threadIdx.x / 32;  // head * s_q + token
  const int lane = threadIdx.x % 32;
  if (flat >= p.h_q * p.s_q) return;
  const int start = p.num_splits[i], end = p.num_splits[i + 1];
  // The decode kernels wrote this sequence themselves: their test (the raw difference; with a
  // clamped start a caller's negative entry left the rows to neither kernel).
  if (end - start == 1) return;
  const int base = max(start, 0);  // slots below 0 are never written (the decode kernels drop them)
  // The splits read back, cut to the slots allocated (none for a one-partition plan, which splits
  // no sequence: see the launcher).
  const int n = min(end, p.max_slots) - base;
  const int64_t rows = int64_t(p.h_q) * p.s_q;
  float m = -INFINITY;
  for (int k = 0; k < n; ++k) m = fmaxf(m, p.lse_acc[(base + k) * rows + flat]);
  const float m_safe = m == -INFINITY ? 0.0f : m;
  float total = 0.0f;
  float4 acc[4] = {};
  for (int k = 0; k < n; ++k) {
    const float wgt = exp2f(p.lse_acc[(base + k) * rows + flat] - m_safe);
    total += wgt;
    const float4* src = reinterpret_cast<const float4*>(p.out_acc + ((base + k) * rows + flat) * kHeadDimV);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float4 v = src[c * 32 + lane];
      acc[c].x += wgt * v.x;
      acc[c].y += wgt * v.y;
      acc[c].z += wgt * v.z;
      acc[c].w += wgt * v.w;
    }
  }
  const bool seen = total != 0.0f;  // NaN stays NaN, as in the decode kernel
  const float inv = seen ? 1.0f / total : 0.0f;
  const int head = flat / p.s_q, token = flat % p.s_q;
  Element* dst = static_cast<Element*>(p.out) + i * p.o_stride_b + token * p.o_stride_s + head * p.o_stride_h;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int col = (c * 32 + lane) * 4;
    uint2 packed = make_uint2(Mma<Element>::pack(acc[c].x * inv, acc[c].y * inv),
                              Mma<Element>::pack(acc[c].z * inv, acc[c].w * inv));
    *reinterpret_cast<uint2*>(dst + col) = packed;
  }
  if (lane == 0) {
    p.lse[i * p.lse_stride_b + head * p.lse_stride_h + token] = seen ? (m_safe + log2f(total)) * kLn2 : INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers (explicitly instantiated per element type in csrc/mla/sm90_mla_decode_*.cu)
// ---------------------------------------------------------------------------------------------

template <typename Element, bool kFp8>
cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& tmap, int num_parts, int h_kv,
                          cudaStream_t stream) {
  constexpr int kSmem = sizeof(SharedStorage);
  const int tiles = (p.rows + kBlockM - 1) / kBlockM;
  cudaLaunchAttribute attribute{};
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmem;
  config.stream = stream;
  auto launch = [&](auto kernel, int cluster) {
    cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (error != cudaSuccess) return error;
    config.gridDim = dim3((tiles + cluster - 1) / cluster * cluster, h_kv, num_parts);
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, p, tmap);
  };
  if (p.use_narrow) return launch_narrow_decode<Element, kFp8>(p, tmap, num_parts, h_kv, stream);
  if (p.use_seesaw) return launch(decode_kernel<Element, kFp8, 1, true>, 1);
  if constexpr (!kFp8) {
    if (p.use_tma && p.use_cluster && tiles >= 2) return launch(decode_kernel<Element, false, 2>, 2);
  }
  return launch(decode_kernel<Element, kFp8, 1>, 1);
}

template <typename Element>
cudaError_t launch_combine(const CombineParams& p, int batch, cudaStream_t stream) {
  const dim3 grid(batch, (p.h_q * p.s_q + kCombineWarps - 1) / kCombineWarps);
  // Programmatic dependent launch (sm90): the combine's launch overlaps the decode's tail.
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kCombineWarps * 32);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, combine_kernel<Element>, p);
}

}  // namespace dskernels::mla
