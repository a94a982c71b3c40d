"""The flow's cache keys follow what each stage reads, as dvc.yaml declares it."""

from __future__ import annotations

from pathlib import Path

import yaml

from visiontune.pipelines import caching

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_declares_the_inputs_the_flow_caches_on():
    """One truth for both runners: the params and upstream outputs of every stage agree."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(dvc) == set(caching.STAGE_INPUTS)
    for stage, inputs in caching.STAGE_INPUTS.items():
        assert sorted(dvc[stage]["params"]) == sorted(inputs.params), stage
        upstream = sorted(
            d.removeprefix("data/prepared/") for d in dvc[stage]["deps"] if d.startswith("data/prepared/")
        )
        assert upstream == sorted(inputs.reads), stage


def test_the_key_changes_with_its_own_section_the_upstream_data_and_the_code(trained, monkeypatch):
    params, layout = trained
    key = caching.stage_key("train", params, layout)
    assert caching.stage_key("train", params, layout) == key  # stable
    other_section = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"top_k": 2})})
    assert caching.stage_key("train", other_section, layout) == key
    own_section = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 7})})
    assert caching.stage_key("train", own_section, layout) != key

    monkeypatch.setattr(caching, "code_version", lambda stage: "another version")
    assert caching.stage_key("train", params, layout) != key
    monkeypatch.undo()

    report = layout.validate / "report.json"
    original = report.read_bytes()
    try:
        report.write_bytes(original + b" ")  # an upstream output changed
        assert caching.stage_key("train", params, layout) != key
    finally:
        report.write_bytes(original)
    assert caching.stage_key("train", params, layout) == key


def test_outputs_on_disk_must_be_the_ones_the_key_made(trained, tmp_path):
    params, layout = trained
    from visiontune.pipelines.stages import Layout

    copy = Layout(tmp_path / "prepared")
    (copy.root / "evaluate").mkdir(parents=True)
    (copy.root / "evaluate" / "metrics.json").write_text("{}")
    caching.write_stamp("evaluate", copy, "k1")
    assert caching.outputs_current("evaluate", copy, "k1")
    assert not caching.outputs_current("evaluate", copy, "k2")  # other inputs made these files
    (copy.root / "evaluate" / "metrics.json").write_text('{"a": 1}')
    assert not caching.outputs_current("evaluate", copy, "k1")  # rewritten since (e.g. by dvc repro)
    assert not caching.outputs_current("export", copy, "k1")  # never ran
