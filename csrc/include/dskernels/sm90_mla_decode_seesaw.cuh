// The sm90 MLA decode seesaw consumers (opt-in: DSKERNELS_MLA_SEESAW=1; sm90_mla_decode.cuh
// describes the kernel). Device code only, no torch.
#pragma once

#include "dskernels/sm90_mla_decode_consumers.cuh"

namespace dskernels::mla {

// ---------------------------------------------------------------------------------------------
// Seesaw consumers (opt-in: DSKERNELS_MLA_SEESAW=1; written 2026-12-05 without a GPU)
// ---------------------------------------------------------------------------------------------
//
// The two-role consumers (sm90_mla_decode_consumers.cuh) leave the tensor cores idle while WG1 runs
// a block's softmax. Here both groups compute S = Q K^T, for alternate blocks of a pair (WG1 the
// first, x; WG2 the second, y), and each keeps one half of O (WG1 columns 0..255, WG2 256..511),
// into which it multiplies both blocks' P, so one group's softmax runs under the other's wgmma:
//   tensor cores: QK_x (WG1) | QK_y (WG2) | PV_x,L (WG1) | PV_x,R (WG2) | PV_y,L (WG1) | PV_y,R (WG2)
// With m the rows' running max before the pair:
//   WG1: m_x = max(m, rowmax S_x), a = 2^(m - m_x), P_x = 2^(S_x - m_x); O_L = a O_L + P_x V_x,L
//   WG2: m_y = max(m_x, rowmax S_y), b = 2^(m_x - m_y), P_y = 2^(S_y - m_y);
//        O_R = b (a O_R + P_x V_x,R) + P_y V_y,R   (b applied between its two P V groups)
//   WG1: O_L = b O_L + P_y V_y,L;  then m = m_y in both; at the end l = l_WG1 + l_WG2.
// A block's P goes into the rope chunk (chunk 8) of its own key stage, which only that block's
// QK^T reads (all four warps of the group that scores it: they meet at a barrier before the P
// stores), so no shared memory is added. The maxima and the final row sums cross in
// smem.seesaw_rows; four named barriers (one group arrives, the other syncs) order each pair:
//   WG1: arrive MaxX, arrive Px, sync MaxY, sync Py;   WG2: sync MaxX, arrive MaxY, arrive Py, sync Px
// (WG1 cannot arrive on a barrier again before WG2 has synced on it: each next arrival waits for
// something WG2 does after its sync, a stage release or a barrier, and likewise the other way.)
// A sequence with an odd block count ends on a pair without y (`kHasY` false): WG2 scores nothing,
// its max is m_x and both skip y's P V. Each group releases a stage once its last wgmma on it is
// done (kv_empty counts the 8 warps of both).
enum SeesawRow { kRowMaxX = 0, kRowMaxY = 1, kRowSumA = 2, kRowSumB = 3 };

// What a seesaw group carries from pair to pair of one sequence.
struct SeesawState {
  float o[128];               // this group's 64 x 256 half of O, relative to m_run
  float s[32];                // scores, then probabilities, of the block it scores
  uint32_t pa[16];            // those probabilities as the A operand of P V
  float m_run[2], l_run[2];   // running max (log2 domain) and this group's part of the row sums
  int pending;                // WG1: the stage of the last pair's y, whose P V may still run (-1: none)
};

template <typename Element, bool kFp8, bool kSecond, bool kHasY>
__device__ __forceinline__ void seesaw_pair(const DecodeParams& p, SharedStorage& smem, SeesawState& st,
                                            const int* limit, int start_x, int bx, bool last_pair, float scale,
                                            int r0, int q4) {
  using MmaT = Mma<Element>;
  constexpr int kPChunk = 8 * kChunkBytes;              // a stage's rope chunk: its block's P once scored
  constexpr int kHalf = kSecond ? 4 * kChunkBytes : 0;  // this group's half of V
  float (*rows)[kBlockM] = smem.seesaw_rows;
  const uint32_t q_tile = smem_addr(smem.q);
  const int stage_x = bx & 1, stage_y = (bx + 1) & 1;
  const uint32_t tile_x = smem_addr(smem.kv[stage_x]), tile_y = smem_addr(smem.kv[stage_y]);
  float row_max[2], row_sum[2];

  if constexpr (!kSecond) {
    // S_x, issued behind the last pair's P_y V_y,L, whose stage goes back as soon as that is done.
    barrier_wait(&smem.kv_full[stage_x], (bx >> 1) & 1);
    issue_qk<MmaT>(q_tile, tile_x, st.s);
    if (st.pending >= 0) {
      cute::warpgroup_wait<1>();
      release_stage<1>(&smem.kv_empty[st.pending]);
    }
    st.pending = -1;
    cute::warpgroup_wait<0>();
    fence_all(st.s, std::make_index_sequence<32>{});
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    if (last_pair) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // the last x: done with Q

    float m_x_safe[2], a[2];
    scale_and_mask(st.s, limit, start_x, smem.kv_valid[stage_x] >> (2 * q4), q4, scale, row_max);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_x = fmaxf(st.m_run[h], row_max[h]);
      m_x_safe[h] = m_x == -INFINITY ? 0.0f : m_x;
      a[h] = fast_exp2(st.m_run[h] - m_x_safe[h]);
      st.m_run[h] = m_x;
    }
    if (q4 == 0) {
      rows[kRowMaxX][r0] = st.m_run[0];
      rows[kRowMaxX][r0 + 8] = st.m_run[1];
    }
    cutlass::arch::NamedBarrier::arrive(256, kBarMaxX);
    // P_x goes over x's rope chunk below, which every warp of this group read for its QK_x slice:
    // a warp's wait_group covers its own slice only, so all four must be past theirs first. (Here,
    // not right before the stores: there ptxas spilled 56 bytes.) WG2's P_y needs no such barrier:
    // its MaxX sync already waits for all its warps.
    cutlass::arch::NamedBarrier::sync(128, kBarQkX);
    exp_scores(st.s, m_x_safe, row_sum);
#pragma unroll
    for (int h = 0; h < 2; ++h) st.l_run[h] = st.l_run[h] * a[h] + row_sum[h];
    pack_p<MmaT>(st.s, st.pa);
    store_p<MmaT>(tile_x + kPChunk, st.s, r0, q4);  // P_x for WG2's half (QK_x is done with the chunk)
    cutlass::arch::fence_view_async_shared();            // generic-proxy stores -> WG2's wgmma reads
    cutlass::arch::NamedBarrier::arrive(256, kBarPx);
    rescale_o(st.o, a);
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_rs<typename MmaT::PVReg>(st.pa + 4 * kk, desc_mn_major(tile_x + kk * 2048), st.o,
                                   std::make_index_sequence<128>{});
    }
    cute::warpgroup_commit_batch();

    cutlass::arch::NamedBarrier::sync(256, kBarMaxY);  // y's max, from WG2
    float b[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_y = rows[kRowMaxY][r0 + 8 * h];
      b[h] = fast_exp2(st.m_run[h] - (m_y == -INFINITY ? 0.0f : m_y));
      st.m_run[h] = m_y;
      st.l_run[h] *= b[h];
    }
    cutlass::arch::NamedBarrier::sync(256, kBarPy);  // P_y is in y's rope chunk
    cute::warpgroup_wait<0>();
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    release_stage<1>(&smem.kv_empty[stage_x]);
    // Without y, m_y = m_x: b is 1, or 0 where the row has seen no key (O_L is 0 there). Not
    // rescaling then also keeps non-wgmma definitions of O off the path that joins the one where
    // y's P V is still in flight (ptxas would serialize every wgmma: C7515).
    if constexpr (kHasY) {
      rescale_o(st.o, b);
      barrier_wait(&smem.kv_full[stage_y], ((bx + 1) >> 1) & 1);  // WG2 saw it; this makes it ours to read
      fence_all(st.o, std::make_index_sequence<128>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_ss<typename MmaT::PVSmem>(desc_k_major(tile_y + kPChunk + kk * 32), desc_mn_major(tile_y + kk * 2048),
                                      st.o, true, std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      st.pending = stage_y;
    }
  } else {
    row_max[0] = row_max[1] = -INFINITY;
    if constexpr (kHasY) {
      barrier_wait(&smem.kv_full[stage_y], ((bx + 1) >> 1) & 1);
      issue_qk<MmaT>(q_tile, tile_y, st.s);
      cute::warpgroup_wait<0>();
      fence_all(st.s, std::make_index_sequence<32>{});
      fence_all(st.o, std::make_index_sequence<128>{});
      fence_all(st.pa, std::make_index_sequence<16>{});
      if (last_pair) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // the last y: done with Q
      scale_and_mask(st.s, limit, start_x + kBlockN, smem.kv_valid[stage_y] >> (2 * q4), q4, scale, row_max);
    }
    cutlass::arch::NamedBarrier::sync(256, kBarMaxX);  // x's max, from WG1
    float m_y_safe[2], a[2], b[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_x = rows[kRowMaxX][r0 + 8 * h];
      const float m_y = fmaxf(m_x, row_max[h]);
      m_y_safe[h] = m_y == -INFINITY ? 0.0f : m_y;
      a[h] = fast_exp2(st.m_run[h] - (m_x == -INFINITY ? 0.0f : m_x));  // the same a and b as WG1's
      b[h] = fast_exp2(m_x - m_y_safe[h]);
      st.m_run[h] = m_y;
    }
    if (q4 == 0) {
      rows[kRowMaxY][r0] = st.m_run[0];
      rows[kRowMaxY][r0 + 8] = st.m_run[1];
    }
    cutlass::arch::NamedBarrier::arrive(256, kBarMaxY);
    row_sum[0] = row_sum[1] = 0.0f;
    if constexpr (kHasY) {
      exp_scores(st.s, m_y_safe, row_sum);
      pack_p<MmaT>(st.s, st.pa);
      store_p<MmaT>(tile_y + kPChunk, st.s, r0, q4);  // P_y for WG1's half
      cutlass::arch::fence_view_async_shared();
    }
    cutlass::arch::NamedBarrier::arrive(256, kBarPy);
#pragma unroll
    for (int h = 0; h < 2; ++h) st.l_run[h] = st.l_run[h] * a[h] * b[h] + row_sum[h];
    rescale_o(st.o, a);

    cutlass::arch::NamedBarrier::sync(256, kBarPx);  // P_x is in x's rope chunk
    barrier_wait(&smem.kv_full[stage_x], (bx >> 1) & 1);  // WG1 saw it; this makes it ours to read
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_ss<typename MmaT::PVSmem>(desc_k_major(tile_x + kPChunk + kk * 32), desc_mn_major(tile_x + kHalf + kk * 2048),
                                    st.o, true, std::make_index_sequence<128>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    release_stage<1>(&smem.kv_empty[stage_x]);
    if constexpr (kHasY) {  // (without y, b is 1 or multiplies zeros, as in WG1)
      rescale_o(st.o, b);
      fence_all(st.o, std::make_index_sequence<128>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_rs<typename MmaT::PVReg>(st.pa + 4 * kk, desc_mn_major(tile_y + kHalf + kk * 2048), st.o,
                                     std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      // Waited for here: y's stage is where the next pair's y is loaded.
      cute::warpgroup_wait<0>();
      fence_all(st.o, std::make_index_sequence<128>{});
      fence_all(st.pa, std::make_index_sequence<16>{});
      release_stage<1>(&smem.kv_empty[stage_y]);
    }
  }
}

template <typename Element, bool kFp8, bool kSecond>
__device__ void seesaw_group(const DecodeParams& p, SharedStorage& smem, int part, int kv_head, int m_tile, int tid) {
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int r0 = warp * 16 + lane / 4;  // and r0 + 8
  const float k_scale = kFp8 ? *p.k_scale : 1.0f;
  const float scale = p.scale_log2 * k_scale;
  float (*rows)[kBlockM] = smem.seesaw_rows;
  int token[2];
  row_tokens(p, m_tile, r0, token);
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    int limit[2];
    row_limits(p, w, token, limit);
    SeesawState st;
#pragma unroll
    for (int k = 0; k < 128; ++k) st.o[k] = 0.0f;
    st.m_run[0] = st.m_run[1] = -INFINITY;
    st.l_run[0] = st.l_run[1] = 0.0f;
    st.pending = -1;
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.s, std::make_index_sequence<32>{});
    const int blocks = (w.hi - w.lo + kBlockN - 1) / kBlockN, pairs = blocks / 2;
    barrier_wait(&smem.q_full, item_count & 1);
    if (kSecond && pairs == 0) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // no y: Q not read
    // last_pair: this group's last QK^T of the sequence (WG2 scores none in a pair without y).
    for (int pair = 0; pair < pairs; ++pair, block_count += 2) {
      seesaw_pair<Element, kFp8, kSecond, true>(p, smem, st, limit, w.lo + 2 * pair * kBlockN, block_count,
                                                pair + 1 == pairs && (kSecond || blocks % 2 == 0), scale, r0, q4);
    }
    if (blocks % 2 == 1) {  // the last block, x of a pair without y
      seesaw_pair<Element, kFp8, kSecond, false>(p, smem, st, limit, w.lo + 2 * pairs * kBlockN, block_count,
                                                 !kSecond, scale, r0, q4);
      block_count += 1;
    }
    // Unconditionally: a wait on some paths only makes ptxas serialize every wgmma (C7518, C7520).
    cute::warpgroup_wait<0>();
    fence_all(st.o, std::make_index_sequence<128>{});
    fence_all(st.pa, std::make_index_sequence<16>{});
    if (!kSecond && st.pending >= 0) release_stage<1>(&smem.kv_empty[st.pending]);

    // Epilogue: each group's row sums, added; the final factor and (WG1) the LSE.
    float l_own[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = st.l_run[h];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l_own[h] = l + __shfl_xor_sync(0xffffffff, l, 2);
    }
    if (q4 == 0) {
      rows[kSecond ? kRowSumB : kRowSumA][r0] = l_own[0];
      rows[kSecond ? kRowSumB : kRowSumA][r0 + 8] = l_own[1];
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    float final_factor[2], lse2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = l_own[h] + rows[kSecond ? kRowSumA : kRowSumB][r0 + 8 * h];
      const bool seen = l != 0.0f;  // NaN (a NaN score) stays NaN, not "no key seen"
      final_factor[h] = seen ? k_scale / l : 0.0f;
      lse2[h] = seen ? st.m_run[h] + __log2f(l) : -INFINITY;
    }
    ++item_count;
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    store_output<Element>(p, w, st.o, kSecond ? 256 : 0, kv_head, m_tile, r0, q4, split_out, final_factor[0],
                          final_factor[1]);
    if (!kSecond && q4 == 0) store_lse(p, w, kv_head, m_tile, r0, split_out, lse2);
  });
}

}  // namespace dskernels::mla
