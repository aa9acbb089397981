"""Triton kernels, one module per family. Imported lazily by dskernels.ops, so that TRITON_INTERPRET
set by a test harness before the first op call still takes effect."""
