"""Data where the workers are: data/raw in a DVC remote (a shared folder, and S3 through dvc-s3 against
moto's S3 server on 127.0.0.1), fetched by a fresh clone with `dvc pull`; real `dvc` and `git`
in temporary repos. Also: prepare names the `dvc pull` to run when tracked data is not present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import S3_ENV, s3_client, tiny_params, write_digits
from visiontune.components.prepare import SourceError, prepare

ROOT = Path(__file__).resolve().parents[1]


def sh(cwd: Path, *cmd: str, env: dict | None = None, check: bool = True) -> str:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    full.pop("MLFLOW_TRACKING_URI", None)
    full["DVC_NO_ANALYTICS"] = "1"
    full.update(env or {})
    done = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    if check and done.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout + done.stderr


def project(repo: Path) -> Path:
    """A user's project: params.yaml reading data/raw, a folder of digits under data/raw, `dvc add`ed."""
    repo.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="data/raw", val_fraction=0.25, test_fraction=0.25)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/data/prepared/\n")
    write_digits(repo / "data" / "raw", classes=(0, 1, 2), per_class=8)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "add", "-q", "data/raw")
    return repo


def commit_and_clone(repo: Path, clone: Path) -> Path:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data/raw in a DVC remote")
    sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    return clone


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_local_remote_push_clone_pull_gives_the_same_manifest(tmp_path):
    repo = project(tmp_path / "laptop")
    store = tmp_path / "shared-store"  # a shared filesystem path (NFS, SMB) looks the same to DVC
    sh(repo, "dvc", "remote", "add", "-q", "-d", "team", str(store))
    worker = commit_and_clone(repo, tmp_path / "worker")
    assert "1 file" not in sh(repo, "dvc", "push")  # 24 images + the .dir listing, not one file
    assert sum(1 for p in store.rglob("*") if p.is_file()) == 25

    missing = subprocess.run(
        [str(Path(sys.executable).with_name("visiontune")), "prepare"],
        cwd=worker,
        capture_output=True,
        text=True,
    )  # a fresh clone: data/raw is not there yet
    assert missing.returncode == 1
    assert "tracked by DVC" in missing.stderr and "`dvc pull data/raw.dvc`" in missing.stderr, missing.stderr

    assert "A       data/raw/" in sh(worker, "dvc", "pull")
    assert files(worker / "data/raw") == files(repo / "data/raw")
    digests = []
    for checkout in (repo, worker):
        sh(checkout, "visiontune", "prepare")
        digests.append(json.loads((checkout / "data/prepared/prepare/prepare.json").read_text()))
    assert digests[0]["n_images"] == 24
    assert digests[0]["manifest_sha256"] == digests[1]["manifest_sha256"]
    assert (repo / "data/prepared/prepare/manifest.csv").read_bytes() == (
        worker / "data/prepared/prepare/manifest.csv"
    ).read_bytes()


def test_s3_remote_through_dvc_s3_round_trips_byte_for_byte(tmp_path, s3_endpoint):
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="dvc-store")
    repo = project(tmp_path / "laptop")
    sh(repo, "dvc", "remote", "add", "-q", "-d", "s3store", "s3://dvc-store/visiontune")
    sh(repo, "dvc", "remote", "modify", "s3store", "endpointurl", s3_endpoint)
    worker = commit_and_clone(repo, tmp_path / "worker")
    sh(repo, "dvc", "push", env=S3_ENV)  # credentials from the environment, never in .dvc/config
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dvc-store", Prefix="visiontune/")["Contents"]]
    assert len(keys) == 25 and all(k.startswith("visiontune/files/md5/") for k in keys)
    assert "secret" not in (repo / ".dvc" / "config").read_text()

    assert not (worker / "data/raw").exists()
    sh(worker, "dvc", "pull", env=S3_ENV)
    assert files(worker / "data/raw") == files(repo / "data/raw")  # every byte, every path
    assert "are in sync" in sh(worker, "dvc", "status", "--cloud", env=S3_ENV)


# --- prepare says what to pull when the data is tracked but not here (no dvc CLI needed) ---


def _dvc_repo(root: Path) -> Path:
    (root / ".dvc").mkdir(parents=True)
    return root


def _prepare(source: str, out: Path):
    params = tiny_params(source)
    return prepare(params.data, params.base, params.validate_, out)


@pytest.mark.parametrize(
    ("source", "setup", "pull"),
    [
        ("data/raw", lambda r: (r / "data").mkdir(), "dvc pull data/raw.dvc"),  # never pulled
        ("data/raw", lambda r: (r / "data/raw").mkdir(parents=True), "dvc pull data/raw.dvc"),  # empty
        ("data/raw/photos", lambda r: (r / "data").mkdir(), "dvc pull data/raw.dvc"),  # inside a tracked one
        ("data/raw/labels.csv", lambda r: (r / "data").mkdir(), "dvc pull data/raw.dvc"),  # a CSV in it
    ],
)
def test_missing_tracked_source_names_the_dvc_pull(tmp_path, monkeypatch, source, setup, pull):
    repo = _dvc_repo(tmp_path / "repo")
    setup(repo)
    (repo / "data/raw.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: raw\n")
    monkeypatch.chdir(repo)
    with pytest.raises(SourceError) as err:
        _prepare(source, tmp_path / "out")
    message = str(err.value)
    assert message.startswith("data.source: ") and "tracked by DVC (data/raw.dvc)" in message
    assert f"`{pull}`" in message


def test_missing_stage_output_and_images_of_a_csv_and_from_outside_the_repo(tmp_path, monkeypatch):
    repo = _dvc_repo(tmp_path / "repo")
    (repo / "dvc.yaml").write_text("stages:\n  fetch:\n    cmd: fetch-images\n    outs:\n    - data/images\n")
    (repo / "data").mkdir()
    (repo / "data/labels.csv").write_text("path,label\nimages/a/1.png,a\nimages/b/2.png,b\n")
    monkeypatch.chdir(repo)
    with pytest.raises(
        SourceError, match=r"its images \(data/images/a/1.png, ...\) are missing: tracked by DVC"
    ) as err:
        _prepare("data/labels.csv", tmp_path / "out")  # the CSV is in git, the images are not pulled
    assert "`dvc pull data/images`" in str(err.value) and "(dvc.yaml)" in str(err.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=f"`cd {repo} && dvc pull data/images`"):
        _prepare(str(repo / "data/images"), tmp_path / "out")


def test_untracked_missing_source_keeps_the_plain_message(tmp_path, monkeypatch):
    repo = _dvc_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    with pytest.raises(SourceError) as err:
        _prepare("data/raw", tmp_path / "out")
    message = str(err.value)
    assert "is neither an image folder, a .csv file nor a Hugging Face dataset" in message
    assert "dvc pull" not in message
    (repo / "data/raw").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images found"):
        _prepare("data/raw", tmp_path / "out")


def test_the_flow_pulls_the_data_version_before_it_trains(tmp_path, monkeypatch):
    """A fresh worker: the flow's pull task fetches data/raw as data/raw.dvc names it."""
    from visiontune.components.config import load_params
    from visiontune.pipelines.flow import pull_data

    repo = project(tmp_path / "laptop")
    worker = commit_and_clone(repo, tmp_path / "worker")
    monkeypatch.chdir(worker)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    params = load_params(worker / "params.yaml")
    assert "no DVC remote configured" in pull_data.fn(params)  # nothing to pull from: left as is
    assert not (worker / "data/raw").exists()

    sh(repo, "dvc", "remote", "add", "-q", "-d", "team", str(tmp_path / "store"))
    sh(repo, "dvc", "push")
    sh(repo, "git", "commit", "-qam", "remote")
    sh(worker, "git", "pull", "-q")
    assert "pulled the version raw.dvc names" in pull_data.fn(params)
    assert files(worker / "data/raw") == files(repo / "data/raw")
