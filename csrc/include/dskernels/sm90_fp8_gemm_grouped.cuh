// The grouped (ptr-array) FP8 block-scaled GEMM's CUTLASS types, one Config per
// fp8_gemm::GroupedConfig (grouped::M128 instantiated in csrc/gemm/sm90_fp8_gemm_grouped.cu,
// grouped::M64 in sm90_fp8_gemm_grouped_m64.cu, grouped::M128Multicast in
// sm90_fp8_gemm_grouped_multicast.cu), and the per-group argument arrays all read. The kernels that fill
// those arrays are in sm90_fp8_gemm_grouped_fill.cuh (one translation unit includes them).
#pragma once

#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_common.cuh"

namespace dskernels::fp8_gemm {

// ---- grouped: ptr-array kernel, one (m_g, n, k) problem per group, shapes read on the device ----
namespace grouped {

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (m, n, k) per group

template <class TileShape_, class KernelSchedule, class EpilogueSchedule, class ClusterShape_ = ClusterShape>
struct Config {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape_, ClusterShape_,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
      void, LayoutD*, kAlignmentD, ElementD, LayoutD*, kAlignmentD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator, void>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA*, LayoutSFA*>,
      kAlignmentA, ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignmentB, ElementAccumulator,
      TileShape_, ClusterShape_,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// 128-row cooperative tiles (csrc/gemm/sm90_fp8_gemm_grouped.cu).
using M128 = Config<TileShape, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
// 64-row pingpong tiles (csrc/gemm/sm90_fp8_gemm_grouped_m64.cu).
using M64 = Config<TileShapeM64, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                   cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
// M128 in 1 x 2 clusters, A multicast (csrc/gemm/sm90_fp8_gemm_grouped_multicast.cu): the group
// scheduler hands a cluster two neighbouring N tiles of one group.
using M128Multicast = Config<TileShape, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                             cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, ClusterShapeMulticast>;

// The per-group argument types (the same for every config: the other files static_assert it).
using StrideA = typename M128::Kernel::InternalStrideA;
using StrideB = typename M128::Kernel::InternalStrideB;
using StrideD = typename M128::Kernel::InternalStrideD;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

}  // namespace grouped


// ---- per-group arguments, filled on the device (no host sync: masked_m and m_indices stay there) ----

// CUTLASS 4.2's ptr-array blockwise collective ignores layout_SFA / layout_SFB: its load_init
// rebuilds both from the group's problem shape (ScaleConfig::tile_atom_to_shape_SFA/SFB), i.e. it
// reads group g's scales packed: sa at ptr_sfa[g][kb * m_g + row], sb at ptr_sfb[g][kb * ceil(n /
// 128) + n_block]. m_g changes per call on the device, so pack_sfa_kernel copies sa into that
// layout (sfa_packed) every call; sb must come with a K-block stride of exactly ceil(n / 128)
// (checked by the launcher). The layout arrays are still filled, with the packed layouts.
struct GroupedArgs {  // device arrays of `groups` entries each, read by the ptr-array kernel
  grouped::Shape3* shapes;
  const ElementA** ptr_a;
  const ElementB** ptr_b;
  const float** ptr_sfa;
  const float** ptr_sfb;
  ElementD** ptr_d;
  grouped::StrideA* stride_a;
  grouped::StrideB* stride_b;
  grouped::StrideD* stride_d;
  LayoutSFA* layout_sfa;
  LayoutSFB* layout_sfb;
  int32_t* seg_start;  // contiguous only: first row of each group (0x7f7f7f7f when absent)
  int32_t* seg_end;    // contiguous only: one past the last row (0 when absent)
  float* sfa_packed;   // sa repacked per group (grouped_sfa_packed_floats(p) floats)
};

// Floats in the packed sa: group g's kblocks * m_g scales start at g * m_max * kblocks (masked) or
// at seg_start[g] * kblocks (contiguous: segments are disjoint row ranges).
CUTE_HOST_DEVICE int64_t grouped_sfa_packed_floats(const GroupedProblem& p) {
  return (p.masked_m != nullptr ? int64_t(p.groups) : 1) * int64_t(p.m_max) * (p.k / kScaleBlock);
}

namespace grouped {

// The CUTLASS arguments of one config over the per-group arrays (filled on the device first).
template <class Gemm>
typename Gemm::Arguments arguments(const GroupedProblem& p, const GroupedArgs& a) {
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = p.device;
  hw_info.sm_count = grid_sm_count<Gemm>(p.sm_count);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      // No host problem shapes: one persistent CTA per SM, and the group tile scheduler reads the
      // shapes from the device array (groups with 0 rows have no tiles and are skipped).
      {p.groups, a.shapes, nullptr},
      {a.ptr_a, a.stride_a, a.ptr_b, a.stride_b, a.ptr_sfa, a.layout_sfa, a.ptr_sfb, a.layout_sfb},
      {{}, nullptr, nullptr, a.ptr_d, a.stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  using RasterOrderOptions = cutlass::gemm::kernel::detail::RasterOrderOptions;
  args.scheduler.raster_order =
      p.raster == GroupedRaster::kAlongN ? RasterOrderOptions::AlongN : RasterOrderOptions::AlongM;
  return args;
}

// The other configs' entry points (csrc/gemm/sm90_fp8_gemm_grouped_{m64,multicast}.cu), called by
// run_grouped and grouped_workspace_bytes after the per-group arrays are in place.
size_t m64_workspace_bytes(const GroupedProblem& p);
const char* run_m64(const GroupedProblem& p, const GroupedArgs& a, void* workspace, cudaStream_t stream);
size_t multicast_workspace_bytes(const GroupedProblem& p);
const char* run_multicast(const GroupedProblem& p, const GroupedArgs& a, void* workspace, cudaStream_t stream);

}  // namespace grouped

}  // namespace dskernels::fp8_gemm
