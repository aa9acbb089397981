#!/usr/bin/env bash
# Checks what CI can of the builds (no GPU here):
#  1. the extension that setup.py built holds sm_90a code (when built with CUDA), ptxas reported
#     no spills and no serialized wgmma for its kernels (build-setup.log, from scripts/build.sh),
#     and its memory-bound kernels keep their loads in flight (scripts/check_sass.py);
#  2. CMakeLists.txt builds the C++ into a library that registers the same ops, and with CUDA
#     configures and compiles a kernel source;
#  3. the Triton kernels compile for sm_90a, sm_100a, sm_89 and sm_80 (scripts/check_triton_compile.py);
#  4. `pip install .` from the sdist gives a package that imports and runs outside the checkout
#     (scripts/check_sdist.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

so=$(python -c "import dskernels._C as c; print(c.__file__)")
built=$(python -c "import dskernels, torch; print(torch.ops.dskernels._build_info())")
# cuobjdump ships with full toolkits and with triton's wheel; a bare nvcc install lacks it.
cuobjdump=$(command -v cuobjdump || true)
[ -x "$CUDA_HOME/bin/cuobjdump" ] && cuobjdump="$CUDA_HOME/bin/cuobjdump"
[ -n "$cuobjdump" ] || cuobjdump=$(python -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
if [ "$built" = "cuda" ]; then
  elfs=$("$cuobjdump" --list-elf "$so")
  echo "$elfs"
  echo "$elfs" | grep -q "sm_90a" || { echo "FAIL: $so has no sm_90a code"; exit 1; }
  echo "ok: sm_90a code in $so"
  cutlass_inc=$(python -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')
  # The MLA kernel's hand-encoded wgmma descriptors and register mappings against CuTe's tables
  # (a host program; CuTe prints a harmless "cast_smem_ptr_to_uint not supported" on the host).
  "$CUDA_HOME/bin/nvcc" -std=c++20 -Icsrc/include -I"$cutlass_inc" --expt-relaxed-constexpr --expt-extended-lambda \
    scripts/check_gmma_desc.cu -o build-cmake-gmma-desc
  ./build-cmake-gmma-desc | grep -v "cast_smem_ptr_to_uint" || { echo "FAIL: wgmma descriptors differ from CuTe's"; exit 1; }
  rm -f build-cmake-gmma-desc
  # The grouped FP8 GEMMs' packed scales against the layouts CUTLASS's ptr-array collective rebuilds
  # (it ignores the ones it is given); a host program, ~25 s to compile.
  "$CUDA_HOME/bin/nvcc" -std=c++20 -Icsrc/include -I"$cutlass_inc" --expt-relaxed-constexpr --expt-extended-lambda \
    scripts/check_gemm_scale_layout.cu -o build-cmake-gemm-scale-layout
  ./build-cmake-gemm-scale-layout || { echo "FAIL: grouped GEMM scale layouts differ from CUTLASS's"; exit 1; }
  rm -f build-cmake-gemm-scale-layout
  # The GEMMs' persistent grids hold whole clusters within every set_num_sms limit (a host program
  # over CUTLASS's grid functions, ~3 s to compile).
  "$CUDA_HOME/bin/nvcc" -std=c++20 -Icsrc/include -I"$cutlass_inc" --expt-relaxed-constexpr \
    scripts/check_gemm_grid.cu -o build-cmake-gemm-grid
  ./build-cmake-gemm-grid || { echo "FAIL: a GEMM grid does not hold whole clusters (or the rounding is obsolete)"; exit 1; }
  rm -f build-cmake-gemm-grid
  # Memory-bound kernels keep several loads in flight per thread (read off the SASS).
  python scripts/check_sass.py "$so"
  # ptxas's report of every kernel, from setup.py's build (-Xptxas=-v; scripts/build.sh keeps its
  # output): no register spills and no serialized wgmma pipeline (notes C7510..C7520), either of
  # which silently costs much speed. One report per kernel in the library, or the log is not this
  # library's whole build.
  log=build-setup.log
  [ -f "$log" ] || { echo "FAIL: no $log: build with scripts/build.sh (it keeps the build's output there)"; exit 1; }
  reported=$(grep -c 'Compiling entry function' "$log" || true)
  kernels=$("$cuobjdump" --dump-resource-usage "$so" | grep -c "^ *Function " || true)
  if [ "$reported" != "$kernels" ]; then
    echo "FAIL: $log reports $reported kernels, $so holds $kernels: rebuild with scripts/build.sh"; exit 1
  fi
  if grep -E "[1-9][0-9]* bytes spill|wgmma.mma_async instructions are serialized" "$log"; then
    echo "FAIL: spills or serialized wgmma in the kernels (the lines above; full report: $log)"; exit 1
  fi
  echo "ok: $kernels kernels compiled: no spills, no serialized wgmma"
else
  echo "note: extension built without CUDA (no nvcc); skipping the sm_90a and ptxas checks"
fi

# 2. CMakeLists.txt: its C++ sources build into a library that registers the same ops (configured
#    without CUDA, and loaded in a fresh process: the ops may be registered once per process); with
#    CUDA it configures, compiles one kernel source with its CUDA flags (sm_90a, C++20, CuTe's)
#    and defines DSKERNELS_WITH_CUDA for the C++. The kernels themselves are compiled (and their
#    ptxas reports checked, above) by setup.py's build: all of them again here took ~4.5 of CI's
#    minutes on 2 cores, for flags that only differ in what these checks cover.
cmake_args=(-G Ninja -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
            -DCUTLASS_INCLUDE_DIR="$(python -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')")
if [ -x "$CUDA_HOME/bin/nvcc" ]; then  # (also for the CPU-only library: a CUDA torch's CMake config needs it)
  cmake_args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
fi
cmake_build() {  # dir, cmake args...
  local dir=$1; shift
  cmake -S . -B "$dir" "${cmake_args[@]}" "$@" >> build-cmake.log 2>&1 || { tail -40 build-cmake.log; exit 1; }
}
: > build-cmake.log
cmake_build build-cmake -DDSKERNELS_WITH_CUDA=OFF
cmake --build build-cmake -j "${MAX_JOBS:-$(nproc)}" >> build-cmake.log 2>&1 || { tail -40 build-cmake.log; exit 1; }
python - <<'PY'
import re
import torch
torch.ops.load_library("build-cmake/libdskernels_C.so")
assert torch.ops.dskernels._build_info() == "cpu", torch.ops.dskernels._build_info()
names = re.findall(r'm\.def\("(\w+)\(', open("csrc/torch_bindings.cpp").read())
for name in names:
    getattr(torch.ops.dskernels, name).default  # raises if the schema is missing
print(f"ok: the CMake build registers all {len(names)} schemas (cpu build)")
PY
if [ "$built" = "cuda" ]; then
  cmake_build build-cmake-cuda
  # The smallest kernel source that uses wgmma and CuTe (~15 s): the arch, the dialect, the headers.
  objects=CMakeFiles/dskernels_C.dir
  cmake --build build-cmake-cuda --target "$objects/csrc/mla/sm90_mla_narrow_fp16.cu.o" >> build-cmake.log 2>&1 \
    || { tail -40 build-cmake.log; exit 1; }
  ninja -C build-cmake-cuda -t commands "$objects/csrc/torch_bindings.cpp.o" | grep -q -- "-DDSKERNELS_WITH_CUDA" \
    || { echo "FAIL: the CMake build with CUDA compiles csrc/torch_bindings.cpp without DSKERNELS_WITH_CUDA"; exit 1; }
  echo "ok: the CMake build with CUDA configures, compiles a kernel source and defines DSKERNELS_WITH_CUDA for the C++"
fi
# 3. every Triton kernel compiles for sm_90a, sm_100a, sm_89 and sm_80 the way the GPU paths launch it (CI
#    runs Triton only through the interpreter): no compile errors or shared-memory overruns; on
#    sm_90a no spills and tensor-core instructions where they belong.
#    Two processes, two targets each, keep both cores of a CI machine busy (measured here, 2 cores:
#    185 s -> 130 s with Triton's cache warm; cold, ~16 CPU-minutes in ~10 minutes). The pairs
#    balance the targets' cold compile times (user CPU seconds, 2026-12-06, the four run at once:
#    sm_90a 193, sm_89 219, sm_100a 251, sm_80 297; 532 s of wall time that way, against 465 s
#    for the two processes in that day's CI).
pids=()
for targets in 90a,80 100,89; do
  python scripts/check_triton_compile.py --targets "$targets" > "build-triton-$targets.log" 2>&1 & pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
cat build-triton-90a,80.log build-triton-100,89.log > build-triton.log && rm -f build-triton-*,*.log
[ $failed = 0 ] || { grep -v "^ok" build-triton.log; exit 1; }
grep "kernel specializations compiled" build-triton.log
# 4. The sdist carries every tracked source, and installed from it (CPU only) the package works.
python scripts/check_sdist.py
