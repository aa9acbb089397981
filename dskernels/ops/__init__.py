"""Python side of the registered ops: CPU (reference) and CUDA (backend choice) kernels and fake
kernels for every schema in csrc/torch_bindings.cpp, one module per family."""

from dskernels.ops import fp8  # noqa: F401  (registers the kernels)
