"""Compiles every Triton kernel for sm_90a, sm_100a, sm_89 and sm_80 as the GPU paths launch it, without a GPU.

CI runs the Triton kernels only under the interpreter, which accepts things the compiler does not
(and the GPU paths pick other tile sizes than the interpreter's). Here the real launch wrappers run
on meta tensors with `JITFunction.run` replaced by an ahead-of-time `triton.compile` for each
target: every (kernel, specialization) a GPU call would build is compiled (ptxas's -v report read
from Triton's own ptxas run), and the check fails on a compile error or more shared memory than a
block of that GPU can have. On sm_90a (Hopper, the GPU we tune for) a register spill fails it too, beyond the few bytes
ALLOWED_SPILL_BYTES names, and a GEMM or MLA kernel without tensor-core instructions
(wgmma.mma_async on Hopper for the GEMMs, mma.sync for MLA's 16/32-row tiles) or whose main loop
has a single shared-memory buffer (no load overlapping the math; PIPELINED) fails it as well. On
every target, an fp8 cast compiled with NATIVE (the hardware e4m3 rounding) must round in one
step (`cvt.rn.satfinite.e4m3x2.f32`; Triton goes through fp16 on sm_89, which rounds twice).
sm_100a (B200), sm_89 (L40S, RTX 4090) and sm_80 (A100) are GPUs the Triton path serves, where no
CUDA kernel of ours runs: on sm_80 Triton has no fp8 e4m3 type, so a kernel that names it does not
compile there.
Covered: the V3 shapes of MLA decode (bf16/fp16/fp8 caches, page sizes on and off the key-block
grid, causal) and the small heads its GPU tests launch, sparse MLA (V3.2's FP8 cache, bf16,
prefill), V3.2's indexer logits (prefill, compressed, paged; D = 16 to 128), the three FP8 GEMMs
with every autotuning candidate (the dense kernel's warp-specialized ones too) and the heuristic tiles, the FP8 casts (per-channel and SwiGLU-fused too), the router, batch-invariant mode's float matmul (batched and row-grouped with its tile map), the model layer's RMSNorm, rope, cache write and MoE combine, and the EP row movers. (fp8_gemm_nt's variants: the per-row-scaled, accumulating fp32 one; the K-grouped weight gradient in both layouts; the psum contiguous layout; the bf16 grouped GEMMs on the same kernels; fp8_einsum's general batched form on the masked kernel.)

    python scripts/check_triton_compile.py [-v] [--targets 90a,100,89,80] [--cache-dir DIR]

--cache-dir keeps the compiled kernels in DIR as Triton's cache: run with the device's Triton
(scripts/prebuild_device.sh does), a launch there of a specialization compiled here finds it. It
also compiles the GEMMs at 1 and 8 rows and the MLA benchmark grid's launches (specializations,
no new code paths).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter
for knob in ("DSKERNELS_MLA_TRITON_TILE", "DSKERNELS_TRITON_NATIVE_FP8"):  # the defaults' launches
    os.environ.pop(knob, None)
os.environ["DSKERNELS_GEMM_AUTOTUNE"] = "0"  # candidates are compiled one by one below

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class Target:
    name: str                # as in --targets
    capability: tuple[int, int]
    ptxas_arch: str
    max_shared_bytes: int    # per block, opt-in maximum (CUDA programming guide, compute capabilities)
    strict: bool             # spills and missing tensor-core instructions fail the check too

    @property
    def gpu_target(self) -> GPUTarget:
        # as the CUDA driver reports it on such a GPU (warp size 32): the same compile, and with
        # --cache-dir the same cache entries, as a launch there
        return GPUTarget("cuda", self.capability[0] * 10 + self.capability[1], 32)


TARGETS = {
    "90a": Target("90a", (9, 0), "sm_90a", 232448, True),      # H100 / H200: 227 KB
    "100": Target("100", (10, 0), "sm_100a", 232448, False),  # B200: 227 KB
    "89": Target("89", (8, 9), "sm_89", 101376, False),        # L40S, RTX 4090: 99 KB
    "80": Target("80", (8, 0), "sm_80", 166912, False),        # A100: 163 KB
}
# Spills tolerated on sm_90a, per kernel. MLA decode's 64-key tiles sit at 255 registers and spill
# up to 260 bytes with triton 3.8 (CI's; 32-row fp8-cache causal tile), yet on an H200 (triton 3.6)
# they ran 1.38x-1.44x faster than the spill-free 32-key tiles on every decode case
# (benchmarks/results/nvidia-h200.json, the triton[keys64] rows): the spills stay in L1. Since the
# fp8 cache's fp16 dots (2026-12-06) that tile spills 344 bytes (3.8; 348 with the device's 3.6),
# all of them before or after the key loop (SASS: no STL/LDL inside it, whose body lost 16% of its
# instructions). The bound catches a tile that spills far more than these.
ALLOWED_SPILL_BYTES = {"_mla_decode_splitkv_kernel": 352,
                       # 64 heads' non-split form: values stored before the main loop and reloaded
                       # after it, none accessed inside (SASS, 2026-12-05): two through Triton 3.8,
                       # four through 3.6 (the device's)
                       "_sparse_mla_fp8_kernel": 16}
# The tensor-core instruction each kernel must contain on sm_90a (PTX), absent which it would run
# at a fraction of the speed: wgmma for the GEMMs; MLA's 16/32-row tiles are below wgmma's 64 rows.
REQUIRED_PTX = {"_gemm_kernel": "wgmma.mma_async", "_contiguous_kernel": "wgmma.mma_async",
                "_masked_kernel": "wgmma.mma_async", "_k_grouped_kernel": "wgmma.mma_async", "_mla_decode_splitkv_kernel": "mma.sync",
                # sparse MLA: mma.sync on 16/32-head tiles, wgmma on the wide tiles' 64 heads
                "_sparse_mla_kernel": "mma", "_sparse_mla_fp8_kernel": "mma",
                # the indexer: wgmma at V3.2's 64 heads (128-row tiles), mma.sync for the tests' 16-row ones
                "_mqa_logits_kernel": "mma", "_paged_mqa_logits_kernel": "mma"}
# The kernels whose main loop must stream its tiles through at least two shared-memory buffers
# (Triton's cp.async pipelining), checked on sm_90a in the TTGIR: with one buffer the next copy
# waits for the last read of the current tile and no load overlaps the math (MLA decode had that
# with 2 stages, the block-table indirection taking one: dskernels/triton/mla.py).
PIPELINED = {"_gemm_kernel", "_contiguous_kernel", "_masked_kernel", "_k_grouped_kernel", "_mla_decode_splitkv_kernel",
             "_sparse_mla_kernel", "_sparse_mla_fp8_kernel"}
PTXAS_DIR = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")


class Compiler:
    """Stands in for JITFunction.run: compiles for one target and records what ptxas reports."""

    def __init__(self, target: Target, verbose: bool, more_rows: tuple[int, ...] = ()):
        self.target = target
        self.more_rows = more_rows  # forward GEMMs' row counts beside 64 and 4096 (--cache-dir: 1 and 8)
        self.backend = make_backend(target.gpu_target)
        self.verbose = verbose
        self.seen: dict[tuple, dict] = {}
        self.context = ""

    def run(self, fn: JITFunction, *args, grid=None, warmup=False, **kwargs):  # noqa: ARG002
        # Triton's own binder: the same specialization (16-byte divisibility of pointers and ints,
        # constexprs) and options a launch on the device would compute. Meta tensors report
        # data_ptr() 0, i.e. aligned, as the caching allocator's blocks are.
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run adds them
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        key = (fn.fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key in self.seen:
            return None
        begin = time.time()
        named = {name: value for (name, value), param in zip(bound.items(), fn.params) if param.is_constexpr}
        record = {"kernel": fn.fn.__name__, "context": self.context, "target": self.target,
                  "options": {"num_warps": options.num_warps, "num_stages": options.num_stages},
                  "constexprs": {k: v for k, v in named.items() if not isinstance(v, bool) or v}}
        try:
            # ptxas's report of the compile itself (Triton runs it with -v, and its own options:
            # --regAllocOptLevel=2 with triton 3.8), printed as the knob set in main asks: no second
            # ptxas run (-14% of this check's time on sm_90a, the same registers and spills for
            # every kernel). A cache hit compiles nothing: ptxas is run here then.
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target.gpu_target,
                                          options=options.__dict__)
            ptx = compiled.asm["ptx"]
            report = _ptxas_report(log.getvalue()) or self._ptxas(ptx)
            record.update(report, shared=compiled.metadata.shared)
            required = REQUIRED_PTX.get(record["kernel"])
            record["tensor_cores"] = required is None or required in ptx
            # NATIVE fp8 casts (native_fp8_cast): the one-step conversion, never Triton's fp16 detour
            # (sm_89's cvt.rz.f16.f32 first: a double rounding that changes the bits).
            # TMA_WS: Triton's Hopper warp specialization really split the loop (producer and
            # consumer warp groups with rebalanced registers), not a silent fallback to one group.
            record["warp_specialized"] = not named.get("TMA_WS") or "setmaxnreg" in ptx
            record["native_cvt"] = not named.get("NATIVE") or (
                "cvt.rn.satfinite.e4m3x2.f32" in ptx and "cvt.rz.f16.f32" not in ptx)
            # Multi-buffered tiles: local_alloc of memdesc<N x rows x cols x ...> with N buffers.
            record["buffers"] = max((int(n) for n in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x",
                                                                compiled.asm["ttgir"])), default=0)
        except Exception as e:  # noqa: BLE001  (reported, then the check fails)
            record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        record["seconds"] = time.time() - begin
        self.seen[key] = record
        if self.verbose:
            print(_line(record), flush=True)
        return None

    def _ptxas(self, ptx: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            # Triton ships a newer ptxas for Blackwell beside the one for older GPUs.
            ptxas = os.path.join(PTXAS_DIR, "ptxas-blackwell" if self.target.capability >= (10, 0) else "ptxas")
            if not os.path.exists(ptxas):
                ptxas = os.path.join(PTXAS_DIR, "ptxas")
            out = subprocess.run([ptxas, f"-arch={self.target.ptxas_arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        return _ptxas_report(out) or {"registers": -1, "spill_bytes": 0}


def _ptxas_report(out: str) -> dict | None:
    """Registers and spilled bytes from ptxas -v's output; None if it holds no report."""
    regs = re.search(r"Used (\d+) registers", out)
    if regs is None:
        return None
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return {"registers": int(regs.group(1)), "spill_bytes": max(spills, default=0)}


def _dropped(r: dict) -> bool:
    """An autotuning candidate over the GPU's shared memory: Triton's autotuner catches the launch's
    OutOfResources and never picks it (as long as another candidate fits: checked in main)."""
    return "autotune" in r["context"] and "error" not in r and r["shared"] > r["target"].max_shared_bytes


def _bad(r: dict) -> bool:
    if "error" in r or (r["shared"] > r["target"].max_shared_bytes and not _dropped(r)) or not r["native_cvt"]:
        return True
    if not r["warp_specialized"]:
        return True
    # fp32 operands (FP32_DOT: IEEE dots, fp32 q or cache) are the exact path, not a fast one: only
    # the compile and the shared memory are checked there.
    fp32_path = r["constexprs"].get("FP32_DOT") is True
    return r["target"].strict and not fp32_path and (r["spill_bytes"] > ALLOWED_SPILL_BYTES.get(r["kernel"], 0) or not r["tensor_cores"]
                                   or (r["kernel"] in PIPELINED and r["buffers"] < 2))


def _line(r: dict) -> str:
    shape = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper())
    opts = ",".join(f"{k}={v}" for k, v in r["options"].items())
    where = f"{r['target'].ptxas_arch} {r['kernel']} [{r['context']}] {shape} {opts}"
    if "error" in r:
        return f"FAIL {where}: {r['error']}"
    notes = "" if r["tensor_cores"] or not r["target"].strict else f", no {REQUIRED_PTX[r['kernel']]}"
    if not r["native_cvt"]:
        notes += ", NATIVE without a one-step cvt.rn.satfinite.e4m3x2.f32"
    if not r["warp_specialized"]:
        notes += ", TMA_WS without warp specialization (no setmaxnreg)"
    if r["kernel"] in PIPELINED:
        notes += f", {r['buffers']} buffer{'s' if r['buffers'] != 1 else ''}"
    if _dropped(r):
        notes += " (over this GPU's shared memory: the autotuner drops it)"
    elif r["shared"] > r["target"].max_shared_bytes:
        notes += f" (more than this GPU's {r['target'].max_shared_bytes})"
    return (f"{'FAIL' if _bad(r) else 'ok  '} {where}: {r['registers']} regs, {r['spill_bytes']} B spilled, "
            f"{r['shared']} B shared{notes}, {r['seconds']:.1f} s")


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def mla_cases(compiler: Compiler) -> None:
    from dskernels.triton import mla as triton_mla

    # V3's heads (fp32 ones too: 4-byte operands need smaller key tiles to fit shared memory), and
    # the small ones the GPU runs of tests/test_mla.py launch (d = 64, dv = 48).
    for d, dv, h_q, s_q, cache_dtype, page, causal in [
            (576, 512, 16, 1, torch.bfloat16, 64, False), (576, 512, 128, 2, torch.bfloat16, 64, True),
            (576, 512, 16, 1, torch.float8_e4m3fn, 64, False), (576, 512, 64, 1, torch.float16, 61, True),
            (576, 512, 128, 2, torch.float8_e4m3fn, 64, True), (576, 512, 128, 1, torch.bfloat16, 1, False),
            (576, 512, 16, 1, torch.float32, 64, False), (576, 512, 128, 2, torch.float32, 64, True),
            (64, 48, 4, 3, torch.float16, 61, True), (64, 48, 4, 1, torch.float8_e4m3fn, 16, False)]:
        compiler.context = f"mla d={d} h_q={h_q} s_q={s_q} {str(cache_dtype)[6:]} page={page}"
        q_dtype = cache_dtype if cache_dtype in (torch.float16, torch.float32) else torch.bfloat16
        b, parts = 4, 8
        triton_mla.flash_mla_with_kvcache(
            _meta(b, s_q, h_q, d, dtype=q_dtype), _meta(10, page, 1, d, dtype=cache_dtype),
            _meta(b, 5, dtype=torch.int32), _meta(b, dtype=torch.int32), dv, _meta(parts, 8, dtype=torch.int32),
            _meta(b + 1, dtype=torch.int32), d ** -0.5, causal,
            _meta(1, dtype=torch.float32) if cache_dtype == torch.float8_e4m3fn else None,
            _meta(b, s_q, h_q, dv, dtype=q_dtype), _meta(b, h_q, s_q, dtype=torch.float32))
    for b, parts in [(1, 66), (300, 132)]:  # the split plan (get_mla_metadata's Triton path)
        compiler.context = f"mla metadata b={b} parts={parts}"
        triton_mla.get_mla_metadata(_meta(b, dtype=torch.int32), _meta(parts, 8, dtype=torch.int32),
                                    _meta(b + 1, dtype=torch.int32), 64, 5)
    for b, k, min_piece in [(1, 4, 1024), (7, 3, 1024), (300, 1, 4096)]:  # the batch-invariant plan
        compiler.context = f"mla invariant plan b={b} K={k}"
        triton_mla.invariant_split_plan(_meta(b, dtype=torch.int32), _meta(b * k, 8, dtype=torch.int32),
                                        _meta(b + 1, dtype=torch.int32), k, min_piece, 64)


def mla_sparse_cases(compiler: Compiler) -> None:
    from dskernels.triton import mla_sparse as triton_sparse

    # DeepSeek-V3.2: decode over the FP8 cache (16 and 128 heads, MTP), over a bf16 cache, prefill;
    # the small heads of tests/test_mla_sparse.py's GPU runs (d = 64, dv = 48); fp32 q (4-byte
    # operands: the tile rule must leave them room in shared memory, on the 99 KB of an sm_89 too).
    f32 = torch.float32
    for d, dv, h_q, s_q, fp8, prefill, dtype in [
            (576, 512, 16, 1, True, False, torch.bfloat16), (576, 512, 128, 2, True, False, torch.bfloat16),
            (576, 512, 64, 1, False, False, torch.bfloat16), (576, 512, 128, 1, False, True, torch.bfloat16),
            (64, 48, 16, 2, False, False, torch.bfloat16), (64, 48, 8, 1, False, True, torch.bfloat16),
            (576, 512, 16, 1, False, False, f32)]:
        compiler.context = (f"mla_sparse d={d} dv={dv} h_q={h_q} s_q={s_q} {'fp8_v32' if fp8 else str(dtype)[6:]}"
                            f"{' prefill' if prefill else ''}")
        rows, topk = 4 * s_q, 2048
        kv = _meta(10, 64, 1, 656 if fp8 else d, dtype=torch.float8_e4m3fn if fp8 else dtype)
        triton_sparse.sparse_mla(
            _meta(rows, h_q, d, dtype=dtype), kv, _meta(rows, 1, topk, dtype=torch.int32),
            _meta(rows, dtype=torch.int32), _meta(h_q, dtype=f32), d ** -0.5, dv, 64, 640, fp8,
            _meta(rows, h_q, dv, dtype=dtype), _meta(rows, 1, h_q, dtype=f32), 1,
            _meta(rows, h_q, dtype=f32) if prefill else None)
    # The opt-in wide tiles (DSKERNELS_SPARSE_MLA_TILE=wide): V3.2's FP8 cache at 128 heads (64-head
    # tiles), 16 (TP8) and 32 with MTP, one list of 64 entries per row (no split) as well; a bf16
    # cache's decode and prefill (max_logits) at 128 heads.
    os.environ[triton_sparse.TILE_KNOB] = "wide"
    try:
        for h_q, s_q, topk, fp8, prefill in [(128, 2, 2048, True, False), (16, 1, 2048, True, False),
                                             (32, 2, 2048, True, False), (128, 1, 64, True, False),
                                             (128, 1, 2048, False, False), (128, 1, 2048, False, True)]:
            compiler.context = (f"mla_sparse wide {'fp8_v32' if fp8 else 'bfloat16'} h_q={h_q} s_q={s_q} "
                                f"topk={topk}{' prefill' if prefill else ''}")
            rows = 4 * s_q
            kv = _meta(10, 64, 1, 656, dtype=torch.float8_e4m3fn) if fp8 else _meta(10, 64, 1, 576)
            triton_sparse.sparse_mla(
                _meta(rows, h_q, 576), kv, _meta(rows, 1, topk, dtype=torch.int32), _meta(rows, dtype=torch.int32),
                _meta(h_q, dtype=f32), 576 ** -0.5, 512, 64, 640, fp8, _meta(rows, h_q, 512),
                _meta(rows, 1, h_q, dtype=f32), 1, _meta(rows, h_q, dtype=f32) if prefill else None)
    finally:
        del os.environ[triton_sparse.TILE_KNOB]


def indexer_cases(compiler: Compiler) -> None:
    from dskernels.triton import indexer as triton_indexer

    # V3.2's indexer (64 heads of 128) and the small heads of tests/test_indexer.py's GPU runs.
    fp8, f32, i32 = torch.float8_e4m3fn, torch.float32, torch.int32
    for heads, dim in [(64, 128), (4, 32), (4, 16)]:
        for compressed in (0, 256):
            compiler.context = f"indexer mqa h={heads} d={dim}{' compressed' if compressed else ''}"
            m, n = 64, 4096
            triton_indexer.mqa_logits(_meta(m, heads, dim, dtype=fp8), _meta(n, dim, dtype=fp8), _meta(n, dtype=f32),
                                      _meta(m, heads, dtype=f32), _meta(m, dtype=i32), _meta(m, dtype=i32), compressed,
                                      _meta(m, compressed or n, dtype=f32))
        for next_n, lens_2d in [(1, False), (2, True), (150, False)]:  # 150: a prefill through the paged cache
            compiler.context = f"indexer paged h={heads} d={dim} next_n={next_n}"
            b = 8
            triton_indexer.paged_mqa_logits(
                _meta(b, next_n, heads, dim, dtype=fp8), _meta(100, 64, 1, dim + 4, dtype=torch.uint8),
                _meta(b * next_n, heads, dtype=f32), _meta(b, next_n, dtype=i32) if lens_2d else _meta(b, dtype=i32),
                _meta(b, 64, dtype=i32), _meta(b * next_n, 4096, dtype=f32))


def gemm_cases(compiler: Compiler) -> None:
    from dskernels.triton import gemm as triton_gemm

    n, k, groups = 4096, 7168, 4
    f8 = torch.float8_e4m3fn
    # An H100's SMs for the meta tensors' launches: m = 64 then splits the dense kernel along K (16
    # to 64 output tiles), m = 4096 does not; both variants are compiled for every candidate.
    triton_gemm.NO_DEVICE_SMS = 132

    def dense(m):
        triton_gemm.gemm_fp8_fp8_bf16_nt(_meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32),
                                         _meta(n, k, dtype=f8), _meta(n // 128, k // 128, dtype=torch.float32),
                                         _meta(m, n))

    def contiguous(m):
        triton_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
            _meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32), _meta(groups, n, k, dtype=f8),
            _meta(groups, n // 128, k // 128, dtype=torch.float32), _meta(m, n), _meta(m, dtype=torch.int32))

    def masked(m):
        triton_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(
            _meta(groups, m, k, dtype=f8), _meta(groups, m, k // 128, dtype=torch.float32),
            _meta(groups, n, k, dtype=f8), _meta(groups, n // 128, k // 128, dtype=torch.float32),
            _meta(groups, m, n), _meta(groups, dtype=torch.int32), m)

    def weight_gradient(m):  # fp8_gemm_nt's other variant: per-row b scales, accumulating into fp32
        triton_gemm.fp8_gemm_nt(_meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32),
                                _meta(n, k, dtype=f8), _meta(n, k // 128, dtype=torch.float32),
                                _meta(m, n, dtype=torch.float32), accumulate=True)

    def dense_k128(m):  # one K block: k_blocks must stay a runtime value (TMA_WS's loop)
        triton_gemm.gemm_fp8_fp8_bf16_nt(_meta(m, 128, dtype=f8), _meta(m, 1, dtype=torch.float32),
                                         _meta(n, 128, dtype=f8), _meta(n // 128, 1, dtype=torch.float32),
                                         _meta(m, n))

    def dense_fp32_accumulate(m):  # fp8_gemm_nt with 128x128 b scales adding to an fp32 out
        triton_gemm.fp8_gemm_nt(_meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32),
                                _meta(n, k, dtype=f8), _meta(n // 128, k // 128, dtype=torch.float32),
                                _meta(m, n, dtype=torch.float32), accumulate=True)

    def bmm(m, per_row, out_dtype, accumulate):  # fp8_einsum's general form on the masked kernel
        triton_gemm.fp8_bmm_nt(_meta(groups, m, k, dtype=f8), _meta(groups, m, k // 128, dtype=torch.float32),
                               _meta(groups, n, k, dtype=f8),
                               _meta(groups, n if per_row else n // 128, k // 128, dtype=torch.float32),
                               _meta(groups, m, n, dtype=out_dtype), accumulate=accumulate)

    def bmm_general(m):  # MLA's weight gradient: per-row b scales, adding to fp32
        bmm(m, True, torch.float32, True)

    def bmm_fp32_blocks(m):  # 128x128 b scales into fp32 (a 256-wide tile reads two scale rows)
        bmm(m, False, torch.float32, False)

    def bmm_bf16_rows(m):  # per-row b scales into bf16
        bmm(m, True, torch.bfloat16, False)

    def k_grouped(m, k_major, per_group=4096):  # MoE weight gradients, 4 experts' tokens, either layout
        tokens = groups * per_group
        operand = (lambda rows: _meta(rows * tokens, dtype=f8)) if k_major else (lambda rows: _meta(tokens, rows, dtype=f8))
        blocks = groups * -(-per_group // 128)
        triton_gemm.k_grouped_fp8_gemm(operand(m), _meta(blocks, m, dtype=torch.float32), operand(n),
                                       _meta(blocks, n, dtype=torch.float32), _meta(groups, m, n, dtype=torch.float32),
                                       [per_group] * groups, _meta(groups, dtype=torch.int32), k_major, True)

    def k_grouped_nt(m):
        k_grouped(m, True)

    def k_grouped_tn(m):
        k_grouped(m, False)

    def k_grouped_unaligned(m):  # tn groups of any size (nt ones are padded to multiples of 16 first)
        k_grouped(m, False, per_group=4001)

    def dense_nn(m):  # fp8_gemm_nn's b.T view: read MN-major on sm_100, copied K-major elsewhere
        triton_gemm.gemm_fp8_fp8_bf16_nt(_meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32),
                                         _meta(k, n, dtype=f8).T, _meta(k // 128, n // 128, dtype=torch.float32).T,
                                         _meta(m, n))

    def contiguous_psum(m):  # DeepGEMM's psum layout: [G] cumulative ends, zero padding
        triton_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
            _meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32), _meta(groups, n, k, dtype=f8),
            _meta(groups, n // 128, k // 128, dtype=torch.float32), _meta(m, n), _meta(groups, dtype=torch.int32),
            psum=True, zero_pad=True)

    def bf16_contiguous(m):  # the bf16 GEMMs: the same kernels without scales
        triton_gemm.m_grouped_bf16_gemm_contiguous(_meta(m, k), _meta(groups, n, k), _meta(m, n),
                                                   _meta(m, dtype=torch.int32), False, False, 0)

    def bf16_contiguous_nn(m):  # b [G, k, n] read transposed: MN-major tiles (bf16 wgmma takes them)
        triton_gemm.m_grouped_bf16_gemm_contiguous(_meta(m, k), _meta(groups, k, n).transpose(1, 2), _meta(m, n),
                                                   _meta(groups, dtype=torch.int32), True, False, 0)

    def bf16_masked(m):
        triton_gemm.m_grouped_bf16_gemm_masked(_meta(groups, m, k), _meta(groups, n, k), _meta(groups, m, n),
                                               _meta(groups, dtype=torch.int32), m)

    def bf16_k_grouped(m, per_group=4096):
        tokens = groups * per_group
        triton_gemm.k_grouped_bf16_gemm(_meta(tokens, m), _meta(tokens, n), _meta(groups, m, n, dtype=torch.float32),
                                        [per_group] * groups, _meta(groups, dtype=torch.int32), True)

    heuristic = triton_gemm._heuristic_config
    per_row = (weight_gradient, k_grouped_nt, k_grouped_tn, bmm_general, bmm_bf16_rows)
    split_k = (dense, dense_nn, weight_gradient)  # fp8_gemm_nt's kernel
    # Its warp-specialized candidates, sm_90a only (_tma_ws_ok); the last two calls are there for
    # them alone (the fp32-accumulate form's pointer loads get the heuristic tile only).
    tma_ws = (dense, dense_nn, dense_fp32_accumulate, dense_k128)
    tma_ws_only = (dense_fp32_accumulate, dense_k128)
    bf16 = (bf16_contiguous, bf16_contiguous_nn, bf16_masked, bf16_k_grouped)
    for name, call, max_block_m in [("dense", dense, 256), ("dense nn", dense_nn, 256),
                                    ("contiguous", contiguous, 128), ("masked", masked, 256),
                                    ("contiguous psum", contiguous_psum, 128),
                                    ("weight gradient", weight_gradient, 256),
                                    ("dense fp32 accumulate", dense_fp32_accumulate, 256), ("dense k128", dense_k128, 256),
                                    ("bmm general", bmm_general, 256),
                                    ("bmm fp32 blocks", bmm_fp32_blocks, 256), ("bmm bf16 rows", bmm_bf16_rows, 256),
                                    ("k-grouped nt", k_grouped_nt, 256),
                                    ("k-grouped tn", k_grouped_tn, 256),
                                    ("k-grouped unaligned", k_grouped_unaligned, 256),
                                    ("bf16 contiguous", bf16_contiguous, 128),
                                    ("bf16 contiguous nn psum", bf16_contiguous_nn, 128),
                                    ("bf16 masked", bf16_masked, 256), ("bf16 k-grouped tn", bf16_k_grouped, 256)]:
        compiler.context = f"gemm {name}, heuristic"
        # (--cache-dir: the forward GEMMs a decode step runs, at its row counts too)
        more = compiler.more_rows if call in (dense, contiguous, masked) else ()
        for m in (64, 4096, *more) if call is not dense_k128 else ():
            call(m)
        if call is k_grouped_unaligned:
            continue
        configs = (triton_gemm._bf16_gpu_configs(max_block_m, call is not bf16_masked) if call in bf16
                   else [] if call in tma_ws_only
                   else triton_gemm._gpu_configs(max_block_m, call in per_row, call in (contiguous, contiguous_psum)))
        if call in tma_ws and compiler.target.name == "90a":
            configs = configs + triton_gemm._tma_ws_configs()
        for config in configs:  # the autotuning candidates
            compiler.context = f"gemm {name}, autotune candidate"
            meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
            triton_gemm._heuristic_config = lambda *_, meta=meta: dict(meta)
            try:
                for m in (64, 4096, *more) if call in split_k else (4096, *more):
                    call(m)
            finally:
                triton_gemm._heuristic_config = heuristic
    # Batch-invariant mode's dense launches (its fixed tiles): n = 4096 cuts K into 4 ranges, run by
    # 4 programs per tile at m = 64 and looped in one program (K_RANGES) at m = 4096; one range (one
    # K loop) with per-row b scales or accumulating.
    import dskernels

    def dense_fp32(m):
        triton_gemm.fp8_gemm_nt(_meta(m, k, dtype=f8), _meta(m, k // 128, dtype=torch.float32),
                                _meta(n, k, dtype=f8), _meta(n // 128, k // 128, dtype=torch.float32),
                                _meta(m, n, dtype=torch.float32), accumulate=False)

    with dskernels.batch_invariant():
        for name, call in [("dense", dense), ("dense fp32", dense_fp32), ("weight gradient", weight_gradient),
                           ("dense fp32 accumulate", dense_fp32_accumulate)]:
            compiler.context = f"gemm {name}, batch-invariant"
            for m in (64, 4096):
                call(m)


def cast_cases(compiler: Compiler) -> None:
    from dskernels.triton import fp8_cast as triton_cast

    compiler.context = "fp8 casts"
    m, k = 4096, 7168
    for round_scale in (False, True):  # plain and power-of-two (UE8M0) scales
        triton_cast.per_token_cast_to_fp8(_meta(m, k), _meta(m, k, dtype=torch.float8_e4m3fn),
                                          _meta(m, k // 128, dtype=torch.float32), round_scale)
        triton_cast.per_block_cast_to_fp8(_meta(m, k), _meta(m, k, dtype=torch.float8_e4m3fn),
                                          _meta(m // 128, k // 128, dtype=torch.float32), round_scale)
        for groups in (1, 8):  # ks=None (one group) and 8 experts
            triton_cast.per_channel_cast_to_fp8(_meta(m, k), _meta(m, k, dtype=torch.float8_e4m3fn),
                                                _meta(m // 128, k, dtype=torch.float32),
                                                _meta(groups, dtype=torch.int32), round_scale)
        for masked in (False, True):  # SwiGLU + cast of V3's experts (I = 2048), contiguous and masked
            groups, rows, inter = (8, 512, 2048) if masked else (1, m, 2048)
            triton_cast.silu_and_mul_cast_to_fp8(_meta(groups, rows, 2 * inter),
                                                 _meta(groups, rows, inter, dtype=torch.float8_e4m3fn),
                                                 _meta(groups, rows, inter // 128, dtype=torch.float32),
                                                 _meta(groups, dtype=torch.int32) if masked else None, round_scale)
            if not round_scale:  # the same activation without the cast (bf16 experts)
                triton_cast.silu_and_mul(_meta(groups, rows, 2 * inter), _meta(groups, rows, inter),
                                         _meta(groups, dtype=torch.int32) if masked else None)
        # per_custom_dims_cast_to_fp8's rows: V3.2's indexer q (64 heads of 128 per token) and k,
        # and the widest rows it takes (fp32)
        for rows, cols, dtype in ((64 * 64, 128, torch.bfloat16), (4096, 128, torch.bfloat16),
                                  (8, triton_cast.MAX_ROW_CAST_COLS, torch.float32)):
            triton_cast.per_row_cast_to_fp8(_meta(rows, cols, dtype=dtype),
                                            _meta(rows, cols, dtype=torch.float8_e4m3fn),
                                            _meta(rows, dtype=torch.float32), round_scale)


def moe_cases(compiler: Compiler) -> None:
    from benchmarks import bench_moe
    from dskernels.triton import moe as triton_moe

    compiler.context = "router"
    shapes = ((256, 8, 4, 8), (160, 8, 3, 6))  # V3; V2's groups of 20
    # the default tile, bench_moe.py's other (tokens, warps) choices (DSKERNELS_ROUTER_TILE) and the
    # largest one test_moe_router.py launches
    for tile in ("", *bench_moe.ROUTER_TILES, "16,8"):
        os.environ["DSKERNELS_ROUTER_TILE"] = tile
        for experts, groups, topk_groups, topk in shapes[:1] if tile else shapes:
            triton_moe.grouped_topk(_meta(4096, experts, dtype=torch.float32), _meta(experts, dtype=torch.float32),
                                    _meta(4096, topk, dtype=torch.int64), _meta(4096, topk, dtype=torch.float32),
                                    groups, topk_groups, True, 2.5)
    os.environ.pop("DSKERNELS_ROUTER_TILE")


def matmul_cases(compiler: Compiler) -> None:
    from dskernels.triton import matmul as triton_matmul

    # batch-invariant mode's float matmul: batched (a Linear, einsum's heads) and row-grouped (V3's
    # 256 float experts; one group), 16-bit tensor-core and IEEE fp32 dots, with c and without
    for dtype in (torch.bfloat16, torch.float32):
        compiler.context = f"invariant matmul {dtype}"
        a, b = _meta(4096, 7168, dtype=dtype), _meta(256, 2048, 7168, dtype=dtype)
        out = _meta(4096, 2048, dtype=dtype)
        triton_matmul.matmul_nt(a.unsqueeze(0), b[:1], out.unsqueeze(0))
        triton_matmul.matmul_nt(a.unsqueeze(0), b[:1], out.unsqueeze(0), out.unsqueeze(0))
        # decode: 32 column tiles fill few of 132 SMs, K's 4 ranges split over programs (SPLIT)
        triton_matmul.matmul_nt(a[:64].unsqueeze(0), b[:1], out[:64].unsqueeze(0))
        for groups in (256, 1):
            triton_matmul.matmul_nt(a, b[:groups], out, ends=_meta(groups, dtype=torch.int32))


def layer_cases(compiler: Compiler) -> None:
    from dskernels.triton import layer as triton_layer

    # the model layer's norms: hidden 7168, q_lora_rank 1536, kv_lora_rank 512 (strided rows)
    for dim, dtype in [(7168, torch.bfloat16), (1536, torch.float16), (512, torch.float32)]:
        compiler.context = f"rmsnorm dim={dim} {str(dtype)[6:]}"
        triton_layer.rms_norm(_meta(64, dim + 64, dtype=dtype)[:, :dim], _meta(dim, dtype=dtype), 1e-6)
    # the norms that also cast their output for the FP8 projections (bf16 and fp32 layers)
    for dim, dtype, round_scale in [(7168, torch.bfloat16, False), (1536, torch.bfloat16, True),
                                    (7168, torch.float32, False)]:
        compiler.context = f"rmsnorm + fp8 cast dim={dim} {str(dtype)[6:]}"
        triton_layer.rms_norm(_meta(64, dim, dtype=dtype), _meta(dim, dtype=dtype), 1e-6,
                              cast_round_scale=round_scale)
    # the post-attention norm adding the residual first: cast for FP8 projections, or not (float ones)
    for dtype, round_scale in [(torch.bfloat16, False), (torch.float32, None)]:
        compiler.context = f"residual add + rmsnorm{' + fp8 cast' if round_scale is not None else ''} {str(dtype)[6:]}"
        triton_layer.rms_norm(_meta(64, 7168, dtype=dtype), _meta(7168, dtype=dtype), 1e-6,
                              cast_round_scale=round_scale, addend=_meta(64, 7168, dtype=dtype))

    # the model layer's q and k rope parts: V3's 128 heads and the test models' few, every dtype
    for heads, dtype, interleave in [(128, torch.bfloat16, True), (5, torch.float16, False), (16, torch.float32, True)]:
        compiler.context = f"rope heads={heads} {str(dtype)[6:]}"
        triton_layer.rope_qk(_meta(64, heads, 192, dtype=dtype)[..., 128:], _meta(64, 576, dtype=dtype)[..., 512:],
                             _meta(64, dtype=torch.int64), _meta(32, dtype=torch.float32), 1.2, interleave)
    # the MoE combine: V3's hidden 7168, 8 slots per token, bf16 and fp32 outputs, with the shared
    # experts' output and the residual added in it (the layer's decode) or without
    for out_dtype, addends in ((torch.bfloat16, 2), (torch.float32, 0), (torch.float16, 1)):
        compiler.context = f"moe combine {str(out_dtype)[6:]} + {addends}"
        triton_layer.moe_combine(_meta(64 * 8, 7168, dtype=torch.bfloat16), _meta(64 * 8, dtype=torch.int64),
                                 _meta(64, 8, dtype=torch.int64), _meta(64, 8, dtype=torch.float32), 256, out_dtype,
                                 (_meta(64, 7168, dtype=out_dtype),) * addends)
    # the MoE's rows sorted by expert: V3's decode (8 of 256 experts, hidden 7168; up to the most
    # pairs it takes) and a test model's 6 slots of hidden 256, scales in DeepGEMM's layout; bf16 rows
    for tokens, k, hidden in ((1, 8, 7168), (triton_layer.MAX_SORTED_PAIRS // 8, 8, 7168), (37, 6, 256)):
        compiler.context = f"moe sort rows tokens={tokens} k={k} hidden={hidden}"
        triton_layer.moe_sort_rows(_meta(tokens, hidden, dtype=torch.float8_e4m3fn),
                                   _meta(hidden // 128, tokens, dtype=torch.float32).t(),
                                   _meta(tokens, k, dtype=torch.int64), 256)
    compiler.context = "moe sort rows bf16 tokens=1 k=8 hidden=7168"  # float experts' rows (no scales)
    triton_layer.moe_sort_rows(_meta(1, 7168), None, _meta(1, 8, dtype=torch.int64), 256)
    # the paged latent cache write: V3's bf16 cache and its FP8 one (e4m3 with a scale)
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        compiler.context = f"latent cache write {str(cache_dtype)[6:]}"
        kv = _meta(8, 2, 576, dtype=torch.bfloat16)
        triton_layer.write_latent_cache(kv[..., :512], kv[..., 512:], _meta(100, 64, 1, 576, dtype=cache_dtype),
                                        _meta(8, 70, dtype=torch.int32), _meta(8, dtype=torch.int32),
                                        _meta(1, dtype=torch.float32))
    # V3.2's cache writes: the 656-byte FP8 latents (bf16 and fp32 layers) and the indexer's FP8 keys
    for dtype in (torch.bfloat16, torch.float32):
        compiler.context = f"sparse latent cache write {str(dtype)[6:]}"
        kv = _meta(8, 2, 576, dtype=dtype)
        triton_layer.write_sparse_latent_cache(kv[..., :512], kv[..., 512:], _meta(100, 64, 1, 656, dtype=torch.uint8),
                                               _meta(8, 70, dtype=torch.int32), _meta(8, dtype=torch.int32))
    # V3.2's indexer q and k in one kernel (64 heads of 128, rope 64; a test model's 16 of 64, rope
    # 32): its keys written into DeepGEMM's paged layout (decode) or returned (prefill)
    for heads, dim, rope, dtype, write, round_scale in ((64, 128, 64, torch.bfloat16, True, False),
                                                         (64, 128, 64, torch.bfloat16, False, True),
                                                         (64, 128, 64, torch.float32, True, False),
                                                         (16, 64, 32, torch.float32, True, False),
                                                         (5, 64, 32, torch.float16, False, False)):
        compiler.context = f"indexer q k heads={heads} dim={dim} {str(dtype)[6:]} write={write}"
        cache = (_meta(100, 64, 1, dim + 4, dtype=torch.uint8), _meta(8, 70, dtype=torch.int32),
                 _meta(8, dtype=torch.int32)) if write else ()
        triton_layer.indexer_qk(_meta(8, 2, heads, dim, dtype=dtype), _meta(8, 2, dim, dtype=dtype),
                                _meta(8, 2, heads, dtype=torch.float32), _meta(dim, dtype=dtype), _meta(dim, dtype=dtype),
                                1e-6, _meta(8, 2, dtype=torch.int64), _meta(rope // 2, dtype=torch.float32), 1.2,
                                _meta(dim, dim, dtype=torch.float32), 0.01, round_scale, *cache)
    # the selection: V3.2's top-2048 positions, and into cache slots through the block table
    compiler.context = "topk positions"
    triton_layer.topk_positions(_meta(64, 2048, dtype=torch.float32), _meta(64, 2048, dtype=torch.int64))
    compiler.context = "selected slots"
    triton_layer.selected_slots(_meta(64, 1, 2048, dtype=torch.int32), _meta(64, 70, dtype=torch.int32), 64)


def ep_cases(compiler: Compiler) -> None:
    from dskernels.triton import ep as triton_ep

    compiler.context = "ep"
    tokens, hidden, topk, experts, ranks = 4096, 7168, 8, 256, 8
    idx = _meta(tokens, topk, dtype=torch.int64)
    triton_ep.get_dispatch_layout(idx, experts, ranks, _meta(ranks, dtype=torch.int32),
                                  _meta(experts, dtype=torch.int32), _meta(tokens, ranks, dtype=torch.bool))
    rows = _meta(tokens, hidden // 4 + 4, dtype=torch.int32)  # fp8 x + scales + ids as int32 words
    triton_ep.copy_rows(rows, _meta(tokens, dtype=torch.int64), _meta(tokens, hidden // 4 + 4, dtype=torch.int32),
                        _meta(tokens, dtype=torch.int64), tokens)
    segments = [_meta(tokens, hidden // 4, dtype=torch.int32), _meta(tokens, hidden // 128, dtype=torch.int32),
                _meta(tokens, 2 * topk, dtype=torch.int32), _meta(tokens, topk, dtype=torch.int32)]
    offsets, at = [], 0
    for s in segments:
        offsets.append(at)
        at += -(-s.shape[1] // 4) * 4
    triton_ep.pack_rows(segments, offsets, _meta(tokens, dtype=torch.int64), _meta(tokens, at, dtype=torch.int32),
                        tokens)
    for y_dtype, out_dtype, weighted in [(torch.bfloat16, torch.bfloat16, False), (torch.bfloat16, torch.float32, True),
                                         (torch.float32, torch.bfloat16, False)]:
        triton_ep.gather_reduce(_meta(tokens, hidden, dtype=y_dtype), _meta(tokens, ranks, dtype=torch.int64),
                                _meta(tokens, ranks, dtype=torch.float32) if weighted else None,
                                _meta(tokens, hidden, dtype=out_dtype))
    triton_ep.low_latency_slots(_meta(ranks * 128, topk, dtype=torch.int64), 0, experts // ranks, 128 * ranks)
    # The low-latency send blocks (decode: M = 128 rows per rank pair): fp8 x | scales | ids, or bf16 x | ids.
    for use_fp8, offsets, row_bytes, round_scale in [(True, [0, hidden, hidden + 224], hidden + 288, False),
                                                     (True, [0, hidden, hidden + 224], hidden + 288, True),
                                                     (False, [0, 2 * hidden], 2 * hidden + 64, False)]:
        triton_ep.low_latency_send(_meta(128, hidden, dtype=torch.bfloat16), _meta(128, topk, dtype=torch.int64),
                                   experts, use_fp8, _meta(ranks, 128, row_bytes, dtype=torch.uint8), offsets,
                                   round_scale)


def benchmark_mla_cases(compiler: Compiler) -> None:
    """--cache-dir only: the Triton MLA launches of benchmarks/bench_mla.py's full grid (b = 128),
    whose batch, table width and split count specialize other than mla_cases' (Triton specializes
    integer arguments by divisibility by 16 and by the value 1): their compiles, not new checks."""
    import dskernels
    from benchmarks import bench_mla
    from dskernels.ops import mla as ops_mla
    from dskernels.triton import mla as triton_mla

    i32, f32 = torch.int32, torch.float32
    grid = [(s_q, h_q, seqlen, varlen, 64, torch.bfloat16) for s_q in (1, 2) for h_q in (16, 32, 64, 128)
            for seqlen in (1024, 4096, 16384) for varlen in (False, True)]
    grid += [(1, 16, 4096, False, 64, torch.float8_e4m3fn)] + [(1, 16, 4096, False, p, torch.bfloat16) for p in (16, 61)]
    b = 128
    for s_q, h_q, seqlen, varlen, page, cache_dtype in grid:
        compiler.context = f"bench mla s_q={s_q} h_q={h_q} seqlen={seqlen}{' varlen' if varlen else ''} page={page}"
        pages = [-(-n // page) for n in bench_mla._lengths(b, seqlen, varlen, 0)]
        with dskernels.backend("triton"):
            parts = int(ops_mla.num_partitions(torch.device("cuda", 0), s_q * h_q, 1))
        lens, meta, splits = _meta(b, dtype=i32), _meta(parts, 8, dtype=i32), _meta(b + 1, dtype=i32)
        triton_mla.get_mla_metadata(lens, meta, splits, ops_mla.BLOCK_TOKENS, ops_mla.FIXED_OVERHEAD_BLOCKS)
        for k in (1, ops_mla.DEFAULT_INVARIANT_SPLITS):  # the invariant variants' plans
            triton_mla.invariant_split_plan(lens, _meta(b * k, 8, dtype=i32), splits, k,
                                            ops_mla.invariant_min_piece(s_q * h_q), ops_mla.BLOCK_TOKENS)
        fp8 = cache_dtype == torch.float8_e4m3fn
        triton_mla.flash_mla_with_kvcache(
            _meta(b, s_q, h_q, 576), _meta(sum(pages), page, 1, 576, dtype=cache_dtype), _meta(b, max(pages), dtype=i32),
            lens, 512, meta, splits, 576 ** -0.5, s_q > 1, _meta(1, dtype=f32) if fp8 else None,
            _meta(b, s_q, h_q, 512), _meta(b, h_q, s_q, dtype=f32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per compiled kernel as it finishes")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--cache-dir", help="Triton's cache directory for the compiled kernels (TRITON_CACHE_DIR): "
                        "with the device's Triton, a launch there of a specialization compiled here is a cache hit "
                        "(scripts/prebuild_device.sh)")
    args = parser.parse_args()
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    original = JITFunction.run
    from dskernels.triton import launch

    launch.ENABLED = False  # every launch must reach the stand-in below, never a cached one
    knobs.nvidia.dump_ptxas_log = True  # Compiler.run reads the report (not a cache key: same entries)
    begin = time.time()
    records = []
    for name in args.targets.split(","):
        # Filling the device's cache: also the GEMMs at a decode's row counts (1, and one not a
        # multiple of 16) and the MLA benchmark's launches, which specialize differently.
        compiler = Compiler(TARGETS[name], args.verbose, (1, 8) if args.cache_dir else ())
        # The launchers ask the device's capability (the fp8 path: native e4m3 on sm_89+, bytes before)
        # and its shared memory (MLA decode's stage count).
        torch.cuda.get_device_capability = lambda *_, c=compiler: c.target.capability
        torch.cuda.get_device_properties = lambda *_, c=compiler: SimpleNamespace(
            shared_memory_per_block_optin=c.target.max_shared_bytes, shared_memory_per_block=49152,
            multi_processor_count=132)
        JITFunction.run = lambda fn, *a, c=compiler, **kw: c.run(fn, *a, **kw)
        try:
            for cases in (mla_cases, mla_sparse_cases, indexer_cases, gemm_cases, cast_cases, moe_cases, matmul_cases,
                          layer_cases, ep_cases, *((benchmark_mla_cases,) if args.cache_dir else ())):
                cases(compiler)
        finally:
            JITFunction.run = original
        records += compiler.seen.values()
    failed = [r for r in records if _bad(r)]
    if not args.verbose:
        for r in records:
            print(_line(r))
    candidates = {(r["target"].name, r["kernel"]) for r in records if "autotune" in r["context"]}
    for target, kernel in sorted(candidates - {(r["target"].name, r["kernel"]) for r in records
                                               if "autotune" in r["context"] and not _dropped(r)}):
        print(f"FAIL {TARGETS[target].ptxas_arch} {kernel}: no autotuning candidate fits this GPU's shared memory")
        failed.append(kernel)
    print(f"{len(records)} kernel specializations compiled for "
          f"{', '.join(TARGETS[t].ptxas_arch for t in args.targets.split(','))} "
          f"(triton {triton.__version__}) in {time.time() - begin:.0f} s; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
