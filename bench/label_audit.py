"""Benchmark: label-audit quality (precision/recall on seeded label flips) and validate-stage speed.

Run: `python bench/label_audit.py [--datasets digits,faces] [--noise 0,0.05,0.1,0.2] [--seeds 0,1,2]
[--sizes 1797,5000,20000]` (an empty --noise or --sizes skips that part).
Prints figures; asserts nothing. Quality: every dataset in bench/real_data.py, embedded once at its
audit size, with a seeded share of labels flipped to a uniformly chosen other class; the flagged
set is compared with the flipped set, and the audit's expected precision shown beside the measured
one (the 0 % row: how much of a clean set is flagged, which the gate's
validate.max_label_issue_fraction judges). Speed: the whole validate stage (schema,
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
from real_data import DATASETS

from visiontune.components.audit import embed, find_issues
from visiontune.components.config import BaseConfig, DataConfig, ValidateConfig
from visiontune.components.prepare import prepare
from visiontune.components.validate import validate

SIZE = 64  # px, as the shipped params.yaml trains digits
AUDIT_SIZE = {
    "digits": 64,
    "faces": 64,
    "textures": 64,
    "blends": 64,
    "photos": 96,
    "mnist": 64,
    "fashion": 64,
    "animals": 64,
    "emoji": 64,
    "clipart": 224,
}  # as auto picks


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


def flip(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded share of labels, each moved to a uniformly chosen other class; (labels, flipped mask)."""
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    noisy = labels.copy()
    idx = rng.choice(len(labels), int(round(rate * len(labels))), replace=False)
    for i in idx:
        noisy[i] = rng.choice([c for c in range(classes) if c != labels[i]])
    return noisy, np.isin(np.arange(len(labels)), idx)


def prepared_from(rows: list[tuple[str, int]], labels: np.ndarray, work: Path, name: str) -> Path:
    csv_path = work / f"{name}.csv"
    pd.DataFrame({"path": [p for p, _ in rows], "label": [f"d{y}" for y in labels]}).to_csv(
        csv_path, index=False
    )
    out = work / name
    prepare(DataConfig(source=str(csv_path)), BaseConfig(), ValidateConfig(), out)
    return out


def _embedded(name: str, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, true labels) of one real dataset at its audit size, embedded once."""
    root = DATASETS[name](work / name / "raw")
    prepare(DataConfig(source=str(root)), BaseConfig(), ValidateConfig(), work / name / "prep")
    frame = pd.read_csv(work / name / "prep" / "manifest.csv", dtype=str, keep_default_na=False)
    classes = sorted(frame["label"].unique())
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return embed(frame, AUDIT_SIZE[name], work / name / "cache"), labels


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else "—"


def ranking_precision(error: np.ndarray, flipped: np.ndarray, recall: float = 0.8) -> float | None:
    """The best precision of any cut of the audit's ranking (most likely wrong first) that keeps at
    least `recall` of the flips: what no choice of cut could beat with these probabilities."""
    if not flipped.any():
        return None
    hits = np.cumsum(flipped[np.argsort(-error, kind="stable")])
    k = np.arange(1, len(error) + 1)
    enough = hits >= recall * flipped.sum()
    return float((hits[enough] / k[enough]).max())


def _row(name: str, features: np.ndarray, truth: np.ndarray, rate: float, seeds: list[int]) -> str:
    """One table row: the audit on `seeds` flips of one dataset at one noise rate."""
    runs = []
    for seed in seeds:
        labels, flipped = flip(truth, rate, seed)
        found = find_issues(features, labels, folds=5, seed=seed)
        hit = int(flipped[found.flagged].sum())
        runs.append(
            {
                "flagged": len(found.flagged),
                "precision": hit / len(found.flagged) if len(found.flagged) else None,
                "recall": hit / flipped.sum() if flipped.any() else None,
                "expected": found.expected_precision,
                "noise": found.noise_rate,
                "agreement": found.agreement,
                "best cut": ranking_precision(found.error_probability, flipped),
            }
        )
    column = {k: [r[k] for r in runs] for k in runs[0]}
    flagged = np.mean(column["flagged"])
    stats = " ".join(
        f"{_stat(column[k]):>11}"
        for k in ("precision", "recall", "expected", "noise", "agreement", "best cut")
    )
    return (
        f"{name:>9} {len(truth):>6} {rate:>5.0%} {int(round(rate * len(truth))):>7} "
        f"{f'{flagged:.1f} ({flagged / len(truth):.1%})':>13} {stats}"
    )


def quality(names: list[str], noise: list[float], seeds: list[int]) -> None:
    print(
        f"\nlabel-audit quality: labels flipped at random to another class, mean ± sd over seeds {seeds}"
        "\n(expected = the audit's own expected_precision; agreement = classifier vs given labels;"
        "\nP@R.8 = the best precision of any cut of the audit's ranking that keeps 80 % of the flips)"
    )
    header = [
        ("dataset", 9), ("images", 6), ("noise", 5), ("flipped", 7), ("flagged", 13), ("precision", 11),
        ("recall", 11), ("expected", 11), ("est. noise", 11), ("agreement", 11), ("P@R.8", 11),
    ]  # fmt: skip
    print(" ".join(f"{name:>{width}}" for name, width in header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            features, truth = _embedded(name, Path(tmp))
            for rate in noise:
                print(_row(name, features, truth, rate, seeds), flush=True)


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
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--noise", default="0,0.05,0.1,0.2")
    parser.add_argument("--sizes", default="1797,5000,10000,20000")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    noise = [float(x) for x in args.noise.split(",") if x]
    if noise:
        quality([x for x in args.datasets.split(",") if x], noise, [int(x) for x in args.seeds.split(",")])
    speed([int(x) for x in args.sizes.split(",") if x])


if __name__ == "__main__":
    main()
