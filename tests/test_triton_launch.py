"""dskernels.triton.launch: a cached launch passes the launcher exactly what Triton's own launch path
would (checked on CPU against Triton's real compiler and launch path for sm_90a with a recording
driver, dskernels.testing.fake_gpu), a launch whose arguments specialize otherwise goes through
Triton again, and on a GPU the kernels it launches compute what the first launch did."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import dskernels
import python_ref
from dskernels.testing.fake_gpu import fake_gpu
from dskernels.triton import launch
from test_gemm import assert_close_to_oracle


# The fake device compiles with Triton's real compiler, which an interpreted call of a @jit helper
# straight from Python leaves unusable for the rest of that process (triton 3.8's interpreter patches
# triton.language for good there; some CPU tests do that): under the interpreter this file's CPU
# tests run in a process of their own, started by the first test.
SHARED_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
compiles = pytest.mark.skipif(SHARED_INTERPRETER, reason="run in a process of its own by test_compiled_tests")
OWN_PROCESS = "DSKERNELS_TEST_OWN_PROCESS"  # set in the processes these tests start


def _in_own_process(*selection: str) -> None:
    """Runs pytest on this file's tests `selection` (pytest arguments) in a new process."""
    env = dict(os.environ, TRITON_INTERPRET="0", **{OWN_PROCESS: "1"})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_compiled_tests():
    if not SHARED_INTERPRETER:
        pytest.skip("this process runs them itself")
    _in_own_process("-m", "not gpu", __file__)


def _scale_rows(x_ptr, out_ptr, n, stride, factor, FLAG: tl.constexpr, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 3):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    y = tl.load(x_ptr + row * stride + cols, mask=cols < n) * factor + EXTRA
    if FLAG:
        y = -y
    tl.store(out_ptr + row * stride + cols, y, mask=cols < n)


class _Counted:
    """A fresh JITFunction of _scale_rows (the fake device's kernels stay in its own caches) whose
    runs through Triton's path are counted."""

    def __init__(self, monkeypatch):
        self.kernel, self.slow = JITFunction(_scale_rows), 0
        run = self.kernel.run

        def counted(*args, **kwargs):
            self.slow += 1
            return run(*args, **kwargs)

        monkeypatch.setattr(self.kernel, "run", counted)


def _same_launch(a, b):
    assert (a.kernel, a.grid, a.stream, a.function, a.num_warps) == (b.kernel, b.grid, b.stream, b.function, b.num_warps)
    assert len(a.args) == len(b.args)
    for x, y in zip(a.args, b.args):
        assert x is y if isinstance(x, torch.Tensor) else (type(x), x) == (type(y), y)


def _rows(rows=4, cols=40, offset=0):
    """[rows, cols] fp32 tensors; offset (elements) moves their start off 16-byte alignment."""
    return [torch.zeros(rows * cols + offset)[offset:].view(rows, cols) for _ in range(2)]


@compiles
def test_cached_launch_passes_what_triton_passes(monkeypatch):
    k = _Counted(monkeypatch)
    with fake_gpu() as gpu:
        x, out = _rows()
        launch.fast(k.kernel)[(4,)](x, out, 40, 40, 2.0, FLAG=True, BLOCK=64)
        assert k.slow == 1
        x, out = _rows()  # other tensors: the same signature
        launch.fast(k.kernel)[(4,)](x, out, 40, 40, 2.0, FLAG=True, BLOCK=64)
        assert k.slow == 1
        cached = gpu.launches[-1]
        assert cached.args == (x, out, 40, 40, 2.0, True, 64, 3)  # the default filled in, in order
        k.kernel[(4,)](x, out, 40, 40, 2.0, FLAG=True, BLOCK=64)  # Triton's own path, the same call
        _same_launch(cached, gpu.launches[-1])


@compiles
@pytest.mark.parametrize("change", ["misaligned", "int", "int_one", "bool_as_int", "float_as_int", "float",
                                    "keyword", "option"])
def test_other_signature_goes_through_triton(change, monkeypatch):
    """Arguments Triton would specialize otherwise (or might: an int's value, a keyword's type)
    take its path again, and the kernel it launches is then cached under their own signature."""
    k = _Counted(monkeypatch)
    args, kwargs = [*_rows(), 40, 40, 2.0], dict(FLAG=True, BLOCK=64)
    with fake_gpu() as gpu:
        launch.fast(k.kernel)[(4,)](*args, **kwargs)
        first = gpu.launches[-1]
        if change == "misaligned":  # 4-byte aligned pointers: Triton compiles another kernel
            args[:2] = _rows(offset=1)
        elif change == "int":
            args[2] = 39
        elif change == "int_one":  # Triton makes an int equal to 1 a constant
            args[2] = 1
        elif change == "bool_as_int":
            kwargs["FLAG"] = 1
        elif change == "float_as_int":
            args[4] = 2
        elif change == "float":
            args[4] = 3.0
        elif change == "keyword":
            kwargs["EXTRA"] = 4
        else:
            kwargs["num_warps"] = 2
        for expected_slow in (2, 2):  # the new signature's first launch, then its cached one
            launch.fast(k.kernel)[(4,)](*args, **kwargs)
            assert k.slow == expected_slow
        k.kernel[(4,)](*args, **kwargs)
        _same_launch(gpu.launches[-2], gpu.launches[-1])
        if change in ("misaligned", "int_one", "float_as_int", "keyword", "option"):
            assert gpu.launches[-1].function is not first.function


@compiles
def test_constexpr_floats_and_keyword_arguments(monkeypatch):
    """A float for a constexpr (EXTRA, positional here) is part of the signature by value, -0.0 apart
    from 0.0 (Triton compiles each); arguments passed by keyword are keyed as positional ones and
    the cached launch passes this call's (a tensor, a runtime float), keeping none of them."""
    k = _Counted(monkeypatch)
    with fake_gpu() as gpu:
        x, out = _rows()
        for extra, new in ((2.5, True), (3.5, True), (3.5, False), (-0.0, True), (0.0, True), (0.0, False)):
            before = k.slow
            launch.fast(k.kernel)[(4,)](x, out, 40, 40, 2.0, True, 64, extra)
            assert k.slow == before + new
            k.kernel[(4,)](x, out, 40, 40, 2.0, True, 64, extra)  # Triton's own path (counted too)
            _same_launch(gpu.launches[-2], gpu.launches[-1])
        k = _Counted(monkeypatch)
        for factor, new in ((-0.0, True), (-0.0, False), (0.0, True)):
            x, out = _rows()
            kwargs = dict(x_ptr=x, out_ptr=out, n=40, stride=40, factor=factor, FLAG=True, BLOCK=64)
            before = k.slow
            launch.fast(k.kernel)[(4,)](**kwargs)
            assert k.slow == before + new
            k.kernel[(4,)](**kwargs)
            _same_launch(gpu.launches[-2], gpu.launches[-1])
            assert gpu.launches[-1].args[0] is x and str(gpu.launches[-1].args[4]) == str(factor)
        plans = launch.fast(k.kernel).plans
        assert len(plans) == 2 and not any(isinstance(v, torch.Tensor) for p in plans.values() for v in p.kept.values())


@compiles
def test_grid_function_sees_every_parameter(monkeypatch):
    """A callable grid gets what Triton gives it: every parameter by name, defaults included."""
    k = _Counted(monkeypatch)
    seen = []

    def grid(meta):
        seen.append({name: meta[name] for name in ("n", "factor", "BLOCK", "EXTRA")})
        return (meta["n"] // 10,)

    with fake_gpu() as gpu:
        for _ in range(2):
            launch.fast(k.kernel)[grid](*_rows(), 40, 40, 2.0, FLAG=False, BLOCK=64)
    assert k.slow == 1 and seen[0] == seen[1] == dict(n=40, factor=2.0, BLOCK=64, EXTRA=3)
    assert gpu.launches[0].grid == gpu.launches[1].grid == (4, 1, 1)


@compiles
def test_autotuned_kernel_reuses_the_tuned_config(monkeypatch):
    """An autotuned kernel's cached launch passes the winning config's values and runs its kernel;
    another autotuning key (n) tunes again."""
    jit = JITFunction(_scale_rows)
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4),
                                     triton.Config({"BLOCK": 128}, num_warps=8)], key=["n"])(jit)
    tunings = []
    run = tuned.run
    monkeypatch.setattr(tuned, "run", lambda *a, **kw: tunings.append(kw) or run(*a, **kw))
    with fake_gpu(timing=lambda launched: 1.0 if launched.num_warps == 8 else 2.0) as gpu:
        for _ in range(2):
            launch.fast(tuned)[(4,)](*_rows(), 40, 40, 2.0, FLAG=True)
        assert len(tunings) == 1
        cached = gpu.launches[-1]
        assert cached.num_warps == 8 and cached.args[5:] == (True, 128, 3)
        tuned[(4,)](*cached.args[:5], FLAG=True)
        _same_launch(cached, gpu.launches[-1])
        launch.fast(tuned)[(4,)](*_rows(), 39, 40, 2.0, FLAG=True)
        assert len(tunings) == 3  # (the direct call above, then the new key)


@compiles
def test_autotuned_first_launches_from_two_threads():
    """Two threads' first launches of one autotuned kernel with other keys: each key's cached launch
    keeps its own tuned config. (The autotuner's best_config is the kernel's shared state: the other
    thread's launch in between left one key's plan with the other key's config, a grid for the wrong
    BLOCK that left part of the output unwritten; two first calls at once broke Triton's tuner.)"""
    import threading

    jit = JITFunction(_scale_rows)
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4),
                                     triton.Config({"BLOCK": 128}, num_warps=8)], key=["n"])(jit)
    grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)  # noqa: E731
    main, other = threading.current_thread(), []

    def timing(launched):  # n = 40 is fastest with BLOCK 64, n = 100 with BLOCK 128
        return 1.0 if (launched.args[2] == 40) == (launched.args[6] == 64) else 2.0

    def on_launch(launched):  # main's real launch of n = 40 (after its two timed ones): the other thread now
        if threading.current_thread() is main and launched.args[2] == 40 and not other:
            on_launch.seen = getattr(on_launch, "seen", 0) + 1
            if on_launch.seen == 3:
                other.append(threading.Thread(target=lambda: launch.fast(tuned)[grid](*_rows(cols=100), 100, 100,
                                                                                     2.0, FLAG=True)))
                other[0].start()
                other[0].join(timeout=0.5)  # (it waits for main's first launch to end: it may not finish here)

    with fake_gpu(timing=timing) as gpu:
        gpu.on_launch.append(on_launch)
        rows = _rows()
        launch.fast(tuned)[grid](*rows, 40, 40, 2.0, FLAG=True)
        other[0].join(timeout=60)
        assert not other[0].is_alive()
        for n, tensors in ((40, rows), (100, _rows(cols=100))):
            launch.fast(tuned)[grid](*tensors, n, n, 2.0, FLAG=True)
            cached = gpu.launches[-1]
            tuned[grid](*tensors, n, n, 2.0, FLAG=True)  # Triton's own path
            _same_launch(cached, gpu.launches[-1])
            assert cached.args[6] == (64 if n == 40 else 128)


@compiles
def test_signatures_past_the_bound_drop_the_oldest(monkeypatch):
    """A kernel launched with more signatures than the cache holds (a server's batch sizes times its
    table widths) keeps the most recent ones: the oldest goes first. (Clearing it all at the bound
    sent every launch of a server cycling through a few more than it back through Triton's path.)"""
    monkeypatch.setattr(launch, "MAX_SIGNATURES", 3)
    k = _Counted(monkeypatch)
    with fake_gpu():
        for n in (31, 32, 33, 34):
            launch.fast(k.kernel)[(4,)](*_rows(), n, 40, 2.0, FLAG=True, BLOCK=64)
        assert k.slow == 4 and len(launch.fast(k.kernel).plans) == 3
        for n in (32, 33, 34):  # the three most recent: cached
            launch.fast(k.kernel)[(4,)](*_rows(), n, 40, 2.0, FLAG=True, BLOCK=64)
        assert k.slow == 4
        launch.fast(k.kernel)[(4,)](*_rows(), 31, 40, 2.0, FLAG=True, BLOCK=64)  # the first: dropped
        assert k.slow == 5


@compiles
def test_signature_covers_what_specializes():
    x = torch.zeros(8)
    with fake_gpu():  # (the key holds the current device)
        _signatures_differ(x)


def _signatures_differ(x):
    assert launch._signature((x, 1, 2.0, True, None), {}) != launch._signature((x[1:], 1, 2.0, True, None), {})
    assert launch._signature((True,), {}) != launch._signature((1,), {})
    assert launch._signature((1,), {"A": True}) != launch._signature((1,), {"A": 1})
    assert launch._signature(((1, 2),), {}) is None  # a tuple argument: Triton's path every time


def test_interpreted_kernels_launch_directly():
    interpreted = InterpretedFunction(_scale_rows)
    assert launch.fast(interpreted) is interpreted


@compiles
def test_cache_off_takes_triton_path(monkeypatch):
    k = _Counted(monkeypatch)
    monkeypatch.setattr(launch, "ENABLED", False)
    with fake_gpu():
        for expected_slow in (1, 2):
            launch.fast(k.kernel)[(4,)](*_rows(), 40, 40, 2.0, FLAG=True, BLOCK=64)
            assert k.slow == expected_slow


@compiles
def test_decode_step_launches_as_triton_would(monkeypatch):
    """Every launch of the tiny FP8 layer's decode step (24 launches of 13 kernels, two of them
    autotuned GEMMs) through the GPU's Python path on CPU tensors: cached launches pass what
    Triton's own path passes for the same step (the same compiled kernels, grids and arguments;
    tensors alike in dtype, shape and strides). In a process of its own: the library's kernels keep
    the fake device's compiled kernels (and its autotuning picks), which a GPU's launches in the same
    process would then find."""
    if not os.environ.get(OWN_PROCESS):
        _in_own_process(f"{__file__}::test_decode_step_launches_as_triton_would")
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import host_profile

    monkeypatch.setenv("DSKERNELS_GEMM_AUTOTUNE", "1")
    with fake_gpu(cpu_tensors=True) as gpu:
        gpu.on_launch.append(host_profile._valid_router_ids)
        *_, step = host_profile.fake_gpu_step(2, 37)
        with dskernels.backend("triton"):
            step()  # compiles and tunes
            steps = {}
            for cached in (True, False):
                monkeypatch.setattr(launch, "ENABLED", cached)
                gpu.launches.clear()
                step()
                steps[cached] = list(gpu.launches)
    assert len(steps[True]) == len(steps[False]) == 24
    for ours, triton_path in zip(steps[True], steps[False]):
        assert (ours.kernel, ours.grid, ours.function, ours.num_warps) == \
            (triton_path.kernel, triton_path.grid, triton_path.function, triton_path.num_warps)
        assert len(ours.args) == len(triton_path.args)
        for a, b in zip(ours.args, triton_path.args):
            if isinstance(a, torch.Tensor):
                assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), ours.kernel
            else:
                assert (type(a), a) == (type(b), b), ours.kernel


@compiles
def test_decode_step_launches_on_its_tensors_device(monkeypatch):
    """Every launch of the tiny FP8 layer's decode step (autotuning runs included) happens with its
    tensors' GPU current, cuda:1 here while cuda:0 is current around the step: Triton launches on
    the current device, so a launcher outside dskernels._device.on_tensor_device would show up as a
    launch on cuda:0. Two GPUs on the fake one: its CPU tensors count as cuda:1 (the guard's
    cuda_device_of), and the current device is a variable that torch.cuda.device sets and the fake
    driver reads. In a process of its own, as test_decode_step_launches_as_triton_would."""
    if not os.environ.get(OWN_PROCESS):
        _in_own_process(f"{__file__}::test_decode_step_launches_on_its_tensors_device")
        return
    import contextlib

    from dskernels import _device
    from dskernels.testing.fake_gpu import FakeGPU

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import host_profile

    current = [0]

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = before

    def has_tensor(values):
        return any(isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and has_tensor(v)) for v in values)

    monkeypatch.setattr(_device, "cuda_device_of",
                        lambda values: torch.device("cuda", 1) if has_tensor(values) else None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(FakeGPU, "get_current_device", lambda self: current[0])
    on = []
    with fake_gpu(cpu_tensors=True) as gpu:
        gpu.on_launch += [host_profile._valid_router_ids, lambda launched: on.append((launched.kernel, current[0]))]
        *_, step = host_profile.fake_gpu_step(2, 37)
        with dskernels.backend("triton"):
            step()  # compiles and tunes
            step()
    assert current[0] == 0 and len(on) >= 2 * 24
    assert all(index == 1 for _, index in on), sorted({launched for launched in on if launched[1] != 1})


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_cached_launches_compute_on_the_gpu(autotune, monkeypatch):
    """The Triton cast and GEMM on a GPU (heuristic and autotuned tiles): the later calls (cached
    launches, and an input off 16-byte alignment that specializes anew, then is cached too) match
    the oracle as the first did."""
    monkeypatch.setenv("DSKERNELS_GEMM_AUTOTUNE", autotune)
    torch.manual_seed(0)
    with dskernels.backend("triton"):
        b, sb = dskernels.per_block_cast_to_fp8(torch.randn(200, 256, device="cuda", dtype=torch.bfloat16))
        for start in (0, 0, 0, 4, 4):  # bf16 elements: 4 moves x off 16-byte alignment
            x = torch.randn(33 * 256 + start, device="cuda", dtype=torch.bfloat16)[start:].view(33, 256)
            a, sa = dskernels.per_token_cast_to_fp8(x)
            ra, rsa = python_ref.per_token_cast_to_fp8(x)
            assert torch.equal(a.view(torch.uint8), ra.view(torch.uint8)) and torch.equal(sa, rsa)
            out = torch.full((33, 200), float("nan"), device="cuda", dtype=torch.bfloat16)
            dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
            assert_close_to_oracle(out, a, sa, b, sb)
