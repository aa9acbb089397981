"""Checks that a user's `pip install .` gets a working package (CI runs it from check_build.sh):

1. the sdist carries every source the build and the package need, and what the README's commands
   run from it: each file git tracks under PACKAGED (MANIFEST.in and setup.py's package list decide
   that, and nothing else tests them: the in-place build reads the checkout);
2. installed from that sdist, outside the checkout (`pip install --no-build-isolation --target`,
   CPU only: the CUDA build is checked by check_build.sh itself), the package imports from where
   it was installed and runs an op on the reference and Triton backends against its oracle.

    python scripts/check_sdist.py [--keep DIR]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The build and the package; the tests (conftest.py too), the benchmarks and scripts they run, the docs.
PACKAGED = ("csrc/", "dskernels/", "python_ref/", "tests/", "benchmarks/", "scripts/", "docs/")

# Run from outside the checkout, on the installed copy only.
SMOKE = r"""
import os, sys
import torch
import dskernels, python_ref
site = os.path.realpath(sys.argv[1])
for module in (dskernels, python_ref):
    assert os.path.realpath(module.__file__).startswith(site + os.sep), f"{module.__name__} from {module.__file__}"
assert torch.ops.dskernels._build_info() == "cpu", torch.ops.dskernels._build_info()
from python_ref.fp8 import per_token_cast_to_fp8 as oracle
x = torch.randn(3, 256) * 10
want_q, want_s = oracle(x)
for name in ("ref", "triton"):
    with dskernels.backend(name):
        q, s = dskernels.per_token_cast_to_fp8(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s), name
print("ok: installed from the sdist, dskernels imports from", site, "and its cast matches the oracle")
"""


def tracked_sources() -> list[str]:
    """The files git tracks under PACKAGED that exist (a tracked file deleted in a dirty tree is
    no longer the sdist's to carry)."""
    try:
        listed = subprocess.run(["git", "ls-files", *PACKAGED], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("check_sdist: needs git (it compares the sdist with the files git tracks)")
    if listed.returncode != 0:
        sys.exit(f"check_sdist: git ls-files failed (run from a git checkout): {listed.stderr.strip()}")
    return [path for path in listed.stdout.split() if os.path.exists(os.path.join(ROOT, path))]


def build_sdist(work: str) -> str:
    """The sdist, built from the checkout. The egg-info goes to the scratch folder: setuptools reads a
    SOURCES.txt it finds back in, so an old one in the checkout would keep files in the sdist that
    MANIFEST.in no longer names."""
    out_dir = os.path.join(work, "dist")
    built = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", work, "sdist", "-d", out_dir],
                           cwd=ROOT, capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit("check_sdist: building the sdist failed:\n" + built.stdout[-3000:] + built.stderr[-3000:])
    (name,) = [n for n in os.listdir(out_dir) if n.endswith(".tar.gz")]
    return os.path.join(out_dir, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dskernels-sdist-") as scratch:
        work = os.path.abspath(args.keep) if args.keep else scratch
        for old in ("dist", "site", "dskernels.egg-info"):  # a kept folder's last run
            shutil.rmtree(os.path.join(work, old), ignore_errors=True)
        os.makedirs(work, exist_ok=True)
        sources = tracked_sources()
        sdist = build_sdist(work)
        with tarfile.open(sdist) as archive:
            root = os.path.commonpath(archive.getnames())
            carried = {os.path.relpath(name, root) for name in archive.getnames()}
        missing = [path for path in sources if path not in carried]
        if missing:
            print(f"FAIL: {os.path.basename(sdist)} lacks {len(missing)} tracked file(s) (MANIFEST.in, setup.py's "
                  f"packages): {', '.join(missing[:10])}")
            return 1
        print(f"ok: {os.path.basename(sdist)} carries all {len(sources)} tracked sources")

        site = os.path.join(work, "site")
        env = dict(os.environ, DSKERNELS_CPU_ONLY="1")
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "--no-build-isolation", "--no-deps", "--target", site, sdist],
                                 cwd=work, env=env, capture_output=True, text=True)
        if install.returncode != 0:
            print("FAIL: pip install of the sdist:\n" + install.stdout[-3000:] + install.stderr[-3000:])
            return 1
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])),
                   TRITON_INTERPRET="1")
        smoke = subprocess.run([sys.executable, "-c", SMOKE, site], cwd=work, env=env, capture_output=True, text=True)
        print(smoke.stdout.strip())
        if smoke.returncode != 0:
            print("FAIL: the installed package:\n" + smoke.stderr[-3000:])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
