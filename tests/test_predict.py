"""predict: the ONNX model with the training preprocessing gives the PyTorch model's answers."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from visiontune.components import manifest, metrics
from visiontune.components import model as models
from visiontune.components.evaluate import batches
from visiontune.components.predict import OnnxClassifier, collect
from visiontune.pipelines import stages
from visiontune.pipelines.cli import app


@pytest.mark.parametrize("run", ["trained", "imagenet_exported"])
def test_predictions_equal_pytorch_on_the_test_split(run, request):
    """Lite0 (mean = std = 0.5) and ResNet-18 (ImageNet mean and std, per channel): predict reads the
    preprocessing from the ONNX metadata and gives PyTorch's probabilities, not only its answers."""
    params, layout = request.getfixturevalue(run)
    if run == "trained":
        stages.export(params, layout)
    frame = manifest.read(layout.prepare / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    model, meta = models.load_checkpoint(layout.train)
    prep = models.preprocessing_of(meta)
    torch_logits = models.predict_logits(model, batches(paths, prep.size, prep.mean, prep.std, 16))
    expected = [meta["class_names"][i] for i in torch_logits.argmax(1)]
    classifier = OnnxClassifier(layout.export / "model.onnx")
    assert (classifier.mean, classifier.std) == (list(prep.mean), list(prep.std))
    results = classifier.predict(paths, top_k=2)
    assert [r["label"] for r in results] == expected
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"] for r in results)
    probs = np.array([r["confidence"] for r in results])
    assert np.abs(probs - metrics.softmax(torch_logits.astype(np.float64)).max(1)).max() <= 1e-4


def test_cli_predicts_a_folder_and_reports_unreadable_files(trained, tmp_path):
    params, layout = trained
    stages.export(params, layout)
    folder = tmp_path / "incoming"
    folder.mkdir()
    frame = manifest.read(layout.prepare / "manifest.csv")
    for i, path in enumerate(frame["path"][:3]):
        (folder / f"{i}.png").write_bytes(open(path, "rb").read())
    (folder / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["predict", str(folder), "--model", str(layout.export), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out) == 4 and sum("error" in r for r in out) == 1
    assert all(r["label"] in {"0", "1", "2"} for r in out if "error" not in r)
    assert len(collect([str(folder)])) == 4


def test_missing_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--model", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "visiontune export" in result.output


@pytest.mark.parametrize("damage", ["truncated", "garbage", "metadata"])
def test_a_broken_model_file_is_one_line_in_predict_and_serve(exported, tmp_path, damage):
    """A truncated, garbage or foreign-metadata model.onnx ends predict and serve with one line
    naming the file and the fix, not onnxruntime's 40-line traceback."""
    import onnx

    _, layout = exported
    good = layout.export / "model.onnx"
    bad = tmp_path / "model.onnx"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        proto = onnx.load(str(good))
        next(p for p in proto.metadata_props if p.key == "mean").value = "[0.5, oops"
        onnx.save(proto, str(bad))
    for command in (["predict", str(tmp_path), "--model", str(bad)], ["serve", "--model", str(bad)]):
        result = CliRunner().invoke(app, command, catch_exceptions=False)
        line = result.output.strip()
        assert result.exit_code == 1 and len(line.splitlines()) == 1, result.output
        assert str(bad) in line and "export it again" in line
