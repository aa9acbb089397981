"""Backend choice, the build, and the shared test helpers."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import dskernels
from dskernels import _backend
from dskernels.testing import calc_diff, run_distributed


def test_available_backends_here():
    found = dskernels.available_backends()
    assert found[0] == "ref"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in found
    if not torch.cuda.is_available():
        assert "cuda" not in found


def test_context_manager_nests_and_restores():
    assert dskernels.current_backend() == os.environ.get("DSKERNELS_BACKEND", "auto")
    with dskernels.backend("triton"):
        with dskernels.backend("ref"):
            assert dskernels.current_backend() == "ref"
        assert dskernels.current_backend() == "triton"
    assert dskernels.current_backend() == os.environ.get("DSKERNELS_BACKEND", "auto")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("DSKERNELS_BACKEND", "ref")
    assert dskernels.current_backend() == "ref"
    with dskernels.backend("triton"):  # the context manager wins
        assert dskernels.current_backend() == "triton"
    monkeypatch.setenv("DSKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="DSKERNELS_BACKEND: expected one of auto, ref, triton, cuda, got 'fast'"):
        dskernels.current_backend()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="dskernels.backend: expected one of"):
        with dskernels.backend("cudnn"):
            pass


def test_selection_rules_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    select = _backend.select_backend
    assert select("op", cpu, has_cuda=True, has_triton=True) == "ref"  # auto on CPU
    with dskernels.backend("cuda"), pytest.raises(ValueError, match="op: the 'cuda' backend needs CUDA tensors"):
        select("op", cpu, has_cuda=True, has_triton=True)
    with dskernels.backend("triton"):
        with pytest.raises(NotImplementedError, match="op: no Triton kernel"):
            select("op", cpu, has_cuda=False, has_triton=False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            select("op", cpu, has_cuda=False, has_triton=True)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert select("op", cpu, has_cuda=False, has_triton=True) == "triton"


def test_forced_backend_reaches_the_op():
    """The op really runs the forced backend: a CPU tensor under 'cuda' must be refused."""
    x = torch.randn(2, 128)
    with dskernels.backend("cuda"), pytest.raises(ValueError, match="per_token_cast_to_fp8: the 'cuda' backend"):
        dskernels.per_token_cast_to_fp8(x)


@pytest.mark.gpu
def test_auto_picks_cuda_on_hopper():
    device = torch.device("cuda")
    expected = "cuda" if (_backend.cuda_kernels_built() and _backend.is_hopper(device)) else "triton"
    assert _backend.select_backend("op", device, has_cuda=True, has_triton=True) == expected
    assert _backend.select_backend("op", device, has_cuda=False, has_triton=True) == "triton"


def test_every_schema_has_python_kernels():
    """Each public op (no leading underscore) has CPU and CUDA kernels and a fake kernel (directly or
    through a composite kernel, as for ops without tensor inputs)."""
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "csrc", "torch_bindings.cpp")) as f:
        source = f.read()
    names = [n for n in re.findall(r'm\.def\("(\w+)\(', source) if not n.startswith("_")]
    assert "per_token_cast_to_fp8" in names
    for name in names:
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"dskernels::{name}", key), (name, key)


def test_contract_ops_are_public_functions():
    """API.md: the registered op names are the public function names, so each op it lists is both
    torch.ops.dskernels.<name> and dskernels.<name>."""
    contract = ["get_mla_metadata", "flash_mla_with_kvcache", "per_token_cast_to_fp8", "per_block_cast_to_fp8",
                "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
                "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "ep_get_dispatch_layout", "dualpipe_schedule"]
    for name in contract:
        assert hasattr(torch.ops.dskernels, name), name
        assert callable(getattr(dskernels, name, None)) and name in dskernels.__all__, name


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")
def test_no_gradient_flows_through_the_ops(monkeypatch):
    """Inference kernels on every backend: outputs that do not require grad even where an input does
    (a quantized Parameter), as under no_grad; torch's fallback for ops without an autograd kernel
    used to mark them as requiring it (deepcopy and .numpy() of the fp8 copy failed, backward only
    warned). The reference on CPU gives no gradient either (its tensor ops recorded one that
    Triton, CUDA and compiled graphs did not give). A call that would have needed a gradient warns
    once per op (it was lost without a word); under no_grad, or with no input requiring grad, none."""
    import copy
    import warnings

    from test_mla import make_inputs

    from dskernels import _inference

    def run_ops(requires_grad: bool):
        x = torch.randn(4, 128, requires_grad=requires_grad)
        x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x)
        w = torch.nn.Parameter(torch.randn(256, 128), requires_grad=requires_grad)
        w_fp8, w_scale = dskernels.per_block_cast_to_fp8(w)
        out = torch.empty(4, 256, dtype=torch.bfloat16)
        dskernels.gemm_fp8_fp8_bf16_nt((x_fp8, x_scale), (w_fp8, w_scale), out)
        q, k_cache, block_table, lens, dv, _ = make_inputs([20, 3], 1, 2, 1, 16, torch.float32, torch.float32)
        q.requires_grad_(requires_grad)
        meta, splits = dskernels.get_mla_metadata(lens, 2, 1)
        o, lse = dskernels.flash_mla_with_kvcache(q, k_cache, block_table, lens, dv, meta, splits)
        swiglu = dskernels.silu_and_mul_cast_to_fp8(torch.randn(4, 256, requires_grad=requires_grad))
        d = torch.empty(4, 256, dtype=torch.bfloat16)
        dskernels.bf16_gemm_nn(x.detach().bfloat16().requires_grad_(requires_grad),
                               torch.randn(128, 256, dtype=torch.bfloat16), d)
        outputs = (x_fp8, x_scale, w_fp8, w_scale, out, o, lse, *swiglu, d)
        assert not any(t.requires_grad for t in outputs)
        return outputs

    monkeypatch.setattr(_inference, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = run_ops(True)
        run_ops(True)  # once per op
    said = sorted(str(w.message).split(":")[0] for w in caught)
    assert said == ["dskernels.bf16_gemm_{nt,nn,tn,tt}", "dskernels.flash_mla_with_kvcache",
                    "dskernels.per_block_cast_to_fp8", "dskernels.per_token_cast_to_fp8",
                    "dskernels.silu_and_mul_cast_to_fp8"], said
    assert all("no gradient flows through it" in str(w.message) for w in caught)
    monkeypatch.setattr(_inference, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (also the fallback's "autograd kernel was not registered")
        run_ops(False)
        with torch.no_grad():
            run_ops(True)
    # Under torch.compile no warning, and no graph break for it (fullgraph of the Python-level
    # bf16 GEMMs, which Dynamo traces into, failed on the warning's frame walk)
    a, b = torch.randn(4, 128, dtype=torch.bfloat16), torch.randn(256, 128, dtype=torch.bfloat16, requires_grad=True)

    def step(a, b):
        d = torch.empty(4, 256, dtype=torch.bfloat16)
        dskernels.bf16_gemm_nt(a, b, d)
        return d

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(step, fullgraph=True, backend="eager")(a, b)
    w_fp8, w_scale = outputs[2:4]
    copy.deepcopy(w_fp8)
    w_scale.numpy()
    w_scale.mul_(2)


def test_backend_blocks_of_two_threads_overlapping():
    """Two threads' `backend(...)` blocks that overlap without nesting (A enters, B enters, A exits,
    B exits): once both have exited, torch.compile traces (which read the choice from a module
    global, not the per-thread ContextVar) see no forced backend again. Each exit used to restore
    the value seen at its entry, so "ref" stayed for good."""
    import threading

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with dskernels.backend("ref"):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def thread_b():
        a_in.wait(10)
        with dskernels.backend("triton"):
            b_in.set()
            a_out.wait(10)
            seen["inside"] = _backend._BACKEND.while_tracing

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["inside"] == "triton"  # the open block's, after the other one's exit
    assert _backend._BACKEND.while_tracing is None and not _backend._BACKEND.open_blocks
    traced = torch.compile(lambda x: x + len(_backend.current_backend()), backend="eager", fullgraph=True)
    assert traced(torch.zeros(1)).item() == len("auto")


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_outputs_allocated_under_inference_mode(backend):
    """A server allocates its buffers under torch.inference_mode and runs steps under no_grad (or
    with grad on): every op that writes into a caller's tensor takes an inference tensor there, on
    every backend, with the values a normal tensor gets. The reference path used to raise torch's
    "Inplace update to inference tensor outside InferenceMode" where Triton wrote through pointers,
    and a k = 0 GEMM raised on Triton too (its zero fill)."""
    if backend == "triton" and "triton" not in dskernels.available_backends():
        pytest.skip("Triton backend not available here")
    torch.manual_seed(0)
    x = torch.randn(5, 256)
    a, sa = dskernels.per_token_cast_to_fp8(x)
    b, sb = dskernels.per_block_cast_to_fp8(torch.randn(130, 256))
    grouped_b = torch.stack([b, b.flip(0)]), torch.stack([sb, sb.flip(0)])
    m_indices = torch.tensor([0, 0, 1, 1, -1], dtype=torch.int32)
    masked_m = torch.tensor([2, 5], dtype=torch.int32)
    a3, sa3 = torch.stack([a, a]), torch.stack([sa, sa])
    xb, wb = x.bfloat16(), torch.randn(130, 256, dtype=torch.bfloat16)
    empty_k = torch.empty(5, 0, dtype=torch.float8_e4m3fn), torch.empty(5, 0)
    calls = {  # name: (out's shape and dtype, the call writing it)
        "gemm_fp8_fp8_bf16_nt": ((5, 130), lambda out: dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)),
        "fp8_gemm_nt accumulate": ((5, 130, torch.float32),
                                   lambda out: dskernels.fp8_gemm_nt((a, sa), (b, sb), out, c=out)),
        "contiguous": ((5, 130), lambda out: dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
            (a, sa), grouped_b, out, m_indices)),
        "masked": ((2, 5, 130), lambda out: dskernels.m_grouped_gemm_fp8_fp8_bf16_nt_masked(
            (a3, sa3), grouped_b, out, masked_m, 5)),
        "bf16_gemm_nt": ((5, 130), lambda out: dskernels.bf16_gemm_nt(xb, wb, out)),
        "k = 0": ((5, 130), lambda out: dskernels.fp8_gemm_nt(
            empty_k, (torch.empty(130, 0, dtype=torch.float8_e4m3fn), torch.empty(2, 0)), out)),
    }
    with dskernels.backend(backend):
        for name, (shape, call) in calls.items():
            dtype = shape[-1] if isinstance(shape[-1], torch.dtype) else torch.bfloat16
            shape = shape[:-1] if isinstance(shape[-1], torch.dtype) else shape
            init = torch.randn(shape).to(dtype)
            want = init.clone()
            call(want)
            for grad in (False, True):
                with torch.inference_mode():
                    out = init.clone()
                with torch.set_grad_enabled(grad):
                    call(out)
                assert out.is_inference(), name
                # (rows past masked_m are unspecified)
                rows = [(g, slice(0, int(n))) for g, n in enumerate(masked_m)] if name == "masked" else [...]
                for index in rows:
                    assert torch.equal(out[index], want[index]), (name, grad)


def test_reference_paths_need_no_triton():
    """Without Triton installed (torch's CPU wheels do not bring it), the decoder layer runs on the
    reference backend: the MoE and V3.2's indexer imported the Triton module before asking whether
    it would run (ModuleNotFoundError; an auditor's find)."""
    code = """
import sys
sys.modules["triton"] = None  # import triton fails
import torch, dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer
assert "ref" in dskernels.available_backends() and "triton" not in dskernels.available_backends()
for cfg in (DeepseekV3Config.tiny(), DeepseekV3Config.tiny(index_topk=4, index_head_dim=64, index_n_heads=16)):
    torch.manual_seed(0)
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.float32)
    for p in layer.parameters():
        p.data.normal_(0, 0.05)
    layer.weights_loaded = True
    with torch.no_grad():
        out = layer(torch.randn(2, 3, cfg.hidden_size), torch.arange(3).expand(2, 3))
    assert out.isfinite().all()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_import_without_triton_interpret_in_a_fresh_process():
    """Importing dskernels must not need a GPU, triton's interpreter or a CUDA build."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (the submodules DeepGEMM's code reaches as attributes, deep_gemm.utils and .testing, too)
    code = ("import dskernels; print(dskernels.available_backends(), dskernels.utils.per_token_cast_to_fp8, "
            "dskernels.testing.calc_diff)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ref" in out.stdout


def test_import_leaves_torch_dynamo_unimported():
    """torch._dynamo is 2 of the 4 s of `import dskernels` when imported eagerly (assume_constant_result
    imports it to set one attribute): it waits for the first torch.compile."""
    code = "import sys, dskernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


def test_calc_diff():
    x = torch.randn(64, 64)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(x, x * (1 + 1e-3)) < 1e-6


def _all_reduce_body(rank, world_size, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size)) + offset * world_size


def _failing_body(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")


def _hanging_body(rank, world_size):
    if rank == 1:
        time.sleep(3600)  # hangs without failing, as a rank stuck in a kernel or a deadlock would


def test_run_distributed_gloo():
    run_distributed(_all_reduce_body, 2, 10)


def test_run_distributed_reports_a_failing_rank():
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        run_distributed(_failing_body, 2)


def test_run_distributed_times_out_instead_of_hanging():
    begin = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[.*1\] of 2 still running after 10 s"):
        run_distributed(_hanging_body, 2, timeout_s=10)
    assert time.monotonic() - begin < 60


@pytest.mark.gpu
def test_unverified_cuda_kernels_are_not_auto():
    """A CUDA kernel not yet checked on a GPU runs only when forced (never picked by auto)."""
    device = torch.device("cuda")
    if not (torch.cuda.is_available() and _backend.cuda_kernels_built() and _backend.is_hopper(device)):
        pytest.skip("needs a Hopper GPU and the CUDA build to tell cuda from triton")
    assert _backend.select_backend("op", device, has_cuda=True, has_triton=True, cuda_verified=False) == "triton"
    with dskernels.backend("cuda"):
        assert _backend.select_backend("op", device, has_cuda=True, has_triton=True, cuda_verified=False) == "cuda"


def test_no_host_sync_flags_device_reads_only():
    """A copy to the CPU of a CPU tensor reads nothing from a device: not flagged (the layer's rope
    moves its CPU frequencies to the positions' device); a host read of a value is."""
    from dskernels.testing import HostSyncError, no_host_sync
    with no_host_sync():
        torch.ones(3).to("cpu")
    with pytest.raises(HostSyncError):
        with no_host_sync():
            torch.ones(3).sum().item()


# ---- kernels run on their tensors' GPU (dskernels/_device.py) ----

class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports itself on cuda:1 (for the guard's logic, on any machine)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_kernels_make_their_tensors_device_current(monkeypatch):
    """The guard enters the first CUDA tensor's device (found in lists too) when another is current,
    and does nothing when it is current already or no argument is on a GPU."""
    from dskernels import _device

    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel = _device.on_tensor_device(lambda *args, **kwargs: "ran")
    on_cuda1 = torch.zeros(2).as_subclass(_OnCuda1)
    assert kernel(3, [torch.zeros(1), on_cuda1]) == "ran" and entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert kernel(torch.zeros(1), out=on_cuda1) == "ran" and entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert kernel(torch.zeros(1), 2) == "ran" and entered == []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert kernel(on_cuda1) == "ran" and entered == []


def test_every_registered_kernel_is_guarded():
    """Each Python kernel registered for CUDA goes through on_tensor_device (the dispatcher gives
    custom ops no device guard, and Triton launches on the current device)."""
    import glob
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    unguarded = []
    for path in glob.glob(os.path.join(root, "dskernels", "ops", "*.py")):
        with open(path) as f:
            source = f.read()
        for match in re.finditer(r'@torch\.library\.register_kernel\(([^\n]*)\)\n(?!@on_tensor_device\n)', source):
            unguarded.append(f"{os.path.basename(path)}: {match.group(1)}")
    assert not unguarded, unguarded


def test_refuses_a_torch_release_it_was_not_built_against(monkeypatch):
    """An isolated `pip install .` compiles against the torch its build environment fetched; the
    library then says so at import instead of failing later (the C++ ABI differs between releases)."""
    built = torch.ops.dskernels._built_torch_version()
    assert built.split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    major, minor = built.split(".")[:2]
    monkeypatch.setattr(torch, "__version__", f"{major}.{int(minor) + 1}.0+cpu")
    with pytest.raises(ImportError, match=rf"^dskernels._C was built against torch {built}, but this is torch "):
        dskernels._check_torch_version()
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor}.99")  # another patch release: fine
    dskernels._check_torch_version()


def test_refuses_a_torch_older_than_the_minimum():
    """Older torch releases fail in ways that do not name the release (README.md, "Two commands"):
    `import dskernels` says which torch it needs instead, before loading _C."""
    from dskernels._requirements import MIN_TORCH, too_old_message, torch_release

    major, minor = MIN_TORCH
    assert torch_release(torch.__version__) >= MIN_TORCH  # (the torch running the tests is supported)
    assert torch_release("2.10.0+cu128") == (2, 10) and torch_release("2.12.0a0+git1a2b") == (2, 12)
    assert torch_release("2.13.0.dev20260101+cpu") == (2, 13) and torch_release("3.0") == (3, 0)
    for supported in (f"{major}.{minor}.0", f"{major}.{minor}.1+cu128", f"{major}.{minor + 1}.0a0", f"{major + 1}.0.0"):
        assert too_old_message(supported) is None, supported
    old = f"{major}.{minor - 1}.1+cu128"
    assert too_old_message(old) == (
        f"dskernels needs torch >= {major}.{minor}, and this is torch {old}: install a newer one "
        f"(`pip install 'torch>={major}.{minor}'`), then build dskernels against it (`bash scripts/build.sh`, "
        "or `pip install --no-build-isolation .`)")
    code = f"import torch; torch.__version__ = {old!r}; import dskernels"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and f"ImportError: dskernels needs torch >= {major}.{minor}" in out.stderr, \
        out.stderr[-3000:]


def test_imports_where_torch_refuses_a_second_python_kernel():
    """torch 2.11 and older refuse a Python kernel for a dispatch key that one was registered for
    already (Library.impl's allow_override defaults to False there; True from 2.13): the autograd
    fallthrough over every op hit torch.library.custom_op's own autograd kernel, and `import
    dskernels` failed on those releases. Checked here by giving Library.impl that default."""
    code = ("import torch\n"
            "impl = torch.library.Library.impl\n"
            "def strict(self, *args, allow_override=False, **kwargs):\n"
            "    return impl(self, *args, allow_override=allow_override, **kwargs)\n"
            "torch.library.Library.impl = strict\n"
            "import dskernels\n"
            "print('imported')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]


def test_triton_refusal_says_why(monkeypatch):
    """A forced Triton backend that cannot import triton (or numpy, its interpreter's) says what
    failed, not just that a package is missing."""
    from dskernels import _backend

    monkeypatch.setattr(_backend, "_triton_import_error", lambda: "ModuleNotFoundError: No module named 'numpy'")
    with dskernels.backend("triton"), pytest.raises(RuntimeError, match="No module named 'numpy'"):
        dskernels.per_token_cast_to_fp8(torch.randn(2, 128))


@pytest.mark.parametrize("triton_version, numpy_version, usable",
                         [("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.7.1", "2.5.0", True)])
def test_interpreter_refused_with_a_numpy_it_cannot_use(monkeypatch, triton_version, numpy_version, usable):
    """Triton 3.6's interpreter fails every kernel with a run-time loop under numpy >= 2.4
    (triton-lang/triton#9171, fixed in 3.7): the backend is refused with the fix named, instead of
    an InterpreterError from deep inside the first kernel."""
    numpy = pytest.importorskip("numpy")
    triton = pytest.importorskip("triton")
    from dskernels import _backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    _backend._triton_import_error.cache_clear()
    try:
        assert ("triton" in dskernels.available_backends()) == usable
        if not usable:
            with dskernels.backend("triton"), pytest.raises(RuntimeError, match=r"numpy<2.4 or triton>=3.7"):
                dskernels.per_token_cast_to_fp8(torch.randn(2, 128))
    finally:
        monkeypatch.undo()
        _backend._triton_import_error.cache_clear()


def test_backend_choice_traced_by_torch_compile(monkeypatch):
    """A compiled function follows `dskernels.backend(...)` (the block's choice is guarded on, so a
    call under another backend recompiles) and the choice traces under fullgraph=True: torch 2.11's
    Dynamo could not trace the ContextVar holding it."""
    monkeypatch.delenv("DSKERNELS_BACKEND", raising=False)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def tagged(x):
        return x + {"ref": 1, "triton": 2, "cuda": 3, "auto": 4}[dskernels.current_backend()]

    x = torch.zeros(3)
    with dskernels.backend("ref"):
        assert tagged(x).tolist() == [1, 1, 1]
        with dskernels.backend("triton"):
            assert tagged(x).tolist() == [2, 2, 2]
        assert tagged(x).tolist() == [1, 1, 1]
    assert tagged(x).tolist() == [4, 4, 4]


def test_load_errors_say_what_to_do(monkeypatch):
    """A _C that fails to load: the message names the cause (no build, a CUDA build under a torch
    without CUDA or with another CUDA runtime, another torch) and the command that mends it."""
    cases = [("cannot import name '_C' from partially initialized module", ["not built in", "scripts/build.sh",
                                                                              "shadows"]),
             ("libc10_cuda.so: cannot open shared object file", ["no CUDA libraries", "DSKERNELS_CPU_ONLY=1"]),
             ("_C.so: undefined symbol: _ZN3c10", ["another torch", "--no-build-isolation"]),
             ("something else", ["scripts/build.sh"])]
    for text, words in cases:
        message = dskernels._load_error(ImportError(text))
        assert all(w in message for w in words), (text, message)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA 12 torch under a build for CUDA 13
    message = dskernels._load_error(ImportError("libcudart.so.13: cannot open shared object file"))
    assert "another CUDA runtime than this torch's (CUDA 12.8" in message, message
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA libraries" in dskernels._load_error(ImportError("libcudart.so.13: cannot open shared object"))


def test_python_m_dskernels_reports_the_install():
    """`python -m dskernels` (for bug reports): versions, the build, the backends, and without a GPU
    what `auto` would run on a Hopper GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "dskernels"], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert f"torch {torch.__version__}" in out.stdout
    assert f"built against torch {torch.ops.dskernels._built_torch_version()}" in out.stdout
    assert "flash_mla_with_kvcache" in out.stdout and "gemm_fp8_fp8_bf16_nt" in out.stdout


def test_python_m_dskernels_reports_a_bad_backend_setting(monkeypatch):
    """The report is what a user pastes when something is wrong: a bad DSKERNELS_BACKEND is reported
    there, not raised, and a backend that cannot run here is said to be one."""
    from dskernels import __main__ as report

    monkeypatch.setenv("DSKERNELS_BACKEND", "bogus")
    assert "asked: none valid: DSKERNELS_BACKEND: expected one of" in report.report()
    if "cuda" not in dskernels.available_backends():
        monkeypatch.setenv("DSKERNELS_BACKEND", "cuda")
        assert "asked: cuda (dskernels.backend(...) or DSKERNELS_BACKEND), which cannot run here" in report.report()


def test_report_says_why_auto_does_not_run_a_cuda_kernel(monkeypatch):
    """On fake GPUs: an sm_90 GPU runs the verified CUDA kernels and says why the others run on Triton;
    an sm_80 one runs Triton everywhere, because of its architecture; a CPU build says so."""
    from types import SimpleNamespace

    from dskernels.__main__ import report

    gpus = [SimpleNamespace(name="H100", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30),
            SimpleNamespace(name="A100", major=8, minor=0, multi_processor_count=108, total_memory=80 * 2**30)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    monkeypatch.setattr(dskernels, "available_backends", lambda: ["ref", "triton", "cuda"])
    monkeypatch.setattr(_backend, "triton_installed", lambda: True)
    monkeypatch.setattr(_backend, "cuda_kernels_built", lambda: True)
    hopper, ampere = report().split("GPU 1: ")
    gemm_line = next(line for line in hopper.splitlines() if "gemm_fp8_fp8_bf16_nt" in line)
    assert gemm_line.split()[0] == "cuda" and "[" not in gemm_line
    other = next(line for line in hopper.splitlines() if "the other ops" in line)
    assert other.split()[0] == "triton" and "no CUDA kernel for it" in other
    choices = [line for line in ampere.splitlines() if line.startswith("  ")]
    assert len(choices) == 5 and all(line.split()[0] == "triton" for line in choices)
    assert sum("needs a Hopper (sm_90) GPU" in line for line in choices) == 4
    monkeypatch.setattr(_backend, "cuda_kernels_built", lambda: False)
    gemm_line = next(line for line in report().splitlines() if "gemm_fp8_fp8_bf16_nt" in line)
    assert gemm_line.split()[0] == "triton" and "this build has no CUDA kernels" in gemm_line


def test_report_families_match_what_the_ops_ask_for(monkeypatch):
    """The report's rows say what each op hands to select_backend: every op named in a row, called
    here on CPU, asks with that row's has_cuda and cuda_verified (a row that grouped a Triton-only
    op with CUDA ones printed a wrong reason for it)."""
    from dskernels import ops
    from dskernels.__main__ import families

    asked = {}

    def recording(op, device, *, has_cuda, has_triton, cuda_verified=True):
        asked[op] = (has_cuda, cuda_verified)
        return "ref"

    for module in (ops.fp8, ops.gemm, ops.mla, ops.ep):
        monkeypatch.setattr(module, "select_backend", recording)
    x = torch.randn(4, 256)
    x_fp8, x_scale = dskernels.per_token_cast_to_fp8(x)
    w_fp8, w_scale = dskernels.per_block_cast_to_fp8(torch.randn(128, 256))
    dskernels.silu_and_mul_cast_to_fp8(torch.randn(4, 256))
    dskernels.gemm_fp8_fp8_bf16_nt((x_fp8, x_scale), (w_fp8, w_scale), torch.empty(4, 128, dtype=torch.bfloat16))
    lengths = torch.tensor([5, 0], dtype=torch.int32)
    metadata, splits = dskernels.get_mla_metadata(lengths, 16, 1)
    dskernels.flash_mla_with_kvcache(torch.randn(2, 1, 16, 576, dtype=torch.bfloat16),
                                     torch.randn(1, 64, 1, 576, dtype=torch.bfloat16),
                                     torch.zeros(2, 1, dtype=torch.int32), lengths, 512, metadata, splits)
    torch.ops.dskernels.ep_get_dispatch_layout(torch.zeros(3, 2, dtype=torch.int64), 8, 2)
    cuda_build = torch.ops.dskernels._build_info() == "cuda"  # (a CPU-only build: no CUDA kernel to ask for)
    for op, flags in asked.items():
        rows = [(has_cuda, verified) for names, has_cuda, verified in families()
                if re.search(rf"\b{op}\b", names)] or [families()[-1][1:]]  # unnamed: "the other ops"
        assert rows == [flags] or (not flags[0] and (rows == [(False, False)] or not cuda_build)), (op, flags, rows)
    assert {"per_token_cast_to_fp8", "silu_and_mul_cast_to_fp8", "gemm_fp8_fp8_bf16_nt", "get_mla_metadata",
            "flash_mla_with_kvcache", "ep_get_dispatch_layout"} <= set(asked), asked


def test_long_values_are_shortened_in_type_errors():
    from dskernels._checks import check_int

    with pytest.raises(TypeError, match=r"^n: expected an int, got str 'x{36}\.\.\.$"):
        check_int("n", "x" * 100)


def test_backend_probes_are_constants_under_compile():
    # torch.compile takes the installation probes' results as constants instead of tracing into
    # their functools caches (it warned at each, for every compiled layer)
    import warnings

    from dskernels._backend import cuda_kernels_built, is_hopper, triton_installed

    def probe(x):
        return x + 1 if triton_installed() or cuda_kernels_built() or is_hopper(x.device) else x - 1

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = torch.compile(probe, fullgraph=True, backend="eager")(torch.zeros(2))
    assert [str(w.message) for w in seen if "lru_cache" in str(w.message)] == []
    assert torch.equal(out, probe(torch.zeros(2)))
    # the mark set without importing dynamo is all that torch's decorator sets
    marked, ours = (lambda: 0), (lambda: 0)
    assert vars(torch.compiler.assume_constant_result(marked)) == vars(_backend._constant_while_compiling(ours))


def test_batch_invariant_switch(monkeypatch):
    """dskernels.batch_invariant: off by default, on inside its block (nested blocks restore the
    outer choice), DSKERNELS_BATCH_INVARIANT=1 turns it on outside any block, and bad values are
    named."""
    monkeypatch.delenv("DSKERNELS_BATCH_INVARIANT", raising=False)
    assert not dskernels.batch_invariant_enabled()
    with dskernels.batch_invariant():
        assert dskernels.batch_invariant_enabled()
        with dskernels.batch_invariant(False):
            assert not dskernels.batch_invariant_enabled()
        assert dskernels.batch_invariant_enabled()
    assert not dskernels.batch_invariant_enabled()
    monkeypatch.setenv("DSKERNELS_BATCH_INVARIANT", "1")
    assert dskernels.batch_invariant_enabled()
    with dskernels.batch_invariant(False):
        assert not dskernels.batch_invariant_enabled()
    monkeypatch.setenv("DSKERNELS_BATCH_INVARIANT", "yes")
    with pytest.raises(ValueError, match="DSKERNELS_BATCH_INVARIANT: expected 0 or 1"):
        dskernels.batch_invariant_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        dskernels.batch_invariant(1)


def test_batch_invariant_switch_while_compiling(monkeypatch):
    """A compiled function reads the switch of the block it runs in (a guard: it recompiles when the
    switch changes), not the one it was first traced in."""
    monkeypatch.delenv("DSKERNELS_BATCH_INVARIANT", raising=False)
    traced = torch.compile(lambda x: x + int(_backend.batch_invariant_enabled()), backend="eager", fullgraph=True)
    assert traced(torch.zeros(1)).item() == 0
    with dskernels.batch_invariant():
        assert traced(torch.zeros(1)).item() == 1
    assert traced(torch.zeros(1)).item() == 0
