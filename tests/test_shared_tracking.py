"""Shared tracking and registry: a real `mlflow server` on a real PostgreSQL (initdb/pg_ctl in a
temporary folder) with artifacts proxied into an S3 bucket on moto's server, all on 127.0.0.1.
Register, promote and rollback behave as on SQLite; two registrations at once both get whole
versions; infra/mlflow-team-server.sh starts the same kind of server."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from conftest import S3_ENV, _free_port, s3_client
from visiontune.components.errors import VisiontuneError
from visiontune.components.tracking import download_model, promote, rollback
from visiontune.pipelines import stages

ROOT = Path(__file__).resolve().parents[1]


def _named(params, name, **register):
    cfg = params.register_.model_copy(update={"model_name": name, **register})
    return params.model_copy(update={"register_": cfg})


@pytest.fixture
def client_env(team_mlflow_server, monkeypatch):
    """This process talks to the server only: no S3 credentials, artifacts go through its proxy."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_mlflow_server)
    for name in (*S3_ENV, "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return MlflowClient(team_mlflow_server)


def test_register_promote_refuse_and_rollback_as_on_sqlite(
    well_trained, damaged, client_env, s3_endpoint, tmp_path
):
    (params, good), (_, bad) = well_trained, damaged
    client = client_env
    p = _named(params, "team-promo")

    v1 = stages.register(p, bad).version
    assert v1 == "1"
    first = promote(p.register_, bad.prepare)
    assert first.promoted and first.reason == "no champion yet"
    assert client.get_model_version_by_alias("team-promo", "champion").version == v1

    v2 = stages.register(p, good).version
    assert v2 == "2"
    refused = promote(_named(params, "team-promo", min_improvement=2.0).register_, good.prepare)
    assert not refused.promoted and "does not beat champion v1" in refused.reason
    assert client.get_model_version("team-promo", v2).tags["promotion.decision"] == "refused"

    second = promote(p.register_, good.prepare)
    assert second.promoted and second.champion_before == v1
    assert client.get_model_version_by_alias("team-promo", "champion").version == v2
    assert client.get_model_version_by_alias("team-promo", "previous").version == v1
    assert client.get_model_version("team-promo", v2).current_stage == "Production"
    assert client.get_model_version("team-promo", v1).current_stage == "Archived"

    back = rollback(p.register_)
    assert back == {"model_name": "team-promo", "champion": v1, "demoted": v2}
    assert client.get_model_version_by_alias("team-promo", "champion").version == v1
    assert client.get_model_version("team-promo", v1).current_stage == "Production"
    with pytest.raises(VisiontuneError, match="nothing to roll back to"):
        rollback(p.register_)

    model = download_model("models:/team-promo@champion", tmp_path)  # through the server's proxy
    onnx.checker.check_model(onnx.load(str(model)))
    stored = s3_client(s3_endpoint).list_objects_v2(Bucket="team-mlflow", Prefix="artifacts/")
    keys = [o["Key"] for o in stored.get("Contents", [])]
    assert any(k.endswith("/model.onnx") for k in keys) and any("validation/report.json" in k for k in keys)


REGISTER_WHEN_TOLD = """
import pathlib, sys, time
from visiontune.components.config import load_params
from visiontune.pipelines import stages
params, root, go = load_params(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
(root / "ready").touch()
while not go.exists():  # every import done: both processes start registering within milliseconds
    time.sleep(0.002)
stages.register(params, stages.Layout(root))
"""


def test_two_pipeline_runs_registering_at_once_both_get_whole_versions(exported, client_env, tmp_path):
    params, layout = exported
    client = client_env
    p = _named(params, "team-race", experiment="team-race")  # a new experiment too: both create it
    (tmp_path / "params.yaml").write_text(json.dumps(p.model_dump(by_alias=True)))
    go = tmp_path / "go"
    env = {**os.environ}
    procs, roots = [], []
    for i in range(2):  # two pipeline runs, each with its own outputs folder and process
        root = tmp_path / f"run{i}"
        shutil.copytree(layout.root, root, ignore=shutil.ignore_patterns("cache", "register"))
        roots.append(root)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", REGISTER_WHEN_TOLD, str(tmp_path / "params.yaml"), str(root), str(go)],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for _ in range(1200):  # both have imported everything and wait on the go file
        if all((root / "ready").exists() for root in roots) or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]

    results = [json.loads((root / "register/registration.json").read_text()) for root in roots]
    assert sorted(r["version"] for r in results) == ["1", "2"]  # distinct numbers, none lost
    listed = client.search_model_versions("name = 'team-race'")
    assert sorted(v.version for v in listed) == ["1", "2"]  # and no extra, half-written one
    runs = [client.get_run(r["run_id"]) for r in results]
    assert runs[0].info.start_time < runs[1].info.end_time and runs[1].info.start_time < runs[0].info.end_time
    assert len(client.search_experiments(filter_string="name = 'team-race'")) == 1

    for result, run in zip(results, runs, strict=True):
        version = client.get_model_version("team-race", result["version"])
        assert version.status == "READY" and version.run_id == result["run_id"]
        assert run.info.status == "FINISHED"
        assert version.description.startswith("## ")  # the model card
        for tag in ("manifest_sha256", "dvc_data_hash", "git_commit", "test_accuracy", "model_name"):
            assert version.tags.get(tag), tag
        assert version.tags["manifest_sha256"] == run.data.tags["manifest_sha256"]
        model = download_model(f"models:/team-race/{result['version']}", tmp_path / f"v{result['version']}")
        onnx.checker.check_model(onnx.load(str(model)))
        names = {a.path for a in client.list_artifacts(result["run_id"])}
        assert {"checkpoint", "evaluation", "validation"} <= names
    assert client.get_model_version_by_alias("team-race", "candidate").version in {"1", "2"}


def test_an_experiment_another_run_creates_meanwhile_is_used_not_an_error(exported, client_env, monkeypatch):
    params, layout = exported
    client, lookup = client_env, MlflowClient.get_experiment_by_name
    looked = []

    def too_early(self, name):  # the other run creates it right after our first look
        looked.append(name)
        if len(looked) == 1:
            client.create_experiment(name)
            return None
        return lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", too_early)
    result = stages.register(_named(params, "team-meanwhile", experiment="team-meanwhile"), layout)
    assert result.experiment_id == lookup(client, "team-meanwhile").experiment_id and len(looked) >= 2


def _listening_on(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on port (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add("127.0.0.1" if address == "0100007F" else address)
    return found


def test_team_server_script_starts_on_postgres_and_s3_bound_to_loopback(
    postgres, s3_endpoint, tmp_path, monkeypatch
):
    script = ROOT / "infra" / "mlflow-team-server.sh"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "POSTGRES_"))}
    base.update(VISIONTUNE_ENV_FILE="/dev/null", MLFLOW=str(Path(sys.executable).with_name("mlflow")),
                PYTHON=sys.executable, MLFLOW_SERVER_DIR=str(tmp_path / "server"))  # fmt: skip
    unset = subprocess.run(["bash", str(script)], env=base, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and "MLFLOW_BACKEND_STORE_URI" in unset.stderr

    port, db = _free_port(), make_url(postgres)
    env = {  # the variables docker-compose reads from infra/.env, plus where the servers are
        **base,
        "POSTGRES_USER": db.username,
        "POSTGRES_PASSWORD": db.password,
        "POSTGRES_HOST": db.host,
        "POSTGRES_PORT": str(db.port),
        "POSTGRES_DB": "mlflow_script",  # a fresh database: the script's server creates the tables
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://team-mlflow/from-script",
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MINIO_ROOT_USER": S3_ENV["AWS_ACCESS_KEY_ID"],
        "MINIO_ROOT_PASSWORD": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": S3_ENV["AWS_DEFAULT_REGION"],
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    pidfile = tmp_path / "server" / "pid"
    try:
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in done.stdout
        assert "test-secret" not in done.stdout + done.stderr  # the database password is not echoed
        assert _listening_on(port) == {"127.0.0.1"}
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("script-check"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        stored = s3_client(s3_endpoint).list_objects_v2(Bucket="team-mlflow", Prefix="from-script/")
        assert [o["Key"] for o in stored["Contents"]][0].endswith("/note.txt")
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.killpg(pid, signal.SIGTERM)
            for _ in range(120):  # not our child (setsid in the script): wait until its group is gone
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.25)


# What PostgreSQL answered through the server when two registrations created one alias at once.
LOST_RACE = (
    "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "
    '"registered_model_alias_pk" DETAIL: Key (workspace, name, alias)=(default, alias-race, candidate) '
    "already exists."
)


class _LosesTheFirstRace:
    """A real client on the real server whose first alias call meets a rival that has just created
    the alias (set for real, on `rival`'s version) and answers as the server did in that race. The
    race itself lasts microseconds inside the server and cannot be forced from outside."""

    def __init__(self, client, rival: str):
        self.client, self.rival, self.calls = client, rival, 0

    def set_registered_model_alias(self, name, alias, version):
        self.calls += 1
        if self.calls == 1:
            self.client.set_registered_model_alias(name, alias, self.rival)
            raise RuntimeError(LOST_RACE)
        return self.client.set_registered_model_alias(name, alias, version)

    def __getattr__(self, method):
        return getattr(self.client, method)


def test_an_alias_race_lost_to_another_client_is_retried_and_the_newest_version_keeps_it(client_env):
    from visiontune.components.tracking import _first_alias_race, _set_alias

    client = client_env
    client.create_registered_model("alias-race")
    for _ in range(3):
        client.create_model_version("alias-race", "s3://team-mlflow/none", run_id=None)
    for text in (  # the same race as PostgreSQL, SQLite and MySQL word it
        LOST_RACE,
        "UNIQUE constraint failed: registered_model_aliases.name, registered_model_aliases.alias",
        "Duplicate entry 'm-candidate' for key 'registered_model_aliases.PRIMARY'",
    ):
        assert _first_alias_race(RuntimeError(text))
    assert not _first_alias_race(RuntimeError("BAD_REQUEST: version 9 does not exist"))

    older_lost = _LosesTheFirstRace(client, rival="3")
    _set_alias(older_lost, "alias-race", "candidate", "2", newest_wins=True)
    assert older_lost.calls == 1  # the rival's newer version keeps 'candidate'
    assert client.get_model_version_by_alias("alias-race", "candidate").version == "3"

    newer_lost = _LosesTheFirstRace(client, rival="1")
    _set_alias(newer_lost, "alias-race", "newest", "2", newest_wins=True)
    assert newer_lost.calls == 2  # retried, and the newer version takes it
    assert client.get_model_version_by_alias("alias-race", "newest").version == "2"

    champion = _LosesTheFirstRace(client, rival="3")
    _set_alias(champion, "alias-race", "champion", "1")  # no newest_wins: the caller's choice stands
    assert champion.calls == 2
    assert client.get_model_version_by_alias("alias-race", "champion").version == "1"

    other = _LosesTheFirstRace(client, rival="1")
    other.set_registered_model_alias = lambda *a: (_ for _ in ()).throw(RuntimeError("BAD_REQUEST: no"))
    with pytest.raises(RuntimeError, match="no"):  # any other error is not retried
        _set_alias(other, "alias-race", "x", "1")
