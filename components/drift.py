"""Dataset shift: do the images in a window of new traffic look like the val split the model was checked on?

Export computes a `Reference` from the val split (not train: a model is overconfident on what it
trained on) and saves it as one .npz beside model.onnx; `check` tests a window of new images
against it with three tests, each with an honest p-value:

- `mmd`: kernel two-sample test (Gretton et al. 2012) on the penultimate-layer embeddings reduced
  by a PCA fitted on one half of val (the other half is the reference: axes fitted to the
  reference itself made 96 % of null windows of 500 fire), Gaussian kernel, median-distance
  bandwidth on the pooled sample, permutation p-value (k+1)/(B+1), all B permutations in one
  matrix product. Sees covariate shift the predictions do not show.
- `ks`: Kolmogorov–Smirnov tests on each class's softmax output, Bonferroni over the classes
  (black-box shift detection: Lipton et al. 2018; Rabanser et al. 2019, "Failing loudly").
- `chi2`: Pearson's chi-squared test of homogeneity between the reference's and the window's
  predicted-class counts (class-prior shift). Its p-value is a permutation p-value, exact at any
  window size, so classes with tiny expected counts need no pooling.

The window is flagged when the smallest p-value, Bonferroni-corrected for the three tests, is
below alpha. A fixed seed reuses one set of permutations for every window of a size; over 1,000
null windows that held the level as well as fresh permutations did (0.052 vs 0.053 at n = 10).
numpy and scipy only; imported by export, serve, the drift command and
bench/drift.py; runs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .errors import VisiontuneError, reading

FORMAT = 1  # version of the .npz layout
MAX_COMPONENTS = 128  # PCA size cap: power rose from 8 to 128 axes, level held (bench/drift.py --components)
MAX_REFERENCE = 1000  # reference images kept: the kernel matrix grows with (reference + window)²
MAX_WINDOW = 2000  # window images tested at once; larger windows are subsampled (seeded)
TESTS = ("mmd", "ks", "chi2")


@dataclass(frozen=True, eq=False)
class Reference:
    """What the detectors compare new images with, computed once from the val split."""

    mean: np.ndarray  # (d,) float32: mean val embedding
    components: np.ndarray  # (k, d) float32: PCA axes, unit rows, largest variance first
    embeddings: np.ndarray  # (m, k) float32: the val embeddings, reduced
    probs: np.ndarray  # (m, C) float32: the val softmax outputs
    class_names: tuple[str, ...]
    explained: float  # share of the val embeddings' variance the k components keep

    @property
    def labels(self) -> np.ndarray:
        """Predicted class of each reference image."""
        return self.probs.argmax(1)

    @property
    def pred_counts(self) -> np.ndarray:
        """How many reference images the model assigns to each class."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    def reduce(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw (n, d) embeddings in the reference's PCA coordinates, (n, k) float32."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"embeddings of shape {embeddings.shape}: the reference expects (n, {self.mean.shape[0]})"
            )
        return _project(embeddings, self.mean, self.components)

    def save(self, path: Path) -> Path:
        """Write one .npz (no pickled objects) to `path`, through a temporary name; returns path."""
        path = Path(path)
        arrays = {
            "format": np.array(FORMAT),
            "mean": self.mean,
            "components": self.components,
            "embeddings": self.embeddings,
            "probs": self.probs,
            "pred_counts": self.pred_counts,
            "class_names": np.array(self.class_names, dtype=str),
            "explained": np.array(self.explained),
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Reference:
        """Read a reference written by `save` (allow_pickle=False); a torn one is one line."""
        with (
            reading(path, "drift reference", "export the model again (`visiontune export`)"),
            np.load(path, allow_pickle=False) as z,
        ):
            if int(z["format"]) != FORMAT:
                found = int(z["format"])
                raise VisiontuneError(
                    f"{path}: drift reference format {found}; this version reads {FORMAT}: export the model "
                    "again (`visiontune export`)"
                )
            return cls(
                mean=z["mean"],
                components=z["components"],
                embeddings=z["embeddings"],
                probs=z["probs"],
                class_names=tuple(str(c) for c in z["class_names"]),
                explained=float(z["explained"]),
            )


def _project(embeddings: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return (np.asarray(embeddings, dtype=np.float32) - mean) @ axes.T


def n_components(n: int, d: int) -> int:
    """PCA size: at most MAX_COMPONENTS, and fewer than the images that fit it."""
    return max(1, min(MAX_COMPONENTS, d, n - 1))


def build_reference(
    embeddings: np.ndarray,
    probs: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    components: int | None = None,
    fit_embeddings: np.ndarray | None = None,
    max_size: int = MAX_REFERENCE,
    seed: int = 0,
) -> Reference:
    """The reference from the val split's (m, d) embeddings and (m, C) softmax outputs.

    The PCA (`components` axes; None: `n_components`) is fitted on `fit_embeddings`, or, when
    None, on a seeded half of the val images while the other half become the reference
    embeddings: points projected on axes fitted to themselves spread wider than new points do, and
    the MMD test would see that as a difference. The softmax outputs of every val image are kept.
    At most `max_size` images are kept (a seeded subsample)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    probs = np.asarray(probs, dtype=np.float32)
    if embeddings.ndim != 2 or probs.ndim != 2 or len(embeddings) != len(probs):
        raise ValueError(f"embeddings {embeddings.shape} and probs {probs.shape}: need (m, d) and (m, C)")
    if probs.shape[1] != len(class_names):
        raise ValueError(f"probs have {probs.shape[1]} columns for {len(class_names)} class names")
    rng = np.random.default_rng(seed)
    if len(embeddings) > max_size:
        keep = np.sort(rng.choice(len(embeddings), max_size, replace=False))
        embeddings, probs = embeddings[keep], probs[keep]
    held = embeddings
    if fit_embeddings is None:
        order = rng.permutation(len(embeddings))
        fit_embeddings, held = embeddings[np.sort(order[::2])], embeddings[np.sort(order[1::2])]
    fit_embeddings = np.asarray(fit_embeddings, dtype=np.float64)
    if len(held) < 2 or len(fit_embeddings) < 2:
        raise ValueError(f"a drift reference needs at least 4 val images, got {len(embeddings)}")
    k = components or n_components(*fit_embeddings.shape)
    mean = fit_embeddings.mean(0)
    _, sv, vt = np.linalg.svd(fit_embeddings - mean, full_matrices=False)
    variance = sv**2
    mean, axes = mean.astype(np.float32), vt[:k].astype(np.float32)
    return Reference(
        mean=mean,
        components=axes,
        embeddings=_project(held, mean, axes),  # as windows will be: float32, same arithmetic
        probs=probs,
        class_names=tuple(str(c) for c in class_names),
        explained=float(variance[:k].sum() / max(variance.sum(), 1e-30)),
    )


@dataclass(frozen=True)
class Detection:
    """One test's answer: its statistic, p-value, effect size and whether it fired at alpha."""

    test: str
    statistic: float
    p_value: float
    effect: float
    effect_name: str
    fired: bool
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DriftResult:
    """The three tests on one window, the combined decision and the images that moved most."""

    drift: bool  # p_value < alpha
    p_value: float  # the smallest test p-value × 3 (Bonferroni over the tests), at most 1
    alpha: float
    window: int  # images in the window
    tested: int  # images tested (the window, subsampled when larger than MAX_WINDOW)
    tests: dict[str, Detection]
    most_shifted: list[int]  # window indices, farthest from every reference image first
    shift_scores: list[float]  # their distance to the nearest reference image ÷ the reference's own

    @property
    def fired(self) -> list[str]:
        return [name for name, t in self.tests.items() if t.fired]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (drift.json, /v1/drift, MLflow)."""
        return {
            "drift": self.drift,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "window": self.window,
            "tested": self.tested,
            "fired": self.fired,
            "tests": {name: t.__dict__ for name, t in self.tests.items()},
            "most_shifted": self.most_shifted,
            "shift_scores": self.shift_scores,
        }


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """(k+1)/(B+1), k of the B permuted statistics at least the observed one: never 0, and exact."""
    return float((1 + np.count_nonzero(null >= observed)) / (1 + len(null)))


def _squared_distances(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    sq = (z * z).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def median_bandwidth(z: np.ndarray, d2: np.ndarray | None = None) -> float:
    """The median Euclidean distance between distinct rows of `z` (1.0 if it is 0)."""
    d2 = _squared_distances(z) if d2 is None else d2
    upper = d2[np.triu_indices(len(d2), 1)]
    median = float(np.median(np.sqrt(upper))) if len(upper) else 0.0
    return median if median > 0 else 1.0


@lru_cache(maxsize=8)  # windows of one size, tested with one seed, share them (40 % of a check at n=500)
def _memberships(n_total: int, m: int, permutations: int, seed: int) -> np.ndarray:
    """(B, m) indices of the pooled sample that each permutation calls 'reference' (read-only)."""
    rng = np.random.default_rng(seed)
    idx = rng.permuted(np.tile(np.arange(n_total), (permutations, 1)), axis=1)[:, :m]
    idx.flags.writeable = False
    return idx


def _mmd(x: np.ndarray, y: np.ndarray, permutations: int, seed: int, alpha: float):
    """MMD² test of x (reference) vs y (window); also the pooled squared distances."""
    m, n = len(x), len(y)
    pooled = np.concatenate([x, y])
    d2 = _squared_distances(pooled)
    bandwidth = median_bandwidth(pooled, d2)
    k = np.exp(d2 / (-2.0 * bandwidth**2)).astype(np.float32)
    np.fill_diagonal(k, 0.0)  # the U-statistic leaves out k(z, z)
    rows = k.sum(1, dtype=np.float64)
    total = rows.sum()

    def mmd2(xx, xr):  # from s'Ks and s'K1 of a reference indicator s
        xy = xr - xx
        yy = total - 2.0 * xr + xx
        return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2.0 * xy / (m * n)

    observed = mmd2(k[:m, :m].sum(dtype=np.float64), rows[:m].sum())
    idx = _memberships(m + n, m, permutations, seed)
    s = np.zeros((permutations, m + n), np.float32)
    np.put_along_axis(s, idx, 1.0, axis=1)
    ks = s @ k  # one (B, N) × (N, N) product: every permutation's s'K at once
    null = mmd2((ks * s).sum(1, dtype=np.float64), rows[idx].sum(1))
    p = permutation_p_value(observed, null)
    detection = Detection(
        "mmd",
        float(observed),
        p,
        float(max(observed, 0.0)),
        "MMD²",
        p < alpha,
        {"bandwidth": bandwidth, "components": int(x.shape[1]), "permutations": permutations},
    )
    return detection, d2


def mmd_test(
    x: np.ndarray, y: np.ndarray, alpha: float = 0.05, permutations: int = 500, seed: int = 0
) -> Detection:
    """Kernel two-sample test of samples x (m, k) and y (n, k): unbiased MMD² with a Gaussian kernel
    of median-distance bandwidth, seeded permutation p-value."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the MMD test needs at least 2 images per sample, got {len(x)} and {len(y)}")
    return _mmd(np.asarray(x), np.asarray(y), permutations, seed, alpha)[0]


def ks_test(ref_probs: np.ndarray, probs: np.ndarray, alpha: float = 0.05) -> Detection:
    """Two-sample KS test on each class's softmax output, Bonferroni over the classes (with two
    classes the columns are one test: p₁ = 1 − p₀)."""
    c = ref_probs.shape[1]
    res = stats.ks_2samp(ref_probs, probs, axis=0)
    d, p = np.atleast_1d(res.statistic), np.atleast_1d(res.pvalue)
    tests = c if c > 2 else 1
    worst = int(np.argmin(p))
    adjusted = float(min(1.0, tests * p[worst]))
    return Detection(
        "ks",
        float(d[worst]),
        adjusted,
        float(d.max()),
        "max KS D",
        adjusted < alpha,
        {"class": worst, "statistics": d.round(6).tolist(), "p_values": p.tolist()},
    )


def _chi2(ref_counts: np.ndarray, win_counts: np.ndarray) -> np.ndarray:
    """Pearson's homogeneity statistic of 2×C tables, rows of (…, C) count arrays; classes absent
    from both rows left out."""
    m, n = ref_counts.sum(-1, keepdims=True), win_counts.sum(-1, keepdims=True)
    col = ref_counts + win_counts
    expected_ref = m * col / (m + n)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (ref_counts - expected_ref) ** 2 * (m + n) ** 2 / (m * n * col)
    return np.where(col > 0, terms, 0.0).sum(-1)


def chi2_test(
    ref_labels: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    alpha: float = 0.05,
    permutations: int = 500,
    seed: int = 0,
) -> Detection:
    """Chi-squared test of homogeneity of predicted-class counts (reference vs window), its p-value
    by permuting the pooled labels: valid however small the expected counts."""
    m, n = len(ref_labels), len(labels)
    ref_counts = np.bincount(ref_labels, minlength=n_classes).astype(np.float64)
    win_counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    observed = float(_chi2(ref_counts, win_counts))
    pooled = np.concatenate([ref_labels, labels])
    idx = _memberships(m + n, m, permutations, seed)
    offsets = (np.arange(permutations) * n_classes)[:, None]
    perm_ref = np.bincount((pooled[idx] + offsets).ravel(), minlength=permutations * n_classes)
    perm_ref = perm_ref.reshape(permutations, n_classes).astype(np.float64)
    null = _chi2(perm_ref, ref_counts + win_counts - perm_ref)
    p = permutation_p_value(observed - 1e-9 * max(observed, 1.0), null)  # ties of equal tables count
    tv = float(0.5 * np.abs(ref_counts / m - win_counts / n).sum())
    detail = {
        "cramers_v": float(np.sqrt(observed / (m + n))),
        "counts": win_counts.astype(int).tolist(),
        "expected": (ref_counts / m * n).round(3).tolist(),
        "permutations": permutations,
    }
    return Detection("chi2", observed, p, tv, "total variation", p < alpha, detail)


def check(
    reference: Reference,
    embeddings: np.ndarray,
    probs: np.ndarray,
    alpha: float = 0.05,
    permutations: int = 500,
    seed: int = 0,
    top: int = 10,
) -> DriftResult:
    """Test a window of new images, their raw (n, d) embeddings and (n, C) softmax outputs, against
    the reference; flag it when the smallest of the three p-values × 3 is below alpha."""
    embeddings, probs = np.asarray(embeddings), np.asarray(probs, dtype=np.float32)
    if len(embeddings) != len(probs):
        raise ValueError(f"{len(embeddings)} embeddings but {len(probs)} softmax rows")
    if probs.ndim != 2 or probs.shape[1] != len(reference.class_names):
        raise ValueError(f"probs {probs.shape}: the reference has {len(reference.class_names)} classes")
    window = len(embeddings)
    if window < 2:
        raise ValueError(f"a drift window needs at least 2 images, got {window}")
    keep = np.arange(window)
    if window > MAX_WINDOW:
        keep = np.sort(np.random.default_rng(seed).choice(window, MAX_WINDOW, replace=False))
    z = reference.reduce(embeddings[keep])
    probs = probs[keep]
    m = len(reference.embeddings)
    mmd, d2 = _mmd(reference.embeddings, z, permutations, seed, alpha)
    ks = ks_test(reference.probs, probs, alpha)
    chi2 = chi2_test(reference.labels, probs.argmax(1), len(reference.class_names), alpha, permutations, seed)
    tests = {"mmd": mmd, "ks": ks, "chi2": chi2}
    p_value = min(1.0, len(tests) * min(t.p_value for t in tests.values()))

    # how unusual each window image is: distance to its nearest reference image, in units of the
    # reference images' median distance to their own nearest neighbour
    ref_d2 = d2[:m, :m] + np.diag(np.full(m, np.inf))
    scale = np.sqrt(np.median(ref_d2.min(1))) or 1.0
    scores = np.sqrt(d2[m:, :m].min(1)) / scale
    order = np.argsort(-scores, kind="stable")[:top]
    return DriftResult(
        drift=p_value < alpha,
        p_value=p_value,
        alpha=alpha,
        window=window,
        tested=len(keep),
        tests=tests,
        most_shifted=keep[order].tolist(),
        shift_scores=scores[order].round(4).tolist(),
    )
