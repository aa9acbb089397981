// Host-side check (CI, scripts/check_build.sh) of what the sm90 MLA decode kernel assumes about
// wgmma, against CuTe's own tables:
//  - the shared-memory descriptors it encodes by hand equal what make_gmma_desc builds for the same
//    layouts (CuTe also static-asserts that each layout is canonical, so a layout the hardware
//    cannot read fails to compile here);
//  - its register mappings: the fp32 accumulator of a 64xN wgmma (element 4j + e of a thread) and
//    the register A operand of a 64x16 k-step (bf16 value v of a thread), against CuTe's CLayout
//    and ALayout;
//  - the swizzled byte offsets its generic stores use (Q, register-path keys, P), against CuTe's
//    SW128 K-major tile.
// And the same for the narrow kernel (sm90_mla_decode_narrow.cuh: keys on M, query rows on N = 16
// or 32): its operands (the key tile as K-major A and, read MN-major, as A of P V; Q and P^T of N
// rows as K-major B), the 64x16 / 64x32 accumulators, its Q tile of N rows and its P^T stores.
#include <cstdio>

#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "cute/tensor.hpp"
#include "dskernels/sm90_mla_decode_narrow.cuh"

using namespace cute;
using dskernels::mla::kChunkBytes;

// The start address is not comparable on the host (CuTe cannot convert a host pointer to a shared
// address); compare every other field.
bool same_fields(uint64_t ours, GmmaDescriptor cute_desc, const char* what) {
  GmmaDescriptor mine;
  mine.desc_ = ours;
  const bool ok = mine.bitfield.leading_byte_offset_ == cute_desc.bitfield.leading_byte_offset_ &&
                  mine.bitfield.stride_byte_offset_ == cute_desc.bitfield.stride_byte_offset_ &&
                  mine.bitfield.base_offset_ == cute_desc.bitfield.base_offset_ &&
                  mine.bitfield.layout_type_ == cute_desc.bitfield.layout_type_;
  std::printf("%s %s: LBO %d SBO %d layout %d (CuTe: LBO %d SBO %d layout %d)\n", ok ? "ok:" : "FAIL:", what,
              int(mine.bitfield.leading_byte_offset_), int(mine.bitfield.stride_byte_offset_),
              int(mine.bitfield.layout_type_), int(cute_desc.bitfield.leading_byte_offset_),
              int(cute_desc.bitfield.stride_byte_offset_), int(cute_desc.bitfield.layout_type_));
  return ok;
}

// Accumulator element 4j + e of thread t: row 16 (t / 32) + (t % 32) / 4 + 8 (e / 2), column
// 8 j + 2 (t % 4) + e % 2 (the kernel's masking, softmax and output stores use this), for a 64xN
// wgmma of N / 2 values per thread.
template <typename Op>
bool accumulator_mapping_matches(const char* what) {
  using Traits = MMA_Traits<Op>;
  auto c = typename Traits::CLayout{};  // (thread, value) -> m + 64 n
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < int(size<1>(c)); ++v) {
      const int idx = c(t, v), m = idx % 64, n = idx / 64;
      const int lane = t % 32, j = v / 4, e = v % 4;
      if (m != 16 * (t / 32) + lane / 4 + 8 * (e / 2) || n != 8 * j + 2 * (lane % 4) + e % 2) {
        std::printf("FAIL: accumulator (thread %d, value %d) is (%d, %d) in CuTe\n", t, v, m, n);
        return false;
      }
    }
  }
  std::printf("ok: accumulator mapping of %s\n", what);
  return true;
}

// A from registers, bf16 value v of thread t (register v / 2): row 16 (t / 32) + (t % 32) / 4 +
// 8 ((v / 2) % 2), column 2 (t % 4) + v % 2 + 8 (v / 4): so P's accumulator pairs pack straight in.
bool register_a_mapping_matches() {
  using Traits = MMA_Traits<SM90::GMMA::MMA_64x256x16_F32BF16BF16_RS<SM90::GMMA::Major::K, SM90::GMMA::Major::MN>>;
  auto a = typename Traits::ALayout{};  // (thread, value) -> m + 64 k
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < 8; ++v) {
      const int idx = a(t, v), m = idx % 64, k = idx / 64;
      const int lane = t % 32;
      if (m != 16 * (t / 32) + lane / 4 + 8 * ((v / 2) % 2) || k != 2 * (lane % 4) + v % 2 + 8 * (v / 4)) {
        std::printf("FAIL: register A (thread %d, value %d) is (%d, %d) in CuTe\n", t, v, m, k);
        return false;
      }
    }
  }
  std::printf("ok: register A operand mapping\n");
  return true;
}

// The byte offset the producer (Q, register-path keys) and WG1 (P) store each 16-byte piece at
// equals CuTe's 128-byte-swizzled K-major atom tiled to 64 x 576, the layout the descriptors
// above read (and TMA's SWIZZLE_128B writes for a 1024-byte aligned box).
bool swizzled_offset_matches() {
  using T = cutlass::bfloat16_t;
  alignas(1024) static T tile[dskernels::mla::kTileBytes / 2];
  auto full = make_tensor(make_smem_ptr(tile), tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                                             Shape<_64, Int<dskernels::mla::kHeadDim>>{}));
  for (int row = 0; row < 64; ++row) {
    for (int piece = 0; piece < dskernels::mla::kPieces; ++piece) {
      const auto cute_offset = reinterpret_cast<const char*>(raw_pointer_cast(&full(row, 8 * piece))) -
                               reinterpret_cast<const char*>(tile);
      if (cute_offset != dskernels::mla::swizzled_offset(row, piece)) {
        std::printf("FAIL: piece %d of row %d at byte %u, CuTe puts it at %ld\n", piece, row,
                    dskernels::mla::swizzled_offset(row, piece), long(cute_offset));
        return false;
      }
    }
  }
  std::printf("ok: swizzled_offset equals CuTe's SW128 K-major tile\n");
  return true;
}

// The narrow kernel's Q tile (kN rows, regions kN x 128 B apart) and its P^T stores (p_offset of
// row n, key k), against CuTe's SW128 K-major tiles of kN x 576 and kN x 64.
template <int kN>
bool narrow_offsets_match() {
  using T = cutlass::bfloat16_t;
  alignas(1024) static T q[kN * dskernels::mla::kHeadDim];
  auto q_tile = make_tensor(make_smem_ptr(q), tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                                            Shape<Int<kN>, Int<dskernels::mla::kHeadDim>>{}));
  for (int row = 0; row < kN; ++row) {
    for (int piece = 0; piece < dskernels::mla::kPieces; ++piece) {
      const auto cute_offset = reinterpret_cast<const char*>(raw_pointer_cast(&q_tile(row, 8 * piece))) -
                               reinterpret_cast<const char*>(q);
      if (cute_offset != dskernels::mla::swizzled_offset(row, piece, kN * 128)) {
        std::printf("FAIL: narrow Q (N = %d): piece %d of row %d at byte %u, CuTe puts it at %ld\n", kN, piece, row,
                    dskernels::mla::swizzled_offset(row, piece, kN * 128), long(cute_offset));
        return false;
      }
    }
  }
  alignas(1024) static T pt[kN * 64];
  auto p_tile = make_tensor(make_smem_ptr(pt), tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, _64>{}));
  for (int n = 0; n < kN; ++n) {
    for (int k = 0; k < 64; ++k) {
      const auto cute_offset = reinterpret_cast<const char*>(raw_pointer_cast(&p_tile(n, k))) -
                               reinterpret_cast<const char*>(pt);
      if (cute_offset != dskernels::mla::p_offset(n, k)) {
        std::printf("FAIL: narrow P^T (N = %d): (%d, %d) at byte %u, CuTe puts it at %ld\n", kN, n, k,
                    dskernels::mla::p_offset(n, k), long(cute_offset));
        return false;
      }
    }
  }
  std::printf("ok: narrow Q tile and P^T offsets (N = %d) equal CuTe's SW128 K-major tiles\n", kN);
  return true;
}

// The narrow kernel's descriptors: Q and P^T (kN rows, 128-byte rows) as the K-major B operand of
// one k-step; the key tile as the MN-major A operand of P V (64 dv of one region x 16 keys, keys
// 128 B apart). The key tile as K-major A is the (64, 16) K-major layout checked in main.
template <int kN>
bool narrow_descriptors_match() {
  using T = cutlass::bfloat16_t;
  alignas(1024) static T tile[dskernels::mla::kTileBytes / 2];
  auto b_operand = make_tensor(make_smem_ptr(tile), make_composed_layout(Swizzle<3, 4, 3>{}, smem_ptr_flag_bits<16>{},
                                                                         Layout<Shape<Int<kN>, _16>, Stride<_64, _1>>{}));
  auto a_mn = make_tensor(make_smem_ptr(tile), make_composed_layout(Swizzle<3, 4, 3>{}, smem_ptr_flag_bits<16>{},
                                                                    Layout<Shape<_64, Shape<_8, _2>>, Stride<_1, Stride<_64, _512>>>{}));
  char what[96];
  std::snprintf(what, sizeof(what), "narrow K-major B (Q, P^T; N = %d)", kN);
  const bool b_ok = same_fields(dskernels::mla::desc_k_major(0), SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::K>(b_operand), what);
  const bool a_ok = same_fields(dskernels::mla::desc_mn_major_region(0), SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::MN>(a_mn),
                                "narrow MN-major A (V^T of P V, one 64-column region)");
  return b_ok & a_ok;
}

int main() {
  using T = cutlass::bfloat16_t;
  alignas(1024) static T tile[dskernels::mla::kTileBytes / 2];
  constexpr int kRegion = kChunkBytes / 2;  // elements between 64-column regions
  // Q, K and P as K-major operands of one k-step: (64 rows, 16 columns), rows 128 B apart.
  auto k_major = make_tensor(make_smem_ptr(tile), make_composed_layout(Swizzle<3, 4, 3>{}, smem_ptr_flag_bits<16>{},
                                                                       Layout<Shape<_64, _16>, Stride<_64, _1>>{}));
  // V (the key tile) as the MN-major B operand of P V: (256 columns, 16 keys); column n in region
  // n / 64, key k at k * 64 elements within its region.
  auto mn_major = make_tensor(
      make_smem_ptr(tile),
      make_composed_layout(Swizzle<3, 4, 3>{}, smem_ptr_flag_bits<16>{},
                           Layout<Shape<Shape<_64, _4>, Shape<_8, _2>>, Stride<Stride<_1, Int<kRegion>>, Stride<_64, _512>>>{}));
  const bool ok = same_fields(dskernels::mla::desc_k_major(0), SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::K>(k_major),
                              "K-major (Q K^T operands, P)") &
                  same_fields(dskernels::mla::desc_mn_major(0),
                              SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::MN>(mn_major), "MN-major (V of P V)");
  namespace G = SM90::GMMA;
  const bool narrow = narrow_descriptors_match<16>() & narrow_descriptors_match<32>() & narrow_offsets_match<16>() &
                      narrow_offsets_match<32>() &
                      accumulator_mapping_matches<G::MMA_64x16x16_F32BF16BF16_SS<G::Major::MN, G::Major::K>>("64x16 (narrow)") &
                      accumulator_mapping_matches<G::MMA_64x32x16_F32BF16BF16_SS<G::Major::K, G::Major::K>>("64x32 (narrow)");
  return ok & narrow &
                 accumulator_mapping_matches<G::MMA_64x64x16_F32BF16BF16_SS<G::Major::K, G::Major::K>>("64x64") &
                 register_a_mapping_matches() & swizzled_offset_matches()
             ? 0
             : 1;
}
