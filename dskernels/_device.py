"""Kernels run on the GPU their tensors live on.

The dispatcher gives custom ops no device guard (aten's native CUDA kernels get one from code
generation), and Triton launches on the current device: an op on tensors of cuda:1 while cuda:0 is
current would run its Triton kernels on cuda:0 with pointers into cuda:1's memory. So every
registered kernel, and every launcher called outside the dispatcher, makes its first CUDA tensor's
device current for the call, as torch's own ops do. (The sm90 C++ kernels also guard themselves.)
"""

from __future__ import annotations

import functools

import torch


def cuda_device_of(values) -> torch.device | None:
    """The device of the first CUDA tensor among values (tensors, or lists and tuples of them)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                return value.device
        elif isinstance(value, (list, tuple)):
            device = cuda_device_of(value)
            if device is not None:
                return device
    return None


def on_tensor_device(fn):
    """fn with the device of its first CUDA tensor argument current during the call (a no-op when
    it already is, or when no argument is a CUDA tensor)."""

    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        device = cuda_device_of(args) or cuda_device_of(kwargs.values())
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return on_device
