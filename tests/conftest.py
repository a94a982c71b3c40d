"""Shared fixtures: tiny real image data (scanned digits) and one tiny trained run per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.components.config import Params

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


def write_digits(root: Path, classes=(0, 1, 2), per_class: int = 20, start: int = 0) -> Path:
    """A <root>/<class>/<n>.png folder of real scanned digits from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in classes:
        picks = np.flatnonzero(digits.target == label)[start : start + per_class]
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in picks:
            ink = 255 - np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(ink, mode="L").save(folder / f"{i:04d}.png")
    return root


def tiny_params(source: Path | str, **sections) -> Params:
    """Params for seconds-long runs: 32 px, 1 epoch, a quarter of each class in val and test."""
    raw = {
        "data": {"source": str(source), "val_fraction": 0.25, "test_fraction": 0.25},
        "validate": {"min_per_class": 3},
        "model": {"image_size": 32},
        "train": {"epochs": 1, "batch_size": 16},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Params.model_validate(raw)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A prepared, validated and trained tiny run: (params, layout)."""
    from visiontune.pipelines import stages

    root = tmp_path_factory.mktemp("tiny")
    data = write_digits(root / "raw")
    params = tiny_params(data)
    layout = stages.Layout(root / "prepared")
    for name in ("prepare", "validate", "train"):
        stages.STAGES[name](params, layout)
    return params, layout
