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

// The tile configurations (docs/gemm.md, "Configs"): 128-row cooperative tiles, or 64-row pingpong
// tiles for small m, where a 128-row tile would spend half its tensor work on rows past m.
enum class TileM : int32_t { k128 = 128, k64 = 64 };

// The selection rule, a starting point until it is tuned on an H100: 64-row tiles when the rows per
// problem (dense: m; masked grouped: expected_m) fit one of them. Beyond 64 rows, 128-row tiles
// read b half as often per output row; where that stops paying (grid fill at m = 65..256 and small
// n) is what the device must measure.
inline TileM pick_tile_m(int64_t rows) { return rows <= 64 ? TileM::k64 : TileM::k128; }

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
  TileM tile_m;  // which instantiation runs (pick_tile_m(m))
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
  TileM tile_m;  // which instantiation runs (masked: pick_tile_m(expected_m); contiguous: k128)
};

// Each returns nullptr on success, else a static message. The workspace (device memory, 16-byte
// aligned, of the size the *_workspace_bytes function gives) is only used by the stream's work.
// The grouped functions follow p.tile_m themselves (csrc/gemm/sm90_fp8_gemm_grouped.cu); the dense
// ones are one pair per instantiation file, chosen by the inline dispatchers below.
size_t dense_m128_workspace_bytes(const DenseProblem& p);
const char* run_dense_m128(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t dense_m64_workspace_bytes(const DenseProblem& p);
const char* run_dense_m64(const DenseProblem& p, void* workspace, cudaStream_t stream);
size_t grouped_workspace_bytes(const GroupedProblem& p);
const char* run_grouped(const GroupedProblem& p, void* workspace, cudaStream_t stream);

inline size_t dense_workspace_bytes(const DenseProblem& p) {
  return p.tile_m == TileM::k64 ? dense_m64_workspace_bytes(p) : dense_m128_workspace_bytes(p);
}
inline const char* run_dense(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  return p.tile_m == TileM::k64 ? run_dense_m64(p, workspace, stream) : run_dense_m128(p, workspace, stream);
}

}  // namespace dskernels::fp8_gemm
