"""One small call of every CUDA-backed op, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py

Odd sizes on purpose (tails of vectors and blocks). Families add their ops to CASES.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The Triton GEMMs' autotuning would time 7 candidates per shape under the sanitizer: minutes.
os.environ.setdefault("DSKERNELS_GEMM_AUTOTUNE", "0")

import torch  # noqa: E402

import dskernels  # noqa: E402


def checked(label):
    """Waits for the launches so far and names them: a tool's report printed above this line
    belongs to them (the sanitizers report no kernel names for CUTLASS's inlined collectives)."""
    torch.cuda.synchronize()
    print(f"  checked {label}", flush=True)


def fp8_casts():
    x = torch.randn(61, 384, device="cuda", dtype=torch.bfloat16)
    dskernels.per_token_cast_to_fp8(x)
    dskernels.per_block_cast_to_fp8(torch.randn(130, 256, device="cuda"))


# The sm90 GEMM configs (docs/gemm.md "Configs"): each forced once, so every instantiation is checked.
DENSE_CONFIGS = ("m64", "m128", "m128_multicast", "m128_streamk")  # m64_splitk: gemm_split_k, last
GROUPED_CONFIGS = ("m64", "m128", "m128_multicast")


def fp8_gemms():
    """Dense, contiguous and masked grouped GEMMs (the sm90 CUDA kernels under the cuda backend),
    each config forced in turn: odd n (padded out buffer; 3 N tiles, so a multicast cluster's last
    CTA has no tile), one-row and empty groups, unaligned contiguous segments, and a dense call
    with enough K blocks (8) for stream-K to split tiles between SMs."""
    k, n = 256, 300
    a, sa = dskernels.per_token_cast_to_fp8(torch.randn(61, k, device="cuda"))
    b, sb = dskernels.per_block_cast_to_fp8(torch.randn(n, k, device="cuda"))
    a_long, sa_long = dskernels.per_token_cast_to_fp8(torch.randn(61, 1024, device="cuda"))
    b_long, sb_long = dskernels.per_block_cast_to_fp8(torch.randn(n, 1024, device="cuda"))
    for config in DENSE_CONFIGS:
        os.environ["DSKERNELS_GEMM_DENSE_CONFIG"] = config
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), torch.empty(61, n, device="cuda", dtype=torch.bfloat16))
        dskernels.gemm_fp8_fp8_bf16_nt((a_long, sa_long), (b_long, sb_long),
                                       torch.empty(61, n, device="cuda", dtype=torch.bfloat16))
        checked(f"dense gemm, config {config}")
    os.environ.pop("DSKERNELS_GEMM_DENSE_CONFIG")
    for config in GROUPED_CONFIGS:
        os.environ["DSKERNELS_GEMM_GROUPED_CONFIG"] = config
        grouped_gemms(a, sa, b, sb, k, n)
        checked(f"grouped gemms, config {config}")
    os.environ.pop("DSKERNELS_GEMM_GROUPED_CONFIG")


def grouped_gemms(a, sa, b, sb, k, n):
    bb, sbb = torch.stack([b, b, b]), torch.stack([sb, sb, sb])
    m_indices = torch.tensor([2] * 30 + [-1] * 3 + [0] * 27 + [-1], dtype=torch.int32, device="cuda")
    out = torch.empty(61, n, device="cuda", dtype=torch.bfloat16)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (bb, sbb), out, m_indices)
    a3, sa3 = a[:60].reshape(3, 20, k), sa[:60].reshape(3, 20, k // 128)
    masked_m = torch.tensor([20, 0, 1], dtype=torch.int32, device="cuda")
    out3 = torch.empty(3, 20, n, device="cuda", dtype=torch.bfloat16)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3, sa3), (bb, sbb), out3, masked_m, 8)


def split_k_and_einsum():
    """Triton only (no CUDA kernel for the split or the general forms): the dense kernel split along
    K into uneven ranges (9 K blocks over 2 ranges per tile, the fp32 accumulating form with per-row
    scales too), and fp8_einsum's general form on the masked kernel (MLA's weight gradient: per-row
    scales, fp32 adding, operands copied K-major)."""
    if dskernels.current_backend() != "triton":
        return
    a9, sa9 = dskernels.per_token_cast_to_fp8(torch.randn(61, 9 * 128, device="cuda"))
    b9, sb9 = dskernels.per_block_cast_to_fp8(torch.randn(300, 9 * 128, device="cuda"))
    dskernels.fp8_gemm_nt((a9, sa9), (b9, sb9), torch.empty(61, 300, device="cuda", dtype=torch.bfloat16))
    rows9, srows9 = dskernels.per_token_cast_to_fp8(torch.randn(300, 9 * 128, device="cuda"))
    grad = torch.zeros(61, 300, device="cuda")
    dskernels.fp8_gemm_nt((a9, sa9), (rows9, srows9), grad, c=grad)
    x, sx = dskernels.per_channel_cast_to_fp8(torch.randn(256, 3 * 40, device="cuda", dtype=torch.bfloat16))
    y, sy = dskernels.per_channel_cast_to_fp8(torch.randn(256, 3 * 70, device="cuda", dtype=torch.bfloat16))
    weight_grad = torch.zeros(3, 40, 70, device="cuda")
    dskernels.fp8_einsum("bhd,bhr->hdr", (x.view(256, 3, 40), sx.view(2, 3, 40)),
                         (y.view(256, 3, 70), sy.view(2, 3, 70)), weight_grad, c=weight_grad, recipe=(1, 1, 128))


def mla_decode():
    """V3-shaped decode (d = 576, dv = 512): a TMA-path cache (page 64, a partial last block, an
    empty sequence), an fp8 cache with odd pages (register path), causal MTP rows over two tiles;
    the TMA case once more with the opt-in 2-CTA clusters."""
    b, s_q, h_q = 3, 3, 24  # 72 rows: two 64-row tiles, the second nearly empty
    lens = torch.tensor([130, 0, 70], dtype=torch.int32, device="cuda")
    q = torch.randn(b, s_q, h_q, 576, device="cuda", dtype=torch.bfloat16)
    for page, dtype in ((64, torch.bfloat16), (61, torch.float8_e4m3fn)):
        pages = -(-130 // page)
        block_table = torch.arange(b * pages, dtype=torch.int32, device="cuda").reshape(b, pages)
        k_cache = torch.randn(b * pages, page, 1, 576, device="cuda").to(dtype)
        k_scale = torch.ones(1, device="cuda") if dtype == torch.float8_e4m3fn else None
        meta, splits = dskernels.get_mla_metadata(lens, s_q * h_q, 1)
        dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits, causal=True,
                                         k_scale=k_scale)
        if page == 64:
            os.environ["DSKERNELS_MLA_CLUSTER"] = "1"
            dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits, causal=True)
            os.environ.pop("DSKERNELS_MLA_CLUSTER")


def deepseek_v32():
    """DeepSeek-V3.2's Triton kernels (no CUDA kernel: skipped under the cuda backend): sparse decode
    over the FP8 cache with padded pages, lists holding -1 and ids past the cache, lengths, a sink
    and a split list; the paged indexer logits with 2-d lengths and a table shorter than them."""
    if dskernels.current_backend() == "cuda":
        return
    padded = torch.zeros(5, 65, 1, 656, device="cuda", dtype=torch.float8_e4m3fn)
    padded[:, :64] = dskernels.quantize_sparse_kv_cache(torch.randn(5, 64, 1, 576, device="cuda"))
    q = torch.randn(2, 2, 24, 576, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(-1, 5 * 64 + 9, (2, 2, 300), dtype=torch.int32, device="cuda")
    dskernels.flash_mla_sparse_decode(q, padded[:, :64], indices, 512, is_fp8_kvcache=True,
                                      topk_length=torch.tensor([300, 77], dtype=torch.int32, device="cuda"),
                                      attn_sink=torch.randn(24, device="cuda"))
    cache = dskernels.paged_k_cache_cast_to_fp8(torch.randn(9, 64, 1, 128, device="cuda"))
    q8 = torch.randn(3, 2, 64, 128, device="cuda").to(torch.float8_e4m3fn)
    lens = torch.tensor([[100, 130], [0, 1], [60, 200]], dtype=torch.int32, device="cuda")
    table = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32, device="cuda")
    dskernels.fp8_paged_mqa_logits(q8, cache, torch.randn(6, 64, device="cuda"), lens, table, None, 250, True)


def gemm_split_k():
    """The dense GEMM's split-K config forced: 2 runs of K (61 x 300 x 1024: a 64-row tile past m),
    7 (64 x 2112 x 7168), and 4 at n = 123 (the sum kernel's row tails of 1..3 columns, read one by
    one: the partials' padding is never written)."""
    os.environ["DSKERNELS_GEMM_DENSE_CONFIG"] = "m64_splitk"
    try:
        for m, n, k in ((61, 300, 1024), (64, 2112, 7168), (5, 123, 2048)):
            a, sa = dskernels.per_token_cast_to_fp8(torch.randn(m, k, device="cuda"))
            b, sb = dskernels.per_block_cast_to_fp8(torch.randn(n, k, device="cuda"))
            dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
    finally:
        os.environ.pop("DSKERNELS_GEMM_DENSE_CONFIG")


def mla_fp8_tma():
    """The sm90 MLA decode's opt-in fp8 TMA path (raw blocks widened in place): one sequence of
    several whole blocks (each stage used more than once: its kv_raw barrier's phase flips), one
    with a partial last block, an empty one; two row tiles."""
    lens = torch.tensor([700, 0, 130], dtype=torch.int32, device="cuda")
    q = torch.randn(3, 2, 48, 576, device="cuda", dtype=torch.bfloat16)
    block_table = torch.arange(3 * 11, dtype=torch.int32, device="cuda").reshape(3, 11)
    k_cache = torch.randn(3 * 11, 64, 1, 576, device="cuda").to(torch.float8_e4m3fn)
    meta, splits = dskernels.get_mla_metadata(lens, 2 * 48, 1)
    os.environ["DSKERNELS_MLA_FP8_TMA"] = os.environ["DSKERNELS_MLA_REQUIRE_TMA"] = "1"
    try:
        dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits, causal=True,
                                         k_scale=torch.ones(1, device="cuda"))
    finally:
        os.environ.pop("DSKERNELS_MLA_FP8_TMA")
        os.environ.pop("DSKERNELS_MLA_REQUIRE_TMA")


def mla_seesaw():
    """The sm90 MLA decode's opt-in seesaw consumers: even and odd block counts (a pair without y),
    one block, an empty sequence; two row tiles, causal MTP rows; the TMA and the register path.
    The device's plan gives these lengths items of one block (no pair); split_plan's 3 partitions
    give items of 7, 4, 3 and 1 blocks (runs of pairs, an item starting on stage 1, a split)."""
    from dskernels.ops import mla as mla_ops

    lens = torch.tensor([700, 0, 130, 64], dtype=torch.int32, device="cuda")
    q = torch.randn(4, 2, 48, 576, device="cuda", dtype=torch.bfloat16)
    plans = (dskernels.get_mla_metadata(lens, 2 * 48, 1), mla_ops.split_plan(lens, 3))
    os.environ["DSKERNELS_MLA_SEESAW"] = "1"
    try:
        for page in (64, 61):
            pages = -(-700 // page)
            block_table = torch.arange(4 * pages, dtype=torch.int32, device="cuda").reshape(4, pages)
            k_cache = torch.randn(4 * pages, page, 1, 576, device="cuda", dtype=torch.bfloat16)
            for meta, splits in plans:
                dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits, causal=True)
    finally:
        os.environ.pop("DSKERNELS_MLA_SEESAW")


def mla_narrow():
    """The sm90 MLA decode's opt-in narrow kernel: N = 16 (16 heads, one token) and N = 32 (causal MTP
    rows, two kv heads of 16); one, two and three blocks per sequence (the groups take alternate
    blocks), an empty sequence, a split one; the TMA and the register path. The device's plan gives
    items of one block (one group works); split_plan's 3 partitions give items of 7, 4, 3 and 1
    blocks, where both groups take turns within an item."""
    from dskernels.ops import mla as mla_ops

    lens = torch.tensor([700, 0, 130, 64], dtype=torch.int32, device="cuda")
    os.environ["DSKERNELS_MLA_NARROW"] = "1"
    try:
        for s_q, h_q, h_kv, causal in ((1, 16, 1, False), (2, 32, 2, True)):
            q = torch.randn(4, s_q, h_q, 576, device="cuda", dtype=torch.bfloat16)
            plans = (dskernels.get_mla_metadata(lens, s_q * h_q // h_kv, h_kv), mla_ops.split_plan(lens, 3))
            for page in (64, 61):
                pages = -(-700 // page)
                block_table = torch.arange(4 * pages, dtype=torch.int32, device="cuda").reshape(4, pages)
                k_cache = torch.randn(4 * pages, page, h_kv, 576, device="cuda", dtype=torch.bfloat16)
                for meta, splits in plans:
                    dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits,
                                                     causal=causal)
    finally:
        os.environ.pop("DSKERNELS_MLA_NARROW")


CASES = [fp8_casts, fp8_gemms, split_k_and_einsum, mla_decode, deepseek_v32]

if __name__ == "__main__":
    for backend in [b for b in ("cuda", "triton") if b in dskernels.available_backends()]:
        with dskernels.backend(backend):
            for case in CASES:
                case()
                torch.cuda.synchronize()
                print(f"ran {case.__name__} on {backend}", flush=True)
    # Last, and each only once its tests passed in this device call (scripts/gpu_check.sh): a path
    # never run before may trap, and must not take the other cases with it.
    for case, tested in ((gemm_split_k, "DSKERNELS_GEMM_SPLITK_TESTED"), (mla_fp8_tma, "DSKERNELS_MLA_FP8_TMA_TESTED"),
                         (mla_seesaw, "DSKERNELS_MLA_SEESAW_TESTED"), (mla_narrow, "DSKERNELS_MLA_NARROW_TESTED")):
        if "cuda" in dskernels.available_backends() and os.environ.get(tested) == "1":
            with dskernels.backend("cuda"):
                case()
                torch.cuda.synchronize()
                print(f"ran {case.__name__} on cuda", flush=True)
