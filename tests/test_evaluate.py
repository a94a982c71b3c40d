"""evaluate: test metrics as flat JSON, predictions and plots."""

import csv
import json

import numpy as np
import pytest

from visiontune.components import manifest
from visiontune.components import metrics as metrics_
from visiontune.pipelines import stages


def test_metrics_predictions_and_plots(trained):
    params, layout = trained
    result = stages.evaluate(params, layout)
    metrics = json.loads((layout.evaluate / "metrics.json").read_text())
    assert metrics == result.metrics
    n_test = int((manifest.read(layout.prepare / "manifest.csv")["split"] == "test").sum())
    assert metrics["test_images"] == n_test
    for key in ("test_accuracy", "test_macro_precision", "test_macro_recall", "test_macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0
    with open(layout.evaluate / "details" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-9
    for png in ("confusion_matrix.png", "loss_curves.png", "per_class_f1.png", "reliability.png"):
        assert (layout.evaluate / "details" / png).read_bytes()[:4] == b"\x89PNG"
    for key in ("test_top3_accuracy", "test_weighted_f1", "test_ece", "val_accuracy", "val_macro_f1"):
        assert key in metrics
    per_class = json.loads((layout.evaluate / "details" / "per_class.json").read_text())
    assert set(per_class) == {"0", "1", "2"} and sum(c["support"] for c in per_class.values()) == n_test
    html = (layout.evaluate / "details" / "report.html").read_text()
    assert "Data validation" in html and "data:image/png;base64," in html and "Calibration" in html
    right = sum(r["label"] == r["predicted"] for r in rows)
    interval = metrics_.accuracy_interval(right, n_test)
    assert (metrics["test_accuracy_low"], metrics["test_accuracy_high"]) == interval
    assert f"Test accuracy <b>{metrics_.accuracy_text(metrics)}</b>" in html
    mistakes = [r for r in rows if r["label"] != r["predicted"]]
    section = html[html.index("Misclassified test images") :]
    positions = [section.index(m["path"]) for m in sorted(mistakes, key=lambda r: -float(r["confidence"]))]
    assert positions == sorted(positions)  # most confident mistakes first


def test_macro_scores_average_over_the_classes_the_split_holds():
    from sklearn.metrics import f1_score, precision_score

    from visiontune.components import metrics

    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 1, 3], size=60)  # class 2 has no images
    logits = rng.normal(size=(60, 4))
    logits[np.arange(60), y_true] += 1.5
    logits[:5, 2] += 9  # and a few images are called class 2 anyway
    probs = metrics.softmax(logits)
    y_pred = probs.argmax(1)
    flat = metrics.summary(probs, y_true, "test", top_k=2)
    present = [0, 1, 3]
    assert flat["test_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro"))
    assert flat["test_macro_precision"] == pytest.approx(
        precision_score(y_true, y_pred, labels=present, average="macro")
    )
    assert flat["test_macro_f1"] > f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro")
    assert flat["test_classes"] == 3 and flat["test_classes_without_images"] == 1
    names = ["a", "b", "c", "d"]
    assert metrics.without_images(y_true, names) == ["c"]
    per_class = metrics.per_class(probs, y_true, names)
    assert per_class["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert all(isinstance(per_class[n]["f1"], float) for n in "abd")


def test_a_class_without_test_images_is_listed_not_scored_zero(trained, tmp_path):
    from visiontune.components.evaluate import evaluate

    params, layout = trained
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    frame = manifest.read(layout.prepare / "manifest.csv")
    frame.loc[(frame["label"] == "2") & (frame["split"] == "test"), "split"] = "train"
    manifest.write(frame, prepared / "manifest.csv")
    result = evaluate(params.evaluate, prepared, layout.train, tmp_path / "evaluate")
    flat = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert flat["test_classes"] == 2 and flat["test_classes_without_images"] == 1
    assert flat["val_classes_without_images"] == 0
    assert result.classes_without_images == {"test": ["2"], "val": []}
    with open(tmp_path / "evaluate" / "details" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    labels = [r["label"] for r in rows]
    predicted = [r["predicted"] for r in rows]
    from sklearn.metrics import f1_score

    assert flat["test_macro_f1"] == pytest.approx(
        f1_score(labels, predicted, labels=["0", "1"], average="macro")
    )
    per_class = json.loads((tmp_path / "evaluate" / "details" / "per_class.json").read_text())
    assert per_class["2"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    html = (tmp_path / "evaluate" / "details" / "report.html").read_text()
    table = html[html.index("Per class (test") : html.index("<h2>Calibration")]
    assert "<td>2</td>" not in table  # no row of invented zeros


@pytest.mark.parametrize("count", [1, 2, 8])
def test_a_grid_of_few_images_keeps_its_whole_title_inside_the_figure(tmp_path, count):
    """A suptitle wider than a one- or two-image grid is wrapped, not cut at the figure's edges:
    the title's ink keeps off the outermost pixel columns."""
    from PIL import Image

    from visiontune.components import plots

    image = tmp_path / "x.png"
    Image.fromarray(np.full((28, 28), 40, np.uint8)).save(image)
    title = "Label audit: top suspects (probability that the given label is wrong)"
    out = plots.image_grid([str(image)] * count, ["t"] * count, title, tmp_path / "grid.png")
    pixels = np.asarray(Image.open(out).convert("L"))
    band = pixels[: int(0.08 * pixels.shape[0]) + 20]  # the suptitle's lines lie above the panels
    ink = np.flatnonzero((band < 128).any(axis=0))
    assert len(ink), "no title drawn"
    assert ink.min() >= 3 and ink.max() <= pixels.shape[1] - 4, (ink.min(), ink.max(), pixels.shape)
