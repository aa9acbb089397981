r"""Compares the sm_90a machine code of CUDA sources between a git revision and the working tree,
kernel by kernel, without a GPU: the check that a refactor of device code left its kernels alone.

    python scripts/sass_diff.py [--base REV] [--filter REGEX] [--rename OLD=NEW] csrc/mla/sm90_mla_decode_bf16.cu

Each .cu file is compiled to a cubin (nvcc -cubin for sm_90a with setup.py's flags and include
paths) from `git archive REV csrc` and from the working tree, disassembled with cuobjdump, and
each kernel compared after register renaming is taken out (R, UR, P, UP, B numbers), `.reuse`
operand-cache hints are dropped and branch targets replaced (code that moved). Immediates stay:
a changed shared-memory offset or barrier id is a difference. Verdicts per kernel:
  identical          the same instruction sequence;
  reordered          the same instructions as a multiset (the scheduler's choices differ);
  differs            the opcodes whose counts changed are listed;
  only in base/head  the kernel exists on one side.
--rename OLD=NEW (a regex and its replacement, repeatable) renames the base side's kernels first,
for a change that added a template parameter. Exit status 1 when a kernel differs or only the base
has it (a kernel only the working tree has is new, not changed). First used on 2026-12-05 to show
that the seesaw commit's refactor of the default MLA consumers (8e89794, which added
decode_kernel's kSeesaw parameter) changed their order only:

    python scripts/sass_diff.py --base 7e01c7b csrc/mla/sm90_mla_decode_bf16.cu \
        --rename 'decode_kernelI13__nv_bfloat16Lb(\d)ELi(\d)EEEv=decode_kernelI13__nv_bfloat16Lb\1ELi\2ELb0EEEv'
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from check_sass import cuobjdump, functions  # noqa: E402

_REGISTERS = re.compile(r"\b(U?R|U?P|B)(\d+|Z|T)\b")
_BRANCHES = ("BRA", "BRX", "BSSY", "CALL", "JMP", "JMX", "BREAK", "SSY", "PBK", "RET", "WARPSYNC")


def normalize(instruction: str) -> str:
    """An instruction with register numbers, .reuse hints and branch targets taken out."""
    text = instruction.replace(".reuse", "")
    text = _REGISTERS.sub(lambda m: m.group(1) + ("" if m.group(2).isdigit() else m.group(2)), text)
    opcode = re.sub(r"^@!?U?P\w*\s+", "", text).split(" ", 1)[0]
    if opcode.split(".")[0] in _BRANCHES:
        text = re.sub(r"0x[0-9a-f]+", "ADDR", text)
    return " ".join(text.split())


def compare(base: list[str], head: list[str]) -> str:
    """The verdict for one kernel's instructions on the two sides."""
    base_n, head_n = [normalize(i) for i in base], [normalize(i) for i in head]
    if base_n == head_n:
        return "identical"
    if collections.Counter(base_n) == collections.Counter(head_n):
        return "reordered"
    opcodes = collections.Counter(i.split(" ")[0] for i in head_n)
    opcodes.subtract(collections.Counter(i.split(" ")[0] for i in base_n))
    changed = ", ".join(f"{op} {n:+d}" for op, n in sorted(opcodes.items()) if n)
    return f"differs ({len(base)} -> {len(head)} instructions{'; ' + changed if changed else ''})"


def _nvcc_command(source: str, include: str, cubin: str) -> list[str]:
    import cutlass_library
    import torch.utils.cpp_extension as ext

    cutlass = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return [nvcc, "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++20",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "-DDSKERNELS_WITH_CUDA",
            f"-I{include}", f"-I{cutlass}", *(f"-I{p}" for p in ext.include_paths()), source, "-o", cubin]


def kernels(tree: str, source: str, work: str) -> dict[str, list[str]]:
    """Mangled name -> instructions of every kernel in `source` compiled from `tree`."""
    cubin = os.path.join(work, os.path.basename(source) + ".cubin")
    command = _nvcc_command(os.path.join(tree, source), os.path.join(tree, "csrc", "include"), cubin)
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode:
        raise SystemExit(f"nvcc failed on {source} in {tree}:\n{built.stderr[-3000:]}")
    sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return functions(sass)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help=".cu files under csrc/, relative to the repository root")
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against (default HEAD)")
    parser.add_argument("--filter", default="", help="only kernels whose mangled name matches this regex")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="re.sub(OLD, NEW) on the base side's kernel names (repeatable)")
    args = parser.parse_args()
    renames = []
    for rule in args.rename:
        old, sep, new = rule.partition("=")
        if not sep:
            parser.error(f"--rename: expected OLD=NEW, got {rule!r}")
        renames.append((old, new))

    status = 0
    with tempfile.TemporaryDirectory() as work:
        base_tree = os.path.join(work, "base")
        os.makedirs(base_tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.base, "csrc"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", base_tree], input=archive.stdout, check=True)
        for source in args.sources:
            sides = []
            for name, tree in (("base", base_tree), ("head", ROOT)):
                out = os.path.join(work, name)
                os.makedirs(out, exist_ok=True)
                sides.append(kernels(tree, source, out))
            base, head = sides
            for old, new in renames:
                base = {re.sub(old, new, name): code for name, code in base.items()}
            print(f"{source}: {args.base} -> working tree")
            for kernel in sorted(set(base) | set(head)):
                if args.filter and not re.search(args.filter, kernel):
                    continue
                if kernel not in head or kernel not in base:
                    verdict = "only in base" if kernel in base else "only in head"
                else:
                    verdict = compare(base[kernel], head[kernel])
                status |= verdict.startswith(("differs", "only in base"))  # (a new kernel is no change)
                print(f"  {verdict}: {kernel}")
    return status


if __name__ == "__main__":
    sys.exit(main())
