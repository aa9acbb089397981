// MLA decode on Hopper for narrow query tiles: s_q * h_q / h_kv <= 32 rows (DeepSeek-V3 at tensor
// parallel 8: 16 heads, one token). Opt-in (DSKERNELS_MLA_NARROW=1) until run on a GPU; written
// 2026-12-05 without one. Device code only, no torch.
//
// Why: the default kernel (sm90_mla_decode.cuh) puts the query rows on wgmma's M, which is 64, so
// 16 rows leave three quarters of every QK^T and P V on padding. At b = 128, h_q = 16 on an H200 it
// measured 70% of the copy rate: ~3.3 us per 64-key block and SM, where the block's 72 KiB take
// ~2.3 us at the copy rate and the same CTA spends ~2.6 us per block when compute-bound (h_q = 128).
// Here the keys are M instead and the query rows are N (16 or 32, the rows padded to it):
//   S^T [64 keys x N]  = K [64 x 576] Q^T     36 wgmma 64xNx16; A: the key tile (K-major), B: Q
//   O^T [512 x N]     += V^T [512 x 64] P^T   8 M-tiles x 4 k-steps of 64xNx16; A: the same key
//                                              tile read MN-major, B: P^T from shared memory
// a quarter (N = 16) or half (N = 32) of the default's tensor work.
//
// Warp groups: the producer (WG0) is the default kernel's, with a Q tile of N rows. WG1 and WG2
// take alternate key blocks of the CTA's block sequence (WG1 those of stage 0, WG2 those of stage
// 1), each with its own running max, row sums and whole O^T, like two splits of the sequence, and
// merge through shared memory at the end of each item (each finalizes one half of dv). One group's
// softmax runs under the other's wgmma with no per-block handshake between them; a stage is
// released by the four warps of the group that owns it.
//
// The softmax runs along M: a query row is a column of S^T, its 64 keys spread over 4 warps x 8
// lanes. Column maxima: over the thread's two keys, shuffles over lanes xor 4, 8, 16, then the
// four warps' maxima through shared memory (a named barrier per block). Row sums stay per thread
// (its own keys) until the end of the item.
#pragma once

#include <type_traits>

#include "dskernels/sm90_mla_decode.cuh"

namespace dskernels::mla {

template <int kN>
struct alignas(1024) NarrowStorage {
  static_assert(kN == 16 || kN == 32);
  static constexpr int kQRows = kN;
  static constexpr int kQChunkBytes = kN * 128;     // one [kN rows][128 B] region of Q
  static constexpr int kQLoadBatch = 9;             // kN * 72 pieces over 128 threads: 9 or 18 each
  static constexpr int kMergeTiles = 64 / kN;       // O^T tiles (64 x kN) handed over per merge round
  static constexpr int kMergeFloats = kMergeTiles * (kN / 2) * 128;  // per receiving group: 16 KiB
  uint8_t kv[2][kTileBytes];        // as in SharedStorage; stage s belongs to consumer group s
  uint8_t q[kChunks * kQChunkBytes];
  uint8_t p[2][kQChunkBytes];       // per group: P^T, [kN rows][64 keys] swizzled (K-major B operand)
  float merge[2][kMergeFloats];     // [receiving group][tile][accumulator][thread]
  float col_max[2][4][kN];          // [group][warp][column]: the warp's maxima of the current block
  float col_sum[2][4][kN];          // [group][warp][column]: row sums at the end of an item
  float col_run_max[2][kN];         // [group][column]: running max at the end of an item
  const uint8_t* row_src[kBlockN];  // the producer's, as in SharedStorage
  uint64_t kv_valid[2];
  uint64_t q_full, q_empty;
  uint64_t kv_full[2], kv_empty[2];
  uint64_t kv_raw[2];
};
static_assert(sizeof(NarrowStorage<32>) <= 227 * 1024, "more shared memory than an sm90 CTA can have");

namespace GMMA = cute::SM90::GMMA;

// 64xNx16 wgmma with both operands in shared memory; A K-major (QK^T) or MN-major (P V), B K-major.
template <typename Element, int kN, GMMA::Major kMajorA>
using NarrowOp = std::conditional_t<
    std::is_same_v<Element, __nv_bfloat16>,
    std::conditional_t<kN == 16, GMMA::MMA_64x16x16_F32BF16BF16_SS<kMajorA, GMMA::Major::K>,
                       GMMA::MMA_64x32x16_F32BF16BF16_SS<kMajorA, GMMA::Major::K>>,
    std::conditional_t<kN == 16, GMMA::MMA_64x16x16_F32F16F16_SS<kMajorA, GMMA::Major::K>,
                       GMMA::MMA_64x32x16_F32F16F16_SS<kMajorA, GMMA::Major::K>>>;

template <typename Element>
__device__ __forceinline__ uint16_t to_bits(float x) {
  const uint32_t pair = Mma<Element>::pack(x, 0.0f);
  return static_cast<uint16_t>(pair & 0xFFFF);
}

// Byte offset of element (row n, key k) of the swizzled P^T tile ([kN][64] 16-bit, 128-byte rows;
// checked against CuTe's SW128 K-major tile by scripts/check_gmma_desc.cu).
__host__ __device__ __forceinline__ uint32_t p_offset(int n, int k) {
  return n * 128 + (((k >> 3) ^ (n & 7)) << 4) + (k & 7) * 2;
}

// One consumer group (kGroup 0: WG1, 1: WG2). Accumulator layout of a 64 x N wgmma (thread of warp
// w, lane l, q4 = l % 4): element 4j + 2h + e is M row 16w + l/4 + 8h (a key of S^T, a dv of an O^T
// tile) and column 8j + 2 q4 + e (a query row).
template <typename Element, bool kFp8, int kN, int kGroup>
__device__ void narrow_group(const DecodeParams& p, NarrowStorage<kN>& smem, int part, int kv_head, int tid) {
  using Storage = NarrowStorage<kN>;
  using QK = NarrowOp<Element, kN, GMMA::Major::K>;
  using PV = NarrowOp<Element, kN, GMMA::Major::MN>;
  constexpr int kS = kN / 2;                   // accumulators of one 64 x kN wgmma per thread
  constexpr int kJ = kN / 8;                   // the thread's columns: 8j + 2 q4 + e, j < kJ, e < 2
  constexpr int kTilesV = kHeadDimV / 64;      // M-tiles of O^T
  constexpr int kOwnTile0 = 4 * kGroup;        // this group finalizes tiles [kOwnTile0, + 4) (dv / 64)
  constexpr int kOtherTile0 = 4 * (1 - kGroup);
  constexpr int kRounds = 4 / Storage::kMergeTiles;
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int k0 = warp * 16 + lane / 4;  // M rows k0 and k0 + 8 of every accumulator
  const float k_scale = kFp8 ? *p.k_scale : 1.0f;
  const float scale = p.scale_log2 * k_scale;
  const uint32_t q_tile = smem_addr(smem.q);
  const uint32_t p_tile = smem_addr(smem.p[kGroup]);
  int token[kJ][2];  // the query token of each of the thread's columns (padding: the last token)
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + 2 * q4 + e;
      token[j][e] = col < p.rows ? col / p.heads_per_kv : p.s_q - 1;
    }
  }
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    const int seqlen = p.seqlens[w.i];
    int limit[kJ][2];  // the end of the keys each column sees: its split's end, and the causal bound
    float m_run[kJ][2], l_run[kJ][2];  // running max (log2 domain); this thread's part of the sums
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        limit[j][e] = min(w.hi, p.causal ? seqlen - p.s_q + token[j][e] + 1 : seqlen);
        m_run[j][e] = -INFINITY;
        l_run[j][e] = 0.0f;
      }
    }
    float o[kTilesV * kS];  // O^T, tile t at o[t * kS]
    float s[kS];
#pragma unroll
    for (int k = 0; k < kTilesV * kS; ++k) o[k] = 0.0f;
    fence_all(o, std::make_index_sequence<kTilesV * kS>{});
    fence_all(s, std::make_index_sequence<kS>{});

    const int blocks = (w.hi - w.lo + kBlockN - 1) / kBlockN;
    const int first = (kGroup - block_count) & 1;  // this group's first block of the item (its stage)
    barrier_wait(&smem.q_full, item_count & 1);
    if (first >= blocks) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // Q not read
    for (int b = first; b < blocks; b += 2) {
      const int start = w.lo + b * kBlockN, count = block_count + b;
      const uint32_t kv_tile = smem_addr(smem.kv[kGroup]);
      barrier_wait(&smem.kv_full[kGroup], (count >> 1) & 1);
      cute::warpgroup_arrive();
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          mma_ss<QK>(desc_k_major(kv_tile + c * kChunkBytes + kk * 32),
                     desc_k_major(q_tile + c * Storage::kQChunkBytes + kk * 32), s, c > 0 || kk > 0,
                     std::make_index_sequence<kS>{});
        }
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_all(s, std::make_index_sequence<kS>{});
      fence_all(o, std::make_index_sequence<kTilesV * kS>{});
      if (b + 2 >= blocks) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // last use of Q

      // Scale into the log2 domain, mask (past the column's limit, or on a page outside the cache),
      // column maxima over the thread's keys and its lane group.
      const uint64_t valid = smem.kv_valid[kGroup];
      float block_max[kJ][2];
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int visible = limit[j][e] - start;  // keys [start, start + visible) of the block
          float m = -INFINITY;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int key = k0 + 8 * h;
            float& x = s[4 * j + 2 * h + e];
            x = key < visible && (valid >> key) & 1 ? x * scale : -INFINITY;
            m = fmaxf(m, x);
          }
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 4));
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 8));
          block_max[j][e] = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 16));
        }
      }
      // The four warps' maxima. One buffer is enough: a warp writes the next block's only after
      // the barrier below that follows every warp's reads of this one.
      float* maxima = &smem.col_max[kGroup][0][0];
      if (lane < 4) {
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) maxima[warp * kN + 8 * j + 2 * q4 + e] = block_max[j][e];
        }
      }
      // Also orders this block's P^T stores after every warp's wait for the previous block's P V,
      // which read the P^T tile (a warp's wait_group covers its own slice of the wgmma only).
      cutlass::arch::NamedBarrier::sync(128, kBarNarrow + kGroup);
      float alpha[kJ][2];
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + 2 * q4 + e;
          float m = fmaxf(fmaxf(maxima[col], maxima[kN + col]), fmaxf(maxima[2 * kN + col], maxima[3 * kN + col]));
          const float m_new = fmaxf(m_run[j][e], m);
          const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
          alpha[j][e] = fast_exp2(m_run[j][e] - m_safe);
          m_run[j][e] = m_new;
          float sum = 0.0f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& x = s[4 * j + 2 * h + e];
            x = fast_exp2(x - m_safe);
            sum += x;
            const uint16_t bits = to_bits<Element>(x);
            asm volatile("st.shared.b16 [%0], %1;" :: "r"(p_tile + p_offset(col, k0 + 8 * h)), "h"(bits));
          }
          l_run[j][e] = l_run[j][e] * alpha[j][e] + sum;
        }
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> wgmma reads
      // Every warp's part of P^T is in: each warp's slice of P V reads all of it.
      cutlass::arch::NamedBarrier::sync(128, kBarNarrow + kGroup);

#pragma unroll
      for (int t = 0; t < kTilesV; ++t) {
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int e = 0; e < 2; ++e) o[t * kS + 4 * j + 2 * h + e] *= alpha[j][e];
          }
        }
      }
      fence_all(o, std::make_index_sequence<kTilesV * kS>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int t = 0; t < kTilesV; ++t) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          mma_ss<PV>(desc_mn_major_region(kv_tile + t * kChunkBytes + kk * 2048), desc_k_major(p_tile + kk * 32), o + t * kS,
                     true, std::make_index_sequence<kS>{});
        }
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_all(o, std::make_index_sequence<kTilesV * kS>{});
      release_stage<1>(&smem.kv_empty[kGroup]);
    }
    block_count += blocks;

    // Epilogue. Each column's row sum over the thread's lane group and the four warps, and both
    // groups' (max, sum): the factors that put the two O^T on one scale.
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float l = l_run[j][e];
        l += __shfl_xor_sync(0xffffffff, l, 4);
        l += __shfl_xor_sync(0xffffffff, l, 8);
        l += __shfl_xor_sync(0xffffffff, l, 16);
        const int col = 8 * j + 2 * q4 + e;
        if (lane < 4) smem.col_sum[kGroup][warp][col] = l;
        if (lane < 4 && warp == 0) smem.col_run_max[kGroup][col] = m_run[j][e];
      }
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    float own[kJ][2], other[kJ][2], final_factor[kJ][2], lse2[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * q4 + e;
        float l_own = 0.0f, l_other = 0.0f;
#pragma unroll
        for (int wp = 0; wp < 4; ++wp) {
          l_own += smem.col_sum[kGroup][wp][col];
          l_other += smem.col_sum[1 - kGroup][wp][col];
        }
        const float m_other = smem.col_run_max[1 - kGroup][col];
        const float m = fmaxf(m_run[j][e], m_other);
        const float m_safe = m == -INFINITY ? 0.0f : m;
        own[j][e] = fast_exp2(m_run[j][e] - m_safe);  // 0 for a group that saw no key of the column
        other[j][e] = fast_exp2(m_other - m_safe);
        const float l = l_own * own[j][e] + l_other * other[j][e];
        const bool seen = l != 0.0f;  // NaN (a NaN score) stays NaN, not "no key seen"
        final_factor[j][e] = seen ? k_scale / l : 0.0f;
        lse2[j][e] = seen ? m + __log2f(l) : -INFINITY;
      }
    }
    // O^T: each group hands the other the tiles it finalizes, in rounds of kMergeTiles (16 KiB).
    // Thread t of one group holds the same (row, column) positions as thread t of the other.
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      if (r > 0) cutlass::arch::NamedBarrier::sync(256, kBarConsumers);  // the last round is read
#pragma unroll
      for (int tl = 0; tl < Storage::kMergeTiles; ++tl) {
#pragma unroll
        for (int v = 0; v < kS; ++v) {
          smem.merge[1 - kGroup][(tl * kS + v) * 128 + tid] = o[(kOtherTile0 + r * Storage::kMergeTiles + tl) * kS + v];
        }
      }
      cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
#pragma unroll
      for (int tl = 0; tl < Storage::kMergeTiles; ++tl) {
#pragma unroll
        for (int v = 0; v < kS; ++v) {
          const int j = v / 4, e = v % 2;
          float& x = o[(kOwnTile0 + r * Storage::kMergeTiles + tl) * kS + v];
          x = (x * own[j][e] + smem.merge[kGroup][(tl * kS + v) * 128 + tid] * other[j][e]) * final_factor[j][e];
        }
      }
    }
    ++item_count;

    // Output: this group's half of dv for each of the thread's columns (query rows), and (WG1,
    // the lanes that hold every column once) the LSE.
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    const int slot = p.num_splits[w.i] + w.split;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * q4 + e;
        if (col >= p.rows) continue;
        const int tok = col / p.heads_per_kv, head = kv_head * p.heads_per_kv + col % p.heads_per_kv;
        if (split_out) {
          if (slot < 0 || slot >= p.max_slots) continue;
          const int64_t flat = int64_t(slot) * p.h_q * p.s_q + head * p.s_q + tok;
          float* dst = p.out_acc + flat * kHeadDimV + k0;
#pragma unroll
          for (int t = kOwnTile0; t < kOwnTile0 + 4; ++t) {
#pragma unroll
            for (int h = 0; h < 2; ++h) dst[64 * t + 8 * h] = o[t * kS + 4 * j + 2 * h + e];
          }
          if (kGroup == 0 && lane < 4 && warp == 0) p.lse_acc[flat] = lse2[j][e];
        } else {
          uint16_t* dst = static_cast<uint16_t*>(p.out) + w.i * p.o_stride_b + tok * p.o_stride_s +
                          head * p.o_stride_h + k0;
#pragma unroll
          for (int t = kOwnTile0; t < kOwnTile0 + 4; ++t) {
#pragma unroll
            for (int h = 0; h < 2; ++h) dst[64 * t + 8 * h] = to_bits<Element>(o[t * kS + 4 * j + 2 * h + e]);
          }
          if (kGroup == 0 && lane < 4 && warp == 0) {
            p.lse[w.i * p.lse_stride_b + head * p.lse_stride_h + tok] =
                lse2[j][e] == -INFINITY ? INFINITY : lse2[j][e] * kLn2;
          }
        }
      }
    }
  });
}

// grid (1, h_kv, num_parts): one CTA per (kv head, partition); all rows fit one tile of kN.
template <typename Element, bool kFp8, int kN>
__global__ void __launch_bounds__(kThreads, 1)
    narrow_decode_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap tmap) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  NarrowStorage<kN>& smem = *reinterpret_cast<NarrowStorage<kN>*>(smem_raw);
  const int kv_head = blockIdx.y, part = blockIdx.z;
  const int group = threadIdx.x / 128, tid = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterBarrier::init(&smem.q_full, 128);
    cutlass::arch::ClusterBarrier::init(&smem.q_empty, 256);  // both groups read Q
    for (int s = 0; s < 2; ++s) {
      cutlass::arch::ClusterBarrier::init(&smem.kv_full[s], 128);
      cutlass::arch::ClusterBarrier::init(&smem.kv_empty[s], 4);  // the warps of the stage's group
      cutlass::arch::ClusterBarrier::init(&smem.kv_raw[s], 1);
    }
    cutlass::arch::fence_barrier_init();
    if (p.use_tma) cute::prefetch_tma_descriptor(&tmap);
  }
  __syncthreads();
  // Programmatic dependent launch, as in decode_kernel: the combine grid may be scheduled now.
  asm volatile("griddepcontrol.launch_dependents;");
  if (group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    producer<Element, kFp8, 1>(p, &tmap, smem, part, kv_head, 0, tid);
  } else if (group == 1) {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    narrow_group<Element, kFp8, kN, 0>(p, smem, part, kv_head, tid);
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    narrow_group<Element, kFp8, kN, 1>(p, smem, part, kv_head, tid);
  }
#endif
}

template <typename Element, bool kFp8>
cudaError_t launch_narrow_decode(const DecodeParams& p, const CUtensorMap& tmap, int num_parts, int h_kv,
                                 cudaStream_t stream) {
  auto launch = [&](auto kernel, int smem_bytes) {
    cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (error != cudaSuccess) return error;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(1, h_kv, num_parts);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    return cudaLaunchKernelEx(&config, kernel, p, tmap);
  };
  if (p.rows <= 16) return launch(narrow_decode_kernel<Element, kFp8, 16>, int(sizeof(NarrowStorage<16>)));
  if (p.rows <= 32) return launch(narrow_decode_kernel<Element, kFp8, 32>, int(sizeof(NarrowStorage<32>)));
  return cudaErrorInvalidValue;
}

}  // namespace dskernels::mla
