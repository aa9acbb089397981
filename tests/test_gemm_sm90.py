"""The sm90 CUDA FP8 GEMMs (csrc/gemm/, issue 9): every variant under dskernels.backend("cuda")
against python_ref.gemm with tests/test_gemm.py's bounds (GPU), plus the registration, the `auto`
gate and the Python layer's layout conversions (CPU)."""

import pytest
import torch

import dskernels
from dskernels import _backend
from dskernels.ops import gemm as gemm_ops
from test_gemm import (FP8_NAN, assert_close_to_bf16_product, assert_close_to_oracle, contiguous_layout,
                       empty_out, grouped_weights, poison_rows, quantized_pair, run_contiguous_against_oracle)

RAW_OPS = {
    "_sm90_gemm_fp8_fp8_bf16_nt": "Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out",
    "_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": "Tensor(a!) out, Tensor m_indices",
    "_sm90_m_grouped_gemm_fp8_fp8_bf16_nt_masked": "Tensor(a!) out, Tensor masked_m, int expected_m",
}
PUBLIC_OPS = ["gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
              "m_grouped_gemm_fp8_fp8_bf16_nt_masked"]
# The dense kernel's configs (fp8_gemm::DenseConfig, docs/gemm.md "Configs"), forced one at a time
# through DSKERNELS_GEMM_DENSE_CONFIG; "auto" is the selection rule.
# m64_splitk (never yet run on a GPU) has its own file, tests/test_gemm_sm90_splitk.py: a fault there
# must not end this file's CUDA context and take the other configs' results (and benchmarks) with it.
DENSE_CONFIGS = ["auto", "m64", "m128", "m128_multicast", "m128_streamk"]
GROUPED_CONFIGS = ["auto", "m64", "m128", "m128_multicast"]  # DSKERNELS_GEMM_GROUPED_CONFIG
cuda_built = pytest.mark.skipif(torch.ops.dskernels._build_info() != "cuda",
                                reason="the CUDA kernels are not compiled into this build")


# ---- CPU: registration, gate, layouts ----

@pytest.mark.parametrize("name", sorted(RAW_OPS))
def test_raw_op_schema(name):
    schema = str(getattr(torch.ops.dskernels, name).default._schema)
    assert schema.startswith(f"dskernels::{name}(") and schema.endswith("-> ()"), schema
    assert RAW_OPS[name] in schema, schema


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_auto_does_not_pick_the_unverified_cuda_kernels(op, monkeypatch):
    """On a Hopper GPU with the kernels built, `auto` stays on Triton until _CUDA_GEMM_VERIFIED
    flips; a forced "cuda" runs them (that is how the GPU tests below reach them)."""
    monkeypatch.setattr(_backend, "cuda_kernels_built", lambda: True)
    monkeypatch.setattr(_backend, "is_hopper", lambda device: True)
    monkeypatch.setattr(_backend, "triton_installed", lambda: True)
    hopper = torch.device("cuda", 0)
    with dskernels.backend("auto"):
        assert gemm_ops._backend(op, hopper) == ("cuda" if gemm_ops._CUDA_GEMM_VERIFIED else "triton")
    with dskernels.backend("cuda"):
        assert gemm_ops._backend(op, hopper) == "cuda"
    monkeypatch.setattr(gemm_ops, "_CUDA_GEMM_VERIFIED", False)
    with dskernels.backend("auto"):
        assert gemm_ops._backend(op, hopper) == "triton"


def dense_config(m, n, k, sm_count=132):
    return torch.ops.dskernels._sm90_gemm_dense_config(m, n, k, sm_count)


@cuda_built
def test_dense_config_rule(monkeypatch):
    """pick_dense_config on an H100's 132 SMs (docs/gemm.md "Configs"): 64-row tiles for m <= 64,
    then stream-K where the data-parallel grid idles more than 10% of the SM time and K has >= 8
    blocks, then 1 x 2 multicast clusters for an even count of N tiles, plain 128-row tiles."""
    monkeypatch.delenv("DSKERNELS_GEMM_DENSE_CONFIG", raising=False)
    assert dense_config(4096, 7168, 7168) == "m128_multicast"  # 1792 tiles: 13.6 of 14 waves
    assert dense_config(4096, 4096, 7168) == "m128_multicast"  # 1024 tiles: 7.8 of 8 waves
    assert dense_config(4096, 2112, 7168) == "m128_streamk"    # 544 tiles: 4.1 of 5 waves
    assert dense_config(4096, 4224, 7168) == "m128"            # 1056 tiles (8 waves), 33 N tiles
    assert dense_config(64, 7168, 7168) == "m64"               # 56 tiles on 132 SMs, yet m64
    assert dense_config(65, 7168, 7168) == "m128_streamk"      # 56 tiles on 132 SMs
    assert dense_config(64, 7168, 896) == "m64"                # 7 K blocks: too short to split
    assert dense_config(1, 32768, 512) == "m64"                # 256 tiles: 1.9 of 2 waves
    assert dense_config(128, 24576, 1536) == "m128_streamk"    # 192 tiles: 1.45 of 2 waves
    assert dense_config(4096, 32768, 512) == "m128_multicast"  # 8192 tiles: 62.1 of 63 waves
    assert dense_config(4096, 7168, 7168, sm_count=114) == "m128_multicast"  # H100 PCIe: 15.7 of 16
    assert dense_config(4096, 4096, 512, sm_count=1) == "m128"  # set_num_sms(1): no 2-CTA cluster fits
    # forced: any valid name wins over the rule; anything else is an error naming the variable
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", "m64")
    assert dense_config(4096, 7168, 7168) == "m64"
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", "auto")
    assert dense_config(64, 7168, 896) == "m64"
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", "m256")
    with pytest.raises(RuntimeError, match="DSKERNELS_GEMM_DENSE_CONFIG: expected one of auto, m64, m128, "
                                           "m128_multicast, m128_streamk, m64_splitk, got 'm256'"):
        dense_config(4096, 7168, 7168)


@cuda_built
def test_dense_split_count_rule():
    """fp8_gemm::dense_splits (the m64_splitk config): the most equal runs of >= 4 K blocks, at most
    16, whose 64 x 128 tiles fit in one wave of the SMs; 1 where none does."""
    def splits(m, n, k, sm_count=132):
        return torch.ops.dskernels._sm90_gemm_dense_splits(m, n, k, sm_count)

    assert splits(64, 2112, 7168) == 7    # 17 tiles, 56 K blocks: 7 runs of 8 (119 CTAs)
    assert splits(1, 576, 7168) == 14     # kv_a: 5 tiles, runs of 4 (70 CTAs)
    assert splits(1, 1536, 7168) == 8     # q_a: 12 tiles (96 CTAs)
    assert splits(1, 7168, 16384) == 2    # o_proj: 56 tiles (112 CTAs)
    assert splits(1, 24576, 1536) == 1    # q_b: 192 tiles, more than one wave already
    assert splits(65, 2112, 7168) == 2    # two row tiles: 34 tiles
    assert splits(1, 128, 8 * 128) == 2   # runs of at least 4 K blocks
    assert splits(1, 128, 7 * 128) == 1   # 7 K blocks: no equal runs of 4
    assert splits(1, 128, 1024 * 128) == 16  # at most 16
    assert splits(64, 2112, 7168, sm_count=16) == 1  # set_num_sms: 17 tiles already fill 16 SMs
    assert splits(64, 2112, 0) == splits(0, 2112, 7168) == 1  # nothing to split (never run)
    with pytest.raises(RuntimeError, match="_sm90_gemm_dense_splits: expected m, n, k >= 0"):
        splits(-1, 2112, 7168)


@cuda_built
def test_grouped_config_rule(monkeypatch):
    """pick_grouped_config: 64-row tiles for 1..64 expected rows per group (masked expected_m),
    else multicast clusters for an even count of N tiles, else plain 128-row tiles; rows <= 0
    (unknown, as for contiguous calls) never pick the 64-row tiles."""
    monkeypatch.delenv("DSKERNELS_GEMM_GROUPED_CONFIG", raising=False)
    def config(rows, n, sm_count=132):
        return torch.ops.dskernels._sm90_gemm_grouped_config(rows, n, sm_count)

    assert config(1, 4096) == config(64, 7168) == "m64"
    assert config(65, 4096) == config(0, 7168) == config(-1, 4096) == "m128_multicast"
    assert config(256, 2112) == config(0, 2112) == "m128"  # 17 N tiles
    assert config(256, 4096, sm_count=1) == "m128"  # set_num_sms(1): no room for a 2-CTA cluster
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_CONFIG", "m128")
    assert config(1, 4096) == "m128"
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_CONFIG", "m128_streamk")
    with pytest.raises(RuntimeError, match="DSKERNELS_GEMM_GROUPED_CONFIG: expected one of auto, m64, m128, "
                                           "m128_multicast, got 'm128_streamk'"):
        config(1, 4096)


@cuda_built
def test_grouped_raster_rule(monkeypatch):
    """pick_grouped_raster: along M (CUTLASS's default) until the order along N has run on a GPU
    (kGroupedRasterMeasured; tests/test_gemm_sm90_raster.py), whatever the shape; the variable
    forces either, and a misspelt value names the choices."""
    monkeypatch.delenv("DSKERNELS_GEMM_GROUPED_RASTER", raising=False)
    def raster(rows, n):
        return torch.ops.dskernels._sm90_gemm_grouped_raster(rows, n)

    assert raster(8192, 4096) == raster(256, 4096) == raster(0, 7168) == "along_m"
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_RASTER", "along_n")
    assert raster(1, 4096) == "along_n"
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_RASTER", "auto")
    assert raster(8192, 4096) == "along_m"
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_RASTER", "n")
    with pytest.raises(RuntimeError, match="DSKERNELS_GEMM_GROUPED_RASTER: expected one of auto, along_m, along_n, "
                                           "got 'n'"):
        raster(8192, 4096)


@pytest.fixture
def restore_num_sms():
    yield
    dskernels.set_num_sms(None)


def test_set_num_sms(restore_num_sms):
    """DeepGEMM's knob: a positive int limits the sm90 GEMMs' SMs, None gives them all back;
    anything else is refused by name."""
    for bad in (0, -3):
        with pytest.raises(ValueError, match="^num_sms: expected an int >= 1"):
            dskernels.set_num_sms(bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="^num_sms: expected an int"):
            dskernels.set_num_sms(bad)
    dskernels.set_num_sms(17)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).multi_processor_count
        assert dskernels.get_num_sms() == min(17, total)
        dskernels.set_num_sms(None)
        assert dskernels.get_num_sms() == total
    else:
        assert dskernels.get_num_sms() == 17
        dskernels.set_num_sms(None)
        assert dskernels.get_num_sms() == 8  # the count the CPU paths plan with


@cuda_built
def test_raw_set_num_sms_rejects_negative_counts():
    with pytest.raises(RuntimeError, match="num_sms: expected a positive count"):
        torch.ops.dskernels._sm90_gemm_set_num_sms(-1)
    torch.ops.dskernels._sm90_gemm_set_num_sms(0)  # all SMs


def test_cuda_layout_conversions():
    """What the Python layer hands the kernels: column-major TMA-aligned sa, sb with unit stride
    along the n blocks, a padded out buffer where out's rows are not 16-byte aligned."""
    sa = torch.randn(130, 3)
    col = gemm_ops._cuda_sa(sa)
    assert col.stride() == (1, 132) and torch.equal(col, sa)
    assert gemm_ops._cuda_sa(col) is col
    sa3 = torch.randn(2, 5, 2)
    assert gemm_ops._cuda_sa(sa3).stride() == (16, 1, 8)

    sb = torch.randn(3, 4)
    t = gemm_ops._cuda_sb(sb)
    assert t.stride() == (1, 3) and torch.equal(t, sb)
    assert gemm_ops._cuda_sb(t) is t
    one_block = torch.randn(1, 4)
    assert gemm_ops._cuda_sb(one_block) is one_block
    sb3 = torch.randn(2, 3, 4)
    assert gemm_ops._cuda_sb(sb3).stride()[1:] == (1, 3)
    # unit stride along the blocks but a padded K-block stride: the grouped collective reads each
    # group's sb packed (K-block stride ceil(n / 128)), so this is copied too
    padded = torch.randn(4, 5).t()[:3]
    assert padded.stride() == (1, 5)
    packed = gemm_ops._cuda_sb(padded)
    assert packed.stride() == (1, 3) and torch.equal(packed, padded)

    out = torch.empty(5, 16, dtype=torch.bfloat16)
    assert gemm_ops._cuda_out(out) == (out, False)
    odd = torch.empty(5, 129, dtype=torch.bfloat16)
    target, copy_back = gemm_ops._cuda_out(odd)
    assert copy_back and target.shape == (5, 129) and target.stride() == (136, 1)
    odd3 = torch.randn(2, 3, 13).to(torch.bfloat16)
    target3, copy_back3 = gemm_ops._cuda_out(odd3)
    assert copy_back3 and target3.stride() == (48, 16, 1)
    # out's values come along: rows the GEMM leaves alone (masked, -1 padding) are copied back as they were
    assert torch.equal(target3, odd3)

    a = torch.empty(4, 384, dtype=torch.uint8)[:, 8:264]  # rows 8 bytes off 16-byte alignment
    assert not gemm_ops._tma_ready(a)
    assert gemm_ops._cuda_operand(a).is_contiguous()
    shifted = torch.arange(4 * 256 + 16, dtype=torch.uint8)[8:8 + 4 * 256].view(4, 256)  # contiguous, base 8 bytes off
    assert shifted.is_contiguous() and not gemm_ops._tma_ready(shifted)
    moved = gemm_ops._cuda_operand(shifted)
    assert gemm_ops._tma_ready(moved) and torch.equal(moved, shifted)
    # rows that overlap (an expanded row, or a row stride shorter than a row) are copied as well
    row = torch.arange(256, dtype=torch.uint8)
    for t in (row.expand(4, 256), torch.arange(8 * 256, dtype=torch.uint8).as_strided((4, 256), (128, 1)),
              row.view(1, 1, 256).expand(3, 2, 256)):
        assert not gemm_ops._tma_ready(t)
        copied = gemm_ops._cuda_operand(t)
        assert gemm_ops._tma_ready(copied) and torch.equal(copied, t)
    assert gemm_ops._tma_ready(torch.empty(3, 2, 256, dtype=torch.uint8))
    assert gemm_ops._tma_ready(torch.empty(256, 4, 128, dtype=torch.uint8).transpose(0, 1))  # groups inside rows
    assert gemm_ops._tma_ready(torch.empty(3, 4, 384, dtype=torch.uint8)[:, :, :256])


# ---- GPU: every variant on the cuda backend ----

@pytest.fixture
def cuda_backend():
    if "cuda" not in dskernels.available_backends():
        pytest.skip(f"the sm90 CUDA kernels are not available here ({dskernels.available_backends()})")
    with dskernels.backend("cuda"):
        yield "cuda"


@pytest.fixture(params=DENSE_CONFIGS)
def dense_config_forced(request, monkeypatch):
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", request.param)
    return request.param


# Every dense config on every shape (dense_config_forced): the m values meet a tile edge (m = 64,
# 128), partial last tiles (63, 65, 130) and single rows; n gives one, odd and even counts of N
# tiles (the multicast clusters' last column idles for an odd count); k one to eight K blocks.
@pytest.mark.gpu
@pytest.mark.parametrize("scale_layout", ["row", "tma"])
@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (1, 123, 256), (7, 129, 256), (61, 123, 512), (63, 256, 384),
                                   (64, 200, 256), (65, 200, 256), (128, 136, 256), (130, 200, 256), (130, 64, 128),
                                   (256, 384, 1024)])
def test_dense(cuda_backend, dense_config_forced, m, n, k, scale_layout):
    x, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout=scale_layout)
    w, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout=scale_layout)
    out = empty_out(m, n, device="cuda")
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    assert_close_to_bf16_product([(out, x, w)])


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 7168), (64, 2112, 7168), (65, 2112, 7168), (128, 24576, 1536),
                                   (4096, 7168, 2048), (129, 4096, 7168), (4096, 2112, 7168)])
def test_dense_deepgemm_shapes(cuda_backend, dense_config_forced, m, n, k):
    check_dense_against_oracle(m, n, k)


def check_dense_against_oracle(m, n, k):
    """One dense call with DeepGEMM's layouts (TMA-aligned sa, row-major sb) against both bounds."""
    x, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    w, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    out = empty_out(m, n, device="cuda")
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    assert_close_to_bf16_product([(out, x, w)])


@pytest.mark.gpu
@pytest.mark.parametrize("num_sms", [1, 7])
def test_num_sms_limit(cuda_backend, dense_config_forced, restore_num_sms, num_sms):
    """Persistent grids of 1 or 7 CTAs, fewer than the tiles: every dense config and the grouped
    kernels stay exact. The multicast configs round an odd count down to whole 2-CTA clusters
    (CUTLASS's grid must hold whole clusters) and run one cluster when forced under a limit of 1."""
    dskernels.set_num_sms(num_sms)
    assert dskernels.get_num_sms() == num_sms
    m, n, k = 300, 520, 1024
    x, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    w, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    out = empty_out(m, n, device="cuda")
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    run_contiguous_against_oracle([7, 0, 130, 1], False, "tma", n, 256, "cuda")
    run_masked_against_oracle([7, 0, 130, 1], 130, n, 256, "tma", 32)


@pytest.mark.gpu
def test_dense_strided_views_and_poisoned_padding(cuda_backend):
    """a, b as column slices of NaN-padded buffers; out a slice of a NaN buffer with an odd,
    unaligned row stride (the padded-buffer fallback): nothing outside the views is read or written."""
    m, n, k = 33, 150, 256
    x, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="row")
    w, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    a_wide = torch.full((m, k + 128), FP8_NAN, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    a_wide[:, 64:64 + k] = a
    b_wide = torch.full((n, k + 128), FP8_NAN, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    b_wide[:, :k] = b
    out_wide = empty_out(m, n + 11, device="cuda")
    dskernels.gemm_fp8_fp8_bf16_nt((a_wide[:, 64:64 + k], sa), (b_wide[:, :k], sb), out_wide[:, 5:5 + n])
    assert_close_to_oracle(out_wide[:, 5:5 + n], a, sa, b, sb)
    assert out_wide[:, :5].isnan().all() and out_wide[:, 5 + n:].isnan().all()


@pytest.mark.gpu
def test_dense_raw_op_rejects_bad_layouts(cuda_backend):
    """The raw op's own checks (for callers that skip the Python layer) name the tensor."""
    m, n, k = 8, 64, 256
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="row")
    _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    out = empty_out(m, n, device="cuda")
    raw = torch.ops.dskernels._sm90_gemm_fp8_fp8_bf16_nt
    with pytest.raises(RuntimeError, match="sa: expected unit stride along the rows"):
        raw(a, sa, b, sb, out)
    sa_col = dskernels.get_col_major_tma_aligned_tensor(sa)
    with pytest.raises(RuntimeError, match="out: TMA needs 16-byte aligned strides"):
        raw(a, sa_col, b, sb, empty_out(m, n + 3, device="cuda")[:, :n])
    raw(a, sa_col, b, sb, out)
    assert_close_to_oracle(out, a, sa, b, sb)


@pytest.mark.gpu
def test_raw_ops_reject_an_out_with_overlapping_rows(cuda_backend):
    """check_tma_operand takes a stride of 0 (an expanded row or group) and rows closer than their
    length for 16-byte aligned: the raw ops must refuse such an out by name before launching (the
    persistent CTAs would store several tiles to one address). The public ops refuse it in Python.
    Interleaved layouts that do not overlap (groups inside rows) still run."""
    m, n, k, groups = 8, 64, 256, 2
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    sb = gemm_ops._cuda_sb(sb)
    message = "out: expected every element at its own address"
    expanded = empty_out(1, n, device="cuda").expand(m, n)  # row stride 0
    short_rows = empty_out(m * n, device="cuda").as_strided((m, n), (8, 1))  # rows 8 apart, 64 long
    for out in (expanded, short_rows):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.dskernels._sm90_gemm_fp8_fp8_bf16_nt(a, sa, b, sb, out)
    bg, sbg = b[None].expand(groups, n, k), sb[None].expand(groups, *sb.shape)
    m_indices = torch.tensor([0] * 4 + [1] * 4, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dskernels._sm90_m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, bg, sbg, short_rows, m_indices)
    a3, sa3 = a.view(groups, m // groups, k), sa.view(groups, m // groups, k // 128)
    masked_m = torch.full((groups,), m // groups, dtype=torch.int32, device="cuda")
    raw_masked = torch.ops.dskernels._sm90_m_grouped_gemm_fp8_fp8_bf16_nt_masked
    with pytest.raises(RuntimeError, match=message):
        raw_masked(a3, sa3, bg, sbg, empty_out(1, m // groups, n, device="cuda").expand(groups, -1, -1), masked_m, 4)
    inside_rows = empty_out(m // groups, groups, n, device="cuda").transpose(0, 1)  # strides (n, 2n, 1)
    raw_masked(a3, sa3, bg, sbg, inside_rows, masked_m, 4)
    for g in range(groups):
        assert_close_to_oracle(inside_rows[g], a3[g], sa3[g], b, sb)


@pytest.mark.gpu
def test_k0_is_an_empty_sum(cuda_backend):
    """k = 0 passes the k % 128 check; CUTLASS's mainloop would wait forever for a first K tile."""
    fp8, dev = torch.float8_e4m3fn, "cuda"
    a, sa = torch.empty(5, 0, dtype=fp8, device=dev), torch.empty(5, 0, device=dev)
    b, sb = torch.empty(7, 0, dtype=fp8, device=dev), torch.empty(1, 0, device=dev)
    out = empty_out(5, 7, device=dev)
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert (out == 0).all()
    bg, sbg = torch.empty(2, 7, 0, dtype=fp8, device=dev), torch.empty(2, 1, 0, device=dev)
    out = empty_out(5, 7, device=dev)
    m_indices = torch.tensor([0, 0, 1, 1, -1], dtype=torch.int32, device=dev)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (bg, sbg), out, m_indices)
    assert (out[:4] == 0).all()
    out = empty_out(2, 3, 7, device=dev)
    masked_m = torch.tensor([3, 1], dtype=torch.int32, device=dev)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a[:3].expand(2, 3, 0), sa[:3].expand(2, 3, 0)), (bg, sbg),
                                                    out, masked_m, 3)
    assert (out[0] == 0).all() and (out[1, :1] == 0).all()


@pytest.mark.gpu
def test_empty_outputs_and_misaligned_operands(cuda_backend):
    """n = 0 or m = 0 writes nothing (empty tensors carry strides TMA would refuse), and operands at
    a base address 8 bytes off 16-byte alignment are copied rather than refused."""
    fp8, dev = torch.float8_e4m3fn, "cuda"
    _, a, sa = quantized_pair(5, 256, dev, per_block=False, scale_layout="row")
    _, b, sb = quantized_pair(7, 256, dev, per_block=True, scale_layout="row")
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b[:0], sb[:0]), empty_out(5, 0, device=dev))
    dskernels.gemm_fp8_fp8_bf16_nt((a[:0], sa[:0]), (b, sb), empty_out(0, 7, device=dev))
    bg, sbg = b[None].expand(2, 7, 256), sb[None].expand(2, *sb.shape)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a[None, :0].expand(2, 0, 256), sa[None, :0].expand(2, 0, 2)),
                                                    (bg, sbg), empty_out(2, 0, 7, device=dev),
                                                    torch.zeros(2, dtype=torch.int32, device=dev), 1)
    shifted = torch.empty(5 * 256 + 16, dtype=torch.uint8, device=dev)[8:8 + 5 * 256].view(fp8).view(5, 256)
    shifted.copy_(a)
    out = empty_out(5, 7, device=dev)
    dskernels.gemm_fp8_fp8_bf16_nt((shifted, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)


@pytest.fixture(params=GROUPED_CONFIGS)
def grouped_config_forced(request, monkeypatch):
    monkeypatch.setenv("DSKERNELS_GEMM_GROUPED_CONFIG", request.param)
    return request.param


# Every grouped test below runs under each grouped config forced (grouped_config_forced) and the
# rule: n = 300 gives an odd count of N tiles (the multicast clusters' last column half idles).
@pytest.mark.gpu
@pytest.mark.parametrize("scale_layout", ["row", "tma"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned128", "unaligned"])
@pytest.mark.parametrize("n", [144, 129, 300])
def test_contiguous(cuda_backend, grouped_config_forced, aligned, scale_layout, n):
    # group 1 is empty; group 3 has one row
    run_contiguous_against_oracle([7, 0, 130, 1], aligned, scale_layout, n, 256, "cuda")


@pytest.mark.gpu
def test_contiguous_deepgemm_shape(cuda_backend, grouped_config_forced):
    groups, m_per_group, n, k = 4, 1024, 4096, 7168
    m_indices = torch.arange(groups, dtype=torch.int32, device="cuda").repeat_interleave(m_per_group)
    x, a, sa = quantized_pair(groups * m_per_group, k, "cuda", per_block=False, scale_layout="tma")
    w, b, sb = grouped_weights(groups, n, k, "cuda", "row")
    out = empty_out(groups * m_per_group, n, device="cuda")
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    for g in range(groups):
        rows = slice(g * m_per_group, (g + 1) * m_per_group)
        assert_close_to_oracle(out[rows], a[rows], sa[rows], b[g], sb[g])


def run_masked_against_oracle(masked, m_max, n, k, scale_layout, expected_m):
    """One masked call with the given per-group counts; rows past masked_m are NaN-poisoned and
    must not reach a valid row; every valid row is checked against the oracle and the bf16 product."""
    groups = len(masked)
    x, a, sa = quantized_pair(groups * m_max, k, "cuda", per_block=False, scale_layout="row")
    x, a, sa = x.view(groups, m_max, k), a.view(groups, m_max, k), sa.view(groups, m_max, k // 128)
    for g, rows in enumerate(masked):
        poison_rows(a[g], sa[g], slice(rows, None))
    if scale_layout == "tma":
        sa = dskernels.get_col_major_tma_aligned_tensor(sa)
    w, b, sb = grouped_weights(groups, n, k, "cuda", scale_layout)
    out = empty_out(groups, m_max, n, device="cuda")
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, expected_m)
    pairs = []
    for g, rows in enumerate(masked):
        if rows:
            assert_close_to_oracle(out[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])
            pairs.append((out[g, :rows], x[g, :rows], w[g]))
    assert_close_to_bf16_product(pairs)


# expected_m picks the masked kernel's config under "auto" (<= 64: 64-row pingpong tiles) but is
# only a hint: every config must compute every row below masked_m, whatever the hint says.
@pytest.mark.gpu
@pytest.mark.parametrize("expected_m", [32, 256], ids=["tile64", "tile128"])
@pytest.mark.parametrize("scale_layout", ["row", "tma"])
@pytest.mark.parametrize("n", [136, 129, 300])
def test_masked(cuda_backend, grouped_config_forced, scale_layout, n, expected_m):
    # an empty group, a full one (m_max), one row
    run_masked_against_oracle([7, 0, 130, 1], 130, n, 256, scale_layout, expected_m)


@pytest.mark.gpu
@pytest.mark.parametrize("expected_m", [1, 16, 64, 65, 4096])
def test_masked_decode_small_expected_m(cuda_backend, grouped_config_forced, expected_m):
    """Decode-like masked call (DeepGEMM's masked layout: many experts, a few tokens each, m_max
    padded beyond them) with counts on both sides of the 64-row tile, under every config."""
    run_masked_against_oracle([1, 0, 63, 64, 65, 17, 128, 3], 192, 512, 1024, "tma", expected_m)


@pytest.mark.gpu
def test_masked_many_experts_few_rows(cuda_backend, grouped_config_forced):
    """Decode in DeepEP's low-latency layout: many local experts, most without a row this step (the
    first included), a few with 1..9 (the last included). The grouped tile scheduler reads every
    group's shape on the device and must skip the empty ones under every config."""
    counts = [0] * 96
    for g, rows in zip(range(5, 96, 9), [1, 9, 4, 2, 7, 3, 1, 8, 5, 6, 2]):
        counts[g] = rows
    counts[-1] = 3
    run_masked_against_oracle(counts, 16, 256, 256, "tma", 4)


@pytest.mark.gpu
def test_masked_counts_beyond_m_max_are_clamped(cuda_backend):
    groups, m_max, n, k = 2, 20, 64, 128
    _, a, sa = quantized_pair(groups * m_max, k, "cuda", per_block=False, scale_layout="row")
    a, sa = a.view(groups, m_max, k), sa.view(groups, m_max, 1)
    _, b, sb = grouped_weights(groups, n, k, "cuda", "row")
    out = empty_out(groups, m_max, n, device="cuda")
    masked_m = torch.tensor([1000, -5], dtype=torch.int32, device="cuda")
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 20)
    assert_close_to_oracle(out[0], a[0], sa[0], b[0], sb[0])


@pytest.mark.gpu
@pytest.mark.parametrize("expected_m", [32, 256], ids=["tile64", "tile128"])  # m64, m128_multicast
def test_masked_cuda_graph_replay_with_new_counts(cuda_backend, expected_m):
    """No host sync: masked_m is read on the device, so a captured call replays with new counts."""
    groups, m_max, n, k = 4, 64, 256, 512
    _, a, sa = quantized_pair(groups * m_max, k, "cuda", per_block=False, scale_layout="row")
    a, sa = a.view(groups, m_max, k), sa.view(groups, m_max, k // 128)
    sa = dskernels.get_col_major_tma_aligned_tensor(sa)  # no conversion copy inside the graph
    _, b, sb = grouped_weights(groups, n, k, "cuda", "row")
    sb = gemm_ops._cuda_sb(sb)
    out = torch.zeros(groups, m_max, n, dtype=torch.bfloat16, device="cuda")
    masked_m = torch.tensor([5, 0, 64, 17], dtype=torch.int32, device="cuda")
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, expected_m)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, expected_m)
    for counts in ([5, 0, 64, 17], [64, 3, 0, 1]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        for g, rows in enumerate(counts):
            if rows:
                assert_close_to_oracle(out[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["m128_streamk", "m128_multicast"])
def test_dense_cuda_graph_replay_with_new_inputs(cuda_backend, monkeypatch, config):
    """Stream-K zeroes its reduction flags with a memset inside the call, and the multicast config
    launches clusters: both must capture and replay (new values in the same buffers)."""
    monkeypatch.setenv("DSKERNELS_GEMM_DENSE_CONFIG", config)
    check_dense_graph_replays(130, 2112, 1024)


def check_dense_graph_replays(m, n, k):
    """The dense GEMM (the config the caller forced) captured in a CUDA graph, then replayed twice
    with new values in a and sa (the same buffers): out matches the oracle each time (twice: what a
    first replay leaves behind, reduction flags or partials, must not leak into the next)."""
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    sb = gemm_ops._cuda_sb(sb)  # the kernel's sb layout: no conversion inside the graph
    out = empty_out(m, n, device="cuda")
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    for _ in range(2):
        _, a_new, sa_new = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
        a.copy_(a_new)
        sa.copy_(sa_new)
        out.fill_(float("nan"))
        graph.replay()
        assert_close_to_oracle(out, a, sa, b, sb)


@pytest.mark.gpu
def test_contiguous_cuda_graph_replay_with_new_indices(cuda_backend):
    n, k = 128, 256
    sizes = [40, 0, 90]
    m_indices, _ = contiguous_layout(sizes, True, "cuda")
    _, a, sa = quantized_pair(m_indices.numel(), k, "cuda", per_block=False, scale_layout="tma")
    _, b, sb = grouped_weights(len(sizes), n, k, "cuda", "row")
    sb = gemm_ops._cuda_sb(sb)
    out = empty_out(m_indices.numel(), n, device="cuda")
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    new_indices, ranges = contiguous_layout([100, 30, 0], True, "cuda")
    assert new_indices.numel() == m_indices.numel()
    m_indices.copy_(new_indices)
    graph.replay()
    for g, (lo, hi) in ranges.items():
        if hi > lo:
            assert_close_to_oracle(out[lo:hi], a[lo:hi], sa[lo:hi], b[g], sb[g])
