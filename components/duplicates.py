"""Duplicate and leakage detection on the manifest: exact (content hash) and near (perceptual hash,
confirmed by a pixel comparison).

A perceptual-hash match is only a candidate: on small, low-detail images different pictures can
share a hash. Each candidate pair is confirmed by its pixel distance (16×16 grayscale thumbnails,
each standardized to zero mean and unit contrast, mean absolute difference); pairs that fail are
reported as "similar" and never count as leakage. The hash search uses multi-index hashing (the
64 bits split into bands; pairs within d bits share a band exactly or within d // bands bits), so
it is not all-pairs. Imported by the validate stage; runs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import images

THUMB = 16  # px: thumbnail side compared when confirming a candidate pair
CONTRAST_FLOOR = 0.02  # std floor (white = 1): a flat image is not stretched into noise
PIXEL_DISTANCE = 0.08  # default confirmation cut, in standard deviations of thumbnail brightness
PAIRS_PER_GROUP = 50  # confirmed pairs listed per near group, weakest first
MAX_SIMILAR = 200  # unconfirmed candidate pairs reported, closest first
CHUNK = 1 << 16  # candidate pairs compared at a time (two 16 MiB gathers)
_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex digits; robust to re-encoding, resizing, mild edits."""
    import imagehash

    return str(imagehash.phash(img))


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


def _member_pairs(inverse: np.ndarray, value_pairs: np.ndarray, chunk: int = CHUNK) -> Iterator[np.ndarray]:
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


def thumbnail(img: Image.Image) -> np.ndarray:
    """The confirmation view of an image: THUMB×THUMB grayscale, zero mean, unit contrast (float32)."""
    gray = img.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    t = np.asarray(gray, dtype=np.float32).ravel() / 255.0
    t -= t.mean()
    return t / max(float(t.std()), CONTRAST_FLOOR)


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference of standardized thumbnails (rows of a and b); 0 = same picture."""
    return np.abs(a - b).mean(axis=-1)


def _thumbnails(paths: list[str], max_pixels: int) -> np.ndarray:
    """Thumbnails of the given files, each decoded once by the project's decoder (threads)."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        rows = list(pool.map(lambda p: thumbnail(images.load_image(p, max_pixels)), paths))
    return np.stack(rows) if rows else np.empty((0, THUMB * THUMB), dtype=np.float32)


def _confirm(
    hashes: np.ndarray, paths: list[str], max_distance: int, threshold: float, max_pixels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(confirmed pairs, their pixel distances, closest unconfirmed pairs, their distances).

    Candidates are item pairs within max_distance hash bits; only the images in some candidate
    pair are decoded.
    """
    values, inverse = np.unique(hashes, return_inverse=True)
    value_pairs = hash_pairs(values, max_distance)
    counts = np.bincount(inverse, minlength=len(values))
    involved_values = np.zeros(len(values), dtype=bool)
    involved_values[value_pairs.ravel()] = True
    involved_values[counts > 1] = True
    involved = np.flatnonzero(involved_values[inverse])
    row = np.full(len(hashes), -1)
    row[involved] = np.arange(len(involved))
    thumbs = _thumbnails([paths[i] for i in involved], max_pixels)
    kept = [[np.empty((0, 2), dtype=np.int64)], [np.empty(0, dtype=np.float32)]]
    failed = [np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32)]
    for pairs in _member_pairs(inverse, value_pairs):
        dist = pixel_distance(thumbs[row[pairs[:, 0]]], thumbs[row[pairs[:, 1]]])
        ok = dist <= threshold
        kept[0].append(pairs[ok])
        kept[1].append(dist[ok])
        fp, fd = np.concatenate([failed[0], pairs[~ok]]), np.concatenate([failed[1], dist[~ok]])
        closest = np.argsort(fd, kind="stable")[: 10 * MAX_SIMILAR]  # enough to survive the group filter
        failed = [fp[closest], fd[closest]]
    return np.concatenate(kept[0]), np.concatenate(kept[1]), failed[0], failed[1]


def _pair_record(frame: pd.DataFrame, i: int, j: int, hashes: np.ndarray, dist: float) -> dict:
    rows = frame.iloc[[i, j]]
    return {
        "paths": rows["path"].tolist(),
        "labels": rows["label"].tolist(),
        "splits": rows["split"].tolist(),
        "phash_distance": bin(int(hashes[i] ^ hashes[j])).count("1"),
        "pixel_distance": round(float(dist), 4),
    }


def find_duplicates(
    frame: pd.DataFrame,
    max_distance: int,
    threshold: float = PIXEL_DISTANCE,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
) -> list[dict]:
    """Exact groups (same sha256), near groups (confirmed pHash candidates) and similar pairs.

    A candidate pair has hashes within max_distance bits (a negative distance turns near search
    off); it is confirmed when its pixel distance is at most `threshold`. Near groups are the
    connected components of confirmed pairs that join different files' contents, with every file
    of each content; candidates that fail confirmation come back one pair per "similar" entry,
    closest first (at most MAX_SIMILAR), unless a near group already holds both images.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    frame = frame.reset_index(drop=True)

    def describe(idx: list[int], kind: str) -> dict:
        rows = frame.iloc[idx]
        labels, splits = sorted(set(rows["label"])), sorted(set(rows["split"]))
        return {
            "paths": rows["path"].tolist(),
            "kind": kind,
            "labels": labels,
            "splits": splits,
            "conflicting_labels": len(labels) > 1,
            "crosses_splits": len(splits) > 1,
        }

    by_content = frame.groupby("sha256", sort=False).indices
    found = [describe(sorted(g.tolist()), "exact") for g in by_content.values() if len(g) > 1]
    if "phash" not in frame or max_distance < 0:
        return found
    reps = np.array(sorted(int(g[0]) for g in by_content.values()))  # one file per content
    hashes = np.array([int(h, 16) for h in frame["phash"]], dtype=np.uint64)
    paths = frame["path"].tolist()
    confirmed, dist, unconfirmed, udist = _confirm(
        hashes[reps], [paths[i] for i in reps], max_distance, threshold, max_pixels
    )
    n = len(reps)
    graph = coo_matrix((np.ones(len(confirmed)), (confirmed[:, 0], confirmed[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    members = {c: [] for c in np.flatnonzero(sizes > 1).tolist()}
    for rep, c in zip(reps.tolist(), component.tolist(), strict=True):
        if c in members:
            members[c] += by_content[frame.at[rep, "sha256"]].tolist()
    links = {c: [] for c in members}
    for (a, b), d in zip(confirmed.tolist(), dist.tolist(), strict=True):
        links[component[a]].append((d, a, b))
    for c, rows in sorted(members.items(), key=lambda kv: min(paths[i] for i in kv[1])):
        weakest = sorted(links[c], reverse=True)[:PAIRS_PER_GROUP]
        group = describe(sorted(rows), "near")
        group["pairs"] = [_pair_record(frame, reps[a], reps[b], hashes, d) for d, a, b in weakest]
        found.append(group)
    apart = component[unconfirmed[:, 0]] != component[unconfirmed[:, 1]]
    for (a, b), d in list(zip(unconfirmed[apart].tolist(), udist[apart].tolist(), strict=True))[:MAX_SIMILAR]:
        i, j = int(reps[a]), int(reps[b])
        found.append({**describe([i, j], "similar"), "pairs": [_pair_record(frame, i, j, hashes, d)]})
    return found


def leakage(duplicates: list[dict], frame: pd.DataFrame) -> list[dict]:
    """Val and test images with an exact or confirmed near duplicate in train ("similar" never counts)."""
    split_of = dict(zip(frame["path"], frame["split"], strict=True))
    leaks = []
    for group in duplicates:
        if group["kind"] not in ("exact", "near"):
            continue
        train = [p for p in group["paths"] if split_of[p] == "train"]
        if not train:
            continue
        for path in group["paths"]:
            if split_of[path] in ("val", "test"):
                leaks.append(
                    {"path": path, "split": split_of[path], "kind": group["kind"], "train_paths": train}
                )
    return leaks


def pair_thumbnails(groups: list[dict], path: Path, title: str, limit: int = 24) -> Path | None:
    """One PNG of image pairs side by side (three pairs a row), captioned with labels, splits,
    hash distance and pixel distance; None when the groups hold no pairs."""
    pairs = [p for g in groups for p in g.get("pairs", ())][:limit]
    if not pairs:
        return None
    from .plots import image_grid

    files, titles = [], []
    for p in pairs:
        files += p["paths"]
        titles += [
            f"{p['labels'][0]} / {p['splits'][0]}\nhash {p['phash_distance']} bits",
            f"{p['labels'][1]} / {p['splits'][1]}\npixel {p['pixel_distance']:.3f}",
        ]
    return image_grid(files, titles, title, path)
