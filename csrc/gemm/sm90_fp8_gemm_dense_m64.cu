// Dense FP8 block-scaled GEMM on Hopper, 64-row pingpong tiles (small m, pick_dense_config): the
// instantiation of fp8_gemm::dense::M64. Same collective, arguments and layouts as the 128-row
// config (sm90_fp8_gemm_dense.cu); only the tile shape and the kernel / epilogue schedules differ.
//
// NDEBUG: see sm90_fp8_gemm_dense.cu (device asserts serialize the wgmma pipeline).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_dense.cuh"

namespace dskernels::fp8_gemm {

size_t dense_m64_workspace_bytes(const DenseProblem& p) { return dense::workspace_bytes<dense::M64::Gemm>(p); }

const char* run_dense_m64(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  return dense::run<dense::M64::Gemm>(p, workspace, stream);
}

}  // namespace dskernels::fp8_gemm
