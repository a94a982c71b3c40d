"""Cache keys for the flow's stage tasks: a stage reruns only when what it reads has changed.

A stage's key hashes what `dvc repro` would compare for it (dvc.yaml declares the same inputs,
and a test holds the two together):
- the data: the DVC hash of data.source for prepare; the content of the upstream outputs it
  reads for every later stage (the manifest, the checkpoint, the metrics, ...);
- the params sections it reads, after overrides;
- the stage's code: a hash of the source files it runs, its import closure (codedeps.stage_code,
  the same list as its code deps in dvc.yaml), so a change elsewhere (serve, the CLI) reruns nothing.
Register's key also holds the tracking URI: a new server gets its own registration.

Prefect keeps each result under its key (persisted under <root>/.flow/results). A stamp beside
them records which key produced the files now on disk and what those files looked like, so a
stage whose outputs were deleted, or rewritten by `dvc repro`, runs again instead of trusting a
cached result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from visiontune.components.config import Params

from . import codedeps
from .stages import Layout


@dataclass(frozen=True)
class StageInputs:
    params: tuple[str, ...]  # 'section' or 'section.key', as dvc.yaml's params lists them
    reads: tuple[str, ...]  # files or folders under the layout root, as dvc.yaml's deps list them


STAGE_INPUTS: dict[str, StageInputs] = {
    "prepare": StageInputs(
        (
            "base",
            "data",
            "validate.max_pixels",
            "validate.near_duplicate_distance",
            "validate.near_duplicate_pixel_distance",
        ),
        (),
    ),
    "validate": StageInputs(("base.seed", "model.name", "model.image_size", "validate"), ("prepare",)),
    "train": StageInputs(("base", "model", "train"), ("prepare", "validate")),
    "evaluate": StageInputs(
        ("evaluate",),
        ("prepare", "train/model.safetensors", "train/checkpoint.json", "train/history.csv", "validate"),
    ),
    "export": StageInputs(
        ("export", "data.source"),
        (
            "prepare",
            "train/model.safetensors",
            "train/checkpoint.json",
            "train/adapter",
            "validate",
            "evaluate/metrics.json",
        ),  # fmt: skip
    ),
    "register": StageInputs(
        ("register",),
        ("validate", "train/model.safetensors", "evaluate/metrics.json", "export/model.onnx", "export/hf"),
    ),
}


def code_version(stage: str) -> str:
    """SHA-256 over the source files `stage` runs (its import closure), in a stable order."""
    digest = hashlib.sha256()
    for relative in codedeps.stage_code(stage):
        digest.update(f"{relative}\0".encode())
        digest.update(codedeps.source(relative).read_bytes())
    return digest.hexdigest()


def _section(params: Params, dotted: str):
    section, _, key = dotted.partition(".")
    values = params.model_dump(by_alias=True, mode="json")[section]
    return values[key] if key else values


def _content_digest(path: Path) -> str:
    """SHA-256 of a file, or of every file under a folder with its relative path (dot-files skipped)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: missing; its stage has not run")
    for file in files:
        if file.name.startswith("."):  # DVC's .gitignore files
            continue
        digest.update(f"{file.relative_to(path).as_posix() if file != path else file.name}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_key(stage: str, params: Params, layout: Layout, extra: str = "") -> str:
    """The cache key of `stage` for these params and the upstream outputs now on disk."""
    from .dataversion import source_hash

    inputs = STAGE_INPUTS[stage]
    parts = {
        "stage": stage,
        "code": code_version(stage),
        "params": {name: _section(params, name) for name in inputs.params},
        "reads": {name: _content_digest(layout.root / name) for name in inputs.reads},
        "extra": extra,
    }
    if stage == "prepare":
        parts["data"] = source_hash(params.data.source)
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return f"{stage}-{hashlib.sha256(blob).hexdigest()[:32]}"


def _outputs(stage: str, layout: Layout) -> Path:
    return getattr(layout, stage)


def _fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of the files under a stage's output folder."""
    if not folder.is_dir():
        return ""
    entries = [
        f"{p.relative_to(folder).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _stamp_path(stage: str, layout: Layout) -> Path:
    return layout.root / ".flow" / "stamps" / f"{stage}.json"


def write_stamp(stage: str, layout: Layout, key: str) -> None:
    """Record that the outputs now on disk are what `key` produced."""
    path = _stamp_path(stage, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "outputs": _fingerprint(_outputs(stage, layout))}))


def outputs_current(stage: str, layout: Layout, key: str) -> bool:
    """True when the stage's outputs on disk came from a run with this key and are untouched since."""
    try:
        stamp = json.loads(_stamp_path(stage, layout).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("key") == key and stamp.get("outputs") == _fingerprint(_outputs(stage, layout))


def results_folder(layout: Layout) -> Path:
    """Where Prefect persists the stage results, keyed by cache key."""
    return (layout.root / ".flow" / "results").absolute()
