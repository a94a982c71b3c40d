"""Shared fixtures: tiny real image data (scanned digits) and one tiny trained run per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server with a SQL backend and proxied artifacts, bound to loopback."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),
        start_new_session=True,  # its job workers outlive a plain SIGTERM to the server PID
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def exported(trained):
    """The tiny run evaluated and exported as well: what register and promote need."""
    from visiontune.pipelines import stages

    params, layout = trained
    stages.evaluate(params, layout)
    stages.export(params, layout)
    return params, layout
