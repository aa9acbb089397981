"""Python side of the registered ops: CPU (reference) and CUDA (backend choice) kernels and fake
kernels for every schema in csrc/torch_bindings.cpp, one module per family (each registers its
kernels when imported; csrc/torch_bindings.cpp names the module of each family).

The ops are inference kernels, as FlashMLA's and DeepGEMM's (dskernels/_inference.py): each kernel
runs under no_grad, so no gradient flows through an op on any backend, and a call that would have
needed one warns."""

import importlib
import pkgutil

import torch

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

# No op has an autograd kernel, and torch's fallback for such an op marks its outputs as requiring
# grad (a grad_fn whose backward only warns) when an input does: the fp8 copy of a Parameter then
# failed deepcopy, .numpy() and in-place updates. A fallthrough skips the autograd key for them:
# outputs that need no grad, as under no_grad. The ops defined in Python (torch.library.custom_op)
# have custom_op's autograd kernel already: torch 2.11 and older refuse a second one from Python
# (Library.impl's allow_override was False by default), so it is kept on every release.
_AUTOGRAD = torch.library.Library("dskernels", "IMPL")
for _name in torch._C._dispatch_get_all_op_names():
    if _name.startswith("dskernels::") and not torch._C._dispatch_has_kernel_for_dispatch_key(_name, "Autograd"):
        _AUTOGRAD.impl(_name.split("::", 1)[1], torch.library.fallthrough_kernel, "Autograd")
