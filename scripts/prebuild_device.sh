#!/usr/bin/env bash
# Builds dskernels._C here for the device machine's Python and torch (../shared/GPU.md: Python 3.12,
# torch 2.11 CUDA 13.0), so device calls can skip the build: a lent machine is released after a
# short idle time and a fresh one would otherwise rebuild on every call, out of the 30-minute budget.
#   bash scripts/prebuild_device.sh          # -> .prebuilt/ (git-ignored); then
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".prebuilt"])
# gpu_check.sh uses the carried library only if its stamp matches the device (source hash, Python
# tag, torch version) and it imports; otherwise it builds as before.
# It also fills Triton's cache for the device (.prebuilt/triton-cache.tgz): with the device's Triton
# (the one torch 2.11 installs here), scripts/check_triton_compile.py compiles for sm_90 what the GPU
# paths launch, and the compile logs of earlier device calls (scripts/triton_launches/*.jsonl:
# dskernels/testing/triton_compiles.py) are replayed. On the device those compiles are cache hits;
# gpu_check.sh reports how many there were and how many it still compiled.
# DEVICE_CPU_TESTS=1 also runs the CPU suite (TRITON_INTERPRET=1) with the device's Python, torch and
# Triton and this library: ~10 minutes on two cores, and version skew found before device time is spent.
# Knobs: DEVICE_PYTHON (python3.12), DEVICE_TORCH (2.11.0), PREBUILD_DIR (/tmp/dskernels-prebuild),
#        TRITON_PREWARM=1 (0: no Triton cache), DEVICE_CPU_TESTS=0, PREBUILD_FORCE=0 (1: build even when
#        .prebuilt's stamp already matches the sources).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py="${DEVICE_PYTHON:-}"
if [ -z "$py" ]; then  # pyenv keeps versions off PATH unless selected
  py=$(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
  py="${py:-python3.12}"
fi
torch_version="${DEVICE_TORCH:-2.11.0}"
work="${PREBUILD_DIR:-/tmp/dskernels-prebuild}"
venv="$work/venv-$($py -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')-torch$torch_version"

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$torch_version" numpy ninja setuptools
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nvidia-cutlass==4.2.0.0"
fi

# Build from a copy of the sources (the checkout's own build stays for this machine's Python).
src="$work/src"
rm -rf "$src" && mkdir -p "$src"
cp -r setup.py csrc dskernels python_ref scripts benchmarks "$src/"  # benchmarks: check_triton_compile.py reads bench_moe
find "$src" -name '*.so' -delete
stamp=$("$venv/bin/python" scripts/prebuilt_stamp.py "$src")
if [ "${PREBUILD_FORCE:-0}" != 1 ] && [ "$stamp" = "$(cat "$root/.prebuilt/stamp.txt" 2>/dev/null)" ] \
   && ls "$root"/.prebuilt/_C*.so > /dev/null 2>&1; then
  # same sources, Python and torch: the ~10-minute build would give the same library (PREBUILD_FORCE=1 redoes it)
  cp "$root"/.prebuilt/_C*.so "$src/dskernels/"
  echo "prebuilt library up to date: $(basename "$root"/.prebuilt/_C*.so); stamp:"
else
  (
    cd "$src"
    export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}" CCACHE_BASEDIR="$src"
    "$venv/bin/python" setup.py -q build_ext --inplace > "$work/build.log" 2>&1 \
      || { tail -40 "$work/build.log"; exit 1; }
  )
  so=$(ls "$src"/dskernels/_C*.so)
  mkdir -p "$root/.prebuilt"
  rm -f "$root"/.prebuilt/_C*.so
  cp "$so" "$root/.prebuilt/"
  echo "$stamp" > "$root/.prebuilt/stamp.txt"
  echo "prebuilt $(basename "$so") ($(du -h "$so" | cut -f1)); stamp:"
fi
cat "$root/.prebuilt/stamp.txt"

if [ "${TRITON_PREWARM:-1}" = 1 ]; then
  # Entries record their absolute paths: the device unpacks them at the same place (gpu_check.sh).
  cache=/tmp/dskernels-triton-cache
  rm -rf "$cache" "$root/.prebuilt/triton-cache.tgz"
  begin=$SECONDS
  (cd "$src" && "$venv/bin/python" scripts/check_triton_compile.py --targets 90a --cache-dir "$cache" \
     > "$work/triton_compile.log" 2>&1) || echo "check_triton_compile.py reported failures ($work/triton_compile.log;" \
     "with the device's Triton, not CI's, its spill bounds may not hold): the cache keeps every kernel that compiled"
  logs=$(ls "$root"/scripts/triton_launches/*.jsonl 2>/dev/null || true)
  if [ -n "$logs" ]; then
    (cd "$src" && TRITON_CACHE_DIR="$cache" "$venv/bin/python" -m dskernels.testing.triton_compiles replay $logs) \
      || echo "some logged launches did not replay"
  fi
  # the cubins and their metadata are all a launch reads (Triton drops the group's missing files)
  tar czf "$root/.prebuilt/triton-cache.tgz" -C "$cache" --exclude='*.llir' --exclude='*.ttir' --exclude='*.ttgir' \
    --exclude='*.ptx' --exclude='*.source' .
  echo "Triton cache: $(ls "$cache" | wc -l) kernels for sm_90 in $((SECONDS - begin)) s," \
       "$(du -h "$root/.prebuilt/triton-cache.tgz" | cut -f1) packed"
fi

if [ "${DEVICE_CPU_TESTS:-0}" = 1 ]; then
  # The CPU suite under the device's Python, torch and Triton (its interpreter), with the library just
  # built: what breaks with versions other than CI's fails here, not on the device's clock (torch 2.11's
  # Dynamo, say). numpy < 2.4: Triton 3.6's interpreter fails under newer ones (triton-lang/triton#9171).
  "$venv/bin/python" -m pip install -q --disable-pip-version-check pytest pytest-xdist 'numpy<2.4' \
    'transformers>=5.0,<6' matplotlib
  tree="$work/tests-tree"
  rm -rf "$tree" && mkdir -p "$tree"
  git ls-files -z | tar cf - --null -T - | tar xf - -C "$tree"
  cp "$root"/.prebuilt/_C*.so "$tree/dskernels/"
  log="$work/cpu_tests.log"
  if (cd "$tree" && PATH="$venv/bin:$PATH" PYTHONPATH="$tree" TRITON_INTERPRET=1 python -m pytest tests -n auto -q \
        -p no:cacheprovider > "$log" 2>&1); then
    echo "CPU suite with the device's versions: $(tail -1 "$log")"
  else
    echo "CPU suite with the device's versions FAILED ($log):"
    grep -E '^(FAILED|ERROR)' "$log" | head -20
    tail -1 "$log"
    exit 1
  fi
fi
