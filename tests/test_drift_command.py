"""`visiontune drift`: the exported reference, exit codes 0 / 3 / 1, the report, and the check of a
registered version logged to a real MLflow server under that version."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from typer.testing import CliRunner

from visiontune.components import drift, manifest
from visiontune.components import model as models
from visiontune.components.evaluate import batches
from visiontune.pipelines.cli import app


def _split_images(layout, split: str, dest: Path) -> Path:
    frame = manifest.read(layout.prepare / "manifest.csv")
    dest.mkdir(parents=True)
    for i, path in enumerate(frame.loc[frame["split"] == split, "path"]):
        shutil.copy(path, dest / f"{i:03d}{Path(path).suffix}")
    return dest


def _noisy(folder: Path, dest: Path, sigma: float = 100.0) -> Path:
    """Every image with Gaussian noise of σ = 100/255 (severity past any camera's)."""
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        pixels = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=np.float64)
        noisy = np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(dest / f"{path.stem}.png")
    return dest


def test_export_writes_the_embedding_output_and_the_val_reference(exported):
    params, layout = exported
    onnx = layout.export / "model.onnx"
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    model, meta = models.load_checkpoint(layout.train)
    prep = models.preprocessing_of(meta)
    frame = manifest.read(layout.prepare / "manifest.csv")
    val = frame.loc[frame["split"] == "val", "path"].tolist()
    (x,) = list(batches(val, prep.size, prep.mean, prep.std, 64))
    with torch.no_grad():
        logits, embedding = models.logits_and_embedding(model, torch.from_numpy(x))
    got_logits, got_embedding = session.run(None, {"input": x})
    np.testing.assert_allclose(got_embedding, embedding.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_logits, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4, rtol=1e-4)
    reference = drift.Reference.load(layout.export / "drift_reference.npz")  # allow_pickle=False
    assert list(reference.class_names) == meta["class_names"] and len(reference.probs) == len(val)
    assert json.loads((layout.export / "export.json").read_text())["drift_reference"].endswith(".npz")


def test_drift_exit_codes_and_report(exported, tmp_path):
    params, layout = exported
    onnx = str(layout.export / "model.onnx")
    same = _split_images(layout, "test", tmp_path / "same")
    runner = CliRunner()
    calm = runner.invoke(app, ["drift", str(same), "--model", onnx, "--out", str(tmp_path / "calm")])
    assert calm.exit_code == 0, calm.output
    report = json.loads((tmp_path / "calm" / "drift.json").read_text())
    assert report["drift"] is False and report["images"] == len(list(same.iterdir()))
    assert set(report["tests"]) == {"mmd", "ks", "chi2"}

    noisy = _noisy(same, tmp_path / "noisy")
    (noisy / "broken.png").write_bytes(b"not an image")
    shifted = runner.invoke(app, ["drift", str(noisy), "--model", onnx, "--out", str(tmp_path / "shift")])
    assert shifted.exit_code == 3, shifted.output
    assert "shift detected" in shifted.output
    report = json.loads((tmp_path / "shift" / "drift.json").read_text())
    assert report["drift"] is True and report["p_value"] < report["alpha"] and report["fired"]
    assert [u["path"] for u in report["unreadable"]] == [str(noisy / "broken.png")]
    assert (tmp_path / "shift" / "most_shifted.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "shift" / "drift.md").read_text()
    assert text.startswith("# Drift check: **shift detected**") and "broken.png" in text

    lonely = tmp_path / "one"
    lonely.mkdir()
    shutil.copy(next(same.iterdir()), lonely / "a.png")
    error = runner.invoke(app, ["drift", str(lonely), "--model", onnx])
    assert error.exit_code == 1 and "at least 2" in error.output
    no_reference = tmp_path / "bare"
    no_reference.mkdir()
    shutil.copy(onnx, no_reference / "model.onnx")
    error = runner.invoke(app, ["drift", str(same), "--model", str(no_reference / "model.onnx")])
    assert (
        error.exit_code == 1 and "drift_reference.npz" in error.output and "visiontune export" in error.output
    )


def test_a_registered_versions_check_is_logged_under_that_version(
    exported, mlflow_server, monkeypatch, tmp_path
):
    from mlflow.tracking import MlflowClient

    from visiontune.pipelines import stages

    params, layout = exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = params.model_copy(
        update={"register_": params.register_.model_copy(update={"model_name": "drifting"})}
    )
    version = stages.register(p, layout).version
    noisy = _noisy(_split_images(layout, "test", tmp_path / "same"), tmp_path / "noisy")
    out = CliRunner().invoke(
        app, ["drift", str(noisy), "--model", "models:/drifting@candidate", "--out", str(tmp_path / "r")]
    )
    assert out.exit_code == 3, out.output
    client = MlflowClient(mlflow_server)
    tags = client.get_model_version("drifting", version).tags
    assert tags["drift.last_result"] == "shift"
    run = client.get_run(tags["drift.last_run_id"])
    assert run.data.tags["model_version"] == version and run.data.tags["visiontune.kind"] == "drift-check"
    assert run.data.metrics["drift"] == 1.0 and run.data.metrics["p_value"] < 0.05
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"drift.json", "drift.md", "most_shifted.png"} <= logged


def test_the_serve_monitor_checks_full_windows_and_a_swapped_out_one_takes_nothing():
    import time

    from prometheus_client import CollectorRegistry

    from visiontune.components.config import DriftConfig
    from visiontune.pipelines.drift_monitor import DriftGauges, DriftMonitor

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=100).astype(np.float32)
    reference = drift.build_reference(rng.normal(size=(100, 16)).astype(np.float32), probs, ["a", "b", "c"])
    cfg = DriftConfig(alpha=0.2, permutations=199)  # not the defaults: the checks must use these
    monitor = DriftMonitor(reference, 10, cfg, DriftGauges(CollectorRegistry()), "7")
    logits, embeddings = rng.normal(size=(25, 3)), rng.normal(size=(25, 16)).astype(np.float32)
    monitor.add(logits, embeddings)  # two full windows and 5 images toward a third
    deadline = time.monotonic() + 30
    while len(monitor.windows) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    state = monitor.state()
    assert len(state["windows"]) == 2 and state["images_in_next_window"] == 5 and state["version"] == "7"
    assert all(w["window"] == 10 and set(w["tests"]) == {"mmd", "ks", "chi2"} for w in state["windows"])
    assert all(
        w["alpha"] == 0.2 and w["tests"]["mmd"]["detail"]["permutations"] == 199 for w in state["windows"]
    )
    monitor.close()  # swapped out: a request still running on this version must not fail
    monitor.add(logits, embeddings)
    assert monitor.state()["images_in_next_window"] == 5
