"""export: a checked ONNX file with a dynamic batch axis and metadata, or no file at all."""

import json

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


def test_failed_parity_leaves_no_model_behind(trained, tmp_path):
    params, layout = trained
    with pytest.raises(ParityError, match="max abs logit difference"):
        export(ExportConfig(atol=1e-15), layout.prepare, layout.train, tmp_path / "export")
    assert not (tmp_path / "export" / "model.onnx").exists()
