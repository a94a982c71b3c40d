"""A training run killed with SIGKILL resumes from its last finished epoch and ends where an
uninterrupted run of the same seed ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_params, write_digits
from visiontune.pipelines import stages

EXE = str(Path(sys.executable).with_name("visiontune"))


@pytest.fixture
def project(tmp_path):
    data = write_digits(tmp_path / "raw", classes=(0, 1, 2), per_class=20)
    # on the CPU: a resumed run matches an uninterrupted one only with deterministic kernels
    params = tiny_params(data, train={"epochs": 6, "patience": 10, "device": "cpu"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    layout = stages.Layout(tmp_path / "killed")
    stages.prepare(params, layout)
    return tmp_path, params, layout


def _train(cwd: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EXE, "train", "--root", str(root), *extra], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_sigkill_mid_run_then_rerun_resumes_and_matches(project):
    tmp_path, params, layout = project
    state = layout.train / "resume" / "state.json"
    proc = subprocess.Popen(
        [EXE, "train", "--root", str(layout.root)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = json.loads(state.read_text())["epoch"]
    assert killed_after < 6 and not (layout.train / "train.json").exists()

    resumed = _train(tmp_path, layout.root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {killed_after}" in resumed.stdout
    result = json.loads((layout.train / "train.json").read_text())
    assert result["resumed_from_epoch"] == killed_after and result["epochs_run"] == 6
    assert not state.exists()  # finished: nothing left to resume

    clean = stages.Layout(tmp_path / "clean")
    stages.prepare(params, clean)
    reference = stages.train(params, clean)
    assert result["best_val_loss"] == pytest.approx(reference.best_val_loss, abs=1e-4)
    a = stages.evaluate(params, layout).metrics["test_accuracy"]
    b = stages.evaluate(params, clean).metrics["test_accuracy"]
    assert abs(a - b) <= 0.005


def test_resume_flag_without_state_is_an_error_and_fresh_starts_over(project):
    tmp_path, _, layout = project
    missing = _train(tmp_path, layout.root, "--resume")
    assert missing.returncode == 1 and "no saved state of this run to resume" in missing.stderr
    fresh = _train(tmp_path, layout.root, "--fresh")
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout


def test_linear_probe_resumes_with_its_feature_statistics(tmp_path):
    """The multi-level probe's standardization is fixed before epoch 1 and travels in the resume
    state: a run stopped after epoch 1 and resumed ends with the uninterrupted run's weights."""
    import torch
    from safetensors.torch import load_file

    from visiontune.components.train import train

    data = write_digits(tmp_path / "raw", classes=(0, 1, 2), per_class=12)
    params = tiny_params(data, train={"method": "linear", "epochs": 3, "patience": 10, "device": "cpu"})
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    args = (params.train, params.model, params.base, layout.prepare)

    whole = train(*args, tmp_path / "whole", tmp_path / "cache")

    def crash(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 1's state was kept, as a kill would leave it

    with pytest.raises(KeyboardInterrupt):
        train(*args, tmp_path / "resumed", tmp_path / "cache", on_epoch_end=crash)
    resumed = train(*args, tmp_path / "resumed", tmp_path / "cache", resume="must")
    assert resumed.resumed_from_epoch == 1 and whole.epochs_run == resumed.epochs_run == 3
    a, b = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and {"mean", "inv_std", "fc.weight"} <= a.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


def test_a_torn_resume_state_is_one_line_naming_it_and_fresh(project):
    """A resume state cut short (a full disk, a copy interrupted) ends the rerun with one line that
    names the file and `--fresh`, not a safetensors or JSON traceback; `--fresh` then starts over."""
    from visiontune.components.train import train

    tmp_path, params, layout = project

    def crash(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the same call the stage makes, stopped after epoch 1
        train(params.train, params.model, params.base, layout.prepare, layout.train, layout.cache,
              on_epoch_end=crash)  # fmt: skip
    path = layout.train / "resume" / "state.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    broken = _train(tmp_path, layout.root)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stdout[-1500:]
    line = broken.stderr.strip()
    assert len(line.splitlines()) == 1 and str(path.parent) in line, line
    assert "cannot be read" in line and "visiontune train --fresh" in line  # which starts over: tested above


def _holder_pid(lock: Path, deadline: float) -> int:
    while time.time() < deadline:
        text = lock.read_text() if lock.exists() else ""
        if text:
            return json.loads(text)["pid"]
        time.sleep(0.05)
    raise AssertionError(f"{lock} was never written")


def _gone(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()  # a zombie nobody reaps yet
    except FileNotFoundError:
        return True


def test_one_trainer_per_output_folder_and_none_outlives_dvc(project):
    """A second trainer on the same folder stops at once naming the first; a trainer whose `dvc
    repro` was killed (SIGKILL: no chance to stop its children) ends by itself, releasing the lock."""
    from visiontune.components.errors import VisiontuneError
    from visiontune.components.runlock import exclusive, lock_path

    tmp_path, _, layout = project
    long_run = [
        EXE,
        "train",
        "--root",
        str(layout.root),
        "--set",
        "train.epochs=500",
        "--set",
        "train.patience=500",
    ]
    parent = subprocess.Popen(  # stands in for dvc: starts the stage with DVC_STAGE set, then waits
        [sys.executable, "-c", f"import subprocess; subprocess.run({long_run!r})"],
        cwd=tmp_path, env={**os.environ, "DVC_STAGE": "train"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    trainer = _holder_pid(lock_path(layout.train), time.time() + 120)
    second = _train(tmp_path, layout.root)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"another `visiontune train` is writing here (pid {trainer} on " in second.stderr
    assert f"`kill {trainer}` stops it); wait for it to finish or stop it" in second.stderr

    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and not _gone(trainer):
        time.sleep(0.1)
    assert _gone(trainer), "the trainer outlived its killed parent"
    assert not (layout.train / "train.json").exists()  # it stopped; it did not finish
    deadline = time.time() + 30  # the lock goes with the process: once its last thread has exited
    while True:
        try:
            with exclusive(layout.train, "train"):
                break
        except VisiontuneError:  # the leader shows as a zombie while torch's threads still wind down
            assert time.time() < deadline, "the lock outlived the trainer"
            time.sleep(0.1)
