"""The manifest: the one table every stage after prepare reads, and its pandera schema.

Imported by the stages; run nothing here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa

from .errors import reading

SPLITS = ("train", "val", "test")
COLUMNS = ["path", "label", "split", "sha256", "phash", "width", "height", "mode"]


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether path, symlinks resolved, lies in one of roots (themselves resolved)."""
    real = path.resolve()
    return any(real.is_relative_to(root.resolve()) for root in roots)


def outside_reason(name: str, roots: list[Path]) -> str:
    return (
        f"{name!r} resolves outside the dataset's folder ({roots[0]}); move the image into it, or set "
        "data.allow_paths_under to the folder it lives in"
    )


def schema(labels: list[str] | None = None) -> pa.DataFrameSchema:
    """The manifest schema; with `labels`, every label must be one of them."""
    label_checks = [pa.Check.str_length(min_value=1)]
    if labels is not None:
        label_checks.append(pa.Check.isin(labels))
    return pa.DataFrameSchema(
        {
            "path": pa.Column(str, unique=True, checks=pa.Check.str_length(min_value=1)),
            "label": pa.Column(str, checks=label_checks),
            "split": pa.Column(str, checks=pa.Check.isin(SPLITS)),
            "sha256": pa.Column(str, checks=pa.Check.str_matches(r"^[0-9a-f]{64}$")),
            "phash": pa.Column(str, checks=pa.Check.str_matches(r"^[0-9a-f]{16}$")),
            "width": pa.Column(int, checks=pa.Check.gt(0)),
            "height": pa.Column(int, checks=pa.Check.gt(0)),
            "mode": pa.Column(str),
        },
        strict=True,
        ordered=False,
        coerce=False,
    )


def read(path: Path) -> pd.DataFrame:
    """Read a manifest CSV (strings stay strings: labels like '01' keep their zeros); an unreadable
    one is one line naming it and the fix."""
    with reading(path, "manifest", "prepare it again (`visiontune prepare`, or `dvc repro -f prepare`)"):
        frame = pd.read_csv(
            path,
            dtype={"path": str, "label": str, "split": str, "sha256": str, "phash": str, "mode": str},
            keep_default_na=False,
        )
        missing = {"path", "label"} - set(frame.columns)
        if missing:
            raise ValueError(f"no column(s) {sorted(missing)}")
    return frame


def write(frame: pd.DataFrame, path: Path) -> None:
    """Write a manifest CSV with the standard column order."""
    frame[COLUMNS].to_csv(path, index=False)


def class_names(frame: pd.DataFrame) -> list[str]:
    """Sorted class names: the index of each is its model output."""
    return sorted(frame["label"].unique().tolist())
