"""`exact_bf16_dots(monkeypatch)`: Triton's interpreter with a bf16 tl.dot a GPU would compute.

The interpreter's own tl.dot reads bf16 operands as garbage (Triton 3.6 to 3.8), so the kernels
widen bf16 dot operands to fp32 there. A test that wants the code a GPU runs on CPU (the bf16
operands and what rounds them) patches in this dot, which widens its bf16 operands exactly and sums
their products in fp32, then tells the kernel to keep bf16 operands (each kernel's own switch).
"""

from __future__ import annotations


def exact_bf16_dots(monkeypatch) -> None:
    """Patches the interpreter's dot for bf16 x bf16 operands until monkeypatch undoes it."""
    import numpy
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widened(handle):
        return (handle.data.view(numpy.uint16).astype(numpy.uint32) << 16).view(numpy.float32)

    def create_dot(self, a, b, d, *rest):
        if a.dtype.scalar == tl.bfloat16 and b.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(numpy.matmul(widened(a), widened(b)) + d.data, d.dtype.scalar)
        return original(self, a, b, d, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
