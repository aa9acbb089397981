// Expert-parallel dispatch layout (DeepEP's get_dispatch_layout): device code only, no torch.
//
// One thread per token: it walks the token's top-k ids once, counts each (token, k) entry's expert
// (a repeated id counts each time, as DeepEP's layout and recv_topk_idx's entries do; python_ref.ep)
// and each distinct destination rank into block-local shared-memory histograms, writes its
// is_token_in_rank row, and the block adds its histograms to the global counts with integer
// atomics (order-independent, so the result is deterministic).
#pragma once

#include <cstdint>

namespace dskernels::ep_layout {

constexpr int kThreads = 256;  // tokens per block

struct Params {
  const int64_t* topk_idx;  // [T, K], unit stride along K
  int64_t topk_row_stride;
  int* num_tokens_per_rank;    // [R], zeroed before the launch
  int* num_tokens_per_expert;  // [E], zeroed before the launch
  bool* is_token_in_rank;      // [T, R] contiguous
  int num_tokens, num_topk, num_experts, num_ranks, experts_per_rank;
};

// Dynamic shared memory: (num_experts + num_ranks) ints.
__global__ void __launch_bounds__(kThreads) dispatch_layout_kernel(const Params p) {
  extern __shared__ int histogram[];
  int* expert_count = histogram;
  int* rank_count = histogram + p.num_experts;
  for (int i = threadIdx.x; i < p.num_experts + p.num_ranks; i += blockDim.x) histogram[i] = 0;
  __syncthreads();

  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token < p.num_tokens) {
    const int64_t* ids = p.topk_idx + token * p.topk_row_stride;
    bool* in_rank = p.is_token_in_rank + token * p.num_ranks;
    for (int r = 0; r < p.num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < p.num_topk; ++k) {
      const int64_t e = ids[k];
      if (e < 0 || e >= p.num_experts) continue;
      const int64_t r = e / p.experts_per_rank;
      bool new_rank = true;
      for (int j = 0; j < k; ++j) {  // K is small (8): a quadratic scan beats any set structure
        const int64_t f = ids[j];
        if (f < 0 || f >= p.num_experts) continue;
        new_rank &= f / p.experts_per_rank != r;
      }
      atomicAdd(&expert_count[e], 1);
      if (new_rank) {
        atomicAdd(&rank_count[r], 1);
        in_rank[r] = true;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    if (expert_count[i]) atomicAdd(&p.num_tokens_per_expert[i], expert_count[i]);
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x)
    if (rank_count[i]) atomicAdd(&p.num_tokens_per_rank[i], rank_count[i]);
}

}  // namespace dskernels::ep_layout
