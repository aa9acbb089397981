"""The README's usage example runs as printed, so it cannot drift from the API: with `auto` (the
reference without a GPU, the GPU's kernels with one) and with Triton through its interpreter on CPU
tensors."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def usage_example() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Using it"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_readme_usage_example_runs(backend):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if backend == "triton":
        env.update(TRITON_INTERPRET="1", DSKERNELS_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    # The example's own names, checked after it ran: the shapes its comments promise.
    check = ("\nassert o.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)"
             "\nassert out.shape == (m, n) and bool(out.float().isfinite().all())"
             "\nassert o_sparse.shape == (b, s_q, h_q, 512)")
    out = subprocess.run([sys.executable, "-c", usage_example() + check], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
