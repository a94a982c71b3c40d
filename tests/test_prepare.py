"""prepare: ingest folders and CSVs, quarantine bad images, split stably, never touch user files."""

import json

import pandas as pd
import pytest

from conftest import tiny_params, write_digits
from visiontune.components import manifest
from visiontune.components.images import sha256_file
from visiontune.components.prepare import SourceError, prepare


def _run(params, out):
    return prepare(params.data, params.base, params.validate_, out)


def test_folder_source_nested_with_manifest(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=10)
    nested = data / "1" / "more" / "deeper"
    nested.mkdir(parents=True)
    first = sorted((data / "1").glob("*.png"))[0]
    first.rename(nested / "x.png")
    (data / "notes.txt").write_text("ignored")
    result = _run(tiny_params(data), tmp_path / "out")
    frame = manifest.read(tmp_path / "out" / "manifest.csv")
    manifest.schema(["0", "1", "2"]).validate(frame)
    assert result.n_images == 30 and result.classes == ["0", "1", "2"]
    assert any("notes.txt" in s for s in result.skipped)
    assert (frame["label"].value_counts() == 10).all()
    assert frame["path"].str.endswith("1/more/deeper/x.png").any()
    assert sum(result.split_counts.values()) == 30


def test_bad_images_are_quarantined_not_dropped_silently_and_files_untouched(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=8)
    (data / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "2" / "empty.jpg").write_bytes(b"")
    before = {p: sha256_file(p) for p in data.rglob("*") if p.is_file()}
    result = _run(tiny_params(data), tmp_path / "out")
    quarantine = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    reasons = {q["path"].rsplit("/", 1)[-1]: q["reason"] for q in quarantine}
    assert set(reasons) == {"broken.png", "empty.jpg"}
    assert reasons["empty.jpg"] == "empty file"
    assert result.n_images == 24 and result.n_quarantined == 2
    after = {p: sha256_file(p) for p in data.rglob("*") if p.is_file()}
    assert before == after


def test_split_is_stable_when_images_are_added(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=20)
    out = tmp_path / "out"
    _run(tiny_params(data), out)
    a = manifest.read(out / "manifest.csv").set_index("path")["split"]
    write_digits(data, per_class=20, start=20)  # 60 more images
    _run(tiny_params(data), out)  # reads the split record the first run left in out
    b = manifest.read(out / "manifest.csv").set_index("path")["split"]
    assert len(b) == 120
    assert (b.loc[a.index] == a).all()  # no existing image changed split
    per_class = pd.crosstab(manifest.read(out / "manifest.csv")["label"], b.to_numpy())
    assert (per_class["test"] == 10).all() and (per_class["val"] == 10).all()  # a quarter of 40 each


def test_csv_source_relative_paths_and_given_splits(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=6)
    rows = [
        {"path": p.relative_to(tmp_path).as_posix(), "label": f"digit{p.parent.name}", "split": ""}
        for p in sorted(data.rglob("*.png"))
    ]
    rows[0]["split"] = "test"
    csv_path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    _run(tiny_params(csv_path), tmp_path / "out")
    frame = manifest.read(tmp_path / "out" / "manifest.csv")
    assert set(frame["label"]) == {"digit0", "digit1", "digit2"}
    first = frame[frame["path"].str.endswith(rows[0]["path"])]
    assert first["split"].item() == "test"


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\na.png,x\n", "missing column(s) ['path']"),
        ("path,label,weight\na.png,x,1\n", "unknown column(s) ['weight']"),
        ("path,label\na.png,\n", "empty 'label' on line(s) 2"),
        ("path,label,split\na.png,x,training\n", "line 2: split 'training'"),
    ],
)
def test_bad_csv_names_file_field_and_fix(tmp_path, content, message):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(content)
    with pytest.raises(SourceError) as err:
        _run(tiny_params(csv_path), tmp_path / "out")
    assert str(csv_path) in str(err.value) and message in str(err.value)


def test_unknown_source_lists_the_choices(tmp_path):
    with pytest.raises(SourceError, match="builtin:digits"):
        _run(tiny_params(tmp_path / "missing"), tmp_path / "out")


def test_builtin_digits_materialize_all_1797(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run(tiny_params("builtin:digits"), tmp_path / "out")
    assert result.n_images == 1797 and len(result.classes) == 10 and result.n_quarantined == 0
