// Dense FP8 block-scaled GEMM on Hopper: the one instantiation of fp8_gemm::dense::Gemm (CUTLASS's
// sm90 blockwise-scaling collective). No torch headers here (they cost as much compile time as
// CUTLASS); the torch launcher is csrc/gemm/sm90_fp8_gemm.cpp.
//
// NDEBUG: CUTLASS's device asserts are calls to __assertfail, and a call inside the mainloop makes
// ptxas serialize the wgmma pipeline (warning C7510); torch's extension build does not define it.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_dense.cuh"

namespace dskernels::fp8_gemm {
namespace {

dense::Gemm::Arguments dense_arguments(const DenseProblem& p) {
  dense::StrideA stride_a{};
  get<0>(stride_a) = p.a_row_stride;
  get<2>(stride_a) = p.a_row_stride * p.m;
  dense::StrideB stride_b{};
  get<0>(stride_b) = p.b_row_stride;
  get<2>(stride_b) = p.b_row_stride * p.n;
  dense::StrideD stride_d{};
  get<0>(stride_d) = p.out_row_stride;
  get<2>(stride_d) = p.out_row_stride * p.m;
  const int32_t kblocks = p.k / kScaleBlock;

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = p.device;
  hw_info.sm_count = p.sm_count;
  dense::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.m, p.n, p.k, 1},
      {static_cast<const ElementA*>(p.a), stride_a, static_cast<const ElementB*>(p.b), stride_b, p.sa,
       make_layout_sfa(p.m, kblocks, p.sa_k_stride), p.sb, make_layout_sfb(p.n, kblocks, p.sb_k_stride)},
      {{}, nullptr, stride_d, static_cast<ElementD*>(p.out), stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  return args;
}

}  // namespace

size_t dense_workspace_bytes(const DenseProblem& p) {
  return dense::Gemm::get_workspace_size(dense_arguments(p));
}

const char* run_dense(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  const bool aligned_extents = p.m % 4 == 0 && p.n % 8 == 0;
  return run_gemm<dense::Gemm>(dense_arguments(p), workspace, stream, aligned_extents);
}

}  // namespace dskernels::fp8_gemm
