"""Duplicate and leakage detection on the manifest: exact (content hash) and near (perceptual hash).

Imported by the validate stage; runs nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image


def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex digits; robust to re-encoding, resizing, mild edits."""
    import imagehash

    return str(imagehash.phash(img))


def _near_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 2048) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most max_distance bits; chunked all-pairs."""
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])
        i, j = np.nonzero(dist <= max_distance)
        i = i + start
        keep = i < j
        pairs += list(zip(i[keep].tolist(), j[keep].tolist(), strict=True))
    return pairs


def _groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the pair graph, each sorted, singletons left out."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return [sorted(g) for g in members.values() if len(g) > 1]


def find_duplicates(frame: pd.DataFrame, max_distance: int) -> list[dict]:
    """Groups of exact duplicates (same sha256) and near duplicates (phash within max_distance bits).

    A near group never repeats an exact group: it is reported only when it joins different files.
    """
    frame = frame.reset_index(drop=True)
    found = []

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

    exact_groups = [sorted(g.tolist()) for _, g in frame.groupby("sha256").indices.items() if len(g) > 1]
    found += [describe(g, "exact") for g in exact_groups]
    if "phash" in frame and max_distance >= 0:
        hashes = np.array([int(h, 16) for h in frame["phash"]], dtype=np.uint64)
        for group in _groups(len(frame), _near_pairs(hashes, max_distance)):
            if frame.iloc[group]["sha256"].nunique() > 1:
                found.append(describe(group, "near"))
    return found


def leakage(duplicates: list[dict], frame: pd.DataFrame) -> list[dict]:
    """Val and test images with an exact or near duplicate in train."""
    split_of = dict(zip(frame["path"], frame["split"], strict=True))
    leaks = []
    for group in duplicates:
        train = [p for p in group["paths"] if split_of[p] == "train"]
        if not train:
            continue
        for path in group["paths"]:
            if split_of[path] in ("val", "test"):
                leaks.append(
                    {"path": path, "split": split_of[path], "kind": group["kind"], "train_paths": train}
                )
    return leaks
