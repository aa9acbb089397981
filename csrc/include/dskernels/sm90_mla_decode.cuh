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
//   alternate key blocks and keep one half of O each (seesaw_group, below).
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

// ---------------------------------------------------------------------------------------------
// Producer
// ---------------------------------------------------------------------------------------------

// Loads the kRows rows named in smem.row_src (null: zeros), `kRowPieces` 16-byte pieces per row,
// `kBatch` loads in flight per thread; consecutive threads take consecutive pieces (coalesced).
// `store(row, piece, value)` puts each piece into the swizzled tile.
template <int kRowPieces, int kBatch, int kRows = kBlockN, typename Storage, typename Store>
__device__ __forceinline__ void copy_rows(const Storage& smem, int tid, Store&& store) {
  constexpr int kTotal = kRows * kRowPieces;
  static_assert(kTotal % (kBatch * 128) == 0);
#pragma unroll 1
  for (int base = 0; base < kTotal; base += kBatch * 128) {
    uint4 v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int idx = base + j * 128 + tid;
      const uint8_t* src = smem.row_src[idx / kRowPieces];
      v[j] = src != nullptr ? load_nc(src + (idx % kRowPieces) * 16) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int idx = base + j * 128 + tid;
      store(idx / kRowPieces, idx % kRowPieces, v[j]);
    }
  }
}

// 16-bit rows (1152 bytes: 72 pieces), stored as they are: a key block (64 rows) by default, or
// the Q tile (kRows rows, regions kChunkRegion bytes apart).
template <int kRows = kBlockN, int kBatch = kLoadBatch, int kChunkRegion = kChunkBytes, typename Storage>
__device__ __forceinline__ void copy_rows_16bit(const Storage& smem, uint32_t tile, int tid) {
  copy_rows<kPieces, kBatch, kRows>(smem, tid, [&](int row, int piece, uint4 v) {
    store_shared(tile + swizzled_offset(row, piece, kChunkRegion), v);
  });
}

// Widens fp8 piece `piece` (16 e4m3 values, 0..35) of row `row` to Element and stores it as the
// two 16-bit pieces 2 * piece, 2 * piece + 1 of the swizzled tile.
template <typename Element>
__device__ __forceinline__ void store_widened(uint32_t tile, int row, int piece, uint4 v) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  uint32_t wide[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    wide[2 * w] = Mma<Element>::pack_exact(
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] & 0xFFFF), __NV_E4M3));
    wide[2 * w + 1] = Mma<Element>::pack_exact(
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] >> 16), __NV_E4M3));
  }
  store_shared(tile + swizzled_offset(row, 2 * piece), make_uint4(wide[0], wide[1], wide[2], wide[3]));
  store_shared(tile + swizzled_offset(row, 2 * piece + 1), make_uint4(wide[4], wide[5], wide[6], wide[7]));
}

// fp8 rows (576 bytes: 36 pieces), each piece widened to two 16-bit pieces.
template <typename Element, typename Storage>
__device__ __forceinline__ void copy_rows_fp8(const Storage& smem, uint32_t tile, int tid) {
  copy_rows<kHeadDim / 16, 9>(smem, tid, [&](int row, int piece, uint4 v) { store_widened<Element>(tile, row, piece, v); });
}

// The fp8 TMA path: TMA put the block's raw tile, [9 chunks][64 rows][64 B] (chunk c: columns
// 64c..64c+63), at kRawOffset inside the stage; the producer widens it in place into the 16-bit
// swizzled tile. Output chunk c ([8 KiB c, 8 KiB (c + 1))) overlaps raw chunks 2c - 9 and 2c - 8,
// never one after c: so chunk by chunk, every thread reads its raw pieces of chunk c, then (from
// the first overlapping chunk, 4, on) the warp group syncs, and only then writes output chunk c.
// Each thread takes fp8 piece tid % 4 of rows tid / 4 and 32 + tid / 4 (conflict-free 16-byte reads).
template <typename Element>
__device__ __forceinline__ void widen_fp8_tile(uint32_t tile, int tid) {
  static_assert(kRawOffset == 9 * kRawChunkBytes && kChunkBytes == 2 * kRawChunkBytes,
                "the overlap rule above assumes the raw tile in the upper half of the stage");
#pragma unroll 1
  for (int c = 0; c < kChunks; ++c) {
    const uint32_t raw = tile + kRawOffset + c * kRawChunkBytes;
    const uint4 lo = load_shared(raw + tid * 16);
    const uint4 hi = load_shared(raw + (128 + tid) * 16);
    if (c >= 4) cutlass::arch::NamedBarrier::sync(128, kBarProducer);
    const int piece = 4 * c + tid % 4;
    store_widened<Element>(tile, tid / 4, piece, lo);
    store_widened<Element>(tile, 32 + tid / 4, piece, hi);
  }
}

// Storage: SharedStorage, or the narrow kernel's (sm90_mla_decode_narrow.cuh), whose Q tile has
// fewer rows; the key stages are the same.
template <typename Element, bool kFp8, int kCluster, typename Storage>
__device__ void producer(const DecodeParams& p, const CUtensorMap* tmap, Storage& smem, int part, int kv_head,
                         int m_tile, int tid) {
  [[maybe_unused]] const int cluster_rank = kCluster > 1 ? int(cute::block_rank_in_cluster()) : 0;
  const uint8_t* q_base = static_cast<const uint8_t*>(p.q);
  const uint8_t* k_base = static_cast<const uint8_t*>(p.k_cache);
  constexpr int kKElem = kFp8 ? 1 : 2;
  int item_count = 0, block_count = 0;
  uint32_t raw_phases = 0;  // fp8 TMA path: bit s is the next phase of stage s's kv_raw barrier
  for_each_item(p, part, [&](const WorkItem& w) {
    // Q tile: rows (token, head) of this kv head; rows past s_q * h_q / h_kv are zeros.
    barrier_wait(&smem.q_empty, (item_count & 1) ^ 1);
    cutlass::arch::NamedBarrier::sync(128, kBarProducer);  // everyone is done with row_src
    if (tid < Storage::kQRows) {
      const int r = m_tile * kBlockM + tid;
      const uint8_t* src = nullptr;
      if (r < p.rows) {
        const int token = r / p.heads_per_kv, head = kv_head * p.heads_per_kv + r % p.heads_per_kv;
        src = q_base + (w.i * p.q_stride_b + token * p.q_stride_s + head * p.q_stride_h) * 2;
      }
      smem.row_src[tid] = src;
    }
    cutlass::arch::NamedBarrier::sync(128, kBarProducer);
    copy_rows_16bit<Storage::kQRows, Storage::kQLoadBatch, Storage::kQChunkBytes>(smem, smem_addr(smem.q), tid);
    cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> wgmma reads
    cutlass::arch::ClusterBarrier::arrive(&smem.q_full);
    ++item_count;

    const int* table = p.block_table + w.i * p.bt_stride;
    for (int start = w.lo; start < w.hi; start += kBlockN, ++block_count) {
      const int stage = block_count & 1;
      barrier_wait(&smem.kv_empty[stage], ((block_count >> 1) & 1) ^ 1);
      const int page_idx = start / p.page_size;
      const bool whole = start + kBlockN <= w.hi && start % kBlockN == 0 && page_idx < p.max_pages;
      if (kFp8 && p.use_tma && whole) {
        // The raw block (nine 64-byte x 64-row boxes, 36 KiB: twice the register path's bytes in
        // flight, none of its registers) into the upper half of the stage, widened there in place.
        constexpr uint64_t kEvictNormal = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
        const uint32_t tile = smem_addr(smem.kv[stage]);
        if (tid == 0) {
          const int page = table[page_idx];
          smem.kv_valid[stage] = page >= 0 && page < p.num_pages ? ~uint64_t(0) : uint64_t(0);
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.kv_raw[stage], kTileBytes / 2);
#pragma unroll 1
          for (int c = 0; c < kChunks; ++c) {
            cute::SM90_TMA_LOAD_4D::copy(tmap, &smem.kv_raw[stage], kEvictNormal,
                                         smem.kv[stage] + kRawOffset + c * kRawChunkBytes, c * kChunkCols, kv_head,
                                         start % p.page_size, page);
          }
        }
        barrier_wait(&smem.kv_raw[stage], (raw_phases >> stage) & 1);
        raw_phases ^= 1u << stage;
        widen_fp8_tile<Element>(tile, tid);
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> wgmma reads
        cutlass::arch::ClusterBarrier::arrive(&smem.kv_full[stage]);
        continue;
      }
      if (!kFp8 && p.use_tma && whole) {
        // One page holds the whole block (page_size % 64 == 0): nine 64 x 64 boxes. In a cluster
        // each CTA loads every kCluster-th box and multicasts it to all, so the key block crosses
        // from L2 once for all the row tiles; each CTA still expects the whole tile's bytes.
        if (tid == 0) {
          // The operand is an L2 cache policy (createpolicy's encoding; CuTe passes EVICT_NORMAL):
          // 0 is no documented policy.
          constexpr uint64_t kEvictNormal = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
          const int page = table[page_idx];
          smem.kv_valid[stage] = page >= 0 && page < p.num_pages ? ~uint64_t(0) : uint64_t(0);
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.kv_full[stage], kTileBytes);
#pragma unroll 1
          for (int c = 0; c < kChunks; ++c) {
            if constexpr (kCluster == 1) {
              cute::SM90_TMA_LOAD_4D::copy(tmap, &smem.kv_full[stage], kEvictNormal,
                                           smem.kv[stage] + c * kChunkBytes, c * kChunkCols, kv_head,
                                           start % p.page_size, page);
            } else if (c % kCluster == cluster_rank) {
              cute::SM90_TMA_LOAD_MULTICAST_4D::copy(tmap, &smem.kv_full[stage], uint16_t((1 << kCluster) - 1), kEvictNormal,
                                                     smem.kv[stage] + c * kChunkBytes, c * kChunkCols, kv_head,
                                                     start % p.page_size, page);
            }
          }
        } else {
          cutlass::arch::ClusterBarrier::arrive(&smem.kv_full[stage]);
        }
        continue;
      }
      cutlass::arch::NamedBarrier::sync(128, kBarProducer);
      if (tid < kBlockN) {
        const int key = start + tid;
        const int pi = key / p.page_size;
        const uint8_t* src = nullptr;
        if (key < w.hi && pi < p.max_pages) {
          const int page = table[pi];
          if (page >= 0 && page < p.num_pages) {
            src = k_base + (int64_t(page) * p.k_stride_page + int64_t(key % p.page_size) * p.k_stride_tok +
                            int64_t(kv_head) * p.k_stride_head) * kKElem;
          }
        }
        smem.row_src[tid] = src;
        // Rows past hi are null too; the consumer masks them by length anyway.
        const uint32_t loaded = __ballot_sync(0xffffffff, src != nullptr);
        if (tid % 32 == 0) reinterpret_cast<uint32_t*>(&smem.kv_valid[stage])[tid / 32] = loaded;
      }
      cutlass::arch::NamedBarrier::sync(128, kBarProducer);
      if constexpr (kFp8) {
        copy_rows_fp8<Element>(smem, smem_addr(smem.kv[stage]), tid);
      } else {
        copy_rows_16bit(smem, smem_addr(smem.kv[stage]), tid);
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&smem.kv_full[stage]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------------------------

// Accumulator layout of a 64 x N wgmma (per thread, warp w of the group, lane l, q = l % 4):
// element 4j + e holds row r0 = 16w + l/4 (e < 2) or r0 + 8 (e >= 2), column 8j + 2q + (e & 1).

// Writes this thread's part of a 64 x 256 half of O (already scaled) for rows r0 and r0 + 8.
template <typename Element>
__device__ __forceinline__ void store_output(const DecodeParams& p, const WorkItem& w, const float* o, int col0,
                                             int kv_head, int m_tile, int r0, int q4, bool split_out, float final0,
                                             float final1) {
  const int slot = p.num_splits[w.i] + w.split;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m_tile * kBlockM + r0 + half * 8;
    if (r >= p.rows) continue;
    const int token = r / p.heads_per_kv, head = kv_head * p.heads_per_kv + r % p.heads_per_kv;
    const float f = half ? final1 : final0;
    if (split_out) {
      if (slot < 0 || slot >= p.max_slots) continue;
      float* dst = p.out_acc + (int64_t(slot) * p.h_q * p.s_q + head * p.s_q + token) * kHeadDimV + col0 + 2 * q4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * half] * f, o[4 * j + 2 * half + 1] * f);
      }
    } else {
      Element* dst = static_cast<Element*>(p.out) + w.i * p.o_stride_b + token * p.o_stride_s + head * p.o_stride_h +
                     col0 + 2 * q4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<uint32_t*>(dst + 8 * j) = Mma<Element>::pack(o[4 * j + 2 * half] * f, o[4 * j + 2 * half + 1] * f);
      }
    }
  }
}

// Writes the LSE of rows r0 and r0 + 8 (log2 domain, -inf: no key): the natural-log lse (+inf for
// no key) of a sequence in one split, or the split's slot of lse_acc.
__device__ __forceinline__ void store_lse(const DecodeParams& p, const WorkItem& w, int kv_head, int m_tile, int r0,
                                          bool split_out, const float* lse2) {
  const int slot = p.num_splits[w.i] + w.split;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m_tile * kBlockM + r0 + 8 * h;
    if (r >= p.rows) continue;
    const int tok = r / p.heads_per_kv, head = kv_head * p.heads_per_kv + r % p.heads_per_kv;
    if (split_out) {
      if (slot >= 0 && slot < p.max_slots) p.lse_acc[int64_t(slot) * p.h_q * p.s_q + head * p.s_q + tok] = lse2[h];
    } else {
      p.lse[w.i * p.lse_stride_b + head * p.lse_stride_h + tok] = lse2[h] == -INFINITY ? INFINITY : lse2[h] * kLn2;
    }
  }
}

// S = Q K^T for one key block (36 wgmma 64x64x16, both operands K-major in shared memory);
// committed, not waited for.
template <typename MmaT>
// No operand fence on s here: in the pipelined loop P V is still in flight, and an instruction
// defining wgmma registers inside an open wgmma stage makes ptxas serialize every wgmma (C7515).
__device__ __forceinline__ void issue_qk(uint32_t q_tile, uint32_t kv_tile, float* s) {
  cute::warpgroup_arrive();
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_ss<typename MmaT::QK>(desc_k_major(q_tile + c * kChunkBytes + kk * 32),
                                desc_k_major(kv_tile + c * kChunkBytes + kk * 32), s, c > 0 || kk > 0,
                                std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
}

// The query token of each of the thread's two rows (r0, r0 + 8 of the tile); rows past the last
// (padding) take the last token.
__device__ __forceinline__ void row_tokens(const DecodeParams& p, int m_tile, int r0, int* token) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m_tile * kBlockM + r0 + 8 * h;
    token[h] = r < p.rows ? r / p.heads_per_kv : p.s_q - 1;
  }
}

// The end of the keys each row sees in item w: its split's end, and causally seqlen - s_q + token + 1.
__device__ __forceinline__ void row_limits(const DecodeParams& p, const WorkItem& w, const int* token, int* limit) {
  const int seqlen = p.seqlens[w.i];
#pragma unroll
  for (int h = 0; h < 2; ++h) limit[h] = min(w.hi, p.causal ? seqlen - p.s_q + token[h] + 1 : seqlen);
}

// Scales this thread's 32 scores of a 64-key block into the log2 domain and masks the keys past each
// row's limit or on a page outside the cache (-inf); row_max: the maxima of the thread's two rows
// over their four lanes. `valid`: the stage's kv_valid shifted right by 2 * q4.
__device__ __forceinline__ void scale_and_mask(float* s, const int* limit, int start, uint64_t valid, int q4,
                                               float scale, float* row_max) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int visible = limit[h] - start;  // keys [start, start + visible) of the block
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * j + 2 * h + e];
        x = 8 * j + 2 * q4 + e < visible && (valid >> (8 * j + e)) & 1 ? x * scale : -INFINITY;
        m = fmaxf(m, x);
      }
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    row_max[h] = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
  }
}

// s = 2^(s - m) in place for each of the two rows (m_safe: the row's max, 0 where it is -inf);
// row_sum: this thread's part of each row's sum.
__device__ __forceinline__ void exp_scores(float* s, const float* m_safe, float* row_sum) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * j + 2 * h + e];
        x = fast_exp2(x - m_safe[h]);
        sum += x;
      }
    }
    row_sum[h] = sum;
  }
}

// P (this thread's 32 probabilities) as the A operand of the 64x256x16 wgmma (k-step kk: pa[4kk..]).
template <typename MmaT>
__device__ __forceinline__ void pack_p(const float* s, uint32_t* pa) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) pa[4 * kk + i] = MmaT::pack(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
  }
}

// Stores P into the swizzled 64 x 64 tile at `tile` (a K-major wgmma A operand): columns
// 8j + 2 q4 (+1) of rows r0 and r0 + 8 are 4 bytes at q4 of 16-byte piece j.
template <typename MmaT>
__device__ __forceinline__ void store_p(uint32_t tile, const float* s, int r0, int q4) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t word = MmaT::pack(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]);
      asm volatile("st.shared.u32 [%0], %1;" :: "r"(tile + swizzled_offset(r0 + 8 * h, j) + 4 * q4), "r"(word));
    }
  }
}

// O (this thread's 128 accumulators of a 64 x 256 half) times a per-row factor.
__device__ __forceinline__ void rescale_o(float* o, const float* factor) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j + 0] *= factor[0];
    o[4 * j + 1] *= factor[0];
    o[4 * j + 2] *= factor[1];
    o[4 * j + 3] *= factor[1];
  }
}

template <typename Element, bool kFp8, int kCluster>
__device__ void softmax_group(const DecodeParams& p, SharedStorage& smem, int part, int kv_head, int m_tile, int tid) {
  using MmaT = Mma<Element>;
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int r0 = warp * 16 + lane / 4;  // and r0 + 8
  const float k_scale = kFp8 ? *p.k_scale : 1.0f;
  const float scale = p.scale_log2 * k_scale;
  const uint32_t q_tile = smem_addr(smem.q);
  const uint32_t p_tile = smem_addr(smem.p);
  int token[2];
  row_tokens(p, m_tile, r0, token);
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    int limit[2];
    row_limits(p, w, token, limit);
    float o[128];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

    // Software pipeline: block i+1's QK^T is issued right behind block i's P V, so the tensor
    // cores never wait for this warp group between them; wgmma.wait_group 0 at the top of an
    // iteration then covers both (S of block i, and the P V that read the previous stage).
    barrier_wait(&smem.q_full, item_count & 1);
    float s[32];
    uint32_t pa[16];  // P as the A operand of P V (k-step kk: keys 16kk..16kk+15)
    fence_all(o, std::make_index_sequence<128>{});  // O's zeros are written before any wgmma stage opens
    fence_all(s, std::make_index_sequence<32>{});
    barrier_wait(&smem.kv_full[block_count & 1], (block_count >> 1) & 1);
    issue_qk<MmaT>(q_tile, smem_addr(smem.kv[block_count & 1]), s);
    for (int start = w.lo; start < w.hi; start += kBlockN, ++block_count) {
      const int stage = block_count & 1;
      const uint32_t kv_tile = smem_addr(smem.kv[stage]);
      cute::warpgroup_wait<0>();
      // Pin the registers the finished wgmmas wrote or read: nothing may move across the wait.
      fence_all(s, std::make_index_sequence<32>{});
      fence_all(o, std::make_index_sequence<128>{});
      fence_all(pa, std::make_index_sequence<16>{});
      if (start + kBlockN >= w.hi) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // last use of Q

      // Scale, mask, online softmax (log2 domain). Four lanes share a row: reduce over xor 1, 2.
      // The stage stays ours until the end of this iteration releases it, so its kv_valid is current.
      float row_max[2], m_safe[2], row_sum[2], alpha[2];
      scale_and_mask(s, limit, start, smem.kv_valid[stage] >> (2 * q4), q4, scale, row_max);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(m_run[h], row_max[h]);
        m_safe[h] = m_new == -INFINITY ? 0.0f : m_new;
        alpha[h] = fast_exp2(m_run[h] - m_safe[h]);
        m_run[h] = m_new;
      }
      exp_scores(s, m_safe, row_sum);
#pragma unroll
      for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum[h];  // this thread's columns

      pack_p<MmaT>(s, pa);  // P in registers, laid out as the A operand of the 64x256x16 wgmma
      // Hand P and the rescale factors to WG2 (its previous block must be done with them).
      barrier_wait(&smem.p_empty, (block_count & 1) ^ 1);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 8 * h;
          const uint32_t addr = p_tile + swizzled_offset(r, j) + 4 * q4;
          asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(pa[4 * (j / 2) + 2 * (j % 2) + h]));
        }
      }
      if (q4 == 0) {
        smem.row_alpha[r0] = alpha[0];
        smem.row_alpha[r0 + 8] = alpha[1];
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&smem.p_full);

      rescale_o(o, alpha);  // O[:, 0:256] = alpha * O + P V[:, 0:256]
      fence_all(o, std::make_index_sequence<128>{});
      fence_all(pa, std::make_index_sequence<16>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_rs<typename MmaT::PVReg>(pa + 4 * kk, desc_mn_major(kv_tile + kk * 2048), o,
                                     std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      if (start + kBlockN < w.hi) {
        const int next = block_count + 1;
        barrier_wait(&smem.kv_full[next & 1], (next >> 1) & 1);
        issue_qk<MmaT>(q_tile, smem_addr(smem.kv[next & 1]), s);
        // Give this block's stage back as soon as its P V is done (wgmma groups complete in commit
        // order: at most the QK^T just issued is still pending), not after the next QK^T: the
        // producer's load of block + 2 then overlaps that QK^T instead of waiting for it. With two
        // 72 KiB stages, the load's latency is otherwise exposed once per block in compute-bound
        // calls. No register is touched here (the QK^T is still writing s).
        cute::warpgroup_wait<1>();
        release_stage<kCluster>(&smem.kv_empty[stage]);
      }
    }
    cute::warpgroup_wait<0>();
    fence_all(o, std::make_index_sequence<128>{});
    fence_all(pa, std::make_index_sequence<16>{});
    release_stage<kCluster>(&smem.kv_empty[(block_count - 1) & 1]);

    // Epilogue: full row sums, the final factor for both halves, LSE.
    float final_factor[2], lse2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[h];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      const bool seen = l != 0.0f;  // NaN (a NaN score) stays NaN, not "no key seen"
      final_factor[h] = seen ? k_scale / l : 0.0f;
      lse2[h] = seen ? m_run[h] + __log2f(l) : -INFINITY;
    }
    if (q4 == 0) {
      smem.row_final[item_count & 1][r0] = final_factor[0];
      smem.row_final[item_count & 1][r0 + 8] = final_factor[1];
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    ++item_count;
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    store_output<Element>(p, w, o, 0, kv_head, m_tile, r0, q4, split_out, final_factor[0], final_factor[1]);
    if (q4 == 0) store_lse(p, w, kv_head, m_tile, r0, split_out, lse2);
  });
}

template <typename Element, int kCluster>
__device__ void second_half_group(const DecodeParams& p, SharedStorage& smem, int part, int kv_head, int m_tile,
                                  int tid) {
  using MmaT = Mma<Element>;
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int r0 = warp * 16 + lane / 4;
  const uint32_t p_tile = smem_addr(smem.p);
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    float o[128];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.0f;
    for (int start = w.lo; start < w.hi; start += kBlockN, ++block_count) {
      const int stage = block_count & 1;
      const uint32_t kv_tile = smem_addr(smem.kv[stage]);
      barrier_wait(&smem.kv_full[stage], (block_count >> 1) & 1);
      barrier_wait(&smem.p_full, block_count & 1);
      const float alpha[2] = {smem.row_alpha[r0], smem.row_alpha[r0 + 8]};
      rescale_o(o, alpha);
      fence_all(o, std::make_index_sequence<128>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_ss<typename MmaT::PVSmem>(desc_k_major(p_tile + kk * 32),
                                      desc_mn_major(kv_tile + 4 * kChunkBytes + kk * 2048), o, true,
                                      std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_all(o, std::make_index_sequence<128>{});
      cutlass::arch::ClusterBarrier::arrive(&smem.p_empty);
      release_stage<kCluster>(&smem.kv_empty[stage]);
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    const float f0 = smem.row_final[item_count & 1][r0], f1 = smem.row_final[item_count & 1][r0 + 8];
    ++item_count;
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    store_output<Element>(p, w, o, 256, kv_head, m_tile, r0, q4, split_out, f0, f1);
  });
}

// ---------------------------------------------------------------------------------------------
// Seesaw consumers (opt-in: DSKERNELS_MLA_SEESAW=1; written 2026-12-05 without a GPU)
// ---------------------------------------------------------------------------------------------
//
// The two-role consumers above leave the tensor cores idle while WG1 runs a block's softmax. Here
// both groups compute S = Q K^T, for alternate blocks of a pair (WG1 the first, x; WG2 the second,
// y), and each keeps one half of O (WG1 columns 0..255, WG2 256..511), into which it multiplies
// both blocks' P, so one group's softmax runs under the other's wgmma:
//   tensor cores: QK_x (WG1) | QK_y (WG2) | PV_x,L (WG1) | PV_x,R (WG2) | PV_y,L (WG1) | PV_y,R (WG2)
// With m the rows' running max before the pair:
//   WG1: m_x = max(m, rowmax S_x), a = 2^(m - m_x), P_x = 2^(S_x - m_x); O_L = a O_L + P_x V_x,L
//   WG2: m_y = max(m_x, rowmax S_y), b = 2^(m_x - m_y), P_y = 2^(S_y - m_y);
//        O_R = b (a O_R + P_x V_x,R) + P_y V_y,R   (b applied between its two P V groups)
//   WG1: O_L = b O_L + P_y V_y,L;  then m = m_y in both; at the end l = l_WG1 + l_WG2.
// A block's P goes into the rope chunk (chunk 8) of its own key stage, which only that block's
// QK^T reads (all four warps of the group that scores it: they meet at a barrier before the P
// stores), so no shared memory is added. The maxima and the final row sums cross in
// smem.seesaw_rows; four named barriers (one group arrives, the other syncs) order each pair:
//   WG1: arrive MaxX, arrive Px, sync MaxY, sync Py;   WG2: sync MaxX, arrive MaxY, arrive Py, sync Px
// (WG1 cannot arrive on a barrier again before WG2 has synced on it: each next arrival waits for
// something WG2 does after its sync, a stage release or a barrier, and likewise the other way.)
// A sequence with an odd block count ends on a pair without y (`kHasY` false): WG2 scores nothing,
// its max is m_x and both skip y's P V. Each group releases a stage once its last wgmma on it is
// done (kv_empty counts the 8 warps of both).
enum SeesawRow { kRowMaxX = 0, kRowMaxY = 1, kRowSumA = 2, kRowSumB = 3 };

// What a seesaw group carries from pair to pair of one sequence.
struct SeesawState {
  float o[128];               // this group's 64 x 256 half of O, relative to m_run
  float s[32];                // scores, then probabilities, of the block it scores
  uint32_t pa[16];            // those probabilities as the A operand of P V
  float m_run[2], l_run[2];   // running max (log2 domain) and this group's part of the row sums
  int pending;                // WG1: the stage of the last pair's y, whose P V may still run (-1: none)
};

template <typename Element, bool kFp8, bool kSecond, bool kHasY>
__device__ __forceinline__ void seesaw_pair(const DecodeParams& p, SharedStorage& smem, SeesawState& st,
                                            const int* limit, int start_x, int bx, bool last_pair, float scale,
                                            int r0, int q4) {
  using MmaT = Mma<Element>;
  constexpr int kPChunk = 8 * kChunkBytes;              // a stage's rope chunk: its block's P once scored
  constexpr int kHalf = kSecond ? 4 * kChunkBytes : 0;  // this group's half of V
  float (*rows)[kBlockM] = smem.seesaw_rows;
  const uint32_t q_tile = smem_addr(smem.q);
  const int stage_x = bx & 1, stage_y = (bx + 1) & 1;
  const uint32_t tile_x = smem_addr(smem.kv[stage_x]), tile_y = smem_addr(smem.kv[stage_y]);
  float row_max[2], row_sum[2];

  if constexpr (!kSecond) {
    // S_x, issued behind the last pair's P_y V_y,L, whose stage goes back as soon as that is done.
    barrier_wait(&smem.kv_full[stage_x], (bx >> 1) & 1);
    issue_qk<MmaT>(q_tile, tile_x, st.s);
    if (st.pending >= 0) {
      cute::warpgroup_wait<1>();
      release_stage<1>(&smem.kv_empty[st.pending]);
    }
    st.pending = -1;
    cute::warpgroup_wait<0>();
    fence_all(st.s, std::make_index_sequence<32>{});
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    if (last_pair) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // the last x: done with Q

    float m_x_safe[2], a[2];
    scale_and_mask(st.s, limit, start_x, smem.kv_valid[stage_x] >> (2 * q4), q4, scale, row_max);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_x = fmaxf(st.m_run[h], row_max[h]);
      m_x_safe[h] = m_x == -INFINITY ? 0.0f : m_x;
      a[h] = fast_exp2(st.m_run[h] - m_x_safe[h]);
      st.m_run[h] = m_x;
    }
    if (q4 == 0) {
      rows[kRowMaxX][r0] = st.m_run[0];
      rows[kRowMaxX][r0 + 8] = st.m_run[1];
    }
    cutlass::arch::NamedBarrier::arrive(256, kBarMaxX);
    // P_x goes over x's rope chunk below, which every warp of this group read for its QK_x slice:
    // a warp's wait_group covers its own slice only, so all four must be past theirs first. (Here,
    // not right before the stores: there ptxas spilled 56 bytes.) WG2's P_y needs no such barrier:
    // its MaxX sync already waits for all its warps.
    cutlass::arch::NamedBarrier::sync(128, kBarQkX);
    exp_scores(st.s, m_x_safe, row_sum);
#pragma unroll
    for (int h = 0; h < 2; ++h) st.l_run[h] = st.l_run[h] * a[h] + row_sum[h];
    pack_p<MmaT>(st.s, st.pa);
    store_p<MmaT>(tile_x + kPChunk, st.s, r0, q4);  // P_x for WG2's half (QK_x is done with the chunk)
    cutlass::arch::fence_view_async_shared();            // generic-proxy stores -> WG2's wgmma reads
    cutlass::arch::NamedBarrier::arrive(256, kBarPx);
    rescale_o(st.o, a);
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_rs<typename MmaT::PVReg>(st.pa + 4 * kk, desc_mn_major(tile_x + kk * 2048), st.o,
                                   std::make_index_sequence<128>{});
    }
    cute::warpgroup_commit_batch();

    cutlass::arch::NamedBarrier::sync(256, kBarMaxY);  // y's max, from WG2
    float b[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_y = rows[kRowMaxY][r0 + 8 * h];
      b[h] = fast_exp2(st.m_run[h] - (m_y == -INFINITY ? 0.0f : m_y));
      st.m_run[h] = m_y;
      st.l_run[h] *= b[h];
    }
    cutlass::arch::NamedBarrier::sync(256, kBarPy);  // P_y is in y's rope chunk
    cute::warpgroup_wait<0>();
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    release_stage<1>(&smem.kv_empty[stage_x]);
    // Without y, m_y = m_x: b is 1, or 0 where the row has seen no key (O_L is 0 there). Not
    // rescaling then also keeps non-wgmma definitions of O off the path that joins the one where
    // y's P V is still in flight (ptxas would serialize every wgmma: C7515).
    if constexpr (kHasY) {
      rescale_o(st.o, b);
      barrier_wait(&smem.kv_full[stage_y], ((bx + 1) >> 1) & 1);  // WG2 saw it; this makes it ours to read
      fence_all(st.o, std::make_index_sequence<128>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_ss<typename MmaT::PVSmem>(desc_k_major(tile_y + kPChunk + kk * 32), desc_mn_major(tile_y + kk * 2048),
                                      st.o, true, std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      st.pending = stage_y;
    }
  } else {
    row_max[0] = row_max[1] = -INFINITY;
    if constexpr (kHasY) {
      barrier_wait(&smem.kv_full[stage_y], ((bx + 1) >> 1) & 1);
      issue_qk<MmaT>(q_tile, tile_y, st.s);
      cute::warpgroup_wait<0>();
      fence_all(st.s, std::make_index_sequence<32>{});
      fence_all(st.o, std::make_index_sequence<128>{});
      fence_all(st.pa, std::make_index_sequence<16>{});
      if (last_pair) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // the last y: done with Q
      scale_and_mask(st.s, limit, start_x + kBlockN, smem.kv_valid[stage_y] >> (2 * q4), q4, scale, row_max);
    }
    cutlass::arch::NamedBarrier::sync(256, kBarMaxX);  // x's max, from WG1
    float m_y_safe[2], a[2], b[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_x = rows[kRowMaxX][r0 + 8 * h];
      const float m_y = fmaxf(m_x, row_max[h]);
      m_y_safe[h] = m_y == -INFINITY ? 0.0f : m_y;
      a[h] = fast_exp2(st.m_run[h] - (m_x == -INFINITY ? 0.0f : m_x));  // the same a and b as WG1's
      b[h] = fast_exp2(m_x - m_y_safe[h]);
      st.m_run[h] = m_y;
    }
    if (q4 == 0) {
      rows[kRowMaxY][r0] = st.m_run[0];
      rows[kRowMaxY][r0 + 8] = st.m_run[1];
    }
    cutlass::arch::NamedBarrier::arrive(256, kBarMaxY);
    row_sum[0] = row_sum[1] = 0.0f;
    if constexpr (kHasY) {
      exp_scores(st.s, m_y_safe, row_sum);
      pack_p<MmaT>(st.s, st.pa);
      store_p<MmaT>(tile_y + kPChunk, st.s, r0, q4);  // P_y for WG1's half
      cutlass::arch::fence_view_async_shared();
    }
    cutlass::arch::NamedBarrier::arrive(256, kBarPy);
#pragma unroll
    for (int h = 0; h < 2; ++h) st.l_run[h] = st.l_run[h] * a[h] * b[h] + row_sum[h];
    rescale_o(st.o, a);

    cutlass::arch::NamedBarrier::sync(256, kBarPx);  // P_x is in x's rope chunk
    barrier_wait(&smem.kv_full[stage_x], (bx >> 1) & 1);  // WG1 saw it; this makes it ours to read
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_ss<typename MmaT::PVSmem>(desc_k_major(tile_x + kPChunk + kk * 32), desc_mn_major(tile_x + kHalf + kk * 2048),
                                    st.o, true, std::make_index_sequence<128>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    release_stage<1>(&smem.kv_empty[stage_x]);
    if constexpr (kHasY) {  // (without y, b is 1 or multiplies zeros, as in WG1)
      rescale_o(st.o, b);
      fence_all(st.o, std::make_index_sequence<128>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_rs<typename MmaT::PVReg>(st.pa + 4 * kk, desc_mn_major(tile_y + kHalf + kk * 2048), st.o,
                                     std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      // Waited for here: y's stage is where the next pair's y is loaded.
      cute::warpgroup_wait<0>();
      fence_all(st.o, std::make_index_sequence<128>{});
      fence_all(st.pa, std::make_index_sequence<16>{});
      release_stage<1>(&smem.kv_empty[stage_y]);
    }
  }
}

template <typename Element, bool kFp8, bool kSecond>
__device__ void seesaw_group(const DecodeParams& p, SharedStorage& smem, int part, int kv_head, int m_tile, int tid) {
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int r0 = warp * 16 + lane / 4;  // and r0 + 8
  const float k_scale = kFp8 ? *p.k_scale : 1.0f;
  const float scale = p.scale_log2 * k_scale;
  float (*rows)[kBlockM] = smem.seesaw_rows;
  int token[2];
  row_tokens(p, m_tile, r0, token);
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    int limit[2];
    row_limits(p, w, token, limit);
    SeesawState st;
#pragma unroll
    for (int k = 0; k < 128; ++k) st.o[k] = 0.0f;
    st.m_run[0] = st.m_run[1] = -INFINITY;
    st.l_run[0] = st.l_run[1] = 0.0f;
    st.pending = -1;
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.s, std::make_index_sequence<32>{});
    const int blocks = (w.hi - w.lo + kBlockN - 1) / kBlockN, pairs = blocks / 2;
    barrier_wait(&smem.q_full, item_count & 1);
    if (kSecond && pairs == 0) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // no y: Q not read
    // last_pair: this group's last QK^T of the sequence (WG2 scores none in a pair without y).
    for (int pair = 0; pair < pairs; ++pair, block_count += 2) {
      seesaw_pair<Element, kFp8, kSecond, true>(p, smem, st, limit, w.lo + 2 * pair * kBlockN, block_count,
                                                pair + 1 == pairs && (kSecond || blocks % 2 == 0), scale, r0, q4);
    }
    if (blocks % 2 == 1) {  // the last block, x of a pair without y
      seesaw_pair<Element, kFp8, kSecond, false>(p, smem, st, limit, w.lo + 2 * pairs * kBlockN, block_count,
                                                 !kSecond, scale, r0, q4);
      block_count += 1;
    }
    // Unconditionally: a wait on some paths only makes ptxas serialize every wgmma (C7518, C7520).
    cute::warpgroup_wait<0>();
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    if (!kSecond && st.pending >= 0) release_stage<1>(&smem.kv_empty[st.pending]);

    // Epilogue: each group's row sums, added; the final factor and (WG1) the LSE.
    float l_own[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = st.l_run[h];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l_own[h] = l + __shfl_xor_sync(0xffffffff, l, 2);
    }
    if (q4 == 0) {
      rows[kSecond ? kRowSumB : kRowSumA][r0] = l_own[0];
      rows[kSecond ? kRowSumB : kRowSumA][r0 + 8] = l_own[1];
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    float final_factor[2], lse2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = l_own[h] + rows[kSecond ? kRowSumA : kRowSumB][r0 + 8 * h];
      const bool seen = l != 0.0f;  // NaN (a NaN score) stays NaN, not "no key seen"
      final_factor[h] = seen ? k_scale / l : 0.0f;
      lse2[h] = seen ? st.m_run[h] + __log2f(l) : -INFINITY;
    }
    ++item_count;
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    store_output<Element>(p, w, st.o, kSecond ? 256 : 0, kv_head, m_tile, r0, q4, split_out, final_factor[0],
                          final_factor[1]);
    if (!kSecond && q4 == 0) store_lse(p, w, kv_head, m_tile, r0, split_out, lse2);
  });
}

// grid (row tiles, h_kv, num_parts): the row tiles of one partition and kv head run side by side.
// kCluster = 2 (16-bit caches on the TMA path, two or more row tiles): pairs of row tiles form a
// cluster and share every key block through TMA multicast, so crossing a multiple of 64 rows does
// not double the key traffic per SM (grid.x is rounded up to even; a padding tile has no rows).
// kSeesaw: the seesaw consumers (above) instead of the softmax / second-half pair; never clustered.
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
