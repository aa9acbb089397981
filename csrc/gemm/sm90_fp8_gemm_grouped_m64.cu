// M-grouped FP8 block-scaled GEMM on Hopper, 64-row pingpong tiles: the instantiation of
// fp8_gemm::grouped::M64, run by run_grouped (sm90_fp8_gemm_grouped.cu) for masked calls with
// expected_m <= 64 (decode: a few tokens per expert), once the per-group arrays are filled. Same
// arrays, layouts and device-side shapes as the 128-row config.
//
// NDEBUG: see sm90_fp8_gemm_dense.cu (device asserts serialize the wgmma pipeline).
#ifndef NDEBUG
#define NDEBUG
#endif

#include <type_traits>

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_grouped.cuh"

namespace dskernels::fp8_gemm::grouped {

// The per-group arrays are typed after the 128-row kernel; this one must read the same types.
static_assert(std::is_same_v<StrideA, typename M64::Kernel::InternalStrideA> &&
              std::is_same_v<StrideB, typename M64::Kernel::InternalStrideB> &&
              std::is_same_v<StrideD, typename M64::Kernel::InternalStrideD>);

size_t m64_workspace_bytes(const GroupedProblem& p) {
  return M64::Gemm::get_workspace_size(arguments<M64::Gemm>(p, GroupedArgs{}));
}

const char* run_m64(const GroupedProblem& p, const GroupedArgs& a, void* workspace, cudaStream_t stream) {
  return run_gemm<M64::Gemm>(arguments<M64::Gemm>(p, a), workspace, stream);
}

}  // namespace dskernels::fp8_gemm::grouped
