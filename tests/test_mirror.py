"""train.hflip: auto decides from the data whether mirror images keep their class, and says why."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_params, write_digits
from visiontune.components import hub, mirror
from visiontune.components import model as models


def _digits(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = [Image.fromarray(np.uint8(np.minimum(x * 16, 255))) for x in digits.images]
    gray = np.stack([np.asarray(scan.resize((size, size))) for scan in scans])
    return np.repeat(gray[..., None], 3, axis=3), digits.target


def _photo_crops(root=None, patch: int = 64):
    """Crops of four scikit-image photos (a person, a cup, a cat, a rocket), one class per photo."""
    from skimage import data

    pixels, labels = [], []
    for label, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        img = getattr(data, name)()
        for y in range(0, img.shape[0] - patch + 1, patch):
            for x in range(0, img.shape[1] - patch + 1, patch):
                crop = img[y : y + patch, x : x + patch]
                pixels.append(crop)
                labels.append(label)
                if root is not None:
                    (root / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(crop).save(root / name / f"{y:03d}_{x:03d}.png")
    return np.stack(pixels), np.array(labels)


def test_scanned_digits_decide_no_mirror():
    pixels, labels = _digits()
    choice = mirror.choose_hflip("auto", pixels, np.arange(len(labels)), labels, seed=0)
    assert not choice.on and choice.kept < mirror.MIN_KEPT
    assert choice.reason.startswith("auto: off, a probe on pretrained features kept")
    assert "on 59" in choice.reason  # about PROBE_IMAGES (600) of the 1,797 are probed, a share of each class


def test_object_photos_decide_mirror():
    pixels, labels = _photo_crops()
    choice = mirror.choose_hflip("auto", pixels, np.arange(len(labels)), labels, seed=0)
    assert choice.on and choice.kept >= mirror.MIN_KEPT
    assert choice.reason.startswith("auto: on,")


def test_the_probe_reads_only_the_rows_it_is_given():
    """rows map training images to store rows: images outside them (here: digits) never count."""
    photos, photo_labels = _photo_crops()
    digits, _ = _digits()
    store = np.concatenate([digits[:300], photos])
    rows = np.arange(300, 300 + len(photos))
    assert mirror.choose_hflip("auto", store, rows, photo_labels, seed=0).on


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_wins_without_a_probe(setting):
    nothing = np.zeros(0, int)
    choice = mirror.choose_hflip(setting, np.zeros((0, 8, 8, 3), np.uint8), nothing, nothing, seed=0)
    assert choice == mirror.MirrorChoice(setting, "train.hflip", None)


def test_too_few_images_to_probe_leave_flips_off():
    pixels, labels = _photo_crops()
    few = np.concatenate([np.flatnonzero(labels == 0)[:4], np.flatnonzero(labels == 1)[:4]])
    choice = mirror.choose_hflip("auto", pixels, few, labels[few], seed=0)
    assert not choice.on and choice.reason == "auto: off, too few images to probe (a class needs 5)"


@pytest.mark.parametrize("kind", ["digits", "photos"])
def test_the_decision_and_its_reason_are_recorded_everywhere(tmp_path, kind):
    """train.json, the checkpoint, `visiontune summary`, the model card and the resolved params that
    register logs to MLflow all carry the same decision: off for digits, on for photos of objects."""
    from visiontune.pipelines import stages
    from visiontune.pipelines.cli import app

    if kind == "digits":
        data = write_digits(tmp_path / "raw", classes=tuple(range(10)), per_class=24)
    else:
        data = tmp_path / "raw"
        _photo_crops(data)
    params = tiny_params(data, validate={"label_audit": False})
    assert params.train.hflip == "auto"  # the typed default
    layout = stages.Layout(tmp_path / "prep")
    for name in ("prepare", "validate", "train"):
        stages.STAGES[name](params, layout)
    trained = json.loads((layout.train / "train.json").read_text())
    assert trained["hflip"] is (kind == "photos")
    assert trained["hflip_reason"].startswith(f"auto: {'on' if kind == 'photos' else 'off'}, a probe")
    _, meta = models.load_checkpoint(layout.train)
    assert (meta["hflip"], meta["hflip_reason"]) == (trained["hflip"], trained["hflip_reason"])
    assert meta["config"]["train"]["hflip"] == "auto"  # the setting as written, beside what it became
    summary = CliRunner().invoke(app, ["summary", "--root", str(layout.root)]).output
    flips = "on" if trained["hflip"] else "off"
    assert f"augmentation    horizontal flips {flips} ({trained['hflip_reason']})" in summary
    assert f"hflip {flips} ({trained['hflip_reason']})" in hub._recipe(meta)["Augmentation"]
    assert stages.resolved_params(layout)["train.resolved_hflip"] is trained["hflip"]


def test_the_parameter_reference_states_the_threshold_the_code_uses():
    from visiontune.components.config import TrainConfig

    description = TrainConfig.model_fields["hflip"].description
    assert f"at least {100 * mirror.MIN_KEPT:g} % of its accuracy" in description
