"""Dataset-shift detection: the embedding the detectors read, and the statistics with known answers.

Synthetic samples where the truth is known: the same distribution (p-values must not fire more than
alpha allows) and clear shifts (they must fire). Speed is measured by bench/drift.py, not here.
"""

import json

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import pdist

from visiontune.components import drift

NAMES = ("cat", "dog", "émeu")  # a non-ASCII name survives the .npz round trip


def _sample(rng, n, d=256, shift=0.0, weights=(1 / 3, 1 / 3, 1 / 3), noise=1.0):
    """Embeddings from three Gaussian clusters and the softmax of a fixed linear read-out."""
    centers = np.random.default_rng(99).normal(0, 1.5, (3, d))
    labels = rng.choice(3, n, p=weights)
    emb = centers[labels] + rng.normal(0, noise, (n, d)) + shift
    logits = emb @ centers.T / d
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return emb.astype(np.float32), (probs / probs.sum(1, keepdims=True)).astype(np.float32)


def _reference(rng, m=120, **kw):
    return drift.build_reference(*_sample(rng, m, **kw), NAMES)


# --- the embedding: logits equal model(x), and it exports to ONNX ---


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "vit_tiny_patch16_224"])
def test_logits_and_embedding_match_the_model(name):
    import torch

    from visiontune.components import model as models
    from visiontune.components.config import ModelConfig

    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(name=name, pretrained=False, image_size=32), num_classes=3)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, emb = models.logits_and_embedding(model, x)
        assert torch.equal(logits, model(x))
    assert emb.shape == (2, model.get_classifier().in_features)


def test_level_probe_embedding_is_what_its_head_reads():
    import torch

    from visiontune.components import model as models
    from visiontune.components.config import ModelConfig

    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    probe, _ = models.linear_probe(model, 2, 3, 32)
    probe.eval()
    with torch.no_grad():
        f = probe.features(torch.randn(16, 3, 32, 32)).double()
        probe.standardize(len(f), f.sum(0).numpy(), (f * f).sum(0).numpy())  # non-trivial mean and scale
        x = torch.randn(4, 3, 32, 32)
        logits, emb = models.logits_and_embedding(probe, x)
        assert torch.equal(logits, probe(x))
        torch.testing.assert_close(probe.fc(emb), logits)
    assert emb.shape == (4, sum(probe.dims))


def test_lora_model_merged_or_not_gives_the_same_embedding():
    import torch

    from visiontune.components import model as models
    from visiontune.components.config import LoraConfig, ModelConfig

    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(name="resnet18", pretrained=False, image_size=32), num_classes=3)
    lora = models.apply_lora(model, LoraConfig(r=4))
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            torch.nn.init.normal_(p, std=0.05)
    lora.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, emb = models.logits_and_embedding(lora, x)
        torch.testing.assert_close(logits, lora(x))
        merged_logits, merged_emb = models.logits_and_embedding(models.merge_lora(lora), x)
    torch.testing.assert_close(merged_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_emb, emb, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False, as export.py uses
def test_embedding_exports_as_a_second_onnx_output(tmp_path):
    import onnxruntime as ort
    import torch

    from visiontune.components import model as models
    from visiontune.components.config import ModelConfig

    class Both(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return models.logits_and_embedding(self.inner, x)

    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    probe, _ = models.linear_probe(model, 2, 3, 32)
    wrapped = Both(probe.eval()).eval()
    path = tmp_path / "model.onnx"
    x = torch.randn(3, 3, 32, 32)
    torch.onnx.export(
        wrapped, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
        output_names=["logits", "embedding"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, emb = session.run(None, {"input": x[:2].numpy()})
    with torch.no_grad():
        want_logits, want_emb = wrapped(x[:2])
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(emb, want_emb.numpy(), atol=1e-4)


# --- the statistics ---


def test_same_distribution_rarely_fires():
    """100 seeded null draws (a fresh reference and window each): every test and the combined flag
    fire at most 10 % of the time at alpha 0.05 (256 dimensions, 60 PCA-fit images: the setting
    where a PCA fitted on the reference images themselves fires on most draws, as tested below)."""
    rng = np.random.default_rng(0)
    fired = dict.fromkeys([*drift.TESTS, "drift"], 0)
    for i in range(100):
        result = drift.check(_reference(rng, noise=3.0), *_sample(rng, 40, noise=3.0), seed=i)
        for name, test in result.tests.items():
            fired[name] += test.fired
        fired["drift"] += result.drift
    assert all(count <= 10 for count in fired.values()), fired


def test_self_fitted_pca_would_be_biased_and_the_split_is_not():
    """Why build_reference fits the PCA on half of val: points projected on axes fitted to
    themselves spread wider than new points, which the MMD reads as a shift."""
    rng = np.random.default_rng(1)
    self_fit = split = 0
    for i in range(20):
        emb, probs = _sample(rng, 120, noise=3.0)
        window = _sample(rng, 150, noise=3.0)[0]
        biased = drift.build_reference(emb, probs, NAMES, fit_embeddings=emb)
        self_fit += drift.mmd_test(biased.embeddings, biased.reduce(window), seed=i).fired
        ref = drift.build_reference(emb, probs, NAMES)
        split += drift.mmd_test(ref.embeddings, ref.reduce(window), seed=i).fired
    assert self_fit >= 18 and split <= 3


def test_clear_shifts_fire_the_test_that_sees_them():
    rng = np.random.default_rng(2)
    ref = _reference(rng)
    moved = drift.check(ref, *_sample(rng, 100, shift=2.0))
    assert moved.tests["mmd"].fired and moved.drift and moved.p_value < 0.01
    assert moved.tests["mmd"].effect > 0
    removed = drift.check(ref, *_sample(rng, 200, weights=(0.5, 0.5, 0.0)))
    assert removed.tests["chi2"].fired and removed.tests["ks"].fired and removed.drift
    assert removed.tests["chi2"].effect == pytest.approx(1 / 3, abs=0.1)  # total variation ≈ the lost share
    assert removed.tests["chi2"].detail["counts"][2] <= 5


def test_permutation_p_value_is_k_plus_one_over_b_plus_one_and_never_zero():
    assert drift.permutation_p_value(5.0, np.arange(10.0)) == 6 / 11  # 5, 6, 7, 8, 9 reach it
    assert drift.permutation_p_value(1e9, np.zeros(500)) == 1 / 501
    x = np.random.default_rng(3).normal(size=(40, 4))
    far = drift.mmd_test(x, x + 100.0, permutations=500)
    assert far.p_value == 1 / 501 and far.fired


def test_mmd_statistic_is_the_unbiased_estimate_with_the_median_bandwidth():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.3, 1, size=(20, 5))
    z = np.concatenate([x, y])
    bandwidth = np.median(pdist(z))
    assert drift.median_bandwidth(z) == pytest.approx(bandwidth, rel=1e-9)
    k = np.exp(-(np.linalg.norm(z[:, None] - z[None], axis=2) ** 2) / (2 * bandwidth**2))
    np.fill_diagonal(k, 0)
    want = k[:30, :30].sum() / (30 * 29) + k[30:, 30:].sum() / (20 * 19) - 2 * k[:30, 30:].mean()
    got = drift.mmd_test(x, y)
    assert got.statistic == pytest.approx(want, rel=1e-5)
    assert got.detail["bandwidth"] == pytest.approx(bandwidth, rel=1e-9)
    assert drift.mmd_test(x, y, seed=7) != drift.mmd_test(x, y, seed=8)  # permutations follow the seed
    assert drift.mmd_test(x, y, seed=7) == drift.mmd_test(x, y, seed=7)


def test_ks_is_bonferroni_over_classes_and_the_check_over_tests():
    rng = np.random.default_rng(5)
    ref = _reference(rng)
    emb, probs = _sample(rng, 60, weights=(0.6, 0.3, 0.1))
    ks = drift.ks_test(ref.probs, probs)
    per_class = [stats.ks_2samp(ref.probs[:, c], probs[:, c]).pvalue for c in range(3)]
    assert ks.p_value == pytest.approx(min(1.0, 3 * min(per_class)))
    assert ks.effect == pytest.approx(
        max(stats.ks_2samp(ref.probs[:, c], probs[:, c]).statistic for c in range(3))
    )
    two = drift.ks_test(ref.probs[:, :2], probs[:, :2])  # two columns: one test, not two
    assert two.p_value == pytest.approx(
        min(stats.ks_2samp(ref.probs[:, c], probs[:, c]).pvalue for c in range(2))
    )
    result = drift.check(ref, emb, probs)
    smallest = min(t.p_value for t in result.tests.values())
    assert result.p_value == pytest.approx(min(1.0, 3 * smallest))
    assert result.drift == (result.p_value < result.alpha)


def test_chi2_matches_scipy_and_handles_tiny_counts():
    rng = np.random.default_rng(6)
    ref_labels, labels = rng.choice(4, 200), rng.choice(4, 60, p=[0.4, 0.4, 0.2, 0.0])
    got = drift.chi2_test(ref_labels, labels, 5)  # class 4 predicted by neither: left out
    table = np.stack([np.bincount(ref_labels, minlength=4), np.bincount(labels, minlength=4)])
    want = stats.chi2_contingency(table, correction=False)
    assert got.statistic == pytest.approx(want.statistic)
    assert got.fired and got.detail["cramers_v"] == pytest.approx(np.sqrt(want.statistic / 260))
    # at n = 10 most expected counts are below 5; the permutation p-value still holds its level
    hits = sum(drift.chi2_test(rng.choice(4, 200), rng.choice(4, 10), 4, seed=i).fired for i in range(200))
    assert hits <= 20
    same = drift.chi2_test(np.array([0, 1, 0, 1]), np.array([0, 1]), 2)
    assert same.p_value == 1.0  # every permuted table ties the observed one


def test_reference_round_trips_bit_exact_without_pickle(tmp_path):
    ref = _reference(np.random.default_rng(7))
    path = ref.save(tmp_path / "drift_reference.npz")
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    with np.load(path, allow_pickle=False) as z:
        assert z["class_names"].dtype.kind == "U"
        assert z["pred_counts"].tolist() == ref.pred_counts.tolist()
    back = drift.Reference.load(path)
    assert back.class_names == NAMES and back.explained == ref.explained
    for field in ("mean", "components", "embeddings", "probs"):
        a, b = getattr(ref, field), getattr(back, field)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_reference_shapes_and_split():
    rng = np.random.default_rng(8)
    emb, probs = _sample(rng, 121)
    ref = drift.build_reference(emb, probs, NAMES)
    assert ref.embeddings.shape == (60, 60)  # the other 61 images fitted the PCA: 60 axes
    assert len(ref.probs) == 121 and ref.pred_counts.sum() == 121  # softmax tests keep every val image
    assert 0 < ref.explained <= 1
    big = drift.build_reference(*_sample(rng, 300), NAMES, max_size=100, fit_embeddings=_sample(rng, 300)[0])
    assert big.embeddings.shape == (100, drift.MAX_COMPONENTS) and len(big.probs) == 100
    with pytest.raises(ValueError, match="class names"):
        drift.build_reference(emb, probs, ["a", "b"])
    with pytest.raises(ValueError, match=r"expects \(n, 256\)"):
        drift.check(ref, emb[:, :10], probs)
    with pytest.raises(ValueError, match="at least 2 images"):
        drift.check(ref, emb[:1], probs[:1])


def test_result_is_json_and_points_at_the_odd_images():
    rng = np.random.default_rng(9)
    ref = _reference(rng)
    emb, probs = _sample(rng, 50)
    emb[[7, 31]] += 25.0  # two images far from everything in val
    result = drift.check(ref, emb, probs, top=5)
    assert set(result.most_shifted[:2]) == {7, 31}
    assert result.shift_scores[0] >= result.shift_scores[-1] and result.shift_scores[1] > 3
    loaded = json.loads(json.dumps(result.to_dict()))
    assert set(loaded["tests"]) == {"mmd", "ks", "chi2"} and loaded["window"] == 50
    assert loaded["fired"] == result.fired


def test_large_windows_are_subsampled_and_indices_refer_to_the_window(monkeypatch):
    monkeypatch.setattr(drift, "MAX_WINDOW", 100)
    rng = np.random.default_rng(10)
    ref = _reference(rng)
    emb, probs = _sample(rng, 400)
    emb[123] += 40.0
    result = drift.check(ref, emb, probs, seed=3)
    assert result.window == 400 and result.tested == 100
    assert all(0 <= i < 400 for i in result.most_shifted)
    kept = np.sort(np.random.default_rng(3).choice(400, 100, replace=False))
    assert (123 in kept) == (result.most_shifted[0] == 123)
