"""The Prefect flow runs the same stage functions and gives the same results as the stages."""

import json
import shutil
import time
from functools import partial

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from conftest import tiny_params, write_digits
from visiontune.pipelines import stages
from visiontune.pipelines.flow import training_pipeline


def write_params(folder, params, **sections) -> str:
    """params.yaml in folder, with some keys of some sections changed: its path."""
    raw = params.model_dump(by_alias=True)
    for section, values in sections.items():
        raw[section].update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.cpu_only(reason="two trainings agree to 1e-6 only with the CPU's deterministic kernels")
def test_flow_matches_the_stage_by_stage_run(trained, harness, tmp_path, monkeypatch):
    params, layout = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_path = write_params(tmp_path, params)
    out = training_pipeline(params_path=params_path, root=str(tmp_path / "prepared"))

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
    params_path = write_params(tmp_path, params, validate={"min_per_class": 10_000})
    state = training_pipeline(params_path=params_path, root=str(tmp_path / "p"), return_state=True)
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


def test_a_rerun_skips_unchanged_stages_and_reruns_what_changed(trained, harness, tmp_path, monkeypatch):
    """As `dvc repro`: same inputs → every stage cached; a changed section or lost output → reruns."""
    params, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_path = write_params(tmp_path, params)
    root = tmp_path / "prepared"
    first = training_pipeline(params_path=params_path, root=str(root))
    assert set(first["stages"].values()) == {"Completed"}
    model = root / "train" / "model.safetensors"
    written = model.stat().st_mtime_ns

    again = training_pipeline(params_path=params_path, root=str(root))
    assert set(again["stages"].values()) == {"Cached"}
    assert model.stat().st_mtime_ns == written  # not retrained
    assert again["metrics"] == first["metrics"] and again["version"] == first["version"] == "1"

    changed = training_pipeline(params_path=params_path, root=str(root), overrides={"evaluate.gallery": 2})
    ran = {name for name, state in changed["stages"].items() if state != "Cached"}
    assert ran == {"evaluate"}  # metrics.json is unchanged, so register (which reads it) is not rerun

    shutil.rmtree(root / "export")  # a lost output is rebuilt, whatever Prefect cached
    rebuilt = training_pipeline(params_path=params_path, root=str(root))
    assert rebuilt["stages"]["export"] == "Completed" and (root / "export" / "model.onnx").exists()
    assert all(rebuilt["stages"][name] == "Cached" for name in ("prepare", "validate", "train"))

    forced = training_pipeline(params_path=params_path, root=str(root), force=True)
    assert set(forced["stages"].values()) == {"Completed"} and forced["version"] == "2"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'another.db'}")
    moved = training_pipeline(params_path=params_path, root=str(root))
    ran = {name for name, state in moved["stages"].items() if state != "Cached"}
    assert ran == {"register"} and moved["version"] == "1"  # another tracking store: registered there too


def test_the_data_triggered_run_retrains_only_on_new_data(harness, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_digits(tmp_path / "raw")
    params_path = write_params(tmp_path, tiny_params(data))
    run = partial(training_pipeline, params_path=params_path, root="p", only_if_data_changed=True)

    assert run()["version"] == "1"  # nothing registered yet
    skipped = run()
    assert "skipped" in skipped and "v1" in skipped["skipped"]
    write_digits(data, per_class=3, start=40)  # new images arrive
    assert run()["version"] == "2"

    from mlflow.tracking import MlflowClient

    from visiontune.pipelines.dataversion import source_hash

    tags = MlflowClient("sqlite:///mlflow.db").get_model_version("visiontune-classifier", "2").tags
    assert tags["dvc_data_hash"] == source_hash(str(data)) and tags["dvc_data_hash"].endswith(".dir")


def test_a_stage_past_its_timeout_fails_the_flow(trained, harness, tmp_path, monkeypatch):
    """flow.timeout_minutes.<stage> reaches the task: a train stage that overruns fails the flow.

    The overrunning stage is a plain sleep loop: Prefect stops a sync task with SIGALRM, which a
    real training run can swallow when the signal lands in a garbage-collector callback.
    """
    params, _ = trained
    monkeypatch.chdir(tmp_path)

    def overrunning_train(params, layout, resume="auto"):
        for _ in range(6000):  # 60 s, if nothing stopped it
            time.sleep(0.01)

    monkeypatch.setitem(stages.STAGES, "train", overrunning_train)
    timeouts = {**params.flow.timeout_minutes.model_dump(by_alias=True), "train": 0.01}  # 0.6 s
    params_path = write_params(tmp_path, params, flow={"timeout_minutes": timeouts})
    started = time.monotonic()
    state = training_pipeline(params_path=params_path, root=str(tmp_path / "p"), return_state=True)
    assert state.is_failed() and time.monotonic() - started < 45
    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        state.result()
    assert (tmp_path / "p" / "validate" / "report.json").exists()  # the stages before it ran
    assert not (tmp_path / "p" / "evaluate").exists()


def test_registry_io_is_retried_and_the_outage_named(trained, harness, tmp_path, monkeypatch):
    """Register retries with backoff; training does not rerun; the error names the URI and the fix."""
    params, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    params_path = write_params(tmp_path, params, flow={"retries": 2, "retry_delay_s": 0.1})
    state = training_pipeline(params_path=params_path, root=str(tmp_path / "p"), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="127.0.0.1:9.*make mlflow-server"):
        state.result()
    assert (tmp_path / "p" / "export" / "model.onnx").exists()  # the artifacts stay for a later register

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    attempts = {run.name.rsplit("-", 1)[0]: run.run_count for run in runs}
    assert attempts["register"] == 3 and attempts["train"] == 1
