// Dense FP8 block-scaled GEMM on Hopper, split over K for small m (fp8_gemm::DenseConfig::kM64SplitK):
// the instantiation of fp8_gemm::dense::M64Partial and the kernel that sums its partials.
//
// Why: at m <= 64 the 64 x 128 tiles are n / 128 CTAs (V3's q_a projection, n = 1536: 12 of 132
// SMs), each streaming a whole 128-row slice of b. Cutting K into `splits` equal runs makes the
// same GEMM a batch of `splits` GEMMs over the same tensors (batch s starts s runs further along
// K: a batch stride, no copies), so splits times as many CTAs stream b, and each writes its fp32
// 64 x 128 partial tile to the workspace. sum_partials_kernel then adds the runs in order (fixed
// order: the same bits every call) and rounds once to bf16. The mainloop, its scale promotion per
// K block and every layout are kM64's. No host sync: the workspace comes from the caller, so the
// call can be captured in a CUDA graph.
//
// NDEBUG: see sm90_fp8_gemm_dense.cu (device asserts serialize the wgmma pipeline).
#ifndef NDEBUG
#define NDEBUG
#endif

#include <cuda_bf16.h>

#include <algorithm>

#include "dskernels/sm90_fp8_gemm.h"
#include "dskernels/sm90_fp8_gemm_dense.cuh"

namespace dskernels::fp8_gemm {
namespace {

using Gemm = dense::M64Partial::Gemm;

constexpr size_t kPartialAlignment = 256;  // bytes: TMA wants 16; a cache line or two keeps it tidy

// Row stride (floats) of the partial tiles: n rounded up to 16 bytes, as TMA stores need.
int64_t partial_row_stride(const DenseProblem& p) { return (p.n + 3) / 4 * 4; }

size_t partial_offset(const DenseProblem& p) {
  const size_t cutlass_bytes = Gemm::get_workspace_size(dense::arguments<Gemm>(p, p.splits));
  return (cutlass_bytes + kPartialAlignment - 1) / kPartialAlignment * kPartialAlignment;
}

// out[i, j] = bf16(sum over s of partial[s][i, j]), four columns per thread: all the runs' 16-byte
// loads are issued before the first add (splits <= kMaxSplits, so the loop unrolls fully). The
// last 1..3 columns of a row (n % 4 != 0) are read one by one: the row's padding up to ld was
// never written. Not a persistent grid: at most 8 blocks per SM of the limit (set_num_sms).
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* __restrict__ partial, int splits, int m,
                                                           int n, int64_t ld, __nv_bfloat16* __restrict__ out,
                                                           int64_t out_row_stride) {
  const int64_t quads_per_row = ld / 4, quads = static_cast<int64_t>(m) * quads_per_row;
  const int64_t split_stride = static_cast<int64_t>(m) * ld;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < quads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = q / quads_per_row, col = (q % quads_per_row) * 4;
    const float* src = partial + row * ld + col;
    __nv_bfloat16* dst = out + row * out_row_stride + col;
    if (col + 4 > n) {  // the last 1..3 columns of a row (col < n: ld < n + 4)
      for (int c = 0; c < n - col; ++c) {
        float sum = src[c];
        for (int s = 1; s < splits; ++s) sum += src[s * split_stride + c];
        dst[c] = __float2bfloat16_rn(sum);
      }
      continue;
    }
    float4 run[kMaxSplits];
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      if (s < splits) run[s] = __ldcs(reinterpret_cast<const float4*>(src + s * split_stride));
    }
    float4 sum = run[0];
#pragma unroll
    for (int s = 1; s < kMaxSplits; ++s) {
      if (s < splits) sum.x += run[s].x, sum.y += run[s].y, sum.z += run[s].z, sum.w += run[s].w;
    }
    // out's rows and base are 16-byte aligned (TMA's checks) and col % 4 == 0: one 8-byte store
    alignas(8) __nv_bfloat162 pair[2] = {__floats2bfloat162_rn(sum.x, sum.y), __floats2bfloat162_rn(sum.z, sum.w)};
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<uint2*>(pair);
  }
}

}  // namespace

// splits == 1 (a forced config where no split fits) is the 64-row config itself.
size_t dense_splitk_workspace_bytes(const DenseProblem& p) {
  if (p.splits == 1) return dense_m64_workspace_bytes(p);
  return partial_offset(p) + static_cast<size_t>(p.splits) * p.m * partial_row_stride(p) * sizeof(float);
}

const char* run_dense_splitk(const DenseProblem& p, void* workspace, cudaStream_t stream) {
  if (p.splits < 1 || p.splits > kMaxSplits || (p.k / kScaleBlock) % p.splits != 0) {
    return "split-K: expected 1 <= splits <= 16 dividing the K blocks";
  }
  if (p.splits == 1) return run_dense_m64(p, workspace, stream);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(workspace) + partial_offset(p));
  const int64_t ld = partial_row_stride(p);
  // can_implement as dense::run: CUTLASS's extent checks only where the extents are aligned.
  const bool aligned_extents = p.m % 4 == 0 && p.n % 8 == 0;
  const char* error = run_gemm<Gemm>(dense::arguments<Gemm>(p, p.splits, partial, ld), workspace, stream,
                                     aligned_extents);
  if (error != nullptr) return error;
  const int64_t quads = static_cast<int64_t>(p.m) * (ld / 4);
  const int blocks = static_cast<int>(std::min<int64_t>((quads + 255) / 256, 8LL * p.sm_count));
  sum_partials_kernel<<<blocks, 256, 0, stream>>>(partial, p.splits, p.m, p.n, ld,
                                                  static_cast<__nv_bfloat16*>(p.out), p.out_row_stride);
  const cudaError_t launch = cudaGetLastError();
  return launch == cudaSuccess ? nullptr : cudaGetErrorString(launch);
}

}  // namespace dskernels::fp8_gemm
