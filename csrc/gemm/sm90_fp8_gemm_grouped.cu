// M-grouped FP8 block-scaled GEMMs on Hopper: the 128-row instantiation of CUTLASS's ptr-array
// kernel (fp8_gemm::grouped::M128), shared by the masked and the contiguous layouts, and the entry
// points of every config (the others are instantiated in sm90_fp8_gemm_grouped_{m64,multicast}.cu). No torch headers; the launcher is csrc/gemm/sm90_fp8_gemm.cpp.
//
// Per call, on the stream: (contiguous only) a memset and find_segments_kernel turn m_indices into
// per-group row ranges; pack_sfa_kernel copies sa into the packed per-group layout the collective
// reads (GroupedArgs); fill_grouped_args_kernel writes each group's shape, pointers, strides and
// scale layouts into the workspace; the persistent grouped kernel (any config) reads them there.
// Nothing comes back to the host, so both layouts can be captured in a CUDA graph.
//
// NDEBUG: see sm90_fp8_gemm_dense.cu (device asserts serialize the wgmma pipeline).
#ifndef NDEBUG
#define NDEBUG
#endif

#include <algorithm>

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_grouped.cuh"
#include "dskernels/sm90_fp8_gemm_grouped_fill.cuh"

namespace dskernels::fp8_gemm {
namespace {

// The workspace: the per-group arrays and the packed sa (each 16-byte aligned), then CUTLASS's own
// workspace.
struct Carve {
  size_t offsets[14] = {};
  size_t args_bytes = 0;
};

Carve carve(const GroupedProblem& p) {
  const size_t groups = static_cast<size_t>(p.groups);
  const size_t sizes[14] = {sizeof(grouped::Shape3) * groups, sizeof(void*) * groups, sizeof(void*) * groups,
                            sizeof(void*) * groups, sizeof(void*) * groups, sizeof(void*) * groups,
                            sizeof(grouped::StrideA) * groups, sizeof(grouped::StrideB) * groups,
                            sizeof(grouped::StrideD) * groups, sizeof(LayoutSFA) * groups,
                            sizeof(LayoutSFB) * groups, sizeof(int32_t) * groups, sizeof(int32_t) * groups,
                            sizeof(float) * static_cast<size_t>(grouped_sfa_packed_floats(p))};
  Carve c;
  for (int i = 0; i < 14; ++i) {
    c.offsets[i] = c.args_bytes;
    c.args_bytes += (sizes[i] + 15) / 16 * 16;
  }
  c.args_bytes = (c.args_bytes + 255) / 256 * 256;  // CUTLASS keeps TMA descriptors (64-byte aligned) after
  return c;
}

GroupedArgs args_at(void* workspace, const Carve& c) {
  char* base = static_cast<char*>(workspace);
  GroupedArgs a;
  a.shapes = reinterpret_cast<grouped::Shape3*>(base + c.offsets[0]);
  a.ptr_a = reinterpret_cast<const ElementA**>(base + c.offsets[1]);
  a.ptr_b = reinterpret_cast<const ElementB**>(base + c.offsets[2]);
  a.ptr_sfa = reinterpret_cast<const float**>(base + c.offsets[3]);
  a.ptr_sfb = reinterpret_cast<const float**>(base + c.offsets[4]);
  a.ptr_d = reinterpret_cast<ElementD**>(base + c.offsets[5]);
  a.stride_a = reinterpret_cast<grouped::StrideA*>(base + c.offsets[6]);
  a.stride_b = reinterpret_cast<grouped::StrideB*>(base + c.offsets[7]);
  a.stride_d = reinterpret_cast<grouped::StrideD*>(base + c.offsets[8]);
  a.layout_sfa = reinterpret_cast<LayoutSFA*>(base + c.offsets[9]);
  a.layout_sfb = reinterpret_cast<LayoutSFB*>(base + c.offsets[10]);
  a.seg_start = reinterpret_cast<int32_t*>(base + c.offsets[11]);
  a.seg_end = reinterpret_cast<int32_t*>(base + c.offsets[12]);
  a.sfa_packed = reinterpret_cast<float*>(base + c.offsets[13]);
  return a;
}

}  // namespace

size_t grouped_workspace_bytes(const GroupedProblem& p) {
  const Carve c = carve(p);
  if (p.config == GroupedConfig::kM64) return c.args_bytes + grouped::m64_workspace_bytes(p);
  if (p.config == GroupedConfig::kM128Multicast) return c.args_bytes + grouped::multicast_workspace_bytes(p);
  using Gemm = grouped::M128::Gemm;
  return c.args_bytes + Gemm::get_workspace_size(grouped::arguments<Gemm>(p, GroupedArgs{}));
}

const char* run_grouped(const GroupedProblem& p, void* workspace, cudaStream_t stream) {
  const Carve c = carve(p);
  const GroupedArgs a = args_at(workspace, c);
  if (p.masked_m == nullptr) {
    // seg_start = 0x7f7f7f7f (past any row), seg_end = 0: a group with no rows stays empty.
    cudaMemsetAsync(a.seg_start, 0x7f, sizeof(int32_t) * p.groups, stream);
    cudaMemsetAsync(a.seg_end, 0, sizeof(int32_t) * p.groups, stream);
    constexpr int kThreads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((p.m_max + kThreads - 1) / kThreads, 4L * p.sm_count));
    find_segments_kernel<<<std::max(blocks, 1), kThreads, 0, stream>>>(p.m_indices, p.m_max, p.groups, a.seg_start,
                                                                      a.seg_end);
  }
  {
    // After find_segments_kernel (stream order): the contiguous packing reads seg_start / seg_end.
    constexpr int kThreads = 256;
    const int64_t kblocks = p.k / kScaleBlock;
    const int64_t work =  // masked: a block per (group, K block); contiguous: a thread per scale
        p.masked_m != nullptr ? p.groups * kblocks : (int64_t(p.m_max) * kblocks + kThreads - 1) / kThreads;
    const int blocks = static_cast<int>(std::min<int64_t>(work, 4L * p.sm_count));
    pack_sfa_kernel<<<std::max(blocks, 1), kThreads, 0, stream>>>(p, a);
  }
  constexpr int kThreads = 128;
  fill_grouped_args_kernel<<<(p.groups + kThreads - 1) / kThreads, kThreads, 0, stream>>>(p, a);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return cudaGetErrorString(error);
  void* cutlass_workspace = static_cast<char*>(workspace) + c.args_bytes;
  if (p.config == GroupedConfig::kM64) return grouped::run_m64(p, a, cutlass_workspace, stream);
  if (p.config == GroupedConfig::kM128Multicast) return grouped::run_multicast(p, a, cutlass_workspace, stream);
  return run_gemm<grouped::M128::Gemm>(grouped::arguments<grouped::M128::Gemm>(p, a), cutlass_workspace, stream);
}

}  // namespace dskernels::fp8_gemm
