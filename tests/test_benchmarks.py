"""The main job, `python benchmarks/run.py`, on this machine: every family's cases run on every
backend available and agree with the oracle (on CPU: tiny shapes, Triton through its interpreter)."""

import contextlib
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_py_checks_every_family(tmp_path):
    results = tmp_path / "results.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--json", str(results)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = json.loads(results.read_text())["records"]
    assert {"per_token_cast_to_fp8", "gemm_fp8_fp8_bf16_nt", "flash_mla_with_kvcache",
            "ep_get_dispatch_layout"} <= {r["op"] for r in records}
    assert all(r["error"] is None for r in records)
    assert "op" in out.stdout and "backend" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side: cuda cannot run here")
def test_run_py_names_backends_that_cannot_run_here():
    """--backends cuda on a machine without a GPU said "no benchmark case matched --ops/--backends"
    (an auditor's find): it now says that the backend does not run here."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--ops", "fp8_cast",
                          "--backends", "cuda"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "--backends cuda: none of them runs here" in out.stdout, out.stdout + out.stderr


def test_every_grid_builds():
    """Every family's case list, quick and full, for the CPU and for a GPU (built, not run): the
    full grids run only on a device (QUICK=0), where a broken one would end the call. A full fp8
    cast grid once named a case function a refactor had removed."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import _family_cases, families

    for device in ("cpu", "cuda"):
        for quick in (True, False):
            for family in families():
                cases = _family_cases(family, quick, device)
                assert family == "pipeline" or cases, (family, quick, device)


@pytest.mark.parametrize("asked,cases", [
    ("per_token_cast_to_fp8", ["dtype=bfloat16 [ref]"]),
    ("per_token_cast_to_fp8@ue8m0=True", ["ue8m0=True [ref]"]),
    ("per_token_cast_to_fp8,per_token_cast_to_fp8@ue8m0=True", ["dtype=bfloat16 [ref]", "ue8m0=True [ref]"]),
])
def test_profile_prints_where_the_time_goes(asked, cases):
    """--profile: for each request the named op's first case (or the first whose shape has the
    words after @), once per backend, under torch.profiler."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick",
                          "--ops", "per_token_cast_to_fp8", "--profile", asked],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    profiles = [line for line in out.stdout.splitlines() if line.startswith("profile per_token_cast_to_fp8 ")]
    assert len(profiles) == 2 * len(cases), profiles
    for i, case in enumerate(cases):
        assert case in profiles[2 * i] and "[triton]" in profiles[2 * i + 1], profiles
    assert "dskernels::per_token_cast_to_fp8" in out.stdout


def test_graph_key_follows_the_variant_knobs(monkeypatch):
    """A graph captured for one variant is not replayed for another that forces other kernels."""
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.common import graph_key

    x = torch.zeros(3)
    monkeypatch.delenv("DSKERNELS_ROUTER_TILE", raising=False)
    default = graph_key((x, 2))
    monkeypatch.setenv("DSKERNELS_ROUTER_TILE", "1,1")
    forced = graph_key((x, 2))
    assert forced != default
    monkeypatch.setenv("SOME_OTHER_VARIABLE", "1")  # variables outside DSKERNELS_* do not matter
    assert graph_key((x, 2)) == forced


def test_variant_environment_is_restored(monkeypatch):
    """run.py forces a cuda variant's configuration through environment variables for the duration
    of its timing only: an unset variable is removed again, a set one gets its value back."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import environment

    monkeypatch.delenv("DSKERNELS_GEMM_DENSE_CONFIG", raising=False)
    monkeypatch.setenv("DSKERNELS_MLA_NO_TMA", "0")
    with environment({"DSKERNELS_GEMM_DENSE_CONFIG": "m64", "DSKERNELS_MLA_NO_TMA": "1"}):
        assert os.environ["DSKERNELS_GEMM_DENSE_CONFIG"] == "m64" and os.environ["DSKERNELS_MLA_NO_TMA"] == "1"
    assert "DSKERNELS_GEMM_DENSE_CONFIG" not in os.environ and os.environ["DSKERNELS_MLA_NO_TMA"] == "0"


def test_records_say_when_the_tree_was_not_head(tmp_path):
    """The records' git sha is HEAD's, marked +dirty where tracked files were edited since (a device
    call runs the working tree it was sent); untracked files (build outputs) do not count."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import git_sha

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "kernel.py").write_text("a = 1\n")
    git("add", "kernel.py")
    git("commit", "-q", "-m", "one")
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, text=True).strip()
    (tmp_path / "build.so").write_text("")
    assert git_sha(str(tmp_path)) == head
    (tmp_path / "kernel.py").write_text("a = 2\n")
    assert git_sha(str(tmp_path)) == head + "+dirty"
    assert git_sha(str(tmp_path / "no-such-dir")) == "unknown"


def test_ops_run_in_the_order_named():
    """A device call short of time names what matters first in --ops (scripts/gpu_check.sh):
    run.py keeps that order, by family or op name, and takes everything when --ops is empty."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import selected_cases

    named = [(family, case.op) for family, case in selected_cases("mla,per_block_cast_to_fp8,gemm", True, "cpu")]
    order = [family for family, _ in named]
    assert order == sorted(order, key=["mla", "fp8_cast", "gemm"].index) and set(order) == {"mla", "fp8_cast", "gemm"}
    assert {op for family, op in named if family == "fp8_cast"} == {"per_block_cast_to_fp8"}
    assert {"mla", "fp8_cast", "gemm", "ep", "model"} <= {family for family, _ in selected_cases("", True, "cpu")}


def test_a_run_that_writes_nothing_is_caught():
    """Every backend is checked before any is timed, and each checked output is poisoned: a kernel
    that leaves its output alone cannot pass on what the previous backend wrote there (here the
    shared `out` argument, as the GEMM cases pass it)."""
    import torch

    import dskernels

    sys.path.insert(0, ROOT)
    from benchmarks.common import Case
    from benchmarks.run import Report, run_case

    def run(x, out):
        if dskernels.current_backend() == "ref":
            out.copy_(x * 2)
        return out

    case = Case(op="double", params={"n": 4}, make_inputs=lambda device: (torch.arange(4.0), torch.empty(4)),
                run=run, reference=lambda x, out: x * 2,
                check=lambda got, want: None if torch.equal(got, want) else "differs",
                flops=0.0, bytes=32.0, backends=("ref", "triton"))
    failures = []
    run_case(case, "cpu", ["ref", "triton"], {}, {"device": "cpu", "git_sha": "-", "torch": "-", "date": "-"},
             Report(), [], failures)
    assert failures == ["double [triton] n=4: differs"]


def test_model_prefill_flops_match_the_operations_run():
    """bench_model's FLOP count for a dense layer's prefill equals what torch's FLOP counter sees
    in the tiny layer (SDPA's math path computes the whole causal square, so the count is taken
    with context = tokens here; the benchmark uses tokens / 2, the useful half)."""
    sys.path.insert(0, ROOT)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_model import _flops_bytes
    from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer

    cfg = DeepseekV3Config.tiny()
    assert cfg.first_k_dense_replace >= 1  # layer 0 is dense: no custom ops the counter cannot see
    layer = DeepseekV3DecoderLayer(cfg, 0).float()
    layer.weights_loaded = True  # (FLOPs need no weights)
    batch, tokens = 2, 7
    x = torch.randn(batch, tokens, cfg.hidden_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x, torch.arange(tokens).expand(batch, tokens))
    flops, _ = _flops_bytes(cfg, 0, batch * tokens, tokens, 0, 4, prefill=True)
    assert flops == counter.get_total_flops()


def test_model_v32_prefill_counts_the_tokens_each_query_selects(monkeypatch):
    """V3.2's prefill attends, at position p, to min(index_topk, p + 1) tokens (the indexer's -1
    entries are skipped): bench_model's attention FLOPs follow the lists the layer passes to
    flash_mla_sparse_fwd, not min(index_topk, tokens / 2) (2048 for a mean of 1536 at 4096 tokens).
    The count's other terms do not depend on index_topk: a top-1 config takes them out."""
    import dataclasses

    sys.path.insert(0, ROOT)
    import dskernels
    from benchmarks import bench_model

    selected = []
    sparse_fwd = dskernels.flash_mla_sparse_fwd

    def counting(q, kv, indices, *args, **kwargs):
        selected.append(int((indices >= 0).sum()))
        return sparse_fwd(q, kv, indices, *args, **kwargs)

    monkeypatch.setattr(dskernels, "flash_mla_sparse_fwd", counting)
    layer, _ = bench_model.build("tiny32", 0, "cpu", False)
    cfg, batch, tokens = layer.cfg, 2, 23
    assert cfg.index_topk < tokens
    with torch.no_grad():
        layer(torch.randn(batch, tokens, cfg.hidden_size), torch.arange(tokens).expand(batch, tokens))
    assert len(selected) == 1 and selected[0] < batch * tokens * cfg.index_topk
    top1 = dataclasses.replace(cfg, index_topk=1)
    flops, top1_flops = (bench_model._flops_bytes(c, 0, batch * tokens, tokens / 2, 0, 4, prefill=True)[0]
                         for c in (cfg, top1))
    per_token = 2 * cfg.num_attention_heads * (cfg.kv_cache_dim + cfg.kv_lora_rank)
    assert flops - top1_flops == pytest.approx(per_token * (selected[0] - batch * tokens), rel=1e-12)


def test_model_decode_bytes_count_the_experts_a_batch_touches():
    """bench_model's decode bytes read the routed experts the batch's tokens pick: V3's router
    (python_ref.grouped_topk: 8 of 256 experts, 4 of 8 groups) on random logits touches
    256 * (1 - (1 - 8/256)^B) experts on average; min(256, 8B) counted 256 at B = 32 for ~163.
    The mean of 64 draws is within 3 experts (about 4 of its standard errors) of the count."""
    sys.path.insert(0, ROOT)
    import python_ref
    from benchmarks.bench_model import _config, _flops_bytes

    cfg = _config("v3")
    assert cfg.is_moe_layer(3)
    experts, expert_bytes = cfg.n_routed_experts, 3 * cfg.hidden_size * cfg.moe_intermediate_size
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 8, 32, 128):
        touched = [python_ref.grouped_topk(torch.randn(tokens, experts, generator=gen), torch.zeros(experts),
                                           cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, True, 1.0)[0]
                   .unique().numel() for _ in range(64)]
        def weights(layer):  # the weight bytes at one byte per weight (the cache's bytes taken out)
            return (_flops_bytes(cfg, layer, tokens, 4096, tokens, 1)[1]
                    - _flops_bytes(cfg, layer, tokens, 4096, tokens, 0)[1])

        attention = weights(0) - 3 * cfg.hidden_size * cfg.intermediate_size  # layer 0: dense, the same attention
        counted = (weights(3) - attention) / expert_bytes - cfg.n_shared_experts
        assert abs(counted - statistics.mean(touched)) < 3, (tokens, counted, statistics.mean(touched))


@pytest.mark.parametrize("config", ["tiny", "tiny32"])
@pytest.mark.parametrize("fp8", [True, False])
def test_model_decode_bytes_read_each_weight_in_its_dtype(config, fp8):
    """A decode step's weight bytes are those of the tensors the benchmark's layer reads (built as
    bench_model.build does on a GPU): W_UK / W_UV absorbed in bf16 instead of kv_b_proj (FP8 in
    the FP8 layer), the router's gate and V3.2's weights_proj in fp32, one token's 8 experts.
    Norms and the FP8 block scales (4 bytes per 128 x 128 weights) are left out of both."""
    sys.path.insert(0, ROOT)
    from benchmarks import bench_model
    from dskernels.models import DeepseekV3DecoderLayer

    cfg = bench_model._config(config)
    layer = DeepseekV3DecoderLayer(cfg, 1, dtype=torch.bfloat16, device="cpu", fp8=False)
    layer.load_hf_state_dict(bench_model.random_checkpoint(cfg, 1, "cpu", True), fp8=fp8)
    layer.self_attn.absorb(torch.bfloat16)  # as the first cached call does
    assert layer.self_attn.w_uk.dtype == torch.bfloat16
    read = sum(t.nbytes for name, t in layer.named_parameters() if t.dim() >= 2 and "scale" not in name
               and "kv_b_proj" not in name and "mlp.experts." not in name)
    read += layer.self_attn.w_uk.nbytes + layer.self_attn.w_uv.nbytes
    read += cfg.num_experts_per_tok * (layer.mlp.experts.gate_up_proj[0].nbytes + layer.mlp.experts.down_proj[0].nbytes)
    assert bench_model._flops_bytes(cfg, 1, 1, 4096, 0, 1 if fp8 else 2)[1] == read


def _torch_blockwise_layout_check(newer: bool):
    """A stand-in for torch._scaled_mm's scale-layout check on sm90 (ATen ScaledBlas.cpp,
    get_joint_scaling): (1x128, 128x128) and (1x128, 1x128), scale_b checked transposed against
    b.t(). newer: the 128x128 scales' outer stride rounded up to a multiple of 4."""
    def blockwise_1x128(t, scale):
        rows, blocks = t.shape[0], -(-t.shape[1] // 128)
        return tuple(scale.shape) == (rows, blocks) and (scale.stride(0) == 1 or rows <= 1) \
            and (scale.stride(1) == rows or blocks <= 1)

    def blockwise_128x128(t, scale):
        rows, blocks = -(-t.shape[0] // 128), -(-t.shape[1] // 128)
        outer = -(-blocks // 4) * 4 if newer else blocks
        return tuple(scale.shape) == (rows, blocks) and (scale.stride(0) == outer or rows <= 1) \
            and (scale.stride(1) == 1 or blocks <= 1)

    def scaled_mm(a, b, scale_a, scale_b, out_dtype):
        if not blockwise_1x128(a, scale_a) or not (blockwise_128x128(b.t(), scale_b.t())
                                                   or blockwise_1x128(b.t(), scale_b.t())):
            raise RuntimeError("Invalid scaling configuration.")
        k, n = a.shape[1], b.shape[1]
        expanded_b = scale_b.repeat_interleave(128, dim=0)[:k]  # [k, n / 128] or [k, n]
        if expanded_b.shape[1] != n:
            expanded_b = expanded_b.repeat_interleave(128, dim=1)[:, :n]
        product = (a.float() * scale_a.repeat_interleave(128, dim=1)[:, :k]) @ (b.float() * expanded_b)
        return product.to(out_dtype)

    return scaled_mm


def test_scaled_mm_peer_finds_the_layout_torch_checks(monkeypatch):
    """The bench's torch._scaled_mm peer from the scales the GEMM cases pass (column-major sb,
    TMA-aligned sa), against both releases' checks: the H200 run's peer tried none that passed."""
    import pytest
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import bench_gemm

    monkeypatch.delattr(torch.nn.functional, "scaled_mm", raising=False)
    for newer in (False, True):
        monkeypatch.setattr(torch, "_scaled_mm", _torch_blockwise_layout_check(newer))
        for m, n, k, per_block in ((64, 2112, 7168, True), (200, 300, 640, True), (256, 384, 512, False)):
            _, a, sa = bench_gemm._cast_pair(m, k, "cpu", per_block=False)
            _, b, sb = bench_gemm._cast_pair(n, k, "cpu", per_block=per_block)
            peer = bench_gemm._scaled_mm_peer()
            assert peer(a, sa, b, sb, None).shape == (m, n)
    monkeypatch.setattr(torch, "_scaled_mm", _torch_blockwise_layout_check(True))
    _, a, sa = bench_gemm._cast_pair(64, 256, "cpu", per_block=False)
    _, b, sb = bench_gemm._cast_pair(128, 256, "cpu", per_block=True)
    with pytest.raises(RuntimeError, match="no blockwise scale layout accepted"):
        bench_gemm._scaled_mm_peer()(a, sa[:, :1], b, sb, None)
    # A layout accepted but read otherwise (here: every one, as zeros) is no peer of this product.
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kwargs: a.new_zeros(a.shape[0], b.shape[1],
                                                                                 dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="a layout accepted, but calc_diff"):
        bench_gemm._scaled_mm_peer()(a, sa, b, sb, None)


def test_grouped_scaled_mm_peer_does_our_rows(monkeypatch):
    """The grouped GEMMs' torch._scaled_mm peer multiplies each group's rows (the masked layout's
    valid ones only) by that group's weights, as ours does."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import bench_gemm
    from python_ref import gemm as ref

    monkeypatch.delattr(torch.nn.functional, "scaled_mm", raising=False)
    monkeypatch.setattr(torch, "_scaled_mm", _torch_blockwise_layout_check(True))
    groups, m_max, n, k, counts = 3, 136, 200, 256, [100, 0, 136]
    _, a, sa = bench_gemm._cast_pair(m_max, k, "cpu", per_block=False, groups=groups)
    _, b, sb = bench_gemm._cast_pair(n, k, "cpu", per_block=True, groups=groups)
    outs = bench_gemm._grouped_scaled_mm_peer(list(enumerate(counts)))(a, sa, b, sb, None)
    assert [o.shape[0] for o in outs] == [100, 136]
    for out, g in zip(outs, (0, 2)):
        rows = counts[g]
        expected = ref.gemm_fp8_fp8_bf16_nt(a[g, :rows], sa[g, :rows], b[g], sb[g])
        assert torch.equal(out, expected)
    flat, flat_scales = a.reshape(-1, k), sa.reshape(-1, sa.shape[-1])  # the contiguous layout
    outs = bench_gemm._grouped_scaled_mm_peer([(0, 50), (50, 86), (136, 0)])(flat, flat_scales, b, sb, None)
    assert torch.equal(outs[1], ref.gemm_fp8_fp8_bf16_nt(flat[50:136], flat_scales[50:136], b[1], sb[1]))


def test_gemm_peers_do_the_work_counted(monkeypatch):
    """Each peer of a GEMM case (but the masked layout's all-rows bmm, there by design) multiplies
    as many rows as the case counts FLOPs for: its "x peer" compares the same work. The bf16 masked
    case's bmm peer multiplied expected_m rows per group (1 x 1024 where the draw has 908)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, ROOT)
    from benchmarks import bench_gemm

    monkeypatch.delattr(torch.nn.functional, "scaled_mm", raising=False)
    monkeypatch.setattr(torch, "_scaled_mm", _torch_blockwise_layout_check(True))
    cases = [bench_gemm._dense_case(64, 256, 384, "cuda"), bench_gemm._contiguous_case(2, 128, 256, 384, "cuda"),
             bench_gemm._masked_case(3, 40, 256, 384, "cuda", m_max=64),
             bench_gemm._bf16_masked_case(3, 40, 256, 384, "cuda", m_max=64),
             bench_gemm._weight_gradient_case(64, 256, 384, "cuda"),
             bench_gemm._k_grouped_case(2, 128, 64, 256, "cuda"),
             bench_gemm._fp8_einsum_case("bhr,hdr->bhd", 3, 2, "cuda")]
    for case in cases:
        inputs = case.make_inputs("cpu")
        for name, peer in case.peers.items():
            if name == "torch.bmm bf16 (all rows)":
                continue
            peer(*inputs)  # the first call picks _scaled_mm's scale layout (checked against the oracle)
            with FlopCounterMode(display=False) as counter:
                peer(*inputs)
            assert counter.get_total_flops() == case.flops, (case.op, case.params, name)


def test_mla_plans_follow_the_variant(monkeypatch):
    """bench_mla plans the split once per backend and variant, outside the timing: a variant that
    changes the plan (DSKERNELS_MLA_CLUSTER pads the sm90 tiles to pairs) gets its own, not the
    plain backend's (the plan was cached by backend alone)."""
    import dskernels

    sys.path.insert(0, ROOT)
    from benchmarks import bench_mla
    from benchmarks.run import environment

    planned = []
    real = dskernels.get_mla_metadata
    monkeypatch.setattr(dskernels, "get_mla_metadata", lambda *args: planned.append(
        os.environ.get("DSKERNELS_MLA_CLUSTER")) or real(*args))
    monkeypatch.delenv("DSKERNELS_MLA_CLUSTER", raising=False)
    case = bench_mla._case(2, 1, 4, 1, 64, 48, 90, False, 16, torch.bfloat16, False)
    inputs = case.make_inputs("cpu")
    with dskernels.backend("ref"):
        for env in ({}, bench_mla.MLA_CUDA_VARIANTS["cluster"], {}, bench_mla.MLA_CUDA_VARIANTS["cluster"]):
            with environment(env):
                case.run(*inputs)
    assert planned == [None, "1"]


def test_mla_invariant_rows_plan_in_the_mode(monkeypatch):
    """bench_mla's invariant variants (triton[invariant], cuda[invariant], K = 4 and K = 1) time the
    decode on the mode's own plan: the plan cache is keyed by the mode and K (however the mode is
    switched on), so neither reuses the default plan nor one of another K; each run checks against
    the oracle. Runs here on CPU through the interpreter (run.py times variants on a GPU only)."""
    import dskernels

    sys.path.insert(0, ROOT)
    from benchmarks import bench_mla
    from benchmarks.run import environment

    planned = []
    real = dskernels.get_mla_metadata

    def plan(*args):
        meta, num_splits = real(*args)
        planned.append(meta.shape[0])
        return meta, num_splits

    monkeypatch.setattr(dskernels, "get_mla_metadata", plan)
    for name in ("DSKERNELS_BATCH_INVARIANT", "DSKERNELS_MLA_INVARIANT_SPLITS"):
        monkeypatch.delenv(name, raising=False)
    b = 3
    case = bench_mla._case(b, 2, 4, 1, 64, 48, 70, True, 16, torch.bfloat16, True)
    assert {"invariant", "invariant_k1"} <= set(case.triton_variants) & set(case.cuda_variants)
    inputs = case.make_inputs("cpu")
    expected = case.reference(*inputs)
    default_parts = real(inputs[3], 8, 1)[0].shape[0]
    variants = bench_mla.MLA_INVARIANT_VARIANTS
    with dskernels.backend("triton"):
        for env, scoped in [({}, False), (variants["invariant"], False), (variants["invariant_k1"], False),
                            ({}, False), ({}, True), (variants["invariant"], False), ({}, True)]:
            with environment(env), dskernels.batch_invariant() if scoped else contextlib.nullcontext():
                assert case.check(case.run(*inputs), expected) is None, (env, scoped)
    assert planned == [default_parts, b * 4, b * 1, b * 4], planned
    sparse = bench_mla.cases(False, "cuda")[-3]
    assert sparse.op == "flash_mla_sparse_decode" and "invariant" in sparse.triton_variants


def test_model_invariant_rows_run_here(monkeypatch):
    """bench_model's auto[invariant] / auto[invariant_graph] rows (the FP8-weight V3 decode in the
    mode, beside auto and auto[graph]): on the GPU grids, quick and full, once the mode's GPU tests
    passed (the flag gpu_check.sh sets); their environment runs the CPU decode case (the graph one
    eager: CPU tensors) within the case's check."""
    import dskernels

    sys.path.insert(0, ROOT)
    from benchmarks import bench_model
    from benchmarks.run import environment

    monkeypatch.delenv(bench_model.INVARIANT_TESTED_ENV, raising=False)
    assert not any("invariant" in case.auto_variants for case in bench_model.cases(True, "cuda"))
    monkeypatch.setenv(bench_model.INVARIANT_TESTED_ENV, "1")
    for quick in (True, False):
        rows = [case for case in bench_model.cases(quick, "cuda") if "invariant" in case.auto_variants]
        assert rows and all(c.op == "deepseek_v3_layer_decode" and c.params["weights"] == "fp8"
                            and "kv_cache" not in c.params and "invariant_graph" in c.auto_variants for c in rows)
    case = bench_model.decode_case("tiny", 0, 2, 20, False, "cpu", invariant_rows=True)
    inputs = case.make_inputs("cpu")
    expected = case.reference(*inputs)
    with dskernels.backend("triton"):
        for env in bench_model.INVARIANT_VARIANTS.values():
            with environment(env):
                assert dskernels.batch_invariant_enabled()
                assert case.check(case.run(*inputs), expected) is None, env


def test_every_target_names_one_case_of_the_full_grid(monkeypatch):
    """benchmarks/targets.py's shapes are cases of the families' full GPU grids (run.py --targets
    times them): each shape matches exactly one case of its op, whose backends, peers and (once
    their tests passed: the *_TESTED flags gpu_check.sh sets) candidate variants are the target's."""
    sys.path.insert(0, ROOT)
    from benchmarks import bench_gemm, targets
    from benchmarks.run import target_cases

    for flag in ("DSKERNELS_GEMM_TMA_WS_TESTED", "DSKERNELS_GEMM_SPLITK_TESTED", "DSKERNELS_MLA_SEESAW_TESTED",
                 "DSKERNELS_MLA_NARROW_TESTED", "DSKERNELS_GEMM_RASTER_TESTED"):
        monkeypatch.setenv(flag, "1")
    assert targets.DENSE_NK == bench_gemm.DENSE_NK
    selected = target_cases("", "cuda")
    for target in targets.TARGETS:
        for shape in target.shapes:
            found = [(case, labels) for _, case, labels in selected
                     if case.op == target.op and targets.matches(case.params, shape)]
            assert len(found) == 1, (target.what, shape, len(found))
            case, labels = found[0]
            assert target.backend in case.backends
            variants = {f"{backend}[{label}]" for backend, table in (("triton", case.triton_variants),
                                                                     ("cuda", case.cuda_variants)) for label in table}
            assert set(target.candidates) <= variants, (target.what, shape, target.candidates)
            if target.metric.startswith("x "):
                assert target.metric[len("x peer:"):] in case.peers
    assert [case.op for _, case, _ in target_cases("mla", "cuda")] == ["flash_mla_with_kvcache"] * 2


def _record(op, backend, params, ms, **metrics):
    return {"op": op, "backend": backend, "params": params, "ms": ms, "error": None, **metrics}


def test_targets_combine_shapes_as_stated():
    """Geometric mean over the shapes, or the minimum where every shape must reach the goal; a
    ratio target divides the peer's time by ours per shape; failed records and unmeasured shapes
    do not count (a partial geomean is no verdict, a partial minimum below the goal is)."""
    sys.path.insert(0, ROOT)
    from benchmarks.targets import Target, evaluate

    geo = Target(0, "geo", "op", "cuda", ({"n": 1}, {"n": 2}), "tflops", 100.0)
    records = [_record("op", "cuda", {"n": 1, "k": 5}, 1.0, tflops=50.0),
               dict(_record("op", "cuda", {"n": 2, "k": 5}, 1.0, tflops=1e6), error="wrong"),
               _record("op", "cuda", {"n": 2, "k": 5}, 1.0, tflops=200.0),
               _record("op", "triton", {"n": 2, "k": 5}, 1.0, tflops=900.0)]
    assert evaluate(geo, "cuda", records) == {"value": 100.0, "measured": 2, "shapes": 2, "met": True, "clocks": ""}
    assert evaluate(geo, "cuda", records[2:]) == {"value": 200.0, "measured": 1, "shapes": 2, "met": None, "clocks": ""}
    # the latest record of a shape counts: a later failed run is no measurement, an earlier one is no credit
    failed_again = [*records, dict(_record("op", "cuda", {"n": 2, "k": 5}, 1.0, tflops=1e6), error="wrong")]
    assert evaluate(geo, "cuda", failed_again)["measured"] == 1
    assert evaluate(geo, "ref", records)["value"] is None

    ratio = Target(0, "ratio", "op", "cuda", ({"n": 1}, {"n": 2}), "x peer:torch", 1.2, combine="min")
    timed = [_record("op", "cuda", {"n": 1}, 1.0), _record("op", "peer:torch", {"n": 1}, 1.5),
             _record("op", "cuda", {"n": 2}, 2.0), _record("op", "peer:torch", {"n": 2}, 2.2)]
    result = evaluate(ratio, "cuda", timed)
    assert abs(result["value"] - 1.1) < 1e-12 and result["met"] is False
    assert evaluate(ratio, "cuda", timed[:2]) == {"value": 1.5, "measured": 1, "shapes": 2, "met": None, "clocks": ""}
    assert evaluate(ratio, "cuda", timed[1:])["met"] is False  # n=2 alone is below the goal already


def test_bandwidth_goals_follow_the_devices_copy_bandwidth():
    """The issues' GB/s goals are an H100's: another device's are scaled by its measured copy
    bandwidth over an H100's (an H200 copies ~40% faster, so 2967 GB/s is not FlashMLA's 2800 there);
    TFLOPS goals, and every goal on an H100, stand as stated."""
    sys.path.insert(0, ROOT)
    from benchmarks.targets import H100_COPY_GBPS, TARGETS, device_goal, table

    bandwidth = next(t for t in TARGETS if t.issue == 8 and t.metric == "gbps")
    compute = next(t for t in TARGETS if t.issue == 8 and t.metric == "tflops")
    assert device_goal(bandwidth, "NVIDIA H100 80GB HBM3", 3300.0) == bandwidth.goal
    assert device_goal(bandwidth, "NVIDIA H200", 2 * H100_COPY_GBPS) == 2 * bandwidth.goal
    assert device_goal(bandwidth, "NVIDIA H200", None) == bandwidth.goal
    assert device_goal(compute, "NVIDIA H200", 2 * H100_COPY_GBPS) == compute.goal
    shape = bandwidth.shapes[0]
    records = [_record(bandwidth.op, "cuda", shape, 1.0, gbps=1.5 * bandwidth.goal)]
    row = [line for line in table({"NVIDIA H200": records}, {"NVIDIA H200": 2 * H100_COPY_GBPS}).splitlines()
           if line.startswith(f"| #8 | {bandwidth.what} | cuda |")][0]
    assert f"({2 * bandwidth.goal:.0f} at this device's" in row and "| no |" in row, row
    sxm = "NVIDIA H100 80GB HBM3"
    row = [line for line in table({sxm: records}, {sxm: 2 * H100_COPY_GBPS}).splitlines()
           if line.startswith(f"| #8 | {bandwidth.what} | cuda |")][0]
    assert "at this device's" not in row and "| yes |" in row, row


@pytest.mark.parametrize("device,scaled", [("NVIDIA H100 80GB HBM3", False), ("NVIDIA H100 SXM5 80GB", False),
                                           ("NVIDIA H100 PCIe", True), ("NVIDIA H100 NVL", True),
                                           ("NVIDIA H200", True)])
def test_only_the_h100_sxm_keeps_the_bandwidth_goals_as_stated(device, scaled):
    """The H100 PCIe (HBM2e, ~2 TB/s) and NVL (~3.9 TB/s) are named "H100" too, but not the memory
    system the GB/s goals were set for: their goals follow their measured copy bandwidth."""
    sys.path.insert(0, ROOT)
    from benchmarks.targets import H100_COPY_GBPS, TARGETS, device_goal

    bandwidth = next(t for t in TARGETS if t.issue == 8 and t.metric == "gbps")
    expected = bandwidth.goal * 2000.0 / H100_COPY_GBPS if scaled else bandwidth.goal
    assert device_goal(bandwidth, device, 2000.0) == pytest.approx(expected)


def test_perf_table_shows_only_labels_the_benchmarks_define():
    """scripts/perf_table.py leaves out records of variants dropped or renamed since they were
    timed (their rows would contradict today's meaning of the labels beside them)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import perf_table

    flags = {flag: os.environ.get(flag) for flag in ("DSKERNELS_MLA_SEESAW_TESTED", "DSKERNELS_GEMM_SPLITK_TESTED")}
    labels = perf_table.current_labels()
    for known in [("flash_mla_with_kvcache", "cuda[cluster]"), ("flash_mla_with_kvcache", "cuda[seesaw]"),
                  ("gemm_fp8_fp8_bf16_nt", "cuda[m64_splitk]"), ("gemm_fp8_fp8_bf16_nt", "peer:torch._scaled_mm"),
                  ("gemm_fp8_fp8_bf16_nt", "triton[graph]"), ("flash_mla_with_kvcache", "cuda[invariant]"),
                  ("flash_mla_with_kvcache", "triton[invariant_k1]"), ("deepseek_v3_layer_decode", "auto[invariant]"),
                  ("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "cuda[raster_n]")]:
        assert known in labels, known
    assert ("flash_mla_with_kvcache", "cuda[no_cluster]") not in labels  # clusters are opt-in since 2026-12-04
    assert {flag: os.environ.get(flag) for flag in flags} == flags  # the opt-in flags restored


def test_perf_table_shows_the_peer_each_x_peer_is_against():
    """A row's "x peer" is its time against the fastest peer of its shape, so that peer's row is in
    the table too, whichever peer it is (transformers' layer, _scaled_mm, a bf16 mm ...)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import perf_table

    table, labels = perf_table.table(), perf_table.current_labels()
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")):
        with open(path) as f:
            records = json.load(f)["records"]
        for r in records:
            timed = not r.get("error") and r["ms"] is not None and r["ms"] == r["ms"]
            if r["backend"].startswith("peer:") and timed and (r["op"], r["backend"]) in labels:
                shape = perf_table.shape_text(r["params"])
                assert f"| {r['op']} | {shape} | {r['backend']} | {r['ms'] * 1e3:.1f} |" in table, (r["op"], shape)


def test_targets_show_the_clocks_their_runs_had():
    """The SM clocks (lowest to highest) of the records that decide a target, with any slowdown
    reason NVML gave; records without readings show none."""
    sys.path.insert(0, ROOT)
    from benchmarks.targets import Target, evaluate

    geo = Target(0, "geo", "op", "cuda", ({"n": 1}, {"n": 2}), "tflops", 100.0)
    cold = {"sm_mhz": 1980, "max_sm_mhz": 1980, "power_w": 400.0, "temp_c": 50, "slowdowns": [], "readings": 3}
    hot = {**cold, "sm_mhz": 1710, "slowdowns": ["sw_power_cap"]}
    records = [dict(_record("op", "cuda", {"n": 1}, 1.0, tflops=90.0), gpu=hot),  # superseded below
               dict(_record("op", "cuda", {"n": 1}, 1.0, tflops=100.0), gpu=cold),
               dict(_record("op", "cuda", {"n": 2}, 1.0, tflops=100.0), gpu=hot)]
    assert evaluate(geo, "cuda", records)["clocks"] == "1710-1980 (sw_power_cap)"
    assert evaluate(geo, "cuda", records[:2])["clocks"] == "1980"
    assert evaluate(geo, "cuda", [_record("op", "cuda", {"n": 1}, 1.0, tflops=1.0)])["clocks"] == ""


class SimulatedTimeline:
    """A host and a device in simulated milliseconds, for bench.timed_loop: the device runs queued
    work in order, each piece when queued and the previous one done; events take the device's time
    as it reaches them; the driver holds at most `queue_limit` pieces, a full queue blocking the
    host until the oldest is done (as a real launch queue does)."""

    def __init__(self, queue_limit=1024):
        self.now, self.device_free, self.pending, self.queue_limit = 0.0, 0.0, [], queue_limit
        self.spins = 0

    def clock(self):
        return self.now / 1e3

    def host(self, ms):
        self.now += ms

    def launch(self, ms, host_ms=0.002):
        self.host(host_ms)
        self.pending = sorted(t for t in self.pending if t > self.now)
        if len(self.pending) >= self.queue_limit:
            self.now = self.pending[len(self.pending) - self.queue_limit]
        self.device_free = max(self.now, self.device_free) + ms
        self.pending.append(self.device_free)
        return self.device_free

    def spin(self, ms):
        self.spins += 1
        self.launch(ms)

    def synchronize(self):
        self.now = max(self.now, self.device_free)

    def readings(self, done, begin):
        return []

    def event(self):
        timeline = self

        class Event:
            def record(self):
                self.at = timeline.launch(0.0)

            def query(self):
                return self.at <= timeline.now

            def elapsed_time(self, end):
                return end.at - self.at

        return Event()


def test_timed_loop_times_the_device_not_the_host():
    """bench.timed_loop against a simulated device: a call whose host work (0.1 ms) outlasts its
    kernel (0.02 ms) and the flush (0.08 ms) is timed at its kernel's 0.02 ms, with its host time
    beside it; the same loop without the spin (the old timing) reports ~0.03, host time. A call of
    100 launches, more than the launch queue holds over 30 runs, is queued in shorter stretches.
    A call that synchronizes cannot be queued: timed as it runs and said so, after a single call
    behind a long spin confirms it (a one-off host stall is not taken for one)."""
    from dskernels.testing import bench

    sim = SimulatedTimeline()
    flush = lambda: sim.launch(0.08)  # noqa: E731

    def host_bound():
        sim.host(0.1)
        sim.launch(0.02)

    loop = bench.timed_loop(host_bound, flush, 30, sim)
    assert loop["queued"] and len(loop["device_ms"]) == 30
    assert all(abs(ms - 0.02) < 1e-9 for ms in loop["device_ms"])
    assert all(0.1 <= ms < 0.11 for ms in loop["host_ms"])

    unqueued = []  # the timing before the spins: events around each call, behind the flush only
    for _ in range(30):
        flush()
        start, end = sim.event(), sim.event()
        start.record()
        host_bound()
        end.record()
        unqueued.append((start, end))
    sim.synchronize()
    assert statistics.median(s.elapsed_time(e) for s, e in unqueued) > 0.025

    def many_launches():
        for _ in range(100):
            sim.launch(0.001)

    loop = bench.timed_loop(many_launches, flush, 30, sim)
    assert loop["queued"] and len(loop["device_ms"]) == 30
    assert all(abs(ms - 0.1) < 1e-9 for ms in loop["device_ms"])

    def synchronizing():
        sim.launch(0.02)
        sim.synchronize()  # e.g. .item() on its result
        sim.host(0.01)

    sim.spins = 0
    loop = bench.timed_loop(synchronizing, flush, 30, sim)
    assert not loop["queued"] and len(loop["device_ms"]) == 30
    assert sim.spins == 2  # its first call outlasted the spin, and a single call a long one: no more tries
    assert all(ms >= 0.03 for ms in loop["device_ms"])

    calls = 0

    def stalls_once():  # a GC pause or preemption in the first timed call: not a sync
        nonlocal calls
        calls += 1
        sim.host(0.1 + (7.0 if calls == 3 else 0.0))  # (calls 1 and 2 size the spins)
        sim.launch(0.02)

    loop = bench.timed_loop(stalls_once, flush, 30, sim)
    assert loop["queued"] and all(abs(ms - 0.02) < 1e-9 for ms in loop["device_ms"])


@pytest.mark.gpu
def test_bench_gpu_times_the_device_behind_a_slow_host():
    """On the device: a call that spends 300 us on the host before a ~10 us kernel is timed at its
    kernel (well under the host's time, which is reported beside it); one that reads its result on
    the host cannot be queued and says so."""
    from dskernels.testing import bench

    x = torch.randn(1 << 20, device="cuda")

    def slow_host():
        until = time.perf_counter() + 300e-6
        while time.perf_counter() < until:
            pass
        return x.mul(2.0)

    state = {}
    ms = bench.bench_gpu(slow_host, telemetry=state)
    assert state["queued"] and state["host_ms"] >= 0.3
    assert ms < 0.1, (ms, state)

    state = {}
    bench.bench_gpu(lambda: x.sum().item(), telemetry=state)
    assert not state["queued"]


def test_gpu_readings_summarize_the_timed_loop(monkeypatch):
    """bench's NVML readings (faked here: no GPU): the loop's lowest SM clock, highest power and
    temperature, and every slowdown reason any reading had; none where pynvml is missing."""
    import types

    from dskernels.testing import bench

    class Done:  # the timed loop's last event: still running for the first two queries
        def __init__(self):
            self.queries = 0

        def query(self):
            self.queries += 1
            return self.queries > 2

    clocks = iter([1980, 1830, 1755])
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0, NVMLError=RuntimeError, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: ("handle", uuid),
        nvmlDeviceGetClockInfo=lambda h, which: next(clocks), nvmlDeviceGetMaxClockInfo=lambda h, which: 1980,
        nvmlDeviceGetPowerUsage=lambda h: 650_000, nvmlDeviceGetTemperature=lambda h, which: 71,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4 | 0x1)  # power cap, and the idle bit (no slowdown)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="abc"))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    bench._nvml_device.cache_clear()
    try:
        assert bench._nvml_device(0) == (fake, ("handle", "GPU-abc"))
        state = bench.summarize_readings(bench._readings_until(Done()))
        assert state == {"sm_mhz": 1755, "max_sm_mhz": 1980, "power_w": 650.0, "temp_c": 71,
                         "slowdowns": ["sw_power_cap"], "readings": 3}
        monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
        bench._nvml_device.cache_clear()
        assert bench.gpu_reading() is None and bench.summarize_readings(bench._readings_until(Done())) is None
    finally:
        bench._nvml_device.cache_clear()
    assert bench.summarize_readings([None]) is None

    sys.path.insert(0, ROOT)
    from benchmarks.run import clock_text

    assert clock_text(state) == "1755 (sw_power_cap)" and clock_text(None) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of run.py --targets (on a GPU it times them)")
def test_targets_need_a_gpu_to_run_and_read_recorded_results(tmp_path):
    """run.py --targets refuses without a GPU (the shapes are the devices'); targets.py reads results files."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--targets"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "needs a GPU" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"meta": {"device": "GPU X", "ceilings": {"copy_gbps": 1.0}}, "records": [
        _record("flash_mla_with_kvcache", "cuda", {"b": 128, "s_q": 2, "h_q": 128, "h_kv": 1, "seqlen": 4096,
                                                   "varlen": False, "page": 64, "cache": "bfloat16", "causal": True},
                0.5, tflops=600.0)]}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "targets.py"), str(results)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    row = [line for line in out.stdout.splitlines() if "s_q=2 h_q=128" in line]
    assert row and "| 600 |" in row[0] and "| yes | - | GPU X |" in row[0], out.stdout


def test_only_runs_the_labels_asked_for():
    """run_case(only=...): just those backends (and variants, peers); the rest is not run."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks.common import Case
    from benchmarks.run import Report, run_case

    ran = []

    def run(x):
        ran.append(__import__("dskernels").current_backend())
        return x * 2

    case = Case(op="double", params={"n": 4}, make_inputs=lambda device: (torch.arange(4.0),),
                run=run, reference=lambda x: x * 2, check=lambda got, want: None if torch.equal(got, want) else "differs",
                flops=0.0, bytes=32.0, backends=("ref", "triton"))
    records = []
    run_case(case, "cpu", ["ref", "triton"], {}, {"device": "cpu", "git_sha": "-", "torch": "-", "date": "-"},
             Report(), records, [], only={"triton"})
    assert set(ran) == {"triton"} and [r["backend"] for r in records] == ["triton"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny model on CPU (on a GPU it profiles the V3 layer)")
def test_profiling_scripts_run_here():
    """scripts/host_profile.py runs the layer's decode step under cProfile (here: the tiny model on
    CPU); scripts/ncu_cases.py's cases are target shapes (benchmarks/targets.py) it can build."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "host_profile.py"), "--steps", "2", "--rows", "5"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "ms per step" in out.stdout and "--- by tottime" in out.stdout and "layer.py" in out.stdout

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ncu_cases

    from benchmarks import targets

    for name, (kernel, what, build, env) in ncu_cases.CASES.items():
        case, backend = build()
        assert any(t.op == case.op and t.backend == backend and any(targets.matches(case.params, s) for s in t.shapes)
                   for t in targets.TARGETS), name


def test_host_profile_on_a_fake_gpu():
    """scripts/host_profile.py --fake-gpu: the tiny FP8 layer's decode step through the GPU's Python
    path (Triton compiling for sm_90a, its real launch path, dskernels.triton.launch's cache) on CPU
    tensors, every launch recorded: it runs end to end, each step launching the same 24 kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "host_profile.py"), "--fake-gpu", "--steps", "3",
                          "--rows", "30"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "fake sm_90a" in out.stdout and "; 24 Triton launches per step" in out.stdout, out.stdout[:2000]
    # the cached launches, in the profile: 4th-5th by own time on an idle machine, lower on a loaded one
    assert "launch.py" in out.stdout


def test_variants_are_timed_in_alternating_rounds():
    """On a GPU a case's runs (the default, then its forced configs and variants) are timed in
    rounds, forward and backward, and each gets the mean of its rounds: a clock that sinks steadily
    as the GPU heats (here each call 1 ms slower than the last) biases none of them. Timed one after
    the other, the last variant came out slowest for the same work."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks.common import Case
    from benchmarks.run import TIMING_ROUNDS, check_and_time

    case = Case(op="double", params={"n": 4}, make_inputs=lambda device: (torch.arange(4.0),),
                run=lambda x: x * 2, reference=lambda x: x * 2,
                check=lambda got, want: None if torch.equal(got, want) else "differs",
                flops=0.0, bytes=32.0, backends=("triton",))
    calls = []

    def drifting_timer(fn, telemetry, iters=None):
        fn()
        calls.append(iters)
        telemetry.update(host_ms=0.01 * len(calls), queued=True, sm_mhz=2000 - len(calls), slowdowns=[])
        return float(len(calls))  # the clock sinks: every call takes longer than the one before

    runs = [("triton", "triton", {}), ("triton", "triton[a]", {}), ("triton", "triton[b]", {})]
    problems, ours, failures = {}, {}, []
    meta = {"device": "gpu", "git_sha": "-", "torch": "-", "date": "-"}
    check_and_time(case, runs, (torch.arange(4.0),), torch.arange(4.0) * 2, drifting_timer, problems, ours, {},
                   meta, failures, "n=4", TIMING_ROUNDS)
    assert not failures and len(calls) == 3 * TIMING_ROUNDS
    assert len({ours[label]["ms"] for _, label, _ in runs}) == 1, {label: r["ms"] for label, r in ours.items()}
    assert ours["triton"]["gpu"]["sm_mhz"] == 2000 - len(calls) + 2  # its lowest clock over its rounds


@pytest.mark.parametrize("backends", [("triton",), ("triton", "cuda")])
def test_peers_are_timed_in_the_rounds_of_ours(monkeypatch, backends):
    """On a GPU a case's peers are timed in the same alternating rounds as our runs (with the CUDA
    runs where the case has them), the same calls per round: timed once after all of ours, on a
    clock that sinks as the GPU heats (each call here 1 ms slower than the last), the same work
    came out slower for the peer and "x peer" above 1."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import run as bench_run
    from benchmarks.common import Case

    calls = []

    def drifting_timer(fn, telemetry=None, iters=None, **_):
        fn()
        calls.append(iters)
        return float(len(calls))

    monkeypatch.setattr(bench_run.bench, "bench_gpu", drifting_timer)
    case = Case(op="double", params={"n": 4}, make_inputs=lambda device: (torch.arange(4.0),),
                run=lambda x: x * 2, reference=lambda x: x * 2,
                check=lambda got, want: None if torch.equal(got, want) else "differs",
                flops=0.0, bytes=32.0, peers={"torch": lambda x: x * 2}, backends=backends)
    records, failures = [], []
    meta = {"device": "gpu", "git_sha": "-", "torch": "-", "date": "-"}
    bench_run.run_case(case, "cuda", list(backends), {}, meta, bench_run.Report(), records, failures)
    assert not failures
    ms = {r["backend"]: r["ms"] for r in records}
    assert set(ms) == {*backends, "peer:torch"} and set(calls) == {bench_run.ITERS_PER_ROUND}
    assert ms["peer:torch"] == ms[backends[-1]]  # timed beside the last group's runs
    assert next(r for r in records if r["backend"] == backends[-1])["x_peer"] == 1.0


@pytest.mark.parametrize("variants, expected", [(None, {"triton", "triton[graph]", "triton[other]"}),
                                                 ({"graph"}, {"triton", "triton[graph]"}), (set(), {"triton"})])
def test_run_case_times_only_the_variants_asked_for(monkeypatch, variants, expected):
    """--variants: a full grid's variants cost several times its default runs' device time, so a
    device call can keep just the rows an issue reads (none, or the CUDA-graph ones); the peers stay."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import run as bench_run
    from benchmarks.common import Case

    monkeypatch.setattr(bench_run.bench, "bench_gpu", lambda fn, telemetry=None, iters=None, **_: (fn(), 1.0)[1])
    case = Case(op="double", params={"n": 4}, make_inputs=lambda device: (torch.arange(4.0),),
                run=lambda x: x * 2, reference=lambda x: x * 2,
                check=lambda got, want: None if torch.equal(got, want) else "differs",
                flops=0.0, bytes=32.0, peers={"torch": lambda x: x * 2}, backends=("triton",),
                triton_variants={"graph": {}, "other": {}})
    records, failures = [], []
    meta = {"device": "gpu", "git_sha": "-", "torch": "-", "date": "-"}
    bench_run.run_case(case, "cuda", ["triton"], {}, meta, bench_run.Report(), records, failures, variants=variants)
    assert not failures
    assert {r["backend"] for r in records} == expected | {"peer:torch"}
    assert bench_run.seen_variants([("f", case, None)]) == {"graph", "other"}


def test_perf_table_x_peer_is_against_the_peer_rows_shown(tmp_path, monkeypatch):
    """A row's "x peer" comes from the peer rows shown beside it: after a merge the record's own
    x_peer can be from an older run, whose peer time a later run replaced."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import perf_table

    params = {"m": 128}
    ours = {"op": "gemm", "backend": "cuda", "params": params, "ms": 0.010, "tflops": None, "gbps": None,
            "roofline": None, "x_peer": 5.0, "error": None, "git_sha": "old"}  # 5.0: against the old run's peer
    peers = [{"op": "gemm", "backend": name, "params": params, "ms": ms, "tflops": None, "gbps": None,
              "roofline": None, "x_peer": None, "error": None, "git_sha": "new"}
             for name, ms in (("peer:a", 0.030), ("peer:b", 0.020), ("peer:gone", 0.001))]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    with open(tmp_path / "benchmarks" / "results" / "gpu.json", "w") as f:
        json.dump({"meta": {"device": "GPU", "git_sha": "new", "ceilings": {"copy_gbps": 1.0}},
                   "records": [ours, *peers]}, f)
    monkeypatch.setattr(perf_table, "ROOT", str(tmp_path))
    shown = {("gemm", "cuda"), ("gemm", "peer:a"), ("gemm", "peer:b")}
    monkeypatch.setattr(perf_table, "current_labels", lambda: shown)
    rows = {line.split(" | ")[2]: line for line in perf_table.table().splitlines()[2:]}
    assert set(rows) == {"cuda", "peer:a", "peer:b"}  # peer:gone: a label no longer defined, not shown
    assert "| 2.00x |" in rows["cuda"], rows["cuda"]  # the fastest peer shown (b, 20 us) over our 10 us


def _expected(case, inputs):
    import dskernels

    with dskernels.backend("ref"):
        return case.reference(*inputs)


def _peer_cases(monkeypatch):
    """The CPU cases run.py builds (the full CPU grid: every family's case kinds, tiny shapes) with
    torch._scaled_mm's stand-in (the GEMM peers') and torch.compile as eager (its peers' checks,
    without minutes of compiling here), and the bf16 K-grouped case at m = 8 (torch._grouped_mm wants
    16-byte strides: the CPU grid's m = 7 has 14)."""
    sys.path.insert(0, ROOT)
    from benchmarks import bench_gemm
    from benchmarks.run import _family_cases, families

    monkeypatch.delattr(torch.nn.functional, "scaled_mm", raising=False)
    monkeypatch.setattr(torch, "_scaled_mm", _torch_blockwise_layout_check(True))
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    found = [(family, case) for family in families() for case in _family_cases(family, False, "cpu")
             if not (case.op == "k_grouped_bf16_gemm_tn_contiguous")]
    return found + [("gemm", bench_gemm._bf16_k_grouped_case(3, 100, 8, 200, "cpu"))]


def test_every_peer_is_checked_or_says_why(monkeypatch):
    """Every peer of every CPU case passes its check against the oracle (benchmarks/common.py
    peer_checks), or is declared unchecked with a reason; the GPU grids' peers are those of the CPU
    grid's cases of the same op (so that this covers every peer a device run times)."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import _family_cases, check_peer

    cases = _peer_cases(monkeypatch)
    checked, unchecked = set(), set()
    for family, case in cases:
        inputs = case.make_inputs("cpu")
        expected = _expected(case, inputs)
        for name in case.peers:
            problem, reason = check_peer(case, name, inputs, expected)
            assert problem is None, (case.op, case.params, name, problem)
            (unchecked if reason else checked).add((case.op, name))
            assert reason is None or len(reason) > 20, (case.op, name, reason)
    on_gpu = {(case.op, name) for family in {f for f, _ in cases} for quick in (True, False)
              for case in _family_cases(family, quick, "cuda") for name in case.peers}
    assert on_gpu <= checked | unchecked, on_gpu - checked - unchecked
    assert {op for op, _ in checked} >= {"gemm_fp8_fp8_bf16_nt", "flash_mla_with_kvcache", "fp8_mqa_logits",
                                         "ep_combine_reduce", "deepseek_v3_layer_decode", "grouped_topk",
                                         "per_token_cast_to_fp8", "m_grouped_gemm_fp8_fp8_bf16_nt_masked"}
    assert unchecked <= {(op, name) for op, name in on_gpu if name in ("torch.mm bf16", "torch.bmm bf16")}


def _wrong_peers():
    """(case builder, peer, wrong version of it): each computes less or something else."""
    import math

    from benchmarks import bench_ep, bench_fp8_cast, bench_gemm, bench_indexer, bench_mla

    def mla(**change):  # the dense decode peer with some arguments changed, its bounds left alone
        def wrong(*args, attend=bench_mla._attend):
            args = list(args)
            if attend is bench_mla._attend:
                for at, value in change.items():
                    args[int(at[1:])] = value(args[int(at[1:])])
            return bench_mla.torch_batched_decode(*args, attend=attend)
        return wrong

    def half_output(peer):
        def wrong(*args, **kwargs):
            out, lse = peer(*args, **kwargs)
            return (out * 0.5, lse) if not kwargs else (out, lse)
        return wrong

    fp8_mla = lambda: bench_mla._case(2, 1, 4, 2, 64, 48, 90, False, 61, bench_mla.FP8, False)  # noqa: E731
    sparse = lambda: bench_mla._sparse_prefill_case(3, 50, 4, 24, d=64, dv=48)  # noqa: E731
    masked = lambda: bench_gemm._masked_case(2, 40, 144, 256, "cpu", m_max=64)  # noqa: E731
    return [
        # keys past each length (the last page's padding) attended to
        (fp8_mla, "torch", mla(a3=lambda lens: lens + 20)),
        (fp8_mla, "torch", mla(a6=lambda k_scale: k_scale * 2)),  # the cache's scale doubled
        (sparse, "torch", half_output(sparse().peers["torch"])),
        (lambda: bench_indexer._mqa_case(6, 70, 4, 32), "torch",
         lambda q, kv, w, ks, ke, magnitude=False: bench_indexer.torch_mqa(q, kv, w if magnitude else w.abs(), ks, ke,
                                                                           magnitude)),
        (lambda: bench_indexer._paged_case(3, 2, 4, 32, 60, 16), "torch",  # every key seen (no length mask)
         lambda q, cache, w, lens, table, max_len, magnitude=False: bench_indexer.torch_paged(
             q, cache, w, lens if magnitude else lens + 64, table, max_len, magnitude)),
        (lambda: bench_ep._combine_case(37, 256, 4, 32, 4), "torch",  # the -1 (not sent) entries summed too
         lambda y, idx: y[idx.clamp(min=0)].float().sum(1).to(y.dtype)),
        (lambda: bench_ep._pack_case(37, 256, 4, 32, 4), "torch index_select+cat",  # a field left out
         lambda *args: torch.cat([s.index_select(0, args[-1]) for s in args[:-2]], dim=1)),
        (lambda: bench_fp8_cast._silu_and_mul_case(20, 256, True), "torch",  # half the valid rows
         lambda x, masked_m: bench_fp8_cast.python_ref.silu_and_mul_cast_to_fp8(x[:, :7])),
        (lambda: bench_fp8_cast._silu_and_mul_bf16_case(20, 256, 8), "torch",  # no SiLU
         lambda x, masked_m: (x[:, :14, :256] * x[:, :14, 256:])),
        (lambda: bench_fp8_cast._case("per_token_cast_to_fp8", None, bench_fp8_cast.python_ref.per_token_cast_to_fp8,
                                      61, 384, torch.bfloat16, 61), "torch.compile",  # a scale off by 2^-8
         lambda x: (lambda q, s: (q, s * (1 + 2**-8)))(*bench_fp8_cast.python_ref.per_token_cast_to_fp8(x))),
        (masked, "torch._scaled_mm",  # the first group only
         lambda *args: masked().peers["torch._scaled_mm"](*args)[:1]),
        (lambda: bench_gemm._dense_case(7, 200, 256, "cpu"), "torch._scaled_mm",  # the scales left out
         lambda a, sa, b, sb, out: (a.float() @ b.float().T).to(torch.bfloat16)),
        (lambda: bench_gemm._bf16_masked_case(2, 40, 144, 200, "cpu", 64), "torch.bmm bf16 (all rows)",
         lambda a, b, d, masked_m: torch.bmm(a, b.transpose(1, 2))[:, :math.ceil(a.shape[1] / 2)]),
    ]


@pytest.mark.parametrize("index", range(13))
def test_a_wrong_peer_fails_its_check(monkeypatch, index):
    """Each family's peer checks flag a peer that computes less or something else (a mask, a scale,
    a field, rows or groups left out), within the bounds that its right version passes."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import check_peer

    monkeypatch.delattr(torch.nn.functional, "scaled_mm", raising=False)
    monkeypatch.setattr(torch, "_scaled_mm", _torch_blockwise_layout_check(True))
    build, name, wrong = _wrong_peers()[index]
    case = build()
    inputs = case.make_inputs("cpu")
    expected = _expected(case, inputs)
    case.peers[name] = wrong
    problem, reason = check_peer(case, name, inputs, expected)
    assert problem and not problem.startswith("raised") and reason is None, (case.op, name, problem)


def test_a_wrong_peer_is_reported_and_left_out_of_x_peer(monkeypatch):
    """On a GPU run every peer is checked before it is timed: a wrong one (here the fastest, having
    done half the work) is timed but reported WRONG, with its error in the records, and left out of
    "x peer"; one that raises when checked is reported and not timed; an unchecked one (its reason
    in the records) still counts."""
    sys.path.insert(0, ROOT)
    from benchmarks import run as bench_run
    from benchmarks.common import Case

    def timer(fn, telemetry=None, iters=None, **_):  # a "time" of the work done: the output's size
        return float(fn().numel())

    def broken(x):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(bench_run.bench, "bench_gpu", timer)
    case = Case(op="double", params={"n": 4}, make_inputs=lambda device: (torch.arange(4.0),),
                run=lambda x: x * 2, reference=lambda x: x * 2,
                check=lambda got, want: None if torch.equal(got, want) else "differs",
                flops=0.0, bytes=32.0, backends=("triton",),
                peers={"right": lambda x: x * 2, "half": lambda x: x[:2] * 2, "raises": broken,
                       "baseline": lambda x: torch.ones(8)},
                peer_checks={"baseline": "random operands of twice the size: nothing to compare"})
    records, failures, report = [], [], bench_run.Report()
    meta = {"device": "gpu", "git_sha": "-", "torch": "-", "date": "-"}
    bench_run.run_case(case, "cuda", ["triton"], {}, meta, report, records, failures)
    by = {r["backend"]: r for r in records}
    assert not failures
    assert by["peer:half"]["error"] == "differs" and by["peer:half"]["ms"] == 2.0
    raised = by["peer:raises"]
    assert raised["error"].startswith("raised RuntimeError") and raised["ms"] != raised["ms"]  # NaN: not timed
    assert by["peer:right"]["error"] is None and by["peer:right"]["peer_unchecked"] is None
    assert by["peer:baseline"]["peer_unchecked"].startswith("random operands")
    assert by["triton"]["x_peer"] == 4.0 / 4.0  # the right peer's 4, not the wrong one's 2 (nor 8)
    assert any(row[1] == "WRONG peer:half" for row in report.rows)
