// Host check (CI, scripts/check_build.sh): the scale layouts the sm90 grouped FP8 GEMMs produce are
// the ones CUTLASS's ptr-array blockwise collective reads.
//
// That collective ignores the layout_SFA / layout_SFB arrays it is given: its load_init rebuilds
// both from each group's problem shape with ScaleConfig::tile_atom_to_shape_SFA/SFB (CUTLASS 4.2,
// sm90_mma_array_tma_gmma_ss_warpspecialized_fp8_blockwise_scaling.hpp). pack_sfa_kernel therefore
// writes group g's sa at kb * m_g + row, and the launcher requires sb's K-block stride to be
// ceil(n / 128) (csrc/include/dskernels/sm90_fp8_gemm_grouped{,_fill}.cuh). This program checks,
// for every element of a few odd shapes, that those offsets, our make_layout_sfa/sfb and CUTLASS's
// layouts agree, and that both grouped configs use our ScaleConfig.
#include <cstdio>
#include <type_traits>

#include "dskernels/sm90_fp8_gemm_grouped.cuh"

using namespace dskernels::fp8_gemm;

static_assert(std::is_same_v<ScaleConfig, grouped::M128::CollectiveMainloop::ScaleConfig> &&
              std::is_same_v<ScaleConfig, grouped::M64::CollectiveMainloop::ScaleConfig>);

int main() {
  int bad = 0;
  for (int rows : {1, 3, 61, 128, 130}) {
    for (int n : {1, 123, 129, 256}) {
      for (int k : {128, 384}) {
        const int kblocks = k / kScaleBlock, nblocks = (n + kScaleBlock - 1) / kScaleBlock;
        const auto ours_a = make_layout_sfa(rows, kblocks, rows);
        const auto cutlass_a = ScaleConfig::tile_atom_to_shape_SFA(make_shape(rows, n, k, 1));
        const auto ours_b = make_layout_sfb(n, kblocks, nblocks);
        const auto cutlass_b = ScaleConfig::tile_atom_to_shape_SFB(make_shape(rows, n, k, 1));
        for (int i = 0; i < rows; ++i) {
          for (int c = 0; c < k; ++c) {
            const auto coord = make_coord(make_coord(0, i), make_coord(c % kScaleBlock, c / kScaleBlock), 0);
            const int packed = c / kScaleBlock * rows + i;  // pack_sfa_kernel's offset within the group
            if (ours_a(coord) != packed || cutlass_a(coord) != packed) {
              if (bad++ < 5) printf("sfa rows %d (%d, %d): ours %d, cutlass %d, packed %d\n", rows, i, c,
                                    int(ours_a(coord)), int(cutlass_a(coord)), packed);
            }
          }
        }
        for (int j = 0; j < n; ++j) {
          for (int c = 0; c < k; ++c) {
            const auto coord = make_coord(make_coord(j % kScaleBlock, j / kScaleBlock),
                                          make_coord(c % kScaleBlock, c / kScaleBlock), 0);
            const int packed = c / kScaleBlock * nblocks + j / kScaleBlock;  // sb with K-block stride nblocks
            if (ours_b(coord) != packed || cutlass_b(coord) != packed) {
              if (bad++ < 5) printf("sfb n %d (%d, %d): ours %d, cutlass %d, packed %d\n", n, j, c,
                                    int(ours_b(coord)), int(cutlass_b(coord)), packed);
            }
          }
        }
      }
    }
  }
  if (bad) {
    printf("FAIL: %d scale offsets differ from what CUTLASS's grouped collective reads\n", bad);
    return 1;
  }
  printf("ok: the grouped GEMMs' packed scale layouts equal CUTLASS's tile_atom_to_shape_SFA/SFB\n");
  return 0;
}
