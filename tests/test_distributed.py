"""Data-parallel training: train.nproc processes under torchrun with gloo on CPU.

train.device is cpu here on any machine (a 1-GPU machine has no cuda:1 for rank 1); NCCL on GPUs
is tests/test_gpu.py's.

Each test launches real processes (`visiontune train` → torchrun → one `visiontune train` per
rank), as `dvc repro` and the flow do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from conftest import tiny_params, write_digits
from visiontune.pipelines import stages

BIN = Path(sys.executable).parent
TOLERANCE = 1e-4  # max weight difference, 1 vs 2 processes, after the same steps (relative above 1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """39 digits of 3 classes, prepared and validated once (21 train images: batches 8, 8, 5)."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_digits(root / "raw", per_class=13)
    params = tiny_params(data, validate={"label_audit": False})
    layout = stages.Layout(root / "prepared")
    stages.prepare(params, layout)
    stages.validate(params, layout)
    return params, layout


def _train(prepared, tmp_path: Path, nproc: int, **train) -> tuple[dict, dict]:
    params, layout = prepared
    copy = stages.Layout(tmp_path / f"n{nproc}")
    copy.root.mkdir(parents=True)
    os.symlink(layout.prepare.absolute(), copy.prepare)
    os.symlink(layout.validate.absolute(), copy.validate)
    cfg = params.train.model_copy(update={"nproc": nproc, "device": "cpu", **train})
    stages.train(params.model_copy(update={"train": cfg}), copy)
    return load_file(str(copy.train / "model.safetensors")), json.loads(
        (copy.train / "train.json").read_text()
    )


def _max_diff(a: dict, b: dict) -> float:
    """Max abs difference, relative for values above 1 (the linear probe's feature statistics
    reach hundreds, and float32 sums over 4 or 8 images differ in their last bits)."""
    assert a.keys() == b.keys()
    return max(
        float((np.abs(a[k].astype(np.float64) - b[k]) / np.maximum(1.0, np.abs(a[k]))).max()) for k in a
    )


def test_two_processes_take_the_same_steps_as_one(prepared, tmp_path):
    """Same seed and global batch: a ViT (no batch norm) ends with the same weights, augmentation on."""
    vit = {"name": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32}
    params, layout = prepared
    prepared = (params.model_copy(update={"model": params.model.model_copy(update=vit)}), layout)
    options = {
        "epochs": 2,
        "batch_size": 8,
        "grad_accum": 2,
        "hflip": True,
        "color_jitter": 0.2,
        "patience": 5,
    }
    one, one_info = _train(prepared, tmp_path, 1, **options)
    two, two_info = _train(prepared, tmp_path, 2, **options)
    assert _max_diff(one, two) < TOLERANCE
    assert one_info["best_val_loss"] == pytest.approx(two_info["best_val_loss"], abs=1e-4)
    assert two_info["train_images"] == one_info["train_images"] and two_info["epochs_run"] == 2


@pytest.mark.parametrize("method", ["linear", "lora"])
def test_linear_probe_and_lora_train_under_ddp(prepared, tmp_path, method):
    one, _ = _train(prepared, tmp_path, 1, method=method)
    two, info = _train(prepared, tmp_path, 2, method=method)
    assert info["method"] == method and info["trainable_percent"] < 5
    if method == "linear":  # the frozen backbone's batch norm uses its running statistics: same steps
        assert _max_diff(one, two) < TOLERANCE


def test_a_dead_rank_fails_the_stage_and_the_run_resumes(prepared, tmp_path):
    import psutil

    params, layout = prepared
    project = tmp_path / "project"
    (project / "prepared").mkdir(parents=True)
    for name in ("prepare", "validate"):
        os.symlink((layout.root / name).absolute(), project / "prepared" / name)
    raw = params.model_dump(by_alias=True, mode="json")
    raw["train"].update(nproc=2, epochs=12, patience=12, device="cpu")
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    command = [str(BIN / "visiontune"), "train", "--root", "prepared"]
    log = project / "train.log"
    proc = subprocess.Popen(
        command, cwd=project, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        saved = project / "prepared" / "train" / "resume" / "state.json"
        deadline = time.monotonic() + 180
        while not saved.exists():  # one epoch finished and kept
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in children if "torch.distributed.run" not in p.cmdline() and "train" in p.cmdline()]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=120)
        waited = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert code == 1 and "data-parallel processes (train.nproc) failed" in output, output[-3000:]
    assert waited < 60  # the survivor is stopped, not left waiting in a collective

    done = subprocess.run([*command, "--resume"], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resuming after epoch" in done.stdout + done.stderr
    assert json.loads((project / "prepared" / "train" / "train.json").read_text())["epochs_run"] == 12
