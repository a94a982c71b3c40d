"""Benchmark: the shipped params.yaml beside the best settings measured, on several real datasets.

Run: `python bench/defaults.py [--datasets digits,faces,...] [--seeds 0,1,2] [--variants ...]`
Prints figures; asserts nothing. Each dataset of bench/real_data.py goes through prepare,
validate (audit off, gate warns), train and evaluate with the shipped params.yaml, only
data.source changed, then with each variant (a few keys overridden). base.seed changes the split
and the initialization, so the spread over seeds includes the split's. The last table names,
per dataset, the best variant and how many accuracy points the shipped defaults lose to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from real_data import DATASETS

from visiontune.components.config import load_params
from visiontune.pipelines import stages

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict] = {
    "shipped": {},
    "linear": {"train.method": "linear"},
    "lora": {"train.method": "lora"},
    "freeze2": {"train.freeze": 2},
    "hflip": {"train.hflip": True},
    "lr3e-4": {"train.lr": 3e-4},
    "2x size": {"model.image_size": "double"},  # twice the size auto chooses
    "no early stop": {"train.patience": 10},  # every epoch, the schedule annealed to its end
    "no smoothing": {"train.label_smoothing": 0.0},
    "mixup": {"train.mixup": 0.2},
    "layer decay": {"train.layer_decay": 0.8},
    "batch 16": {"train.batch_size": 16},
    "15 epochs": {"train.epochs": 15},
}


def run(source: Path, work: Path, seed: int, overrides: dict) -> tuple[float, float, int, int]:
    """(test accuracy, seconds, image size, epochs run) of one pipeline run up to evaluate."""
    overrides = {**overrides, "data.source": str(source), "base.seed": seed}
    overrides |= {"validate.label_audit": False, "validate.on_fail": "warn"}
    layout = stages.Layout(work)
    if overrides.get("model.image_size") == "double":
        params = load_params(ROOT / "params.yaml", {**overrides, "model.image_size": "auto"})
        stages.prepare(params, layout)
        overrides["model.image_size"] = 2 * stages.image_size(params, layout.prepare)
    params = load_params(ROOT / "params.yaml", overrides)
    started = time.perf_counter()
    for name in ("prepare", "validate", "train", "evaluate"):
        stages.STAGES[name](params, layout)
    seconds = time.perf_counter() - started
    trained = json.loads((layout.train / "train.json").read_text())
    metrics = json.loads((layout.evaluate / "metrics.json").read_text())
    return metrics["test_accuracy"], seconds, trained["image_size"], trained["epochs_run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra override for every run, k=v")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = dict(kv.split("=", 1) for kv in args.set)
    extra = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v for k, v in extra.items()}
    best: dict[str, tuple[str, float]] = {}
    shipped: dict[str, float] = {}
    print(f"{'dataset':<9} {'variant':<8} {'px':>4} {'test accuracy':>16} {'epochs':>7} {'s/run':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            source = DATASETS[name](Path(tmp) / "data" / name)
            for variant in args.variants.split(","):
                scores, times, epochs, size = [], [], [], 0
                for seed in seeds:
                    work = Path(tmp) / "runs" / f"{name}-{variant}-{seed}"
                    acc, seconds, size, ran = run(source, work, seed, {**extra, **VARIANTS[variant]})
                    scores.append(acc)
                    times.append(seconds)
                    epochs.append(ran)
                mean = statistics.mean(scores)
                sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
                print(
                    f"{name:<9} {variant:<8} {size:>4} {mean:>9.4f} ± {sd:.4f} "
                    f"{statistics.mean(epochs):>7.1f} {statistics.mean(times):>6.1f}  "
                    f"seeds: {' '.join(f'{x:.4f}' for x in scores)}",
                    flush=True,
                )
                if variant == "shipped":
                    shipped[name] = mean
                if name not in best or mean > best[name][1]:
                    best[name] = (variant, mean)
    print(f"\n{'dataset':<9} {'shipped':>8} {'best':>8} {'best variant':<12} {'gap (points)':>12}")
    for name, (variant, mean) in best.items():
        gap = 100 * (mean - shipped.get(name, float("nan")))
        print(f"{name:<9} {shipped.get(name, float('nan')):>8.4f} {mean:>8.4f} {variant:<12} {gap:>12.1f}")


if __name__ == "__main__":
    main()
