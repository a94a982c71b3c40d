"""Hugging Face datasets as a data source: a dataset saved with `save_to_disk`, or parquet files.

Read with pyarrow alone (no `datasets` import): the arrow or parquet tables, the column types
the `datasets` library writes beside them (`dataset_info.json`, or the parquet schema's
"huggingface" metadata) for ClassLabel names. Each image is written once as a file under the
prepared data, so the rest of the prepare stage (decode checks, hashes, splits, manifest) runs
exactly as it does for an image folder.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from . import manifest
from .errors import VisiontuneError
from .images import FORMATS, IMAGE_EXTENSIONS

_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}


class HfSourceError(VisiontuneError, ValueError):
    """A Hugging Face dataset that cannot be read; the message names the file, the field and the fix."""


def is_hf_source(path: Path) -> bool:
    """True for a `save_to_disk` folder (a Dataset or a DatasetDict), a .parquet file, or a folder
    whose files are parquet (searched below it, the Hub's data/ layout included) and no images."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    if next(path.rglob("*.parquet"), None) is None:
        return False
    files = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return next(files, None) is None  # an image folder with a stray parquet file stays a folder


SPLIT_NAMES = {
    "train": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}


def read(
    path: Path, image_column: str, label_column: str, dest: Path, roots: list[Path] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Rows (path, label, split) for every image of the dataset at path, written under
    dest/<label>/; also the rows that were skipped (no label). Files under dest from an earlier
    read that this dataset no longer holds are removed, so dest always mirrors the dataset.

    The dataset's own splits are kept as given splits (see `given_splits`); rows of any other
    split, or of a dataset without splits, get "" and are split as a folder's images are.

    An image given as a path must resolve inside `roots` (default: the dataset's folder); other
    rows are skipped with the reason, so no file elsewhere on the machine is copied in.
    """
    roots = roots or [path if path.is_dir() else path.parent]
    tables = _tables(path)
    given = given_splits([split for _, _, _, split in tables])
    rows, skipped, written = [], [], set()
    index = 0  # across all files: each image's file name under dest starts with it
    for source, table, features, split in tables:
        _check_columns(source, table.column_names, image_column, label_column)
        names = _class_names(features.get(label_column))
        row = 0
        for batch in table.select([image_column, label_column]).to_batches(max_chunksize=256):
            for image, label in zip(*(column.to_pylist() for column in batch.columns), strict=True):
                where = f"{source}: row {row}"
                label = _label_name(label, names, where, label_column)
                outside = _outside(image, source, roots)
                if label is None:
                    skipped.append(f"{where}: no label ({label_column} is empty or -1)")
                elif outside:
                    skipped.append(f"{where}: {image_column} {outside}")
                else:
                    target = _write_image(image, dest / _safe(label), index, source, where, image_column)
                    written.add(target)
                    rows.append({"path": target.as_posix(), "label": label, "split": given.get(split, "")})
                row, index = row + 1, index + 1
    _remove_stale(dest, written)
    if not rows:
        outside = sum("resolves outside the dataset's folder" in reason for reason in skipped)
        raise HfSourceError(
            f"{path}: the dataset holds no usable images ({len(skipped) - outside} rows without a label, "
            f"{outside} naming a file outside the dataset's folder{'' if not outside else ': ' + skipped[0]})"
        )
    return pd.DataFrame(rows, columns=["path", "label", "split"]), skipped


def given_splits(names: list[str | None]) -> dict[str | None, str]:
    """The manifest split each of the dataset's split names is given.

    validation (val, valid, dev) and test keep their role. train keeps it only when the dataset
    also gives validation and test images; otherwise its rows are drawn like a folder's, so that
    the missing split is filled from them (and a test split smaller than data.test_fraction is
    topped up). Any other name, or no split at all, is drawn.
    """
    roles = {SPLIT_NAMES[n.lower()] for n in names if n and n.lower() in SPLIT_NAMES}
    given = {n: SPLIT_NAMES[n.lower()] for n in names if n and n.lower() in SPLIT_NAMES}
    if not {"val", "test"} <= roles:
        given = {n: role for n, role in given.items() if role != "train"}
    return given


def _tables(path: Path) -> list[tuple[Path, object, dict, str | None]]:
    """(file, arrow table, features as `datasets` wrote them, split name or None) for every data
    file of the source. A parquet file's split is the Hub's: data/<split>-00000-of-N.parquet or
    <split>/....parquet."""
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits") or []
        return [(*t, split) for split in splits for t in _saved_dataset(path / split)]
    if path.is_dir() and (path / "state.json").is_file():
        return [(*t, None) for t in _saved_dataset(path)]
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    return [(*_parquet(f), _parquet_split(f)) for f in files]


def _parquet_split(file: Path) -> str | None:
    for name in (file.stem.split("-")[0], file.parent.name):
        if name.lower() in SPLIT_NAMES:
            return name
    return None


def _saved_dataset(folder: Path) -> list[tuple[Path, object, dict]]:
    """The arrow files `Dataset.save_to_disk` wrote (an IPC stream each) and its features."""
    import pyarrow as pa

    state = _json(folder / "state.json")
    features = (_json(folder / "dataset_info.json") if (folder / "dataset_info.json").is_file() else {}).get(
        "features"
    ) or {}
    tables = []
    for entry in state.get("_data_files") or []:
        file = folder / entry["filename"]
        try:
            with pa.memory_map(str(file)) as source:
                tables.append((file, pa.ipc.open_stream(source).read_all(), features))
        except (OSError, pa.ArrowInvalid) as exc:
            raise HfSourceError(
                f"{file}: not a readable arrow file ({exc}); save the dataset again with "
                "`Dataset.save_to_disk`, or `dvc pull` it if DVC tracks it"
            ) from None
    return tables


def _parquet(file: Path) -> tuple[Path, object, dict]:
    """A parquet file's table and the features `datasets` keeps in its schema metadata, if any."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowInvalid) as exc:
        raise HfSourceError(f"{file}: not a readable parquet file ({exc}); write it again") from None
    meta = (table.schema.metadata or {}).get(b"huggingface")
    features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}
    return file, table, features


def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise HfSourceError(
            f"{file}: unreadable ({exc}); save the dataset again with `save_to_disk`"
        ) from None


def _check_columns(source: Path, columns: list[str], image_column: str, label_column: str) -> None:
    for field, column, what in (
        ("data.image_column", image_column, "images"),
        ("data.label_column", label_column, "labels"),
    ):
        if column not in columns:
            raise HfSourceError(
                f"{source}: no column {column!r} ({field}); its columns are {', '.join(columns)}: "
                f"set {field} to the one that holds the {what}"
            )


def _class_names(feature) -> list[str] | None:
    """The names of a ClassLabel feature; None for any other type."""
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        return [str(n) for n in feature.get("names") or []] or None
    return None


def _label_name(value, names: list[str] | None, where: str, column: str) -> str | None:
    """The class name of one label: ClassLabel names are used when present; None for no label."""
    if value is None or (isinstance(value, int) and value < 0 and names is not None):
        return None
    if names is not None:
        if not isinstance(value, int) or value >= len(names):
            raise HfSourceError(
                f"{where}: {column} {value!r} is not one of the {len(names)} ClassLabel names; "
                "fix the label or the dataset's ClassLabel feature"
            )
        return names[value]
    label = str(value).strip()
    return label or None


def _safe(name: str) -> str:
    """A class name as one folder name: path separators and leading dots replaced."""
    return re.sub(r"[/\\\x00]", "_", name).lstrip(".") or "_"


def _image_bytes(image, source: Path, where: str, column: str) -> tuple[bytes, str]:
    """The encoded bytes of one image cell and its original file name ('' when none): an Image
    feature's {bytes, path}, raw bytes, or a path (relative to the data file's folder)."""
    if isinstance(image, dict):
        data, name = image.get("bytes"), image.get("path") or ""
        if data is None and name:
            data = _read_path(name, source, where, column)
    elif isinstance(image, bytes | bytearray):
        data, name = bytes(image), ""
    elif isinstance(image, str):
        data, name = _read_path(image, source, where, column), image
    else:
        data, name = None, ""
    if not data:
        raise HfSourceError(
            f"{where}: {column} holds no image ({type(image).__name__}); it must be an Image feature, "
            f"encoded image bytes or a file path: set data.image_column to the image column"
        )
    return data, Path(name).name


def _file(name: str, source: Path) -> Path:
    return Path(name) if Path(name).is_absolute() else source.parent / name


def _outside(image, source: Path, roots: list[Path]) -> str | None:
    """Why an image cell's path may not be read (it resolves outside roots), or None."""
    if isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
        name = image["path"]
    elif isinstance(image, str):
        name = image
    else:
        return None
    return None if manifest.inside(_file(name, source), roots) else manifest.outside_reason(name, roots)


def _read_path(name: str, source: Path, where: str, column: str) -> bytes:
    file = _file(name, source)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise HfSourceError(
            f"{where}: {column} names {name!r}, which cannot be read ({exc.strerror}); "
            "save the dataset with its images embedded (`save_to_disk` does) or put the file there"
        ) from None


def _write_image(image, folder: Path, index: int, source: Path, where: str, column: str) -> Path:
    """Write one image's bytes unchanged as folder/<row>-<name> (once: equal bytes are not rewritten)."""
    data, name = _image_bytes(image, source, where, column)
    if Path(name).suffix.lower() not in {*_EXTENSIONS.values(), ".jpeg", ".tiff"}:
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                kind = img.format or ""
        except (UnidentifiedImageError, OSError):
            kind = ""  # written as it is; the decode check quarantines it with the reason
        name = f"{Path(name).stem or 'image'}{_EXTENSIONS.get(kind, '.img')}"
    target = folder / f"{index:06d}-{_safe(name)}"
    if not (target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data):
        folder.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target


def _remove_stale(dest: Path, written: set[Path]) -> None:
    """Delete files under dest (visiontune's own copies) that the dataset no longer holds."""
    if not dest.is_dir():
        return
    for file in dest.rglob("*"):
        if file.is_file() and file not in written:
            file.unlink()
    for folder in sorted((p for p in dest.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
