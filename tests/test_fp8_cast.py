"""per_token_cast_to_fp8 / per_block_cast_to_fp8 on every backend against python_ref."""

import numpy
import pytest
import torch
import torch._dynamo.testing
import triton
import triton.language as tl

import dskernels
import python_ref
from dskernels.triton.fp8_math import native_fp8, native_fp8_cast, to_e4m3_bits

SOURCE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Power-of-two (UE8M0) scales on one source dtype: the rounding happens after the fp32 conversion
# (the interpreter takes seconds per per-block case).
DTYPES_AND_SCALE_FORMATS = ([pytest.param(d, False, id=f"{str(d)[6:]}") for d in SOURCE_DTYPES]
                            + [pytest.param(torch.bfloat16, True, id="bfloat16-ue8m0")])


def random_source(rows, k, dtype, device, *, pad_cols=0):
    """Random values over several magnitudes (so groups have very different scales), optionally as
    a view with NaN-poisoned padding columns that the kernels must not read."""
    base = torch.randn(rows, k + pad_cols, device=device)
    base *= torch.logspace(-3, 3, rows, device=device).unsqueeze(1)
    base[:, k:] = float("nan")
    return base.to(dtype)[:, :k]


def assert_same_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float8_e4m3fn:
        actual, expected = actual.view(torch.uint8), expected.view(torch.uint8)
    mismatch = (actual.cpu() != expected.cpu()).sum().item()
    assert mismatch == 0, f"{mismatch} of {actual.numel()} values differ"


# (ours, the oracle) of the per-token (False) and per-block (True) casts
CASTS = {False: (dskernels.per_token_cast_to_fp8, python_ref.per_token_cast_to_fp8),
         True: (dskernels.per_block_cast_to_fp8, python_ref.per_block_cast_to_fp8)}


def assert_cast_matches_oracle(x, block):
    """The per-block (block) or per-token cast of x: the oracle's bits, scales included."""
    cast, ref = CASTS[block]
    x_fp8, x_scale = cast(x)
    ref_fp8, ref_scale = ref(x.cpu(), False)
    assert_same_bits(x_fp8, ref_fp8)
    assert_same_bits(x_scale, ref_scale)


@pytest.mark.parametrize("dtype,round_scale", DTYPES_AND_SCALE_FORMATS)
@pytest.mark.parametrize("m,k", [(1, 128), (7, 256), (61, 384), (130, 128)])
def test_per_token_cast_matches_oracle(backend, dtype, m, k, round_scale):
    _, device = backend
    x = random_source(m, k, dtype, device, pad_cols=128)  # row stride k + 128: a strided view
    x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x, round_scale=round_scale)
    ref_fp8, ref_scale = python_ref.per_token_cast_to_fp8(x.cpu(), round_scale)
    assert x_fp8.device == x.device and x_fp8.is_contiguous()
    assert x_scale.shape == (m, k // 128) and x_scale.dtype == torch.float32
    # Same operations in the same order everywhere: bit-exact, not merely close.
    assert_same_bits(x_fp8, ref_fp8)
    assert_same_bits(x_scale, ref_scale)


@pytest.mark.parametrize("pad_cols", [1, 3])
@pytest.mark.parametrize("block", [False, True])
def test_single_row_with_an_unaligned_row_stride(backend, block, pad_cols):
    """A [1, k] view of a wider buffer (a decode step's one token): its row stride is not a multiple
    of 16 bytes, which torch's contiguity ignores for one row; the sm90 kernel refused it."""
    _, device = backend
    x = random_source(1, 256, torch.bfloat16, device, pad_cols=pad_cols)
    assert x.is_contiguous() and x.stride(0) * x.element_size() % 16
    assert_cast_matches_oracle(x, block)


def _laid_out(x, layout):
    """x's values in a source of another layout, several rows (the single-row case is above)."""
    m, k = x.shape
    if layout == "base-2-bytes":  # base 2 bytes past an aligned one, rows 16-byte aligned
        buf = torch.full((m, k + 8), float("nan"), dtype=x.dtype, device=x.device)
        placed = buf[:, 1:1 + k]
    elif layout == "row-stride-259":  # (k <= 259) rows an odd count of elements apart
        placed = torch.full((m, 259), float("nan"), dtype=x.dtype, device=x.device)[:, :k]
    elif layout == "column-major":
        placed = torch.empty(k, m, dtype=x.dtype, device=x.device).T
    else:  # "expanded": one row read m times (stride 0)
        return x[:1].expand(m, k)
    placed.copy_(x)
    return placed


@pytest.mark.parametrize("layout", ["base-2-bytes", "row-stride-259", "column-major", "expanded"])
@pytest.mark.parametrize("block", [False, True])
def test_sources_of_any_layout(backend, block, layout):
    """Sources with several rows in layouts the vectorized CUDA loads cannot take as they are (a base
    only 2-byte aligned, an odd row stride, column-major, a row expanded): the same bits as the
    oracle on every backend (copied first, or read in place where the kernel allows it)."""
    _, device = backend
    x = _laid_out(random_source(5, 256, torch.bfloat16, device), layout)
    assert_cast_matches_oracle(x, block)


@pytest.mark.parametrize("round_scale", [False, True], ids=["scale", "ue8m0"])
def test_zero_and_tiny_groups_bit_exact(backend, round_scale):
    """Groups whose amax is under the 1e-4 floor (all +0, all -0, tiny values) and zeros of both
    signs inside ordinary groups: scales and e4m3 bytes (the sign of zero included) as the oracle's."""
    _, device = backend
    x = random_source(6, 512, torch.float32, device).contiguous()
    x[0, :128] = 0.0
    x[1, 128:256] = -0.0
    x[2, 256:384] = 3e-5 * torch.linspace(-1, 1, 128, device=device)
    x[3, 5], x[3, 6] = 0.0, -0.0
    x[4, :] = -0.0
    for dtype in (torch.float32, torch.bfloat16):
        for cast, ref in CASTS.values():
            got, got_scale = cast(x.to(dtype), round_scale=round_scale)
            want, want_scale = ref(x.to(dtype).cpu(), round_scale)
            assert (want.view(torch.uint8) == 0x80).any()  # the oracle keeps -0's sign
            assert_same_bits(got, want)
            assert_same_bits(got_scale, want_scale)


@pytest.mark.parametrize("dtype,round_scale", DTYPES_AND_SCALE_FORMATS)
@pytest.mark.parametrize("n,k", [(1, 128), (61, 256), (128, 128), (130, 384), (257, 128)])
def test_per_block_cast_matches_oracle(backend, dtype, n, k, round_scale):
    _, device = backend
    w = random_source(n, k, dtype, device, pad_cols=16)
    w_fp8, w_scale = dskernels.per_block_cast_to_fp8(w, round_scale=round_scale)
    ref_fp8, ref_scale = python_ref.per_block_cast_to_fp8(w.cpu(), round_scale)
    assert w_scale.shape == ((n + 127) // 128, k // 128)
    assert_same_bits(w_fp8, ref_fp8)
    assert_same_bits(w_scale, ref_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_large_casts_match_oracle(backend, dtype):
    """Shapes past one grid-stride pass of the CUDA per-token kernel (at most 8 CTAs per SM, 64
    groups of 128 per CTA and pass: 131 072 groups here, more than two passes on 132 SMs) and per-block
    casts of a whole weight with a partial last row block; strided rows."""
    name, device = backend
    if device == "cpu":
        pytest.skip("the device-sized shapes: the interpreter would take minutes")
    x = random_source(4097, 4096, dtype, device, pad_cols=128)
    x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x)
    ref_fp8, ref_scale = python_ref.per_token_cast_to_fp8(x.cpu())
    assert_same_bits(x_fp8, ref_fp8)
    assert_same_bits(x_scale, ref_scale)
    w = random_source(2100, 7168, dtype, device, pad_cols=16)
    w_fp8, w_scale = dskernels.per_block_cast_to_fp8(w, round_scale=True)
    ref_fp8, ref_scale = python_ref.per_block_cast_to_fp8(w.cpu(), True)
    assert_same_bits(w_fp8, ref_fp8)
    assert_same_bits(w_scale, ref_scale)


def test_oracle_definition():
    """The oracle itself against the rule written in API.md, one group by hand."""
    x = torch.tensor([[3.0, -7.0] + [0.5] * 126])
    x_fp8, x_scale = python_ref.per_token_cast_to_fp8(x)
    assert x_scale.item() == pytest.approx(7.0 / 448.0, rel=1e-7)
    assert x_fp8[0, 1].float().item() == -448.0  # the amax element maps to the top of the range
    dequant = x_fp8.float() * x_scale
    # e4m3 keeps 3 mantissa bits: relative error of round-to-nearest at most 2^-4.
    assert torch.all((dequant - x).abs() <= x.abs() * 2**-4)
    tiny_fp8, tiny_scale = python_ref.per_token_cast_to_fp8(torch.zeros(1, 128))
    assert tiny_scale.item() == pytest.approx(1e-4 / 448.0) and tiny_fp8.float().abs().max() == 0


def test_oracle_definition_round_scale():
    """UE8M0 scales by hand: amax / 448 rounded up to a power of two, kept when it is one already."""
    x = torch.tensor([[8.0, -3.0] + [0.5] * 126, [7.0] + [1.0] * 127])
    x_fp8, x_scale = python_ref.per_token_cast_to_fp8(x, round_scale=True)
    assert x_scale[0].item() == 2**-5 and x_fp8[0, 0].float().item() == 256.0  # 8 / 448 -> 1/32
    assert x_scale[1].item() == 2**-6 and x_fp8[1, 0].float().item() == 448.0  # 7 / 448 = 1/64 exactly
    assert torch.equal(x_fp8[0, 1:].float(), x[0, 1:] * 32)  # powers of two: every value exact here
    tiny_fp8, tiny_scale = python_ref.per_token_cast_to_fp8(torch.zeros(1, 128), round_scale=True)
    assert tiny_scale.item() == 2**-22 and tiny_fp8.float().abs().max() == 0  # 1e-4 / 448 = 2.2e-7
    w_fp8, w_scale = python_ref.per_block_cast_to_fp8(torch.full((3, 128), 96.0), round_scale=True)
    assert w_scale.item() == 0.25 and (w_fp8.float() == 384.0).all()  # 96 / 448 -> 1/4


def test_deepgemm_keywords():
    """DeepGEMM's helper spells round_scale use_ue8m0 (and takes gran_k): the same casts."""
    x = random_source(3, 256, torch.bfloat16, "cpu")
    for op in (dskernels.per_token_cast_to_fp8, dskernels.per_block_cast_to_fp8):
        for flag in (False, True):
            for got, want in zip(op(x, use_ue8m0=flag, gran_k=128), op(x, round_scale=flag)):
                assert_same_bits(got, want)
            for got, want in zip(op(x, flag, 128), op(x, round_scale=flag)):  # DeepGEMM's positional order
                assert_same_bits(got, want)
    tokens = random_source(256, 200, torch.bfloat16, "cpu")
    for flag in (False, True):  # per_channel: DeepGEMM's helper takes (x, use_ue8m0, gran_k)
        for got, want in zip(dskernels.per_channel_cast_to_fp8(tokens, flag, 128),
                             dskernels.per_channel_cast_to_fp8(tokens, round_scale=flag)):
            assert_same_bits(got, want)
    with pytest.raises(TypeError, match="^use_ue8m0: given twice"):
        dskernels.per_channel_cast_to_fp8(tokens, True, use_ue8m0=True)
    dskernels.per_token_cast_to_fp8(x, use_packed_ue8m0=False)
    with pytest.raises(ValueError, match="^use_packed_ue8m0: the scales are fp32 here"):
        dskernels.per_token_cast_to_fp8(x, use_packed_ue8m0=True)
    with pytest.raises(ValueError, match="^use_ue8m0: DeepGEMM's name for round_scale; got use_ue8m0=False"):
        dskernels.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=False)  # (used to round anyway)
    for got, want in zip(dskernels.per_token_cast_to_fp8(x, round_scale=numpy.bool_(True)),
                         dskernels.per_token_cast_to_fp8(x, round_scale=True)):  # numpy's bool, as DeepGEMM takes it
        assert_same_bits(got, want)
    with pytest.raises(TypeError, match="^round_scale: expected a bool, got int"):
        dskernels.per_token_cast_to_fp8(x, round_scale=1)


def test_deepgemm_utils_module():
    """deep_gemm.utils's names under dskernels.utils: the same casts, align, ceil_to_ue8m0."""
    import dskernels.utils as utils

    assert utils.per_token_cast_to_fp8 is dskernels.per_token_cast_to_fp8
    assert utils.per_custom_dims_cast_to_fp8 is dskernels.per_custom_dims_cast_to_fp8
    assert (utils.align(130, 128), utils.align(128, 128), utils.ceil_div(5, 2)) == (256, 128, 3)
    scales = torch.tensor([0.3, -3.0, 4.0, 1e-30, 2.0 ** -126])
    assert utils.ceil_to_ue8m0(scales).tolist() == [0.5, 4.0, 4.0, 2.0 ** -99, 2.0 ** -126]
    # Subnormals: their own powers of two (the exponent bits alone gave 2^-126 for all of them).
    tiny = torch.tensor([2.0 ** -130, 2.0 ** -127, 1e-40, 3 * 2.0 ** -149, 2.0 ** -149, 0.0, 2.0 ** -126 * 0.75])
    assert utils.ceil_to_ue8m0(tiny).tolist() == [2.0 ** -130, 2.0 ** -127, 2.0 ** -132, 2.0 ** -147, 2.0 ** -149,
                                                  0.0, 2.0 ** -126]
    with pytest.raises(TypeError, match="^x: expected a float32 tensor"):
        utils.ceil_to_ue8m0(scales.double())


def _same_with_nan(actual, expected, what):
    """Equal values, NaN where the reference has NaN (its sign and payload bits aside)."""
    actual, expected = actual.cpu().float(), expected.float()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    keep = ~expected.isnan()
    assert torch.equal(actual[keep], expected[keep]), f"{what}: values differ"


@pytest.mark.parametrize("dtype,round_scale", DTYPES_AND_SCALE_FORMATS)
def test_nan_makes_its_group_nan(backend, dtype, round_scale):
    # A NaN in a group gives that group a NaN scale and NaN values, as the reference does, on every
    # backend (a plain max would skip it on a GPU: a finite scale, and 448 in place of the NaN).
    _, device = backend
    x = random_source(9, 384, dtype, device)
    x[2, 130] = float("nan")
    x[7, 0] = float("nan")
    x[4, 300], x[5, 1] = float("inf"), -float("inf")  # scale inf: the inf becomes NaN, the rest 0
    got, got_scale = dskernels.per_token_cast_to_fp8(x, round_scale=round_scale)
    want, want_scale = python_ref.per_token_cast_to_fp8(x.cpu(), round_scale)
    assert want_scale.isnan().sum() == 2 and want.float().isnan().sum() == 258
    assert want_scale.isinf().sum() == 2 and want[5, 1].float().isnan() and (want[5, 2:128].float() == 0).all()
    assert (want.view(torch.uint8)[want.float().isnan()] == 0x7F).all()  # one NaN byte
    _same_with_nan(got_scale, want_scale, "per-token scales")
    _same_with_nan(got, want, "per-token values")
    w = random_source(130, 256, dtype, device)
    w[129, 200] = float("nan")  # in the partial last row block
    got, got_scale = dskernels.per_block_cast_to_fp8(w, round_scale=round_scale)
    want, want_scale = python_ref.per_block_cast_to_fp8(w.cpu(), round_scale)
    assert want_scale.isnan().sum() == 1
    _same_with_nan(got_scale, want_scale, "per-block scales")
    _same_with_nan(got, want, "per-block values")


@triton.jit
def _e4m3_bits_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, NATIVE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, to_e4m3_bits(tl.load(x_ptr + offs, mask=ok, other=0.0), NATIVE), mask=ok)


@pytest.mark.parametrize("native", [False, True], ids=["integer", "native"])
def test_e4m3_bits_rounds_like_torch(backend, native):
    """The Triton casts' fp32 -> e4m3 bits, both ways: integer arithmetic (e4m3_bits: the
    interpreter, GPUs without an fp8 type) and the GPU's own conversion (native_fp8_cast): every
    e4m3 value, every tie between neighbours (to even) and the fp32 values just beside each tie give
    torch's bits; past 448 they saturate (torch gives NaN from 464 on), NaN gives 0x7F."""
    name, device = backend
    if name != "triton":
        pytest.skip("to_e4m3_bits is the Triton kernels' helper")
    if native and not native_fp8_cast(torch.device(device)):
        pytest.skip("the GPU's e4m3 conversion: sm_90+ GPUs only (the interpreter's rounds wrongly)")
    values = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    ties = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, ties, torch.nextafter(ties, torch.tensor(1e9)), torch.nextafter(ties, torch.tensor(0.0)),
                   torch.tensor([2.0**-11, 1e-30, 463.9, 464.0])])
    x = torch.cat([x, -x, torch.tensor([500.0, -1e30, float("inf"), float("nan")])])
    out = torch.empty(x.numel(), dtype=torch.uint8, device=device)
    _e4m3_bits_kernel[(triton.cdiv(x.numel(), 256),)](x.to(device), out, x.numel(), BLOCK=256, NATIVE=native)
    out = out.cpu()
    finite = x.abs() <= 464
    assert torch.equal(out[finite], x[finite].to(torch.float8_e4m3fn).view(torch.uint8))
    assert out[~finite].tolist() == [0x7E, 0xFE, 0x7E, 0x7F]


def test_native_fp8_rule(monkeypatch):
    """Triton kernels read fp8 as fp8 only where Triton has the type (sm_89+, the interpreter)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    device = torch.device("cuda", 0)
    for capability, native in [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=capability: c)
        assert native_fp8(device) == native, capability
    monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    assert not native_fp8(device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not native_fp8(device)
    monkeypatch.delenv("DSKERNELS_TRITON_NATIVE_FP8")
    assert native_fp8(device)
    # The casts round with the GPU's conversion from sm_90 on, never under the interpreter.
    assert not native_fp8_cast(device)
    monkeypatch.delenv("TRITON_INTERPRET")
    # (sm_89: Triton's fp32 -> e4m3 cast goes through fp16 rounded toward zero, a double rounding)
    for capability, native in [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=capability: c)
        assert native_fp8_cast(device) == native, capability


@pytest.mark.parametrize("round_scale", [False, True], ids=["scale", "ue8m0"])
def test_dequantized_error_bound(backend, round_scale):
    _, device = backend
    x = random_source(33, 512, torch.float32, device)
    x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x, round_scale=round_scale)
    if round_scale:  # powers of two, at most 2x the plain scale (the values use half the fp8 range at worst)
        assert torch.equal(x_scale, python_ref.fp8.ceil_to_power_of_two(x_scale))
        plain = x.reshape(33, 4, 128).abs().amax(-1).clamp(min=1e-4) / 448
        assert ((x_scale >= plain) & (x_scale < 2 * plain)).all()
    dequant = x_fp8.float() * x_scale.repeat_interleave(128, dim=1)
    # Half an e4m3 ulp: 2^-4 relative for normals, plus the subnormal spacing 2^-9 * scale.
    bound = x.abs() * 2**-4 + x_scale.repeat_interleave(128, dim=1) * 2**-10
    assert torch.all((dequant - x).abs() <= bound)


def test_empty_inputs(backend):
    _, device = backend
    x_fp8, x_scale = dskernels.per_token_cast_to_fp8(torch.empty(0, 256, device=device))
    assert x_fp8.shape == (0, 256) and x_scale.shape == (0, 2)
    w_fp8, w_scale = dskernels.per_block_cast_to_fp8(torch.empty(0, 128, device=device))
    assert w_fp8.shape == (0, 128) and w_scale.shape == (0, 1)
    # k = 0 (torch gives [m, 0] strides (1, 1), which the CUDA launcher's row alignment refused)
    for dtype in (torch.bfloat16, torch.float32):
        x_fp8, x_scale = dskernels.per_token_cast_to_fp8(torch.empty(4, 0, device=device, dtype=dtype))
        assert x_fp8.shape == (4, 0) and x_scale.shape == (4, 0)
        w_fp8, w_scale = dskernels.per_block_cast_to_fp8(torch.empty(130, 0, device=device, dtype=dtype))
        assert w_fp8.shape == (130, 0) and w_scale.shape == (2, 0)


@pytest.mark.parametrize("op", [dskernels.per_token_cast_to_fp8, dskernels.per_block_cast_to_fp8])
@pytest.mark.parametrize("bad,error,words", [
    (torch.randn(4, 100), ValueError, ["multiple of 128", "100"]),
    (torch.randn(4, 128).to(torch.int32), TypeError, ["dtype", "int32"]),
    (torch.randn(2, 4, 128), ValueError, ["2 dimensions", "(2, 4, 128)"]),
    (torch.randn(128), ValueError, ["2 dimensions"]),
])
def test_bad_input_is_named(op, bad, error, words):
    with pytest.raises(TypeError, match="^round_scale: expected a bool, got str"):
        op(torch.randn(4, 128), round_scale="ue8m0")
    with pytest.raises(ValueError, match="^gran_k: only 128"):
        op(torch.randn(4, 128), gran_k=32)
    name = "x" if op is dskernels.per_token_cast_to_fp8 else "w"
    with pytest.raises(error) as info:
        op(bad)
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    for word in words:
        assert word in message


def test_opcheck():
    x = random_source(7, 256, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.dskernels.per_token_cast_to_fp8, (x,))
    torch.library.opcheck(torch.ops.dskernels.per_block_cast_to_fp8, (x,))
    torch.library.opcheck(torch.ops.dskernels.per_token_cast_to_fp8, (x, True))
    torch.library.opcheck(torch.ops.dskernels.per_block_cast_to_fp8, (x, True))
    column_major = random_source(256, 6, torch.bfloat16, "cpu").t()  # outputs row-major all the same
    torch.library.opcheck(torch.ops.dskernels.per_token_cast_to_fp8, (column_major,))
    assert dskernels.per_token_cast_to_fp8(column_major)[0].is_contiguous()


def test_torch_compile_fullgraph():
    def quantize_both(x, w):
        x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x)
        w_fp8, w_scale = dskernels.per_block_cast_to_fp8(w, round_scale=True)
        return x_fp8.float() * x_scale.repeat_interleave(128, 1), w_fp8, w_scale

    compiled = torch.compile(quantize_both, fullgraph=True, backend="aot_eager")
    x = random_source(5, 256, torch.bfloat16, "cpu")
    w = random_source(130, 256, torch.bfloat16, "cpu")
    for actual, expected in zip(compiled(x, w), quantize_both(x, w)):
        assert_same_bits(actual, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_cuda_graph_capture(name):
    """Each GPU backend forced (`auto` takes one of them: the other's launcher would go uncaptured)."""
    if name not in dskernels.available_backends():
        pytest.skip(f"backend {name!r} is not available here")
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    with dskernels.backend(name):
        dskernels.per_token_cast_to_fp8(x)  # warm up (Triton compile, lazy init) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref_fp8, ref_scale = python_ref.per_token_cast_to_fp8(x.cpu())
    assert_same_bits(x_fp8, ref_fp8)
    assert_same_bits(x_scale, ref_scale)


# ---- per_channel_cast_to_fp8: 128 tokens x 1 column per scale, per group of tokens ----

CHANNEL_CASES = [  # (ks, tokens, h, source dtype, power-of-two scales, ks_tensor given)
    (None, 130, 70, torch.bfloat16, False, False), ([128, 0, 37, 200, 1], 366, 5, torch.bfloat16, False, True),
    ([128, 0, 37, 200, 1], 366, 5, torch.float32, True, False), ([0, 256], 256, 129, torch.float16, False, True)]


@pytest.mark.parametrize("ks,tokens,h,dtype,round_scale,device_sizes", CHANNEL_CASES,
                         ids=["one-group", "groups-ks_tensor", "groups-fp32-ue8m0", "empty-first-fp16"])
def test_per_channel_cast_matches_oracle(backend, ks, tokens, h, dtype, round_scale, device_sizes):
    """Bit for bit against the oracle: odd widths, a strided source with NaN-poisoned padding
    columns, groups of 0, 1, 37 (partial blocks), 128 and 200 tokens."""
    name, device = backend
    x = random_source(tokens, h, dtype, device, pad_cols=8)
    x[:, h // 2] = 0  # an all-zero column: its scales are the floor, 1e-4 / 448
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device=device) if device_sizes else None
    if name == "cuda":
        with pytest.raises(NotImplementedError, match="^per_channel_cast_to_fp8: no CUDA kernel yet"):
            dskernels.per_channel_cast_to_fp8(x, ks, ks_tensor, round_scale=round_scale)
        return
    x_fp8, x_scale = dskernels.per_channel_cast_to_fp8(x, ks, ks_tensor, round_scale=round_scale)
    ref_fp8, ref_scale = python_ref.per_channel_cast_to_fp8(x.cpu(), ks, round_scale)
    blocks = sum(-(-k // 128) for k in (ks or [tokens]))
    assert x_fp8.is_contiguous() and x_scale.shape == (blocks, h) and x_scale.dtype == torch.float32
    assert_same_bits(x_fp8, ref_fp8)
    assert_same_bits(x_scale, ref_scale)


def test_per_channel_oracle_definition():
    """The oracle is the per-token cast of the transpose, one group at a time (each group's first
    token starting a block; a partial block's amax over the tokens it has)."""
    x = random_source(300, 6, torch.float32, "cpu")
    x[:40, 3] = 0
    ks = [40, 260]
    q, s = python_ref.per_channel_cast_to_fp8(x, ks)
    assert s[0, 3].item() == pytest.approx(1e-4 / 448)  # the floor of an all-zero block
    first = 0
    for k, rows in zip(ks, ([0], [1, 2, 3])):
        padded = torch.zeros(6, -(-k // 128) * 128)
        padded[:, :k] = x[first:first + k].T
        q_g, s_g = python_ref.per_token_cast_to_fp8(padded)
        assert_same_bits(q[first:first + k], q_g[:, :k].T.contiguous())
        assert_same_bits(s[rows], s_g.T.contiguous())
        first += k


@pytest.mark.parametrize("claimed", [[300, 300], [-200, 368]], ids=["too-many", "negative"])
def test_per_channel_sizes_tensor_cannot_reach_past_x(backend, claimed, sizes_tensor_unread):
    """ks_tensor must equal ks (on CPU tensors the op checks it; not here: sizes_tensor_unread);
    one claiming 300 + 300 tokens of 168 is cut at x's end, a negative size counts as 0: the
    NaN-poisoned rows before and after x (a view into a longer buffer) are never read, and here the
    blocks happen to line up with the true groups, so the result is the oracle's. (The ks_tensor
    is strided, too.)"""
    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_per_channel_cast_matches_oracle checks the refusal)")
    buffer = torch.full((700, 9), float("nan"), device=device)
    buffer[300:468] = random_source(168, 9, torch.float32, device)
    x = buffer[300:468]
    strided = torch.tensor([claimed[0], 0, claimed[1], 0], dtype=torch.int32, device=device)[::2]
    x_fp8, x_scale = dskernels.per_channel_cast_to_fp8(x, [128, 40], strided)
    ref_fp8, ref_scale = python_ref.per_channel_cast_to_fp8(x.cpu(), [128, 40])
    assert_same_bits(x_fp8, ref_fp8)
    assert_same_bits(x_scale, ref_scale)


def test_per_channel_any_strides(backend):
    """Column-major sources and a strided single column give the contiguous source's bits."""
    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_per_channel_cast_matches_oracle checks the refusal)")
    x = random_source(200, 7, torch.bfloat16, device)
    for source in (x.T.contiguous().T, x[:, 3:4], torch.stack([x[:, 2], x[:, 2]], dim=1)[:, ::2]):
        assert_same_bits(dskernels.per_channel_cast_to_fp8(source, [72, 128])[0],
                         python_ref.per_channel_cast_to_fp8(source.cpu().contiguous(), [72, 128])[0])


def test_per_channel_bad_input_is_named():
    x = torch.randn(168, 8)
    cases = [((x, [128, 41]), ValueError, "^ks: expected sizes summing to x's 168 tokens, got 169"),
             ((x, [208, -40]), ValueError, "^ks: expected sizes >= 0, got -40 for group 1"),
             ((x, [128.0, 40]), TypeError, "^ks: expected a list of ints"),
             ((x, None, torch.tensor([168], dtype=torch.int32)), ValueError, "^ks_tensor: expected None when ks"),
             ((x, [128, 40], torch.tensor([128, 40])), TypeError, "^ks_tensor: expected dtype int32"),
             ((x, [128, 40], torch.tensor([168], dtype=torch.int32)), ValueError, r"^ks_tensor: expected shape \(2,\)"),
             ((x, [128, 40], torch.tensor([40, 128], dtype=torch.int32)), ValueError,
              r"^ks_tensor: expected ks's values \[128, 40\]"),
             ((x, [128, 40], torch.tensor([128, 40], dtype=torch.int32, device="meta")), ValueError,
              "^ks_tensor: expected a tensor on cpu"), ((x, [True, 167]), TypeError, "^ks: expected a list of ints"),
             ((x.int(),), TypeError, "^x: expected dtype"), ((x[None],), ValueError, "^x: expected 2 dimensions")]
    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            dskernels.per_channel_cast_to_fp8(*args)


def test_per_channel_opcheck_and_compile():
    x = random_source(200, 5, torch.bfloat16, "cpu")
    ks = [72, 64, 64]  # 3 scale rows, where one group of 200 tokens would have 2: the fake must count per group
    torch.library.opcheck(torch.ops.dskernels.per_channel_cast_to_fp8, (x,))
    torch.library.opcheck(torch.ops.dskernels.per_channel_cast_to_fp8, (x, ks, torch.tensor(ks, dtype=torch.int32), True))

    def cast(x, ks):  # the experts' token counts change every step: they stay symbolic
        return dskernels.per_channel_cast_to_fp8(x, ks)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(cast, fullgraph=True, backend=counter)
    for i in range(10):  # more patterns than torch.compile's 8 recompiles; none 0 or 1 (specialized)
        ks = [72 + i, 100 - 2 * i, 28 + i]
        for actual, expected in zip(compiled(x, ks), cast(x, ks)):
            assert_same_bits(actual, expected)
    assert counter.frame_count <= 2, counter.frame_count


def test_per_channel_nan_makes_its_block_nan(backend):
    """A NaN makes its (128-token block, column) scale and values NaN, and nothing else."""
    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_per_channel_cast_matches_oracle checks the refusal)")
    x = random_source(200, 3, torch.float32, device)
    x[150, 1] = float("nan")  # group 1 (tokens 72..199), its block 0 (72..199 is one block), column 1
    x_fp8, x_scale = dskernels.per_channel_cast_to_fp8(x, [72, 128])
    nan = x_scale.isnan()
    assert nan[1, 1] and nan.sum() == 1
    values_nan = x_fp8.float().isnan()
    assert values_nan[72:, 1].all() and values_nan.sum() == 128


# ---- silu_and_mul_cast_to_fp8: a SwiGLU expert's activation, cast in the same pass ----

def assert_silu_and_mul_cast(x, act_fp8, act_scale, rows=None, round_scale=False):
    """Against the exact activation silu(gate) * up (fp64): each value within e4m3's rounding of
    it (2^-4 relative, or half the smallest subnormal step, 2^-10, times the scale), the scales
    within a few fp32 ulps of the oracle's (a GPU's exponential may move silu's last bits, and
    with them an amax; a power-of-two scale moves only if amax / 448 sits on a power of two). rows:
    the rows of each group to check (masked layout)."""
    _, ref_scale = python_ref.silu_and_mul_cast_to_fp8(x.cpu(), round_scale)
    gate, up = x.cpu().double().chunk(2, dim=-1)
    act = gate * torch.sigmoid(gate) * up
    deq = act_fp8.cpu().double() * act_scale.cpu().double().repeat_interleave(128, dim=-1)
    scale = act_scale.cpu().double().repeat_interleave(128, dim=-1)
    ok = (deq - act).abs() <= 2**-4 * act.abs() + 2**-10 * scale + 2**-20 * act.abs()
    scale_ok = (act_scale.cpu().double() - ref_scale.double()).abs() <= 2**-20 * ref_scale.double()
    if rows is not None:
        valid = torch.arange(x.shape[1])[None, :] < torch.tensor(rows)[:, None]
        ok, scale_ok = ok[valid], scale_ok[valid]
    assert ok.all(), f"{(~ok).sum().item()} values off"
    assert scale_ok.all(), f"{(~scale_ok).sum().item()} scales off"


@pytest.mark.parametrize("dtype,round_scale", DTYPES_AND_SCALE_FORMATS)
def test_silu_and_mul_cast(backend, dtype, round_scale):
    """The contiguous layout [M, 2I] (a strided view with NaN padding) and the masked one
    [G, M, 2I] with rows past masked_m NaN-poisoned (skipped); on the reference backend bit for
    bit per_token_cast_to_fp8 of the fp32 activation (its definition)."""
    name, device = backend
    x = random_source(37, 512, dtype, device, pad_cols=16)
    masked = torch.randn(3, 20, 256, device=device).to(dtype)
    counts = [5, 0, 20]
    for g, rows in enumerate(counts):
        masked[g, rows:] = float("nan")
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    if name == "cuda":
        with pytest.raises(NotImplementedError, match="^silu_and_mul_cast_to_fp8: no CUDA kernel yet"):
            dskernels.silu_and_mul_cast_to_fp8(x)
        return
    act_fp8, act_scale = dskernels.silu_and_mul_cast_to_fp8(x, round_scale=round_scale)
    assert act_fp8.shape == (37, 256) and act_scale.shape == (37, 2) and act_fp8.is_contiguous()
    assert_silu_and_mul_cast(x, act_fp8, act_scale, round_scale=round_scale)
    if name == "ref":
        gate, up = x.float().chunk(2, dim=-1)
        expected = python_ref.per_token_cast_to_fp8(torch.nn.functional.silu(gate) * up, round_scale)
        assert_same_bits(act_fp8, expected[0])
        assert_same_bits(act_scale, expected[1])
    masked_fp8, masked_scale = dskernels.silu_and_mul_cast_to_fp8(masked, masked_m)
    assert masked_fp8.shape == (3, 20, 128) and masked_scale.shape == (3, 20, 1)
    assert_silu_and_mul_cast(masked, masked_fp8, masked_scale, rows=counts)


def test_silu_and_mul_cast_masked_rows_untouched_and_empty_inputs(backend):
    """The Triton kernel neither reads nor writes rows past masked_m (outputs preset to a sentinel
    keep it there: the op's own outputs are new tensors, so its launcher is called directly), and
    every backend takes zero rows, zero groups and zero columns."""
    name, device = backend
    if name == "cuda":
        pytest.skip("no CUDA kernel (test_silu_and_mul_cast checks the refusal)")
    for shape in ((0, 256), (4, 0), (2, 0, 256), (0, 3, 256)):
        fp8, scale = dskernels.silu_and_mul_cast_to_fp8(torch.zeros(shape, device=device))
        assert fp8.shape == (*shape[:-1], shape[-1] // 2) and scale.shape == (*shape[:-1], shape[-1] // 256)
    if name != "triton":
        return
    from dskernels.triton import fp8_cast

    x = torch.randn(3, 20, 256, device=device)
    counts = [5, 0, 20]
    out = torch.full((3, 20, 128), 0x55, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    scale = torch.full((3, 20, 1), -7.0, device=device)
    fp8_cast.silu_and_mul_cast_to_fp8(x, out, scale, torch.tensor(counts, dtype=torch.int32, device=device), False)
    for g, rows in enumerate(counts):
        assert (out[g, rows:].view(torch.uint8) == 0x55).all() and (scale[g, rows:] == -7).all()
        assert (scale[g, :rows] > 0).all()


def test_silu_and_mul_cast_bad_input_opcheck_and_compile():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"^x: expected the last dimension \(2I: gate and up, I % 128 == 0\) to be a "
                                         r"multiple of 256, got 128"):
        dskernels.silu_and_mul_cast_to_fp8(x[:, :128])
    with pytest.raises(ValueError, match=r"^x: expected \[M, 2I\] or \[G, M, 2I\], got shape \(256,\)"):
        dskernels.silu_and_mul_cast_to_fp8(x[0])
    with pytest.raises(ValueError, match="^masked_m: only with a 3-dimensional x"):
        dskernels.silu_and_mul_cast_to_fp8(x, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^masked_m: expected shape \(2,\)"):
        dskernels.silu_and_mul_cast_to_fp8(x.view(2, 2, 256), torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="^masked_m: expected dtype int32"):
        dskernels.silu_and_mul_cast_to_fp8(x.view(2, 2, 256), torch.ones(2))
    with pytest.raises(TypeError, match="^x: expected dtype bfloat16 or float16 or float32"):
        dskernels.silu_and_mul_cast_to_fp8(x.double())
    with pytest.raises(TypeError, match="^round_scale: expected a bool"):
        dskernels.silu_and_mul_cast_to_fp8(x, round_scale=1)
    masked_m = torch.tensor([1, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dskernels.silu_and_mul_cast_to_fp8, (x.bfloat16(),))
    torch.library.opcheck(torch.ops.dskernels.silu_and_mul_cast_to_fp8, (x.view(2, 2, 256), masked_m, True))
    torch.library.opcheck(torch.ops.dskernels.silu_and_mul_cast_to_fp8, (torch.randn(256, 5).T,))
    compiled = torch.compile(dskernels.silu_and_mul_cast_to_fp8, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(x), dskernels.silu_and_mul_cast_to_fp8(x)):
        assert_same_bits(actual, expected)


# ---- silu_and_mul: the same activation without the cast (float experts) ----

@pytest.mark.parametrize("dtype", SOURCE_DTYPES, ids=lambda d: str(d)[6:])
def test_silu_and_mul(backend, dtype):
    """Any I (200 here: a partial last column block), strided NaN-padded source, the masked layout
    with poisoned rows; within one rounding to the dtype of the exact activation (fp32 math inside,
    a GPU's exponential may move its last fp32 bit)."""
    name, device = backend
    x = torch.randn(37, 416, device=device) * 3  # values (and products) well inside fp16's range
    x[:, 400:] = float("nan")
    x = x.to(dtype)[:, :400]
    masked = torch.randn(3, 20, 400, device=device).to(dtype)
    counts = [5, 0, 20]
    for g, rows in enumerate(counts):
        masked[g, rows:] = float("nan")
    if name == "cuda":
        with pytest.raises(NotImplementedError, match="^silu_and_mul: no CUDA kernel yet"):
            dskernels.silu_and_mul(x)
        return
    rounding = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]

    def assert_close_to_exact(out, source, rows=None):
        gate, up = source.cpu().double().chunk(2, dim=-1)
        exact = gate * torch.sigmoid(gate) * up
        # half an ulp of the dtype (fp16's subnormal step 2^-24 near zero), plus fp32's own error
        ok = (out.cpu().double() - exact).abs() <= (rounding + 2**-20) * exact.abs() + 2**-25
        if rows is not None:
            ok = ok[torch.arange(source.shape[1])[None, :] < torch.tensor(rows)[:, None]]
        assert ok.all(), f"{(~ok).sum().item()} values off"

    out = dskernels.silu_and_mul(x)
    assert out.shape == (37, 200) and out.dtype == dtype
    assert_close_to_exact(out, x)
    out = dskernels.silu_and_mul(masked, torch.tensor(counts, dtype=torch.int32, device=device))
    assert out.shape == (3, 20, 200)
    assert_close_to_exact(out, masked, counts)
    if name == "triton":  # rows past masked_m neither read nor written (the launcher, with a sentinel)
        from dskernels.triton import fp8_cast
        sentinel = torch.full((3, 20, 200), -7.0, device=device).to(dtype)
        fp8_cast.silu_and_mul(masked, sentinel, torch.tensor(counts, dtype=torch.int32, device=device))
        for g, rows in enumerate(counts):
            assert (sentinel[g, rows:] == -7).all() and (sentinel[g, :rows] != -7).all()


def test_silu_and_mul_bad_input_opcheck_and_compile():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"^x: expected the last dimension \(2I: gate and up\) to be a multiple of 2"):
        dskernels.silu_and_mul(x[:, :5])
    with pytest.raises(ValueError, match=r"^masked_m: expected shape \(2,\)"):
        dskernels.silu_and_mul(x.view(2, 2, 6), torch.ones(3, dtype=torch.int32))
    torch.library.opcheck(torch.ops.dskernels.silu_and_mul, (x.bfloat16(),))
    torch.library.opcheck(torch.ops.dskernels.silu_and_mul, (x.view(2, 2, 6), torch.tensor([1, 2], dtype=torch.int32)))
    # a column-major x: the output is row-major on every backend, as the fake kernel says
    torch.library.opcheck(torch.ops.dskernels.silu_and_mul, (torch.randn(12, 5).T,))
    compiled = torch.compile(dskernels.silu_and_mul, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), dskernels.silu_and_mul(x))


def test_triton_silu_and_mul_on_a_column_strided_input():
    if "triton" not in dskernels.available_backends():
        pytest.skip("needs the Triton backend (TRITON_INTERPRET=1 on CPU)")
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(3, 16, generator=g)
    x = wide[:, ::2]  # [3, 8], last stride 2: copied before the kernel
    with dskernels.backend("triton"):
        got = dskernels.silu_and_mul(x)
    gate, up = x[:, :4], x[:, 4:]
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_triton_per_token_cast_of_unaligned_rows_equals_reference():
    if "triton" not in dskernels.available_backends():
        pytest.skip("needs the Triton backend (TRITON_INTERPRET=1 on CPU)")
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5 * 256 + 1, generator=g)
    x = base[1:].view(5, 256)  # 4-byte offset: not 16-byte aligned, copied by _vectorizable
    assert x.data_ptr() % 16
    with dskernels.backend("ref"):
        want = dskernels.per_token_cast_to_fp8(x)
    with dskernels.backend("triton"):
        got = dskernels.per_token_cast_to_fp8(x)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))


def test_triton_silu_and_mul_grid_within_cuda_limits(monkeypatch):
    """CUDA grids hold at most 65535 programs in y and z: a [G, M, 2I] x of more entries (no
    masked_m) keeps them on grid axis 0, which holds 2**31 - 1 (axis 2 failed the launch)."""
    from dskernels.triton import fp8_cast

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(fp8_cast, "fast", lambda kernel: Recorder())
    x = torch.zeros(1, 1, 256, dtype=torch.bfloat16).expand(70_000, 3, 256)  # (no memory)
    fp8_cast.silu_and_mul(x, torch.empty(70_000, 3, 128, dtype=torch.bfloat16), None)
    fp8_cast.silu_and_mul_cast_to_fp8(x, torch.empty(70_000, 3, 128, dtype=torch.float8_e4m3fn),
                                      torch.empty(70_000, 3, 1), None, False)
    assert len(grids) == 2 and all(max(grid[1:], default=1) <= 65535 for grid in grids), grids
    assert all(grid[0] == 70_000 for grid in grids)  # one 32-row block per entry
