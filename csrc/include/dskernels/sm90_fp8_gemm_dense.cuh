// The dense FP8 block-scaled GEMM's CUTLASS types, one Config per fp8_gemm::DenseConfig, each
// instantiated in its own file: dense::M128 in csrc/gemm/sm90_fp8_gemm_dense.cu, dense::M64 in
// sm90_fp8_gemm_dense_m64.cu, dense::M128Multicast in sm90_fp8_gemm_dense_multicast.cu,
// dense::M128StreamK in sm90_fp8_gemm_dense_streamk.cu (including this header instantiates nothing
// by itself).
#pragma once

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_common.cuh"

namespace dskernels::fp8_gemm {

// ---- dense: one problem (m, n, k, 1), persistent tile scheduler ----
namespace dense {

// TileScheduler: void is CUTLASS's persistent data-parallel scheduler. ElementOut: bf16 out, or
// fp32 for split-K's partial sums.
template <class TileShape_, class KernelSchedule, class EpilogueSchedule, class ClusterShape_ = ClusterShape,
          class TileScheduler = void, class ElementOut = ElementD>
struct Config {
  static constexpr int kAlignmentOut = 16 / static_cast<int>(sizeof(ElementOut));  // TMA: 16-byte rows
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape_, ClusterShape_,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
      void, LayoutD, kAlignmentOut,  // no C operand: out = acc
      ElementOut, LayoutD, kAlignmentOut, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementOut, ElementAccumulator, void>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA, LayoutSFA>,
      kAlignmentA, ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignmentB, ElementAccumulator, TileShape_,
      ClusterShape_,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// 128-row tiles, two consumer warp groups per tile.
using M128 = Config<TileShape, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise,
                    cutlass::epilogue::TmaWarpSpecializedCooperative>;
// 64-row tiles, the two consumer warp groups on alternate tiles (small m).
using M64 = Config<TileShapeM64, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise,
                   cutlass::epilogue::TmaWarpSpecialized>;
// M128 in 1 x 2 clusters: the collective builder picks TMA multicast for A (shared along the
// cluster's N extent); b stays per CTA.
using M128Multicast = Config<TileShape, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise,
                             cutlass::epilogue::TmaWarpSpecializedCooperative, ClusterShapeMulticast>;
// M128 with the stream-K scheduler (CUTLASS supports it for the cooperative kernel only).
using M128StreamK = Config<TileShape, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise,
                           cutlass::epilogue::TmaWarpSpecializedCooperative, ClusterShape,
                           cutlass::gemm::StreamKScheduler>;
// M64 writing fp32 partial tiles: split-K as a batched GEMM (sm90_fp8_gemm_dense_splitk.cu).
using M64Partial = Config<TileShapeM64, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise,
                          cutlass::epilogue::TmaWarpSpecialized, ClusterShape, void, float>;

// The CUTLASS arguments of p. splits > 1 (split-K): batch s of the GEMM is K blocks
// [s * kb / splits, (s + 1) * kb / splits), read in place (a, b, sa and sb get a batch stride of one
// run of K instead of a new tensor), and its fp32 partial goes to out + s * m * out_row_stride.
template <class Gemm>
typename Gemm::Arguments arguments(const DenseProblem& p, int32_t splits = 1, void* out = nullptr,
                                   int64_t out_row_stride = 0) {
  using Kernel = typename Gemm::GemmKernel;
  using ElementOut = typename Kernel::ElementD;
  if (out == nullptr) out = p.out, out_row_stride = p.out_row_stride;
  const int32_t k = p.k / splits, kblocks = k / kScaleBlock;
  typename Kernel::StrideA stride_a{};
  get<0>(stride_a) = p.a_row_stride;
  get<2>(stride_a) = splits > 1 ? k : p.a_row_stride * p.m;
  typename Kernel::StrideB stride_b{};
  get<0>(stride_b) = p.b_row_stride;
  get<2>(stride_b) = splits > 1 ? k : p.b_row_stride * p.n;
  typename Kernel::StrideD stride_d{};
  get<0>(stride_d) = out_row_stride;
  get<2>(stride_d) = out_row_stride * p.m;

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = p.device;
  hw_info.sm_count = grid_sm_count<Gemm>(p.sm_count);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.m, p.n, k, splits},
      {static_cast<const ElementA*>(p.a), stride_a, static_cast<const ElementB*>(p.b), stride_b, p.sa,
       make_layout_sfa(p.m, kblocks, p.sa_k_stride, splits), p.sb,
       make_layout_sfb(p.n, kblocks, p.sb_k_stride, splits)},
      {{}, nullptr, stride_d, static_cast<ElementOut*>(out), stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  return args;
}

template <class Gemm>
size_t workspace_bytes(const DenseProblem& p) {
  return Gemm::get_workspace_size(arguments<Gemm>(p));
}

template <class Gemm>
const char* run(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  // run_gemm's can_implement note: CUTLASS's extent check is stricter than TMA for odd m and n.
  const bool aligned_extents = p.m % 4 == 0 && p.n % 8 == 0;
  return run_gemm<Gemm>(arguments<Gemm>(p), workspace, stream, aligned_extents);
}

}  // namespace dense

}  // namespace dskernels::fp8_gemm
