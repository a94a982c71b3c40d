"""export stage: ONNX with a dynamic batch axis, checked by onnx.checker and onnxruntime parity,
and hf/, the Hugging Face Hub folder (components/hub.py).

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

from . import hub, manifest
from . import model as models
from .config import ExportConfig
from .errors import VisiontuneError
from .evaluate import batches
from .images import sha256_file


class ParityError(VisiontuneError, RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


class QuantizationError(VisiontuneError, RuntimeError):
    """The quantized model lost more accuracy than export.max_accuracy_drop allows."""


@dataclass(frozen=True)
class ExportResult:
    onnx: str
    opset: int
    max_abs_diff: float
    top1_agreement: float
    images_checked: int
    test_accuracy: float
    quantized: str | None = None
    quantized_accuracy: float | None = None
    accuracy_change: float | None = None
    size_bytes: int = 0
    quantized_size_bytes: int | None = None
    drift_reference: str | None = None  # drift_reference.npz beside model.onnx (components/drift.py)
    drift_reference_note: str | None = None  # why there is none, when there is none
    hf: str | None = None  # the Hub folder (timm's format, model card, LoRA adapter)
    hf_note: str | None = None  # why it holds no weights, when it holds none


REFERENCE_FILE = "drift_reference.npz"


class _WithEmbedding(torch.nn.Module):
    """The model with its penultimate-layer embedding as a second output (for drift detection)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return models.logits_and_embedding(self.model, x)


class _Calibration:
    """onnxruntime's calibration reader over normalized batches of train images."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def check_accuracy_drop(cfg: ExportConfig, fp32_accuracy: float, quantized_accuracy: float) -> None:
    """Refuse a quantized model that lost more test accuracy than export.max_accuracy_drop."""
    drop = fp32_accuracy - quantized_accuracy
    if drop > cfg.max_accuracy_drop:
        raise QuantizationError(
            f"export.quantize={cfg.quantize}: test accuracy {quantized_accuracy:.4f} against "
            f"{fp32_accuracy:.4f} in fp32 (a drop of {drop:.4f} > export.max_accuracy_drop="
            f"{cfg.max_accuracy_drop}); the fp32 model.onnx is kept; use another export.quantize "
            "or allow a larger drop"
        )


def quantize(kind: str, fp32: Path, calibration: list[np.ndarray], out: Path) -> Path:
    """An int8 (static, QDQ, per-channel, calibrated) or fp16 copy of the model; metadata kept."""
    source = onnx.load(str(fp32))
    target = out / f"model.{kind}.onnx"
    if kind == "int8":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = out / "model.int8-pre.onnx"
        # folds batch norm into convs before calibration; auto_merge: the linear probe's concatenated
        # levels give symbolic shape inference two names for one batch axis, and it stops without it
        quant_pre_process(str(fp32), str(prepared), auto_merge=True)
        reader = _Calibration(source.graph.input[0].name, calibration)
        try:
            # symmetric int8 activations: asymmetric uint8 ones cost digits 75 points of accuracy
            quantize_static(
                str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True},
            )  # fmt: skip
        finally:
            prepared.unlink(missing_ok=True)
        quantized = onnx.load(str(target))
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        quantized = convert_float_to_float16(source, keep_io_types=True)  # float32 in and out
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)
    onnx.save(quantized, str(target))
    return target


def onnx_logits(path: Path, batch_iter) -> np.ndarray:
    """Logits from an ONNX model on CPU for normalized NCHW batches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x})[0] for x in batch_iter]
    return np.concatenate(outs)


def _onnx_export(model: torch.nn.Module, size: int, opset: int, path: Path) -> bool:
    """ONNX with outputs `logits` and, where the model has one linear classifier, `embedding`
    (what it reads); a dynamic batch axis. True when the embedding is there."""
    dummy = torch.zeros(1, 3, size, size)
    try:
        with torch.no_grad():
            models.logits_and_embedding(model, dummy)
        traced, names = _WithEmbedding(model), ["logits", "embedding"]
    except VisiontuneError:
        traced, names = model, ["logits"]
    # dynamo=False: one self-contained file with a dynamic batch axis (the dynamo exporter
    # writes external weights and fixes opset 18)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            traced,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=names,
            dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in names}},
        )
    return len(names) == 2


@torch.no_grad()
def _drift_reference(model, frame, meta: dict, prep, out: Path) -> tuple[Path | None, str | None]:
    """out/drift_reference.npz from the val split's embeddings and softmax outputs (not train's:
    a model is overconfident on what it trained on; the test split tops up a val split of fewer
    than 4 images); (None, why) when even both are too few."""
    from . import drift

    paths = frame.loc[frame["split"] == "val", "path"].tolist()
    if len(paths) < 4:
        paths += frame.loc[frame["split"] == "test", "path"].tolist()
    if len(paths) < 4:
        return None, f"{len(paths)} val and test images: too few for a drift reference (at least 4)"
    logits, embeddings = [], []
    for x in batches(paths, prep.size, prep.mean, prep.std, 64):
        lg, emb = models.logits_and_embedding(model, torch.from_numpy(x))
        logits.append(lg.float().numpy())
        embeddings.append(emb.float().numpy())
    from .metrics import softmax

    probs = softmax(np.concatenate(logits).astype(np.float64))
    reference = drift.build_reference(np.concatenate(embeddings), probs, meta["class_names"])
    return reference.save(out / REFERENCE_FILE), None


def export(
    cfg: ExportConfig,
    prepared: Path,
    checkpoint: Path,
    out: Path,
    evaluation: Path | None = None,
    validation: Path | None = None,
    data_hash: str = "",
) -> ExportResult:
    """Write out/model.onnx and out/export.json after checker and parity on the test split, the
    drift reference, the quantized copy (export.quantize), then out/hf, the Hub folder, whose card
    reads the evaluate and validate folders when given."""
    from .tracking import lineage

    out.mkdir(parents=True, exist_ok=True)
    model, meta = models.load_checkpoint(checkpoint)
    prep = models.preprocessing_of(meta)
    code = lineage()
    tmp = out / "model.onnx.tmp"
    with_embedding = _write_checked_onnx(model, meta, prep, cfg.opset, code, prepared, tmp)

    frame = manifest.read(prepared / "manifest.csv")
    test = frame[frame["split"] == "test"]
    batch_list = list(batches(test["path"].tolist(), prep.size, prep.mean, prep.std, 64))
    parity = _parity(cfg, model, tmp, batch_list)
    final = out / "model.onnx"
    tmp.replace(final)  # only a checked file becomes model.onnx

    (out / REFERENCE_FILE).unlink(missing_ok=True)  # never a reference from an earlier model
    reference, note = _drift_reference(model, frame, meta, prep, out) if with_embedding else (None, None)
    if not with_embedding:
        note = f"{meta['architecture']}: no single-layer classifier, so no embedding output"
    index = {name: i for i, name in enumerate(meta["class_names"])}
    y_test = test["label"].map(index).to_numpy()
    accuracy = float((parity.pop("logits").argmax(1) == y_test).mean())
    quantized = _quantized_copy(cfg, final, frame, prep, batch_list, y_test, accuracy, out)

    facts = hub.CardFacts.read(prepared, evaluation, validation, data_hash, cfg.license, code)
    folder = hub.write_folder(model, meta, checkpoint, out / hub.HF_DIR, facts)
    result = ExportResult(
        onnx=str(final),
        opset=cfg.opset,
        **parity,
        images_checked=len(test),
        test_accuracy=accuracy,
        size_bytes=final.stat().st_size,
        drift_reference=str(reference) if reference else None,
        drift_reference_note=note,
        hf=folder.path,
        hf_note=folder.note,
        **quantized,
    )
    (out / "export.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _write_checked_onnx(model, meta: dict, prep, opset: int, code: dict, prepared: Path, path: Path) -> bool:
    """The ONNX file at path with what a server needs in its metadata (class names, preprocessing,
    the manifest's sha256, the code version), passed by onnx.checker. True when it has the
    embedding output."""
    with_embedding = _onnx_export(model, prep.size, opset, path)
    proto = onnx.load(str(path))
    for key, value in {
        "class_names": json.dumps(meta["class_names"]),
        "mean": json.dumps(list(prep.mean)),
        "std": json.dumps(list(prep.std)),
        "image_size": str(prep.size),
        "image_size_reason": meta.get("image_size_reason", "model.image_size"),
        "architecture": meta["architecture"],
        "data_sha256": sha256_file(prepared / "manifest.csv"),  # the manifest it was trained on
        **code,  # git commit and dirty flag; the MLflow run id is added when registered
    }.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return with_embedding


def _parity(cfg: ExportConfig, model, path: Path, batch_list: list[np.ndarray]) -> dict:
    """onnxruntime's logits against PyTorch's on the test batches (check_parity); the figures, and
    onnxruntime's logits under "logits"."""
    ref = models.predict_logits(model, iter(batch_list))
    got = onnx_logits(path, batch_list)
    return {**check_parity(ref, got, cfg.atol, path), "logits": got}


def check_parity(ref: np.ndarray, got: np.ndarray, atol: float, path: Path) -> dict[str, float]:
    """ParityError when a logit differs by more than atol (per unit of the largest logit) or any
    top-1 answer changes, however small the difference; else the max difference and the agreement."""
    max_diff = float(np.abs(ref - got).max())
    # float error grows with the logits' scale: atol holds per unit of the largest logit (at least 1)
    allowed = atol * max(1.0, float(np.abs(ref).max()))
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    if max_diff > allowed or agreement < 1.0:
        raise ParityError(
            f"{path}: onnxruntime differs from PyTorch on {len(ref)} test images: max abs logit "
            f"difference {max_diff:.2e} (allowed {allowed:.2e}: export.atol {atol:.0e} × the largest "
            f"logit), top-1 agreement {agreement:.4f}"
        )
    return {"max_abs_diff": max_diff, "top1_agreement": agreement}


def _quantized_copy(
    cfg: ExportConfig, final: Path, frame, prep, batch_list, y_test, accuracy, out: Path
) -> dict:
    """model.int8.onnx or model.fp16.onnx beside final (export.quantize), refused (and removed)
    when it loses more test accuracy than export.max_accuracy_drop; its ExportResult fields."""
    for stale in out.glob("model.*.onnx"):
        stale.unlink()
    if cfg.quantize == "none":
        return {}
    train_paths = frame.loc[frame["split"] == "train", "path"].tolist()[: cfg.calibration_images]
    calibration = list(batches(train_paths, prep.size, prep.mean, prep.std, 16))
    small = quantize(cfg.quantize, final, calibration, out)
    q_accuracy = float((onnx_logits(small, batch_list).argmax(1) == y_test).mean())
    try:
        check_accuracy_drop(cfg, accuracy, q_accuracy)
    except QuantizationError:
        small.unlink()
        raise
    return {
        "quantized": str(small),
        "quantized_accuracy": q_accuracy,
        "accuracy_change": q_accuracy - accuracy,
        "quantized_size_bytes": small.stat().st_size,
    }
