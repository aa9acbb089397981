"""Static checks on the compiled sm_90a code (no GPU needed): memory-bound kernels keep several
global loads in flight per thread, and no named barrier wrapped around onto barrier 0.

A thread that uses a loaded value before issuing its next load waits a full memory latency per
load; on Hopper that caps a streaming kernel far below HBM bandwidth unless occupancy alone hides it
(it did not: the FP8 casts ran at 38-58% of copy bandwidth on an H200 that way). The measure here,
read off `cuobjdump -sass`: along each kernel's instructions in program order, the largest number
of global loads (LDG) issued whose results no instruction has read yet. A heuristic floor, not a
proof: it follows the listing, not the branches, and takes the maximum over the whole kernel, which
is enough for the straight-line unrolled load batches it guards (one hot loop per kernel here), and
it cannot see the scoreboard waits that the listing does not print (DEPBAR, BAR, CALL, RET and EXIT
count as waiting for every load).

    python scripts/check_sass.py [path/to/_C.so]      # prints every kernel's number, checks the floors

Named barriers: cutlass::arch::NamedBarrier adds 8 reserved ids to the one it is given, and ptxas
takes a hardware id past 15 modulo 16 without a warning (2026-12-05: the MLA narrow kernel's ids 8
and 9 became barriers 0 and 1, 0 being __syncthreads'). __syncthreads is BAR.SYNC 0x0 with no
thread count; a BAR on 0x0 with a count is such a wrapped id, and fails the check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# Kernel (a substring of its mangled name) -> the fewest loads in flight it must keep.
FLOORS = {
    "per_token_cast_to_fp8_kernelI13__nv_bfloat16": 4,  # kUnroll 1x128 groups per thread
    "per_token_cast_to_fp8_kernelI6__half": 4,
    "per_token_cast_to_fp8_kernelIf": 4,
    "per_block_cast_to_fp8_kernelI13__nv_bfloat16": 8,  # the block's 8 row steps (16 threads per row)
    "per_block_cast_to_fp8_kernelI6__half": 8,
    "per_block_cast_to_fp8_kernelIf": 16,  # 32 threads per row: 16 steps
    "sum_partials_kernel": 8,  # split-K GEMM: the runs' 16-byte loads before the first add (11 measured)
}

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?P<text>[^;]*);")
_REGISTER = re.compile(r"\bR(\d+)(?:\.64)?\b")


def cuobjdump() -> str:
    """cuobjdump from the toolkit, else the copy in triton's wheel (CI's bare nvcc has none)."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "cuobjdump")
    if os.access(candidate, os.X_OK):
        return candidate
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def functions(sass: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its instructions (predicate, opcode and operands), in listing order."""
    found: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        if "Function :" in line:
            current = line.split("Function :", 1)[1].strip()
            found[current] = []
            continue
        match = _INSTRUCTION.search(line)
        if current is not None and match:
            found[current].append(match.group("text").strip())
    return found


def _registers(operand: str, width: int = 1) -> set[int]:
    regs = set()
    for match in _REGISTER.finditer(operand):
        base = int(match.group(1))
        span = 2 if match.group(0).endswith(".64") else width
        regs.update(range(base, base + span))
    return regs


def _split(instruction: str) -> tuple[str, list[str]]:
    text = re.sub(r"^@!?U?P\w+\s+", "", instruction)  # the guard predicate
    opcode, _, rest = text.partition(" ")
    return opcode, [op.strip() for op in rest.split(",")] if rest else []


def _width(opcode: str) -> int:
    """Registers per data operand of a load or store: 2 for .64, 4 for .128, else 1."""
    bits = re.search(r"\.(64|128)\b", opcode)
    return {"64": 2, "128": 4}[bits.group(1)] if bits else 1


_WAITS_FOR_ALL = ("DEPBAR", "BAR", "CALL", "RET", "EXIT")


def loads_in_flight(instructions: list[str]) -> int:
    """The most LDGs outstanding at once (issued, their destination registers not yet read)."""
    pending: list[set[int]] = []  # destination registers of the loads not yet used
    most = 0
    for instruction in instructions:
        opcode, operands = _split(instruction)
        if opcode.startswith(_WAITS_FOR_ALL):
            pending = []
            continue
        is_store = opcode.startswith(("ST", "RED", "ATOM"))
        sources = operands if is_store else operands[1:]
        # A store's data operand spans the store's width (STG.E.128 [R2.64], R12 reads R12..R15).
        read = set().union(*(_registers(op, _width(opcode) if is_store and "[" not in op else 1)
                             for op in sources)) if sources else set()
        pending = [regs for regs in pending if not regs & read]
        if opcode.startswith("LDG") and operands:
            pending.append(_registers(operands[0], _width(opcode)))
            most = max(most, len(pending))
        elif operands and not is_store:  # a write to a pending register ends that load's wait too
            written = _registers(operands[0])
            pending = [regs for regs in pending if not regs & written]
    return most


_WRAPPED_BARRIER = re.compile(r"^(?:@!?U?P\w+\s+)?BAR\.\w+(?:\.\w+)*\s+0x0\s*,")


def wrapped_barriers(instructions: list[str]) -> int:
    """Named-barrier instructions on hardware barrier 0 with a thread count (see the docstring)."""
    return sum(1 for instruction in instructions if _WRAPPED_BARRIER.match(instruction))


def main() -> int:
    if len(sys.argv) > 1:
        library = sys.argv[1]
    else:
        import dskernels._C as compiled

        library = compiled.__file__
    sass = subprocess.run([cuobjdump(), "-sass", library], check=True, capture_output=True, text=True).stdout
    kernels = functions(sass)
    failed = []
    for pattern, floor in FLOORS.items():
        matches = [name for name in kernels if pattern in name]
        if not matches:
            failed.append(f"{pattern}: no such kernel in {library}")
            continue
        for name in matches:
            got = loads_in_flight(kernels[name])
            status = "ok" if got >= floor else "FAIL"
            print(f"{status}: {name}: {got} loads in flight per thread (floor {floor})")
            if got < floor:
                failed.append(name)
    wrapped = [name for name, instructions in kernels.items() if wrapped_barriers(instructions)]
    print(f"{'FAIL' if wrapped else 'ok'}: named barriers of {len(kernels)} kernels"
          + "".join(f"\n  {name}: on hardware barrier 0 with a thread count (an id past 15?)" for name in wrapped))
    failed += wrapped
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
