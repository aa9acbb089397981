"""The Triton dense FP8 GEMM's persistent warp-specialized TMA form (TMA_WS, dskernels/triton/gemm.py):
against the oracle under the interpreter (no warp specialization there: the same descriptor loads,
math and tile walk, 3 programs) and, on Hopper, every candidate forced. scripts/gpu_check.sh benchmarks the candidates
(the triton[tma_ws] rows) only once this file passed on the device."""

import pytest
import torch

import dskernels
from test_gemm import FP8_NAN, K, assert_close_to_oracle, empty_out, quantized_pair


def _record_tma_ws(monkeypatch):
    """The launches that took the TMA_WS form: each sets the descriptor scratch allocator first."""
    from dskernels.triton import gemm as triton_gemm

    used = []
    real = triton_gemm._use_descriptor_scratch

    def recording(enabled):
        if enabled:
            used.append(True)
        return real(enabled)

    monkeypatch.setattr(triton_gemm, "_use_descriptor_scratch", recording)
    return used


@pytest.fixture
def forced_tma_ws(monkeypatch):
    """The interpreter's tile with TMA_WS asked for; the list of launches that took it."""
    from dskernels.triton import gemm as triton_gemm

    if torch.cuda.is_available():
        pytest.skip("the interpreter's tile; on a GPU test_triton_tma_ws_gpu_configs forces each candidate")
    monkeypatch.setattr(triton_gemm, "_INTERPRETER_CONFIG", dict(BLOCK_M=32, BLOCK_N=64, GROUP_M=2, TMA_WS=True))
    return _record_tma_ws(monkeypatch)


def _nan_framed_fp8(rows, k, q, device):
    """q [rows, k] inside a NaN-filled [rows + 40, 3k] buffer at column k (16-byte aligned rows and
    base, so the tensor copy engine may read it): whatever the loop reads outside its K range is NaN
    and shows. (Rows read past m or n would only feed outputs that are never stored: that is for
    compute-sanitizer on the device.)"""
    frame = torch.full((rows + 40, 3 * k), FP8_NAN, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    view = frame[:rows, k:2 * k]
    view.copy_(q)
    return view


@pytest.mark.parametrize("scale_layout", ["row", "tma"])
def test_triton_tma_ws_matches_oracle(scale_layout, forced_tma_ws):
    """The TMA_WS form (descriptor loads; the interpreter runs it without warp specialization, 3
    programs walking 12 tiles) on odd m and n, operands framed by NaN, both scale layouts, into
    bf16 and accumulating into fp32."""
    used = forced_tma_ws
    m, n = 70, 200  # a partial last row tile; column tiles in two weight scale blocks, the last partial
    _, a, sa = quantized_pair(m, K, "cpu", per_block=False, scale_layout=scale_layout)
    _, b, sb = quantized_pair(n, K, "cpu", per_block=True, scale_layout=scale_layout)
    a, b = _nan_framed_fp8(m, K, a, "cpu"), _nan_framed_fp8(n, K, b, "cpu")
    out = empty_out(m, n, device="cpu")
    with dskernels.backend("triton"):
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
        assert len(used) == 1
        assert_close_to_oracle(out, a, sa, b, sb)
        c = torch.randn(m, n)
        acc = _fp32_rows_of(c, 208)  # fp32 out: rows a multiple of 16 elements apart (_tma_ws_ok)
        dskernels.fp8_gemm_nt((a, sa), (b, sb), acc, c=acc)
        assert len(used) == 2
        odd = c.clone()  # rows 200 apart: the pointer loads (the warp-specialized epilogue would spill)
        dskernels.fp8_gemm_nt((a, sa), (b, sb), odd, c=odd)
        assert len(used) == 2
    assert_close_to_oracle(acc, a, sa, b, sb, c=c)
    assert_close_to_oracle(odd, a, sa, b, sb, c=c)


def _fp32_rows_of(c, row_stride):
    """A copy of c [m, n] whose rows are row_stride elements apart (the padding NaN)."""
    padded = torch.full((c.shape[0], row_stride), float("nan"), device=c.device)[:, :c.shape[1]]
    padded.copy_(c)
    return padded


def _placed(q, *, offset=0, row_stride=None, column_major=False, column_step=1):
    """q's values in a tensor placed as asked: its base `offset` bytes past a 16-byte aligned
    buffer, rows `row_stride` bytes apart, column-major, or every column_step-th byte of a row."""
    rows, k = q.shape
    if column_major:
        placed = torch.empty(k, rows, dtype=q.dtype).T
    elif column_step > 1:
        placed = torch.empty(rows, k * column_step, dtype=q.dtype)[:, ::column_step]
    else:
        stride = row_stride or k
        placed = torch.empty(offset + rows * stride, dtype=torch.uint8)[offset:].as_strided((rows, k), (stride, 1))
        placed = placed.view(q.dtype)
    placed.copy_(q)
    return placed


# (which operand, how it is placed): each breaks one of the tensor copy engine's rules
UNREADABLE = [("a", dict(offset=1)), ("b", dict(offset=8)), ("a", dict(offset=16, row_stride=K + 8)),
              ("b", dict(row_stride=K + 1)), ("a", dict(column_major=True)), ("b", dict(column_step=2)),
              ("b", dict(row_stride=0))]


@pytest.mark.parametrize("operand,placement", UNREADABLE, ids=[f"{o}-{p}" for o, p in UNREADABLE])
def test_triton_tma_ws_only_where_the_copy_engine_can_read(operand, placement, forced_tma_ws):
    """Operands the tensor copy engine cannot address (base or rows off 16 bytes, not K-major,
    rows overlapping) run the pointer-load form even when TMA_WS is asked for, with the same result."""
    used = forced_tma_ws
    m, n = 21, 150
    _, a, sa = quantized_pair(m, K, "cpu", per_block=False, scale_layout="row")
    _, b, sb = quantized_pair(n, K, "cpu", per_block=True, scale_layout="row")
    if placement.get("row_stride") == 0:  # one row broadcast to all
        b = b[:1].expand(n, K)
        sb = sb[:1].expand(2, K // 128).contiguous()
    x, y = (_placed(a, **placement), b) if operand == "a" else (a, _placed(b, **placement) if b.stride(0) else b)
    out = empty_out(m, n, device="cpu")
    with dskernels.backend("triton"):
        dskernels.gemm_fp8_fp8_bf16_nt((x, sa), (y, sb), out)
    assert used == []
    assert_close_to_oracle(out, a, sa, b, sb)


def test_triton_tma_ws_knob_and_scale_rules(forced_tma_ws, monkeypatch):
    """Per-row b scales keep the pointer loads; DSKERNELS_GEMM_TMA_WS=off turns the form off and
    names itself on a bad value; the caller's Triton allocator is back after each launch."""
    from triton.runtime import _allocation

    used = forced_tma_ws
    m, n = 21, 150
    _, a, sa = quantized_pair(m, K, "cpu", per_block=False, scale_layout="row")
    _, b, sb = quantized_pair(n, K, "cpu", per_block=True, scale_layout="row")
    _, b_rows, sb_rows = quantized_pair(n, K, "cpu", per_block=False, scale_layout="row")
    callers = _allocation._allocator.get()
    with dskernels.backend("triton"):
        out = torch.full((m, n), float("nan"))
        dskernels.fp8_gemm_nt((a, sa), (b_rows, sb_rows), out)
        assert_close_to_oracle(out, a, sa, b_rows, sb_rows)
        assert used == []
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out := empty_out(m, n, device="cpu"))
        assert used == [True] and _allocation._allocator.get() is callers
        monkeypatch.setenv("DSKERNELS_GEMM_TMA_WS", "off")
        dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out := empty_out(m, n, device="cpu"))
        assert used == [True]
        assert_close_to_oracle(out, a, sa, b, sb)
        monkeypatch.setenv("DSKERNELS_GEMM_TMA_WS", "yes")
        with pytest.raises(ValueError, match="DSKERNELS_GEMM_TMA_WS"):
            dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)


def _tma_ws_gpu_configs():
    from dskernels.triton.gemm import _tma_ws_configs

    return [pytest.param(c, id=f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-s{c.num_stages}")
            for c in _tma_ws_configs()]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _tma_ws_gpu_configs())
def test_triton_tma_ws_gpu_configs(config, monkeypatch):
    """Each warp-specialized candidate forced (the autotuner may pick any): odd shapes with operands
    framed by NaN, more tiles than programs, a long K (56 blocks: the ring of stages wraps many
    times), both scale layouts,
    fp32 accumulation, and a CUDA graph capture (the descriptor scratch comes from the graph's pool)."""
    from dskernels.triton import gemm as triton_gemm

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Hopper's warp specialization only")
    meta = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
    monkeypatch.setattr(triton_gemm, "_heuristic_config", lambda *_: dict(meta))
    used = _record_tma_ws(monkeypatch)
    with dskernels.backend("triton"):
        # 162 tiles of 128 x 128 in the first: more than an H100's or H200's 132 programs, so some
        # programs take a second tile (the producer runs on into it while the consumers store).
        for m, n, k, layout in [(1100, 2200, 256, "tma"), (203, 300, 384, "row"), (130, 2112, 7168, "row"),
                                (1, 129, 128, "row")]:
            _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout=layout)
            _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout=layout)
            a, b = _nan_framed_fp8(m, k, a, "cuda"), _nan_framed_fp8(n, k, b, "cuda")
            # twice: the second call is the launch cache's (dskernels/triton/launch.py), as in a benchmark
            for _ in range(2):
                out = empty_out(m, n, device="cuda")
                dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
                assert_close_to_oracle(out, a, sa, b, sb)
        assert len(used) == 8
        # The fp32-accumulate form (its own build; rows a multiple of 16 elements apart, else the
        # pointer loads: _tma_ws_ok) and the graph capture on a 3-block K.
        m, n, k = 203, 300, 384
        _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="row")
        _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="tma")
        c = torch.randn(m, n, device="cuda")
        acc = _fp32_rows_of(c, 304)
        dskernels.fp8_gemm_nt((a, sa), (b, sb), acc, c=acc)
        assert_close_to_oracle(acc, a, sa, b, sb, c=c)
        assert len(used) == 9
        odd = c.clone()
        dskernels.fp8_gemm_nt((a, sa), (b, sb), odd, c=odd)
        assert_close_to_oracle(odd, a, sa, b, sb, c=c)
        assert len(used) == 9
        out = empty_out(m, n, device="cuda")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
        assert len(used) == 10
        out.fill_(float("nan"))
        graph.replay()
        assert_close_to_oracle(out, a, sa, b, sb)


@pytest.mark.gpu
def test_triton_tma_ws_autotuned(monkeypatch):
    """The autotuned path the `triton[tma_ws]` benchmark rows take (the other tests force one
    candidate with autotuning off): tuning over the warp-specialized candidates alone, then a repeat
    call through the launch cache, both checked (out NaN-filled before each). One of the benchmark's
    (n, k) at fewer rows; `auto` (all candidates) is left to the benchmark: it compiles ~25."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Hopper's warp specialization only")
    monkeypatch.setenv("DSKERNELS_GEMM_AUTOTUNE", "1")
    monkeypatch.setenv("DSKERNELS_GEMM_TMA_WS", "only")
    used = _record_tma_ws(monkeypatch)
    m, n, k = 256, 2112, 7168
    _, a, sa = quantized_pair(m, k, "cuda", per_block=False, scale_layout="row")
    _, b, sb = quantized_pair(n, k, "cuda", per_block=True, scale_layout="row")
    with dskernels.backend("triton"):
        for _ in range(2):
            out = empty_out(m, n, device="cuda")
            dskernels.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
            assert_close_to_oracle(out, a, sa, b, sb)
    assert len(used) == 2
