"""evaluate stage: test-split metrics (DVC metrics, flat JSON), predictions and plots.

Run as `visiontune evaluate` or called by the flow and tests.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from . import images, manifest
from . import model as models
from .config import EvaluateConfig
from .errors import VisiontuneError


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    metrics_path: str
    plots: list[str]


def batches(paths: list[str], size: int, mean, std, batch_size: int):
    """Normalized NCHW batches of the given image files, through the shared preprocessing."""
    for i in range(0, len(paths), batch_size):
        yield images.normalize(images.load_batch(paths[i : i + batch_size], size), mean, std)


def scores(y_true: np.ndarray, y_pred: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1, keyed '<prefix>_<metric>'."""
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        f"{prefix}_accuracy": float(accuracy_score(y_true, y_pred)),
        f"{prefix}_macro_precision": float(p),
        f"{prefix}_macro_recall": float(r),
        f"{prefix}_macro_f1": float(f1),
        f"{prefix}_images": int(len(y_true)),
    }


def _plot_history(history: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history) as fh:
        rows = list(csv.DictReader(fh))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train loss")
    ax1.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", label="val loss")
    best = min(rows, key=lambda r: float(r["val_loss"]))
    ax1.axvline(int(best["epoch"]), color="grey", ls="--", label=f"best epoch ({best['epoch']})")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [float(r["val_accuracy"]) for r in rows], "o-", label="val accuracy")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_confusion(cm: np.ndarray, class_names: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 30:
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title("test confusion matrix (colour: row-normalized)")
    fig.tight_layout()
    path = out / "confusion_matrix.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(cfg: EvaluateConfig, prepared: Path, checkpoint: Path, out: Path) -> EvaluateResult:
    """Score the checkpoint on the test split; write metrics.json, predictions.csv and plots."""
    out.mkdir(parents=True, exist_ok=True)
    model, meta = models.load_checkpoint(checkpoint)
    prep = models.preprocessing_of(meta)
    class_names = meta["class_names"]
    index = {name: i for i, name in enumerate(class_names)}
    frame = manifest.read(prepared / "manifest.csv")
    test = frame[frame["split"] == "test"]
    if test.empty:
        raise VisiontuneError(
            f"{prepared / 'manifest.csv'}: the test split is empty; raise data.test_fraction"
        )
    unknown = sorted(set(test["label"]) - set(index))
    if unknown:
        raise VisiontuneError(
            f"test labels {unknown} are not classes of the checkpoint {checkpoint}; retrain"
        )
    paths = test["path"].tolist()
    logits = models.predict_logits(model, batches(paths, prep.size, prep.mean, prep.std, cfg.batch_size))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y_true = test["label"].map(index).to_numpy()
    y_pred = probs.argmax(1)
    metrics = scores(y_true, y_pred, "test")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "predicted", "confidence"])
        for path, t, p, conf in zip(paths, y_true, y_pred, probs.max(1), strict=True):
            writer.writerow([path, class_names[t], class_names[p], f"{conf:.6f}"])
    cm = confusion_matrix(y_true, y_pred, labels=range(len(class_names)))
    plots = [_plot_confusion(cm, class_names, out)]
    if (checkpoint / "history.csv").exists():
        plots.append(_plot_history(checkpoint / "history.csv", out))
    return EvaluateResult(
        metrics=metrics, metrics_path=str(out / "metrics.json"), plots=[str(p) for p in plots]
    )
