"""Hugging Face datasets as data.source: written by the real `datasets` library (save_to_disk, a
DatasetDict, parquet), read by prepare into the same manifest as the same images in a folder."""

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import tiny_params, write_digits
from visiontune.components import manifest
from visiontune.components.hf_source import HfSourceError
from visiontune.components.images import sha256_file
from visiontune.components.prepare import prepare

datasets = pytest.importorskip("datasets")
CLASSES = ["one", "two", "zero"]  # names unlike their indices: reading the indices as labels shows
NAMES = {"0": "zero", "1": "one", "2": "two"}


def _run(params, out):
    return prepare(params.data, params.base, params.validate_, out)


def _rows(out) -> set[tuple[str, str, str]]:
    """What a manifest says about the data: (content, label, split) of every image."""
    frame = manifest.read(out / "manifest.csv")
    return set(zip(frame["sha256"], frame["label"], frame["split"], strict=True))


def _dataset(folder, names=CLASSES):
    """The images of a <class>/<image> folder as a `datasets.Dataset` with a ClassLabel feature."""
    files = sorted(folder.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": [names.index(f.parent.name) for f in files]},
        features=features,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """30 digits as a folder, and its manifest prepared the ordinary way."""
    root = tmp_path_factory.mktemp("hf")
    data = write_digits(root / "raw", per_class=10)
    for digit, name in NAMES.items():
        (data / digit).rename(data / name)
    _run(tiny_params(data), root / "from-folder")
    return data, _rows(root / "from-folder")


def test_a_saved_dataset_gives_the_folders_manifest_and_is_left_untouched(folder, tmp_path):
    data, expected = folder
    saved = tmp_path / "saved"
    _dataset(data).save_to_disk(str(saved))
    before = {p: sha256_file(p) for p in saved.rglob("*") if p.is_file()}

    result = _run(tiny_params(saved), tmp_path / "out")
    assert result.classes == CLASSES and result.n_images == 30 and result.n_quarantined == 0
    assert _rows(tmp_path / "out") == expected  # same bytes, labels and splits
    written = manifest.read(tmp_path / "out" / "manifest.csv")["path"]
    assert all("/out/hf/" in p for p in written)  # materialized under the prepared data
    assert before == {p: sha256_file(p) for p in saved.rglob("*") if p.is_file()}


def test_a_dataset_dicts_splits_are_kept_and_its_parquet_files_read_the_same(folder, tmp_path):
    data, expected = folder
    full = _dataset(data)
    thirds = {"train": full.select(range(0, 30, 3)), "validation": full.select(range(1, 30, 3))}
    thirds["test"] = full.select(range(2, 30, 3))
    halves = {"train": full.select(range(0, 30, 2)), "test": full.select(range(1, 30, 2))}
    contents, undecoded = {}, datasets.Image(decode=False)  # rows give the files they came from
    for name, splits in (("thirds", thirds), ("halves", halves)):
        datasets.DatasetDict(splits).save_to_disk(str(tmp_path / name))
        (tmp_path / f"{name}-parquet" / "data").mkdir(parents=True)
        for split, part in splits.items():  # the Hub's layout: data/<split>-00000-of-00001.parquet
            part.to_parquet(str(tmp_path / f"{name}-parquet" / "data" / f"{split}-00000-of-00001.parquet"))
        contents[name] = {
            split: {sha256_file(Path(row["image"]["path"])) for row in part.cast_column("image", undecoded)}
            for split, part in splits.items()
        }

    for source in ("thirds", "thirds-parquet", "halves", "halves-parquet"):
        # to_parquet keeps the images' own paths (in the folder's tree): allowed by data.allow_paths_under
        params = tiny_params(tmp_path / source, data={"allow_paths_under": str(data)})
        _run(params, tmp_path / f"out-{source}")
        rows = _rows(tmp_path / f"out-{source}")
        assert {(sha, label) for sha, label, _ in rows} == {(sha, label) for sha, label, _ in expected}
        by_split = {s: {sha for sha, _, split in rows if split == s} for s in ("train", "val", "test")}
        given = contents[source.removesuffix("-parquet")]
        if source.startswith("thirds"):  # all three given: kept exactly
            assert by_split == {"train": given["train"], "val": given["validation"], "test": given["test"]}
        else:  # no validation split: val is drawn from train's images, test stays as given
            assert by_split["test"] == given["test"] and by_split["val"] and by_split["val"] <= given["train"]


def test_plain_parquet_with_other_column_names_string_labels_and_raw_bytes(folder, tmp_path):
    data, expected = folder
    files = sorted(data.rglob("*.png"))
    frame = pd.DataFrame(
        {"picture": [f.read_bytes() for f in files], "digit": [f.parent.name for f in files]}
    )
    frame.to_parquet(tmp_path / "digits.parquet")
    params = tiny_params(
        tmp_path / "digits.parquet", data={"image_column": "picture", "label_column": "digit"}
    )
    _run(params, tmp_path / "out")
    assert _rows(tmp_path / "out") == expected
    names = manifest.read(tmp_path / "out" / "manifest.csv")["path"]
    assert names.str.endswith(".png").all()  # the format read from the bytes when no name came with them

    with pytest.raises(HfSourceError, match=r"digits\.parquet: no column 'image' \(data\.image_column\); its "
                       r"columns are picture, digit: set data\.image_column"):  # fmt: skip
        _run(tiny_params(tmp_path / "digits.parquet"), tmp_path / "wrong")


def test_rows_without_labels_are_skipped_and_bad_bytes_quarantined_by_name(tmp_path):
    good = io.BytesIO()
    Image.new("L", (8, 8), 200).save(good, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {
        "image": [{"bytes": good.getvalue(), "path": f"{i}.png"} for i in range(8)]
        + [{"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": "broken.png"}],
        "label": [0, 1, 0, 1, 0, 1, -1, -1, 0],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    result = _run(tiny_params(tmp_path / "saved"), tmp_path / "out")
    assert result.n_images == 6 and result.n_quarantined == 1
    assert [s.split(": ", 1)[1] for s in result.skipped] == [
        "row 6: no label (label is empty or -1)",
        "row 7: no label (label is empty or -1)",
    ]
    quarantined = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    assert quarantined[0]["path"].endswith("/a/000008-broken.png")


def test_images_are_written_once_and_a_shrunk_dataset_leaves_no_stale_copies(folder, tmp_path):
    data, _ = folder
    full = _dataset(data)
    full.save_to_disk(str(tmp_path / "v1"))
    out = tmp_path / "out"
    _run(tiny_params(tmp_path / "v1"), out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "hf").rglob("*.png")}
    os.utime(next(iter(stamps)), ns=(1, 1))  # a rewrite would move this stamp again
    _run(tiny_params(tmp_path / "v1"), out)
    assert {p: p.stat().st_mtime_ns for p in (out / "hf").rglob("*.png")}[next(iter(stamps))] == 1

    full.select(range(20)).save_to_disk(str(tmp_path / "v2"))
    result = _run(tiny_params(tmp_path / "v2"), out)
    assert result.n_images == 20 and len(list((out / "hf").rglob("*.png"))) == 20
    assert set(manifest.read(out / "manifest.csv")["label"]) == {"one", "two"}  # "zero" was rows 20-29


def test_audit_reads_a_saved_dataset_like_a_folder(folder, tmp_path):
    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    data, _ = folder
    _dataset(data).save_to_disk(str(tmp_path / "saved"))
    args = ["audit", str(tmp_path / "saved"), "--out", str(tmp_path / "audit")]
    args += ["--params", str(tmp_path / "none.yaml"), "--set", "validate.label_audit=false"]
    result = CliRunner().invoke(app, [*args, "--set", "model.image_size=32"])
    assert result.output.startswith("30 images, 3 classes: 0 quarantined"), result.output
    assert (tmp_path / "audit" / "report.md").is_file()


def test_image_paths_outside_the_dataset_are_refused_listed_and_never_copied(folder, tmp_path):
    """A row naming `../../x` or an absolute path elsewhere on the machine is skipped with the reason;
    nothing of it lands in the prepared data (which `dvc push` would send to the team's remote) unless
    data.allow_paths_under names its folder."""
    data, _ = folder
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    Image.new("L", (8, 8), 123).save(secret)  # content found nowhere in the dataset
    files = sorted(data.rglob("*.png"))[:12]
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    cells = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    cells += [{"bytes": None, "path": "../elsewhere/secret.png"}, {"bytes": None, "path": str(secret)}]
    labels = [f.parent.name for f in files] + [files[0].parent.name] * 2
    pd.DataFrame({"image": cells, "label": labels}).to_parquet(dataset / "train.parquet")

    result = _run(tiny_params(dataset / "train.parquet"), tmp_path / "out")
    assert result.n_images == 12
    outside = [s for s in result.skipped if "resolves outside the dataset's folder" in s]
    assert [s.split(": ", 1)[1].split(" image ")[0] for s in outside] == ["row 12:", "row 13:"]
    assert "data.allow_paths_under" in outside[0]
    copied = {sha256_file(p) for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix == ".png"}
    assert len(copied) == 12 and sha256_file(secret) not in copied

    allowed = tiny_params(dataset / "train.parquet", data={"allow_paths_under": str(secret.parent)})
    assert _run(allowed, tmp_path / "out-allowed").n_images == 14
