// The sm90 MLA decode producer warp group (sm90_mla_decode.cuh describes the kernel): Q once per
// sequence, key blocks into the two-stage ring by TMA or through registers (any page size, fp8
// widened exactly). Shared by the default, seesaw and narrow kernels. Device code only, no torch.
#pragma once

#include "dskernels/sm90_mla_decode_common.cuh"

namespace dskernels::mla {

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

}  // namespace dskernels::mla
