"""export: a checked ONNX file with a dynamic batch axis and metadata, or no file at all."""

import hashlib
import json
import subprocess

import numpy as np
import onnx
import pytest

from visiontune.components.config import ExportConfig
from visiontune.components.export import ParityError, export, onnx_logits
from visiontune.pipelines import stages


def test_export_checks_parity_and_writes_metadata(trained):
    params, layout = trained
    result = stages.export(params, layout)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    assert result.images_checked > 0
    proto = onnx.load(result.onnx)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == ["0", "1", "2"]
    assert meta["image_size"] == "32" and json.loads(meta["mean"]) == [0.5, 0.5, 0.5]
    for batch in (1, 3):  # dynamic batch axis
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        assert onnx_logits(layout.export / "model.onnx", [x]).shape == (batch, 3)


def test_the_metadata_carries_a_per_channel_mean_and_std_the_right_way_round(imagenet_exported):
    """ResNet-18's ImageNet mean and std differ per channel and from each other (Lite0's do not)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    params, layout = imagenet_exported
    meta = {p.key: p.value for p in onnx.load(str(layout.export / "model.onnx")).metadata_props}
    assert json.loads(meta["mean"]) == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert json.loads(meta["std"]) == pytest.approx(IMAGENET_DEFAULT_STD)
    exported = json.loads((layout.export / "export.json").read_text())
    assert exported["top1_agreement"] == 1.0 and exported["max_abs_diff"] <= 1e-4


def test_failed_parity_leaves_no_model_behind(trained, tmp_path):
    params, layout = trained
    with pytest.raises(ParityError, match="max abs logit difference"):
        export(ExportConfig(atol=1e-15), layout.prepare, layout.train, tmp_path / "export")
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_a_changed_top1_answer_fails_parity_even_within_atol():
    from pathlib import Path

    from visiontune.components.export import check_parity

    ref = np.array([[1.0, 1.00002, 0.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    assert check_parity(ref, ref + 5e-5, 1e-4, Path("m.onnx"))["top1_agreement"] == 1.0
    swapped = ref.copy()
    swapped[0, :2] = swapped[0, 1::-1]  # 2e-5 apart, well within atol, but the answer changes
    with pytest.raises(ParityError, match="top-1 agreement 0.5000"):
        check_parity(ref, swapped, 1e-4, Path("m.onnx"))
    with pytest.raises(ParityError, match="max abs logit difference 1.00e-03"):
        check_parity(ref, ref + np.float32(1e-3), 1e-4, Path("m.onnx"))


def test_lineage_in_metadata_is_the_real_manifest_and_commit(trained):
    params, layout = trained
    stages.export(params, layout)
    meta = {p.key: p.value for p in onnx.load(str(layout.export / "model.onnx")).metadata_props}
    manifest_bytes = (layout.prepare / "manifest.csv").read_bytes()
    assert meta["data_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert meta["data_sha256"] == json.loads((layout.prepare / "prepare.json").read_text())["manifest_sha256"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert meta["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_quantized_copy_reports_its_accuracy_change_and_the_gate_bites_at_it(well_trained, tmp_path, kind):
    from visiontune.components import manifest
    from visiontune.components.export import QuantizationError
    from visiontune.components.predict import OnnxClassifier

    params, layout = well_trained
    cfg = ExportConfig(quantize=kind, max_accuracy_drop=1.0, calibration_images=16)  # measure first
    result = export(cfg, layout.prepare, layout.train, tmp_path / "q")
    small = tmp_path / "q" / f"model.{kind}.onnx"
    assert result.quantized == str(small) and small.stat().st_size < result.size_bytes
    frame = manifest.read(layout.prepare / "manifest.csv")
    test = frame[frame["split"] == "test"]

    def accuracy(model) -> float:  # scored here, independently of export's own bookkeeping
        answers = OnnxClassifier(model).predict(test["path"].tolist())
        return float(np.mean([a["label"] == y for a, y in zip(answers, test["label"], strict=True)]))

    assert result.test_accuracy == pytest.approx(accuracy(result.onnx))
    assert result.test_accuracy == json.loads((layout.evaluate / "metrics.json").read_text())["test_accuracy"]
    assert result.quantized_accuracy == pytest.approx(accuracy(small))
    assert result.accuracy_change == pytest.approx(result.quantized_accuracy - result.test_accuracy)
    assert OnnxClassifier(small).class_names == ["0", "1", "2"]  # metadata carried over
    if kind == "fp16":
        assert abs(result.accuracy_change) <= 1 / len(test)  # half precision moves one image at most
    drop = -result.accuracy_change
    if drop > 0:  # the gate, end to end, on either side of the measured drop
        strict = cfg.model_copy(update={"max_accuracy_drop": drop - 1e-9})
        with pytest.raises(QuantizationError, match="the fp32 model.onnx is kept"):
            export(strict, layout.prepare, layout.train, tmp_path / "strict")
        assert (tmp_path / "strict" / "model.onnx").exists() and not (
            tmp_path / "strict" / small.name
        ).exists()
        exact = cfg.model_copy(update={"max_accuracy_drop": drop})
        assert export(exact, layout.prepare, layout.train, tmp_path / "exact").quantized


def test_quantization_refused_beyond_the_allowed_drop():
    from visiontune.components.export import QuantizationError, check_accuracy_drop

    cfg = ExportConfig(quantize="int8", max_accuracy_drop=0.01)
    check_accuracy_drop(cfg, 0.99, 0.985)  # within the allowance
    check_accuracy_drop(cfg, 0.99, 0.995)  # a gain is fine
    with pytest.raises(QuantizationError, match=r"a drop of 0\.0200 > export\.max_accuracy_drop=0\.01"):
        check_accuracy_drop(cfg, 0.99, 0.97)
