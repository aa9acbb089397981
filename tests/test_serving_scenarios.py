"""Serving-engine scenarios for dskernels: a page allocator with a free list, arrivals, chunked prefill,
decode (1 token or MTP-style s > 1, some drafts rejected: the length rolled back over them), finish /
preemption (pages freed and reused without clearing, sometimes poisoned), batches that change every step,
block tables padded with garbage.
Each step's outputs are compared to an oracle computed from scratch over the sequence's whole history."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

import dskernels
from dskernels.models import DeepseekV3DecoderLayer

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------- allocator ----
class Allocator:
    """Free list of pages; freed pages are poisoned (NaN / huge) or left as they are."""

    def __init__(self, caches, rng: random.Random, poison=("nan", "huge", "keep")):
        self.caches = caches  # list of (tensor, kind): kind in float / fp8 / u8
        self.num_pages = caches[0][0].shape[0]
        self.free = list(range(self.num_pages))
        rng.shuffle(self.free)
        self.rng = rng
        self.poison = poison
        self.poisoned = {"nan": 0, "huge": 0, "keep": 0}
        self.refs = {}

    def _drop(self, p) -> bool:
        self.refs[p] -= 1
        return self.refs[p] == 0

    def alloc(self) -> int:
        if not self.free:
            raise MemoryError
        p = self.free.pop(self.rng.randrange(len(self.free)))
        self.refs[p] = 1
        return p

    def share(self, pages):
        for p in pages:
            self.refs[p] += 1

    def release(self, pages):
        mode = self.rng.choice(self.poison)
        pages = [p for p in pages if self._drop(p)]
        self.poisoned[mode] += len(pages)
        for p in pages:
            for t, kind in self.caches:
                if t.is_inference() and not torch.is_inference_mode_enabled():
                    with torch.inference_mode():
                        self._poison(t, kind, p, mode)
                    continue
                self._poison(t, kind, p, mode)
            self.free.insert(self.rng.randrange(len(self.free) + 1), p)

    def _poison(self, t, kind, p, mode):
        if mode == "keep":
            return
        if kind == "float":
            t[p] = float("nan") if mode == "nan" else 3e4 * (1 if self.rng.random() < .5 else -1)
        elif kind == "fp8":
            t[p] = float("nan") if mode == "nan" else 448.0
        else:  # uint8 layouts: 0xFF is NaN in e4m3 and fp32 scales alike; 0x7E = 448 e4m3
            t[p] = 0xFF if mode == "nan" else 0x7E


@dataclass
class Seq:
    sid: int
    x: torch.Tensor          # [L, hidden] (layer dtype)
    pos: torch.Tensor        # [L] int64
    expected: torch.Tensor   # [L, hidden] oracle outputs (fp32)
    target: int
    length: int = 0          # tokens in the cache
    pages: list = field(default_factory=list)
    preempted: int = 0


def padded_table(batch, page_size, rng, num_pages, extra):
    """int32 [B, max_pages]: each row's pages then garbage (huge ids, -1, other sequences' pages)."""
    width = max(len(s.pages) for s in batch) + extra
    rows = []
    for s in batch:
        row = list(s.pages)
        while len(row) < width:
            row.append(rng.choice([2 ** 31 - 1, 2 ** 30, -1, -(2 ** 31), num_pages, num_pages + 7,
                                   rng.randrange(num_pages)]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32)


def persistent_view(table, rng):
    """The same table as a [:B, :W] view of a larger buffer full of garbage (row stride > W), as engines
    keep one block-table buffer for the largest batch and slice it per step."""
    B, W = table.shape
    buf = torch.full((B + rng.randint(0, 4), W + rng.randint(1, 9)), 2 ** 31 - 1, dtype=table.dtype)
    buf[:B, :W] = table
    return buf[:B, :W]


# ---------------------------------------------------------------- tolerances ----
def token_errors(got, expected, x):
    """Per-token error of the layer's update (y - x: the residual is exact in both) relative to the
    oracle update's RMS over the whole sequence set."""
    d_got = got.float() - x.float()
    d_exp = expected.float() - x.float()
    return (d_got - d_exp).norm(dim=-1) / d_exp.norm(dim=-1).clamp_min(1e-6)


# ---------------------------------------------------------------- the layer scenario ----
@dataclass
class Scenario:
    name: str
    seed: int
    steps: int
    layer_idx: int = 0            # 0 dense, 1 MoE
    dtype: torch.dtype = torch.float32
    fp8_weights: bool = False
    cache: str = "same"           # same / fp8
    kv_scale: float = 0.5
    page_size: int = 5
    num_pages: int = 40
    backend: str = "ref"
    max_len: int = 40
    max_batch: int = 9
    v32: bool = False
    index_fp8: bool = False
    max_chunk: int = 9
    int64_tables: bool = False
    fork: float = 0.0            # chance per step of a sequence forked from a running one (shares its full pages)
    pad_rows: float = 0.0        # chance per step of dummy padding rows (length 0, a reserved dummy page)
    persistent: float = 0.0      # chance per step of the block table being a view of a larger persistent buffer
    inference_cache: bool = False  # caches allocated under torch.inference_mode(), steps under no_grad
    self_oracle: bool = False    # oracle: this layer (same weights, dtype) run from scratch without a cache
    reject: float = 0.0          # chance per multi-token step that a sequence's last tokens were wrong drafts: its
    #                              length moves past the accepted ones only, the rejected entries stay in the cache


def build(sc: Scenario):
    # (the test modules beside this one: pytest puts tests/ on the path, as for test_indexer's imports)
    if sc.v32:
        import test_models_v32 as tm
        cfg = tm.CFG
    else:
        import test_models as tm
        cfg = tm.CONFIGS["v3"]
    ref = tm.make_reference(cfg, sc.layer_idx, seed=sc.seed)
    sd = ref.state_dict()
    if not sc.v32:
        sd = tm.per_expert_names(sd, cfg)
    if sc.fp8_weights:
        import test_models as tmv3
        sd, dequant = tmv3.fp8_checkpoint(sd)
        ref.load_state_dict(dequant if sc.v32 else tm.fused_names(dequant, cfg))
    elif sc.dtype != torch.float32:
        # the oracle gets the weights the layer holds (rounded to its dtype; the router stays fp32)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "gate.weight" not in name and "weights_proj" not in name:
                    p.copy_(p.to(sc.dtype).float())
        sd = ref.state_dict() if sc.v32 else tm.per_expert_names(ref.state_dict(), cfg)
    layer = DeepseekV3DecoderLayer(cfg, sc.layer_idx, dtype=sc.dtype, **({"index_fp8": sc.index_fp8} if sc.v32 else {}))
    layer.load_hf_state_dict(sd)
    return tm, cfg, ref, layer


def oracle(tm, cfg, ref, x, pos):
    with torch.no_grad():
        return tm.reference_forward(ref, cfg, x[None].float(), pos[None])[0]


def tolerance(sc: Scenario) -> float:
    """Bound on the per-token relative error of the layer's update (y - x), from the dtypes:
    fp32 everywhere: 1e-4 (the repo's bound; the paged path reorders fp32 sums, ~1e-6 measured);
    bf16 activations: 8 * 2^-8 (~3%: a chain of ~6 roundings of u = 2^-8 each plus
    the absorbed form, which rounds q W_UK and the output latent once more);
    FP8 weights: 0.08 (FP8_TOL of tests/test_models.py: a chain of 1x128-cast e4m3 GEMMs);
    an e4m3 cache adds 2^-4 (its 3 fraction bits, test_fp8_kv_cache_for_dense_attention's bound)."""
    tol = 1e-4 if sc.dtype == torch.float32 else 8 * 2 ** -8
    if sc.fp8_weights:
        tol = max(tol, 0.08)
    if sc.cache == "fp8":
        tol += 2 ** -4
    if sc.v32 and sc.index_fp8:
        tol = max(tol, 0.5)  # the FP8 selection may differ from the float one in near ties (sanity only)
    return tol


def run_scenario(sc: Scenario, log=print, stop_on_first=False):
    rng = random.Random(sc.seed)
    gen = torch.Generator().manual_seed(sc.seed)
    tm, cfg, ref, layer = build(sc)
    hidden = cfg.hidden_size
    mode = torch.inference_mode() if sc.inference_cache else torch.no_grad()
    mode.__enter__()
    if sc.cache == "fp8":
        cache = torch.full((sc.num_pages, sc.page_size, 1, cfg.kv_cache_dim), float("nan")).to(FP8)
        caches = [(cache, "fp8")]
        scale = torch.tensor([sc.kv_scale])
    else:
        cache = torch.full((sc.num_pages, sc.page_size, 1, cfg.kv_cache_dim), float("nan"), dtype=sc.dtype)
        caches = [(cache, "float")]
        scale = None
    kwargs = {}
    if sc.v32:
        idx = layer.self_attn.indexer
        if idx.fp8:
            index_cache = torch.full((sc.num_pages, sc.page_size, 1, idx.cache_width), 0xFF, dtype=torch.uint8)
            caches.append((index_cache, "u8"))
        else:
            index_cache = torch.full((sc.num_pages, sc.page_size, 1, idx.cache_width), float("nan"), dtype=sc.dtype)
            caches.append((index_cache, "float"))
        kwargs["index_cache"] = index_cache
    if scale is not None:
        kwargs["kv_cache_scale"] = scale
    mode.__exit__(None, None, None)
    alloc = Allocator(caches, rng)
    dummy = alloc.alloc() if sc.pad_rows else None  # reserved: padding rows write there
    tol = tolerance(sc)
    waiting, running = [], []
    next_id = 0
    stats = dict(steps=0, tokens=0, max_err=0.0, fails=[], nan=0, preempt=0, finished=0, batches=[], s_hist={},
                 over=0, checked=0)

    def arrive():
        nonlocal next_id
        L = rng.randint(1, sc.max_len)
        x = (torch.randn(L, hidden, generator=gen)).to(sc.dtype)
        pos = torch.randint(0, 150000, (1,), generator=gen) + torch.arange(L)
        if rng.random() < 0.3:  # positions independent of cache slots (any values)
            pos = torch.randint(0, 150000, (L,), generator=gen)
        if sc.self_oracle:
            with torch.no_grad(), dskernels.backend("ref"):
                exp = layer(x[None], pos[None])[0].float()
        else:
            exp = oracle(tm, cfg, ref, x, pos)
        s = Seq(next_id, x, pos, exp, L)
        next_id += 1
        waiting.append(s)

    for _ in range(3):
        arrive()
    with torch.no_grad(), dskernels.backend(sc.backend):
        for step in range(sc.steps):
            if rng.random() < 0.5 or not (waiting or running):
                for _ in range(rng.randint(1, 3)):
                    arrive()
            # admit waiting sequences (just arrived: length 0)
            while waiting and len(running) < 12 and rng.random() < 0.7:
                running.append(waiting.pop(0))
            # preemption: drop a running sequence, free its pages, recompute later from scratch
            if running and rng.random() < 0.06:
                v = running.pop(rng.randrange(len(running)))
                alloc.release(v.pages)
                v.pages, v.length = [], 0
                v.preempted += 1
                stats["preempt"] += 1
                waiting.append(v)
            if running and rng.random() < sc.fork:
                src = rng.choice(running)
                k = src.length // sc.page_size
                if k:
                    n = k * sc.page_size
                    L = n + rng.randint(1, sc.max_len)
                    x = torch.cat([src.x[:n], torch.randn(L - n, hidden, generator=gen).to(sc.dtype)])
                    pos = torch.cat([src.pos[:n], src.pos[n - 1] + 1 + torch.arange(L - n)])
                    f = Seq(next_id, x, pos, oracle(tm, cfg, ref, x, pos), L, length=n, pages=list(src.pages[:k]))
                    next_id += 1
                    alloc.share(f.pages)
                    running.append(f)
                    stats["forks"] = stats.get("forks", 0) + 1
            if not running:
                continue
            # the step's token count: decode (1), MTP (2-3), or a prefill chunk of random size
            r = rng.random()
            S = 1 if r < 0.45 else rng.randint(2, 3) if r < 0.7 else rng.randint(1, sc.max_chunk)
            cand = [s for s in running if s.target - s.length >= S]
            if not cand:
                S = 1
                cand = [s for s in running if s.target - s.length >= 1]
            rng.shuffle(cand)
            batch = cand[:rng.randint(1, min(sc.max_batch, len(cand)))]
            # pages for the new tokens
            ok = []
            for s in batch:
                need = -(-(s.length + S) // sc.page_size)
                try:
                    while len(s.pages) < need:
                        s.pages.append(alloc.alloc())
                    ok.append(s)
                except MemoryError:  # out of pages: preempt this one
                    alloc.release(s.pages)
                    s.pages, s.length = [], 0
                    s.preempted += 1
                    stats["preempt"] += 1
                    running.remove(s)
                    waiting.append(s)
            batch = ok
            if not batch:
                continue
            table = padded_table(batch, sc.page_size, rng, sc.num_pages, rng.randint(0, 3))
            lens = torch.tensor([s.length for s in batch], dtype=torch.int32)
            npad = rng.randint(1, 3) if (sc.pad_rows and S <= sc.page_size and rng.random() < sc.pad_rows) else 0
            if npad:  # CUDA-graph style padding: dummy rows of length 0 writing into the reserved page
                table = torch.cat([table, torch.full((npad, table.shape[1]), dummy, dtype=torch.int32)])
                lens = torch.cat([lens, torch.zeros(npad, dtype=torch.int32)])
            if sc.int64_tables and rng.random() < 0.5:
                table, lens = table.long(), lens.long()
            if rng.random() < sc.persistent:
                table = persistent_view(table, rng)
            xs = torch.stack([s.x[s.length:s.length + S] for s in batch])
            ps = torch.stack([s.pos[s.length:s.length + S] for s in batch])
            accepted = [S] * len(batch)
            if sc.reject and S > 1:  # speculative: draft tokens past the accepted ones are others' (random) inputs
                for b in range(len(batch)):
                    if rng.random() < sc.reject:
                        accepted[b] = rng.randrange(1, S)
                        xs[b, accepted[b]:] = torch.randn(S - accepted[b], hidden, generator=gen).to(sc.dtype)
                stats["rejected"] = stats.get("rejected", 0) + S * len(batch) - sum(accepted)
            if npad:
                xs = torch.cat([xs, torch.randn(npad, S, hidden, generator=gen).to(sc.dtype)])
                ps = torch.cat([ps, torch.randint(0, 1000, (npad, S), generator=gen)])
            before = lens.clone()
            y = layer(xs, ps, kv_cache=cache, block_table=table, cache_seqlens=lens, **kwargs)
            assert torch.equal(lens, before)
            stats["steps"] += 1
            stats["batches"].append(len(batch))
            stats["s_hist"][S] = stats["s_hist"].get(S, 0) + 1
            for b, s in enumerate(batch):
                n = accepted[b]  # (the rejected drafts' outputs are discarded, as an engine does)
                exp = s.expected[s.length:s.length + n]
                err = token_errors(y[b, :n], exp, s.x[s.length:s.length + n])
                stats["checked"] += n
                if not torch.isfinite(y[b]).all():
                    stats["nan"] += 1
                e = float(err.nan_to_num(float("inf")).max())
                stats["max_err"] = max(stats["max_err"], e)
                bad = (err.nan_to_num(float("inf")) > tol)
                if bad.any():
                    stats["over"] += int(bad.sum())
                    info = dict(step=step, sid=s.sid, length=s.length, S=S, accepted=n, pages=list(s.pages), err=e,
                                batch=[(t.sid, t.length) for t in batch], table=table.tolist(), lens=lens.tolist())
                    stats["fails"].append(info)
                    if len(stats["fails"]) <= 3:
                        log(f"  [{sc.name}] step {step}: seq {s.sid} len {s.length} S {S} err {e:.3g} > {tol:.3g}")
                    if stop_on_first:
                        return stats
                s.length += n  # rolled back over the rejected drafts: their entries stay past the length
                stats["tokens"] += n
            for s in list(batch):
                if s.length == s.target:
                    running.remove(s)
                    alloc.release(s.pages)
                    s.pages = []
                    stats["finished"] += 1
    stats["poisoned"] = dict(alloc.poisoned)
    return stats


# ---------------------------------------------------------------- the ops scenario ----
def mla_oracle(q, keys_per_seq, lens, dv, scale, causal):
    """fp64 MLA over each sequence's own (dequantized) keys [n, d]."""
    b, s_q, h, d = q.shape
    out = torch.zeros(b, s_q, h, dv, dtype=torch.float64)
    lse = torch.full((b, h, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = lens[i]
        if n == 0:
            continue
        k = keys_per_seq[i][:n].double()
        sc = torch.einsum("jhd,td->hjt", q[i].double(), k) * scale
        t = torch.arange(n)
        j = torch.arange(s_q)
        lim = (n - s_q + j + 1) if causal else torch.full_like(j, n)
        vis = t[None] < lim[:, None]
        sc = sc.masked_fill(~vis[None], -math.inf)
        l = torch.logsumexp(sc, -1)
        p = torch.exp(sc - torch.where(torch.isinf(l), 0, l)[..., None])
        out[i] = torch.einsum("hjt,td->jhd", p, k[:, :dv])
        lse[i] = torch.where(l == -math.inf, math.inf, l)
    return out, lse


@dataclass
class OpsScenario:
    name: str
    seed: int
    steps: int
    backend: str = "triton"
    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    page_size: int = 64
    num_pages: int = 24
    d: int = 80
    dv: int = 64
    h_q: int = 8
    layers: int = 3
    max_len: int = 300
    max_batch: int = 9
    new_form: bool = False   # FlashMLA's newest metadata form: get_mla_metadata() object reused by layers
    persistent: float = 0.0  # chance per step of the block table being a view of a larger persistent buffer


def run_ops_scenario(sc: OpsScenario, log=print, stop_on_first=False):
    rng = random.Random(sc.seed)
    gen = torch.Generator().manual_seed(sc.seed)
    cdtype = FP8 if sc.fp8 else sc.dtype
    caches = [torch.full((sc.num_pages, sc.page_size, 1, sc.d), float("nan"), dtype=sc.dtype).to(cdtype)
              for _ in range(sc.layers)]
    scales = [torch.tensor([rng.choice([0.02, 0.1, 1.0])]) for _ in range(sc.layers)] if sc.fp8 else [None] * sc.layers
    alloc = Allocator([(c, "fp8" if sc.fp8 else "float") for c in caches], rng)
    stats = dict(steps=0, calls=0, max_out=0.0, max_lse=0.0, fails=[], tokens=0, preempt=0, batches=[])
    seqs, waiting, next_id = [], [], 0
    softmax_scale = sc.d ** -0.5

    def arrive():
        nonlocal next_id
        L = rng.randint(1, sc.max_len)
        # the keys each layer would write (values as stored: rounded / quantized), kept per sequence
        keys = []
        for li in range(sc.layers):
            k = torch.randn(L, sc.d, generator=gen) * rng.choice([0.5, 1, 3])
            if sc.fp8:
                stored = (k / scales[li]).clamp(-448, 448).to(FP8)
                keys.append((stored, stored.float() * scales[li]))
            else:
                stored = k.to(sc.dtype)
                keys.append((stored, stored.float()))
        waiting.append(dict(sid=next_id, L=L, len=0, pages=[], keys=keys))
        next_id += 1

    def write(s, S):
        for li in range(sc.layers):
            stored = s["keys"][li][0]
            for t in range(s["len"], s["len"] + S):
                p = s["pages"][t // sc.page_size]
                caches[li][p, t % sc.page_size, 0] = stored[t]

    for _ in range(3):
        arrive()
    with torch.no_grad(), dskernels.backend(sc.backend):
        for step in range(sc.steps):
            if rng.random() < 0.4 or not (waiting or seqs):
                arrive()
            while waiting and len(seqs) < 12 and rng.random() < 0.7:
                seqs.append(waiting.pop(0))
            if seqs and rng.random() < 0.05:
                v = seqs.pop(rng.randrange(len(seqs)))
                alloc.release(v["pages"])
                v["pages"], v["len"] = [], 0
                waiting.append(v)
                stats["preempt"] += 1
            if not seqs:
                continue
            r = rng.random()
            S = 1 if r < 0.5 else rng.randint(2, 4) if r < 0.8 else rng.randint(5, 70)
            cand = [s for s in seqs if s["L"] - s["len"] >= S] or [s for s in seqs if s["L"] > s["len"]]
            if not cand:
                continue
            S = min(S, min(s["L"] - s["len"] for s in cand))
            rng.shuffle(cand)
            batch = cand[:rng.randint(1, min(sc.max_batch, len(cand)))]
            ok = []
            for s in batch:
                need = -(-(s["len"] + S) // sc.page_size)
                try:
                    while len(s["pages"]) < need:
                        s["pages"].append(alloc.alloc())
                    ok.append(s)
                except MemoryError:
                    alloc.release(s["pages"])
                    s["pages"], s["len"] = [], 0
                    seqs.remove(s)
                    waiting.append(s)
                    stats["preempt"] += 1
            batch = ok
            if not batch:
                continue
            for s in batch:
                write(s, S)
            # dummy padding rows (length 0, garbage table) as engines pad batches to a captured size
            pad = rng.randint(0, 2) if rng.random() < 0.3 else 0
            rows = [s["pages"] for s in batch] + [[] for _ in range(pad)]
            width = max(len(r) for r in rows) + rng.randint(0, 3)
            table = torch.tensor([r + [rng.choice([2 ** 31 - 1, -1, sc.num_pages, rng.randrange(sc.num_pages)])
                                       for _ in range(width - len(r))] for r in rows], dtype=torch.int32)
            if rng.random() < sc.persistent:
                table = persistent_view(table, rng)
            lens_list = [s["len"] + S for s in batch] + [0] * pad
            lens = torch.tensor(lens_list, dtype=torch.int32)
            causal = rng.random() < 0.8
            if pad and causal:
                causal = False  # a padded row (0 keys) with causal would see keys [0, 1 - S + j): none
            if sc.new_form:
                meta, nsplit = dskernels.get_mla_metadata()
            else:
                meta, nsplit = dskernels.get_mla_metadata(lens, S * sc.h_q, 1)
            B = len(rows)
            for li in range(sc.layers):
                q = (torch.randn(B, S, sc.h_q, sc.d, generator=gen)).to(sc.dtype)
                out, lse = dskernels.flash_mla_with_kvcache(q, caches[li], table, lens, sc.dv, meta, nsplit,
                                                            softmax_scale=softmax_scale, causal=causal,
                                                            k_scale=scales[li])
                stats["calls"] += 1
                keys = [s["keys"][li][1] for s in batch] + [None] * pad
                eo, el = mla_oracle(q.float(), keys, lens_list, sc.dv, softmax_scale, causal)
                vmax = max(float(k[:, :sc.dv].abs().max()) for k in keys if k is not None)
                # out: probabilities in [0, 1] times values: bound 2 ulps of the output dtype at the values' scale
                # (FlashMLA rounds P to q's dtype before P @ V: one more rounding of each term) + fp32 sums
                eps = torch.finfo(sc.dtype).eps
                out_err = float(((out.double() - eo).abs() / vmax).nan_to_num(float("inf")).max())
                fin = torch.isfinite(el)
                lse_ok = torch.equal(torch.isinf(lse), torch.isinf(el))
                lse_err = float((lse.double() - el)[fin].abs().max()) if fin.any() else 0.0
                stats["max_out"] = max(stats["max_out"], out_err)
                stats["max_lse"] = max(stats["max_lse"], lse_err)
                # lse: fp32 sums of fp32 exps of exact products of q-dtype inputs: 1e-3 absolute
                if out_err > 4 * eps or lse_err > 1e-3 or not lse_ok:
                    stats["fails"].append(dict(step=step, layer=li, out_err=out_err, lse_err=lse_err, lse_ok=lse_ok,
                                               lens=lens_list, S=S, causal=causal, table=table.tolist()))
                    if len(stats["fails"]) <= 3:
                        log(f"  [{sc.name}] step {step} layer {li}: out {out_err:.3g} lse {lse_err:.3g} "
                            f"inf-match {lse_ok} lens {lens_list} S {S} causal {causal}")
                    if stop_on_first:
                        return stats
            for s in batch:
                s["len"] += S
                stats["tokens"] += S
                if s["len"] == s["L"]:
                    seqs.remove(s)
                    alloc.release(s["pages"])
                    s["pages"] = []
            stats["steps"] += 1
            stats["batches"].append(B)
    return stats


# ---------------------------------------------------------------- the tests ----
# Seeds fixed per scenario; each step's outputs are checked against the oracle (transformers' layer
# over the sequence's whole history, fp32; for the ops, fp64 attention over each sequence's own keys).
LAYER_SCENARIOS = [
    Scenario("dense-fp32-ref", 101, 30, fork=0.15, pad_rows=0.3, persistent=0.3, int64_tables=True),
    Scenario("moe-fp32-ref-p1", 102, 15, layer_idx=1, page_size=1, num_pages=150, max_len=25),
    Scenario("dense-bf16-ref-fp8cache-p61", 103, 30, dtype=torch.bfloat16, cache="fp8", page_size=61, num_pages=6,
             max_len=70, max_chunk=20),
    Scenario("dense-fp32-ref-inference-mode-cache", 104, 15, inference_cache=True, fork=0.1),
    Scenario("v32-dense-fp32-ref-inference-mode-cache", 105, 12, v32=True, inference_cache=True),
    Scenario("dense-fp32-triton-p5", 106, 8, backend="triton", max_len=16, max_batch=4, pad_rows=0.3,
             persistent=0.3),
    Scenario("dense-fp32-ref-reject", 107, 30, reject=0.7, fork=0.1, max_len=20),
    Scenario("v32-dense-fp32-ref-reject", 108, 16, v32=True, reject=0.7, max_len=16),
    Scenario("v32-dense-fp32-triton-reject", 109, 10, v32=True, backend="triton", max_len=16, max_batch=4,
             reject=0.6),
]
OPS_SCENARIOS = [
    OpsScenario("ops-bf16-ref-p64-new-form", 201, 12, backend="ref", new_form=True, persistent=0.3),
    OpsScenario("ops-fp8-ref-p5", 202, 12, backend="ref", fp8=True, page_size=5, num_pages=300, max_len=80),
    OpsScenario("ops-bf16-triton-p61", 203, 6, page_size=61, num_pages=12, max_len=130, h_q=4, layers=2,
                max_batch=4, persistent=0.5),
]


def _skip_without(backend):
    if backend not in dskernels.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")


@pytest.mark.parametrize("sc", LAYER_SCENARIOS, ids=lambda sc: sc.name)
def test_layer_serving_scenario(sc):
    pytest.importorskip("transformers")
    _skip_without(sc.backend)
    stats = run_scenario(sc, log=lambda *a: None)
    assert stats["steps"] >= sc.steps // 2 and stats["tokens"] > 0, stats
    assert not sc.reject or stats.get("rejected"), stats
    assert not stats["fails"], (stats["fails"][:2], stats["max_err"])


@pytest.mark.parametrize("sc", OPS_SCENARIOS, ids=lambda sc: sc.name)
def test_ops_serving_scenario(sc):
    _skip_without(sc.backend)
    stats = run_ops_scenario(sc, log=lambda *a: None)
    assert stats["steps"] >= sc.steps // 2 and stats["calls"] > 0, stats
    assert not stats["fails"], stats["fails"][:2]
