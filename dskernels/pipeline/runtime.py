"""DualPipe and DualPipeV runtimes: execute the schedules of `schedule` with torch.distributed.

Same constructor and `step` contract as deepseek-ai/DualPipe, but:
- one executor, driven by the action list of `schedule.dualpipe` / `schedule.dualpipev`, so what
  runs is exactly what the validator and simulator checked;
- any device and backend (gloo on CPU, NCCL on CUDA): the P2P buffers live on the device of the
  tensor being sent or of the module's first parameter;
- no global state: shapes and dtypes travel with the data (a small int64 header before each
  message), the weight-gradient store is per instance;
- every rank's step arguments are compared before any P2P (one small all_gather per step), and
  every wait for a peer is bounded by `timeout_s` (default: the process group's own timeout; an
  error naming the peer and the action either way);
- P2P with `torch.distributed.batch_isend_irecv` and no tags, in an exchange plan derived from
  the schedule (`_plan`): each message is sent and received at the same slot boundary on both
  ranks, in the same order, so matching in issue order per pair (NCCL, which ignores tags) is
  correct and no batch waits for one posted later; the same code runs on every backend.
"""

from __future__ import annotations

import datetime
import time
import weakref
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dskernels._checks import as_flag
from dskernels._collectives import check_member_group, use_counts, wait_released
from dskernels.pipeline import schedule as _schedule
from dskernels.pipeline.weight_grad import WeightGradStore

__all__ = ["DualPipe", "DualPipeV", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]

_compat_shapes: list | None = None
_compat_dtype: torch.dtype | None = None


def run_backward(tensors, grad_tensors) -> None:
    """Back-propagates grad_tensors through tensors, accumulating into the leaves' .grad: DualPipe's
    `utils.run_backward`, for `overlapped_forward_backward` hooks (which get the backward's outputs
    and output gradients as tuples). Lists work too; nothing to do for none."""
    if len(tensors):
        torch.autograd.backward(tuple(tensors), grad_tensors=tuple(grad_tensors))


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
_KIND_IDS = {"dualpipe": 0, "dualpipev": 1}  # travel in the start-of-step check
_POLL_S = 2e-4


def _check_modules(modules) -> tuple[nn.Module, nn.Module]:
    """The (module0, module1) pair of DualPipe's constructor, checked: a tuple or list, or a
    container module of two (nn.ModuleList; nn.Sequential, as DualPipe's own example passes)."""
    if not isinstance(modules, (tuple, list, nn.ModuleList, nn.Sequential)):
        got = f"a single {type(modules).__name__}" if isinstance(modules, nn.Module) else type(modules).__name__
        raise TypeError(f"modules: expected a pair (module0, module1) of nn.Module, one per stage of this "
                        f"rank, got {got}")
    if len(modules) != 2:
        raise ValueError(f"modules: expected two modules (one per stage of this rank), got {len(modules)}")
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{i}]: expected an nn.Module, got {type(m).__name__}")
    return tuple(modules)


def _scatter(inputs, num_chunks, dim, name="inputs"):
    """Splits each tensor of `inputs` (a tensor or a sequence of tensors and Nones) into num_chunks
    chunks along dim: list of tuples; a None is None in every chunk (as DualPipe's scatter).
    `name` is the step argument they came from, for the errors."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif inputs is None and name == "labels":
        inputs = ()
    elif not isinstance(inputs, (tuple, list)):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors (or None), got {type(inputs).__name__}")
    if not inputs:
        return [() for _ in range(num_chunks)]
    parts = []
    for i, t in enumerate(inputs):
        if t is None:
            parts.append([None] * num_chunks)
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected tensors (or None), got {type(t).__name__} at position {i}")
        if not -t.dim() <= dim < t.dim():
            raise ValueError(f"batch_dim: expected a dimension of every tensor of {name}, got {dim} for the "
                             f"{t.dim()}-d tensor at position {i} (dims {-t.dim()}..{t.dim() - 1})")
        # Tensor.chunk, as DualPipe splits them (so a batch that num_chunks does not divide gives the
        # anchor's micro-batches, and losses): pieces of ceil(rows / num_chunks) rows, the last
        # one shorter; where that makes fewer than num_chunks pieces (the anchor fails), an error.
        pieces = t.chunk(num_chunks, dim)
        if len(pieces) < num_chunks:
            rows = t.shape[dim]
            raise ValueError(f"{name}: dimension {dim} has {rows} rows, which DualPipe's split (Tensor.chunk: "
                             f"pieces of ceil({rows} / {num_chunks}) rows) makes {len(pieces)} micro-batches, "
                             f"not num_chunks={num_chunks}; a multiple of num_chunks rows always works")
        parts.append(pieces)
    return [tuple(p[i] for p in parts) for i in range(num_chunks)]


def _batch_rows(tensors, dim: int, name: str, same: bool) -> int:
    """Rows along dim of the first tensor of `tensors` (a tensor, a sequence or None; None entries
    skipped), -1 when there is none. same: every tensor must have them (labels: one whose rows
    differ would be split into chunks that do not line up; ValueError naming `name`)."""
    if isinstance(tensors, torch.Tensor):
        tensors = (tensors,)
    rows = [t.shape[dim] for t in (tensors or ()) if isinstance(t, torch.Tensor) and -t.dim() <= dim < t.dim()]
    if not same:
        return rows[0] if rows else -1
    rows = set(rows)
    if len(rows) > 1:
        raise ValueError(f"{name}: expected the same number of rows along batch_dim in every tensor, got {sorted(rows)}")
    return rows.pop() if rows else -1


def _describe(key) -> str:
    """A message key (kind, stage, chunk) in words, for the errors."""
    kind, stage, mb = key
    return f"{'output' if kind == 0 else 'input gradient'} of stage {stage} chunk {mb}"


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
    """The message's tensors, in `buf` without a copy, each with its own version counter: views of
    one buffer would share one, and a stage that changes a received tensor in place (a mask, the
    positions) would then invalidate another saved for backward ("modified by an inplace
    operation" in the next backward)."""
    offsets, _ = _offsets(meta)
    storage, base = buf.untyped_storage(), buf.storage_offset()  # uint8: bytes
    out = []
    for m, off in zip(meta, offsets):
        if m is None:
            out.append(None)
            continue
        dtype, shape = _DTYPES[m[0]], torch.Size(m[1])
        start = base + off
        if start % dtype.itemsize:  # (offsets are 16-byte aligned; a buffer slice might not be)
            n = shape.numel() * dtype.itemsize
            out.append(buf[off:off + n].view(torch.uint8).clone().view(dtype).view(shape))
            continue
        out.append(torch.empty(0, dtype=dtype, device=buf.device).set_(storage, start // dtype.itemsize, shape))
    return out


class _Runtime(nn.Module):
    _KIND = ""  # "dualpipe" or "dualpipev"

    def __init__(self, modules: tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None, rank_mapping: list[int] | None = None,
                 *, timeout_s: float | None = None):
        """timeout_s: the longest this rank waits for a peer at one exchange (or for all ranks at
        the start of a step) before raising TimeoutError naming the peer and the action; default
        None: the process group's own timeout (init_process_group's; gloo's default is 30 minutes),
        whose expiry raises naming them too. A bounded wait on CUDA holds the host at each exchange."""
        super().__init__()
        modules = _check_modules(modules)
        if not isinstance(batch_dim, int) or isinstance(batch_dim, bool):
            raise TypeError(f"batch_dim: expected an int, got {type(batch_dim).__name__}")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s > 0):
            raise ValueError(f"timeout_s: expected a number of seconds > 0 (or None), got {timeout_s!r}")
        self.timeout_s = timeout_s
        self._failed: str | None = None  # why an earlier step failed mid-way (its P2P state is undefined)
        self.module = nn.ModuleList(modules)
        self.overlapped_forward_backward = (type(modules[0]) is type(modules[1])  # as DualPipe decides it
                                            and hasattr(type(modules[0]), "overlapped_forward_backward"))
        self.batch_dim = batch_dim
        check_member_group("process_group", process_group)
        self.group = process_group or dist.distributed_c10d._get_default_group()
        self.num_ranks = self.group.size()
        self.rank_mapping = list(rank_mapping) if rank_mapping is not None else list(range(self.num_ranks))
        if (not all(isinstance(r, int) and not isinstance(r, bool) for r in self.rank_mapping)
                or sorted(self.rank_mapping) != list(range(self.num_ranks))):
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
        """Where this rank's messages live: its modules' parameters' (or buffers') device; for
        modules with neither, the group's: the current CUDA device under NCCL, else the CPU."""
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        if dist.get_backend(self.group) == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
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
        """This rank's program in run order: ("x", sends, recvs, boundary, next action or None)
        exchanges (sends and recvs as sorted [(peer pipeline rank, key)]) and ("a", action)."""
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
        upcoming = None  # the action an exchange comes before: named if the exchange times out
        for i in reversed(range(len(program))):
            if program[i][0] == "a":
                upcoming = program[i][1]
            else:
                program[i][1].sort(), program[i][2].sort()
                program[i] = (*program[i], upcoming)
        return program

    def _send(self, kind: int, stage: int, mb: int, tensors, dst_stage: int):
        """Hands tensors (None allowed) of (stage, mb) to the rank of dst_stage: in memory on the
        same rank, else at the next exchange."""
        dst = self._stage_rank(dst_stage)
        if dst == self.rank:
            self._local[(kind, stage, mb)] = [None if t is None else t.detach() for t in tensors]
            return
        # Checked here, before the header code reads dtypes and shapes: what the module returned
        # and what a message can carry, rather than an error from deep inside the packing.
        what = (f"modules[{self.local_stages[stage]}] (stage {stage}) output" if kind == 0
                else f"input gradients of stage {stage}")
        if len(tensors) > _MAX_TENSORS:
            raise ValueError(f"{what}: expected at most {_MAX_TENSORS} tensors to send to pipeline rank {dst}, "
                             f"got {len(tensors)}")
        for j, t in enumerate(tensors):
            if t is not None and (t.dtype not in _DTYPES or t.dim() > _MAX_DIMS):
                names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
                raise ValueError(f"{what}: expected tensors of at most {_MAX_DIMS} dims with a dtype among "
                                 f"{names} to send to pipeline rank {dst}, got a {t.dim()}-d {t.dtype} "
                                 f"tensor at position {j}")
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
            header[base] = _DTYPES.index(t.dtype)  # sendable: checked by _send
            header[base + 1] = t.dim()
            header[base + 2: base + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            payload.append(t.detach().contiguous())
        return phases + [[header.to(device)], payload]

    def _wait(self, works, peers: str, where, poll: bool = False) -> None:
        """Waits for async P2P (or, with poll, collective) works, at most timeout_s in all (None:
        the process group's own timeout): a failed or hung peer raises TimeoutError naming `peers`
        and `where` (words, or a function returning them, called only for the error). On expiry
        the connection to the peer is unusable (gloo closes it), as is this runtime (it says so on
        the next step)."""
        limit = float("inf") if self.timeout_s is None else self.timeout_s
        deadline = time.monotonic() + limit

        def late():
            return (f"pipeline rank {self.rank}: waited longer than timeout_s={limit:g} s for {peers} "
                    f"{where() if callable(where) else where} (the peer failed, hung, or called step with "
                    "other arguments)")
        try:
            for w in works:
                if limit == float("inf"):  # the backend's own timeout
                    w.wait()
                elif poll:  # a collective: polled, as dskernels.ep.Buffer does (gloo's wait(timeout) is unreliable)
                    while not w.is_completed():
                        if time.monotonic() > deadline:
                            raise TimeoutError(late())
                        time.sleep(_POLL_S)
                    w.wait()
                else:  # gloo's send/recv works report completion only through wait, so no polling here
                    w.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
        except TimeoutError as e:
            self._failed = str(e)
            raise
        except RuntimeError as e:  # dist.DistBackendError included; gloo's expired wait(timeout) too
            text = str(e)
            timed_out = any(word in text.lower() for word in ("timeout", "timed out"))
            if timed_out and time.monotonic() >= deadline - 1e-2:
                message = late()
            else:
                message = (f"pipeline rank {self.rank}: communication with {peers} "
                           f"{where() if callable(where) else where} failed "
                           f"({'the group timeout expired' if timed_out else 'most often the peer is gone'}); "
                           f"backend said: {text.splitlines()[0] if text else type(e).__name__}")
            self._failed = message
            raise (TimeoutError if timed_out else RuntimeError)(message) from e

    def _exchange(self, sends, recvs, upcoming=None):
        """Posts one boundary's messages, phase by phase (see the plan above), and waits for
        them; received tensors go to self._arrived. upcoming: the action after it, for errors."""
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
                peers = sorted({d for d, p in out if phase < len(p)} | {src for _, (src, _, _) in incoming})

                def where(keys=[k for k, _ in incoming]):  # words for an error only: built then
                    waiting = ", ".join(_describe(k) for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
                    return (f"at the exchange before {repr(upcoming) if upcoming else 'the end of step'}"
                            + (f", receiving {waiting}" if keys else ""))
                self._wait(dist.batch_isend_irecv(ops), f"pipeline rank(s) {peers}", where)
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
        return tuple(t.requires_grad_() if t is not None and t.is_floating_point() else t for t in received)

    def _labels_of(self, stage, mb):
        return tuple(self._label_chunks[stage][mb]) if stage in self._label_chunks else ()

    @staticmethod
    def _outputs_of(stage, outputs, source) -> tuple:
        """A stage's forward outputs as a tuple, checked (DualPipe's convention: a tensor or a
        sequence of tensors; None allowed, sent as absent). source: who returned them."""
        if isinstance(outputs, torch.Tensor):
            return (outputs,)
        if isinstance(outputs, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in outputs):
            return tuple(outputs)
        got = type(outputs).__name__
        if isinstance(outputs, (tuple, list)):
            others = sorted({type(o).__name__ for o in outputs if not (o is None or isinstance(o, torch.Tensor))})
            got = f"a {got} holding {', '.join(others)}"
        raise TypeError(f"{source}: expected a tensor or a tuple/list of tensors (None allowed) as the output "
                        f"of stage {stage}, got {got}")

    def _post_forward(self, stage, mb, inputs, outputs, loss):
        _, nxt = self._neighbours
        self._inputs[(stage, mb)] = inputs
        if stage in nxt:
            self._outputs[(stage, mb)] = outputs
            self._send(0, stage, mb, outputs, nxt[stage])
        else:
            if self.criterion is not None:
                self._losses[(stage, mb)] = loss
                self._loss_values[(stage, mb)] = loss.detach()
            if self.return_outputs:
                self._final_outputs[(stage, mb)] = tuple(None if o is None else o.detach() for o in outputs)

    def _forward(self, stage, mb):
        inputs = self._forward_inputs(stage, mb)
        index = self.local_stages[stage]
        outputs = self._outputs_of(stage, self.module[index](*inputs), f"modules[{index}]")
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
        # tuples, as DualPipe hands them to overlapped_forward_backward (its run_backward, through
        # autograd's engine, takes tuples only)
        return None, tuple(o for o, _ in pairs), tuple(g for _, g in pairs)

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
        else:
            run_backward(outputs, output_grads)

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
        hook = type(self.module[0]).overlapped_forward_backward
        outputs0, loss0 = hook(
            self.module[self.local_stages[fstage]], inputs0,
            self.criterion if is_tail0 else None, tuple(self._labels_of(fstage, fmb)) if is_tail0 else [],
            self.module[self.local_stages[bstage]], loss1, outputs1, grads1)
        outputs0 = self._outputs_of(fstage, outputs0, f"{hook.__qualname__} (outputs0)")
        self._post_forward(fstage, fmb, inputs0, outputs0, loss0)
        self._post_backward(bstage, bmb)

    # -- step --
    def _split_inputs(self, inputs, labels, num_chunks) -> tuple[dict, dict]:
        """{head stage: chunks} and {tail stage: label chunks} for this rank (subclasses)."""
        raise NotImplementedError

    def _label_pairs(self) -> list[tuple[int, int]]:
        """(pipeline rank given the inputs, pipeline rank given their labels) per pipeline."""
        raise NotImplementedError

    def step(self, *inputs, num_chunks: int = 0, criterion=None, labels: list | tuple = [],
             return_outputs: bool = False) -> tuple[torch.Tensor | None, Any]:
        """Runs one pipelined forward (and backward, when grad mode is on) over num_chunks chunks.

        inputs / labels: given on the ranks that hold a pipeline's first / last stage (others
        pass nothing); split into chunks along batch_dim. criterion(*outputs, *labels) -> the loss
        of one chunk; each chunk's loss is back-propagated separately (gradients accumulate in
        .grad, as in DualPipe). Returns (loss, outputs): on a rank with a last stage the chunks'
        losses stacked [chunks] (detached) and, with return_outputs, that stage's outputs
        concatenated along batch_dim; (None, None) elsewhere.

        Every rank must call it with the same num_chunks and grad mode: checked before any P2P
        (a rank whose arguments are rejected makes every rank raise). A peer that does not answer
        within timeout_s raises TimeoutError; after a step failed mid-way this runtime refuses to
        run another (messages of the failed step may still be in flight)."""
        if self._failed is not None:
            raise RuntimeError(f"pipeline: an earlier step failed mid-way on this rank ({self._failed}); its "
                               "messages may still be in flight, so this runtime cannot run another step: "
                               "create a new process group and runtime")
        forward_only = not torch.is_grad_enabled()
        # An argument error is raised after the ranks compared their arguments, so that every rank
        # raises at once instead of the others waiting for this one.
        error, fingerprint = None, -1
        try:
            program, fingerprint = self._prepare_step(inputs, num_chunks, criterion, labels, return_outputs,
                                                      forward_only)
        except (TypeError, ValueError) as e:
            error = e
        try:
            self._agree(num_chunks if error is None else -1, forward_only, fingerprint, failed=error is not None)
        except Exception:
            if error is None:
                raise
        if error is not None:
            raise error
        # Layouts are cached per chunk count; reset only once every rank agreed on it, so that
        # the ranks' caches stay in step.
        if getattr(self, "_meta_chunks", None) != num_chunks:
            self._sent_meta, self._recv_meta, self._meta_chunks = {}, {}, num_chunks
        if not forward_only:
            self._before_backward()
        try:
            # The runtime's own store takes every class-level WeightGradStore call during the step,
            # deferral on only in I actions (as DualPipe's step sets WeightGradStore.enabled): a
            # process-wide `WeightGradStore.enabled = True` would otherwise take B actions' weight
            # gradients, which no W of this step runs.
            with self.weight_grad_store.activate(enabled=False):
                self._run(program)
        except BaseException as e:
            if self._failed is None:
                self._failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            self._outbox, self._arrived = {}, {}
        self._check_weight_grads_done()  # after the P2P: the other ranks' steps are not affected
        tails_here = sorted(s for s in self._tails if s in self.local_stages)
        loss, outputs = None, None
        if tails_here:
            stage = tails_here[0]
            if criterion is not None:
                loss = torch.stack([self._loss_values[(stage, m)]
                                    for m in range(self._chunks_per_pipeline(num_chunks))])
            if self.return_outputs:  # (as _prepare_step checked it)
                parts = [self._final_outputs[(stage, m)] for m in range(self._chunks_per_pipeline(num_chunks))]
                cat = [self._concat_outputs([p[i] for p in parts], i) for i in range(len(parts[0]))]
                outputs = cat[0] if len(cat) == 1 else tuple(cat)
        self._inputs = self._outputs = self._losses = self._final_outputs = self._local = {}
        self._loss_values = {}
        self._input_chunks = self._label_chunks = {}
        return loss, outputs

    def _concat_outputs(self, chunks: list, index: int):
        """return_outputs: output `index` of the last stage, its chunks joined along batch_dim."""
        if all(c is None for c in chunks):
            return None
        for c in chunks:
            if c is None or c.dim() <= self.batch_dim:
                got = "None" if c is None else f"a {c.dim()}-d tensor"
                raise ValueError(f"return_outputs: step() joins each chunk's outputs of the last stage along "
                                 f"batch_dim={self.batch_dim}, but its output {index} is {got} in some chunk "
                                 "(a per-chunk scalar such as a loss goes through criterion instead)")
        return torch.cat(chunks, dim=self.batch_dim)

    def _prepare_step(self, inputs, num_chunks, criterion, labels, return_outputs, forward_only):
        """Checks step's arguments and sets up its state: (this rank's program, the schedule's
        fingerprint). Raises TypeError / ValueError naming the argument."""
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool):
            raise TypeError(f"num_chunks: expected an int, got {type(num_chunks).__name__}")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion: expected a callable (outputs, labels) -> loss, got {type(criterion).__name__}")
        try:
            order = self._order(num_chunks)
        except ValueError as e:  # the schedule's constraint on N, said of num_chunks
            raise ValueError(f"num_chunks: {e}") from None
        chains = self._chains()
        self._neighbours = _schedule._neighbours(chains)
        self._tails = {c[-1] for c in chains}
        if criterion is None and not forward_only and self._tails & set(self.local_stages):
            raise ValueError("criterion: required on a rank holding a last stage in a training step "
                             "(grad mode on); run under torch.no_grad() for forward only")
        self.criterion = criterion
        self.return_outputs = as_flag("return_outputs", return_outputs)
        self._input_chunks, self._label_chunks = self._split_inputs(inputs, labels, num_chunks)
        # (rows of this rank's inputs, of its labels): compared across ranks in _agree.
        self._rows_here = (_batch_rows(inputs, self.batch_dim, "inputs", same=False) if self._input_chunks else -1,
                           _batch_rows(labels, self.batch_dim, "labels", same=True) if self._label_chunks else -1)
        self._inputs, self._outputs, self._losses, self._final_outputs = {}, {}, {}, {}
        self._loss_values = {}
        self._local, self._outbox, self._arrived = {}, {}, {}
        self.weight_grad_store.clear()
        plans = self.__dict__.setdefault("_plans", {})
        if (num_chunks, forward_only) not in plans:
            if forward_only:
                order = [[f"{s}F{m}" for a in acts for s, k, m in _schedule.parse_action(a) if k == "F"]
                         for acts in order]
            # Of every rank's actions: ranks whose fingerprints differ would run different plans.
            fingerprint = zlib.crc32("\n".join(" ".join(acts) for acts in order).encode())
            plans[(num_chunks, forward_only)] = (self._plan(order), fingerprint)
        return plans[(num_chunks, forward_only)]

    def _agree(self, num_chunks, forward_only, fingerprint, failed):
        """Compares the ranks' step arguments before any P2P, in one small all_gather per step:
        ranks that run different plans would misparse each other's messages or wait forever.
        failed: this rank rejected its arguments (it raises its own error after this)."""
        in_rows, label_rows = (-1, -1) if failed else self._rows_here
        values = [int(failed), _KIND_IDS[self._KIND], num_chunks, int(forward_only), fingerprint, in_rows, label_rows,
                  self.rank, zlib.crc32(str(self.rank_mapping).encode())]
        if self.num_ranks == 1:  # (no tensor: nothing to gather, and no host read of one)
            rows = [values]
        else:
            mine = torch.tensor(values, dtype=torch.int64, device=self._device())
            rows = [torch.empty_like(mine) for _ in range(self.num_ranks)]
            counts = use_counts([mine, *rows])
            work = dist.all_gather(rows, mine, group=self.group, async_op=True)
            self._wait([work], "the other ranks", "at the start of step (comparing the ranks' step arguments)",
                       poll=True)
            del work  # it holds the tensors too
            wait_released([mine, *rows], counts)  # else a rank returning right after may abort (see there)
        if failed:
            return
        rows = [row if isinstance(row, list) else row.tolist() for row in rows]
        # rank_mapping, compared whole (two ranks that both took pipeline rank 0 waited out the
        # timeout for a rank 1 that no process ran); the ranks' own pipeline ranks name the culprits
        if len({row[8] for row in rows}) > 1:
            differ = [i for i, row in enumerate(rows) if row[7] != self.rank_mapping[i]]
            raise ValueError(f"rank_mapping: expected the same on every rank, got {self.rank_mapping} on group rank "
                             f"{self.group_rank}, "
                             + (f"while group rank{'s' if len(differ) > 1 else ''} "
                                + ", ".join(f"{i} runs as pipeline rank {rows[i][7]}" for i in differ) if differ else
                                "and another on group ranks "
                                + str([i for i, row in enumerate(rows) if row[8] != rows[self.group_rank][8]])))
        by_rank = {self.rank_mapping[i]: row for i, row in enumerate(rows)}  # pipeline rank -> row

        def who(column, words):
            ranks: dict = {}
            for r in sorted(by_rank):
                ranks.setdefault(by_rank[r][column], []).append(r)
            return ", ".join(f"{words(v)} on pipeline ranks {rs}" for v, rs in ranks.items()) if len(ranks) > 1 else ""

        rejected = [r for r in sorted(by_rank) if by_rank[r][0]]
        if rejected:
            raise RuntimeError(f"pipeline: pipeline ranks {rejected} rejected their step arguments (the error "
                               "there says why); no rank ran this step")
        names = {v: k for k, v in _KIND_IDS.items()}
        if differ := who(1, lambda v: {"dualpipe": "DualPipe", "dualpipev": "DualPipeV"}[names[v]]):
            raise RuntimeError(f"modules: expected the same runtime on every rank, got {differ}")
        if differ := who(2, str):
            raise ValueError(f"num_chunks: expected the same value on every rank, got {differ}")
        if differ := who(3, lambda v: "forward only (torch.no_grad())" if v else "training"):
            raise RuntimeError(f"grad mode: expected the same on every rank, got {differ}")
        if differ := who(4, lambda v: f"fingerprint {v:#x}"):
            raise RuntimeError(f"pipeline: the ranks' schedules differ for the same arguments, {differ} "
                               "(different dskernels versions?)")
        # Chunk i of the labels goes with chunk i of the inputs: as many rows in both.
        for src, dst in self._label_pairs():
            inputs_rows, labels_rows = by_rank[src][5], by_rank[dst][6]
            if inputs_rows >= 0 and labels_rows >= 0 and inputs_rows != labels_rows:
                where = "" if src == dst else f" (their inputs enter on pipeline rank {src})"
                raise ValueError(f"labels: expected as many rows along batch_dim as the inputs they go with, "
                                 f"got {labels_rows} on pipeline rank {dst} for {inputs_rows} input rows{where}")

    def _run(self, program):
        for event in program:
            if event[0] == "x":
                self._exchange(event[1], event[2], event[4])
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

    def _before_backward(self):
        """Called before a training step adds to .grad (DualPipe: see sync_mirrored_grads)."""

    def _check_weight_grads_done(self):
        store = self.weight_grad_store
        if not store.empty():
            # Work put outside an I action (a WeightGradStore.put while WeightGradStore.enabled was
            # False) and never flushed, or an I whose W did not run: those gradients would be lost.
            raise RuntimeError(f"pipeline: {len(store.cache)} weight-gradient closures put outside an I action "
                               f"and {store.funcs_queue.qsize()} deferred groups never run by a W action are "
                               "left in this runtime's WeightGradStore after the step (a WeightGradStore.put "
                               "without checking WeightGradStore.enabled?); the weight gradients are incomplete")

    def _chunks_per_pipeline(self, num_chunks):
        return num_chunks


class DualPipeV(_Runtime):
    """DualPipeV: the model cut into 2P stages laid out as a V over P ranks; rank r holds stages
    r (modules[0]) and 2P-1-r (modules[1]). Inputs and labels are given on rank 0, which also
    returns the loss and outputs. Requires num_chunks >= 2P."""

    _KIND = "dualpipev"

    def _chains(self):
        return [list(range(2 * self.num_ranks))]

    def _label_pairs(self):
        return [(0, 0)]

    def _split_inputs(self, inputs, labels, num_chunks):
        heads, tails = {}, {}
        if self.rank == 0:
            if not inputs:  # else the first module fails on a call without arguments
                raise ValueError("inputs: expected the input tensors on pipeline rank 0 (where the V starts), "
                                 "got none")
            heads[0] = _scatter(inputs, num_chunks, self.batch_dim)
            tails[2 * self.num_ranks - 1] = _scatter(labels, num_chunks, self.batch_dim, "labels")
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

    def __init__(self, modules: tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None, rank_mapping: list[int] | None = None,
                 *, timeout_s: float | None = None):
        super().__init__(modules, batch_dim, process_group, rank_mapping, timeout_s=timeout_s)
        if self.num_ranks < 2 or self.num_ranks % 2:
            raise ValueError(f"process_group: DualPipe needs an even number of ranks >= 2 (two pipelines in "
                             f"opposite directions), got {self.num_ranks}; DualPipeV takes any number")

    def _label_pairs(self):
        P = self.num_ranks
        return [(0, P - 1), (P - 1, 0)]

    def _chains(self):
        P = self.num_ranks
        return [list(range(P)), list(range(P, 2 * P))]

    def _chunks_per_pipeline(self, num_chunks):
        return num_chunks // 2

    def _split_inputs(self, inputs, labels, num_chunks):
        P, half = self.num_ranks, num_chunks // 2
        heads, tails = {}, {}
        if self.rank in (0, P - 1) and not inputs:  # else the first module fails on a call without arguments
            direction = "forward direction" if self.rank == 0 else "reverse direction"
            raise ValueError(f"inputs: expected the input tensors of the {direction} on pipeline rank "
                             f"{self.rank} (DualPipe takes inputs on ranks 0 and P-1), got none")
        if self.rank == 0:
            heads[0] = _scatter(inputs, half, self.batch_dim)
            tails[2 * P - 1] = _scatter(labels, half, self.batch_dim, "labels")
        if self.rank == P - 1:
            heads[P] = _scatter(inputs, half, self.batch_dim)
            tails[P - 1] = _scatter(labels, half, self.batch_dim, "labels")
        return heads, tails

    def _before_backward(self):
        self._drop_synced_share()

    def _drop_synced_share(self):
        """After a sync both copies of a layer hold the sum S. A later step or sync that found S
        still in both would add it twice (2S + ...: gradient accumulation over steps, synced after
        each). So where modules[1]'s .grad is still the synced tensor, unchanged, it is dropped
        (None: zeros to the sync); the peer's modules[0] keeps S, and the next sum counts it once.
        A .grad changed in place since (zero_grad(set_to_none=False), clipping) is kept."""
        for p, (grad, version) in getattr(self, "_synced", {}).items():
            if p.grad is not None and p.grad is grad() and p.grad._version == version:
                p.grad = None
        self._synced = {}

    @staticmethod
    def grad_sync_pairs(num_ranks: int) -> list[tuple[int, int]]:
        """(rank, rank) pairs whose modules[0] / modules[1] hold the same layer."""
        return [(r, num_ranks - 1 - r) for r in range(num_ranks // 2)]

    def sync_mirrored_grads(self) -> None:
        """Both copies of each layer (rank r's modules[0], rank P-1-r's modules[1]) end with the sum
        of their gradients. A gradient that is None on one copy counts as zeros; one that is None on
        both stays None. Parameters that do not require grad are left out. Both ranks of a pair
        must call it. It may follow every step of a gradient accumulation or only the last: what
        was summed before counts once (the next training step or sync drops modules[1]'s copy of
        it while unchanged; the peer's modules[0] keeps it)."""
        if self._failed is not None:
            raise RuntimeError(f"sync_mirrored_grads: an earlier step failed mid-way on this rank ({self._failed}); "
                               "its messages may still be in flight: create a new process group and runtime")
        self._drop_synced_share()  # (a second sync with no step between: S once, not twice)
        peer_rank = self.num_ranks - 1 - self.rank
        peer = self._peer(peer_rank)
        # Trainable parameters only: frozen ones (an inference layer's FP8 weights) have no gradient,
        # and their zeros would be sent for nothing (and FP8 cannot be concatenated with float)
        mine = [[p for p in self.module[i].parameters() if p.requires_grad] for i in (0, 1)]
        device = self._device()

        def exchange(sends):
            """sends: [item of modules[0], item of modules[1], ...] -> the peer's, in the same order
            (its modules[0] item is shaped like this rank's modules[1] one, and so on)."""
            recvs = [torch.empty_like(sends[i ^ 1]) for i in range(len(sends))]
            ops = [dist.P2POp(dist.isend, t, peer, self.group) for t in sends]
            ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t in recvs]
            self._wait(dist.batch_isend_irecv(ops), f"pipeline rank {peer_rank}", "in sync_mirrored_grads")
            return recvs

        sizes = [torch.tensor([len(ps), sum(p.numel() for p in ps)], device=device) for ps in mine]
        # and a checksum of every parameter's shape and dtype: equal counts do not make equal
        # layouts (the sums below would add into the wrong elements, or exchange other byte counts)
        layouts = [torch.tensor([zlib.crc32(repr([(tuple(p.shape), str(p.dtype)) for p in ps]).encode())],
                                dtype=torch.int64, device=device) for ps in mine]
        peer0, peer1, peer_layout0, peer_layout1 = exchange(sizes + layouts)
        if not (torch.equal(sizes[1], peer0) and torch.equal(sizes[0], peer1)):
            raise RuntimeError(f"sync_mirrored_grads: the copies of a layer differ between ranks {self.group_rank} "
                               f"and its peer: (parameters, elements) {sizes[0].tolist()} / {sizes[1].tolist()} "
                               f"here, {peer1.tolist()} / {peer0.tolist()} there")
        if not (torch.equal(layouts[1], peer_layout0) and torch.equal(layouts[0], peer_layout1)):
            raise RuntimeError(f"sync_mirrored_grads: the copies of a layer differ between ranks {self.group_rank} "
                               "and its peer: the same parameter and element counts, but other parameter shapes "
                               "or dtypes")
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
        # weakly: a .grad the optimizer's zero_grad drops must be freed
        self._synced = {p: (weakref.ref(p.grad), p.grad._version) for p in mine[1] if p.grad is not None}
