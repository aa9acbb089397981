#!/usr/bin/env bash
# Installs what dskernels needs and builds it in place. Assumes only Python and (optionally) nvcc.
#   bash scripts/install.sh            # then: python benchmarks/run.py, python -m pytest tests
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python -m pip "$@" --disable-pip-version-check -q; }

if ! python -c "import torch" 2>/dev/null; then
  pip install "torch==${DSKERNELS_TORCH_VERSION:-2.14.1}"
fi
# requirements-dev.txt = requirements.txt plus what the tests compare against (transformers).
pip install -r requirements-dev.txt
# CUTLASS/CuTe headers only: the package's own Python dependencies are not needed (and not at all
# for a CPU-only build, which may be offline).
case "${DSKERNELS_CPU_ONLY:-}" in
  1|true|TRUE|True|yes|YES|Yes) ;;
  *) python -c "import cutlass_library" 2>/dev/null || pip install --no-deps "nvidia-cutlass==4.2.0.0" ;;
esac
if ! command -v ccache >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Optional: makes rebuilds cheap. Not fatal when the package index is unreachable.
  (apt-get install -y -q ccache >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q ccache >/dev/null 2>&1; }) \
    || echo "note: ccache not installed; builds will not be cached"
fi
bash scripts/build.sh
python -c "import dskernels, torch; print('dskernels built:', 'with the sm_90a CUDA kernels' if torch.ops.dskernels._build_info() == 'cuda' else 'schemas only (no CUDA kernels: Triton and the reference)', '; backends here:', dskernels.available_backends())"
