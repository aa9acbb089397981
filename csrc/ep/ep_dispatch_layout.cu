// Host launcher for the dispatch layout: check, fill Params, launch on the current stream.
// dskernels/ops/ep.py validates first and allocates the outputs; the checks here guard the raw op
// against direct calls. Only c10/cuda, never ATen/cuda (cuBLAS headers; see csrc/fp8/fp8_cast.cu).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dskernels/sm90_ep_dispatch_layout.cuh"

namespace dskernels {
namespace {

void check_out(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
               const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(), name,
              ": expected a contiguous ", dtype, " tensor of shape ", shape, ", got ", t.scalar_type(),
              " ", t.sizes());
}

void ep_get_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                            const at::Tensor& num_tokens_per_rank, const at::Tensor& num_tokens_per_expert,
                            const at::Tensor& is_token_in_rank) {
  TORCH_CHECK(topk_idx.is_cuda(), "topk_idx: expected a CUDA tensor, got device ", topk_idx.device());
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.scalar_type() == at::kLong,
              "topk_idx: expected int64 [num_tokens, num_topk], got ", topk_idx.scalar_type(), " ",
              topk_idx.sizes());
  TORCH_CHECK(topk_idx.stride(1) == 1 || topk_idx.size(1) <= 1,
              "topk_idx: expected unit stride along num_topk, got strides ", topk_idx.strides());
  TORCH_CHECK(num_ranks >= 1 && num_experts >= 1 && num_experts % num_ranks == 0,
              "num_experts: expected a positive multiple of num_ranks (", num_ranks, "), got ", num_experts);
  TORCH_CHECK(topk_idx.size(0) <= INT32_MAX && num_experts + num_ranks <= 12 * 1024,
              "topk_idx: too many tokens or experts for one launch");
  const int64_t num_tokens = topk_idx.size(0);
  check_out(num_tokens_per_rank, "num_tokens_per_rank", at::kInt, {num_ranks}, topk_idx);
  check_out(num_tokens_per_expert, "num_tokens_per_expert", at::kInt, {num_experts}, topk_idx);
  check_out(is_token_in_rank, "is_token_in_rank", at::kBool, {num_tokens, num_ranks}, topk_idx);

  const c10::cuda::OptionalCUDAGuard guard(topk_idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rank.data_ptr(), 0, num_ranks * sizeof(int), stream));
  C10_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_expert.data_ptr(), 0, num_experts * sizeof(int), stream));
  if (num_tokens == 0) return;

  ep_layout::Params p{};
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.topk_row_stride = topk_idx.stride(0);
  p.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
  p.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
  p.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
  p.num_tokens = static_cast<int>(num_tokens);
  p.num_topk = static_cast<int>(topk_idx.size(1));
  p.num_experts = static_cast<int>(num_experts);
  p.num_ranks = static_cast<int>(num_ranks);
  p.experts_per_rank = static_cast<int>(num_experts / num_ranks);

  const unsigned blocks = static_cast<unsigned>((num_tokens + ep_layout::kThreads - 1) / ep_layout::kThreads);
  const size_t smem = (num_experts + num_ranks) * sizeof(int);
  ep_layout::dispatch_layout_kernel<<<blocks, ep_layout::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dskernels, CUDA, m) {
  m.impl("_sm90_ep_get_dispatch_layout", &ep_get_dispatch_layout);
}

}  // namespace dskernels
