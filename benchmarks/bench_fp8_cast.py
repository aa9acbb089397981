"""FP8 casts: memory-bound, so GB/s against the copy bandwidth is the number that matters.

Bytes: the source read once, the fp8 values and fp32 scales written once (no FLOPs counted).
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


def _case(op_name, op, ref, rows, k, dtype, scale_rows, compile_peer=True, round_scale=False):
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
        peers={"torch": ref, **({"torch.compile": torch_compile_peer} if compile_peer else {})})


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
                           python_ref.per_token_cast_to_fp8, m, k, torch.bfloat16, m, not quick))
    m, k = token_shapes[-1 if device == "cpu" else 0]
    found.append(_case("per_token_cast_to_fp8", dskernels.per_token_cast_to_fp8, python_ref.per_token_cast_to_fp8,
                       m, k, torch.bfloat16, m, not quick, round_scale=True))
    for n, k in block_shapes:
        found.append(_case("per_block_cast_to_fp8", dskernels.per_block_cast_to_fp8,
                           python_ref.per_block_cast_to_fp8, n, k, torch.bfloat16, -(-n // 128), not quick))
    if not quick:  # the K-grouped weight gradient's operands: 8 experts' tokens, token-major
        found += [_channel_case(ks, h) for ks, h in
                  ([([40, 0, 88], 72)] if device == "cpu" else [([4096] * 8, 7168), ([3000, 5192] * 4, 2048)])]
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
