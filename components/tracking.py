"""Tracking and registry: the only module that imports mlflow.

`register` logs one trained candidate (params, lineage, per-epoch and evaluation metrics,
plots, the validation report, the checkpoint and the ONNX model) as one MLflow run, registers
the ONNX model as a new version and points the alias at it. Called by `visiontune register`
and the flow.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import RegisterConfig
from .errors import VisiontuneError
from .images import sha256_file

DEFAULT_DB = "mlflow.db"  # embedded store: a SQLite file and an artifact folder in the project
DEFAULT_ARTIFACTS = "mlartifacts"
HF_ARTIFACTS = "hf"  # the run's artifact folder holding export's Hub folder


@dataclass(frozen=True)
class Candidate:
    """Everything a trained candidate left on disk, by path."""

    params: dict[str, Any]
    prepare: Path  # prepare.json
    validation: Path  # folder with report.json and report.md
    checkpoint: Path  # folder with model.safetensors, checkpoint.json, history.csv
    evaluation: Path  # folder with metrics.json and plots
    onnx: Path
    data_hash: str = ""  # the DVC hash of data.source (pipelines.dataversion), tagged on the version
    hf: Path | None = None  # export's Hub folder (components/hub.py), logged as the run's hf/ artifacts


@dataclass(frozen=True)
class RegisterResult:
    tracking_uri: str
    experiment_id: str
    run_id: str
    model_name: str
    version: str
    alias: str
    model_uri: str
    hf_sha256: str = ""  # sha256 of the logged hf/model.safetensors: `visiontune push` names this version


HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow's own defaults (7 retries, backoff factor 2) wait 254 s on a server that answers 503 before
# saying so; these wait 1 + 2 + 4 + 8 = 15 s. Set either variable to choose otherwise.


def tracking_uri(project: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded SQLite store in the project folder. A server's
    HTTP retries are bounded (HTTP_RETRIES) unless the environment sets them."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_RETRIES.items():
                os.environ.setdefault(name, value)
        return uri
    return f"sqlite:///{(project or Path.cwd()).absolute() / DEFAULT_DB}"


def download_model(model_uri: str, dest: Path | None = None) -> Path:
    """The ONNX file of a registered model (models:/NAME@ALIAS or models:/NAME/VERSION)."""
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, tracking_uri=tracking_uri(), dst_path=str(dest) if dest else None
        )
    except Exception as exc:  # an unknown name/alias or an unreachable server; both need the user
        raise VisiontuneError(
            f"{model_uri}: cannot fetch it from {tracking_uri()} ({type(exc).__name__}: {exc}); "
            "check the name and alias, and MLFLOW_TRACKING_URI"
        ) from None
    return Path(local) / "model.onnx"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def lineage() -> dict[str, str]:
    """Git commit and whether the working tree had uncommitted changes."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
    }


def environment() -> dict[str, str]:
    """Versions of the libraries that shape a model, and the hardware it trained on."""
    import platform
    from importlib import metadata

    import torch

    packages = ("visiontune", "torch", "torchvision", "timm", "peft", "onnx", "onnxruntime", "mlflow",
                "prefect", "dvc", "pandera", "cleanlab", "numpy", "pillow", "scikit-learn")  # fmt: skip
    env = {}
    for name in packages:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    env["python"] = platform.python_version()
    env["cuda"] = torch.version.cuda or "none"
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return env


def model_card(prepared: dict, validation: dict | None, metrics: dict, train_meta: dict) -> str:
    """The version's description: data, metrics, validation findings and limitations."""
    lines = [
        f"## {train_meta['architecture']} ({train_meta.get('config', {}).get('train', {}).get('method')})",
        "",
        f"**Data**: {prepared['n_images']} images in {len(prepared['classes'])} classes "
        f"({', '.join(prepared['classes'][:20])}{' …' if len(prepared['classes']) > 20 else ''}); "
        f"split {prepared['split_counts']}; "
        f"{prepared['n_quarantined']} images quarantined (unreadable or too large); "
        f"manifest sha256 {prepared['manifest_sha256'][:12]}.",
        "",
        "**Test metrics**: "
        + ", ".join(
            f"{k.removeprefix('test_')} {v}" if isinstance(v, int) else f"{k.removeprefix('test_')} {v:.4f}"
            for k, v in metrics.items()
            if k.startswith("test_") and k != "test_images"
        ),  # fmt: skip
    ]
    if validation:
        findings = validation.get("failures", []) + validation.get("warnings", [])
        lines += ["", f"**Validation**: gate {'passed' if validation.get('passed') else 'failed'}; "
                  f"{len(validation.get('label_issues', []))} suspected label errors, "
                  f"{len(validation.get('duplicates', []))} duplicate groups, "
                  f"{len(validation.get('leakage', []))} val/test images leaked."]  # fmt: skip
        lines += [f"- {f}" for f in findings]
    lines += [
        "",
        f"**Limitations**: trained at {train_meta['preprocessing']['size']} px on the data above only; "
        "expect lower accuracy on images unlike it (other cameras, lighting, backgrounds, classes). "
        f"Expected calibration error on test: {metrics.get('test_ece', float('nan')):.3f}.",
    ]
    return "\n".join(lines)


def _history_metrics(history_csv: Path) -> list:
    import csv

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    with open(history_csv) as fh:
        for row in csv.DictReader(fh):
            step = int(row.pop("epoch"))
            metrics += [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in row.items()]
    return metrics


UNIQUE_VIOLATION = (
    "duplicate key value",
    "UNIQUE constraint failed",
    "Duplicate entry",
)  # PostgreSQL, SQLite, MySQL


def _log_input(dataset) -> None:
    """mlflow.log_input, again when another run inserted the same dataset (same experiment, name and
    digest) between the tracking server's lookup and its insert; the retry finds that row and links it."""
    import mlflow

    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except mlflow.exceptions.MlflowException as exc:
            if attempt == 2 or not any(marker in str(exc) for marker in UNIQUE_VIOLATION):
                raise
            time.sleep(0.2 * (attempt + 1))


def register(cfg: RegisterConfig, candidate: Candidate, out: Path) -> RegisterResult:
    """Log the candidate as one MLflow run and register its ONNX model with alias cfg.alias: the
    run's contents first, then the model, then the version's card, tags and alias (a failure
    there deletes the version: no half-registered versions). A server that fails (after MLflow's
    bounded retries) is one line naming it, as in promote."""
    import requests
    from mlflow.exceptions import MlflowException

    check_reachable()
    try:
        return _register(cfg, candidate, out)
    except (MlflowException, requests.RequestException) as exc:
        raise VisiontuneError(
            f"{RegistryError('register', tracking_uri(), exc)}; nothing was registered (a run logged "
            "halfway is marked FAILED): retry `visiontune register` when the server answers"
        ) from None


def _register(cfg: RegisterConfig, candidate: Candidate, out: Path) -> RegisterResult:
    import mlflow
    from mlflow.tracking import MlflowClient

    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, cfg.experiment, uri)

    prepared = json.loads(candidate.prepare.read_text())
    train_meta = json.loads((candidate.checkpoint / "checkpoint.json").read_text())
    metrics = json.loads((candidate.evaluation / "metrics.json").read_text())
    tags = {
        **lineage(),
        "dvc_data_hash": candidate.data_hash,
        "manifest_sha256": prepared["manifest_sha256"],
        "data_source": str(candidate.params.get("data.source")),
        "model_name": train_meta["architecture"],
        "method": str(candidate.params.get("train.method")),
    }
    run_name = f"{train_meta['architecture']}-{tags['method']}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        _log_run_contents(client, run_id, candidate, metrics)
        version = _log_onnx_model(cfg, candidate, train_meta, run_id)
    report_json = candidate.validation / "report.json"
    validation = json.loads(report_json.read_text()) if report_json.exists() else None
    try:
        client.update_model_version(
            cfg.model_name, version, description=model_card(prepared, validation, metrics, train_meta)
        )
        for key, value in {**tags, **{k: f"{v:.6g}" for k, v in metrics.items()}}.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)
        _set_alias(client, cfg.model_name, cfg.alias, version, newest_wins=True)  # last: the version is whole
    except Exception as exc:
        try:
            client.delete_model_version(cfg.model_name, version)  # no half-registered versions
        except Exception:
            raise VisiontuneError(
                f"{RegistryError('register', uri, exc)}; v{version} of {cfg.model_name} is registered "
                "without its card, tags or alias and could not be deleted: delete it (MLflow UI or "
                "`MlflowClient().delete_model_version`) and retry `visiontune register`"
            ) from None
        raise
    hf_weights = candidate.hf / "model.safetensors" if candidate.hf else None
    result = RegisterResult(
        tracking_uri=uri,
        experiment_id=experiment_id,
        run_id=run_id,
        model_name=cfg.model_name,
        version=version,
        alias=cfg.alias,
        model_uri=f"models:/{cfg.model_name}@{cfg.alias}",
        hf_sha256=sha256_file(hf_weights) if hf_weights is not None and hf_weights.is_file() else "",
    )
    (out / "registration.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created when missing (artifacts beside the project for the embedded
    store); one that another run creates meanwhile is used, not an error."""
    import mlflow

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path.cwd() / DEFAULT_ARTIFACTS).absolute().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as exc:  # another run created it since we looked
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _log_run_contents(client, run_id: str, candidate: Candidate, metrics: dict) -> None:
    """Into the active run: params, environment, the manifest as its input dataset, the per-epoch
    history, test metrics, what training reported, and the validation, evaluation and checkpoint
    folders as artifacts."""
    import mlflow
    import mlflow.data
    import pandas as pd

    mlflow.log_params({k: "null" if v is None else v for k, v in candidate.params.items()})
    env = environment()
    mlflow.log_dict(env, "environment.json")
    mlflow.set_tags({f"env.{k}": v for k, v in env.items() if k in ("torch", "cuda", "gpu", "timm")})
    manifest_csv = candidate.prepare.parent / "manifest.csv"
    dataset = mlflow.data.from_pandas(
        pd.read_csv(manifest_csv, dtype=str), source=str(manifest_csv), name="manifest"
    )
    _log_input(dataset)
    history = _history_metrics(candidate.checkpoint / "history.csv")
    for i in range(0, len(history), 900):  # one request per 900 values, not one per value
        client.log_batch(run_id, metrics=history[i : i + 900])
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    train_json = candidate.checkpoint / "train.json"
    if train_json.exists():  # what the run was: device, epochs, trainable share, speed
        outcome = json.loads(train_json.read_text())
        keys = ("method", "device", "best_epoch", "epochs_run", "temperature", "trainable_parameters",
                "trainable_percent", "image_size_reason", "hflip_reason")  # fmt: skip
        mlflow.log_params({f"result.{k}": outcome[k] for k in keys if k in outcome})
        mlflow.log_metric("train_images_per_s", float(outcome["images_per_s"]))
    for folder, name in (
        (candidate.validation, "validation"),
        (candidate.evaluation, "evaluation"),
        (candidate.checkpoint, "checkpoint"),
    ):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # not DVC's .gitignore
                where = path.parent.relative_to(folder).as_posix()
                mlflow.log_artifact(str(path), name if where == "." else f"{name}/{where}")


def _log_onnx_model(cfg: RegisterConfig, candidate: Candidate, train_meta: dict, run_id: str) -> str:
    """Into the active run: the quantized copies, the Hub folder, and the ONNX model (with its
    signature, the run id in its metadata and the drift reference beside it), registered as a new
    version of cfg.model_name; that version."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = train_meta["preprocessing"]["size"]
    proto = onnx.load(str(candidate.onnx))
    outputs = [TensorSpec(np.dtype(np.float32), (-1, len(train_meta["class_names"])), "logits")]
    if len(proto.graph.output) > 1:  # the penultimate-layer embedding, for drift detection
        width = proto.graph.output[1].type.tensor_type.shape.dim[1].dim_value
        outputs.append(TensorSpec(np.dtype(np.float32), (-1, width), "embedding"))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), "input")]),
        outputs=Schema(outputs),
    )
    reference = candidate.onnx.parent / "drift_reference.npz"  # export's; kept with the model
    proto.metadata_props.append(onnx.StringStringEntryProto(key="mlflow_run_id", value=run_id))
    for quantized in sorted(candidate.onnx.parent.glob("model.*.onnx")):  # int8 / fp16 copies
        mlflow.log_artifact(str(quantized), "quantized")
    if candidate.hf is not None and candidate.hf.is_dir():  # for `push --model models:/...`
        mlflow.log_artifacts(str(candidate.hf), HF_ARTIFACTS)
    info = mlflow.onnx.log_model(
        proto,
        name="model",
        signature=signature,
        input_example=np.zeros((1, 3, size, size), dtype=np.float32),  # one image, as the model takes it
        registered_model_name=cfg.model_name,
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        extra_files=[str(reference)] if reference.is_file() else None,
        metadata={"class_names": train_meta["class_names"], "preprocessing": train_meta["preprocessing"]},
    )
    return str(info.registered_model_version)


def download_hf_folder(uri: str, dest: Path) -> tuple[str, str, Path]:
    """(name, version, local folder) of the Hub folder logged with models:/NAME@ALIAS or
    models:/NAME/VERSION (the run's hf/ artifacts), downloaded into dest."""
    import mlflow

    name, version = _name_and_version(uri)
    run_id = _Registry().get_model_version(name, version).run_id
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=HF_ARTIFACTS, dst_path=str(dest), tracking_uri=tracking_uri()
        )
    except Exception as exc:  # no hf/ in that run (registered before it was logged) or no server
        raise VisiontuneError(
            f"{uri} (v{version}, run {run_id}): no {HF_ARTIFACTS}/ folder to fetch from {tracking_uri()} "
            f"({type(exc).__name__}); register the model again with this visiontune, or push the local "
            "folder: --model data/prepared/export/hf"
        ) from None
    return name, version, Path(local)


def run_metrics(ref: str) -> tuple[str, dict[str, float]]:
    """(description, latest metrics) of a run id, or of the run behind models:/NAME@ALIAS or /VERSION."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    try:
        if ref.startswith("models:/"):
            name, _, which = ref.removeprefix("models:/").partition("@")
            if which:
                version = client.get_model_version_by_alias(name, which)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
            run_id, label = version.run_id, f"{name} v{version.version}"
        else:
            run_id, label = ref, f"run {ref[:8]}"
        run = client.get_run(run_id)
    except Exception as exc:  # unknown run/model or unreachable server
        raise VisiontuneError(
            f"{ref}: not found at {tracking_uri()} ({type(exc).__name__}: {exc}); "
            "give a run id or models:/NAME@ALIAS, and check MLFLOW_TRACKING_URI"
        ) from None
    return label, dict(run.data.metrics)


def registered_onnx(uri: str, dest: Path) -> tuple[str, str, Path]:
    """(name, version, local ONNX file) of models:/NAME@ALIAS or models:/NAME/VERSION, downloaded
    into dest (with its extra files: the drift reference)."""
    name, version = _name_and_version(uri)
    return name, version, download_model(f"models:/{name}/{version}", dest)


def _name_and_version(uri: str) -> tuple[str, str]:
    """(name, version number) that models:/NAME@ALIAS (the alias looked up now) or
    models:/NAME/VERSION names."""
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if alias:
        return name, alias_version(name, alias).version
    name, _, version = name.partition("/")
    if not version:
        raise VisiontuneError(f"{uri}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version


def log_drift(name: str, version: str, check) -> str:
    """A drift check of version `version` of `name` as an MLflow run in that version's experiment
    (tags name the version; metrics the p-values, statistics and the flag; the report files as
    artifacts), and its outcome as drift.* tags on the version. Returns the run id."""
    import mlflow

    client = _Registry()
    found = client.get_model_version(name, version)
    experiment_id = client.get_run(found.run_id).info.experiment_id
    r = check.result
    mlflow.set_tracking_uri(tracking_uri())
    tags = {"visiontune.kind": "drift-check", "model_name": name, "model_version": str(version)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{name}-v{version}", tags=tags) as run:
        values = {"drift": float(r.drift), "p_value": r.p_value, "window": float(r.window)}
        for test, t in r.tests.items():
            values |= {
                f"{test}_p_value": t.p_value,
                f"{test}_statistic": t.statistic,
                f"{test}_effect": t.effect,
            }
        mlflow.log_metrics(values)
        for path in check.files.values():
            mlflow.log_artifact(path)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in {
        "drift.last_check": stamp,
        "drift.last_result": "shift" if r.drift else "no shift",
        "drift.last_p_value": f"{r.p_value:.4g}",
        "drift.last_run_id": run.info.run_id,
    }.items():
        client.set_model_version_tag(name, str(version), key, value)
    return run.info.run_id


CHAMPION, PREVIOUS = "champion", "previous"


@dataclass(frozen=True)
class PromoteResult:
    model_name: str
    candidate: str
    champion_before: str | None
    promoted: bool
    reason: str
    metric: str
    candidate_value: float | None
    champion_value: float | None
    compared_on: str  # the test split both models were re-scored on


def _client():
    from mlflow.tracking import MlflowClient

    check_reachable()
    return MlflowClient(tracking_uri())


class RegistryError(VisiontuneError):
    """A registry call that failed for any reason but "not found": never read as an absent alias."""

    def __init__(self, call: str, uri: str, exc: Exception):
        self.call, self.error_code = call, getattr(exc, "error_code", None)
        detail = " ".join(str(exc).split())
        super().__init__(
            f"the model registry at {uri} failed on {call} ({type(exc).__name__}: {detail[:300]})"
        )


class _Registry:
    """An MlflowClient whose failures are RegistryErrors naming the server and the call."""

    def __init__(self):
        self._client, self._uri = _client(), tracking_uri()

    def __getattr__(self, method: str):
        call = getattr(self._client, method)

        def named(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except Exception as exc:
                shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
                raise RegistryError(f"{method}({shown})", self._uri, exc) from exc

        return named


def _first_alias_race(exc: Exception) -> bool:
    """True for the server's unique-key error when two clients create one alias at the same moment
    (the tracking server checks, then inserts: PostgreSQL, MySQL and SQLite all refuse the second)."""
    text = str(exc).lower()
    return "registered_model_alias" in text and ("unique" in text or "duplicate" in text)


def _set_alias(client, name: str, alias: str, version: str, newest_wins: bool = False) -> None:
    """Point `alias` at `version`, retrying the race two first-time setters of one alias can lose.
    With newest_wins, a retry leaves the alias alone when the other writer put it on a newer version."""
    for attempt in range(5):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except Exception as exc:
            if attempt == 4 or not _first_alias_race(exc):
                raise
        time.sleep(0.05 * (attempt + 1))  # the other insert commits; ours becomes an update
        if newest_wins:
            holder = client.get_model_version_by_alias(name, alias)
            if int(holder.version) > int(version):
                return


def check_reachable(timeout: float = 5.0) -> None:
    """Fail fast, naming the URI and the fix, when a tracking server does not answer."""
    import urllib.request

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
    except OSError as exc:
        raise VisiontuneError(
            f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({exc}). Start it "
            "(`make mlflow-server`) or unset MLFLOW_TRACKING_URI to use the embedded store; the "
            "artifacts stay in data/prepared, and `visiontune register` logs them later"
        ) from None


def last_registered_data_hash(cfg: RegisterConfig) -> tuple[str | None, str | None]:
    """(version, its dvc_data_hash tag) of the newest version of cfg.model_name; (None, None) if none."""
    client = _client()
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(
            f"name = '{cfg.model_name}'", max_results=1, order_by=["version_number DESC"]
        )
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None, None
        raise
    if not found:
        return None, None
    return str(found[0].version), found[0].tags.get("dvc_data_hash")


def _version_by_alias(registry: _Registry, name: str, alias: str):
    """The version `alias` points at, or None when the server says the model or the alias does
    not exist. Any other failure raises: a registry hiccup must not read as "no champion yet"."""
    try:
        return registry.get_model_version_by_alias(name, alias)
    except RegistryError as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such registered model
            return None
        if exc.error_code != "INVALID_PARAMETER_VALUE":  # what the server says for an unknown alias
            raise
        if alias in registry.get_registered_model(name).aliases:  # it exists: the error was another
            raise
        return None


def _test_metrics_now(version, prepared: Path, top_k: int = 5) -> dict[str, float]:
    """A version's test metrics on the current manifest's test split (its ONNX, our preprocessing)."""
    import tempfile

    from . import images, manifest, metrics
    from .predict import OnnxClassifier

    with tempfile.TemporaryDirectory() as tmp:
        path = download_model(f"models:/{version.name}/{version.version}", Path(tmp))
        model = OnnxClassifier(path)
        frame = manifest.read(prepared / "manifest.csv")
        test = frame[frame["split"] == "test"]
        index = {c: i for i, c in enumerate(model.class_names)}
        if set(test["label"]) - set(index):
            raise VisiontuneError(
                f"{version.name} v{version.version} does not know classes "
                f"{sorted(set(test['label']) - set(index))} of the current test split; it cannot be compared"
            )
        logits = np.concatenate(
            [model.logits(images.load_batch(test["path"].tolist()[i : i + 64], model.size))
             for i in range(0, len(test), 64)]
        )  # fmt: skip
    return metrics.summary(metrics.softmax(logits), test["label"].map(index).to_numpy(), "test", top_k)


class IntegrityError(VisiontuneError):
    """A registered model whose ONNX artifact does not score what its run logged on the same images."""


def _rescored(registry: _Registry, version, prepared: Path, on_disk: str) -> dict[str, float]:
    """The version's logged metrics, overridden by its registered ONNX model re-scored on the test
    split on disk. When that split is the one the version was tested on (its manifest_sha256 tag),
    a logged accuracy more than one image away from the re-score is an IntegrityError."""
    logged = dict(registry.get_run(version.run_id).data.metrics)
    scored = _test_metrics_now(version, prepared)
    if version.tags.get("manifest_sha256") == on_disk:
        one_image = 1.0 / max(1, scored["test_images"])
        off = [
            f"{k} logged {logged[k]:.4f}, re-scored {v:.4f}"
            for k, v in scored.items()
            if k.endswith("accuracy") and k in logged and abs(logged[k] - v) > one_image + 1e-9
        ]
        if off:
            raise IntegrityError(
                f"{version.name} v{version.version}: its registered model.onnx does not score what its "
                f"run logged on the same {int(scored['test_images'])} test images ({'; '.join(off)}), "
                "more than one image apart. The artifact or its metadata (class order, preprocessing) "
                "differs from the model that was evaluated; the promotion is refused. Register the "
                "model again from the pipeline's outputs (`visiontune register`)"
            )
    return {**logged, **scored}


@dataclass(frozen=True)
class Scored:
    """A version and its metrics, as the decision sees them."""

    version: str
    metrics: dict[str, float]


def decide_promotion(cfg: RegisterConfig, candidate: Scored, champion: Scored | None) -> tuple[bool, str]:
    """(promoted, reason) from plain values: the floors (register.min_metrics) first, then a challenger
    must win: better on cfg.metric, strictly, and by at least register.min_improvement. An exact tie
    keeps the champion; with no champion, a candidate that clears the floors is promoted."""
    value = candidate.metrics.get(cfg.metric)
    if value is None:
        raise VisiontuneError(
            f"register.metric: {cfg.metric!r} is not a metric of v{candidate.version}'s run"
        )
    floors = [f"{k} {candidate.metrics.get(k, float('nan')):.4f} < {v}" for k, v in cfg.min_metrics.items()
              if not candidate.metrics.get(k, float("-inf")) >= v]  # fmt: skip
    if floors:
        return False, "below register.min_metrics: " + "; ".join(floors)
    if champion is None:
        return True, "no champion yet"
    champ_value = champion.metrics.get(cfg.metric)
    if champ_value is None:
        raise VisiontuneError(
            f"register.metric: {cfg.metric!r} is not a metric of champion v{champion.version}'s run; "
            "it cannot be compared"
        )
    sign = 1 if cfg.greater_is_better else -1
    gain = sign * (value - champ_value)
    promoted = gain > 0 and gain >= cfg.min_improvement
    if promoted:
        return True, f"{cfg.metric} {value:.4f} vs champion v{champion.version} {champ_value:.4f}" + (
            f" (min_improvement {cfg.min_improvement})"
        )
    why = "a tie keeps the champion" if gain == 0 else f"by register.min_improvement={cfg.min_improvement}"
    shown = f"{cfg.metric} {value:.4f} does not beat champion v{champion.version} {champ_value:.4f}"
    return False, f"{shown} {why}"


def _set_stage(client, name: str, version: str, stage: str, archive: bool = False) -> None:
    import warnings

    with warnings.catch_warnings():  # stages are deprecated in MLflow 3 but still used by teams
        warnings.simplefilter("ignore")
        client.transition_model_version_stage(name, version, stage, archive_existing_versions=archive)


def promote(cfg: RegisterConfig, prepared: Path, version: str | None = None) -> PromoteResult:
    """Make the candidate the champion when its registered model, re-scored on the test split in
    `prepared`, beats the champion's (strictly, by at least cfg.min_improvement on cfg.metric) and
    clears cfg.min_metrics; record the decision on the version either way.

    A registry failure is an error, never a guess: while deciding nothing has moved yet, and the
    message says so; after the decision, it says how far the aliases got. An IntegrityError (an
    artifact that does not score what was logged) refuses, is tagged on the candidate, and raises."""
    registry = _Registry()
    try:
        cand, champ = _promotion_versions(registry, cfg, version)
        result = _decide(registry, cfg, prepared, cand, champ)
    except RegistryError as exc:
        raise VisiontuneError(f"{exc}; nothing was changed: retry when the server answers") from None
    except IntegrityError as exc:
        refused = _result(cfg, cand, champ, False, f"integrity: {exc}", None, None, "integrity check")
        _tag_decision(registry, cfg, refused)
        raise
    if result.promoted:
        _move_aliases(registry, cfg, cand.version, champ.version if champ else None)
    _tag_decision(registry, cfg, result)
    return result


def _promotion_versions(registry: _Registry, cfg: RegisterConfig, version: str | None):
    """(candidate, champion or None): the version given, else the one cfg.alias names."""
    name = cfg.model_name
    cand = (
        registry.get_model_version(name, version) if version else _version_by_alias(registry, name, cfg.alias)
    )
    if cand is None:
        raise VisiontuneError(f"{name}: no version has alias {cfg.alias!r}; register one or pass --version")
    return cand, _version_by_alias(registry, name, CHAMPION)


def _decide(registry: _Registry, cfg: RegisterConfig, prepared: Path, cand, champ) -> PromoteResult:
    """The decision, read-only. The candidate's registered ONNX model and the champion's are both
    re-scored on the test split on disk (each checked against its logged metrics when that split is
    the one it was tested on), and decide_promotion compares the re-scored metrics."""
    if champ is not None and champ.version == cand.version:
        return _result(cfg, cand, champ, False, "already the champion", None, None, "nothing scored")
    on_disk = sha256_file(prepared / "manifest.csv")
    candidate = Scored(str(cand.version), _rescored(registry, cand, prepared, on_disk))
    champion = Scored(str(champ.version), _rescored(registry, champ, prepared, on_disk)) if champ else None
    promoted, reason = decide_promotion(cfg, candidate, champion)
    n = int(candidate.metrics["test_images"])
    compared_on = f"re-scored on the test split on disk ({n} images, manifest {on_disk[:12]})"
    champ_value = champion.metrics.get(cfg.metric) if champion else None
    value = candidate.metrics[cfg.metric]
    return _result(cfg, cand, champ, promoted, reason, value, champ_value, compared_on)


def _result(cfg, cand, champ, promoted, reason, value, champ_value, compared_on) -> PromoteResult:
    return PromoteResult(
        model_name=cfg.model_name, candidate=str(cand.version),
        champion_before=str(champ.version) if champ else None, promoted=promoted, reason=reason,
        metric=cfg.metric, candidate_value=value, champion_value=champ_value, compared_on=compared_on,
    )  # fmt: skip


def _move_aliases(registry: _Registry, cfg: RegisterConfig, candidate: str, champion: str | None) -> None:
    """'previous' to the old champion first, then 'champion' to the candidate, then the stages: a
    failure part-way leaves the champion where it was, or says that only the stages are behind."""
    name = cfg.model_name
    try:
        if champion is not None:
            _set_alias(registry, name, PREVIOUS, champion)
        _set_alias(registry, name, CHAMPION, candidate)
    except RegistryError as exc:
        raise VisiontuneError(
            f"{exc}; the champion alias still points at {'v' + champion if champion else 'no version'}: "
            "retry the promotion when the server answers"
        ) from None
    if cfg.use_stages:
        try:
            _set_stage(registry, name, candidate, "Staging")
            _set_stage(registry, name, candidate, "Production", archive=True)
        except RegistryError as exc:
            raise VisiontuneError(
                f"{exc}; the champion alias moved to v{candidate}, but its stage is not Production yet "
                "(register.use_stages): transition it when the server answers"
            ) from None


def _tag_decision(registry: _Registry, cfg: RegisterConfig, result: PromoteResult) -> None:
    """The decision, its reason and the two values, as tags on the candidate version."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    champion, value = result.champion_value, result.candidate_value
    for key, val in {
        "promotion.decision": "promoted" if result.promoted else "refused",
        "promotion.time": stamp,
        "promotion.reason": result.reason,
        "promotion.compared_on": result.compared_on,
        "promotion.champion_before": result.champion_before or "none",
        f"promotion.candidate.{cfg.metric}": "none" if value is None else f"{value:.6g}",
        f"promotion.champion.{cfg.metric}": "none" if champion is None else f"{champion:.6g}",
    }.items():
        registry.set_model_version_tag(cfg.model_name, result.candidate, key, val)


def rollback(cfg: RegisterConfig) -> dict[str, str]:
    """Give the champion alias back to the version aliased 'previous'."""
    client = _Registry()
    name = cfg.model_name
    previous = _version_by_alias(client, name, PREVIOUS)
    current = _version_by_alias(client, name, CHAMPION)
    if previous is None:
        raise VisiontuneError(f"{name}: no version has alias 'previous'; nothing to roll back to")
    _set_alias(client, name, CHAMPION, previous.version)
    client.delete_registered_model_alias(name, PREVIOUS)
    if cfg.use_stages:
        _set_stage(client, name, previous.version, "Production", archive=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    demoted = current.version if current else "none"
    client.set_model_version_tag(name, previous.version, "promotion.decision", "restored by rollback")
    client.set_model_version_tag(name, previous.version, "promotion.time", stamp)
    if current is not None:
        client.set_model_version_tag(name, current.version, "promotion.decision", "rolled back")
        client.set_model_version_tag(name, current.version, "promotion.time", stamp)
    return {"model_name": name, "champion": str(previous.version), "demoted": str(demoted)}


@dataclass(frozen=True)
class VersionInfo:
    """A registered version as the server reports it: lineage tags and the metrics it was promoted with."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]


def alias_version(name: str, alias: str) -> VersionInfo:
    """The version models:/NAME@ALIAS points at now, with its tags (metrics are not fetched: {})."""
    client = _Registry()
    found = _version_by_alias(client, name, alias)
    if found is None:
        raise VisiontuneError(
            f"models:/{name}@{alias}: no version of {name!r} has alias {alias!r} at {tracking_uri()}; "
            "register one and promote it, or check the name, the alias and MLFLOW_TRACKING_URI"
        )
    return VersionInfo(name, str(found.version), found.run_id or "", dict(found.tags), {})


def fetch_version(name: str, version: str, dest: Path) -> tuple[Path, VersionInfo]:
    """Download version `version` of `name` into `dest`: (its ONNX file, its VersionInfo)."""
    client = _client()
    try:
        found = client.get_model_version(name, version)
        metrics = dict(client.get_run(found.run_id).data.metrics) if found.run_id else {}
    except Exception as exc:  # an unknown version or an unreachable server
        raise VisiontuneError(
            f"models:/{name}/{version}: not found at {tracking_uri()} ({type(exc).__name__}: {exc}); "
            "check the name, the version and MLFLOW_TRACKING_URI"
        ) from None
    path = download_model(f"models:/{name}/{version}", dest)
    info = VersionInfo(name, str(found.version), found.run_id or "", dict(found.tags), metrics)
    return path, info
