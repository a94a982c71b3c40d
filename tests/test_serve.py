"""serve: a real uvicorn subprocess on 127.0.0.1 answers like `visiontune predict`, refuses bad input
with a 4xx and keeps answering, and follows a registry alias with no failed request."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from conftest import _free_port
from visiontune.components import manifest
from visiontune.components.predict import OnnxClassifier
from visiontune.pipelines.cli import app
from visiontune.pipelines.model_server import Batcher

MAX_PIXELS = 1_000_000  # validate.max_pixels for the served app: a 2000×2000 image is a "bomb"


@contextmanager
def serving(folder: Path, *args: str, env: dict[str, str] | None = None):
    """`visiontune serve` on a free loopback port, until it is ready; ended with its process group."""
    port = _free_port()
    log = folder / f"serve-{port}.log"
    command = [str(Path(sys.executable).with_name("visiontune")), "serve", "--port", str(port), *args]
    proc = subprocess.Popen(
        command,
        cwd=folder,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"visiontune serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"visiontune serve did not get ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """The tiny exported model served with small limits: (base url, ONNX path, test image paths)."""
    params, layout = exported
    folder = tmp_path_factory.mktemp("serve")
    (folder / "params.yaml").write_text(
        f"validate:\n  max_pixels: {MAX_PIXELS}\nserve:\n  top_k: 2\n  max_images: 4\n  max_upload_mb: 1\n"
        "  max_decode_mb: 8\n"
    )
    onnx = layout.export / "model.onnx"
    frame = manifest.read(layout.prepare / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    with serving(folder, "--model", str(onnx)) as url:
        yield url, onnx, paths


def _multipart(paths: list[str]) -> list:
    return [("file", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def _good(url: str) -> None:
    """The server still answers a good request."""
    buf = io.BytesIO()
    Image.new("L", (12, 12), 200).save(buf, "PNG")
    r = httpx.post(f"{url}/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1


def test_predictions_over_http_equal_visiontune_predict(server):
    url, onnx, paths = server
    cli = CliRunner().invoke(app, ["predict", *paths, "--model", str(onnx), "--top-k", "3"])
    assert cli.exit_code == 0, cli.output
    expected = {Path(r["path"]).name: r for r in json.loads(cli.output)}

    answers = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(paths), 4):  # multipart, up to serve.max_images per request
            r = client.post("/v1/predict", params={"top_k": 3}, files=_multipart(paths[start : start + 4]))
            assert r.status_code == 200, r.text
            answers += r.json()["predictions"]
            assert r.json()["model"] == {"name": "tf_efficientnet_lite0", "version": None, "run_id": None}
        raw = client.post(
            "/v1/predict", content=Path(paths[0]).read_bytes(), headers={"Content-Type": "image/png"}
        )
        assert raw.status_code == 200, raw.text
    assert len(answers) == len(paths)
    for got in answers:
        want = expected[got["image"]]
        assert got["label"] == want["label"]
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        np.testing.assert_allclose(
            [t["probability"] for t in got["top_k"]], [t["probability"] for t in want["top_k"]], atol=1e-5
        )
    body = raw.json()["predictions"][0]
    assert body["image"] == "body" and len(body["top_k"]) == 2  # serve.top_k from params.yaml
    assert body["label"] == expected[Path(paths[0]).name]["label"]


def test_a_per_channel_mean_and_std_serve_pytorchs_probabilities(imagenet_exported, tmp_path):
    """ResNet-18 with ImageNet normalization (Lite0's mean = std = 0.5 hides a swap): the served
    probabilities are the PyTorch checkpoint's, scored independently of predict and serve."""
    from visiontune.components import metrics
    from visiontune.components import model as models
    from visiontune.components.evaluate import batches

    params, layout = imagenet_exported
    frame = manifest.read(layout.prepare / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()[:4]
    model, meta = models.load_checkpoint(layout.train)
    prep = models.preprocessing_of(meta)
    probs = metrics.softmax(
        models.predict_logits(model, batches(paths, prep.size, prep.mean, prep.std, 16)).astype(np.float64)
    )
    n = len(meta["class_names"])
    with serving(tmp_path, "--model", str(layout.export / "model.onnx")) as url:
        info = httpx.get(f"{url}/v1/model").json()
        r = httpx.post(f"{url}/v1/predict", params={"top_k": n}, files=_multipart(paths), timeout=30)
    assert r.status_code == 200, r.text
    assert (info["mean"], info["std"]) == (list(prep.mean), list(prep.std))
    for got, want in zip(r.json()["predictions"], probs, strict=True):
        served = {t["label"]: t["probability"] for t in got["top_k"]}
        np.testing.assert_allclose([served[c] for c in meta["class_names"]], want, atol=1e-4)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_hostile_files_get_200_or_a_4xx_naming_them_under_concurrent_clients(server):
    """A sample of bench/hostile_inputs.py's files, 8 clients at once: never a 5xx or a dropped
    connection, and the server answers afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    from test_hostile import _hostile

    url, _, _ = server
    files = [f for batch in _hostile().generate(per_category=2, seed=2).values() for f in batch]

    def post(item):
        name, body = item
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/predict", files=[("file", (name, body, "application/octet-stream"))])
        return name, r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        for name, status, body in pool.map(post, files):
            assert status == 200 or (status in (413, 415, 422) and name in body["detail"]), (
                name,
                status,
                body,
            )
    _good(url)


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_answering(server):
    url, _, paths = server
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, "JPEG")
    bomb = _png(Image.new("L", (2000, 2000), 0))  # 4 MP in a few KB, over validate.max_pixels
    assert len(bomb) < 100_000
    big = os.urandom(int(1.5 * 2**20))  # over serve.max_upload_mb = 1
    deep = _png(Image.fromarray(np.zeros((900, 900), dtype=np.uint16)))  # 16-bit: 9.3 MB to decode, over 8
    gif = io.BytesIO()
    Image.new("RGB", (16, 16)).save(gif, "GIF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n"
    image = Path(paths[0]).read_bytes()

    def chunked():
        for _ in range(3):
            yield big[: 2**20]

    def form(*parts):
        return {"files": [("file", part) for part in parts]}

    def body(data, kind=None):
        return {"content": data, "headers": {"Content-Type": kind} if kind else {}}

    cases = [
        ("non-image", form(("notes.txt", b"just some text", "text/plain")), 422, "notes.txt"),
        ("truncated", form(("cut.jpg", jpeg.getvalue()[:300], "image/jpeg")), 422, "cut.jpg"),
        ("zero-byte file", form(("zero.png", b"", "image/png")), 422, "empty file"),
        ("bomb", form(("bomb.png", bomb, "image/png")), 413, "too many pixels"),
        ("bomb as body", body(bomb, "image/png"), 413, "max_pixels"),
        ("over max_upload_mb", body(big, "image/jpeg"), 413, "max_upload_mb"),
        ("over max_decode_mb", form(("deep.png", deep, "image/png")), 413, "raise serve.max_decode_mb"),
        ("GIF", form(("anim.gif", gif.getvalue(), "image/gif")), 415, "anim.gif: GIF is not an accepted"),
        ("EPS as body", body(eps, "image/x-eps"), 415, "EPS is not an accepted image format"),
        ("over max_upload_mb, chunked", body(chunked(), "image/jpeg"), 413, "max_upload_mb"),
        ("multipart over max_upload_mb", form(("big.jpg", big, "image/jpeg")), 413, "max_upload_mb"),
        ("empty body", body(b"", "image/png"), 400, "empty"),
        ("too many images", form(*[(f"{i}.png", image, "image/png") for i in range(5)]), 400, "max_images=4"),
        ("wrong content type", body(image, "application/json"), 415, "application/json"),
        ("no content type", body(image), 415, "Content-Type"),
        ("a form with no file", {"files": [("note", (None, "hello"))]}, 400, "no file"),
        ("multipart without boundary", body(image, "multipart/form-data"), 400, "boundary"),
        (
            "one good, one bad",
            form(("ok.png", image, "image/png"), ("bad.png", image[:20], "image/png")),
            422,
            "bad.png",
        ),
        ("top_k=0", {"files": _multipart(paths[:1]), "params": {"top_k": 0}}, 422, "top_k"),
    ]  # fmt: skip  (one case a line)
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, request, status, text in cases:
            r = client.post("/v1/predict", **request)
            assert r.status_code == status, (name, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error", "detail"} and text in body["detail"], (name, body)
            _good(url)
        assert client.get("/healthz").json()["status"] == "ok"
        metrics = client.get("/metrics").text
    statuses = {s.labels["status"] for f in text_string_to_metric_families(metrics)
                if f.name == "visiontune_requests" for s in f.samples}  # fmt: skip
    assert {"200", "400", "413", "415", "422"} <= statuses and "500" not in statuses


def _digit_photo(path: str, size: int = 48) -> Image.Image:
    """A digit scan enlarged into an RGB 'photo' with some colour, so that modes differ visibly."""
    gray = Image.open(path).convert("L").resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(gray, dtype=np.float32)
    rgb = np.stack([arr, arr * 0.8 + 30, 255 - (255 - arr) * 0.6], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def test_cmyk_16bit_palette_rgba_gray_and_exif_rotated_uploads_equal_the_file_prediction(server, tmp_path):
    url, onnx, paths = server
    photo = _digit_photo(paths[0])
    files = {}
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    files["cmyk.jpg"] = "image/jpeg"
    deep = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep16.png")
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")
    files["deep16.png"] = "image/png"
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
        tmp_path / "palette.png", transparency=0
    )
    files["palette.png"] = "image/png"
    rgba = photo.convert("RGBA")
    alpha = np.full(photo.size[::-1], 255, dtype=np.uint8)
    alpha[:, : photo.size[0] // 3] = 0  # a transparent left third
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    files["rgba.png"] = "image/png"
    photo.convert("L").save(tmp_path / "gray.png")
    files["gray.png"] = "image/png"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    photo.rotate(90, expand=True).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    files["rotated.jpg"] = "image/jpeg"

    expected = {Path(r["path"]).name: r for r in OnnxClassifier(onnx).predict(
        [str(tmp_path / n) for n in files], top_k=3)}  # fmt: skip
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, kind in files.items():
            data = (tmp_path / name).read_bytes()
            by_form = client.post("/v1/predict?top_k=3", files=[("file", (name, data, kind))])
            by_body = client.post("/v1/predict?top_k=3", content=data, headers={"Content-Type": kind})
            for r in (by_form, by_body):
                assert r.status_code == 200, (name, r.text)
                got, want = r.json()["predictions"][0], expected[name]
                assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]], name
                np.testing.assert_allclose(
                    [t["probability"] for t in got["top_k"]], [t["probability"] for t in want["top_k"]],
                    atol=1e-5, err_msg=name,
                )  # fmt: skip


def test_metrics_parse_as_prometheus_text_with_the_model_version(server):
    url, _, paths = server
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/predict", files=_multipart(paths[:3])).status_code == 200
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["visiontune_requests"].type == "counter"
    assert families["visiontune_request_seconds"].type == "histogram"
    sizes = families["visiontune_batch_size"]
    assert sizes.type == "histogram"
    assert any(s.name.endswith("_count") and s.value >= 1 for s in sizes.samples)
    (info,) = families["visiontune_model_info"].samples
    assert (
        info.labels["name"] == "tf_efficientnet_lite0" and info.labels["provider"] == "CPUExecutionProvider"
    )
    assert any(s.value >= 3 for s in families["visiontune_images"].samples)


def test_model_info_health_page_and_openapi(server):
    url, onnx, _ = server
    classifier = OnnxClassifier(onnx)
    with httpx.Client(base_url=url, timeout=30) as client:
        info = client.get("/v1/model").json()
        assert info["classes"] == classifier.class_names and info["image_size"] == classifier.size == 32
        assert info["mean"] == classifier.mean and info["std"] == classifier.std
        assert info["provider"] == "CPUExecutionProvider" and info["following"] is None
        assert info["lineage"]["data_sha256"] == classifier.metadata["data_sha256"]
        assert client.get("/healthz").json() == {"status": "ok", "version": None, "detail": None}
        assert client.get("/readyz").json()["status"] == "ready"
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "v1/predict" in page.text and "<script>" in page.text
        assert "http://" not in page.text and "https://" not in page.text and 'src="/' not in page.text
        schema = client.get("/openapi.json").json()
        post = schema["paths"]["/v1/predict"]["post"]
        assert {"multipart/form-data", "image/*"} <= set(post["requestBody"]["content"])
        assert {"PredictResponse", "ModelInfo", "ErrorBody"} <= set(schema["components"]["schemas"])
        assert client.get("/nowhere").json()["error"] == "http_error"


def test_batcher_gathers_concurrent_requests_and_never_mixes_models():
    calls = []

    async def run(model, pixels):
        calls.append((model, pixels[:, 0, 0, 0].tolist()))
        await asyncio.sleep(0.005)
        return pixels[:, 0, 0, :1].astype(np.float32)

    async def main():
        batcher = Batcher(run, max_batch=4, max_wait_s=0.02, slots=1)
        batcher.start()
        old, new = object(), object()
        jobs = []
        for i in range(10):
            model = old if i < 6 else new
            n = 2 if i == 3 else 1
            jobs.append(batcher.submit(model, np.full((n, 2, 2, 3), i, dtype=np.uint8)))
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        return old, new, results

    old, new, results = asyncio.run(main())
    for i, logits in enumerate(results):
        assert logits.ravel().tolist() == [i] * (2 if i == 3 else 1)
    assert all(len(values) <= 4 for _, values in calls)
    assert len(calls) < 10  # gathered
    for model, values in calls:
        assert all((v < 6) == (model is old) for v in values)


def _named(params, name):
    return params.model_copy(update={"register_": params.register_.model_copy(update={"model_name": name})})


def test_serve_follows_the_champion_alias_with_no_failed_request(
    well_trained, damaged, mlflow_server, monkeypatch, tmp_path
):
    """v1 is a damaged copy of v2 (its classes rotated): every answer must be the one the version it
    names gives, so a server that reported v2 while still answering with v1 would fail."""
    from mlflow.tracking import MlflowClient

    from visiontune.components.tracking import promote
    from visiontune.pipelines import stages

    (params, good), (_, bad) = well_trained, damaged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    p = _named(params, "served")
    v1 = stages.register(p, bad).version
    v2 = stages.register(p, good).version
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias("served", "champion", v1)
    frame = manifest.read(good.prepare / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()[:4]
    images = [Path(x).read_bytes() for x in paths]
    expected = {  # (label, probability) per version and image, from each version's own ONNX file
        version: [
            (r["label"], r["top_k"][0]["probability"])
            for r in OnnxClassifier(layout.export / "model.onnx").predict(paths)
        ]
        for version, layout in ((v1, bad), (v2, good))
    }
    assert all(a[0] != b[0] for a, b in zip(expected[v1], expected[v2], strict=True))  # told apart

    args = ["--model", "models:/served@champion", "--set", "serve.poll_s=0.3", "--set", "serve.max_batch=4",
            "--set", "serve.max_wait_ms=2"]  # fmt: skip
    with serving(tmp_path, *args, env={"MLFLOW_TRACKING_URI": mlflow_server}) as url:
        info = httpx.get(f"{url}/v1/model").json()
        assert (
            info["version"] == v1
            and info["alias"] == "champion"
            and info["following"] == "models:/served@champion"
        )
        assert "test_accuracy" in info["metrics"] and "manifest_sha256" in info["lineage"]

        answers, failures, stop = [], [], threading.Event()

        def burst(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                i = 0
                while not stop.is_set():
                    try:
                        r = http.post(
                            "/v1/predict", files=[("file", (f"{k}-{i}.png", images[i % 4], "image/png"))]
                        )
                        if r.status_code != 200:
                            failures.append(r.text)
                        else:
                            (got,) = r.json()["predictions"]
                            answer = (got["label"], got["top_k"][0]["probability"])
                            answers.append((time.monotonic(), r.json()["model"]["version"], i % 4, answer))
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    i += 1

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            decision = promote(p.register_, good.prepare, version=v2)
            assert decision.promoted, decision.reason
            moved = time.monotonic()
            deadline = moved + 30
            while not any(v == v2 for _, v, _, _ in answers) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert failures == []
        assert {v for _, v, _, _ in answers} == {v1, v2}
        for _, version, image, (label, probability) in answers:  # each answer is its version's
            assert label == expected[version][image][0]
            assert probability == pytest.approx(expected[version][image][1], abs=1e-5)
        first_new = min(t for t, v, _, _ in answers if v == v2)
        assert all(
            v == v2 for t, v, _, _ in answers if t > first_new + 2
        )  # only requests in flight end on v1
        assert first_new - moved < 10
        info = httpx.get(f"{url}/v1/model").json()
        assert info["version"] == v2 and info["promotion"]["decision"] == "promoted"
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        assert families["visiontune_model_swaps"].samples[0].value == 1
        (served,) = families["visiontune_model_info"].samples
        assert served.labels["version"] == v2
        sizes = [s for s in families["visiontune_batch_size"].samples if s.name.endswith("_sum")]
        assert sizes[0].value >= 1


def test_serve_errors_name_the_fix(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--model", str(tmp_path / "none.onnx")])
    assert missing.exit_code == 1 and "visiontune export" in missing.output
    bad_uri = runner.invoke(app, ["serve", "--model", "models:/only-a-name"])
    assert bad_uri.exit_code == 1 and "models:/NAME@ALIAS" in bad_uri.output
    bad_key = runner.invoke(app, ["serve", "--set", "serve.max_batch=0"])
    assert bad_key.exit_code == 1 and "serve.max_batch" in bad_key.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("192.168.1.20", False), ("my-host.example", False), ("127.0.0.1.nip.io", False),
     ("", False)],
)  # fmt: skip
def test_only_a_loopback_address_serves_without_a_token(host, loopback, monkeypatch):
    """A host name may resolve to anything: only loopback addresses (and localhost) need no token."""
    from visiontune.components.config import ServeConfig
    from visiontune.components.errors import VisiontuneError
    from visiontune.pipelines.serve import serve_token

    monkeypatch.delenv("VISIONTUNE_SERVE_TOKEN", raising=False)
    cfg = ServeConfig.model_construct(**{**ServeConfig().model_dump(), "host": host})
    if loopback:
        assert serve_token(cfg) is None
    else:
        with pytest.raises(VisiontuneError, match="needs a token"):
            serve_token(cfg)
    exposed = cfg.model_copy(update={"token": " a-long-random-secret\n"})
    assert serve_token(exposed) == "a-long-random-secret"  # trimmed: a header cannot carry the newline
    with pytest.raises(VisiontuneError, match=r"serve.token is too short \(5 of at least 16 characters\)"):
        serve_token(cfg.model_copy(update={"token": "short"}))
    monkeypatch.setenv("VISIONTUNE_SERVE_TOKEN", "x")
    with pytest.raises(VisiontuneError, match=r"SERVE_TOKEN is too short \(1 of.*openssl rand"):
        serve_token(exposed)


def test_off_loopback_serve_refuses_to_start_without_a_token(exported, monkeypatch):
    params, layout = exported
    monkeypatch.delenv("VISIONTUNE_SERVE_TOKEN", raising=False)
    onnx = str(layout.export / "model.onnx")
    out = CliRunner().invoke(app, ["serve", "--model", onnx, "--host", "0.0.0.0"])
    assert (
        out.exit_code == 1 and "VISIONTUNE_SERVE_TOKEN" in out.output and "serve.host=0.0.0.0" in out.output
    )


def test_a_token_guards_the_api_and_a_refused_request_never_reaches_the_model(server, tmp_path):
    _, onnx, paths = server
    token = "s3cret-token-for-this-test"
    image = [("file", ("x.png", Path(paths[0]).read_bytes(), "image/png"))]
    with serving(tmp_path, "--model", str(onnx), env={"VISIONTUNE_SERVE_TOKEN": token}) as url:

        def images_served() -> float:
            text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
            found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "visiontune_images_total"]  # fmt: skip
            return sum(found)

        before = images_served()
        wrong = ("Bearer wrong", token, "Bearer", f"Bearer {token[:8]}", f"Bearer {token}x", f"Basic {token}")
        for headers in ({}, *({"Authorization": value} for value in wrong)):
            r = httpx.post(f"{url}/v1/predict", files=image, headers=headers)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", headers
            assert r.json()["error"] == "unauthorized"
        schema = httpx.get(f"{url}/openapi.json").json()
        guarded = {path for path in schema["paths"] if path not in ("/healthz", "/readyz")} | {"/metrics"}
        assert {"/v1/predict", "/v1/model", "/v1/drift"} <= guarded
        for path in guarded:  # every route but the health checks, whatever its method
            assert httpx.get(f"{url}{path}").status_code == 401, path
        assert images_served() == before  # the refused requests never reached the model
        assert (
            httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
        )
        ok = httpx.post(f"{url}/v1/predict", files=image, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and images_served() == before + 1


def test_a_burst_of_shifted_images_raises_the_drift_flag(exported, tmp_path):
    """Windows of 15 served images: the test split itself passes, the same images with heavy noise
    (σ = 100/255) are flagged; /v1/drift, the gauges and the class counter say so."""
    params, layout = exported
    frame = manifest.read(layout.prepare / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    rng = np.random.default_rng(0)

    def noisy(path) -> bytes:
        pixels = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=np.float64)
        return _png(
            Image.fromarray(np.clip(pixels + rng.normal(0, 100, pixels.shape), 0, 255).astype(np.uint8))
        )

    window = len(paths)
    args = ["--model", str(layout.export / "model.onnx"), "--set", f"serve.drift_window={window}"]
    with serving(tmp_path, *args) as url, httpx.Client(base_url=url, timeout=30) as http:

        def windows(n: int) -> list[dict]:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = http.get("/v1/drift").json()
                if len(state["windows"]) >= n:
                    return state["windows"]
                time.sleep(0.2)
            raise AssertionError(f"no {n} drift windows in 60 s: {state}")

        assert http.get("/v1/drift").json()["enabled"] is True
        for path in paths:
            assert http.post("/v1/predict", files=_multipart([path])).status_code == 200
        (calm,) = windows(1)
        assert calm["drift"] is False and calm["window"] == window
        for path in paths:
            body = [("file", ("noisy.png", noisy(path), "image/png"))]
            assert http.post("/v1/predict", files=body).status_code == 200
        latest = windows(2)[0]  # newest first
        assert latest["drift"] is True and latest["p_value"] < latest["alpha"] and latest["fired"]
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        assert families["visiontune_drift"].samples[0].value == 1.0
        outcomes = {s.labels["result"]: s.value for s in families["visiontune_drift_windows"].samples
                    if s.name.endswith("_total")}  # fmt: skip
        assert outcomes == {"no_shift": 1.0, "shift": 1.0}
        served = sum(
            s.value for s in families["visiontune_predicted_class"].samples if s.name.endswith("_total")
        )
        assert served == 2 * window
        assert {s.labels["test"] for s in families["visiontune_drift_p_value"].samples} == {
            "mmd",
            "ks",
            "chi2",
        }
