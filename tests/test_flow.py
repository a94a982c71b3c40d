"""The Prefect flow runs the same stage functions and gives the same results as the stages."""

import json

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from visiontune.pipelines import stages
from visiontune.pipelines.flow import training_pipeline


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_matches_the_stage_by_stage_run(trained, harness, tmp_path, monkeypatch):
    params, layout = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    out = training_pipeline(params_path=str(params_path), root=str(tmp_path / "prepared"))

    direct = json.loads((layout.train / "train.json").read_text())
    assert out["train"].best_val_loss == pytest.approx(direct["best_val_loss"], abs=1e-6)
    assert out["metrics"] == stages.evaluate(params, layout).metrics
    manifest = (tmp_path / "prepared" / "prepare" / "manifest.csv").read_text()
    assert manifest == (layout.prepare / "manifest.csv").read_text()
    assert out["version"] == "1" and out["model_uri"].endswith("@candidate")
    assert (tmp_path / "prepared" / "export" / "model.onnx").exists()
    assert (tmp_path / "mlflow.db").exists()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-metrics"]))
        )
    assert any("| accuracy |" in (a.data or "") for a in found)


def test_failed_gate_fails_the_flow_with_its_message(trained, harness, tmp_path, monkeypatch):
    params, _ = trained
    monkeypatch.chdir(tmp_path)
    raw = params.model_dump(by_alias=True)
    raw["validate"]["min_per_class"] = 10_000
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    state = training_pipeline(params_path=str(params_path), root=str(tmp_path / "p"), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="min_per_class=10000"):
        state.result()
    assert not (tmp_path / "p" / "train").exists()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["validation-report"]))
        )
    assert any("min_per_class" in (a.data or "") for a in found)
