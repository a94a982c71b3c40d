"""Duplicate and leakage detection on the manifest: exact (content hash) and near (perceptual hash,
confirmed by a pixel comparison).

A perceptual-hash match is only a candidate: on small, low-detail images different pictures can
share a hash. Each candidate pair is confirmed by its pixel distance (16×16 grayscale thumbnails,
each standardized to zero mean and unit contrast, mean absolute difference) and by raw brightness
and contrast that agree (standardizing alone makes a black and a white blank image equal); pairs
that fail are reported as "similar" and never count as leakage.

Two kinds of pair get a second look. Pairs of images at least ALIGN_MIN_SIDE px are candidates
within CROP_DISTANCE bits (re-encoding moves more hash bits there, while different pictures rarely
look alike pixel for pixel), and since a crop moves content by up to a thumbnail pixel, the least
distance between one image and 49 crops of the other (either way) must be small, much smaller than
the plain one. A resized copy of a small image thumbnails differently from its original (the
thumbnail interpolates at both sizes, or meets the copy's blocks), so pairs of small images (at
most RESIZE_MAX_SIDE px) of different sizes are candidates within CROP_DISTANCE bits too, and are
confirmed when resampling one to the other's exact size with a common filter reproduces it.

The hash search (hash_search.py) is not all-pairs. Imported by the validate stage; runs nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import images
from .hash_search import hash_pairs, member_pairs, popcount

THUMB = 16  # px: thumbnail side compared when confirming a candidate pair
CONTRAST_FLOOR = 0.02  # std floor (white = 1): a flat image is not stretched into noise
PIXEL_DISTANCE = 0.08  # default confirmation cut, in standard deviations of thumbnail brightness
CROP_DISTANCE = 12  # hash bits within which pairs of images ≥ ALIGN_MIN_SIDE px are candidates
ALIGN_ZOOMS = (0.975, 0.95)  # crop sides tried per axis (fraction kept), each at three anchors
ALIGNED_DISTANCE = 0.15  # confirmation cut for the best-aligned crop view (same units as PIXEL_DISTANCE)
ALIGN_GAIN = 0.7  # a crop's aligned distance is at most this share of its plain distance
ALIGN_MIN_SIDE = 20  # px: below this a 5 % crop moves less than a pixel, so alignment only adds risk
TONE_MEAN, TONE_CONTRAST = 0.1, 0.35  # an edit keeps brightness (white = 1) and log contrast this close
MAX_ALIGNED = 10_000  # failed candidate pairs given the aligned (or the resampled) comparison, closest first
RESIZE_MAX_SIDE = 4 * THUMB  # px: pairs of small images of different sizes get the resampled comparison
RESIZE_FILTERS = (  # how common tools resize: a copy made with one of these is reproduced exactly
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
    Image.Resampling.BOX,
)
RESAMPLED_DISTANCE = 0.04  # confirmation cut for a reproduced resize (same units as PIXEL_DISTANCE)
PAIRS_PER_GROUP = 50  # confirmed pairs listed per near group, weakest first
MAX_SIMILAR = 200  # unconfirmed candidate pairs reported, closest first


def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex digits; robust to re-encoding, resizing, mild edits."""
    import imagehash

    return str(imagehash.phash(img))


def thumbnail(img: Image.Image) -> np.ndarray:
    """The confirmation view of an image: THUMB×THUMB grayscale, zero mean, unit contrast (float32)."""
    return _standardize(raw_thumbnail(img))


def raw_thumbnail(img: Image.Image) -> np.ndarray:
    """THUMB×THUMB grayscale, white = 1 (float32), before standardizing."""
    gray = img.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32).ravel() / 255.0


def tone(raw: np.ndarray) -> np.ndarray:
    """(brightness, contrast) of raw views (rows, white = 1): what standardizing removes."""
    return np.stack([raw.mean(axis=-1), raw.std(axis=-1)], axis=-1)


def tones_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether tones (rows of tone()) are within TONE_MEAN in brightness and TONE_CONTRAST in log
    contrast of one another, as an edit that keeps the picture leaves them."""
    contrast = np.log(np.maximum(a[..., 1], CONTRAST_FLOOR) / np.maximum(b[..., 1], CONTRAST_FLOOR))
    return (np.abs(a[..., 0] - b[..., 0]) <= TONE_MEAN) & (np.abs(contrast) <= TONE_CONTRAST)


def _standardize(t: np.ndarray) -> np.ndarray:
    t = t - t.mean(axis=-1, keepdims=True)
    return t / np.maximum(t.std(axis=-1, keepdims=True), CONTRAST_FLOOR)


def crop_views(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(standardized thumbnails of the whole image and of its crops (K, THUMB²), raw brightness and contrast).

    The crops keep each zoom of ALIGN_ZOOMS per axis (or the whole axis) at the start, middle or
    end of that axis: 7 × 7 views, the whole image first; the image is first reduced to about
    4 × THUMB px so that each view costs the same for any image size.
    """
    gray = img.convert("L")
    factor = max(1, min(gray.size) // (4 * THUMB))
    gray = gray.reduce(factor) if factor > 1 else gray
    spans = [(0.0, 1.0)] + [(a * (1 - z), a * (1 - z) + z) for z in ALIGN_ZOOMS for a in (0.0, 0.5, 1.0)]
    w, h = gray.size
    views = [
        np.asarray(
            gray.resize((THUMB, THUMB), Image.Resampling.BILINEAR, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        )
        for y0, y1 in spans
        for x0, x1 in spans
    ]
    raw = np.stack(views).reshape(len(views), -1).astype(np.float32) / 255.0
    return _standardize(raw).astype(np.float32), tone(raw[0])


def aligned_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least pixel distance between either image's whole view and the other's crop views ((n, K, THUMB²))."""
    return np.minimum(
        np.abs(a[:, :1] - b).mean(axis=-1).min(axis=1), np.abs(b[:, :1] - a).mean(axis=-1).min(axis=1)
    )


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference of standardized thumbnails (rows of a and b); 0 = same picture."""
    return np.abs(a - b).mean(axis=-1)


def resampled_distance(a: Image.Image, b: Image.Image) -> float:
    """Least pixel distance between one image and the other resampled to its exact size with each of
    RESIZE_FILTERS, either way round (grayscale, standardized as thumbnails are); 0 = a resize.
    A resampling whose raw brightness or contrast is not the other's (TONE_MEAN, TONE_CONTRAST)
    does not count: standardizing would hide it."""
    a, b = a.convert("L"), b.convert("L")
    best = np.inf
    for source, target in ((a, b), (b, a)):
        seen = np.asarray(target, dtype=np.float32).ravel() / 255.0
        seen_tone, seen_view = tone(seen), _standardize(seen)
        for method in RESIZE_FILTERS:
            made = np.asarray(source.resize(target.size, method), dtype=np.float32).ravel() / 255.0
            if tones_agree(seen_tone, tone(made)):
                best = min(best, float(np.abs(seen_view - _standardize(made)).mean()))
    return best


def _each_image(view, paths: list[str], max_pixels: int) -> list:
    """view(image) of each file, decoded by the project's decoder in threads (Pillow releases the GIL)."""
    with ThreadPoolExecutor(max_workers=images.decode_threads()) as pool:
        return list(pool.map(lambda p: view(images.load_image(p, max_pixels)), paths))


def _thumbnails(paths: list[str], max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails of the given files (rows of THUMB² floats), their raw tones); each decoded once."""
    rows = _each_image(raw_thumbnail, paths, max_pixels)
    raw = np.stack(rows) if rows else np.empty((0, THUMB * THUMB), dtype=np.float32)
    return _standardize(raw), tone(raw)


def _closest(kept: tuple[np.ndarray, np.ndarray], pairs: np.ndarray, dist: np.ndarray, limit: int):
    """The `limit` pairs of kept + (pairs, dist) with the smallest distances (a running shortlist)."""
    p, d = np.concatenate([kept[0], pairs]), np.concatenate([kept[1], dist])
    order = np.argsort(d, kind="stable")[:limit]
    return p[order], d[order]


def _confirm(
    hashes: np.ndarray,
    paths: list[str],
    sizes: np.ndarray,
    max_distance: int,
    crop_distance: int,
    threshold: float,
    max_pixels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(confirmed pairs, their pixel distances, closest unconfirmed pairs, their distances).

    Candidates are item pairs within max(max_distance, crop_distance) hash bits; only the images
    in some candidate pair are decoded (sizes: each item's width and height). A pair within
    max_distance bits, or within crop_distance bits when both images are at least ALIGN_MIN_SIDE
    px, is confirmed by its plain pixel distance. Of the pairs within crop_distance bits that fail,
    the closest MAX_ALIGNED of those large pairs get the aligned comparison (_confirm_crops), and
    the closest MAX_ALIGNED pairs of small images of different sizes the resampled one
    (_confirm_resized). Unconfirmed pairs are those within max_distance bits.
    """
    values, inverse = np.unique(hashes, return_inverse=True)
    value_pairs = hash_pairs(values, max(max_distance, crop_distance))
    counts = np.bincount(inverse, minlength=len(values))
    involved_values = np.zeros(len(values), dtype=bool)
    involved_values[value_pairs.ravel()] = True
    involved_values[counts > 1] = True
    involved = np.flatnonzero(involved_values[inverse])
    row = np.full(len(hashes), -1)
    row[involved] = np.arange(len(involved))
    thumbs, tones = _thumbnails([paths[i] for i in involved], max_pixels)
    short, long = sizes.min(axis=1), sizes.max(axis=1)
    kept = [[np.empty((0, 2), dtype=np.int64)], [np.empty(0, dtype=np.float32)]]
    failed = crops = resizes = (np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32))
    for pairs in member_pairs(inverse, value_pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        dist = pixel_distance(thumbs[row[a]], thumbs[row[b]])
        bits = popcount(hashes[a] ^ hashes[b])
        big = (short[a] >= ALIGN_MIN_SIDE) & (short[b] >= ALIGN_MIN_SIDE)
        ok = (dist <= threshold) & tones_agree(tones[row[a]], tones[row[b]])
        ok &= (bits <= max_distance) | (big & (bits <= crop_distance))
        kept[0].append(pairs[ok])
        kept[1].append(dist[ok])
        fail = ~ok & (bits <= max_distance)
        failed = _closest(failed, pairs[fail], dist[fail], 10 * MAX_SIMILAR)  # survives the group filter
        try_crop = ~ok & (bits <= crop_distance) & big
        crops = _closest(crops, pairs[try_crop], dist[try_crop], MAX_ALIGNED)
        small = np.maximum(long[a], long[b]) <= RESIZE_MAX_SIDE
        try_resize = ~ok & (bits <= crop_distance) & small & (sizes[a] != sizes[b]).any(axis=1)
        resizes = _closest(resizes, pairs[try_resize], dist[try_resize], MAX_ALIGNED)
    second = [_confirm_crops(*crops, paths, max_pixels), _confirm_resized(resizes[0], paths, max_pixels)]
    confirmed = np.concatenate([*kept[0], *(p for p, _ in second)])
    dist = np.concatenate([*kept[1], *(d for _, d in second)])
    rescued = np.concatenate([p for p, _ in second])
    if len(rescued):  # a pair confirmed on a second look is no longer unconfirmed
        n = len(hashes)
        again = np.isin(failed[0][:, 0] * n + failed[0][:, 1], rescued[:, 0] * n + rescued[:, 1])
        failed = (failed[0][~again], failed[1][~again])
    return confirmed, dist, failed[0], failed[1]


def _confirm_crops(
    pairs: np.ndarray, plain: np.ndarray, paths: list[str], max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (and their aligned distances) that are crops of one another.

    A pair is confirmed when the closest of its crop views (crop_views) is within ALIGNED_DISTANCE
    of the other image, alignment cut its plain distance by at least 1 - ALIGN_GAIN (a distinct
    picture rarely gains that much), and the two agree in raw brightness and contrast, which
    standardized thumbnails ignore.
    """
    if not len(pairs):
        return pairs, plain
    images_, slot = np.unique(pairs, return_inverse=True)
    slot = slot.reshape(-1, 2)
    views = _each_image(crop_views, [paths[i] for i in images_.tolist()], max_pixels)
    stack = np.stack([v[0] for v in views])
    tones = np.stack([v[1] for v in views])
    aligned = np.concatenate(
        [
            aligned_distance(stack[slot[k : k + 256, 0]], stack[slot[k : k + 256, 1]])
            for k in range(0, len(slot), 256)
        ]
    )
    ok = (
        (aligned <= ALIGNED_DISTANCE)
        & (aligned <= ALIGN_GAIN * plain)
        & tones_agree(tones[slot[:, 0]], tones[slot[:, 1]])
    )
    return pairs[ok], aligned[ok].astype(np.float32)


def _confirm_resized(pairs: np.ndarray, paths: list[str], max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (and their resampled distances) in which one image is a resize of the other: the
    resampled_distance within RESAMPLED_DISTANCE. Each image is decoded once."""
    if not len(pairs):
        return pairs, np.empty(0, dtype=np.float32)
    images_, slot = np.unique(pairs, return_inverse=True)
    gray = _each_image(lambda img: img.convert("L"), [paths[i] for i in images_.tolist()], max_pixels)
    dist = np.array(
        [resampled_distance(gray[x], gray[y]) for x, y in slot.reshape(-1, 2).tolist()], dtype=np.float32
    )
    ok = dist <= RESAMPLED_DISTANCE
    return pairs[ok], dist[ok]


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
    crop_distance: int = CROP_DISTANCE,
) -> list[dict]:
    """Exact groups (same sha256), near groups (confirmed pHash candidates) and similar pairs.

    A candidate pair has hashes within max_distance bits (a negative distance turns near search
    off); it is confirmed when its pixel distance is at most `threshold` and the two images'
    tones agree (tones_agree). Images at least ALIGN_MIN_SIDE px are candidates within
    crop_distance bits, and may also be confirmed as a crop of the other by an aligned comparison
    (_confirm_crops); so are pairs of small images of different sizes, by a resampled comparison
    (_confirm_resized). The pixel distance is then the aligned or the resampled one. Near groups
    are the connected components of confirmed pairs that join different files' contents, with
    every file of each content; candidates that fail confirmation come back one pair per
    "similar" entry, closest first (at most MAX_SIMILAR), unless a near group already holds both
    images.
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
    if {"width", "height"} <= set(frame):
        sizes = frame[["width", "height"]].to_numpy()[reps]
    else:  # sizes unknown: every pair may be a crop, none a resize
        sizes = np.full((len(reps), 2), ALIGN_MIN_SIDE)
    confirmed, dist, unconfirmed, udist = _confirm(
        hashes[reps], [paths[i] for i in reps], sizes, max_distance, crop_distance, threshold, max_pixels
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
