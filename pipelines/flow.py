"""The Prefect flow `training-pipeline`: the same stage functions as `dvc repro`, as tasks.

Run with `visiontune run` (ephemeral Prefect: no server needed) or import `training_pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from visiontune.components.config import Params, load_params

from . import stages


def _task(name: str, **options):
    return task(stages.STAGES[name], name=name, cache_policy=NONE, **options)


prepare = _task("prepare")
validate = _task("validate")
train = _task("train")  # no retries: a failed training run is a result to look at, not a blip
evaluate = _task("evaluate")
export = _task("export")
register = _task("register", retries=2, retry_delay_seconds=5)  # the tracking server is I/O


@task(name="publish-validation-report", cache_policy=NONE)
def publish_report(report: Path) -> None:
    """The validation report as a Prefect markdown artifact."""
    if report.exists():
        create_markdown_artifact(
            key="validation-report", markdown=report.read_text(), description="visiontune validate"
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
    uri = registered.tracking_uri
    run = registered.run_id
    link = f"{uri}/#/experiments/{registered.experiment_id}/runs/{run}" if uri.startswith("http") else run
    markdown = "\n".join(
        ["# Evaluation", "", *table, "", f"MLflow run: {link} ({uri})",
         f"Model version: {registered.model_uri} (v{registered.version})", f"Report: {report}"]
    )  # fmt: skip
    create_markdown_artifact(key="evaluation-metrics", markdown=markdown, description="visiontune evaluate")


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    params_path: str = "params.yaml",
    root: str = "data/prepared",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """prepare → validate → train → evaluate → export → register, on params.yaml (+ overrides)."""
    params: Params = load_params(params_path, overrides)
    layout = stages.Layout(Path(root))
    prepare(params, layout)
    try:
        validate(params, layout)
    finally:  # the report is worth reading most when the gate fails
        publish_report(layout.validate / "report.md")
    trained = train(params, layout)
    evaluated = evaluate(params, layout)
    exported = export(params, layout)
    registered = register(params, layout)
    publish_evaluation(evaluated.metrics, evaluated.report, registered)
    return {
        "train": trained,
        "metrics": evaluated.metrics,
        "onnx": exported.onnx,
        "model_uri": registered.model_uri,
        "version": registered.version,
    }
