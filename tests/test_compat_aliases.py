"""dskernels.compat: the anchors' module names for unchanged consumer code."""

import importlib
import sys

import pytest

import dskernels


def test_compat_aliases(monkeypatch):
    import dskernels.compat as compat
    for name in [n for group in compat.ALIASES.values() for n in group]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    installed = compat.install(force=True)
    try:
        assert "deep_gemm.utils.layout" in installed and "deep_ep.utils" in installed
        deep_gemm = importlib.import_module("deep_gemm")
        from deep_gemm.utils.layout import get_mn_major_tma_aligned_tensor  # noqa: F401  (SGLang)
        from flash_mla import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata  # noqa: F401
        from flash_mla.flash_mla_interface import FlashMLASchedMeta  # noqa: F401  (vLLM)
        from deep_ep import Buffer, Config, EventOverlap, topk_idx_t  # noqa: F401
        from deep_ep.utils import EventHandle  # noqa: F401,F811  (Megatron)
        assert deep_gemm.fp8_gemm_nt is dskernels.fp8_gemm_nt
        assert importlib.util.find_spec("deep_gemm") is not None  # vLLM's has_deep_gemm()
    finally:
        compat.uninstall()
    assert "deep_gemm" not in sys.modules or sys.modules["deep_gemm"] is not dskernels


def test_compat_does_not_shadow_real_packages(monkeypatch):
    import types
    import dskernels.compat as compat
    monkeypatch.setitem(sys.modules, "deep_ep", types.ModuleType("deep_ep"))
    with pytest.warns(RuntimeWarning, match="not shadowing"):
        installed = compat.install("deep_ep")
    assert installed == [] and sys.modules["deep_ep"].__name__ == "deep_ep"
    with pytest.raises(ValueError, match="libraries"):
        compat.install("flashinfer")
