"""Benchmark: label-audit quality (precision/recall on seeded label flips) and validate-stage speed.

Run: `python bench/label_audit.py [--sizes 1797,5000,20000] [--noise 0.05,0.1,0.2]`
Prints figures; asserts nothing. Quality: digits with a seeded share of labels flipped to another
class, the flagged set compared with the flipped set. Speed: the whole validate stage (schema,
balance, duplicates, embedding, cross-validation, cleanlab) on 1,797 digits and on larger sets
made of perturbed copies (shifted, rescaled, noisy) of them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from visiontune.components.audit import label_audit
from visiontune.components.config import BaseConfig, DataConfig, ValidateConfig
from visiontune.components.prepare import prepare
from visiontune.components.validate import validate

SIZE = 64  # px, as the shipped params.yaml trains digits


def digits_folder(root: Path, n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n digit images as PNGs: the 1,797 originals, then perturbed copies; (path, true label)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = i % len(digits.images)
        ink = digits.images[k] * (255 / 16)
        if i >= len(digits.images):  # a new scan of the same digit: shift, scale, noise
            big = Image.fromarray(ink.astype(np.uint8)).resize((16, 16), Image.Resampling.BILINEAR)
            canvas = Image.new("L", (20, 20))
            canvas.paste(big, tuple(rng.integers(0, 5, 2).tolist()))
            arr = np.asarray(canvas, dtype=np.float64) * rng.uniform(0.7, 1.1)
            ink = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255)
        path = root / f"{i:06d}.png"
        Image.fromarray((255 - ink).astype(np.uint8)).save(path)
        rows.append((str(path), int(digits.target[k])))
    return rows


def flip(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, set[int]]:
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    idx = rng.choice(len(labels), int(round(rate * len(labels))), replace=False)
    for i in idx:
        noisy[i] = rng.choice([c for c in range(10) if c != labels[i]])
    return noisy, set(idx.tolist())


def prepared_from(rows: list[tuple[str, int]], labels: np.ndarray, work: Path, name: str) -> Path:
    csv_path = work / f"{name}.csv"
    pd.DataFrame({"path": [p for p, _ in rows], "label": [f"d{y}" for y in labels]}).to_csv(
        csv_path, index=False
    )
    out = work / name
    prepare(DataConfig(source=str(csv_path)), BaseConfig(), 89_478_485, out)
    return out


def quality(noise: list[float], seed: int) -> None:
    print(f"\nlabel-audit quality: digits, 1,797 images at {SIZE} px, labels flipped at random (seed {seed})")
    header = ("noise", 6), ("flipped", 8), ("flagged", 8), ("precision", 10), ("recall", 7), ("clf acc", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "img").mkdir()
        rows = digits_folder(work / "img", 1797)
        truth = np.array([y for _, y in rows])
        for rate in noise:
            noisy, flipped = flip(truth, rate, seed)
            prepared = prepared_from(rows, noisy, work, f"noise{rate}")
            frame = pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False)
            t0 = time.perf_counter()
            result = label_audit(frame, SIZE, folds=5, seed=seed, out=work, store=work / "cache")
            seconds = time.perf_counter() - t0
            position = {p: i for i, (p, _) in enumerate(rows)}
            flagged = {position[str(Path(x["path"]).absolute())] for x in result["issues"]}
            hit = len(flagged & flipped)
            section = result["section"]
            print(
                f"{rate:>6.0%} {len(flipped):>8} {len(flagged):>8} {hit / max(1, len(flagged)):>10.3f} "
                f"{hit / len(flipped):>7.3f} {section['cv_accuracy_vs_given_labels']:>8.3f} {seconds:>8.1f}"
            )


def speed(sizes: list[int]) -> None:
    print(f"\nvalidate-stage speed at {SIZE} px on this machine (prepare shown apart)")
    header = ("images", 7), ("prepare s", 10), ("validate s", 11), ("of which embed s", 17), ("audit s", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'img/s':>7}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "img").mkdir()
            rows = digits_folder(work / "img", n)
            t0 = time.perf_counter()
            prepared = prepared_from(rows, np.array([y for _, y in rows]), work, "p")
            t1 = time.perf_counter()
            cfg = ValidateConfig(on_fail="warn")
            validate(cfg, prepared, work / "v", audit_size=SIZE)
            t2 = time.perf_counter()
            audit = pd.read_json(work / "v" / "report.json", typ="series")["label_audit"]
            print(
                f"{n:>7} {t1 - t0:>10.1f} {t2 - t1:>11.1f} {audit['embed_seconds']:>17.1f} "
                f"{audit['seconds']:>8.1f} {n / (t2 - t1):>7.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="0.05,0.1,0.2")
    parser.add_argument("--sizes", default="1797,5000,10000,20000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quality([float(x) for x in args.noise.split(",") if x], args.seed)
    speed([int(x) for x in args.sizes.split(",") if x])


if __name__ == "__main__":
    main()
