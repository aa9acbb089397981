"""fp8_gemm_nt's general form, D = C + A @ B.T (DeepGEMM's weight-gradient GEMM): fp32 or bf16 out,
c added or accumulated in place, B's scales per 128x128 block or per row (recipe (1, 1, 128)), on
every backend against python_ref, with test_gemm.py's bounds. A file of its own so that its GPU
run (new Triton variants to compile) has its own time limit in scripts/gpu_check.sh."""

import os

import pytest
import torch
import torch._dynamo.testing

import dskernels
from test_gemm import (K, OPCHECK_UTILS, _dense_args, _triton_gpu_configs, assert_close_to_bf16_product,
                       assert_close_to_oracle, grouped_weights, quantized_pair)


_ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []  # -m gpu selects these on the device


def row_scaled_pair(rows, k, device):
    """An activation-like operand for b: 1x128 scales, one per row per 128 columns."""
    return quantized_pair(rows, k, device, per_block=False, scale_layout="row")


GENERAL = [  # (out dtype, b's scales, c): every case the sm90 CUDA kernel does not cover, and the one it does
    ("float32", "row", "separate"), ("float32", "row", "in_place"), ("float32", "block", None),
    ("float32", "block", "in_place"), ("bfloat16", "row", None), ("bfloat16", "block", "separate"),
    ("bfloat16", "block", None),
]


@pytest.mark.parametrize("out_dtype,sb_kind,c_kind", GENERAL, ids=["-".join(map(str, g)) for g in GENERAL])
@pytest.mark.parametrize("m,n", [(1, 200), (7, 129), (130, 64)])
def test_fp8_gemm_nt_general(backend, m, n, out_dtype, sb_kind, c_kind):
    name, device = backend
    out_dtype = getattr(torch, out_dtype)
    x, a, sa = quantized_pair(m, K, device, per_block=False, scale_layout="tma")
    if sb_kind == "row":
        w, b, sb = row_scaled_pair(n, K, device)
    else:
        w, b, sb = quantized_pair(n, K, device, per_block=True, scale_layout="tma")
    # c of the product's size, so that neither term hides the other's errors
    c = (torch.randn(m, n, device=device) * (x @ w.T).std()).to(out_dtype) if c_kind else None
    out = c.clone() if c_kind == "in_place" else torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
    general = out_dtype == torch.float32 or sb_kind == "row" or c_kind is not None
    if name == "cuda" and general:
        with pytest.raises(NotImplementedError, match="^fp8_gemm_nt .*no CUDA kernel yet"):
            dskernels.fp8_gemm_nt((a, sa), (b, sb), out, c=out if c_kind == "in_place" else c)
        return
    dskernels.fp8_gemm_nt((a, sa), (b, sb), out, c=out if c_kind == "in_place" else c)
    assert out.dtype == out_dtype
    assert_close_to_oracle(out, a, sa, b, sb, c)
    if c is None:
        assert_close_to_bf16_product([(out, x, w)])


def test_deepgemm_v1_wgrad_gemm_and_helpers(backend):
    """DeepGEMM v1's wgrad_gemm_fp8_fp8_fp32_nt (out += A @ B.T, both 1x128, fp32 out), and the
    helpers its tests import from the package (ceil_div, calc_diff)."""
    name, device = backend
    if name == "cuda":
        pytest.skip("fp32 accumulation has no sm90 CUDA kernel (test_fp8_gemm_nt_general checks the refusal)")
    _, a, sa = quantized_pair(7, K, device, per_block=False, scale_layout="tma")
    _, b, sb = row_scaled_pair(129, K, device)
    grad = torch.randn(7, 129, device=device)
    before = grad.clone()
    dskernels.wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), grad)
    assert_close_to_oracle(grad, a, sa, b, sb, before)
    with pytest.raises(TypeError, match="^out: expected the float32 gradient"):
        dskernels.wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), grad.bfloat16())
    assert dskernels.ceil_div(129, 128) == 2 and dskernels.ceil_div(128, 128) == 1
    diff = dskernels.calc_diff(grad, grad)  # DeepGEMM's form: a 0-d float64 tensor
    assert isinstance(diff, torch.Tensor) and diff.dtype == torch.float64 and abs(diff.item()) < 1e-12
    assert dskernels.calc_diff(torch.zeros(3), torch.zeros(3)).isnan()


def test_fp8_gemm_nt_recipes_and_empty_k(backend):
    """An explicit recipe picks nothing (sb's shape does) but must agree with it; k = 0 leaves
    out = c (or zeros); n = 1 reads its one scale either way."""
    name, device = backend
    if name == "cuda":
        pytest.skip("the general form runs on Triton and the reference (test_fp8_gemm_nt_general checks the refusal)")
    _, a, sa = quantized_pair(9, K, device, per_block=False, scale_layout="row")
    _, b, sb = row_scaled_pair(30, K, device)
    out = torch.empty(9, 30, device=device)
    dskernels.fp8_gemm_nt((a, sa), (b, sb), out, recipe=(1, 1, 128))
    assert_close_to_oracle(out, a, sa, b, sb)
    with pytest.raises(ValueError, match=r"^sb: recipe \(1, 128, 128\) means one scale per 128x128 block"):
        dskernels.fp8_gemm_nt((a, sa), (b, sb), out, recipe=(1, 128, 128))
    again = torch.empty_like(out)
    dskernels.fp8_gemm_nt((a, sa), (b, sb), again, recipe_a=(1, 128), recipe_b=(1, 128))  # DeepGEMM's newer spelling
    assert torch.equal(again, out)
    c = torch.randn(9, 30, device=device)
    empty_k = torch.full((9, 30), float("nan"), device=device)
    dskernels.fp8_gemm_nt((a[:, :0], sa[:, :0]), (b[:, :0], sb[:, :0]), empty_k, c=c)
    assert torch.equal(empty_k, c)
    dskernels.fp8_gemm_nt((a[:, :0], sa[:, :0]), (b[:, :0], sb[:, :0]), empty_k)
    assert not empty_k.any()
    one = torch.empty(9, 1, device=device)
    for recipe in ((1, 1, 128), (1, 128, 128)):
        dskernels.fp8_gemm_nt((a, sa), (b[:1], sb[:1]), one, recipe=recipe)
        assert_close_to_oracle(one, a, sa, b[:1], sb[:1])


def test_fp8_gemm_nt_refuses_before_writing_c():
    """c is copied into out before the op adds to it: every refusal comes first, out untouched; a c
    that overlaps out only in part is refused by name, a view of all of out is out itself."""
    args = _dense_args()
    lhs, rhs = (args["a"], args["sa"]), (args["b"], args["sb"])
    out = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="^sa:"):
        dskernels.fp8_gemm_nt((args["a"], args["sa"][:, :1]), rhs, out, c=torch.ones(4, 8))
    with dskernels.backend("cuda"), pytest.raises(ValueError, match="'cuda' backend needs CUDA tensors"):
        dskernels.fp8_gemm_nt(lhs, rhs, out, c=torch.ones(4, 8))
    assert not out.any()
    rows = torch.zeros(6, 8)
    with pytest.raises(ValueError, match="^c: expected d itself or a tensor that shares no memory with d"):
        dskernels.fp8_gemm_nt(lhs, rhs, rows[:4], c=rows[2:])
    with pytest.raises(ValueError, match="^d: expected an output whose elements do not share memory"):
        dskernels.fp8_gemm_nt(lhs, rhs, torch.zeros(1, 8).expand(4, 8), c=torch.ones(4, 8))
    assert not rows.any()
    c = torch.randn(4, 8)
    out = c.clone()
    dskernels.fp8_gemm_nt(lhs, rhs, out, c=out[:])
    assert_close_to_oracle(out, *lhs, *rhs, c)


def test_outputs_that_share_memory_with_what_the_gemm_reads():
    """An output overlapping a scale tensor or an int32 layout (a view of the same buffer) is
    refused by name: the GEMM would read what it wrote (silently wrong rows). With c, the refusal
    comes before c is copied into the output, so the caller's scales are left as they were."""
    m, n, k = 4, 8, 128
    _, a, sa = quantized_pair(m, k, "cpu", per_block=False, scale_layout="row")
    rhs = row_scaled_pair(n, k, "cpu")[1:]
    buf = torch.zeros(m * n + 64)
    out, sa_view = buf[:m * n].view(m, n), buf[m * n - 2:m * n - 2 + m].view(m, 1)  # two floats shared
    sa_view.copy_(sa)
    before = sa_view.clone()
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with sa"):
        dskernels.fp8_gemm_nt((a, sa_view), rhs, out, c=torch.full((m, n), 7.0))
    assert torch.equal(sa_view, before)
    # fp8_einsum with c: the same, before its copy into d
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with sa"):
        dskernels.fp8_einsum("mk,nk->mn", (a, sa_view), rhs, out, c=torch.full((m, n), 9.0), recipe=(1, 1, 128))
    assert torch.equal(sa_view, before)
    # K-grouped: d over the scales of a
    ks, groups, rows = [128, 128], 2, 2
    x, y = torch.randn(sum(ks), rows), torch.randn(sum(ks), n)
    (qa, sa_k), (qb, sb_k) = (dskernels.per_channel_cast_to_fp8(t, ks) for t in (x, y))
    buf = torch.zeros(groups * rows * n + 16)
    d, scales_view = buf[:groups * rows * n].view(groups, rows, n), buf[:2 * rows].view(2, rows)
    scales_view.copy_(sa_k)
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with sa"):
        dskernels.k_grouped_fp8_gemm_tn_contiguous((qa, scales_view), (qb, sb_k), d, ks)
    # the grouped GEMMs' int32 layouts: group ids, masked counts
    b = grouped_weights(2, n, k, "cpu", "row")[1:]
    raw = torch.zeros(m * n * 2, dtype=torch.uint8)
    out_bf16, ids = raw.view(torch.bfloat16).view(m, n), raw[:m * 4].view(torch.int32)
    ids.zero_()
    with pytest.raises(ValueError, match="^out: expected an output that shares no memory with m_indices"):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), b, out_bf16, ids)
    bf = torch.randn(m, 16).bfloat16(), torch.randn(2, n, 16).bfloat16()
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with grouped_layout"):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(*bf, out_bf16, ids)


def test_bf16_gemms_record_no_gradient():
    """bf16_gemm_* and einsum are inference kernels like every op: no gradient recorded into d on
    any backend (the GPU's torch.mm(out=) would refuse one, the CPU path recorded it)."""
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    d = torch.empty(4, 8)
    dskernels.bf16_gemm_nt(a.bfloat16(), b.bfloat16(), d)
    assert d.grad_fn is None and not d.requires_grad
    dskernels.einsum("mk,nk->mn", a.bfloat16(), b.bfloat16(), d)
    assert d.grad_fn is None and not d.requires_grad


# ---- DeepGEMM's other layouts: fp8_gemm_{nn,tn,tt}, m_grouped_fp8_gemm_nn_contiguous ----

def k_outer(pair):
    """An operand and its scales as the "t"/"n" layouts hold them: [k, rows] and [k / 128, rows'],
    each contiguous (DeepGEMM's tests pass them so)."""
    return tuple(t.T.contiguous() for t in pair)


@pytest.mark.parametrize("path", ["direct", "transpose"])
@pytest.mark.parametrize("layout", ["nn", "tn", "tt"])
def test_fp8_gemm_other_layouts(backend, layout, path, monkeypatch):
    """out = A @ B with A given [k, m] ("t") and/or B given [k, n] ("n"), scales transposed with
    them, on each backend; path: the Triton kernel reads the MN-major views itself (the interpreter,
    sm_100) or the launcher copies them K-major first (Hopper), forced here by the knob."""
    name, device = backend
    monkeypatch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", path)
    if name == "triton":  # what the kernels receive: K-major copies on the transpose path
        from dskernels.triton import gemm as triton_gemm
        seen, real = [], triton_gemm._operands
        monkeypatch.setattr(triton_gemm, "_operands", lambda a, b: seen.append(real(a, b)) or seen[-1])
    m, n = 7, 129
    x, a, sa = quantized_pair(m, K, device, per_block=False, scale_layout="row")
    w, b, sb = quantized_pair(n, K, device, per_block=True, scale_layout="row")
    lhs = k_outer((a, sa)) if layout[0] == "t" else (a, sa)
    rhs = k_outer((b, sb)) if layout[1] == "n" else (b, sb)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    getattr(dskernels, f"fp8_gemm_{layout}")(lhs, rhs, out)
    assert_close_to_oracle(out, a, sa, b, sb)
    assert_close_to_bf16_product([(out, x, w)])
    if name == "triton":
        k_strides = [t.stride(-1) for t in seen[0][:2]]
        assert k_strides == [1, 1] if path == "transpose" else k_strides != [1, 1], k_strides
    if name != "cuda":  # the general form too: fp32 out accumulating into c
        c = torch.randn(m, n, device=device)
        acc = c.clone()
        getattr(dskernels, f"fp8_gemm_{layout}")(lhs, rhs, acc, c=acc)
        assert_close_to_oracle(acc, a, sa, b, sb, c)


def test_m_grouped_nn_contiguous(backend):
    """b [G, k, n] with sb [G, k / 128, ceil(n / 128)]: the nt form of their transposes."""
    _, device = backend
    m_indices = torch.tensor([1] * 20 + [-1] * 3 + [0] * 9, dtype=torch.int32, device=device)
    x, a, sa = quantized_pair(m_indices.numel(), K, device, per_block=False, scale_layout="row")
    w, b, sb = grouped_weights(2, 136, K, device, "row")
    out = torch.full((m_indices.numel(), 136), float("nan"), dtype=torch.bfloat16, device=device)
    dskernels.m_grouped_fp8_gemm_nn_contiguous((a, sa), (b.transpose(1, 2).contiguous(),
                                                         sb.transpose(1, 2).contiguous()), out, m_indices)
    for g, rows in ((1, slice(0, 20)), (0, slice(23, 32))):
        assert_close_to_oracle(out[rows], a[rows], sa[rows], b[g], sb[g])


def test_other_layouts_name_the_contraction_dimension():
    _, a, sa = quantized_pair(4, K, "cpu", per_block=False, scale_layout="row")
    _, b, sb = quantized_pair(8, 2 * K, "cpu", per_block=True, scale_layout="row")
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^b: expected k = 256 as dimension 0 \(this layout holds b as \[\.\., k, rows\]\), "
                                         r"got shape \(512, 8\)"):
        dskernels.fp8_gemm_nn((a, sa), k_outer((b, sb)), out)
    with pytest.raises(ValueError, match=r"^b: expected k = 256 \(a's first dimension in this layout\)"):
        dskernels.fp8_gemm_tt(k_outer((a, sa)), (b, sb), out)
    with pytest.raises(ValueError, match="^sa: expected a tensor of at least 2 dimensions"):
        dskernels.fp8_gemm_tn((a.T, sa[:, 0]), (b, sb), out)
    with pytest.raises(TypeError, match="^b: expected a tuple"):
        dskernels.fp8_gemm_nn((a, sa), b, out)
    weights = grouped_weights(2, 8, K, "cpu", "row")[1:]
    with pytest.raises(ValueError, match=r"^m_indices: expected shape \(4,\)"):  # the caller's name for it
        dskernels.m_grouped_fp8_gemm_nn_contiguous((a, sa), tuple(t.transpose(1, 2) for t in weights), out,
                                                   m_indices=torch.zeros(5, dtype=torch.int32))


# ---- torch.library / torch.compile ----

def _sample():
    _, a, sa = quantized_pair(9, K, "cpu", per_block=False, scale_layout="row")
    _, b, sb = row_scaled_pair(20, K, "cpu")
    return a, sa, b, sb


def test_opcheck():
    a, sa, b, sb = _sample()
    for out, accumulate in ((torch.randn(9, 20), True), (torch.zeros(9, 20, dtype=torch.bfloat16), False)):
        torch.library.opcheck(torch.ops.dskernels.fp8_gemm_nt, (a, sa, b, sb, out, accumulate),
                              test_utils=OPCHECK_UTILS)


def test_only_out_changes(backend):
    """Only `out` (the schema's Tensor(a!)) changes; the other arguments keep their bits."""
    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel for the accumulating form (test_fp8_gemm_nt_general checks the refusal)")
    args = [t.to(device) for t in _sample()]
    before = [t.clone() for t in args]
    out = torch.randn(9, 20, device=device)
    torch.ops.dskernels.fp8_gemm_nt(*args, out, True)
    for old, new in zip(before, args):
        assert torch.equal(old.view(torch.uint8) if old.dtype == torch.float8_e4m3fn else old,
                           new.view(torch.uint8) if new.dtype == torch.float8_e4m3fn else new)


def test_torch_compile_fullgraph():
    """The weight-gradient pattern: accumulate into an fp32 gradient in place, and c from elsewhere."""
    def wgrad_step(a, sa, b, sb, grad):
        dskernels.fp8_gemm_nt((a, sa), (b, sb), grad, c=grad)
        fresh = torch.empty_like(grad)
        dskernels.fp8_gemm_nt((a, sa), (b, sb), fresh, c=grad * 0.5, recipe=(1, 1, 128))
        return fresh

    a, sa, b, sb = _sample()
    grad = torch.randn(9, 20)
    eager_grad, compiled_grad = grad.clone(), grad.clone()
    expected = wgrad_step(a, sa, b, sb, eager_grad)
    actual = torch.compile(wgrad_step, fullgraph=True, backend="aot_eager")(a, sa, b, sb, compiled_grad)
    assert torch.equal(actual, expected) and torch.equal(compiled_grad, eager_grad)
    assert not torch.equal(eager_grad, grad)
    # a new k recompiles with k symbolic (dynamo's automatic dynamic shapes): the recipe check holds
    torch._dynamo.reset()
    compiled = torch.compile(wgrad_step, fullgraph=True, backend="aot_eager")
    for k in (128, 256, 384):
        _, a, sa = quantized_pair(9, k, "cpu", per_block=False, scale_layout="row")
        _, b, sb = row_scaled_pair(20, k, "cpu")
        eager_grad, compiled_grad = grad.clone(), grad.clone()
        assert torch.equal(compiled(a, sa, b, sb, compiled_grad), wgrad_step(a, sa, b, sb, eager_grad)), k
    # 128x128 block scales with n symbolic: the shape check traces (its error text is built only on
    # failure; formatting it unconditionally broke dynamo's trace)
    torch._dynamo.reset()
    plain = torch.compile(lambda lhs, rhs, out: dskernels.fp8_gemm_nt(lhs, rhs, out), fullgraph=True,
                          backend="aot_eager", dynamic=True)
    for n in (16, 24, 40):
        lhs = dskernels.per_token_cast_to_fp8(torch.randn(8, 256))
        rhs = dskernels.per_block_cast_to_fp8(torch.randn(n, 256))
        got, want = torch.empty(8, n, dtype=torch.bfloat16), torch.empty(8, n, dtype=torch.bfloat16)
        plain(lhs, rhs, got)
        dskernels.fp8_gemm_nt(lhs, rhs, want)
        assert torch.equal(got, want), n


# ---- split-K: the dense kernel on few output tiles ----

SPLITS = [(7, 129, 13, 16), (40, 64, 9, 64)]  # (m, n, K blocks, SMs): 3 uneven and 2 even K ranges


@pytest.mark.parametrize("out_dtype,sb_kind,c_kind", GENERAL, ids=["-".join(map(str, g)) for g in GENERAL])
@pytest.mark.parametrize("m,n,k_blocks,sms", [pytest.param(*case, marks=_ON_GPU) for case in SPLITS])
def test_triton_split_k(m, n, k_blocks, sms, out_dtype, sb_kind, c_kind, monkeypatch):
    """fp8_gemm_nt with its K blocks split over programs, as where its output tiles fill few of the
    GPU's SMs (here 13 blocks in ranges of 4, 4 and 5, or 9 in 4 and 5): within the oracle's bounds
    in every variant (a lost or twice-counted partial is a third or half of the sum, an added c
    counted once), and the arrival counters it was given are zero again afterwards."""
    from dskernels.triton import gemm as triton_gemm

    on_gpu = torch.cuda.is_available()  # the device's own SM count there, and the heuristic 64 x 128 tile
    monkeypatch.setattr(triton_gemm, "NO_DEVICE_SMS", sms)
    counters, arrivals = [], triton_gemm._arrival_counters
    monkeypatch.setattr(triton_gemm, "_arrival_counters",
                        lambda *args: counters.append(arrivals(*args)) or counters[-1])
    splits = []
    count = triton_gemm._SplitK.count
    monkeypatch.setattr(triton_gemm._SplitK, "count", lambda self, meta: splits.append(count(self, meta)) or splits[-1])
    device = "cuda" if on_gpu else "cpu"
    out_dtype = getattr(torch, out_dtype)
    k = k_blocks * 128
    x, a, sa = quantized_pair(m, k, device, per_block=False, scale_layout="tma")
    w, b, sb = (row_scaled_pair(n, k, device) if sb_kind == "row"
                else quantized_pair(n, k, device, per_block=True, scale_layout="tma"))
    c = (torch.randn(m, n, device=device) * (x @ w.T).std()).to(out_dtype) if c_kind else None
    out = c.clone() if c_kind == "in_place" else torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
    with dskernels.backend("triton"):
        dskernels.fp8_gemm_nt((a, sa), (b, sb), out, c=out if c_kind == "in_place" else c)
    assert max(splits) == (2 if n == 64 else 3) and len(counters) == 1
    assert not counters[0].any()
    assert_close_to_oracle(out, a, sa, b, sb, c)


@pytest.mark.parametrize("device", [pytest.param("cuda" if torch.cuda.is_available() else "cpu", marks=_ON_GPU)])
def test_split_candidate_that_does_not_split(device, monkeypatch):
    """The kernel's guard for a split candidate that meets one K range (the autotuning key's split
    counts and the pruning keep that from happening): it writes out directly, never the workspace,
    which is then empty. Simulated: the launcher decides to split, the grid has one range."""
    from dskernels.triton import gemm as triton_gemm

    counts = iter([2])
    monkeypatch.setattr(triton_gemm._SplitK, "count", lambda self, meta: next(counts, 1))
    _, a, sa = quantized_pair(7, 9 * 128, device, per_block=False, scale_layout="tma")
    _, b, sb = quantized_pair(129, 9 * 128, device, per_block=True, scale_layout="row")
    for out_dtype, c in ((torch.bfloat16, None), (torch.float32, torch.randn(7, 129, device=device))):
        counts = iter([2])
        out = c.clone() if c is not None else torch.full((7, 129), float("nan"), dtype=out_dtype, device=device)
        with dskernels.backend("triton"):
            dskernels.fp8_gemm_nt((a, sa), (b, sb), out, c=out if c is not None else None)
        assert_close_to_oracle(out, a, sa, b, sb, c)


def test_split_key_follows_the_split_counts():
    """The autotuning key's split counts: equal where every tile shape splits alike (m = 33 and 64,
    one row of tiles either way), different where the M bucket does not fix them (m = 160, 256).
    The workspace is the largest any candidate needs."""
    import triton

    from dskernels.triton import gemm as triton_gemm

    tiles = triton_gemm._split_tiles([triton.Config(dict(c.kwargs, SPLIT_K=True)) for c in triton_gemm._gpu_configs(256)])

    def key(m):
        return triton_gemm._split_plan(m, 2112, 56, 132, tiles)[0]

    assert key(33) == key(64) != key(128)
    assert key(160) != key(256)
    # m = 64: 64 x 256 tiles split 14 ways (9 tiles), the most; 64 x 64 ones have the most tiles (33)
    assert triton_gemm._split_plan(64, 2112, 56, 132, tiles)[1:] == (14 * 64 * 2112, 33)


def test_split_count():
    """_split_count on V3's decode GEMMs, 132 SMs (H100 SXM): split where few 64 x 128 tiles fill
    the SMs, at least MIN_SPLIT_BLOCKS K blocks a split; never where the tiles fill more than half."""
    from dskernels.triton.gemm import MIN_SPLIT_BLOCKS, _split_count

    assert _split_count(64, 2112, 56, 64, 128, 132) == 7  # 17 tiles: 7 splits of 8 blocks, 119 programs
    assert _split_count(64, 7168, 16, 64, 128, 132) == 2  # o_proj-like: 56 tiles, 16 K blocks
    assert _split_count(1, 576, 56, 64, 128, 132) == 14  # 5 tiles: the K blocks bound it (56 / 4)
    assert _split_count(64, 4096, 7, 64, 128, 132) == 7 // MIN_SPLIT_BLOCKS
    assert _split_count(64, 24576, 12, 64, 128, 132) == 1  # 192 tiles
    assert _split_count(4096, 7168, 56, 128, 128, 132) == 1
    assert _split_count(64, 2112, 3, 64, 128, 132) == 1  # too few K blocks to split
    assert _split_count(64, 2112, 56, 64, 128, 0) == 1  # no GPU


# ---- GPU only ----

def _weight_gradient_configs():
    from dskernels.triton.gemm import _gpu_configs

    return [pytest.param(c, id=f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-s{c.num_stages}-w{c.num_warps}")
            for c in _gpu_configs(256, sb_per_row=True)]


def _accumulate_in_place_on_gpu(m, n, k):
    """grad [m, n] fp32 += a @ b.T on Triton, both operands with per-row scales (TMA-aligned for a)."""
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    _, b, sb = row_scaled_pair(n, k, "cuda")
    c = torch.randn(m, n, device="cuda")
    grad = c.clone()
    with dskernels.backend("triton"):
        dskernels.fp8_gemm_nt((a, sa), (b, sb), grad, c=grad)
    assert_close_to_oracle(grad, a, sa, b, sb, c)


@pytest.mark.gpu
@pytest.mark.parametrize("config", _weight_gradient_configs())
def test_triton_every_weight_gradient_config(config, monkeypatch):
    """Each autotuning candidate of the per-row-scaled, accumulating kernel, forced, on odd shapes:
    per-row b scales (one per column of a 256-wide tile) summed into an fp32 out."""
    from dskernels.triton import gemm as triton_gemm

    meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
    monkeypatch.setattr(triton_gemm, "_heuristic_config", lambda *_: dict(meta))
    _accumulate_in_place_on_gpu(203, 300, 384)


@pytest.mark.gpu
def test_triton_autotuned_accumulate_adds_once(monkeypatch):
    """Autotuning runs a kernel once per candidate: one that adds to out must find out put back
    each time (the product is added once, not five times), and its tuning is kept apart from the
    plain kernel's."""
    monkeypatch.setenv("DSKERNELS_GEMM_AUTOTUNE", "1")
    _accumulate_in_place_on_gpu(512, 384, 1024)  # a weight gradient over k tokens, at a small size


def _split_k_on_gpu(m, n, k):
    """Triton's bf16 fp8_gemm_nt on the GPU at a shape it splits along K, against the oracle."""
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="tma")
    _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    with dskernels.backend("triton"):
        dskernels.fp8_gemm_nt((a, sa), (b, sb), out)
    assert_close_to_oracle(out, a, sa, b, sb)
    return a, sa, b, sb, out


@pytest.mark.gpu
def test_split_k_counters_of_many_streams_stay_bounded(monkeypatch):
    """The split-K arrival counters are kept per stream: a server that makes a stream per request
    keeps at most _MAX_ARRIVAL_STREAMS sets (the oldest dropped), and every stream's result holds."""
    from dskernels.triton import gemm as triton_gemm

    monkeypatch.setattr(triton_gemm, "_MAX_ARRIVAL_STREAMS", 4)
    for _ in range(6):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _split_k_on_gpu(37, 300, 13 * 128)
        torch.cuda.current_stream().wait_stream(stream)
    assert len(triton_gemm._ARRIVALS) <= 4
    assert not any(counters.any() for counters in triton_gemm._ARRIVALS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("config", _triton_gpu_configs())
def test_triton_every_config_split_k(config, monkeypatch):
    """Each autotuning tile, forced, with its K blocks split (m = 37, n = 300 is 2 to 5 tiles of
    them, 13 K blocks in 3 ranges): the reduction and its counters at every tile shape and warp
    count; the cached counters are zero again after it."""
    from dskernels.triton import gemm as triton_gemm

    meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
    monkeypatch.setattr(triton_gemm, "_heuristic_config", lambda *_: dict(meta))
    splits = []
    count = triton_gemm._SplitK.count
    monkeypatch.setattr(triton_gemm._SplitK, "count", lambda self, meta: splits.append(count(self, meta)) or splits[-1])
    _split_k_on_gpu(37, 300, 13 * 128)
    assert max(splits) == 3
    assert not any(counters.any() for counters in triton_gemm._ARRIVALS.values())


@pytest.mark.gpu
def test_triton_split_k_cuda_graph():
    """The split kernel captured in a CUDA graph (its counters then a fill node of the graph) and
    replayed on new activations: each replay's output is the new product."""
    a, sa, b, sb, out = _split_k_on_gpu(5, 576, 56 * 128)
    graph = torch.cuda.CUDAGraph()
    with dskernels.backend("triton"), torch.cuda.graph(graph):
        dskernels.fp8_gemm_nt((a, sa), (b, sb), out)
    for _ in range(2):
        _, new_a, new_sa = quantized_pair(5, 56 * 128, "cuda", per_block=False, scale_layout="tma")
        a.copy_(new_a), sa.copy_(new_sa)
        out.fill_(float("nan"))
        graph.replay()
        assert_close_to_oracle(out, a, sa, b, sb)


# ---- K-grouped weight gradients (DeepGEMM's k_grouped_wgrad_gemm_fp8_fp8_fp32_nt) ----

def k_grouped_operands(batch_sizes, rows, device):
    """The groups' [rows, k_g] blocks cast 1x128 along k, flattened one after another, and their
    scales transposed and stacked: [sum(k_g / 128), rows]. Also each group's (block, scales)."""
    parts = []
    for k in batch_sizes:
        if k:  # cast over whole 128-column blocks, keep k columns (and every started block's scale)
            _, q, s = quantized_pair(rows, -(-k // 128) * 128, device, per_block=False, scale_layout="row")
            q = q[:, :k].contiguous()
        else:
            q = torch.empty(rows, 0, dtype=torch.float8_e4m3fn, device=device)
            s = torch.empty(rows, 0, device=device)
        parts.append((q, s))
    flat = torch.cat([q.reshape(-1) for q, _ in parts])
    scales = torch.cat([s.T for _, s in parts]).contiguous()  # [sum(ceil(k_g / 128)), rows]
    return flat, scales, parts


def padded_to_blocks(q, s):
    """[rows, k] fp8 and its [rows, ceil(k / 128)] scales as the aligned operands they equal: zeros to
    the next multiple of 128 columns."""
    pad = s.shape[1] * 128 - q.shape[1]
    return torch.nn.functional.pad(q.view(torch.uint8), (0, pad)).view(torch.float8_e4m3fn), s


def assert_groups_close(out, before, ks, a_parts, b_parts):
    """Per group: an empty one left as before was, the others within test_gemm.py's bound of the
    dequantized product plus before[g]."""
    for g, k in enumerate(ks):
        if k == 0:
            assert torch.equal(out[g], before[g])
        else:
            (qa, s_a), (qb, s_b) = padded_to_blocks(*a_parts[g]), padded_to_blocks(*b_parts[g])
            assert_close_to_oracle(out[g], qa, s_a, qb, s_b, c=before[g])


@pytest.mark.parametrize("m,n", [(7, 200), (130, 64)])
def test_k_grouped_wgrad(backend, m, n):
    """out[g] += A_g @ B_g.T per group, with test_gemm.py's bound per group against the dequantized
    product plus the gradient accumulated before; an empty group leaves its gradient alone; a group
    of 200 tokens (not a multiple of 128) counts its 200 columns only."""
    name, device = backend
    batch_sizes = [256, 0, 200, 384]
    a, sa, a_parts = k_grouped_operands(batch_sizes, m, device)
    b, sb, b_parts = k_grouped_operands(batch_sizes, n, device)
    before = torch.randn(len(batch_sizes), m, n, device=device) * 10
    out = before.clone()
    if name == "cuda":
        with pytest.raises(NotImplementedError, match="^k_grouped_fp8_gemm: no CUDA kernel yet"):
            dskernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, batch_sizes)
        return
    dskernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, batch_sizes)
    assert_groups_close(out, before, batch_sizes, a_parts, b_parts)
    import python_ref.gemm as ref
    expected = ref.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, sa, b, sb, before, batch_sizes)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-5)


def test_k_grouped_wgrad_validation_spare_room_and_compile():
    batch_sizes = [128, 256]
    a, sa, _ = k_grouped_operands(batch_sizes, 5, "cpu")
    b, sb, _ = k_grouped_operands(batch_sizes, 3, "cpu")
    out = torch.zeros(2, 5, 3)
    call = dskernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt
    with pytest.raises(ValueError, match="^batch_sizes: expected sizes >= 0, got -128 for group 1"):
        call((a, sa), (b, sb), out, [512, -128])
    with pytest.raises(ValueError, match="^batch_sizes: expected 2 sizes"):
        call((a, sa), (b, sb), out, [384])
    with pytest.raises(TypeError, match="^batch_sizes: expected a list of ints"):
        call((a, sa), (b, sb), out, [128.0, 256])
    with pytest.raises(ValueError, match=r"^a: expected a contiguous tensor of at least 5 \* sum\(batch_sizes\) = 1920"):
        call((a[:-5], sa), (b, sb), out, batch_sizes)
    with pytest.raises(ValueError, match="^out: "):  # groups sharing memory
        call((a, sa), (b, sb), torch.zeros(1, 5, 3).expand(2, 5, 3), batch_sizes)
    with pytest.raises(ValueError, match=r"^sb: expected shape \(3, 3\)"):
        call((a, sa), (b, sb[:2]), out, batch_sizes)
    with pytest.raises(TypeError, match="^out: "):
        call((a, sa), (b, sb), out.bfloat16(), batch_sizes)
    spare = torch.cat([a, a[:7]])  # room past the groups (a preallocated buffer) is not read
    expected = out.clone()
    call((a, sa), (b, sb), expected, batch_sizes)
    also = out.clone()
    call((spare, sa), (b, sb), also, batch_sizes)
    assert torch.equal(also, expected)

    def step(a, sa, b, sb, out, sizes):
        call((a, sa), (b, sb), out, sizes)
        return out

    # MoE routing changes the sizes every step: the compiled call follows (sizes stay symbolic:
    # two compiles, static then dynamic, for any number of patterns)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for sizes in CHANGING_SIZES:
        a, sa, _ = k_grouped_operands(sizes, 5, "cpu")
        b, sb, _ = k_grouped_operands(sizes, 3, "cpu")
        want = step(a, sa, b, sb, torch.zeros(2, 5, 3), sizes)
        assert torch.equal(compiled(a, sa, b, sb, torch.zeros(2, 5, 3), sizes), want), sizes
    assert counter.frame_count <= 2, counter.frame_count


# ---- DeepGEMM's newer K-grouped names: k_grouped_fp8_gemm_{nt,tn}_contiguous ----

POISON = 0x7F  # NaN as an e4m3fn byte: any read of padding shows in the result


def grouped_layout(ks, rows, layout, device, spare=3):
    """The groups' A_g [rows, k_g] (k_grouped_operands) in DeepGEMM's two layouts, with poisoned
    room past the groups: "nt" flat data and scales [rows, blocks] (DeepGEMM passes sf.T); "tn" data
    [tokens, rows] as a strided view into a wider poisoned buffer, scales [blocks, rows]."""
    flat, scales, parts = k_grouped_operands(ks, rows, device)
    if layout == "nt":
        data = torch.cat([flat.view(torch.uint8), torch.full((spare,), POISON, dtype=torch.uint8, device=device)])
        return (data.view(torch.float8_e4m3fn), scales.T), parts
    tokens = sum(ks)
    wide = torch.full((tokens + spare, rows + 5), POISON, dtype=torch.uint8, device=device)
    if tokens:
        wide[:tokens, :rows] = torch.cat([q.T for q, _ in parts if q.shape[1]]).view(torch.uint8)
    return (wide.view(torch.float8_e4m3fn)[:, :rows], scales), parts


K_GROUPED = [("nt", "float32", "in_place", "native"), ("tn", "float32", None, "native"),
             ("tn", "float32", "separate", "native"), ("nt", "bfloat16", None, "native"),
             ("tn", "bfloat16", "in_place", "native"), ("nt", "float32", None, "bytes"), ("tn", "float32", None, "bytes")]


@pytest.mark.parametrize("layout,out_dtype,c_kind,fp8_path", K_GROUPED, ids=["-".join(map(str, g)) for g in K_GROUPED])
@pytest.mark.parametrize("device_sizes", [False, True], ids=["ks", "ks_tensor"])
def test_k_grouped_fp8_gemm(backend, layout, out_dtype, c_kind, fp8_path, device_sizes, monkeypatch):
    """d[g] = c[g] + A_g @ B_g.T per group in both layouts, each group against test_gemm.py's bound
    (from the math) on the dequantized product; groups of 0, 37 and 200 tokens (partial blocks),
    odd m and n, poisoned room past the operands, with and without ks on the device. The "bytes"
    cases take the fp8-as-bytes path (GPUs before sm_89), where the poison byte 0x7F reads as NaN
    (the interpreter's fp8 type reads it as 480): a read past a group shows there."""
    if fp8_path == "bytes":
        monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    name, device = backend
    ks, m, n = [256, 0, 37, 200], 7, 130
    (a, sa), a_parts = grouped_layout(ks, m, layout, device)
    (b, sb), b_parts = grouped_layout(ks, n, layout, device)
    out_dtype = getattr(torch, out_dtype)
    c = (torch.randn(len(ks), m, n, device=device) * 8).to(out_dtype) if c_kind else None
    d = c.clone() if c_kind == "in_place" else torch.full((len(ks), m, n), float("nan"), dtype=out_dtype, device=device)
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device=device) if device_sizes else None
    call = getattr(dskernels, f"k_grouped_fp8_gemm_{layout}_contiguous")
    c_arg = d if c_kind == "in_place" else c
    if name == "cuda":
        before = d.clone()
        with pytest.raises(NotImplementedError, match="^k_grouped_fp8_gemm: no CUDA kernel yet"):
            call((a, sa), (b, sb), d, ks, ks_tensor, c=c_arg)
        assert torch.equal(d.isnan(), before.isnan()) and torch.equal(d.nan_to_num(), before.nan_to_num())  # refused first
        return
    call((a, sa), (b, sb), d, ks, ks_tensor, c=c_arg)
    for g, k in enumerate(ks):
        if k == 0:  # an empty sum: c, or zeros
            assert torch.equal(d[g], c[g] if c is not None else torch.zeros_like(d[g]))
            continue
        (qa, s_a), (qb, s_b) = padded_to_blocks(*a_parts[g]), padded_to_blocks(*b_parts[g])
        assert_close_to_oracle(d[g], qa, s_a, qb, s_b, c=None if c is None else c[g])


def test_k_grouped_fp8_gemm_sizes_tensor_cannot_reach_past_the_operands(backend, monkeypatch, sizes_tensor_unread):
    """ks_tensor must equal ks (on CPU tensors the op checks it; not here: sizes_tensor_unread).
    One that disagrees is cut at the operands' ends (the host's sum(ks) tokens and scale rows),
    never read past them: claiming 300 + 300 tokens of 168 gives group 0
    all 168 (the blocks line up) and group 1 none; 1 + 167 would reach a third scale row, of two,
    and poisoned fp32 scales there (NaN) would show. (The kernel reading token-major operands
    itself: on Hopper the launcher would copy them, up to sum(ks), first.)"""
    monkeypatch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", "direct")
    name, device = backend
    if device == "cpu":  # the interpreter reads 0x7F as 480; the byte path makes it NaN (test_gemm.py)
        monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_k_grouped_fp8_gemm checks the refusal)")
    ks = [128, 40]
    (a, sa), _ = grouped_layout(ks, 5, "tn", device, spare=300)
    (b, sb), _ = grouped_layout(ks, 3, "tn", device, spare=300)
    a, b = a[:168], b[:168]
    d = torch.full((2, 5, 3), float("nan"), device=device)
    dskernels.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks, torch.tensor([300, 300], dtype=torch.int32,
                                                                                      device=device))
    if name == "triton":  # the reference reads ks (the oracle): only the kernel reads ks_tensor (directly here)
        import python_ref.gemm as ref
        torch.testing.assert_close(d[0], ref.k_grouped_fp8_gemm(a, sa, b, sb, [168], k_major=False)[0],
                                   atol=1e-3, rtol=1e-5)
        assert torch.equal(d[1], torch.zeros_like(d[1]))
        poisoned = [torch.full((3, rows), float("nan"), device=device) for rows in (5, 3)]
        poisoned[0][:2], poisoned[1][:2] = sa, sb
        dskernels.k_grouped_fp8_gemm_tn_contiguous((a, poisoned[0][:2]), (b, poisoned[1][:2]), d, ks,
                                                   torch.tensor([1, 167], dtype=torch.int32, device=device))
        assert torch.isfinite(d).all()
        # A negative size counts as none: every token falls to group 1
        dskernels.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks,
                                                   torch.tensor([-100, 268], dtype=torch.int32, device=device))
        assert torch.equal(d[0], torch.zeros_like(d[0]))
        torch.testing.assert_close(d[1], ref.k_grouped_fp8_gemm(a, sa, b, sb, [168], k_major=False)[0],
                                   atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nt", "tn"])
def test_k_grouped_fp8_gemm_k_major_copies(layout, monkeypatch):
    """The launcher's copies into the K-major layout with rows of k_g rounded up to 16 (zeros
    after): token-major operands on Hopper (DSKERNELS_GEMM_TOKEN_MAJOR=transpose forces it here)
    and K-major groups of any k_g; with ks_tensor rounded to match on the device."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors on Triton: needs TRITON_INTERPRET=1 (the GPU tests cover the GPU)")
    from dskernels.triton import gemm as triton_gemm

    monkeypatch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", "transpose")
    copy, copies = triton_gemm._k_major_groups, []
    monkeypatch.setattr(triton_gemm, "_k_major_groups", lambda *args, **kw: copies.append(kw) or copy(*args, **kw))
    ks, m, n = [40, 0, 128, 129], 6, 70
    (a, sa), a_parts = grouped_layout(ks, m, layout, "cpu")
    (b, sb), b_parts = grouped_layout(ks, n, layout, "cpu")
    c = torch.randn(len(ks), m, n) * 8
    d = c.clone()
    with dskernels.backend("triton"):
        getattr(dskernels, f"k_grouped_fp8_gemm_{layout}_contiguous")(
            (a, sa), (b, sb), d, ks, torch.tensor(ks, dtype=torch.int32), c=d)
    assert [kw["token_major"] for kw in copies] == [layout == "tn"] * 2  # one copy per operand
    for g, k in enumerate(ks):
        (qa, s_a), (qb, s_b) = padded_to_blocks(*a_parts[g]), padded_to_blocks(*b_parts[g])
        assert_close_to_oracle(d[g], qa, s_a, qb, s_b, c=c[g])


@pytest.mark.parametrize("path", ["direct", "transpose"])
def test_k_grouped_tn_any_strides(backend, path, monkeypatch):
    """Token-major operands stored column-major (unit stride along the tokens), and scales
    likewise: the same result as the row-major ones, on both token-major paths."""
    monkeypatch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", path)
    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_k_grouped_fp8_gemm checks the refusal)")
    ks, m, n = [130, 0, 40], 6, 33
    (a, sa), a_parts = grouped_layout(ks, m, "tn", device)
    (b, sb), b_parts = grouped_layout(ks, n, "tn", device)
    column_major = [t.T.contiguous().T for t in (a[:170], sa, b[:170], sb)]
    assert column_major[0].stride() == (1, 170)
    d = torch.full((3, m, n), float("nan"), device=device)
    dskernels.k_grouped_fp8_gemm_tn_contiguous(tuple(column_major[:2]), tuple(column_major[2:]), d, ks)
    for g, k in enumerate(ks):
        if k:
            (qa, s_a), (qb, s_b) = padded_to_blocks(*a_parts[g]), padded_to_blocks(*b_parts[g])
            assert_close_to_oracle(d[g], qa, s_a, qb, s_b)


def test_k_grouped_tn_from_per_channel_casts(backend):
    """The MoE weight gradient end to end, as training runs it: token-major activations x and
    output gradients dy, cast per channel per expert (per_channel_cast_to_fp8), then
    dW_g = dy_g.T @ x_g by the tn K-grouped GEMM: each within DeepGEMM's calc_diff < 1e-3 of the
    product of the unquantized operands."""
    from dskernels.testing import calc_diff

    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_k_grouped_fp8_gemm checks the refusal)")
    ks, m, n = [200, 0, 131, 64], 24, 40
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device=device)
    dy = torch.randn(sum(ks), m, device=device, dtype=torch.bfloat16)
    x = torch.randn(sum(ks), n, device=device, dtype=torch.bfloat16)
    grad = torch.full((len(ks), m, n), float("nan"), device=device)
    dskernels.k_grouped_fp8_gemm_tn_contiguous(dskernels.per_channel_cast_to_fp8(dy, ks, ks_tensor),
                                               dskernels.per_channel_cast_to_fp8(x, ks, ks_tensor), grad, ks, ks_tensor)
    first = 0
    for g, k in enumerate(ks):
        exact = dy[first:first + k].double().T @ x[first:first + k].double()
        if k == 0:
            assert torch.equal(grad[g], torch.zeros_like(grad[g]))
        else:
            assert calc_diff(grad[g], exact) < 1e-3, g
        first += k


def test_k_grouped_fp8_gemm_validation():
    ks = [128, 40]
    (a, sa), _ = grouped_layout(ks, 5, "tn", "cpu")
    (b, sb), _ = grouped_layout(ks, 3, "tn", "cpu")
    (an, san), _ = grouped_layout(ks, 5, "nt", "cpu")
    (bn, sbn), _ = grouped_layout(ks, 3, "nt", "cpu")
    d = torch.zeros(2, 5, 3)
    tn, nt = dskernels.k_grouped_fp8_gemm_tn_contiguous, dskernels.k_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(ValueError, match=r"^a: expected shape \(>= 168, 5\)"):
        tn((a[:100], sa), (b, sb), d, ks)
    with pytest.raises(ValueError, match=r"^sb: expected shape \(2, 3\)"):
        tn((a, sa), (b, sb[:1]), d, ks)
    with pytest.raises(ValueError, match=r"^sa: expected shape \(5, 2\)"):  # nt: DeepGEMM's sf.T
        nt((an, san.T), (bn, sbn), d, ks)
    with pytest.raises(ValueError, match=r"^b: expected a contiguous tensor of at least 3 \* sum\(ks\) = 504"):
        nt((an, san), (bn[:100], sbn), d, ks)
    with pytest.raises(TypeError, match="^ks_tensor: expected dtype int32"):
        tn((a, sa), (b, sb), d, ks, torch.tensor(ks))
    with pytest.raises(ValueError, match=r"^ks_tensor: expected shape \(2,\)"):
        tn((a, sa), (b, sb), d, ks, torch.tensor([128, 40, 0], dtype=torch.int32))
    if d.device.type == "cpu":  # (read on CPU tensors only: on a GPU it would sync)
        with pytest.raises(ValueError, match=r"^ks_tensor: expected ks's values \[128, 40\] .* got \[128, 10\]"):
            tn((a, sa), (b, sb), d, ks, torch.tensor([128, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="^ks: expected 2 sizes"):
        tn((a, sa), (b, sb), d, [168])
    with pytest.raises(ValueError, match="^ks: expected sizes >= 0, got -40 for group 1"):
        tn((a, sa), (b, sb), d, [208, -40])
    with pytest.raises(ValueError, match=r"^recipe: only \(1, 1, 128\)"):
        tn((a, sa), (b, sb), d, ks, recipe=(1, 128, 128))
    with pytest.raises(TypeError, match="^c: expected dtype float32"):
        tn((a, sa), (b, sb), d, ks, c=d.bfloat16())
    memory = torch.zeros(31)
    with pytest.raises(ValueError, match="^c: expected d itself or a tensor that shares no memory"):
        tn((a, sa), (b, sb), memory[:30].view(2, 5, 3), ks, c=memory[1:].view(2, 5, 3))
    with pytest.raises(TypeError, match="^d: expected dtype float32 or bfloat16"):
        tn((a, sa), (b, sb), d.half(), ks)
    with pytest.raises(ValueError, match=r"^a: expected shape \(>= 168, 5\)"):  # one token short
        tn((a[:167], sa), (b, sb), d, ks)
    tn((a[:168], sa), (b[:168], sb), d, ks)  # exactly enough
    memory = torch.zeros(2 * 5 * 3 + 168 * 5 // 4)  # a read from d's bytes (an fp8 view): refused
    a_in_d = memory.view(torch.uint8)[-168 * 5:].view(torch.float8_e4m3fn).view(168, 5)
    with pytest.raises(ValueError, match="^d: expected an output that shares no memory with a"):
        tn((a_in_d, sa), (b, sb), memory[-30:].view(2, 5, 3), ks)
    with pytest.raises(ValueError, match="^ks: expected 2 sizes"):  # the op itself checks too (and its fake)
        torch.ops.dskernels.k_grouped_fp8_gemm(a, sa, b, sb, d, [168], None, False, False)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (a, sa, b, sb, d)]
        with pytest.raises(ValueError, match=r"^sa: expected shape \(2, 5\)"):
            torch.ops.dskernels.k_grouped_fp8_gemm(fakes[0], fakes[1][:1], *fakes[2:], ks, None, False, False)
    c, before = torch.randn(2, 5, 3), d.clone()
    with dskernels.backend("cuda"), pytest.raises(ValueError, match="needs CUDA tensors"):
        tn((a, sa), (b, sb), d, ks, c=c)  # refused before c is copied into d
    assert torch.equal(d, before)
    with pytest.MonkeyPatch.context() as patch:  # a knob's typo raises on every path, before d is written
        patch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", "Direct")
        for layout_call, operands in ((tn, ((a, sa), (b, sb))), (nt, ((an, san), (bn, sbn)))):
            with pytest.raises(ValueError, match="^DSKERNELS_GEMM_TOKEN_MAJOR: expected 'direct' or 'transpose'"):
                layout_call(*operands, d, ks, c=c)
            assert torch.equal(d, before)
    with pytest.raises(TypeError, match="^a: expected a tuple"):
        tn(a, (b, sb), d, ks)


def _k_grouped_sample(device="cpu"):
    ks = [128, 0, 40]
    (a, sa), _ = grouped_layout(ks, 5, "tn", device)
    (b, sb), _ = grouped_layout(ks, 3, "tn", device)
    return a, sa, b, sb, torch.zeros(3, 5, 3, device=device), ks


def test_k_grouped_opcheck():
    a, sa, b, sb, d, ks = _k_grouped_sample()
    an, san = grouped_layout(ks, 5, "nt", "cpu")[0]
    bn, sbn = grouped_layout(ks, 3, "nt", "cpu")[0]
    samples = [(a, sa, b, sb, d, ks, None, False, False),
               (an, san.T, bn, sbn.T, d.clone(), ks, torch.tensor(ks, dtype=torch.int32), True, True)]
    for args in samples:
        torch.library.opcheck(torch.ops.dskernels.k_grouped_fp8_gemm.default, args, test_utils=OPCHECK_UTILS)


# Sizes for the compile tests: none 0 or 1 (torch.compile specializes those), all different.
CHANGING_SIZES = [[128 + 16 * i, 256 - 8 * i] for i in range(10)] + [[200, 184], [130, 77]]


def test_k_grouped_torch_compile_follows_sizes():
    """MoE routing changes the sizes every step: the compiled tn call follows them (fullgraph) and
    compiles at most twice (static, then dynamic), however many size patterns come (more than
    torch.compile's limit of 8 recompiles)."""
    def step(a, sa, b, sb, d, ks, ks_tensor):
        dskernels.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks, ks_tensor, c=d)
        return d

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for ks in CHANGING_SIZES:
        (a, sa), _ = grouped_layout(ks, 5, "tn", "cpu")
        (b, sb), _ = grouped_layout(ks, 3, "tn", "cpu")
        ks_tensor = torch.tensor(ks, dtype=torch.int32)
        want = step(a, sa, b, sb, torch.ones(2, 5, 3), ks, ks_tensor)
        assert torch.equal(compiled(a, sa, b, sb, torch.ones(2, 5, 3), ks, ks_tensor), want), ks
    assert counter.frame_count <= 2, counter.frame_count


def _k_grouped_on_gpu(layout, ks, m, n):
    """d += A_g @ B_g.T on Triton, CUDA tensors, against the oracle per group (empty ones unchanged)."""
    (a, sa), a_parts = grouped_layout(ks, m, layout, "cuda")
    (b, sb), b_parts = grouped_layout(ks, n, layout, "cuda")
    c = torch.randn(len(ks), m, n, device="cuda")
    d = c.clone()
    with dskernels.backend("triton"):
        getattr(dskernels, f"k_grouped_fp8_gemm_{layout}_contiguous")((a, sa), (b, sb), d, ks, c=d)
    assert_groups_close(d, c, ks, a_parts, b_parts)


@pytest.mark.gpu
@pytest.mark.parametrize("config", _weight_gradient_configs())
@pytest.mark.parametrize("mode", ["nt-aligned", "tn-direct"])
def test_triton_k_grouped_every_config(config, mode, monkeypatch):
    """Each autotuning candidate, forced, on the kernel's two layouts as it reads them: K-major
    groups of multiples of 16 tokens (DeepGEMM's layout, read in place with the alignment hints)
    and token-major operands read directly (sm_100's path, forced here); 256-, 144-, 384-token and
    empty groups, m and n not multiples of the tile, accumulated in place in fp32."""
    from dskernels.triton import gemm as triton_gemm

    meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
    monkeypatch.setattr(triton_gemm, "_heuristic_config", lambda *_: dict(meta))
    monkeypatch.setenv("DSKERNELS_GEMM_AUTOTUNE", "0")
    monkeypatch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", "direct")
    _k_grouped_on_gpu(mode[:2], [256, 0, 144, 384], 200, 300)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nt", "tn"])
def test_triton_k_grouped_copies(layout):
    """The launcher's copies into 16-aligned K-major rows on the GPU (Hopper's default for
    token-major operands; K-major groups of 131 tokens), with the heuristic tile (tests run without
    autotuning: tests/conftest.py)."""
    _k_grouped_on_gpu(layout, [256, 131, 0, 384], 200, 300)


@pytest.mark.gpu
def test_k_grouped_cuda_graph():
    """Captured with ks only (the sizes then come from fills inside the graph) and with ks_tensor:
    replays equal eager calls. (The sizes are those of the capture: the launcher plans its copies
    with ks on the host.)"""
    ks = [256, 40, 0]
    (a, sa), _ = grouped_layout(ks, 64, "tn", "cuda")
    (b, sb), _ = grouped_layout(ks, 96, "tn", "cuda")
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device="cuda")
    for sizes in (None, ks_tensor):
        eager = torch.zeros(3, 64, 96, device="cuda")
        with dskernels.backend("triton"):
            dskernels.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), eager, ks, sizes)  # warm-up too
            d = torch.full_like(eager, float("nan"))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dskernels.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, ks, sizes)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(d, eager)


def test_token_major_typo_raises_on_k_major_operands(monkeypatch):
    """The Triton launcher skips the token-major rule (a capability query) for K-major operands,
    the decode path's: a typo in its knob still raises there, as it does for transposed ones."""
    if "triton" not in dskernels.available_backends():
        pytest.skip("needs the Triton backend (TRITON_INTERPRET=1 on CPU)")
    args = _dense_args()
    monkeypatch.setenv("DSKERNELS_GEMM_TOKEN_MAJOR", "Direct")
    with dskernels.backend("triton"), pytest.raises(ValueError, match="^DSKERNELS_GEMM_TOKEN_MAJOR: expected"):
        dskernels.gemm_fp8_fp8_bf16_nt((args["a"], args["sa"]), (args["b"], args["sb"]), args["out"])
