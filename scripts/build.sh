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
flock "${TMPDIR:-/tmp}/dskernels-build.lock" \
  python -m pip install --no-build-isolation --no-deps -e . -q
