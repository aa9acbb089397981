// Host launchers for the FP8 casts: check, fill Params, launch on the current stream.
// dskernels/ops/fp8.py validates first and allocates the outputs; the checks here guard the raw
// op against direct calls.
// Only c10/cuda, never ATen/cuda: its headers pull in cuBLAS and cuSPARSE, which a bare nvcc
// toolkit (our CI) does not ship.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "dskernels/sm90_fp8_cast.cuh"

namespace dskernels {
namespace {

using fp8_cast::kGroupSize;
using fp8_cast::kThreads;

void check_source(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, name, ": expected 2 dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kFloat,
              name, ": expected bfloat16, float16 or float32, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) % kGroupSize == 0, name, ": expected the last dimension to be a multiple of ",
              kGroupSize, ", got ", t.size(1));
  TORCH_CHECK(t.stride(1) == 1, name, ": expected unit stride in the last dimension, got strides ",
              t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  (t.stride(0) * t.element_size()) % 16 == 0,
              name, ": expected 16-byte aligned rows");
}

void check_outputs(const at::Tensor& src, const at::Tensor& out, const at::Tensor& scale,
                   int64_t scale_rows) {
  TORCH_CHECK(out.device() == src.device() && scale.device() == src.device(),
              "outputs must be on ", src.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat8_e4m3fn && out.sizes() == src.sizes() &&
                  out.stride(1) == 1,
              "out: expected float8_e4m3fn ", src.sizes(), " with unit last stride, got ",
              out.scalar_type(), " ", out.sizes());
  // Each thread stores 4 or 8 fp8 bytes at once (Vec16::store_fp8).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 8 == 0 && (out.size(0) <= 1 || out.stride(0) % 8 == 0),
              "out: expected an 8-byte aligned base and row stride, got strides ", out.strides());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 &&
                  scale.size(0) == scale_rows && scale.size(1) == src.size(1) / kGroupSize,
              "scale: expected float32 [", scale_rows, ", ", src.size(1) / kGroupSize, "], got ",
              scale.scalar_type(), " ", scale.sizes());
}

template <typename F>
void dispatch_source_dtype(at::ScalarType dtype, F&& launch) {
  switch (dtype) {
    case at::kBFloat16: return launch(__nv_bfloat16{});
    case at::kHalf: return launch(__half{});
    default: return launch(float{});
  }
}

void per_token_cast_to_fp8(const at::Tensor& x, const at::Tensor& x_fp8, const at::Tensor& x_scale,
                           bool round_scale) {
  check_source(x, "x");
  check_outputs(x, x_fp8, x_scale, x.size(0));
  TORCH_CHECK(x.size(0) * (x.size(1) / kGroupSize) <= INT32_MAX, "x: at most 2^31 - 1 groups of 128 values, got shape ",
              x.sizes());
  if (x.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());

  fp8_cast::PerTokenCastParams p{};
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.out = static_cast<uint8_t*>(x_fp8.data_ptr());
  p.out_row_stride = x_fp8.stride(0);
  p.scale = x_scale.data_ptr<float>();
  p.scale_row_stride = x_scale.stride(0);
  p.scale_col_stride = x_scale.stride(1);
  p.m = static_cast<int>(x.size(0));
  p.groups_per_row = static_cast<int>(x.size(1) / kGroupSize);
  p.round_scale = round_scale;

  constexpr int kUnroll = 4;
  const int64_t num_groups = x.size(0) * p.groups_per_row;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_source_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kGroupsPerBlock = kThreads / (kGroupSize * int(sizeof(T)) / 16) * kUnroll;
    // 8 resident CTAs of 256 threads fill an SM; more CTAs only add tail work.
    const int64_t blocks = std::min<int64_t>((num_groups + kGroupsPerBlock - 1) / kGroupsPerBlock,
                                             int64_t(num_sms) * 8);
    fp8_cast::per_token_cast_to_fp8_kernel<T, kUnroll>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void per_block_cast_to_fp8(const at::Tensor& w, const at::Tensor& w_fp8, const at::Tensor& w_scale,
                           bool round_scale) {
  check_source(w, "w");
  const int64_t block_rows = (w.size(0) + kGroupSize - 1) / kGroupSize;
  check_outputs(w, w_fp8, w_scale, block_rows);
  TORCH_CHECK(block_rows <= INT32_MAX && w.size(1) / kGroupSize <= 65535,
              "w: too large for the grid, got shape ", w.sizes());
  if (w.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(w.device());

  fp8_cast::PerBlockCastParams p{};
  p.w = w.data_ptr();
  p.w_row_stride = w.stride(0);
  p.out = static_cast<uint8_t*>(w_fp8.data_ptr());
  p.out_row_stride = w_fp8.stride(0);
  p.scale = w_scale.data_ptr<float>();
  p.scale_row_stride = w_scale.stride(0);
  p.scale_col_stride = w_scale.stride(1);
  p.n = static_cast<int>(w.size(0));
  p.round_scale = round_scale;

  const dim3 grid(static_cast<unsigned>(block_rows), static_cast<unsigned>(w.size(1) / kGroupSize));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_source_dtype(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fp8_cast::per_block_cast_to_fp8_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dskernels, CUDA, m) {
  m.impl("_sm90_per_token_cast_to_fp8", &per_token_cast_to_fp8);
  m.impl("_sm90_per_block_cast_to_fp8", &per_block_cast_to_fp8);
}

}  // namespace dskernels
