"""Prints what a built dskernels._C depends on: a hash of the sources it is compiled from, the Python
tag and the torch version of the interpreter running this (argument: the source tree, default this
checkout). scripts/prebuild_device.sh writes it
next to a library built for the device; scripts/gpu_check.sh compares it with the device's before
using that library instead of building."""

import hashlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_hash(root: str = ROOT) -> str:
    digest = hashlib.sha256()
    paths = [os.path.join(root, "setup.py")]
    for folder, _, files in os.walk(os.path.join(root, "csrc")):
        paths += [os.path.join(folder, f) for f in files]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


if __name__ == "__main__":
    print(f"sources {source_hash(sys.argv[1] if len(sys.argv) > 1 else ROOT)}")
    print(f"python cp{sys.version_info[0]}{sys.version_info[1]}")
    print(f"torch {torch.__version__}")
