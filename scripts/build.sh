#!/usr/bin/env bash
# Builds dskernels._C in place (editable install). Safe to run from several shells at once: the
# build is serialized by a lock. CUDA kernels are compiled when a CUDA toolkit is found.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CUDA_HOME:-}" ]; then
  # The first nvcc on PATH may be a wrapper script; torch needs the real toolkit root.
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")"; do
    if [ -x "$candidate/bin/nvcc" ]; then export CUDA_HOME="$candidate"; break; fi
  done
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# ccache keys on absolute paths unless told the tree's root: lets a fresh clone (CI) hit the cache.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
case "${DSKERNELS_CPU_ONLY:-}" in
  1|true|TRUE|True|yes|YES|Yes) echo "building dskernels._C, CPU only (DSKERNELS_CPU_ONLY): schemas, no CUDA kernels" ;;
  *) echo "building dskernels._C (CUDA_HOME=${CUDA_HOME:-none}, arch ${TORCH_CUDA_ARCH_LIST}, ${MAX_JOBS} jobs)" ;;
esac
# The build's whole output (ptxas's report of every kernel among it, read by scripts/check_build.sh)
# goes to build-setup.log; if it fails, the compilers' messages are shown (ninja's failed steps;
# else the log's end: pip's traceback says little). pip builds in a fresh temporary directory each
# time, so every kernel is compiled (torch runs nvcc through ccache when it is on PATH: hits for
# the unchanged sources, their ptxas report replayed) and the log is always whole.
exec 9>"${TMPDIR:-/tmp}/dskernels-build.lock"
flock 9
if ! python -m pip install --no-build-isolation --no-deps -e . -v > build-setup.log 2>&1; then
  if grep -q "FAILED:" build-setup.log; then
    grep -A 30 "FAILED:" build-setup.log | head -120
  else
    tail -60 build-setup.log
  fi
  echo "FAIL: the build failed (its whole output: build-setup.log)"
  exit 1
fi
echo "built dskernels._C (the build's output: build-setup.log)"
