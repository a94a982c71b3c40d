"""A sample of bench/hostile_inputs.py's files: every one is decoded or refused with its reason,
never a crash, in the decoder and in prepare (serve's share is in test_serve.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_params, write_digits
from visiontune.components import images, manifest
from visiontune.components.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def _hostile():
    spec = importlib.util.spec_from_file_location(
        "bench_hostile_inputs", ROOT / "bench" / "hostile_inputs.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample() -> dict[str, list[tuple[str, bytes]]]:
    return _hostile().generate(per_category=3, seed=1)


def test_the_decoder_decodes_or_refuses_every_hostile_file_with_its_name(sample):
    outcomes = {}
    for files in sample.values():
        for name, body in files:
            try:
                assert images.load_resized(body, 32, name=name).shape == (32, 32, 3)
                outcomes[name] = "decoded"
            except images.ImageDecodeError as exc:  # nothing else may escape
                assert str(exc).startswith(f"{name}: ") and len(str(exc).splitlines()) == 1
                outcomes[name] = "refused"
    refused = {n for n, o in outcomes.items() if o == "refused"}
    assert {n for n, _ in sample["other formats"] + sample["garbage"] + sample["truncated"]} <= refused
    assert not refused & {n for n, _ in sample["modes"] + sample["exif"] + sample["animated"]}


def test_prepare_accepts_or_quarantines_every_hostile_file_by_name(sample, tmp_path):
    data = write_digits(tmp_path / "raw", classes=(0, 1), per_class=6)
    (data / "hostile").mkdir()
    names = set()
    for files in sample.values():
        for name, body in files:
            (data / "hostile" / name).write_bytes(body)
            names.add(name)
    params = tiny_params(data)
    result = prepare(params.data, params.base, params.validate_, tmp_path / "out")
    rows = {Path(p).name for p in manifest.read(tmp_path / "out" / "manifest.csv")["path"]}
    quarantined = {
        Path(q["path"]).name: q for q in json.loads((tmp_path / "out" / "quarantine.json").read_text())
    }
    assert names <= rows | set(quarantined), "a hostile file vanished without a reason"
    assert all(quarantined[n]["reason"] and quarantined[n]["kind"] for n in names - rows)
    kinds = {quarantined[n]["kind"] for n, _ in sample["other formats"]}
    assert kinds == {"format not accepted"} and result.n_quarantined == len(names - rows)
