"""`Buffer`: DeepEP's dispatch/combine API (API.md section 3) on torch.distributed collectives.

How a dispatch moves data (docs/ep.md has the byte counts):
  1. layout: `ep_get_dispatch_layout` (unless given) -> is_token_in_rank [T, R];
  2. count exchange: one small all_to_all of [R, 1 + signature + num_local_experts] int64 (tokens
     for rank r, this rank's dispatch signature, then tokens per expert of r), the only host
     synchronization (split sizes are host ints); ranks whose signatures differ (hidden size,
     dtype, top-k width, num_experts, ...: what sizes and reads the rows) all raise here;
  3. pack: the rows (x | x scales | topk_idx | topk_weights) of every (token, destination rank)
     pair, destination-major and in token order, are gathered by one kernel launch (pack_rows)
     into one buffer [S, row_bytes] (each payload 16-byte aligned within a row);
  4. one all_to_all_single of that buffer: each token crosses once per destination rank;
  5. unpack: the receive buffer is split back into contiguous tensors; topk ids become local.
Combine sends the rows back in the same order (reverse split sizes) and one gather-reduce kernel
sums, for every token, the rows the ranks returned (fp32, rank order) in token order.

With `num_worst_tokens` (DeepEP's CUDA-graph mode) the splits are fixed instead: every rank sends
every rank a block of T rows (T equal on all ranks), the counts stay on the device and place the
received rows; no host synchronization, at the price of R * T rows per rank on the wire.

The low-latency calls use fixed-size slots instead (a block of num_max_dispatch_tokens_per_rank
rows per rank pair, equal splits, device-side index math): no host synchronization, so they can
be captured in a CUDA graph (docs/ep.md, "Low latency").
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import time
import warnings
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dskernels._checks import as_flag, check_int, check_no_overlap, check_tensor
from dskernels._collectives import check_member_group, use_counts, wait_released
from dskernels._inference import _grad_lost_warning
from dskernels.ep.events import EventOverlap, StreamScope, capture
from dskernels.ops.ep import (copy_rows, ep_get_dispatch_layout, gather_reduce, low_latency_send, low_latency_slots,
                              pack_rows)

_ALIGN = 16  # bytes: each payload starts 16-byte aligned within a packed row (vector loads)
_FP8 = torch.float8_e4m3fn
_DEFAULT_CPU_TIMEOUT_S = 300.0  # gloo waits without timeout_s
_POLL_S = 2e-4


def _dtype_code(dtype: torch.dtype) -> int:
    """The same int for a dtype in every process (the count exchange carries it)."""
    return zlib.crc32(str(dtype).encode())


_DTYPE_NAMES = {_dtype_code(d): str(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}

# The dispatch signature every rank sends in the count exchange: whatever sizes the exchanged rows or
# says how to read them. Ranks that disagree on any of it would abort gloo (rows of other sizes) or
# read each other's bytes as another type, so they raise first. Each field: (argument, what must
# agree, how to show a value); the values travel as int64 columns in this order (see Buffer.dispatch).
_SIGNATURE = (
    ("num_worst_tokens", "0 on every rank or a positive count on every rank (the two modes exchange differently)",
     str),
    ("num_experts", "the same number of experts on every rank", str),
    ("x", "the same hidden size on every rank", str),
    ("x", "the same form on every rank", lambda v: "an (fp8, scales) tuple" if v else "a tensor"),
    ("x", "the same dtype on every rank", lambda v: _DTYPE_NAMES.get(v, f"dtype code {v}")),
    ("topk_idx", "the same number of columns (top-k) on every rank", lambda v: str(v) if v else "None"),
    ("topk_weights", "weights on every rank or on none", lambda v: "a tensor" if v else "None"),
    # T: checked only with num_worst_tokens (each rank pair exchanges a block of T rows)
    ("x", "with num_worst_tokens every rank must dispatch the same number of tokens", str),
)
_SIG_WIDTH = len(_SIGNATURE)


_SIGNATURE_LABELS = ("num_worst_tokens", "num_experts", "hidden size", "x", "dtype", "top-k", "topk_weights", "tokens")


def _signature_words(values: list[int]) -> str:
    """A dispatch signature in words, for messages."""
    return ", ".join(f"{label} {show(v)}" for label, (_, _, show), v in zip(_SIGNATURE_LABELS, _SIGNATURE, values))
_SIG_TOKENS = _SIG_WIDTH - 1  # the field checked only in fixed-block mode


@dataclass
class DispatchHandle:
    """The routing of one dispatch, reused by combine and by cached dispatch. Opaque to users."""
    num_tokens: int                 # T on this rank
    send_src_idx: torch.Tensor      # [S] int64: token of each sent row (destination-major, token order)
    send_splits: list[int]          # rows sent to each rank
    recv_splits: list[int]          # rows received from each rank
    combine_index: torch.Tensor     # [T, R] int64: row of the combine receive buffer, -1 if not sent
    is_token_in_rank: torch.Tensor  # [T, R] bool
    num_recv_tokens: int            # N (num_worst_tokens in fixed-block mode, where N stays on the device)
    num_out_rows: int               # rows of recv_x: N, or num_worst_tokens in fixed-block mode
    # Fixed-block mode (num_worst_tokens > 0): every rank pair exchanges `block` = T rows (equal
    # splits, no host read of the counts); recv_index [R * block] is the recv_x row of each received
    # block row, -1 for the rows past what the source sent.
    block: int = 0
    recv_index: torch.Tensor | None = None
    # What the dispatch's count exchange found equal on every rank, so that combine can check its
    # input locally (a combine input of another size or type on one rank would break the exchange).
    hidden: int = 0                 # H of x
    num_topk: int = 0               # K of topk_idx, 0 without
    # Fixed-block mode: (this rank received more than num_worst_tokens, the message), checked once
    # the payload has moved (Buffer._check_overflow).
    overflow: tuple | None = None


@dataclass
class LowLatencyHandle:
    """The routing of one low-latency dispatch (device tensors of fixed shape only). Opaque."""
    num_tokens: int                 # T on this rank
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    hidden: int
    num_topk: int
    return_slot: torch.Tensor       # [R * M, K] int64: [L * cap] row of each received (source, token, k), -1: none
    combine_index: torch.Tensor     # [T, R] int64: row of t's partial sum from rank r in combine's receive
                                    # buffer [R * M] (r * M + t), -1 where t has no expert on r


@dataclass(frozen=True)
class Config:
    """DeepEP's `deep_ep.Config`: the SM count and chunk sizes of its NVLink/RDMA kernels. Taken
    wherever DeepEP takes one (`dispatch(config=)`, `combine(config=)`) and returned by
    `Buffer.get_dispatch_config` / `get_combine_config`; the collectives here need no tuning, so
    its values change nothing."""
    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of DeepEP-style receive rings: one per channel (two SMs) and peer, of
        num_max_nvl_chunked_recv_tokens rows, 128-byte aligned (any size works for our Buffer)."""
        size = (self.num_sms // 2) * min(num_ranks, 8) * self.num_max_nvl_chunked_recv_tokens * hidden_bytes
        return -(-size // 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """As get_nvl_buffer_size_hint for the rings between nodes (eight ranks a node): 0 on one node."""
        if num_ranks <= 8:
            return 0
        size = 2 * (self.num_sms // 2) * (num_ranks // 8) * self.num_max_rdma_chunked_recv_tokens * hidden_bytes
        return -(-size // 128) * 128


def _check_config(config) -> None:
    """None, our Config or DeepEP's own (servers that build theirs with deep_ep.Config): by its
    methods, not its class."""
    if config is not None and not hasattr(config, "get_nvl_buffer_size_hint"):
        raise TypeError(f"config: expected None or a Config (dskernels.ep's or deep_ep's), got "
                        f"{type(config).__name__}")


class EPCommError(RuntimeError):
    """A collective failed: a peer is gone, did not join in time, or refused its arguments."""


# The op code of a check_exchanges row from a rank that refused its own arguments (the others are
# crc32 values, never negative).
_REFUSED = -1


def _env_check_exchanges() -> bool | None:
    """DSKERNELS_EP_CHECK: 1 (or true, yes) checks every exchange, 0 (false, no) none, unset: the
    group's default."""
    value = os.environ.get("DSKERNELS_EP_CHECK", "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"DSKERNELS_EP_CHECK: expected 1/0 (or true/false, yes/no), got {value!r}")
    return None if value == "" else value in ("1", "true", "yes")


def _shares_refusals(what: str):
    """An op whose argument checks may fail on some ranks only: under check_exchanges, a rank that
    raises before its first exchange of the call still joins that exchange's check (a refusal row),
    so its peers raise at once instead of waiting out the timeout, and the group stays usable."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            started = self._exchanges_started
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if self.check_exchanges and self._exchanges_started == started:
                    self._refuse(what, e, (*args, *kwargs.values()))
                raise
        return run
    return wrap


def _check_summable(name: str, t: torch.Tensor) -> None:
    """What combine adds: float rows (an fp8 or integer sum would wrap or lose its scale)."""
    if not t.dtype.is_floating_point or t.element_size() == 1:
        raise TypeError(f"{name}: expected a float dtype (bfloat16, float16, float32 or float64), got {t.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[T, ...] -> contiguous [T, bytes] uint8 view."""
    t = t.contiguous()  # flattened first: [N, 1] or [0, K] count as contiguous with any last stride
    flat = t.reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:  # one element is "contiguous" with any stride (an
        flat = flat.as_strided((1,), (1,))  # expanded scalar, autograd's gradient of a sum): its one element
    return flat.view(torch.uint8).reshape(t.shape[0], math.prod(t.shape[1:]) * t.element_size())


class Buffer:
    """Expert-parallel communication buffer (DeepEP's `deep_ep.Buffer`) for process group `group`.

    `num_nvl_bytes`, `num_rdma_bytes` and `low_latency_mode` are accepted for drop-in
    compatibility; this implementation allocates per call over the group's collectives (gloo for
    CPU tensors, NCCL for CUDA tensors), so any sizes work. `timeout_s` bounds every wait for peers
    (default: 300 s for CPU tensors, the group's NCCL timeout for CUDA tensors); a peer that is
    late raises `TimeoutError`, one that is gone `EPCommError`, naming the operation, instead of
    hanging. `check_exchanges` runs a small all_to_all before every exchange that compares what
    each rank sends with what its peers expect: ranks that disagree on a size no exchange carries
    (combine's hidden size, a cached dispatch's x, low-latency M / H / K), on the rows' dtypes or
    the low-latency num_experts, or run different ops raise ValueError on every rank instead of
    aborting in gloo, returning partly written rows or reading bytes as another type; and a rank
    whose own arguments are refused (on that rank only) tells its peers there, so they raise
    EPCommError at once instead of waiting out the timeout. It costs one more collective and a
    host read per exchange (not CUDA-graph safe). Default: on for gloo groups (CPU tensors, where
    both are cheap), off otherwise; DSKERNELS_EP_CHECK=1 or 0 in the environment (set alike on
    every rank) overrides the default.
    """

    num_sms = 20

    def __init__(self, group: dist.ProcessGroup | None = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode=True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *, timeout_s: float | None = None,
                 check_exchanges: bool | None = None, **deepep_options):
        """DeepEP's arguments in DeepEP's order (those after num_rdma_bytes select its NVSHMEM and
        NVLink machinery and change nothing here), then ours by keyword (the class docstring)."""
        if not dist.is_initialized():
            raise RuntimeError("Buffer: torch.distributed is not initialized (call init_process_group first)")
        if comm is not None and group is None:
            raise ValueError("comm: an mpi4py communicator is not supported here; pass a torch.distributed group")
        if deepep_options:  # (other DeepEP versions' options, or a misspelling: said, not refused)
            warnings.warn(f"Buffer: ignoring keyword arguments it does not know: {sorted(deepep_options)}",
                          RuntimeWarning, stacklevel=2)
        # Checked here: a bad value would otherwise surface only at the first wait for peers.
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
                raise TypeError(f"timeout_s: expected None or a number of seconds, got "
                                f"{type(timeout_s).__name__} {timeout_s!r}")
            if not timeout_s > 0:  # NaN too
                raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
            timeout_s = float(timeout_s)
        check_exchanges = as_flag("check_exchanges", check_exchanges, none_ok=True)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            check_int(name, value, minimum=0)
        check_member_group("group", group)
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        if check_exchanges is None:
            check_exchanges = _env_check_exchanges()
        if check_exchanges is None:  # gloo: the host read is free, and its size check aborts the process
            check_exchanges = dist.get_backend(self.group) == "gloo"
        self.check_exchanges = check_exchanges
        self._exchanges_started = 0  # _all_to_all calls so far: which refusals peers still wait for
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.timeout_s = timeout_s
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # Per-expert columns of the count exchange: num_experts // R of the last normal dispatch.
        # Every rank of a group runs the same dispatches, so they agree on it without asking.
        self._expert_columns = 0
        # Why the Buffer refuses every further exchange: an exchange that timed out or failed leaves
        # a collective pending (a later one would pair with it: gloo aborted the process on a retry),
        # or destroy() was called.
        self._unusable: str | None = None

    # ---- DeepEP compatibility helpers ----
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """DeepEP's SM budget for its kernels: kept (get_dispatch_config reports it); the collectives
        here take no SM count."""
        Buffer.num_sms = check_int("new_num_sms", new_num_sms, minimum=1)

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (DeepEP's `Buffer.capture`), for `previous_event`."""
        return capture()

    @staticmethod
    def is_sm90_compiled() -> bool:
        """DeepEP's test for its FP8 (sm90) kernels, which its tests ask before FP8 dispatches: True,
        the (fp8, scales) payloads travel on every device and backend here."""
        return True

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes DeepEP would reserve: two (send, receive) slabs of bf16 rows per expert slot."""
        per_token = hidden * 2 + 16
        return 2 * 2 * num_max_dispatch_tokens_per_rank * num_experts * per_token

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned kernel config for num_ranks; the defaults here (the collectives need none)."""
        return Config(num_sms=Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """As get_dispatch_config."""
        return Config(num_sms=Buffer.num_sms)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """DeepEP's zero-copy combine input: a bf16 [num_local_experts, num_ranks * M, hidden] tensor
        for the expert outputs, then passed as low_latency_combine's x (zero_copy=True or not: the
        combine reads x where it is either way). A new tensor per call here (DeepEP hands out views
        of its registered buffer)."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle returned by low_latency_dispatch, got {type(handle).__name__}")
        R = self.group_size
        return torch.empty(handle.num_experts // R, R * handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                           dtype=torch.bfloat16, device=handle.return_slot.device)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: low-latency buffers are allocated per call."""

    def destroy(self) -> None:
        """DeepEP's explicit release: drops the communication streams (no buffers are held); the
        Buffer refuses every later call, as DeepEP's does."""
        self._streams.clear()
        self._unusable = "destroy() was called"

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """DeepEP's `get_comm_stream()`: the stream the ops run on with `async_finish` or
        `previous_event` (the current CUDA device's; callers `record_stream` their tensors on it).
        None without a CUDA device (the ops then run on the host's thread)."""
        if not torch.cuda.is_available():
            return None
        return self._comm_stream(torch.device("cuda", torch.cuda.current_device()))

    def _comm_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # ---- collectives with bounded waits ----
    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, what: str,
                    poll: bool = True, agree: tuple = ()) -> None:
        """out <- inp across the group; `agree`: what the ranks must agree on and the sizes do not
        show (dtypes of one width, num_experts), compared only under check_exchanges."""
        self._exchanges_started += 1
        if self.check_exchanges:
            self._check_exchange(out, inp, out_splits, in_splits, what, agree)
        self._exchange(out, inp, out_splits, in_splits, what, poll)

    def _check_rows(self, op_code: int, sent: list[int], expected: list[int], device, what: str) -> list[list[int]]:
        """The check_exchanges all_to_all: every rank's (op code, bytes to each peer, bytes from
        each peer), of equal sizes on every rank (gloo cannot abort on it), read on the host."""
        send = torch.tensor([op_code, *sent, *expected], dtype=torch.int64).repeat(self.group_size, 1).to(device)
        recv = torch.empty_like(send)
        self._exchange(recv, send, None, None, f"{what} (check_exchanges)", poll=True)
        return recv.cpu().tolist()

    def _refuse(self, what: str, error: Exception, arguments: tuple) -> None:
        """This rank's arguments were refused before its first exchange: its peers learn it in that
        exchange's check, on the device of the call's first tensor (where the peers' check runs),
        else the group's. Where that check cannot run either (a peer gone), the error says so."""
        tensors = [a for a in arguments if isinstance(a, torch.Tensor)]
        tensors += [t for a in arguments if isinstance(a, tuple) for t in a if isinstance(t, torch.Tensor)]
        if tensors and tensors[0].device.type in ("cpu", "cuda"):
            device = tensors[0].device
        elif "nccl" in dist.get_backend(self.group):
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        try:
            self._check_rows(_REFUSED, [0] * self.group_size, [0] * self.group_size, device, what)
        except Exception as failed:  # the caller's error is the one to see
            if hasattr(error, "add_note"):  # (Python 3.11+; 3.10 raises the error without the note)
                error.add_note(f"(its peers were not told: {failed})")

    def _check_exchange(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, what: str,
                        agree: tuple) -> None:
        """check_exchanges: every rank learns every rank's (op and `agree`, bytes sent to each peer,
        bytes expected from each peer) through an all_to_all of equal sizes (gloo cannot abort on
        it), and all of them raise the same error if any pair disagrees."""
        R = self.group_size

        def per_peer(t: torch.Tensor, splits) -> list[int]:
            row = math.prod(t.shape[1:]) * t.element_size()
            return [n * row for n in (splits if splits is not None else [t.shape[0] // R] * R)]

        op = f"{what} ({', '.join(map(str, agree))})" if agree else what
        # row s: rank s's op, bytes to each rank, bytes from each rank
        table = self._check_rows(zlib.crc32(op.encode()), per_peer(inp, in_splits), per_peer(out, out_splits),
                                 out.device, what)
        refused = [s for s, row in enumerate(table) if row[0] == _REFUSED]
        if refused:
            raise EPCommError(f"dskernels.ep.Buffer.{what}: rank{'s' if len(refused) > 1 else ''} "
                              f"{', '.join(map(str, refused))} of {R} refused {'their' if len(refused) > 1 else 'its'} "
                              f"arguments to this call (the error there names them); rank {self.rank} stops "
                              "too, before any data moves (check_exchanges: the group stays usable)")
        prefix = f"dskernels.ep.Buffer.{what}: the ranks disagree on this exchange (check_exchanges): "
        for s, row in enumerate(table):
            if row[0] != table[0][0]:
                raise ValueError(prefix + f"rank {s} runs another exchange than rank 0, or the same with other "
                                 "arguments (every rank must call the same ops in the same order, with the same "
                                 f"dtypes and num_experts; rank {self.rank} is in {op})")
        for s, row in enumerate(table):
            for r in range(R):
                sent, expected = row[1 + r], table[r][1 + R + s]
                if sent != expected:
                    raise ValueError(prefix + f"rank {s} sends {sent} bytes to rank {r}, which expects {expected} "
                                     "(a size that no exchange carries differs between the ranks: combine's hidden "
                                     "size or dtype, a cached dispatch's x, low-latency M, H, K or use_fp8; or "
                                     "the ranks' Buffers have other histories, e.g. one re-created on some ranks "
                                     "only: a normal dispatch's count exchange is as wide as the last one's "
                                     "experts per rank)")

    def _exchange(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, what: str,
                  poll: bool = True) -> None:
        # A monitored wait: gloo's own timeout does not reliably fire while a peer is alive but absent
        # (measured: a 3 s group timeout still waited 6 s, until the peer exited). On CUDA tensors
        # the wait is only monitored when timeout_s is given and poll is set (polling blocks the
        # host on the device, so the low-latency path never polls CUDA work).
        if self._unusable is not None:
            raise RuntimeError(f"dskernels.ep.Buffer.{what}: this Buffer cannot be used any more: {self._unusable} "
                               "(after a failed exchange: build a new process group and Buffer on every rank)")
        on_cpu = out.device.type == "cpu"
        timeout = self.timeout_s if self.timeout_s is not None else (_DEFAULT_CPU_TIMEOUT_S if on_cpu else None)
        if not (poll or on_cpu):
            timeout = None
        counts = use_counts((out, inp))
        work = None
        try:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
            if timeout is not None:
                deadline = time.monotonic() + timeout
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        self._unusable = f"its {what} timed out after {timeout:g} s"
                        raise TimeoutError(
                            f"dskernels.ep.Buffer.{what}: rank {self.rank} of {self.group_size} waited longer "
                            f"than {timeout:g} s for its peers in all_to_all (a peer rank is gone, hung, or did "
                            "not call the same op); this Buffer and its group cannot be used any more (gloo: "
                            "destroy_process_group may wait for the group's own timeout, see docs/ep.md)")
                    time.sleep(_POLL_S)
            work.wait()
            work = None  # it holds out and inp too
            wait_released((out, inp), counts)
        except (RuntimeError, dist.DistBackendError) as e:
            text = str(e)
            late = any(w in text.lower() for w in ("timeout", "timed out"))
            message = (f"dskernels.ep.Buffer.{what}: rank {self.rank} of {self.group_size} "
                       + ("waited longer than the group timeout for its peers" if late else "failed")
                       + " in all_to_all (most often a peer rank is gone, crashed, or did not call the same "
                       "op; the backend's words below say if the cause is local); "
                       f"backend said: {text.splitlines()[0] if text else type(e).__name__}")
            if work is not None or late:  # (an error raised before the collective began leaves none pending)
                self._unusable = f"its {what} failed ({'timed out' if late else 'backend error'})"
            raise (TimeoutError(message) if late else EPCommError(message)) from e

    def _exchange_counts(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send [R, c] int64 (row r for rank r) -> [R, c] (row s from rank s), on the host."""
        recv = torch.empty_like(send)
        self._all_to_all(recv, send.contiguous(), None, None, what)
        return recv.cpu()

    # ---- payload packing ----
    @staticmethod
    def _layout(widths: list[int]) -> tuple[torch.dtype, list[int], int]:
        """Word dtype, per-payload word offsets and row words for payloads of `widths` bytes."""
        word = torch.int32 if all(w % 4 == 0 for w in widths) else torch.uint8
        size = 4 if word == torch.int32 else 1
        offsets, at = [], 0
        for w in widths:
            offsets.append(at // size)
            at += -(-w // _ALIGN) * _ALIGN
        return word, offsets, max(at, _ALIGN) // size

    def _send(self, payloads: list[torch.Tensor], src_idx: torch.Tensor | None, num_send: int,
              send_splits: list[int], recv_splits: list[int], what: str, poll: bool = True):
        """Packs rows src_idx of every payload into one buffer, exchanges it, returns the receive
        buffer and the views of each payload in it ([N, bytes] uint8 -> caller reinterprets)."""
        rows = [_rows(p) for p in payloads]
        widths = [r.shape[1] for r in rows]
        word, offsets, row_words = self._layout(widths)
        size = torch.empty((), dtype=word).element_size()
        device = payloads[0].device
        send = torch.empty(num_send, row_words, dtype=word, device=device)
        pack_rows([r.view(word) for r in rows], offsets, src_idx, send, num_send)
        recv = torch.empty(sum(recv_splits), row_words, dtype=word, device=device)
        self._all_to_all(recv, send, recv_splits, send_splits, what, poll=poll,
                         agree=tuple(p.dtype for p in payloads))
        return [recv[:, off: off + w // size] for off, w in zip(offsets, widths)], word

    @staticmethod
    def _as(view: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A [N, words] view of a packed payload -> [N, *like.shape[1:]] of like.dtype (a view)."""
        return view.view(torch.uint8).view(like.dtype).reshape(view.shape[0], *like.shape[1:])

    def _unpack(self, views, likes, num_out_rows: int, fills, recv_index=None) -> list[torch.Tensor]:
        """Receive-buffer views -> [num_out_rows, ...] tensors: rows in order, or (fixed-block mode)
        scattered to recv_index; rows nothing lands in hold `fill`."""
        outs = []
        for view, like, fill in zip(views, likes, fills):
            n = view.shape[0]
            out = torch.empty(num_out_rows, view.shape[1], dtype=view.dtype, device=view.device)
            typed = out.view(torch.uint8).view(like.dtype).reshape(num_out_rows, *like.shape[1:])
            if recv_index is not None:
                typed.fill_(fill)
                copy_rows(view, None, out, recv_index, n)
            else:
                copy_rows(view, None, out, None, n)
                if num_out_rows > n:
                    typed[n:] = fill
            outs.append(typed)
        return outs

    def _route_forward(self, handle: DispatchHandle, payloads: list[torch.Tensor], fills, what: str):
        views, _ = self._send(payloads, handle.send_src_idx, handle.send_src_idx.shape[0], handle.send_splits,
                              handle.recv_splits, what, poll=handle.recv_index is None)
        return self._unpack(views, payloads, handle.num_out_rows, fills, handle.recv_index)

    def _route_backward(self, handle: DispatchHandle, payloads: list[torch.Tensor], what: str,
                        first_dtype: torch.dtype | None = None):
        """Rows received by dispatch -> their sum per source token (rank order), [T, ...] each, in the
        payload's dtype (the first payload's sum in first_dtype where given: combine's fp32 sum, for
        its bias)."""
        payloads = [p[: handle.num_recv_tokens] for p in payloads]
        if handle.recv_index is not None:  # fixed blocks: block row (s, i) returns recv_x row recv_index[s, i]
            # (filler rows send row 0)
            views, _ = self._send(payloads, handle.recv_index.clamp(min=0), handle.recv_index.shape[0],
                                  handle.recv_splits, handle.send_splits, what, poll=False)
        else:
            views, _ = self._send(payloads, None, handle.num_recv_tokens, handle.recv_splits, handle.send_splits,
                                  what)
        outs = []
        for i, (view, like) in enumerate(zip(views, payloads)):
            y = self._as(view, like).reshape(view.shape[0], -1) if view.shape[0] else \
                torch.empty(0, math.prod(like.shape[1:]), dtype=like.dtype, device=like.device)
            dtype = first_dtype if i == 0 and first_dtype is not None else like.dtype
            out = torch.empty(handle.num_tokens, y.shape[1], dtype=dtype, device=like.device)
            gather_reduce(y, handle.combine_index, None, out)
            outs.append(out.reshape(handle.num_tokens, *like.shape[1:]))
        return outs

    # ---- validation ----
    def _check_topk(self, topk_idx, num_tokens: int | None, num_experts: int | None,
                    device: torch.device | None = None) -> None:
        if not isinstance(topk_idx, torch.Tensor):
            raise TypeError(f"topk_idx: expected a torch.Tensor, got {type(topk_idx).__name__}")
        if topk_idx.dtype != torch.int64:
            raise TypeError(f"topk_idx: expected dtype int64, got {topk_idx.dtype}")
        if topk_idx.dim() != 2 or topk_idx.shape[1] == 0:
            raise ValueError(f"topk_idx: expected 2 dimensions [num_tokens, num_topk], num_topk >= 1, got shape "
                             f"{tuple(topk_idx.shape)}")
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"topk_idx: expected {num_tokens} rows (one per row of x), got {topk_idx.shape[0]}")
        if device is not None and topk_idx.device != device:
            raise ValueError(f"topk_idx: expected a tensor on {device} (that of x), got {topk_idx.device}")
        if num_experts is not None:
            self._check_num_experts(num_experts)
            if topk_idx.numel():
                low, high = torch.stack([topk_idx.min(), topk_idx.max()]).tolist()  # one host read
                if low < -1 or high >= num_experts:
                    raise ValueError(f"topk_idx: expected expert ids in [-1, {num_experts}), got values in "
                                     f"[{low}, {high}]")

    def _check_num_experts(self, num_experts) -> None:
        check_int("num_experts", num_experts)
        if num_experts < 1 or num_experts % self.group_size:
            raise ValueError(f"num_experts: expected a positive multiple of the number of ranks "
                             f"({self.group_size}), got {num_experts}")

    @staticmethod
    def _check_weights(topk_weights, topk_idx, device: torch.device | None = None) -> None:
        if topk_weights is None:
            return
        if not isinstance(topk_weights, torch.Tensor):
            raise TypeError(f"topk_weights: expected a torch.Tensor, got {type(topk_weights).__name__}")
        if topk_weights.dtype != torch.float32:
            raise TypeError(f"topk_weights: expected dtype float32, got {topk_weights.dtype}")
        if topk_idx is not None and topk_weights.shape != topk_idx.shape:
            raise ValueError(f"topk_weights: expected shape {tuple(topk_idx.shape)} (that of topk_idx), "
                             f"got {tuple(topk_weights.shape)}")
        if device is not None and topk_weights.device != device:
            raise ValueError(f"topk_weights: expected a tensor on {device} (that of x), got {topk_weights.device}")

    def _check_layout(self, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, num_tokens: int,
                      num_experts, device: torch.device) -> None:
        """get_dispatch_layout's outputs, where given: int32/int64 [R], bool [T, R], int32/int64 [E]
        (E = num_experts where that is given too), on x's device."""
        R = self.group_size
        counts = (torch.int32, torch.int64)
        for name, t, dtypes, shape in (("num_tokens_per_rank", num_tokens_per_rank, counts, (R,)),
                                       ("is_token_in_rank", is_token_in_rank, (torch.bool,), (num_tokens, R)),
                                       ("num_tokens_per_expert", num_tokens_per_expert, counts, None)):
            if t is None:
                continue
            check_tensor(name, t, dtypes=dtypes, device=device)
            if shape is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if num_tokens_per_expert is not None:
            if num_tokens_per_expert.dim() != 1:
                raise ValueError(f"num_tokens_per_expert: expected 1 dimension [num_experts], got shape "
                                 f"{tuple(num_tokens_per_expert.shape)}")
            if num_experts is not None and num_tokens_per_expert.shape[0] != num_experts:
                raise ValueError(f"num_tokens_per_expert: expected {num_experts} counts (num_experts), got "
                                 f"{num_tokens_per_expert.shape[0]}")
            experts = num_tokens_per_expert.shape[0]
            if experts < 1 or experts % R:
                raise ValueError(f"num_tokens_per_expert: expected one count per expert, a positive multiple of "
                                 f"the number of ranks ({R}), got {experts}")

    @staticmethod
    def _check_x(x) -> int:
        """x or (x_fp8, x_scales); returns T."""
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError(f"x: expected a tensor or a tuple (fp8 [T, H], fp32 scales [T, H/128]), got a "
                                 f"tuple of {len(x)}")
            data, scales = x
            if not isinstance(data, torch.Tensor) or data.dtype != _FP8 or data.dim() != 2:
                raise TypeError(f"x[0]: expected a float8_e4m3fn tensor [T, H], got "
                                f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
            if data.shape[1] == 0:
                raise ValueError(f"x[0]: expected a hidden size of at least 1 column, got shape {tuple(data.shape)}")
            want = (data.shape[0], -(-data.shape[1] // 128))
            if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
                raise TypeError(f"x[1]: expected float32 scales {list(want)}, got "
                                f"{getattr(scales, 'dtype', type(scales).__name__)}")
            if tuple(scales.shape) != want:
                raise ValueError(f"x[1]: expected scales of shape {list(want)} (one per 128 columns of x[0]'s "
                                 f"{data.shape[1]}), got {list(scales.shape)}")
            return data.shape[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor or a (fp8, scales) tuple, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"x: expected 2 dimensions [num_tokens, hidden], got shape {tuple(x.shape)}")
        if x.shape[1] == 0:  # a row of 0 bytes cannot be packed
            raise ValueError(f"x: expected a hidden size of at least 1 column, got shape {tuple(x.shape)}")
        return x.shape[0]

    # ---- the API ----
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (num_tokens_per_rank int32 [R], None (one node: no RDMA ranks), num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R], event)."""
        # The ids' range is read on the host only for CPU tensors: on CUDA that read would sync, ahead
        # of previous_event and inside a graph capture. The kernel skips ids out of range; dispatch,
        # which reads counts on the host anyway, checks them.
        num_experts = check_int("num_experts", num_experts)
        on_cuda = isinstance(topk_idx, torch.Tensor) and topk_idx.is_cuda
        self._check_topk(topk_idx, None, None if on_cuda else num_experts)
        if on_cuda:
            self._check_num_experts(num_experts)
        with StreamScope(self, topk_idx.device, previous_event, async_finish, allocate_on_comm_stream,
                         (topk_idx,)) as scope:
            per_rank, per_expert, in_rank = ep_get_dispatch_layout(topk_idx, num_experts, self.group_size)
            event = scope.finish((per_rank, per_expert, in_rank))
        return per_rank, None, per_expert, in_rank, event

    @_shares_refusals("dispatch")
    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config=None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, num_experts: int | None = None):
        """Sends each token once to every rank holding one of its experts.

        Args:
            x: [T, H] tensor (bf16/fp16/fp32; differentiable), or a tuple (fp8 [T, H], fp32 scales
                [T, H/128]) that travels byte for byte.
            handle: from an earlier dispatch: repeat its routing (no layout or topk arguments).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: get_dispatch_layout's
                outputs, or None with num_experts=E given (then computed here).
            topk_idx: int64 [T, K], -1 for no expert. topk_weights: fp32 [T, K] (optional). Both may
                be left out when all three layout arguments are given (DeepEP's dispatch without
                top-k: each token goes to the ranks is_token_in_rank names).
            expert_alignment: each per-expert receive count is rounded up to a multiple of it.
            num_worst_tokens: if > 0, DeepEP's CUDA-graph mode: recv tensors get exactly that many
                rows (rows past the received ones: x 0, topk_idx -1, weights 0), nothing is read on
                the host (capturable), and num_recv_tokens_per_expert_list is [] (as in DeepEP).
                Every rank must dispatch the same number of tokens T (each rank pair exchanges a
                block of T rows: R * T rows per rank on the wire, against the routed count
                otherwise). Checked on the device: a different T on some rank, more tokens arriving
                than num_worst_tokens or an expert id out of range raise RuntimeError for CPU
                tensors and trip a device-side assert on CUDA.

        Returns:
            recv_x [N, H] (or a tuple), source rank 0's tokens first, each source in token order;
            recv_topk_idx int64 [N, K] local expert ids, -1 for experts on other ranks (None
                without topk_idx);
            recv_topk_weights fp32 [N, K], 0 where recv_topk_idx is -1 (None without weights);
            num_recv_tokens_per_expert_list: python list of num_local_experts ints (aligned; [] with
                num_worst_tokens);
            handle; event (EventOverlap).
            Cached dispatch returns (recv_x, None, None, None, handle, event).

        Across ranks: the hidden size, x's dtype and form (tensor or (fp8, scales)), topk_idx's
        width (or its absence), whether topk_weights is given, num_experts and whether
        num_worst_tokens is 0 must be the same on every rank. The count exchange carries them, and
        every rank raises the same ValueError naming the argument and each rank's value before any
        data moves (with num_worst_tokens, checked on the device: RuntimeError for CPU tensors, a
        device-side assert on CUDA). Layout arguments given with topk_idx must be its layout
        (checked likewise). Cached dispatch takes no topk or layout arguments (and num_worst_tokens
        only as its handle's dispatch had it; both checked) and has no exchange: x's hidden size,
        dtype and form (a tuple or not) may differ from the handle's dispatch's (a bf16 gradient
        along an FP8 dispatch's routing) but must agree on every rank (not checked: that would take
        an exchange; rows of another size on one rank abort gloo's exchange, or fail NCCL's).
        """
        num_tokens = self._check_x(x)
        device = (x[0] if isinstance(x, tuple) else x).device
        _check_config(config)
        expert_alignment = check_int("expert_alignment", expert_alignment, minimum=1)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens)
        if num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens: expected 0 (off) or a positive row count, got {num_worst_tokens}")
        if num_experts is not None:
            num_experts = check_int("num_experts", num_experts)
        inputs = (x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
        with StreamScope(self, device, previous_event, async_finish, allocate_on_comm_stream, inputs) as scope:
            if handle is not None:
                if not isinstance(handle, DispatchHandle):
                    raise TypeError(f"handle: expected the handle returned by dispatch, got {type(handle).__name__}")
                if num_tokens != handle.num_tokens:
                    raise ValueError(f"x: expected {handle.num_tokens} rows (those of the handle's dispatch), "
                                     f"got {num_tokens}")
                for name, value in (("topk_idx", topk_idx), ("topk_weights", topk_weights),
                                    ("num_tokens_per_rank", num_tokens_per_rank),
                                    ("is_token_in_rank", is_token_in_rank),
                                    ("num_tokens_per_expert", num_tokens_per_expert)):
                    if value is not None:
                        raise ValueError(f"{name}: expected None with a handle (cached dispatch repeats the "
                                         "handle's routing), got a tensor")
                handle_worst = handle.num_out_rows if handle.recv_index is not None else 0  # (block is T: 0 too)
                if num_worst_tokens not in (0, handle_worst):
                    raise ValueError(f"num_worst_tokens: expected {handle_worst} (the handle's dispatch's) or 0 with "
                                     f"a handle, got {num_worst_tokens}")
                # No count exchange here (as in DeepEP): x's hidden size, dtype and form may differ
                # from the first dispatch's, but must agree on every rank (not checked).
                recv_x = self._dispatch_payload(x, handle, "dispatch (cached)")
                event = scope.finish(recv_x if isinstance(recv_x, tuple) else (recv_x,), handle)
                return recv_x, None, None, None, handle, event

            layout = (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
            if topk_idx is None and any(t is None for t in layout):
                raise ValueError("topk_idx: expected an int64 [T, K] tensor, or all three layout arguments "
                                 "(num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert) to dispatch "
                                 "without top-k, or a handle for cached dispatch; got None")
            if topk_idx is None and topk_weights is not None:
                raise ValueError("topk_weights: expected None without topk_idx (weights go with expert ids)")
            self._check_layout(num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, num_tokens, num_experts,
                               device)
            if num_experts is None and num_tokens_per_expert is not None:
                num_experts = num_tokens_per_expert.shape[0]
            if num_experts is None:
                raise ValueError("num_experts: expected an int (or the layout arguments num_tokens_per_rank, "
                                 "is_token_in_rank, num_tokens_per_expert), got None")
            if topk_idx is None:
                self._check_num_experts(num_experts)
            elif num_worst_tokens:
                # Fixed-block mode reads nothing on the host: the id range is checked on the device.
                self._check_topk(topk_idx, num_tokens, None, device)
                self._check_num_experts(num_experts)
                self._assert_ids_async(topk_idx, num_experts)
            else:
                self._check_topk(topk_idx, num_tokens, num_experts, device)
            self._check_weights(topk_weights, topk_idx, device)
            # With topk_idx, the layout arguments given must be its layout (else tokens reach ranks that
            # hold none of their experts): compared with the layout computed here, when the splits are
            # read on the host (normal mode) or on the device (num_worst_tokens).
            reference = None
            if topk_idx is not None:
                computed = ep_get_dispatch_layout(topk_idx, num_experts, self.group_size)
                if any(t is not None for t in layout):
                    reference = computed
                num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = (
                    t if t is not None else c
                    for t, c in zip((num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank), computed))
            data = x[0] if isinstance(x, tuple) else x
            hidden, num_topk = data.shape[1], (topk_idx.shape[1] if topk_idx is not None else 0)
            signature = [num_worst_tokens, num_experts, hidden, int(isinstance(x, tuple)), _dtype_code(data.dtype),
                         num_topk, int(topk_weights is not None), num_tokens]
            if num_worst_tokens:
                # As DeepEP: no per-expert list in this mode (it would need the host).
                handle, counts = self._plan_fixed(is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                                                  num_worst_tokens, device, signature, reference,
                                                  layout_alone=topk_idx is None), []
            else:
                handle, per_expert = self._plan(is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                                                num_experts, device, signature, reference)
                counts = [-(-c // expert_alignment) * expert_alignment for c in per_expert]
            handle.hidden, handle.num_topk = hidden, num_topk

            payload = [x] if not isinstance(x, tuple) else list(x)
            if topk_idx is None:  # the tokens alone
                recv_x = self._dispatch_payload(x, handle, "dispatch")
                self._check_overflow(handle)
                event = scope.finish(recv_x if isinstance(recv_x, tuple) else (recv_x,), handle)
                return recv_x, None, None, counts, handle, event
            payload += [topk_idx] + ([topk_weights] if topk_weights is not None else [])
            outs = self._route(handle, payload)
            self._check_overflow(handle)
            recv_x = tuple(outs[:2]) if isinstance(x, tuple) else outs[0]
            rest = outs[2:] if isinstance(x, tuple) else outs[1:]
            num_local = num_experts // self.group_size
            base = self.rank * num_local
            global_idx = rest[0]
            here = (global_idx >= base) & (global_idx < base + num_local)
            recv_topk_idx = torch.where(here, global_idx - base, -1)
            recv_topk_weights = None
            if topk_weights is not None:
                recv_topk_weights = torch.where(here, rest[1], torch.zeros((), device=device))
            tensors = (recv_x if isinstance(recv_x, tuple) else (recv_x,)) + (recv_topk_idx,)
            event = scope.finish(tensors + ((recv_topk_weights,) if recv_topk_weights is not None else ()), handle)
        return recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event

    @staticmethod
    def _check_overflow(handle: DispatchHandle) -> None:
        """Fixed-block mode: raises (CPU tensors; a device-side assert on CUDA) if this rank received
        more tokens than num_worst_tokens, once every rank's payload exchange is done."""
        if handle.overflow is not None:
            over, message = handle.overflow
            handle.overflow = None
            torch._assert_async(~over, message)

    # ---- the count exchange ----
    def _count_send(self, num_tokens_per_rank, signature: list[int], per_expert: torch.Tensor | None,
                    device) -> torch.Tensor:
        """[R, 1 + signature + self._expert_columns] int64: row r holds the tokens for rank r, this
        rank's signature, and r's per-expert counts (zeros where per_expert is None)."""
        R = self.group_size
        sig = torch.empty(R, len(signature), dtype=torch.int64, device=device)
        for column, value in enumerate(signature):
            sig[:, column].fill_(value)  # a kernel argument (capturable), not a copy from host memory
        if per_expert is None:
            per_expert = torch.zeros(R, self._expert_columns, dtype=torch.int64, device=device)
        return torch.cat([num_tokens_per_rank.to(torch.int64).reshape(R, 1), sig, per_expert], dim=1)

    @staticmethod
    def _check_signatures(signatures: list[list[int]]) -> None:
        """signatures[s]: rank s's dispatch signature. Every rank receives all of them, so every rank
        raises this same error, before any data moves."""
        problems = []
        for column, (name, what, show) in enumerate(_SIGNATURE[:_SIG_TOKENS]):
            values = [sig[column] for sig in signatures]
            keys = [v > 0 for v in values] if name == "num_worst_tokens" else values
            if len(set(keys)) > 1:
                got = ", ".join(f"{show(v)} on rank {r}" for r, v in enumerate(values))
                problems.append(f"{name}: expected {what}, got {got}")
        if problems:
            raise ValueError("; ".join(problems) + " (found in dispatch's count exchange: every rank raises this)")

    def _assert_signatures(self, signatures: torch.Tensor, own: torch.Tensor, signature: list[int]) -> None:
        """The same check on the device (num_worst_tokens: nothing is read on the host), one assert
        for all the fields (the CUDA-graph path: few launches): CPU tensors raise RuntimeError on
        every rank (each compares all ranks' values with its own row `own`, `signature` on the
        host), CUDA tensors trip a device-side assert."""
        same = signatures == own
        worst = signatures[:, 0] > 0  # num_worst_tokens: positive everywhere, any value
        torch._assert_async(same[:, 1:].all() & worst.all(),
                            "dispatch with num_worst_tokens: the ranks disagree on the mode, num_experts, x's hidden "
                            "size, form or dtype, topk_idx's columns, topk_weights or the number of tokens, which "
                            f"must be the same on every rank (rank {self.rank} has {_signature_words(signature)}; checked "
                            "on the device)")

    @staticmethod
    def _layout_errors(given, computed) -> list[tuple[str, torch.Tensor]]:
        """(name, 0-dim bool "differs") for each layout argument against topk_idx's layout."""
        names = ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank")
        return [(name, (g.to(c.dtype) != c).any()) for name, g, c in zip(names, given, computed)]

    def _plan(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_experts,
              device, signature: list[int], reference=None) -> tuple[DispatchHandle, list[int]]:
        """Count exchange and the send order; the one host synchronization of a dispatch (two on a
        Buffer's first normal dispatch and on a new num_experts: see below). reference: topk_idx's layout (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
        when layout arguments came with it, to compare them with."""
        R = self.group_size
        num_tokens = is_token_in_rank.shape[0]
        layout = (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
        # The send counts read once with the mask's own (and whether each layout argument differs from
        # topk_idx's), before the first collective: a rank whose layout arguments are wrong names the
        # mistake (its peers time out).
        reads = [num_tokens_per_rank.to(torch.int64), is_token_in_rank.sum(0, dtype=torch.int64)]
        differs = self._layout_errors(layout, reference) if reference is not None else []
        reads += [d.to(torch.int64).reshape(1) for _, d in differs]
        values = torch.cat(reads).tolist()
        send_splits, in_rank = values[:R], values[R: 2 * R]
        for (name, _), wrong in zip(differs, values[2 * R:]):
            if wrong:
                raise self._layout_error(name, layout, reference)
        if send_splits != in_rank:
            raise ValueError(f"num_tokens_per_rank: expected the tokens is_token_in_rank sends to each rank "
                             f"({in_rank}), got {send_splits}")
        # One exchange carries the splits, the signatures and (when its width is the agreed one) the
        # per-expert counts. Its width may not depend on anything a peer could disagree on: the
        # per-expert part is as wide as in the last normal dispatch (every rank's history is the same).
        L = num_experts // R
        per_expert = num_tokens_per_expert.to(torch.int64).reshape(R, L)
        fits = L == self._expert_columns
        recv = self._exchange_counts(self._count_send(num_tokens_per_rank, signature, per_expert if fits else None,
                                                      device), "dispatch (count exchange)")
        rows = recv.tolist()
        self._check_signatures([row[1: 1 + _SIG_WIDTH] for row in rows])
        recv_splits = [row[0] for row in rows]
        if fits:
            per_expert_recv = recv[:, 1 + _SIG_WIDTH:]
        else:
            # A new num_experts (or the first dispatch): every rank has just seen that all agree on it,
            # so an exchange of that width is safe; later ones carry the counts in the first.
            per_expert_recv = self._exchange_counts(per_expert, "dispatch (count exchange, per expert)")
            self._expert_columns = L
        per_expert = per_expert_recv.sum(dim=0).tolist()
        # Destination-major, token order within a destination: nonzero of the transpose is sorted so.
        dest_token = is_token_in_rank.t().nonzero()
        send_src_idx = dest_token[:, 1].contiguous()
        combine_index = torch.full((R, num_tokens), -1, dtype=torch.int64, device=device)
        combine_index[dest_token[:, 0], dest_token[:, 1]] = torch.arange(dest_token.shape[0], device=device)
        num_recv = sum(recv_splits)
        handle = DispatchHandle(num_tokens, send_src_idx, send_splits, recv_splits, combine_index.t().contiguous(),
                                is_token_in_rank, num_recv, num_recv)
        return handle, per_expert

    @staticmethod
    def _layout_error(name: str, layout, reference) -> ValueError:
        """The message for a layout argument that is not topk_idx's layout (an error path: reads freely)."""
        source = "topk_idx's layout (get_dispatch_layout(topk_idx, num_experts))"
        if name == "num_tokens_per_rank":
            return ValueError(f"num_tokens_per_rank: expected the tokens topk_idx sends to each rank "
                              f"({reference[0].tolist()}), got {layout[0].tolist()}")
        if name == "num_tokens_per_expert":
            got, want = layout[1].to(torch.int64), reference[1].to(torch.int64)
            e = int((got != want).nonzero()[0, 0])
            return ValueError(f"num_tokens_per_expert: expected {source}, got {int(got[e])} tokens for expert {e} "
                              f"where topk_idx names it in {int(want[e])}")
        got, want = layout[2], reference[2]
        t = int((got != want).any(dim=1).nonzero()[0, 0])
        return ValueError(f"is_token_in_rank: expected {source}, got {got[t].tolist()} for token {t} where "
                          f"topk_idx sends it to {want[t].tolist()}")

    def _plan_fixed(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_worst_tokens: int,
                    device, signature: list[int], reference=None, layout_alone: bool = False) -> DispatchHandle:
        """The fixed-block routing (num_worst_tokens > 0) from device tensors only. reference: as
        _plan's; layout_alone: the layout arguments came without topk_idx (nothing to check them
        against but themselves).

        Each rank sends each rank a block of T rows: first the tokens that go there, in token order,
        then filler rows the receiver ignores. The count exchange (also on the device) tells the
        receiver how many rows of each block are real; they land in recv_x in source order.
        """
        R, T = self.group_size, is_token_in_rank.shape[0]
        if reference is not None:  # layout arguments against topk_idx's layout, on the device: one assert
            layout = (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
            errors = self._layout_errors(layout, reference)
            torch._assert_async(~torch.stack([differs for _, differs in errors]).any(),
                                f"{', '.join(name for name, _ in errors)}: expected topk_idx's layout "
                                "(get_dispatch_layout(topk_idx, num_experts)), got another (checked on the device)")
        if layout_alone:  # the receivers place num_tokens_per_rank rows of each block, which the mask
            # fills: they must agree (unchecked, rows of tokens never sent arrived)
            in_rank = is_token_in_rank.sum(0, dtype=torch.int64)
            torch._assert_async((num_tokens_per_rank.to(torch.int64) == in_rank).all(),
                                "num_tokens_per_rank: expected the tokens is_token_in_rank sends to each rank, got "
                                "other counts (checked on the device)")
        # The same count exchange as the normal mode (splits, signature; no per-expert counts), so a
        # rank in the other mode finds out too.
        send = self._count_send(num_tokens_per_rank, signature, None, device)
        recv = torch.empty_like(send)
        self._all_to_all(recv, send, None, None, "dispatch (count exchange)", poll=False)
        from_source = recv[:, 0]
        # Checked on the device (CPU tensors raise here; on CUDA a device-side assert): the signatures,
        # T among them (a block size every rank agrees on is what makes the splits fixed).
        self._assert_signatures(recv[:, 1: 1 + _SIG_WIDTH], send[0, 1: 1 + _SIG_WIDTH], signature)
        # Checked once the payload has moved (dispatch, `overflow`): raised here, before the payload
        # exchange, the other ranks would wait in it until their timeout. recv_index keeps the rows
        # past recv_x out meanwhile.
        overflow = (from_source.sum() > num_worst_tokens,
                    f"num_worst_tokens: expected at least the number of tokens rank {self.rank} receives, "
                    f"got {num_worst_tokens}")

        to_rank = is_token_in_rank.t()  # [R, T]
        # A stable sort of "not for r" lists r's tokens first, in token order.
        send_src_idx = torch.sort((~to_rank).to(torch.uint8), dim=1, stable=True).indices.reshape(-1)
        block_row = torch.arange(R, device=device)[:, None] * T + to_rank.to(torch.int64).cumsum(dim=1) - 1
        combine_index = torch.where(to_rank, block_row, -1).t().contiguous()
        row = torch.arange(T, device=device)[None, :]
        first = from_source.cumsum(dim=0)[:, None] - from_source[:, None]
        recv_index = torch.where(row < from_source[:, None], first + row, -1).reshape(-1)
        recv_index = torch.where(recv_index < num_worst_tokens, recv_index, -1)  # never write past recv_x
        handle = DispatchHandle(T, send_src_idx, [T] * R, [T] * R, combine_index, is_token_in_rank,
                                num_worst_tokens, num_worst_tokens, block=T, recv_index=recv_index)
        handle.overflow = overflow
        return handle

    def _route(self, handle: DispatchHandle, payload: list[torch.Tensor]) -> list[torch.Tensor]:
        """Dispatch of `payload` ([T, ...] each) along `handle`; differentiable in float payloads."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in payload):
            return list(_Dispatch.apply(self, handle, *payload))
        return self._route_forward(handle, payload, [_fill(p) for p in payload], "dispatch")

    def _dispatch_payload(self, x, handle: DispatchHandle, what: str):
        if isinstance(x, tuple):
            return tuple(self._route_forward(handle, list(x), [0, 0], what))
        return self._route(handle, [x])[0]

    @_shares_refusals("combine")
    def combine(self, x, handle: DispatchHandle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns each token's received rows back to its source rank, summed (unweighted).

        Args:
            x: [N, H] (or [num_worst_tokens, H]) rows in dispatch's receive order: exactly the rows
                dispatch delivered (checked); any H and float dtype (fp32 expert outputs of a bf16
                dispatch, say), the same on every rank (not checked: that would take an exchange;
                rows of another size on one rank abort gloo's exchange, or fail NCCL's).
            handle: the dispatch's handle. topk_weights: fp32 [N, K] (K of the dispatch's topk_idx)
                or None (None if the dispatch had no topk_idx).
            bias: None, a [T, H] float tensor or a tuple of two (DeepEP's bias_0, bias_1; None
                entries skipped), added to the fp32 sum before its one rounding, as DeepEP adds them.

        Returns:
            combined_x [T, H] (x's dtype): combined_x[t] = sum over the ranks r that received t of
            the row r returned for t (fp32 sum in rank order; fp64 for fp64 rows), plus the biases;
            0 for a token sent nowhere.
            combined_topk_weights fp32 [T, K] the same sum of weight rows (None without weights).
            event.
        """
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the handle returned by dispatch, got {type(handle).__name__}")
        _check_config(config)
        if handle.combine_index.shape[1] != self.group_size:
            raise ValueError(f"handle: expected one from a dispatch over {self.group_size} ranks, got one over "
                             f"{handle.combine_index.shape[1]}")
        # The rows must be exactly those the dispatch delivered (DeepEP's rule); the hidden size and
        # dtype are free (fp32 expert outputs of a bf16 dispatch, say) but must agree on every rank
        # (not checked: that would take an exchange).
        rows = handle.num_out_rows
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != rows:
            raise ValueError(f"x: expected a [{rows}, H] tensor (the rows dispatch delivered), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        _check_summable("x", x)
        if topk_weights is not None:
            self._check_weights(topk_weights, None, x.device)
            if handle.num_topk == 0:
                raise ValueError("topk_weights: expected None (the handle's dispatch had no topk_idx), got a tensor")
            if topk_weights.dim() != 2:
                raise ValueError(f"topk_weights: expected 2 dimensions [N, K] (dispatch's recv_topk_weights), got "
                                 f"shape {tuple(topk_weights.shape)}")
            if tuple(topk_weights.shape) != (rows, handle.num_topk):
                raise ValueError(f"topk_weights: expected a [{rows}, {handle.num_topk}] tensor (dispatch's "
                                 f"recv_topk_weights), got shape {tuple(topk_weights.shape)}")
        biases = [b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None]
        # With a bias, DeepEP's sum: the rows and the biases added in fp32 (fp64 rows: fp64), rounded once
        wide = (torch.float64 if x.dtype == torch.float64 else torch.float32) if biases else None
        with StreamScope(self, x.device, previous_event, async_finish, allocate_on_comm_stream,
                         (x, handle, topk_weights, bias)) as scope:
            payload = [x] + ([topk_weights] if topk_weights is not None else [])
            if torch.is_grad_enabled() and any(p.requires_grad for p in payload):
                outs = list(_Combine.apply(self, handle, wide, *payload))
            else:
                outs = self._route_backward(handle, payload, "combine", wide)
            if biases:  # checked once the rows have moved: a rank's bad bias does not leave its peers waiting
                shape = (handle.num_tokens, x.shape[1])
                for b in biases:
                    if not isinstance(b, torch.Tensor) or tuple(b.shape) != shape:
                        raise ValueError(f"bias: expected tensors of the combined shape {shape}, got "
                                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
                    _check_summable("bias", b)
                    if b.device != x.device:
                        raise ValueError(f"bias: expected tensors on {x.device} (that of x), got {b.device}")
                    outs[0] = outs[0] + b.to(wide)
                outs[0] = outs[0].to(x.dtype)
            event = scope.finish(tuple(outs))
        return outs[0], (outs[1] if topk_weights is not None else None), event

    # ---- low latency ----
    # Fixed-size slots, so no call reads a device value on the host (CUDA-graph capturable):
    # every rank sends every rank a block of M = num_max_dispatch_tokens_per_rank rows, row t of
    # each block carrying token t (x | scales | topk ids; rows t >= T name no expert). The exchange is
    # an all_to_all with equal splits; each receiver finds its rows from the ids in them and places
    # them with cumsum/gather index math. Combine returns a block of M fp32 partial sums per rank.

    def _check_low_latency(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts) -> int:
        """Shape checks (the host knows these) and an asynchronous range check of the ids; returns T."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [T, H], got {type(x).__name__}")
        num_tokens = self._check_x(x)
        self._check_num_experts(num_experts)
        self._check_topk(topk_idx, num_tokens, None)
        if topk_idx.device != x.device:
            raise ValueError(f"topk_idx: expected device {x.device} (that of x), got {topk_idx.device}")
        M = num_max_dispatch_tokens_per_rank
        if num_tokens > M:
            raise ValueError(f"x: expected at most num_max_dispatch_tokens_per_rank={M} rows, got {num_tokens}")
        self._assert_ids_async(topk_idx, num_experts)
        return num_tokens

    @staticmethod
    def _assert_ids_async(topk_idx, num_experts: int) -> None:
        """The id range, checked on the device: a host check would wait for it. CPU tensors raise
        RuntimeError here; on CUDA a bad id is a device-side assert (ids outside [-1, E) are never
        used as indices)."""
        if topk_idx.numel():
            torch._assert_async(((topk_idx >= -1) & (topk_idx < num_experts)).all(),
                                f"topk_idx: expected expert ids in [-1, {num_experts})")

    @_shares_refusals("low_latency_dispatch")
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False):
        """Dispatch into the masked per-expert layout the masked grouped GEMM reads, without any host
        synchronization (capturable in a CUDA graph; shapes depend only on the arguments' shapes).

        Args:
            x: bf16 [T, H] (H % 128 == 0 with use_fp8), T <= num_max_dispatch_tokens_per_rank = M.
            topk_idx: int64 [T, K], expert ids in [-1, num_experts), -1 for no expert. The range is
                checked on the device (torch._assert_async): RuntimeError naming topk_idx for CPU
                tensors, a device-side assert on CUDA.

            cumulative_local_expert_recv_stats: optional int32 [L]; recv_count is added to it.
            dispatch_wait_recv_cost_stats: optional int64 [R] (DeepEP's per-source wait cycles): taken
                for DeepEP's signature and left unchanged, as one collective receives from every
                rank at once (there is no wait per source to count).
            use_ue8m0 (with round_scale, H % 512 == 0): the scales as DeepEP gives them for
                Blackwell's GEMMs, each power of two's 8-bit exponent (UE8M0), four to an int32:
                [L, M * R, H/512]; dskernels's GEMMs take the fp32 form (use_ue8m0=False).

        Each rank sends every rank (itself included) one fixed block of M rows over one equal-split
        all_to_all: R * M rows of (x or fp8 x + scales, K int64 ids) per rank, whatever the routing.
        So M, H, K (topk_idx's columns), use_fp8, num_experts and, without use_fp8, x's dtype must be
        the same on every rank, while T may differ. They are not checked across ranks: that would take
        a host read or one more collective per call, and this path has neither (as in DeepEP, which
        does not check them either). A mismatch that changes the rows' size (M, H, K, use_fp8, a dtype
        of another width) aborts the process in gloo's size check, or fails or hangs NCCL's exchange
        until its timeout; one that does not (num_experts, bf16 against fp16) gives wrong rows.

        Returns:
            recv_x: [L, M * R, H] bf16, or with use_fp8 a tuple (fp8 [L, M * R, H], fp32 scales
                [L, M * R, H/128]), the bytes dskernels.per_token_cast_to_fp8(x, round_scale) gives
                (the cast is fused into the send: once per token; round_scale: power-of-two scales);
                expert l's rows are [0, recv_count[l]), in source rank order then token order, one
                row per token (a token naming an expert twice is received once); rows past
                recv_count are not written.
            recv_count: int32 [L] on the device; handle; event; hook (a no-op callable: data is
                ready on return).
        """
        use_fp8, round_scale = as_flag("use_fp8", use_fp8), as_flag("round_scale", round_scale)
        use_ue8m0 = as_flag("use_ue8m0", use_ue8m0)
        as_flag("return_recv_hook", return_recv_hook)  # (the hook is a no-op either way: data is ready)
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0: packs each scale's exponent, so the scales must be powers of two: "
                             "needs round_scale=True")
        if round_scale and not use_fp8:
            raise ValueError("round_scale: rounds the FP8 cast's scales, so it needs use_fp8=True")
        num_max_dispatch_tokens_per_rank = check_int("num_max_dispatch_tokens_per_rank",
                                                     num_max_dispatch_tokens_per_rank, minimum=1)
        num_experts = check_int("num_experts", num_experts)
        num_tokens = self._check_low_latency(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts)
        # No backward (DeepEP's low-latency kernels have none): recv_x came back detached without a word
        if torch.is_grad_enabled():
            _grad_lost_warning("ep.Buffer.low_latency_dispatch", (x,), {}, _LOW_LATENCY_HINT)
        R, M, K, device = self.group_size, num_max_dispatch_tokens_per_rank, topk_idx.shape[1], x.device
        self._check_stats("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, torch.int32,
                          num_experts // R, device)
        self._check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, torch.int64, R, device)
        num_local = num_experts // R
        cap = M * R
        hidden = x.shape[1]
        if not use_fp8 and not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor (bfloat16, as DeepEP sends; float16, float32) without "
                            f"use_fp8, got {x.dtype}")
        if use_fp8 and (x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or hidden % 128):
            raise ValueError(f"x: use_fp8 casts groups of 128 columns of a bfloat16, float16 or float32 tensor, got "
                             f"{x.dtype} with {hidden} columns")
        if use_ue8m0 and hidden % 512:
            raise ValueError(f"x: use_ue8m0 packs four 128-column scales to an int32, so it needs a multiple of 512 "
                             f"columns, got {hidden}")
        # The received payloads' types: (fp8 x, fp32 scales) or x (empty: only dtype and width matter).
        payload = ([x.new_empty(0, hidden, dtype=_FP8), x.new_empty(0, hidden // 128, dtype=torch.float32)]
                   if use_fp8 else [x[:0]])
        inputs = (x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)
        with StreamScope(self, device, None, async_finish, False, inputs) as scope:
            widths = [p.shape[1] * p.element_size() for p in payload] + [K * topk_idx.element_size()]
            word, offsets, row_words = self._layout(widths)
            size = torch.empty((), dtype=word).element_size()
            # Token t is row t of every destination's block; the receiver reads the ids to see which
            # rows are its own. Rows past T carry ids -1 (all bits set) and no payload; a token's
            # payload (cast to fp8 on the way, one read of x) goes only to the ranks holding one of its
            # experts, as only they read it. One launch.
            send = torch.empty(R, M, row_words, dtype=word, device=device)
            low_latency_send(x, topk_idx, num_experts, use_fp8, send.view(torch.uint8).reshape(R, M, row_words * size),
                             [off * size for off in offsets], round_scale)
            id_off, id_words = offsets[-1], widths[-1] // size
            recv = torch.empty_like(send).reshape(R * M, row_words)
            agree = (f"num_experts {num_experts}", f"use_fp8 {use_fp8}") + (() if use_fp8 else (x.dtype,))
            self._all_to_all(recv, send.reshape(R * M, row_words), None, None, "low_latency_dispatch", poll=False,
                             agree=agree)

            # recv row s * M + t is token t of source s. Each (row, k) entry naming a local expert
            # gets its slot: the row's position within that expert in (source, token) order, so
            # expert l fills [0, recv_count[l]) in source rank order then token order; a repeated
            # expert in one row is written once (write_slot -1 for the repeats).
            ids = self._as(recv[:, id_off: id_off + id_words], topk_idx)
            write_slot, return_slot, recv_count = low_latency_slots(ids, self.rank * num_local, num_local, cap)
            entry_row = torch.arange(R * M * K, device=device) // max(K, 1)
            outs = []
            for off, field_bytes, like in zip(offsets, widths, payload):
                width = field_bytes // size
                out = torch.empty(num_local * cap, width, dtype=word, device=device)
                copy_rows(recv[:, off: off + width], entry_row, out, write_slot, R * M * K)
                outs.append(out.view(torch.uint8).view(like.dtype).reshape(num_local, cap, *like.shape[1:]))

            # Source side: rank r returns token t's partial sum (over t's experts on r) in row
            # r * M + t of combine's receive buffer (ids outside [0, E) never index anything).
            valid = (topk_idx >= 0) & (topk_idx < num_experts)
            owner = torch.where(valid, topk_idx // num_local, -1)
            ranks = torch.arange(R, device=device)
            on_rank = (owner[:, :, None] == ranks).any(dim=1)  # [T, R]
            combine_index = torch.where(on_rank, ranks * M + torch.arange(num_tokens, device=device)[:, None], -1)
            handle = LowLatencyHandle(num_tokens, M, num_experts, x.shape[1], K, return_slot.reshape(R * M, K),
                                      combine_index)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats += recv_count
            if use_ue8m0:  # a power of two's fp32 exponent field is its UE8M0 byte
                exponents = (outs[1].view(torch.int32) >> 23).to(torch.uint8)
                outs[1] = exponents.view(torch.int32)
            recv_x = tuple(outs) if use_fp8 else outs[0]
            event = scope.finish(tuple(outs) + (recv_count,), handle)
        return recv_x, recv_count, handle, event, (lambda: None)

    @staticmethod
    def _check_stats(name: str, stats, dtype: torch.dtype, length: int, device: torch.device) -> None:
        """An optional statistics tensor DeepEP's low-latency calls take: dtype [length] on device."""
        if stats is None:
            return
        if not isinstance(stats, torch.Tensor) or stats.dtype != dtype or tuple(stats.shape) != (length,) \
                or stats.device != device:
            got = (f"{stats.dtype} {tuple(stats.shape)} on {stats.device}" if isinstance(stats, torch.Tensor)
                   else type(stats).__name__)
            raise ValueError(f"{name}: expected a {dtype} tensor [{length}] on {device}, got {got}")

    @_shares_refusals("low_latency_combine")
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None):
        """x [L, cap, H] (bf16) expert outputs in low_latency_dispatch's layout ->
        combined_x [T, H]: combined_x[t] = sum_k topk_weights[t, k] * x[expert, row of t] (0 for a token
        with no expert); returns (combined_x, event, hook). The sum is fp32 throughout, rounded once:
        per rank r, the terms of t's experts on r in k order (that rank's partial sum), then the
        partials in rank order.

        No host synchronization: two equal-split all_to_alls. First every rank sends its weights
        [M, K] fp32 to every rank; then each rank reduces, for every (source, token), the weighted
        outputs of its own experts into one fp32 row (gather_reduce) and returns R blocks of M such
        rows; the source's gather_reduce adds the partials of the ranks its token visited.
        `topk_idx` must be the dispatch's, except that an entry may be -1 here (as DeepEP skips it,
        its term is left out: its weight is sent as 0); `out` [T, H] is optional.
        combine_wait_recv_cost_stats: optional int64 [R], taken for DeepEP's signature and left
        unchanged (as dispatch_wait_recv_cost_stats).
        The handle fixes every size the combine exchanges (M, K, the experts, and the hidden size x
        must have: checked), so it agrees on every rank wherever the dispatch did.
        """
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle returned by low_latency_dispatch, got {type(handle).__name__}")
        for name, value in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy),
                            ("return_recv_hook", return_recv_hook)):
            as_flag(name, value)  # (none of them changes what this combine does: docs/ep.md)
        R, M, K = self.group_size, handle.num_max_dispatch_tokens_per_rank, handle.num_topk
        num_tokens = handle.num_tokens
        if torch.is_grad_enabled():  # (no backward either: see low_latency_dispatch)
            _grad_lost_warning("ep.Buffer.low_latency_combine", (x, topk_weights), {}, _LOW_LATENCY_HINT)
        self._check_topk(topk_idx, num_tokens, None)
        if topk_idx.shape[1] != K:
            raise ValueError(f"topk_idx: expected {K} columns (those of the dispatch), got {topk_idx.shape[1]}")
        if topk_weights is None:
            raise TypeError("topk_weights: expected the float32 [T, K] weights of the combine, got None")
        self._check_weights(topk_weights, topk_idx)
        num_local = handle.num_experts // R
        cap = M * R
        hidden = handle.hidden  # the dispatch's: it sizes the exchanged rows, so it must agree everywhere
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (num_local, cap, hidden):
            raise ValueError(f"x: expected shape ({num_local}, {cap}, {hidden}) (the dispatch's layout and hidden "
                             f"size), got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        _check_summable("x", x)
        self._check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, torch.int64, R, x.device)
        if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (num_tokens, hidden)
                                or out.dtype != x.dtype or out.device != x.device):
            got = (f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise ValueError(f"out: expected a {x.dtype} tensor of shape ({num_tokens}, {hidden}) on {x.device}, "
                             f"got {got}")
        if out is not None:
            check_no_overlap("out", out)
        inputs = (x, topk_idx, topk_weights, handle, out, combine_wait_recv_cost_stats)
        with StreamScope(self, x.device, None, async_finish, False, inputs) as scope:
            # Every rank gets every rank's weights (rows past T: unused, their ids were -1).
            send_w = torch.zeros(R, M, K, dtype=torch.float32, device=x.device)
            send_w[:, :num_tokens] = topk_weights.masked_fill(topk_idx < 0, 0)
            recv_w = torch.empty_like(send_w)
            self._all_to_all(recv_w, send_w, None, None, "low_latency_combine (weights)", poll=False)
            # Row s * M + t: sum over t's experts here of weight * output, 0 if it has none here.
            partial = torch.empty(R * M, hidden, dtype=torch.float32, device=x.device)
            gather_reduce(x.reshape(num_local * cap, hidden), handle.return_slot, recv_w.reshape(R * M, K), partial)
            recv = torch.empty_like(partial)
            self._all_to_all(recv, partial, None, None, "low_latency_combine", poll=False)
            # The reduce writes rows of unit stride: an out of other strides gets them copied in.
            direct = out is not None and (out.stride(1) == 1 or hidden <= 1)
            combined = out if direct else torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
            gather_reduce(recv, handle.combine_index, None, combined)
            if out is not None and not direct:
                combined = out.copy_(combined)
            event = scope.finish((combined,))
        return combined, event, (lambda: None)


_LOW_LATENCY_HINT = "Buffer.dispatch and Buffer.combine are differentiable: train through those."


def _fill(p: torch.Tensor):
    return -1 if p.dtype == torch.int64 else 0


class _Dispatch(torch.autograd.Function):
    """dispatch's backward is combine (the gradient of a row copy is the sum of the copies' gradients)."""

    @staticmethod
    def forward(ctx, buffer, handle, *payload):
        ctx.buffer, ctx.handle = buffer, handle
        ctx.float_mask = [p.is_floating_point() for p in payload]
        outs = buffer._route_forward(handle, list(payload), [_fill(p) for p in payload], "dispatch")
        ctx.out_meta = [(o.shape, o.dtype) for o in outs]
        ctx.mark_non_differentiable(*[o for o, f in zip(outs, ctx.float_mask) if not f])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        idx = [i for i, f in enumerate(ctx.float_mask) if f]
        sends = [grads[i] if grads[i] is not None else
                 torch.zeros(ctx.out_meta[i][0], dtype=ctx.out_meta[i][1], device=ctx.handle.combine_index.device)
                 for i in idx]
        reduced = ctx.buffer._route_backward(ctx.handle, sends, "dispatch backward (combine)")
        result = [None] * len(ctx.float_mask)
        for i, r in zip(idx, reduced):
            result[i] = r
        return (None, None, *result)


class _Combine(torch.autograd.Function):
    """combine's backward is a cached dispatch of the output gradient."""

    @staticmethod
    def forward(ctx, buffer, handle, first_dtype, *payload):
        ctx.buffer, ctx.handle = buffer, handle
        ctx.shapes, ctx.dtypes = [p.shape for p in payload], [p.dtype for p in payload]
        return tuple(buffer._route_backward(handle, list(payload), "combine", first_dtype))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g if g is not None else torch.zeros(ctx.handle.num_tokens, *s[1:], device=ctx.handle.combine_index.device)
                 for g, s in zip(grads, ctx.shapes)]
        outs = ctx.buffer._route_forward(ctx.handle, grads, [0] * len(grads), "combine backward (dispatch)")
        outs = [(o[: s[0]] if o.shape[0] >= s[0] else torch.cat([o, o.new_zeros(s[0] - o.shape[0], *s[1:])])).to(d)
                for o, s, d in zip(outs, ctx.shapes, ctx.dtypes)]
        return (None, None, None, *outs)
