"""Label audit: planted flips are found with the precision the audit itself expects, and a clean set
whose classes overlap is not flagged (the noise model tells overlap from wrong labels)."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_digits
from visiontune.components import audit
from visiontune.components.audit import embed, find_issues, fit_noise, label_audit
from visiontune.components.config import BaseConfig, DataConfig, ValidateConfig
from visiontune.components.prepare import prepare


def _prepared(root, tmp_path) -> pd.DataFrame:
    prepare(DataConfig(source=str(root)), BaseConfig(), ValidateConfig(max_pixels=10**8), tmp_path / "prep")
    return pd.read_csv(tmp_path / "prep" / "manifest.csv", dtype=str, keep_default_na=False)


def _flip(frame: pd.DataFrame, count: int, seed: int) -> set[str]:
    """Move `count` labels to a uniformly chosen other class; returns their paths."""
    rng = np.random.default_rng(seed)
    classes = sorted(frame["label"].unique())
    picks = rng.choice(len(frame), count, replace=False)
    for i in picks:
        frame.at[i, "label"] = rng.choice([c for c in classes if c != frame.at[i, "label"]])
    return set(frame.loc[picks, "path"])


def _blends(root, per_class: int = 40, patch: int = 32, seed: int = 0):
    """Each image mixes brick, grass and gravel; its class is the texture with the largest weight,
    often barely: labels right by construction, classes overlapping."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = {name: getattr(data, name)() for name in ("brick", "grass", "gravel")}
    counts = dict.fromkeys(sources, 0)
    while min(counts.values()) < per_class:
        weights = rng.dirichlet([2.0, 2.0, 2.0])
        label = list(sources)[int(weights.argmax())]
        if counts[label] >= per_class:
            continue
        corners = rng.integers(0, 512 - patch, (3, 2))
        parts = zip(weights, sources.values(), corners, strict=True)
        mix = sum(w * img[y : y + patch, x : x + patch] for w, img, (y, x) in parts)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(mix).astype(np.uint8)).save(root / label / f"{sum(counts.values())}.png")
        counts[label] += 1
    return root


def test_planted_flips_are_found_with_the_precision_the_audit_expects(tmp_path):
    frame = _prepared(write_digits(tmp_path / "raw", classes=(0, 1, 2, 3, 4), per_class=40), tmp_path)
    truth = _flip(frame, 10, seed=0)  # 5 %
    result = label_audit(frame, 64, folds=5, seed=0, out=tmp_path, store=tmp_path / "cache")
    section, flagged = result["section"], {x["path"] for x in result["issues"]}
    precision, recall = len(flagged & truth) / len(flagged), len(flagged & truth) / len(truth)
    assert precision >= 0.75 and recall >= 0.7, (precision, recall)
    assert abs(section["expected_precision"] - precision) <= 0.25
    assert 0.02 <= section["estimated_noise_rate"] <= 0.1
    assert section["flagged_fraction"] == len(flagged) / len(frame)
    assert section["fits"] >= 2  # refit without the flagged images
    errors = [x["error_probability"] for x in result["issues"]]
    assert errors == sorted(errors, reverse=True)  # most likely wrong first


def test_clean_overlapping_classes_are_not_flagged(tmp_path):
    frame = _prepared(_blends(tmp_path / "raw"), tmp_path)
    result = label_audit(frame, 64, folds=5, seed=0, out=tmp_path, store=tmp_path / "cache")
    section = result["section"]
    assert section["cv_accuracy_vs_given_labels"] < 0.95  # the classes do overlap
    assert section["flagged_fraction"] <= 0.03  # far below validate.max_label_issue_fraction = 0.1
    assert section["estimated_noise_rate"] <= 0.03


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_noise_fit_discounts_overlap_and_recovers_the_flip_rate(rate):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.5), 2000)  # overlapping classes: many spread-out rows
    labels = np.array([rng.choice(4, p=p) for p in probs])  # drawn from them: calibrated, none wrong
    for i in rng.choice(2000, int(rate * 2000), replace=False):
        labels[i] = (labels[i] + 1 + rng.integers(3)) % 4  # then flipped to another class at random
    temperature, fitted, _ = fit_noise(np.log(probs), labels)
    assert fitted == pytest.approx(rate, abs=0.03)
    assert temperature == pytest.approx(1.0, abs=0.15)


def test_labels_among_the_top_classes_are_ambiguity_not_flips(monkeypatch):
    """4,000 images of 10 classes, mostly confident; a fifth of them ambiguous, their label any of the
    four classes ranked highest (a shirt, a T-shirt, a pullover, a coat), and 5 % flipped to a class
    at random. The ambiguity share takes the ambiguous labels, so the flip rate, the flagged set and
    the precision the report states hold; without it, ambiguous labels pass for flips."""
    rng = np.random.default_rng(0)
    probs = np.maximum(rng.dirichlet(np.full(10, 0.05), 4000), 1e-12)
    labels = np.array([rng.choice(10, p=p / p.sum()) for p in probs])
    ambiguous = rng.random(4000) < 0.2
    top = np.argsort(-probs, axis=1)[:, :4]
    labels[ambiguous] = top[ambiguous, rng.integers(0, 4, ambiguous.sum())]
    flipped = rng.choice(4000, 200, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, 200)) % 10

    def audit_of() -> tuple[tuple[float, float, float], float, float]:
        fitted = fit_noise(np.log(probs), labels)
        error, flagged = audit._flag(np.log(probs), labels, fitted, audit.FLAG_PROBABILITY)
        return fitted, np.isin(flagged, flipped).mean(), error[flagged].mean()

    (_, rate, ambiguity), precision, stated = audit_of()
    assert rate == pytest.approx(0.05, abs=0.015) and ambiguity == pytest.approx(0.2, abs=0.05)
    assert precision >= 0.6 and abs(stated - precision) <= 0.1, (precision, stated)
    monkeypatch.setattr(audit, "AMBIGUITY_CLASSES", 1)  # no ambiguity share
    (_, rate, ambiguity), precision, stated = audit_of()
    assert ambiguity == 0.0 and rate > 0.08 and precision < 0.5 and stated - precision > 0.2


def test_find_issues_flags_nothing_without_signal():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 8))
    labels = np.repeat(np.arange(3), 40)
    found = find_issues(features, labels, folds=5, seed=0)
    assert len(found.flagged) <= 3 and found.noise_rate <= 0.05  # random features: nothing is evidence


def _faces(tmp_path) -> tuple[pd.DataFrame, np.ndarray]:
    """scikit-image's lfw_subset (100 faces, 100 non-faces, 25×25) prepared, and its audit features."""
    from skimage import data

    for i, img in enumerate(data.lfw_subset()):
        folder = tmp_path / "raw" / ("face" if i < 100 else "not_face")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    frame = _prepared(tmp_path / "raw", tmp_path)
    return frame, embed(frame, 64, tmp_path / "cache")


def _flipped(frame: pd.DataFrame, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(label indices after `count` flips, the flipped rows)."""
    truth = _flip(frame, count, seed)
    classes = sorted(frame["label"].unique())
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return labels, np.flatnonzero(frame["path"].isin(truth))


def test_refitting_without_the_flagged_images_finds_flips_a_single_fit_misses(tmp_path, monkeypatch):
    """Flipped labels in the training folds teach the classifier their flips; a refit that leaves the
    flagged images out of training sees the rest of them clearly (faces, 10 flips in 200)."""
    frame, features = _faces(tmp_path)
    labels, flipped = _flipped(frame, 10, seed=1)
    found = find_issues(features, labels, folds=5, seed=0)
    hits = np.isin(found.flagged, flipped).sum()
    assert hits >= 9 and hits / len(found.flagged) >= 0.75, (hits, len(found.flagged))
    monkeypatch.setattr(audit, "AUDIT_ROUNDS", 1)
    single = find_issues(features, labels, folds=5, seed=0)
    assert np.isin(single.flagged, flipped).sum() <= 7  # the first fit alone
    assert single.noise_rate < found.noise_rate  # it took flips for overlap


def test_a_refit_keeps_the_first_fits_temperature_as_its_softest(tmp_path, monkeypatch):
    """Faces with 40 flips in 200: the refit's classifier, trained without the flips it found, is
    sure of them; were its temperature free to soften, the fit would move to another explanation
    and flag 51 images for 34 flips (precision 0.67)."""
    frame, features = _faces(tmp_path)
    labels, flipped = _flipped(frame, 40, seed=1)
    found = find_issues(features, labels, folds=5, seed=0)
    hits = np.isin(found.flagged, flipped).sum()
    assert hits >= 36 and hits / len(found.flagged) >= 0.85, (hits, len(found.flagged))
    free = audit.fit_noise
    monkeypatch.setattr(audit, "fit_noise", lambda log_probs, labels, **_: free(log_probs, labels))
    loose = find_issues(features, labels, folds=5, seed=0)
    assert np.isin(loose.flagged, flipped).sum() / len(loose.flagged) < 0.75


def test_the_report_names_the_ambiguity_share_only_when_one_was_fitted():
    from visiontune.components.report import _audit_markdown

    section = {
        "status": "ran", "flagged": 0, "images": 3000, "flagged_fraction": 0.0, "folds": 5, "image_size": 64,
        "fits": 1, "cv_accuracy_vs_given_labels": 0.88, "estimated_noise_rate": 0.0,
        "estimated_label_errors": 0.0, "temperature": 0.9, "estimated_ambiguity": 0.027, "confused_pairs": [],
    }  # fmt: skip
    text = "\n".join(_audit_markdown(section, [], 10))
    assert "a share of ambiguous images whose label may be any of the classes ranked highest (2.7%)" in text
    assert "ambiguous images whose label" not in "\n".join(
        _audit_markdown({**section, "estimated_ambiguity": 0.0}, [], 10)
    )
