"""vLLM's and SGLang's FlashMLA call patterns (FlashMLA's newest metadata form), on CPU tensors."""

import pytest
import torch

import dskernels


def _mla_inputs(b=3, s_q=1, h_q=16, d=576, page=64, pages_per_seq=4):
    torch.manual_seed(0)
    lens = torch.tensor([70, 1, 130][:b], dtype=torch.int32)
    kc = torch.randn(b * pages_per_seq, page, 1, d, dtype=torch.bfloat16)
    bt = torch.arange(b * pages_per_seq, dtype=torch.int32).view(b, pages_per_seq)
    q = torch.randn(b, s_q, h_q, d, dtype=torch.bfloat16)
    return q, kc, bt, lens


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_mla_tensor_metadata_without_num_splits(backend):
    # vLLM's FlashMLA backend, written for FlashMLA's newest get_mla_metadata (which returns
    # (FlashMLASchedMeta, None) whatever it is given): the first element, no num_splits.
    q, kc, bt, lens = _mla_inputs()
    with dskernels.backend(backend):
        md, ns = dskernels.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1)
        want, want_lse = dskernels.flash_mla_with_kvcache(q, kc, bt, lens, 512, md, ns, causal=True)
        sched, _ = dskernels.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1, is_fp8_kvcache=False)
        got, lse = dskernels.flash_mla_with_kvcache(q=q, k_cache=kc, block_table=bt, cache_seqlens=lens, head_dim_v=512,
                                                    tile_scheduler_metadata=sched, causal=True, is_fp8_kvcache=False)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse)


def test_mla_metadata_without_num_splits_still_checks_type():
    q, kc, bt, lens = _mla_inputs()
    with pytest.raises(TypeError, match="tile_scheduler_metadata"):
        dskernels.flash_mla_with_kvcache(q, kc, bt, lens, 512, [1, 2], None)


def test_flashmla_sched_meta_fields():
    q, kc, bt, lens = _mla_inputs()
    sched, none = dskernels.get_mla_metadata()
    assert none is None and isinstance(sched, dskernels.FlashMLASchedMeta)
    assert not sched.have_initialized and sched.tile_scheduler_metadata is None and sched.num_splits is None
    out, _ = dskernels.flash_mla_with_kvcache(q, kc, bt, lens, 512, sched, None, causal=True)
    md, ns = dskernels.get_mla_metadata(lens, 16, 1)
    want, _ = dskernels.flash_mla_with_kvcache(q, kc, bt, lens, 512, md, ns, causal=True)
    torch.testing.assert_close(out, want)
    assert sched.have_initialized and sched.config is not None
    assert torch.equal(sched.tile_scheduler_metadata, md) and torch.equal(sched.num_splits, ns)
    # vLLM resets a plan by assigning None to both fields: the next call plans the new batch
    with pytest.raises(ValueError, match="^tile_scheduler_metadata: planned for"):
        dskernels.flash_mla_with_kvcache(q[:2], kc, bt[:2], lens[:2], 512, sched, None, causal=True)
    sched.tile_scheduler_metadata = None
    sched.num_splits = None
    assert not sched.have_initialized and sched.num_splits is None
    out2, _ = dskernels.flash_mla_with_kvcache(q[:2], kc, bt[:2], lens[:2], 512, sched, None, causal=True)
    torch.testing.assert_close(out2, want[:2])
    # a table made elsewhere is refused (it would not describe this library's splits)
    with pytest.raises(NotImplementedError, match="^num_splits: only None may be assigned"):
        sched.num_splits = torch.zeros(4, dtype=torch.int32)


def test_flashmla_sched_meta_reset_as_sglang_does():
    """FlashMLA's FlashMLASchedMeta is a dataclass: SGLang resets a plan before a CUDA-graph capture
    with `have_initialized = False` (others also assign config = None); the next call plans again."""
    q, kc, bt, lens = _mla_inputs()
    sched, _ = dskernels.get_mla_metadata()
    want, _ = dskernels.flash_mla_with_kvcache(q, kc, bt, lens, 512, sched, None, causal=True)
    sched.have_initialized = True  # (already planned: nothing changes)
    assert sched.have_initialized
    sched.have_initialized = False
    sched.config = None
    assert not sched.have_initialized and sched.tile_scheduler_metadata is None
    got, _ = dskernels.flash_mla_with_kvcache(q[:2], kc, bt[:2], lens[:2], 512, sched, None, causal=True)
    torch.testing.assert_close(got, want[:2])
    fresh, _ = dskernels.get_mla_metadata()
    with pytest.raises(ValueError, match="^have_initialized: True is set by"):
        fresh.have_initialized = True
    with pytest.raises(NotImplementedError, match="^config: only None may be assigned"):
        sched.config = ("b", 1)
