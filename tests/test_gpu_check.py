"""scripts/gpu_check.sh, the one device call a session with a GPU makes, run here end to end with fake
GPU tools: a mistake in the script would otherwise show only on the device, and cost the session's
few minutes of it. On CPU the GPU tests skip, `run.py --targets` refuses (no GPU) and the profiles
and benchmarks run the CPU paths; what is checked is that every step runs, in order, within its
budget, and brings its logs back."""

import os
import re
import stat
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stand-ins for the device's tools: ncu runs the profiled command as it would; the others only say
# they were called (compute-sanitizer's cases need a GPU).
FAKES = {
    "nvidia-smi": 'echo "name, memory.total [MiB], clocks.max.sm [MHz]"; echo "Fake GPU, 1 MiB, 1 MHz"',
    "cuobjdump": 'echo "fake cuobjdump $*"',
    "compute-sanitizer": 'echo "fake compute-sanitizer $*"; echo "ERROR SUMMARY: 0 errors"',
    "ncu": 'while [[ "$1" == --* ]]; do case "$1" in --profile-from-start|--clock-control|--kernel-name|'
           '--launch-count|--section) shift 2;; *) shift;; esac; done\n"$@"\n'
           'echo "    Duration                         us       1.00"',
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run with fake GPU tools (on a GPU the script is run itself)")
def test_gpu_check_runs_every_step_off_the_device(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    out, logs = tmp_path / "out", tmp_path / "logs"
    # `python` in the script is this interpreter: another one on PATH would not import this build's
    # _C, and the dry run would then build the library (minutes) before its steps
    search_path = f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    env = dict(os.environ, PATH=search_path, OUT=str(out), LOGS=str(logs), SKIP_BUILD="1",
               GPU_TESTS="tests/test_mla_sm90_seesaw.py", BENCH_OPS="per_token_cast_to_fp8", PROFILE="",
               DEADLINE="500", TARGETS_BUDGET="60", NCU_BUDGET="40", HOST_PROFILE_BUDGET="60", SANITIZER_BUDGET="30")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    summary = (out / "summary.log").read_text()
    assert result.returncode in (0, 1), summary[-3000:] + result.stderr[-2000:]
    for problem in ("syntax error", "unbound variable", "command not found", "No such file"):
        assert problem not in summary + result.stderr, summary[-3000:]
    steps = [line.split(" (")[0] for line in summary.splitlines() if line.startswith("== ")]
    expected = ["== environment", "== carried wheels: CUTLASS headers, nvidia-ml-py", "== build", "== GPU tests",
                "== the issues' target shapes", "== ncu mla_compute: sm90 MLA decode, causal b=128 s_q=2 h_q=128 seqlen 4096",
                "== ncu mla_compute_seesaw: the same with the opt-in seesaw consumers",
                "== ncu gemm_contiguous: sm90 contiguous grouped GEMM 4 x 8192, n=4096 k=7168",
                "== ncu gemm_small_m: sm90 dense GEMM m=64 n=2112 k=7168",
                "== ncu gemm_triton_dense: Triton dense GEMM m=4096 n=2112 k=7168",
                "== host profile of the layer's eager decode step", "== benchmarks",
                "== compute-sanitizer memcheck", "== compute-sanitizer racecheck",
                "== against the issues' targets", "== done"]
    assert steps == expected, (steps, summary[-3000:])
    assert "SKIP_BUILD=1: using the library already built in place" in summary, summary[-3000:]
    assert re.search(r"Triton cache: \d+ kernels carried", summary), summary[-3000:]
    assert "tests/test_mla_sm90_seesaw.py: rc 0:" in summary  # (every test skips here: no GPU)
    assert "ms per step" in summary  # the host profile's headline (the tiny model on CPU)
    assert "--targets times the issues' target shapes, which needs a GPU" in (logs / "targets.log").read_text()
    with tarfile.open(out / "logs.tgz") as packed:
        names = {os.path.basename(n) for n in packed.getnames()}
    assert {"targets.log", "host_profile.txt", "bench.log", "ncu_mla_compute.txt", "pytest_gpu.log"} <= names, names
    assert (out / "results.json").exists() and not (out / "targets.json").exists()
