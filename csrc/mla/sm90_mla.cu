// Host launchers of the sm90 MLA decode: `_sm90_get_mla_metadata` (the split plan on the device)
// and `_sm90_flash_mla_with_kvcache` (decode + combine). Check the raw inputs (messages name the
// tensor), build the TMA descriptor of the cache, allocate the split buffers from torch's caching
// allocator (so CUDA-graph capture works) and launch on the current stream. dskernels/ops/mla.py
// validates the public arguments first and only calls these for shapes they support.
// Only c10/cuda, never ATen/cuda (its headers need cuBLAS, which CI's toolkit lacks).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cudaTypedefs.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>

#include "dskernels/sm90_mla_decode.h"
#include "dskernels/sm90_mla_metadata.cuh"

namespace dskernels {
namespace mla {

void launch_metadata(const MetadataParams& p, cudaStream_t stream) {
  metadata_kernel<<<1, kMetaThreads, 0, stream>>>(p);
}

}  // namespace mla

namespace {

using mla::kHeadDim;
using mla::kHeadDimV;
using mla::kMetaInts;

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "1";
}

c10::DataPtr workspace(size_t bytes) {
  return c10::cuda::CUDACachingAllocator::get()->allocate(bytes > 0 ? bytes : 16);
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t size, const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == size &&
                  t.is_contiguous(),
              name, ": expected a contiguous int32 tensor of shape (", size, ") on ", device, ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// 16-byte aligned rows: vector loads of q and of the cache, and TMA strides.
void check_rows_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, ": expected unit stride in the last dimension, got strides ", t.strides());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) <= 1 || (t.stride(d) * t.element_size()) % 16 == 0, name,
                ": the sm90 kernel needs 16-byte aligned rows, got strides ", t.strides());
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              ": the sm90 kernel needs a 16-byte aligned base address");
}

void get_mla_metadata(const at::Tensor& cache_seqlens, const at::Tensor& meta, const at::Tensor& num_splits) {
  TORCH_CHECK(cache_seqlens.is_cuda(), "cache_seqlens: expected a CUDA tensor, got device ", cache_seqlens.device());
  const int64_t b = cache_seqlens.numel();
  check_int32_vector(cache_seqlens, "cache_seqlens", b, cache_seqlens.device());
  check_int32_vector(num_splits, "num_splits", b + 1, cache_seqlens.device());
  TORCH_CHECK(meta.device() == cache_seqlens.device() && meta.scalar_type() == at::kInt && meta.dim() == 2 &&
                  meta.size(0) >= 1 && meta.size(1) == kMetaInts && meta.is_contiguous(),
              "tile_scheduler_metadata: expected a contiguous int32 tensor of shape (num_parts, ", kMetaInts,
              "), got ", meta.scalar_type(), " ", meta.sizes());
  TORCH_CHECK(b <= INT32_MAX && meta.size(0) <= INT32_MAX, "cache_seqlens: batch too large, got ", b);
  const c10::cuda::OptionalCUDAGuard guard(cache_seqlens.device());
  if (b == 0) {  // the split plan of an empty batch: every partition idle, no splits
    meta.zero_();
    meta.select(1, 2).fill_(-1);
    num_splits.zero_();
    return;
  }
  const c10::DataPtr ends = workspace(b * sizeof(int64_t));
  mla::MetadataParams p{};
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.meta = meta.data_ptr<int>();
  p.num_splits = num_splits.data_ptr<int>();
  p.ends = static_cast<int64_t*>(ends.get());
  p.batch = static_cast<int>(b);
  p.num_parts = static_cast<int>(meta.size(0));
  mla::launch_metadata(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The cache as a 4-D TMA tensor (d, h_kv, page_size, num_pages), 64 x 1 x 64 x 1 boxes: 16-bit
// caches 128-byte swizzled (the wgmma layout itself), fp8 ones unswizzled (the raw tile the kernel
// widens). False (then the kernel loads every block through registers) if the driver refuses it.
bool make_cache_tensor_map(const at::Tensor& k_cache, CUtensorMap* tmap) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) {
    TORCH_WARN_ONCE("flash_mla_with_kvcache: the driver has no cuTensorMapEncodeTiled; the sm90 kernel loads "
                    "every key block through registers instead of TMA");
    return false;
  }
  const int64_t elem = k_cache.element_size();
  const cuuint64_t dims[4] = {cuuint64_t(kHeadDim), cuuint64_t(k_cache.size(2)), cuuint64_t(k_cache.size(1)),
                              cuuint64_t(k_cache.size(0))};
  // A dimension of size 1 may carry any stride (torch does not normalize it); give it the packed
  // stride (inner stride x inner extent: a multiple of 16 bytes, and never below the inner extent,
  // as the driver's documentation asks) rather than an arbitrary one. h_kv = 1 (V3) takes this.
  cuuint64_t strides[3];
  cuuint64_t inner = cuuint64_t(kHeadDim * elem);  // the packed stride of dimension 1
  for (int i = 0; i < 3; ++i) {
    const int dim = 2 - i;  // the torch dimension of TMA dimension i + 1
    strides[i] = k_cache.size(dim) <= 1 ? inner : cuuint64_t(k_cache.stride(dim) * elem);
    inner = strides[i] * dims[i + 1];
  }
  const cuuint32_t box[4] = {64, 1, 64, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  const CUtensorMapDataType dtype = fp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                    : k_cache.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                             : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult result = encode(tmap, dtype, 4, k_cache.data_ptr(), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, fp8 ? CU_TENSOR_MAP_SWIZZLE_NONE : CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  // Loud, not silent: a refused descriptor would otherwise hide the TMA path from every test.
  if (result != CUDA_SUCCESS) {
    TORCH_WARN_ONCE("flash_mla_with_kvcache: cuTensorMapEncodeTiled refused the cache (error ", int(result),
                    ", shape ", k_cache.sizes(), ", strides ", k_cache.strides(),
                    "); the sm90 kernel loads every key block through registers instead of TMA");
  }
  return result == CUDA_SUCCESS;
}

template <typename Element>
void run(const mla::DecodeParams& p, const CUtensorMap& tmap, bool fp8, int num_parts, int h_kv,
         const mla::CombineParams& c, cudaStream_t stream) {
  const cudaError_t launched = fp8 ? mla::launch_decode<Element, true>(p, tmap, num_parts, h_kv, stream)
                                   : mla::launch_decode<Element, false>(p, tmap, num_parts, h_kv, stream);
  C10_CUDA_CHECK(launched);
  C10_CUDA_CHECK(mla::launch_combine<Element>(c, p.batch, stream));
}

void flash_mla_with_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                            const at::Tensor& cache_seqlens, const at::Tensor& meta, const at::Tensor& num_splits,
                            double softmax_scale, bool causal, const std::optional<at::Tensor>& k_scale,
                            const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const at::Device device = q.device();
  TORCH_CHECK(q.dim() == 4 && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) &&
                  q.size(3) == kHeadDim,
              "q: the sm90 kernel expects bfloat16/float16 [b, s_q, h_q, ", kHeadDim, "], got ", q.scalar_type(), " ",
              q.sizes());
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(k_cache.device() == device && k_cache.dim() == 4 && k_cache.size(3) == kHeadDim &&
                  (k_cache.scalar_type() == q.scalar_type() || fp8),
              "k_cache: expected [num_pages, page_size, h_kv, ", kHeadDim, "] of q's dtype or float8_e4m3fn on ",
              device, ", got ", k_cache.scalar_type(), " ", k_cache.sizes());
  const int64_t page_size = k_cache.size(1), h_kv = k_cache.size(2);
  TORCH_CHECK(page_size >= 1 && h_kv >= 1 && h_q % h_kv == 0 && h_kv <= 65535, "k_cache: expected h_kv dividing h_q = ",
              h_q, ", got shape ", k_cache.sizes());
  TORCH_CHECK(block_table.device() == device && block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) == b && (block_table.stride(1) == 1 || block_table.size(1) <= 1),
              "block_table: expected int32 [", b, ", max_pages] with unit stride in the last dimension, got ",
              block_table.scalar_type(), " ", block_table.sizes(), " strides ", block_table.strides());
  check_int32_vector(cache_seqlens, "cache_seqlens", b, device);
  check_int32_vector(num_splits, "num_splits", b + 1, device);
  TORCH_CHECK(meta.device() == device && meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.size(0) >= 1 &&
                  meta.size(0) <= 65535 && meta.size(1) == kMetaInts && meta.is_contiguous(),
              "tile_scheduler_metadata: expected contiguous int32 (num_parts <= 65535, ", kMetaInts, "), got ",
              meta.scalar_type(), " ", meta.sizes());
  if (fp8) {
    TORCH_CHECK(k_scale.has_value() && k_scale->device() == device && k_scale->scalar_type() == at::kFloat &&
                    k_scale->numel() == 1,
                "k_scale: expected a float32 tensor of one element on ", device, " for the float8_e4m3fn cache");
  } else {
    TORCH_CHECK(!k_scale.has_value(), "k_scale: expected None for a ", k_cache.scalar_type(), " cache");
  }
  TORCH_CHECK(out.device() == device && out.scalar_type() == q.scalar_type() &&
                  out.sizes() == at::IntArrayRef({b, s_q, h_q, kHeadDimV}) && out.stride(3) == 1 &&
                  out.stride(0) % 4 == 0 && out.stride(1) % 4 == 0 && out.stride(2) % 4 == 0 &&
                  reinterpret_cast<uintptr_t>(out.data_ptr()) % 8 == 0,
              "out: expected ", q.scalar_type(), " [", b, ", ", s_q, ", ", h_q, ", ", kHeadDimV,
              "] with unit stride in the last dimension, other strides multiples of 4 and an 8-byte aligned base, got ", out.sizes(), " strides ",
              out.strides());
  TORCH_CHECK(lse.device() == device && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({b, h_q, s_q}) && (lse.stride(2) == 1 || s_q == 1),
              "lse: expected float32 [", b, ", ", h_q, ", ", s_q, "] with unit stride in the last dimension, got ",
              lse.scalar_type(), " ", lse.sizes());
  check_rows_aligned(q, "q");
  check_rows_aligned(k_cache, "k_cache");
  TORCH_CHECK(b <= INT32_MAX && s_q * h_q <= INT32_MAX && k_cache.size(0) <= INT32_MAX && page_size <= INT32_MAX &&
                  block_table.size(1) <= INT32_MAX && s_q * (h_q / h_kv) <= 65535 * mla::kBlockM &&
                  s_q * h_q <= 65535 * mla::kCombineWarps,  // grid.y of the decode and of the combine
              "q: too large for the sm90 kernel, got shape ", q.sizes());
  if (b == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(device);
  const int num_parts = static_cast<int>(meta.size(0));
  // Partial outputs: one split per sequence plus one per cut between partitions. A one-partition
  // plan (every prefill chunk at 128 heads) splits no sequence, so it gets no slots: at s_q = 4096,
  // h_q = 128 the two would be 2 GiB of fp32 never written. The kernels skip slots past max_slots.
  const int64_t max_slots = num_parts > 1 ? b + num_parts : 0;
  const int64_t flat_rows = s_q * h_q;
  const c10::DataPtr out_acc = workspace(max_slots * flat_rows * kHeadDimV * sizeof(float));
  const c10::DataPtr lse_acc = workspace(max_slots * flat_rows * sizeof(float));

  mla::DecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.block_table = block_table.data_ptr<int>();
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.meta = meta.data_ptr<int>();
  p.num_splits = num_splits.data_ptr<int>();
  p.k_scale = fp8 ? k_scale->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_acc = static_cast<float*>(out_acc.get());
  p.lse_acc = static_cast<float*>(lse_acc.get());
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_tok = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.bt_stride = block_table.stride(0);
  p.o_stride_b = out.stride(0);
  p.o_stride_s = out.stride(1);
  p.o_stride_h = out.stride(2);
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.heads_per_kv = static_cast<int>(h_q / h_kv);
  p.rows = static_cast<int>(s_q * (h_q / h_kv));
  p.num_pages = static_cast<int>(k_cache.size(0));
  p.page_size = static_cast<int>(page_size);
  p.max_pages = static_cast<int>(block_table.size(1));
  p.table_keys = static_cast<int>(std::min<int64_t>(block_table.size(1) * page_size, INT_MAX / 2));
  p.max_slots = static_cast<int>(max_slots);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal;

  // Switches (docs/mla.md), read per call: DSKERNELS_MLA_NO_TMA=1 sends every block through the
  // register path; DSKERNELS_MLA_CLUSTER=1 runs two or more row tiles as 2-CTA clusters sharing the
  // key blocks by multicast (off by default: 13% slower at h_q = 128, s_q = 2 on an H200);
  // DSKERNELS_MLA_FP8_TMA=1 loads an fp8 cache's whole blocks by TMA and widens them in place
  // (opt-in: its tests passed on an H200, 2026-12-04, docs/mla.md); DSKERNELS_MLA_REQUIRE_TMA=1
  // makes a tensor map the driver refuses an error instead of the register path (tests, benchmark
  // variants);
  // DSKERNELS_MLA_SEESAW=1 takes the seesaw consumers (both groups score alternate key blocks: opt-in,
  // written off the device, not yet run on a GPU), never with clusters; DSKERNELS_MLA_NARROW=1 takes
  // the narrow kernel when s_q * h_q / h_kv <= 32 (keys on wgmma's M: a quarter of the tensor work
  // at 16 rows; opt-in, written off the device, not yet run on a GPU), before either.
  CUtensorMap tmap{};
  const bool want_tma = !env_flag("DSKERNELS_MLA_NO_TMA") && (!fp8 || env_flag("DSKERNELS_MLA_FP8_TMA")) &&
                        page_size % mla::kBlockN == 0;
  p.use_tma = want_tma && make_cache_tensor_map(k_cache, &tmap);
  TORCH_CHECK(p.use_tma || !want_tma || !env_flag("DSKERNELS_MLA_REQUIRE_TMA"),
              "flash_mla_with_kvcache: DSKERNELS_MLA_REQUIRE_TMA=1, but the driver refused the cache's tensor map "
              "(shape ", k_cache.sizes(), ", strides ", k_cache.strides(), ", ", k_cache.scalar_type(), ")");
  p.use_narrow = env_flag("DSKERNELS_MLA_NARROW") && p.rows <= mla::kNarrowMaxRows;
  p.use_seesaw = env_flag("DSKERNELS_MLA_SEESAW") && !p.use_narrow;
  p.use_cluster = env_flag("DSKERNELS_MLA_CLUSTER") && !p.use_seesaw && !p.use_narrow;

  mla::CombineParams c{};
  c.out = out.data_ptr();
  c.lse = lse.data_ptr<float>();
  c.out_acc = p.out_acc;
  c.lse_acc = p.lse_acc;
  c.num_splits = p.num_splits;
  c.o_stride_b = p.o_stride_b;
  c.o_stride_s = p.o_stride_s;
  c.o_stride_h = p.o_stride_h;
  c.lse_stride_b = p.lse_stride_b;
  c.lse_stride_h = p.lse_stride_h;
  c.s_q = p.s_q;
  c.h_q = p.h_q;
  c.max_slots = p.max_slots;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    run<__nv_bfloat16>(p, tmap, fp8, num_parts, static_cast<int>(h_kv), c, stream);
  } else {
    run<__half>(p, tmap, fp8, num_parts, static_cast<int>(h_kv), c, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dskernels, CUDA, m) {
  m.impl("_sm90_get_mla_metadata", &get_mla_metadata);
  m.impl("_sm90_flash_mla_with_kvcache", &flash_mla_with_kvcache);
}

}  // namespace dskernels
