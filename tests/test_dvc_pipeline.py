"""End to end: the project's own dvc.yaml and params.yaml under real `dvc` in a temporary git repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_digits

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded store inside the temporary repo
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout + done.stderr


def set_params(repo: Path, **changes) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A user's project: the pipeline files, a folder of images under data/raw tracked by `dvc add`."""
    repo = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("components", "pipelines"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_digits(repo / "data" / "raw" / "digits", classes=(0, 1, 2), per_class=16)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "dvc", "add", "-q", "data/raw/digits")
    set_params(
        repo,
        **{
            "data.source": "data/raw/digits",
            "data.val_fraction": 0.25,
            "data.test_fraction": 0.25,
            "validate.min_per_class": 3,
            "validate.label_audit": False,  # tested on its own; here each validate process paid 5 s for it
            "model.image_size": 32,
            "train.epochs": 1,
            "train.batch_size": 16,
        },
    )
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project")
    return repo


def test_repro_runs_every_stage_and_registers(repo):
    out = sh(repo, "dvc", "repro")
    for stage in ("prepare", "validate", "train", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "data/prepared/evaluate/metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["test_images"] > 0
    registration = json.loads((repo / "data/prepared/register/registration.json").read_text())
    assert registration["version"] == "1" and registration["alias"] == "candidate"
    assert (repo / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(registration["run_id"]).data.tags
    assert len(tags["dvc_data_hash"]) >= 32 and tags["git_commit"] != "unknown"  # lineage from DVC and git
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run")


def test_nothing_reruns_when_nothing_changed(repo):
    out = sh(repo, "dvc", "repro")
    assert "Running stage" not in out


def test_train_param_change_reruns_train_and_later_only(repo):
    # and data-parallel under torchrun, on the CPU (gloo) even where there is a GPU
    set_params(repo, **{"train.lr": 5e-4, "train.nproc": 2, "train.device": "cpu"})
    out = sh(repo, "dvc", "repro")
    assert "data-parallel: 2 processes on cpu" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'validate'" not in out
    for stage in ("train", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in out
    registration = json.loads((repo / "data/prepared/register/registration.json").read_text())
    assert registration["version"] == "2"
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lr 5e-4")


def test_metrics_and_plots_show(repo):
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json"))
    flat = json.dumps(shown)
    assert "test_accuracy" in flat and "test_macro_f1" in flat
    sh(repo, "dvc", "plots", "show", "-o", "plots_html")
    page = (repo / "plots_html" / "index.html").read_text()
    assert "train_loss" in page and "val_loss" in page


def test_exp_run_with_a_param_override(repo):
    out = sh(repo, "dvc", "exp", "run", "-S", "train.lr=3e-4")
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    table = sh(repo, "dvc", "exp", "show", "--json")
    assert "0.0003" in table or "3e-04" in table or "3e-4" in table


def test_a_saved_hugging_face_dataset_trains_through_repro_like_its_folder(repo):
    """The same digits as a `datasets` save_to_disk folder with a ClassLabel feature, tracked by
    `dvc add`: repro reruns from prepare and its manifest holds the folder's images, labels and splits."""
    datasets = pytest.importorskip("datasets")
    from visiontune.components import manifest

    def facts():
        frame = manifest.read(repo / "data/prepared/prepare/manifest.csv")
        return set(zip(frame["sha256"], frame["label"], frame["split"], strict=True))

    from_folder = facts()
    files = sorted((repo / "data/raw/digits").rglob("*.png"))
    names = sorted({f.parent.name for f in files})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    saved = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": [names.index(f.parent.name) for f in files]},
        features=features,
    )
    saved.save_to_disk(str(repo / "data/raw/digits-hf"))
    sh(repo, "dvc", "add", "-q", "data/raw/digits-hf")
    set_params(repo, **{"data.source": "data/raw/digits-hf", "train.nproc": 1})
    out = sh(repo, "dvc", "repro")
    for stage in ("prepare", "validate", "train", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in out
    assert facts() == from_folder
    paths = manifest.read(repo / "data/prepared/prepare/manifest.csv")["path"]
    assert paths.str.startswith("data/prepared/prepare/hf/").all()
    metrics = json.loads((repo / "data/prepared/evaluate/metrics.json").read_text())
    assert metrics["test_images"] == sum(split == "test" for _, _, split in from_folder)
