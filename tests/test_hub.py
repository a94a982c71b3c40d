"""The Hub folder (export/hf): timm and transformers load it as trained, peft reloads the adapter,
and `visiontune push` sends exactly that folder through huggingface_hub's real client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_params, write_digits
from visiontune.components import hub, manifest
from visiontune.components import model as models
from visiontune.components.evaluate import batches
from visiontune.pipelines import stages
from visiontune.pipelines.cli import app

runner = CliRunner()


def _test_paths(layout) -> list[str]:
    frame = manifest.read(layout.prepare / "manifest.csv")
    return frame.loc[frame["split"] == "test", "path"].tolist()


@torch.no_grad()
def _logits(model, layout) -> np.ndarray:
    """Logits of `model` on the test split, through visiontune's own preprocessing."""
    prep = models.preprocessing_of(json.loads((layout.train / "checkpoint.json").read_text()))
    x = np.concatenate(list(batches(_test_paths(layout), prep.size, prep.mean, prep.std, 64)))
    return model.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def lora_exported(tmp_path_factory):
    """A LoRA run of seconds (1 epoch on 30 train images, no label audit), evaluated and exported."""
    root = tmp_path_factory.mktemp("lora-hub")
    params = tiny_params(
        write_digits(root / "raw"), train={"method": "lora"}, validate={"label_audit": False}
    )
    layout = stages.Layout(root / "prepared")
    for name in ("prepare", "validate", "train", "evaluate", "export"):
        stages.STAGES[name](params, layout)
    return params, layout


def test_timm_local_dir_rebuilds_the_checkpoint_with_its_preprocessing(exported):
    import timm
    from PIL import Image

    from visiontune.components.images import load_image, normalize, resize

    params, layout = exported
    folder = layout.export / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 3
    assert config["label_names"] == ["0", "1", "2"]
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 32, 32] and pretrained["mean"] == pretrained["std"] == [0.5] * 3
    assert (pretrained["interpolation"], pretrained["crop_pct"], pretrained["crop_mode"]) == (
        "bicubic",
        1.0,
        "center",
    )
    assert not [key for key in pretrained if key.startswith("test_")]  # nothing that would disagree
    assert "num_classes" not in config.get("model_args", {})  # transformers passes it itself

    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    checkpoint, _ = models.load_checkpoint(layout.train)
    assert list(model.state_dict()) == list(checkpoint.state_dict())  # timm's key names
    assert np.abs(_logits(model, layout) - _logits(checkpoint, layout)).max() <= 1e-5

    # timm's eval transform from the saved config is visiontune's preprocessing, pixel for pixel
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    rng = np.random.default_rng(0)
    photos = [  # wide, tall and odd-sized ones too: the resize's and the crop's rounding must agree
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((33, 70), (101, 40), (47, 47), (640, 481), (33, 33), (500, 37))
    ]
    for image in [load_image(path) for path in _test_paths(layout)[:5]] + photos:
        ours = normalize(resize(image, 32)[None], (0.5,) * 3, (0.5,) * 3)[0]
        theirs = transform(image).numpy()
        assert np.abs(ours - theirs).max() <= 1e-6, image.size


def test_a_per_channel_mean_and_std_reach_timm_the_right_way_round(imagenet_exported):
    """ResNet-18 with ImageNet normalization: the Hub folder's config gives timm the checkpoint's mean
    and std (which differ per channel and from each other), so timm's own transform and model rebuilt
    from the folder give the checkpoint's logits on the test images."""
    import timm

    from visiontune.components.images import load_image

    params, layout = imagenet_exported
    prep = models.preprocessing_of(json.loads((layout.train / "checkpoint.json").read_text()))
    assert len(set(prep.mean)) == 3 and set(prep.mean).isdisjoint(prep.std)
    pretrained = json.loads((layout.export / "hf" / "config.json").read_text())["pretrained_cfg"]
    assert pretrained["mean"] == pytest.approx(prep.mean) and pretrained["std"] == pytest.approx(prep.std)
    model = timm.create_model(f"local-dir:{layout.export / 'hf'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        theirs = model(torch.stack([transform(load_image(p)) for p in _test_paths(layout)])).numpy()
    checkpoint, _ = models.load_checkpoint(layout.train)
    assert np.abs(theirs - _logits(checkpoint, layout)).max() <= 1e-4


def test_transformers_pipeline_gives_predicts_top1_on_every_test_image(exported, monkeypatch):
    from transformers import pipeline

    params, layout = exported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = _test_paths(layout)
    result = runner.invoke(app, ["predict", *paths, "--model", str(layout.export / "model.onnx")])
    assert result.exit_code == 0, result.output
    ours = {r["path"]: r for r in json.loads(result.output)}
    classify = pipeline("image-classification", model=str(layout.export / "hf"), device="cpu")
    theirs = classify(paths, top_k=1)
    assert len(theirs) == len(paths) == len(ours)
    for path, (top,) in zip(paths, theirs, strict=True):
        assert top["label"] == ours[path]["label"], path
        assert abs(top["score"] - ours[path]["confidence"]) <= 1e-4, (
            path
        )  # the same softmax, not only its argmax


def test_model_card_states_the_run(exported):
    from huggingface_hub import ModelCard

    params, layout = exported
    card = ModelCard.load(layout.export / "hf" / "README.md")
    data = card.data.to_dict()
    assert (data["library_name"], data["pipeline_tag"], data["license"]) == (
        "timm",
        "image-classification",
        "apache-2.0",
    )
    assert "base_model" not in data  # the packaged Lite0 weights have no Hub id to name
    metrics = json.loads((layout.evaluate / "metrics.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == round(metrics["test_accuracy"], 4) and "accuracy" in data["metrics"]
    prepared = json.loads((layout.prepare / "prepare.json").read_text())
    text = card.text
    assert prepared["manifest_sha256"] in text and "0: 0" in text and "Method: full" in text
    low, high = metrics["test_accuracy_low"], metrics["test_accuracy_high"]
    assert f"| accuracy | {metrics['test_accuracy']:.4f} (95 % interval {low:.4f}–{high:.4f}) |" in text
    for section in ("## Evaluation", "## Validation", "## Intended use and limitations", "## How to load it"):
        assert section in text
    for loader in ('timm.create_model("local-dir:', 'pipeline("image-classification"', "visiontune predict"):
        assert loader in text


def test_peft_adapter_on_the_base_gives_the_merged_logits(lora_exported):
    import timm
    from peft import PeftModel

    from visiontune.components.config import ModelConfig

    params, layout = lora_exported
    folder = layout.export / "hf"
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tf_efficientnet_lite0" and adapter["peft_type"] == "LORA"
    merged = _logits(timm.create_model(f"local-dir:{folder}", pretrained=True), layout)
    assert np.abs(merged - _logits(models.load_checkpoint(layout.train)[0], layout)).max() <= 1e-5

    def base():  # the weights training started from, with a new 3-class head
        return models.create(ModelConfig(name="tf_efficientnet_lite0", image_size=32), num_classes=3)[0]

    reloaded = PeftModel.from_pretrained(base(), str(folder / "adapter"))
    assert np.abs(_logits(reloaded, layout) - merged).max() <= 1e-5
    # why the norm layers ride along: peft's own save leaves out the batch-norm statistics training moved
    bare = PeftModel.from_pretrained(base(), str(layout.train / "adapter"))
    assert np.abs(_logits(bare, layout) - merged).max() > 1e-3


def test_dry_run_lists_exactly_the_folder_and_needs_no_token(lora_exported, monkeypatch):
    params, layout = lora_exported
    folder = layout.export / "hf"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = runner.invoke(app, ["push", "--repo-id", "org/digits", "--model", str(folder), "--dry-run"])
    assert result.exit_code == 0, result.output
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert "adapter/adapter_model.safetensors" in files and len(files) == 5
    listed = {}
    for line in result.output.splitlines():
        if line.startswith("  "):
            name, size = line.split()[:2]
            listed[name] = int(size.replace(",", ""))
    assert listed == files
    assert "would send 5 files" in result.output
    assert "not a registered version" in result.output  # the local folder was never registered


def test_push_without_token_says_how_to_get_one(exported, monkeypatch):
    params, layout = exported
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = runner.invoke(app, ["push", "--repo-id", "org/digits", "--model", str(layout.export / "hf")])
    assert result.exit_code == 1
    assert "HF_TOKEN is not set" in result.output and "huggingface.co/settings/tokens" in result.output
    assert "Traceback" not in result.output


def test_push_names_the_bad_field(exported, tmp_path):
    params, layout = exported
    result = runner.invoke(
        app, ["push", "--repo-id", "digits", "--model", str(layout.export / "hf"), "--dry-run"]
    )
    assert result.exit_code == 1 and "--repo-id 'digits': write it as ORG/NAME" in result.output
    result = runner.invoke(app, ["push", "--repo-id", "org/digits", "--model", str(tmp_path), "--dry-run"])
    assert result.exit_code == 1 and "config.json, model.safetensors, README.md missing" in result.output


def test_linear_probe_over_levels_gets_a_card_saying_why_it_has_no_weights(well_trained):
    params, layout = well_trained
    folder = layout.export / "hf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]
    assert "train.probe_levels: 0" in (folder / "README.md").read_text()
    result = runner.invoke(app, ["push", "--repo-id", "org/digits", "--model", str(folder), "--dry-run"])
    assert result.exit_code == 1 and "its README.md says why" in result.output


def test_summary_points_at_the_hub_folder_only_when_it_has_weights(exported, well_trained):
    shown = {}
    for name, (_, layout) in (("exported", exported), ("probe", well_trained)):
        output = runner.invoke(app, ["summary", "--root", str(layout.root)]).output
        shown[name] = [line for line in output.splitlines() if line.strip().startswith("Hub folder")]
    assert len(shown["exported"]) == 1 and str(exported[1].export / "hf") in shown["exported"][0]
    assert shown["probe"] == []  # a multi-level probe's folder holds only the card saying why


def test_summary_gives_the_test_accuracy_with_its_interval(exported):
    _, layout = exported
    output = runner.invoke(app, ["summary", "--root", str(layout.root)]).output
    metrics = json.loads((layout.evaluate / "metrics.json").read_text())
    line = next(x for x in output.splitlines() if x.strip().startswith("test metrics"))
    low, high = metrics["test_accuracy_low"], metrics["test_accuracy_high"]
    assert f"(accuracy {metrics['test_accuracy']:.4f} (95 % interval {low:.4f}–{high:.4f}), macro_f1" in line


def test_registered_model_carries_its_hub_folder(exported, tmp_path, monkeypatch):
    """register logs hf/ with the version; push --model models:/... fetches exactly it back, and a
    local push of the same weights names that version too."""
    import shutil

    from visiontune.components.config import RegisterConfig
    from visiontune.components.tracking import Candidate, register

    params, layout = exported
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded SQLite store in tmp_path
    candidate = Candidate(
        params={"train.method": "full"},
        prepare=layout.prepare / "prepare.json",
        validation=layout.validate,
        checkpoint=layout.train,
        evaluation=layout.evaluate,
        onnx=layout.export / "model.onnx",
        hf=layout.export / "hf",
    )
    registered = register(RegisterConfig(model_name="hub-test"), candidate, tmp_path / "register")
    result = runner.invoke(
        app, ["push", "--repo-id", "org/digits", "--model", "models:/hub-test@candidate", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    local = hub.folder_files(layout.export / "hf")
    assert sum(line.startswith("  ") for line in result.output.splitlines()) == len(local)
    assert all(f"  {name} " in result.output for name in local)
    config = json.loads((layout.export / "hf" / "config.json").read_text())
    assert f"Upload hub-test v{registered.version}, data {config['visiontune']['data_hash']}" in result.output

    shutil.copytree(layout.export / "hf", tmp_path / "export" / "hf")  # beside register/registration.json
    result = runner.invoke(app, ["push", "--repo-id", "org/digits", "--model", "export/hf", "--dry-run"])
    assert f"Upload hub-test v{registered.version}" in result.output


# --- a stand-in for the Hub's HTTP API on 127.0.0.1: what huggingface_hub's client sends ---------


def _mode(path: str) -> str:
    return "lfs" if path.endswith(".safetensors") else "regular"


class _FakeHub(BaseHTTPRequestHandler):
    """Answers create_repo, preupload, the LFS batch and upload, and commit as the Hub does, and
    records every request (method, path, headers, body)."""

    requests: list[dict] = []
    lfs: dict[str, bytes] = {}

    def log_message(self, *args):  # quiet
        pass

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, payload: dict, status: int = 200, kind: str = "application/json") -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self._body()
        self.requests.append({"method": "POST", "path": self.path, "headers": self._headers(), "body": body})
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            asked = json.loads(body)
            self._answer({"url": f"{endpoint}/{asked['organization']}/{asked['name']}"})
        elif self.path == "/api/validate-yaml":  # the card's front matter, checked before the commit
            self._answer({"errors": [], "warnings": []})
        elif "/preupload/" in self.path:  # the Hub's .gitattributes send *.safetensors through LFS
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": _mode(f["path"]), "shouldIgnore": False, "oid": None}
                for f in files
            ]
            self._answer({"files": modes, "commitOid": "0" * 40})
        elif self.path.endswith(".git/info/lfs/objects/batch"):
            objects = [
                {**o, "authenticated": True, "actions": {"upload": {"href": f"{endpoint}/lfs/{o['oid']}"}}}
                for o in json.loads(body)["objects"]
            ]
            self._answer({"transfer": "basic", "objects": objects}, kind="application/vnd.git-lfs+json")
        elif "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            self._answer({"commitUrl": f"{endpoint}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        else:
            self._answer({"error": f"not part of the stand-in: {self.path}"}, 404)

    def do_PUT(self):  # noqa: N802
        body = self._body()
        self.requests.append({"method": "PUT", "path": self.path, "headers": self._headers(), "body": body})
        self.lfs[self.path.rsplit("/", 1)[1]] = body
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def fake_hub():
    _FakeHub.requests, _FakeHub.lfs = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _FakeHub
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.server
def test_push_sends_the_folder_in_one_commit_through_huggingface_hub(lora_exported, fake_hub):
    """The real huggingface_hub client, in the real `visiontune push` process, up to HTTP: create the
    repo (private), ask what to upload how, LFS-upload the weights, one commit with the message."""
    params, layout = lora_exported
    folder = layout.export / "hf"
    endpoint, seen = fake_hub
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    # HF_HUB_DISABLE_XET: the stand-in speaks the Hub's plain LFS protocol, not Xet's storage protocol
    env |= {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    exe = Path(sys.executable).with_name("visiontune")
    done = subprocess.run(
        [str(exe), "push", "--repo-id", "org/digits", "--private", "--model", str(folder)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    api = [r for r in seen.requests if r["method"] == "POST"]  # not the LFS PUTs: presigned storage URLs
    assert all(r["headers"].get("authorization") == "Bearer hf_test_token" for r in api)

    cards = [json.loads(r["body"]) for r in seen.requests if r["path"] == "/api/validate-yaml"]
    assert cards and all(c == {"content": files["README.md"].decode(), "repoType": "model"} for c in cards)
    create = [json.loads(r["body"]) for r in seen.requests if r["path"] == "/api/repos/create"]
    assert create == [{"name": "digits", "organization": "org", "visibility": "private", "type": "model"}]
    preupload = [r for r in seen.requests if r["path"].startswith("/api/models/org/digits/preupload/")]
    assert sorted(f["path"] for r in preupload for f in json.loads(r["body"])["files"]) == sorted(files)
    stored = {name: seen.lfs.get(hashlib.sha256(data).hexdigest()) for name, data in files.items()}
    assert {n for n, d in stored.items() if d is not None} == {
        "model.safetensors",
        "adapter/adapter_model.safetensors",
    }
    assert all(stored[n] == files[n] for n in stored if stored[n] is not None)  # byte for byte

    (commit,) = [r for r in seen.requests if r["path"].startswith("/api/models/org/digits/commit/")]
    lines = [json.loads(line) for line in commit["body"].splitlines()]
    assert lines[0]["key"] == "header"
    message = lines[0]["value"]["summary"]
    config = json.loads(files["config.json"])
    data = config["visiontune"]["data_hash"]
    assert message == f"Upload tf_efficientnet_lite0 (not a registered version), data {data}"
    committed = {}
    for line in lines[1:]:
        value = line["value"]
        if line["key"] == "file":
            committed[value["path"]] = base64.b64decode(value["content"])
        else:
            assert line["key"] == "lfsFile" and value["algo"] == "sha256"
            committed[value["path"]] = seen.lfs[value["oid"]]
    assert committed == files
    assert "sent 5 files" in done.stdout and message in done.stdout
