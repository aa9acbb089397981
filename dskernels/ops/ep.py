"""Expert-parallel dispatch layout (API.md section 3; DeepEP's `Buffer.get_dispatch_layout`) and the
two row movers `dskernels.ep.Buffer` packs and unpacks its all-to-all payloads with.

Only `ep_get_dispatch_layout` is a registered op; `copy_rows` / `pack_rows` / `gather_reduce` /
`low_latency_send` / `low_latency_slots` are internal
(their shapes depend on the routing the Buffer computes) but pick a backend the same way.
"""

from __future__ import annotations

import torch

from dskernels._backend import current_backend, select_backend, triton_installed
from dskernels._checks import check_int, check_tensor
from dskernels._device import on_tensor_device
from dskernels._inference import inference_kernel
from python_ref import ep as ref_ep


def ep_get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens go to which rank, and how many tokens each expert gets.

    Args:
        topk_idx: [T, K] int64 expert ids in [0, num_experts), -1 for "no expert".
        num_experts: E, a multiple of num_ranks; expert e lives on rank e // (E // R).
        num_ranks: R >= 1.

    Returns:
        num_tokens_per_rank: [R] int32, tokens with at least one expert on rank r.
        num_tokens_per_expert: [E] int32, the (token, k) entries that name expert e (a token
            naming it twice counts twice, as in DeepEP).
        is_token_in_rank: [T, R] bool.

    Runs without a host synchronization on CUDA (ids are not range-checked there; the CPU kernel
    checks them).
    """
    # (checked here: the schema takes a bool as an int, so True would mean 1)
    num_experts, num_ranks = check_int("num_experts", num_experts), check_int("num_ranks", num_ranks)
    return torch.ops.dskernels.ep_get_dispatch_layout(topk_idx, num_experts, num_ranks)


def _check_layout_args(topk_idx, num_experts, num_ranks) -> None:
    check_tensor("topk_idx", topk_idx, ndim=2, dtypes=(torch.int64,))
    if num_ranks < 1:
        raise ValueError(f"num_ranks: expected at least 1, got {num_ranks}")
    if num_experts < 1 or num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a positive multiple of the number of ranks ({num_ranks}), "
                         f"got {num_experts}")


@torch.library.register_kernel("dskernels::ep_get_dispatch_layout", ("cpu", "cuda"))
@on_tensor_device
@inference_kernel("ep_get_dispatch_layout")
def _ep_get_dispatch_layout(topk_idx, num_experts, num_ranks):
    _check_layout_args(topk_idx, num_experts, num_ranks)
    device = topk_idx.device
    # The sm90 layout kernel passed tests/test_ep_layout.py on an H200 (2026-12-04): `auto` runs it.
    # Its counters live in shared memory: (num_experts + num_ranks) ints, at most 12288.
    backend = select_backend("ep_get_dispatch_layout", device,
                             has_cuda=_has_cuda_layout_kernel() and num_experts + num_ranks <= 12 * 1024,
                             has_triton=True, cuda_verified=True)
    if device.type == "cpu" and topk_idx.numel():
        # _assert_async on a CPU tensor checks now, and reads nothing through Python, so callers that
        # run under dskernels.testing.no_host_sync (it stands for CUDA) are not flagged for it.
        try:
            torch._assert_async(((topk_idx >= -1) & (topk_idx < num_experts)).all())
        except RuntimeError:
            low, high = int(topk_idx.min()), int(topk_idx.max())
            raise ValueError(f"topk_idx: expected expert ids in [-1, {num_experts}), got values in "
                             f"[{low}, {high}]") from None
    if backend == "ref":
        return ref_ep.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    if topk_idx.stride(1) != 1:
        topk_idx = topk_idx.contiguous()
    per_rank = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    per_expert = torch.zeros(num_experts, dtype=torch.int32, device=device)
    in_rank = torch.empty(topk_idx.shape[0], num_ranks, dtype=torch.bool, device=device)
    if backend == "cuda":
        torch.ops.dskernels._sm90_ep_get_dispatch_layout(topk_idx, num_experts, num_ranks, per_rank, per_expert,
                                                         in_rank)
    else:
        from dskernels.triton import ep as triton_ep

        triton_ep.get_dispatch_layout(topk_idx, num_experts, num_ranks, per_rank, per_expert, in_rank)
    return per_rank, per_expert, in_rank


@torch.library.register_fake("dskernels::ep_get_dispatch_layout")
def _ep_get_dispatch_layout_fake(topk_idx, num_experts, num_ranks):
    _check_layout_args(topk_idx, num_experts, num_ranks)
    return (topk_idx.new_empty(num_ranks, dtype=torch.int32), topk_idx.new_empty(num_experts, dtype=torch.int32),
            topk_idx.new_empty(topk_idx.shape[0], num_ranks, dtype=torch.bool))


def _has_cuda_layout_kernel() -> bool:
    # The schema is always there; the CUDA kernel only in builds with nvcc (csrc/ep/).
    return torch._C._dispatch_has_kernel_for_dispatch_key("dskernels::_sm90_ep_get_dispatch_layout", "CUDA")


def _mover_backend(op: str, device: torch.device) -> str:
    """The Buffer's row movers have no CUDA kernel: Triton is their GPU path. A forced "cuda"
    backend (set for the public ops) runs them on Triton rather than failing inside Buffer calls."""
    if current_backend() == "cuda" and device.type == "cuda" and triton_installed():
        return "triton"
    return select_backend(op, device, has_cuda=False, has_triton=True)


@on_tensor_device
def copy_rows(src: torch.Tensor, src_idx: torch.Tensor | None, dst: torch.Tensor, dst_idx: torch.Tensor | None,
              num_rows: int | None = None) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for i < num_rows (None: the identity); an i whose src_idx or
    dst_idx is negative is skipped (its dst row is not written). 2-D, same dtype, unit last stride,
    any row stride: unpacks receive buffers and fills the low-latency per-expert layout (a scatter)
    in one pass over the payload. The skip lets the low-latency path launch fixed-size grids (no
    host read of how many rows are valid)."""
    if num_rows is None:
        num_rows = (src_idx if src_idx is not None else dst_idx if dst_idx is not None else src).shape[0]
    if _mover_backend("ep_copy_rows", src.device) == "ref":
        ref_ep.copy_rows(src[:num_rows] if src_idx is None else src, None if src_idx is None else src_idx[:num_rows],
                         dst, None if dst_idx is None else dst_idx[:num_rows])
        return
    from dskernels.triton import ep as triton_ep

    triton_ep.copy_rows(src, src_idx, dst, dst_idx, num_rows)


@on_tensor_device
def pack_rows(segments: list[torch.Tensor], offsets: list[int], src_idx: torch.Tensor | None, dst: torch.Tensor,
              num_rows: int | None = None) -> None:
    """dst[i, offsets[j] : offsets[j] + w_j] = segments[j][src_idx[i]] for i < num_rows: a rank's whole
    send buffer (x | scales | topk ids | weights of each (token, destination) pair) in one launch.
    Up to 4 segments, all of dst's dtype (the Buffer views every payload as int32 words)."""
    if num_rows is None:
        num_rows = dst.shape[0]
    if _mover_backend("ep_pack_rows", dst.device) == "ref":
        ref_ep.pack_rows(segments, offsets, None if src_idx is None else src_idx[:num_rows], dst[:num_rows])
        return
    from dskernels.triton import ep as triton_ep

    triton_ep.pack_rows(segments, offsets, src_idx, dst, num_rows)


@on_tensor_device
def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[t] = sum_j weights[t, j] * y[index[t, j]] with index -1 skipped, fp32 sum in j order: the
    combine's fused un-permute and reduction back to token order."""
    if _mover_backend("ep_gather_reduce", y.device) == "ref":
        ref_ep.gather_reduce(y, index, weights, out)
        return
    from dskernels.triton import ep as triton_ep

    triton_ep.gather_reduce(y, index, weights, out)


@on_tensor_device
def low_latency_send(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, use_fp8: bool, send: torch.Tensor,
                     offsets: list[int], round_scale: bool = False) -> None:
    """Fills the low-latency dispatch's send buffer `send` uint8 [R, M, row_bytes] (python_ref.ep.low_latency_send
    has the definition): row t of every rank's block gets token t's expert ids (-1 past the T tokens),
    and, in the blocks of the ranks holding one of its experts, its payload: x's bytes, or with
    use_fp8 x cast to fp8 with per-128 scales exactly as per_token_cast_to_fp8 casts it (round_scale:
    power-of-two scales). One Triton
    launch reads x once (the cast fused into the send, as DeepEP does), instead of a cast, a
    broadcast copy per field and a fill."""
    if _mover_backend("ep_low_latency_send", send.device) == "ref":
        ref_ep.low_latency_send(x, topk_idx, num_experts, use_fp8, send, offsets, round_scale)
        return
    from dskernels.triton import ep as triton_ep

    triton_ep.low_latency_send(_dense(x), _dense(topk_idx), num_experts, use_fp8, send, offsets, round_scale)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t with row-major strides (torch calls [N, 1] and [0, K] contiguous whatever their last stride)."""
    return t.contiguous().reshape(-1).view(t.shape)


@on_tensor_device
def low_latency_slots(ids: torch.Tensor, base: int, num_local: int, cap: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The low-latency receiver's placement of every received (row, k) entry: (write_slot [N * K],
    return_slot [N * K] int64, recv_count int32 [num_local]); python_ref.ep.low_latency_slots has
    the definition. One Triton launch instead of about ten torch ops; no host synchronization."""
    if _mover_backend("ep_low_latency_slots", ids.device) == "ref":
        return ref_ep.low_latency_slots(ids, base, num_local, cap)
    from dskernels.triton import ep as triton_ep

    return triton_ep.low_latency_slots(ids, base, num_local, cap)
