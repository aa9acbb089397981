"""Expert parallelism inside pipeline stages, as DeepSeek-V3 trains: 4 gloo ranks, 2 pipeline ranks x
2 EP ranks. Each pipeline stage holds MoE decoder layers whose experts are split over the stage's EP
group through one `dskernels.ep.Buffer`; DualPipeV and DualPipe (with the overlapped hook) train
them, each EP rank on its own tokens (data parallel), and the losses, every gradient and the router
bias update are checked against one process running the whole model (docs/pipeline.md, "Expert
parallelism inside the stages")."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dskernels.ep import Buffer, EPCommError
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer, RMSNorm
from dskernels.pipeline import DualPipe, DualPipeV, Linear, run_backward
from dskernels.testing import run_distributed

import test_pipeline_models as pipeline_models

P, EP = 2, 2  # pipeline ranks, EP ranks per stage: global rank p * EP + e
# Every layer MoE (first_k_dense_replace=0), so every stage exchanges tokens; 8 experts, 4 per EP rank;
# grouped routing (4 groups, 2 kept), a shared expert, q LoRA and YaRN as in test_pipeline_models.
CFG = DeepseekV3Config.tiny(
    vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=2,
    num_key_value_heads=2, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, kv_lora_rank=16,
    q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, num_hidden_layers=4,
    first_k_dense_replace=0)
SEQ = 5
EPS = torch.finfo(torch.float32).eps
# Losses: with EP a token's expert outputs are summed per rank, then over the ranks in rank order; the
# reference sums them in top-k slot order: up to 2 roundings apart in each of the 4 MoE outputs, carried
# through the residual stream at about unit gain: 16 eps relative (measured: at most 1.6 eps).
LOSS_RTOL = 16 * EPS
BIAS_RATE = 0.05  # the aux-loss-free balancing's bias update speed (DeepSeek-V3's gamma)


def make_groups(rank):
    """(pipeline rank, EP rank, pipeline group, EP group). new_group is collective over the whole
    world: every rank creates every group, in the same order, even those it is not in."""
    pipeline_groups = [dist.new_group([p * EP + e for p in range(P)]) for e in range(EP)]
    ep_groups = [dist.new_group([p * EP + e for e in range(EP)]) for p in range(P)]
    p, e = divmod(rank, EP)
    return p, e, pipeline_groups[e], ep_groups[p]


class Stage(nn.Module):
    """One pipeline stage (test_pipeline_models.Stage), its MoE layers over `ep_buffer`'s group
    (None: all experts here, the single-process reference)."""

    def __init__(self, layer_ids, first, last, ep_buffer=None):
        super().__init__()
        self.embed = nn.Embedding(CFG.vocab_size, CFG.hidden_size) if first else None
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(CFG, i, dtype=torch.float32, ep_buffer=ep_buffer)
                                    for i in layer_ids)
        self.norm = RMSNorm(CFG.hidden_size, CFG.rms_norm_eps, torch.float32, None) if last else None
        self.head = Linear(CFG.hidden_size, CFG.vocab_size, bias=False) if last else None

    forward = pipeline_models.Stage.forward  # (the same parts: embed, layers, norm, head)


class OverlappedStage(Stage):
    """With DualPipe's overlapped_forward_backward hook: a chunk's forward, then another's backward,
    both exchanging over the same EP Buffer."""

    calls = 0
    # test_pipeline_models' hook (counting into this class's calls)
    overlapped_forward_backward = classmethod(pipeline_models.OverlappedStage.overlapped_forward_backward.__func__)


class RankDependentStage(Stage):
    """A broken overlapped hook: EP rank 1 runs the backward before the forward, so the two EP
    ranks of a stage issue their exchanges in different orders (DualPipe's schedule is the same on
    both; the hook must keep it so)."""

    ep_rank = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        if cls.ep_rank == 1:
            if loss1 is not None:
                loss1.backward()
            else:
                run_backward(outputs1, output_grads1)
            outputs0 = module0(*inputs0)
            return outputs0, criterion0(outputs0, *labels0) if criterion0 is not None else None
        return OverlappedStage.overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
                                                           outputs1, output_grads1)


criterion = pipeline_models.criterion


def build_reference(num_stages):
    """The whole model in this process, random weights (the same on every rank: seeded)."""
    torch.manual_seed(0)
    per = CFG.num_hidden_layers // num_stages
    stages = [Stage(range(s * per, (s + 1) * per), s == 0, s == num_stages - 1) for s in range(num_stages)]
    for stage in stages:
        for layer in stage.layers:
            pipeline_models.randomize(layer)
        if stage.norm is not None:
            nn.init.normal_(stage.norm.weight, 1, 0.1)
        stage.requires_grad_()  # the decoder layers' weights come frozen (inference kernels)
    return stages


def ep_copy(ref, stage_cls, buffer):
    """ref's weights in a stage whose MoE layers hold this EP rank's experts (load_hf_state_dict
    takes the full state dict and keeps its share)."""
    stage = stage_cls([layer.layer_idx for layer in ref.layers], ref.embed is not None, ref.head is not None, buffer)
    for name in ("embed", "norm", "head"):
        if getattr(ref, name) is not None:
            getattr(stage, name).load_state_dict(getattr(ref, name).state_dict())
    for layer, ref_layer in zip(stage.layers, ref.layers):
        layer.load_hf_state_dict(ref_layer.hf_state_dict())
    return stage.requires_grad_()


def batch(rows, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (rows, SEQ), generator=g)
    positions = torch.randint(0, 150000, (rows, 1), generator=g) + torch.arange(SEQ)
    return ids, positions, torch.randint(0, CFG.vocab_size, (rows, SEQ), generator=g)


def ref_forward(stages, ids, positions):
    h = (ids, positions)
    for stage in stages:
        h = stage(*h) if isinstance(h, tuple) else h
    return h


def reference(stages, shards, num_chunks):
    """One process: each EP rank's batch (shard) chunk by chunk as the runtime cuts it. Returns the
    per-shard chunk losses and, per parameter, the sum over the (shard, chunk) terms of |gradient|.
    Gradients accumulate in .grad: the sum over every shard, as the EP ranks' sum."""
    losses, magnitude = [], {}
    params = [p for s in stages for p in s.parameters()]
    for ids, positions, labels in shards:
        losses.append([])
        for chunk in zip(ids.chunk(num_chunks), positions.chunk(num_chunks), labels.chunk(num_chunks)):
            before = [None if p.grad is None else p.grad.clone() for p in params]
            loss = criterion(ref_forward(stages, *chunk[:2]), chunk[2])
            loss.backward()
            losses[-1].append(loss.detach())
            for p, b in zip(params, before):
                if p.grad is not None:
                    g = p.grad if b is None else p.grad - b
                    magnitude[p] = magnitude.get(p, 0) + g.abs()
    return [torch.stack(shard) for shard in losses], magnitude


def is_expert(name):
    return ".mlp.experts." in name


def assert_grads(local, ref, magnitude, terms, ep_rank):
    """local: a stage of this EP rank, after the EP all-reduce of its replicated parameters; its
    routed experts are rows [ep_rank * L, (ep_rank + 1) * L) of the reference's. The reference adds
    its `terms` (shard, chunk) gradients one by one; the pipeline adds each shard's chunks, then the
    EP ranks' sums (replicated weights), or gets both shards' rows of a chunk in one grouped GEMM
    (experts). Two orders of a sum of N terms differ by at most 2 (N - 1) eps sum |term| (fp32,
    first order); 16 eps of the largest gradient more for a chunk's own arithmetic (a token's
    expert outputs, summed per rank and then over the ranks, in another order than the
    reference's top-k slot order: a few eps per layer). A lost or doubled chunk, or the other
    rank's experts, are off by far more."""
    local_experts = CFG.n_routed_experts // EP
    rows = slice(ep_rank * local_experts, (ep_rank + 1) * local_experts)
    for (name, p), q in zip(local.named_parameters(), ref.parameters()):
        want, mag = q.grad, magnitude.get(q)
        if want is not None and is_expert(name):
            want, mag = want[rows], mag[rows]
        if want is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None and p.grad.shape == want.shape, name
        bound = 2 * (terms - 1) * EPS * mag + 16 * EPS * want.abs().max()
        excess = ((p.grad - want).abs() - bound).max().item()
        assert excess <= 0, f"{name}: gradient off by more than fp32 summation order allows ({excess:.3g})"


def count_loads(stages, loads):
    """Forward hooks on every router: loads[layer] += this call's (token, k) selections per expert
    (DeepSeek-V3's aux-loss-free balancing counts them over the whole batch)."""
    def hook(module, inputs, output, layer_idx):
        loads[layer_idx] += torch.bincount(output[0].flatten(), minlength=CFG.n_routed_experts)

    for stage in stages:
        for layer in stage.layers:
            layer.mlp.gate.register_forward_hook(lambda m, i, o, idx=layer.layer_idx: hook(m, i, o, idx))


def update_bias(stages, loads):
    """bias += rate * sign(mean load - load): overloaded experts get chosen less."""
    for stage in stages:
        for layer in stage.layers:
            load = loads[layer.layer_idx].double()
            layer.mlp.gate.e_score_correction_bias += BIAS_RATE * torch.sign(load.mean() - load).float()


def train(p, e, pipeline_group, ep_group, buffer, runtime, stage_cls, num_chunks):
    """Two steps of one runtime, each checked against the reference; between them the router bias
    update from the loads counted over every rank, the same on the reference."""
    dual = runtime is DualPipe
    S = P if dual else 2 * P
    ref = build_reference(S)
    mine = (p, S - 1 - p)
    pipe = runtime(tuple(ep_copy(ref[s], stage_cls, buffer) for s in mine), process_group=pipeline_group,
                   timeout_s=60)
    loads = torch.zeros(CFG.num_hidden_layers, CFG.n_routed_experts, dtype=torch.int64)
    ref_loads = torch.zeros_like(loads)
    count_loads(pipe.module, loads)
    count_loads(ref, ref_loads)
    for step in range(2):
        # (EP rank 1 has fewer tokens than EP rank 0: uneven data-parallel batches meet in each dispatch)
        shards = [batch((4 - 2 * k) * num_chunks, seed=10 * step + k) for k in range(EP)]
        losses, magnitude = reference(ref, shards, num_chunks)
        ids, positions, labels = shards[e]
        if dual:  # pipeline rank 0 feeds the first half, P-1 the second; each ends on the other
            half = num_chunks // 2
            split = [t.tensor_split(2) for t in (ids, positions, labels)]
            if p in (0, P - 1):
                d = 0 if p == 0 else 1
                loss, _ = pipe.step(split[0][d], split[1][d], num_chunks=num_chunks, criterion=criterion,
                                    labels=[split[2][1 - d]])
                expected = losses[e][half:] if p == 0 else losses[e][:half]
                torch.testing.assert_close(loss, expected, rtol=LOSS_RTOL, atol=0)
            else:
                pipe.step(num_chunks=num_chunks)
            pipe.sync_mirrored_grads()  # the two copies of each stage first
        elif p == 0:
            loss, _ = pipe.step(ids, positions, num_chunks=num_chunks, criterion=criterion, labels=[labels])
            torch.testing.assert_close(loss, losses[e], rtol=LOSS_RTOL, atol=0)
        else:
            pipe.step(num_chunks=num_chunks)
        # then data parallelism over the EP group: the replicated weights' gradients are summed over
        # the EP ranks (each trained on its own tokens); each routed expert lives on one EP rank,
        # which received its tokens from every rank: its gradient is complete already
        for name, param in pipe.module.named_parameters():
            if not is_expert(name):
                dist.all_reduce(param.grad, group=ep_group)
        for i in (0, 1):
            assert_grads(pipe.module[i], ref[mine[i]], magnitude, EP * num_chunks, e)
        # the routers' bias update: every rank counted the selections of its own tokens in the copies
        # of the layers it holds; one all_reduce over the world sums the EP ranks and DualPipe's two
        # copies of a stage (each saw one direction's chunks)
        dist.all_reduce(loads)
        assert torch.equal(loads, ref_loads), "routed (token, k) counts differ from the single process's"
        update_bias(pipe.module, loads)
        update_bias(ref, ref_loads)
        loads.zero_()
        ref_loads.zero_()
        pipe.zero_grad(set_to_none=True)
        for stage in ref:
            stage.zero_grad(set_to_none=True)
    assert pipe.weight_grad_store.empty()

    # forward only (evaluation): the same losses, no gradient touched
    shards = [batch((4 - 2 * k) * num_chunks, seed=9 + k) for k in range(EP)]
    with torch.no_grad():
        ref_losses = [torch.stack([criterion(ref_forward(ref, *chunk[:2]), chunk[2])
                                   for chunk in zip(*(t.chunk(num_chunks) for t in shard))]) for shard in shards]
        if not dual and p == 0:
            loss, _ = pipe.step(*shards[e][:2], num_chunks=num_chunks, criterion=criterion, labels=[shards[e][2]])
            torch.testing.assert_close(loss, ref_losses[e], rtol=LOSS_RTOL, atol=0)
        elif not dual:
            pipe.step(num_chunks=num_chunks)
    assert all(q.grad is None for q in pipe.parameters())


def _body(rank, world_size):
    torch.set_num_threads(1)  # the same per-chunk arithmetic in both runs
    p, e, pipeline_group, ep_group = make_groups(rank)
    buffer = Buffer(ep_group, timeout_s=60)  # one per EP group, shared by every MoE layer of the rank
    train(p, e, pipeline_group, ep_group, buffer, DualPipeV, Stage, num_chunks=2 * P + 1)
    train(p, e, pipeline_group, ep_group, buffer, DualPipe, OverlappedStage, num_chunks=2 * P + 2)
    assert OverlappedStage.calls > 0
    # Exchanges issued in another order on the two EP ranks of a stage: check_exchanges (gloo's
    # default) stops both at the first mismatched one with a ValueError, before any data moves; the
    # other pipeline rank's EP pair, mirrored in DualPipe's schedule, reaches its overlapped pair in
    # the same slot and stops there too. (Unchecked, as on NCCL by default, the rows would be
    # exchanged with the wrong peer op: gloo aborts on the sizes, or tensors get mixed up: docs/ep.md.)
    RankDependentStage.ep_rank = e
    ref = build_reference(P)
    pipe = DualPipe(tuple(ep_copy(ref[s], RankDependentStage, buffer) for s in (p, P - 1 - p)),
                    process_group=pipeline_group, timeout_s=60)
    ids, positions, labels = (t.tensor_split(2)[p] for t in batch(8, seed=e))  # (P = 2: pipeline rank p feeds half p)
    with pytest.raises(ValueError, match=r"the ranks disagree on this exchange \(check_exchanges\): rank 1 runs "
                                         "another exchange than rank 0"):
        pipe.step(ids, positions, num_chunks=2 * P, criterion=criterion, labels=[labels])
    # A step refused on one pipeline only (its inputs make too few chunks; the pipelines of an EP group
    # are separate DualPipe groups, which do not compare their arguments): the other pipeline's ranks
    # wait for their EP peers in their first dispatch and raise within the Buffer's timeout_s, or at
    # once when the peer is gone, instead of hanging. (Last: the new Buffer is left unusable.)
    buffer = Buffer(ep_group, timeout_s=2)
    pipe = DualPipe(tuple(ep_copy(ref[s], Stage, buffer) for s in (p, P - 1 - p)), process_group=pipeline_group,
                    timeout_s=60)
    ids, positions, labels = (t.tensor_split(2)[p] for t in batch(8 if e == 0 else 2, seed=e))
    expected = ((ValueError, "inputs: dimension 0 has 1 rows") if e == 1 else
                ((TimeoutError, EPCommError), r"dskernels\.ep\.Buffer\.dispatch \(count exchange\)"))
    with pytest.raises(expected[0], match=expected[1]):
        pipe.step(ids, positions, num_chunks=2 * P, criterion=criterion, labels=[labels])


def test_moe_layers_with_expert_parallelism_train_through_dualpipe():
    run_distributed(_body, P * EP, timeout_s=240)
