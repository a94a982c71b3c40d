"""The `visiontune` command: one subcommand per stage (what dvc.yaml calls), plus the flow.

Run as `visiontune --help`. Heavy libraries are imported inside the commands that use them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from visiontune.components.config import load_params
from visiontune.components.errors import VisiontuneError

from . import stages

app = typer.Typer(
    help="Fine-tune pretrained image classifiers: prepare → validate → train → evaluate → export → register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]
RootOpt = Annotated[Path, typer.Option("--root", help="Folder the stages write under.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a param: section.key=value (repeatable)."),
]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """'train.lr=3e-4' → {'train.lr': 0.0003}; values are parsed as YAML scalars."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise VisiontuneError(f"--set {item!r}: write it as section.key=value, e.g. train.lr=3e-4")
        out[key.strip()] = yaml.safe_load(value)
    return out


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Errors a user can fix end the command with one red line and exit code 1, no traceback."""
    try:
        yield
    except VisiontuneError as exc:
        typer.secho(f"visiontune {command}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None


def _run_stage(
    name: str, params_path: Path, root: Path, overrides: list[str] | None = None, **options
) -> None:
    from visiontune.components.runlock import end_with_parent

    end_with_parent()  # under `dvc repro`: a killed dvc leaves no orphan stage behind
    with user_errors(name):
        params = load_params(params_path, parse_overrides(overrides))
        result = stages.STAGES[name](params, stages.Layout(root), **options)
    if os.environ.get("RANK", "0") == "0" and "VISIONTUNE_LAUNCHER" not in os.environ:  # one report
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2, default=str))


def _stage_command(name: str, summary: str) -> None:
    def command(
        params: ParamsOpt = Path("params.yaml"),
        root: RootOpt = Path("data/prepared"),
        set_: SetOpt = None,
    ) -> None:
        _run_stage(name, params, root, set_)

    command.__doc__ = summary
    app.command(name)(command)


_stage_command("prepare", "Ingest data.source, decode-check every image, split, write the manifest.")
_stage_command("validate", "Check the manifest (schema, unreadable images, class counts) and apply the gate.")


@app.command("train")
def train_command(
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("data/prepared"),
    set_: SetOpt = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--fresh",
            help="--resume: continue the interrupted run (an error if none); --fresh: start over. "
            "Default: continue when an interrupted run of the same params and data is found.",
        ),
    ] = None,
) -> None:
    """Fine-tune model.name (train.method full, linear or lora); keep the best-val-loss checkpoint."""
    mode = "auto" if resume is None else ("must" if resume else "never")
    _run_stage("train", params, root, set_, resume=mode)


_stage_command("evaluate", "Score the checkpoint on the test split: metrics.json and plots.")
_stage_command("export", "Export ONNX, run onnx.checker and onnxruntime-vs-PyTorch parity.")
_stage_command("register", "Log the candidate to MLflow and register its ONNX model (alias from params).")


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("data/prepared"),
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun every stage, even those whose inputs are unchanged.")
    ] = False,
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral: no server needed).

    Stages whose inputs (data, their params section, code) are unchanged since their last run
    are skipped, as `dvc repro` skips them.
    """
    with user_errors("run"):
        overrides = parse_overrides(set_)
        load_params(params, overrides)  # fail on a bad params.yaml before Prefect starts
        from .flow import training_pipeline

        training_pipeline(params_path=str(params), root=str(root), overrides=overrides, force=force)
    summary(root)


@app.command()
def schedule(
    cron: Annotated[str, typer.Option("--cron", help="When to retrain (cron, in --timezone).")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option("--timezone", help="Time zone of --cron.")] = "UTC",
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "scheduled-retrain",
    only_if_data_changed: Annotated[
        bool,
        typer.Option(
            "--only-if-data-changed",
            help="Retrain only when the DVC hash of data.source differs from the newest version's.",
        ),
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("data/prepared"),
    set_: SetOpt = None,
) -> None:
    """Retrain on a schedule from this machine: the flow served with flow.serve, no work pool.

    Runs until stopped (Ctrl-C). Each scheduled run is a `training-pipeline` flow run in this
    folder, one at a time; with PREFECT_API_URL set they show in that Prefect server's UI.
    """
    with user_errors("schedule"):
        overrides = parse_overrides(set_)
        load_params(params, overrides)
        import zoneinfo

        from prefect.schedules import Cron
        from prefect.types.entrypoint import EntrypointType

        from .flow import training_pipeline

        try:
            zoneinfo.ZoneInfo(timezone)
            when = Cron(cron, timezone=timezone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError) as exc:
            raise VisiontuneError(f"--cron {cron!r} / --timezone {timezone!r}: {exc}") from None
        training_pipeline.serve(
            name=name,
            schedules=[when],
            parameters={
                "params_path": str(params.absolute()),
                "root": str(root.absolute()),
                "overrides": overrides,
                "only_if_data_changed": only_if_data_changed,
            },
            global_limit=1,  # the deployment's concurrency limit: a late run waits for the last
            limit=1,
            tags=["visiontune", "retrain"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )


@app.command()
def audit(
    source: Annotated[
        str,
        typer.Argument(
            help="An image folder (<root>/<class>/...), a CSV (path,label[,split]) or a Hugging Face "
            "dataset (a save_to_disk folder or parquet files; data.image_column, data.label_column)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the manifest and the report.")] = Path(
        "audit"
    ),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Audit any dataset before training: the validate checks, outside the pipeline."""
    from visiontune.components.prepare import prepare as run_prepare
    from visiontune.components.validate import validate as run_validate

    with user_errors("audit"):
        overrides = parse_overrides(set_)
        config = load_params(params, overrides, missing_ok=True)  # defaults outside a project
        check = config.validate_.model_copy(update={"on_fail": "warn"})  # report everything, then exit 1
        data = config.data.model_copy(update={"source": source})
        prepared = run_prepare(data, config.base, check, out / "prepare")
        size = stages.image_size(config, out / "prepare")
        result = run_validate(check, out / "prepare", out, size, config.base.seed, out / "cache")
    typer.echo(
        f"{prepared.n_images} images, {len(prepared.classes)} classes: {result.n_quarantined} quarantined, "
        f"{result.n_duplicate_groups} duplicate groups ({result.n_similar_pairs} similar pairs not counted), "
        f"{result.n_leaked} leaked into val/test, "
        f"{result.n_label_issues} suspected label errors"
    )
    for line in result.failures:
        typer.secho(f"  FAIL {line}", fg="red")
    for line in result.warnings:
        typer.secho(f"  warn {line}", fg="yellow")
    typer.echo(f"report: {out / 'report.md'} (JSON: {result.report})")
    if result.failures:
        raise typer.Exit(1)


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders (searched recursively).")],
    model: Annotated[
        str, typer.Option("--model", help="An ONNX file or folder, or models:/NAME@ALIAS from the registry.")
    ] = "data/prepared/export/model.onnx",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Labels to list per image.")] = 1,
) -> None:
    """Classify images with an exported model (the training preprocessing); prints JSON."""
    from visiontune.components.predict import OnnxClassifier, collect

    with user_errors("predict"):
        path = Path(model)
        if model.startswith("models:/"):
            from visiontune.components.tracking import download_model

            path = download_model(model)
        classifier = OnnxClassifier(path)
        results = classifier.predict(collect(inputs), top_k=top_k)
    typer.echo(json.dumps(results, indent=2))


@app.command()
def drift(
    new: Annotated[
        Path, typer.Argument(help="The new images: a folder, a CSV with a path column, or a manifest.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", help="An exported ONNX file or folder, models:/NAME@ALIAS or models:/NAME/VERSION."
        ),
    ] = "data/prepared/export/model.onnx",
    out: Annotated[
        Path, typer.Option("--out", help="Folder for drift.json, drift.md, most_shifted.png.")
    ] = Path("data/prepared/drift"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Check new images against the val-split reference the model was exported with.

    Exit code 0: no shift; 3: shift detected; 1: error. A registered model's check is logged to
    MLflow as a run tagged with the version it checked.
    """
    from visiontune.components import drift_report

    with user_errors("drift"):
        cfg = load_params(params, parse_overrides(set_), missing_ok=True).drift
        done = drift_report.check_model(model, new, out, cfg.alpha, cfg.permutations)
    r = done.check.result
    fired = ", ".join(r.fired) or "none"
    verdict = "shift detected" if r.drift else "no shift detected"
    combined = f"smallest p × 3 = {r.p_value:.4g}, α = {r.alpha}"
    typer.echo(f"{verdict} in {r.window} images ({combined}; tests below α on their own: {fired})")
    logged = f"; logged to MLflow run {done.run_id} ({done.name} v{done.version})" if done.run_id else ""
    typer.echo(f"report: {done.check.files['markdown']}{logged}")
    if r.drift:
        raise typer.Exit(3)


@app.command()
def promote(
    version: Annotated[
        str | None, typer.Option("--version", help="Version to promote (default: alias candidate).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("data/prepared"),
    set_: SetOpt = None,
) -> None:
    """Promote the candidate to champion if it beats the champion by register.min_improvement.

    Exit code 0: promoted; 2: refused (the decision is printed and tagged on the version); 1: error.
    """
    from visiontune.components.tracking import promote as run

    with user_errors("promote"):
        config = load_params(params, parse_overrides(set_))
        result = run(config.register_, stages.Layout(root).prepare, version)
    typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
    typer.echo(f"{'promoted' if result.promoted else 'not promoted'}: {result.reason}")
    if not result.promoted:
        raise typer.Exit(2)  # scripts and CI can tell a refusal from a promotion


@app.command()
def rollback(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Give the champion alias back to the previous champion."""
    from visiontune.components.tracking import rollback as run

    with user_errors("rollback"):
        result = run(load_params(params, parse_overrides(set_)).register_)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="A run id or models:/NAME@ALIAS (or models:/NAME/VERSION).")],
    b: Annotated[str, typer.Argument(help="The other one.")],
) -> None:
    """Metric-by-metric difference between two MLflow runs or model versions (B − A)."""
    from visiontune.components.tracking import run_metrics

    with user_errors("compare"):
        (label_a, ma), (label_b, mb) = run_metrics(a), run_metrics(b)
    keys = sorted(set(ma) | set(mb))
    width = max([len(k) for k in keys] + [6])
    typer.echo(f"{'metric':<{width}}  {label_a:>14}  {label_b:>14}  {'B − A':>10}")
    for key in keys:
        va, vb = ma.get(key), mb.get(key)
        diff = f"{vb - va:+.4f}" if va is not None and vb is not None else ""
        fa = "" if va is None else f"{va:.4f}"
        fb = "" if vb is None else f"{vb:.4f}"
        typer.echo(f"{key:<{width}}  {fa:>14}  {fb:>14}  {diff:>10}")


@app.command()
def summary(root: RootOpt = Path("data/prepared")) -> None:
    """Print where the last run's results are, and how to open the MLflow UI."""
    layout = stages.Layout(root)
    lines = ["", "visiontune results"]
    metrics_path = layout.evaluate / "metrics.json"
    if metrics_path.exists():
        from visiontune.components.metrics import accuracy_text

        metrics = json.loads(metrics_path.read_text())
        keys = ("test_macro_f1", "test_top5_accuracy", "test_ece")
        shown = ", ".join(
            [f"accuracy {accuracy_text(metrics)}"]
            + [f"{k.removeprefix('test_')} {metrics[k]:.4f}" for k in keys if k in metrics]
        )
        lines.append(f"  test metrics    {metrics_path}  ({shown}; {metrics.get('test_images')} images)")
    report = layout.evaluate / "details" / "report.html"
    if report.exists():
        lines.append(f"  report          {report}  (metrics, curves, confusion, calibration, mistakes)")
    for plot in sorted((layout.evaluate / "details").glob("*.png")):
        lines.append(f"  plot            {plot}")
    train_path = layout.train / "train.json"
    if train_path.exists():
        trained = json.loads(train_path.read_text())
        stop = "stopped early" if trained["stopped_early"] else "all epochs ran"
        size = f"{trained.get('image_size', '?')} px ({trained.get('image_size_reason', 'model.image_size')})"
        temperature = trained.get("temperature")
        confidence = (
            "not calibrated" if temperature is None else f"calibrated (temperature {temperature:.3f})"
        )
        lines.append(
            f"  training        {trained['method']} on {trained['device']}, {size}; "
            f"best epoch {trained['best_epoch']} of {trained['epochs_run']} run ({stop}); "
            f"confidence {confidence}"
        )
        if "hflip" in trained:
            flips = f"horizontal flips {'on' if trained['hflip'] else 'off'} ({trained['hflip_reason']})"
            lines.append(f"  augmentation    {flips}")
    lines.append(f"  loss curves     dvc plots show   (data: {layout.train / 'history.csv'})")
    onnx = layout.export / "model.onnx"
    if onnx.exists():
        lines.append(f"  ONNX model      {onnx}")
    from visiontune.components.hub import HF_DIR, WEIGHTS

    hub_folder = layout.export / HF_DIR
    if (hub_folder / WEIGHTS).exists():
        lines.append(f"  Hub folder      {hub_folder}  (timm, transformers; visiontune push)")
    reg_path = layout.register / "registration.json"
    if reg_path.exists():
        reg = json.loads(reg_path.read_text())
        lines.append(
            f"  MLflow run      {reg['run_id']}  (experiment {reg['experiment_id']}, {reg['tracking_uri']})"
        )
        lines.append(f"  model version   {reg['model_name']} v{reg['version']}  ({reg['model_uri']})")
    lines.append("  MLflow UI       make mlflow-ui, then open http://127.0.0.1:5000")
    typer.echo("\n".join(lines))


@app.command()
def push(
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="The Hub repository: ORG/NAME (created if missing).")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="An export's hf/ folder, or models:/NAME@ALIAS or models:/NAME/VERSION from the registry.",
        ),
    ] = "data/prepared/export/hf",
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files that would be sent, with sizes; send nothing.")
    ] = False,
) -> None:
    """Upload the Hub folder (timm weights, config.json, model card, LoRA adapter) to the Hugging Face Hub.

    One commit, its message naming the registered model version and the data hash. The token
    comes from HF_TOKEN.
    """
    import tempfile

    from visiontune.components import hub

    with user_errors("push"), tempfile.TemporaryDirectory() as scratch:
        if model.startswith("models:/"):
            from visiontune.components.tracking import download_hf_folder

            name, version, folder = download_hf_folder(model, Path(scratch))
            label = f"{name} v{version}"
        else:
            folder, label = Path(model), None
        hub.check_folder(folder)  # before reading its config.json for the commit message
        label = label or hub.local_version(folder)
        result = hub.push(folder, repo_id, hub.commit_message(folder, label), private, dry_run)
    verb = "would send" if dry_run else "sent"
    total = sum(result.files.values())
    typer.echo(f"{verb} {len(result.files)} files ({total:,} bytes) to {result.repo_id}:")
    width = max(len(name) for name in result.files)
    for name, size in result.files.items():
        typer.echo(f"  {name:<{width}}  {size:>14,} bytes")
    typer.echo(f"commit message: {result.commit_message}")
    if result.commit_url:
        typer.echo(f"commit: {result.commit_url}")


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="An ONNX file or folder, models:/NAME@ALIAS (followed as the alias moves) or "
            "models:/NAME/VERSION. Default: serve.model.",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (default serve.host).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default serve.port).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Serve the model over HTTP: POST /v1/predict with images, a page at /, /docs, /metrics."""
    import logging

    with user_errors("serve"):
        config = load_params(params, parse_overrides(set_), missing_ok=True)  # defaults outside a project
        flags = {"model": model, "host": host, "port": port}
        cfg = config.serve.model_copy(update={k: v for k, v in flags.items() if v is not None})
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
        import uvicorn

        from visiontune.pipelines.model_server import Server
        from visiontune.pipelines.serve import create_app, describe

        server = Server(cfg, config.validate_.max_pixels, config.drift)
        app_ = create_app(cfg, server=server)
    typer.echo(describe(server, cfg.host, cfg.port))
    uvicorn.run(app_, host=cfg.host, port=cfg.port, access_log=cfg.access_log, log_level="info",
                timeout_graceful_shutdown=5)  # fmt: skip


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="visiontune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
