"""evaluate stage: val and test metrics (DVC metrics, flat JSON), plots, a gallery of mistakes
and one self-contained HTML report. Run as `visiontune evaluate` or called by the flow and tests.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import images, manifest, metrics, plots
from . import model as models
from .config import EvaluateConfig
from .errors import VisiontuneError


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    metrics_path: str
    report: str
    plots: list[str]
    classes_without_images: dict[str, list[str]] = field(default_factory=dict)  # split → class names


def batches(paths: list[str], size: int, mean, std, batch_size: int):
    """Normalized NCHW batches of the given image files, through the shared preprocessing."""
    for i in range(0, len(paths), batch_size):
        yield images.normalize(images.load_batch(paths[i : i + batch_size], size), mean, std)


def evaluate(
    cfg: EvaluateConfig, prepared: Path, checkpoint: Path, out: Path, validation: Path | None = None
) -> EvaluateResult:
    """Score the checkpoint on val and test; write out/metrics.json, and per-class and confusion
    JSON, predictions.csv, the plots and report.html to out/details.

    Averages run over the classes each split holds; the others are counted in metrics.json
    (`<split>_classes_without_images`), named in the result, and have null scores in per_class.json.
    """
    from .report import evaluation_html

    details = out / "details"
    details.mkdir(parents=True, exist_ok=True)
    model, meta = models.load_checkpoint(checkpoint)
    frame = _checked_manifest(prepared, checkpoint, meta["class_names"])
    flat, results, absent = _score_splits(cfg, model, meta, frame)
    (out / "metrics.json").write_text(json.dumps(flat, indent=2))
    scored, cm, mistakes = _test_details(results["test"], meta["class_names"], details)
    history = _history(checkpoint)
    figures = _figures(cfg, flat, scored, cm, mistakes, results["test"], history, meta, details)
    report_path = validation / "report.json" if validation else None
    validation_report = json.loads(report_path.read_text()) if report_path and report_path.exists() else None
    html = evaluation_html(flat, scored, figures, meta, validation_report, mistakes[: cfg.gallery], history)
    (details / "report.html").write_text(html)
    return EvaluateResult(
        metrics=flat,
        metrics_path=str(out / "metrics.json"),
        report=str(details / "report.html"),
        plots=[str(p) for p in figures.values()],
        classes_without_images=absent,
    )


def _checked_manifest(prepared: Path, checkpoint: Path, class_names: list[str]):
    """The prepared manifest, once it has a test split and no label the checkpoint lacks."""
    frame = manifest.read(prepared / "manifest.csv")
    if not (frame["split"] == "test").any():
        raise VisiontuneError(
            f"{prepared / 'manifest.csv'}: the test split is empty; raise data.test_fraction"
        )
    unknown = sorted(set(frame["label"]) - set(class_names))
    if unknown:
        raise VisiontuneError(f"labels {unknown} are not classes of the checkpoint {checkpoint}; retrain")
    return frame


def _score_splits(cfg: EvaluateConfig, model, meta: dict, frame) -> tuple[dict, dict, dict]:
    """(flat metrics of test and val, split → (paths, probabilities, true classes), split → classes
    without images) for the splits that hold images."""
    prep = models.preprocessing_of(meta)
    layout = models.inference_layout(model, prep.size)
    model.to(memory_format=layout)
    class_names = meta["class_names"]
    index = {name: i for i, name in enumerate(class_names)}
    flat: dict[str, float] = {}
    results, absent = {}, {}
    for split in ("test", "val"):
        rows = frame[frame["split"] == split]
        if rows.empty:
            continue
        paths = rows["path"].tolist()
        pixels = batches(paths, prep.size, prep.mean, prep.std, cfg.batch_size)
        logits = models.predict_logits(model, pixels, layout)
        probs, y_true = metrics.softmax(logits), rows["label"].map(index).to_numpy()
        flat |= metrics.summary(probs, y_true, split, cfg.top_k)
        results[split] = (paths, probs, y_true)
        absent[split] = metrics.without_images(y_true, class_names)
    return flat, results, absent


def _test_details(test: tuple, class_names: list[str], details: Path) -> tuple[dict, object, list[dict]]:
    """Write per_class.json, confusion.json and predictions.csv of the test split; return the
    classes with test images and their scores, the confusion matrix, and the mistakes, most
    confident first."""
    paths, probs, y_true = test
    per_class = metrics.per_class(probs, y_true, class_names)
    cm = metrics.confusion(probs, y_true, len(class_names))
    (details / "per_class.json").write_text(json.dumps(per_class, indent=2))
    scored = {name: c for name, c in per_class.items() if c["support"]}  # plots show no made-up scores
    (details / "confusion.json").write_text(json.dumps({"classes": class_names, "matrix": cm.tolist()}))
    predicted, confidence = probs.argmax(1), probs.max(1)
    with open(details / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "predicted", "confidence"])
        for path, t, p, c in zip(paths, y_true, predicted, confidence, strict=True):
            writer.writerow([path, class_names[t], class_names[p], f"{c:.6f}"])
    mistakes = sorted(
        (
            {"path": path, "label": class_names[t], "predicted": class_names[p], "confidence": float(c)}
            for path, t, p, c in zip(paths, y_true, predicted, confidence, strict=True)
            if t != p
        ),
        key=lambda m: -m["confidence"],
    )
    return scored, cm, mistakes


def _history(checkpoint: Path) -> list[dict]:
    """The training run's per-epoch rows (history.csv beside the checkpoint), or none."""
    history_path = checkpoint / "history.csv"
    if not history_path.exists():
        return []
    with open(history_path) as fh:
        return list(csv.DictReader(fh))


def _figures(
    cfg: EvaluateConfig,
    flat: dict,
    scored: dict,
    cm,
    mistakes: list[dict],
    test: tuple,
    history: list[dict],
    meta: dict,
    details: Path,
) -> dict[str, Path]:
    """The report's plots, written to details: confusion, per-class F1, reliability, the training
    curves (when there is a history) and the mistakes gallery (when evaluate.gallery asks)."""
    _, probs, y_true = test
    class_names = meta["class_names"]
    figures = {
        "confusion": plots.confusion_matrix(cm, class_names, details),
        "per_class_f1": plots.per_class_f1(scored, details),
        "reliability": plots.reliability_diagram(
            metrics.reliability(probs, y_true), flat["test_ece"], details
        ),
    }
    if history:
        overfit = metrics.overfitting_epoch(history)
        figures["curves"] = plots.curves(history, meta.get("best_epoch", 0), overfit, details)
    gallery = plots.mistakes_gallery(mistakes, details, cfg.gallery) if cfg.gallery else None
    if gallery:
        figures["mistakes"] = gallery
    return figures
