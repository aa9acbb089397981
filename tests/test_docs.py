"""The README's example runs as written (on CPU tensors here: the reference backend)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["o"].shape == (2, 1, 16, 512) and scope["lse"].shape == (2, 16, 1)
    assert scope["out"].isfinite().all()
    assert scope["o_sparse"].shape == (2, 1, 16, 512) and scope["o_sparse"].isfinite().all()
