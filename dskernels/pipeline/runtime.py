"""DualPipe and DualPipeV runtimes: execute the schedules of `schedule` with torch.distributed.

Same constructor and `step` contract as deepseek-ai/DualPipe, but:
- one executor, driven by the action list of `schedule.dualpipe` / `schedule.dualpipev`, so what
  runs is exactly what the validator and simulator checked;
- any device and backend (gloo on CPU, NCCL on CUDA): the P2P buffers live on the device of the
  tensor being sent or of the module's first parameter;
- no global state: shapes and dtypes travel with the data (a small int64 header before each
  message), the weight-gradient store is per instance;
- P2P with `torch.distributed.batch_isend_irecv` and no tags, in an exchange plan derived from
  the schedule (`_plan`): each message is sent and received at the same slot boundary on both
  ranks, in the same order, so matching in issue order per pair (NCCL, which ignores tags) is
  correct and no batch waits for one posted later; the same code runs on every backend.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dskernels.pipeline import schedule as _schedule
from dskernels.pipeline.weight_grad import WeightGradStore

__all__ = ["DualPipe", "DualPipeV", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]

_compat_shapes: list | None = None
_compat_dtype: torch.dtype | None = None


def set_p2p_tensor_shapes(shapes) -> None:
    """DualPipe compatibility: accepted and recorded, not needed (shapes travel with the data)."""
    global _compat_shapes
    _compat_shapes = list(shapes)


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """DualPipe compatibility: accepted and recorded, not needed (dtypes travel with the data)."""
    global _compat_dtype
    _compat_dtype = dtype


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.bool, torch.int8, torch.uint8, torch.int16, torch.float8_e4m3fn, torch.float8_e5m2]
_HEADER = 64          # int64 words per header
_MAX_DIMS = 6
_MAX_TENSORS = (_HEADER - 1) // (2 + _MAX_DIMS)


def _scatter(inputs, num_chunks, dim):
    """Splits each tensor of `inputs` (a tensor or a sequence of tensors and Nones) into num_chunks
    chunks along dim: list of tuples; a None is None in every chunk (as DualPipe's scatter)."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not inputs:
        return [() for _ in range(num_chunks)]
    parts = []
    for t in inputs:
        if t is None:
            parts.append([None] * num_chunks)
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs: expected tensors (or None), got {type(t).__name__}")
        if t.shape[dim] < num_chunks:
            raise ValueError(f"inputs: dimension {dim} has {t.shape[dim]} rows, fewer than "
                             f"num_chunks={num_chunks}")
        parts.append(t.tensor_split(num_chunks, dim))
    return [tuple(p[i] for p in parts) for i in range(num_chunks)]


def _as_tuple(x):
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


def _meta(tensors) -> tuple:
    """A message's layout: per tensor None or (dtype index, shape)."""
    return tuple(None if t is None else (_DTYPES.index(t.dtype), tuple(t.shape)) for t in tensors)


def _offsets(meta):
    """Byte offsets of each tensor in a flat message (16 for the flag, 16-byte aligned), total."""
    offsets, pos = [], 16
    for m in meta:
        offsets.append(pos)
        if m is not None:
            n = torch.Size(m[1]).numel() * _DTYPES[m[0]].itemsize
            pos += (n + 15) // 16 * 16
    return offsets, pos


def _flat_bytes(meta) -> int:
    return _offsets(meta)[1]


def _pack(meta, tensors, device):
    """One uint8 buffer in `meta`'s layout: flag 0 and the tensors, or flag 1 and no data."""
    offsets, total = _offsets(meta)
    src = next((t for t in (tensors or ()) if t is not None), None)
    dev = device if device is not None else (src.device if src is not None else torch.device("cpu"))
    buf = torch.empty(total, dtype=torch.uint8, device=dev)
    buf[:8].view(torch.int64).fill_(0 if tensors is not None else 1)
    if tensors is not None:
        for m, off, t in zip(meta, offsets, tensors):
            if m is not None:
                n = t.numel() * t.element_size()
                buf[off:off + n].view(t.dtype).view(t.shape).copy_(t.detach())
    return buf


def _unpack(meta, buf):
    offsets, _ = _offsets(meta)
    out = []
    for m, off in zip(meta, offsets):
        if m is None:
            out.append(None)
            continue
        dtype, shape = _DTYPES[m[0]], torch.Size(m[1])
        n = shape.numel() * dtype.itemsize
        out.append(buf[off:off + n].view(dtype).view(shape).detach())
    return out


class _Runtime(nn.Module):
    _KIND = ""  # "dualpipe" or "dualpipev"

    def __init__(self, modules: tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None, rank_mapping: list[int] | None = None):
        super().__init__()
        if len(modules) != 2:
            raise ValueError(f"modules: expected two modules (one per stage of this rank), got {len(modules)}")
        self.module = nn.ModuleList(modules)
        self.overlapped_forward_backward = (type(modules[0]) is type(modules[1])  # as DualPipe decides it
                                            and hasattr(type(modules[0]), "overlapped_forward_backward"))
        self.batch_dim = batch_dim
        self.group = process_group or dist.distributed_c10d._get_default_group()
        self.num_ranks = self.group.size()
        self.rank_mapping = list(rank_mapping) if rank_mapping is not None else list(range(self.num_ranks))
        if sorted(self.rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping: expected a permutation of 0..{self.num_ranks - 1}, "
                             f"got {self.rank_mapping}")
        # DualPipe's convention: rank_mapping[group rank] is that process's pipeline rank.
        self.group_rank = self.group.rank()
        self.rank = self.rank_mapping[self.group_rank]
        self._group_rank_of = sorted(range(self.num_ranks), key=self.rank_mapping.__getitem__)
        self.weight_grad_store = WeightGradStore()
        self.fast_messages = 0   # messages received in one flat P2P (layout known from a past step)
        self.layout_changes = 0  # messages whose layout differed from the cached one
        P = self.num_ranks
        self.local_stages = {self.rank: 0, 2 * P - 1 - self.rank: 1}  # stage -> index in self.module

    # -- layout of the two pipelines (subclasses) --
    def _chains(self) -> list[list[int]]:
        raise NotImplementedError

    def _order(self, num_chunks: int) -> list[list[str]]:
        cache = self.__dict__.setdefault("_order_cache", {})
        if num_chunks not in cache:
            cache[num_chunks] = _schedule.generate(self._KIND, self.num_ranks, num_chunks)
        return cache[num_chunks]

    def _stage_rank(self, stage: int) -> int:
        P = self.num_ranks
        return stage if stage < P else 2 * P - 1 - stage

    def _peer(self, pipeline_rank: int) -> int:
        return dist.get_global_rank(self.group, self._group_rank_of[pipeline_rank])

    def _device(self):
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    # -- P2P --
    # Communication plan (NCCL-safe, no tags): the schedule is laid out on a global clock, one
    # action per rank per slot, each as early as its inputs allow. A message produced in slot t
    # is exchanged at boundary t+1, before slot t+1, by both its sender and its receiver. At a
    # boundary each rank posts one batch per phase: phase 0 carries each message's flat buffer
    # (layout cached from an earlier step) or its header (no layout yet); a header is followed
    # by its tensors in the next phase, a flat buffer flagged "layout changed" by a header and
    # the tensors in the next two. Within a batch, messages go in (peer, kind, stage, chunk)
    # order on both sides. So every batch a rank posts to a peer has exactly the matching batch
    # on the peer, posted at the same (boundary, phase), in the same op order: sends and receives
    # match by issue order per pair (NCCL ignores tags), and since all ranks post their batches
    # in the same (boundary, phase) order, a batch never waits on one posted later (no deadlock
    # on a backend whose P2P runs in issue order on one stream).
    def _messages(self, action: str, rank: int):
        """(sends [(dst rank, key)], needs [(src rank, key)]) of one action on `rank`, remote only."""
        prev, nxt = self._neighbours
        sends, needs = [], []
        for stage, kind, mb in _schedule.parse_action(action):
            if kind == "F":
                if stage in nxt:
                    sends.append((self._stage_rank(nxt[stage]), (0, stage, mb)))
                if stage in prev:
                    needs.append((self._stage_rank(prev[stage]), (0, prev[stage], mb)))
            elif kind in "BI":
                if stage in prev:
                    sends.append((self._stage_rank(prev[stage]), (1, stage, mb)))
                if stage in nxt:
                    needs.append((self._stage_rank(nxt[stage]), (1, nxt[stage], mb)))
        return ([(d, k) for d, k in sends if d != rank], [(s, k) for s, k in needs if s != rank])

    def _plan(self, order) -> list[tuple]:
        """This rank's program in run order: ("x", sends, recvs, boundary) exchanges (sends and
        recvs as sorted [(peer pipeline rank, key)]) and ("a", action)."""
        P = len(order)
        produced: dict = {}  # key -> slot
        pos, t, slots = [0] * P, 0, [[] for _ in range(P)]
        while any(pos[r] < len(order[r]) for r in range(P)):
            moved = False
            for r in range(P):
                if pos[r] == len(order[r]):
                    continue
                sends, needs = self._messages(order[r][pos[r]], r)
                if all(produced.get(k, t) < t for _, k in needs):
                    for d, k in sends:
                        produced[k] = t
                    slots[r].append(t)
                    pos[r] += 1
                    moved = True
            if not moved:
                raise RuntimeError(f"pipeline: the schedule cannot progress (stuck at {pos})")
            t += 1
        me, events = self.rank, {}
        for r in range(P):
            for action, slot in zip(order[r], slots[r]):
                for d, k in self._messages(action, r)[0]:
                    if me in (r, d):
                        x = events.setdefault((slot + 1, 0), ("x", [], [], slot + 1))
                        (x[1] if r == me else x[2]).append((d if r == me else r, k))
        for action, slot in zip(order[me], slots[me]):
            events[(slot, 1)] = ("a", action)
        program = [events[k] for k in sorted(events)]
        for e in program:
            if e[0] == "x":
                e[1].sort(), e[2].sort()
        return program

    def _send(self, kind: int, stage: int, mb: int, tensors, dst_stage: int):
        """Hands tensors (None allowed) of (stage, mb) to the rank of dst_stage: in memory on the
        same rank, else at the next exchange."""
        dst = self._stage_rank(dst_stage)
        if dst == self.rank:
            self._local[(kind, stage, mb)] = [None if t is None else t.detach() for t in tensors]
            return
        if len(tensors) > _MAX_TENSORS:
            raise ValueError(f"pipeline: at most {_MAX_TENSORS} tensors per message, got {len(tensors)}")
        self._outbox[(kind, stage, mb)] = list(tensors)

    def _send_phases(self, key, tensors) -> list[list[torch.Tensor]]:
        """The buffers of one outgoing message, per phase."""
        meta = _meta(tensors)
        cached = self._sent_meta.get(key)
        device = next((t.device for t in tensors if t is not None), self._device())
        phases = []
        if cached is not None:
            same = meta == cached
            phases.append([_pack(cached, tensors if same else None, device)])
            if same:
                return phases
        self._sent_meta[key] = meta
        header = torch.full((_HEADER,), -2, dtype=torch.int64)
        header[0] = len(tensors)
        payload = []
        for i, t in enumerate(tensors):
            base = 1 + i * (2 + _MAX_DIMS)
            if t is None:
                header[base] = -1
                continue
            if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
                raise ValueError(f"pipeline: cannot send a {t.dim()}-d {t.dtype} tensor "
                                 f"(at most {_MAX_DIMS} dims, dtypes {_DTYPES})")
            header[base] = _DTYPES.index(t.dtype)
            header[base + 1] = t.dim()
            header[base + 2: base + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            payload.append(t.detach().contiguous())
        return phases + [[header.to(device)], payload]

    def _exchange(self, sends, recvs):
        """Posts one boundary's messages, phase by phase (see the plan above), and waits for
        them; received tensors go to self._arrived."""
        out = [(d, self._send_phases(k, self._outbox.pop(k))) for d, k in sends]
        dev = self._device()
        state = {}  # key -> (src, "flat" | "header" | "payload", buffers)
        for src, k in recvs:
            if k in self._recv_meta:
                state[k] = (src, "flat", [torch.empty(_flat_bytes(self._recv_meta[k]), dtype=torch.uint8, device=dev)])
            else:
                state[k] = (src, "header", [torch.empty(_HEADER, dtype=torch.int64, device=dev)])
        phase = 0
        while state or any(phase < len(p) for _, p in out):
            ops = [dist.P2POp(dist.isend, t, self._peer(d), self.group)
                   for d, p in out if phase < len(p) for t in p[phase]]
            incoming = sorted(state.items(), key=lambda kv: (kv[1][0], kv[0]))
            ops += [dist.P2POp(dist.irecv, t, self._peer(src), self.group)
                    for _, (src, _, bufs) in incoming for t in bufs if t is not None]
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            for k, (src, what, bufs) in incoming:
                if what == "flat" and int(bufs[0][:8].view(torch.int64)[0]) == 0:
                    self.fast_messages += 1
                    self._arrived[k] = _unpack(self._recv_meta[k], bufs[0])
                    del state[k]
                elif what == "flat":  # the layout changed: a header and the tensors follow
                    del self._recv_meta[k]
                    self.layout_changes += 1
                    state[k] = (src, "header", [torch.empty(_HEADER, dtype=torch.int64, device=dev)])
                elif what == "header":
                    h = bufs[0].tolist()
                    tensors = []
                    for i in range(int(h[0])):
                        base = 1 + i * (2 + _MAX_DIMS)
                        tensors.append(None if h[base] < 0 else torch.empty(
                            h[base + 2: base + 2 + int(h[base + 1])], dtype=_DTYPES[int(h[base])], device=dev))
                    state[k] = (src, "payload", tensors)
                else:
                    self._recv_meta[k] = _meta(bufs)
                    self._arrived[k] = bufs
                    del state[k]
            phase += 1

    def _recv(self, kind: int, stage: int, mb: int, src_stage: int):
        """What (src_stage's rank) sent for (kind, stage, mb): received at an earlier exchange."""
        if self._stage_rank(src_stage) == self.rank:
            return self._local.pop((kind, stage, mb))
        key = (kind, stage, mb)
        if key not in self._arrived:
            raise RuntimeError(f"pipeline: message {key} needed before the exchange that brings it")
        return self._arrived.pop(key)

    # -- compute --
    def _forward_inputs(self, stage, mb):
        prev, _ = self._neighbours
        if stage not in prev:
            return tuple(self._input_chunks[stage][mb])
        received = self._recv(0, prev[stage], mb, prev[stage])
        return tuple(t.requires_grad_() if t.is_floating_point() else t for t in received)

    def _labels_of(self, stage, mb):
        return tuple(self._label_chunks[stage][mb]) if stage in self._label_chunks else ()

    def _post_forward(self, stage, mb, inputs, outputs, loss):
        _, nxt = self._neighbours
        self._inputs[(stage, mb)] = inputs
        outputs = _as_tuple(outputs)
        if stage in nxt:
            self._outputs[(stage, mb)] = outputs
            self._send(0, stage, mb, outputs, nxt[stage])
        else:
            if self.criterion is not None:
                self._losses[(stage, mb)] = loss
                self._loss_values[(stage, mb)] = loss.detach()
            if self.return_outputs:
                self._final_outputs[(stage, mb)] = tuple(o.detach() for o in outputs)

    def _forward(self, stage, mb):
        inputs = self._forward_inputs(stage, mb)
        module = self.module[self.local_stages[stage]]
        outputs = _as_tuple(module(*inputs))
        loss = None
        if stage in self._tails and self.criterion is not None:
            loss = self.criterion(*outputs, *self._labels_of(stage, mb))
        self._post_forward(stage, mb, inputs, outputs, loss)

    def _backward_operands(self, stage, mb):
        """(loss, outputs, output_grads) for the backward of (stage, mb)."""
        _, nxt = self._neighbours
        if stage not in nxt:
            return self._losses.pop((stage, mb)), [], []
        outputs = self._outputs.pop((stage, mb))
        grads = self._recv(1, nxt[stage], mb, nxt[stage])
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        return None, [o for o, _ in pairs], [g for _, g in pairs]

    def _post_backward(self, stage, mb):
        prev, _ = self._neighbours
        inputs = self._inputs.pop((stage, mb))
        if stage in prev:
            self._send(1, stage, mb, [t.grad if isinstance(t, torch.Tensor) else None for t in inputs],
                       prev[stage])

    @staticmethod
    def _run_backward(loss, outputs, output_grads):
        if loss is not None:
            loss.backward()
        elif outputs:
            torch.autograd.backward(outputs, grad_tensors=output_grads)

    def _backward(self, stage, mb, zero_bubble):
        loss, outputs, grads = self._backward_operands(stage, mb)
        if zero_bubble:
            with self.weight_grad_store.activate():
                self._run_backward(loss, outputs, grads)
            self.weight_grad_store.flush()
        else:
            self._run_backward(loss, outputs, grads)
        self._post_backward(stage, mb)

    def _forward_backward(self, fstage, fmb, bstage, bmb):
        if not self.overlapped_forward_backward:
            self._forward(fstage, fmb)
            self._backward(bstage, bmb, zero_bubble=False)
            return
        inputs0 = self._forward_inputs(fstage, fmb)
        is_tail0 = fstage in self._tails and self.criterion is not None
        loss1, outputs1, grads1 = self._backward_operands(bstage, bmb)
        outputs0, loss0 = type(self.module[0]).overlapped_forward_backward(
            self.module[self.local_stages[fstage]], inputs0,
            self.criterion if is_tail0 else None, list(self._labels_of(fstage, fmb)) if is_tail0 else [],
            self.module[self.local_stages[bstage]], loss1, outputs1, grads1)
        self._post_forward(fstage, fmb, inputs0, outputs0, loss0)
        self._post_backward(bstage, bmb)

    # -- step --
    def _split_inputs(self, inputs, labels, num_chunks) -> tuple[dict, dict]:
        """{head stage: chunks} and {tail stage: label chunks} for this rank (subclasses)."""
        raise NotImplementedError

    def step(self, *inputs, num_chunks: int = 0, criterion=None, labels: list | tuple = [],
             return_outputs: bool = False) -> tuple[torch.Tensor | None, Any]:
        """Runs one pipelined forward (and backward, when grad mode is on) over num_chunks chunks.

        inputs / labels: given on the ranks that hold a pipeline's first / last stage (others
        pass nothing); split into chunks along batch_dim. criterion(*outputs, *labels) -> the loss
        of one chunk; each chunk's loss is back-propagated separately (gradients accumulate in
        .grad, as in DualPipe). Returns (loss, outputs): on a rank with a last stage the chunks'
        losses stacked [chunks] (detached) and, with return_outputs, that stage's outputs
        concatenated along batch_dim; (None, None) elsewhere."""
        order = self._order(num_chunks)  # raises ValueError for an impossible num_chunks
        self._num_chunks = num_chunks
        chains = self._chains()
        self._neighbours = _schedule._neighbours(chains)
        self._tails = {c[-1] for c in chains}
        if criterion is None and torch.is_grad_enabled() and self._tails & set(self.local_stages):
            raise ValueError("criterion: required on a rank holding a last stage in a training step "
                             "(grad mode on); run under torch.no_grad() for forward only")
        self.criterion = criterion
        self.return_outputs = return_outputs
        self._input_chunks, self._label_chunks = self._split_inputs(inputs, labels, num_chunks)
        self._inputs, self._outputs, self._losses, self._final_outputs = {}, {}, {}, {}
        self._loss_values = {}
        self._local, self._outbox, self._arrived = {}, {}, {}
        if getattr(self, "_meta_chunks", None) != num_chunks:  # layouts are cached per chunk count
            self._sent_meta, self._recv_meta, self._meta_chunks = {}, {}, num_chunks
        self.weight_grad_store.clear()
        forward_only = not torch.is_grad_enabled()
        if forward_only:
            order = [[f"{s}F{m}" for a in acts for s, k, m in _schedule.parse_action(a) if k == "F"]
                     for acts in order]
        plans = self.__dict__.setdefault("_plans", {})
        if (num_chunks, forward_only) not in plans:
            plans[(num_chunks, forward_only)] = self._plan(order)
        try:
            for event in plans[(num_chunks, forward_only)]:
                if event[0] == "x":
                    self._exchange(event[1], event[2])
                    continue
                subs = _schedule.parse_action(event[1])
                if len(subs) == 2:
                    (fs, _, fm), (bs, _, bm) = subs
                    self._forward_backward(fs, fm, bs, bm)
                    continue
                stage, kind, mb = subs[0]
                if kind == "F":
                    self._forward(stage, mb)
                elif kind in "BI":
                    self._backward(stage, mb, zero_bubble=(kind == "I"))
                else:
                    self.weight_grad_store.pop()
            left = [*self._outbox, *self._arrived]
            if left:
                raise RuntimeError(f"pipeline: messages never received: {left}")
        finally:
            self._outbox, self._arrived = {}, {}
        if not self.weight_grad_store.empty():
            raise RuntimeError("pipeline: weight gradients left deferred after the step")
        tails_here = sorted(s for s in self._tails if s in self.local_stages)
        loss, outputs = None, None
        if tails_here:
            stage = tails_here[0]
            if criterion is not None:
                loss = torch.stack([self._loss_values[(stage, m)]
                                    for m in range(self._chunks_per_pipeline(num_chunks))])
            if return_outputs:
                parts = [self._final_outputs[(stage, m)] for m in range(self._chunks_per_pipeline(num_chunks))]
                cat = [torch.cat([p[i] for p in parts], dim=self.batch_dim) for i in range(len(parts[0]))]
                outputs = cat[0] if len(cat) == 1 else tuple(cat)
        self._inputs = self._outputs = self._losses = self._final_outputs = self._local = {}
        self._loss_values = {}
        self._input_chunks = self._label_chunks = {}
        return loss, outputs

    def _chunks_per_pipeline(self, num_chunks):
        return num_chunks


class DualPipeV(_Runtime):
    """DualPipeV: the model cut into 2P stages laid out as a V over P ranks; rank r holds stages
    r (modules[0]) and 2P-1-r (modules[1]). Inputs and labels are given on rank 0, which also
    returns the loss and outputs. Requires num_chunks >= 2P."""

    _KIND = "dualpipev"

    def _chains(self):
        return [list(range(2 * self.num_ranks))]

    def _split_inputs(self, inputs, labels, num_chunks):
        heads, tails = {}, {}
        if self.rank == 0:
            heads[0] = _scatter(inputs, num_chunks, self.batch_dim)
            tails[2 * self.num_ranks - 1] = _scatter(labels, num_chunks, self.batch_dim)
        return heads, tails


class DualPipe(_Runtime):
    """DualPipe: two copies of a P-stage model run in opposite directions over P ranks (P even);
    rank r holds stage r of the forward-direction copy (modules[0]) and stage r of the reverse
    copy, fed from rank P-1 (modules[1], the same layer as modules[0] of rank P-1-r).

    Rank 0's inputs go through the forward direction and end on rank P-1, whose labels they use;
    rank P-1's inputs go the other way and end on rank 0. Each of those ranks passes half of the
    batch (num_chunks / 2 chunks) and returns the losses of the direction that ends on it.
    After step, `sync_mirrored_grads()` sums the gradients of the two copies of each layer
    (the gradient-sync pairs: rank r's modules[0] with rank P-1-r's modules[1])."""

    _KIND = "dualpipe"

    def _chains(self):
        P = self.num_ranks
        return [list(range(P)), list(range(P, 2 * P))]

    def _chunks_per_pipeline(self, num_chunks):
        return num_chunks // 2

    def _split_inputs(self, inputs, labels, num_chunks):
        P, half = self.num_ranks, num_chunks // 2
        heads, tails = {}, {}
        if self.rank == 0:
            heads[0] = _scatter(inputs, half, self.batch_dim)
            tails[2 * P - 1] = _scatter(labels, half, self.batch_dim)
        if self.rank == P - 1:
            heads[P] = _scatter(inputs, half, self.batch_dim)
            tails[P - 1] = _scatter(labels, half, self.batch_dim)
        return heads, tails

    @staticmethod
    def grad_sync_pairs(num_ranks: int) -> list[tuple[int, int]]:
        """(rank, rank) pairs whose modules[0] / modules[1] hold the same layer."""
        return [(r, num_ranks - 1 - r) for r in range(num_ranks // 2)]

    def sync_mirrored_grads(self) -> None:
        """Both copies of each layer (rank r's modules[0], rank P-1-r's modules[1]) end with the sum
        of their gradients. A gradient that is None on one copy counts as zeros; one that is None on
        both stays None. Both ranks of a pair must call it."""
        peer = self._peer(self.num_ranks - 1 - self.rank)
        mine = [list(self.module[0].parameters()), list(self.module[1].parameters())]
        device = self._device()

        def exchange(sends):
            """sends: [item of modules[0], item of modules[1], ...] -> the peer's, in the same order
            (its modules[0] item is shaped like this rank's modules[1] one, and so on)."""
            recvs = [torch.empty_like(sends[i ^ 1]) for i in range(len(sends))]
            ops = [dist.P2POp(dist.isend, t, peer, self.group) for t in sends]
            ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t in recvs]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            return recvs

        sizes = [torch.tensor([len(ps), sum(p.numel() for p in ps)], device=device) for ps in mine]
        peer0, peer1 = exchange(sizes)
        if not (torch.equal(sizes[1], peer0) and torch.equal(sizes[0], peer1)):
            raise RuntimeError(f"sync_mirrored_grads: the copies of a layer differ between ranks {self.group_rank} "
                               f"and its peer: (parameters, elements) {sizes[0].tolist()} / {sizes[1].tolist()} "
                               f"here, {peer1.tolist()} / {peer0.tolist()} there")
        has = [torch.tensor([p.grad is not None for p in ps], dtype=torch.uint8, device=device) for ps in mine]
        grads = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
                 if ps else torch.zeros(0, device=device) for ps in mine]
        peer_has0, peer_has1, peer_grads0, peer_grads1 = exchange(has + grads)
        for ps, their_has, their_grads in ((mine[1], peer_has0, peer_grads0), (mine[0], peer_has1, peer_grads1)):
            offset = 0
            for p, present in zip(ps, their_has.tolist()):
                n = p.numel()
                if present:
                    g = their_grads[offset:offset + n].view_as(p).to(p.dtype)
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad += g
                offset += n
