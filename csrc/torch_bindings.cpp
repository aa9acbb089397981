// The one TORCH_LIBRARY(dskernels, m): every schema of the library, the contract at a glance.
//
// Public ops (the names of ../shared/API.md) get their CPU (reference), CUDA (backend choice)
// and fake kernels from Python (dskernels/ops/*.py). Ops whose name starts with `_sm90_` are the
// raw Hopper kernels, registered under the CUDA key by csrc/<family>/*.cu and called only by the
// Python dispatcher after it has validated the inputs and allocated the outputs.
#include <Python.h>
#include <torch/library.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <string>

// `import dskernels._C` loads this shared object; the registrations below run as it loads.
// No pybind11: the module is empty and the ops are reached through torch.ops.dskernels.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(dskernels, m) {
  // Each family's fake (meta) kernels live in its Python module: set_python_module before a
  // family's defs tells torch where to find them.

  // ---- FP8 casts (API.md section 2) ----
  m.set_python_module("dskernels.ops.fp8");
  // round_scale: scales rounded up to powers of two (UE8M0, DeepSeek-V3.1's "scale_fmt": "ue8m0").
  m.def("per_token_cast_to_fp8(Tensor x, bool round_scale=False) -> (Tensor, Tensor)");
  m.def("per_block_cast_to_fp8(Tensor w, bool round_scale=False) -> (Tensor, Tensor)");
  // x [tokens, h] -> fp8 [tokens, h] and one scale per column per 128 tokens of each group of ks
  // (None: one group): [sum(ceil(ks / 128)), h], the K-grouped GEMMs' token-major operands.
  m.def("per_channel_cast_to_fp8(Tensor x, SymInt[]? ks=None, Tensor? ks_tensor=None, bool round_scale=False) "
        "-> (Tensor, Tensor)");
  // x [..., 2I] = [gate | up] -> per_token_cast_to_fp8(silu(gate) * up) in one pass: fp8 [..., I] and
  // scales [..., I/128]. masked_m [G] (x [G, M, 2I]): only rows < masked_m[g] are written.
  m.def("silu_and_mul_cast_to_fp8(Tensor x, Tensor? masked_m=None, bool round_scale=False) -> (Tensor, Tensor)");
  // The same activation without the cast: [..., I] in x's dtype (bf16 experts), any I.
  m.def("silu_and_mul(Tensor x, Tensor? masked_m=None) -> Tensor");
  m.def("_sm90_per_token_cast_to_fp8(Tensor x, Tensor(a!) x_fp8, Tensor(b!) x_scale, bool round_scale) -> ()");
  m.def("_sm90_per_block_cast_to_fp8(Tensor w, Tensor(a!) w_fp8, Tensor(b!) w_scale, bool round_scale) -> ()");

  // ---- MLA decode (API.md section 1) ----
  m.set_python_module("dskernels.ops.mla");
  // SymInt: under torch.compile(dynamic=True) the row count (s_q * h_q) stays symbolic, so a new s_q
  // does not recompile.
  m.def("get_mla_metadata(Tensor cache_seqlens, SymInt num_q_tokens_per_head_k, SymInt num_heads_k) "
        "-> (Tensor, Tensor)");
  m.def("flash_mla_with_kvcache(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
        "int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float? softmax_scale=None, "
        "bool causal=False, Tensor? k_scale=None) -> (Tensor, Tensor)");
  // Raw sm90 kernels (csrc/mla/): d = 576, dv = 512, bf16/fp16 q, 16-byte aligned rows of q and
  // k_cache; the metadata's shape (num_parts) is chosen by the caller.
  m.def("_sm90_get_mla_metadata(Tensor cache_seqlens, Tensor(a!) tile_scheduler_metadata, "
        "Tensor(b!) num_splits) -> ()");
  m.def("_sm90_flash_mla_with_kvcache(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
        "Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, Tensor? k_scale, "
        "Tensor(a!) out, Tensor(b!) lse) -> ()");

  m.set_python_module("dskernels.ops.mla_sparse");
  // Sparse MLA (DeepSeek-V3.2's DSA; FlashMLA's sparse decode and flash_mla_sparse_fwd): each
  // query token attends to its own top-k cached tokens, named by indices into the flat cache.
  m.def("flash_mla_sparse_decode(Tensor q, Tensor k_cache, Tensor indices, int head_dim_v, "
        "float? softmax_scale=None, bool is_fp8_kvcache=False, Tensor? topk_length=None, "
        "Tensor? attn_sink=None) -> (Tensor, Tensor)");
  m.def("flash_mla_sparse_fwd(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v=512, "
        "Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor, Tensor, Tensor)");

  // ---- FP8 GEMMs (API.md section 2) ----
  m.set_python_module("dskernels.ops.gemm");
  // out[m, n] (bf16) = dequant(a, sa) @ dequant(b, sb).T; (a, sa) and (b, sb) are the API's tuples.
  m.def("gemm_fp8_fp8_bf16_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out) -> ()");
  // DeepGEMM's general dense form, D = C + A @ B.T: out bf16 or fp32, sb per 128x128 block or per
  // row of b (1x128, recipe (1, 1, 128): both operands activations, as in a weight gradient);
  // accumulate adds to out's values (the public fp8_gemm_nt copies c there first).
  m.def("fp8_gemm_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out, bool accumulate=False) -> ()");
  // fp8_gemm_nt per batch (fp8_einsum): a [B, m, k], b [B, n, k], out [B, m, n], sb per 128x128
  // block or per row of each b[g]; any strides.
  m.def("fp8_bmm_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out, bool accumulate=False) -> ()");
  // m_indices: one group id per row (-1: none), or with use_psum_layout DeepGEMM's [G] cumulative
  // row ends (group g owns rows align(ends[g-1], 128) .. ends[g] - 1). ensure_zero_padding: rows in
  // no group are written as zeros; expected_m: rows per group, a tuning hint (0: unknown).
  m.def("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(Tensor a, Tensor sa, Tensor b, Tensor sb, "
        "Tensor(a!) out, Tensor m_indices, bool use_psum_layout=False, bool ensure_zero_padding=False, "
        "SymInt expected_m=0) -> ()");
  // SymInt expected_m: a hint computed from a batch size stays symbolic under torch.compile.
  m.def("m_grouped_gemm_fp8_fp8_bf16_nt_masked(Tensor a, Tensor sa, Tensor b, Tensor sb, "
        "Tensor(a!) out, Tensor masked_m, SymInt expected_m) -> ()");
  // K-grouped (MoE weight gradients): out[g] (+)= A_g @ B_g.T over group g's ks[g] tokens, 1x128
  // scales on both operands (sa [sum(ceil(ks / 128)), m], sb likewise with n). k_major: a and b
  // hold each group's [m, k_g] / [n, k_g] row-major one after another (DeepGEMM's "nt"); else
  // they are [tokens, m] / [tokens, n] (its "tn"). ks_tensor: ks on out's device (int32), or None.
  m.def("k_grouped_fp8_gemm(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out, SymInt[] ks, "
        "Tensor? ks_tensor, bool k_major, bool accumulate) -> ()");
  // Raw sm90 kernels (csrc/gemm/): sa column-major ([.., m, k/128] with unit row stride; the dense
  // kernel also needs DeepGEMM's TMA alignment), sb with unit stride along the n blocks, a, b and
  // out with 16-byte aligned rows. dskernels/ops/gemm.py converts and checks before calling.
  // batch_invariant: dskernels.batch_invariant's mode, one config for every m (no stream-K or split-K).
  m.def("_sm90_gemm_fp8_fp8_bf16_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out, "
        "bool batch_invariant=False) -> ()");
  m.def("_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(Tensor a, Tensor sa, Tensor b, Tensor sb, "
        "Tensor(a!) out, Tensor m_indices) -> ()");
  m.def("_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_masked(Tensor a, Tensor sa, Tensor b, Tensor sb, "
        "Tensor(a!) out, Tensor masked_m, int expected_m) -> ()");
  // The config the dense kernel runs for (m, n, k) on sm_count SMs: "m64", "m128",
  // "m128_multicast", "m128_streamk" or "m64_splitk" (with _sm90_gemm_dense_splits runs of K, used
  // when that config runs); the grouped kernels' for rows_per_group (masked: expected_m;
  // <= 0: unknown, as contiguous), n and sm_count: "m64", "m128" or "m128_multicast". When set,
  // DSKERNELS_GEMM_DENSE_CONFIG / DSKERNELS_GEMM_GROUPED_CONFIG win (docs/gemm.md, "Configs").
  m.def("_sm90_gemm_dense_config(int m, int n, int k, int sm_count, bool batch_invariant=False) -> str");
  m.def("_sm90_gemm_dense_splits(int m, int n, int k, int sm_count) -> int");
  m.def("_sm90_gemm_grouped_config(int rows_per_group, int n, int sm_count) -> str");
  // The order the grouped kernels walk a group's tiles for rows_per_group (masked: expected_m;
  // contiguous: rows / groups) and n: "along_m" or "along_n" (DSKERNELS_GEMM_GROUPED_RASTER wins).
  m.def("_sm90_gemm_grouped_raster(int rows_per_group, int n) -> str");
  // The SMs the sm90 GEMMs' persistent grids may use from now on (0: all); dskernels.set_num_sms.
  m.def("_sm90_gemm_set_num_sms(int num_sms) -> ()");

  // ---- DeepGEMM's bf16 grouped GEMMs (no scales; the dense ones are cuBLAS's, through torch) ----
  m.set_python_module("dskernels.ops.gemm_bf16");
  // out[i] (bf16) = a[i] @ b[g].T for the rows i of group g; b [G, n, k] in any strides (the "nn"
  // form passes b [G, k, n] transposed). grouped_layout and the flags as in the FP8 contiguous op.
  m.def("m_grouped_bf16_gemm_nt_contiguous(Tensor a, Tensor b, Tensor(a!) out, Tensor grouped_layout, "
        "bool use_psum_layout=False, bool ensure_zero_padding=False, SymInt expected_m=0) -> ()");
  m.def("m_grouped_bf16_gemm_nt_masked(Tensor a, Tensor b, Tensor(a!) out, Tensor masked_m, "
        "SymInt expected_m) -> ()");
  // out[g] (fp32 or bf16) (+)= a[tokens of g].T @ b[tokens of g]: a [tokens, m], b [tokens, n].
  m.def("k_grouped_bf16_gemm_tn_contiguous(Tensor a, Tensor b, Tensor(a!) out, SymInt[] ks, "
        "Tensor? ks_tensor=None, bool accumulate=False) -> ()");

  // ---- DeepSeek-V3.2's indexer logits (DeepGEMM's fp8_mqa_logits / fp8_paged_mqa_logits) ----
  m.set_python_module("dskernels.ops.indexer");
  // logits[i, t] = sum_h weights[i, h] * relu(q[i, h] . k[t] * k_scale[t]), -inf for unseen keys.
  m.def("fp8_mqa_logits(Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor cu_seqlen_ks, "
        "Tensor cu_seqlen_ke, bool clean_logits=True, SymInt max_seqlen_k=0) -> Tensor");
  m.def("fp8_paged_mqa_logits(Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, "
        "Tensor block_table, SymInt max_context_len, bool clean_logits=False) -> Tensor");

  // ---- DeepSeek-V3's router after its gate GEMM (one kernel for the ~15 torch ops) ----
  m.set_python_module("dskernels.ops.moe");
  // logits [T, E] -> (topk_idx int64 [T, topk], topk_weights fp32 [T, topk]): sigmoid scores,
  // selection on scores + bias within the topk_groups best of num_groups groups (each scored by
  // its two best), weights = the chosen scores (normalized to sum 1 if renormalize) * scaling_factor.
  m.def("grouped_topk(Tensor logits, Tensor bias, int num_groups, int topk_groups, int topk, "
        "bool renormalize=True, float scaling_factor=1.0) -> (Tensor, Tensor)");

  // ---- Expert-parallel dispatch/combine (API.md section 3) ----
  m.set_python_module("dskernels.ops.ep");
  m.def("ep_get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor)");
  m.def("_sm90_ep_get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, "
        "Tensor(a!) num_tokens_per_rank, Tensor(b!) num_tokens_per_expert, Tensor(c!) is_token_in_rank) -> ()");

  // ---- Pipeline schedules (API.md section 4) ----
  m.set_python_module("dskernels.ops.pipeline");
  // kind: "dualpipe" | "dualpipev" | "1f1b" | "zb1p"; returns int32 [A, 6] rows
  // (rank, kind, stage, mb, stage2, mb2), layout documented in csrc/pipeline/schedule.cpp.
  m.def("dualpipe_schedule(str kind, int P, int N) -> Tensor");

  // ---- Build information ----
  m.set_python_module("dskernels.ops");
  // "cuda" when the Hopper kernels were compiled into this build, "cpu" otherwise.
  m.def("_build_info() -> str", []() -> std::string {
#ifdef DSKERNELS_WITH_CUDA
    return "cuda";
#else
    return "cpu";
#endif
  });
  // The torch this build was compiled against, "major.minor.patch": dskernels/__init__.py refuses
  // to load under another major.minor (the C++ ABI differs between releases, and an isolated
  // `pip install .` compiles against whatever torch the index has).
  m.def("_built_torch_version() -> str", []() -> std::string {
    return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
           std::to_string(TORCH_VERSION_PATCH);
  });
}
