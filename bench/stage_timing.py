"""Shared by the training benchmarks: the train stage's one-time decode, timed on its own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def timed_decoding() -> Iterator[list[float]]:
    """Within the block, visiontune's cache.decoded adds its seconds to the list it yields (the
    train stage calls it once, before epoch 1)."""
    from visiontune.components import cache

    spent: list[float] = []
    real = cache.decoded

    def decoded(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    cache.decoded = decoded
    try:
        yield spent
    finally:
        cache.decoded = real
