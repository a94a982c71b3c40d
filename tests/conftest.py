"""Shared fixtures: tiny real image data (scanned digits) and one tiny trained run per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.components.config import Params

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


def write_digits(root: Path, classes=(0, 1, 2), per_class: int = 20, start: int = 0) -> Path:
    """A <root>/<class>/<n>.png folder of real scanned digits from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in classes:
        picks = np.flatnonzero(digits.target == label)[start : start + per_class]
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in picks:
            ink = 255 - np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(ink, mode="L").save(folder / f"{i:04d}.png")
    return root


def tiny_params(source: Path | str, **sections) -> Params:
    """Params for seconds-long runs: 32 px, 1 epoch, a quarter of each class in val and test."""
    raw = {
        "data": {"source": str(source), "val_fraction": 0.25, "test_fraction": 0.25},
        "validate": {"min_per_class": 3},
        "model": {"image_size": 32},
        "train": {"epochs": 1, "batch_size": 16},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Params.model_validate(raw)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A prepared, validated and trained tiny run: (params, layout)."""
    from visiontune.pipelines import stages

    root = tmp_path_factory.mktemp("tiny")
    data = write_digits(root / "raw")
    params = tiny_params(data)
    layout = stages.Layout(root / "prepared")
    for name in ("prepare", "validate", "train"):
        stages.STAGES[name](params, layout)
    return params, layout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _mlflow_server(root: Path, backend: str, artifacts: str, workers: int = 1, env: dict | None = None):
    """`mlflow server` on 127.0.0.1 with proxied artifacts, in its own process group: yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--serve-artifacts",
         "--workers", str(workers)],
        env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
        start_new_session=True,  # its job workers outlive a plain SIGTERM to the server PID
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", proc, root / "server.log", f"mlflow server ({backend.split(':')[0]})")
        yield url
    finally:
        _stop_group(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server with a SQL backend and proxied artifacts, bound to loopback."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with _mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")) as url:
        yield url


@pytest.fixture(scope="session")
def exported(trained):
    """The tiny run evaluated and exported as well: what register and promote need."""
    from visiontune.pipelines import stages

    params, layout = trained
    stages.evaluate(params, layout)
    stages.export(params, layout)
    return params, layout


@pytest.fixture(scope="session")
def well_trained(tmp_path_factory):
    """A good model for decisions that need one: a 6-epoch linear probe on the tiny digits
    (test accuracy 1.0 here), evaluated and exported: (params, layout). Without flips: `auto` turns
    them on for 0, 1 and 2 (each stays itself when mirrored), and then one of 15 test digits is wrong."""
    from visiontune.pipelines import stages

    root = tmp_path_factory.mktemp("good")
    train = {"method": "linear", "epochs": 6, "hflip": False}
    params = tiny_params(write_digits(root / "raw"), train=train)
    layout = stages.Layout(root / "prepared")
    for name in ("prepare", "validate", "train", "evaluate", "export"):
        stages.STAGES[name](params, layout)
    return params, layout


@pytest.fixture(scope="session")
def imagenet_exported(tmp_path_factory):
    """A model whose mean and std differ per channel (ResNet-18 with ImageNet normalization, random
    weights, 1 epoch), evaluated and exported: with Lite0 (mean = std = 0.5) a swapped mean and std
    is invisible. (params, layout)."""
    from visiontune.pipelines import stages

    root = tmp_path_factory.mktemp("imagenet")
    params = tiny_params(
        write_digits(root / "raw"),
        model={"name": "resnet18", "pretrained": False},
        validate={"label_audit": False},  # the audit would judge random features
    )
    layout = stages.Layout(root / "prepared")
    for name in ("prepare", "validate", "train", "evaluate", "export"):
        stages.STAGES[name](params, layout)
    return params, layout


@pytest.fixture(scope="session")
def damaged(well_trained, tmp_path_factory):
    """A worse model by construction: a copy of `well_trained` whose classifier rows are rotated by
    one class (every prediction moves to the next class), evaluated and exported again:
    (params, layout). Same data, same manifest, different answers."""
    import shutil

    from safetensors.torch import load_file, save_file

    from visiontune.pipelines import stages

    params, layout = well_trained
    copy = stages.Layout(tmp_path_factory.mktemp("damaged") / "prepared")
    shutil.copytree(layout.root, copy.root)
    weights = copy.train / "model.safetensors"
    tensors = load_file(weights)
    for key in ("fc.weight", "fc.bias"):  # the probe's head
        tensors[key] = tensors[key].roll(1, dims=0).contiguous()
    save_file(tensors, weights)
    stages.evaluate(params, copy)
    stages.export(params, copy)
    return params, copy


# --- beyond one machine: an S3 endpoint, PostgreSQL and a team MLflow server on 127.0.0.1 ---

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, tries: int = 240) -> None:
    for _ in range(tries):  # 0.25 s apart: a minute at most
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:  # it answers, even if not with 200 for this path
            return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group a fixture started (start_new_session), then reap the leader
    (SIGKILL to the group if it has not exited in 30 s)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:  # it already exited (and its group with it)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _start_group(command: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A server or worker in its own process group, its output in `log`; stop it with _stop_group."""
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 (S3 over HTTP, in memory): its endpoint URL."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/moto-api/", proc, log, "moto_server")
        yield url
    finally:
        _stop_group(proc)


def _postgres_bin() -> Path | None:
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (initdb + pg_ctl in a temporary folder, 127.0.0.1, password auth):
    a SQLAlchemy URI of its empty `mlflow` database. Run as the `postgres` user when we are root."""
    import pwd
    import shutil
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")  # created by Debian's postgresql-common
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="visiontune-pg-"))  # not under pytest's 0700 root folder
    if as_user:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    user, password, port = "visiontune", "test-secret", _free_port()
    pwfile = root / "pw"
    pwfile.write_text(password)
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)

    def pg(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=60)

    data = root / "data"
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
           "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off")  # fmt: skip
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode()[-2000:]}") from None
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
            cur.execute("CREATE DATABASE mlflow_script")  # a second, empty one for the infra script
        conn.close()
        # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not psycopg2
        yield f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def team_mlflow_server(tmp_path_factory, postgres, s3_endpoint):
    """A real tracking server as a team runs it: PostgreSQL backend store, artifacts proxied
    (--serve-artifacts) into an S3 bucket on the moto endpoint, bound to loopback, 2 workers."""
    s3_client(s3_endpoint).create_bucket(Bucket="team-mlflow")
    root = tmp_path_factory.mktemp("team-mlflow")
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    with _mlflow_server(root, postgres, "s3://team-mlflow/artifacts", workers=2, env=env) as url:
        yield url


def deploy_prefect_yaml(project: Path, env: dict) -> None:
    """The project's prefect.yaml deployed as a user does it: a process work pool, `prefect deploy --all`."""
    import shutil

    shutil.copy(Path(__file__).resolve().parents[1] / "prefect.yaml", project / "prefect.yaml")
    prefect = str(Path(sys.executable).with_name("prefect"))
    for args in (
        ["work-pool", "create", "visiontune", "--type", "process"],
        ["--no-prompt", "deploy", "--all"],
    ):
        done = subprocess.run([prefect, *args], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


# --- where a test can run: markers the collection hook turns into skips (pyproject lists them) ---

SERVER_FIXTURES = {"mlflow_server", "team_mlflow_server", "postgres", "s3_endpoint"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA, `cpu_only` tests skip with it; a test that starts a server
    fixture (tracking server, PostgreSQL, S3) is marked `server`, so `-m "not server"` leaves it out."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("server")
    placed = [item for item in items if item.get_closest_marker("gpu") or item.get_closest_marker("cpu_only")]
    if not placed:  # torch is imported only when a collected test asks where it runs
        return
    import torch

    cuda = torch.cuda.is_available()
    for item in placed:
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False"))
        elif (why := item.get_closest_marker("cpu_only")) and cuda:
            reason = why.kwargs.get("reason") or (why.args[0] if why.args else "expects training on the CPU")
            item.add_marker(pytest.mark.skip(reason=f"CUDA is available: {reason}"))
