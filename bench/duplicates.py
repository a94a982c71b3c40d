"""Benchmark: near-duplicate detection on real datasets, and the speed of the hash search.

Run: `python bench/duplicates.py [--datasets digits,faces,textures,photos,blends,mnist,fashion]
[--planted 300] [--sizes 10000,50000,100000] [--no-embedding] [--resize-filter bicubic]`
Prints figures; asserts nothing. For each dataset of bench/real_data.py, true near duplicates are
planted (one edited copy per picked original, the edit cycling through JPEG re-encoding at quality
60–95, resizing 50–200 % (bicubic, or --resize-filter), cropping up to 5 % of each side, brightness
±10 % and a format change to WebP/JPEG/BMP), and distinct pairs are every pair of different
originals of one class (up to 100k).
It prints the separation of each candidate confirming measure (planted vs distinct), precision and
recall of find_duplicates at its defaults (plain, crop-aligned, resampled and native confirmation)
on the planted pairs,
the confirmed near duplicates among the distinct originals alone, recall and false confirmations of
the plain comparison alone over a grid of (distance, threshold), and the search time on random hashes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance
from real_data import DATASETS

from visiontune.components import duplicates, hash_search, images

KINDS = ("jpeg", "resize", "crop", "brightness", "format")
DEFAULT_DISTANCE = 6  # the default this benchmark argues for (validate.near_duplicate_distance)
GRID_D, GRID_T = (4, 6, 8, 10, 12), (0.06, 0.08, 0.1, 0.15, 0.2, 0.25)
RESIZE = {"filter": Image.Resampling.BICUBIC}  # the resize edit's resampling (--resize-filter)


def plant(img: Image.Image, kind: str, rng: np.random.Generator, out: Path) -> Path:
    """Write one edited copy of img to out (its suffix set by the edit) and return the path."""
    if kind == "jpeg":
        path = out.with_suffix(".jpg")
        img.save(path, quality=int(rng.integers(60, 96)))
        return path
    if kind == "resize":
        scale = rng.uniform(0.5, 2.0)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, RESIZE["filter"])
    elif kind == "crop":
        dx, dy = (round(s * rng.uniform(0, 0.05)) for s in img.size)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        img = img.crop((left, top, img.width - (dx - left), img.height - (dy - top)))
    elif kind == "brightness":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
    elif kind == "format":
        suffix = [".webp", ".jpg", ".bmp"][int(rng.integers(0, 3))]
        path = out.with_suffix(suffix)
        img.save(path, **({"quality": 90} if suffix != ".bmp" else {}))
        return path
    path = out.with_suffix(".png")
    img.save(path)
    return path


def manifest_rows(paths: list[Path], labels: list[str]) -> pd.DataFrame:
    """The manifest columns find_duplicates reads, computed as prepare does."""
    rows = []
    for path, label in zip(paths, labels, strict=True):
        img = images.load_image(path)
        rows.append(
            {"path": str(path), "label": label, "split": "train", "sha256": images.sha256_file(path),
             "phash": duplicates.perceptual_hash(img), "width": img.width, "height": img.height,
             "mode": "RGB"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def embeddings(paths: list[Path]) -> np.ndarray:
    """Unit-length pooled stage features of the pretrained Lite0 at 64 px (the label audit's)."""
    from visiontune.components import model as models

    model, prep = models.embedder(64)
    feats = []
    for k in range(0, len(paths), 256):
        batch = np.stack([images.resize(images.load_image(p), prep.size) for p in paths[k : k + 256]])
        feats.append(models.pooled_stage_features(model, images.normalize(batch, prep.mean, prep.std)))
    f = np.concatenate(feats)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def measures(paths: list[Path], use_embedding: bool) -> dict[str, np.ndarray]:
    """Per-image views, each image decoded once and not kept (large images would fill the memory);
    each measure is a distance between two views (0 = same)."""
    raw = np.stack([duplicates.raw_thumbnail(images.load_image(p)) for p in paths])
    views = {
        "pixel (standardized MAD, 16 px)": duplicates._standardize(raw),
        "raw MAD (16 px, /255)": raw,
    }
    if use_embedding:
        views["embedding (1 - cosine)"] = embeddings(paths)
    return views


def distance(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if name.startswith("embedding"):
        return 1.0 - (a * b).sum(axis=1)
    return np.abs(a - b).mean(axis=1)


def separation(pos: np.ndarray, neg: np.ndarray) -> str:
    """Planted and distinct distance quantiles, AUC, and recall below the closest distinct pair."""
    auc = (pos[:, None] < neg[None, :: max(1, len(neg) // 5000)]).mean()
    return (
        f"planted p95 {np.percentile(pos, 95):.3f} max {pos.max():.3f} | distinct min {neg.min():.3f} "
        f"p0.1 {np.percentile(neg, 0.1):.3f} | AUC {auc:.4f} | recall below distinct min "
        f"{(pos < neg.min()).mean():.3f}"
    )


def one_dataset(name: str, work: Path, n_planted: int, use_embedding: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    root = DATASETS[name](work / name)
    paths = sorted(p for p in root.rglob("*.png"))
    labels = [p.parent.name for p in paths]
    picks = rng.choice(len(paths), min(n_planted, len(paths)), replace=False)
    (work / f"{name}_copies").mkdir()
    copies, kinds = [], []
    for n, k in enumerate(picks.tolist()):
        kinds.append(KINDS[n % len(KINDS)])
        out = work / f"{name}_copies" / f"{n:04d}_{paths[k].stem}"
        copies.append(plant(images.load_image(paths[k]), kinds[-1], rng, out))
    originals = manifest_rows(paths, labels)
    planted = manifest_rows(copies, [labels[k] for k in picks])
    print(f"\n{name}: {len(paths)} originals, {len(copies)} planted copies ({', '.join(KINDS)} in turn)")
    dup_sha = originals["sha256"].duplicated(keep=False).sum()
    print(f"  byte-identical originals (sha256, caught as exact): {dup_sha}")

    # separation of each candidate measure: planted pairs vs every distinct same-class pair
    i, j = np.triu_indices(len(paths), 1)
    same = np.array(labels)[i] == np.array(labels)[j]
    i, j = i[same], j[same]
    if len(i) > 100_000:
        keep = rng.choice(len(i), 100_000, replace=False)
        i, j = i[keep], j[keep]
    views, copy_views = measures(paths, use_embedding), measures(copies, use_embedding)
    for m in views:
        pos = distance(m, views[m][picks], copy_views[m])
        neg = distance(m, views[m][i], views[m][j])
        print(f"  {m:32s} {separation(pos, neg)}")
    # the native check, on the pairs of small images it judges (a resize has its own check)
    small = (originals[["width", "height"]].max(axis=1) <= duplicates.RESIZE_MAX_SIDE).to_numpy()
    copy_small = (planted[["width", "height"]].max(axis=1) <= duplicates.RESIZE_MAX_SIDE).to_numpy()
    judged = [n for n, k in enumerate(picks.tolist()) if small[k] and copy_small[n] and kinds[n] != "resize"]
    i, j = i[small[i] & small[j]], j[small[i] & small[j]]
    if judged and len(i):
        native = {k: duplicates.native_view(images.load_image(paths[k])) for k in {*i.tolist(), *j.tolist()}}
        native |= {int(picks[n]): duplicates.native_view(images.load_image(paths[picks[n]])) for n in judged}
        pos = np.array(
            [
                duplicates.noise_ratio(native[picks[n]], duplicates.native_view(images.load_image(copies[n])))
                for n in judged
            ]
        )
        neg = np.array(
            [
                duplicates.noise_ratio(native[a], native[b])
                for a, b in zip(i.tolist(), j.tolist(), strict=True)
            ]
        )
        print(f"  {'noise ratio (native; no resizes)':32s} {separation(pos, neg)}")
    else:
        print(f"  {'noise ratio (native; no resizes)':32s} not applied: no pairs of small images")

    # the detector at its defaults
    frame = pd.concat([originals, planted], ignore_index=True)
    origin = dict(zip(planted["path"], originals["path"].iloc[picks], strict=True))
    root_of = {**{p: p for p in originals["path"]}, **origin}
    found = duplicates.find_duplicates(frame, DEFAULT_DISTANCE)
    group_of = {p: g for g, grp in enumerate(x for x in found if x["kind"] == "near") for p in grp["paths"]}
    hits = np.array([group_of.get(c, -1) == group_of.get(o, -2) for c, o in origin.items()])
    confirmed = [p["paths"] for g in found if g["kind"] == "near" for p in g["pairs"]]
    correct = sum(root_of[a] == root_of[b] for a, b in confirmed)
    precision = correct / len(confirmed) if confirmed else 1.0
    print(
        f"  detector (distance {DEFAULT_DISTANCE}, pixel {duplicates.PIXEL_DISTANCE}; crops within "
        f"{duplicates.CROP_DISTANCE} bits, aligned {duplicates.ALIGNED_DISTANCE}; small images within "
        f"{duplicates.NOISE_RATIO} noise floors): precision "
        f"{precision:.3f} ({correct}/{len(confirmed)} confirmed pairs), recall {hits.mean():.3f}; by edit: "
        + ", ".join(f"{k} {hits[np.array(kinds) == k].mean():.2f}" for k in KINDS)
    )
    alone = duplicates.find_duplicates(originals, DEFAULT_DISTANCE)
    near = [g for g in alone if g["kind"] == "near"]
    similar = [g for g in alone if g["kind"] == "similar"]
    print(f"  distinct originals alone: {len(near)} confirmed near group(s), {len(similar)} similar pair(s)")
    for g in near[:5]:
        p = g["pairs"][0]
        print(f"    confirmed: {p['paths']} hash {p['phash_distance']} pixel {p['pixel_distance']}")

    # recall and false confirmations over (distance, threshold): all pairs of distinct originals
    hashes = np.array([int(h, 16) for h in originals["phash"]], dtype=np.uint64)
    values, inverse = np.unique(hashes, return_inverse=True)
    pairs = np.concatenate(
        [
            np.empty((0, 2), dtype=np.int64),
            *hash_search.member_pairs(inverse, hash_search.hash_pairs(values, max(GRID_D))),
        ]
    )
    a, b = pairs[:, 0], pairs[:, 1]
    view = views["pixel (standardized MAD, 16 px)"]
    neg_hash = hash_search.popcount(hashes[a] ^ hashes[b])
    neg_pixel = distance("pixel", view[a], view[b])
    pos_hash = hash_search.popcount(
        hashes[picks] ^ np.array([int(h, 16) for h in planted["phash"]], np.uint64)
    )
    pos_pixel = distance("pixel", view[picks], copy_views["pixel (standardized MAD, 16 px)"])
    grid = {
        (d, t): ((pos_hash <= d) & (pos_pixel <= t), int(((neg_hash <= d) & (neg_pixel <= t)).sum()))
        for d in GRID_D
        for t in GRID_T
    }
    return {"precision": precision, "recall": hits.mean(), "false": len(near), "grid": grid}


def grid_table(results: dict[str, dict]) -> None:
    print("\nrecall (all datasets' planted pairs) / false confirmations among distinct originals (sum)")
    print(f"{'distance':>9} " + " ".join(f"{'pixel ' + str(t):>14}" for t in GRID_T))
    for d in GRID_D:
        cells = []
        for t in GRID_T:
            hit = np.concatenate([r["grid"][d, t][0] for r in results.values()])
            false = sum(r["grid"][d, t][1] for r in results.values())
            worst = min(r["grid"][d, t][0].mean() for r in results.values())
            cells.append(f"{hit.mean():.3f}/{worst:.2f}/{false}")
        print(f"{d:>9} " + " ".join(f"{c:>14}" for c in cells))
    print("(cells: pooled recall / worst dataset's recall / false confirmations)")


def timing(sizes: list[int], seed: int) -> None:
    print(f"\nhash search (multi-index, {hash_search.popcount.__name__}; random 64-bit hashes), seconds")
    distances = (0, 4, DEFAULT_DISTANCE, 8, 10, duplicates.CROP_DISTANCE)  # the search runs at the larger
    print(
        f"{'images':>8} "
        + " ".join(f"{'d=' + str(d):>8}" for d in distances)
        + f" {'pairs at d=' + str(DEFAULT_DISTANCE):>13}"
    )
    rng = np.random.default_rng(seed)
    for n in sizes:
        values = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
        values[: n // 20] = values[0]  # 5 % of the images share one hash (blank frames, say)
        cells, found = [], 0
        for d in distances:
            start = time.perf_counter()
            unique = np.unique(values)
            pairs = hash_search.hash_pairs(unique, d)
            cells.append(f"{time.perf_counter() - start:8.2f}")
            found = len(pairs) if d == DEFAULT_DISTANCE else found
        print(f"{n:>8} " + " ".join(cells) + f" {found:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # animals and emoji only when asked: their files hold identical and re-drawn pictures (two
    # countries' one flag, a man and a person rowing), so "distinct files are distinct pictures",
    # which the false-confirmation count assumes, does not hold there
    parser.add_argument(
        "--datasets", default=",".join(d for d in DATASETS if d not in ("animals", "emoji", "clipart"))
    )
    parser.add_argument("--planted", type=int, default=300)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-embedding", action="store_true")
    parser.add_argument("--resize-filter", default="bicubic", help="nearest, bilinear, box, hamming…")
    args = parser.parse_args()
    RESIZE["filter"] = Image.Resampling[args.resize_filter.upper()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            results[name] = one_dataset(name, Path(tmp), args.planted, not args.no_embedding, args.seed)
    grid_table(results)
    print("\nat the defaults:")
    for name, r in results.items():
        print(
            f"  {name:9s} precision {r['precision']:.3f} recall {r['recall']:.3f} "
            f"false confirmed {r['false']}"
        )
    timing([int(s) for s in args.sizes.split(",") if s], args.seed)


if __name__ == "__main__":
    main()
