"""Evaluation figures as PNG files: curves, confusion matrix, per-class F1, reliability, mistakes.

Imported by evaluate; runs nothing. Matplotlib's Agg backend is chosen when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import images


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, top: float = 1.0) -> Path:
    fig.tight_layout(rect=(0, 0, 1, top))  # top < 1 leaves room for a suptitle
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def curves(history: list[dict], best_epoch: int, overfit_epoch: int | None, out: Path) -> Path:
    """Train/val loss and val accuracy per epoch; the best epoch and the overfitting point marked."""
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [float(r["train_loss"]) for r in history], "o-", label="train loss")
    ax1.plot(epochs, [float(r["val_loss"]) for r in history], "o-", label="val loss")
    for ax in (ax1, ax2):
        ax.axvline(best_epoch, color="green", ls="--", label=f"best epoch ({best_epoch})")
        if overfit_epoch is not None:
            ax.axvline(overfit_epoch, color="red", ls=":", label=f"overfitting from {overfit_epoch}")
        ax.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy (no smoothing)")
    ax1.legend()
    ax2.plot(epochs, [float(r["val_accuracy"]) for r in history], "o-", label="val accuracy")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    return _save(fig, out / "loss_curves.png")


def confusion_matrix(cm: np.ndarray, class_names: list[str], out: Path) -> Path:
    """Row-normalized confusion matrix with class names (counts written when there are few classes)."""
    plt = _pyplot()
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
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, str(v), ha="center", va="center", color=color, fontsize=8)
    ax.set_title("test confusion matrix (colour: share of the true class)")
    return _save(fig, out / "confusion_matrix.png")


def per_class_f1(per_class: dict[str, dict], out: Path) -> Path:
    """F1 of each class, worst first."""
    plt = _pyplot()
    items = sorted(per_class.items(), key=lambda kv: kv[1]["f1"])
    fig, ax = plt.subplots(figsize=(6, max(3.0, 0.28 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v["f1"] for _, v in items], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (test)")
    ax.set_title("per-class F1, worst first")
    return _save(fig, out / "per_class_f1.png")


def reliability_diagram(bins: list[dict], ece: float, out: Path) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    filled = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (test), ECE {ece:.4f}")
    ax.legend(loc="upper left")
    return _save(fig, out / "reliability.png")


SUPTITLE_CHARS_PER_INCH = 12  # characters of a 10 pt suptitle that fit in an inch of figure width
SUPTITLE_LINE = 0.17  # inch: the height of one suptitle line


def image_grid(paths: list[str], titles: list[str], suptitle: str, path: Path) -> Path:
    """Images in a grid of up to six columns, each with its title; the suptitle is wrapped to the
    figure's width (a grid of one or two images is narrower than most suptitles)."""
    import textwrap

    plt = _pyplot()
    cols = min(6, len(paths))
    rows = -(-len(paths) // cols)
    lines = textwrap.wrap(suptitle, width=int(SUPTITLE_CHARS_PER_INCH * 2.2 * cols)) or [""]
    height = 2.5 * rows + SUPTITLE_LINE * (len(lines) - 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, paths, titles, strict=False):
        ax.imshow(images.resize(images.load_image(image), 128))
        ax.set_title(title, fontsize=8)
    fig.suptitle("\n".join(lines), fontsize=10)
    return _save(fig, path, top=1 - (0.18 + SUPTITLE_LINE * len(lines)) / height)  # room for the suptitle


def mistakes_gallery(mistakes: list[dict], out: Path, limit: int = 24) -> Path | None:
    """Misclassified test images, most confident mistakes first: true label, prediction, confidence."""
    if not mistakes:
        return None
    shown = mistakes[:limit]
    titles = [f"true {m['label']}\npred {m['predicted']} ({m['confidence']:.2f})" for m in shown]
    suptitle = "misclassified test images, most confident first"
    return image_grid([m["path"] for m in shown], titles, suptitle, out / "mistakes.png")
