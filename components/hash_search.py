"""Pairs of 64-bit hashes within a Hamming distance, without comparing all pairs.

Multi-index hashing: the 64 bits are split into bands; a pair within d bits differs in at most
d // bands bits in some band, so each hash probes its band values with that many bits flipped.
Imported by duplicates.py; runs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from math import comb

import numpy as np

CHUNK = 1 << 16  # candidate pairs compared at a time (two 16 MiB gathers)
_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (a byte lookup table where numpy has no bitwise_count)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # NumPy ≥ 2
        return np.bitwise_count(x).astype(np.int64)
    return _BITS[x.reshape(-1).view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.int64)


def _band_count(n: int, max_distance: int) -> int:
    """Bands that minimize the expected probes × bucket size for n random hashes (≤ 22-bit bands)."""

    def cost(m: int) -> float:
        width, r = 64 // m, max_distance // m
        probes = sum(comb(width, k) for k in range(r + 1))
        return m * n * probes * (1 + n / 2**width)

    return min(range(3, min(max_distance + 1, 16) + 1), key=cost, default=3)


def hash_pairs(values: np.ndarray, max_distance: int) -> np.ndarray:
    """Index pairs (i < j), shape (k, 2), of distinct uint64 hashes within max_distance bits.

    Multi-index hashing: with m bands, a pair within d bits differs in at most d // m bits in
    some band, so each hash probes its band values with up to d // m bits flipped in a dense
    per-band table; only the probed matches are compared in full.
    """
    values = np.ascontiguousarray(values, dtype=np.uint64)
    n = len(values)
    if max_distance <= 0 or n < 2:
        return np.empty((0, 2), dtype=np.int64)
    bands = _band_count(n, max_distance)
    radius = max_distance // bands
    edges = np.linspace(0, 64, bands + 1).astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        width = int(hi - lo)
        band = ((values >> np.uint64(lo)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(band, kind="stable")
        counts = np.bincount(band, minlength=1 << width)
        starts = np.cumsum(counts) - counts
        masks = np.array(
            [sum(1 << b for b in bits) for k in range(radius + 1) for bits in combinations(range(width), k)],
            dtype=np.int64,
        )
        step = max(1, (1 << 20) // len(masks))  # about a million probes at a time
        for first in range(0, n, step):
            src = np.arange(first, min(first + step, n))
            probes = (band[src, None] ^ masks[None, :]).ravel()
            hits = counts[probes]
            total = int(hits.sum())
            if not total:
                continue
            src = np.repeat(np.repeat(src, len(masks)), hits)
            offset = np.arange(total) - np.repeat(np.cumsum(hits) - hits, hits)
            dst = order[np.repeat(starts[probes], hits) + offset]
            keep = src < dst
            src, dst = src[keep], dst[keep]
            near = popcount(values[src] ^ values[dst]) <= max_distance
            found.append(src[near] * n + dst[near])
    keys = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    return np.stack(np.divmod(keys, n), axis=1)


def member_pairs(inverse: np.ndarray, value_pairs: np.ndarray, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Item pairs (i < j) whose hash values form a value pair or are equal, at most `chunk` at a time.

    Each value pair (u, v) stands for counts[u] × counts[v] item pairs, numbered consecutively,
    so a value shared by thousands of items is walked in chunks instead of materialized at once.
    """
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    shared = np.flatnonzero(counts > 1)
    pairs = np.concatenate([value_pairs.reshape(-1, 2), np.stack([shared, shared], axis=1)])
    u, v = pairs[:, 0], pairs[:, 1]
    sizes = counts[u] * counts[v]
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    for first in range(0, total, chunk):
        t = np.arange(first, min(first + chunk, total))
        k = np.searchsorted(ends, t, side="right")
        a, b = np.divmod(t - (ends[k] - sizes[k]), counts[v[k]])
        i, j = order[starts[u[k]] + a], order[starts[v[k]] + b]
        keep = (u[k] != v[k]) | (a < b)  # an equal value: each unordered pair once
        yield np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)[keep]
