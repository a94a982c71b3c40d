"""The Prefect flow `training-pipeline`: the same stage functions as `dvc repro`, as tasks.

Run with `visiontune run` (ephemeral Prefect: no server needed) or import `training_pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from visiontune.components.config import Params, load_params

from . import caching, stages


def _cache_key(context, parameters: dict[str, Any]) -> str | None:
    """The key the flow computed for this stage (see caching.stage_key); None when caching is off."""
    return parameters["key"] if parameters["params"].flow.cache else None


def _stage_task(name: str):
    def run(params: Params, layout: stages.Layout, key: str):
        result = stages.STAGES[name](params, layout)
        caching.write_stamp(name, layout, key)
        return result

    run.__name__ = run.__qualname__ = name
    run.__doc__ = stages.STAGES[name].__doc__
    return task(run, name=name, cache_key_fn=_cache_key, persist_result=True)


STAGE_TASKS = {name: _stage_task(name) for name in stages.STAGES}
IO_STAGES = {"register"}  # talk to the tracking server: retried with backoff; training never is


def _run_stage(name: str, params: Params, layout: stages.Layout, force: bool, extra: str = ""):
    """Run one stage as a task, or take its cached result when its inputs are unchanged."""
    key = caching.stage_key(name, params, layout, extra)
    options: dict[str, Any] = {
        "timeout_seconds": params.flow.timeout_minutes.seconds(name),
        "result_storage": caching.results_folder(layout),
        # outputs deleted or rewritten since (e.g. by dvc repro): run again, whatever Prefect cached
        "refresh_cache": force or not caching.outputs_current(name, layout, key),
    }
    task_ = STAGE_TASKS[name].with_options(**options)
    if name in IO_STAGES:
        task_ = _io(task_, params)
    state = task_(params, layout, key, return_state=True)
    result = state.result()  # raises the stage's own error when it failed
    print(f"{name}: {'cached, inputs unchanged' if state.name == 'Cached' else 'ran'}")
    return result, state.name


def _run_link(registered) -> str:
    """The MLflow UI page of the registered run (its id, for a file or SQLite store)."""
    uri, run = registered.tracking_uri, registered.run_id
    if uri.startswith("http"):
        return f"[{run}]({uri.rstrip('/')}/#/experiments/{registered.experiment_id}/runs/{run}) on {uri}"
    return f"{run} in {uri}"


@task(name="publish-validation-report", cache_policy=NONE)
def publish_report(report: Path, run_link: str = "") -> None:
    """The validation report as a Prefect markdown artifact (with the MLflow run once registered)."""
    if report.exists():
        markdown = report.read_text()
        if run_link:
            markdown += f"\n\nMLflow run: {run_link}\n"
        create_markdown_artifact(
            key="validation-report", markdown=markdown, description="visiontune validate"
        )


@task(name="publish-evaluation", cache_policy=NONE)
def publish_evaluation(metrics: dict[str, float], report: str, registered) -> None:
    """Test and val metrics as a Prefect markdown artifact, with where the run and report are."""
    rows = sorted({k.split("_", 1)[1] for k in metrics})
    table = ["| metric | test | val |", "|---|---:|---:|"]
    for key in rows:
        test, val = metrics.get(f"test_{key}"), metrics.get(f"val_{key}")
        table.append(
            f"| {key} | {'' if test is None else f'{test:.4f}'} | {'' if val is None else f'{val:.4f}'} |"
        )
    markdown = "\n".join(
        ["# Evaluation", "", *table, "", f"MLflow run: {_run_link(registered)}",
         f"Model version: {registered.model_uri} (v{registered.version})", f"Report: {report}"]
    )  # fmt: skip
    create_markdown_artifact(key="evaluation-metrics", markdown=markdown, description="visiontune evaluate")


def _io(io_task, params: Params):
    """An I/O task (tracking server, Prefect API) with the flow's retries and exponential backoff."""
    return io_task.with_options(
        retries=params.flow.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=params.flow.retry_delay_s),
    )


@task(name="pull-data", cache_policy=NONE)
def pull_data(params: Params) -> str:
    """`dvc pull` the data version this checkout names, when DVC tracks data.source and has a remote."""
    import subprocess
    import sys

    from visiontune.components.errors import VisiontuneError
    from visiontune.components.prepare import dvc_tracked, pull_command

    source = params.data.source
    if source.startswith("builtin:"):
        return f"{source}: built in, nothing to pull"
    path = Path(source)
    tracked = dvc_tracked(path) or (dvc_tracked(path.parent) if path.suffix.lower() == ".csv" else None)
    if tracked is None:
        return f"{source}: not tracked by DVC; using the files as they are"
    root, target, _ = tracked
    dvc = str(Path(sys.executable).with_name("dvc"))
    remotes = subprocess.run([dvc, "remote", "list"], cwd=root, capture_output=True, text=True)
    if remotes.returncode == 0 and not remotes.stdout.strip():
        return f"{source}: no DVC remote configured in {root}; using the workspace's copy"
    done = subprocess.run(
        [dvc, "pull", str(target.relative_to(root))], cwd=root, capture_output=True, text=True
    )
    if done.returncode != 0:  # retried: remotes are I/O
        raise VisiontuneError(
            f"`{pull_command(root, target)}` failed ({done.returncode}): {done.stderr.strip()[-1500:]}"
        )
    said = (done.stdout.strip().splitlines() or ["up to date"])[-1]
    return f"{source}: pulled the version {target.name} names ({said})"


@task(name="check-data-version", cache_policy=NONE)
def data_changed(params: Params) -> tuple[bool, str]:
    """Whether data.source's DVC hash differs from the one the newest registered version trained on."""
    from visiontune.components.tracking import last_registered_data_hash

    from .dataversion import source_hash

    now = source_hash(params.data.source)
    version, then = last_registered_data_hash(params.register_)
    if version is None:
        return True, f"no version of {params.register_.model_name} is registered yet"
    if then == now:
        return False, f"data {now} is what v{version} of {params.register_.model_name} trained on"
    return True, f"data changed since v{version}: {then or 'unknown'} → {now}"


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    params_path: str = "params.yaml",
    root: str = "data/prepared",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    only_if_data_changed: bool = False,
    pull: bool = True,
) -> dict[str, Any]:
    """prepare → validate → train → evaluate → export → register, on params.yaml (+ overrides).

    A stage whose inputs (data, params section, code) are unchanged since its last run is not run
    again: its persisted result is used, as `dvc repro` skips an unchanged stage. `force` reruns
    every stage. `only_if_data_changed` first compares the DVC hash of data.source with the one the
    newest registered version was trained on, and stops there when they are equal. `pull` first
    fetches, with `dvc pull`, the data version the checkout's .dvc files name (when DVC tracks
    data.source and a remote is configured), so that a fresh worker trains on the right data.
    """
    params: Params = load_params(params_path, overrides)
    layout = stages.Layout(Path(root))
    if pull:
        print(_io(pull_data, params)(params))
    if only_if_data_changed:
        changed, why = _io(data_changed, params)(params)
        print(f"retrain: {'yes' if changed else 'no'}: {why}")
        if not changed:
            return {"skipped": why}
    ran: dict[str, str] = {}

    def stage(name: str, extra: str = ""):
        result, ran[name] = _run_stage(name, params, layout, force, extra)
        return result

    stage("prepare")
    try:
        stage("validate")
    finally:  # the report is worth reading most when the gate fails
        _io(publish_report, params)(layout.validate / "report.md")
    trained = stage("train")
    evaluated = stage("evaluate")
    exported = stage("export")
    from visiontune.components.tracking import tracking_uri

    registered = stage("register", extra=tracking_uri())  # a new tracking server: register again
    _io(publish_evaluation, params)(evaluated.metrics, evaluated.report, registered)
    _io(publish_report, params)(layout.validate / "report.md", _run_link(registered))
    return {
        "train": trained,
        "metrics": evaluated.metrics,
        "onnx": exported.onnx,
        "model_uri": registered.model_uri,
        "version": registered.version,
        "run_id": registered.run_id,
        "stages": ran,
    }


@task(name="check-drift", cache_policy=NONE)
def check_drift(model: str, new_images: str, out: str, params: Params) -> dict[str, Any]:
    """`visiontune drift` as a task: drift.json's summary (a registered model's check is logged)."""
    import json

    from visiontune.components import drift_report

    done = drift_report.check_model(
        model, Path(new_images), Path(out), params.drift.alpha, params.drift.permutations
    )
    return {**json.loads(Path(done.check.files["json"]).read_text()), "report": done.check.files["markdown"]}


def _persisted(history: Path, drift: bool, checked_at: str, needed: int) -> bool:
    """Append this check to history.json (the outcomes of earlier checks); True when the last
    `needed` checks all found shift."""
    import json

    past = json.loads(history.read_text()) if history.exists() else []
    past = [*past, {"checked_at": checked_at, "drift": drift}][-50:]
    history.write_text(json.dumps(past, indent=2))
    recent = past[-needed:]
    return len(recent) == needed and all(h["drift"] for h in recent)


@flow(name="drift-check", log_prints=True)
def drift_check(
    new_images: str = "data/incoming",
    model: str = "data/prepared/export/model.onnx",
    params_path: str = "params.yaml",
    out: str = "data/prepared/drift",
) -> dict[str, Any]:
    """Check newly collected images against the model's val-split reference and publish the report.

    Each check's outcome is kept in `out`/history.json. When drift.retrain is true and the last
    drift.persist checks all found shift, the deployment drift.retrain_deployment is started (one
    shifted batch is not enough: it may be a bad day, not a new world).
    """
    from prefect.deployments import run_deployment

    params = load_params(params_path, missing_ok=True)
    summary = check_drift(model, new_images, out, params)
    create_markdown_artifact(
        key="drift-report", markdown=Path(summary["report"]).read_text(), description="visiontune drift"
    )
    verdict = "shift detected" if summary["drift"] else "no shift"
    print(
        f"{verdict} in {summary['images']} images (p = {summary['p_value']:.4g}; fired: {summary['fired']})"
    )
    persisted = _persisted(
        Path(out) / "history.json", summary["drift"], summary["checked_at"], params.drift.persist
    )
    triggered = None
    if params.drift.retrain and persisted:
        run = run_deployment(params.drift.retrain_deployment, timeout=0)  # start it; do not wait for it
        triggered = str(run.id)
        print(f"shift in {params.drift.persist} checks in a row: started {params.drift.retrain_deployment}")
    return {"drift": summary["drift"], "p_value": summary["p_value"], "persisted": persisted,
            "retrain_flow_run": triggered, "report": summary["report"]}  # fmt: skip
