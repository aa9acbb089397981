#!/usr/bin/env bash
# Everything a device call should do (../shared/GPU.md): use or build the library against the
# device's torch, run the GPU tests, benchmark, sanitize, and bring back logs and results.
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".prebuilt"], timeout_s=600)
# A session has 15 minutes of device time, the machine's start included, and one call at most 600 s.
# So the script works to a deadline (DEADLINE seconds after it starts, default 570) and spends it
# in order of value: STEPS (default tests,targets,profiles,bench,sanitizer: the GPU tests, the
# issues' target shapes, Nsight Compute and host profiles of what misses its target, the quick
# grid, compute-sanitizer), each step capped by its own budget and by the time left, the GPU tests
# ordered so that the files never run on a device go first. Whatever a step had finished when its
# time ran out is kept. What one call does not reach, a second short call with STEPS set does.
# Triton's kernels come compiled in .prebuilt/triton-cache.tgz where scripts/prebuild_device.sh made
# one, and every process logs its Triton compiles (the "Triton compiles" step sums them up).
# Only 8 files come back from $OUT, so it holds four: summary.log (this script's output),
# targets.json and results.json (the benchmark records of the target shapes, then of the quick or
# full grid, each rewritten after every case) and logs.tgz (every log, repacked after every step:
# tar xzf logs.tgz).
# Knobs: DEADLINE=570, STEPS=tests,targets,profiles,bench,sanitizer, TESTS_BUDGET=330 (s for all
#        test files), TARGETS_BUDGET=200 (s for `run.py --targets`), NCU_BUDGET=45 (s per
#        scripts/ncu_cases.py case), HOST_PROFILE_BUDGET=45 (s for scripts/host_profile.py),
#        TEST_TIMEOUT=150 (s per file), SLOW_TEST_TIMEOUT=300 (tests/test_gemm_general.py's),
#        TEST_WORKERS=2 (pytest-xdist processes per test file, where its wheels came in .whl; 1: one),
#        SEESAW_TEST_TIMEOUT=90 (tests/test_mla_sm90_seesaw.py's), TEST_JOBS=4 (test files run at once), GPU_TESTS="tests/test_mla_sm90.py ..." (default: the files
#        with gpu-selected tests, never-run ones first), CPU_TESTS=1 (also the not-gpu suite, for the device's
#        torch/triton versions), BENCH_OPS=model,fp8_cast,indexer,moe,ep,gemm,mla (families or ops, run in that order),
#        QUICK=1 (default; 0 for the full grid), BENCH_BACKENDS (run.py --backends: e.g. triton for #3's
#        full FlashMLA grid on the Triton path alone; peers still run), BENCH_VARIANTS (run.py --variants:
#        none for a full grid's default rows alone, graph for those and the CUDA-graph rows), BENCH_BUDGET (s; default all that is left),
#        NO_CUDA=mla,gemm (families benchmarked without their cuda backend; by default those whose
#        CUDA tests failed in this call),
#        PROFILE=deepseek_v3_layer_decode,silu_and_mul,gemm_fp8_fp8_bf16_nt@m=64 (ops whose first
#        case, or first case whose shape has the words after @, run.py also profiles kernel by
#        kernel, every backend and variant; empty: none), SANITIZER_BUDGET=120 (s per tool), DSKERNELS_GEMM_SPLITK_TESTED=1 (the
#        `cuda[m64_splitk]` GEMM rows and that config's sanitizer case; set by the script when
#        tests/test_gemm_sm90_splitk.py passed in this call), DSKERNELS_GEMM_RASTER_TESTED=1 (the grouped
#        GEMMs' `cuda[raster_n]` rows; set when tests/test_gemm_sm90_raster.py passed), DSKERNELS_GEMM_TMA_WS_TESTED=1 (the
#        `triton[tma_ws]` GEMM rows; set when tests/test_gemm_tma_ws.py passed), DSKERNELS_MLA_SEESAW_TESTED=1
#        (the `cuda[seesaw]` MLA rows and that path's sanitizer case; set when
#        tests/test_mla_sm90_seesaw.py passed), DSKERNELS_MLA_NARROW_TESTED=1 (the `cuda[narrow]` MLA rows,
#        their ncu and sanitizer cases; set when tests/test_mla_sm90_narrow.py passed; NARROW_TEST_TIMEOUT=90
#        its file's limit), DSKERNELS_SPARSE_MLA_WIDE_TESTED=1 (the `triton[wide]` sparse decode rows; set when
#        tests/test_mla_sparse_wide.py passed), DSKERNELS_MLA_FP8_TMA_TESTED=1 (the `cuda[fp8_tma]` MLA
#        rows and that path's sanitizer case; set by the script itself when
#        tests/test_mla_sm90_fp8_tma.py passed in this call), DSKERNELS_BATCH_INVARIANT_TESTED=1 (the
#        `auto[invariant]` layer rows; set when tests/test_mla_batch_invariant.py and
#        tests/test_gemm_batch_invariant.py passed), SKIP_BUILD=1 (use the library already
#        built in place: tests/test_gpu_check.py's dry run of this script on CPU, with fake tools).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
LOGS="${LOGS:-/tmp/dskernels-gpu-logs}"
rm -rf "$LOGS" && mkdir -p "$OUT" "$LOGS"
exec > >(tee "$OUT/summary.log") 2>&1
tee_pid=$!
DEADLINE="${DEADLINE:-570}"
RESERVE=15  # seconds kept back for packing the logs
status=0
step() { echo; echo "== $1 ($(date +%T), $(left) s left)"; }
left() { echo $((DEADLINE - SECONDS)); }
# budget N: N seconds, or less where the deadline (minus the reserve) comes first; 0 when it has passed
budget() { local b=$(( $(left) - RESERVE )); (( b > $1 )) && b=$1; (( b < 0 )) && b=0; echo $b; }
# pack: the logs so far into logs.tgz (a part file per process, renamed: concurrent packs are safe)
pack() { tar czf "$OUT/logs.tgz.$BASHPID" -C "$LOGS" . && mv "$OUT/logs.tgz.$BASHPID" "$OUT/logs.tgz"; }
wants() { [[ ",${STEPS:-tests,targets,profiles,bench,sanitizer}," == *",$1,"* ]]; }
# Should a step hang past the deadline, the device call is killed without our EXIT trap: pack once
# more just before, so that the logs of what ran come back. (No stdout: tee must not wait for it.)
( exec >/dev/null 2>&1; sleep $((DEADLINE > 10 ? DEADLINE - 5 : 5)); pack ) & watchdog=$!
trap 'kill "$watchdog" 2>/dev/null; exec >&- 2>&-; wait "$tee_pid"' EXIT  # summary.log complete before the call returns

step "environment"
if ! command -v python >/dev/null; then  # the device image names its interpreter python3
  mkdir -p /tmp/dskernels-bin && ln -sf "$(command -v python3)" /tmp/dskernels-bin/python
  export PATH="/tmp/dskernels-bin:$PATH"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "carried wheels: CUTLASS headers, nvidia-ml-py (the benchmarks' SM clock readings)"
if ! python -c "import cutlass_library" 2>/dev/null; then
  ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 || { echo "carry .whl (nvidia-cutlass wheel): see ../shared/GPU.md"; exit 1; }
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --target /tmp/dskernels-wheels .whl/*.whl
  export PYTHONPATH="/tmp/dskernels-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import pynvml" 2>/dev/null || echo "no pynvml: the benchmarks record no SM clocks (docs/CONTRIBUTING.md: the nvidia-ml-py wheel in .whl)"
python -c "import xdist" 2>/dev/null || echo "no pytest-xdist: each GPU test file runs in one process (docs/CONTRIBUTING.md: its wheels in .whl)"

step "build"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
# A library from scripts/prebuild_device.sh (carried as .prebuilt) replaces the build when its stamp
# (source hash, Python tag, torch version) is this machine's and it imports.
prebuilt=0
if [ -f .prebuilt/stamp.txt ] && ls .prebuilt/_C*.so >/dev/null 2>&1; then
  if python scripts/prebuilt_stamp.py | diff - .prebuilt/stamp.txt; then
    lib=$(basename .prebuilt/_C*.so)
    cp ".prebuilt/$lib" dskernels/ && python -c "import dskernels._C" && prebuilt=1 || rm -f "dskernels/$lib"
  fi
  [ $prebuilt = 1 ] && echo "using the prebuilt library" || echo "prebuilt library not usable here: building"
fi
if [ $prebuilt = 0 ] && [ "${SKIP_BUILD:-0}" = 1 ] && python -c "import dskernels._C" 2>/dev/null; then
  prebuilt=1 && echo "SKIP_BUILD=1: using the library already built in place"  # a dry run (tests/test_gpu_check.py)
fi
if [ $prebuilt = 0 ]; then
  python setup.py -q build_ext --inplace > "$LOGS/build.log" 2>&1 || { tail -60 "$LOGS/build.log"; pack; exit 1; }
  grep -i "spill" "$LOGS/build.log" | grep -v " 0 bytes spill" | head -20 || true
fi
so=$(python -c "import dskernels._C as c; print(c.__file__)")
cuobjdump --list-elf "$so" > "$LOGS/elf.txt"
cuobjdump -sass "$so" > "$LOGS/sass.txt" 2>&1 || true
echo "SASS instruction mix: $(grep -c -E 'QGMMA' "$LOGS/sass.txt") QGMMA, $(grep -c -E 'HGMMA' "$LOGS/sass.txt") HGMMA, $(grep -c 'UTMALDG' "$LOGS/sass.txt") UTMALDG"
python -m dskernels  # versions, the build, and what `auto` runs on this GPU for each family

# Triton's kernels compiled ahead of time by scripts/prebuild_device.sh (its cache entries name
# this absolute path), and every compile of a dskernels kernel logged by each process from here on
# (dskernels/testing/triton_compiles.py): the last step reports how many were cache hits, and the
# log (logs.tgz) goes to scripts/triton_launches/ for the next prebuild to replay.
export TRITON_CACHE_DIR=/tmp/dskernels-triton-cache DSKERNELS_TRITON_COMPILE_LOG="$LOGS/triton_compiles.jsonl"
mkdir -p "$TRITON_CACHE_DIR"
[ -f .prebuilt/triton-cache.tgz ] && tar xzf .prebuilt/triton-cache.tgz -C "$TRITON_CACHE_DIR"
echo "Triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) kernels carried (.prebuilt/triton-cache.tgz)"
pack

if wants tests; then
  # One pytest per file, killed at its timeout: a kernel that hangs (or traps and leaves a dead
  # context) costs its own file, not the whole call. The files that failed last time go first.
  tests_end=$((SECONDS + $(budget "${TESTS_BUDGET:-330}")))
  step "GPU tests ($((tests_end - SECONDS)) s in all, ${TEST_TIMEOUT:-150} s per file at most, test_gemm_general ${SLOW_TEST_TIMEOUT:-300})"
  # Only the files that hold gpu-selected tests (one collection instead of a pytest start per file).
  # The MLA decode's narrow kernel (#8's bandwidth target) and seesaw consumers, the Triton GEMM's
  # warp-specialized candidates, sparse MLA's wide tiles and the grouped GEMMs' order along N (never
  # run on a device; they gate their benchmark rows) first, then those that failed or did not finish on the H200 (2026-12-04, second run), then the
  # layer's fused kernels never run on a GPU (test_models.py, test_models_v32.py), then the rest (all passed there).
  first="tests/test_mla_sm90_narrow.py tests/test_mla_sm90_seesaw.py tests/test_gemm_tma_ws.py tests/test_mla_sparse_wide.py tests/test_gemm_sm90_raster.py tests/test_gemm_general.py tests/test_indexer.py tests/test_models_gpu.py tests/test_moe_router.py
tests/test_models.py tests/test_models_v32.py tests/test_gemm_sm90.py tests/test_gemm.py tests/test_mla.py tests/test_mla_sparse.py tests/test_fp8_cast.py"
  with_gpu=$(timeout 120 python -m pytest tests -m gpu --collect-only -q -p no:cacheprovider 2>/dev/null \
             | sed -n 's|^\(tests/[^:]*\.py\)::.*|\1|p' | sort -u)
  [ -n "$with_gpu" ] || with_gpu=$(ls tests/test_*.py)  # collection failed: every file, each reports why
  files="${GPU_TESTS:-$(tr ' ' '\n' <<< "$first" | grep -F -x -f <(echo "$with_gpu"))
$(echo "$with_gpu" | grep -v -F -x -f <(tr ' ' '\n' <<< "$first"))}"
  # TEST_JOBS files at a time: a test file's time is mostly the host's (imports, Triton's compiles,
  # one core each) and the GPU has room for several; the first device run spent ~240 s on ten
  # files one after another. Each process has its own CUDA context, so a fault stays in its file.
  # Within a file, TEST_WORKERS pytest-xdist processes share its tests (the H200's second call ran out
  # of test time with four files at a time on 16 cores; the long files were host-bound). timeout
  # kills the file's whole process group, workers included.
  xdist=()
  (( ${TEST_WORKERS:-2} > 1 )) && python -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-2}")
  run_file() {  # run_file FILE TIMEOUT -> its verdict line (and failures) in pytest_gpu.log (none without gpu tests)
    local name rc verdict
    name=$(basename "$1" .py)
    timeout -s KILL "$2" python -m pytest "$1" "${xdist[@]}" -q -m gpu -p no:cacheprovider --maxfail=5 --tb=short -rfE \
      --junitxml="$LOGS/junit_$name.xml" > "$LOGS/pytest_gpu_$name.log" 2>&1
    rc=$?
    [ $rc -eq 5 ] && return  # no gpu-marked tests in this file
    verdict=$(tail -1 "$LOGS/pytest_gpu_$name.log"); [ $rc -eq 137 ] && verdict="killed after $2 s"
    # the verdict and the failures' one-line reasons at once: the summary has them even if a later
    # step hangs (the H200 call of 2026-12-04 lost its failures' details that way)
    { echo "$1: rc $rc: $verdict"; grep -E '^(FAILED|ERROR) ' "$LOGS/pytest_gpu_$name.log" | head -8 | cut -c1-400 | sed 's/^/    /'; } \
      | tee -a "$LOGS/pytest_gpu.log"
    pack
  }
  # The Triton launch cache (dskernels/triton/launch.py) is under every Triton launch and has never
  # run on a device: its file first, alone; where it fails, the rest of the call runs without it.
  launch_test=tests/test_triton_launch.py
  if grep -q -F -x "$launch_test" <<< "$files"; then
    run_file "$launch_test" "$(budget 120)"
    if ! grep -q "^$launch_test: rc 0:" "$LOGS/pytest_gpu.log"; then
      export DSKERNELS_TRITON_LAUNCH_CACHE=0
      echo "$launch_test failed: DSKERNELS_TRITON_LAUNCH_CACHE=0 for the rest of this call" | tee -a "$LOGS/pytest_gpu.log"
    fi
    files=$(grep -v -F -x "$launch_test" <<< "$files")
  fi
  pids=()
  for f in $files; do
    while (( $(jobs -rp | grep -c -v -x "$watchdog") >= ${TEST_JOBS:-4} )); do wait -n; done
    # test_gemm_general compiles every Triton GEMM config (one core, beside three other files): it
    # ran past 150 s on the H200 (2026-12-04), so it gets SLOW_TEST_TIMEOUT.
    limit=${TEST_TIMEOUT:-150}; [ "$f" = tests/test_gemm_general.py ] && limit=${SLOW_TEST_TIMEOUT:-300}
    # The seesaw MLA tests take seconds (no Triton compiles), but a protocol bug there would hang in
    # a named barrier, which has no trap (mbarrier waits trap after 10 s): they get less.
    [ "$f" = tests/test_mla_sm90_seesaw.py ] && limit=${SEESAW_TEST_TIMEOUT:-90}
    [ "$f" = tests/test_mla_sm90_narrow.py ] && limit=${NARROW_TEST_TIMEOUT:-90}  # (named barriers too)
    t=$((tests_end - SECONDS)); (( t > limit )) && t=$limit
    if (( t < 10 )); then echo "$f: not run (the tests' time is spent)" | tee -a "$LOGS/pytest_gpu.log"; continue; fi
    run_file "$f" "$t" & pids+=($!)
  done
  # The files' own pids: a bare `wait` also waits for the summary's tee (a process substitution,
  # bash 5.2), which ends only with the script. That hung the H200 call of 2026-12-04 after its tests.
  (( ${#pids[@]} )) && wait "${pids[@]}"  # no files started: a bare wait would hang the same way
  grep -q -v ": rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && status=1
  # The opt-in fp8 TMA path of the sm90 MLA decode is benchmarked (`cuda[fp8_tma]` rows) and
  # sanitized only once its own tests passed here (benchmarks/bench_mla.py, scripts/sanitize_cases.py).
  grep -q "^tests/test_mla_sm90_fp8_tma.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_MLA_FP8_TMA_TESTED=1
  # Likewise the GEMM's split-K config (`cuda[m64_splitk]` rows, its sanitizer case).
  grep -q "^tests/test_gemm_sm90_splitk.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_GEMM_SPLITK_TESTED=1
  # And the Triton dense GEMM's opt-in warp-specialized candidates (`triton[tma_ws]` rows).
  grep -q "^tests/test_gemm_tma_ws.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_GEMM_TMA_WS_TESTED=1
  # And the sm90 MLA decode's opt-in seesaw consumers (`cuda[seesaw]` rows, their sanitizer case).
  grep -q "^tests/test_mla_sm90_seesaw.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_MLA_SEESAW_TESTED=1
  # And its narrow kernel (`cuda[narrow]` rows, their ncu and sanitizer cases).
  grep -q "^tests/test_mla_sm90_narrow.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_MLA_NARROW_TESTED=1
  # And the grouped GEMMs' tile order along N (`cuda[raster_n]` rows of the grouped cases).
  grep -q "^tests/test_gemm_sm90_raster.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_GEMM_RASTER_TESTED=1
  # And sparse MLA's wide FP8 tiles (`triton[wide]` rows of the sparse decode).
  grep -q "^tests/test_mla_sparse_wide.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null && export DSKERNELS_SPARSE_MLA_WIDE_TESTED=1
  # And the layer's decode in batch-invariant mode (`auto[invariant]` model rows): the mode's MLA and
  # GEMM paths passed their GPU tests here (the layer runs first: a fault would end every family's run).
  grep -q "^tests/test_mla_batch_invariant.py: rc 0:" "$LOGS/pytest_gpu.log" 2>/dev/null &&
    grep -q "^tests/test_gemm_batch_invariant.py: rc 0:" "$LOGS/pytest_gpu.log" &&
    export DSKERNELS_BATCH_INVARIANT_TESTED=1
  if [ "${CPU_TESTS:-0}" = 1 ]; then  # the device's torch/triton versions differ from CI's
    step "CPU-side tests (not gpu-marked)"
    # Triton 3.6's interpreter fails on numpy >= 2.4 (triton-lang/triton#9171): there the library
    # refuses the interpreted Triton backend and its CPU tests skip, saying why. The same suite runs
    # off the device with the device's versions: DEVICE_CPU_TESTS=1 bash scripts/prebuild_device.sh.
    python -c "import numpy; print('numpy', numpy.__version__)"
    t=$(budget 300)  # (timeout 0 would mean no limit at all)
    if (( t < 10 )); then echo "CPU-side tests: not run (no time left)"; else
      timeout -s KILL "$t" python -m pytest tests -q -m "not gpu" -p no:cacheprovider --tb=short \
        > "$LOGS/pytest_cpu.log" 2>&1 || status=1
      tail -15 "$LOGS/pytest_cpu.log"
    fi
  fi
  pack
fi

# cuda_broken NAME: the test file tests/NAME.py failed CUDA-backend cases, or (an sm90 file) did not
# pass. Such a family is benchmarked without its cuda backend: a kernel fault would lose the CUDA
# context, and with it every benchmark after it. A file that did not run counts as passed: every
# sm90 file passed on the H200 (2026-12-04), and `auto` runs those kernels since.
cuda_broken() {
  local rc
  rc=$(sed -n "s|^tests/$1.py: rc \([0-9]*\):.*|\1|p" "$LOGS/pytest_gpu.log" 2>/dev/null)
  case "$rc" in
    0 | "") return 1 ;;
    *) [[ "$1" == *_sm90 || "$rc" == 137 ]] || grep -E '^(FAILED|ERROR) ' "$LOGS/pytest_gpu_$1.log" | grep -q cuda ;;
  esac
}

no_cuda=""  # families benchmarked and profiled without their cuda backend
if wants tests; then
  cuda_broken test_mla_sm90 || cuda_broken test_mla && no_cuda+="mla,"
  cuda_broken test_gemm_sm90 || cuda_broken test_gemm || cuda_broken test_gemm_general && no_cuda+="gemm,"
  cuda_broken test_fp8_cast && no_cuda+="fp8_cast,"
  cuda_broken test_ep_layout && no_cuda+="ep,"
  cuda_broken test_models_gpu && no_cuda+="model,"
  [ -n "$no_cuda" ] && [[ "$no_cuda" != *model* ]] && no_cuda+="model"  # the layer runs the kernels above
  [ -n "$no_cuda" ] && echo "cuda backend not benchmarked for: $no_cuda (its GPU tests failed or did not finish)"
fi
no_cuda="${NO_CUDA:-$no_cuda}"

if wants targets; then
  # First what decides the issues: their target shapes, on just the backends, candidates and peers
  # they are judged by (the quick grid misses most of them: four of DeepGEMM's six dense shapes,
  # the masked 1 x 1024 case, m = 128; and runs every forced config beside them).
  t=$(budget "${TARGETS_BUDGET:-200}")  # (timeout 0 would mean no limit at all)
  if (( t < 10 )); then echo "target shapes: not run (no time left)"; else
    step "the issues' target shapes ($t s at most)"
    TRITON_PRINT_AUTOTUNING=1 timeout -s KILL "$t" python benchmarks/run.py --targets --json "$OUT/targets.json" \
      --no-cuda "$no_cuda" > "$LOGS/targets.log" 2>&1 || status=1
    if grep -q '^op ' "$LOGS/targets.log"; then
      sed -n '/^op /,$p' "$LOGS/targets.log"  # run.py's table, then the targets'
    else  # stopped at its time limit: the rows so far, and the targets' table from what was recorded
      grep -F ' | ' "$LOGS/targets.log" | grep -v '^| '
      [ -f "$OUT/targets.json" ] && python benchmarks/targets.py "$OUT/targets.json"
    fi
    pack
  fi
fi

if wants profiles; then
  # Why the missed targets are missed: Nsight Compute on one call of each (scripts/ncu_cases.py),
  # then where the host's time goes in the layer's eager decode step (scripts/host_profile.py).
  # Reports in logs.tgz (ncu_<case>.txt, host_profile.txt); the headline lines here.
  while IFS=$'\t' read -r name kernel what; do
    family=${name%%_*}; [ "$family" = gemm ] || family=mla
    [[ ",$no_cuda," == *",$family,"* && "$name" != gemm_triton_dense ]] && { echo "ncu $name: skipped (its cuda tests failed)"; continue; }
    [[ "$name" == *seesaw* && "${DSKERNELS_MLA_SEESAW_TESTED:-0}" != 1 ]] && { echo "ncu $name: skipped (its tests did not pass here)"; continue; }
    [[ "$name" == *narrow* && "${DSKERNELS_MLA_NARROW_TESTED:-0}" != 1 ]] && { echo "ncu $name: skipped (its tests did not pass here)"; continue; }
    t=$(budget "${NCU_BUDGET:-45}")
    if (( t < 20 )); then echo "ncu $name: not run (no time left)"; continue; fi
    step "ncu $name: $what ($t s at most)"
    timeout -s KILL "$t" ncu --profile-from-start off --clock-control none --kernel-name "regex:$kernel" --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
      --section SourceCounters python scripts/ncu_cases.py "$name" < /dev/null > "$LOGS/ncu_$name.txt" 2>&1 \
      || echo "ncu $name: rc $?"  # (stdin: the loop's case list, not theirs)
    grep -E '^\s+(Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued Instruction|Registers Per Thread|Achieved Occupancy|L2 Hit Rate|Mem Pipes Busy)\b' \
      "$LOGS/ncu_$name.txt" | head -12
    # the rules' findings (stalls, pipes): ncu prints each as a headline and its explanation below
    grep -A3 -E '^\s+(OPT|WRN)\s' "$LOGS/ncu_$name.txt" | cut -c1-300 | head -24
    pack
  done < <(python scripts/ncu_cases.py --list)
  t=$(budget "${HOST_PROFILE_BUDGET:-45}")
  if [[ ",$no_cuda," == *",model,"* ]] || (( t < 20 )); then echo "host profile: not run (model's cuda tests failed, or no time left)"; else
    step "host profile of the layer's eager decode step ($t s at most)"
    timeout -s KILL "$t" python scripts/host_profile.py --steps 20 > "$LOGS/host_profile.txt" 2>&1 || echo "host profile: rc $?"
    head -40 "$LOGS/host_profile.txt"
    pack
  fi
fi

if wants bench; then
  step "benchmarks"
  bench_args=(--json "$OUT/results.json" --ops "${BENCH_OPS:-model,fp8_cast,indexer,moe,ep,gemm,mla}" --no-cuda "$no_cuda")
  [ "${QUICK:-1}" = 1 ] && bench_args+=(--quick)
  [ -n "${BENCH_BACKENDS:-}" ] && bench_args+=(--backends "$BENCH_BACKENDS")
  [ -n "${BENCH_VARIANTS:-}" ] && bench_args+=(--variants "$BENCH_VARIANTS")
  # The layer's eager decode (2.4x transformers' on the H200), Triton's bf16 silu_and_mul (5x the
  # fused cast's time), and the m = 64 GEMM's configs (m64_splitk took 50 us there, m64 22 us).
  profile_default=deepseek_v3_layer_decode,silu_and_mul,gemm_fp8_fp8_bf16_nt@m=64
  [ -n "${PROFILE-$profile_default}" ] && bench_args+=(--profile "${PROFILE-$profile_default}")
  # TRITON_PRINT_AUTOTUNING: the configs the autotuner chose go to bench.log (the Triton dense GEMM
  # at m = 4096, n = 2112 took 183 us in one H200 run and 235 us in the next, same kernels)
  t=$(budget "${BENCH_BUDGET:-100000}")
  if (( t < 10 )); then echo "benchmark grid: not run (no time left)"; else
    TRITON_PRINT_AUTOTUNING=1 timeout -s KILL "$t" python benchmarks/run.py "${bench_args[@]}" > "$LOGS/bench.log" 2>&1 || status=1
    sed -n '/^op /,$p' "$LOGS/bench.log"
    grep '^profile ' "$LOGS/bench.log"  # the tables under each line: bench.log in logs.tgz
    [ -f "$OUT/results.json" ] && ! grep -q '^op ' "$LOGS/bench.log" && {
      echo "benchmarks stopped at their time limit; the cases done so far:"; grep -F ' | ' "$LOGS/bench.log"; }
  fi
  pack
fi

if wants sanitizer; then
  for tool in memcheck racecheck; do
    t=$(budget "${SANITIZER_BUDGET:-120}")
    if (( t < 20 )); then echo "compute-sanitizer $tool: not run (no time left)"; continue; fi
    step "compute-sanitizer $tool ($t s at most)"
    timeout -s KILL "$t" compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
      python scripts/sanitize_cases.py > "$LOGS/sanitizer_$tool.log" 2>&1 || status=1
    tail -5 "$LOGS/sanitizer_$tool.log"
  done
  pack
fi
[ -f "$DSKERNELS_TRITON_COMPILE_LOG" ] && { step "Triton compiles in this call"
  python -m dskernels.testing.triton_compiles summary "$DSKERNELS_TRITON_COMPILE_LOG"; pack; }
results=$(ls "$OUT"/targets.json "$OUT"/results.json 2>/dev/null)
[ -n "$results" ] && { step "against the issues' targets (all of this call's records)"; python benchmarks/targets.py $results; }
step "done (status $status): $OUT holds $(ls "$OUT" | tr "\n" " ")"
exit $status
