"""prepare stage: ingest a source, decode-check every image, split, and write the manifest.

Run as `visiontune prepare` (a dvc.yaml stage) or called by the Prefect flow and tests.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import hf_source, images, manifest
from .config import BaseConfig, DataConfig, ValidateConfig
from .duplicates import find_duplicates, near_contents, perceptual_hash, place, write_record
from .errors import VisiontuneError
from .images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageFormatError,
    ImageTooLargeError,
    load_image,
    sha256_file,
    source_mode,
)
from .splits import SplitRule, assign_splits, read_split_record, write_split_record

BUILTIN_DIGITS = "builtin:digits"


class SourceError(VisiontuneError, ValueError):
    """The data source cannot be read; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class PrepareResult:
    manifest: str
    manifest_sha256: str
    n_images: int
    n_quarantined: int
    classes: list[str]
    split_counts: dict[str, int]
    n_duplicate_groups: int = 0  # exact and confirmed near groups, each kept in one split
    skipped: list[str] = field(default_factory=list)


def materialize_digits(dest: Path) -> Path:
    """Write scikit-learn's 1,797 scanned 8×8 digits as PNGs under dest/<digit>/, dark ink on white."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = dest / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        ink = 255 - np.round(pixels * (255 / 16)).astype(np.uint8)  # 0..16 ink levels → grey
        Image.fromarray(ink, mode="L").save(folder / f"{i:04d}.png")
    return dest


def _display_path(path: Path) -> str:
    """Path as stored in the manifest: relative to the project (cwd) when inside it."""
    path = path.absolute()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def scan_folder(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Rows (path, label) for <root>/<class>/**/<image>; also the files that were skipped, and the
    symlinked folders, which are not followed (a link may point anywhere on the machine)."""
    rows, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        skipped += [
            f"{_display_path(Path(dirpath) / d)}: a symlinked folder, not followed; copy its images in, "
            "or list them in a CSV source"
            for d in sorted(links)
            if not d.startswith(".")
        ]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in links)
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not rel.parts:  # a file beside the class folders has no class
                skipped.append(f"{_display_path(path)}: not inside a class folder")
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(f"{_display_path(path)}: not an image extension")
            else:
                rows.append({"path": _display_path(path), "label": rel.parts[0]})
    if not rows:
        raise SourceError(
            f"{root}: no images found; expected <root>/<class>/<image> with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return pd.DataFrame(rows, columns=["path", "label"]), skipped


def read_csv_source(csv_path: Path, roots: list[Path] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Rows (path, label[, split]) from a CSV manifest, relative paths from the CSV's folder; rows
    whose path resolves outside `roots` (default: the CSV's folder) are left out and listed."""
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise SourceError(
            f"{csv_path}: missing column(s) {sorted(missing)}; the header must be path,label[,split]"
        )
    extra = set(frame.columns) - {"path", "label", "split"}
    if extra:
        raise SourceError(f"{csv_path}: unknown column(s) {sorted(extra)}; allowed: path,label,split")
    for column in ("path", "label"):
        blank = frame.index[frame[column].str.strip() == ""]
        if len(blank):
            rows = ", ".join(str(i + 2) for i in blank[:5])  # +2: header line, 1-based
            raise SourceError(f"{csv_path}: empty {column!r} on line(s) {rows}; fill it in")
    if "split" in frame:
        bad = frame.index[~frame["split"].isin(("", *manifest.SPLITS))]
        if len(bad):
            i = bad[0]
            raise SourceError(
                f"{csv_path}: line {i + 2}: split {frame.at[i, 'split']!r}; "
                f"use one of {', '.join(manifest.SPLITS)} or leave it empty"
            )
    base = csv_path.parent
    roots = roots or [base]
    files = [p if p.is_absolute() else base / p for p in map(Path, frame["path"])]
    keep = [manifest.inside(file, roots) for file in files]
    skipped = [
        f"{csv_path}: line {i + 2}: {manifest.outside_reason(name, roots)}"
        for i, (name, ok) in enumerate(zip(frame["path"], keep, strict=True))
        if not ok
    ]
    frame["path"] = [_display_path(file) for file in files]
    return frame[keep].reset_index(drop=True), skipped


def _inspect(path: str, max_pixels: int) -> dict:
    try:
        # a full decode (readable reasons); the hash computed while the decode budget holds its bytes
        facts = load_image(path, max_pixels, then=lambda rgb: (perceptual_hash(rgb), *rgb.size))
        phash, width, height = facts
        return {
            "sha256": sha256_file(Path(path)),
            "phash": phash,
            "width": width,
            "height": height,
            "mode": source_mode(path),
        }
    except (ImageDecodeError, OSError) as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        return {"error": reason, "kind": _quarantine_kind(exc)}


def _quarantine_kind(exc: Exception) -> str:
    if isinstance(exc, ImageTooLargeError):
        return "too large"
    return "format not accepted" if isinstance(exc, ImageFormatError) else "unreadable"


def _dvc_outs(root: Path) -> list[Path]:
    """Outputs of the stages in root/dvc.yaml and root/dvc.lock, as absolute paths."""
    import yaml

    outs = []
    for name in ("dvc.yaml", "dvc.lock"):
        try:
            stages = (yaml.safe_load((root / name).read_text()) or {}).get("stages") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        for stage in stages.values() if isinstance(stages, dict) else ():
            if not isinstance(stage, dict):
                continue
            wdir = root / str(stage.get("wdir", "."))
            for kind in ("outs", "metrics", "plots"):
                for out in stage.get(kind) or ():
                    if isinstance(out, dict):  # {path: options} in dvc.yaml, {path: ..., md5: ...} in .lock
                        out = out.get("path", next(iter(out), None))
                    if isinstance(out, str):
                        outs.append(Path(os.path.normpath(wdir / out)))
    return outs


def dvc_tracked(path: Path) -> tuple[Path, Path, Path] | None:
    """(repo root, what to `dvc pull`, the file that tracks it) when DVC tracks path; else None.

    Tracked: a `<path>.dvc` beside it (or beside a folder that holds it), or a stage output in
    the repo's dvc.yaml/dvc.lock. Reads files only; imports no DVC.
    """
    path = Path(os.path.abspath(path))
    root = next((p for p in path.parents if (p / ".dvc").is_dir()), None)
    if root is None:
        return None
    for p in (path, *path.parents):  # the source itself or a tracked folder that holds it
        if p == root:
            break
        dvc_file = p.with_name(p.name + ".dvc")
        if dvc_file.is_file():
            return root, dvc_file, dvc_file
    for out in _dvc_outs(root):
        if path == out or out in path.parents:
            return root, out, root / "dvc.yaml"
    return None


def pull_command(root: Path, target: Path) -> str:
    """The `dvc pull` to type from the current folder."""
    cwd = Path.cwd().absolute()
    if cwd == root or root in cwd.parents:
        return f"dvc pull {os.path.relpath(target, cwd)}"
    return f"cd {root} && dvc pull {target.relative_to(root)}"


def missing_tracked_data(path: Path, subject: str | None = None) -> None:
    """Raise SourceError naming the `dvc pull` to run when path is tracked by DVC but not here.

    Called only once a source turned out missing or empty, so a normal run pays nothing for it.
    """
    tracked = dvc_tracked(path)
    if tracked is None:
        return
    root, target, tracker = tracked
    path = Path(os.path.abspath(path))
    if subject is None:
        subject = f"data.source: {_display_path(path)} {'has no images' if path.is_dir() else 'is missing'}"
    raise SourceError(
        f"{subject}: tracked by DVC ({_display_path(tracker)}) but not present in this workspace; "
        f"fetch it from the DVC remote with `{pull_command(root, target)}`, then run again"
    )


def resolve_source(data: DataConfig, out: Path) -> tuple[pd.DataFrame, list[str]]:
    """Turn data.source into rows of (path, label[, split])."""
    source = data.source
    if source == BUILTIN_DIGITS:
        return scan_folder(materialize_digits(out / "builtin" / "digits"))
    if source.startswith("builtin:"):
        raise SourceError(f"data.source: unknown {source!r}; the built-in dataset is {BUILTIN_DIGITS}")
    path = Path(source)
    roots = [path if path.is_dir() else path.parent]  # where the dataset's image paths may point
    if data.allow_paths_under:
        roots.append(Path(data.allow_paths_under))
    if hf_source.is_hf_source(path):  # images written once under out/hf/, then read as a folder's
        rows, skipped = hf_source.read(path, data.image_column, data.label_column, out / "hf", roots)
        rows["path"] = [_display_path(Path(p)) for p in rows["path"]]
        return rows, skipped
    if path.is_dir():
        try:
            return scan_folder(path)
        except SourceError:
            missing_tracked_data(path)  # an empty folder that `dvc pull` would fill
            raise
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_csv_source(path, roots)
    if not path.exists():
        missing_tracked_data(path)
    raise SourceError(
        f"data.source: {source!r} is neither an image folder, a .csv file nor a Hugging Face dataset; "
        f"set it to a folder (<root>/<class>/...), a CSV (path,label[,split]), a folder saved with "
        f"`datasets`' save_to_disk, parquet files, or {BUILTIN_DIGITS}"
    )


def _inspect_all(rows: pd.DataFrame, source: str, max_pixels: int) -> tuple[pd.DataFrame, list[dict]]:
    """The decodable rows with their facts (sha256, size, ...) in path order, and the quarantined ones."""
    with ThreadPoolExecutor(max_workers=images.decode_threads()) as pool:
        facts = list(pool.map(lambda p: _inspect(p, max_pixels), rows["path"]))
    info = pd.DataFrame(facts, index=rows.index)
    if "error" not in info:
        info["error"] = info["kind"] = None
    bad = info["error"].notna()
    quarantined = [
        {"path": p, "reason": r, "kind": k}
        for p, r, k in zip(rows["path"][bad], info["error"][bad], info["kind"][bad], strict=True)
    ]
    good = pd.concat([rows[~bad], info[~bad].drop(columns=["error", "kind"])], axis=1)
    if good.empty:
        first = Path(rows["path"].iloc[0])
        if not first.exists():  # a CSV in git whose images DVC tracks but nobody pulled
            subject = f"data.source: {source!r}: its images ({_display_path(first)}, ...) are missing"
            missing_tracked_data(first, subject)
        raise SourceError(f"data.source: {source!r}: none of {len(rows)} images could be decoded")
    return good.sort_values("path", kind="stable").reset_index(drop=True), quarantined


def prepare(data: DataConfig, base: BaseConfig, check: ValidateConfig, out: Path) -> PrepareResult:
    """Ingest data.source into out/manifest.csv; unreadable images, and those over
    validate.max_pixels, go to out/quarantine.json with their reason.

    Splits are stratified and kept: out/splits.json records the split of every image's content,
    and the next run reads it back first (see `assign_splits`). Added images fill each class's
    quotas, so no recorded image moves; removed images drop out of the record. A changed
    base.seed, data.val_fraction, data.test_fraction or data.min_eval_per_class sets the record
    aside and draws every split anew. Without a record (first run, fresh clone before
    `dvc pull` of this folder) splits are drawn from the images and the seed alone, the same
    on every machine. Duplicates are searched for first, with the validate settings, so that
    each confirmed group of near duplicates takes one split; what the search found is kept in
    out/duplicates.json for validate.
    """
    out.mkdir(parents=True, exist_ok=True)
    rule = SplitRule(base.seed, data.val_fraction, data.test_fraction, data.min_eval_per_class)
    recorded = read_split_record(out, rule)  # read before anything in out is rewritten
    rows, skipped = resolve_source(data, out)
    good, quarantined = _inspect_all(rows, data.source, check.max_pixels)
    good["width"] = good["width"].astype(int)
    good["height"] = good["height"].astype(int)
    settings = check.duplicate_search()
    found = find_duplicates(good, **settings)
    good["split"] = assign_splits(good, recorded, rule, near_contents(found, good))
    manifest.schema().validate(good, lazy=True)
    manifest_path = out / "manifest.csv"
    manifest.write(good, manifest_path)
    manifest_sha256 = sha256_file(manifest_path)
    write_split_record(out, good, rule)
    write_record(out, place(found, good), settings, manifest_sha256)
    (out / "quarantine.json").write_text(json.dumps(quarantined, indent=2))
    result = PrepareResult(
        manifest=_display_path(manifest_path),
        manifest_sha256=manifest_sha256,
        n_images=len(good),
        n_quarantined=len(quarantined),
        classes=manifest.class_names(good),
        split_counts={s: int((good["split"] == s).sum()) for s in manifest.SPLITS},
        n_duplicate_groups=sum(g["kind"] != "similar" for g in found),
        skipped=skipped,
    )
    (out / "prepare.json").write_text(json.dumps(asdict(result), indent=2))
    return result
