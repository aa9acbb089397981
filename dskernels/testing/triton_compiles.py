"""A log of the Triton compiles of dskernels' kernels, and their replay ahead of time.

A short device session spends much of its time compiling Triton kernels (each test file and
benchmark process compiles the specializations it launches). With DSKERNELS_TRITON_COMPILE_LOG=PATH
set, every compile of a kernel defined under dskernels appends one JSON line to PATH: the kernel,
its specialization (signature, constexprs, divisibility attributes), the compile options, the
target, the seconds it took and whether Triton's on-disk cache already held it. `replay` compiles
the same specializations again, anywhere (no GPU needed): into a cache directory that a later
device call is given as TRITON_CACHE_DIR, so that those compiles become cache hits there.
A replayed entry has the same cache key as the original exactly when Triton (version and build),
the target, the kernel's source and the cache-invalidating environment are the same.

    python -m dskernels.testing.triton_compiles summary LOG [LOG ...]   # compiles, hits, seconds
    python -m dskernels.testing.triton_compiles replay LOG [LOG ...]    # compile into TRITON_CACHE_DIR
    python -m dskernels.testing.triton_compiles distinct LOG [LOG ...]  # each specialization once, to stdout
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib
import json
import os
import sys
import time

ENV = "DSKERNELS_TRITON_COMPILE_LOG"
_installed = False


def install_from_env(prefix: str = "dskernels.") -> bool:
    """Registers the logging listener when DSKERNELS_TRITON_COMPILE_LOG is set (once per process).
    Returns whether it is installed; a Triton without compilation listeners logs nothing."""
    global _installed
    path = os.environ.get(ENV)
    if not path or _installed:
        return _installed
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.compilation, "listener"):
        return False
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)
        fn = getattr(src, "fn", None)
        if fn is None or not str(getattr(fn, "module", "")).startswith(prefix):
            return
        try:
            line = json.dumps(record(src, metadata, times, cache_hit))
        except Exception as e:  # noqa: BLE001  (a logging failure must not fail the compile)
            line = json.dumps({"kernel": f"{fn.module}:{fn.__name__}", "error": f"{type(e).__name__}: {e}"})
        with open(path, "a") as f:  # one write per line: lines of concurrent processes stay whole
            f.write(line + "\n")

    knobs.compilation.listener = listener
    _installed = True
    return True


def _seconds(times) -> float:
    """knobs.CompileTimes (microseconds per phase) -> seconds."""
    micros = getattr(times, "ir_initialization", 0) + getattr(times, "store_results", 0)
    micros += sum(d for _, d in getattr(times, "lowering_stages", ()))
    return micros / 1e6


def _encode(value):
    """A constexpr value as JSON; tuples and Triton dtypes tagged so that replay rebuilds them."""
    import triton.language as tl

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tl.dtype):
        return {"tl.dtype": value.name}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encode(v) for v in value]}
    raise TypeError(f"constexpr of type {type(value).__name__} has no JSON form")


def _decode(value):
    import triton.language as tl

    if isinstance(value, dict):
        (tag, inner), = value.items()
        if tag == "tl.dtype":
            return tl.dtype(inner)
        items = [_decode(v) for v in inner]
        return tuple(items) if tag == "tuple" else items
    return value


def _target(target):
    """A GPUTarget, or its JSON form in a cache hit's metadata -> [backend, arch, warp_size]."""
    if isinstance(target, dict):
        return [target["backend"], target["arch"], target["warp_size"]]
    if isinstance(target, (list, tuple)):
        return list(target)
    return [target.backend, target.arch, target.warp_size]


@functools.cache
def _option_fields(backend: str, arch, warp_size: int) -> tuple[str, ...]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return tuple(f.name for f in dataclasses.fields(make_backend(GPUTarget(backend, arch, warp_size)).parse_options({})))


def record(src, metadata, times, cache_hit: bool) -> dict:
    """One log line. options: the parsed compile options with plain values (the others, such as
    the fp8 dtype sets, are the target's defaults and come back from it)."""
    import triton

    meta = metadata if isinstance(metadata, dict) else metadata._asdict()
    target = _target(meta["target"])
    fields = _option_fields(*target)
    options = {k: v for k, v in meta.items()
               if k in fields and (v is None or isinstance(v, (bool, int, float, str)))}
    entry = {"kernel": f"{src.fn.module}:{src.fn.__name__}", "target": target, "triton": triton.__version__,
             "cache_hit": bool(cache_hit), "seconds": round(_seconds(times), 3),
             "signature": dict(src.signature), "options": options,
             "attrs": [[list(path), attr] for path, attr in src.attrs.items()]}
    try:
        entry["constexprs"] = [[list(path), _encode(v)] for path, v in src.constants.items()]
    except TypeError as e:
        entry["unreplayable"] = str(e)
    return entry


def read(paths) -> list[dict]:
    entries = []
    for path in paths:
        with open(path) as f:
            entries += [json.loads(line) for line in f if line.strip()]
    return entries


def _jit_function(kernel: str):
    """"module:name" -> the JITFunction (under TRITON_INTERPRET the module holds an interpreted
    one: a JITFunction of the same Python function has the same cache key)."""
    from triton.runtime.jit import JITFunction

    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def distinct(entries) -> list[dict]:
    """Each specialization once (the first entry of it), without the fields of one compile."""
    out, seen = [], set()
    for e in entries:
        if "error" in e:
            continue
        key = json.dumps([e["triton"], e["kernel"], e["target"], e["signature"], e.get("constexprs"), e["attrs"],
                          e["options"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({k: v for k, v in e.items() if k not in ("cache_hit", "seconds")})
    return out


def replay(entries, verbose: bool = False) -> tuple[int, int]:
    """Compiles each distinct replayable entry of this Triton version into Triton's cache
    (TRITON_CACHE_DIR) -> (compiled or already there, failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done, failed = 0, 0
    for e in distinct(entries):
        if "constexprs" not in e or e["triton"] != triton.__version__:
            continue
        begin = time.time()
        try:
            fn = _jit_function(e["kernel"])
            src = ASTSource(fn, e["signature"], {tuple(p): _decode(v) for p, v in e["constexprs"]},
                            {tuple(p): a for p, a in e["attrs"]})
            triton.compile(src, target=GPUTarget(*e["target"]), options=dict(e["options"]))
            done += 1
        except Exception as err:  # noqa: BLE001  (one bad entry must not stop the others)
            failed += 1
            print(f"replay {e['kernel']}: {type(err).__name__}: {str(err).strip()[:300]}", file=sys.stderr)
        if verbose:
            print(f"{e['kernel']} {time.time() - begin:.1f} s", flush=True)
    return done, failed


def summary(entries) -> str:
    """Compiles and cache hits, the seconds compiling, and the kernels that took most of them."""
    errors = [e for e in entries if "error" in e]
    entries = [e for e in entries if "error" not in e]
    compiled = [e for e in entries if not e["cache_hit"]]
    hits = len(entries) - len(compiled)
    total = sum(e["seconds"] for e in compiled)
    lines = [f"triton: {len(compiled)} compiles ({total:.0f} s of compile time, all processes), {hits} cache hits"]
    if errors:
        lines.append(f"    {len(errors)} compiles not logged: {errors[0]['error'][:200]}")
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for e in compiled:
        per_kernel[e["kernel"]][0] += 1
        per_kernel[e["kernel"]][1] += e["seconds"]
    for kernel, (count, seconds) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:8]:
        lines.append(f"    {kernel}: {count} compiles, {seconds:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("summary", "replay", "distinct"))
    parser.add_argument("logs", nargs="+")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    entries = read(args.logs)
    if args.command == "summary":
        print(summary(entries))
        return 0
    if args.command == "distinct":
        for e in distinct(entries):
            print(json.dumps(e))
        return 0
    done, failed = replay(entries, args.verbose)
    print(f"replayed {done} specializations into {os.environ.get('TRITON_CACHE_DIR', 'the default cache')}, "
          f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
