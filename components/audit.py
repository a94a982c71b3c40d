"""Label audit: out-of-sample class probabilities from pretrained features, a noise model fitted to
them, and the images whose given label is most likely wrong.

Each image is embedded once by the frozen ImageNet Lite0 (pooled mid-level stages); a logistic
regression is cross-validated over K folds, on two partitions into folds whose probabilities are
averaged, for out-of-sample probabilities. Three numbers are then fitted to the given labels by
maximum likelihood: a temperature that calibrates the probabilities, the share of labels
flipped to another class at random, and (with 4 classes or more) a share of ambiguous images
whose label may be any of the few classes the classifier ranks highest. Class overlap is
explained by the temperature (ambiguous images get spread-out probabilities) and by that
ambiguity share (a shirt taken for a T-shirt, a coat or a pullover: the label lies among the top
classes, where a flip to a class at random rarely does), and only labels that the features place
firmly in another class are explained by flips, so a clean set with overlapping classes gets a
noise estimate near zero. Each image's probability of carrying a wrong label follows, the
estimated number of wrong labels is flagged, most likely first, with any image wrong with at least
the flag probability. Flipped labels in the training folds teach the classifier their flips, so
it is fitted again with the flagged images left out of training (each still scored out of
sample), up to three fits in all. The mean of the flagged images' probabilities is the precision
a reviewer should expect. Imported by the validate stage; runs nothing.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import cache, images
from . import model as models
from .config import ValidateConfig

AUDIT_ROUNDS = 3  # classifier fits at most: the first on every label, then without the flagged images
MAX_TEMPERATURE = float(np.exp(4.0))  # the noise fit's softest temperature
# an ambiguous image's label lies among the classifier's top classes: this many, at most half of them
# (fewer than 4 classes: no ambiguity share, the top half being one class); a Beta(1, 1 + prior) on
# its share keeps small sets from trading flips for it (photos, 110 images: recall 1.00 -> 0.67 without)
AMBIGUITY_CLASSES, AMBIGUITY_PRIOR = 4, 50.0
# partitions into folds whose probabilities are averaged: two rank flips better than one (5 % flips: blends'
# recall 0.79 -> 0.83, faces' precision 0.91 -> 0.97) at twice the classifier's time
CV_REPEATS = 2
# images a forward pass of the embedder: on 2 CPU cores, 16 (channels-last) embedded Lite0 at 224 px 2.5×
# as fast as 256 (NCHW) did (58 against 23 img/s), and at 64 px 2.1× (751 against 355), in 1/19 the memory
EMBED_BATCH = {"cuda": 256, "cpu": 16}
FLAG_PROBABILITY = ValidateConfig.model_fields["audit_flag_probability"].default  # params.yaml's


@dataclass(frozen=True)
class Findings:
    """What the audit concludes about one labeled set; `flagged` is ranked, most likely wrong first."""

    probs: np.ndarray  # calibrated out-of-sample class probabilities, (images, classes)
    error_probability: np.ndarray  # per image: probability that its given label is wrong
    noise_rate: float  # estimated share of labels flipped to another class
    temperature: float  # divides the classifier's log-probabilities
    ambiguity: float  # estimated share of labels that may be any of the classifier's top classes
    flagged: np.ndarray  # indices of flagged images
    expected_precision: float | None  # mean error probability of the flagged images
    expected_recall: float | None  # their share of the expected number of wrong labels
    agreement: float  # share of given labels the classifier predicts
    fits: int  # classifier fits: the first on every label, each later one without the flagged images


def embed(frame: pd.DataFrame, size: int | None, store: Path, batch_size: int | None = None) -> np.ndarray:
    """Pretrained features of the manifest's images, read from the decoded store; on the GPU when
    there is one, in batches of EMBED_BATCH for the device unless batch_size is given."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, prep = models.embedder(size, device)
    batch_size = batch_size or EMBED_BATCH.get(device, EMBED_BATCH["cpu"])
    pixels, rows = cache.decoded(store, prep.size, frame["path"].tolist(), frame["sha256"].tolist())
    feats = []
    for i in range(0, len(rows), batch_size):
        batch = images.normalize(pixels[rows[i : i + batch_size]], prep.mean, prep.std)
        feats.append(models.pooled_stage_features(model, batch))
    return np.concatenate(feats)


def out_of_sample_log_probs(
    features: np.ndarray,
    labels: np.ndarray,
    folds: int,
    seed: int,
    c: float = 0.1,
    left_out: np.ndarray | None = None,
) -> np.ndarray:
    """K-fold cross-validated log class probabilities, averaged over CV_REPEATS partitions into folds:
    no image is scored by a model that saw it.

    Images in `left_out` are scored like every other but kept out of every training part; the
    partitions depend on the seed and the labels only, so each round of the audit splits alike.
    """
    from scipy.special import logsumexp

    runs = [_cross_validated(features, labels, folds, seed + r, c, left_out) for r in range(CV_REPEATS)]
    return np.maximum(logsumexp(runs, axis=0) - np.log(len(runs)), -100.0)  # finite: a temperature divides


def _cross_validated(
    features: np.ndarray, labels: np.ndarray, folds: int, seed: int, c: float, left_out: np.ndarray | None
) -> np.ndarray:
    """Log class probabilities of one seeded K-fold partition (see out_of_sample_log_probs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_classes = int(labels.max()) + 1
    log_probs = np.full((len(labels), n_classes), -100.0)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in cv.split(features, labels):
        if left_out is not None:
            train = train[~np.isin(train, left_out)]
        if len(np.unique(labels[train])) < 2:  # nothing to learn from: these images stay unscored
            log_probs[test] = -np.log(n_classes)
            continue
        # linear on standardized stage features: as accurate on digits as a Nystroem RBF model
        # (0.976 vs 0.970) in a fraction of its time; C=0.1 gave better-ranked flips than C=1 on all sets
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs convergence notes on tiny folds
            classifier.fit(features[train], labels[train])
        fold = classifier.predict_log_proba(features[test])
        log_probs[np.ix_(test, classifier.classes_)] = np.maximum(fold, -100.0)
    return log_probs


def fit_noise(
    log_probs: np.ndarray, labels: np.ndarray, max_rate: float = 0.5, max_temperature: float = MAX_TEMPERATURE
) -> tuple[float, float, float]:
    """(temperature, flip rate, ambiguity share) that maximize the likelihood of the given labels
    when each label is kept with probability 1 - rate and otherwise replaced by one of the other
    classes at random, a kept label being drawn from the calibrated probabilities or, for the
    ambiguity share of images, from their top classes alike (_top_class_mass); the temperature at
    most max_temperature."""
    from scipy.optimize import minimize

    mass = _top_class_mass(log_probs, labels)

    def nll(theta: np.ndarray) -> float:
        likelihood = _given_label_likelihood(log_probs, labels, np.exp(theta[0]), theta[1], theta[2], mass)[0]
        # a Beta(1, 2) prior on the rate: where the features say nothing, any rate fits; take none
        return -np.log(likelihood).sum() - np.log1p(-theta[1]) - AMBIGUITY_PRIOR * np.log1p(-theta[2])

    # the likelihood can have other, flatter optima; start from a low and a high rate and ambiguity
    top, ambiguous = float(np.log(max_temperature)), 0.2 if mass is not None else 0.0
    starts = ([min(0.0, top), 0.02, 0.0], [min(0.0, top), 0.2, 0.0], [min(0.0, top), 0.02, ambiguous])
    bounds = [(-4.0, top), (0.0, max_rate), (0.0, 0.9 if mass is not None else 0.0)]  # log T; rate; share
    best = min((minimize(nll, x0=x0, method="L-BFGS-B", bounds=bounds) for x0 in starts), key=lambda r: r.fun)
    return float(np.exp(best.x[0])), float(best.x[1]), float(best.x[2])


def _top_class_mass(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Per image, the probability an ambiguous image is given its label: 1/k when the label is among
    the classifier's k = min(AMBIGUITY_CLASSES, classes // 2) top classes, else 0; None when k < 2."""
    k = min(AMBIGUITY_CLASSES, log_probs.shape[1] // 2)
    if k < 2:
        return None
    above = (log_probs > log_probs[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return np.where(above < k, 1.0 / k, 0.0)


def _given_label_likelihood(
    log_probs: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    rate: float,
    ambiguity: float,
    mass: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(probability of each given label under the noise model, its part from a flip); `mass` is
    _top_class_mass, taken with weight `ambiguity`."""
    from scipy.special import log_softmax

    clean = np.exp(log_softmax(log_probs / temperature, axis=1)[np.arange(len(labels)), labels])
    if mass is not None:
        clean = (1 - ambiguity) * clean + ambiguity * mass
    flipped = rate / (log_probs.shape[1] - 1) * (1 - clean)  # true class elsewhere, flipped to this one
    return np.maximum((1 - rate) * clean + flipped, 1e-300), flipped


def find_issues(
    features: np.ndarray,
    labels: np.ndarray,
    folds: int,
    seed: int,
    flag_probability: float = FLAG_PROBABILITY,
) -> Findings:
    """Fit the classifier and the noise model and flag; then refit both, up to AUDIT_ROUNDS in all,
    with the images flagged so far kept out of training (and still scored out of sample), until
    the flagged set stops changing. Flagged: the estimated number of wrong labels, most likely
    first, and any other image whose label is wrong with at least `flag_probability`."""
    from scipy.special import softmax

    left_out, first_temperature = np.empty(0, dtype=np.int64), None
    for fits in range(1, AUDIT_ROUNDS + 1):  # noqa: B007 (the count is reported)
        log_probs = out_of_sample_log_probs(features, labels, folds, seed, left_out=left_out)
        # trained without the flips it found, the classifier is sharper on them; a softer temperature
        # than the first fit's would move the fit to another explanation (faces, 20 % flips:
        # precision 0.95 -> 0.67; textures: rate 0)
        fitted = fit_noise(log_probs, labels, max_temperature=first_temperature or MAX_TEMPERATURE)
        temperature, rate, ambiguity = fitted
        first_temperature = first_temperature or temperature
        error, flagged = _flag(log_probs, labels, fitted, flag_probability)
        if np.array_equal(np.sort(flagged), np.sort(left_out)):
            break  # the next fit would be this one again
        left_out = flagged
    return Findings(
        probs=softmax(log_probs / temperature, axis=1),
        error_probability=error,
        noise_rate=rate,
        temperature=temperature,
        ambiguity=ambiguity,
        flagged=flagged,
        expected_precision=float(error[flagged].mean()) if len(flagged) else None,
        expected_recall=float(error[flagged].sum() / error.sum()) if len(flagged) else None,
        agreement=float((log_probs.argmax(1) == labels).mean()),
        fits=fits,
    )


def _flag(
    log_probs: np.ndarray, labels: np.ndarray, fitted: tuple[float, float, float], flag_probability: float
) -> tuple[np.ndarray, np.ndarray]:
    """(each image's probability that its label is wrong, the flagged images, most likely first);
    `fitted` is fit_noise's (temperature, rate, ambiguity)."""
    temperature, rate, ambiguity = fitted
    mass = _top_class_mass(log_probs, labels)
    likelihood, flipped = _given_label_likelihood(log_probs, labels, temperature, rate, ambiguity, mass)
    error = flipped / likelihood
    ranked = np.argsort(-error, kind="stable")
    # the fitted rate runs low on small sets (faces, 10 flips in 200: 0.04) while the ranking stays
    # right, so an image whose label is wrong with at least flag_probability is flagged beyond the
    # estimated count too
    return error, ranked[: max(int(round(rate * len(labels))), int((error >= flag_probability).sum()))]


def thumbnails(issues: list[dict], out: Path, limit: int = 24) -> Path | None:
    """A grid PNG of the top suspects: each with its given label, suggested label and error probability."""
    if not issues:
        return None
    from .plots import image_grid

    shown = issues[:limit]
    titles = [
        f"given {x['given_label']}\nsuggested {x['suggested_label']}  ({x['error_probability']:.2f})"
        for x in shown
    ]
    suptitle = "Label audit: top suspects (probability that the given label is wrong)"
    return image_grid([x["path"] for x in shown], titles, suptitle, out / "label_issues.png")


def _confused_pairs(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[dict]:
    from cleanlab.dataset import find_overlapping_classes

    overlap = find_overlapping_classes(labels=labels, pred_probs=probs).head(10)
    return [
        {
            "classes": [classes[int(r["Class Index A"])], classes[int(r["Class Index B"])]],
            "examples": int(r["Num Overlapping Examples"]),
            "joint_probability": float(r["Joint Probability"]),
        }
        for _, r in overlap.iterrows()
        if r["Num Overlapping Examples"] > 0
    ]


def label_audit(
    frame: pd.DataFrame,
    size: int | None,
    folds: int,
    seed: int,
    out: Path,
    store: Path,
    flag_probability: float = FLAG_PROBABILITY,
) -> dict:
    """Audit every label in the manifest; returns the report's `label_audit` section and issues."""
    from cleanlab.rank import get_label_quality_scores

    started = time.perf_counter()
    counts = frame["label"].value_counts()
    too_few = sorted(counts[counts < folds].index.tolist())
    audited = frame[~frame["label"].isin(too_few)].reset_index(drop=True)
    classes = sorted(audited["label"].unique())
    section = {
        "status": "skipped",
        "reason": None,
        "folds": folds,
        "image_size": size,
        "not_audited": too_few,
    }
    if len(classes) < 2:
        section["reason"] = f"fewer than 2 classes with at least {folds} images (validate.audit_folds)"
        return {"section": section, "issues": []}
    index = {c: i for i, c in enumerate(classes)}
    labels = audited["label"].map(index).to_numpy()
    features = embed(audited, size, store)
    embed_seconds = time.perf_counter() - started
    found = find_issues(features, labels, folds, seed, flag_probability)
    quality = get_label_quality_scores(labels, found.probs)
    issues = [
        {
            "path": audited.at[i, "path"],
            "given_label": classes[labels[i]],
            "suggested_label": classes[int(found.probs[i].argmax())],
            "error_probability": float(found.error_probability[i]),
            "score": float(quality[i]),
            "split": audited.at[i, "split"],
        }
        for i in found.flagged
    ]
    grid = thumbnails(issues, out)
    section.update(
        status="ran",
        images=int(len(audited)),
        cv_accuracy_vs_given_labels=found.agreement,
        estimated_noise_rate=found.noise_rate,
        estimated_label_errors=float(found.error_probability.sum()),
        temperature=found.temperature,
        estimated_ambiguity=found.ambiguity,
        fits=found.fits,
        flag_probability=flag_probability,
        flagged=len(issues),
        flagged_fraction=len(issues) / len(audited),
        expected_precision=found.expected_precision,
        expected_recall=found.expected_recall,
        confused_pairs=_confused_pairs(labels, found.probs, classes),
        thumbnails=grid.name if grid else None,
        embed_seconds=round(embed_seconds, 2),
        seconds=round(time.perf_counter() - started, 2),
    )
    return {"section": section, "issues": issues}
