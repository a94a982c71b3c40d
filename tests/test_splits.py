"""Splits: stratified per class with a floor for small classes, and kept across runs by the record."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_params, write_digits
from visiontune.components import duplicates, manifest
from visiontune.components.prepare import prepare
from visiontune.components.splits import SPLIT_RECORD, SplitRule, assign_splits, quotas, read_split_record

ROOT = Path(__file__).resolve().parents[1]
RULE = SplitRule(seed=0, val_fraction=0.15, test_fraction=0.15, min_eval_per_class=5)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def imbalanced(sizes: dict[str, int], start: int = 0) -> pd.DataFrame:
    """Rows (path, label, sha256) of distinct made-up images, `sizes[label]` of each class."""
    rows = [
        {"path": f"{label}/{i:04d}.png", "label": label, "sha256": _sha(f"{label}-{i}")}
        for label, n in sizes.items()
        for i in range(start, start + n)
    ]
    return pd.DataFrame(rows).sort_values("path").reset_index(drop=True)


def counts(frame: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    return pd.crosstab(frame["label"], splits).reindex(columns=list(manifest.SPLITS), fill_value=0)


@pytest.mark.parametrize(
    "n, expected",
    [(300, (45, 45)), (30, (5, 5)), (20, (3, 3)), (12, (2, 2)), (5, (1, 1)), (2, (0, 0)), (1, (0, 0))],
)
def test_quotas_follow_the_fractions_with_a_floor_for_small_classes(n, expected):
    assert quotas(n, RULE) == expected


def test_the_floor_takes_at_most_a_third_of_a_class():
    rule = SplitRule(0, 0.1, 0.1, 5)
    for n in range(1, 400):
        test, val = quotas(n, rule)
        assert test >= min(5, n // 6) and val >= min(5, n // 6) and n - test - val >= 1
        if int(0.1 * n + 0.5) < min(5, n // 6):  # the floor decides: val + test within a third
            assert test + val <= n // 3


def test_quotas_leave_a_training_image_and_honour_a_zero_fraction():
    assert quotas(2, SplitRule(0, 0.3, 0.3, 0)) == (1, 0)  # each rounds to 1: val gives way
    assert quotas(300, SplitRule(0, 0.15, 0.0, 5)) == (0, 45)


def test_imbalanced_classes_each_get_their_floor_of_val_and_test():
    sizes = {f"big{i}": 300 + 7 * i for i in range(5)} | {f"small{i}": 30 for i in range(5)}
    frame = imbalanced(sizes)
    table = counts(frame, assign_splits(frame, {}, RULE))
    for label, n in sizes.items():
        test, val = quotas(n, RULE)
        assert table.loc[label, "test"] == test and table.loc[label, "val"] == val, label
        assert table.loc[label, "test"] >= 5 and table.loc[label, "val"] >= 5
    assert abs(table["test"].sum() / len(frame) - 0.15) < 0.02


def test_seed_changes_which_images_are_drawn_not_how_many():
    frame = imbalanced({"a": 200, "b": 40})
    zero = assign_splits(frame, {}, RULE)
    one = assign_splits(frame, {}, SplitRule(1, 0.15, 0.15, 5))
    assert (counts(frame, zero) == counts(frame, one)).all().all()
    assert (zero != one).mean() > 0.2


def test_added_images_never_move_a_recorded_one_and_fill_the_quotas():
    first = imbalanced({"big": 300, "small": 30})
    first["split"] = assign_splits(first, {}, RULE)
    recorded = dict(zip(first["sha256"], first["split"], strict=True))
    grown = pd.concat([first[["path", "label", "sha256"]], imbalanced({"big": 100, "small": 30}, start=1000)])
    grown = grown.sort_values("path").reset_index(drop=True)
    splits = assign_splits(grown, recorded, RULE)
    kept = grown["sha256"].map(recorded)
    assert (splits[kept.notna()] == kept[kept.notna()]).all()
    table = counts(grown, splits)
    assert table.loc["small", "test"] == quotas(60, RULE)[0] == 9
    assert table.loc["big", "test"] == quotas(400, RULE)[0] == 60
    fresh = assign_splits(grown, {}, RULE)
    assert (fresh[kept.notna()] != kept[kept.notna()]).any()  # without the record, images would move


def test_identical_files_share_a_split_and_given_splits_win():
    frame = imbalanced({"a": 40, "b": 40})
    copies = frame.iloc[:10].assign(path=lambda f: "z/" + f["path"], label="b")  # same content elsewhere
    frame = pd.concat([frame, copies]).reset_index(drop=True)
    frame["split"] = ""
    frame.loc[11, "split"] = "test"
    frame.loc[12, "split"] = "val"
    splits = assign_splits(frame, {"ignored": "test", frame.at[12, "sha256"]: "train"}, RULE)
    assert splits[11] == "test" and splits[12] == "val"  # a given split beats the record
    assert (splits.groupby(frame["sha256"]).nunique() == 1).all()
    assert (counts(frame, splits)[["val", "test"]] > 0).all().all()


def test_a_near_duplicate_group_takes_one_split_and_quotas_still_hold():
    frame = imbalanced({"a": 60, "b": 60})
    shas = frame["sha256"].tolist()
    near = [shas[i : i + 3] for i in range(0, 30, 3)] + [shas[60:62]]  # ten triples in a, a pair in b
    splits = assign_splits(frame, {}, RULE, near)
    for group in near:
        assert splits[frame["sha256"].isin(group)].nunique() == 1, group
    table = counts(frame, splits)
    for label in ("a", "b"):
        test, val = quotas(60, RULE)
        assert table.loc[label, "test"] <= test and table.loc[label, "val"] <= val
        assert (
            table.loc[label, "test"] >= test - 2 and table.loc[label, "val"] >= val - 2
        )  # a group may not fit
    apart = assign_splits(frame, {}, RULE)  # the same draw without the groups splits some of them
    assert any(apart[frame["sha256"].isin(group)].nunique() > 1 for group in near)
    assert (assign_splits(frame, {}, RULE, []) == apart).all()  # no groups: the split as before


def test_a_group_larger_than_the_quotas_trains_and_new_copies_follow_their_record():
    frame = imbalanced({"a": 30})
    shas = frame["sha256"].tolist()
    splits = assign_splits(frame, {}, RULE, [shas[:8]])  # 8 copies of one picture: over the 5-image quotas
    assert (splits[:8] == "train").all()
    assert counts(frame, splits).loc["a", "test"] == 5 and counts(frame, splits).loc["a", "val"] == 5
    recorded = {sha: "test" for sha in shas[8:10]} | {shas[10]: "val", shas[11]: "train"}
    grown = pd.concat([frame, imbalanced({"a": 3}, start=100)]).reset_index(drop=True)
    new = grown["sha256"].tolist()[30:]
    near = [[shas[8], new[0]], [shas[10], shas[11], new[1]]]  # a copy of a test image; of a leaking pair
    splits = assign_splits(grown, recorded, RULE, near)
    assert splits[30] == "test" and splits[31] == "train"  # train adds no leaking image
    assert [splits[i] for i in (8, 9, 10, 11)] == ["test", "test", "val", "train"]  # recorded: kept


def _run(params, out):
    return prepare(params.data, params.base, params.validate_, out)


def _splits(out: Path) -> pd.Series:
    return manifest.read(out / "manifest.csv").set_index("path")["split"]


def test_prepare_records_keeps_and_forgets(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=12)
    out = tmp_path / "out"
    _run(tiny_params(data), out)
    before = _splits(out)
    removed = manifest.read(out / "manifest.csv").iloc[0]
    Path(removed["path"]).unlink()
    write_digits(data, per_class=12, start=12)
    _run(tiny_params(data), out)
    after = _splits(out)
    common = before.index.intersection(after.index)
    assert len(after) == 71 and len(common) == 35 and (after[common] == before[common]).all()
    record = json.loads((out / SPLIT_RECORD).read_text())
    assert removed["sha256"] not in record["splits"] and len(record["splits"]) == 71
    assert record["rule"] == {"seed": 0, "val_fraction": 0.25, "test_fraction": 0.25, "min_eval_per_class": 5}
    names = ("manifest.csv", SPLIT_RECORD, "prepare.json", duplicates.RECORD)
    outputs = [(out / name).read_bytes() for name in names]
    _run(tiny_params(data), out)  # same data, its own record: the same bytes, so nothing downstream reruns
    assert outputs == [(out / name).read_bytes() for name in names]


def test_a_changed_seed_sets_the_record_aside(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=20)
    out = tmp_path / "out"
    _run(tiny_params(data), out)
    assert read_split_record(out, SplitRule(0, 0.25, 0.25, 5))
    assert read_split_record(out, SplitRule(1, 0.25, 0.25, 5)) == {}
    assert read_split_record(out, SplitRule(0, 0.2, 0.25, 5)) == {}
    _run(tiny_params(data, base={"seed": 1}), out)
    reseeded = _splits(out)
    _run(tiny_params(data, base={"seed": 1}), tmp_path / "fresh")
    assert (reseeded == _splits(tmp_path / "fresh")).all()  # as if no record had been there


def test_csv_given_splits_are_recorded(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=12)
    paths = sorted(data.rglob("*.png"))
    frame = pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]})
    frame["split"] = ["train"] * len(frame)
    csv_path = tmp_path / "labels.csv"
    frame.to_csv(csv_path, index=False)
    out = tmp_path / "out"
    _run(tiny_params(csv_path), out)
    assert (_splits(out) == "train").all()
    frame.assign(split="").to_csv(csv_path, index=False)  # the column emptied: the record remembers
    _run(tiny_params(csv_path), out)
    assert (_splits(out) == "train").all()


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_record_survives_dvc_repro(tmp_path, monkeypatch):
    """The project's own prepare stage under real `dvc repro`: data added, no recorded image moves."""
    repo = tmp_path / "project"
    repo.mkdir()
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": dvc_yaml["stages"]["prepare"]}}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] |= {"source": "data/raw", "val_fraction": 0.25, "test_fraction": 0.25}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for folder in ("components", "pipelines"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_digits(repo / "data" / "raw", per_class=12)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "dvc", "repro")
    out = repo / "data" / "prepared" / "prepare"
    before = _splits(out)
    write_digits(repo / "data" / "raw", per_class=24, start=12)
    assert "Running stage 'prepare'" in sh(repo, "dvc", "repro")
    after = _splits(out)
    assert len(after) == 108 and (after[before.index] == before).all()
    monkeypatch.chdir(repo)  # manifest paths are relative to the project, as under dvc
    _run(tiny_params("data/raw"), tmp_path / "fresh")
    assert (_splits(tmp_path / "fresh")[before.index] != before).any()  # the record is what kept them
