// Dense FP8 block-scaled GEMM on Hopper, 128-row cooperative tiles under CUTLASS's stream-K
// scheduler (fp8_gemm::dense::M128StreamK): for grids that fill the SMs badly, the K loops of the
// leftover tiles are split over every SM, and the partial fp32 tiles are reduced in a fixed order
// through the workspace (deterministic: the same inputs give the same bits). CUTLASS zeroes the
// workspace's reduction flags with a cudaMemsetAsync on the stream each call, so the config stays
// capturable in a CUDA graph. One file per instantiation; the torch launcher is
// csrc/gemm/sm90_fp8_gemm.cpp.
//
// NDEBUG: see sm90_fp8_gemm_dense.cu (device asserts serialize the wgmma pipeline).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_dense.cuh"

namespace dskernels::fp8_gemm {

size_t dense_streamk_workspace_bytes(const DenseProblem& p) {
  return dense::workspace_bytes<dense::M128StreamK::Gemm>(p);
}

const char* run_dense_streamk(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  return dense::run<dense::M128StreamK::Gemm>(p, workspace, stream);
}

}  // namespace dskernels::fp8_gemm
