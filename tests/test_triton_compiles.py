"""dskernels/testing/triton_compiles.py: a logged Triton compile replays into the same cache entry
(the entry a device launch of that specialization looks up), here for sm_90 on CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from dskernels.testing import triton_compiles

knobs = getattr(triton, "knobs", None)
pytestmark = pytest.mark.skipif(knobs is None or not hasattr(knobs.compilation, "listener"),
                                reason="this Triton has no compilation listener")


def _compile_as_a_launch(fn, *args, **kwargs):
    """What JITFunction.run does before compiling, for sm_90 (as scripts/check_triton_compile.py)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def test_a_logged_compile_replays_into_the_same_cache_entry(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be compiled ones: a process without it
        env = dict(os.environ, TRITON_INTERPRET="0")
        test = f"{__file__}::test_a_logged_compile_replays_into_the_same_cache_entry"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        return
    from triton.runtime.jit import JITFunction

    from dskernels.triton import layer

    log = tmp_path / "compiles.jsonl"
    monkeypatch.setenv(triton_compiles.ENV, str(log))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "first"))
    monkeypatch.setattr(knobs.compilation, "listener", None)
    monkeypatch.setattr(triton_compiles, "_installed", False)
    assert triton_compiles.install_from_env()
    # the model's RMSNorm: ints (some 16-divisible), a float, a tl.dtype and a bool constexpr
    kernel = layer._rms_norm_kernel
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreted in CI
    x = torch.empty(4, 7168, dtype=torch.bfloat16, device="meta")
    _compile_as_a_launch(fn, x, torch.empty(7168, dtype=torch.bfloat16, device="meta"), torch.empty_like(x), x, x,
                         7163, 7168, 7168, 7168, 7168, 1e-6, BLOCK=8192, DTYPE=tl.bfloat16, ROUND_BF16=False,
                         ADD=False, num_warps=8)
    entries = triton_compiles.read([log])
    assert len(entries) == 1 and not entries[0]["cache_hit"] and "unreplayable" not in entries[0]
    assert entries[0]["kernel"] == "dskernels.triton.layer:_rms_norm_kernel"
    assert entries[0]["options"]["num_warps"] == 8
    first = sorted(os.listdir(tmp_path / "first"))
    assert len(first) == 1

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "second"))
    assert triton_compiles.replay(triton_compiles.read([log])) == (1, 0)
    assert sorted(os.listdir(tmp_path / "second")) == first  # the same cache key
    triton_compiles.replay(entries)  # now already there: logged as a cache hit
    hits = [e["cache_hit"] for e in triton_compiles.read([log])]
    assert hits == [False, False, True]
    logged = triton_compiles.read([log])
    assert "2 compiles" in triton_compiles.summary(logged) and "1 cache hits" in triton_compiles.summary(logged)
    assert len(triton_compiles.distinct(logged)) == 1 and "seconds" not in triton_compiles.distinct(logged)[0]


def test_constexpr_values_round_trip():
    for value in (None, True, 3, 2.5, "x", tl.float8e4nv, (1, (2, tl.int64)), [4, 5]):
        encoded = json.loads(json.dumps(triton_compiles._encode(value)))
        assert str(triton_compiles._decode(encoded)) == str(value)
        assert type(triton_compiles._decode(encoded)) is type(value)
    with pytest.raises(TypeError, match="no JSON form"):
        triton_compiles._encode(object())


def test_nothing_is_installed_without_the_variable(monkeypatch):
    monkeypatch.delenv(triton_compiles.ENV, raising=False)
    monkeypatch.setattr(triton_compiles, "_installed", False)
    assert not triton_compiles.install_from_env()
