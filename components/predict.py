"""Prediction with an exported ONNX model, through the same preprocessing as training.

The model file carries its own class names, mean, std and input size (ONNX metadata), so nothing
else is needed to predict. Used by `visiontune predict`; imported, never run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import images, metrics
from .errors import VisiontuneError


def execution_providers(device: str = "cpu") -> list[str]:
    """onnxruntime providers for 'cpu', 'cuda' (an error when absent) or 'auto' (CUDA when present)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise VisiontuneError(
            f"serve.device: cuda, but onnxruntime offers only {available}; install onnxruntime-gpu "
            "in place of onnxruntime, or set serve.device: auto"
        )
    return ["CPUExecutionProvider"]


class OnnxClassifier:
    """An exported model on onnxruntime (CPU unless another provider is asked for)."""

    def __init__(self, path: Path, providers: list[str] | None = None, spinning: bool = True):
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise VisiontuneError(f"{path}: no ONNX model here; run `visiontune export` or pass --model")
        options = ort.SessionOptions()
        if not spinning:  # idle intra-op threads sleep instead of spinning: the cores go to decoding
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's protobuf, graph and load failures, each its own class
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise VisiontuneError(
                f"{path}: not a loadable ONNX model ({detail}); the file is truncated, corrupt or not "
                "ONNX: export it again (`visiontune export`) or pass the right --model"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = {"class_names", "mean", "std", "image_size"} - set(meta)
        if missing:
            raise VisiontuneError(f"{path}: ONNX metadata lacks {sorted(missing)}; export it with visiontune")
        self.path = path
        self.metadata: dict[str, str] = dict(meta)
        try:
            self.class_names: list[str] = json.loads(meta["class_names"])
            self.mean, self.std = json.loads(meta["mean"]), json.loads(meta["std"])
            self.size = int(meta["image_size"])
        except ValueError as exc:
            raise VisiontuneError(
                f"{path}: ONNX metadata class_names, mean, std or image_size is not what visiontune "
                f"writes ({exc}); export it again with visiontune"
            ) from None
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]  # logits[, embedding]

    @property
    def provider(self) -> str:
        """The execution provider the session runs on (CUDA falls back to CPU when no GPU answers)."""
        return self.session.get_providers()[0]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for a uint8 NHWC batch already resized to the model's size."""
        return self.session.run(
            self.outputs[:1], {self.input: images.normalize(pixels, self.mean, self.std)}
        )[0]

    @property
    def has_embedding(self) -> bool:
        """Exported with its penultimate-layer embedding as a second output (drift detection)."""
        return "embedding" in self.outputs

    def logits_and_embeddings(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, embeddings) of a uint8 NHWC batch, from one run of the model."""
        if not self.has_embedding:
            raise VisiontuneError(
                f"{self.path}: exported without an embedding output, so drift cannot be checked; "
                "export it again with this visiontune (`visiontune export`)"
            )
        feed = {self.input: images.normalize(pixels, self.mean, self.std)}
        logits, embeddings = self.session.run(["logits", "embedding"], feed)
        return logits, embeddings

    def predict(self, paths: list[str], top_k: int = 1, batch_size: int = 32) -> list[dict]:
        """One result per file: the top-k labels with probabilities, or the reason it was unreadable."""
        results: list[dict] = []
        k = min(top_k, len(self.class_names))
        for start in range(0, len(paths), batch_size):
            chunk, pixels = [], []
            for path in paths[start : start + batch_size]:
                try:
                    pixels.append(images.load_resized(path, self.size))
                    chunk.append(path)
                except images.ImageDecodeError as exc:
                    results.append({"path": str(path), "error": str(exc)})
            if not chunk:
                continue
            logits = self.logits(np.stack(pixels))
            for path, ranked in zip(chunk, self.rank(logits, k), strict=True):
                results.append({"path": str(path), **ranked})
        return results

    def rank(self, logits: np.ndarray, top_k: int = 1) -> list[dict]:
        """Per row of logits: the top label, its probability, and the top-k labels with probabilities."""
        k = max(1, min(top_k, len(self.class_names)))
        out = []
        for p in metrics.softmax(logits):
            order = np.argsort(-p)[:k]
            out.append(
                {
                    "label": self.class_names[order[0]],
                    "confidence": float(p[order[0]]),
                    "top_k": [{"label": self.class_names[i], "probability": float(p[i])} for i in order],
                }
            )
        return out


def collect(inputs: list[str]) -> list[str]:
    """Image files named directly, plus the image files under the named folders (sorted)."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in images.IMAGE_EXTENSIONS
            )
        elif path.exists():
            found.append(str(path))
        else:
            raise VisiontuneError(f"{path}: no such file or folder")
    return found
