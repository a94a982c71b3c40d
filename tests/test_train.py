"""train: a short run learns, keeps its best epoch and describes itself; the pieces behave."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_params
from visiontune.components import model as models
from visiontune.components.train import augment, lr_factor, param_groups, read_ahead


@pytest.mark.cpu_only(reason="asserts that the shared tiny run names the cpu device")
def test_tiny_run_writes_checkpoint_history_and_result(trained):
    params, layout = trained
    result = json.loads((layout.train / "train.json").read_text())
    assert result["epochs_run"] == 1 and result["best_epoch"] == 1 and result["device"] == "cpu"
    with open(layout.train / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[0]["images_per_s"]) > 0
    model, meta = models.load_checkpoint(layout.train)
    assert meta["class_names"] == ["0", "1", "2"]
    assert meta["config"]["train"]["epochs"] == 1 and meta["preprocessing"]["size"] == 32


def _run_keeping_every_epoch(tmp_path, per_class: int = 20, **train_opts):
    """Prepare digits 0 and 1, then run the real train() with a snapshot of the weights after each
    epoch: (result, history rows, {epoch: state}, the checkpoint's weights)."""
    from safetensors.torch import load_file

    from conftest import write_digits
    from visiontune.components.train import train
    from visiontune.pipelines import stages

    data = write_digits(tmp_path / "raw", classes=(0, 1), per_class=per_class)
    # not calibrated: the checkpoint is then exactly the best epoch's weights
    params = tiny_params(data, train={"color_jitter": 0.0, "calibrate_confidence": False, **train_opts})
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    states = {}

    def keep(epoch, model):
        states[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    result = train(params.train, params.model, params.base, layout.prepare, layout.train, layout.cache,
                   on_epoch_end=keep)  # fmt: skip
    with open(layout.train / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    return result, rows, states, load_file(layout.train / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].contiguous()) for k in a)


def test_training_learns_and_early_stopping_keeps_best(tmp_path):
    """min_delta 10: a val loss can only beat infinity, never the first epoch's (a loss < 10 cannot
    drop by 10), so patience 2 must stop the run after epoch 3 of 6 and keep epoch 1's weights."""
    result, rows, states, saved = _run_keeping_every_epoch(
        tmp_path, epochs=6, patience=2, min_delta=10.0, lr=3e-3
    )
    assert float(rows[0]["val_loss"]) < 10  # the premise
    assert result.stopped_early and result.epochs_run == 3 and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert sorted(states) == [1, 2, 3]  # no epoch ran after the stop
    assert result.best_epoch == 1 and result.best_val_loss == float(rows[0]["val_loss"])
    assert result.best_val_accuracy == float(rows[0]["val_accuracy"])
    assert not _same(states[1], states[3])  # training moved on after epoch 1 ...
    assert _same(saved, states[1])  # ... but the checkpoint holds epoch 1's weights


def test_early_stopping_cannot_fire_before_patience_runs_out_and_the_best_epoch_is_kept(tmp_path):
    """patience 4 of 4 epochs: epoch 1 always improves (on infinity), so at most 3 epochs can fail
    to improve: all 4 run. The checkpoint is the epoch of the lowest val loss, whichever it was."""
    result, rows, states, saved = _run_keeping_every_epoch(
        tmp_path, per_class=30, epochs=4, patience=4, lr=3e-3
    )
    assert not result.stopped_early and result.epochs_run == 4 and sorted(states) == [1, 2, 3, 4]
    losses = [float(r["val_loss"]) for r in rows]
    best = losses.index(min(losses)) + 1  # the first of equal minima: a tie is no improvement
    assert result.best_epoch == best and result.best_val_loss == min(losses)
    assert _same(saved, states[best])
    assert result.best_val_accuracy == float(rows[best - 1]["val_accuracy"])


def test_a_val_loss_plateau_is_no_improvement_and_stops_the_run(tmp_path):
    """A linear probe at lr 1e-12: its updates vanish below float resolution, so every epoch's val
    loss equals the first one's exactly. Equal is not better: patience 2 stops after epoch 3."""
    result, rows, _, _ = _run_keeping_every_epoch(tmp_path, method="linear", lr=1e-12, epochs=5, patience=2)
    assert len({r["val_loss"] for r in rows}) == 1  # the premise: a flat line
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


@pytest.mark.parametrize("epochs", [2, 3])
def test_stopped_early_only_when_fewer_epochs_ran(tmp_path, epochs):
    """min_delta 10: only epoch 1 improves (on infinity), so patience 1 runs out after epoch 2."""
    from conftest import write_digits
    from visiontune.pipelines import stages

    data = write_digits(tmp_path / "raw", classes=(0, 1), per_class=12)
    params = tiny_params(data, train={"epochs": epochs, "patience": 1, "min_delta": 10.0})
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    result = stages.train(params, layout)
    assert result.best_epoch == 1 and result.epochs_run == 2
    # two epochs of two: the last one did not improve, but nothing stopped early
    assert result.stopped_early is (epochs == 3)


def test_augment_keeps_shape_and_is_seeded():
    x = torch.randn(4, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0), 0.5, True)
    b = augment(x, torch.Generator().manual_seed(0), 0.5, True)
    assert a.shape == x.shape and torch.equal(a, b)
    c = augment(x, torch.Generator().manual_seed(1), 0.5, True)
    assert not torch.equal(a, c)


def test_full_crop_without_flip_is_identity_when_aspect_is_one(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr("math.log", lambda v: 0.0)  # aspect ratio range collapses to 1
    out = augment(x, torch.Generator().manual_seed(0), 1.0, False)
    assert torch.allclose(out, x, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] < 0.01


def test_param_groups_split_head_backbone_and_decay():
    from visiontune.components.config import ModelConfig, TrainConfig

    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    cfg = TrainConfig(lr=1e-3, head_lr_scale=10, weight_decay=0.05)
    groups = param_groups(model, cfg)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    for g in groups:
        is_head = id(g["params"][0]) in head_ids
        assert g["lr"] == (1e-2 if is_head else 1e-3)
        assert g["weight_decay"] == (0.0 if g["params"][0].ndim <= 1 else 0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_read_ahead_yields_each_batch_of_the_store_in_order():
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    rows = [np.array([3, 1, 7]), np.array([0]), np.array([19, 2, 5, 11])]
    got = list(read_ahead(pixels, rows, pin=False))
    assert [b.dtype for b in got] == [torch.uint8] * 3
    assert all(np.array_equal(b.numpy(), pixels[r]) for b, r in zip(got, rows, strict=True))
    assert list(read_ahead(pixels, [], pin=False)) == []


def _train_tiny(tmp_path, name: str, seed: int = 0, **train_opts):
    """Prepare (seed 0: the same split every time) and train 2 epochs with this training seed."""
    from conftest import write_digits
    from visiontune.pipelines import stages

    data = tmp_path / "raw"
    if not data.exists():
        write_digits(data, classes=(0, 1, 2), per_class=12)
    params = tiny_params(data, train={"epochs": 2, **train_opts})
    layout = stages.Layout(tmp_path / name)
    stages.prepare(params, layout)
    params = params.model_copy(update={"base": params.base.model_copy(update={"seed": seed})})
    return params, layout, stages.train(params, layout)


def test_same_seed_same_weights_and_another_seed_differs(tmp_path):
    """What `dvc repro` promises: the same data, params and seed give the same model, bit for bit."""
    from safetensors.torch import load_file

    weights = {}
    try:
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            _, layout, _ = _train_tiny(tmp_path, name, seed, deterministic=True)
            weights[name] = load_file(layout.train / "model.safetensors")
    finally:  # the mode is process-wide; later tests in this process run without it
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_the_checkpoint_is_the_trained_model_with_its_logits_divided_by_the_fitted_temperature(tmp_path):
    """Two runs of one seed, calibrated and not: the same weights but for the classifier, whose
    logits differ by exactly the temperature that train.json and the checkpoint record."""
    from visiontune.components import images, manifest, metrics

    runs = {}
    try:
        for name, calibrate in (("cal", True), ("raw", False)):
            _, layout, result = _train_tiny(
                tmp_path, name, deterministic=True, calibrate_confidence=calibrate
            )
            runs[name] = (layout, result, *models.load_checkpoint(layout.train))
    finally:  # the mode is process-wide
        torch.use_deterministic_algorithms(False)
    (layout, cal, model, meta), (_, raw, raw_model, raw_meta) = runs["cal"], runs["raw"]
    assert raw.temperature is None and raw_meta["temperature"] is None
    assert cal.temperature == meta["temperature"] != 1.0
    frame = manifest.read(layout.prepare / "manifest.csv")
    val = frame[frame["split"] == "val"]
    x = images.normalize(images.load_batch(val["path"].tolist(), 32), meta["preprocessing"]["mean"],
                         meta["preprocessing"]["std"])  # fmt: skip
    logits, raw_logits = (models.predict_logits(m, iter([x])) for m in (model, raw_model))
    assert np.allclose(logits * cal.temperature, raw_logits, atol=1e-4)
    assert cal.temperature == pytest.approx(
        metrics.fit_temperature(raw_logits, val["label"].astype(int).to_numpy()), rel=1e-3
    )


@pytest.mark.slow
def test_compiled_training_writes_a_plain_checkpoint_that_exports(tmp_path, monkeypatch):
    """train.compile wraps the model in torch.compile (here with dynamo's eager backend: the graph
    capture is what touches the checkpoint's keys; Inductor's code generation took 80 s of CPU)."""
    import torch

    from visiontune.pipelines import stages

    compiled = []
    original = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return original(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    params, layout, result = _train_tiny(tmp_path, "compiled", compile=True)
    assert result.epochs_run == 2 and len(compiled) == 1
    model, _ = models.load_checkpoint(layout.train)  # no torch.compile wrapper names in the keys
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert stages.export(params, layout).top1_agreement == 1.0


def test_auto_image_size_is_recorded_in_train_json_checkpoint_and_onnx(tmp_path):
    """8×8 scans train at 64 px under model.image_size: auto, and every record says so."""
    import onnx

    from conftest import write_digits
    from visiontune.pipelines import stages

    data = write_digits(tmp_path / "raw", classes=(0, 1), per_class=10)
    params = tiny_params(data, model={"image_size": "auto"})
    layout = stages.Layout(tmp_path / "prep")
    for name in ("prepare", "validate", "train", "export"):
        stages.STAGES[name](params, layout)
    result = json.loads((layout.train / "train.json").read_text())
    assert result["image_size"] == 64 and result["image_size_reason"].startswith(
        "auto: median short side 8 px"
    )
    _, meta = models.load_checkpoint(layout.train)
    assert meta["preprocessing"]["size"] == 64 and meta["config"]["model"]["image_size"] == "auto"
    props = {p.key: p.value for p in onnx.load(str(layout.export / "model.onnx")).metadata_props}
    assert props["image_size"] == "64" and props["image_size_reason"] == result["image_size_reason"]
    audit = json.loads((layout.validate / "report.json").read_text())["label_audit"]
    assert audit["image_size"] == 64
