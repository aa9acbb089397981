"""FP8 block-scaled GEMMs (dense, contiguous grouped, masked grouped) on every backend against
python_ref.gemm, with DeepGEMM's calc_diff bound and a tighter one derived from the math."""

import warnings

import numpy
import pytest
import torch

import dskernels
import python_ref
from dskernels.testing import calc_diff
from python_ref import gemm as ref

K = 256  # two K blocks: the per-block promotion is exercised, the interpreter stays fast
FP8_NAN = 0x7F  # float8_e4m3fn NaN (Triton's interpreter decodes it as 480 in tl.dot: still loud)


# ---- inputs ----

def quantized_pair(rows, k, device, *, per_block: bool, scale_layout: str):
    """Random values whose magnitude varies by up to 4x per row (activations) or per 128-row block
    (weights), the scales' granularity, cast as our casts do; scales in the asked layout. The
    spread stays small so that DeepGEMM's statistical calc_diff bound keeps its sample size."""
    groups = -(-rows // 128) if per_block else rows
    magnitude = 2 ** (torch.rand(groups, device=device) * 2 - 1)
    if per_block:
        magnitude = magnitude.repeat_interleave(128)[:rows]
    x = torch.randn(rows, k, device=device) * magnitude.unsqueeze(1)
    cast = python_ref.per_block_cast_to_fp8 if per_block else python_ref.per_token_cast_to_fp8
    q, s = cast(x.cpu())
    q, s = q.to(device), s.to(device)
    if scale_layout == "tma":
        s = dskernels.get_col_major_tma_aligned_tensor(s)
        assert s.stride(0) == 1
    return x, q, s


def grouped_weights(groups, n, k, device, scale_layout):
    ws, bs, sbs = [], [], []
    for _ in range(groups):
        w, b, sb = quantized_pair(n, k, device, per_block=True, scale_layout="row")
        ws.append(w), bs.append(b), sbs.append(sb)
    sb = torch.stack(sbs)
    if scale_layout == "tma":
        sb = dskernels.get_col_major_tma_aligned_tensor(sb)
    return torch.stack(ws), torch.stack(bs), sb


def poison_rows(q, s, rows):
    """NaN into the fp8 values and the scales of rows the result must not depend on."""
    q.view(torch.uint8)[rows] = FP8_NAN
    s[rows] = float("nan")


def empty_out(*shape, device):
    return torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)


# ---- the two bounds ----

def assert_close_to_oracle(out, a, sa, b, sb, c=None):
    """out [m, n] against the dequantized product (plus c) in fp64, a bound derived from the math:

    every backend computes the same dequantized sum in fp32 (in another order: per 128-wide K block,
    then scaled) and rounds it once to bf16. bf16 keeps 8 significant bits, so the rounding error is
    at most 2^-8 |d|; fp32 summation of k products adds at most ~(k + 8) 2^-24 sum |terms| for each
    of the two orders. With relative error e per element, calc_diff = sum (x-y)^2 / sum (x^2+y^2)
    <= e^2 / 2 = 2^-17; we allow 2^-16 for the fp32 part (DeepGEMM's bound is 1e-3, ~65x looser).

    On a GPU the FP8 tensor cores do not sum in fp32 inside a K block: Hopper's FP8 MMA keeps about
    13 fraction bits (DeepSeek-V3 report, section 3.3.2: "around 14 bits"; that is why DeepGEMM and
    our kernels promote to fp32 every 128-wide block), and how it drops the rest is not documented.
    If each 32-wide MMA step truncates the block's partial sum, it loses less than 2^-13 of it: 4
    steps, 2^-11 sum |terms|. If each step first aligns its 32 products to the largest and truncates
    them, the loss is up to 33 quanta per step, far above that in the worst case but not on random
    inputs. scripts/fp8_mma_error_models.py simulates both on this file's inputs: the largest
    element used 1/8 of 2^-9 sum |terms| with 13 bits aligned, 3/4 with 11, so 2^-9 is allowed on
    CUDA (a kernel that swaps two K blocks' scales would use it 60-380 times over); calc_diff stays
    below 2^-18 in every model.

    fp8_gemm_nt's variants: an fp32 out rounds with 2^-24 instead of 2^-8; c is one more term of the
    sum (k + 8 covers it); sb may hold one scale per row of b (ref.dequantize_rhs tells by shape).
    """
    assert out.dtype in (torch.bfloat16, torch.float32)
    rounding = 2**-8 if out.dtype == torch.bfloat16 else 2**-24
    out = out.double()  # fp64 on out's device: the GPU tests' DeepGEMM shapes are too big for CPU fp64
    deq_a = ref.dequantize_activations(a, sa).double()
    deq_b = ref.dequantize_rhs(b, sb).double()
    exact = deq_a @ deq_b.T
    magnitude = deq_a.abs() @ deq_b.abs().T
    if c is not None:
        exact, magnitude = exact + c.double(), magnitude + c.double().abs()
    assert calc_diff(out, exact) < 2**-16
    k = a.shape[-1]
    summation = 2 * (k + 8) * 2**-24 + (2**-9 if out.is_cuda else 0.0)
    bound = exact.abs() * rounding + summation * magnitude
    excess = (out - exact).abs() - bound
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} elements off by more than the bound"


def assert_close_to_bf16_product(pairs):
    """DeepGEMM's check over all (out, x, w) of one test: calc_diff against bf16(x) @ bf16(w).T.

    FP8 quantization alone puts calc_diff near 7e-4 for any k (measured: mean 6.9e-4 over 200 draws,
    python_ref, k=256): the 1e-3 bound is a statistical one and holds with margin only over enough
    outputs (the max over 200 draws of 8320 outputs was 8.1e-4, of 64 outputs 1.6e-3). Below 8192
    outputs we allow 3e-3; the tight bound above is what pins the kernels down element by element.
    """
    outs = torch.cat([out.double().flatten() for out, _, _ in pairs])
    products = torch.cat([(x.bfloat16().double() @ w.bfloat16().double().T).flatten() for _, x, w in pairs])
    limit = 1e-3 if outs.numel() >= 8192 else 3e-3
    assert calc_diff(outs, products) < limit


# ---- dense ----

@pytest.mark.parametrize("scale_layout", ["row", "tma"])
@pytest.mark.parametrize("m,n", [(1, 200), (7, 129), (130, 200), (130, 64)])
def test_gemm_dense(backend, m, n, scale_layout):
    _, device = backend
    x, a, sa = quantized_pair(m, K, device, per_block=False, scale_layout=scale_layout)
    w, b, sb = quantized_pair(n, K, device, per_block=True, scale_layout=scale_layout)
    out = empty_out(m, n, device=device)
    assert dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out) is None
    assert_close_to_oracle(out, a, sa, b, sb)
    assert_close_to_bf16_product([(out, x, w)])


def test_gemm_dense_strided_views(backend):
    """a, b as column slices of NaN-padded buffers, out as a slice of a NaN buffer: nothing past
    the views is read or written."""
    _, device = backend
    m, n = 33, 150
    x, a, sa = quantized_pair(m, K, device, per_block=False, scale_layout="row")
    w, b, sb = quantized_pair(n, K, device, per_block=True, scale_layout="row")
    a_wide = torch.full((m, K + 128), FP8_NAN, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    a_wide[:, 64:64 + K] = a
    b_wide = torch.full((n, K + 128), FP8_NAN, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    b_wide[:, :K] = b
    out_wide = empty_out(m, n + 10, device=device)
    dskernels.gemm_fp8_fp8_bf16_nt((a_wide[:, 64:64 + K], sa), (b_wide[:, :K], sb), out_wide[:, 5:5 + n])
    assert_close_to_oracle(out_wide[:, 5:5 + n], a, sa, b, sb)
    assert out_wide[:, :5].isnan().all() and out_wide[:, 5 + n:].isnan().all()


def test_gemm_dense_k128_and_empty(backend):
    _, device = backend
    x, a, sa = quantized_pair(5, 128, device, per_block=False, scale_layout="row")
    w, b, sb = quantized_pair(17, 128, device, per_block=True, scale_layout="row")
    out = empty_out(5, 17, device=device)
    dskernels.fp8_gemm_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    empty = empty_out(0, 17, device=device)
    dskernels.gemm_fp8_fp8_bf16_nt((a[:0], sa[:0]), (b, sb), empty)
    assert empty.shape == (0, 17)


def test_triton_tiles_spanning_scale_blocks(backend, monkeypatch):
    """BLOCK_N = 256 (a GPU tile size) under the interpreter: one tile covers two 128-row weight
    scale blocks and the next a partial third (n = 300), in all three kernels."""
    name, device = backend
    if name != "triton":
        pytest.skip("tile sizes are the Triton kernel's")
    if device == "cuda":
        pytest.skip("the interpreter's tile; on a GPU test_triton_every_gpu_config forces the 256-wide ones")
    from dskernels.triton import gemm as triton_gemm

    monkeypatch.setattr(triton_gemm, "_INTERPRETER_CONFIG", dict(BLOCK_M=16, BLOCK_N=256, GROUP_M=1))
    m, n = 20, 300
    x, a, sa = quantized_pair(m, K, device, per_block=False, scale_layout="tma")
    w, b, sb = quantized_pair(n, K, device, per_block=True, scale_layout="row")
    out = empty_out(m, n, device=device)
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    m_indices = torch.tensor([1] * 5 + [-1] * 3 + [0] * 12, dtype=torch.int32, device=device)
    bb, sbb = torch.stack([b, b.flip(0)]), torch.stack([sb, sb])
    out = empty_out(m, n, device=device)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (bb, sbb), out, m_indices)
    assert_close_to_oracle(out[8:], a[8:], sa[8:], b, sb)
    out3 = empty_out(2, 10, n, device=device)
    masked_m = torch.tensor([10, 3], dtype=torch.int32, device=device)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a.view(2, 10, K), sa.view(2, 10, 2)), (bb, sbb), out3, masked_m, 8)
    assert_close_to_oracle(out3[0], a[:10], sa[:10], b, sb)


def random_fp8_bytes(rows, k, device):
    """Every finite e4m3 value (subnormals, +-0, 448) is equally likely: raw random bytes, NaN excluded."""
    finite = torch.tensor([v for v in range(256) if v & 0x7F != 0x7F], dtype=torch.uint8)
    return finite[torch.randint(0, finite.numel(), (rows, k))].to(device).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("fp8_dot", ["native", "widened"])
def test_gemm_dense_every_fp8_value(backend, fp8_dot, monkeypatch):
    """Random bit patterns with unit-ish scales: no value of the format is decoded wrongly, on the
    FP8 tensor-core path and on the path for GPUs without FP8 MMA (bytes widened to fp16)."""
    name, device = backend
    if fp8_dot == "widened":
        if name != "triton":
            pytest.skip("the widened path is the Triton kernel's")
        monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    m, n = 19, 136
    a, b = random_fp8_bytes(m, K, device), random_fp8_bytes(n, K, device)
    sa = torch.rand(m, K // 128, device=device) + 0.5
    sb = torch.rand(2, K // 128, device=device) + 0.5
    out = empty_out(m, n, device=device)
    dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    if fp8_dot == "widened":
        _, a3, sa3 = quantized_pair(2 * 9, K, device, per_block=False, scale_layout="row")
        out3 = empty_out(2, 9, n, device=device)
        masked_m = torch.tensor([9, 4], dtype=torch.int32, device=device)
        bb, sbb = torch.stack([b, b]), torch.stack([sb, sb])
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3.view(2, 9, K), sa3.view(2, 9, 2)), (bb, sbb), out3,
                                                        masked_m, 9)
        assert_close_to_oracle(out3[1, :4], a3[9:13], sa3[9:13], b, sb)
        # A NaN byte (either sign) makes its output row NaN, as the dequantized product does.
        a[3, 5], a[11, 200] = (torch.tensor([0x7F, 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)).to(device)
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
        assert out[[3, 11]].isnan().all() and not out[[0, 4, 12]].isnan().any()


# ---- contiguous grouped ----

def contiguous_layout(sizes, aligned: bool, device):
    """Row ranges and m_indices for groups of `sizes` rows, in a shuffled group order (segments
    need not be sorted); aligned: DeepGEMM's layout, each segment padded to 128 rows with -1."""
    order = [2, 0, 3, 1][:len(sizes)] if len(sizes) == 4 else list(range(len(sizes)))
    indices, ranges, row = [], {}, 0
    for g in order:
        size = sizes[g]
        padded = -(-size // 128) * 128 if aligned else size
        indices += [g] * size + [-1] * (padded - size)
        ranges[g] = (row, row + size)
        row += padded
    if not aligned:
        indices += [-1] * 3  # trailing padding rows also happen with unaligned layouts
    return torch.tensor(indices, dtype=torch.int32, device=device), ranges


def run_contiguous_against_oracle(sizes, aligned, scale_layout, n, k, device):
    """One contiguous grouped GEMM (poisoned padding rows) checked group by group against the
    oracle and, together, against the bf16 product. Shared with tests/test_gemm_sm90.py."""
    m_indices, ranges = contiguous_layout(sizes, aligned, device)
    total = m_indices.numel()
    x, a, sa = quantized_pair(total, k, device, per_block=False, scale_layout="row")
    poison_rows(a, sa, m_indices == -1)
    if scale_layout == "tma":
        sa = dskernels.get_col_major_tma_aligned_tensor(sa)
    w, b, sb = grouped_weights(len(sizes), n, k, device, scale_layout)
    out = empty_out(total, n, device=device)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    assert_segments_close(out, ranges, x, a, sa, w, b, sb)


def assert_segments_close(out, ranges, x, a, sa, w, b, sb):
    """Each group's rows {g: (first, end)} of a contiguous grouped GEMM against the oracle, and all
    of them together against the bf16 product."""
    pairs = []
    for g, (lo, hi) in ranges.items():
        if hi > lo:
            assert_close_to_oracle(out[lo:hi], a[lo:hi], sa[lo:hi], b[g], sb[g])
            pairs.append((out[lo:hi], x[lo:hi], w[g]))
    assert_close_to_bf16_product(pairs)


@pytest.mark.parametrize("scale_layout", ["row", "tma"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned128", "unaligned"])
def test_m_grouped_contiguous(backend, aligned, scale_layout):
    _, device = backend
    run_contiguous_against_oracle([7, 0, 130, 1], aligned, scale_layout, 144, K, device)  # group 1 is empty


def test_m_grouped_contiguous_matches_oracle_function(backend):
    """The python_ref oracle on the valid rows; group ids outside [0, G) never index b."""
    _, device = backend
    m_indices = torch.tensor([1] * 20 + [0] * 40 + [-1] * 4 + [7] * 5, dtype=torch.int32, device=device)
    _, a, sa = quantized_pair(m_indices.numel(), K, device, per_block=False, scale_layout="row")
    _, b, sb = grouped_weights(2, 40, K, device, "row")
    out = empty_out(m_indices.numel(), 40, device=device)
    dskernels.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), out, m_indices)
    expected = ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, m_indices)
    valid = (m_indices >= 0) & (m_indices < 2)
    # Both sides round to bf16 (2^-8 relative each): calc_diff <= (2^-7)^2 / 2.
    assert calc_diff(out[valid], expected[valid]) < 2**-15


def routed_layout(tokens: int, experts: int, topk: int, device, seed: int = 0):
    """m_indices of a decode step's MoE: each token's topk distinct experts, rows sorted by expert
    (the model's layout), some ids past the last expert (-1 rows of other ranks) at the end;
    returns (m_indices, {g: (first, end)})."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).flatten()
    ids = torch.where(ids >= experts - 2, -1, ids)  # the last two experts live elsewhere
    ids = torch.where(ids >= 0, ids, experts).sort().values
    m_indices = torch.where(ids < experts, ids, -1).int()
    ranges = {}
    for e in range(experts):
        rows = (m_indices == e).nonzero().flatten().tolist()
        if rows:
            ranges[e] = (rows[0], rows[-1] + 1)
    return m_indices.to(device), ranges


@pytest.mark.parametrize("slots", [None, 1, 3], ids=["heuristic_slots", "one_slot", "three_slots"])
def test_m_grouped_contiguous_decode_routing(backend, slots, monkeypatch):
    """Decode routing (12 tokens x 4 of 20 experts): a tile holds many runs of one to a few rows.
    The Triton kernel spreads a tile's runs over programs (_run_slots): its own count, one program
    walking them all, and three each taking every third run, against the oracle per expert."""
    name, device = backend
    if slots is not None:
        if name != "triton":
            pytest.skip("the run slots are the Triton kernel's")
        from dskernels.triton import gemm as triton_gemm

        monkeypatch.setattr(triton_gemm, "_run_slots", lambda *_: slots)
    experts, n = 20, 144
    m_indices, ranges = routed_layout(12, experts, 4, device)
    x, a, sa = quantized_pair(m_indices.numel(), K, device, per_block=False, scale_layout="row")
    poison_rows(a, sa, m_indices == -1)
    w, b, sb = grouped_weights(experts, n, K, device, "row")
    out = empty_out(m_indices.numel(), n, device=device)
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    assert_segments_close(out, ranges, x, a, sa, w, b, sb)


def test_run_slots():
    """One program per tile in DeepGEMM's aligned layouts and the psum one; about a tile's runs in
    decode routing; never more than the tile's rows or m."""
    from dskernels.triton.gemm import _run_slots

    assert _run_slots(4 * 8192, 4, 128, False) == 1 and _run_slots(8 * 4096, 8, 64, False) == 1
    assert _run_slots(8, 256, 64, True) == 1 and _run_slots(0, 4, 64, False) == 1
    assert [_run_slots(8 * t, 256, 64, False) for t in (1, 32, 128)] == [8, 64, 17]
    assert _run_slots(3, 256, 64, False) == 3 and _run_slots(10_000, 10_000, 32, False) == 32


def psum_layout(sizes, device, tail: int = 40):
    """DeepGEMM's psum layout for groups of `sizes` rows: each group starts at the previous end
    rounded up to 128; returns (ends int32 [G], {g: (first, end)}, total rows with `tail` rows past
    the last group's 128-aligned end, which belong to no group either)."""
    ends, ranges, end = [], {}, 0
    for g, size in enumerate(sizes):
        first = -(-end // 128) * 128
        end = first + size
        ends.append(end)
        ranges[g] = (first, end)
    return torch.tensor(ends, dtype=torch.int32, device=device), ranges, -(-end // 128) * 128 + tail


def test_psum_to_m_indices():
    """The oracle's reading of the psum layout, by hand: [37, 0, 130, 0] -> rows 0..36 group 0,
    37..127 none, group 1 empty, 128..257 group 2, the rest none (group 3 empty too)."""
    ends, ranges, total = psum_layout([37, 0, 130, 0], "cpu")
    assert ends.tolist() == [37, 128, 258, 384] and total == 424
    expected = torch.full((total,), -1, dtype=torch.int32)
    expected[:37], expected[128:258] = 0, 2
    assert torch.equal(ref.psum_to_m_indices(ends, total), expected)
    assert ranges[1] == (128, 128) and ranges[3] == (384, 384)


@pytest.mark.parametrize("zero_pad", [False, True], ids=["as_is", "zero_padding"])
def test_m_grouped_contiguous_psum_layout(backend, zero_pad):
    """DeepGEMM's psum layout (DeepEP v2's receive layout): [G] cumulative ends read on the device,
    gaps between groups and the tail poisoned; each group against the oracle; the rows of no group
    hold zeros with ensure_zero_padding (else they are unspecified: Triton leaves them as they were,
    -inf here, where a row computed from the poison would be NaN)."""
    name, device = backend
    sizes = [7, 0, 130, 1]
    ends, ranges, total = psum_layout(sizes, device)
    owner = ref.psum_to_m_indices(ends, total)
    x, a, sa = quantized_pair(total, K, device, per_block=False, scale_layout="row")
    poison_rows(a, sa, owner == -1)
    w, b, sb = grouped_weights(len(sizes), 144, K, device, "tma")
    out = torch.full((total, 144), float("-inf"), dtype=torch.bfloat16, device=device)
    dskernels.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), out, ends, use_psum_layout=True,
                                               ensure_zero_padding=zero_pad, expected_m_for_psum_layout=64)
    assert_segments_close(out, ranges, x, a, sa, w, b, sb)
    if zero_pad:
        assert not out[owner == -1].any()
    elif name == "triton":  # rows of no group are not written
        assert (out[owner == -1] == float("-inf")).all()


def test_deepgemm_name_zeroes_rows_of_no_group_by_default(backend):
    """m_grouped_fp8_gemm_nt_contiguous (and nn) take DeepGEMM's default, ensure_zero_padding=True."""
    _, device = backend
    ends, _, total = psum_layout([7, 0, 130, 1], device)
    owner = ref.psum_to_m_indices(ends, total)
    _, a, sa = quantized_pair(total, K, device, per_block=False, scale_layout="row")
    _, b, sb = grouped_weights(4, 144, K, device, "row")
    for name in ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nn_contiguous"):
        rhs = (b, sb) if name.endswith("nt_contiguous") else (b.transpose(1, 2), sb.transpose(1, 2))
        out = torch.full((total, 144), float("-inf"), dtype=torch.bfloat16, device=device)
        getattr(dskernels, name)((a, sa), rhs, out, ends, use_psum_layout=True)
        assert not out[owner == -1].any(), name


def test_psum_options_are_checked():
    g = _grouped_args()
    lhs, rhs = (g["a"], g["sa"]), (g["b"], g["sb"])
    ends = torch.tensor([4, 4, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^grouped_layout: expected shape \(3,\) \(use_psum_layout"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, g["out"], ends[:2], use_psum_layout=True)
    with pytest.raises(ValueError, match="^expected_m_for_psum_layout: only with use_psum_layout=True"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, g["out"], torch.zeros(4, dtype=torch.int32),
                                                   expected_m_for_psum_layout=4)
    with pytest.raises(ValueError, match="^expected_m_for_psum_layout: expected a positive"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, g["out"], ends, use_psum_layout=True,
                                                   expected_m_for_psum_layout=0)
    with pytest.raises(TypeError, match="^use_psum_layout: expected a bool"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, g["out"], ends, use_psum_layout=1)
    with pytest.raises(TypeError, match="^disable_ue8m0_cast: expected a bool"):  # (ignored, still checked)
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, g["out"], ends, None, None, None, "nk", "no")
    with pytest.raises(TypeError, match="^compiled_dims: expected a str"):
        dskernels.fp8_gemm_nt(lhs, rhs, g["out"], None, None, None, None, True)
    # DeepGEMM's order before recipe_a / recipe_b: compiled_dims lands in recipe_a, named
    with pytest.raises(TypeError, match=r"^recipe_a: expected a tuple of ints .* \(DeepGEMM's current order"):
        dskernels.fp8_gemm_nt(lhs, rhs, g["out"], None, None, "nk")


# ---- masked grouped ----

@pytest.mark.parametrize("scale_layout", ["row", "tma"])
def test_m_grouped_masked(backend, scale_layout):
    _, device = backend
    masked = [7, 0, 130, 1]
    groups, m_max, n = len(masked), 130, 136
    x, a, sa = quantized_pair(groups * m_max, K, device, per_block=False, scale_layout="row")
    x, a, sa = x.view(groups, m_max, K), a.view(groups, m_max, K), sa.view(groups, m_max, K // 128)
    for g, rows in enumerate(masked):
        poison_rows(a[g], sa[g], slice(rows, None))
    if scale_layout == "tma":
        sa = dskernels.get_col_major_tma_aligned_tensor(sa)
    w, b, sb = grouped_weights(groups, n, K, device, scale_layout)
    out = empty_out(groups, m_max, n, device=device)
    # masked_m as a strided view (a column of per-expert counts), its neighbours poisoned
    counts = torch.tensor([[rows, -1] for rows in masked], dtype=torch.int32, device=device)
    masked_m = counts[:, 0]
    dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 32)
    pairs = []
    for g, rows in enumerate(masked):
        if rows:
            assert_close_to_oracle(out[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])
            pairs.append((out[g, :rows], x[g, :rows], w[g]))
    assert_close_to_bf16_product(pairs)
    # The newer name, same arguments.
    out2 = empty_out(groups, m_max, n, device=device)
    dskernels.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), out2, masked_m, 32)
    for g, rows in enumerate(masked):
        assert torch.equal(out2[g, :rows], out[g, :rows])


# ---- layout helper ----

def test_get_col_major_tma_aligned_tensor():
    s = torch.randn(130, 3)
    aligned = dskernels.get_col_major_tma_aligned_tensor(s)
    assert aligned.shape == s.shape and aligned.stride() == (1, 132) and torch.equal(aligned, s)
    assert dskernels.get_col_major_tma_aligned_tensor(aligned) is aligned
    s3 = torch.randn(4, 7, 2)
    aligned3 = dskernels.get_col_major_tma_aligned_tensor(s3)
    assert aligned3.stride() == (16, 1, 8) and torch.equal(aligned3, s3)
    assert dskernels.get_col_major_tma_aligned_tensor(aligned3) is aligned3
    with pytest.raises(ValueError, match="^x: expected 2 or 3 dimensions"):
        dskernels.get_col_major_tma_aligned_tensor(torch.randn(5))


# ---- bad inputs ----

def _dense_args(m=4, n=8, k=K):
    a = torch.randn(m, k).to(torch.float8_e4m3fn)
    b = torch.randn(n, k).to(torch.float8_e4m3fn)
    return dict(a=a, sa=torch.rand(m, k // 128), b=b, sb=torch.rand(-(-n // 128), k // 128),
                out=torch.empty(m, n, dtype=torch.bfloat16))


def _grouped_args(groups=3, m=4, n=8, k=K, masked=False):
    shape_a = (groups, m, k) if masked else (m, k)
    return dict(a=torch.randn(shape_a).to(torch.float8_e4m3fn), sa=torch.rand(*shape_a[:-1], k // 128),
                b=torch.randn(groups, n, k).to(torch.float8_e4m3fn), sb=torch.rand(groups, 1, k // 128),
                out=torch.empty(*shape_a[:-1], n, dtype=torch.bfloat16))


def _call(kind, args, **extra):
    args = {**args, **extra}
    lhs, rhs = (args.pop("a"), args.pop("sa")), (args.pop("b"), args.pop("sb"))
    if kind == "dense":
        dskernels.gemm_fp8_fp8_bf16_nt(lhs, rhs, args["out"])
    elif kind == "general":
        dskernels.fp8_gemm_nt(lhs, rhs, args["out"], c=args.get("c"), recipe=args.get("recipe"))
    elif kind == "contiguous":
        m_indices = args.get("m_indices", torch.zeros(lhs[0].shape[0], dtype=torch.int32))
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, args["out"], m_indices)
    else:
        masked_m = args.get("masked_m", torch.ones(rhs[0].shape[0], dtype=torch.int32))
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, args["out"], masked_m, args.get("expected_m", 4))


BAD = [
    ("dense", dict(_dense_args(k=200), sa=torch.rand(4, 1), sb=torch.rand(1, 1)), ValueError,
     "a:", ["multiple of 128", "200"]),
    ("dense", dict(_dense_args(), a=torch.randn(4, K, dtype=torch.bfloat16)), TypeError, "a:",
     ["float8_e4m3fn", "bfloat16"]),
    ("dense", dict(_dense_args(), sa=torch.rand(4, 1)), ValueError, "sa:", ["(4, 2)", "(4, 1)"]),
    ("dense", dict(_dense_args(), sa=torch.rand(4, 2).bfloat16()), TypeError, "sa:", ["float32"]),
    ("dense", dict(_dense_args(), b=torch.randn(8, 384).to(torch.float8_e4m3fn)), ValueError, "b:",
     ["256", "(8, 384)"]),
    ("dense", dict(_dense_args(), sb=torch.rand(2, 2)), ValueError, "sb:", ["(1, 2)", "(2, 2)"]),
    ("dense", dict(_dense_args(), out=torch.empty(4, 8)), TypeError, "out:", ["bfloat16", "float32"]),
    ("dense", dict(_dense_args(), out=torch.empty(8, 4, dtype=torch.bfloat16)), ValueError, "out:",
     ["(4, 8)", "(8, 4)"]),
    ("dense", dict(_dense_args(), out=torch.empty(1, 8, dtype=torch.bfloat16).expand(4, 8)), ValueError, "out:",
     ["share memory", "(0, 1)"]),
    ("general", dict(_dense_args(), out=torch.empty(4, 8, dtype=torch.float16)), TypeError, "d:",  # DeepGEMM's name
     ["bfloat16 or float32", "float16"]),
    ("general", dict(_dense_args(), sb=torch.rand(3, 2)), ValueError, "sb:", ["(1, 2)", "(8, 2)", "(3, 2)"]),
    ("general", dict(_dense_args(), out=torch.empty(4, 8), c=torch.empty(4, 8, dtype=torch.bfloat16)), TypeError,
     "c:", ["float32", "bfloat16"]),
    ("general", dict(_dense_args(), out=torch.empty(4, 8), c=torch.empty(8, 4)), ValueError, "c:",
     ["(4, 8)", "(8, 4)"]),
    ("general", dict(_dense_args(), recipe=(1, 64, 128)), ValueError, "recipe:",
     ["(1, 128, 128) or (1, 1, 128)", "(1, 64, 128)"]),
    ("general", dict(_dense_args(), recipe=(1, 1, 128)), ValueError, "sb:", ["(1, 1, 128)", "row of b", "(1, 2)"]),
    ("contiguous", dict(_grouped_args(), m_indices=torch.zeros(4, dtype=torch.int64)), TypeError,
     "m_indices:", ["int32", "int64"]),
    ("contiguous", dict(_grouped_args(), m_indices=torch.zeros(5, dtype=torch.int32)), ValueError,
     "m_indices:", ["(4,)", "(5,)"]),
    ("contiguous", dict(_grouped_args(), sb=torch.rand(3, 2, 2)), ValueError, "sb:", ["(3, 1, 2)"]),
    ("contiguous", dict(_grouped_args(), b=torch.randn(8, K).to(torch.float8_e4m3fn)), ValueError, "b:",
     ["3 dimensions", "(8, 256)"]),
    ("masked", dict(_grouped_args(masked=True), masked_m=torch.ones(3, dtype=torch.int64)), TypeError,
     "masked_m:", ["int32", "int64"]),
    ("masked", dict(_grouped_args(masked=True), masked_m=torch.ones(2, dtype=torch.int32)), ValueError,
     "masked_m:", ["(3,)", "(2,)"]),
    ("masked", dict(_grouped_args(masked=True), a=torch.randn(2, 4, K).to(torch.float8_e4m3fn)), ValueError,
     "a:", ["3 groups", "(2, 4, 256)"]),
    ("masked", dict(_grouped_args(masked=True), sa=torch.rand(3, 4, 3)), ValueError, "sa:", ["(3, 4, 2)"]),
    ("masked", dict(_grouped_args(masked=True), expected_m=4.5), TypeError, "expected_m:", ["int", "float"]),
    # a misplaced tensor is named itself, the first argument included (against where the others are)
    ("dense", dict(_dense_args(), a=_dense_args()["a"].to("meta")), ValueError, "a:",
     ["on cpu (where sa, b, sb, out are)", "meta"]),
    ("masked", dict(_grouped_args(masked=True), sb=_grouped_args(masked=True)["sb"].to("meta")), ValueError, "sb:",
     ["on cpu", "meta"]),
]


@pytest.mark.parametrize("kind,args,error,name,words", BAD, ids=[f"{b[0]}-{b[3]}{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_named(kind, args, error, name, words):
    with pytest.raises(error) as info:
        _call(kind, args)
    message = str(info.value)
    assert message.startswith(name), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("kind", ["dense", "general", "contiguous", "masked"])
def test_out_sharing_memory_with_an_operand_is_refused(kind):
    """out written over an operand's bytes: the sm90 kernel stores tiles while other CTAs still
    read that operand (a race), so every backend refuses it by name."""
    args = _dense_args() if kind in ("dense", "general") else _grouped_args(masked=kind == "masked")
    out_bytes = args["out"].numel() * 2
    for name in ("a", "b", "sa", "sb"):
        t = args[name]
        buf = torch.zeros(max(t.numel() * t.element_size(), out_bytes), dtype=torch.uint8)
        shared = buf[:t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        shared.copy_(t)
        out = buf[:out_bytes].view(torch.bfloat16).view(args["out"].shape)
        out_name = "d" if kind == "general" else "out"  # (fp8_gemm_nt: DeepGEMM's name)
        with pytest.raises(ValueError, match=f"^{out_name}: expected an output that shares no memory with {name} "):
            _call(kind, {**args, name: shared, "out": out})


def test_out_with_overlapping_rows_is_refused():
    """Rows closer together than their length (torch's own overlap test cannot tell)."""
    args = _dense_args()
    out = torch.empty(64, dtype=torch.bfloat16).as_strided((4, 8), (4, 1))
    with pytest.raises(ValueError, match="^out: expected an output whose elements do not share memory"):
        _call("dense", {**args, "out": out})


def test_tuple_arguments_are_checked():
    args = _dense_args()
    with pytest.raises(TypeError, match="^lhs: expected a tuple"):
        dskernels.gemm_fp8_fp8_bf16_nt(args["a"], (args["b"], args["sb"]), args["out"])
    with pytest.raises(TypeError, match="^rhs: expected a tuple"):
        dskernels.gemm_fp8_fp8_bf16_nt((args["a"], args["sa"]), (args["b"],), args["out"])


def test_deepgemm_options_of_the_newer_names():
    """DeepGEMM's trailing options are accepted where they mean nothing here and refused where
    they would ask for what is not done."""
    args = _dense_args()
    lhs, rhs = (args["a"], args["sa"]), (args["b"], args["sb"])
    expected = args["out"].clone()
    dskernels.gemm_fp8_fp8_bf16_nt(lhs, rhs, expected)
    out = torch.full_like(expected, float("nan"))
    dskernels.fp8_gemm_nt(lhs, rhs, out, None, (1, 128, 128), None, None, "nk", True)  # DeepGEMM's 9, by position
    assert torch.equal(out, expected)
    out = torch.full_like(expected, float("nan"))
    dskernels.fp8_gemm_nt(lhs, rhs, out, None, None, (1, 128), (128, 128))  # recipe_a, recipe_b by position
    assert torch.equal(out, expected)
    m_indices = torch.zeros(out.shape[0], dtype=torch.int32)
    with pytest.raises(ValueError, match="^recipe: only \\(1, 128, 128\\) \\("):  # grouped: block scales only
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, (args["b"][None], args["sb"][None]), out, m_indices,
                                                   recipe=(1, 1, 128))
    dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, (args["b"][None], args["sb"][None]), out, m_indices,
                                               recipe=None, compiled_dims="nk", disable_ue8m0_cast=False)
    assert torch.equal(out, expected)
    g = _grouped_args(masked=True)
    masked_m = torch.tensor([4, 0, 2], dtype=torch.int32)
    dskernels.m_grouped_fp8_gemm_nt_masked((g["a"], g["sa"]), (g["b"], g["sb"]), g["out"], masked_m,
                                           numpy.int64(4), recipe=(1, 128, 128))  # a numpy int too
    assert dskernels.get_m_alignment_for_contiguous_layout() == 128
    assert dskernels.get_tma_aligned_size(130, 4) == 132
    for bad in (0, 3, 2.0):
        with pytest.raises(ValueError, match="element_size: expected a divisor of 16"):
            dskernels.get_tma_aligned_size(5, bad)
    for bad in (5.5, -5, True):
        with pytest.raises(ValueError, match="^x: expected a number of elements"):
            dskernels.get_tma_aligned_size(bad, 4)
    # DeepGEMM's newer and legacy names, and its per-operand recipe keywords
    assert dskernels.get_mk_alignment_for_contiguous_layout() == 128
    assert dskernels.get_mn_major_tma_aligned_tensor is dskernels.get_col_major_tma_aligned_tensor
    out = torch.full_like(expected, float("nan"))
    dskernels.fp8_gemm_nt(lhs, rhs, out, recipe_a=(1, 128), recipe_b=(128, 128))
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="^recipe_a, recipe_b: only"):
        dskernels.fp8_gemm_nt(lhs, rhs, out, recipe_a=(1, 32), recipe_b=(128, 128))
    with pytest.raises(ValueError, match="^recipe: \\(1, 1, 128\\) disagrees"):
        dskernels.fp8_gemm_nt(lhs, rhs, out, recipe=(1, 1, 128), recipe_a=(1, 128), recipe_b=(128, 128))
    out3 = torch.full_like(g["out"], float("nan"))
    dskernels.fp8_m_grouped_gemm_nt_masked((g["a"], g["sa"]), (g["b"], g["sb"]), out3, masked_m, 4,
                                           recipe_a=(1, 128), recipe_b=(128, 128))
    for group, rows in enumerate(masked_m.tolist()):
        assert torch.equal(out3[group, :rows], g["out"][group, :rows])
    # DeepGEMM's newer keyword names (a, b, d, grouped_layout) for the newer entry points
    out = torch.full_like(expected, float("nan"))
    dskernels.fp8_gemm_nt(a=lhs, b=rhs, d=out, c=None)
    assert torch.equal(out, expected)
    out = torch.full_like(expected, float("nan"))
    dskernels.m_grouped_fp8_gemm_nt_contiguous(a=lhs, b=(args["b"][None], args["sb"][None]), d=out,
                                               grouped_layout=m_indices)
    assert torch.equal(out, expected)
    out = torch.full_like(expected, float("nan"))  # DeepGEMM 2.0 named it m_indices
    dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, (args["b"][None], args["sb"][None]), out, m_indices=m_indices)
    assert torch.equal(out, expected)
    with pytest.raises(TypeError, match="^grouped_layout: expected the contiguous layout under exactly one"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, (args["b"][None], args["sb"][None]), out, m_indices,
                                                   m_indices=m_indices)
    for keyword in ("grouped_layout", "m_indices"):  # a bad layout is named as the caller named it
        with pytest.raises(ValueError, match=f"^{keyword}: expected shape"):
            dskernels.m_grouped_fp8_gemm_nt_contiguous(lhs, (args["b"][None], args["sb"][None]), out,
                                                       **{keyword: m_indices[1:]})
    for keyword in ("recipe", "recipe_a", "recipe_b"):  # DeepGEMM's recipes are tuples
        with pytest.raises(TypeError, match=f"^{keyword}: expected a tuple of ints"):
            dskernels.fp8_gemm_nt(lhs, rhs, out, **{keyword: 128})
    with pytest.raises(TypeError, match="^recipe: expected a tuple of ints"):
        dskernels.transform_sf_into_required_layout(args["sa"], args["sa"].shape[0], 128, 128, is_sfa=True)
    out4 = torch.full_like(g["out"], float("nan"))
    dskernels.m_grouped_fp8_gemm_nt_masked(a=(g["a"], g["sa"]), b=(g["b"], g["sb"]), d=out4, masked_m=masked_m,
                                           expected_m=4)
    for group, rows in enumerate(masked_m.tolist()):
        assert torch.equal(out4[group, :rows], g["out"][group, :rows])
    with pytest.raises(TypeError, match="^a: expected a tuple"):
        dskernels.fp8_gemm_nt(args["a"], rhs, out)


def test_transform_sf_into_required_layout():
    """DeepGEMM's load-time helper: same values; 1x128 scales MN-major TMA-aligned, 128x128 as given;
    shapes and recipes checked by name."""
    sa = torch.rand(130, 2)
    out = dskernels.transform_sf_into_required_layout(sa, 130, 256, (1, 128, 128), is_sfa=True)
    assert torch.equal(out, sa) and out.stride() == (1, 132)
    sb = torch.rand(3, 2, 2)
    assert dskernels.transform_sf_into_required_layout(sb, 200, 256, (1, 128, 128), num_groups=3) is sb
    per_row = dskernels.transform_sf_into_required_layout(torch.rand(7, 2), 7, 256, (1, 1, 128))  # sfb, 1x128
    assert per_row.stride() == (1, 8)
    assert dskernels.transform_sf_into_required_layout(sb, 200, 256, (128, 128), 3, disable_ue8m0_cast=True) is sb
    with pytest.raises(ValueError, match=r"^sf: expected shape \(3, 3, 2\) \(num_groups x ceil\(mn / 128\)"):
        dskernels.transform_sf_into_required_layout(sb, 300, 256, (1, 128, 128), num_groups=3)
    with pytest.raises(ValueError, match="^recipe: only 1x128 and 128x128 scales exist here, got 1x32"):
        dskernels.transform_sf_into_required_layout(sa, 130, 256, (1, 128, 32), is_sfa=True)
    with pytest.raises(TypeError, match="^sf: expected dtype float32, got torch.int32"):
        dskernels.transform_sf_into_required_layout(sa.int(), 130, 256, (1, 128, 128), is_sfa=True)


# ---- torch.library / torch.compile ----

def _sample(masked=False):
    _, a, sa = quantized_pair(3 * 7 if masked else 9, K, "cpu", per_block=False, scale_layout="row")
    _, b, sb = grouped_weights(3, 20, K, "cpu", "row")
    if masked:
        a, sa = a.view(3, 7, K), sa.view(3, 7, K // 128)
    return a, sa, b, sb


# test_schema compares arguments before and after with torch.allclose, which has no fp8 kernel on
# CPU (torch 2.14); test_mutations_follow_schema checks what it would have.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_samples():
    a, sa, b, sb = _sample()
    m_indices = torch.tensor([0, 0, 2, 2, 2, -1, 1, 1, 1], dtype=torch.int32)
    a3, sa3, _, _ = _sample(masked=True)
    masked_m = torch.tensor([3, 0, 7], dtype=torch.int32)
    return [
        (torch.ops.dskernels.gemm_fp8_fp8_bf16_nt, (a, sa, b[0], sb[0], torch.zeros(9, 20, dtype=torch.bfloat16))),
        (torch.ops.dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
         (a, sa, b, sb, torch.zeros(9, 20, dtype=torch.bfloat16), m_indices)),
        (torch.ops.dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked,
         (a3, sa3, b, sb, torch.zeros(3, 7, 20, dtype=torch.bfloat16), masked_m, 4)),
        (torch.ops.dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,  # psum: group 0 rows 0..4, 1 and 2
         (a, sa, b, sb, torch.zeros(9, 20, dtype=torch.bfloat16),  # empty (from row 128), rows 5..8 none
          torch.tensor([5, 128, 128], dtype=torch.int32), True, True, 4)),
    ]


def test_opcheck():
    """(The FakeTensor data_ptr() warning as an error: the fake kernels' overlap check read it,
    which torch warns about and means to refuse.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*data pointer of FakeTensor")
        for op, args in _op_samples():
            torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_mutations_follow_schema(backend):
    assert_only_output_changes(_op_samples(), 4, backend[1])


def assert_only_output_changes(samples, out_index, device):
    """Only the output (the schema's Tensor(a!), argument out_index) changes; the other arguments
    keep their bits (fp8 compared as bytes)."""
    for op, args in samples:
        args = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)
        before = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        op(*args)
        for i, (old, new) in enumerate(zip(before, args)):
            if not isinstance(old, torch.Tensor):
                continue
            same = torch.equal(old.view(torch.uint8) if old.dtype == torch.float8_e4m3fn else old,
                               new.view(torch.uint8) if new.dtype == torch.float8_e4m3fn else new)
            assert same == (i != out_index), f"{op}: argument {i} {'unchanged' if same else 'changed'}"


def test_torch_compile_fullgraph():
    def all_three(a, sa, b, sb, m_indices, a3, sa3, masked_m):
        dense = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b[0], sb[0]), dense)
        contiguous = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), contiguous, m_indices)
        masked = torch.zeros(a3.shape[0], a3.shape[1], b.shape[1], dtype=torch.bfloat16)
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3, sa3), (b, sb), masked, masked_m, 4)
        return dense.float() * 2, contiguous, masked

    a, sa, b, sb = _sample()
    a3, sa3, _, _ = _sample(masked=True)
    m_indices = torch.tensor([0, 0, 2, 2, 2, -1, 1, 1, 1], dtype=torch.int32)
    masked_m = torch.tensor([3, 0, 7], dtype=torch.int32)
    args = (a, sa, b, sb, m_indices, a3, sa3, masked_m)
    compiled = torch.compile(all_three, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(*args), all_three(*args)):
        assert torch.equal(actual, expected)


def test_torch_compile_dynamic_expected_m_does_not_recompile():
    """expected_m computed from the batch (as serving code does) stays symbolic: the schema takes a
    SymInt and the numpy-integer conversion leaves symbolic ints alone (both specialized it)."""
    from torch._dynamo.testing import CompileCounter

    def masked_gemm(a3, sa3, b, sb, masked_m):
        out = torch.zeros(a3.shape[0], a3.shape[1], b.shape[1], dtype=torch.bfloat16)
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3, sa3), (b, sb), out, masked_m, a3.shape[1])
        return out

    counter = CompileCounter()
    compiled = torch.compile(masked_gemm, fullgraph=True, backend=counter, dynamic=True)
    _, _, b, sb = _sample()
    a3, sa3, _, _ = _sample(masked=True)
    for m in (4, 5, 6):  # views of the 7-row sample: same strides, no size equal to another
        args = (a3[:, :m], sa3[:, :m], b, sb, torch.tensor([m, 0, m - 1], dtype=torch.int32))
        assert torch.equal(compiled(*args), masked_gemm(*args))
    assert counter.frame_count == 1


# ---- GPU only ----

@pytest.mark.gpu
def test_masked_cuda_graph_replay_with_new_counts():
    groups, m_max, n, k = 4, 64, 256, 512
    _, a, sa = quantized_pair(groups * m_max, k, "cuda", per_block=False, scale_layout="row")
    a, sa = a.view(groups, m_max, k), sa.view(groups, m_max, k // 128)
    _, b, sb = grouped_weights(groups, n, k, "cuda", "row")
    out = torch.zeros(groups, m_max, n, dtype=torch.bfloat16, device="cuda")
    masked_m = torch.tensor([5, 0, 64, 17], dtype=torch.int32, device="cuda")
    with dskernels.backend("triton"):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 32)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 32)
    for counts in ([5, 0, 64, 17], [64, 3, 0, 1]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        expected = ref.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, masked_m)
        for g, rows in enumerate(counts):
            assert calc_diff(out[g, :rows], expected[g, :rows]) < 2**-15  # both rounded to bf16
            assert not out[g, :rows].isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,autotune", [(64, 2112, 7168, True), (4096, 7168, 2048, False),
                                            (129, 24576, 1536, False)])
def test_triton_deepgemm_shapes(m, n, k, autotune, monkeypatch):
    """The GPU path on DeepGEMM's shapes (block sizes the interpreter never runs), autotuned on one
    of them (7 compiles per shape: a device session is short; every candidate is also checked by
    test_triton_every_gpu_config), with the heuristic tile on the others."""
    monkeypatch.setenv("DSKERNELS_GEMM_AUTOTUNE", "1" if autotune else "0")  # tests/conftest.py: off
    x, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    w, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    out = empty_out(m, n, device="cuda")
    with dskernels.backend("triton"):
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    assert_close_to_bf16_product([(out, x, w)])


def _triton_gpu_configs():
    from dskernels.triton.gemm import _gpu_configs

    return [pytest.param(c, id=f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-s{c.num_stages}-w{c.num_warps}")
            for c in _gpu_configs(256)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _triton_gpu_configs())
def test_triton_every_gpu_config(config, monkeypatch):
    """Each autotuning candidate, forced, in all three kernels on odd shapes: the autotuner may pick
    any of them, and the output of the ones it does not pick is never looked at."""
    from dskernels.triton import gemm as triton_gemm

    meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
    monkeypatch.setattr(triton_gemm, "_heuristic_config", lambda *_: dict(meta))
    m, n, k = 203, 300, 384
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    bb, sbb = torch.stack([b, b.flip(0)]), torch.stack([sb, sb])
    with dskernels.backend("triton"):
        out = empty_out(m, n, device="cuda")
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
        assert_close_to_oracle(out, a, sa, b, sb)
        # Unaligned segments: group 1 for rows 0..69, padding 70..99, group 0 from 100 on.
        m_indices = torch.tensor([1] * 70 + [-1] * 30 + [0] * (m - 100), dtype=torch.int32, device="cuda")
        out = empty_out(m, n, device="cuda")
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (bb, sbb), out, m_indices)
        assert_close_to_oracle(out[100:], a[100:], sa[100:], b, sb)
        assert_close_to_oracle(out[:70], a[:70], sa[:70], b.flip(0), sb)
        out3 = empty_out(2, 100, n, device="cuda")
        masked_m = torch.tensor([100, 37], dtype=torch.int32, device="cuda")
        a3, sa3 = a[:200].reshape(2, 100, k), sa[:200].reshape(2, 100, k // 128)
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3, sa3), (bb, sbb), out3, masked_m, 100)
        assert_close_to_oracle(out3[0], a[:100], sa[:100], b, sb)
        assert_close_to_oracle(out3[1, :37], a[100:137], sa[100:137], b.flip(0), sb)
