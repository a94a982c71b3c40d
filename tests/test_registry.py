"""Promotion and rollback through aliases and stages, and a tracking server that is down,
against a real `mlflow server` on 127.0.0.1."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import _free_port
from visiontune.components.errors import VisiontuneError
from visiontune.components.tracking import promote, rollback
from visiontune.pipelines import stages


def _named(params, name, **register):
    cfg = params.register_.model_copy(update={"model_name": name, **register})
    return params.model_copy(update={"register_": cfg})


def test_promote_refuse_promote_then_rollback(exported, mlflow_server, monkeypatch, tmp_path):
    params, layout = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "promo")
    client = MlflowClient(mlflow_server)

    v1 = stages.register(p, layout).version
    first = promote(p.register_, layout.prepare)
    assert first.promoted and first.reason == "no champion yet"
    assert client.get_model_version_by_alias("promo", "champion").version == v1

    v2 = stages.register(p, layout).version
    strict = _named(params, "promo", min_improvement=0.01).register_
    refused = promote(strict, layout.prepare)
    assert not refused.promoted and "does not beat champion v1" in refused.reason
    assert client.get_model_version_by_alias("promo", "champion").version == v1
    tags = client.get_model_version("promo", v2).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion_before"] == v1

    second = promote(p.register_, layout.prepare)
    assert second.promoted and second.champion_before == v1
    assert client.get_model_version_by_alias("promo", "champion").version == v2
    assert client.get_model_version_by_alias("promo", "previous").version == v1
    assert client.get_model_version("promo", v2).current_stage == "Production"
    assert client.get_model_version("promo", v1).current_stage == "Archived"

    back = rollback(p.register_)
    assert back == {"model_name": "promo", "champion": v1, "demoted": v2}
    assert client.get_model_version_by_alias("promo", "champion").version == v1
    assert client.get_model_version("promo", v1).current_stage == "Production"
    with pytest.raises(VisiontuneError, match="nothing to roll back to"):
        rollback(p.register_)


def test_floors_refuse_and_other_data_is_re_evaluated(exported, mlflow_server, monkeypatch):
    params, layout = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "floors")
    client = MlflowClient(mlflow_server)
    stages.register(p, layout)
    floor = _named(params, "floors", min_metrics={"test_accuracy": 1.01}).register_
    refused = promote(floor, layout.prepare)
    assert not refused.promoted and "below register.min_metrics" in refused.reason

    assert promote(p.register_, layout.prepare).promoted  # v1 becomes champion
    client.set_model_version_tag("floors", "1", "manifest_sha256", "0" * 64)  # tested on other data
    stages.register(p, layout)
    result = promote(p.register_, layout.prepare)
    assert result.compared_on == "re-evaluated on the candidate's test set"
    assert result.champion_value == pytest.approx(result.candidate_value)  # the same weights
    assert result.promoted


def test_auto_promote_in_the_register_stage(exported, mlflow_server, monkeypatch):
    params, layout = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "auto", auto_promote=True)
    version = stages.register(p, layout).version
    assert MlflowClient(mlflow_server).get_model_version_by_alias("auto", "champion").version == version


def test_server_down_names_the_uri_keeps_artifacts_and_register_reruns(exported, mlflow_server, monkeypatch):
    params, layout = exported
    down = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    p = _named(params, "later")
    with pytest.raises(VisiontuneError) as err:
        stages.register(p, layout)
    assert down in str(err.value) and "make mlflow-server" in str(err.value)
    assert (layout.export / "model.onnx").exists() and (layout.train / "model.safetensors").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = stages.register(p, layout)  # rerun later: the same artifacts are logged
    assert result.version == "1"
    assert json.loads((layout.register / "registration.json").read_text())["model_name"] == "later"


def test_promote_command_exit_code_tells_promotion_from_refusal(
    exported, mlflow_server, monkeypatch, tmp_path
):
    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    params, layout = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "exitcodes")
    stages.register(p, layout)
    (tmp_path / "params.yaml").write_text(json.dumps(p.model_dump(by_alias=True)))  # JSON is YAML
    args = ["promote", "--params", str(tmp_path / "params.yaml"), "--root", str(layout.root)]
    promoted = CliRunner().invoke(app, args)
    assert promoted.exit_code == 0, promoted.output
    assert json.loads(promoted.output[: promoted.output.rindex("}") + 1])["promoted"] is True
    refused = CliRunner().invoke(app, [*args, "--set", "register.min_improvement=0.5"])
    assert refused.exit_code == 2 and "not promoted" in refused.output
