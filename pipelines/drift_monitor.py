"""Drift monitoring inside `visiontune serve`: the served images, in windows of serve.drift_window,
tested against the served version's val-split reference (components/drift.py).

Inference hands each batch's softmax outputs and embeddings to `DriftMonitor.add` (an append under
a lock); a full window is checked on one background thread, so requests never wait for a check. A
window that fills while two checks are still queued is counted as skipped, not checked late.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from visiontune.components import drift, metrics
from visiontune.components.config import DriftConfig
from visiontune.components.errors import VisiontuneError

log = logging.getLogger("visiontune.serve")
KEPT = 20  # latest windows /v1/drift lists
MAX_QUEUED = 2  # full windows waiting for a check before the next one is skipped


class DriftMonitor:
    """Windows of one model version's traffic, each checked against its reference."""

    def __init__(
        self, reference: drift.Reference, window: int, cfg: DriftConfig, gauges, version: str | None
    ):
        self.reference, self.window, self.cfg, self.gauges, self.version = (
            reference,
            window,
            cfg,
            gauges,
            version,
        )
        self._lock = threading.Lock()
        self._probs: list[np.ndarray] = []
        self._embeddings: list[np.ndarray] = []
        self._buffered = 0
        self._queued = 0
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="drift-check")
        self.windows: deque[dict] = deque(maxlen=KEPT)
        self.skipped = 0
        self._closed = False  # swapped out: requests still in flight on this version are not windowed

    @classmethod
    def for_model(cls, onnx: Path, classifier, window: int, cfg: DriftConfig, gauges, version: str | None):
        """A monitor for a loaded model, or None (logged) when monitoring is off or impossible."""
        from visiontune.components.drift_report import reference_beside

        if window <= 0:
            return None
        if not classifier.has_embedding:
            log.warning("drift monitoring off: %s has no embedding output (export it again)", onnx)
            return None
        try:
            reference = drift.Reference.load(reference_beside(onnx))
        except VisiontuneError as exc:
            log.warning("drift monitoring off: %s", exc)
            return None
        return cls(reference, window, cfg, gauges, version)

    def add(self, logits: np.ndarray, embeddings: np.ndarray) -> None:
        """Take one inference batch; hand every full window to the checking thread."""
        probs = metrics.softmax(logits.astype(np.float64))
        names = self.reference.class_names
        for cls_index, count in zip(*np.unique(probs.argmax(1), return_counts=True), strict=True):
            self.gauges.predicted.labels(names[cls_index]).inc(int(count))
        full = []
        with self._lock:
            if self._closed:
                return
            self._probs.append(probs)
            self._embeddings.append(np.asarray(embeddings, dtype=np.float32))
            self._buffered += len(probs)
            while self._buffered >= self.window:
                p, e = np.concatenate(self._probs), np.concatenate(self._embeddings)
                full.append((p[: self.window], e[: self.window]))
                self._probs, self._embeddings = [p[self.window :]], [e[self.window :]]
                self._buffered -= self.window
            for item in full:
                if self._queued >= MAX_QUEUED:
                    self.skipped += 1
                    self.gauges.skipped.inc()
                    continue
                self._queued += 1
                self._checks.submit(self._check, *item)

    def _check(self, probs: np.ndarray, embeddings: np.ndarray) -> None:
        try:
            started = time.perf_counter()
            result = drift.check(self.reference, embeddings, probs, self.cfg.alpha, self.cfg.permutations)
            seconds = time.perf_counter() - started
            self._record(result, probs, seconds)
        except Exception:  # a check must never take the server down
            log.exception("drift check failed")
        finally:
            with self._lock:
                self._queued -= 1

    def _record(self, result: drift.DriftResult, probs: np.ndarray, seconds: float) -> None:
        g = self.gauges
        for name, t in result.tests.items():
            g.p_value.labels(name).set(t.p_value)
            g.statistic.labels(name).set(t.statistic)
        g.flag.set(float(result.drift))
        g.windows.labels("shift" if result.drift else "no_shift").inc()
        counts = np.bincount(probs.argmax(1), minlength=len(self.reference.class_names))
        summary = {
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": self.version,
            "seconds": round(seconds, 3),
            "predicted_counts": dict(zip(self.reference.class_names, counts.tolist(), strict=True)),
            **{k: v for k, v in result.to_dict().items() if k not in ("most_shifted", "shift_scores")},
        }
        self.windows.append(summary)
        if result.drift:
            log.warning(
                "drift: the last %d images differ from the reference (p = %.3g; %s)",
                result.window, result.p_value, ", ".join(result.fired),
            )  # fmt: skip

    def state(self) -> dict:
        """What GET /v1/drift answers: the window size, how full the next one is, the latest windows."""
        with self._lock:
            buffered = self._buffered
        return {
            "enabled": True,
            "version": self.version,
            "window": self.window,
            "alpha": self.cfg.alpha,
            "images_in_next_window": buffered,
            "skipped_windows": self.skipped,
            "windows": list(self.windows)[::-1],  # newest first
        }

    def close(self) -> None:
        """Stop taking images (requests still running on this version may call add) and drop the
        queued checks: they are of a version no longer served."""
        with self._lock:
            self._closed = True
        self._checks.shutdown(wait=False, cancel_futures=True)


class DriftGauges:
    """The Prometheus side of monitoring, registered once per app."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge

        r = registry
        self.p_value = Gauge(
            "visiontune_drift_p_value", "p-value of each test on the last window", ["test"], registry=r
        )
        self.statistic = Gauge(
            "visiontune_drift_statistic", "Statistic of each test on the last window", ["test"], registry=r
        )
        self.flag = Gauge("visiontune_drift", "1 when the last window was flagged as shifted", registry=r)
        self.windows = Counter(
            "visiontune_drift_windows", "Windows checked, by outcome", ["result"], registry=r
        )
        self.skipped = Counter(
            "visiontune_drift_windows_skipped", "Full windows not checked (checks behind)", registry=r
        )
        self.predicted = Counter(
            "visiontune_predicted_class", "Served images by predicted class", ["label"], registry=r
        )
