"""Python side of the registered ops: CPU (reference) and CUDA (backend choice) kernels and fake
kernels for every schema in csrc/torch_bindings.cpp, one module per family (each registers its
kernels when imported; csrc/torch_bindings.cpp names the module of each family).

The ops are inference kernels, as FlashMLA's and DeepGEMM's: each kernel runs under no_grad, so no
gradient flows through an op on any backend. (Without it the reference's tensor ops recorded one on
CPU that Triton, CUDA and compiled graphs did not give.) EP's dispatch/combine have their own
autograd (dskernels.ep)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
