"""Benchmark: `visiontune serve` end to end over loopback HTTP, side by side with a plain FastAPI
endpoint, the in-process limit and (with --mlflow) `mlflow models serve`; dynamic batching on and
off; and a registry swap under load.

Run: `python bench/serve_load.py [--seconds 10] [--requests 3000] [--concurrency 1 8 32]
[--repeats 3] [--parts compare,batching] [--large resnet50] [--mlflow] [--swap] [--smoke]`. It
exports EfficientNet-Lite0 at 224 px (the installed ImageNet weights, a fresh 10-class head) to
ONNX in a temporary folder and writes JPEG photos of 320 px from scikit-image's sample images.

The baselines are built as a competent engineer would: the plain FastAPI endpoint decodes and runs
onnxruntime off the event loop (`run_in_threadpool`, FastAPI's thread pool), with visiontune's
preprocessing written out by hand and the same onnxruntime session settings as `visiontune serve`;
`mlflow models serve` gets the same session settings, and its clients' preprocessing and JSON
encoding are done before the clock starts (only request and response are timed). Before timing,
each server's answers for the photos are compared with visiontune's in-process answers.

All servers of a part run at once (idle when not loaded) and the load alternates between them
(A, B, A, B, ...) for --repeats rounds; figures are the median with min–max, because the cores may
be shared. Every server binds 127.0.0.1 and is ended with its process group; every load run stops
after --requests requests or --seconds seconds. Clients run in this process (asyncio, aiohttp), on
the same cores as the servers. Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

VENV_BIN = Path(sys.executable).parent
NO_SPIN = {"session.intra_op.allow_spinning": "0"}  # visiontune serve's onnxruntime setting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_onnx(name: str, size: int, out: Path, pretrained: bool) -> Path:
    """Export in a child process, so that torch's threads never share this process with the load."""
    path = out / f"{name}.onnx"
    subprocess.run([sys.executable, __file__, "--export", name, str(size), str(out), str(int(pretrained))],
                   check=True, stderr=subprocess.DEVNULL)  # fmt: skip
    return path


def _export(name: str, size: int, out: Path, pretrained: bool) -> Path:
    """A timm model with a 10-class head as ONNX (batch axis dynamic), with visiontune's metadata."""
    import onnx
    import torch

    from visiontune.components import model as models
    from visiontune.components.config import ModelConfig

    model, _ = models.create(ModelConfig(name=name, image_size=size, pretrained=pretrained), num_classes=10)
    model.eval()
    path = out / f"{name}.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    cfg = model.pretrained_cfg
    proto = onnx.load(str(path))
    for key, value in {
        "class_names": json.dumps([f"class{i}" for i in range(10)]),
        "mean": json.dumps(list(cfg.get("mean", (0.5, 0.5, 0.5)))),
        "std": json.dumps(list(cfg.get("std", (0.5, 0.5, 0.5)))),
        "image_size": str(size),
        "architecture": name,
    }.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(path))
    return path


def photos(out: Path, side: int = 320) -> list[bytes]:
    """JPEG photos with a longer side of `side` px, from scikit-image's sample images."""
    from PIL import Image
    from skimage import data

    bodies = []
    for name in ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        bodies.append(buf.getvalue())
        (out / f"{name}.jpg").write_bytes(buf.getvalue())
    return bodies


@contextmanager
def process(command: list[str], ready_url: str, log: Path, env: dict | None = None, timeout: float = 120):
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(ready_url, timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.25)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} not ready:\n{log.read_text()[-2000:]}")
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had exited
            pass


def serve(model: str, port: int, log: Path, *sets: str, env: dict | None = None):
    args = [str(VENV_BIN / "visiontune"), "serve", "--model", model, "--port", str(port),
            "--params", str(log.parent / "no-params.yaml")]  # fmt: skip
    for item in sets:
        args += ["--set", item]
    return process(args, f"http://127.0.0.1:{port}/readyz", log, env)


PLAIN_APP = """
import io, json
import numpy as np, onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, ImageOps

options = ort.SessionOptions()
options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as visiontune serve
session = ort.InferenceSession({model!r}, options, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size, feed, classes = int(meta["image_size"]), session.get_inputs()[0].name, json.loads(meta["class_names"])
mean = np.array(json.loads(meta["mean"]), np.float32).reshape(3, 1, 1)
std = np.array(json.loads(meta["std"]), np.float32).reshape(3, 1, 1)
app = FastAPI()

def classify(data: bytes) -> dict:
    # the training preprocessing: EXIF turn, RGB, shorter side to size (bicubic), centre crop
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    new_w, new_h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = (np.asarray(img, np.float32).transpose(2, 0, 1) / np.float32(255) - mean) / std
    logits = session.run(None, {{feed: np.ascontiguousarray(x[None])}})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:5]
    return {{"label": classes[top[0]], "confidence": float(p[top[0]]),
             "top_k": [{{"label": classes[i], "probability": float(p[i])}} for i in top]}}

@app.get("/ready")
async def ready():
    return {{}}

@app.post("/predict")
async def predict(request: Request):
    return await run_in_threadpool(classify, await request.body())  # off the event loop
"""


async def load(url: str, bodies: list, concurrency: int, max_requests: int, seconds: float,
               headers: dict, record_versions: bool = False):  # fmt: skip
    """Closed-loop clients: `concurrency` of them, each sending its next request on each answer.

    The bodies are ready-made bytes: only sending a request and reading its answer is timed."""
    import aiohttp

    latencies, failures, versions = [], 0, []
    sent = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def client(k: int) -> None:
            nonlocal sent, failures
            while sent < max_requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with http.post(url, data=body, headers=headers) as r:
                        payload = await r.read()
                        if r.status != 200:
                            failures += 1
                            continue
                except aiohttp.ClientError:
                    failures += 1
                    continue
                done = time.perf_counter()
                latencies.append(done - t0)
                if record_versions:
                    versions.append((done, json.loads(payload)["model"]["version"]))

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, failures, wall, versions


def stats(latencies: list[float], failures: int, wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"n": len(latencies), "failed": failures, "images_s": len(latencies) / wall,
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan")}  # fmt: skip


def spread(values: list[float]) -> str:
    """median (min–max) of the values, or the one value."""
    med = statistics.median(values)
    return f"{med:.1f}" if len(values) == 1 else f"{med:.1f} ({min(values):.1f}–{max(values):.1f})"


def rate(runs: list[dict]) -> float:
    """Median images/s over the rounds."""
    return statistics.median(r["images_s"] for r in runs)


def row(label: str, c: int | str, runs: list[dict], ref: list[dict] | None = None) -> None:
    """One line: images/s, p50 and p99 as median (min–max) over the rounds; requests and failures summed."""
    ratio = f"{rate(runs) / rate(ref):.2f}" if ref else ""
    cells = [spread([r[key] for r in runs]) for key in ("images_s", "p50", "p99")]
    n, failed = sum(r["n"] for r in runs), sum(r["failed"] for r in runs)
    print(
        f"{label:<48}{c!s:>5}{cells[0]:>21}{cells[1]:>24}{cells[2]:>24}{n:>7}{failed:>7}{ratio:>8}",
        flush=True,
    )


def header(title: str) -> None:
    print(f"\n{title}\n{'':<48}{'conc':>5}{'img/s':>21}{'p50 ms':>24}{'p99 ms':>24}{'n':>7}{'failed':>7}"
          f"{'vs (c)':>8}")  # fmt: skip


def in_process(clf, bodies: list[bytes], seconds: float, max_images: int) -> dict:
    """(c): decode + preprocess + inference in one loop, no HTTP: the shared code path, batch 1."""
    from visiontune.components import images

    latencies, deadline, start, i = [], time.perf_counter() + seconds, time.perf_counter(), 0
    while i < max_images and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        clf.rank(clf.logits(images.load_resized(bodies[i % len(bodies)], clf.size)[None]), 5)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return stats(latencies, 0, time.perf_counter() - start)


def classifier(model_path: Path):
    """visiontune's in-process classifier, warmed up: the (c) loop and the answers servers must give."""
    from visiontune.components.predict import OnnxClassifier

    clf = OnnxClassifier(model_path, spinning=False)  # the servers' onnxruntime settings (spinning off)
    clf.logits(np.zeros((1, clf.size, clf.size, 3), np.uint8))
    return clf


def expected(clf, bodies: list[bytes]) -> list[dict]:
    """visiontune's in-process answer (label, confidence) for each photo."""
    from visiontune.components import images

    return [clf.rank(clf.logits(images.load_resized(b, clf.size)[None]), 5)[0] for b in bodies]


def check(name: str, url: str, bodies: list[bytes], headers: dict, want: list[dict], answer) -> None:
    """Each photo once through the server; its label and confidence must match visiontune's answer."""
    for body, good in zip(bodies, want, strict=True):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=120) as r:
            label, confidence = answer(json.loads(r.read()))
        if label != good["label"] or abs(confidence - good["confidence"]) > 1e-3:
            raise SystemExit(f"{name} answered {label} ({confidence:.4f}), visiontune {good['label']} "
                             f"({good['confidence']:.4f}): not the same model and preprocessing")  # fmt: skip
    print(f"checked: {name} gives visiontune's label and confidence (±0.001) for all {len(bodies)} photos")


def visiontune_answer(payload: dict) -> tuple[str, float]:
    first = payload["predictions"][0]
    return first["label"], first["confidence"]


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), load average {load} at the start; the cores are shared"


def _export_monitored(source: Path, photos_dir: Path) -> Path:
    """source's model again with its embedding as a second output, and a drift reference (from
    these photos) beside it: what `visiontune export` writes, for the monitoring part."""
    import onnx
    import torch

    from visiontune.components import drift, images, metrics
    from visiontune.components import model as models
    from visiontune.components.config import ModelConfig
    from visiontune.components.export import REFERENCE_FILE, _WithEmbedding

    meta = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    size, mean, std = int(meta["image_size"]), json.loads(meta["mean"]), json.loads(meta["std"])
    model, _ = models.create(ModelConfig(name=meta["architecture"], image_size=size), num_classes=10)
    model.eval()
    out = source.parent / "monitored"
    out.mkdir(exist_ok=True)
    path = out / "model.onnx"
    names = ["logits", "embedding"]
    torch.onnx.export(_WithEmbedding(model), (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=names,
                      dynamic_axes={n: {0: "batch"} for n in ["input", *names]})  # fmt: skip
    proto = onnx.load(str(path))
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(path))
    files = sorted(str(p) for p in photos_dir.glob("*.jpg"))
    x = images.normalize(images.load_batch(files, size), mean, std)
    with torch.no_grad():
        logits, embedding = models.logits_and_embedding(model, torch.from_numpy(x))
    probs = metrics.softmax(logits.double().numpy())
    drift.build_reference(embedding.numpy(), probs, json.loads(meta["class_names"])).save(
        out / REFERENCE_FILE
    )
    return path


def main() -> None:
    if sys.argv[1:2] == ["--export"]:
        name, size, out, pretrained = sys.argv[2:6]
        _export(name, int(size), Path(out), pretrained == "1")
        return
    if sys.argv[1:2] == ["--export-monitored"]:
        _export_monitored(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per load run")
    parser.add_argument("--requests", type=int, default=3000, help="per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of load runs")
    parser.add_argument("--parts", default="compare,batching", help="compare, batching, drift (any of them)")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="max_batch values tried")
    parser.add_argument("--large", default="resnet50", help="a larger timm model (random weights); '' skips")
    parser.add_argument("--mlflow", action="store_true", help="also `mlflow models serve` (slow)")
    parser.add_argument("--swap", action="store_true", help="also a champion swap under load")
    parser.add_argument("--smoke", action="store_true", help="2 s runs, concurrency 1 and 4, one round")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # lines as they come, also into a file
    if args.smoke:
        args.seconds, args.requests, args.concurrency, args.repeats = 2.0, 200, [1, 4], 1
        args.batches, args.large = [4], ""
    parts = set(args.parts.split(","))

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "no-params.yaml").write_text("{}\n")
        bodies = photos(tmp)
        lite0 = export_onnx("tf_efficientnet_lite0", 224, tmp, pretrained=True)
        kib = np.mean([len(b) for b in bodies]) / 1024
        print(machine())
        print(f"{len(bodies)} JPEG photos of 320 px, {kib:.0f} KiB on average; runs of at most "
              f"{args.requests} requests or {args.seconds:g} s; {args.repeats} interleaved rounds, "
              "median (min–max)")  # fmt: skip
        if "compare" in parts:
            compare(tmp, lite0, bodies, args)
        if "batching" in parts:
            batching(tmp, lite0, bodies, args)
        if "drift" in parts:
            monitoring(tmp, lite0, bodies, args)
        if args.swap:
            swap(tmp, lite0, bodies, args)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def run(url: str, c: int, bodies: list[bytes], headers: dict, args) -> dict:
    return stats(*asyncio.run(load(url, bodies, c, args.requests, args.seconds, headers))[:3])


def compare(tmp: Path, lite0: Path, bodies: list[bytes], args) -> None:
    """(c) in process, visiontune serve, the plain FastAPI endpoint and (a) mlflow, alternating."""
    jpeg = {"Content-Type": "image/jpeg"}
    clf = classifier(lite0)
    want = expected(clf, bodies)
    with ExitStack() as servers:
        sides = []  # (label, url, bodies, headers, concurrencies)
        port = free_port()
        servers.enter_context(serve(str(lite0), port, tmp / "serve.log"))
        url = f"http://127.0.0.1:{port}/v1/predict"
        check("visiontune serve", url, bodies, jpeg, want, visiontune_answer)
        sides.append(("visiontune serve (max_batch 1)", url, bodies, jpeg, args.concurrency))

        (tmp / "plain.py").write_text(PLAIN_APP.format(model=str(lite0)))
        port = free_port()
        plain = [str(VENV_BIN / "python"), "-m", "uvicorn", "plain:app", "--app-dir", str(tmp), "--port",
                 str(port), "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]  # fmt: skip
        servers.enter_context(process(plain, f"http://127.0.0.1:{port}/ready", tmp / "plain.log"))
        url = f"http://127.0.0.1:{port}/predict"
        check("(b) plain FastAPI", url, bodies, jpeg, want, lambda p: (p["label"], p["confidence"]))
        sides.append(("(b) plain FastAPI, run_in_threadpool", url, bodies, jpeg, args.concurrency))

        if args.mlflow:
            sides.append(mlflow_serve(servers, tmp, lite0, bodies, clf, want, args))

        limit: list[dict] = []
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeats):  # A, B, A, B, ...: every side sees the same spells of load
            limit.append(in_process(clf, bodies, args.seconds, args.requests))
            for c in args.concurrency:
                for label, url, side_bodies, headers, levels in sides:
                    if c in levels:
                        runs.setdefault((label, c), []).append(run(url, c, side_bodies, headers, args))

    header("Lite0 at 224 px: JPEG photo in, label out")
    row("(c) in process: decode+preprocess+onnxruntime", 1, limit, limit)
    for label, *_ in sides:
        for (side, c), results in runs.items():
            if side == label:
                row(label, c, results, limit)
    ours = sides[0][0]
    for label, *_, levels in sides[1:]:
        for c in levels:
            mine, theirs = runs[(ours, c)], runs[(label, c)]
            paired = ", ".join(
                f"{m['images_s'] / t['images_s']:.2f}" for m, t in zip(mine, theirs, strict=True)
            )
            print(f"visiontune serve / {label.split(',')[0]} at concurrency {c}: "
                  f"{rate(mine) / rate(theirs):.2f}× images/s (per round: {paired})")  # fmt: skip
    c = max(args.concurrency)
    print(f"visiontune serve at concurrency {c} / (c): {rate(runs[(ours, c)]) / rate(limit):.2f}×")


def batching(tmp: Path, lite0: Path, bodies: list[bytes], args) -> None:
    """Each model served at every max_batch at once; the load alternates between them."""
    jpeg = {"Content-Type": "image/jpeg"}
    models = [("Lite0 224 px", lite0)]
    if args.large:
        models.append((f"{args.large} 224 px", export_onnx(args.large, 224, tmp, pretrained=False)))
    c = max(args.concurrency)
    results = []
    for label, path in models:
        clf = classifier(path)
        want = expected(clf, bodies)
        limit, runs = [], {}
        with ExitStack() as servers:
            urls = {}
            for max_batch in [1, *args.batches]:
                port = free_port()
                log = tmp / f"serve-{path.stem}-{max_batch}.log"
                servers.enter_context(serve(str(path), port, log, f"serve.max_batch={max_batch}"))
                urls[max_batch] = f"http://127.0.0.1:{port}/v1/predict"
                check(
                    f"{label}, max_batch {max_batch}", urls[max_batch], bodies, jpeg, want, visiontune_answer
                )
            for _ in range(args.repeats):
                limit.append(in_process(clf, bodies, args.seconds, args.requests))
                for max_batch, url in urls.items():
                    runs.setdefault(max_batch, []).append(run(url, c, bodies, jpeg, args))
        del clf
        results.append((label, limit, runs))
    header(f"dynamic batching at concurrency {c} (max_wait_ms 2)")
    for label, limit, runs in results:
        row(f"(c) {label} in process", 1, limit, limit)
        for max_batch, r in runs.items():
            row(f"{label}, max_batch {max_batch}", c, r, limit)


def monitoring(tmp: Path, lite0: Path, bodies: list[bytes], args) -> None:
    """What drift monitoring costs: the same model (with its embedding output and a reference)
    served with serve.drift_window 200 and 0, the load alternating between them."""
    jpeg = {"Content-Type": "image/jpeg"}
    photos_dir = tmp / "photos"
    photos_dir.mkdir(exist_ok=True)
    for i, body in enumerate(bodies):
        (photos_dir / f"{i}.jpg").write_bytes(body)
    subprocess.run([sys.executable, __file__, "--export-monitored", str(lite0), str(photos_dir)],
                   check=True, stderr=subprocess.DEVNULL)  # fmt: skip
    model = lite0.parent / "monitored" / "model.onnx"
    want = expected(classifier(model), bodies)
    c = max(args.concurrency)
    runs: dict[int, list[dict]] = {}
    with ExitStack() as servers:
        urls = {}
        for window in (0, 200):
            port = free_port()
            servers.enter_context(serve(str(model), port, tmp / f"serve-drift-{window}.log",
                                        f"serve.drift_window={window}"))  # fmt: skip
            urls[window] = f"http://127.0.0.1:{port}"
            check(
                f"drift_window {window}", f"{urls[window]}/v1/predict", bodies, jpeg, want, visiontune_answer
            )
        for _ in range(args.repeats):
            for window, url in urls.items():
                runs.setdefault(window, []).append(run(f"{url}/v1/predict", c, bodies, jpeg, args))
        with urllib.request.urlopen(f"{urls[200]}/v1/drift", timeout=30) as answer:
            state = json.load(answer)
    header(f"drift monitoring at concurrency {c} (Lite0 224 px, windows of 200 images)")
    for window, r in runs.items():
        row(f"serve.drift_window {window}", c, r, runs[0])
    seconds = [w["seconds"] for w in state["windows"]]
    cost = 1 - rate(runs[200]) / rate(runs[0])
    took = np.median(seconds) if seconds else 0.0
    print(f"monitoring costs {100 * cost:.1f} % of images/s (target at most 5 %); {len(seconds)} windows "
          f"checked, {state['skipped_windows']} skipped, a check took {took:.2f} s (median, "
          "on its own thread)")  # fmt: skip


def mlflow_serve(servers: ExitStack, tmp: Path, model_path: Path, bodies: list[bytes], clf, want, args):
    """(a): `mlflow models serve --env-manager local` with visiontune's onnxruntime session settings;
    the clients' work (decode, resize, normalize, JSON) is done here, before any clock starts."""
    import mlflow.onnx
    import onnx

    from visiontune.components import images

    saved = tmp / "mlflow-model"
    mlflow.onnx.save_model(onnx.load(str(model_path)), str(saved), save_as_external_data=False,
                           onnx_execution_providers=["CPUExecutionProvider"],
                           onnx_session_options={"extra_session_config": NO_SPIN})  # fmt: skip
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(saved), "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    encoded = [
        json.dumps(
            {"inputs": images.normalize(images.load_resized(b, clf.size)[None], clf.mean, clf.std).tolist()}
        ).encode()
        for b in bodies
    ]
    size, json_type = np.mean([len(e) for e in encoded]) / 2**20, {"Content-Type": "application/json"}
    path = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs `uvicorn` from PATH
    servers.enter_context(
        process(command, f"http://127.0.0.1:{port}/ping", tmp / "mlflow.log", path, timeout=180)
    )
    url = f"http://127.0.0.1:{port}/invocations"

    def answer(payload: dict) -> tuple[str, float]:
        logits = payload["predictions"]
        logits = np.asarray(logits["logits"] if isinstance(logits, dict) else logits, np.float64).reshape(-1)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return clf.class_names[int(p.argmax())], float(p.max())

    check("(a) mlflow models serve", url, encoded, json_type, want, answer)
    label = f"(a) mlflow models serve, JSON ({size:.1f} MiB/img)"
    return label, url, encoded, json_type, args.concurrency[:2]


def swap(tmp: Path, model_path: Path, bodies: list[bytes], args) -> None:
    """Serve models:/bench@champion from an embedded registry; move the alias to v2 and back under load."""
    import mlflow.onnx
    import onnx
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment):
            mlflow.onnx.log_model(onnx.load(str(model_path)), name="model", registered_model_name="bench",
                                  save_as_external_data=False)  # fmt: skip
    client.set_registered_model_alias("bench", "champion", "1")
    port = free_port()
    poll = "0.5"
    with serve("models:/bench@champion", port, tmp / "swap.log", f"serve.poll_s={poll}",
               env={"MLFLOW_TRACKING_URI": uri}):  # fmt: skip
        moves: list[tuple[float, str]] = []

        async def mover():
            for version in ("2", "1"):
                await asyncio.sleep(args.seconds / 3)
                client.set_registered_model_alias("bench", "champion", version)
                moves.append((time.perf_counter(), version))

        async def both():
            url = f"http://127.0.0.1:{port}/v1/predict"
            jpeg = {"Content-Type": "image/jpeg"}
            sent = load(url, bodies, 8, 10**9, args.seconds, jpeg, record_versions=True)
            return (await asyncio.gather(sent, mover()))[0]

        latencies, failures, wall, versions = asyncio.run(both())
    print(f"\nswap under load (8 clients, serve.poll_s {poll}): {len(latencies) + failures} requests, "
          f"{failures} failed")  # fmt: skip
    for moved, version in moves:
        first = next((t for t, v in versions if t > moved and v == version), None)
        took = f"{first - moved:.2f} s" if first else "never"
        print(f"  alias → v{version}: first answer from v{version} after {took}")


if __name__ == "__main__":
    main()
