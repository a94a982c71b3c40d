"""Scheduled retraining: deployments with a schedule on a Prefect test server, run once each.

`visiontune schedule` (flow.serve, no work pool) and prefect.yaml (`prefect deploy` + a process
worker) each create a deployment against the test harness's server; `run_deployment` then runs
it in a real subprocess, as a scheduled run would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from conftest import _stop_group, deploy_prefect_yaml, tiny_params, write_digits

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _project(tmp_path: Path, epochs_in_params: int = 3) -> tuple[Path, dict]:
    """A project folder: a digits folder and a params.yaml that the deployment overrides."""
    data = write_digits(tmp_path / "raw")
    params = tiny_params(data, train={"epochs": epochs_in_params})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return tmp_path, env


def _env(env: dict, api_url: str) -> dict:
    return {
        **env,
        "PREFECT_API_URL": api_url,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    }


def _wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                return client.read_deployment_by_name(name)
            except Exception:
                time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared: {log.read_text()[-3000:]}")


def _check_run(flow_run, project: Path, log: Path) -> None:
    assert flow_run.state.is_completed(), f"{flow_run.state}: {log.read_text()[-3000:]}"
    train = json.loads((project / "data" / "prepared" / "train" / "train.json").read_text())
    assert train["epochs_run"] == 1  # the deployment's override beat params.yaml's 3 epochs
    registration = json.loads((project / "data" / "prepared" / "register" / "registration.json").read_text())
    assert registration["version"] == "1"


def test_visiontune_schedule_serves_a_cron_deployment_that_runs(api_url, tmp_path):
    from prefect.deployments import run_deployment

    project, env = _project(tmp_path)
    log = project / "schedule.log"
    proc = subprocess.Popen(
        [str(BIN / "visiontune"), "schedule", "--cron", "30 3 * * *", "--name", "nightly-test",
         "--set", "train.epochs=1"],
        cwd=project, env=_env(env, api_url), stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deployment = _wait_for_deployment("training-pipeline/nightly-test", proc, log)
        assert [s.schedule.cron for s in deployment.schedules] == ["30 3 * * *"]
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.parameters["overrides"] == {"train.epochs": 1}
        flow_run = run_deployment("training-pipeline/nightly-test", timeout=600, poll_interval=2)
        _check_run(flow_run, project, log)
    finally:
        _stop_group(proc)


def test_prefect_yaml_deploys_to_a_process_worker(api_url, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    project, env = _project(tmp_path)
    env = _env(env, api_url)
    deploy_prefect_yaml(project, env)
    prefect = str(BIN / "prefect")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("training-pipeline/nightly-retrain")
        on_data = client.read_deployment_by_name("training-pipeline/retrain-on-new-data")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.global_concurrency_limit.limit == 1 and on_data.global_concurrency_limit.limit == 1
    assert on_data.parameters["only_if_data_changed"] is True

    flow_run = run_deployment(
        "training-pipeline/nightly-retrain", parameters={"overrides": {"train.epochs": 1}}, timeout=0
    )
    log = project / "worker.log"
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "visiontune", "--run-once"],
        cwd=project, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        worker.wait(timeout=600)
    finally:
        _stop_group(worker)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run.id)
    _check_run(flow_run, project, log)
