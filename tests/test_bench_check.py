"""Published figures are checked: bench/check.py's verdicts, its recorded file, the docs rendering it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load("bench_check", ROOT / "bench" / "check.py")
hooks = _load("docs_hooks_bench", ROOT / "docs" / "hooks.py")
FIGURES = {
    "digits.lora.test_accuracy": 0.995,
    "loop.speedup_to_0.98": 2.0,
    "drift.digits.false_alarms": 0.04,
}
RECORDED = {"commit": "0123456789abcdef", "figures": {k: {"value": v} for k, v in FIGURES.items()}}


def test_a_figure_worse_than_recorded_beyond_its_tolerance_fails_naming_the_value_and_commit():
    assert check.regressions({"digits.lora.test_accuracy": 0.9840}, RECORDED) == []  # within 3 images
    (line,) = check.regressions({"digits.lora.test_accuracy": 0.9830}, RECORDED)
    assert line.startswith(
        "digits.lora.test_accuracy = 0.9830: worse than 0.9950 recorded at commit 0123456789ab"
    )
    lower_is_better = check.regressions({"drift.digits.false_alarms": 0.095}, RECORDED)
    assert len(lower_is_better) == 1 and "worse than 0.040" in lower_is_better[0]
    assert (
        check.regressions({"drift.digits.false_alarms": 0.0}, RECORDED) == []
    )  # better is never a regression


def test_targets_and_relative_tolerances_bite():
    (missed,) = check.regressions({"digits.linear.test_accuracy": 0.94}, {})  # nothing recorded: the target
    assert "misses its target 0.95" in missed
    assert check.regressions({"loop.speedup_to_0.98": 1.25}, RECORDED) == []  # 40 % relative
    slower = check.regressions({"loop.speedup_to_0.98": 1.1}, RECORDED)
    assert len(slower) == 1 and "(relative)" in slower[0]


def test_the_recorded_figures_cover_every_check_and_every_file_they_measure():
    record = json.loads(check.RESULTS.read_text())
    assert set(record["figures"]) == set(check.FIGURES)
    assert {"command", "commit", "date", "machine", "files"} <= set(record)
    assert set(record["files"]) == set(check.measured_files())  # the stages' code as it imports today
    for name, figure in record["figures"].items():
        assert figure["what"] == check.FIGURES[name].what


def test_the_docs_render_the_recorded_figures_and_say_when_the_code_moved_on(tmp_path):
    measured = tmp_path / "components" / "train.py"
    measured.parent.mkdir()
    measured.write_text("lr = 1e-3\n")
    lora = "digits.lora.test_accuracy"
    record = {
        "command": "python bench/check.py --record", "commit": "0123456789abcdef",
        "uncommitted_changes": False, "date": "2026-12-07T19:00:00Z", "machine": "2 CPU cores",
        "load_average": [1.5, 1.0, 1.0], "seconds": 480,
        "files": {"components/train.py": hashlib.sha256(measured.read_bytes()).hexdigest()},
        "figures": {lora: {"value": 0.98885, **check.asdict(check.FIGURES[lora])}},
    }  # fmt: skip
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "check.json").write_text(json.dumps(record))
    page = hooks.bench_markdown("check", tmp_path)
    assert "| digits, shipped params, LoRA: test accuracy | 0.9889 |  | 0.0113 lower than recorded |" in page
    assert "commit `0123456789ab`" in page and "Older than the code" not in page
    measured.write_text("lr = 3e-4\n")
    stale = hooks.bench_markdown("check", tmp_path)
    assert (
        stale.startswith('!!! warning "Older than the code it measures"') and "`components/train.py`" in stale
    )
    marked = hooks.on_page_markdown("before\n<!-- bench: check -->\nafter", None, None, None)
    assert "<!-- bench" not in marked and "`make bench-check`" in marked
    assert "<!-- bench: check -->" in (ROOT / "docs" / "benchmarks.md").read_text()


def test_a_bench_table_renders_with_its_provenance(tmp_path):
    record = {
        "command": "python bench/defaults.py --record", "commit": "fedcba9876543210",
        "uncommitted_changes": True, "date": "2026-12-08T01:00:00Z", "machine": "2 CPU cores",
        "load_average": [2.0, 1.0, 1.0], "seconds": 3600, "files": {},
        "table": {"columns": ["dataset", "shipped"], "rows": [["digits (64 px)", "0.9888 ± 0 / 0.9887"]]},
        "note": "test accuracy mean ± sd / mean macro F1",
    }  # fmt: skip
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "defaults.json").write_text(json.dumps(record))
    page = hooks.bench_markdown("defaults", tmp_path)
    assert page.splitlines()[:5] == [
        "Recorded by `python bench/defaults.py --record` at commit `fedcba987654` plus uncommitted changes "
        "on 2026-12-08, 2 CPU cores (load average 2.0 at the start), in 3600 s.",
        "",
        "| dataset | shipped |",
        "|---|---|",
        "| digits (64 px) | 0.9888 ± 0 / 0.9887 |",
    ]
    assert page.rstrip().endswith("Test accuracy mean ± sd / mean macro F1.") and "bench-check" not in page
