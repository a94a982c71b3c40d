"""Promotion and rollback through aliases and stages, and a tracking server that is down,
against a real `mlflow server` on 127.0.0.1."""

import hashlib
import http.client
import json
import math
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import _free_port
from visiontune.components.errors import VisiontuneError
from visiontune.components.tracking import promote, rollback
from visiontune.pipelines import stages


def _named(params, name, **register):
    cfg = params.register_.model_copy(update={"model_name": name, **register})
    return params.model_copy(update={"register_": cfg})


def test_promote_refuse_promote_then_rollback(well_trained, damaged, mlflow_server, monkeypatch):
    (params, good), (_, bad) = well_trained, damaged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "promo")
    client = MlflowClient(mlflow_server)

    v1 = stages.register(p, bad).version
    first = promote(p.register_, bad.prepare)
    assert first.promoted and first.reason == "no champion yet"
    assert client.get_model_version_by_alias("promo", "champion").version == v1

    v2 = stages.register(p, good).version
    strict = _named(params, "promo", min_improvement=2.0).register_  # more than accuracy can gain
    refused = promote(strict, good.prepare)
    assert not refused.promoted and "does not beat champion v1" in refused.reason
    assert client.get_model_version_by_alias("promo", "champion").version == v1
    tags = client.get_model_version("promo", v2).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion_before"] == v1

    second = promote(p.register_, good.prepare)
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


def test_an_exact_tie_keeps_the_champion(well_trained, mlflow_server, monkeypatch):
    """A challenger must win: the same model registered again scores the same and is refused."""
    params, good = well_trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "tie")
    v1 = stages.register(p, good).version
    assert promote(p.register_, good.prepare).promoted
    stages.register(p, good)
    tie = promote(p.register_, good.prepare)
    assert not tie.promoted and tie.candidate_value == tie.champion_value
    assert tie.reason.endswith("a tie keeps the champion"), tie.reason
    assert MlflowClient(mlflow_server).get_model_version_by_alias("tie", "champion").version == v1


def _rotate_class_names(onnx_path) -> None:
    """The exported model with its class names shifted by one in the metadata: the same weights
    and the same logged metrics, but every answer named as the next class."""
    import onnx

    model = onnx.load(str(onnx_path))
    for prop in model.metadata_props:
        if prop.key == "class_names":
            names = json.loads(prop.value)
            prop.value = json.dumps(names[1:] + names[:1])
    onnx.save(model, str(onnx_path))


def test_an_artifact_that_does_not_score_what_was_logged_is_refused(
    well_trained, mlflow_server, monkeypatch, tmp_path
):
    """Before, a version whose ONNX class order was rotated was promoted on its logged metrics
    ("1.0000 vs 1.0000"); re-scored, it gets every test image wrong, and promote refuses."""
    import shutil

    params, good = well_trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    rotated = stages.Layout(tmp_path / "prepared")
    shutil.copytree(good.root, rotated.root)
    _rotate_class_names(rotated.export / "model.onnx")
    p = _named(params, "integrity")
    client = MlflowClient(mlflow_server)
    v1 = stages.register(p, good).version
    assert promote(p.register_, good.prepare).promoted
    v2 = stages.register(p, rotated).version
    logged = _logged(client, "integrity", v2)
    with pytest.raises(VisiontuneError, match=rf"v{v2}: its registered model.onnx does not score") as caught:
        promote(p.register_, rotated.prepare)
    assert f"test_accuracy logged {logged:.4f}, re-scored 0.0000" in str(caught.value)
    assert client.get_model_version_by_alias("integrity", "champion").version == v1
    tags = client.get_model_version("integrity", v2).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.reason"].startswith("integrity: ")


def _accuracy(layout) -> float:
    return json.loads((layout.evaluate / "metrics.json").read_text())["test_accuracy"]


def _logged(client, name: str, version: str, metric: str = "test_accuracy") -> float:
    return client.get_run(client.get_model_version(name, version).run_id).data.metrics[metric]


def test_the_better_version_is_promoted_in_either_order(well_trained, damaged, mlflow_server, monkeypatch):
    (params, good), (_, bad) = well_trained, damaged
    assert _accuracy(good) > _accuracy(bad) + 0.5  # worse by construction, not by chance
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)

    p = _named(params, "good-first")
    v1 = stages.register(p, good).version
    assert promote(p.register_, good.prepare).reason == "no champion yet"
    v2 = stages.register(p, bad).version
    refused = promote(p.register_, bad.prepare)
    assert not refused.promoted and f"does not beat champion v{v1}" in refused.reason
    assert (refused.candidate_value, refused.champion_value) == (_accuracy(bad), _accuracy(good))
    assert client.get_model_version_by_alias("good-first", "champion").version == v1
    tags = client.get_model_version("good-first", v2).tags
    assert tags["promotion.decision"] == "refused"
    manifest_bytes = (bad.prepare / "manifest.csv").read_bytes()
    assert tags["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()  # the real lineage

    p = _named(params, "bad-first")
    v1 = stages.register(p, bad).version
    assert promote(p.register_, bad.prepare).promoted  # the first version has no rival
    v2 = stages.register(p, good).version
    won = promote(p.register_, good.prepare)
    assert won.promoted and f"vs champion v{v1}" in won.reason
    assert won.compared_on.startswith("re-scored on the test split on disk")
    assert (won.candidate_value, won.champion_value) == (_accuracy(good), _accuracy(bad))
    assert client.get_model_version_by_alias("bad-first", "champion").version == v2
    assert client.get_model_version_by_alias("bad-first", "previous").version == v1


def test_floors_min_improvement_and_direction_bite_at_their_boundary(
    well_trained, damaged, mlflow_server, monkeypatch
):
    (params, good), (_, bad) = well_trained, damaged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    p = _named(params, "edges")
    stages.register(p, bad)
    assert promote(p.register_, bad.prepare).promoted
    v2 = stages.register(p, good).version

    def decide(**register):
        return promote(_named(params, "edges", **register).register_, good.prepare)

    scored = decide(min_improvement=2.0)  # refused: the re-scored values the rules are applied to
    ours, theirs = scored.candidate_value, scored.champion_value
    one_image = 1 / json.loads((good.evaluate / "metrics.json").read_text())["test_images"]
    assert abs(ours - _logged(client, "edges", v2)) <= one_image
    gap, above = ours - theirs, math.nextafter(ours - theirs, math.inf)

    floor_missed = decide(min_metrics={"test_accuracy": math.nextafter(ours, math.inf)})
    assert not floor_missed.promoted and "below register.min_metrics" in floor_missed.reason
    assert not decide(min_improvement=above).promoted  # a hair more than the gap: refused
    lower_is_better = decide(greater_is_better=False)  # read the other way, the better model is worse
    assert not lower_is_better.promoted and "does not beat champion v1" in lower_is_better.reason
    assert client.get_model_version_by_alias("edges", "champion").version == "1"  # nothing moved yet
    at_the_edge = decide(min_improvement=gap, min_metrics={"test_accuracy": ours})
    assert at_the_edge.promoted, at_the_edge.reason
    assert client.get_model_version_by_alias("edges", "champion").version == v2


def test_a_champion_scored_on_other_data_is_re_evaluated_and_that_decides(
    well_trained, damaged, mlflow_server, monkeypatch
):
    """The damaged champion claims test accuracy 1.0 on another manifest. On logged metrics the
    better candidate could not beat it by 0.01; scored on the candidate's test split it does."""
    (params, good), (_, bad) = well_trained, damaged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    p = _named(params, "other-data", min_improvement=0.01)
    v1 = stages.register(p, bad).version
    run_id = client.get_model_version("other-data", v1).run_id
    client.log_metric(run_id, "test_accuracy", 1.0, step=1)  # its score on the other data
    client.set_model_version_tag("other-data", v1, "manifest_sha256", "0" * 64)
    assert promote(p.register_, bad.prepare).promoted
    assert _logged(client, "other-data", v1) == 1.0

    v2 = stages.register(p, good).version
    result = promote(p.register_, good.prepare)
    assert result.compared_on.startswith("re-scored on the test split on disk")
    assert result.champion_value == pytest.approx(_accuracy(bad))  # its real score here, not 1.0
    assert result.candidate_value == pytest.approx(_accuracy(good))
    assert result.promoted and _logged(client, "other-data", v2) < 1.0 + 0.01
    assert client.get_model_version_by_alias("other-data", "champion").version == v2


class _FailingProxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of a real tracking server that answers 503 to the lookup of
    one alias, as a registry whose database is briefly locked would."""

    def __init__(self, upstream: str, failing_alias: str | None = None, failing_post: str | None = None):
        self.upstream, self.failing_alias, self.failed = urlsplit(upstream), failing_alias, 0
        self.failing_post = failing_post  # a path whose POSTs all get 503
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(BaseHTTPRequestHandler):
    def _forward(self):
        proxy: _FailingProxy = self.server
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        fail_post = proxy.failing_post and self.command == "POST" and url.path.endswith(proxy.failing_post)
        if fail_post or (
            url.path.endswith("/registered-models/alias") and query.get("alias") == proxy.failing_alias
        ):
            proxy.failed += 1
            body = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"})
            return self._reply(503, {"Content-Type": "application/json"}, body.encode())
        length = int(self.headers.get("Content-Length") or 0)
        conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, self.rfile.read(length) if length else None, headers)
        answer = conn.getresponse()
        skip = ("transfer-encoding", "connection", "content-length")
        self._reply(
            answer.status, {k: v for k, v in answer.getheaders() if k.lower() not in skip}, answer.read()
        )
        conn.close()

    def _reply(self, status: int, headers: dict, body: bytes):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

    def log_message(self, *args):  # quiet
        pass


@contextmanager
def _failing(upstream: str, monkeypatch, **failing):
    """MLFLOW_TRACKING_URI pointed at a _FailingProxy in front of `upstream` while the block runs (MLflow's
    retries without waiting): (the proxy, its URL)."""
    proxy = _FailingProxy(upstream, **failing)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    try:
        yield proxy, url
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_registry_error_during_promotion_is_an_error_and_moves_nothing(
    well_trained, damaged, mlflow_server, monkeypatch, tmp_path
):
    """Before, a failed champion lookup read as "no champion yet" and the worse candidate was
    promoted without a comparison."""
    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    (params, good), (_, bad) = well_trained, damaged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    p = _named(params, "guarded")
    v1 = stages.register(p, good).version
    assert promote(p.register_, good.prepare).promoted
    v2 = stages.register(p, bad).version

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a retry, then the error
    (tmp_path / "params.yaml").write_text(json.dumps(p.model_dump(by_alias=True)))
    with _failing(mlflow_server, monkeypatch, failing_alias="champion") as (proxy, url):
        out = CliRunner().invoke(
            app, ["promote", "--params", str(tmp_path / "params.yaml"), "--root", str(bad.root)]
        )
    assert out.exit_code == 1, out.output
    assert proxy.failed >= 1
    assert url in out.output and "get_model_version_by_alias('guarded', 'champion')" in out.output
    assert "nothing was changed" in out.output
    assert client.get_model_version_by_alias("guarded", "champion").version == v1
    assert "promotion.decision" not in client.get_model_version("guarded", v2).tags
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("guarded", "previous")


def test_a_registry_error_during_register_is_one_line_and_leaves_no_version(
    exported, mlflow_server, monkeypatch, tmp_path
):
    """A server answering 503 to the alias call: MLflow retries 4 times (not its default 7, 254 s),
    the half-registered version is deleted, and the command says so in one line naming the server."""
    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    params, layout = exported
    p = _named(params, "flaky")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # visiontune's bound applies
    (tmp_path / "params.yaml").write_text(json.dumps(p.model_dump(by_alias=True)))
    with _failing(mlflow_server, monkeypatch, failing_post="/registered-models/alias") as (proxy, url):
        out = CliRunner().invoke(
            app, ["register", "--params", str(tmp_path / "params.yaml"), "--root", str(layout.root)]
        )
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    (line,) = [ln for ln in out.output.splitlines() if ln.startswith("visiontune register:")]
    assert url in line and "nothing was registered" in line and "retry `visiontune register`" in line
    assert proxy.failed == 1 + 4  # the first try and visiontune's 4 retries
    assert MlflowClient(mlflow_server).search_model_versions("name = 'flaky'") == []


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
    assert json.loads(promoted.stdout[: promoted.stdout.rindex("}") + 1])["promoted"] is True
    refused = CliRunner().invoke(app, [*args, "--set", "register.min_improvement=0.5"])
    assert refused.exit_code == 2 and "not promoted" in refused.output
