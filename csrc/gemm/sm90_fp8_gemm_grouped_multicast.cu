// M-grouped FP8 block-scaled GEMM on Hopper, 128-row cooperative tiles in 1 x 2 clusters with TMA
// multicast of the A tiles: the instantiation of fp8_gemm::grouped::M128Multicast, run by
// run_grouped (sm90_fp8_gemm_grouped.cu) once the per-group arrays are filled. Same arrays,
// layouts and device-side shapes as the 128-row config.
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
static_assert(std::is_same_v<StrideA, typename M128Multicast::Kernel::InternalStrideA> &&
              std::is_same_v<StrideB, typename M128Multicast::Kernel::InternalStrideB> &&
              std::is_same_v<StrideD, typename M128Multicast::Kernel::InternalStrideD>);

size_t multicast_workspace_bytes(const GroupedProblem& p) {
  return M128Multicast::Gemm::get_workspace_size(arguments<M128Multicast::Gemm>(p, GroupedArgs{}));
}

const char* run_multicast(const GroupedProblem& p, const GroupedArgs& a, void* workspace, cudaStream_t stream) {
  return run_gemm<M128Multicast::Gemm>(arguments<M128Multicast::Gemm>(p, a), workspace, stream);
}

}  // namespace dskernels::fp8_gemm::grouped
