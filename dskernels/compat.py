"""Opt-in import aliases for code written against the anchor libraries' module names.

Serving and training frameworks import the anchors by name: `import deep_gemm`,
`from deep_gemm.utils.layout import ...`, `from flash_mla import flash_mla_with_kvcache`,
`from flash_mla.flash_mla_interface import FlashMLASchedMeta`, `from deep_ep import Buffer, Config`,
`from deep_ep.utils import EventOverlap`. `install()` registers dskernels' modules under those names
in `sys.modules`, so such code runs on dskernels unchanged. Nothing is registered at import time;
a name whose real package is installed is left alone unless `force=True`.

    import dskernels.compat
    dskernels.compat.install()          # before the framework imports deep_gemm / flash_mla / deep_ep
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

__all__ = ["ALIASES", "install", "uninstall"]

# anchor module name -> dskernels module; the first name of each group is the top-level package.
ALIASES: dict[str, dict[str, str]] = {
    "deep_gemm": {"deep_gemm": "dskernels", "deep_gemm.utils": "dskernels.utils",
                  "deep_gemm.utils.layout": "dskernels.utils.layout", "deep_gemm.utils.math": "dskernels.utils.math",
                  "deep_gemm.testing": "dskernels.testing"},
    "flash_mla": {"flash_mla": "dskernels", "flash_mla.flash_mla_interface": "dskernels"},
    "deep_ep": {"deep_ep": "dskernels.ep", "deep_ep.utils": "dskernels.ep.utils",
                "deep_ep.buffer": "dskernels.ep.buffer"},
}


def _real_package_exists(name: str) -> bool:
    module = sys.modules.get(name)
    if module is not None:
        return not module.__name__.startswith("dskernels")
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install(libraries=("deep_gemm", "flash_mla", "deep_ep"), *, force: bool = False) -> list[str]:
    """Registers the aliases of `libraries` (any of "deep_gemm", "flash_mla", "deep_ep"); returns the
    module names registered. A library whose real package is importable (or already imported) is
    skipped with a RuntimeWarning, unless force=True."""
    if isinstance(libraries, str):
        libraries = (libraries,)
    installed = []
    for library in libraries:
        if library not in ALIASES:
            raise ValueError(f"libraries: expected names among {sorted(ALIASES)}, got {library!r}")
        if not force and _real_package_exists(library):
            warnings.warn(f"dskernels.compat.install: a real {library!r} package is installed; not shadowing it "
                          "(force=True would)", RuntimeWarning, stacklevel=2)
            continue
        for alias, target in ALIASES[library].items():
            sys.modules[alias] = importlib.import_module(target)
            installed.append(alias)
    return installed


def uninstall() -> list[str]:
    """Removes the aliases install() registered (those still pointing at dskernels modules)."""
    removed = []
    for group in ALIASES.values():
        for alias, target in group.items():
            if sys.modules.get(alias) is sys.modules.get(target) and alias in sys.modules:
                del sys.modules[alias]
                removed.append(alias)
    return removed
