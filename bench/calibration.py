"""Benchmark: how far the shipped model's confidence is from its accuracy, with and without the
temperature fitted on the val split (train.calibrate_confidence).

Run: `python bench/calibration.py [--datasets digits,faces,...] [--seeds 0,1,2]`
Prints figures; asserts nothing. Each dataset of bench/real_data.py goes through prepare,
validate (audit off, gate warns), train and evaluate with the shipped params.yaml, only
data.source changed (bench/defaults.py's run). The trained checkpoint has the temperature T
folded into its classifier, so its test logits are the calibrated ones and T times them the raw
ones: both are scored on the same test images in one run. Per dataset: the test split's expected
calibration error (15 bins), negative log-likelihood and mean top-1 probability beside the
accuracy, raw → calibrated, mean over seeds, and the temperatures fitted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from defaults import run
from real_data import DATASETS

from visiontune.components import manifest, metrics
from visiontune.components import model as models
from visiontune.components.export import batches
from visiontune.pipelines import stages


def checkpoint_test_logits(layout: stages.Layout) -> tuple[np.ndarray, np.ndarray, float]:
    """(the checkpoint's test logits, the labels, the temperature folded into it)."""
    model, meta = models.load_checkpoint(layout.train)
    prep = models.preprocessing_of(meta)
    frame = manifest.read(layout.prepare / "manifest.csv")
    index = {name: i for i, name in enumerate(manifest.class_names(frame))}
    test = frame[frame["split"] == "test"]
    logits = models.predict_logits(model, batches(test["path"].tolist(), prep.size, prep.mean, prep.std, 64))
    return logits, test["label"].map(index).to_numpy(), meta["temperature"] or 1.0


def scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """ECE, NLL and mean top-1 probability of softmax(logits) on labels y."""
    logits = logits.astype(np.float64)
    probs = metrics.softmax(logits)
    return {
        "ece": metrics.expected_calibration_error(probs, y),
        "nll": metrics.nll(logits, y),
        "confidence": float(probs.max(1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'dataset':<9} {'accuracy':>8} {'ECE raw → calibrated':>22} {'NLL raw → calibrated':>22} "
          f"{'confidence raw → cal.':>22}  temperatures")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            source = DATASETS[name](Path(tmp) / "data" / name)
            rows = []
            for seed in seeds:
                work = Path(tmp) / "runs" / f"{name}-{seed}"
                accuracy = run(source, work, seed, {}).accuracy
                logits, y, temperature = checkpoint_test_logits(stages.Layout(work))
                rows.append((accuracy, scores(logits * temperature, y), scores(logits, y), temperature))
                raw, calibrated = rows[-1][1:3]
                seen = {"dataset": name, "seed": seed, "accuracy": accuracy, "temperature": temperature}
                print(json.dumps({**seen, "raw": raw, "calibrated": calibrated}), flush=True)
            cells = [
                f"{statistics.mean(r[1][k] for r in rows):.4f} → {statistics.mean(r[2][k] for r in rows):.4f}"
                for k in ("ece", "nll", "confidence")
            ]
            print(
                f"{name:<9} {statistics.mean(r[0] for r in rows):>8.4f} {cells[0]:>22} {cells[1]:>22} "
                f"{cells[2]:>22}  {' '.join(f'{r[3]:.3f}' for r in rows)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
