"""Test harness: Triton's interpreter where there is no GPU, the `gpu` marker, backend fixtures."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before the first Triton kernel is defined (dskernels imports them lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton GEMMs take the heuristic tiles in tests: autotuning would time 7 candidates for every new
# shape, minutes of a short device session. Every candidate is checked on the GPU by
# tests/test_gemm.py::test_triton_every_gpu_config; test_triton_deepgemm_shapes autotunes.
os.environ.setdefault("DSKERNELS_GEMM_AUTOTUNE", "0")

import pytest  # noqa: E402

import dskernels  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; run on the device)")


def pytest_xdist_auto_num_workers(config):  # noqa: ARG001
    """`-n auto` (the README's command): one worker per core without a GPU, where the suite is
    Triton's interpreter and torch's CPU ops; with a GPU at most 4 (the GPU tests are sized to
    share the device: scripts/gpu_check.sh runs four files at a time, each in TEST_WORKERS processes)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):  # xdist's own override keeps working
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = _usable_cores()
    return min(4, cores) if torch.cuda.is_available() else cores


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Workers share the cores: torch's intra-op threads split them rather than each taking all.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, _usable_cores() // _workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs on the device (scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def backend_device(name: str) -> str:
    """The device a backend is tested on here: CUDA when there is a GPU, else CPU."""
    if name == "cuda":
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


# On a machine with a GPU every backend runs on CUDA tensors, so `pytest -m gpu` selects them all.
_ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []


@pytest.fixture(params=[pytest.param("ref", marks=_ON_GPU), pytest.param("triton", marks=_ON_GPU),
                        pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    """Runs the test once per backend that works here (each forced), yielding (name, device)."""
    name = request.param
    if name not in dskernels.available_backends():
        pytest.skip(f"backend {name!r} is not available here (available: {dskernels.available_backends()})")
    with dskernels.backend(name):
        yield name, backend_device(name)


@pytest.fixture(autouse=True)
def garbage_in_free_gpu_memory():
    """On a GPU, before every test: the caching allocator's free memory is refilled with 0xFF bytes
    (NaN in every float type, fp8 included; -1 in integers). Otherwise an output a kernel never
    writes would read as the last test's output of the same size, which for parametrized tests is
    the same result from another backend: a kernel that writes nothing would pass."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        large = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(0xFF)  # the large-block pool
        small = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # blocks up to 1 MB
                 for _ in range(64)]
        del large, small
    yield


@pytest.fixture
def sizes_tensor_unread(monkeypatch):
    """On CPU tensors the K-grouped ops read ks_tensor's values and refuse one that disagrees with
    ks (free there; on a GPU it would sync, so a GPU call does not): this turns that read off, for
    tests of what the kernels themselves do with such a ks_tensor, as on a GPU."""
    from dskernels.ops import fp8, gemm, gemm_bf16

    for module in (fp8, gemm, gemm_bf16):
        checked = module.check_sizes_tensor
        monkeypatch.setattr(module, "check_sizes_tensor", lambda *args, ks=None, _checked=checked, **kw:
                            _checked(*args, **kw))
