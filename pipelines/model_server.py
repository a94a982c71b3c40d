"""What `visiontune serve` serves: the current model, swapped whole, and the work around it.

A `Server` loads the model that --model names (a file, or a registry version), warms it up,
follows a registry alias in a background thread (load, warm up, swap in one assignment), and
runs decoding and inference on separate thread pools, optionally gathering concurrent requests
into one onnxruntime call (`Batcher`). Images go through `images.load_resized` and
`OnnxClassifier.logits`, the path `visiontune predict` and evaluation take. The HTTP app around
it is in serve.py. Imported, never run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.components import images
from visiontune.components.config import DriftConfig, ServeConfig
from visiontune.components.errors import VisiontuneError
from visiontune.components.predict import OnnxClassifier, execution_providers

from .drift_monitor import DriftGauges, DriftMonitor

log = logging.getLogger("visiontune.serve")


# ---------------------------------------------------------------------------------------------
# The model being served, and where it comes from


@dataclass(frozen=True)
class ModelRef:
    """What --model names: a file, models:/NAME@ALIAS (followed) or models:/NAME/VERSION (pinned)."""

    uri: str
    path: Path | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        if not uri.startswith("models:/"):
            return cls(uri, path=Path(uri))
        rest = uri.removeprefix("models:/")
        name, at, alias = rest.partition("@")
        if at and name and alias:
            return cls(uri, name=name, alias=alias)
        name, slash, version = rest.rpartition("/")
        if slash and name and version.isdigit():
            return cls(uri, name=name, version=version)
        raise VisiontuneError(
            f"serve.model: {uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION; "
            "e.g. models:/visiontune-classifier@champion, or give an ONNX file"
        )


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, warmed-up model and what the answers say about it. Never changed: swapped whole."""

    classifier: OnnxClassifier
    name: str
    version: str | None
    alias: str | None
    run_id: str | None
    source: str
    lineage: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    promotion: dict[str, str] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    monitor: DriftMonitor | None = None  # drift windows of this version's traffic (serve.drift_window)


LINEAGE_TAGS = (
    "dvc_data_hash",
    "manifest_sha256",
    "data_source",
    "git_commit",
    "git_dirty",
    "model_name",
    "method",
)


# The server builds sessions with spinning=False: on 2 cores, idle onnxruntime threads that spin take
# the cores the decode threads need (measured at concurrency 8: +15-30 % images/s, p99 170 → 110 ms).


def _warm_up(classifier: OnnxClassifier, max_batch: int) -> None:
    """One inference per batch shape used, so that no request pays for onnxruntime's first run."""
    for n in sorted({1, max_batch}):
        classifier.logits(np.zeros((n, classifier.size, classifier.size, 3), dtype=np.uint8))


def load_file(path: Path, providers: list[str], max_batch: int, monitoring=None) -> LoadedModel:
    """An exported ONNX file; its lineage comes from the ONNX metadata. `monitoring(onnx path,
    classifier, version)` makes its drift monitor (or None)."""
    classifier = OnnxClassifier(path, providers, spinning=False)
    monitor = monitoring(classifier.path, classifier, None) if monitoring else None
    _warm_up(classifier, max_batch)
    meta = classifier.metadata
    lineage = {k: meta[k] for k in ("architecture", "data_sha256", "git_commit", "git_dirty") if k in meta}
    return LoadedModel(
        classifier=classifier,
        name=meta.get("architecture", classifier.path.stem),
        version=None,
        alias=None,
        run_id=meta.get("mlflow_run_id"),
        source=str(classifier.path),
        lineage=lineage,
        monitor=monitor,
    )


def _registry_details(tags: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(lineage, promotion) from a version's tags."""
    lineage = {k: tags[k] for k in LINEAGE_TAGS if k in tags}
    promotion = {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")}
    return lineage, promotion


def load_registered(
    name: str, version: str, alias: str | None, providers: list[str], max_batch: int, monitoring=None
):
    """Version `version` of a registered model, downloaded, loaded and warmed up."""
    from visiontune.components import tracking  # mlflow is imported only when the registry is used

    with tempfile.TemporaryDirectory(prefix="visiontune-serve-") as tmp:
        path, info = tracking.fetch_version(name, version, Path(tmp))
        classifier = OnnxClassifier(path, providers, spinning=False)  # onnxruntime keeps it in memory
        monitor = (
            monitoring(path, classifier, str(info.version)) if monitoring else None
        )  # reads its reference
    _warm_up(classifier, max_batch)
    meta = classifier.metadata
    lineage, promotion = _registry_details(info.tags)
    lineage.setdefault("architecture", meta.get("architecture", ""))
    return LoadedModel(
        classifier=classifier,
        name=name,
        version=info.version,
        alias=alias,
        run_id=info.run_id or meta.get("mlflow_run_id"),
        source=f"models:/{name}/{info.version}",
        lineage=lineage,
        metrics=info.metrics,
        promotion=promotion,
        monitor=monitor,
    )


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps in one process do not clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "visiontune_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "visiontune_request_seconds",
            "HTTP request latency by path",
            ["path"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch = Histogram(
            "visiontune_batch_size",
            "Images per onnxruntime call",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.inference = Histogram(
            "visiontune_inference_seconds",
            "Time of one onnxruntime call",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.images = Counter(
            "visiontune_images", "Images classified, by model version", ["model_version"], registry=r
        )
        self.model = Gauge(
            "visiontune_model_info",
            "The model being served (value 1)",
            ["name", "version", "run_id", "provider"],
            registry=r,
        )
        self.swaps = Counter("visiontune_model_swaps", "Models swapped in after the alias moved", registry=r)
        self.poll_errors = Counter(
            "visiontune_registry_poll_errors", "Failed alias polls or loads", registry=r
        )

    def serving(self, model: LoadedModel) -> None:
        self.model.clear()
        self.model.labels(model.name, model.version or "", model.run_id or "", model.classifier.provider).set(
            1
        )


# ---------------------------------------------------------------------------------------------
# Inference: one call per request, or gathered into batches


Infer = Callable[[LoadedModel, np.ndarray], Awaitable[np.ndarray]]


class Batcher:
    """Gathers concurrent requests' images into one onnxruntime call: up to `max_batch` images,
    waiting at most `max_wait_s` after the first. Images of different model versions (during a
    swap) are never mixed in one call."""

    def __init__(self, run: Infer, max_batch: int, max_wait_s: float, slots: int):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.pending: list[tuple[LoadedModel, np.ndarray, asyncio.Future]] = []
        self.slots = asyncio.Semaphore(slots)  # onnxruntime calls in flight
        self.arrived, self.full = asyncio.Event(), asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((model, pixels, future))
        self.arrived.set()
        if sum(len(p) for _, p, _ in self.pending) >= self.max_batch:
            self.full.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            if self.max_wait_s > 0 and sum(len(p) for _, p, _ in self.pending) < self.max_batch:
                self.full.clear()
                try:  # waiting on an Event is safe to time out: no item is lost
                    await asyncio.wait_for(self.full.wait(), self.max_wait_s)
                except asyncio.TimeoutError:
                    pass
            model = self.pending[0][0]
            group, n, rest = [], 0, []
            for item in self.pending:
                if item[0] is model and (n == 0 or n + len(item[1]) <= self.max_batch):
                    group.append(item)
                    n += len(item[1])
                else:
                    rest.append(item)
            self.pending = rest
            if not rest:
                self.full.clear()
            loop.create_task(self._run(model, group))

    async def _run(self, model: LoadedModel, group) -> None:
        try:
            logits = await self.run(model, np.concatenate([p for _, p, _ in group]))
        except Exception as exc:  # each waiting request gets the error, the loop goes on
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self.slots.release()
        offset = 0
        for _, pixels, future in group:
            if not future.done():  # a client that went away
                future.set_result(logits[offset : offset + len(pixels)])
            offset += len(pixels)


# ---------------------------------------------------------------------------------------------
# The server's state: the current model, the pools, the registry follower


class Server:
    """Owns the current model and swaps it whole; requests take one reference and keep it."""

    def __init__(self, cfg: ServeConfig, max_pixels: int, drift_cfg: DriftConfig | None = None):
        self.cfg, self.max_pixels = cfg, max_pixels
        images.set_decode_budget(cfg.max_decode_mb, "serve.max_decode_mb")
        self.ref = ModelRef.parse(cfg.model)
        self.providers = execution_providers(cfg.device)
        self.metrics = Metrics()
        self.drift_gauges = DriftGauges(self.metrics.registry)
        self.drift_cfg = drift_cfg or DriftConfig()
        self.current: LoadedModel | None = None
        self.decode_pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode")
        self.infer_pool = ThreadPoolExecutor(cfg.inference_threads, thread_name_prefix="infer")
        self.batcher: Batcher | None = None
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._failed_version: str | None = None  # a version that would not load: not retried

    def load(self) -> LoadedModel:
        """Load the model --model names (blocking); the registry alias is resolved once here."""
        ref = self.ref
        if ref.path is not None:
            model = load_file(ref.path, self.providers, self.cfg.max_batch, self.monitoring)
        else:
            if ref.alias is not None:
                from visiontune.components import tracking

                version = tracking.alias_version(ref.name, ref.alias).version
            else:
                version = ref.version
            model = load_registered(
                ref.name, version, ref.alias, self.providers, self.cfg.max_batch, self.monitoring
            )
        self._swap(model)
        return model

    def monitoring(self, onnx: Path, classifier: OnnxClassifier, version: str | None):
        """The drift monitor of a model being loaded (None when serve.drift_window is 0 or the model
        has no embedding output or reference)."""
        return DriftMonitor.for_model(
            onnx, classifier, self.cfg.drift_window, self.drift_cfg, self.drift_gauges, version
        )

    def _swap(self, model: LoadedModel) -> None:
        previous = self.current
        self.current = model  # one reference assignment: requests see the old model or the new one
        self.metrics.serving(model)
        if previous is not None and previous.monitor is not None:
            previous.monitor.close()  # its queued checks are of a version no longer served

    def poll_once(self) -> bool:
        """Check the alias; load, warm up and swap in a new version. True when it swapped."""
        from visiontune.components import tracking

        found = tracking.alias_version(self.ref.name, self.ref.alias)
        version, current = found.version, self.current
        if current is not None and version == current.version:
            lineage, promotion = _registry_details(found.tags)
            if promotion != current.promotion:  # tags written after the alias moved (promote does so)
                lineage = {**current.lineage, **lineage}
                self.current = dataclasses.replace(current, lineage=lineage, promotion=promotion)
            return False
        if version == self._failed_version:
            return False
        started = time.perf_counter()
        try:
            model = load_registered(
                self.ref.name, version, self.ref.alias, self.providers, self.cfg.max_batch, self.monitoring
            )
        except Exception:
            self._failed_version = version
            raise
        self._failed_version = None
        self._swap(model)
        self.metrics.swaps.inc()
        log.info(
            "%s now points at version %s (run %s): loaded, warmed up and swapped in %.2f s; was version %s",
            self.ref.uri,
            model.version,
            model.run_id,
            time.perf_counter() - started,
            current.version if current else None,
        )
        return True

    def _follow(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.poll_once()
            except Exception as exc:  # registry down or a bad version: keep serving the current one
                self.metrics.poll_errors.inc()
                log.warning(
                    "polling %s failed, still serving version %s: %s",
                    self.ref.uri,
                    self.current.version if self.current else None,
                    exc,
                )

    def start(self) -> None:
        if self.cfg.max_batch > 1:
            self.batcher = Batcher(
                self._infer_now, self.cfg.max_batch, self.cfg.max_wait_ms / 1000, self.cfg.inference_threads
            )
            self.batcher.start()
        if self.ref.alias is not None:
            self._follower = threading.Thread(target=self._follow, name="registry-follower", daemon=True)
            self._follower.start()

    async def stop(self) -> None:
        self._stop.set()
        if self.batcher is not None:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.infer_pool.shutdown(wait=False, cancel_futures=True)

    def _timed_logits(self, model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        if model.monitor is None:
            logits = model.classifier.logits(pixels)
        else:  # the same single run of the model, with its embedding output kept
            logits, embeddings = model.classifier.logits_and_embeddings(pixels)
            model.monitor.add(logits, embeddings)
        self.metrics.inference.observe(time.perf_counter() - started)
        self.metrics.batch.observe(len(pixels))
        return logits

    async def _infer_now(self, model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.infer_pool, self._timed_logits, model, pixels)

    async def infer(self, model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        if self.batcher is not None:
            return await self.batcher.submit(model, pixels)
        return await self._infer_now(model, pixels)

    def decode(self, data: bytes, name: str, size: int) -> np.ndarray:
        """Encoded bytes → uint8 HWC at the model's size, through the shared preprocessing path."""
        if not data:
            raise ServeError(422, "empty_image", f"{name}: empty file (0 bytes); send the image's bytes")
        try:
            return images.load_resized(data, size, self.max_pixels, name=name)
        except images.DecodeBudgetError as exc:
            raise ServeError(413, "too_large_to_decode", str(exc)) from None
        except images.ImageTooLargeError as exc:
            raise ServeError(
                413, "too_many_pixels", f"{exc} (the server's limit is validate.max_pixels)"
            ) from None
        except images.ImageFormatError as exc:
            raise ServeError(415, "unsupported_image_format", str(exc)) from None
        except images.ImageDecodeError as exc:
            raise ServeError(
                422, "undecodable_image", f"{exc}; send a JPEG, PNG, WebP, BMP or TIFF"
            ) from None
        except Exception as exc:  # Pillow raises odd types on hostile files; still the client's input
            reason = f"{name}: cannot decode ({type(exc).__name__}: {exc})"
            raise ServeError(422, "undecodable_image", reason) from None


class ServeError(Exception):
    """A request the server refuses: HTTP status, a short code, and a message naming the problem."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
