"""Duplicate and leakage detection on the manifest: exact (content hash) and near (perceptual hash,
confirmed by a pixel comparison).

A perceptual-hash match is only a candidate: on small, low-detail images different pictures can
share a hash. Each candidate pair is confirmed by its pixel distance (16×16 grayscale thumbnails,
each standardized to zero mean and unit contrast, mean absolute difference) and by raw brightness
and contrast that agree (standardizing alone makes a black and a white blank image equal); pairs
that fail are reported as "similar" and never count as leakage. Every check but the last looks at
gray levels, so a confirmed pair must finally agree in colour too (colours_agree): a red and a
blue circle, or the flags of Italy and Peru, are one picture in gray. A 16 px thumbnail also
averages away a small part that differs: icon sets and clip art draw many pictures on one
template (a road sign's triangle with another symbol inside), so a confirmed pair of larger
images must also agree in every cell of finer, aligned views (detail_distance).

Two kinds of pair get a second look. Pairs of images at least ALIGN_MIN_SIDE px are candidates
within CROP_DISTANCE bits (re-encoding moves more hash bits there, while different pictures rarely
look alike pixel for pixel), and since a crop moves content by up to a thumbnail pixel, the least
distance between one large image and 49 crops of the other (either way) must be small, much
smaller than the plain one. A resized copy of a small image thumbnails differently from its
original (the thumbnail interpolates at both sizes, or meets the copy's blocks), so pairs of small
images (at most RESIZE_MAX_SIDE px) of different sizes are candidates within CROP_DISTANCE bits
too, and are confirmed when resampling one to the other's exact size with a common filter
reproduces it, or when one is a crop of the other pixel for pixel (closest_window) that also
passes the thumbnail check. A crop of a small picture that fills its frame can move its hash
beyond any searched distance, so small images of sizes that could be crops of one another are
also paired by their nearest thumbnails (_thumbnail_candidates) for that crop check; so are small
images of one size (at least ALIGN_MIN_SIDE px), since re-encoding a mirror-symmetric drawing
moves its hash as far.

A 16 px thumbnail of a small image blurs away what tells two drawings of one simple shape apart
(two handwritten 1s at one slant), so every confirmed pair of small images is also compared at
its own resolution (noise_ratio): what is left after the best brightness and contrast change must
be within NOISE_RATIO times what re-encoding the image as a JPEG at NOISE_QUALITY leaves. The
bound scales with each picture, so it holds for fine textures that JPEG smears and for thin
strokes that it keeps.

The hash search (hash_search.py) is not all-pairs. The prepare stage searches before it draws the
splits, so that each group is kept in one split (splits.py), and records its findings (RECORD) for
the validate stage, which reports and gates them. Imported by both; runs nothing.
"""

from __future__ import annotations

import io
import json
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
NOISE_QUALITY = 60  # JPEG quality whose re-encoding error is a small image's noise floor
NOISE_RATIO = 1.4  # small images confirmed: their native residual is at most this many noise floors
GRAY_LEVEL = 1 / 255  # the least noise floor (white = 1): a flat image re-encodes exactly
GAIN_RANGE = (0.5, 2.0)  # contrast changes the native residual allows (a negative is not an edit)
CROP_FRACTION = 0.1  # the most of each axis a crop of a small image removes (native crop search)
CROP_NEIGHBOURS = 20  # small images of a crop's size: nearest thumbnails paired beyond the hash search
MAX_CROP_SEARCH = 50_000_000  # thumbnail comparisons spent on those pairs at most
RESAMPLED_DISTANCE = 0.04  # confirmation cut for a reproduced resize (same units as PIXEL_DISTANCE)
NATIVE_BLOCK = 4096  # same-size pairs whose native views are compared at once
PAIRS_PER_GROUP = 50  # confirmed pairs listed per near group, weakest first
MAX_SIMILAR = 200  # unconfirmed candidate pairs reported, closest first
RECORD = "duplicates.json"  # prepare's findings, beside its manifest; validate reads them back
UNCONFIRMED_BY = (  # the first check an unconfirmed pair failed, by code (0: none recorded)
    None,
    "pixel distance",
    "brightness or contrast",
    "sizes: neither a resize nor a crop",
    "noise ratio",
    "colour",
    "detail",
)
UNSHOWN_FAILURE = {  # a similar pair's caption names the failed checks its figures do not show
    UNCONFIRMED_BY[2]: ", tones differ",
    UNCONFIRMED_BY[3]: ", sizes",
}
COLOUR_GRID = 2  # colour is compared per cell of a COLOUR_GRID × COLOUR_GRID split of the image
COLOUR_TOLERANCE = 0.04  # chroma a cell's channel may move (white = 1), plus COLOUR_GAIN of it:
COLOUR_GAIN = 0.1  # a brightness change of ±10 % scales chroma as much
DETAIL = 32  # px: side of the detail views that pairs of larger images are compared in, cell by cell
DETAIL_CELL = 8  # px: side of a cell of a detail view (4 × 4 cells)
DETAIL_DISTANCE = 0.25  # the most any cell of two aligned detail views may differ (standardized MAD)
DETAIL_CROP = 0.05  # the most of each axis the aligned detail search takes off, from either end or both
DETAIL_STEP = 0.005  # its step, as a fraction of the axis
MAX_DETAIL_ALIGNED = 2_000  # pairs given the aligned detail search at most (about 20 ms each), closest first


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


def colour_view(img: Image.Image) -> np.ndarray:
    """The colour of each cell of a COLOUR_GRID × COLOUR_GRID split of the image: its mean red,
    green and blue less their mean (white = 1), (COLOUR_GRID², 3) float32; zero for a gray image."""
    cells = img.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX)
    rgb = np.asarray(cells, dtype=np.float32).reshape(-1, 3) / 255.0
    return rgb - rgb.mean(axis=-1, keepdims=True)


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest difference between colour views (stacked: (..., cells, 3)) in any cell and channel."""
    return np.abs(a - b).max(axis=(-2, -1))


def colours_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether colour views agree in every cell and channel within COLOUR_TOLERANCE plus COLOUR_GAIN
    of the larger chroma, as re-encoding, resizing, a crop of up to 5 % and a brightness change of
    ±10 % leave them (on colour photos and emoji, the worst such copy came within 0.02 of the
    bound); a recoloured picture does not."""
    allow = COLOUR_TOLERANCE + COLOUR_GAIN * np.maximum(np.abs(a), np.abs(b))
    return (np.abs(a - b) <= allow).all(axis=(-2, -1))


def detail_source(img: Image.Image) -> Image.Image:
    """What detail views are cut from: the image in grayscale, reduced to about 4 × DETAIL px a side
    (at 2 × DETAIL px a 5 % crop aligned 0.15 from its original at worst, at 4 × 0.11)."""
    gray = img.convert("L")
    factor = max(1, min(gray.size) // (4 * DETAIL))
    return gray.reduce(factor) if factor > 1 else gray


def detail_view(
    source: Image.Image, span_x: tuple[float, float] = (0.0, 1.0), span_y: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """DETAIL × DETAIL standardized view (flat float32) of the part of a detail_source that the
    spans (fractions of each axis) keep."""
    w, h = source.size
    box = (span_x[0] * w, span_y[0] * h, span_x[1] * w, span_y[1] * h)
    view = source.resize((DETAIL, DETAIL), Image.Resampling.BILINEAR, box=box)
    return _standardize(np.asarray(view, dtype=np.float32).ravel() / 255.0)


def cell_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest mean absolute difference of two detail views in any DETAIL_CELL × DETAIL_CELL cell."""
    n = DETAIL // DETAIL_CELL
    return float(np.abs(a - b).reshape(n, DETAIL_CELL, n, DETAIL_CELL).mean(axis=(1, 3)).max())


def _detail_spans() -> list[tuple[int, int]]:
    """The parts of an axis the aligned detail search may keep, as (steps off the start, steps off
    the end) in DETAIL_STEP steps, up to DETAIL_CROP off in all."""
    most = round(DETAIL_CROP / DETAIL_STEP)
    return [(start, end) for start in range(most + 1) for end in range(most + 1 - start)]


def detail_distance(a: Image.Image, b: Image.Image) -> float:
    """How far two detail_sources differ in their most different cell (cell_distance), once
    aligned (see _detail_distances)."""
    return float(_detail_distances([a, b], np.array([[0, 1]]))[0])


def _detail_distances(sources: list[Image.Image | None], pairs: np.ndarray) -> np.ndarray:
    """The detail distance of each pair (rows of indices into sources), float32.

    The whole views, computed once per image, are compared first. Where they differ by more than
    DETAIL_DISTANCE, each whole view is also compared with the crop of the other image that
    matches it best (_aligned_detail), for the MAX_DETAIL_ALIGNED pairs whose whole views differ
    least; the distance of any pair beyond those is NaN (not measured).
    """
    wholes = {i: detail_view(sources[i]) for i in np.unique(pairs).tolist()}
    found = np.array([cell_distance(wholes[i], wholes[j]) for i, j in pairs.tolist()], dtype=np.float32)
    far = np.flatnonzero(found > DETAIL_DISTANCE)
    far = far[np.argsort(found[far], kind="stable")]

    def aligned(k: int) -> float:
        i, j = pairs[k].tolist()
        both_ways = (
            cell_distance(wholes[x], _aligned_detail(wholes[x], sources[y])) for x, y in ((i, j), (j, i))
        )
        return min(float(found[k]), *both_ways)

    with ThreadPoolExecutor(max_workers=images.decode_threads()) as pool:  # Pillow resizes without the GIL
        found[far[:MAX_DETAIL_ALIGNED]] = list(pool.map(aligned, far[:MAX_DETAIL_ALIGNED].tolist()))
    found[far[MAX_DETAIL_ALIGNED:]] = np.nan
    return found


def _aligned_detail(whole: np.ndarray, source: Image.Image) -> np.ndarray:
    """The detail view of the crop of source that matches the detail view `whole` best.

    The part kept of each axis (_detail_spans) is chosen by mean absolute difference, x, then y,
    then x again: first among the parts on a grid of two steps, then among the neighbours of the
    best of those. A crop of a line drawing misaligned by half a pixel at this size differs as much
    as a changed symbol does, so the search is fine where the thumbnails' crop views (crop_views)
    are coarse.
    """
    spans = _detail_spans()
    kept = [(0, 0), (0, 0)]

    def view(parts: list[tuple[int, int]]) -> np.ndarray:  # (steps off the start, off the end) per axis
        return detail_view(source, *((a * DETAIL_STEP, 1.0 - b * DETAIL_STEP) for a, b in parts))

    def closest(axis: int, candidates: list[tuple[int, int]]) -> tuple[int, int]:
        def differs(span: tuple[int, int]) -> float:
            return float(np.abs(whole - view([span if k == axis else kept[k] for k in (0, 1)])).mean())

        return min(candidates, key=differs)

    for axis in (0, 1, 0):
        coarse = closest(axis, [(a, b) for a, b in spans if a % 2 == 0 and b % 2 == 0])
        near = [(a, b) for a, b in spans if abs(a - coarse[0]) <= 1 and abs(b - coarse[1]) <= 1]
        kept[axis] = closest(axis, near)
    return view(kept)


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


def native_view(img: Image.Image) -> tuple[np.ndarray, float]:
    """(8-bit grayscale pixels at the image's own size; its noise floor, white = 1): the residual of
    its JPEG re-encoding at NOISE_QUALITY (native_residual), at least GRAY_LEVEL."""
    gray = img.convert("L")
    buf = io.BytesIO()
    gray.save(buf, "JPEG", quality=NOISE_QUALITY)
    pixels = np.asarray(gray, dtype=np.uint8)
    again = np.asarray(Image.open(buf).convert("L"), dtype=np.uint8)
    floor = native_residual(_unit(pixels).reshape(1, -1), _unit(again).reshape(1, -1))[0]
    return pixels, max(float(floor), GRAY_LEVEL)


def _unit(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels as float32, white = 1."""
    return pixels.astype(np.float32) / 255.0


def native_residual(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS of what is left of each row of b after the least-squares brightness and contrast change
    of the row of a (white = 1); the gain is kept within GAIN_RANGE."""
    ac, bc = a - a.mean(axis=-1, keepdims=True), b - b.mean(axis=-1, keepdims=True)
    gain = (ac * bc).sum(axis=-1, keepdims=True) / np.maximum((ac * ac).sum(axis=-1, keepdims=True), 1e-12)
    return np.sqrt(((bc - np.clip(gain, *GAIN_RANGE) * ac) ** 2).mean(axis=-1))


def noise_ratio(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> float:
    """How many noise floors (the larger of the two native_view floors) two small images are apart.

    Of one size, their native residual (brightness is fitted away: compare tones first, as the
    thumbnails do). Of two sizes, the least native residual of the smaller against each crop of
    the larger that keeps at least 1 - CROP_FRACTION of each axis and agrees with it in raw
    brightness and contrast (tones_agree); inf when no crop does.
    """
    return closest_window(a, b)[0]


def closest_window(
    a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]
) -> tuple[float, np.ndarray, np.ndarray | None]:
    """(noise_ratio of two native views, the smaller one's pixels, the window of the larger that
    ratio was measured on: the larger itself when both are of one size; None when no window is)."""
    (small, small_floor), (large, large_floor) = sorted((a, b), key=lambda v: v[0].size)
    (h, w), (H, W) = small.shape, large.shape
    target = small.reshape(1, -1)
    if (h, w) == (H, W):
        return float(_floors_apart(target, large.reshape(1, -1), small_floor, large_floor)[0]), small, large
    if not (h <= H and w <= W and H - h <= CROP_FRACTION * H and W - w <= CROP_FRACTION * W):
        return float("inf"), small, None
    views = np.lib.stride_tricks.sliding_window_view(large, (h, w)).reshape(-1, h * w)
    agree = np.flatnonzero(tones_agree(tone(_unit(views)), tone(_unit(target))))
    if not len(agree):
        return float("inf"), small, None
    ratios = _floors_apart(target, views[agree], small_floor, large_floor)
    best = int(ratios.argmin())
    return float(ratios[best]), small, views[agree[best]].reshape(h, w)


def _floors_apart(a: np.ndarray, b: np.ndarray, floor_a, floor_b) -> np.ndarray:
    """native_residual of rows of 8-bit pixels b after a, in noise floors (the larger of the two)."""
    return native_residual(_unit(a), _unit(b)) / np.maximum(floor_a, floor_b)


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
    """view(image) of each file, decoded by the project's decoder in threads (Pillow releases the GIL);
    each view is taken while the decode budget still holds the full-size image's bytes."""
    with ThreadPoolExecutor(max_workers=images.decode_threads()) as pool:
        return list(pool.map(lambda p: images.load_image(p, max_pixels, then=view), paths))


def _thumbnails(paths: list[str], max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails of the given files (rows of THUMB² floats), their raw tones); each decoded once."""
    rows = _each_image(raw_thumbnail, paths, max_pixels)
    raw = np.stack(rows) if rows else np.empty((0, THUMB * THUMB), dtype=np.float32)
    return _standardize(raw), tone(raw)


def _closest(kept: tuple[np.ndarray, ...], new: tuple[np.ndarray, ...], limit: int) -> tuple[np.ndarray, ...]:
    """The `limit` rows of kept + new (aligned arrays: pairs, their distances, anything carried
    along) with the smallest distances: a running shortlist."""
    merged = tuple(np.concatenate([k, n]) for k, n in zip(kept, new, strict=True))
    order = np.argsort(merged[1], kind="stable")[:limit]
    return tuple(m[order] for m in merged)


def _confirm(
    hashes: np.ndarray,
    paths: list[str],
    sizes: np.ndarray,
    max_distance: int,
    crop_distance: int,
    threshold: float,
    max_pixels: int,
) -> tuple[np.ndarray, ...]:
    """(confirmed pairs, their pixel distances, noise ratios, colour and detail distances; the
    closest unconfirmed pairs, their distances, noise ratios, colour and detail distances and the
    first check each failed, a code of UNCONFIRMED_BY). A noise ratio, a colour or a detail
    distance is NaN where it was not measured.

    Candidates are item pairs within max(max_distance, crop_distance) hash bits; only the images
    in some candidate pair are decoded (sizes: each item's width and height). A pair within
    max_distance bits, or within crop_distance bits when both images are at least ALIGN_MIN_SIDE
    px, is confirmed by its plain pixel distance, and when both images are small (at most
    RESIZE_MAX_SIDE px) by its noise_ratio too; small images of two sizes are not confirmed this
    way (a resize or a crop thumbnails differently from its original). Of the pairs within
    crop_distance bits left, the closest MAX_ALIGNED pairs of larger images get the aligned
    comparison (_confirm_crops), and the closest MAX_ALIGNED pairs of small images of two sizes
    the resampled and crop comparisons (_confirm_small); so do, crop comparison only (for a pair
    of one size: its noise ratio, tones and thumbnails), the pairs of small images beyond
    crop_distance bits that _thumbnail_candidates finds by their thumbnails.
    Last, a pair confirmed any of these ways whose colours do not agree, or whose detail views
    differ in some cell (_check_colours_and_details), is unconfirmed after all. Unconfirmed pairs
    are those within max_distance bits, and those that failed on colour or detail.
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
    natives: dict[int, tuple[np.ndarray, float]] = {}  # native views of small images, decoded once
    kept = [[np.empty((0, 2), dtype=np.int64)], [np.empty(0, dtype=np.float32)], [np.empty(0, np.float32)]]
    crops = resized = (np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32))
    failed = (*crops, *(np.empty(0, dtype=np.float32),) * 3, np.empty(0, np.int8))
    for pairs in member_pairs(inverse, value_pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        dist = pixel_distance(thumbs[row[a]], thumbs[row[b]])
        bits = popcount(hashes[a] ^ hashes[b])
        big = (short[a] >= ALIGN_MIN_SIDE) & (short[b] >= ALIGN_MIN_SIDE)
        small = np.maximum(long[a], long[b]) <= RESIZE_MAX_SIDE
        same = (sizes[a] == sizes[b]).all(axis=1)
        toned = tones_agree(tones[row[a]], tones[row[b]])
        ok = (dist <= threshold) & toned
        ok &= (bits <= max_distance) | (big & (bits <= crop_distance))
        ok &= ~small | same  # small images of two sizes: a resize or a crop, decided on a second look
        ratio = np.full(len(pairs), np.nan, dtype=np.float32)
        native = ok & small
        if native.any():
            ratio[native] = _noise_ratios(pairs[native], paths, max_pixels, natives)
            ok &= ~small | (ratio <= NOISE_RATIO)
        for into, part in zip(kept, (pairs[ok], dist[ok], ratio[ok]), strict=True):
            into.append(part)
        fail = ~ok & (bits <= max_distance)
        unmeasured = np.full(int(fail.sum()), np.nan, dtype=np.float32)
        checks = [dist > threshold, ~toned, small & ~same, small & (ratio > NOISE_RATIO)]
        by = np.select(checks, [1, 2, 3, 4], 0).astype(np.int8)[fail]  # codes of UNCONFIRMED_BY
        failed = _closest(
            failed, (pairs[fail], dist[fail], ratio[fail], unmeasured, unmeasured, by), 10 * MAX_SIMILAR
        )
        try_crop = ~ok & (bits <= crop_distance) & big & ~small
        crops = _closest(crops, (pairs[try_crop], dist[try_crop]), MAX_ALIGNED)
        try_small = ~ok & (bits <= crop_distance) & small & ~same
        resized = _closest(resized, (pairs[try_small], dist[try_small]), MAX_ALIGNED)
    crop_pairs, crop_dist = _confirm_crops(*crops, paths, max_pixels)
    hashed = _confirm_small(resized[0], paths, max_pixels, natives, threshold, resizes=True)
    far = _thumbnail_candidates(hashes, paths, sizes, crop_distance, threshold, max_pixels, thumbs, row)
    unhashed = _confirm_small(far[0], paths, max_pixels, natives, threshold, resizes=False)
    small_pairs, small_dist, small_ratio = (np.concatenate(x) for x in zip(hashed, unhashed, strict=True))
    confirmed = np.concatenate([*kept[0], crop_pairs, small_pairs])
    dist = np.concatenate([*kept[1], crop_dist, small_dist])
    ratio = np.concatenate([*kept[2], np.full(len(crop_pairs), np.nan, np.float32), small_ratio])
    rescued = np.concatenate([crop_pairs, small_pairs])
    if len(rescued):  # a pair confirmed on a second look is no longer unconfirmed
        n = len(hashes)
        again = np.isin(failed[0][:, 0] * n + failed[0][:, 1], rescued[:, 0] * n + rescued[:, 1])
        failed = tuple(f[~again] for f in failed)
    return _check_colours_and_details((confirmed, dist, ratio), failed, paths, sizes, max_pixels)


def _check_colours_and_details(
    confirmed: tuple[np.ndarray, ...],
    failed: tuple[np.ndarray, ...],
    paths: list[str],
    sizes: np.ndarray,
    max_pixels: int,
) -> tuple[np.ndarray, ...]:
    """_confirm's answer from its confirmed (pairs, distances, noise ratios) and unconfirmed
    (the same, colour and detail distances, UNCONFIRMED_BY codes) pairs: the images of confirmed
    pairs are decoded once more, each pair's colour distance is measured and, when both images are
    at least DETAIL px and not both small (small pairs had the native check), its detail distance
    (_detail_distances). Pairs whose colours do not agree (colours_agree), or whose detail
    distance is over DETAIL_DISTANCE, join the unconfirmed ones, at most 10 × MAX_SIMILAR of which
    are kept, closest first. A colour or detail distance is NaN where it was not measured; a pair
    whose detail distance was not measured stays confirmed."""
    pairs = confirmed[0]
    ids, slot = np.unique(pairs, return_inverse=True)
    slot = slot.reshape(-1, 2)
    detailed = (sizes[pairs].min(axis=(1, 2)) >= DETAIL) & (sizes[pairs].max(axis=(1, 2)) > RESIZE_MAX_SIDE)

    def view(img: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
        return colour_view(img), detail_source(img) if min(img.size) >= DETAIL else None

    decoded = _each_image(view, [paths[i] for i in ids.tolist()], max_pixels)
    colours = np.stack([d[0] for d in decoded]) if decoded else np.zeros((0, COLOUR_GRID**2, 3), np.float32)
    a, b = colours[slot[:, 0]], colours[slot[:, 1]]
    colour = colour_distance(a, b).astype(np.float32)
    coloured = colours_agree(a, b)
    detail = np.full(len(pairs), np.nan, dtype=np.float32)
    viewable = np.array([d[1] is not None for d in decoded], dtype=bool)[slot].all(axis=1)  # sizes unknown
    checked = np.flatnonzero(detailed & coloured & viewable)
    detail[checked] = _detail_distances([d[1] for d in decoded], slot[checked])
    ok = coloured & ~(detail > DETAIL_DISTANCE)
    by = np.where(coloured, UNCONFIRMED_BY.index("detail"), UNCONFIRMED_BY.index("colour")).astype(np.int8)
    measured = (*confirmed, colour, detail)
    failed = _closest(failed, (*(m[~ok] for m in measured), by[~ok]), 10 * MAX_SIMILAR)
    return *(m[ok] for m in measured), *failed


def _thumbnail_candidates(
    hashes: np.ndarray,
    paths: list[str],
    sizes: np.ndarray,
    crop_distance: int,
    threshold: float,
    max_pixels: int,
    thumbs: np.ndarray,
    row: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of small images (at most RESIZE_MAX_SIDE px) that the hash search leaves out although
    one could be a crop of the other (smaller by at most CROP_FRACTION of each axis), or, of one
    size at least ALIGN_MIN_SIDE px, a re-encoding of it: a 1 px crop of a 28 px picture can move
    20 hash bits, and so can a JPEG at quality 90 of a mirror-symmetric drawing (half its low DCT
    coefficients are zero, so their bits flip with any noise). Each image of a size is paired
    with its CROP_NEIGHBOURS nearest thumbnails among the images of each size it fits in (its
    own size included), groups with the fewest comparisons first, at most MAX_CROP_SEARCH
    comparisons in all; pairs within crop_distance bits are dropped (the hash search has them),
    and so are pairs of one size beyond `threshold` in pixel distance (they cannot be confirmed).
    (pairs, their pixel distances), the closest MAX_ALIGNED. `thumbs` holds the thumbnails
    decoded so far, item i's at row[i] (-1: not decoded); only the others are decoded here."""
    none = (np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32))
    small = np.flatnonzero(sizes.max(axis=1) <= RESIZE_MAX_SIDE)
    shapes, group = np.unique(sizes[small], axis=0, return_inverse=True)
    group = group.ravel()
    counts = np.bincount(group, minlength=len(shapes))
    one_size = (shapes[:, None] == shapes[None]).all(-1)
    work = sorted(
        (int(counts[s] * counts[big]), s, big)
        for s, big in np.argwhere(
            (shapes[:, None] <= shapes[None]).all(-1)
            & (shapes[None] - shapes[:, None] <= CROP_FRACTION * shapes[None]).all(-1)
            & (~one_size | (shapes.min(axis=1) >= ALIGN_MIN_SIDE)[:, None])
        ).tolist()
    )
    spent = np.cumsum([w[0] for w in work])
    work = [w for w, total in zip(work, spent, strict=True) if total <= MAX_CROP_SEARCH]
    if not work:
        return none
    used = np.unique([g for _, s, big in work for g in (s, big)])
    members = small[np.isin(group, used)]
    missing = members[row[members] < 0]
    row = row.copy()
    row[missing] = len(thumbs) + np.arange(len(missing))
    thumbs = np.concatenate([thumbs, _thumbnails([paths[i] for i in missing.tolist()], max_pixels)[0]])
    found, squared = [], []
    for _, s, big in work:
        queries, refs = small[group == s], small[group == big]
        q, r = thumbs[row[queries]], thumbs[row[refs]]
        keep, block = min(CROP_NEIGHBOURS, len(refs) - (s == big)), max(1, 4_000_000 // len(refs))
        for k in range(0, len(q) if keep else 0, block):
            qk = q[k : k + block]
            d = (qk * qk).sum(axis=1)[:, None] + (r * r).sum(axis=1)[None] - 2.0 * qk @ r.T  # squared
            if s == big:  # one size: an image is not its own neighbour
                d[np.arange(len(qk)), k + np.arange(len(qk))] = np.inf
            near = np.argpartition(d, keep - 1, axis=1)[:, :keep]
            found.append(np.stack([np.repeat(queries[k : k + block], keep), refs[near.ravel()]], axis=1))
            squared.append(np.take_along_axis(d, near, axis=1).ravel())
    if not found:
        return none
    pairs, first = np.unique(np.sort(np.concatenate(found), axis=1), axis=0, return_index=True)
    squared = np.concatenate(squared)[first]  # one size: each pair may be found from both ends
    dist = pixel_distance(thumbs[row[pairs[:, 0]]], thumbs[row[pairs[:, 1]]]).astype(np.float32)
    same = (sizes[pairs[:, 0]] == sizes[pairs[:, 1]]).all(axis=1)
    keep = (popcount(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]) > crop_distance) & (
        ~same | (dist <= threshold)
    )
    pairs, _, dist = _closest(
        none + (none[1],), (pairs[keep], squared[keep].astype(np.float32), dist[keep]), MAX_ALIGNED
    )
    return pairs, dist


def _noise_ratios(
    pairs: np.ndarray, paths: list[str], max_pixels: int, natives: dict[int, tuple[np.ndarray, float]]
) -> np.ndarray:
    """noise_ratio of each pair of small images; native views are decoded once into `natives`.
    Pairs of one size are compared in blocks of NATIVE_BLOCK, the others one by one."""
    ids, slot = np.unique(pairs, return_inverse=True)
    slot = slot.reshape(-1, 2)
    missing = [i for i in ids.tolist() if i not in natives]
    decoded = _each_image(native_view, [paths[i] for i in missing], max_pixels)
    natives.update(zip(missing, decoded, strict=True))
    views = [natives[i] for i in ids.tolist()]
    shapes = np.array([v[0].shape for v in views]).reshape(-1, 2)
    floors = np.array([v[1] for v in views], dtype=np.float32)
    same = (shapes[slot[:, 0]] == shapes[slot[:, 1]]).all(axis=1)
    out = np.empty(len(pairs), dtype=np.float32)
    for shape in np.unique(shapes[slot[same, 0]], axis=0):
        members = np.flatnonzero((shapes == shape).all(axis=1))
        row = np.full(len(ids), -1)
        row[members] = np.arange(len(members))
        pixels = np.stack([views[m][0].ravel() for m in members.tolist()])
        chosen = np.flatnonzero(same & (shapes[slot[:, 0]] == shape).all(axis=1))
        for k in range(0, len(chosen), NATIVE_BLOCK):
            block = chosen[k : k + NATIVE_BLOCK]
            a, b = slot[block, 0], slot[block, 1]
            out[block] = _floors_apart(pixels[row[a]], pixels[row[b]], floors[a], floors[b])
    for k in np.flatnonzero(~same).tolist():
        out[k] = noise_ratio(views[slot[k, 0]], views[slot[k, 1]])
    return out


def _confirm_small(
    pairs: np.ndarray, paths: list[str], max_pixels: int, natives: dict, threshold: float, resizes: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of small images (their pixel distances, their noise ratios) in which one is a
    resize of the other (resampled_distance within RESAMPLED_DISTANCE, which is then the pixel
    distance; only when `resizes`, for pairs of different sizes) or a crop of it, or for a pair of
    one size a copy of it: noise_ratio within NOISE_RATIO, and the smaller image and that window
    of the larger (the other image itself when of one size) agreeing in raw brightness and
    contrast and within `threshold` as thumbnails, the pixel distance then (noise alone does not
    tell two grainy near-flat patches apart, nor do thumbnails two handwritten 1s)."""
    ratio = _noise_ratios(pairs, paths, max_pixels, natives)  # decodes every image of `pairs`
    resize, dist = np.zeros(len(pairs), dtype=bool), np.full(len(pairs), np.inf, dtype=np.float32)
    if resizes:
        gray = {i: Image.fromarray(natives[i][0]) for i in np.unique(pairs).tolist()}
        resampled = np.array([resampled_distance(gray[x], gray[y]) for x, y in pairs.tolist()], np.float32)
        resize = resampled <= RESAMPLED_DISTANCE
        dist[resize] = resampled[resize]
    for k in np.flatnonzero(~resize & (ratio <= NOISE_RATIO)).tolist():
        _, small, window = closest_window(natives[pairs[k, 0]], natives[pairs[k, 1]])
        raw = np.stack([raw_thumbnail(Image.fromarray(x)) for x in (small, window)])
        one_size = natives[pairs[k, 0]][0].shape == natives[pairs[k, 1]][0].shape
        if one_size and not tones_agree(tone(raw[0]), tone(raw[1])):
            continue  # closest_window compares tones only for the windows of a larger image
        views = _standardize(raw)
        dist[k] = pixel_distance(views[0], views[1])
    ok = resize | ((ratio <= NOISE_RATIO) & (dist <= threshold))
    return pairs[ok], dist[ok], ratio[ok]


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


def _pair_record(
    frame: pd.DataFrame,
    i: int,
    j: int,
    hashes: np.ndarray,
    dist: float,
    ratio: float,
    colour: float,
    detail: float,
    unconfirmed_by: int | None = None,
) -> dict:
    """One pair as the report lists it; noise_ratio is None where it was not measured (large images)
    or does not apply (a resize), colour_distance where it was not measured (the pixels differed),
    detail_distance where it was not (small images, or the pixels or colours differed). A similar
    pair also names the first check it failed (`unconfirmed_by`, a code of UNCONFIRMED_BY)."""
    rows = frame.iloc[[i, j]]
    extra = {} if unconfirmed_by is None else {"unconfirmed_by": UNCONFIRMED_BY[unconfirmed_by]}
    return {
        "paths": rows["path"].tolist(),
        "labels": rows["label"].tolist(),
        "splits": [],  # set by place()
        "phash_distance": bin(int(hashes[i] ^ hashes[j])).count("1"),
        "pixel_distance": round(float(dist), 4),
        "noise_ratio": round(float(ratio), 3) if np.isfinite(ratio) else None,
        "colour_distance": round(float(colour), 4) if np.isfinite(colour) else None,
        "detail_distance": round(float(detail), 4) if np.isfinite(detail) else None,
        **extra,
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
    (_confirm_crops), the pixel distance then being the aligned one. Pairs of small images are
    confirmed only within NOISE_RATIO noise floors at their own resolution (noise_ratio, recorded
    with each pair); those of different sizes may also be confirmed as a crop (by the noise ratio
    and the thumbnails of the matching window) or a resize (by a resampled comparison), the pixel
    distance then being the window's or the resampled one, and crops and pairs of one size (at
    least ALIGN_MIN_SIDE px) are looked for beyond crop_distance bits too (_thumbnail_candidates).
    However confirmed, the two images' colours must agree too (colours_agree; the colour distance
    is recorded with each pair that got that far), and pairs of larger images must agree in
    every cell of their aligned detail views (detail_distance, recorded likewise). Near groups
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
        labels = sorted(set(rows["label"]))
        return {
            "paths": rows["path"].tolist(),
            "kind": kind,
            "labels": labels,
            "splits": [],  # set by place()
            "conflicting_labels": len(labels) > 1,
            "crosses_splits": False,
        }

    by_content = frame.groupby("sha256", sort=False).indices
    found = [describe(sorted(g.tolist()), "exact") for g in by_content.values() if len(g) > 1]
    if "phash" not in frame or max_distance < 0:
        return place(found, frame)
    reps = np.array(sorted(int(g[0]) for g in by_content.values()))  # one file per content
    hashes = np.array([int(h, 16) for h in frame["phash"]], dtype=np.uint64)
    paths = frame["path"].tolist()
    if {"width", "height"} <= set(frame):
        sizes = frame[["width", "height"]].to_numpy()[reps]
    else:  # sizes unknown: every image is taken as large (a pair may be a crop, not a resize)
        sizes = np.full((len(reps), 2), RESIZE_MAX_SIDE + 1)
    confirmed, dist, ratio, colour, detail, unconfirmed, udist, uratio, ucolour, udetail, uby = _confirm(
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
    for (a, b), *measures in zip(
        *(x.tolist() for x in (confirmed, dist, ratio, colour, detail)), strict=True
    ):
        links[component[a]].append((measures, a, b))
    for c, rows in sorted(members.items(), key=lambda kv: min(paths[i] for i in kv[1])):
        weakest = sorted(links[c], key=lambda link: (link[0][0], link[1], link[2]), reverse=True)
        weakest = weakest[:PAIRS_PER_GROUP]
        group = describe(sorted(rows), "near")
        group["pairs"] = [_pair_record(frame, reps[a], reps[b], hashes, *m) for m, a, b in weakest]
        found.append(group)
    apart = component[unconfirmed[:, 0]] != component[unconfirmed[:, 1]]
    similar = zip(
        *(u[apart].tolist() for u in (unconfirmed, udist, uratio, ucolour, udetail, uby)), strict=True
    )
    for (a, b), *measures in list(similar)[:MAX_SIMILAR]:
        i, j = int(reps[a]), int(reps[b])
        found.append({**describe([i, j], "similar"), "pairs": [_pair_record(frame, i, j, hashes, *measures)]})
    return place(found, frame)


def place(found: list[dict], frame: pd.DataFrame) -> list[dict]:
    """found with the split of every image filled in from frame's split column (in place); as it
    is when frame has none yet (prepare searches before it draws the splits)."""
    if "split" not in frame:
        return found
    split_of = dict(zip(frame["path"], frame["split"], strict=True))
    for group in found:
        group["splits"] = sorted({split_of[p] for p in group["paths"]})
        group["crosses_splits"] = len(group["splits"]) > 1
        for pair in group.get("pairs", ()):
            pair["splits"] = [split_of[p] for p in pair["paths"]]
    return found


def near_contents(found: list[dict], frame: pd.DataFrame) -> list[list[str]]:
    """The contents (sha256) of each confirmed near group: the units a split keeps whole."""
    sha_of = dict(zip(frame["path"], frame["sha256"], strict=True))
    return [sorted({sha_of[p] for p in g["paths"]}) for g in found if g["kind"] == "near"]


def write_record(folder: Path, found: list[dict], settings: dict, manifest_sha256: str) -> None:
    """Keep a search's findings beside the manifest they were made on (RECORD), for validate."""
    record = {"settings": settings, "manifest_sha256": manifest_sha256, "found": found}
    tmp = folder / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / RECORD)


def read_record(folder: Path, settings: dict, manifest_sha256: str) -> list[dict] | None:
    """The findings recorded in folder for this manifest and these settings; None when there are
    none, or they were made on another manifest or with other settings (then search again)."""
    try:
        record = json.loads((folder / RECORD).read_text())
        if record["settings"] == settings and record["manifest_sha256"] == manifest_sha256:
            return list(record["found"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: the search is made again, as if never recorded
    return None


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
    hash distance, pixel distance, noise ratio (where measured) and, for a similar pair that
    failed on colour or on detail, its colour or detail distance, or on tones or sizes, that; None
    when the groups hold no pairs."""
    pairs = [(g["kind"], p) for g in groups for p in g.get("pairs", ())][:limit]
    if not pairs:
        return None
    from .plots import image_grid

    files, titles = [], []
    for kind, p in pairs:
        files += p["paths"]
        failed = p.get("unconfirmed_by") if kind == "similar" else None
        colour = p.get("colour_distance") if failed == "colour" else None
        detail = p.get("detail_distance") if failed == "detail" else None
        titles += [
            f"{p['labels'][0]} / {p['splits'][0]}\nhash {p['phash_distance']} bits",
            f"{p['labels'][1]} / {p['splits'][1]}\npixel {p['pixel_distance']:.3f}"
            + ("" if p.get("noise_ratio") is None else f", noise {p['noise_ratio']:.2f}")
            + ("" if colour is None else f", colour {colour:.2f}")
            + ("" if detail is None else f", detail {detail:.2f}")
            + UNSHOWN_FAILURE.get(failed, ""),
        ]
    return image_grid(files, titles, title, path)
