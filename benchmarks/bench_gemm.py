"""FP8 block-scaled GEMMs: compute-bound at DeepGEMM's shapes, so TFLOPS against the FP8 ceiling.

Counted as DeepGEMM's tests count them: FLOPs = 2 * m * n * k (valid rows only for the masked
GEMM), bytes = m * k + k * n (per group) + 2 * m * n, plus the fp32 scales, which DeepGEMM leaves
out (m * k / 128 + ceil(n / 128) * k / 128 per group, 4 bytes each).

The weight-gradient form of fp8_gemm_nt (per-row scales on both operands, fp32 out = c + a @ b.T)
moves m * k + n * k bytes of operands, their scales, and c read and out written in fp32 (8 * m * n;
the timed call also copies c into out first, as DeepGEMM does for a c apart from out: not counted).
The K-grouped weight gradient (one [m, n] fp32 gradient per expert, k = the expert's tokens)
accumulates in place, so each timed call first restores the gradients it adds to: that copy is
timed and counted (16 * m * n per group with the kernel's own read and write).

DeepGEMM's bf16 grouped GEMMs (compute_dtype bf16): 2 bytes per operand and output element (valid
rows only for the masked one), fp32 gradients for the K-grouped one; peers torch._grouped_mm
(CUTLASS, sm90+) and a bf16 bmm.

Peers reading our operands are checked against python_ref before they are timed (the case's bound;
the weight-gradient case's _scaled_mm peer leaves out c: compared with expected - c); the bf16
torch.mm/bmm peers of the FP8 cases run on random operands and are declared unchecked.
"""

from __future__ import annotations

import os
import random

import torch

import dskernels
from benchmarks.common import GRAPH_VARIANTS, Case, graph_or_eager
from dskernels.testing import calc_diff
from python_ref import gemm as ref

# DeepGEMM's grid (its tests/test_core.py); cpu: tiny shapes for the interpreter.
DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GROUPED_NK = [(4096, 7168), (7168, 2048)]
# Weight gradients dW [out, in] = dY.T @ X over 4096 tokens (k) for V3's projections.
WGRAD_MNK = [(2112, 7168, 4096), (7168, 2048, 4096), (24576, 1536, 4096)]
# The sm90 kernels' configs (docs/gemm.md "Configs"), each also timed forced: the plain "cuda" row
# is the selection rule's pick, the cuda[...] rows are what the rule chooses among. m64_splitk: on
# the m <= 128 shapes only (it is meant for m <= 64; at m = 4096 it would not split), and only once
# its own tests passed in this device call (scripts/gpu_check.sh sets DSKERNELS_GEMM_SPLITK_TESTED
# after tests/test_gemm_sm90_splitk.py): a config never run before may fault and end the CUDA context.
DENSE_CONFIG_VARIANTS = {name: {"DSKERNELS_GEMM_DENSE_CONFIG": name}
                         for name in ("m64", "m128", "m128_multicast", "m128_streamk", "m64_splitk")}
SMALL_M_ONLY = ("m64_splitk",)


def _dense_variants(m: int) -> dict:
    tested = os.environ.get("DSKERNELS_GEMM_SPLITK_TESTED") == "1"
    return {name: env for name, env in DENSE_CONFIG_VARIANTS.items()
            if name not in SMALL_M_ONLY or (m <= 128 and tested)}


GROUPED_CONFIG_VARIANTS = {name: {"DSKERNELS_GEMM_GROUPED_CONFIG": name} for name in ("m64", "m128", "m128_multicast")}
# The grouped kernels' tiles walked along N (the rule's config; CUTLASS's default walks along M),
# timed only once tests/test_gemm_sm90_raster.py passed in this device call (scripts/gpu_check.sh
# sets DSKERNELS_GEMM_RASTER_TESTED): never run before, it might fault and end the CUDA context.
RASTER_VARIANT = {"raster_n": {"DSKERNELS_GEMM_GROUPED_RASTER": "along_n"}}


def _grouped_variants() -> dict:
    tested = os.environ.get("DSKERNELS_GEMM_RASTER_TESTED") == "1"
    return {**GROUPED_CONFIG_VARIANTS, **(RASTER_VARIANT if tested else {})}
# Batch-invariant mode (docs/gemm.md "Batch invariance"): its fixed tile or config, no K split, timed
# beside the default to measure what the mode costs (the triton[invariant] / cuda[invariant] rows).
INVARIANT_VARIANT = {"invariant": {"DSKERNELS_BATCH_INVARIANT": "1"}}


def _cast_pair(rows, k, device, per_block, groups=None):
    x = torch.randn(*((groups,) if groups else ()), rows, k, device=device, dtype=torch.bfloat16)
    cast = dskernels.per_block_cast_to_fp8 if per_block else dskernels.per_token_cast_to_fp8
    if groups is None:
        q, s = cast(x)
    else:
        pairs = [cast(x[g]) for g in range(groups)]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    # Scales in the layouts the sm90 CUDA kernels read, so that no backend times a per-call layout
    # conversion: DeepGEMM's column-major TMA-aligned activation scales (what its benchmark passes),
    # weight scales transposed once as at load time. Triton and the reference read any strides.
    if per_block:
        return x, q, s.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x, q, dskernels.get_col_major_tma_aligned_tensor(s)


def _check(out, expected):
    """expected: python_ref's bf16 answer, NaN on rows whose output is unspecified. Both sides round
    the same fp32 sum to bf16 (relative error <= 2^-8 each), so calc_diff <= (2^-7)^2 / 2 = 2^-15
    (fp32 outputs, the weight-gradient case, differ by the summation order only: far below).""" 
    if out.shape != expected.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    # On out's device, without boolean indexing: these outputs reach 235 M elements, minutes on a CPU.
    valid = ~expected.isnan()
    zero = torch.zeros((), device=out.device)
    diff = calc_diff(torch.where(valid, out.float(), zero), torch.where(valid, expected.float().to(out.device), zero))
    return None if diff < 2**-15 else f"calc_diff {diff:.2e} against python_ref (bound 2^-15)"


def _bytes(rows, n, k, groups=1):
    n_blocks = -(-n // 128)
    return rows * k + groups * k * n + 2 * rows * n + 4 * (rows * k // 128 + groups * n_blocks * k // 128)


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """t [r, c] with its row stride rounded up to a multiple of 4 (cuBLASLt's blockwise scales)."""
    buf = t.new_empty(t.shape[0], -(-t.shape[1] // 4) * 4)
    buf[:, :t.shape[1]] = t
    return buf[:, :t.shape[1]]


def _scaled_mm_peer():
    """torch's blockwise-scaled FP8 matmul with (1x128, 128x128) scales, where this torch and GPU
    have it. The entry point and the scale layouts it wants have changed between releases, so the
    first call tries the known ones and keeps the first accepted: scale_a [m, k/128] with unit
    stride along m; scale_b [k/128, n/128] with unit stride along k (the transpose of a row-major
    [n/128, k/128]: what torch checks on b.t()); each with and without its outer stride padded to a
    multiple of 4 (newer releases), torch.nn.functional.scaled_mm (scale recipes) first. 1x128
    scales on b too (the weight-gradient case): scale_b [k/128, n] with unit stride along n. The
    H200 run's torch 2.11 refused every 128x128 layout tried then: they were built from the
    column-major sb that _cast_pair passes, not from the row-major one torch checks for."""
    chosen = {}

    def candidates(a, sa, b, sb):
        per_row_b = sb.shape[0] == b.shape[0]  # the weight-gradient case: 1x128 scales on both
        sb_rows = sb.contiguous()  # [n/128, k/128] (or [n, k/128]), unit stride along k
        scales_a = [sa.t().contiguous().t(), _padded_rows(sa.t()).t()]
        scales_b = ([sb.t().contiguous(), _padded_rows(sb.t())] if per_row_b
                    else [sb_rows.t(), _padded_rows(sb_rows).t()])
        pairs = [(scale_a, scale_b) for scale_b in scales_b for scale_a in scales_a]
        functional = getattr(torch.nn.functional, "scaled_mm", None)
        if functional is not None:
            recipe = torch.nn.functional.ScalingType
            recipe_b = recipe.BlockWise1x128 if per_row_b else recipe.BlockWise128x128
            for scale_a, scale_b in pairs:
                yield lambda scale_a=scale_a, scale_b=scale_b: functional(
                    a, b.t(), scale_a, recipe.BlockWise1x128, scale_b, recipe_b, output_dtype=torch.bfloat16)
        for scale_a, scale_b in pairs:
            yield lambda scale_a=scale_a, scale_b=scale_b: torch._scaled_mm(
                a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    def run(a, sa, b, sb, out, *rest):
        key = (a.data_ptr(), b.data_ptr())
        if key not in chosen:
            errors = []
            for call in candidates(a, sa, b, sb):
                try:
                    result = call()
                except (RuntimeError, TypeError, ValueError, AttributeError) as e:
                    errors.append(str(e).splitlines()[0][:120])
                    continue
                # A layout torch accepts but reads otherwise (scales transposed, say) would time
                # another product: each accepted one must give a @ b.T.
                diff = calc_diff(result, ref.fp8_gemm_nt(a, sa, b, sb, torch.float32))
                if diff < 1e-3:
                    chosen[key] = call
                    break
                errors.append(f"a layout accepted, but calc_diff {diff:.3g} against a @ b.T")
            else:
                raise RuntimeError("no blockwise scale layout accepted: " + " | ".join(errors))
        return chosen[key]()

    return run


def _grouped_scaled_mm_peer(rows):
    """torch's blockwise FP8 matmul (_scaled_mm_peer) once per group over that group's rows: the
    same FP8 work as ours, a launch per group. rows: per group, the first row of its segment and
    its count in a contiguous [m, k] a, or (g, valid rows) in a masked [G, m_max, k] one."""
    dense = _scaled_mm_peer()

    def run(a, sa, b, sb, out, *rest):
        def group(x, at, count):
            return x[at, :count] if a.dim() == 3 else x[at:at + count]

        return [dense(group(a, at, count), group(sa, at, count), b[g], sb[g], None)
                for g, (at, count) in enumerate(rows) if count]

    return run


# Peers of the GEMM cases, checked against the oracle before they are timed (benchmarks/common.py):
# torch._scaled_mm reads our FP8 operands and scales, accumulates in fp32 and rounds to bf16 once,
# as ours does, so the case's own bound holds (_check: calc_diff <= 2^-15); the bf16 peers that
# read our bf16 operands likewise (fp32 sums rounded to bf16 once). The bf16 torch.mm/bmm peers of
# the FP8 cases run on random bf16 operands of the same shapes (the non-FP8 baseline's time, not
# our numbers): nothing to compare.
RANDOM_OPERANDS = "random bf16 operands of the same shapes (a timing baseline): no answer to compare"


def _grouped_as_output(rows):
    """check(peer_output, expected, *inputs) for _grouped_scaled_mm_peer(rows): its per-group outputs
    placed where the case's output keeps those rows (NaN elsewhere, as expected's unspecified rows:
    a row the peer did not compute then fails the check), then the case's check."""
    used = [(at, count) for at, count in rows if count]

    def check(parts, expected, *inputs):
        if len(parts) != len(used):
            return f"{len(parts)} group outputs, expected {len(used)}"
        placed = torch.full(expected.shape, float("nan"), dtype=torch.bfloat16, device=expected.device)
        for (at, count), part in zip(used, parts):
            if tuple(part.shape) != (count, expected.shape[-1]):
                return f"group output shape {tuple(part.shape)}, expected {(count, expected.shape[-1])}"
            if expected.dim() == 3:
                placed[at, :count] = part
            else:
                placed[at:at + count] = part
        return _check(placed, expected)  # (a specified row left NaN: calc_diff NaN, which fails)
    return check


def _device_of(inputs) -> torch.device:
    """The device of a case's first tensor input: where its bf16 peers put their operands."""
    return next(t.device for t in inputs if isinstance(t, torch.Tensor))


def _bf16_mm_peer(shape_a, shape_b, batched=False):
    """A bf16 torch.mm (or bmm) of the same shape: the non-FP8 baseline."""
    cache = {}

    def run(*inputs):
        if not cache:
            cache["a"] = torch.randn(shape_a, device=_device_of(inputs), dtype=torch.bfloat16)
            cache["b"] = torch.randn(shape_b, device=_device_of(inputs), dtype=torch.bfloat16)
        return torch.bmm(cache["a"], cache["b"]) if batched else torch.mm(cache["a"], cache["b"])

    return run


def _bf16_groups_peer(counts, n, k):
    """A bf16 torch.mm per group over its count of rows: the masked layout's valid work, unfused."""
    cache = {}

    def run(*inputs):
        if not cache:
            device = _device_of(inputs)
            cache["a"] = [torch.randn(rows, k, device=device, dtype=torch.bfloat16) for rows in counts]
            cache["b"] = [torch.randn(k, n, device=device, dtype=torch.bfloat16) for _ in counts]
        return [torch.mm(a, b) for a, b in zip(cache["a"], cache["b"]) if a.shape[0]]

    return run


def _dense_case(m, n, k, device):
    def make_inputs(dev):
        _, a, sa = _cast_pair(m, k, dev, per_block=False)
        _, b, sb = _cast_pair(n, k, dev, per_block=True)
        return a, sa, b, sb, torch.empty(m, n, device=dev, dtype=torch.bfloat16)

    def step(a, sa, b, sb, out):
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
        return out

    peers = {"torch._scaled_mm": _scaled_mm_peer(), "torch.mm bf16": _bf16_mm_peer((m, k), (k, n))}
    # Decode sizes also replayed from a CUDA graph: at m = 64 the H200 run timed Triton's split-K
    # call at 150 us for ~20 us of bytes, the host's share by the look of it (common.GRAPH_VARIANTS).
    graph = GRAPH_VARIANTS if m <= 128 else {}
    # The Triton kernel's opt-in warp-specialized TMA candidates (dskernels/triton/gemm.py, TMA_WS)
    # on their own and beside the pointer-load ones (the plain triton row: those alone), once their
    # tests passed in this device call (scripts/gpu_check.sh sets DSKERNELS_GEMM_TMA_WS_TESTED after
    # tests/test_gemm_tma_ws.py): a kernel never run before may fault and end the CUDA context.
    tma_ws = ({"tma_ws": {"DSKERNELS_GEMM_TMA_WS": "only"}, "tma_ws_auto": {"DSKERNELS_GEMM_TMA_WS": "auto"}}
              if m > 128 and os.environ.get("DSKERNELS_GEMM_TMA_WS_TESTED") == "1" else {})
    return Case(op="gemm_fp8_fp8_bf16_nt", params={"m": m, "n": n, "k": k}, make_inputs=make_inputs,
                run=graph_or_eager(step),
                reference=lambda a, sa, b, sb, out: ref.gemm_fp8_fp8_bf16_nt(a, sa, b, sb), check=_check,
                flops=2 * m * n * k, bytes=_bytes(m, n, k), peers=peers,
                peer_checks={"torch.mm bf16": RANDOM_OPERANDS}, backends=("ref", "triton", "cuda"),
                compute_dtype="fp8", triton_variants={**graph, **tma_ws, **INVARIANT_VARIANT},
                cuda_variants={**_dense_variants(m), **graph, **INVARIANT_VARIANT})


def _weight_gradient_case(m, n, k, device):
    def make_inputs(dev):
        _, a, sa = _cast_pair(m, k, dev, per_block=False)  # dY.T, cast per token along k
        _, b, sb = _cast_pair(n, k, dev, per_block=False)  # X.T, likewise
        c = torch.randn(m, n, device=dev)  # the gradient accumulated so far
        return a, sa, b, sb, torch.empty(m, n, device=dev), c

    def run(a, sa, b, sb, out, c):
        # c apart from out, so that every timed call adds to the same values (the call copies c into
        # out first, as DeepGEMM does; c = out would skip that copy)
        dskernels.fp8_gemm_nt((a, sa), (b, sb), out, c=c)
        return out

    peers = {"torch._scaled_mm": _scaled_mm_peer(), "torch.mm bf16": _bf16_mm_peer((m, k), (k, n))}

    def product_check(product, expected, a, sa, b, sb, out, c):
        """The _scaled_mm peer gives a @ b.T in bf16 without adding c (less than ours does: no fp32
        accumulate into c): compared with expected - c, a bf16 rounding of fp32 sums as _check bounds."""
        return _check(product, expected - c.to(expected.device))

    scale_bytes = 4 * (m + n) * k // 128
    return Case(op="fp8_gemm_nt", params={"m": m, "n": n, "k": k, "variant": "wgrad"}, make_inputs=make_inputs,
                run=run, reference=lambda a, sa, b, sb, out, c: ref.fp8_gemm_nt(a, sa, b, sb, torch.float32, c),
                check=_check, flops=2 * m * n * k, bytes=m * k + n * k + scale_bytes + 8 * m * n, peers=peers,
                peer_checks={"torch._scaled_mm": product_check, "torch.mm bf16": RANDOM_OPERANDS},
                backends=("ref", "triton"), compute_dtype="fp8")


def _k_grouped_case(groups, k_per_group, m, n, device, layout="nt"):
    """MoE weight gradients: dW_g [m, n] += dY_g.T @ X_g over each expert's k_per_group tokens, one
    launch for all experts. layout "nt": DeepGEMM's sm90 API (k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    each group's operands transposed to [rows, k_g]); "tn": k_grouped_fp8_gemm_tn_contiguous,
    straight from the token-major activations [tokens, rows]."""
    batch_sizes = [k_per_group] * groups
    tokens = groups * k_per_group

    def make_inputs(dev):
        def operand(rows):
            if layout == "tn":  # per-channel cast along the tokens: [tokens, rows], scales [tokens / 128, rows]
                _, q, s = _cast_pair(rows, tokens, dev, per_block=False)
                return q.T.contiguous(), s.T.contiguous()
            pairs = [_cast_pair(rows, k_per_group, dev, per_block=False)[1:] for _ in range(groups)]
            return (torch.cat([q.reshape(-1) for q, _ in pairs]),
                    torch.cat([s.T for _, s in pairs]).contiguous())  # [sum(k_g / 128), rows]
        (a, sa), (b, sb) = operand(m), operand(n)
        start = torch.randn(groups, m, n, device=dev)  # the gradients accumulated so far
        return a, sa, b, sb, start, torch.empty_like(start)

    def run(a, sa, b, sb, start, out):
        # out accumulates in place: every call starts again from the same gradients (the copy is timed)
        out.copy_(start)
        if layout == "tn":
            dskernels.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), out, batch_sizes, c=out)
        else:
            dskernels.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, batch_sizes)
        return out

    def reference(a, sa, b, sb, start, out):
        return ref.k_grouped_fp8_gemm(a, sa, b, sb, batch_sizes, k_major=layout == "nt", c=start)

    peers = {"torch.bmm bf16": _bf16_mm_peer((groups, m, k_per_group), (groups, k_per_group, n), batched=True)}
    op = "k_grouped_fp8_gemm_tn_contiguous" if layout == "tn" else "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt"
    return Case(op=op, params={"groups": groups, "k_per_group": k_per_group, "m": m, "n": n},
                make_inputs=make_inputs, run=run, reference=reference, check=_check, flops=2 * m * n * tokens,
                bytes=(m + n) * tokens + 4 * (m + n) * tokens // 128 + 16 * groups * m * n, peers=peers,
                peer_checks={"torch.bmm bf16": RANDOM_OPERANDS}, backends=("ref", "triton"), compute_dtype="fp8")


def _contiguous_case(groups, m_per_group, n, k, device):
    m = groups * m_per_group

    def make_inputs(dev):
        _, a, sa = _cast_pair(m, k, dev, per_block=False)
        _, b, sb = _cast_pair(n, k, dev, per_block=True, groups=groups)
        m_indices = torch.arange(groups, device=dev, dtype=torch.int32).repeat_interleave(m_per_group)
        return a, sa, b, sb, torch.empty(m, n, device=dev, dtype=torch.bfloat16), m_indices

    def run(a, sa, b, sb, out, m_indices):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
        return out

    def reference(a, sa, b, sb, out, m_indices):
        expected = ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, m_indices)
        expected[m_indices < 0] = float("nan")
        return expected

    rows = [(g * m_per_group, m_per_group) for g in range(groups)]
    peers = {"torch._scaled_mm": _grouped_scaled_mm_peer(rows), "torch.mm bf16": _bf16_mm_peer((m, k), (k, n))}
    peer_checks = {"torch._scaled_mm": _grouped_as_output(rows), "torch.mm bf16": RANDOM_OPERANDS}
    return Case(op="m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
                params={"groups": groups, "m_per_group": m_per_group, "n": n, "k": k},
                make_inputs=make_inputs, run=run, reference=reference, check=_check, flops=2 * m * n * k,
                bytes=_bytes(m, n, k, groups), peers=peers, peer_checks=peer_checks, backends=("ref", "triton", "cuda"),
                compute_dtype="fp8", cuda_variants=_grouped_variants())


def _routed_case(tokens, n, k, device, experts=256, topk=8):
    """A decode step's routed experts through the contiguous layout, as the model lays them out
    (V3: 8 of 256 experts per token, rows sorted by expert): one to a few rows per expert, so a
    tile of rows meets dozens of experts (the Triton kernel's run slots). Weight-bound: bytes count
    the weights of the experts chosen, all the step reads besides its few rows (GB/s against the
    copy rate is the figure that matters here)."""
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).flatten().sort().values
    counts = torch.bincount(ids, minlength=experts).tolist()
    m, used = ids.numel(), sum(1 for c in counts if c)
    firsts = [sum(counts[:e]) for e in range(experts)]

    def make_inputs(dev):
        _, a, sa = _cast_pair(m, k, dev, per_block=False)
        # one expert at a time: 256 experts' bf16 draws at once would take 15 GB at V3's gate_up
        b = torch.empty(experts, n, k, dtype=torch.float8_e4m3fn, device=dev)
        sb = torch.empty(experts, k // 128, -(-n // 128), device=dev).transpose(1, 2)  # the weights' load-time layout
        for e in range(experts):
            _, q, s = _cast_pair(n, k, dev, per_block=True)
            b[e], sb[e] = q, s
        m_indices = ids.to(device=dev, dtype=torch.int32)
        return a, sa, b, sb, torch.empty(m, n, device=dev, dtype=torch.bfloat16), m_indices

    def run(a, sa, b, sb, out, m_indices):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
        return out

    def reference(a, sa, b, sb, out, m_indices):
        """python_ref expert by expert: its dequantized product of all 256 experts at once would
        take ~90 GB at V3's gate_up (for the same reason the reference backend is not run here on
        a GPU)."""
        expected = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
        for e, (first, count) in enumerate(zip(firsts, counts)):
            if count:
                rows = slice(first, first + count)
                expected[rows] = ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
                    a[rows], sa[rows], b[e:e + 1], sb[e:e + 1], m_indices[rows] - e)
        return expected

    peers = {"torch._scaled_mm": _grouped_scaled_mm_peer(list(zip(firsts, counts)))}
    return Case(op="m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
                params={"routing": "decode", "tokens": tokens, "experts": experts, "topk": topk, "n": n, "k": k},
                make_inputs=make_inputs, run=run, reference=reference, check=_check, flops=2 * m * n * k,
                bytes=_bytes(m, n, k, used), peers=peers,
                peer_checks={"torch._scaled_mm": _grouped_as_output(list(zip(firsts, counts)))},
                backends=("ref", "triton", "cuda") if device == "cpu" else ("triton", "cuda"), compute_dtype="fp8",
                cuda_variants=_grouped_variants())


def _masked_case(groups, expected_m, n, k, device, m_max):
    # DeepGEMM draws each group's rows around expected_m (0.7x to 1.3x); fixed here per shape.
    rng = random.Random(groups * 7919 + expected_m)
    counts = [min(m_max, int(expected_m * rng.uniform(0.7, 1.3))) for _ in range(groups)]
    valid = sum(counts)

    def make_inputs(dev):
        _, a, sa = _cast_pair(m_max, k, dev, per_block=False, groups=groups)
        _, b, sb = _cast_pair(n, k, dev, per_block=True, groups=groups)
        masked_m = torch.tensor(counts, device=dev, dtype=torch.int32)
        return a, sa, b, sb, torch.empty(groups, m_max, n, device=dev, dtype=torch.bfloat16), masked_m

    def run(a, sa, b, sb, out, masked_m):
        dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, expected_m)
        return out

    def reference(a, sa, b, sb, out, masked_m):
        expected = ref.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, masked_m)
        for g, rows in enumerate(counts):
            expected[g, rows:] = float("nan")
        return expected

    # each group's valid rows, as ours computes (not expected_m of every group)
    peers = {"torch._scaled_mm": _grouped_scaled_mm_peer(list(enumerate(counts))),
             "torch.mm bf16": _bf16_groups_peer(counts, n, k)}
    peer_checks = {"torch._scaled_mm": _grouped_as_output(list(enumerate(counts))),
                   "torch.mm bf16": RANDOM_OPERANDS}
    return Case(op="m_grouped_gemm_fp8_fp8_bf16_nt_masked",
                params={"groups": groups, "expected_m": expected_m, "m_max": m_max, "n": n, "k": k},
                make_inputs=make_inputs, run=run, reference=reference, check=_check, flops=2 * valid * n * k,
                bytes=_bytes(valid, n, k, groups), peers=peers, peer_checks=peer_checks,
                backends=("ref", "triton", "cuda"), compute_dtype="fp8", triton_variants=INVARIANT_VARIANT,
                cuda_variants={**_grouped_variants(), **INVARIANT_VARIANT})


def _fp8_einsum_case(expr, batch, heads, device, latent=512, head_dim=128):
    """MLA's absorbed projections with FP8 weights: "bhd,hdr->bhr" (the query through W_UK into the
    latent space) or "bhr,hdr->bhd" (the attention output through W_UV), V3's 128 heads of 128 and a
    512-wide latent; the peer is the bf16 batched product the model runs today (torch.bmm)."""
    into_latent = expr == "bhd,hdr->bhr"
    k, n = (head_dim, latent) if into_latent else (latent, head_dim)

    def make_inputs(dev):
        _, a, sa = _cast_pair(heads, k, dev, per_block=False, groups=batch)  # [batch, heads, k]
        # Each weight K-major in memory, as a caller keeps it (docs/gemm.md): [h, d, r] for W_UV,
        # [h, r, d] for W_UK, passed as its [h, d, r] view (else each call would copy it K-major).
        if into_latent:
            _, w, sw = _cast_pair(latent, head_dim, dev, per_block=True, groups=heads)
            w, sw = w.transpose(1, 2), sw.transpose(1, 2)
        else:
            _, w, sw = _cast_pair(head_dim, latent, dev, per_block=True, groups=heads)
        return a, sa, w, sw, torch.empty(batch, heads, n, device=dev, dtype=torch.bfloat16)

    def run(a, sa, w, sw, out):
        dskernels.fp8_einsum(expr, (a, sa), (w, sw), out)
        return out

    peers = {"torch.bmm bf16": _bf16_mm_peer((heads, batch, k), (heads, k, n), batched=True)}
    scale_bytes = 4 * (batch * heads * k // 128 + heads * -(-head_dim // 128) * -(-latent // 128))
    return Case(op="fp8_einsum", params={"expr": expr, "b": batch, "h": heads, "k": k, "n": n}, make_inputs=make_inputs,
                run=run, reference=lambda a, sa, w, sw, out: ref.fp8_einsum(expr, a, sa, w, sw, torch.bfloat16),
                check=_check, flops=2 * batch * heads * k * n,
                bytes=batch * heads * k + heads * head_dim * latent + 2 * batch * heads * n + scale_bytes,
                peers=peers, peer_checks={"torch.bmm bf16": RANDOM_OPERANDS}, backends=("ref", "triton", "cuda"),
                compute_dtype="fp8")


def _grouped_mm_peer(how):
    """torch._grouped_mm (CUTLASS grouped bf16 GEMMs, sm90+) on the same operands: the strongest
    bf16 grouped peer in torch. how(inputs) -> its (mat_a, mat_b, offs)."""
    def run(*inputs):
        mat_a, mat_b, offs = how(*inputs)
        return torch._grouped_mm(mat_a, mat_b, offs=offs)
    return run


def _bf16_contiguous_case(groups, m_per_group, n, k, device, psum=False):
    """bf16 experts, rows stacked by expert: per-row ids, or DeepGEMM's psum ends (each group
    starting at a multiple of 128: gaps of no group when m_per_group is not one)."""
    stride = -(-m_per_group // 128) * 128 if psum else m_per_group
    m = groups * stride
    owner = torch.full((groups, stride), -1, dtype=torch.int32)
    owner[:, :m_per_group] = torch.arange(groups, dtype=torch.int32)[:, None]
    owner = owner.flatten()
    ends = [g * stride + m_per_group for g in range(groups)]

    def make_inputs(dev):
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(groups, n, k, device=dev, dtype=torch.bfloat16)
        layout = torch.tensor(ends, dtype=torch.int32, device=dev) if psum else owner.to(dev)
        return a, b, torch.empty(m, n, device=dev, dtype=torch.bfloat16), layout

    def run(a, b, d, layout):
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout, use_psum_layout=psum)
        return d

    def reference(a, b, d, layout):
        expected = ref.grouped_rows(a, b, owner.to(a.device))
        expected[owner < 0] = float("nan")  # rows of no group: unspecified
        return expected

    def grouped_mm_operands(a, b, d, layout):  # gaps count as rows of the group before them
        offs = torch.arange(1, groups + 1, device=a.device, dtype=torch.int32) * stride
        return a, b.transpose(1, 2), offs
    # (torch._grouped_mm: our operands, fp32 sums rounded to bf16 once; the gap rows it also
    # computes are unspecified in expected: _check leaves them out)
    peers = {"torch._grouped_mm": _grouped_mm_peer(grouped_mm_operands), "torch.mm bf16": _bf16_mm_peer((m, k), (k, n))}
    return Case(op="m_grouped_bf16_gemm_nt_contiguous",
                params={"groups": groups, "m_per_group": m_per_group, "n": n, "k": k, "psum": psum},
                make_inputs=make_inputs, run=run, reference=reference, check=_check,
                flops=2 * groups * m_per_group * n * k,
                bytes=2 * (groups * m_per_group * (k + n) + groups * n * k), peers=peers,
                peer_checks={"torch.mm bf16": RANDOM_OPERANDS}, backends=("ref", "triton"))


def _bf16_masked_case(groups, expected_m, n, k, device, m_max):
    rng = random.Random(groups * 7919 + expected_m)
    counts = [min(m_max, int(expected_m * rng.uniform(0.7, 1.3))) for _ in range(groups)]
    valid = sum(counts)

    def make_inputs(dev):
        a = torch.randn(groups, m_max, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(groups, n, k, device=dev, dtype=torch.bfloat16)
        masked_m = torch.tensor(counts, device=dev, dtype=torch.int32)
        return a, b, torch.empty(groups, m_max, n, device=dev, dtype=torch.bfloat16), masked_m

    def run(a, b, d, masked_m):
        dskernels.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
        return d

    def reference(a, b, d, masked_m):
        expected = ref.masked_rows(a, b, masked_m)
        for g, rows in enumerate(counts):
            expected[g, rows:] = float("nan")
        return expected

    # a batched matmul over every row: what the model's float path did (its valid rows checked: the
    # rest are unspecified in expected); and the valid rows' own work, group by group (not
    # expected_m rows per group: the draw has 908 of 1024), on random operands
    peers = {"torch.bmm bf16 (all rows)": lambda a, b, d, masked_m: torch.bmm(a, b.transpose(1, 2)),
             "torch.mm bf16": _bf16_groups_peer(counts, n, k)}
    return Case(op="m_grouped_bf16_gemm_nt_masked",
                params={"groups": groups, "expected_m": expected_m, "m_max": m_max, "n": n, "k": k},
                make_inputs=make_inputs, run=run, reference=reference, check=_check, flops=2 * valid * n * k,
                bytes=2 * (valid * k + groups * n * k + valid * n), peers=peers,
                peer_checks={"torch.mm bf16": RANDOM_OPERANDS}, backends=("ref", "triton"))


def _bf16_k_grouped_case(groups, k_per_group, m, n, device):
    """bf16 MoE weight gradients dW_g [m, n] (fp32) = dY_g.T @ X_g from token-major activations."""
    ks = [k_per_group] * groups
    tokens = groups * k_per_group

    def make_inputs(dev):
        a = torch.randn(tokens, m, device=dev, dtype=torch.bfloat16)
        b = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
        ks_tensor = torch.tensor(ks, device=dev, dtype=torch.int32)
        return a, b, torch.empty(groups, m, n, device=dev), ks_tensor, ks_tensor.cumsum(0, dtype=torch.int32)

    def run(a, b, d, ks_tensor, ends):
        dskernels.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, ks_tensor)
        return d

    # (bf16 out of fp32 sums against python_ref's fp32: within _check's bound, a rounding of one side)
    peers = {"torch._grouped_mm": _grouped_mm_peer(lambda a, b, d, ks_tensor, ends: (a.T, b, ends))}
    return Case(op="k_grouped_bf16_gemm_tn_contiguous", params={"groups": groups, "k_per_group": k_per_group,
                                                                "m": m, "n": n},
                make_inputs=make_inputs, run=run, reference=lambda a, b, d, *_: ref.k_grouped_bf16_gemm(a, b, ks),
                check=_check, flops=2 * m * n * tokens, bytes=2 * (m + n) * tokens + 4 * groups * m * n, peers=peers,
                backends=("ref", "triton"))


def cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":
        return [_dense_case(7, 200, 256, device), _dense_case(130, 144, 256, device),
                _weight_gradient_case(7, 200, 256, device), _k_grouped_case(3, 128, 7, 200, device),
                _k_grouped_case(3, 128, 7, 200, device, layout="tn"),
                _contiguous_case(3, 64, 144, 256, device), _routed_case(5, 144, 256, device, experts=16, topk=4),
                _masked_case(2, 40, 144, 256, device, m_max=64),
                _bf16_contiguous_case(3, 64, 144, 200, device, psum=True), _bf16_masked_case(2, 40, 144, 200, device, 64),
                _bf16_k_grouped_case(3, 100, 7, 200, device),
                _fp8_einsum_case("bhd,hdr->bhr", 3, 2, device, latent=256),
                _fp8_einsum_case("bhr,hdr->bhd", 3, 2, device)]
    found = []
    dense_m = [4096] if quick else [64, 128, 4096]
    dense_nk = DENSE_NK[:2] if quick else DENSE_NK
    found += [_dense_case(m, n, k, device) for m in dense_m for n, k in dense_nk]
    if quick:  # one decode shape: 17 output tiles of 64 x 128, where Triton splits K
        found.append(_dense_case(64, *DENSE_NK[0], device))
    for groups, m_per_group in ([(4, 8192)] if quick else [(4, 8192), (8, 4096)]):
        found += [_contiguous_case(groups, m_per_group, n, k, device) for n, k in GROUPED_NK]
    # decode's routed experts (the model's layout): one to a few rows per expert
    found += [_routed_case(tokens, n, k, device) for tokens in ((32,) if quick else (1, 32, 128))
              for n, k in (GROUPED_NK[:1] if quick else GROUPED_NK)]
    for groups, expected_m in ([(4, 256)] if quick else [(1, 1024), (2, 512), (4, 256)]):
        # m_max = 4096 as DeepGEMM's masked test allocates it.
        found += [_masked_case(groups, expected_m, n, k, device, m_max=4096) for n, k in GROUPED_NK]
    # Last: the issues' targets are the cases above (a short device run may end before this one).
    found += [_weight_gradient_case(m, n, k, device) for m, n, k in (WGRAD_MNK[:1] if quick else WGRAD_MNK)]
    if not quick:  # MLA's absorbed projections with FP8 weights at decode batch 128
        found += [_fp8_einsum_case(expr, 128, 128, device) for expr in ("bhd,hdr->bhr", "bhr,hdr->bhd")]
    if not quick:  # V3's experts: gate_up (4096 x 7168) and down (7168 x 2048), 8 experts of 4096 tokens
        found += [_k_grouped_case(8, 4096, m, n, device, layout) for m, n in ((4096, 7168), (7168, 2048))
                  for layout in ("nt", "tn")]
        # DeepGEMM's bf16 family at the FP8 grouped shapes: experts kept in bf16, and their gradients
        found += [_bf16_contiguous_case(4, 8192, n, k, device, psum) for n, k in GROUPED_NK for psum in (False, True)]
        found += [_bf16_masked_case(groups, expected_m, n, k, device, m_max=4096)
                  for groups, expected_m in ((1, 1024), (4, 256)) for n, k in GROUPED_NK]
        found += [_bf16_k_grouped_case(8, 4096, m, n, device) for m, n in ((4096, 7168), (7168, 2048))]
    return found
