// FP8 block-scaled GEMMs on Hopper, built from CUTLASS's sm90 warp-specialized collectives
// (device code and CUTLASS types only, no torch).
//
// out[m, n] (bf16) = sum over 128-wide K blocks kb of
//     (a[m, kb] @ b[n, kb].T) * sa[m, kb] * sb[n / 128, kb]
// a [m, k] e4m3 K-major, b [n, k] e4m3 K-major ("nt"), fp32 scales: 1x128 for a, 128x128 for b.
//
// Mainloop: CUTLASS's FP8 blockwise-scaling collective (DeepGEMM's promotion: each K block's
// wgmma result lands in a fresh fp32 fragment that is scaled and added to the fp32 accumulator on
// the CUDA cores, since Hopper's FP8 MMA accumulates with fewer bits than fp32). A producer warp
// issues TMA loads for a and b into a multi-stage mbarrier pipeline; two consumer warp groups
// either share each 128 x 128 tile (cooperative) or take turns on 64 x 128 tiles (pingpong, small
// m). Epilogue: TMA store of bf16, no C operand.
//
// Scale layouts CUTLASS's sm90 collectives accept (both "MN-major"; see docs/gemm.md):
//   sa: unit stride along m, any stride along the K blocks. The dense kernel loads it with TMA
//       (64 or 128 scales per tile >= CUTLASS's threshold of 32), so its K-block stride and base address
//       must be 16-byte aligned: DeepGEMM's column-major TMA-aligned layout. The grouped kernel
//       loads it with cp.async (4 bytes each) from a packed per-group copy (pack_sfa_kernel: its
//       collective ignores the layouts it is given, see GroupedArgs), so any K-block stride works.
//   sb: unit stride along the n blocks (cp.async). Dense: any stride along the K blocks; grouped:
//       exactly ceil(n / 128) (the packed layout the grouped collective assumes).
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "dskernels/sm90_fp8_gemm.h"

namespace dskernels::fp8_gemm {

using namespace cute;

constexpr int kScaleBlock = 128;  // 1x128 activation scales, 128x128 weight scales

using ElementA = cutlass::float_e4m3_t;
using ElementB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using ElementAccumulator = float;  // also the scale type: CUTLASS requires them to match
using LayoutA = cutlass::layout::RowMajor;     // a [m, k], K-major
using LayoutB = cutlass::layout::ColumnMajor;  // b [n, k], K-major ("nt")
using LayoutD = cutlass::layout::RowMajor;     // out [m, n]
constexpr int kAlignmentA = 16;  // elements: TMA needs 16-byte aligned rows
constexpr int kAlignmentB = 16;
constexpr int kAlignmentD = 8;

using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kScaleBlock, kScaleBlock,
                                                              GMMA::Major::MN, GMMA::Major::MN>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

// Two tile shapes (docs/gemm.md, "Configs"):
//   TileShape:    128 x 128 x 128, cooperative (two consumer warp groups split each tile's rows);
//   TileShapeM64:  64 x 128 x 128, pingpong (each consumer warp group owns a whole tile, and the
//                  two alternate so one's epilogue and scale promotion overlap the other's wgmma),
//                  for small m, where a 128-row tile would compute half zero rows.
// Both keep one scale block in N and K per tile (every tile reads one sb value per K block: the
// collective static_asserts that the scale granularity divides the tile). Clusters: one CTA, or
// 1 x 2 (the dense multicast config). BLOCK_N not a power of two is not built (docs/gemm.md).
using TileShape = Shape<_128, _128, _128>;
using TileShapeM64 = Shape<_64, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;
using ClusterShapeMulticast = Shape<_1, _2, _1>;

// The scale layouts the collectives read, from explicit strides (in elements):
//   SFA: rows scales along m (stride 1), kblocks along K (stride k_stride).
//   SFB: ceil(n / 128) scales along n (stride 1), kblocks along K (stride k_stride).
// The logical shape is in elements of the operand ((1 x rows) x (128 x kblocks)), stride 0 inside
// a scale block: that is how the collective maps an operand coordinate to its scale.
// The batch mode: l = 1 (stride as CUTLASS's tile_atom_to_shape_SFA gives it), or split-K's runs
// of kblocks K blocks each (dense::arguments), the next run kblocks scales further along K. The
// dense kernel builds a TMA descriptor over this layout, and TMA strides must be 16-byte multiples
// (k_stride is a multiple of 4 there).
CUTE_HOST_DEVICE LayoutSFA make_layout_sfa(int32_t rows, int32_t kblocks, int32_t k_stride, int32_t l = 1) {
  const int32_t l_stride = k_stride * kblocks;
  return LayoutSFA{make_shape(make_shape(Int<1>{}, rows), make_shape(Int<kScaleBlock>{}, kblocks), l),
                   make_stride(make_stride(Int<0>{}, Int<1>{}), make_stride(Int<0>{}, k_stride), l_stride)};
}

CUTE_HOST_DEVICE LayoutSFB make_layout_sfb(int32_t n, int32_t kblocks, int32_t k_stride, int32_t l = 1) {
  const int32_t nblocks = (n + kScaleBlock - 1) / kScaleBlock;
  const int32_t l_stride = k_stride * kblocks;
  return LayoutSFB{make_shape(make_shape(Int<kScaleBlock>{}, nblocks), make_shape(Int<kScaleBlock>{}, kblocks), l),
                   make_stride(make_stride(Int<0>{}, Int<1>{}), make_stride(Int<0>{}, k_stride), l_stride)};
}


// The SM count a config's persistent grid is sized from (cluster_aligned_sm_count).
template <class Gemm>
int grid_sm_count(int sm_count) {
  return cluster_aligned_sm_count(sm_count, cute::size(typename Gemm::GemmKernel::ClusterShape{}));
}

// Runs a CUTLASS GemmUniversalAdapter; nullptr on success, else CUTLASS's or CUDA's message.
// can_implement: CUTLASS's own check, which also wants the contiguous extent of every TMA operand
// to be a multiple of 16 bytes (m % 4 for sa, n % 8 for out). TMA itself only needs 16-byte
// strides and base addresses (the launchers check those) and clips or zero-fills the rest, so the
// dense launcher runs the check only where those extents are aligned.
template <class Gemm>
const char* run_gemm(const typename Gemm::Arguments& args, void* workspace, cudaStream_t stream,
                     bool can_implement = true) {
  Gemm gemm;
  cutlass::Status status = can_implement ? gemm.can_implement(args) : cutlass::Status::kSuccess;
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace dskernels::fp8_gemm
