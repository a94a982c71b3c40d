"""Scheduled runs on workers: a real `prefect server start` and real `prefect worker start` processes.

prefect.yaml is deployed to a process work pool with two workers; two runs triggered at once
through the API run one at a time (the deployment's concurrency limit holds across workers), both
finish Completed, and the model version is in the registry.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import _free_port, _start_group, _stop_group, deploy_prefect_yaml, tiny_params, write_digits

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server with its own database, on 127.0.0.1: (API URL, environment for clients)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = _start_group(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home, env, home / "server.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    home / "server.log"
                ).read_text()
                time.sleep(0.5)
        yield (
            url,
            {
                **env,
                "PREFECT_API_URL": url,
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                "PREFECT_LOGGING_TO_API_ENABLED": "false",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            },
        )
    finally:
        _stop_group(server)


def test_two_workers_run_a_deployment_one_run_at_a_time(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    project = tmp_path
    data = write_digits(project / "raw")
    params = tiny_params(data, validate={"label_audit": False})  # the audit's cost is not under test here
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    deploy_prefect_yaml(project, env)
    prefect = str(BIN / "prefect")

    workers = [
        _start_group(
            [prefect, "worker", "start", "--pool", "visiontune"], project, env, project / f"worker{i}.log"
        )
        for i in range(2)
    ]
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            runs = [run_deployment("training-pipeline/nightly-retrain", timeout=0) for _ in range(2)]
            ids = [run.id for run in runs]
            both_running, waited, deadline = False, False, time.monotonic() + 600
            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    states = [client.read_flow_run(i).state for i in ids]
                    if all(s.is_final() for s in states):
                        break
                    both_running |= all(s.is_running() for s in states)
                    waited |= any(s.name == "AwaitingConcurrencySlot" for s in states)
                    time.sleep(0.5)
                states = [client.read_flow_run(i).state for i in ids]
    finally:
        for worker in workers:
            _stop_group(worker)
    logs = "\n".join((project / f"worker{i}.log").read_text()[-2000:] for i in range(2))
    assert all(s.is_completed() for s in states), f"{states}\n{logs}"
    assert not both_running and waited  # the deployment's limit of 1 held across the two workers
    version = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version(
        "visiontune-classifier", "1"
    )
    assert version.tags["dvc_data_hash"].endswith(".dir")
