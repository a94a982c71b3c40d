"""export stage: ONNX with a dynamic batch axis, checked by onnx.checker and onnxruntime parity.

Run as `visiontune export` or called by the flow and tests. Export is never unchecked: a file
that fails the checker or the parity test is not left behind as model.onnx.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import manifest
from . import model as models
from .config import ExportConfig
from .errors import VisiontuneError
from .evaluate import batches


class ParityError(VisiontuneError, RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    onnx: str
    opset: int
    max_abs_diff: float
    top1_agreement: float
    images_checked: int


def onnx_logits(path: Path, batch_iter) -> np.ndarray:
    """Logits from an ONNX model on CPU for normalized NCHW batches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x})[0] for x in batch_iter]
    return np.concatenate(outs)


def export(cfg: ExportConfig, prepared: Path, checkpoint: Path, out: Path) -> ExportResult:
    """Write out/model.onnx and out/export.json after checker and parity on the test split."""
    out.mkdir(parents=True, exist_ok=True)
    model, meta = models.load_checkpoint(checkpoint)
    prep = models.preprocessing_of(meta)
    dummy = torch.zeros(1, 3, prep.size, prep.size)
    tmp = out / "model.onnx.tmp"
    # dynamo=False: one self-contained file with a dynamic batch axis (the dynamo exporter
    # writes external weights and fixes opset 18)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=cfg.opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(tmp))
    for key, value in {
        "class_names": json.dumps(meta["class_names"]),
        "mean": json.dumps(list(prep.mean)),
        "std": json.dumps(list(prep.std)),
        "image_size": str(prep.size),
        "architecture": meta["architecture"],
    }.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)

    frame = manifest.read(prepared / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    batch_list = list(batches(paths, prep.size, prep.mean, prep.std, 64))
    ref = models.predict_logits(model, iter(batch_list))
    got = onnx_logits(tmp, batch_list)
    max_diff = float(np.abs(ref - got).max())
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    if max_diff > cfg.atol or agreement < 1.0:
        raise ParityError(
            f"{tmp}: onnxruntime differs from PyTorch on {len(paths)} test images: max abs logit "
            f"difference {max_diff:.2e} (export.atol {cfg.atol:.0e}), top-1 agreement {agreement:.4f}"
        )
    final = out / "model.onnx"
    tmp.replace(final)
    result = ExportResult(
        onnx=str(final),
        opset=cfg.opset,
        max_abs_diff=max_diff,
        top1_agreement=agreement,
        images_checked=len(paths),
    )
    (out / "export.json").write_text(json.dumps(asdict(result), indent=2))
    return result
