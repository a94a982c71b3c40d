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
    with open(layout.evaluate / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-9
    for png in ("confusion_matrix.png", "loss_curves.png"):
        assert (layout.evaluate / png).read_bytes()[:4] == b"\x89PNG"
