// Dense FP8 block-scaled GEMM on Hopper, 128-row cooperative tiles: the instantiation of
// fp8_gemm::dense::M128 (CUTLASS's sm90 blockwise-scaling collective). The 64-row pingpong config
// is csrc/gemm/sm90_fp8_gemm_dense_m64.cu (one file per instantiation: each costs ~80 CPU-seconds
// and ~4 GB to compile). No torch headers here (they cost as much compile time as CUTLASS); the
// torch launcher is csrc/gemm/sm90_fp8_gemm.cpp.
//
// NDEBUG: CUTLASS's device asserts are calls to __assertfail, and a call inside the mainloop makes
// ptxas serialize the wgmma pipeline (warning C7510); torch's extension build does not define it.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_dense.cuh"

namespace dskernels::fp8_gemm {

size_t dense_m128_workspace_bytes(const DenseProblem& p) { return dense::workspace_bytes<dense::M128::Gemm>(p); }

const char* run_dense_m128(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  return dense::run<dense::M128::Gemm>(p, workspace, stream);
}

}  // namespace dskernels::fp8_gemm
