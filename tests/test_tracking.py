"""register: one MLflow run per candidate, a registered ONNX version with its alias.

Runs against a real `mlflow server` subprocess on 127.0.0.1 and against the embedded store.
"""

from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from visiontune.components.export import onnx_logits
from visiontune.pipelines import stages


def _check_registered(uri: str, result, params, layout):
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.params["train.lr"] == ("null" if params.train.lr is None else str(params.train.lr))
    assert float(run.data.params["train.resolved_lr"]) == params.train.base_lr
    assert run.data.params["data.source"] == params.data.source
    assert run.data.tags["manifest_sha256"]
    assert "test_accuracy" in run.data.metrics and run.data.metrics["train_images_per_s"] > 0
    assert run.data.params["result.trainable_percent"] == "100.0"
    history = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in history] == [1]
    artifacts = {f.path for f in client.list_artifacts(result.run_id, "evaluation")}
    details = {f.path for f in client.list_artifacts(result.run_id, "evaluation/details")}
    assert {"evaluation/details/confusion_matrix.png", "evaluation/details/report.html"} <= details
    assert "evaluation/metrics.json" in artifacts
    checkpoint = {f.path for f in client.list_artifacts(result.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/checkpoint.json"} <= checkpoint
    assert {f.path for f in client.list_artifacts(result.run_id, "validation")} >= {
        "validation/report.json",
        "validation/report.md",
    }
    version = client.get_model_version_by_alias(result.model_name, "candidate")
    assert "**Data**" in version.description and "**Limitations**" in version.description
    assert run.data.tags["env.torch"] and run.inputs.dataset_inputs[0].dataset.name == "manifest"
    assert "environment.json" in {f.path for f in client.list_artifacts(result.run_id)}
    assert str(version.version) == result.version and version.run_id == result.run_id
    # the registered model is the exported model: same logits through onnxruntime
    local = mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, tracking_uri=uri)
    import onnx
    from mlflow.models import Model

    logged = Model.load(str(Path(local) / "MLmodel"))
    assert logged.signature is not None and logged.saved_input_example_info is not None
    registered_meta = {p.key: p.value for p in onnx.load(str(Path(local) / "model.onnx")).metadata_props}
    assert registered_meta["mlflow_run_id"] == result.run_id and len(registered_meta["data_sha256"]) == 64
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        onnx_logits(Path(local) / "model.onnx", [x]),
        onnx_logits(layout.export / "model.onnx", [x]),
        atol=1e-6,
    )


def test_register_against_a_real_tracking_server(exported, mlflow_server, monkeypatch, tmp_path):
    params, layout = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    first = stages.register(params, layout)
    second = stages.register(params, layout)  # a second candidate: a new version takes the alias
    assert first.tracking_uri == mlflow_server
    assert int(second.version) == int(first.version) + 1
    _check_registered(mlflow_server, second, params, layout)
    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    table = CliRunner().invoke(
        app, ["compare", first.run_id, f"models:/{second.model_name}/{second.version}"]
    )
    assert table.exit_code == 0, table.output
    line = next(x for x in table.output.splitlines() if x.startswith("test_accuracy "))
    assert line.split()[-1] == "+0.0000"  # the same candidate registered twice
    bad = CliRunner().invoke(app, ["compare", first.run_id, "models:/nope@champion"])
    assert bad.exit_code == 1 and "not found" in bad.output
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store


def test_register_to_the_embedded_store_by_default(exported, monkeypatch, tmp_path):
    params, layout = exported
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = stages.register(params, layout)
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()
    _check_registered(result.tracking_uri, result, params, layout)
    # predict straight from the registry gives what the exported file gives
    import json

    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    images = [str(p) for p in sorted(Path(params.data.source).rglob("*.png"))[:5]]
    runner = CliRunner()
    remote = runner.invoke(app, ["predict", *images, "--model", result.model_uri])
    local = runner.invoke(app, ["predict", *images, "--model", str(layout.export / "model.onnx")])
    assert remote.exit_code == 0, remote.output
    assert [r["label"] for r in json.loads(remote.output)] == [r["label"] for r in json.loads(local.output)]
    missing = runner.invoke(app, ["predict", *images, "--model", "models:/no-such-model@candidate"])
    assert missing.exit_code == 1 and "MLFLOW_TRACKING_URI" in missing.output
