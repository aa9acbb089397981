// The sm90 MLA decode kernels' shared pieces (sm90_mla_decode.cuh describes the kernel): the
// shared-memory layout, the wgmma operand traits, mbarrier waits, register fences and the walk over
// a partition's work items. Device code only, no torch.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <climits>
#include <cstdint>
#include <utility>

#include "cute/arch/cluster_sm90.hpp"
#include "cute/arch/copy_sm90_desc.hpp"
#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/arch/mma_sm90_desc.hpp"
#include "cute/arch/mma_sm90_gmma.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"
#include "dskernels/sm90_mla_decode.h"

namespace dskernels::mla {

struct alignas(1024) SharedStorage {
  static constexpr int kQRows = kBlockM;           // rows of the Q tile the producer fills
  static constexpr int kQChunkBytes = kChunkBytes;  // one [kQRows][128 B] region of it
  static constexpr int kQLoadBatch = kLoadBatch;    // its 16-byte loads in flight per producer thread
  uint8_t q[kTileBytes];
  uint8_t kv[2][kTileBytes];
  union {
    uint8_t p[kChunkBytes];           // WG1 -> WG2: P of the current block
    // The seesaw consumers (which keep each block's P in its stage) exchange per-row values here
    // instead: the max after block x and after block y, and each group's row sums (SeesawRow).
    float seesaw_rows[4][kBlockM];
  };
  float row_alpha[kBlockM];           // WG1 -> WG2: rescale of O for the current block
  // WG1 -> WG2: k_scale / l at the end of a sequence (0: no key), by item parity: after the
  // kBarConsumers barrier WG1 may finish a one-block item and write again before WG2 has read.
  float row_final[2][kBlockM];
  const uint8_t* row_src[kBlockN];    // producer: global address of each row it loads (null: zeros)
  // producer -> WG1, per stage: bit j set when key j of the block lies on a page inside the cache.
  // A page id outside it breaks the contract (the reference raises); its keys are masked out here,
  // not scored as the zeros the loads leave.
  uint64_t kv_valid[2];
  uint64_t q_full, q_empty, p_full, p_empty;
  uint64_t kv_full[2], kv_empty[2];
  uint64_t kv_raw[2];  // fp8 TMA path: the raw tile of the stage has landed (tx bytes)
};
static_assert(sizeof(SharedStorage) <= 227 * 1024, "more shared memory than an sm90 CTA can have");

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

template <typename Element>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  using QK = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using PVReg = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
  using PVSmem = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
  static __device__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ uint32_t pack_exact(__half2_raw h) {  // fp8-widened values: exact in bf16
    float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
    return pack(f.x, f.y);
  }
};

template <>
struct Mma<__half> {
  using QK = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using PVReg = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
  using PVSmem = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
  static __device__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ uint32_t pack_exact(__half2_raw h) { return *reinterpret_cast<uint32_t*>(&h); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// wgmma shared-memory descriptors for 128-byte swizzled tiles (PTX ISA "matrix descriptor").
// K-major (rows of 128 B): SBO = 1024 B between 8-row groups, LBO unused. Both encodings are
// checked against CuTe's make_gmma_desc on these layouts by scripts/check_gmma_desc.cu (CI).
__host__ __device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
// MN-major (the N dimension along the 128-byte rows): LBO = 8192 B between 64-column regions,
// SBO = 1024 B between groups of 8 K rows.
__host__ __device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(kChunkBytes >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}
// MN-major over one 64-column region (an operand 64 wide in MN: the narrow kernel's V^T): LBO
// unused, 0 as CuTe encodes it.
__host__ __device__ __forceinline__ uint64_t desc_mn_major_region(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Byte offset of 16-byte piece `piece` (0..71) of row `row` in a swizzled rows x 576 tile whose
// 64-column regions are `chunk_bytes` (rows x 128 B) apart (checked against CuTe's SW128 K-major
// atom tiled to 64 x 576 and 16 x 576 by scripts/check_gmma_desc.cu).
__host__ __device__ __forceinline__ uint32_t swizzled_offset(int row, int piece, int chunk_bytes = kChunkBytes) {
  return (piece >> 3) * chunk_bytes + row * 128 + (((piece & 7) ^ (row & 7)) << 4);
}

// An mbarrier wait that traps after kWaitTimeoutNs instead of spinning forever: a handshake bug
// then fails the launch ("unspecified launch failure") instead of hanging the process. No printf:
// a call here makes ptxas spill the consumers' accumulators around it (measured: 860 bytes). The
// clock is read only once the first try_wait (itself a bounded hardware wait) has failed.
constexpr uint64_t kWaitTimeoutNs = 10'000'000'000ull;

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void barrier_wait(const uint64_t* bar, uint32_t phase) {
  if (cutlass::arch::ClusterBarrier::try_wait(bar, phase)) return;
  const uint64_t start = global_ns();
  while (!cutlass::arch::ClusterBarrier::try_wait(bar, phase)) {
    if (global_ns() - start > kWaitTimeoutNs) __trap();
  }
}

// A consumer warp gives key stage `bar` back: one arrival per warp (its wgmmas that read the
// stage have been waited for by every lane), on the barrier of every CTA of the cluster, since
// with multicast each CTA's producer writes into both CTAs' tiles.
template <int kCluster>
__device__ __forceinline__ void release_stage(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 != 0) return;
  if constexpr (kCluster == 1) {
    cutlass::arch::ClusterBarrier::arrive(bar);
  } else {
#pragma unroll
    for (int c = 0; c < kCluster; ++c) cutlass::arch::ClusterBarrier::arrive(bar, c, 1);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint4 load_nc(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void store_shared(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

__device__ __forceinline__ uint4 load_shared(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

template <typename Array, size_t... I>
__device__ __forceinline__ void fence_all(Array& a, std::index_sequence<I...>) {
  (cute::warpgroup_fence_operand(a[I]), ...);
}

template <typename Op, size_t... I>
__device__ __forceinline__ void mma_ss(uint64_t da, uint64_t db, float* d, bool accumulate, std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

template <typename Op, size_t... I>
__device__ __forceinline__ void mma_rs(const uint32_t* a, uint64_t db, float* d, std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], db, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}

// One sequence's share of a partition: keys [lo, hi) of sequence i, split number `split`.
struct WorkItem {
  int i, lo, hi, split;
};

// Walks the sequences of partition `part` exactly as the Triton kernel does; every role of the CTA
// calls it with the same arguments, so they agree on the sequence of items and key blocks.
template <typename Fn>
__device__ __forceinline__ void for_each_item(const DecodeParams& p, int part, Fn&& fn) {
  const int* meta = p.meta + part * kMetaInts;
  const int begin_idx = meta[0], begin_tok = meta[1], end_idx = meta[2], end_tok = meta[3], begin_split = meta[4];
  // Clamped: metadata from other lengths gives wrong numbers, never an out-of-bounds access.
  const int first = max(begin_idx, 0), last = min(end_idx, p.batch - 1);
  for (int i = first; i <= last; ++i) {
    const int seqlen = p.seqlens[i];
    const int lo = max(i == begin_idx ? begin_tok : 0, 0);
    // The last bound keeps `start += kBlockN` from overflowing for a garbage length near INT_MAX.
    const int hi = min(min(i == end_idx ? end_tok : seqlen, seqlen), INT_MAX - kBlockN + 1);
    // Keys past the block table are masked anyway: an item of a garbage length (past the table)
    // walks one masked block, not blocks up to its value. A valid length never exceeds the table.
    if (lo < hi) fn(WorkItem{i, lo, max(min(hi, p.table_keys), lo + 1), i == begin_idx ? begin_split : 0});
  }
}

}  // namespace dskernels::mla
