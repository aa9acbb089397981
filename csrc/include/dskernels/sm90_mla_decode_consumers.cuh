// The sm90 MLA decode consumer warp groups (sm90_mla_decode.cuh describes the kernel): the
// softmax group (S = Q K^T, online softmax, O[:, :256] += P V) and the second-half group
// (O[:, 256:] += P V), with the score, softmax and output helpers the seesaw consumers share.
// Device code only, no torch.
#pragma once

#include "dskernels/sm90_mla_decode_common.cuh"

namespace dskernels::mla {

// ---------------------------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------------------------

// Accumulator layout of a 64 x N wgmma (per thread, warp w of the group, lane l, q = l % 4):
// element 4j + e holds row r0 = 16w + l/4 (e < 2) or r0 + 8 (e >= 2), column 8j + 2q + (e & 1).

// Writes this thread's part of a 64 x 256 half of O (already scaled) for rows r0 and r0 + 8.
template <typename Element>
__device__ __forceinline__ void store_output(const DecodeParams& p, const WorkItem& w, const float* o, int col0,
                                             int kv_head, int m_tile, int r0, int q4, bool split_out, float final0,
                                             float final1) {
  const int slot = p.num_splits[w.i] + w.split;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m_tile * kBlockM + r0 + half * 8;
    if (r >= p.rows) continue;
    const int token = r / p.heads_per_kv, head = kv_head * p.heads_per_kv + r % p.heads_per_kv;
    const float f = half ? final1 : final0;
    if (split_out) {
      if (slot < 0 || slot >= p.max_slots) continue;
      float* dst = p.out_acc + (int64_t(slot) * p.h_q * p.s_q + head * p.s_q + token) * kHeadDimV + col0 + 2 * q4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * half] * f, o[4 * j + 2 * half + 1] * f);
      }
    } else {
      Element* dst = static_cast<Element*>(p.out) + w.i * p.o_stride_b + token * p.o_stride_s + head * p.o_stride_h +
                     col0 + 2 * q4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<uint32_t*>(dst + 8 * j) = Mma<Element>::pack(o[4 * j + 2 * half] * f, o[4 * j + 2 * half + 1] * f);
      }
    }
  }
}

// Writes the LSE of rows r0 and r0 + 8 (log2 domain, -inf: no key): the natural-log lse (+inf for
// no key) of a sequence in one split, or the split's slot of lse_acc.
__device__ __forceinline__ void store_lse(const DecodeParams& p, const WorkItem& w, int kv_head, int m_tile, int r0,
                                          bool split_out, const float* lse2) {
  const int slot = p.num_splits[w.i] + w.split;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m_tile * kBlockM + r0 + 8 * h;
    if (r >= p.rows) continue;
    const int tok = r / p.heads_per_kv, head = kv_head * p.heads_per_kv + r % p.heads_per_kv;
    if (split_out) {
      if (slot >= 0 && slot < p.max_slots) p.lse_acc[int64_t(slot) * p.h_q * p.s_q + head * p.s_q + tok] = lse2[h];
    } else {
      p.lse[w.i * p.lse_stride_b + head * p.lse_stride_h + tok] = lse2[h] == -INFINITY ? INFINITY : lse2[h] * kLn2;
    }
  }
}

// S = Q K^T for one key block (36 wgmma 64x64x16, both operands K-major in shared memory);
// committed, not waited for.
template <typename MmaT>
// No operand fence on s here: in the pipelined loop P V is still in flight, and an instruction
// defining wgmma registers inside an open wgmma stage makes ptxas serialize every wgmma (C7515).
__device__ __forceinline__ void issue_qk(uint32_t q_tile, uint32_t kv_tile, float* s) {
  cute::warpgroup_arrive();
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_ss<typename MmaT::QK>(desc_k_major(q_tile + c * kChunkBytes + kk * 32),
                                desc_k_major(kv_tile + c * kChunkBytes + kk * 32), s, c > 0 || kk > 0,
                                std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
}

// The query token of each of the thread's two rows (r0, r0 + 8 of the tile); rows past the last
// (padding) take the last token.
__device__ __forceinline__ void row_tokens(const DecodeParams& p, int m_tile, int r0, int* token) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m_tile * kBlockM + r0 + 8 * h;
    token[h] = r < p.rows ? r / p.heads_per_kv : p.s_q - 1;
  }
}

// The end of the keys each row sees in item w: its split's end, and causally seqlen - s_q + token + 1.
__device__ __forceinline__ void row_limits(const DecodeParams& p, const WorkItem& w, const int* token, int* limit) {
  const int seqlen = p.seqlens[w.i];
#pragma unroll
  for (int h = 0; h < 2; ++h) limit[h] = min(w.hi, p.causal ? seqlen - p.s_q + token[h] + 1 : seqlen);
}

// Scales this thread's 32 scores of a 64-key block into the log2 domain and masks the keys past each
// row's limit or on a page outside the cache (-inf); row_max: the maxima of the thread's two rows
// over their four lanes. `valid`: the stage's kv_valid shifted right by 2 * q4.
__device__ __forceinline__ void scale_and_mask(float* s, const int* limit, int start, uint64_t valid, int q4,
                                               float scale, float* row_max) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int visible = limit[h] - start;  // keys [start, start + visible) of the block
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * j + 2 * h + e];
        x = 8 * j + 2 * q4 + e < visible && (valid >> (8 * j + e)) & 1 ? x * scale : -INFINITY;
        m = fmaxf(m, x);
      }
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    row_max[h] = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
  }
}

// s = 2^(s - m) in place for each of the two rows (m_safe: the row's max, 0 where it is -inf);
// row_sum: this thread's part of each row's sum.
__device__ __forceinline__ void exp_scores(float* s, const float* m_safe, float* row_sum) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * j + 2 * h + e];
        x = fast_exp2(x - m_safe[h]);
        sum += x;
      }
    }
    row_sum[h] = sum;
  }
}

// P (this thread's 32 probabilities) as the A operand of the 64x256x16 wgmma (k-step kk: pa[4kk..]).
template <typename MmaT>
__device__ __forceinline__ void pack_p(const float* s, uint32_t* pa) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) pa[4 * kk + i] = MmaT::pack(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
  }
}

// Stores P into the swizzled 64 x 64 tile at `tile` (a K-major wgmma A operand): columns
// 8j + 2 q4 (+1) of rows r0 and r0 + 8 are 4 bytes at q4 of 16-byte piece j.
template <typename MmaT>
__device__ __forceinline__ void store_p(uint32_t tile, const float* s, int r0, int q4) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t word = MmaT::pack(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]);
      asm volatile("st.shared.u32 [%0], %1;" :: "r"(tile + swizzled_offset(r0 + 8 * h, j) + 4 * q4), "r"(word));
    }
  }
}

// O (this thread's 128 accumulators of a 64 x 256 half) times a per-row factor.
__device__ __forceinline__ void rescale_o(float* o, const float* factor) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j + 0] *= factor[0];
    o[4 * j + 1] *= factor[0];
    o[4 * j + 2] *= factor[1];
    o[4 * j + 3] *= factor[1];
  }
}

template <typename Element, bool kFp8, int kCluster>
__device__ void softmax_group(const DecodeParams& p, SharedStorage& smem, int part, int kv_head, int m_tile, int tid) {
  using MmaT = Mma<Element>;
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int r0 = warp * 16 + lane / 4;  // and r0 + 8
  const float k_scale = kFp8 ? *p.k_scale : 1.0f;
  const float scale = p.scale_log2 * k_scale;
  const uint32_t q_tile = smem_addr(smem.q);
  const uint32_t p_tile = smem_addr(smem.p);
  int token[2];
  row_tokens(p, m_tile, r0, token);
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    int limit[2];
    row_limits(p, w, token, limit);
    float o[128];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

    // Software pipeline: block i+1's QK^T is issued right behind block i's P V, so the tensor
    // cores never wait for this warp group between them; wgmma.wait_group 0 at the top of an
    // iteration then covers both (S of block i, and the P V that read the previous stage).
    barrier_wait(&smem.q_full, item_count & 1);
    float s[32];
    uint32_t pa[16];  // P as the A operand of P V (k-step kk: keys 16kk..16kk+15)
    fence_all(o, std::make_index_sequence<128>{});  // O's zeros are written before any wgmma stage opens
    fence_all(s, std::make_index_sequence<32>{});
    barrier_wait(&smem.kv_full[block_count & 1], (block_count >> 1) & 1);
    issue_qk<MmaT>(q_tile, smem_addr(smem.kv[block_count & 1]), s);
    for (int start = w.lo; start < w.hi; start += kBlockN, ++block_count) {
      const int stage = block_count & 1;
      const uint32_t kv_tile = smem_addr(smem.kv[stage]);
      cute::warpgroup_wait<0>();
      // Pin the registers the finished wgmmas wrote or read: nothing may move across the wait.
      fence_all(s, std::make_index_sequence<32>{});
      fence_all(o, std::make_index_sequence<128>{});
      fence_all(pa, std::make_index_sequence<16>{});
      if (start + kBlockN >= w.hi) cutlass::arch::ClusterBarrier::arrive(&smem.q_empty);  // last use of Q

      // Scale, mask, online softmax (log2 domain). Four lanes share a row: reduce over xor 1, 2.
      // The stage stays ours until the end of this iteration releases it, so its kv_valid is current.
      float row_max[2], m_safe[2], row_sum[2], alpha[2];
      scale_and_mask(s, limit, start, smem.kv_valid[stage] >> (2 * q4), q4, scale, row_max);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(m_run[h], row_max[h]);
        m_safe[h] = m_new == -INFINITY ? 0.0f : m_new;
        alpha[h] = fast_exp2(m_run[h] - m_safe[h]);
        m_run[h] = m_new;
      }
      exp_scores(s, m_safe, row_sum);
#pragma unroll
      for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum[h];  // this thread's columns

      pack_p<MmaT>(s, pa);  // P in registers, laid out as the A operand of the 64x256x16 wgmma
      // Hand P and the rescale factors to WG2 (its previous block must be done with them).
      barrier_wait(&smem.p_empty, (block_count & 1) ^ 1);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 8 * h;
          const uint32_t addr = p_tile + swizzled_offset(r, j) + 4 * q4;
          asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(pa[4 * (j / 2) + 2 * (j % 2) + h]));
        }
      }
      if (q4 == 0) {
        smem.row_alpha[r0] = alpha[0];
        smem.row_alpha[r0 + 8] = alpha[1];
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&smem.p_full);

      rescale_o(o, alpha);  // O[:, 0:256] = alpha * O + P V[:, 0:256]
      fence_all(o, std::make_index_sequence<128>{});
      fence_all(pa, std::make_index_sequence<16>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_rs<typename MmaT::PVReg>(pa + 4 * kk, desc_mn_major(kv_tile + kk * 2048), o,
                                     std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      if (start + kBlockN < w.hi) {
        const int next = block_count + 1;
        barrier_wait(&smem.kv_full[next & 1], (next >> 1) & 1);
        issue_qk<MmaT>(q_tile, smem_addr(smem.kv[next & 1]), s);
        // Give this block's stage back as soon as its P V is done (wgmma groups complete in commit
        // order: at most the QK^T just issued is still pending), not after the next QK^T: the
        // producer's load of block + 2 then overlaps that QK^T instead of waiting for it. With two
        // 72 KiB stages, the load's latency is otherwise exposed once per block in compute-bound
        // calls. No register is touched here (the QK^T is still writing s).
        cute::warpgroup_wait<1>();
        release_stage<kCluster>(&smem.kv_empty[stage]);
      }
    }
    cute::warpgroup_wait<0>();
    fence_all(o, std::make_index_sequence<128>{});
    fence_all(pa, std::make_index_sequence<16>{});
    release_stage<kCluster>(&smem.kv_empty[(block_count - 1) & 1]);

    // Epilogue: full row sums, the final factor for both halves, LSE.
    float final_factor[2], lse2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[h];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      const bool seen = l != 0.0f;  // NaN (a NaN score) stays NaN, not "no key seen"
      final_factor[h] = seen ? k_scale / l : 0.0f;
      lse2[h] = seen ? m_run[h] + __log2f(l) : -INFINITY;
    }
    if (q4 == 0) {
      smem.row_final[item_count & 1][r0] = final_factor[0];
      smem.row_final[item_count & 1][r0 + 8] = final_factor[1];
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    ++item_count;
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    store_output<Element>(p, w, o, 0, kv_head, m_tile, r0, q4, split_out, final_factor[0], final_factor[1]);
    if (q4 == 0) store_lse(p, w, kv_head, m_tile, r0, split_out, lse2);
  });
}

template <typename Element, int kCluster>
__device__ void second_half_group(const DecodeParams& p, SharedStorage& smem, int part, int kv_head, int m_tile,
                                  int tid) {
  using MmaT = Mma<Element>;
  const int warp = tid / 32, lane = tid % 32, q4 = lane % 4;
  const int r0 = warp * 16 + lane / 4;
  const uint32_t p_tile = smem_addr(smem.p);
  int item_count = 0, block_count = 0;
  for_each_item(p, part, [&](const WorkItem& w) {
    float o[128];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.0f;
    for (int start = w.lo; start < w.hi; start += kBlockN, ++block_count) {
      const int stage = block_count & 1;
      const uint32_t kv_tile = smem_addr(smem.kv[stage]);
      barrier_wait(&smem.kv_full[stage], (block_count >> 1) & 1);
      barrier_wait(&smem.p_full, block_count & 1);
      const float alpha[2] = {smem.row_alpha[r0], smem.row_alpha[r0 + 8]};
      rescale_o(o, alpha);
      fence_all(o, std::make_index_sequence<128>{});
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma_ss<typename MmaT::PVSmem>(desc_k_major(p_tile + kk * 32),
                                      desc_mn_major(kv_tile + 4 * kChunkBytes + kk * 2048), o, true,
                                      std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_all(o, std::make_index_sequence<128>{});
      cutlass::arch::ClusterBarrier::arrive(&smem.p_empty);
      release_stage<kCluster>(&smem.kv_empty[stage]);
    }
    cutlass::arch::NamedBarrier::sync(256, kBarConsumers);
    const float f0 = smem.row_final[item_count & 1][r0], f1 = smem.row_final[item_count & 1][r0 + 8];
    ++item_count;
    const bool split_out = p.num_splits[w.i + 1] - p.num_splits[w.i] != 1;
    store_output<Element>(p, w, o, 256, kv_head, m_tile, r0, q4, split_out, f0, f1);
  });
}

}  // namespace dskernels::mla
