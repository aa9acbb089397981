"""Sparse MLA's opt-in wide tiles (DSKERNELS_SPARSE_MLA_TILE=wide, dskernels/triton/mla_sparse.py)
against python_ref.mla_sparse. For V3.2's FP8 cache they run _sparse_mla_fp8_kernel, which keeps
the e4m3 latent undequantized in its four 128-column tiles and applies each key's tile scales to
the scores and probabilities, so up to 64 heads share one gathered block: the tile boundaries,
head tiles (one, two, a partial one), splits of the list, lengths, sinks and NaN rows are what
matter to it. bf16 caches of d = 576 run _sparse_mla_kernel on 64-head tiles (decode, prefill).

Never run on a GPU before its first device call, so kept apart: a fault there ends only this
file's CUDA context. scripts/gpu_check.sh times the `triton[wide]` rows once this file has passed
in the same call. Poison and tolerances as tests/test_mla_sparse.py's."""

import math

import pytest
import torch

import dskernels
import python_ref.mla_sparse as ref
from dskernels.triton import mla_sparse as triton_sparse
from test_mla_sparse import assert_close_to, decode_inputs, vmax_of


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv(triton_sparse.TILE_KNOB, "wide")


# On a machine with a GPU every test here runs on it, so `pytest -m gpu` selects them all.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []


@pytest.fixture
def triton_device():
    """The Triton backend forced (the wide tiles are its kernel's) on the GPU, else the interpreter."""
    if "triton" not in dskernels.available_backends():
        pytest.skip(f"the Triton backend is not available here (available: {dskernels.available_backends()})")
    with dskernels.backend("triton"):
        yield "cuda" if torch.cuda.is_available() else "cpu"


def run_and_check(device, b, s_q, h_q, page_size, num_pages, topk, dtype, lengths, sink, seed):
    q, k_cache, indices, dv, _, topk_length, attn_sink = decode_inputs(b, s_q, h_q, 1, page_size, num_pages, topk,
                                                                       dtype, True, lengths=lengths, sink=sink,
                                                                       seed=seed)
    moved = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (topk_length, attn_sink)]
    out, lse = dskernels.flash_mla_sparse_decode(q.to(device), k_cache.to(device), indices.to(device), dv,
                                                 is_fp8_kvcache=True, topk_length=moved[0], attn_sink=moved[1])
    assert out.shape == (b, s_q, h_q, dv) and lse.shape == (b, h_q, s_q)
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv, None, True, topk_length, attn_sink)
    assert_close_to(out, lse, ref_out, ref_lse, dtype, vmax_of(k_cache, dv, True))
    if sink:
        assert (out[:, :, 0].float() == 0).all(), "attn_sink = +inf must zero the head's output"


# (b, s_q, h_q, page_size, num_pages, topk, q dtype, topk_length, attn_sink); on the interpreter a
# block is 64 list entries, so 150 entries split the list and 80 heads make a full and a partial tile
WIDE_GRID = [
    (2, 1, 16, 3, 7, 64, torch.bfloat16, True, True),
    (1, 2, 32, 64, 2, 100, torch.bfloat16, False, False),
    (2, 2, 80, 16, 12, 150, torch.bfloat16, True, True),
    (1, 1, 4, 16, 4, 40, torch.bfloat16, False, True),
    (2, 1, 8, 16, 2, 0, torch.bfloat16, False, True),    # topk = 0: nothing to see
]


@pytest.mark.parametrize("b,s_q,h_q,page_size,num_pages,topk,dtype,lengths,sink", WIDE_GRID)
def test_wide_fp8_decode_matches_oracle(triton_device, b, s_q, h_q, page_size, num_pages, topk, dtype, lengths, sink):
    run_and_check(triton_device, b, s_q, h_q, page_size, num_pages, topk, dtype, lengths, sink, seed=b * 31 + topk)


def test_wide_fp8_byte_path(triton_device, monkeypatch):
    """The FP8 bytes widened in integer arithmetic (GPUs whose Triton has no e4m3 type), forced."""
    monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    run_and_check(triton_device, 2, 2, 16, 16, 4, 48, torch.bfloat16, True, False, seed=6)


@pytest.mark.parametrize("where", ["latent", "scale", "rope", "inf_scale", "minus_inf_scale"])
def test_wide_fp8_nan_in_a_listed_row_is_not_hidden(triton_device, where, monkeypatch):
    """A NaN in a row a query lists (in any of the three parts of the layout: a latent byte, a tile
    scale, a rope value), or an infinite tile scale (whose dequantized values mix infinities of
    both signs: NaN scores in the oracle), makes that query's out and lse NaN, not "nothing seen"
    or a finite lse. (Triton 3.8's interpreter converts the e4m3 NaN byte to 480, so there the
    latent goes through the byte path, which decodes it in integer arithmetic.)"""
    if where == "latent" and triton_device == "cpu":
        monkeypatch.setenv("DSKERNELS_TRITON_NATIVE_FP8", "0")
    q, k_cache, indices, dv, _, _, _ = decode_inputs(2, 1, 4, 1, 16, 3, 20, torch.bfloat16, True, seed=7)
    num_slots = 3 * 16
    mine = {v for v in indices[0].flatten().tolist() if 0 <= v < num_slots}
    slot = min(mine - set(indices[1].flatten().tolist()))  # listed by sequence 0 only
    raw = k_cache.view(torch.uint8).view(num_slots, -1)
    if where == "latent":
        raw[slot, 130] = 0x7F  # e4m3 NaN in the second tile
    elif where == "scale":
        raw[slot, ref.FP8_SCALE_OFFSET + 8:ref.FP8_SCALE_OFFSET + 12] = 0xFF  # the third tile's scale
    elif where.endswith("inf_scale"):
        inf = torch.tensor([-math.inf if where.startswith("minus") else math.inf]).view(torch.uint8)
        raw[slot, ref.FP8_SCALE_OFFSET + 4:ref.FP8_SCALE_OFFSET + 8] = inf  # the second tile's scale
    else:
        raw[slot, ref.FP8_ROPE_OFFSET:ref.FP8_ROPE_OFFSET + 2] = torch.tensor([0xC0, 0x7F], dtype=torch.uint8)
    out, lse = dskernels.flash_mla_sparse_decode(q.to(triton_device), k_cache.to(triton_device),
                                                 indices.to(triton_device), dv, is_fp8_kvcache=True)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert not out[1].isnan().any() and not lse[1].isnan().any()


@pytest.mark.parametrize("capability,shared,widest", [((9, 0), 232448, 64), ((10, 0), 232448, 64),
                                                      ((8, 9), 101376, 32), ((8, 0), 166912, 32),
                                                      ((12, 0), 101376, 32)],
                         ids=["h100", "b200", "l40s", "a100", "rtx5090"])
def test_wide_tile_config(monkeypatch, capability, shared, widest):
    """64 heads in 8 warps where the tensor cores take 64-row tiles and a block has the shared
    memory (Hopper, B200), else at most 32 (8 warps); 16 heads in 4 warps. No GPU needed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    monkeypatch.setattr(triton_sparse, "_shared_limit", lambda _: shared)
    gpu, stages = torch.device("cuda"), triton_sparse.DOUBLE_BUFFER_STAGES
    assert triton_sparse.wide_tile_config(128, gpu) == (widest, 16, 8, stages)
    assert triton_sparse.wide_tile_config(20, gpu) == (32, 16, 8, stages)
    assert triton_sparse.wide_tile_config(16, gpu) == (16, 16, 4, stages)
    assert triton_sparse.wide_tiles()


def _exact_bf16_interpreter_dot(monkeypatch):
    """Triton's interpreter with a bf16 tl.dot that widens its operands exactly and sums in fp32
    (dskernels.testing.interpreter; its own returns garbage, so bf16 dots widen to fp32 there:
    ieee_dots), and the kernels told to keep bf16 operands: the code a GPU runs (the dots on rounded
    p and widened keys) on CPU."""
    from dskernels.testing.interpreter import exact_bf16_dots

    exact_bf16_dots(monkeypatch)
    monkeypatch.setattr(triton_sparse, "ieee_dots", lambda dtype: dtype == torch.float32)


@pytest.mark.parametrize("b,s_q,h_q,page_size,num_pages,topk,dtype,lengths,sink", WIDE_GRID[:3])
def test_wide_fp8_bf16_dots(triton_device, monkeypatch, b, s_q, h_q, page_size, num_pages, topk, dtype, lengths,
                            sink):
    """The kernel's bf16 dots (elsewhere on CPU its operands widen to fp32) through an exact bf16
    interpreter dot: the probabilities times each tile's scale rounded to bf16, as on a GPU."""
    if triton_device != "cpu":
        pytest.skip("on a GPU every test here runs the bf16 dots")
    _exact_bf16_interpreter_dot(monkeypatch)
    run_and_check(triton_device, b, s_q, h_q, page_size, num_pages, topk, dtype, lengths, sink, seed=b * 31 + topk)


def test_wide_bf16_cache_decode_and_prefill(triton_device, monkeypatch):
    """A bf16 cache of d = 576 (V3.2's head without the FP8 layout) on the wide tiles: decode over
    80 heads (a full and a partial 64-head tile) with a split list, and prefill with max_logits;
    both launches take the wide tile (64 heads; 8 warps on a GPU)."""
    _, recorders = _record_sparse_launches(monkeypatch)
    q, k_cache, indices, dv, _, topk_length, attn_sink = decode_inputs(2, 1, 80, 1, 16, 12, 150, torch.bfloat16,
                                                                       False, d=576, dv=512, lengths=True, sink=True,
                                                                       seed=5)
    moved = [t.to(triton_device) for t in (q, k_cache, indices, topk_length, attn_sink)]
    out, lse = dskernels.flash_mla_sparse_decode(*moved[:3], dv, topk_length=moved[3], attn_sink=moved[4])
    ref_out, ref_lse = ref.flash_mla_sparse_decode(q, k_cache, indices, dv, None, False, topk_length, attn_sink)
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(k_cache, dv, False))

    gen = torch.Generator().manual_seed(9)
    kv = torch.randn(40, 1, 576, generator=gen).to(torch.bfloat16)
    q = torch.randn(3, 64, 576, generator=gen).to(torch.bfloat16)
    indices = torch.randint(-1, 40, (3, 1, 70), generator=gen, dtype=torch.int32)
    out, max_logits, lse = dskernels.flash_mla_sparse_fwd(q.to(triton_device), kv.to(triton_device),
                                                          indices.to(triton_device), 576 ** -0.5, 512)
    ref_out, ref_max, ref_lse = ref.flash_mla_sparse_fwd(q, kv, indices, 576 ** -0.5, 512)
    assert_close_to(out, lse, ref_out, ref_lse, torch.bfloat16, vmax_of(kv, 512, False), max_logits, ref_max)
    wide = triton_sparse.wide_tile_config(64, torch.device(triton_device))
    calls = recorders["_sparse_mla_kernel"].calls
    assert len(calls) == 2 and all((c["BLOCK_H"], c["num_warps"]) == (64, wide[2]) for c in calls), calls


def test_fp32_queries_keep_the_narrow_kernel(triton_device, monkeypatch):
    """fp32 queries run _sparse_mla_kernel whatever the knob (its IEEE dots; the wide tiles would
    spill their fp32 operands), and still match the oracle."""
    launched, _ = _record_sparse_launches(monkeypatch)
    run_and_check(triton_device, 1, 1, 4, 16, 4, 40, torch.float32, False, True, seed=3)
    run_and_check(triton_device, 1, 1, 4, 16, 4, 40, torch.bfloat16, False, True, seed=3)
    assert launched == ["_sparse_mla_kernel", "_sparse_mla_fp8_kernel"]


class _Recording:
    """A kernel whose launches (kernel[grid](...)) are recorded: its name in `launched`, each
    launch's keyword arguments (the tile, warps and switches) in `calls`."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched, self.calls = kernel, name, launched, []

    def __getitem__(self, grid):
        self.launched.append(self.name)
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


def _record_sparse_launches(monkeypatch):
    """(the names launched in order, a _Recording per sparse MLA kernel) for this test."""
    launched, recorders = [], {}
    for name in ("_sparse_mla_kernel", "_sparse_mla_fp8_kernel"):
        recorders[name] = _Recording(getattr(triton_sparse, name), name, launched)
        monkeypatch.setattr(triton_sparse, name, recorders[name])
    return launched, recorders


def test_wide_knob_values(monkeypatch):
    monkeypatch.setenv(triton_sparse.TILE_KNOB, "narrow")
    assert not triton_sparse.wide_tiles()
    monkeypatch.setenv(triton_sparse.TILE_KNOB, "")
    assert not triton_sparse.wide_tiles()
    monkeypatch.setenv(triton_sparse.TILE_KNOB, "wider")
    with pytest.raises(ValueError, match="DSKERNELS_SPARSE_MLA_TILE: expected 'narrow' or 'wide', got 'wider'"):
        triton_sparse.wide_tiles()


@pytest.mark.gpu
@pytest.mark.parametrize("h_q", [16, 64, 128])
def test_wide_fp8_v32_shapes_on_gpu(triton_device, h_q):
    """DeepSeek-V3.2 decode on the device: top-2048 of an FP8 cache of 64-token pages, 16 (TP8), 64
    and 128 heads (one and two 64-head tiles), MTP s_q = 2, split lists."""
    if triton_device != "cuda":
        pytest.skip("needs a GPU (V3.2's sizes take minutes in the interpreter)")
    run_and_check("cuda", 4, 2, h_q, 64, 160, 2048, torch.bfloat16, True, True, seed=h_q)


@pytest.mark.gpu
@pytest.mark.parametrize("b,s_q,h_q,topk,split", [(4, 2, 128, 2048, True), (4, 1, 64, 2048, True),
                                                  (80, 2, 128, 256, False), (2, 1, 128, 16, False)])
def test_wide_fp8_tiles_ran_split_or_not(triton_device, monkeypatch, b, s_q, h_q, topk, split):
    """On the device, V3.2's FP8 cache through the wide FP8 kernel with 64-head tiles in 8 warps
    (not tile_config's), its lists split where few programs would run and whole where the batch
    fills the GPU (160 rows x 2 tiles) or the list is one block: the non-split form (its own
    attn_sink step and direct stores) is V3.2 decode's at serving batch sizes."""
    if triton_device != "cuda":
        pytest.skip("the GPU's tile and split counts")
    _, recorders = _record_sparse_launches(monkeypatch)
    run_and_check("cuda", b, s_q, h_q, 64, 160, topk, torch.bfloat16, True, True, seed=b + topk)
    calls = recorders["_sparse_mla_fp8_kernel"].calls
    assert calls and all((c["BLOCK_H"], c["num_warps"], c["SPLIT"]) == (64, 8, split) for c in calls), calls


def test_nan_constants():
    """The byte patterns the NaN test writes are NaN in their formats."""
    assert math.isnan(torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item())
    assert math.isnan(torch.tensor([0xC0, 0x7F], dtype=torch.uint8).view(torch.bfloat16).float().item())
