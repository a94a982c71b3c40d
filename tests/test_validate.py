"""validate: schema errors, class counts and the min_per_class gate."""

import json

import pytest

from conftest import tiny_params, write_digits
from visiontune.components import manifest
from visiontune.components.prepare import prepare
from visiontune.components.validate import GateFailed, validate


@pytest.fixture
def prepared(tmp_path):
    data = write_digits(tmp_path / "raw", classes=(0, 1, 2), per_class=12)
    params = tiny_params(data)
    prepare(params.data, params.base, params.validate_.max_pixels, tmp_path / "prep")
    return tmp_path / "prep"


def test_passing_data_writes_report(prepared, tmp_path):
    params = tiny_params("unused", validate={"min_per_class": 5})
    result = validate(params.validate_, prepared, tmp_path / "val")
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    assert result.passed and report["passed"]
    assert report["class_counts"]["1"]["total"] == 12
    assert (tmp_path / "val" / "report.md").read_text().startswith("# Validation report")


def test_small_class_fails_the_gate_naming_class_and_threshold(prepared, tmp_path):
    params = tiny_params("unused", validate={"min_per_class": 13})
    with pytest.raises(GateFailed) as err:
        validate(params.validate_, prepared, tmp_path / "val")
    msg = str(err.value)
    assert "min_per_class=13" in msg and "0 (12)" in msg and "report.md" in msg


def test_warn_mode_reports_but_continues(prepared, tmp_path):
    params = tiny_params("unused", validate={"min_per_class": 13, "on_fail": "warn"})
    result = validate(params.validate_, prepared, tmp_path / "val")
    assert not result.passed and "min_per_class" in result.failures[0]


def test_schema_errors_name_row_and_file(prepared, tmp_path):
    frame = manifest.read(prepared / "manifest.csv")
    frame.loc[2, "split"] = "training"
    frame.loc[4, "sha256"] = "xyz"
    frame.to_csv(prepared / "manifest.csv", index=False)
    params = tiny_params("unused", validate={"on_fail": "warn"})
    validate(params.validate_, prepared, tmp_path / "val")
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    errors = {(e["row"], e["column"]) for e in report["schema_errors"]}
    assert {(2, "split"), (4, "sha256")} <= errors
    assert any(e["path"] == frame.loc[2, "path"] for e in report["schema_errors"])
