"""The base of every error a user can fix: the CLI prints these as one message, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class VisiontuneError(Exception):
    """Bad input or configuration; the message names the file, the field and the fix."""


@contextmanager
def reading(path: Path, what: str, fix: str) -> Iterator[None]:
    """Any failure inside the block (a torn, truncated, edited or missing file: JSON, safetensors,
    NumPy, pandas, a key or a shape that no longer fits) becomes one line naming the file, what it
    is, the first line of the reason, and the fix."""
    try:
        yield
    except VisiontuneError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[0][:300] if lines else "no detail"
        reason = f"{type(exc).__name__}: {detail}"
        raise VisiontuneError(f"{path}: the {what} cannot be read ({reason}); {fix}") from None
