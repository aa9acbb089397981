// FP8 e4m3 casts with fine-grained scales (DeepGEMM's layout): device code only, no torch.
//
// Both kernels compute, for each group g of values, amax = max(max|x|, 1e-4),
// q = fp8_e4m3(x * (448 / amax)) (round to nearest even), scale = amax / 448; the exact
// order of operations of python_ref.fp8, so every backend produces the same bits. A NaN in a
// group makes its amax, its scale and all its values NaN, as in the reference (max_nan, not fmaxf,
// which would drop the NaN and hand out a finite scale).
// round_scale (UE8M0 scales, DeepSeek-V3.1's "scale_fmt": "ue8m0"): scale = amax / 448 rounded up
// to a power of two, q = fp8_e4m3(x * (1 / scale)), both factors exact.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace dskernels::fp8_cast {

constexpr int kGroupSize = 128;   // 1x128 activation groups, 128x128 weight blocks
constexpr float kFp8Max = 448.f;  // largest finite e4m3 value
constexpr float kAmaxFloor = 1e-4f;
constexpr int kThreads = 256;

// max that returns NaN when either operand is NaN (PTX max.NaN, sm_80+).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// python_ref.fp8._scales: the multiplier x is scaled by before the cast, and the scale stored.
struct GroupScale {
  float multiplier, scale;
};
__device__ __forceinline__ GroupScale group_scale(float amax, bool round_scale) {
  const float scale = amax / kFp8Max;  // nvcc's default -prec-div=true: correctly rounded
  if (!round_scale) return {kFp8Max / amax, scale};
  // The smallest power of two >= scale: a nonzero mantissa carries into the exponent. NaN stays NaN.
  const float rounded =
      isnan(scale) ? scale : __uint_as_float((__float_as_uint(scale) + 0x7FFFFFu) & 0x7F800000u);
  return {1.f / rounded, rounded};
}

struct PerTokenCastParams {
  const void* x;  // [m, k], unit stride along k, rows 16-byte aligned
  int64_t x_row_stride;
  uint8_t* out;  // [m, k] e4m3 bytes
  int64_t out_row_stride;
  float* scale;  // [m, k / 128], any strides
  int64_t scale_row_stride, scale_col_stride;
  int m, groups_per_row;
  bool round_scale;
};

struct PerBlockCastParams {
  const void* w;  // [n, k], unit stride along k, rows 16-byte aligned
  int64_t w_row_stride;
  uint8_t* out;  // [n, k] e4m3 bytes
  int64_t out_row_stride;
  float* scale;  // [ceil(n / 128), k / 128], any strides
  int64_t scale_row_stride, scale_col_stride;
  int n;
  bool round_scale;
};

// One 16-byte vector of T, kept as loaded and widened to fp32 where it is used (widening bf16 or
// fp16 is one or two ALU ops; holding the raw bytes keeps the registers, and so the loads in
// flight, twice as many per thread as fp32 copies would).
//
// Loads are issued first and used afterwards: load() only starts the read, so a thread that calls
// it for several vectors before touching any has them all in flight at once. (Widening right after
// each load made every load wait for the previous one: one 16-byte read per thread in flight, which
// capped the per-token cast at 58% and the per-block cast at 38% of copy bandwidth on an H200.)
template <typename T>
struct Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  uint4 raw;

  // Streaming load: each byte is read once, keep it out of L1.
  __device__ __forceinline__ void load(const T* src) { raw = __ldcs(reinterpret_cast<const uint4*>(src)); }
  __device__ __forceinline__ void zero() { raw = make_uint4(0, 0, 0, 0); }

  __device__ __forceinline__ float get(int i) const {
    const T* elems = reinterpret_cast<const T*>(&raw);
    return to_float(elems[i]);
  }
  __device__ __forceinline__ float abs_max() const {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < kSize; ++i) m = max_nan(m, fabsf(get(i)));
    return m;
  }
  // Writes kSize e4m3 bytes (8 or 4: one 8- or 4-byte store).
  __device__ __forceinline__ void store_fp8(uint8_t* dst, float mul) const {
    uint16_t pairs[kSize / 2];
#pragma unroll
    for (int i = 0; i < kSize / 2; ++i)
      pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(get(2 * i) * mul, get(2 * i + 1) * mul),
                                          __NV_SATFINITE, __NV_E4M3);
    if constexpr (kSize == 8) {
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(pairs);
    } else {
      static_assert(kSize == 4, "16-byte vectors of 2- or 4-byte elements");
      *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(pairs);
    }
  }

 private:
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Max over groups of kLanes consecutive lanes (kLanes a power of two <= 32). All 32 lanes of the
// warp must call it.
template <int kLanes>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// One pass over x: each group of kLanes threads owns one 1x128 group per step, and each thread
// issues kUnroll independent 16-byte loads before it uses any, to keep enough bytes in flight to
// saturate HBM.
template <typename T, int kUnroll>
__global__ void __launch_bounds__(kThreads) per_token_cast_to_fp8_kernel(PerTokenCastParams p) {
  using V = Vec16<T>;
  constexpr int kLanes = kGroupSize / V::kSize;  // threads per 128-wide group
  constexpr int kGroupsPerStep = kThreads / kLanes;
  constexpr int kGroupsPerBlock = kGroupsPerStep * kUnroll;

  // Fewer than 2^31 groups (the launcher checks): 32-bit division, which compiles to straight-line
  // code; the 64-bit one branches, and the compiler then stopped batching the loads around it.
  const uint32_t num_groups = uint32_t(p.m) * uint32_t(p.groups_per_row);
  const uint32_t groups_per_row = p.groups_per_row;
  const int lane = threadIdx.x % kLanes;
  const T* x = static_cast<const T*>(p.x);

  // The loop bound is uniform across the block, so every lane reaches the shuffles.
  for (int64_t base = int64_t(blockIdx.x) * kGroupsPerBlock; base < num_groups;
       base += int64_t(gridDim.x) * kGroupsPerBlock) {
    V vec[kUnroll];
    int64_t row[kUnroll];
    uint32_t col_group[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t group = uint32_t(base) + u * kGroupsPerStep + threadIdx.x / kLanes;  // < 2^32
      const uint32_t r = group / groups_per_row;
      row[u] = group < num_groups ? int64_t(r) : -1;  // -1: past the end
      col_group[u] = group - r * groups_per_row;
      if (row[u] >= 0) {
        vec[u].load(x + row[u] * p.x_row_stride + int64_t(col_group[u]) * kGroupSize + lane * V::kSize);
      } else {
        vec[u].zero();
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float amax = max_nan(group_max<kLanes>(vec[u].abs_max()), kAmaxFloor);
      if (row[u] < 0) continue;
      const GroupScale gs = group_scale(amax, p.round_scale);
      vec[u].store_fp8(p.out + row[u] * p.out_row_stride + int64_t(col_group[u]) * kGroupSize + lane * V::kSize,
                       gs.multiplier);
      if (lane == 0) p.scale[row[u] * p.scale_row_stride + col_group[u] * p.scale_col_stride] = gs.scale;
    }
  }
}

// One CTA per 128x128 block of w (grid: [ceil(n / 128), k / 128]); the block stays in registers
// between the amax reduction and the cast, so w is read once.
template <typename T>
__global__ void __launch_bounds__(kThreads) per_block_cast_to_fp8_kernel(PerBlockCastParams p) {
  using V = Vec16<T>;
  constexpr int kLanes = kGroupSize / V::kSize;  // threads per 128-wide row
  constexpr int kRowsPerStep = kThreads / kLanes;
  constexpr int kSteps = kGroupSize / kRowsPerStep;
  constexpr int kWarps = kThreads / 32;

  const int lane = threadIdx.x % kLanes;
  const int64_t row0 = int64_t(blockIdx.x) * kGroupSize + threadIdx.x / kLanes;
  const int64_t col = int64_t(blockIdx.y) * kGroupSize + lane * V::kSize;
  const T* w = static_cast<const T*>(p.w);

  V vec[kSteps];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {  // every load in flight before the first use
    const int64_t row = row0 + s * kRowsPerStep;
    if (row < p.n) {
      vec[s].load(w + row * p.w_row_stride + col);
    } else {
      vec[s].zero();  // rows past n: zeros leave the amax as it is
    }
  }
  float amax = 0.f;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) amax = max_nan(amax, vec[s].abs_max());

  __shared__ float warp_max[kWarps];
  amax = group_max<32>(amax);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) amax = max_nan(amax, warp_max[i]);
  amax = max_nan(amax, kAmaxFloor);

  const GroupScale gs = group_scale(amax, p.round_scale);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int64_t row = row0 + s * kRowsPerStep;
    if (row < p.n) vec[s].store_fp8(p.out + row * p.out_row_stride + col, gs.multiplier);
  }
  if (threadIdx.x == 0) p.scale[blockIdx.x * p.scale_row_stride + blockIdx.y * p.scale_col_stride] = gs.scale;
}

}  // namespace dskernels::fp8_cast
