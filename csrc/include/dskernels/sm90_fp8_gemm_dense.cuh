// The dense FP8 block-scaled GEMM's CUTLASS types (instantiated in csrc/gemm/sm90_fp8_gemm_dense.cu).
#pragma once

#include "dskernels/sm90_fp8_gemm_common.cuh"

namespace dskernels::fp8_gemm {

// ---- dense: one problem (m, n, k, 1), persistent tile scheduler ----
namespace dense {

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
    void, LayoutD, kAlignmentD,  // no C operand: out = acc
    ElementD, LayoutD, kAlignmentD, cutlass::epilogue::TmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAccumulator, void>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA, LayoutSFA>,
    kAlignmentA, ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignmentB, ElementAccumulator, TileShape,
    ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                    CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
using StrideA = typename Kernel::StrideA;
using StrideB = typename Kernel::StrideB;
using StrideD = typename Kernel::StrideD;

}  // namespace dense

}  // namespace dskernels::fp8_gemm
