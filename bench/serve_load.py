"""Benchmark: `visiontune serve` end to end over loopback HTTP, side by side with a plain FastAPI
endpoint, the in-process limit and (with --mlflow) `mlflow models serve`; dynamic batching on and
off; and a registry swap under load.

Run: `python bench/serve_load.py [--seconds 15] [--requests 3000] [--concurrency 1 8 32]
[--large resnet50] [--mlflow] [--swap]`. It exports EfficientNet-Lite0 at 224 px (the installed
ImageNet weights, a fresh 10-class head) to ONNX in a temporary folder and writes JPEG photos of
320 px from scikit-image's sample images. Every server binds 127.0.0.1 and is ended with its
process group; every load run stops after --requests requests or --seconds seconds. Clients run in
this process (asyncio, aiohttp), on the same cores as the server. Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VENV_BIN = Path(sys.executable).parent


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
from PIL import Image

session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size, feed = int(meta["image_size"]), session.get_inputs()[0].name
mean = np.array(json.loads(meta["mean"]), np.float32).reshape(3, 1, 1)
std = np.array(json.loads(meta["std"]), np.float32).reshape(3, 1, 1)
app = FastAPI()

@app.get("/ready")
async def ready():
    return {{}}

@app.post("/predict")
async def predict(request: Request):
    img = Image.open(io.BytesIO(await request.body())).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - mean) / std
    logits = session.run(None, {{feed: x[None]}})[0][0]
    return {{"label": int(logits.argmax())}}
"""


async def load(url: str, bodies: list, concurrency: int, max_requests: int, seconds: float,
               headers: dict, record_versions: bool = False):  # fmt: skip
    """Closed-loop clients: `concurrency` of them, each sending its next request on each answer."""
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
                    async with http.post(url, data=body() if callable(body) else body, headers=headers) as r:
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


def row(label: str, c: int | str, s: dict, ref: dict | None = None) -> None:
    ratio = f"{s['images_s'] / ref['images_s']:.2f}" if ref else ""
    print(f"{label:<44}{c!s:>5}{s['images_s']:>10.1f}{s['p50']:>9.1f}{s['p99']:>9.1f}{s['n']:>7}"
          f"{s['failed']:>7}{ratio:>9}", flush=True)  # fmt: skip


def header(title: str) -> None:
    print(f"\n{title}\n{'':<44}{'conc':>5}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'n':>7}{'failed':>7}"
          f"{'vs (c)':>9}")  # fmt: skip


def in_process(model_path: Path, bodies: list[bytes], seconds: float, max_images: int) -> dict:
    """(c): decode + preprocess + inference in one loop, no HTTP: the shared code path, batch 1."""
    from visiontune.components import images
    from visiontune.components.predict import OnnxClassifier

    clf = OnnxClassifier(model_path)
    clf.logits(np.zeros((1, clf.size, clf.size, 3), np.uint8))
    latencies, deadline, start, i = [], time.perf_counter() + seconds, time.perf_counter(), 0
    while i < max_images and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        clf.rank(clf.logits(images.load_resized(bodies[i % len(bodies)], clf.size)[None]), 5)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return stats(latencies, 0, time.perf_counter() - start)


def main() -> None:
    if sys.argv[1:2] == ["--export"]:
        name, size, out, pretrained = sys.argv[2:6]
        _export(name, int(size), Path(out), pretrained == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per load run")
    parser.add_argument("--requests", type=int, default=3000, help="per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="max_batch values tried")
    parser.add_argument("--large", default="resnet50", help="a larger timm model (random weights); '' skips")
    parser.add_argument("--mlflow", action="store_true", help="also `mlflow models serve` (slow)")
    parser.add_argument("--swap", action="store_true", help="also a champion swap under load")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "no-params.yaml").write_text("{}\n")
        bodies = photos(tmp)
        jpeg = {"Content-Type": "image/jpeg"}
        lite0 = export_onnx("tf_efficientnet_lite0", 224, tmp, pretrained=True)
        kib = np.mean([len(b) for b in bodies]) / 1024
        print(f"{os.cpu_count()} CPUs; {len(bodies)} JPEG photos of 320 px, {kib:.0f} KiB on average; "
              f"runs of at most {args.requests} requests or {args.seconds:g} s")  # fmt: skip

        def run(url, c, headers=jpeg, bodies=bodies, requests=args.requests):
            return stats(*asyncio.run(load(url, bodies, c, requests, args.seconds, headers))[:3])

        header("Lite0 at 224 px: JPEG photo in, label out")
        limit = in_process(lite0, bodies, args.seconds, args.requests)
        row("(c) in process: decode+preprocess+onnxruntime", 1, limit, limit)
        port = free_port()
        with serve(str(lite0), port, tmp / "serve.log"):
            for c in args.concurrency:
                row("visiontune serve (max_batch 1)", c, run(f"http://127.0.0.1:{port}/v1/predict", c), limit)
        (tmp / "plain.py").write_text(PLAIN_APP.format(model=str(lite0)))
        port = free_port()
        plain = [str(VENV_BIN / "python"), "-m", "uvicorn", "plain:app", "--app-dir", str(tmp), "--port",
                 str(port), "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]  # fmt: skip
        with process(plain, f"http://127.0.0.1:{port}/ready", tmp / "plain.log"):
            for c in args.concurrency:
                row("(b) plain FastAPI, one onnxruntime call/request", c,
                    run(f"http://127.0.0.1:{port}/predict", c), limit)  # fmt: skip
        if args.mlflow:
            mlflow_serve(tmp, lite0, bodies, args, limit)

        models = [("Lite0 224 px", lite0, limit)]
        if args.large:
            big = export_onnx(args.large, 224, tmp, pretrained=False)
            models.append((f"{args.large} 224 px", big, in_process(big, bodies, args.seconds, args.requests)))
        c = max(args.concurrency)
        header(f"dynamic batching at concurrency {c} (max_wait_ms 2)")
        for label, path, ref in models:
            row(f"(c) {label} in process", 1, ref, ref)
            for max_batch in [1, *args.batches]:
                port = free_port()
                with serve(str(path), port, tmp / f"serve-{max_batch}.log", f"serve.max_batch={max_batch}"):
                    row(
                        f"{label}, max_batch {max_batch}",
                        c,
                        run(f"http://127.0.0.1:{port}/v1/predict", c),
                        ref,
                    )

        if args.swap:
            swap(tmp, lite0, bodies, args)


def mlflow_serve(tmp: Path, model_path: Path, bodies: list[bytes], args, limit: dict) -> None:
    """(a): `mlflow models serve --env-manager local`; clients preprocess and send JSON tensors."""
    import mlflow.onnx
    import onnx

    from visiontune.components import images

    saved = tmp / "mlflow-model"
    mlflow.onnx.save_model(onnx.load(str(model_path)), str(saved), save_as_external_data=False,
                           onnx_execution_providers=["CPUExecutionProvider"])  # fmt: skip
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(saved), "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip

    def tensor(body: bytes):
        def make() -> bytes:  # the client's work: decode, resize, normalize, JSON
            x = images.normalize(images.load_resized(body, 224)[None], (0.5,) * 3, (0.5,) * 3)
            return json.dumps({"inputs": x.tolist()}).encode()

        return make

    size, json_type = len(tensor(bodies[0])()) / 2**20, {"Content-Type": "application/json"}
    path = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs `uvicorn` from PATH
    with process(command, f"http://127.0.0.1:{port}/ping", tmp / "mlflow.log", path, timeout=180):
        for c in args.concurrency[:2]:
            url, makers = f"http://127.0.0.1:{port}/invocations", [tensor(b) for b in bodies]
            done = asyncio.run(load(url, makers, c, min(args.requests, 60), args.seconds, json_type))
            row(f"(a) mlflow models serve, JSON ({size:.1f} MiB/img)", c, stats(*done[:3]), limit)


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
