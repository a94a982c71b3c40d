"""The drift-check flow under Prefect's test harness: the report as an artifact, and retraining
started only when shift persists over drift.persist checks."""

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from visiontune.components import manifest


def _folders(layout, root: Path) -> tuple[Path, Path]:
    """(the test split's images, the same with noise of σ = 100/255)."""
    frame = manifest.read(layout.prepare / "manifest.csv")
    same, noisy = root / "same", root / "noisy"
    same.mkdir(parents=True)
    noisy.mkdir()
    rng = np.random.default_rng(0)
    for i, path in enumerate(frame.loc[frame["split"] == "test", "path"]):
        shutil.copy(path, same / f"{i:03d}.png")
        pixels = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=np.float64)
        Image.fromarray(np.clip(pixels + rng.normal(0, 100, pixels.shape), 0, 255).astype(np.uint8)).save(
            noisy / f"{i:03d}.png"
        )
    return same, noisy


def test_drift_check_publishes_its_report_and_retrains_only_when_shift_persists(exported, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from visiontune.pipelines.flow import drift_check, training_pipeline

    params, layout = exported
    same, noisy = _folders(layout, tmp_path)
    raw = params.model_dump(by_alias=True)
    raw["drift"] |= {"retrain": True, "persist": 2, "retrain_deployment": "training-pipeline/retrain-test"}
    (tmp_path / "params.yaml").write_text(json.dumps(raw))  # JSON is YAML
    onnx = str(layout.export / "model.onnx")
    args = {"model": onnx, "params_path": str(tmp_path / "params.yaml"), "out": str(tmp_path / "drift")}

    with prefect_test_harness(server_startup_timeout=120):
        deployment_id = training_pipeline.to_deployment(name="retrain-test").apply()
        first = drift_check(new_images=str(noisy), **args)
        assert first["drift"] and not first["persisted"] and first["retrain_flow_run"] is None
        calm = drift_check(new_images=str(same), **args)  # the streak is broken
        assert not calm["drift"] and calm["retrain_flow_run"] is None
        again = drift_check(new_images=str(noisy), **args)
        assert again["drift"] and again["retrain_flow_run"] is None  # one shifted check after a calm one
        persisted = drift_check(new_images=str(noisy), **args)
        assert persisted["persisted"] and persisted["retrain_flow_run"]
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(persisted["retrain_flow_run"])
            assert run.deployment_id == deployment_id
            reports = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drift-report"]))
            )
            assert reports and any("shift detected" in (a.data or "") for a in reports)
    history = json.loads((tmp_path / "drift" / "history.json").read_text())
    assert [h["drift"] for h in history] == [True, False, True, True]
