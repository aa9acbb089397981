// Interface of the sm90 MLA decode kernels (csrc/include/dskernels/sm90_mla_decode.cuh): shapes,
// parameter structs and launchers. No CUTLASS and no torch here, so the torch-facing launcher
// (csrc/mla/sm90_mla.cu) compiles without the kernel templates.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dskernels::mla {

constexpr int kHeadDim = 576;
constexpr int kHeadDimV = 512;
constexpr int kBlockM = 64;               // query rows per CTA
constexpr int kBlockN = 64;               // keys per block; split points are multiples of it
constexpr int kChunkCols = 64;            // 16-bit elements per 128-byte swizzled row
constexpr int kChunks = kHeadDim / kChunkCols;        // 9
constexpr int kChunkBytes = kBlockN * 128;            // one [64 rows][128 B] region
constexpr int kTileBytes = kChunks * kChunkBytes;     // 72 KiB: a 64 x 576 16-bit tile
constexpr int kPieces = kHeadDim * 2 / 16;            // 16-byte pieces per 16-bit row: 72
constexpr int kThreads = 384;
constexpr int kCombineWarps = 4;         // combine kernel: a warp per (head, token) row
constexpr int kProducerRegs = 88;
constexpr int kConsumerRegs = 208;
constexpr int kMetaInts = 8;
constexpr int kRawOffset = kTileBytes / 2;          // fp8 TMA path: the raw 64 x 576-byte tile, upper half
constexpr int kRawChunkBytes = kBlockN * kChunkCols; // one raw [64 rows][64 B] box: 4 KiB
constexpr int kLoadBatch = 12;            // 16-byte loads in flight per producer thread (36 per 16-bit block)
constexpr float kLn2 = 0.6931471805599453f;

// Named barriers, as cutlass::arch::NamedBarrier numbers them: it adds its 8 reserved ids, so id n
// is hardware barrier 8 + n, and n must stay below 8 (PTX has 16; ptxas wraps a larger id around
// silently, onto __syncthreads' barrier 0 for 16).
constexpr int kBarProducer = 1;           // the producer warp group
constexpr int kBarConsumers = 2;          // WG1 + WG2 at the end of a sequence
// The seesaw consumers (DSKERNELS_MLA_SEESAW=1): one group arrives, the other syncs, per key-block pair.
constexpr int kBarMaxX = 3;               // WG1 -> WG2: the rows' max after block x
constexpr int kBarMaxY = 4;               // WG2 -> WG1: the rows' max after block y
constexpr int kBarPx = 5;                 // WG1 -> WG2: P of x stored (relative to x's max)
constexpr int kBarPy = 6;                 // WG2 -> WG1: P of y stored
constexpr int kBarQkX = 7;                // WG1's four warps: all done reading x's rope chunk (QK_x)
// The narrow kernel (DSKERNELS_MLA_NARROW=1; another kernel, so the seesaw's ids are free there):
// each consumer group's four warps, per key block.
constexpr int kBarNarrow = 3;             // + group (0: WG1, 1: WG2)
static_assert(kBarQkX < 8 && kBarNarrow + 1 < 8, "NamedBarrier ids above 7 leave the hardware's 16");
constexpr int kNarrowMaxRows = 32;        // query rows (s_q * h_q / h_kv) the narrow kernel serves

struct DecodeParams {
  const void* q;              // [b, s_q, h_q, 576]
  const void* k_cache;        // [num_pages, page_size, h_kv, 576]
  const int* block_table;     // [b, max_pages]
  const int* seqlens;         // [b]
  const int* meta;            // [num_parts, 8]
  const int* num_splits;      // [b + 1]
  const float* k_scale;       // [1], fp8 caches only
  void* out;                  // [b, s_q, h_q, 512], q's type
  float* lse;                 // [b, h_q, s_q]
  float* out_acc;             // [max_slots, h_q * s_q, 512]
  float* lse_acc;             // [max_slots, h_q * s_q], log2 domain
  int64_t q_stride_b, q_stride_s, q_stride_h;                 // elements
  int64_t k_stride_page, k_stride_tok, k_stride_head;         // elements of the cache
  int64_t bt_stride;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h;
  int batch, s_q, h_q, heads_per_kv, rows;                    // rows = s_q * heads_per_kv
  int num_pages, page_size, max_pages, max_slots;
  int table_keys;             // keys the block table holds, max_pages * page_size (capped near INT_MAX)
  float scale_log2;           // softmax_scale * log2(e)
  bool causal;
  bool use_tma;               // page_size % 64 == 0, TMA-compatible strides; a 16-bit cache, or an fp8
                              // one with DSKERNELS_MLA_FP8_TMA=1 (its raw tile widened in place)
  bool use_cluster;           // 2-CTA multicast clusters when the TMA path serves >= 2 row tiles (opt-in)
  bool use_seesaw;            // seesaw consumers (opt-in, DSKERNELS_MLA_SEESAW=1; never with clusters)
  bool use_narrow;            // the narrow kernel, S^T = K Q^T (opt-in, DSKERNELS_MLA_NARROW=1; rows <= 32)
};

struct CombineParams {
  void* out;
  float* lse;
  const float* out_acc;
  const float* lse_acc;
  const int* num_splits;
  int64_t o_stride_b, o_stride_s, o_stride_h, lse_stride_b, lse_stride_h;
  int s_q, h_q, max_slots;
};

struct MetadataParams {
  const int* seqlens;
  int* meta;                  // [num_parts, 8]
  int* num_splits;            // [b + 1]
  int64_t* ends;              // [b] scratch
  int batch, num_parts;
};

// Launchers (the stream's device must be current). decode: grid (row tiles, h_kv, num_parts),
// sizeof(SharedStorage) bytes of dynamic shared memory, 2-CTA clusters over the row tiles when
// p.use_cluster is set and the TMA path serves two or more tiles (not with p.use_seesaw, which
// takes the seesaw consumers instead). `tmap` is only read when p.use_tma.
template <typename Element, bool kFp8>
cudaError_t launch_decode(const DecodeParams& p, const CUtensorMap& tmap, int num_parts, int h_kv,
                          cudaStream_t stream);
// The narrow kernel (sm90_mla_decode_narrow.cuh): rows = s_q * h_q / h_kv <= kNarrowMaxRows, grid
// (1, h_kv, num_parts), no clusters; launch_decode hands p.use_narrow calls to it.
template <typename Element, bool kFp8>
cudaError_t launch_narrow_decode(const DecodeParams& p, const CUtensorMap& tmap, int num_parts, int h_kv,
                                 cudaStream_t stream);
template <typename Element>
cudaError_t launch_combine(const CombineParams& p, int batch, cudaStream_t stream);
void launch_metadata(const MetadataParams& p, cudaStream_t stream);  // csrc/mla/sm90_mla.cu

}  // namespace dskernels::mla
