"""The oldest torch release dskernels runs on. Imports nothing, so that setup.py reads it (before
torch's version is known to be usable) and dskernels/__init__.py checks it before loading _C.

Why this one: README.md, "Two commands" (the releases tried, and what fails on older ones)."""

MIN_TORCH = (2, 10)


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: "2.10.0+cu128", "2.12.0a0+git1234", "2.13.0.dev20260101"."""
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def too_old_message(version: str) -> str | None:
    """Why `version` is refused, or None when it is MIN_TORCH or newer."""
    if torch_release(version) >= MIN_TORCH:
        return None
    need = f"{MIN_TORCH[0]}.{MIN_TORCH[1]}"
    return (f"dskernels needs torch >= {need}, and this is torch {version}: install a newer one "
            f"(`pip install 'torch>={need}'`), then build dskernels against it (`bash scripts/build.sh`, or "
            "`pip install --no-build-isolation .`)")
