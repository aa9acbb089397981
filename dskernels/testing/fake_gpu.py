"""Triton's GPU launch path on a machine without a GPU, for tests and host-time profiles.

Inside `with fake_gpu() as gpu:` Triton compiles for a Hopper GPU (sm_90a, with its real compiler
and ptxas) and runs its whole launch path: argument binding and specialization, its kernel cache,
autotuners, up to the compiled kernel's launcher, which records the launch (`gpu.launches`)
instead of running it. Nothing is computed: outputs keep whatever they held. What it is for:
checking what a launch passes (dskernels.triton.launch against Triton's own path) and timing the
host's share of a step (scripts/host_profile.py --fake-gpu), where a CUDA GPU is not at hand.

    with fake_gpu(cpu_tensors=True) as gpu:   # CPU tensors go to the Triton backend too
        ...
        gpu.launches[-1].args                 # the last launch's arguments, in parameter order

Autotuners time each candidate with `timing(launch) -> ms` (default: all equal, the first wins).
`keep` bounds the launches kept (each holds its tensors: a profile's loop keeps few).
`on_launch(launch)` callbacks can fill outputs a step's host code reads back (a router's ids).
The kernels' JITFunctions keep the fake device's compiled kernels in their caches afterwards: use
kernels of one's own (tests) or a process of its own (profiles), not a real GPU's kernels.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import types
from collections.abc import Callable

import torch

CAPABILITY = (9, 0)
SHARED_BYTES = 232448  # an H100's per-block opt-in shared memory
SMS = 132


@dataclasses.dataclass
class Launch:
    kernel: str                 # the compiled kernel's name
    grid: tuple[int, int, int]
    stream: int
    function: object            # the loaded kernel handle the launcher was given
    num_warps: int
    args: tuple                 # every parameter's value in order, constexprs included


class _Launcher:
    def __init__(self, gpu: FakeGPU, metadata):
        self.gpu, self.name, self.num_warps = gpu, metadata.name, metadata.num_warps

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        launch = Launch(self.name, (grid_x, grid_y, grid_z), stream, function, self.num_warps, args)
        self.gpu.launches.append(launch)
        self.gpu.count += 1
        for callback in self.gpu.on_launch:
            callback(launch)


class _Utils:
    def __init__(self):
        # the fake modules handed out, by id (held here too, so that no other object takes an id)
        self.modules: dict[int, object] = {}

    def load_binary(self, name, kernel, shared, device):
        module = object()
        self.modules[id(module)] = module
        return module, object(), 128, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_BYTES, "multiprocessor_count": SMS, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def unload_module(self, module):
        pass


class FakeGPU:
    """Triton's active driver while installed (see the module docstring)."""

    def __init__(self, timing: Callable[[Launch], float] | None = None, keep: int | None = None):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", CAPABILITY[0] * 10 + CAPABILITY[1], 32)
        self.launches: collections.deque[Launch] = collections.deque(maxlen=keep)
        self.count = 0  # launches so far, kept or not
        self.on_launch: list[Callable[[Launch], None]] = []
        self.timing = timing or (lambda launch: 1.0)
        self.utils = _Utils()

    # -- the driver interface Triton's runtime calls --
    def launcher_cls(self, src, metadata):
        return _Launcher(self, metadata)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_capability(self, device=0):
        return CAPABILITY

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            before = self.count
            kernel_call()
            ms = self.timing(self.launches[-1]) if self.count > before else float("inf")
            return [ms] * len(quantiles) if quantiles else ms
        return bench


@contextlib.contextmanager
def fake_gpu(timing: Callable[[Launch], float] | None = None, cpu_tensors: bool = False, keep: int | None = None):
    """Installs a FakeGPU as Triton's driver (and torch.cuda's capability and properties of a
    Hopper GPU, which the launchers ask); cpu_tensors: the Triton backend also takes CPU tensors
    without the interpreter. Everything is put back on exit."""
    from triton.runtime import driver

    from dskernels import _backend

    gpu = FakeGPU(timing, keep)
    saved = (driver._active, torch.cuda.get_device_capability, torch.cuda.get_device_properties,
             _backend.triton_interpret)
    driver.set_active(gpu)
    torch.cuda.get_device_capability = lambda *_: CAPABILITY
    torch.cuda.get_device_properties = lambda *_: types.SimpleNamespace(
        name="fake sm_90a", major=CAPABILITY[0], minor=CAPABILITY[1], multi_processor_count=SMS,
        shared_memory_per_block_optin=SHARED_BYTES, shared_memory_per_block=49152)
    if cpu_tensors:
        _backend.triton_interpret = lambda: True
    try:
        yield gpu
    finally:
        (driver._active, torch.cuda.get_device_capability, torch.cuda.get_device_properties,
         _backend.triton_interpret) = saved
        _forget_modules(gpu)


def _forget_modules(gpu: FakeGPU) -> None:
    """Detaches the fake modules from the compiled kernels that hold them: a collected kernel
    unloads its module through the driver active then, which would not be this one."""
    from triton.compiler.compiler import CompiledKernel

    for obj in gc.get_objects():
        if type(obj) is CompiledKernel and id(obj.module) in gpu.utils.modules:
            obj.module = None
