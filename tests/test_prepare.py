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


def test_csv_rows_outside_the_csvs_folder_are_skipped_with_the_reason(tmp_path):
    """`../` or an absolute path elsewhere is refused (symlinks resolved) unless data.allow_paths_under
    names its folder."""
    data = write_digits(tmp_path / "project" / "raw", per_class=6)
    elsewhere = write_digits(tmp_path / "elsewhere", classes=(0,), per_class=2)
    (data / "link.png").symlink_to(next(elsewhere.rglob("*.png")))
    rows = [
        {"path": p.relative_to(data.parent).as_posix(), "label": p.parent.name}
        for p in sorted(data.rglob("*/*.png"))
    ]
    rows += [{"path": "../elsewhere/0/" + p.name, "label": "0"} for p in sorted(elsewhere.rglob("*.png"))[:1]]
    rows += [{"path": str(p), "label": "0"} for p in sorted(elsewhere.rglob("*.png"))[1:]]
    rows += [{"path": "raw/link.png", "label": "0"}]
    csv_path = data.parent / "labels.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    result = _run(tiny_params(csv_path), tmp_path / "out")
    assert result.n_images == 18
    assert [s.split(": ")[1] for s in result.skipped] == ["line 20", "line 21", "line 22"]
    assert all(
        "resolves outside the dataset's folder" in s and "data.allow_paths_under" in s for s in result.skipped
    )
    allowed = tiny_params(csv_path, data={"allow_paths_under": str(elsewhere)})
    assert _run(allowed, tmp_path / "out-allowed").n_images == 21


def test_a_symlinked_class_folder_is_listed_as_skipped_not_dropped_silently(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=6)
    other = write_digits(tmp_path / "other", classes=(7,), per_class=6)
    (data / "7").symlink_to(other / "7", target_is_directory=True)
    result = _run(tiny_params(data), tmp_path / "out")
    assert result.classes == ["0", "1", "2"]
    reason = "raw/7: a symlinked folder, not followed; copy its images in, or list them in a CSV source"
    assert any(s.endswith(reason) for s in result.skipped), result.skipped


def test_a_file_in_a_format_outside_the_allowlist_is_quarantined_naming_it(tmp_path):
    data = write_digits(tmp_path / "raw", per_class=6)
    (data / "1" / "drawing.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    result = _run(tiny_params(data), tmp_path / "out")
    (entry,) = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    assert result.n_quarantined == 1 and entry["kind"] == "format not accepted"
    assert entry["reason"].startswith("EPS is not an accepted image format")
