"""dskernels: DeepSeek-V3 kernels for Hopper as PyTorch custom ops (torch.ops.dskernels).

The public contract is docs/api.md; every op runs on the sm90 CUDA kernel, Triton or the
pure-PyTorch reference (see `backend`)."""

import os

import torch  # (loads libc10/libtorch, which _C links against)

from dskernels._requirements import too_old_message

# Before _C: on an older torch its load (or a later Python registration) fails with a message that
# does not say the release is the cause.
if too_old_message(torch.__version__):
    raise ImportError(too_old_message(torch.__version__))


def _load_error(e: ImportError) -> str:
    """What a failed `import dskernels._C` means, and what to do."""
    text = str(e)
    here = os.path.dirname(os.path.abspath(__file__))
    if "cannot import name '_C'" in text:  # Python calls this a circular import; it is a missing build
        return (f"dskernels._C is not built in {here}: run `bash scripts/build.sh` (or scripts/install.sh) in the "
                "checkout; a CUDA toolkit is optional (README.md, 'Building'). (If dskernels is installed, a "
                "checkout on sys.path, e.g. the current directory, shadows it.)")
    if "libc10_cuda" in text or "libcudart" in text:
        if "libc10_cuda" in text or torch.version.cuda is None:  # (a CUDA torch has its libc10_cuda)
            return (f"dskernels._C could not be loaded ({text}): it was built with the CUDA kernels, and this torch "
                    f"({torch.__version__}) has no CUDA libraries. Install a CUDA build of torch, or rebuild "
                    "without the kernels (DSKERNELS_CPU_ONLY=1 bash scripts/build.sh).")
        return (f"dskernels._C could not be loaded ({text}): it was built with the CUDA kernels against another CUDA "
                f"runtime than this torch's (CUDA {torch.version.cuda}, torch {torch.__version__}). Rebuild it with "
                "the toolkit of torch's CUDA major version (CUDA_HOME), e.g. `bash scripts/build.sh`.")
    if "undefined symbol" in text:  # almost always a build against another torch (C++ ABI)
        return (f"dskernels._C could not be loaded ({text}). It was built against another torch than this "
                f"one ({torch.__version__}): rebuild it against the installed torch with "
                "`pip install --no-build-isolation .` (`-e .` in a checkout) or `bash scripts/build.sh`.")
    return (f"dskernels._C could not be loaded ({text}). Build it with `bash scripts/build.sh` (see README.md); "
            "a CUDA toolkit is optional.")


try:
    from dskernels import _C  # noqa: F401  (loads the schemas and the CUDA kernels)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(_load_error(e)) from e


def _check_torch_version() -> None:
    """_C works with the torch release it was compiled against only (its C++ ABI): another one may
    load without an undefined symbol and fail later, so it is refused here, saying what to do."""
    try:
        built = torch.ops.dskernels._built_torch_version()
    except (AttributeError, RuntimeError):  # a _C built before it recorded this: nothing to compare
        return
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        raise ImportError(
            f"dskernels._C was built against torch {built}, but this is torch {torch.__version__}: rebuild it "
            "against the installed torch (`pip install --no-build-isolation .`, or `bash scripts/build.sh` in a "
            "checkout; an isolated `pip install .` compiles against the torch its build environment fetched)")


_check_torch_version()

from dskernels import ops  # noqa: E402,F401  (registers the Python kernels)
from dskernels._backend import (available_backends, backend, batch_invariant,  # noqa: E402
                                batch_invariant_enabled, current_backend)
from dskernels.ops.einsum import einsum, fp8_einsum  # noqa: E402
from dskernels.ops.ep import ep_get_dispatch_layout  # noqa: E402
from dskernels.ops.fp8 import (per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8,  # noqa: E402
                               silu_and_mul, silu_and_mul_cast_to_fp8)
from dskernels.ops.moe import grouped_topk  # noqa: E402
from dskernels import testing, utils  # noqa: E402,F401  (attributes after `import dskernels`, as DeepGEMM's are)
from dskernels.ops.gemm import (  # noqa: E402
    calc_diff,
    ceil_div,
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    fp8_m_grouped_gemm_nt_masked,
    gemm_fp8_fp8_bf16_nt,
    get_col_major_tma_aligned_tensor,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_tensor,
    get_num_sms,
    get_pdl,
    get_tc_util,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    set_mk_alignment_for_contiguous_layout,
    set_num_sms,
    set_pdl,
    set_tc_util,
    transform_sf_into_required_layout,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from dskernels.ops.gemm_bf16 import (  # noqa: E402
    bf16_gemm_nn,
    bf16_gemm_nt,
    bf16_gemm_tn,
    bf16_gemm_tt,
    cublaslt_gemm_nn,
    cublaslt_gemm_nt,
    cublaslt_gemm_tn,
    cublaslt_gemm_tt,
    k_grouped_bf16_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
)
from dskernels.ops.indexer import (fp8_fp4_mqa_logits, fp8_fp4_paged_mqa_logits, fp8_mqa_logits,  # noqa: E402
                                   fp8_paged_mqa_logits, get_paged_mqa_logits_metadata, paged_k_cache_cast_to_fp8,
                                   per_custom_dims_cast_to_fp8)
from dskernels.ops.mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from dskernels.ops.pipeline import dualpipe_schedule  # noqa: E402  (decoded to action strings)
from dskernels.ops.mla_sparse import (dequantize_sparse_kv_cache, flash_mla_sparse_decode,  # noqa: E402
                                      flash_mla_sparse_fwd, quantize_sparse_kv_cache)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backend",
    "batch_invariant",
    "batch_invariant_enabled",
    "bf16_gemm_nn",
    "bf16_gemm_nt",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "calc_diff",
    "ceil_div",
    "cublaslt_gemm_nn",
    "cublaslt_gemm_nt",
    "cublaslt_gemm_tn",
    "cublaslt_gemm_tt",
    "current_backend",
    "dequantize_sparse_kv_cache",
    "dualpipe_schedule",
    "einsum",
    "ep_get_dispatch_layout",
    "flash_mla_sparse_decode",
    "flash_mla_sparse_fwd",
    "fp8_einsum",
    "fp8_gemm_nn",
    "fp8_gemm_nt",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "fp8_m_grouped_gemm_nt_masked",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "gemm_fp8_fp8_bf16_nt",
    "get_col_major_tma_aligned_tensor",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_tma_aligned_size",
    "grouped_topk",
    "k_grouped_bf16_gemm_tn_contiguous",
    "k_grouped_fp8_gemm_nt_contiguous",
    "k_grouped_fp8_gemm_tn_contiguous",
    "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "m_grouped_fp8_gemm_nn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "FlashMLASchedMeta",
    "get_paged_mqa_logits_metadata",
    "paged_k_cache_cast_to_fp8",
    "per_custom_dims_cast_to_fp8",
    "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_token_cast_to_fp8",
    "quantize_sparse_kv_cache",
    "set_num_sms",
    "set_tc_util",
    "set_pdl",
    "set_mk_alignment_for_contiguous_layout",
    "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_tc_util",
    "get_pdl",
    "silu_and_mul",
    "silu_and_mul_cast_to_fp8",
    "transform_sf_into_required_layout",
    "wgrad_gemm_fp8_fp8_fp32_nt",
]
