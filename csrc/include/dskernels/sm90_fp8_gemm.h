// The interface between the sm90 FP8 GEMM launchers (csrc/gemm/sm90_fp8_gemm.cpp: torch, checks)
// and the CUTLASS instantiations (csrc/gemm/sm90_fp8_gemm_{dense,grouped}{,_m64}.cu: no torch headers,
// which halves their compile time). Plain C++: raw pointers and strides in elements.
//
// out (bf16) = sum over 128-wide K blocks kb of (a[:, kb] @ b[:, kb].T) * sa[:, kb] * sb[n / 128, kb]
// Layouts the kernels read (docs/gemm.md, "The sm90 CUDA path"):
//   a [m, k], b [n, k] e4m3 and out [m, n] bf16: unit stride along the last dimension, rows and
//       base 16-byte aligned (TMA).
//   sa [m, k / 128] fp32: unit stride along m ("MN-major", CUTLASS's only sm90 scale layout).
//       Dense: loaded with TMA, so also a 16-byte aligned base and a K-block stride that is a
//       multiple of 4 (DeepGEMM's column-major TMA-aligned layout).
//   sb [ceil(n / 128), k / 128] fp32: unit stride along the n blocks; grouped: a K-block stride of
//       exactly ceil(n / 128) (CUTLASS's ptr-array collective assumes packed scales; the grouped
//       path repacks sa itself, see sm90_fp8_gemm_grouped.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dskernels::fp8_gemm {

// The dense kernel's configurations, one instantiation file each (docs/gemm.md, "Configs"):
//   kM64:          64 x 128 pingpong tiles, persistent (csrc/gemm/sm90_fp8_gemm_dense_m64.cu);
//   kM128:         128 x 128 cooperative tiles, persistent (sm90_fp8_gemm_dense.cu);
//   kM128Multicast: kM128 in 1 x 2 clusters: the two CTAs of a cluster compute neighbouring N tiles
//                  of the same rows, so each A tile is loaded once by TMA multicast into both
//                  (halves A's L2-to-SM traffic; sm90_fp8_gemm_dense_multicast.cu);
//   kM128StreamK:  kM128 with CUTLASS's stream-K scheduler: when the output tiles fill the SMs badly
//                  (few tiles, or a last wave mostly idle), the K loops of the leftover tiles are
//                  split over all SMs and the partial sums reduced through the workspace
//                  (sm90_fp8_gemm_dense_streamk.cu).
//   kM64SplitK:    kM64 with K cut into dense_splits() equal runs, each a batch of the same kernel
//                  writing fp32 partial tiles to the workspace, then one kernel sums them into
//                  out: for small m with few N tiles, where kM64 leaves most SMs idle (m = 64,
//                  n = 2112: 17 tiles on 132 SMs; sm90_fp8_gemm_dense_splitk.cu).
enum class DenseConfig : int32_t { kM64 = 0, kM128 = 1, kM128Multicast = 2, kM128StreamK = 3, kM64SplitK = 4 };
constexpr int kDenseConfigs = 5;

// The names DSKERNELS_GEMM_DENSE_CONFIG accepts and the benchmarks print.
inline const char* dense_config_name(DenseConfig c) {
  switch (c) {
    case DenseConfig::kM64: return "m64";
    case DenseConfig::kM128: return "m128";
    case DenseConfig::kM128Multicast: return "m128_multicast";
    case DenseConfig::kM128StreamK: return "m128_streamk";
    case DenseConfig::kM64SplitK: return "m64_splitk";
  }
  return "?";
}

// kM64SplitK's split count: the most equal runs of K blocks (at most kMaxSplits, each at least
// kMinSplitKBlocks long, so the mainloop's pipeline still fills) whose 64 x 128 tiles fit in one
// wave of sm_count CTAs; 1 where no split fits (kM64SplitK then runs kM64 itself). m = 64,
// n = 2112, k = 7168: 17 tiles, 56 K blocks: 7 runs of 8 (119 CTAs). The partial sums cost
// splits * m * n * 4 bytes of workspace, written once and read once.
constexpr int kMaxSplits = 16;
constexpr int kMinSplitKBlocks = 4;
inline int dense_splits(int64_t m, int64_t n, int64_t k, int64_t sm_count) {
  const int64_t tiles = (m + 63) / 64 * ((n + 127) / 128), kblocks = k / 128;
  int splits = 1;
  if (tiles == 0) return splits;  // nothing runs
  for (int s = 2; s <= kMaxSplits; ++s) {
    if (kblocks % s == 0 && kblocks / s >= kMinSplitKBlocks && tiles * s <= sm_count) splits = s;
  }
  return splits;
}

// Whether the dense rule may choose kM64SplitK: false until the GPU tests have passed it and the
// benchmark's cuda[m64_splitk] rows have beaten cuda[m64] (written 2026-12-04 without a GPU; it is
// reachable through DSKERNELS_GEMM_DENSE_CONFIG=m64_splitk meanwhile).
constexpr bool kSplitKMeasured = false;

// The fraction of the SMs' time a data-parallel schedule keeps busy: tiles / (waves * SMs).
inline double wave_efficiency(int64_t tiles, int64_t sm_count) {
  const int64_t waves = (tiles + sm_count - 1) / sm_count;
  return waves > 0 ? static_cast<double>(tiles) / static_cast<double>(waves * sm_count) : 1.0;
}

// The dense selection rule (issue 9's device sweep, H200, 2026-12-04, benchmarks/bench_gemm.py):
// - m <= 64: 64-row tiles, even where few tiles leave SMs idle (m = 64, n = 2112, k = 7168: 21.7 us,
//   stream-K 28.0 us: its 128-row tiles do twice the MMA work and add a fixup pass); split over K
//   (kM64SplitK) where dense_splits finds a split, once kSplitKMeasured;
// - a data-parallel grid that leaves more than 10% of the SM time idle (fewer tiles than SMs, as
//   for every m <= 128 with V3's n; or a ragged last wave, as m = 4096, n = 2112: 544 tiles, 4.1
//   waves on 132 SMs) with a K loop long enough to split (>= 8 blocks): stream-K (that shape:
//   108 us, 128-row tiles 116 us);
// - else an even number of N tiles and at least 2 SMs: 1 x 2 multicast clusters (an odd count
//   would leave a CTA of the last cluster column idle; 2 SMs: one cluster, see set_num_sms);
// - else plain 128-row tiles.
inline DenseConfig pick_dense_config(int64_t m, int64_t n, int64_t k, int64_t sm_count) {
  if (m <= 64) {
    return kSplitKMeasured && dense_splits(m, n, k, sm_count) > 1 ? DenseConfig::kM64SplitK : DenseConfig::kM64;
  }
  const int64_t n_tiles = (n + 127) / 128;
  const int64_t tiles = (m + 127) / 128 * n_tiles;
  if (k / 128 >= 8 && wave_efficiency(tiles, sm_count) < 0.9) return DenseConfig::kM128StreamK;
  return n_tiles % 2 == 0 && sm_count >= 2 ? DenseConfig::kM128Multicast : DenseConfig::kM128;
}

// The grouped kernels' configurations (one ptr-array instantiation each; docs/gemm.md, "Configs"):
//   kM64:           64 x 128 pingpong tiles (sm90_fp8_gemm_grouped_m64.cu);
//   kM128:          128 x 128 cooperative tiles (sm90_fp8_gemm_grouped.cu);
//   kM128Multicast: kM128 in 1 x 2 clusters, A multicast (sm90_fp8_gemm_grouped_multicast.cu).
// CUTLASS's grouped tile scheduler has no stream-K.
enum class GroupedConfig : int32_t { kM64 = 0, kM128 = 1, kM128Multicast = 2 };
constexpr int kGroupedConfigs = 3;

inline const char* grouped_config_name(GroupedConfig c) {
  switch (c) {
    case GroupedConfig::kM64: return "m64";
    case GroupedConfig::kM128: return "m128";
    case GroupedConfig::kM128Multicast: return "m128_multicast";
  }
  return "?";
}

// The grouped rule (timed once, H200 2026-12-04, only at 256+ rows per group: docs/gemm.md):
// rows_per_group is the masked call's expected_m, or <= 0 when unknown (contiguous: the segment
// sizes are only on the device, and DeepGEMM-style callers align them to 128 rows). 64-row tiles
// when 1..64 rows are expected (decode: a few tokens per expert); else multicast clusters for an
// even count of N tiles and at least 2 SMs (as the dense rule), else kM128.
inline GroupedConfig pick_grouped_config(int64_t rows_per_group, int64_t n, int64_t sm_count) {
  if (rows_per_group > 0 && rows_per_group <= 64) return GroupedConfig::kM64;
  return (n + 127) / 128 % 2 == 0 && sm_count >= 2 ? GroupedConfig::kM128Multicast : GroupedConfig::kM128;
}

// The order in which the grouped kernels' persistent CTAs walk a group's output tiles (CUTLASS's
// group scheduler; without host problem shapes, which the device-side segment sizes rule out, it
// has no swizzle). kAlongM, CUTLASS's default: consecutive tiles go down a column of row tiles, so a
// wave of 132 CTAs spans few N tiles and many row tiles, and a group's whole a is read again for
// every few N tiles: at 8192 rows per group, n = 4096, k = 7168 (64 x 32 tiles), each wave holds 2
// N tiles and all of a (59 MB, more than L2), so a may cross from HBM up to ~16 times. kAlongN: a wave spans
// ~4 row tiles and every N tile, so b (29 MB there) is what must stay in L2 between waves.
enum class GroupedRaster : int32_t { kAlongM = 0, kAlongN = 1 };
constexpr int kGroupedRasters = 2;

inline const char* grouped_raster_name(GroupedRaster r) {
  return r == GroupedRaster::kAlongN ? "along_n" : "along_m";
}

// Whether the rule may choose kAlongN: false until the GPU tests (tests/test_gemm_sm90_raster.py)
// have passed it and the benchmark's cuda[raster_n] rows have beaten the default ones (written
// 2026-12-07 without a GPU; DSKERNELS_GEMM_GROUPED_RASTER=along_n forces it meanwhile).
constexpr bool kGroupedRasterMeasured = false;

// Along N where a group has more row tiles than N tiles (a is then the operand worth reading once,
// as CUTLASS's dense heuristic decides), along M otherwise. rows_per_group: the masked call's
// expected_m or the contiguous call's mean segment (rows / groups).
inline GroupedRaster pick_grouped_raster(int64_t rows_per_group, int64_t n) {
  const bool along_n = (rows_per_group + 127) / 128 > (n + 127) / 128;
  return kGroupedRasterMeasured && along_n ? GroupedRaster::kAlongN : GroupedRaster::kAlongM;
}

// The SM count a persistent grid of clusters of cluster_size CTAs is sized from. CUTLASS assumes
// the count holds whole clusters: an odd one (possible under dskernels.set_num_sms) gives a grid
// that is no multiple of a 1 x 2 cluster, which fails to launch (scripts/check_gemm_grid.cu). So:
// rounded down to whole clusters, at least one.
inline int cluster_aligned_sm_count(int sm_count, int cluster_size) {
  return sm_count < cluster_size ? cluster_size : sm_count / cluster_size * cluster_size;
}

struct DenseProblem {
  const void* a;  // e4m3 [m, k]
  int64_t a_row_stride;
  const float* sa;  // [m, k / 128], unit stride along m
  int32_t sa_k_stride;
  const void* b;  // e4m3 [n, k]
  int64_t b_row_stride;
  const float* sb;  // [ceil(n / 128), k / 128], unit stride along the n blocks
  int32_t sb_k_stride;
  void* out;  // bf16 [m, n]
  int64_t out_row_stride;
  int32_t m, n, k;
  int device, sm_count;
  DenseConfig config;  // which instantiation runs (pick_dense_config, or DSKERNELS_GEMM_DENSE_CONFIG)
  int32_t splits;      // kM64SplitK: dense_splits(m, n, k, sm_count); ignored by the other configs
};

// Masked (masked_m != nullptr): group g is rows [0, clamp(masked_m[g], 0, m_max)) of a[g].
// Contiguous (m_indices != nullptr, group strides 0): group g is the row segment whose m_indices
// entries equal g; rows with ids outside [0, groups) belong to no group.
struct GroupedProblem {
  const void* a;  // e4m3 [G, m_max, k] or [M, k]
  int64_t a_group_stride, a_row_stride;
  const float* sa;  // unit stride along the rows
  int64_t sa_group_stride;
  int32_t sa_k_stride;
  const void* b;  // e4m3 [G, n, k]
  int64_t b_group_stride, b_row_stride;
  const float* sb;  // [G, ceil(n / 128), k / 128], unit stride along the n blocks
  int64_t sb_group_stride;
  int32_t sb_k_stride;
  void* out;  // bf16 [G, m_max, n] or [M, n]
  int64_t out_group_stride, out_row_stride;
  int32_t groups, m_max, n, k;  // m_max: rows per group (masked) or M (contiguous)
  const int32_t* masked_m;
  const int32_t* m_indices;
  int device, sm_count;
  GroupedConfig config;  // which instantiation runs (pick_grouped_config, or DSKERNELS_GEMM_GROUPED_CONFIG)
  GroupedRaster raster;  // the tile order (pick_grouped_raster, or DSKERNELS_GEMM_GROUPED_RASTER)
};

// Each returns nullptr on success, else a static message. The workspace (device memory, 16-byte
// aligned, of the size the *_workspace_bytes function gives) is only used by the stream's work.
// The grouped functions follow p.config themselves (csrc/gemm/sm90_fp8_gemm_grouped.cu); the dense
// ones are one pair per instantiation file, chosen by the dispatchers below.
size_t dense_m64_workspace_bytes(const DenseProblem& p);
const char* run_dense_m64(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t dense_m128_workspace_bytes(const DenseProblem& p);
const char* run_dense_m128(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t dense_multicast_workspace_bytes(const DenseProblem& p);
const char* run_dense_multicast(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t dense_streamk_workspace_bytes(const DenseProblem& p);
const char* run_dense_streamk(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t dense_splitk_workspace_bytes(const DenseProblem& p);
const char* run_dense_splitk(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t grouped_workspace_bytes(const GroupedProblem& p);
const char* run_grouped(const GroupedProblem& p, void* workspace, cudaStream_t stream);

inline size_t dense_workspace_bytes(const DenseProblem& p) {
  switch (p.config) {
    case DenseConfig::kM64: return dense_m64_workspace_bytes(p);
    case DenseConfig::kM128Multicast: return dense_multicast_workspace_bytes(p);
    case DenseConfig::kM128StreamK: return dense_streamk_workspace_bytes(p);
    case DenseConfig::kM64SplitK: return dense_splitk_workspace_bytes(p);
    default: return dense_m128_workspace_bytes(p);
  }
}
inline const char* run_dense(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  switch (p.config) {
    case DenseConfig::kM64: return run_dense_m64(p, workspace, stream);
    case DenseConfig::kM128Multicast: return run_dense_multicast(p, workspace, stream);
    case DenseConfig::kM128StreamK: return run_dense_streamk(p, workspace, stream);
    case DenseConfig::kM64SplitK: return run_dense_splitk(p, workspace, stream);
    default: return run_dense_m128(p, workspace, stream);
  }
}

}  // namespace dskernels::fp8_gemm
