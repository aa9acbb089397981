"""Numeric comparisons used by the tests and benchmarks."""

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity measure: 1 - 2 sum(x y) / sum(x^2 + y^2), 0 for identical tensors.

    Scale-free, so one bound (1e-3 for FP8 GEMMs against the bf16 product) fits every shape.
    """
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)
