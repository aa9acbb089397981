"""DeepSeek-V3's router after its gate GEMM, in one kernel: `grouped_topk` (what vLLM and SGLang
call grouped / biased top-k; HF's DeepseekV3TopkRouter from the logits on)."""

from __future__ import annotations

import numbers

import torch

import python_ref
from dskernels._backend import select_backend
from dskernels._checks import as_flag, check_int, check_one_device, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel

_MAX_SELECTED = 16  # topk and topk_groups: the kernel selects by repeated arg-max, unrolled
# float64 too (a float64 layer's bias): the router computes in fp32 in every backend, as HF's does
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor, num_groups: int, topk_groups: int, topk: int,
                 renormalize: bool = True, scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing (DeepSeek-V3) of router logits.

    Args:
        logits: [T, E] float32, bfloat16, float16 or float64 (x @ W_gate.T; V3 computes it in
            fp32, and the scores are computed in fp32 in every case), any strides.
        bias: [E] (e_score_correction_bias), any float dtype, any stride; it steers the selection only.
        num_groups: n_group, dividing E into groups of at least two experts.
        topk_groups: topk_group, 1..min(num_groups, 16): the groups whose experts may be chosen,
            ranked by the sum of their two best biased scores.
        topk: num_experts_per_tok, 1..16, at most topk_groups * E / num_groups.
        renormalize: norm_topk_prob: divide the weights by their sum (+ 1e-20).
        scaling_factor: routed_scaling_factor, multiplies the weights.

    Returns:
        topk_idx: [T, topk] int64, the chosen experts (s = sigmoid(logits), chosen on s + bias), in
            no particular order (the Triton kernel gives them best first).
        topk_weights: [T, topk] float32, s of each chosen expert (normalized), * scaling_factor.

    An exact tie between two biased scores may be broken either way (the reference follows
    torch.topk, the kernel takes the lower index); NaN ranks above everything, as in torch.topk.
    Raises TypeError / ValueError naming the argument.
    """
    # before the schema's own, vaguer refusal
    num_groups, topk_groups, topk, renormalize = _check_types(num_groups, topk_groups, topk, renormalize)
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real):
        raise TypeError(f"scaling_factor: expected a number, got {type(scaling_factor).__name__}")
    return torch.ops.dskernels.grouped_topk(logits, bias, num_groups, topk_groups, topk, renormalize,
                                            float(scaling_factor))


def _check_types(num_groups, topk_groups, topk, renormalize) -> tuple[int, int, int, bool]:
    """The arguments as the op takes them (numpy's ints and bools too); TypeError naming one that is not."""
    return (check_int("num_groups", num_groups), check_int("topk_groups", topk_groups), check_int("topk", topk),
            as_flag("renormalize", renormalize))


def _check(logits, bias, num_groups, topk_groups, topk, renormalize, scaling_factor) -> None:
    check_one_device(logits=logits, bias=bias)
    check_tensor("logits", logits, ndim=2, dtypes=_FLOAT_DTYPES)
    experts = logits.shape[1]
    check_tensor("bias", bias, ndim=1, dtypes=_FLOAT_DTYPES, device=logits.device)
    if bias.shape[0] != experts:
        raise ValueError(f"bias: expected shape ({experts},) (one per expert, logits' last dimension), got "
                         f"{tuple(bias.shape)}")
    _check_types(num_groups, topk_groups, topk, renormalize)
    if num_groups < 1 or experts % num_groups or experts // num_groups < 2:
        raise ValueError(f"num_groups: expected a divisor of the {experts} experts leaving at least two per group, "
                         f"got {num_groups}")
    if not 1 <= topk_groups <= min(num_groups, _MAX_SELECTED):
        raise ValueError(f"topk_groups: expected 1..{min(num_groups, _MAX_SELECTED)}, got {topk_groups}")
    if not 1 <= topk <= min(topk_groups * (experts // num_groups), _MAX_SELECTED):
        raise ValueError(f"topk: expected 1..{min(topk_groups * (experts // num_groups), _MAX_SELECTED)} (at most "
                         f"the experts of topk_groups groups, and 16), got {topk}")


def _outputs(logits, topk):
    return (torch.empty(logits.shape[0], topk, dtype=torch.int64, device=logits.device),
            torch.empty(logits.shape[0], topk, dtype=torch.float32, device=logits.device))


@torch.library.register_kernel("dskernels::grouped_topk", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("grouped_topk")
def _grouped_topk(logits, bias, num_groups, topk_groups, topk, renormalize=True, scaling_factor=1.0):
    _check(logits, bias, num_groups, topk_groups, topk, renormalize, scaling_factor)
    if select_backend("grouped_topk", logits.device, has_cuda=False, has_triton=True) == "ref":
        idx, weights = python_ref.grouped_topk(logits, bias, num_groups, topk_groups, topk, renormalize,
                                               scaling_factor)
        return idx, weights.float()
    from dskernels.triton import moe

    idx, weights = _outputs(logits, topk)
    moe.grouped_topk(logits, bias, idx, weights, num_groups, topk_groups, renormalize, scaling_factor)
    return idx, weights


@torch.library.register_fake("dskernels::grouped_topk")
def _grouped_topk_fake(logits, bias, num_groups, topk_groups, topk, renormalize=True, scaling_factor=1.0):
    _check(logits, bias, num_groups, topk_groups, topk, renormalize, scaling_factor)
    return _outputs(logits, topk)
