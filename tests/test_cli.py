"""The `visiontune` command: stage subcommands, clean errors, overrides."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from visiontune.pipelines.cli import app, parse_overrides

runner = CliRunner()


def test_help_lists_every_stage_and_starts_fast():
    exe = Path(sys.executable).with_name("visiontune")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("prepare", "validate", "train", "evaluate", "export", "register", "run", "summary"):
        assert command in done.stdout
    code = "import sys, visiontune.pipelines.cli; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert light.stdout.split() == ["False", "False"]  # heavy imports wait for the command that needs them


def test_bad_params_key_is_one_clear_line_and_exit_1(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  sorce: x\n")
    result = runner.invoke(app, ["prepare", "--params", str(params), "--root", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "data.sorce: unknown key" in result.output
    assert "Traceback" not in result.output


def test_missing_source_names_the_field(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: {tmp_path / 'nowhere'}\n")
    result = runner.invoke(app, ["prepare", "--params", str(params), "--root", str(tmp_path / "out")])
    assert result.exit_code == 1 and "data.source" in result.output


def test_overrides_reach_the_typed_params(tmp_path):
    from visiontune.components.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 2\n")
    overrides = parse_overrides(["train.lr=3e-4", "model.image_size=null", "train.hflip=true"])
    loaded = load_params(params, overrides)
    assert loaded.train.lr == 3e-4 and loaded.model.image_size is None and loaded.train.hflip is True
    result = runner.invoke(app, ["prepare", "--set", "trainlr"])
    assert result.exit_code == 1 and "section.key=value" in result.output


def test_audit_command_reports_and_exits_1_only_when_the_gate_fails(tmp_path):
    from conftest import write_digits

    data = write_digits(tmp_path / "raw", classes=(0, 1), per_class=12)
    args = [
        "--params",
        str(tmp_path / "none.yaml"),
        "--set",
        "model.image_size=32",
        "--set",
        "validate.audit_folds=3",
    ]
    clean = runner.invoke(app, ["audit", str(data), "--out", str(tmp_path / "a1"), *args])
    assert clean.exit_code == 0, clean.output
    assert "24 images, 2 classes" in clean.output

    write_digits(data, classes=(2,), per_class=1)  # a class with one image
    out = tmp_path / "a2"
    failing = runner.invoke(app, ["audit", str(data), "--out", str(out), *args])
    assert failing.exit_code == 1, failing.output
    assert "25 images, 3 classes" in failing.output and "FAIL min_per_class" in failing.output
    assert (out / "report.json").exists() and (out / "report.md").exists()


def test_summary_says_how_training_went(trained):
    params, layout = trained
    result = runner.invoke(app, ["summary", "--root", str(layout.root)])
    assert result.exit_code == 0
    line = next(x for x in result.output.splitlines() if x.strip().startswith("training"))
    trained_json = json.loads((layout.train / "train.json").read_text())
    device = trained_json["device"]  # cpu, or cuda on a GPU machine
    assert f"full on {device}, 32 px (model.image_size); best epoch 1 of 1 run (all epochs ran)" in line
    assert line.endswith(f"; confidence calibrated (temperature {trained_json['temperature']:.3f})")
