// Dense FP8 block-scaled GEMM on Hopper, 128-row cooperative tiles in 1 x 2 clusters with TMA
// multicast of the A tiles: the instantiation of fp8_gemm::dense::M128Multicast. One file per
// instantiation (each costs ~80 CPU-seconds and ~4 GB to compile); the torch launcher is
// csrc/gemm/sm90_fp8_gemm.cpp.
//
// NDEBUG: see sm90_fp8_gemm_dense.cu (device asserts serialize the wgmma pipeline).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_dense.cuh"

namespace dskernels::fp8_gemm {

size_t dense_multicast_workspace_bytes(const DenseProblem& p) {
  return dense::workspace_bytes<dense::M128Multicast::Gemm>(p);
}

const char* run_dense_multicast(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  return dense::run<dense::M128Multicast::Gemm>(p, workspace, stream);
}

}  // namespace dskernels::fp8_gemm
