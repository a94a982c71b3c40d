"""`visiontune drift`: check a batch of newly collected images against the reference an exported
model carries, and write what was found.

The images (a folder, a CSV with a `path` column, or a manifest) go through the model's own
preprocessing and its ONNX file, which gives the logits and the penultimate-layer embedding in one
run; `drift.check` tests them against the val split's reference. Writes drift.json, drift.md and
most_shifted.png; the CLI turns the flag into an exit code and tracking logs it to MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import drift, images, metrics
from .errors import VisiontuneError
from .export import REFERENCE_FILE
from .predict import OnnxClassifier

BATCH = 64


@dataclass(frozen=True)
class DriftCheck:
    """One check's outcome and where it was written."""

    result: drift.DriftResult
    paths: list[str]  # the images tested, in window order
    unreadable: list[dict]  # {path, error} of files that could not be decoded (not tested)
    predicted: dict[str, int]  # predicted-class counts in the window
    reference_counts: dict[str, int]  # the reference's
    files: dict[str, str]  # drift.json, drift.md, most_shifted.png


@dataclass(frozen=True)
class ModelCheck:
    """A check of the model `--model` names: the check, and for a registered version its name,
    version and the MLflow run the check was logged as."""

    check: DriftCheck
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def check_model(model: str, source: Path, out: Path, alpha: float, permutations: int) -> ModelCheck:
    """Check `source` against an exported ONNX file (or folder), or against a registered version
    (models:/NAME@ALIAS or /VERSION: downloaded, checked, and the check logged to MLflow under it)."""
    if not model.startswith("models:/"):
        return ModelCheck(run(Path(model), source, out, alpha, permutations))
    import tempfile

    from . import tracking

    with tempfile.TemporaryDirectory(prefix="visiontune-drift-") as tmp:
        name, version, path = tracking.registered_onnx(model, Path(tmp))
        check = run(path, source, out, alpha, permutations)
    return ModelCheck(check, name, version, tracking.log_drift(name, version, check))


def reference_beside(onnx: Path) -> Path:
    """The drift reference exported with `onnx`: beside it, or in the extra_files/ folder MLflow
    keeps it in for a registered version."""
    onnx = Path(onnx)
    folder = onnx if onnx.is_dir() else onnx.parent
    for candidate in (folder / REFERENCE_FILE, folder / "extra_files" / REFERENCE_FILE):
        if candidate.is_file():
            return candidate
    raise VisiontuneError(
        f"{folder}: no {REFERENCE_FILE} beside the model; export it again with this visiontune "
        "(`visiontune export`), which writes it from the val split"
    )


def new_images(source: Path) -> list[str]:
    """The image paths of a folder (recursively), or of a CSV's `path` column (a manifest is one;
    relative paths are read from the CSV's folder)."""
    source = Path(source)
    if source.is_dir():
        found = sorted(
            str(p) for p in source.rglob("*") if p.suffix.lower() in images.IMAGE_EXTENSIONS and p.is_file()
        )
    elif source.is_file() and source.suffix.lower() == ".csv":
        frame = pd.read_csv(source)
        if "path" not in frame.columns:
            raise VisiontuneError(
                f"{source}: no `path` column (found {list(frame.columns)}); give a folder of images, a "
                "CSV with a path column, or a manifest"
            )
        found = [str(p if Path(p).is_absolute() else source.parent / p) for p in frame["path"].astype(str)]
    else:
        raise VisiontuneError(f"{source}: not a folder or a .csv file; give the new images' folder or a CSV")
    if len(found) < 2:
        raise VisiontuneError(f"{source}: {len(found)} image(s); a drift check needs at least 2")
    return found


def run(model: Path, source: Path, out: Path, alpha: float = 0.05, permutations: int = 500) -> DriftCheck:
    """Test the images of `source` against the reference of the model at `model` (an ONNX file or
    its folder); write the report into `out`."""
    classifier = OnnxClassifier(model)
    reference = drift.Reference.load(reference_beside(classifier.path))
    if list(reference.class_names) != classifier.class_names:
        raise VisiontuneError(
            f"{classifier.path}: its classes {classifier.class_names} differ from its drift reference's "
            f"{list(reference.class_names)}; export the model again"
        )
    paths, unreadable, probs, embeddings = _score(classifier, new_images(source))
    if len(paths) < 2:
        raise VisiontuneError(f"{source}: {len(paths)} readable image(s); a drift check needs at least 2")
    result = drift.check(reference, embeddings, probs, alpha=alpha, permutations=permutations)
    names = classifier.class_names
    check = DriftCheck(
        result=result,
        paths=paths,
        unreadable=unreadable,
        predicted=dict(zip(names, np.bincount(probs.argmax(1), minlength=len(names)).tolist(), strict=True)),
        reference_counts=dict(zip(names, reference.pred_counts.tolist(), strict=True)),
        files={},
    )
    files = _write(check, classifier, source, out)
    return DriftCheck(**{**check.__dict__, "files": files})


def _score(classifier: OnnxClassifier, paths: list[str]):
    """(readable paths, unreadable {path, error}, softmax outputs, embeddings), in batches."""
    kept, unreadable, probs, embeddings = [], [], [], []
    for start in range(0, len(paths), BATCH):
        pixels = []
        for path in paths[start : start + BATCH]:
            try:
                pixels.append(images.load_resized(path, classifier.size))
                kept.append(path)
            except images.ImageDecodeError as exc:
                unreadable.append({"path": path, "error": str(exc)})
        if pixels:
            logits, emb = classifier.logits_and_embeddings(np.stack(pixels))
            probs.append(metrics.softmax(logits.astype(np.float64)))
            embeddings.append(emb)
    if not probs:
        return kept, unreadable, np.zeros((0, len(classifier.class_names))), np.zeros((0, 0))
    return kept, unreadable, np.concatenate(probs), np.concatenate(embeddings)


def _write(check: DriftCheck, classifier: OnnxClassifier, source: Path, out: Path) -> dict[str, str]:
    """drift.json (everything), drift.md (to read) and most_shifted.png."""
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    r = check.result
    shifted = [check.paths[i] for i in r.most_shifted]
    summary = {
        **r.to_dict(),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(classifier.path),
        "source": str(source),
        "images": len(check.paths),
        "unreadable": check.unreadable,
        "most_shifted_paths": shifted,
        "predicted_counts": check.predicted,
        "reference_predicted_counts": check.reference_counts,
    }
    files = {"json": out / "drift.json", "markdown": out / "drift.md"}
    files["json"].write_text(json.dumps(summary, indent=2))
    if shifted:
        titles = [
            f"{Path(p).name}\n{s:.2f}× typical distance" for p, s in zip(shifted, r.shift_scores, strict=True)
        ]
        files["png"] = plots.image_grid(
            shifted,
            titles,
            "the images farthest from the reference (val split) images",
            out / "most_shifted.png",
        )
    files["markdown"].write_text(markdown(summary))
    return {k: str(v) for k, v in files.items()}


def markdown(summary: dict) -> str:
    """The report: the verdict, each test's statistic, p-value and effect, the class counts."""
    verdict = "**shift detected**" if summary["drift"] else "no shift detected"
    lines = [
        f"# Drift check: {verdict}",
        "",
        f"{summary['images']} images from `{summary['source']}` against the val-split reference of "
        f"`{summary['model']}`, {summary['checked_at']}. The window is flagged when the smallest p-value, "
        f"× 3 for the three tests, is below α = {summary['alpha']}: here {summary['p_value']:.4g}.",
        "",
        "| test | what it compares | statistic | p-value | effect | below α on its own |",
        "|---|---|---:|---:|---:|---|",
    ]
    what = {
        "mmd": "embeddings (kernel two-sample test)",
        "ks": "softmax outputs, per class (KS, Bonferroni)",
        "chi2": "predicted-class counts (chi-squared)",
    }
    for name, t in summary["tests"].items():
        lines.append(
            f"| {name} | {what.get(name, name)} | {t['statistic']:.4g} | {t['p_value']:.4g} | "
            f"{t['effect']:.3g} ({t['effect_name']}) | {'yes' if t['fired'] else 'no'} |"
        )
    lines += ["", "| class | predicted here | predicted in the reference |", "|---|---:|---:|"]
    for name, n in summary["predicted_counts"].items():
        lines.append(f"| {name} | {n} | {summary['reference_predicted_counts'][name]} |")
    if summary["most_shifted_paths"]:
        lines += ["", "The images farthest from every reference image (most_shifted.png):", ""]
        lines += [
            f"- `{p}`: {s:.2f}× the reference's typical nearest-neighbour distance"
            for p, s in zip(summary["most_shifted_paths"], summary["shift_scores"], strict=True)
        ]
    if summary["unreadable"]:
        lines += ["", f"{len(summary['unreadable'])} file(s) could not be decoded and were not tested:", ""]
        lines += [f"- `{u['path']}`: {u['error']}" for u in summary["unreadable"]]
    return "\n".join(lines) + "\n"
