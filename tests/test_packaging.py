"""What `pip install .`, a wheel and the sdist get, checked without building anything: setup.py's
egg_info (CPU only, a few seconds) lists the sdist's files (MANIFEST.in) and the wheel's
requirements. scripts/check_sdist.py (CI, check_build.sh) also builds and installs the sdist."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    """setup.py's egg_info: SOURCES.txt is the sdist's file list, requires.txt the wheel's Requires-Dist."""
    base = tmp_path_factory.mktemp("egg_info")
    env = dict(os.environ, DSKERNELS_CPU_ONLY="1")  # (a toolkit without CUTLASS would stop it otherwise)
    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return base / "dskernels.egg-info"


def test_sdist_carries_the_sources_tests_and_docs(egg_info, monkeypatch):
    """Every tracked file the build, the package and the README's commands need is in the sdist:
    setuptools adds tests/test*.py by itself, and without tests/conftest.py (the `backend` fixture,
    the gpu skips) an unpacked sdist's tests failed."""
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout (an unpacked sdist): no tracked files to compare with")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import check_sdist

    carried = set((egg_info / "SOURCES.txt").read_text().split())
    missing = [path for path in check_sdist.tracked_sources() if path not in carried]
    assert not missing, f"MANIFEST.in leaves {len(missing)} tracked file(s) out of the sdist: {missing[:10]}"
    assert "tests/conftest.py" in carried and "docs/api.md" in carried


def test_wheel_requires_the_torch_it_was_built_against(egg_info):
    """_C refuses another torch major.minor at import: the metadata pins it, so that pip does not
    install the wheel beside (or upgrade to) a torch it cannot load under."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    requires = (egg_info / "requires.txt").read_text().split()
    assert f"torch=={major}.{minor}.*" in requires, requires


def test_build_without_torch_says_what_to_install():
    """With --no-build-isolation and no torch, setup.py says to install torch first (it was a bare
    ModuleNotFoundError inside pip's traceback)."""
    code = "import runpy, sys; sys.modules['torch'] = None; runpy.run_path('setup.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "needs torch installed first" in out.stderr and "--no-build-isolation" in out.stderr, out.stderr[-2000:]


def test_build_refuses_a_torch_older_than_the_minimum():
    """setup.py refuses to compile against a torch older than dskernels/_requirements.py's minimum
    (the wheel would pin that release, and `import dskernels` would refuse it)."""
    code = ("import runpy, torch; torch.__version__ = '2.1.2+cu121'; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = dict(os.environ, DSKERNELS_CPU_ONLY="1")
    out = subprocess.run([sys.executable, "-c", code, "egg_info"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "dskernels needs torch >= " in out.stderr and "this is torch 2.1.2+cu121" in out.stderr, out.stderr[-2000:]
