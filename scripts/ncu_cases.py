"""One call of a target-shape kernel inside a profiler range, for Nsight Compute:

    ncu --profile-from-start off --kernel-name regex:KERNEL --launch-count 1 --section ... \\
        python scripts/ncu_cases.py CASE
    python scripts/ncu_cases.py --list          # CASE  KERNEL-REGEX  what it is

The cases are the issues' targets that their kernels miss (benchmarks/targets.py; H200 numbers of
2026-12-04): what the kernel waits on (warp stall reasons, the stalls' source lines, tensor-pipe
and shared-memory utilization) decides the next change, and the benchmark alone cannot say.
The call is made once outside the range first (compiles, autotuning, tensor maps), then once in it.
scripts/gpu_check.sh runs each case under ncu (its `profiles` step) and keeps the reports in logs.tgz.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import dskernels  # noqa: E402


def _mla_compute_bound():
    from benchmarks import bench_mla
    return bench_mla._case(128, 2, 128, 1, 576, 512, 4096, False, 64, torch.bfloat16, True), "cuda"


def _mla_memory_bound():
    from benchmarks import bench_mla
    return bench_mla._case(128, 1, 16, 1, 576, 512, 4096, False, 64, torch.bfloat16, False), "cuda"


def _contiguous_gemm():
    from benchmarks import bench_gemm
    return bench_gemm._contiguous_case(4, 8192, 4096, 7168, "cuda"), "cuda"


def _small_m_gemm():
    from benchmarks import bench_gemm
    return bench_gemm._dense_case(64, 2112, 7168, "cuda"), "cuda"


def _triton_dense_gemm():
    from benchmarks import bench_gemm
    return bench_gemm._dense_case(4096, 2112, 7168, "cuda"), "triton"


# name -> (kernel name regex for ncu, what it is, the case builder, environment for the call)
CASES = {
    "mla_compute": ("decode_kernel", "sm90 MLA decode, causal b=128 s_q=2 h_q=128 seqlen 4096 (#8: 450 of 580 TFLOPS)",
                    _mla_compute_bound, {}),
    # only once tests/test_mla_sm90_seesaw.py passed in the same device call (scripts/gpu_check.sh)
    "mla_compute_seesaw": ("decode_kernel", "the same with the opt-in seesaw consumers", _mla_compute_bound,
                           {"DSKERNELS_MLA_SEESAW": "1"}),
    # only once tests/test_mla_sm90_narrow.py passed in the same device call (scripts/gpu_check.sh)
    "mla_memory_narrow": ("decode_kernel", "sm90 MLA decode b=128 s_q=1 h_q=16 seqlen 4096 with the opt-in narrow "
                          "kernel (#8: the default 2967 GB/s, 70% of the H200's copy)", _mla_memory_bound,
                          {"DSKERNELS_MLA_NARROW": "1"}),
    "gemm_contiguous": ("device_kernel", "sm90 contiguous grouped GEMM 4 x 8192, n=4096 k=7168 (#9: 1101 of 1250 TFLOPS)",
                        _contiguous_gemm, {}),
    "gemm_small_m": ("device_kernel", "sm90 dense GEMM m=64 n=2112 k=7168 (#9: 1.17x of 1.2x torch._scaled_mm; "
                     "17 output tiles for 132 SMs)", _small_m_gemm, {}),
    "gemm_triton_dense": ("_gemm_kernel|_tiles_tma_ws", "Triton dense GEMM m=4096 n=2112 k=7168 (#4: 529 TFLOPS, "
                          "the weakest of the two shapes timed)", _triton_dense_gemm, {}),
}


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for name, (kernel, what, _, _) in CASES.items():
            print(f"{name}\t{kernel}\t{what}")
        return 0
    if len(argv) != 1 or argv[0] not in CASES:
        print(f"usage: python scripts/ncu_cases.py CASE | --list; cases: {', '.join(CASES)}")
        return 2
    if not torch.cuda.is_available():
        print("ncu_cases.py profiles GPU kernels: no GPU here")
        return 2
    _, _, build, env = CASES[argv[0]]
    os.environ.update(env)  # (this process runs one case)
    case, backend = build()
    # Inputs (FP8 casts of random data) off the CUDA kernels, as run.py makes them: a cast kernel
    # whose tests failed must not take the GEMM's profile with it.
    setup = "triton" if "triton" in dskernels.available_backends() else backend
    with dskernels.backend(setup):
        inputs = case.make_inputs("cuda")
    with dskernels.backend(backend):
        case.run(*inputs)  # compiles, autotuning, tensor maps: outside the profiled range
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        case.run(*inputs)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ran {argv[0]}: {case.op} {case.params} on {backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
