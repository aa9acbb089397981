"""DeepGEMM's einsum entries (dskernels/ops/einsum.py): fp8_einsum on every backend and einsum (bf16)
against torch.einsum of the dequantized operands in fp64, with test_gemm.py's element bound
(bf16 or fp32 rounding of d plus fp32 summation over k; 2^-9 of the magnitudes for the FP8 tensor
cores on CUDA), odd sizes, NaN in d before the call, and the refusals by name."""

import pytest
import torch

import dskernels
import python_ref
from dskernels.testing import calc_diff
from test_gemm import OPCHECK_UTILS
from test_gemm_general import _weight_gradient_configs

_ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []  # -m gpu selects them on the device

FP8_EXPRESSIONS = [  # (expr, sizes, recipe): DeepGEMM's three, then ones only the general parse takes
    ("bhr,hdr->bhd", dict(b=5, h=3, r=256, d=100), (1, 128, 128)),  # W_UV: latent -> values
    ("bhd,hdr->bhr", dict(b=5, h=3, d=128, r=200), (1, 128, 128)),  # W_UK: query -> latent (b MN-major)
    ("bhd,bhr->hdr", dict(b=256, h=2, d=40, r=70), (1, 1, 128)),    # its weight gradient (over tokens b)
    ("bhd,bhr->hdr", dict(b=128, h=2, d=40, r=130), (1, 128, 128)),
    ("kmh,hnk->nhm", dict(k=128, m=9, h=2, n=33), (1, 128, 128)),   # every operand permuted
    ("mk,nk->mn", dict(m=7, n=65, k=256), (1, 128, 128)),           # no batch letter
    ("bhr,hdr->bhd", dict(b=1, h=1, r=128, d=1), (1, 128, 128)),    # every size 1, one K block
]
CASES = [(d, c) for d in ("bfloat16", "float32") for c in (None, "separate", "in_place")]


def quantized(word, sizes, device, *, k_letter, block_letter=None):
    """fp8 values of the dimensions word names (magnitudes varying per scale block) and their fp32
    scales: 128 elements of k_letter per scale, and 128 of block_letter too when given."""
    shape = tuple(sizes[x] for x in word)
    x = torch.randn(shape) * 2 ** (torch.rand(shape) * 2 - 1)
    amax = x.abs()
    for dim, letter in enumerate(word):  # the largest magnitude of each scale's block
        if letter in (k_letter, block_letter):
            padded = -(-sizes[letter] // 128) * 128
            amax = torch.nn.functional.pad(amax.movedim(dim, -1), (0, padded - sizes[letter]))
            amax = amax.unflatten(-1, (-1, 128)).amax(-1).movedim(-1, dim)
    scales = amax.clamp(min=1e-4) / 448  # the casts' rule
    q = (x / python_ref.gemm.dequantize_blocks(torch.ones(shape), scales)).to(torch.float8_e4m3fn)
    return q.to(device), scales.to(device)


def assert_close(d, expr, a, sa, b, sb, c=None):
    """test_gemm.assert_close_to_oracle's bound per element, from fp64 einsums of the dequantized
    operands and of their magnitudes."""
    deq_a = python_ref.gemm.dequantize_blocks(a, sa).double()
    deq_b = python_ref.gemm.dequantize_blocks(b, sb).double()
    exact, magnitude = torch.einsum(expr, deq_a, deq_b), torch.einsum(expr, deq_a.abs(), deq_b.abs())
    if c is not None:
        exact, magnitude = exact + c.double(), magnitude + c.double().abs()
    _assert_within(d, exact, magnitude, k=deq_a.numel() * deq_b.numel() // max(exact.numel(), 1))


def _assert_within(d, exact, magnitude, k, tensor_cores=None):
    assert not d.isnan().any()
    rounding = 2**-8 if d.dtype == torch.bfloat16 else 2**-24
    cuda_fp8 = d.is_cuda if tensor_cores is None else tensor_cores
    summation = 2 * (k + 8) * 2**-24 + (2**-9 if cuda_fp8 else 0.0)
    d = d.double()
    assert calc_diff(d, exact) < 2**-16
    excess = (d - exact).abs() - (exact.abs() * rounding + summation * magnitude)
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} elements off by more than the bound"


@pytest.mark.parametrize("d_dtype,c_kind", CASES, ids=[f"{d}-{c}" for d, c in CASES])
@pytest.mark.parametrize("expr,sizes,recipe", FP8_EXPRESSIONS, ids=[f"{e}-{r[1]}" for e, _, r in FP8_EXPRESSIONS])
def test_fp8_einsum(backend, expr, sizes, recipe, d_dtype, c_kind):
    name, device = backend
    a_word, rest = expr.split(",")
    b_word, d_word = rest.split("->")
    (k_letter,) = [x for x in a_word if x in b_word and x not in d_word]
    (n_letter,) = [x for x in b_word if x in d_word and x not in a_word]
    a, sa = quantized(a_word, sizes, device, k_letter=k_letter)
    b, sb = quantized(b_word, sizes, device, k_letter=k_letter, block_letter=n_letter if recipe[1] == 128 else None)
    d_dtype = getattr(torch, d_dtype)
    d_shape = tuple(sizes[x] for x in d_word)
    exact = python_ref.gemm.fp8_einsum(expr, a, sa, b, sb, torch.float32)
    c = (torch.randn(d_shape, device=device) * exact.pow(2).mean().sqrt()).to(d_dtype) if c_kind else None  # RMS-sized
    d = c.clone() if c_kind == "in_place" else torch.full(d_shape, float("nan"), dtype=d_dtype, device=device)
    general = d_dtype == torch.float32 or recipe[1] == 1 or c is not None
    if name == "cuda" and general:
        before = d.clone()
        with pytest.raises(NotImplementedError, match="^fp8_bmm_nt .*no CUDA kernel yet"):
            dskernels.fp8_einsum(expr, (a, sa), (b, sb), d, c=d if c_kind == "in_place" else c, recipe=recipe)
        assert torch.equal(d.isnan(), before.isnan()) and torch.equal(d.nan_to_num(), before.nan_to_num())
        return
    dskernels.fp8_einsum(expr, (a, sa), (b, sb), d, c=d if c_kind == "in_place" else c, recipe=recipe)
    assert d.dtype == d_dtype and d.shape == d_shape
    assert_close(d, expr, a, sa, b, sb, c)


BF16_EXPRESSIONS = [  # DeepGEMM's four, then two contracted letters with a batch one
    ("bhr,hdr->bhd", dict(b=5, h=3, r=40, d=17)), ("bhd,hdr->bhr", dict(b=5, h=3, d=24, r=33)),
    ("bhd,bhr->hdr", dict(b=70, h=2, d=9, r=11)), ("bmk,bnk->mn", dict(b=3, m=7, n=13, k=24)),
    ("xhyk,hzky->hxz", dict(x=4, h=2, y=3, k=8, z=5)),
]


@pytest.mark.parametrize("d_dtype,c_kind", CASES, ids=[f"{d}-{c}" for d, c in CASES])
@pytest.mark.parametrize("expr,sizes", [pytest.param(e, s, id=e, marks=_ON_GPU) for e, s in BF16_EXPRESSIONS])
def test_einsum(expr, sizes, d_dtype, c_kind):
    """bf16 einsum (cuBLAS on a GPU, the reference here), d = c + a . b rounded once."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a_word, rest = expr.split(",")
    b_word, d_word = rest.split("->")
    a = torch.randn(tuple(sizes[x] for x in a_word), device=device).bfloat16()
    b = torch.randn(tuple(sizes[x] for x in b_word), device=device).bfloat16()
    d_dtype = getattr(torch, d_dtype)
    d_shape = tuple(sizes[x] for x in d_word)
    c = torch.randn(d_shape, device=device).to(d_dtype) if c_kind else None
    d = c.clone() if c_kind == "in_place" else torch.full(d_shape, float("nan"), dtype=d_dtype, device=device)
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False  # fp32 sums throughout
    try:
        dskernels.einsum(expr, a, b, d, c=d if c_kind == "in_place" else c)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    exact = torch.einsum(expr, a.double(), b.double())
    magnitude = torch.einsum(expr, a.double().abs(), b.double().abs())
    if c is not None:
        exact, magnitude = exact + c.double(), magnitude + c.double().abs()
    _assert_within(d, exact, magnitude, k=a.numel() * b.numel() // exact.numel(), tensor_cores=False)


def _fp8_sample(device="cpu"):
    a, sa = quantized("bhr", dict(b=3, h=2, r=256), device, k_letter="r")
    b, sb = quantized("hdr", dict(h=2, d=20, r=256), device, k_letter="r", block_letter="d")
    return a, sa, b, sb


def test_fp8_einsum_validation():
    """Each refusal names the argument (or the letter) and what was expected, before d is written
    (d holds 7s, c ones: a copy of c into d, or a kernel's output, would show)."""
    a, sa, b, sb = _fp8_sample()
    d = torch.full((3, 2, 20), 7.0, dtype=torch.bfloat16)
    bad = [
        (dict(expr="bhr,hdr"), ValueError, "expr: expected 'a_letters,b_letters->d_letters'"),
        (dict(expr=3), TypeError, "expr: expected a str 'a_letters,b_letters->d_letters', got int"),
        (dict(expr="bhh,hdr->bhd"), ValueError, "expr: expected distinct letters for a"),
        (dict(expr="bhr,hdr->bhq"), ValueError, "expr: every letter must name"),
        (dict(expr="bhr,hdr->bd"), ValueError, "d: expected a 2-d tensor|d: expected 2 dim"),
        (dict(expr="bhrq,hdr->bhd"), ValueError, "a: expected a 4-d tensor|a: expected 4 dim"),
        (dict(d=torch.full((3, 3, 20), 7.0, dtype=torch.bfloat16)), ValueError, "expected 'h' = 2"),
        (dict(a=(a[..., :128], sa)), ValueError, "expected 'r' = 128"),
        (dict(a=(a[..., :100], sa[..., :1]), b=(b[..., :100], sb[..., :1])), ValueError, "multiple of 128"),
        (dict(a=(a, sa[..., :1])), ValueError, r"sa: expected shape \(3, 2, 2\)"),
        (dict(b=(b, sb.expand(2, 20, 2))), ValueError, r"sb: expected shape \(2, 1, 2\) \(recipe \(1, 128, 128\)"),
        (dict(recipe=(1, 1, 128)), ValueError, r"sb: expected shape \(2, 20, 2\)"),
        (dict(recipe=(128, 128, 128)), ValueError, "recipe: expected"),
        (dict(a=(a.float(), sa)), TypeError, "a: expected dtype"),
        (dict(d=torch.full((3, 2, 20), 7.0, dtype=torch.float16)), TypeError, "d: expected dtype"),
        (dict(expr="xhr,hdr,y->xhd"), ValueError, "expr: expected"),
        (dict(expr="bhr,hdr->bhrd"), ValueError, "expr: fp8_einsum takes one contracted"),
        (dict(a=a), TypeError, "a: expected a tuple"),
        (dict(c=torch.ones(3, 2, 20)), TypeError, "c: expected dtype"),
        (dict(d=torch.full((3, 1, 20), 7.0, dtype=torch.bfloat16).expand(3, 2, 20)), ValueError, "d: "),
        (dict(expr="bhé,hdé->bhd"), ValueError, "expr: expected distinct letters"),
    ]
    for change, error, message in bad:
        args = dict(expr="bhr,hdr->bhd", a=(a, sa), b=(b, sb), d=d, recipe=(1, 128, 128)) | change
        if args["expr"] == "bhr,hdr->bhrd":
            args["d"] = torch.full((3, 2, 256, 20), 7.0, dtype=torch.bfloat16)
        with pytest.raises(error, match=message):
            dskernels.fp8_einsum(args["expr"], args["a"], args["b"], args["d"], c=args.get("c"), recipe=args["recipe"])
        assert (args["d"] == 7).all()
    # c with a backend that has no kernel for the accumulating form: refused before c is copied to d
    with dskernels.backend("cuda"), pytest.raises((NotImplementedError, ValueError), match="fp8_bmm_nt"):
        dskernels.fp8_einsum("bhr,hdr->bhd", (a, sa), (b, sb), d, c=torch.ones_like(d))
    assert (d == 7).all()


def test_fp8_einsum_refuses_batches_past_the_grid():
    """A batch letter of more than 65535 batches (CUDA's second grid dimension) is refused by name."""
    a = torch.zeros(65536, 1, 128, dtype=torch.float8_e4m3fn)
    scales = torch.ones(65536, 1, 1)
    d = torch.zeros(65536, 1, 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expr: the batch letter 't' names 65536 batches"):
        dskernels.fp8_einsum("tmk,tnk->tmn", (a, scales), (a, scales), d)


def test_fp8_einsum_empty(backend):
    """A zero-sized batch, row or column dimension: nothing to compute, d stays as it is (empty)."""
    _, device = backend
    for sizes in (dict(b=0, h=2, r=128, d=20), dict(b=3, h=0, r=128, d=20), dict(b=3, h=2, r=128, d=0)):
        a, sa = quantized("bhr", sizes, device, k_letter="r")
        b, sb = quantized("hdr", sizes, device, k_letter="r", block_letter="d")
        d = torch.empty(sizes["b"], sizes["h"], sizes["d"], dtype=torch.bfloat16, device=device)
        dskernels.fp8_einsum("bhr,hdr->bhd", (a, sa), (b, sb), d)


def test_einsum_gpu_path_emulated(monkeypatch):
    """einsum's GPU path (_einsum_bmm: permute, reshape, one torch.bmm) with torch.bmm emulated in
    fp64 on CPU: every expression of test_einsum, each d dtype and c form, equals the oracle."""
    from dskernels.ops import einsum as einsum_module

    def bmm(x, y, out_dtype=None):
        assert x.dim() == y.dim() == 3 and x.dtype == y.dtype == torch.bfloat16
        return torch.matmul(x.double(), y.double()).to(out_dtype or x.dtype)

    monkeypatch.setattr(torch, "bmm", bmm)
    for expr, sizes in BF16_EXPRESSIONS:
        a_word, rest = expr.split(",")
        b_word, d_word = rest.split("->")
        a = torch.randn(tuple(sizes[x] for x in a_word)).bfloat16()
        b = torch.randn(tuple(sizes[x] for x in b_word)).bfloat16()
        roles = einsum_module._parse(expr, (a, b, torch.empty(tuple(sizes[x] for x in d_word))), ("a", "b", "d"))
        for d_dtype, c_kind in CASES:
            d_dtype = getattr(torch, d_dtype)
            d_shape = tuple(sizes[x] for x in d_word)
            c = torch.randn(d_shape).to(d_dtype) if c_kind else None
            d = c.clone() if c_kind == "in_place" else torch.full(d_shape, float("nan"), dtype=d_dtype)
            einsum_module._einsum_bmm(roles, a, b, d, d if c_kind == "in_place" else c)
            expected = python_ref.gemm.einsum(expr, a, b, torch.float64, c)
            assert torch.allclose(d.double(), expected, rtol=2**-7 if d_dtype == torch.bfloat16 else 1e-6,
                                  atol=1e-5), (expr, d_dtype, c_kind)


def test_einsum_validation():
    a, b = torch.zeros(3, 2, 8, dtype=torch.bfloat16), torch.zeros(2, 5, 8, dtype=torch.bfloat16)
    d = torch.zeros(3, 2, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="a: expected dtype"):
        dskernels.einsum("bhr,hdr->bhd", a.float(), b, d)
    with pytest.raises(ValueError, match="expected 'r' = 8"):
        dskernels.einsum("bhr,hdr->bhd", a, b[..., :4], d)
    with pytest.raises(ValueError, match="c: expected d itself or a tensor that shares no memory"):
        dskernels.einsum("bhr,hdr->bhd", a, b, d, c=d[:, :1].expand(3, 2, 5))
    dskernels.einsum("bhr,hdr->bhd", a, b, d, use_cublaslt=True)  # DeepGEMM's choice of kernel: the same here
    with pytest.raises(TypeError, match="^use_cublaslt: expected a bool"):
        dskernels.einsum("bhr,hdr->bhd", a, b, d, None, "yes")


def test_fp8_bmm_nt_opcheck():
    a, sa, b, sb = _fp8_sample()
    lhs, sa_, rhs = a.transpose(0, 1), sa.transpose(0, 1), b
    for out, accumulate, scales in [(torch.zeros(2, 3, 20, dtype=torch.bfloat16), False, sb),
                                    (torch.randn(2, 3, 20), True, sb),
                                    (torch.zeros(2, 3, 20), False, torch.rand(2, 20, 2))]:
        torch.library.opcheck(torch.ops.dskernels.fp8_bmm_nt, (lhs, sa_, rhs, scales, out, accumulate),
                              test_utils=OPCHECK_UTILS)


def test_fp8_einsum_torch_compile_fullgraph():
    """d written through permuted views inside the op (a bf16 projection, an fp32 weight gradient
    accumulated in place): compiled equals eager, bit for bit."""
    a, sa, b, sb = _fp8_sample()
    x, sx = quantized("bhd", dict(b=128, h=2, d=40), "cpu", k_letter="b")
    y, sy = quantized("bhr", dict(b=128, h=2, r=70), "cpu", k_letter="b")

    def step(a, sa, b, sb, x, sx, y, sy, grad):
        d = torch.empty(3, 2, 20, dtype=torch.bfloat16)
        dskernels.fp8_einsum("bhr,hdr->bhd", (a, sa), (b, sb), d)
        dskernels.fp8_einsum("bhd,bhr->hdr", (x, sx), (y, sy), grad, c=grad, recipe=(1, 1, 128))
        return d.float() * 2, grad

    grad = torch.randn(2, 40, 70)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(a, sa, b, sb, x, sx, y, sy, grad.clone()),
                                step(a, sa, b, sb, x, sx, y, sy, grad.clone())):
        assert torch.equal(actual, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("config", _weight_gradient_configs())
def test_triton_every_general_bmm_config(config, monkeypatch):
    """Each autotuning candidate of the masked kernel's general form, forced: MLA's weight gradient
    (per-row b scales, fp32 d accumulated in place, both operands copied K-major on Hopper)."""
    from dskernels.triton import gemm as triton_gemm

    meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
    monkeypatch.setattr(triton_gemm, "_heuristic_config", lambda *_: dict(meta))
    sizes = dict(b=384, h=3, d=200, r=130)
    x, sx = quantized("bhd", sizes, "cuda", k_letter="b")
    y, sy = quantized("bhr", sizes, "cuda", k_letter="b")
    grad = torch.randn(3, 200, 130, device="cuda")
    c = grad.clone()
    with dskernels.backend("triton"):
        dskernels.fp8_einsum("bhd,bhr->hdr", (x, sx), (y, sy), grad, c=grad, recipe=(1, 1, 128))
    assert_close(grad, "bhd,bhr->hdr", x, sx, y, sy, c)


def test_fp8_einsum_weight_gradient_from_per_channel_casts(backend):
    """MLA's weight gradient as training code would feed it: per_channel_cast_to_fp8 of the
    token-major [b, h * d] and [b, h * r] activations, viewed per head, straight into fp8_einsum."""
    name, device = backend
    if name == "cuda":
        pytest.skip("the accumulating form runs on Triton and the reference (test_fp8_einsum checks the refusal)")
    b, h, d_dim, r = 256, 3, 40, 70
    x = torch.randn(b, h * d_dim, device=device, dtype=torch.bfloat16)
    y = torch.randn(b, h * r, device=device, dtype=torch.bfloat16)
    (qx, sx), (qy, sy) = dskernels.per_channel_cast_to_fp8(x), dskernels.per_channel_cast_to_fp8(y)
    a, sa = qx.view(b, h, d_dim), sx.view(b // 128, h, d_dim)
    bb, sb = qy.view(b, h, r), sy.view(b // 128, h, r)
    grad = torch.randn(h, d_dim, r, device=device)
    c = grad.clone()
    dskernels.fp8_einsum("bhd,bhr->hdr", (a, sa), (bb, sb), grad, c=grad, recipe=(1, 1, 128))
    assert_close(grad, "bhd,bhr->hdr", a, sa, bb, sb, c)
