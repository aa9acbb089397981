"""Python side of the registered ops: CPU (reference) and CUDA (backend choice) kernels and fake
kernels for every schema in csrc/torch_bindings.cpp, one module per family (each registers its
kernels when imported; csrc/torch_bindings.cpp names the module of each family)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
