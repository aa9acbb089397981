"""DeepseekV3DecoderLayer stacks trained through DualPipe and DualPipeV on 2 gloo ranks: the losses
and every parameter's gradient against the same stack trained in one process (docs/pipeline.md,
"Training DeepSeek-V3 layers")."""

import copy

import torch
import torch.distributed as dist
from torch import nn

from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer, RMSNorm
from dskernels.pipeline import DualPipe, DualPipeV, Linear, run_backward
from dskernels.testing import run_distributed

# Small enough for 2 shared cores; still grouped routing (4 groups, 2 kept), a shared expert, q LoRA
# and YaRN. Layer 0 dense, the others MoE.
CFG = DeepseekV3Config.tiny(
    vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=2,
    num_key_value_heads=2, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, kv_lora_rank=16,
    q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, num_hidden_layers=4)
SEQ = 5
EPS = torch.finfo(torch.float32).eps


def random_layer(layer_idx):
    return randomize(DeepseekV3DecoderLayer(CFG, layer_idx, dtype=torch.float32))


def randomize(layer):
    """Random weights for a decoder layer: norms near 1, a negative score bias, projections of unit gain."""
    state = {}
    for name, value in layer.hf_state_dict().items():
        if "norm" in name:
            state[name] = 1 + 0.1 * torch.randn(value.shape)
        elif "e_score_correction_bias" in name:
            state[name] = -0.2 * torch.rand(value.shape)
        else:
            state[name] = torch.randn(value.shape) * value.shape[-1] ** -0.5
    layer.load_hf_state_dict(state)
    return layer


class Stage(nn.Module):
    """One pipeline stage: the embedding on the first, decoder layers, the final norm and head on
    the last. The rope positions travel with the hidden states as a second output (int64, no
    gradient) up to the last stage, which returns the logits alone: criterion(logits, labels)."""

    def __init__(self, layer_ids, first, last):
        super().__init__()
        self.embed = nn.Embedding(CFG.vocab_size, CFG.hidden_size) if first else None
        self.layers = nn.ModuleList(random_layer(i) for i in layer_ids)
        self.norm = RMSNorm(CFG.hidden_size, CFG.rms_norm_eps, torch.float32, None) if last else None
        # the pipeline's Linear: its weight gradient waits for the W action (zero bubble)
        self.head = Linear(CFG.hidden_size, CFG.vocab_size, bias=False) if last else None
        if last:
            nn.init.normal_(self.norm.weight, 1, 0.1)
        self.requires_grad_()  # the decoder layers' weights come frozen (inference kernels)

    def forward(self, x, positions):
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers:
            h = layer(h, positions)
        return self.head(self.norm(h)) if self.head is not None else (h, positions)


class OverlappedStage(Stage):
    """DualPipe's overlapped_forward_backward hook: one chunk's forward beside another's backward
    (here one after the other; an EP implementation interleaves their all-to-alls)."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(logits, labels):
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def build(num_stages, stage_cls):
    per = CFG.num_hidden_layers // num_stages
    return [stage_cls(range(s * per, (s + 1) * per), s == 0, s == num_stages - 1) for s in range(num_stages)]


def batch(rows, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (rows, SEQ), generator=g)
    positions = torch.randint(0, 150000, (rows, 1), generator=g) + torch.arange(SEQ)
    return ids, positions, torch.randint(0, CFG.vocab_size, (rows, SEQ), generator=g)


def reference(stages, ids, positions, labels, num_chunks):
    """One process, chunk by chunk as the runtimes cut them: (losses, per parameter sum over the
    chunks of |gradient|, the bound of the rounding below). Gradients accumulate in .grad."""
    losses, magnitude = [], {}
    params = [p for s in stages for p in s.parameters()]
    for chunk in zip(ids.chunk(num_chunks), positions.chunk(num_chunks), labels.chunk(num_chunks)):
        before = [None if p.grad is None else p.grad.clone() for p in params]
        h = chunk[:2]
        for stage in stages:
            h = stage(*h) if isinstance(h, tuple) else h
        loss = criterion(h, chunk[2])
        loss.backward()
        losses.append(loss.detach())
        for p, b in zip(params, before):
            if p.grad is not None:
                g = p.grad if b is None else p.grad - b
                magnitude[p] = magnitude.get(p, 0) + g.abs()
    return torch.stack(losses), magnitude


def assert_grads(local, ref, magnitude, num_chunks):
    """Each chunk's gradient comes from the same ops on the same values in both runs; what differs
    is the order in which the chunks' gradients are added (DualPipe: each copy of a layer sums its
    direction's chunks, then the copies are added). Two orders of a sum of N terms differ by at most
    2 (N - 1) eps sum |term| (fp32, first order), element by element; 16 eps of the tensor's largest
    gradient more for the chunk's own arithmetic (a BLAS may round differently at another alignment,
    and received tensors sit in a message buffer). A lost or doubled chunk is off by far more."""
    for (name, p), q in zip(local.named_parameters(), ref.parameters()):
        if q.grad is None:  # a routed expert no token chose
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        bound = 2 * (num_chunks - 1) * EPS * magnitude[q] + 16 * EPS * q.grad.abs().max()
        excess = ((p.grad - q.grad).abs() - bound).max().item()
        assert excess <= 0, f"{name}: gradient off by more than fp32 summation order allows ({excess:.3g})"


def train(rank, P, runtime, stage_cls, num_chunks):
    """Three steps of one runtime: an SGD update after the first, gradients of the next two
    accumulated (DualPipe: synced after each); each checked against the reference from the same
    weights."""
    torch.manual_seed(0)
    dual = runtime is DualPipe
    S = P if dual else 2 * P
    stages = build(S, stage_cls)
    pipe = runtime((copy.deepcopy(stages[rank]), copy.deepcopy(stages[S - 1 - rank])), timeout_s=60)
    mine = (rank, S - 1 - rank)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
    ref, magnitude = copy.deepcopy(stages), {}
    for step in range(3):
        ids, positions, labels = batch(4 * num_chunks, seed=step)
        losses, mag = reference(ref, ids, positions, labels, num_chunks)
        magnitude = {p: magnitude.get(p, 0) + m for p, m in mag.items()}
        if dual:  # rank 0 feeds the first half, rank P-1 the second; each ends on the other
            half = num_chunks // 2
            split = [t.tensor_split(2) for t in (ids, positions, labels)]
            if rank in (0, P - 1):
                d = 0 if rank == 0 else 1
                loss, _ = pipe.step(split[0][d], split[1][d], num_chunks=num_chunks, criterion=criterion,
                                    labels=[split[2][1 - d]])
                expected = losses[half:] if rank == 0 else losses[:half]
                torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
            else:
                pipe.step(num_chunks=num_chunks)
            pipe.sync_mirrored_grads()  # after each step of the accumulation: the sums count once
            if step == 2:
                pipe.sync_mirrored_grads()  # and again, with no step between: no change
        elif rank == 0:
            loss, _ = pipe.step(ids, positions, num_chunks=num_chunks, criterion=criterion, labels=[labels])
            torch.testing.assert_close(loss, losses, rtol=1e-6, atol=0)
        else:
            pipe.step(num_chunks=num_chunks)
        chunks = num_chunks * (1 if step == 0 else 2)  # steps 1 and 2 add up in .grad
        for i in (0, 1):
            assert_grads(pipe.module[i], ref[mine[i]], magnitude, chunks)
        if step == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            magnitude = {}
            # the reference goes on from the pipeline's weights (its own SGD step would differ by
            # the gradients' rounding, which a router could amplify into another expert choice)
            held = [None] * P
            dist.all_gather_object(held, {s: pipe.module[i].state_dict() for i, s in enumerate(mine)})
            for states in held:
                for s, state in states.items():
                    ref[s].load_state_dict(state)
            for stage in ref:
                stage.zero_grad(set_to_none=True)
    assert pipe.weight_grad_store.empty()

    # forward only: the same losses, no gradient touched
    ids, positions, labels = batch(4 * num_chunks, seed=9)
    ref_losses, _ = reference(ref, ids, positions, labels, num_chunks)
    with torch.no_grad():
        if not dual and rank == 0:
            loss, logits = pipe.step(ids, positions, num_chunks=num_chunks, criterion=criterion, labels=[labels],
                                     return_outputs=True)
            torch.testing.assert_close(loss, ref_losses, rtol=1e-6, atol=0)
            assert logits.shape == (ids.shape[0], SEQ, CFG.vocab_size)
        elif not dual:
            pipe.step(num_chunks=num_chunks)


def _body(rank, world_size):
    torch.set_num_threads(1)  # same per-chunk arithmetic in both runs
    train(rank, world_size, DualPipeV, Stage, num_chunks=2 * world_size + 1)
    train(rank, world_size, DualPipe, OverlappedStage, num_chunks=2 * world_size + 2)
    assert OverlappedStage.calls > 0


def test_decoder_layers_train_through_dualpipe():
    run_distributed(_body, 2, timeout_s=120)
