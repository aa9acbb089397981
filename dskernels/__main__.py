"""`python -m dskernels`: what this install is, what it can run here, and what the `auto` backend
runs on each GPU, with the reason when it is not the CUDA kernel. For "why does it not use the
CUDA kernel?" and for bug reports (paste the whole output).

    python -m dskernels
"""

from __future__ import annotations

import os
import sys

import torch

import dskernels
from dskernels import _backend
from dskernels.ops import fp8, gemm, mla


def families() -> list[tuple[str, bool, bool]]:
    """(ops, has a CUDA kernel in a CUDA build, that kernel passed its GPU tests): the flags each
    family's ops hand to select_backend (the shape rules some add are in their docs)."""
    return [
        ("per_token_cast_to_fp8, per_block_cast_to_fp8", True, fp8._CUDA_CAST_VERIFIED),
        ("gemm_fp8_fp8_bf16_nt, m_grouped_gemm_fp8_fp8_bf16_nt_{contiguous,masked} (bf16 out)", True,
         gemm._CUDA_GEMM_VERIFIED),
        ("get_mla_metadata, flash_mla_with_kvcache (d = 576, dv = 512)", True, mla._CUDA_MLA_VERIFIED),
        ("ep_get_dispatch_layout", True, True),
        ("the other ops: fp32-out and k-grouped FP8 GEMMs, bf16 grouped GEMMs (the dense bf16 GEMMs and einsum "
         "run torch's cuBLAS matmuls), per_channel_cast_to_fp8, silu_and_mul "
         "(and its cast), sparse MLA, indexer logits, grouped_topk, EP row movers, the model layer's fused kernels",
         False, False),
    ]


def _knobs() -> list[str]:
    return sorted(f"{name}={value}" for name, value in os.environ.items()
                  if (name.startswith("DSKERNELS_") or name in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")) and value)


def report() -> str:
    lines = [f"dskernels {_version()} at {os.path.dirname(os.path.abspath(dskernels.__file__))}",
             f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
             f"triton {_triton_version()}"]
    built = torch.ops.dskernels._build_info()
    lines.append(f"extension: built against torch {torch.ops.dskernels._built_torch_version()}, "
                 + ("with the sm_90a CUDA kernels" if built == "cuda"
                    else "schemas only (no CUDA kernels: built without a CUDA toolkit or with DSKERNELS_CPU_ONLY)"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(f"backends that run here: {', '.join(dskernels.available_backends())}; asked: {_asked()}")
    lines.append("knobs set: " + (", ".join(_knobs()) or "none"))
    lines.append("CPU tensors: the reference (auto); Triton when forced, under TRITON_INTERPRET=1")
    if not gpus:
        lines.append("GPUs: none visible to torch (torch.cuda.is_available() is False); on a Hopper GPU's tensors "
                     "`auto` would run:")
        lines += _choices(hopper=True)
    for index in range(gpus):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"GPU {index}: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB; what `auto` runs on its tensors:")
        lines += _choices(hopper=(props.major, props.minor) == (9, 0))
    return "\n".join(lines)


def _asked() -> str:
    """The backend asked for, and whether it can run here (a bad DSKERNELS_BACKEND is reported,
    not raised: this report is what a user pastes when something is wrong)."""
    try:
        asked = _backend.current_backend()
    except ValueError as e:
        return f"none valid: {e} (every op raises this until it is fixed)"
    note = "" if asked == "auto" or asked in dskernels.available_backends() else ", which cannot run here"
    return f"{asked} (dskernels.backend(...) or DSKERNELS_BACKEND){note}"


def _choices(hopper: bool) -> list[str]:
    lines = []
    for ops, has_cuda, verified in families():
        chosen, why = _backend.auto_choice(has_cuda=has_cuda, has_triton=True, cuda_verified=verified, hopper=hopper)
        lines.append(f"  {chosen:<6} {ops}" + ("" if chosen == "cuda" else f"  [{why}]"))
    return lines


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dskernels")
    except Exception:  # a checkout on sys.path without an install
        return "(not installed: a checkout)"


def _triton_version() -> str:
    if not _backend.triton_installed():
        return f"not usable here ({_backend._triton_import_error()})"
    import triton

    return triton.__version__


if __name__ == "__main__":
    print(report())
