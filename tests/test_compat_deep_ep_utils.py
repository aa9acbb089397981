"""Megatron-LM's DeepEP imports and events (deep_ep.utils), on CPU with gloo."""

import torch

from dskernels.ep.events import EventHandle, EventOverlap


def test_deep_ep_utils_names():
    from dskernels.ep.utils import EventHandle as EH, EventOverlap as EO, check_nvlink_connections  # noqa: F401
    assert EH is EventHandle and EO is EventOverlap
    event = EventOverlap(EventHandle())  # Megatron's previous_event
    event.current_stream_wait()
    with event:
        pass


def _megatron_body(rank, world):
    import torch.distributed as dist
    from dskernels.ep import Buffer
    from dskernels.ep.utils import EventHandle, EventOverlap
    num_experts, topk = 4, 2
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 128, generator=g)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(5)])
    w = torch.rand(5, topk, generator=g)
    buf = Buffer(dist.group.WORLD)
    assert buf.get_comm_stream() is None  # (DeepEP's; no CUDA device here)
    layout = buf.get_dispatch_layout(idx, num_experts, previous_event=EventOverlap(EventHandle()),
                                     async_finish=True, allocate_on_comm_stream=True)
    recv = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=layout[0],
                        num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                        num_tokens_per_expert=layout[2], previous_event=layout[4], async_finish=True,
                        allocate_on_comm_stream=True)
    recv[-1].current_stream_wait()
    combined, _, event = buf.combine(recv[0], recv[4], previous_event=EventOverlap(EventHandle()), async_finish=True)
    event.current_stream_wait()
    ranks = torch.tensor([len({int(e) // (num_experts // world) for e in row}) for row in idx], dtype=x.dtype)
    torch.testing.assert_close(combined, x * ranks[:, None])


def test_megatron_event_handle_as_previous_event():
    from dskernels.testing import run_distributed
    run_distributed(_megatron_body, 2)
