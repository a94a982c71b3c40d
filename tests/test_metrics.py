"""metrics: every number evaluate and train report, against scikit-learn and hand-worked cases.

The reference values come from scikit-learn or from small cases whose answers are worked out in
the comments, never from the code under test.
"""

import csv
import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from visiontune.components import manifest, metrics
from visiontune.components import model as models


def _random_case(seed: int, n: int = 200, n_classes: int = 5, absent: tuple[int, ...] = ()):
    """Seeded labels (none of the `absent` classes) and probabilities that are right more often than not."""
    rng = np.random.default_rng(seed)
    held = [c for c in range(n_classes) if c not in absent]
    y_true = rng.choice(held, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y_true] += 1.2
    for c in absent:  # and a few images are called an absent class anyway
        logits[rng.choice(n, 6, replace=False), c] += 8
    return metrics.softmax(logits), y_true


CASES = [(0, 5, ()), (1, 3, ()), (2, 6, (2,)), (3, 4, (0, 3)), (4, 10, (9,))]


# --- softmax -----------------------------------------------------------------------------------


def test_softmax_is_the_normalized_exponential_and_survives_large_logits():
    logits = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0], [-5.0, 5.0]])
    probs = metrics.softmax(logits)
    np.testing.assert_allclose(probs[0], [0.25, 0.75])  # e^0 : e^ln3 = 1 : 3
    np.testing.assert_allclose(probs[1], [0.5, 0.5])  # no overflow to nan
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[2, 1], 1 / (1 + np.exp(-10)))


# --- accuracy, top-k ---------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "n_classes", "absent"), CASES)
def test_accuracy_and_top_k_match_scikit_learn(seed, n_classes, absent):
    probs, y_true = _random_case(seed, n_classes=n_classes, absent=absent)
    for k in range(1, n_classes + 1):
        flat = metrics.summary(probs, y_true, "val", top_k=k)
        assert flat["val_accuracy"] == pytest.approx(accuracy_score(y_true, probs.argmax(1)), abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k = n_classes: scikit-learn warns that it is trivially 1
            expected = top_k_accuracy_score(y_true, probs, k=k, labels=list(range(n_classes)))
        assert flat[f"val_top{k}_accuracy"] == pytest.approx(expected, abs=1e-12), k
    assert metrics.summary(probs, y_true, "val", top_k=1)["val_top1_accuracy"] == pytest.approx(
        accuracy_score(y_true, probs.argmax(1)), abs=1e-12
    )


def test_accuracy_and_top_k_by_hand():
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # y 0: top-1 right
            [0.6, 0.3, 0.1],  # y 1: second → top-2 right
            [0.6, 0.3, 0.1],  # y 2: third → only top-3
            [0.1, 0.2, 0.7],  # y 2: top-1 right
        ]
    )
    y_true = np.array([0, 1, 2, 2])
    flat = metrics.summary(probs, y_true, "test", top_k=2)
    assert flat["test_accuracy"] == 0.5 and flat["test_top2_accuracy"] == 0.75
    assert flat["test_images"] == 4 and flat["test_classes"] == 3 and flat["test_classes_without_images"] == 0
    # k beyond the number of classes is every class: always right, and named after the classes there are
    beyond = metrics.summary(probs, y_true, "test", top_k=5)
    assert beyond["test_top3_accuracy"] == 1.0 and "test_top5_accuracy" not in beyond


def test_accuracy_interval_is_the_wilson_interval_and_stays_inside_0_1():
    low, high = metrics.accuracy_interval(266, 269)  # make run's 3 wrong digits of 269
    assert (round(low, 4), round(high, 4)) == (0.9677, 0.9962)
    # 18 of 18: not the empty interval [1, 1] the normal approximation gives; 1 − 0.1759 by hand
    assert metrics.accuracy_interval(18, 18) == (pytest.approx(0.8241, abs=1e-4), 1.0)
    assert metrics.accuracy_interval(0, 5) == (0.0, pytest.approx(0.4345, abs=1e-4))
    assert metrics.accuracy_interval(0, 0) == (0.0, 1.0)  # no images: nothing is known
    narrow, wide = metrics.accuracy_interval(900, 1000), metrics.accuracy_interval(9, 10)
    assert wide[0] < narrow[0] < 0.9 < narrow[1] < wide[1]  # more images, a narrower interval


def test_summary_gives_the_accuracy_with_its_interval():
    probs = np.eye(3)[[0, 1, 2, 0]]
    flat = metrics.summary(probs, np.array([0, 1, 2, 1]), "val", top_k=1)
    assert (flat["val_accuracy_low"], flat["val_accuracy_high"]) == metrics.accuracy_interval(3, 4)
    low, high = metrics.accuracy_interval(3, 4)
    assert metrics.accuracy_text(flat, "val") == f"0.7500 (95 % interval {low:.4f}–{high:.4f})"
    older = {"test_accuracy": 0.5}  # a metrics.json written before the interval was recorded
    assert metrics.accuracy_text(older) == "0.5000" and metrics.accuracy_text({}) == "none"


def test_tied_scores_are_ranked_as_argmax_ranks_them():
    """With tied scores the lowest class index ranks first, as argmax picks it, so top-1 accuracy is
    accuracy whatever the sort. (scikit-learn ranks ties the other way round, highest index first.)"""
    probs = np.array([[0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.4, 0.4]])
    y_true = np.array([1, 0, 2])
    # row 0: 0 and 1 tie → ranked [0, 1, 2]: y 1 is second. Row 1: all tie → [0, 1, 2]: y 0 is first.
    # Row 2: 1 and 2 tie → [1, 2, 0]: y 2 is second.
    assert metrics.summary(probs, y_true, "test", top_k=1)["test_top1_accuracy"] == pytest.approx(1 / 3)
    assert metrics.summary(probs, y_true, "test", top_k=2)["test_top2_accuracy"] == 1.0
    # many classes and many ties (the case a vectorized, unstable sort reorders): top-1 is still argmax
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(300, 40)).astype(float)
    probs, y_true = scores / scores.sum(1, keepdims=True), rng.integers(0, 40, size=300)
    flat = metrics.summary(probs, y_true, "test", top_k=1)
    assert flat["test_top1_accuracy"] == flat["test_accuracy"] == accuracy_score(y_true, probs.argmax(1))
    top5 = metrics.summary(probs, y_true, "test", top_k=5)["test_top5_accuracy"]
    by_hand = np.mean(
        [
            y in sorted(range(40), key=lambda c, p=p: (-p[c], c))[:5]
            for p, y in zip(probs, y_true, strict=True)
        ]
    )
    assert top5 == pytest.approx(by_hand)


# --- precision, recall, F1 ---------------------------------------------------------------------


def _by_hand(y_true, y_pred, labels):
    """Per-class precision, recall, F1 and support from counting (0 where undefined)."""
    rows = []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        predicted, actual = np.sum(y_pred == c), np.sum(y_true == c)
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        rows.append((p, r, 2 * p * r / (p + r) if p + r else 0.0, actual))
    return np.array(rows, dtype=float)


@pytest.mark.parametrize(("seed", "n_classes", "absent"), CASES)
def test_macro_and_weighted_scores_match_scikit_learn_over_the_classes_present(seed, n_classes, absent):
    probs, y_true = _random_case(seed, n_classes=n_classes, absent=absent)
    y_pred = probs.argmax(1)
    assert set(absent) <= set(y_pred)  # absent classes are predicted: the case that matters
    flat = metrics.summary(probs, y_true, "test", top_k=1)
    present = sorted(set(y_true))
    table = _by_hand(y_true, y_pred, present)
    for average in ("macro", "weighted"):
        p, r, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=present, average=average, zero_division=0
        )
        weights = np.ones(len(present)) if average == "macro" else table[:, 3]
        mine = table[:, :3].T @ weights / weights.sum()
        for name, ref, hand in zip(("precision", "recall", "f1"), (p, r, f1), mine, strict=True):
            assert flat[f"test_{average}_{name}"] == pytest.approx(ref, abs=1e-12), (average, name)
            assert flat[f"test_{average}_{name}"] == pytest.approx(hand, abs=1e-12), (average, name)
    assert flat["test_classes"] == len(present) and flat["test_classes_without_images"] == len(absent)
    if not absent:  # every class present: the plain scikit-learn averages
        assert flat["test_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
        assert flat["test_weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))


def test_precision_recall_f1_by_hand():
    # y_true 0 0 0 1 1 2, predicted 0 0 1 1 2 2 (class 3 exists but has no images and no predictions)
    y_true, y_pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(4)[y_pred] * 0.7 + 0.075
    # class 0: P 2/2, R 2/3, F1 0.8 | class 1: P 1/2, R 1/2, F1 0.5 | class 2: P 1/2, R 1/1, F1 2/3
    flat = metrics.summary(probs, y_true, "t", top_k=1)
    assert flat["t_macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert flat["t_macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert flat["t_macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert flat["t_weighted_recall"] == pytest.approx(4 / 6)  # support-weighted recall = accuracy
    assert flat["t_weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert flat["t_classes_without_images"] == 1
    per_class = metrics.per_class(probs, y_true, ["a", "b", "c", "d"])
    assert per_class["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert per_class["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}


@pytest.mark.parametrize(("seed", "n_classes", "absent"), CASES)
def test_per_class_scores_and_confusion_match_scikit_learn(seed, n_classes, absent):
    probs, y_true = _random_case(seed, n_classes=n_classes, absent=absent)
    y_pred = probs.argmax(1)
    names = [f"c{i}" for i in range(n_classes)]
    per_class = metrics.per_class(probs, y_true, names)
    p, r, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(n_classes)), average=None, zero_division=0
    )
    for i, name in enumerate(names):
        assert per_class[name]["support"] == support[i] == np.sum(y_true == i)
        if i in absent:
            assert per_class[name] == {"precision": None, "recall": None, "f1": None, "support": 0}
        else:
            assert per_class[name]["precision"] == pytest.approx(p[i])
            assert per_class[name]["recall"] == pytest.approx(r[i])
            assert per_class[name]["f1"] == pytest.approx(f1[i])
    assert metrics.without_images(y_true, names) == [names[i] for i in absent]
    cm = metrics.confusion(probs, y_true, n_classes)
    counted = np.zeros((n_classes, n_classes), dtype=int)
    for t, q in zip(y_true, y_pred, strict=True):
        counted[t, q] += 1
    assert cm.shape == (n_classes, n_classes)
    np.testing.assert_array_equal(cm, counted)
    np.testing.assert_array_equal(cm, confusion_matrix(y_true, y_pred, labels=list(range(n_classes))))


def test_confusion_by_hand_rows_are_true_columns_predicted():
    y_true, y_pred = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 2, 2])
    cm = metrics.confusion(np.eye(4)[y_pred], y_true, 4)  # class 3: neither label nor prediction
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])


# --- expected calibration error ----------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    """4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: a confidence on an edge falls in the bin
    it closes (.5 in the second, .75 in the third, 1.0 in the last).

    row  probs               y  confidence  correct  bin
     0   [1.0, 0.0, 0.0]     0  1.00        yes      4
     1   [0.75, 0.25, 0.0]   1  0.75        no       3
     2   [0.2, 0.6, 0.2]     1  0.60        yes      3
     3   [0.5, 0.3, 0.2]     2  0.50        no       2
     4   [0.4, 0.35, 0.25]   0  0.40        yes      2
     5   [0.8, 0.1, 0.1]     0  0.80        yes      4
    bin 4: accuracy 1,  confidence 0.9   → |gap| 0.1,   weight 2/6
    bin 3: accuracy .5, confidence 0.675 → |gap| 0.175, weight 2/6
    bin 2: accuracy .5, confidence 0.45  → |gap| 0.05,  weight 2/6
    ECE = (0.1 + 0.175 + 0.05) / 3 = 0.108333…
    """
    probs = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.75, 0.25, 0.0],
            [0.2, 0.6, 0.2],
            [0.5, 0.3, 0.2],
            [0.4, 0.35, 0.25],
            [0.8, 0.1, 0.1],
        ]
    )
    y_true = np.array([0, 1, 1, 2, 0, 0])
    assert metrics.expected_calibration_error(probs, y_true, bins=4) == pytest.approx(0.325 / 3)
    rows = metrics.reliability(probs, y_true, bins=4)
    assert [r["count"] for r in rows] == [0, 2, 2, 2]
    assert rows[0]["confidence"] is None and rows[0]["accuracy"] is None
    assert [r["accuracy"] for r in rows[1:]] == pytest.approx([0.5, 0.5, 1.0])
    assert [r["confidence"] for r in rows[1:]] == pytest.approx([0.45, 0.675, 0.9])
    # one bin (0, 1]: |mean accuracy − mean confidence| = |4/6 − 4.05/6| = 0.05/6
    assert metrics.expected_calibration_error(probs, y_true, bins=1) == pytest.approx(0.05 / 6)


def test_expected_calibration_error_of_perfect_and_of_overconfident_predictions():
    y_true = np.array([0, 1, 2, 0])
    assert metrics.expected_calibration_error(np.eye(3)[y_true], y_true) == 0.0  # sure and right
    assert metrics.expected_calibration_error(np.eye(3)[(y_true + 1) % 3], y_true) == 1.0  # sure, wrong
    # 15 bins (the default summary uses): confidences 0.9 and 0.65 fall in (13/15, 14/15] and (9/15, 10/15]
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.65, 0.35]])
    y_true = np.array([0, 1, 0, 0])  # 0.9 bin: accuracy 0.5 → gap 0.4; 0.65 bin: accuracy 1 → gap 0.35
    expected = 0.5 * 0.4 + 0.5 * 0.35
    assert metrics.expected_calibration_error(probs, y_true) == pytest.approx(expected)
    assert metrics.summary(probs, y_true, "test", top_k=1)["test_ece"] == pytest.approx(expected)


@pytest.mark.parametrize("bins", [1, 4, 10, 15])
def test_expected_calibration_error_matches_an_independent_binning(bins):
    probs, y_true = _random_case(7, n=500, n_classes=4)
    confidence, correct = probs.max(1), probs.argmax(1) == y_true
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bin (i/b, (i+1)/b]
    expected = sum(
        np.mean(which == b) * abs(correct[which == b].mean() - confidence[which == b].mean())
        for b in range(bins)
        if np.any(which == b)
    )
    assert metrics.expected_calibration_error(probs, y_true, bins) == pytest.approx(expected, abs=1e-12)
    rows = metrics.reliability(probs, y_true, bins)
    assert [r["count"] for r in rows] == np.bincount(which, minlength=bins).tolist()


# --- overfitting epoch -------------------------------------------------------------------------


def _history(val, train):
    return [
        {"epoch": i + 1, "val_loss": v, "train_loss": t}
        for i, (v, t) in enumerate(zip(val, train, strict=True))
    ]


def test_overfitting_epoch_is_the_first_rise_of_val_loss_while_train_loss_falls_after_the_best():
    # best val loss at epoch 3; epoch 4: val up (0.6 → 0.7), train down (0.6 → 0.5): overfitting from 4
    assert metrics.overfitting_epoch(_history([1.0, 0.8, 0.6, 0.7, 0.9], [1.0, 0.8, 0.6, 0.5, 0.4])) == 4
    # a rise before the best epoch (epoch 2) does not count; after the best (epoch 3) it does: epoch 4
    assert metrics.overfitting_epoch(_history([1.0, 1.2, 0.5, 0.6], [1.0, 0.9, 0.8, 0.7])) == 4
    # after the best, epoch 2's rise comes with a train rise (not overfitting); epoch 3's does not
    assert metrics.overfitting_epoch(_history([0.5, 0.6, 0.7], [1.0, 1.1, 0.9])) == 3
    # as read back from history.csv: every value a string
    rows = [{k: str(v) for k, v in r.items()} for r in _history([0.9, 0.5, 0.55], [0.9, 0.8, 0.7])]
    assert metrics.overfitting_epoch(rows) == 3


def test_no_overfitting_epoch_when_val_loss_never_rises_against_a_falling_train_loss():
    assert metrics.overfitting_epoch([]) is None
    assert metrics.overfitting_epoch(_history([0.5], [0.5])) is None
    assert (
        metrics.overfitting_epoch(_history([1.0, 0.8, 0.6, 0.5], [1.0, 0.9, 0.8, 0.7])) is None
    )  # improving
    # val and train rise together after the best: diverging, not overfitting
    assert metrics.overfitting_epoch(_history([1.0, 0.8, 0.9, 1.1], [1.0, 0.8, 0.9, 1.2])) is None
    # a flat val loss is not a rise
    assert metrics.overfitting_epoch(_history([1.0, 0.8, 0.8, 0.8], [1.0, 0.9, 0.8, 0.7])) is None


# --- the val metrics train records each epoch (a separate path: confusion counts on the device) ---


@pytest.mark.parametrize(("seed", "n_classes", "absent"), CASES)
def test_train_val_metrics_match_scikit_learn(seed, n_classes, absent):
    from visiontune.components.train import _val_metrics

    probs, y_true = _random_case(seed, n_classes=n_classes, absent=absent)
    y_pred = probs.argmax(1)
    size = n_classes + 1  # and one more class that no image has and none is called
    confusion = np.zeros((size, size))
    np.add.at(confusion, (y_true, y_pred), 1)
    loss_sum = -np.log(probs[np.arange(len(y_true)), y_true]).sum()
    loss, accuracy, macro_f1 = _val_metrics(np.concatenate([[loss_sum], confusion.ravel()]), size)
    assert loss == pytest.approx(log_loss(y_true, probs, labels=list(range(n_classes))))
    assert accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    # macro over the classes the split holds, as evaluate averages it
    present = sorted(set(y_true.tolist()))
    assert macro_f1 == pytest.approx(
        f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    )


def test_train_val_metrics_by_hand():
    from visiontune.components.train import _val_metrics

    # y_true 0 0 1 1, predicted 0 1 1 1, class 2 unseen; summed loss 2.0 over 4 images → 0.5
    # F1: class 0 P 1, R 1/2 → 2/3; class 1 P 2/3, R 1 → 0.8; macro over classes 0, 1 → 0.7333…
    confusion = np.array([[1, 1, 0], [0, 2, 0], [0, 0, 0]], dtype=float)
    loss, accuracy, macro_f1 = _val_metrics(np.concatenate([[2.0], confusion.ravel()]), 3)
    assert (loss, accuracy) == (0.5, 0.75) and macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)
    # one image of class 0 called class 2, which the split does not hold: class 2 is not averaged in
    # class 0 P 1, R 1/3 → 1/2; class 1 P 2/3, R 1 → 0.8; macro over classes 0, 1 → 0.65
    confusion = np.array([[1, 1, 1], [0, 2, 0], [0, 0, 0]], dtype=float)
    _, _, macro_f1 = _val_metrics(np.concatenate([[2.0], confusion.ravel()]), 3)
    assert macro_f1 == pytest.approx((1 / 2 + 0.8) / 2)


def test_val_metrics_of_training_and_of_evaluate_match_the_checkpoints_predictions(trained, tmp_path):
    """The tiny run trained one epoch, so its checkpoint is the epoch its history row describes.
    Score the checkpoint on the val images here and compare both records with scikit-learn."""
    from visiontune.components import images
    from visiontune.components.evaluate import evaluate

    params, layout = trained
    model, meta = models.load_checkpoint(layout.train)
    prep = meta["preprocessing"]
    frame = manifest.read(layout.prepare / "manifest.csv")
    val = frame[frame["split"] == "val"]
    x = images.normalize(images.load_batch(val["path"].tolist(), prep["size"]), prep["mean"], prep["std"])
    logits = models.predict_logits(model, iter([x]))
    probs = metrics.softmax(logits.astype(np.float64))
    y_true = val["label"].map({n: i for i, n in enumerate(meta["class_names"])}).to_numpy()
    y_pred = probs.argmax(1)
    labels = list(range(len(meta["class_names"])))

    # history describes the epoch as trained; the checkpoint's logits were then divided by the
    # temperature fitted on these val images, which can only lower their log loss
    raw = metrics.softmax(logits.astype(np.float64) * (meta["temperature"] or 1.0))
    assert log_loss(y_true, probs, labels=labels) <= log_loss(y_true, raw, labels=labels) + 1e-6
    with open(layout.train / "history.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["val_loss"]) == pytest.approx(log_loss(y_true, raw, labels=labels), rel=1e-4)
    assert float(row["val_accuracy"]) == pytest.approx(accuracy_score(y_true, y_pred))
    assert float(row["val_macro_f1"]) == pytest.approx(
        f1_score(y_true, y_pred, labels=sorted(set(y_true.tolist())), average="macro", zero_division=0)
    )

    evaluate(params.evaluate, layout.prepare, layout.train, tmp_path / "evaluate")
    flat = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert flat["val_images"] == len(val)
    assert flat["val_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    present = sorted(set(y_true))
    assert flat["val_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro"))
    assert flat["val_weighted_recall"] == pytest.approx(accuracy_score(y_true, y_pred))
    k = min(params.evaluate.top_k, len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        top_k = top_k_accuracy_score(y_true, probs, k=k, labels=labels)
    assert flat[f"val_top{k}_accuracy"] == pytest.approx(top_k)


def _labels_drawn_from(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """One label per row, drawn from softmax(logits): logits for which temperature 1 is calibrated."""
    rng = np.random.default_rng(seed)
    probs = metrics.softmax(logits)
    return (rng.random((len(probs), 1)) > probs.cumsum(1)).sum(1)


def test_temperature_undoes_a_scaling_of_calibrated_logits_either_way():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 10))
    logits[np.arange(4000), rng.integers(0, 10, 4000)] += 2.0
    y = _labels_drawn_from(logits)
    assert metrics.fit_temperature(3.0 * logits, y) == pytest.approx(3.0, rel=0.06)  # overconfident
    assert metrics.fit_temperature(0.5 * logits, y) == pytest.approx(0.5, rel=0.06)  # underconfident
    assert metrics.fit_temperature(logits[:0], y[:0]) == 1.0


def test_temperature_sharpens_only_up_to_the_rule_of_succession_accuracy():
    """50 labels, all predicted right: the likelihood alone would shrink T to its bound and make
    every prediction certain. Underconfident logits are sharpened until their mean confidence is
    51/52; logits already more confident than that are left as they are, not softened."""
    y = np.arange(50) % 5
    shy = 3.0 * np.eye(5)[y]  # top-1 probability 0.83
    t = metrics.fit_temperature(shy, y)
    assert t < 1 and metrics.softmax(shy / t).max(1).mean() == pytest.approx(51 / 52, abs=1e-5)
    sure = 6.0 * np.eye(5)[y]  # 0.99
    assert metrics.fit_temperature(sure, y) == 1.0
