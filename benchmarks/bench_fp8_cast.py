"""FP8 casts: memory-bound, so GB/s against the copy bandwidth is the number that matters.

Bytes: the source read once, the fp8 values and fp32 scales written once (no FLOPs counted).

Peers: python_ref's torch ops (checked bit for bit, as ours: the same function) and torch.compile
of them (checked to one e4m3 step: a compiled division or exponential may move a last bit); the
masked layouts' peers cast the valid rows only, placed back for the check.
"""

from __future__ import annotations

import functools

import torch

import dskernels
import python_ref
from benchmarks.common import Case


def _same_bits(outputs, expected):
    for name, actual, wanted in zip(("fp8", "scale"), outputs, expected):
        a = actual.cpu()
        w = wanted.cpu()
        if a.dtype == torch.float8_e4m3fn:
            a, w = a.view(torch.uint8), w.view(torch.uint8)
        if a.shape != w.shape or not torch.equal(a, w):
            bad = (a != w).sum().item() if a.shape == w.shape else "shape"
            return f"{name}: {bad} values differ from python_ref"
    return None


def _within_one_step(outputs, expected):
    """(fp8, scale) within one e4m3 step of python_ref's: scales within 2 fp32 ulps (amax / 448
    computed otherwise), each fp8 value within one step of its magnitude's binade (2^-3 relative)
    or of the subnormals (2^-9), in its own units."""
    for (actual, wanted), name in zip(zip(outputs, expected), ("fp8", "scale")):
        if actual.shape != wanted.shape:
            return f"{name}: shape {tuple(actual.shape)}, expected {tuple(wanted.shape)}"
    (value, scale), (ref_value, ref_scale) = ((t.float().cpu() for t in pair) for pair in (outputs, expected))
    if not torch.all((scale - ref_scale).abs() <= 2**-22 * ref_scale.abs()):
        return "scale: beyond 2 fp32 ulps of python_ref"
    off = ((value - ref_value).abs() > 2**-3 * ref_value.abs() + 2**-9).sum().item()
    return None if off == 0 else f"fp8: {off} values more than one e4m3 step from python_ref"


def _case(op_name, op, ref, rows, k, dtype, scale_rows, round_scale=False):
    element = torch.empty((), dtype=dtype).element_size()
    if round_scale:  # power-of-two (UE8M0) scales: the same bytes, a few more integer ops per group
        op, ref = functools.partial(op, round_scale=True), functools.partial(ref, round_scale=True)
    moved = rows * k * (element + 1) + scale_rows * (k // 128) * 4

    def make_inputs(device):
        return (torch.randn(rows, k, device=device).to(dtype),)

    compiled_ref = None

    def torch_compile_peer(x):
        nonlocal compiled_ref
        if compiled_ref is None:
            compiled_ref = torch.compile(ref)
        return compiled_ref(x)

    return Case(
        op=op_name, params={"m" if op_name.startswith("per_token") else "n": rows, "k": k,
                            "dtype": str(dtype).removeprefix("torch."), **({"ue8m0": True} if round_scale else {})},
        make_inputs=make_inputs, run=op, reference=ref, check=_same_bits, flops=0.0, bytes=moved,
        peers={"torch": ref, "torch.compile": torch_compile_peer},
        peer_checks={"torch.compile": lambda out, expected, x: _within_one_step(out, expected)})


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":
        token_shapes, block_shapes = [(61, 384)], [(130, 256)]
    elif quick:
        token_shapes, block_shapes = [(8192, 7168)], [(7168, 2048)]
    else:
        token_shapes = [(128, 7168), (4096, 7168), (8192, 7168), (8192, 2048), (32768, 7168)]
        block_shapes = [(2112, 7168), (7168, 2048), (24576, 1536), (4096, 7168)]
    found = []
    for m, k in token_shapes:
        found.append(_case("per_token_cast_to_fp8", dskernels.per_token_cast_to_fp8,
                           python_ref.per_token_cast_to_fp8, m, k, torch.bfloat16, m))
    m, k = token_shapes[-1 if device == "cpu" else 0]
    found.append(_case("per_token_cast_to_fp8", dskernels.per_token_cast_to_fp8, python_ref.per_token_cast_to_fp8,
                       m, k, torch.bfloat16, m, round_scale=True))
    for n, k in block_shapes:
        found.append(_case("per_block_cast_to_fp8", dskernels.per_block_cast_to_fp8,
                           python_ref.per_block_cast_to_fp8, n, k, torch.bfloat16, -(-n // 128)))
    if not quick:  # the K-grouped weight gradient's operands: 8 experts' tokens, token-major
        found += [_channel_case(ks, h) for ks, h in
                  ([([40, 0, 88], 72)] if device == "cpu" else [([4096] * 8, 7168), ([3000, 5192] * 4, 2048)])]
    # V3's experts (I = 2048): SwiGLU + cast of a prefill's 8192 rows, and the masked decode layout
    found += [_silu_and_mul_case(rows, inter, masked) for rows, inter, masked in
              ([(37, 256, False), (20, 256, True)] if device == "cpu" else [(8192, 2048, False), (256, 2048, True)])]
    found += [_silu_and_mul_bf16_case(*((20, 256) if device == "cpu" else (256, 2048)), groups=8)]
    return found


def _channel_case(ks, h):
    """per_channel_cast_to_fp8 over groups of tokens: one scale per column per 128 tokens of each."""
    tokens = sum(ks)
    blocks = sum(-(-k // 128) for k in ks)

    def make_inputs(device):
        return torch.randn(tokens, h, device=device).to(torch.bfloat16), torch.tensor(ks, dtype=torch.int32, device=device)

    def run(x, ks_tensor):
        return dskernels.per_channel_cast_to_fp8(x, ks, ks_tensor)

    def reference(x, ks_tensor):
        return python_ref.per_channel_cast_to_fp8(x, ks)

    return Case(op="per_channel_cast_to_fp8", params={"tokens": tokens, "groups": len(ks), "h": h, "dtype": "bfloat16"},
                make_inputs=make_inputs, run=run, reference=reference, check=_same_bits, flops=0.0,
                bytes=tokens * h * 3 + blocks * h * 4, peers={"torch": reference})


def _silu_and_mul_case(rows, inter, masked, groups=8):
    """silu_and_mul_cast_to_fp8: x [rows, 2I] bf16 (masked: [8, rows, 2I], 70% of each expert's rows
    valid) -> fp8 [.., I] + scales, against the unfused torch ops (silu, mul, cast: python_ref) and
    torch.compile of them. Bytes: the valid rows' x read, their fp8 values and scales written."""
    shape = (groups, rows, 2 * inter) if masked else (rows, 2 * inter)
    counts = [int(rows * 0.7)] * groups if masked else None
    valid = sum(counts) if masked else rows

    def make_inputs(device):
        x = torch.randn(*shape, device=device).to(torch.bfloat16)
        return x, (torch.tensor(counts, dtype=torch.int32, device=device) if masked else None)

    def run(x, masked_m):
        return dskernels.silu_and_mul_cast_to_fp8(x, masked_m)

    def reference(x, masked_m):  # every row (those past masked_m are unspecified, and not checked)
        return python_ref.silu_and_mul_cast_to_fp8(x)

    def valid_rows(x):  # the peers' share: each group's valid rows (the same count in every group), as ours
        return x[:, :counts[0]] if masked else x

    def torch_peer(x, masked_m):
        return python_ref.silu_and_mul_cast_to_fp8(valid_rows(x))

    compiled = None

    def torch_compile_peer(x, masked_m):
        nonlocal compiled
        compiled = compiled or torch.compile(python_ref.silu_and_mul_cast_to_fp8)
        return compiled(valid_rows(x))

    def dequantized(fp8, scale):
        return fp8.float() * scale.repeat_interleave(128, dim=-1), scale.repeat_interleave(128, dim=-1)

    def check(outputs, expected):
        """Within one e4m3 step of python_ref (a GPU's exponential may move silu's last bit)."""
        (value, _), (ref_value, ref_scale) = dequantized(*outputs), (dequantized(*(t.to(outputs[0].device)
                                                                                  for t in expected)))
        if masked:
            keep = torch.arange(rows, device=value.device)[None, :] < torch.tensor(counts, device=value.device)[:, None]
            value, ref_value, ref_scale = value[keep], ref_value[keep], ref_scale[keep]
        off = ((value - ref_value).abs() > 2**-3 * ref_value.abs() + 2**-9 * ref_scale).sum().item()
        return None if off == 0 else f"{off} values more than one e4m3 step from python_ref"

    def placed(outputs, expected, x, masked_m):
        """The peers' valid rows back in the case's layout (the other rows' values are not checked);
        then the case's check (one e4m3 step: it holds for torch.compile's exponential too)."""
        want = (groups, counts[0]) if masked else (rows,)
        if any(tuple(t.shape[:len(want)]) != want for t in outputs):
            return f"shapes {[tuple(t.shape) for t in outputs]}: not {want} rows"
        if masked:  # (rows past the count: not checked, the oracle's stand in)
            outputs = tuple(torch.cat([t, w[:, t.shape[1]:].to(t.device)], dim=1) for t, w in zip(outputs, expected))
        return check(outputs, expected)

    return Case(op="silu_and_mul_cast_to_fp8", params={"rows": rows, "I": inter, "masked": masked},
                make_inputs=make_inputs, run=run, reference=reference, check=check, flops=0.0,
                bytes=valid * (4 * inter + inter + 4 * inter // 128),
                peers={"torch": torch_peer, "torch.compile": torch_compile_peer},
                peer_checks={"torch": placed, "torch.compile": placed},
                backends=("ref", "triton"))  # no CUDA kernel for the fused SwiGLU casts


def _silu_and_mul_bf16_case(rows, inter, groups):
    """silu_and_mul in the masked layout (bf16 experts' decode): [8, rows, 2I] bf16, 70% valid;
    bytes: the valid rows' x read (4I bytes) and activation written (2I)."""
    counts = [int(rows * 0.7)] * groups

    def make_inputs(device):
        return (torch.randn(groups, rows, 2 * inter, device=device).to(torch.bfloat16),
                torch.tensor(counts, dtype=torch.int32, device=device))

    def run(x, masked_m):
        return dskernels.silu_and_mul(x, masked_m)

    def reference(x, masked_m):  # every row; the unfused ops a bf16 expert ran before
        return python_ref.silu_and_mul(x)

    def check(out, expected):  # valid rows within one bf16 rounding (fp32 math inside on both sides)
        keep = torch.arange(rows, device=out.device)[None, :] < torch.tensor(counts, device=out.device)[:, None]
        got, want = out[keep].float(), expected.to(out.device)[keep].float()
        off = ((got - want).abs() > 2**-7 * want.abs() + 2**-30).sum().item()
        return None if off == 0 else f"{off} values more than a bf16 rounding from python_ref"

    def torch_peer(x, masked_m):  # the valid rows only (the same count in every group), as ours
        return python_ref.silu_and_mul(x[:, :counts[0]])

    def placed(out, expected, x, masked_m):  # the peer's valid rows in the case's layout, then its check
        if tuple(out.shape) != (groups, counts[0], inter):
            return f"shape {tuple(out.shape)}, expected the valid rows {(groups, counts[0], inter)}"
        return check(torch.cat([out, expected[:, out.shape[1]:].to(out.device)], dim=1), expected)

    return Case(op="silu_and_mul", params={"rows": rows, "I": inter, "masked": True}, make_inputs=make_inputs,
                run=run, reference=reference, check=check, flops=0.0, bytes=sum(counts) * 6 * inter,
                peers={"torch": torch_peer}, peer_checks={"torch": placed}, backends=("ref", "triton"))
