"""evaluate: test metrics as flat JSON, predictions and plots."""

import csv
import json

from visiontune.components import manifest
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
    mistakes = [r for r in rows if r["label"] != r["predicted"]]
    section = html[html.index("Misclassified test images") :]
    positions = [section.index(m["path"]) for m in sorted(mistakes, key=lambda r: -float(r["confidence"]))]
    assert positions == sorted(positions)  # most confident mistakes first
