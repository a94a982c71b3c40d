"""Classification metrics from class probabilities: the numbers evaluate reports. Runs nothing."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, row by row (shifted by the row max for stability)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy − confidence| over equal-width confidence bins of the top-1 class."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures fit_temperature searches


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    z = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T that calibrates softmax(logits / T) on these held-out labels.

    T minimizes their negative log-likelihood (temperature scaling, Guo et al. 2017). A T below 1
    sharpens the probabilities; it may do so only until the mean top-1 confidence reaches the
    rule-of-succession accuracy (correct + 1) / (n + 2): with few or no errors among the labels the
    likelihood keeps falling as T shrinks, which would make every prediction certain. 1.0 when
    there are no labels.
    """
    from scipy.optimize import brentq, minimize_scalar

    if not len(y):
        return 1.0
    logits = logits.astype(np.float64)
    low, high = np.log(TEMPERATURE_RANGE)
    best = minimize_scalar(lambda t: nll(logits / np.exp(t), y), bounds=(low, high), method="bounded").x
    ceiling = (int((logits.argmax(1) == y).sum()) + 1) / (len(y) + 2)

    def excess(t: float) -> float:  # mean confidence above the ceiling at temperature e^t
        return float(softmax(logits / np.exp(t)).max(1).mean()) - ceiling

    if best < 0 and excess(best) > 0:  # sharpened beyond the ceiling: back off, at most to T = 1
        best = brentq(excess, best, 0.0, xtol=1e-6) if excess(0.0) < 0 else 0.0
    return float(np.exp(best))


def accuracy_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of an accuracy of `correct` out of `n` (95 % at the default z).

    The range of true accuracies the observed one is consistent with: 266 of 269 is 0.9888 with
    0.9677–0.9962. It stays inside [0, 1] and is not empty at 0 or n correct, where the normal
    approximation fails; with no images it is the whole of [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(flat: dict, split: str = "test") -> str:
    """'0.9888 (95 % interval 0.9677–0.9962)' from flat metrics; the bare accuracy without bounds,
    'none' without an accuracy."""
    if f"{split}_accuracy" not in flat:
        return "none"
    accuracy = f"{flat[f'{split}_accuracy']:.4f}"
    if f"{split}_accuracy_low" not in flat:  # metrics written before the interval was recorded
        return accuracy
    low, high = flat[f"{split}_accuracy_low"], flat[f"{split}_accuracy_high"]
    return f"{accuracy} (95 % interval {low:.4f}–{high:.4f})"


def reliability(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and count (for the reliability diagram)."""
    confidence, correct = probs.max(1), probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        rows.append(
            {
                "low": float(lo),
                "high": float(hi),
                "count": int(inside.sum()),
                "confidence": float(confidence[inside].mean()) if inside.any() else None,
                "accuracy": float(correct[inside].mean()) if inside.any() else None,
            }
        )
    return rows


def summary(probs: np.ndarray, y_true: np.ndarray, split: str, top_k: int) -> dict[str, float]:
    """Flat metrics for one split, keyed '<split>_<metric>' (DVC metrics, MLflow).

    Macro and weighted averages run over the classes the split holds (a class without images
    has no recall to average); `<split>_classes_without_images` counts the others.
    `<split>_accuracy_low` and `_high` bound the accuracy's 95 % interval (accuracy_interval).
    """
    y_pred = probs.argmax(1)
    present = np.unique(y_true).tolist()
    correct = int((y_pred == y_true).sum())
    low, high = accuracy_interval(correct, len(y_true))
    out: dict[str, float] = {
        f"{split}_accuracy": correct / len(y_true),
        f"{split}_accuracy_low": low,
        f"{split}_accuracy_high": high,
        f"{split}_images": int(len(y_true)),
        f"{split}_classes": len(present),
        f"{split}_classes_without_images": probs.shape[1] - len(present),
    }
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # ties: lowest class first, as argmax
    out[f"{split}_top{k}_accuracy"] = float((top == y_true[:, None]).any(1).mean())
    for average in ("macro", "weighted"):
        p, r, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=present, average=average, zero_division=0
        )
        out |= {f"{split}_{average}_precision": float(p), f"{split}_{average}_recall": float(r)}
        out[f"{split}_{average}_f1"] = float(f1)
    out[f"{split}_ece"] = expected_calibration_error(probs, y_true)
    return out


def without_images(y_true: np.ndarray, class_names: list[str]) -> list[str]:
    """The classes no image of the split belongs to, in class order."""
    held = set(np.unique(y_true).tolist())
    return [name for i, name in enumerate(class_names) if i not in held]


def per_class(probs: np.ndarray, y_true: np.ndarray, class_names: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of every class; None for a class with no images (support 0)."""
    labels = list(range(len(class_names)))
    p, r, f1, support = precision_recall_fscore_support(
        y_true, probs.argmax(1), labels=labels, average=None, zero_division=0
    )
    return {
        name: {
            "precision": float(p[i]) if support[i] else None,
            "recall": float(r[i]) if support[i] else None,
            "f1": float(f1[i]) if support[i] else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }


def confusion(probs: np.ndarray, y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted."""
    return confusion_matrix(y_true, probs.argmax(1), labels=list(range(n_classes)))


def overfitting_epoch(history: list[dict]) -> int | None:
    """The first epoch after the best one where val loss rose while train loss fell, if any."""
    if not history:
        return None
    best = min(range(len(history)), key=lambda i: float(history[i]["val_loss"]))
    for i in range(max(1, best + 1), len(history)):
        rose = float(history[i]["val_loss"]) > float(history[i - 1]["val_loss"])
        fell = float(history[i]["train_loss"]) < float(history[i - 1]["train_loss"])
        if rose and fell:
            return int(history[i]["epoch"])
    return None
