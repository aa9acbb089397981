// Host launchers of the sm90 FP8 GEMMs: check the inputs (messages name the tensor), fill the
// plain problem structs, allocate the workspace from torch's caching allocator and run on the
// current stream, with the configuration picked from the problem (fp8_gemm::pick_dense_config and
// pick_grouped_config, overridden by DSKERNELS_GEMM_{DENSE,GROUPED}_CONFIG). The
// CUTLASS instantiations live in sm90_fp8_gemm_{dense,grouped}*.cu, which never see a torch header;
// this file never sees a CUTLASS one (a host compiler builds it in seconds).
// dskernels/ops/gemm.py validates the public arguments and converts the scale layouts first; the
// checks here guard the raw `_sm90_*` ops against direct calls.
// Only c10/cuda and ATen/core: ATen/cuda's headers need cuBLAS and cuSPARSE, which CI lacks.
#ifdef DSKERNELS_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "dskernels/sm90_fp8_gemm.h"

namespace dskernels {
namespace {

using fp8_gemm::DenseProblem;
using fp8_gemm::GroupedProblem;

constexpr int64_t kScaleBlock = 128;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// An operand read or written by TMA: unit stride along the last dimension, the other strides and
// the base address 16-byte aligned.
void check_tma_operand(const at::Tensor& t, const char* name, int64_t ndim, at::ScalarType dtype,
                       const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, ": expected a tensor on ", device, ", got ", t.device());
  TORCH_CHECK(t.dim() == ndim, name, ": expected ", ndim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  if (t.numel() == 0) return;  // never read or written; torch gives empty dimensions any strides
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, name,
              ": expected unit stride in the last dimension, got strides ", t.strides());
  for (int64_t d = 0; d + 1 < ndim; ++d) {
    TORCH_CHECK(t.size(d) <= 1 || (t.stride(d) * t.element_size()) % 16 == 0, name,
                ": TMA needs 16-byte aligned strides, got strides ", t.strides(), " for ", t.element_size(),
                "-byte elements (for the bf16 out: a row stride that is a multiple of 8)");
  }
  TORCH_CHECK(aligned16(t), name, ": TMA needs a 16-byte aligned base address");
}

// out: each element at an address of its own. check_tma_operand passes an expanded row or group
// (stride 0 is a multiple of 16 bytes) and rows shorter than their stride; the persistent CTAs
// would then store several tiles to one address, in no fixed order. Judged on the strides alone, by
// the Python layer's rule (dskernels._checks.strides_may_overlap): whatever it hands over passes.
void check_out_apart(const at::Tensor& out) {
  if (out.numel() == 0) return;  // nothing is written; torch gives empty dimensions any strides
  std::vector<std::pair<int64_t, int64_t>> steps;  // (stride, size) of the dimensions that are stepped
  for (int64_t d = 0; d < out.dim(); ++d) {
    if (out.size(d) > 1) steps.emplace_back(out.stride(d), out.size(d));
  }
  std::sort(steps.begin(), steps.end());
  int64_t span = 1;  // elements covered by the dimensions with smaller strides
  for (const auto& [stride, size] : steps) {
    TORCH_CHECK(stride >= span, "out: expected every element at its own address (no expanded or overlapping "
                "rows: several tiles would be stored to one), got shape ", out.sizes(), " and strides ",
                out.strides());
    span += stride * (size - 1);
  }
}

// sa: a's shape with k -> k / 128, fp32, unit stride along the rows; `tma`: the dense kernel's
// TMA load also needs a 16-byte aligned base and K-block and group strides that are multiples of 4.
void check_sa(const at::Tensor& sa, const at::Tensor& a, bool tma) {
  std::vector<int64_t> expected(a.sizes().begin(), a.sizes().end());
  expected.back() = a.size(-1) / kScaleBlock;
  TORCH_CHECK(sa.device() == a.device() && sa.scalar_type() == at::kFloat && sa.sizes() == at::IntArrayRef(expected),
              "sa: expected float32 ", at::IntArrayRef(expected), " on ", a.device(), ", got ", sa.scalar_type(), " ",
              sa.sizes(), " on ", sa.device());
  TORCH_CHECK(sa.size(-2) <= 1 || sa.stride(-2) == 1,
              "sa: expected unit stride along the rows (column-major scales, as "
              "get_col_major_tma_aligned_tensor returns them), got strides ", sa.strides());
  TORCH_CHECK(sa.stride(-1) <= INT32_MAX, "sa: strides must fit in int32, got ", sa.strides());
  if (tma) {
    TORCH_CHECK((sa.size(-1) <= 1 || sa.stride(-1) % 4 == 0) && (sa.numel() == 0 || aligned16(sa)),
                "sa: the dense kernel loads the scales with TMA: expected a 16-byte aligned base and a "
                "K-block stride that is a multiple of 4 (get_col_major_tma_aligned_tensor), got strides ",
                sa.strides());
  }
}

// The row stride given to TMA (in elements): a dimension of size 1 is never stepped, but TMA still
// wants its stride to be a multiple of 16 bytes (check_tma_operand skips such dimensions), so give
// it the last dimension rounded up to 16 bytes (e.g. out [1, 123] with row stride 123).
int64_t tma_row_stride(const at::Tensor& t) {
  if (t.size(-2) > 1) return t.stride(-2);
  const int64_t per16 = 16 / t.element_size();
  return (t.size(-1) + per16 - 1) / per16 * per16;
}

// sb: [(G,) ceil(n / 128), k / 128] fp32 with unit stride along the n blocks. `packed` (grouped):
// CUTLASS's ptr-array collective reads each group's sb with a K-block stride of ceil(n / 128)
// whatever layout it is given (see GroupedArgs in sm90_fp8_gemm_grouped.cuh).
void check_sb(const at::Tensor& sb, const at::Tensor& b, bool packed) {
  std::vector<int64_t> expected(b.sizes().begin(), b.sizes().end());
  expected[expected.size() - 2] = (b.size(-2) + kScaleBlock - 1) / kScaleBlock;
  expected.back() = b.size(-1) / kScaleBlock;
  TORCH_CHECK(sb.device() == b.device() && sb.scalar_type() == at::kFloat && sb.sizes() == at::IntArrayRef(expected),
              "sb: expected float32 ", at::IntArrayRef(expected), " on ", b.device(), ", got ", sb.scalar_type(), " ",
              sb.sizes(), " on ", sb.device());
  TORCH_CHECK(sb.size(-2) <= 1 || sb.stride(-2) == 1,
              "sb: expected unit stride along the 128-row blocks of b (sb.t().contiguous().t()), got strides ",
              sb.strides());
  TORCH_CHECK(sb.stride(-1) <= INT32_MAX, "sb: strides must fit in int32, got ", sb.strides());
  TORCH_CHECK(!packed || sb.size(-1) <= 1 || sb.stride(-1) == sb.size(-2),
              "sb: the grouped kernels read each group's scales packed: expected a K-block stride of ceil(n / 128) = ",
              sb.size(-2), " (sb.transpose(-1, -2).contiguous().transpose(-1, -2)), got strides ", sb.strides());
}

void check_k(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.size(-1) % kScaleBlock == 0, "a: expected k (the last dimension) to be a multiple of 128, got ",
              a.size(-1));
  TORCH_CHECK(b.size(-1) == a.size(-1), "b: expected k = ", a.size(-1), " as its last dimension, got shape ",
              b.sizes());
  TORCH_CHECK(a.size(-2) <= INT32_MAX && b.size(-2) <= INT32_MAX && a.size(-1) <= INT32_MAX,
              "a, b: m, n and k must fit in int32");
}

// The SMs the GEMMs may use (dskernels.set_num_sms, DeepGEMM's knob; 0: all of them): the
// persistent grids get at most this many CTAs, leaving the other SMs to kernels that overlap the
// GEMM (communication). Read at each launch.
std::atomic<int64_t> num_sms_limit{0};

void gemm_set_num_sms(int64_t num_sms) {
  TORCH_CHECK(num_sms >= 0, "num_sms: expected a positive count (or 0 for all SMs), got ", num_sms);
  num_sms_limit.store(num_sms, std::memory_order_relaxed);
}

int sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  const int64_t limit = num_sms_limit.load(std::memory_order_relaxed);
  return limit > 0 && limit < counts[device] ? static_cast<int>(limit) : counts[device];
}

// A config forced through an environment variable (read per call, so tests and benchmarks can
// force each one): its index among the n names, or -1 when the variable is unset, empty or "auto".
template <class Config>
int forced_config(const char* variable, int n, const char* (*name)(Config)) {
  const char* forced = std::getenv(variable);
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) return -1;
  std::string names = "auto";
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(forced, name(static_cast<Config>(i))) == 0) return i;
    names += std::string(", ") + name(static_cast<Config>(i));
  }
  TORCH_CHECK(false, variable, ": expected one of ", names, ", got '", forced, "'");
}

// Batch-invariant mode (dskernels.batch_invariant; the Python layer passes it down): one config
// for every m, so a row's bits do not depend on the rows beside it. kM128: 24.3 us against kM64's
// 21.9 at m = 64 (n = 2112, k = 7168), 0-7% behind the rule's pick at m = 4096, where kM64 is
// 23-50% behind (H200, docs/gemm.md "Batch invariance"). Stream-K and split-K cut K by m and the
// SM count.
constexpr fp8_gemm::DenseConfig kInvariantDenseConfig = fp8_gemm::DenseConfig::kM128;

bool cuts_k_by_m(fp8_gemm::DenseConfig c) {
  return c == fp8_gemm::DenseConfig::kM128StreamK || c == fp8_gemm::DenseConfig::kM64SplitK;
}

fp8_gemm::DenseConfig dense_config(int64_t m, int64_t n, int64_t k, int64_t sm_count, bool batch_invariant) {
  const int forced = forced_config("DSKERNELS_GEMM_DENSE_CONFIG", fp8_gemm::kDenseConfigs, fp8_gemm::dense_config_name);
  if (batch_invariant) {  // a forced config is one config for every m too, unless it cuts K by m
    if (forced < 0) return kInvariantDenseConfig;
    const auto config = static_cast<fp8_gemm::DenseConfig>(forced);
    TORCH_CHECK(!cuts_k_by_m(config), "DSKERNELS_GEMM_DENSE_CONFIG: '", fp8_gemm::dense_config_name(config),
                "' cuts K by m and the SM count, which batch-invariant mode rules out: expected auto, m64, m128 or ",
                "m128_multicast under it");
    return config;
  }
  return forced >= 0 ? static_cast<fp8_gemm::DenseConfig>(forced) : fp8_gemm::pick_dense_config(m, n, k, sm_count);
}

fp8_gemm::GroupedConfig grouped_config(int64_t rows_per_group, int64_t n, int64_t sm_count) {
  const int forced =
      forced_config("DSKERNELS_GEMM_GROUPED_CONFIG", fp8_gemm::kGroupedConfigs, fp8_gemm::grouped_config_name);
  return forced >= 0 ? static_cast<fp8_gemm::GroupedConfig>(forced)
                     : fp8_gemm::pick_grouped_config(rows_per_group, n, sm_count);
}

// The grouped kernels' tile order: pick_grouped_raster, or DSKERNELS_GEMM_GROUPED_RASTER (along_m,
// along_n; read per call).
fp8_gemm::GroupedRaster grouped_raster(int64_t rows_per_group, int64_t n) {
  const int forced =
      forced_config("DSKERNELS_GEMM_GROUPED_RASTER", fp8_gemm::kGroupedRasters, fp8_gemm::grouped_raster_name);
  return forced >= 0 ? static_cast<fp8_gemm::GroupedRaster>(forced) : fp8_gemm::pick_grouped_raster(rows_per_group, n);
}

// The configs the launchers would run (benchmarks print them; a CPU test pins the rules): dense
// for (m, n, k) on sm_count SMs (batch_invariant: under batch-invariant mode); grouped for
// rows_per_group (the masked expected_m, <= 0 when unknown: contiguous), n and sm_count.
std::string gemm_dense_config(int64_t m, int64_t n, int64_t k, int64_t sm_count, bool batch_invariant) {
  TORCH_CHECK(m >= 0 && n >= 0 && k >= 0 && sm_count > 0, "_sm90_gemm_dense_config: expected m, n, k >= 0 and ",
              "sm_count > 0, got ", m, ", ", n, ", ", k, ", ", sm_count);
  return fp8_gemm::dense_config_name(dense_config(m, n, k, sm_count, batch_invariant));
}

// kM64SplitK's split count for a dense problem (used when that config runs).
int64_t gemm_dense_splits(int64_t m, int64_t n, int64_t k, int64_t sm_count) {
  TORCH_CHECK(m >= 0 && n >= 0 && k >= 0 && sm_count > 0, "_sm90_gemm_dense_splits: expected m, n, k >= 0 and ",
              "sm_count > 0, got ", m, ", ", n, ", ", k, ", ", sm_count);
  return fp8_gemm::dense_splits(m, n, k, sm_count);
}

std::string gemm_grouped_config(int64_t rows_per_group, int64_t n, int64_t sm_count) {
  TORCH_CHECK(n >= 0 && sm_count > 0, "_sm90_gemm_grouped_config: expected n >= 0 and sm_count > 0, got ", n, ", ",
              sm_count);
  return fp8_gemm::grouped_config_name(grouped_config(rows_per_group, n, sm_count));
}

std::string gemm_grouped_raster(int64_t rows_per_group, int64_t n) {
  TORCH_CHECK(n >= 0, "_sm90_gemm_grouped_raster: expected n >= 0, got ", n);
  return fp8_gemm::grouped_raster_name(grouped_raster(rows_per_group, n));
}

c10::DataPtr workspace(size_t bytes) {
  // Stream-ordered: releasing it after the asynchronous launch is safe on the current stream.
  return c10::cuda::CUDACachingAllocator::get()->allocate(bytes > 0 ? bytes : 16);
}

void gemm_fp8_fp8_bf16_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                          const at::Tensor& out, bool batch_invariant) {
  TORCH_CHECK(a.is_cuda(), "a: expected a CUDA tensor, got device ", a.device());
  check_tma_operand(a, "a", 2, at::kFloat8_e4m3fn, a.device());
  check_tma_operand(b, "b", 2, at::kFloat8_e4m3fn, a.device());
  check_k(a, b);
  check_sa(sa, a, /*tma=*/true);
  check_sb(sb, b, /*packed=*/false);
  check_tma_operand(out, "out", 2, at::kBFloat16, a.device());
  check_out_apart(out);
  TORCH_CHECK(out.size(0) == a.size(0) && out.size(1) == b.size(0), "out: expected shape [", a.size(0), ", ",
              b.size(0), "], got ", out.sizes());
  if (a.size(0) == 0 || b.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(a.device());
  if (a.size(1) == 0) {  // k = 0: an empty sum (CUTLASS's mainloop would wait for a first K tile)
    out.zero_();
    return;
  }

  DenseProblem p{};
  p.a = a.data_ptr();
  p.a_row_stride = tma_row_stride(a);
  p.sa = sa.data_ptr<float>();
  // With one K block the stride is never stepped: give TMA a 16-byte multiple whatever it is.
  p.sa_k_stride = static_cast<int32_t>(sa.size(1) <= 1 ? (a.size(0) + 3) / 4 * 4 : sa.stride(1));
  p.b = b.data_ptr();
  p.b_row_stride = tma_row_stride(b);
  p.sb = sb.data_ptr<float>();
  p.sb_k_stride = static_cast<int32_t>(sb.stride(1));
  p.out = out.data_ptr();
  p.out_row_stride = tma_row_stride(out);
  p.m = static_cast<int32_t>(a.size(0));
  p.n = static_cast<int32_t>(b.size(0));
  p.k = static_cast<int32_t>(a.size(1));
  p.device = a.get_device();
  p.sm_count = sm_count(p.device);
  p.config = dense_config(p.m, p.n, p.k, p.sm_count, batch_invariant);
  p.splits = batch_invariant ? 1 : fp8_gemm::dense_splits(p.m, p.n, p.k, p.sm_count);
  const c10::DataPtr ws = workspace(fp8_gemm::dense_workspace_bytes(p));
  const char* error = fp8_gemm::run_dense(p, ws.get(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == nullptr, "_sm90_gemm_fp8_fp8_bf16_nt: ", error);
}

void fill_grouped(GroupedProblem& p, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                  const at::Tensor& out) {
  p.sa = sa.data_ptr<float>();
  p.sa_k_stride = static_cast<int32_t>(sa.stride(-1));
  p.b = b.data_ptr();
  p.b_group_stride = b.stride(0);
  p.b_row_stride = tma_row_stride(b);
  p.sb = sb.data_ptr<float>();
  p.sb_group_stride = sb.stride(0);
  p.sb_k_stride = static_cast<int32_t>(sb.stride(2));
  p.out = out.data_ptr();
  p.groups = static_cast<int32_t>(b.size(0));
  p.n = static_cast<int32_t>(b.size(1));
  p.k = static_cast<int32_t>(b.size(2));
  p.device = b.get_device();
  p.sm_count = sm_count(p.device);
}

void run_grouped(const GroupedProblem& p, const char* op) {
  const c10::DataPtr ws = workspace(fp8_gemm::grouped_workspace_bytes(p));
  const char* error = fp8_gemm::run_grouped(p, ws.get(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == nullptr, op, ": ", error);
}

void check_group_ids(const at::Tensor& ids, const char* name, const at::Tensor& a, int64_t expected) {
  TORCH_CHECK(ids.device() == a.device() && ids.scalar_type() == at::kInt && ids.dim() == 1 && ids.size(0) == expected,
              name, ": expected int32 [", expected, "] on ", a.device(), ", got ", ids.scalar_type(), " ", ids.sizes(),
              " on ", ids.device());
}

void m_grouped_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                      const at::Tensor& out, const at::Tensor& masked_m, int64_t expected_m) {
  TORCH_CHECK(a.is_cuda(), "a: expected a CUDA tensor, got device ", a.device());
  check_tma_operand(a, "a", 3, at::kFloat8_e4m3fn, a.device());
  check_tma_operand(b, "b", 3, at::kFloat8_e4m3fn, a.device());
  check_k(a, b);
  TORCH_CHECK(a.size(0) == b.size(0), "a: expected ", b.size(0), " groups (b's first dimension), got shape ", a.sizes());
  check_sa(sa, a, /*tma=*/false);
  check_sb(sb, b, /*packed=*/true);
  check_tma_operand(out, "out", 3, at::kBFloat16, a.device());
  check_out_apart(out);
  TORCH_CHECK(out.size(0) == a.size(0) && out.size(1) == a.size(1) && out.size(2) == b.size(1), "out: expected shape [",
              a.size(0), ", ", a.size(1), ", ", b.size(1), "], got ", out.sizes());
  check_group_ids(masked_m, "masked_m", a, a.size(0));
  TORCH_CHECK(a.size(0) <= INT32_MAX, "a: too many groups");
  if (a.size(0) == 0 || a.size(1) == 0 || b.size(1) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(a.device());
  if (a.size(2) == 0) {  // k = 0: an empty sum (CUTLASS's mainloop would wait for a first K tile)
    out.zero_();
    return;
  }
  const at::Tensor counts = masked_m.contiguous();

  GroupedProblem p{};
  p.a = a.data_ptr();
  p.a_group_stride = a.stride(0);
  p.a_row_stride = tma_row_stride(a);
  p.sa_group_stride = sa.stride(0);
  p.out_group_stride = out.stride(0);
  p.out_row_stride = tma_row_stride(out);
  p.m_max = static_cast<int32_t>(a.size(1));
  p.masked_m = counts.data_ptr<int32_t>();
  // expected_m is only a hint (masked_m stays on the device): any value is correct, it only picks
  // the configuration. Non-positive values mean "unknown".
  p.config = grouped_config(expected_m, b.size(1), sm_count(a.get_device()));
  p.raster = grouped_raster(expected_m, b.size(1));
  fill_grouped(p, sa, b, sb, out);
  run_grouped(p, "_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_masked");
}

void m_grouped_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                          const at::Tensor& out, const at::Tensor& m_indices) {
  TORCH_CHECK(a.is_cuda(), "a: expected a CUDA tensor, got device ", a.device());
  check_tma_operand(a, "a", 2, at::kFloat8_e4m3fn, a.device());
  check_tma_operand(b, "b", 3, at::kFloat8_e4m3fn, a.device());
  check_k(a, b);
  check_sa(sa, a, /*tma=*/false);
  check_sb(sb, b, /*packed=*/true);
  check_tma_operand(out, "out", 2, at::kBFloat16, a.device());
  check_out_apart(out);
  TORCH_CHECK(out.size(0) == a.size(0) && out.size(1) == b.size(1), "out: expected shape [", a.size(0), ", ",
              b.size(1), "], got ", out.sizes());
  check_group_ids(m_indices, "m_indices", a, a.size(0));
  TORCH_CHECK(b.size(0) <= INT32_MAX, "b: too many groups");
  if (a.size(0) == 0 || b.size(0) == 0 || b.size(1) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(a.device());
  if (a.size(1) == 0) {  // k = 0: an empty sum (CUTLASS's mainloop would wait for a first K tile)
    out.zero_();
    return;
  }
  const at::Tensor ids = m_indices.contiguous();

  GroupedProblem p{};
  p.a = a.data_ptr();
  p.a_row_stride = tma_row_stride(a);
  p.out_row_stride = tma_row_stride(out);
  p.m_max = static_cast<int32_t>(a.size(0));
  p.m_indices = ids.data_ptr<int32_t>();
  // Segment sizes are only on the device; DeepGEMM-style callers align them to 128 rows.
  p.config = grouped_config(/*rows_per_group=*/0, b.size(1), sm_count(a.get_device()));
  p.raster = grouped_raster(/*rows_per_group=*/a.size(0) / b.size(0), b.size(1));  // the mean segment
  fill_grouped(p, sa, b, sb, out);
  run_grouped(p, "_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_contiguous");
}

}  // namespace

TORCH_LIBRARY_IMPL(dskernels, CUDA, m) {
  m.impl("_sm90_gemm_fp8_fp8_bf16_nt", &gemm_fp8_fp8_bf16_nt);
  m.impl("_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_masked", &m_grouped_masked);
  m.impl("_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", &m_grouped_contiguous);
}

// No tensor arguments: CompositeExplicitAutograd serves every device (no GPU needed to ask).
TORCH_LIBRARY_IMPL(dskernels, CompositeExplicitAutograd, m) {
  m.impl("_sm90_gemm_dense_config", &gemm_dense_config);
  m.impl("_sm90_gemm_dense_splits", &gemm_dense_splits);
  m.impl("_sm90_gemm_grouped_config", &gemm_grouped_config);
  m.impl("_sm90_gemm_grouped_raster", &gemm_grouped_raster);
  m.impl("_sm90_gemm_set_num_sms", &gemm_set_num_sms);
}

}  // namespace dskernels

#endif  // DSKERNELS_WITH_CUDA
