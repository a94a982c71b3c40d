"""Each stage's code deps come from its imports: dvc.yaml lists exactly them, the flow's key hashes them."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from visiontune.pipelines import caching, codedeps
from visiontune.pipelines.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.startswith(tuple(f + "/" for f in codedeps.PACKAGES.values()))}


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_lists_exactly_the_code_each_stage_imports(stage):
    declared = _code_deps(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage])
    closure = set(codedeps.stage_code(stage))
    missing, extra = sorted(closure - declared), sorted(declared - closure)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: missing code deps {missing}, listed but not imported {extra}; "
        f"`python -m visiontune.pipelines.codedeps {stage}` prints the list"
    )


def test_the_closure_follows_lazy_imports_and_leaves_other_stages_and_entry_points_out():
    train = codedeps.stage_code("train")
    for imported in ("components/policy.py", "components/distributed.py", "components/metrics.py"):
        assert imported in train  # imported inside functions of train.py and model.py
    assert "pipelines/stages.py" in train
    elsewhere = ("pipelines/serve.py", "pipelines/cli.py", "components/tracking.py", "components/export.py")
    assert not set(elsewhere) & set(train)
    assert "components/tracking.py" in codedeps.stage_code("register")
    assert "components/model.py" in codedeps.stage_code("evaluate")
    assert {"components/model.py", "components/evaluate.py", "components/drift.py"} <= set(
        codedeps.stage_code("export")
    )


def test_package_init_files_hold_no_code():
    """The closure skips __init__.py: each may hold only its docstring."""
    for folder in codedeps.PACKAGES.values():
        body = ast.parse((REPO / folder / "__init__.py").read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), folder


@pytest.fixture
def source_copy(tmp_path, monkeypatch):
    """The code the keys hash, read from a copy that a test may edit."""
    for folder in codedeps.PACKAGES.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "source", lambda relative: tmp_path / relative)
    codedeps.stage_code.cache_clear()
    codedeps._tree.cache_clear()
    yield tmp_path
    codedeps.stage_code.cache_clear()
    codedeps._tree.cache_clear()


def _keys() -> dict[str, str]:
    return {stage: caching.code_version(stage) for stage in STAGES}


def _touch(path: Path) -> None:
    path.write_text(path.read_text() + "\n# changed\n")


@pytest.mark.parametrize(
    "changed",
    ["components/policy.py", "pipelines/stages.py", "pipelines/serve.py", "components/tracking.py"],
)
def test_the_flow_reruns_the_stages_whose_dvc_deps_hold_the_changed_file(source_copy, changed):
    """Both runners agree: a stage's flow key moves exactly when dvc.yaml lists the changed file."""
    before = _keys()
    _touch(source_copy / changed)
    after = _keys()
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rerun_by_flow = {s for s in STAGES if before[s] != after[s]}
    rerun_by_dvc = {s for s in STAGES if changed in _code_deps(dvc[s])}
    assert rerun_by_flow == rerun_by_dvc
    if changed == "pipelines/serve.py":
        assert not rerun_by_flow  # serving code retrains nothing
    if changed == "pipelines/stages.py":
        assert rerun_by_flow == set(STAGES)
