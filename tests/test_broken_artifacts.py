"""A torn artifact (a full disk, an interrupted copy, a hand edit) ends the command that reads it with
one line naming the file and the fix, never a traceback from safetensors, pandas or NumPy."""

from __future__ import annotations

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from visiontune.pipelines.cli import app

DRIFT = ["drift", "{tmp}", "--model", "{root}/export/model.onnx", "--out", "{tmp}/d"]
PUSH = ["push", "--repo-id", "org/name", "--model", "{root}/export/hf", "--dry-run"]
CASES = {  # what is torn → (file under the root, the command that reads it, what the line says, the fix)
    "checkpoint": (
        "train/model.safetensors",
        ["evaluate"],
        "the checkpoint cannot be read",
        "visiontune train",
    ),
    "manifest": ("prepare/manifest.csv", ["evaluate"], "the manifest cannot be read", "visiontune prepare"),
    "drift reference": (
        "export/drift_reference.npz",
        DRIFT,
        "the drift reference cannot be",
        "visiontune export",
    ),
    "hub weights": (
        "export/hf/model.safetensors",
        PUSH,
        "the Hub folder's weights cannot be",
        "visiontune export",
    ),
}


@pytest.mark.parametrize("torn", CASES)
def test_a_torn_artifact_is_one_line_naming_it_and_the_fix(exported, tmp_path, torn, monkeypatch):
    params, layout = exported
    root = tmp_path / "prepared"
    shutil.copytree(layout.root, root)  # the session's run stays whole
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    monkeypatch.chdir(tmp_path)
    relative, command, says, fix = CASES[torn]
    path = root / relative
    body = path.read_bytes()
    path.write_bytes(body[: len(body) // 2] if torn != "manifest" else b'"path,label\n"x",\x00"\n\x00')
    args = [a.format(root=root, tmp=tmp_path) for a in command]
    if args[0] in ("evaluate",):
        args += ["--root", str(root)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    line = result.output.strip()
    assert result.exit_code == 1 and len(line.splitlines()) == 1, result.output
    named = path.parent if torn == "checkpoint" else path  # a checkpoint is its folder
    assert f"{named}: {says}" in line and fix in line, line
