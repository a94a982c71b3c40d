"""Typed, frozen configuration: one model per params.yaml section.

Imported by the CLI and the Prefect flow, which parse params.yaml once at the entry point;
nothing below them sees a raw dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import VisiontuneError


class Section(BaseModel):
    """A params.yaml section: immutable, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseConfig(Section):
    seed: int = 0


class DataConfig(Section):
    # 'builtin:digits', an image folder (<root>/<class>/...), or a CSV (path,label[,split])
    source: str = "builtin:digits"
    image_column: str = Field("image", description="a Hugging Face dataset source's image column")
    label_column: str = Field(
        "label", description="a Hugging Face dataset source's label column (ClassLabel names are used)"
    )
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    min_eval_per_class: int = Field(5, ge=0)  # val and test floor per class, capped at a sixth of it each

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 to leave training images")
        return self


class ValidateConfig(Section):
    min_per_class: int = Field(5, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)  # Pillow's decompression-bomb default
    max_imbalance_ratio: float = Field(20.0, ge=1)  # largest class / smallest class, in images
    max_label_issue_fraction: float = Field(0.1, ge=0, le=1)  # share of images the audit flags
    allow_leakage: bool = False  # val/test images with an exact or near duplicate in train
    near_duplicate_distance: int = Field(6, ge=0, le=64)  # pHash bits a candidate pair may differ in
    # a candidate is confirmed when its standardized 16×16 grayscale thumbnails differ by at most this
    near_duplicate_pixel_distance: float = Field(0.08, ge=0)
    label_audit: bool = True
    # beyond the estimated number of wrong labels, flag an image whose label is wrong with this probability
    audit_flag_probability: float = Field(0.5, gt=0, le=1)
    audit_folds: int = Field(5, ge=2)
    classes: list[str] | None = None  # the known labels; any other label is a schema error
    on_fail: Literal["error", "warn"] = "error"


class ModelConfig(Section):
    name: str = "tf_efficientnet_lite0"  # any timm model name
    # auto: chosen from the data (components/model.choose_image_size); None: the model's native size
    image_size: Annotated[int, Field(ge=16)] | Literal["auto"] | None = "auto"
    pretrained: bool = True
    weights: str | None = None  # local weights file (.safetensors, .pth, .bin) for model.name


class LoraConfig(Section):
    r: int = Field(4, ge=1)  # rank of each low-rank update
    alpha: float = Field(8.0, gt=0)  # scale = alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: ViT attention qkv+proj; CNN 1×1 convs and linears
    include_mlp: bool = False  # ViT: also adapt the MLP (fc1, fc2)


class TrainConfig(Section):
    method: Literal["full", "linear", "lora"] = "full"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)  # optimizer step every this many batches
    lr: float | None = Field(None, gt=0)  # backbone lr (AdamW); None: the method's default below
    head_lr_scale: float = Field(3.0, gt=0)  # the new head learns this many times faster
    layer_decay: float | None = Field(None, gt=0, le=1)  # lr × decay^depth from the head down
    freeze: int = Field(0, ge=0)  # groups frozen from the stem: 1 = stem, 2 = stem + first stage, …
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    clip_grad_norm: float | None = Field(None, gt=0)
    imbalance: Literal["none", "weights", "sampler"] = "none"
    patience: int = Field(3, ge=1)  # epochs without val-loss improvement before stopping
    min_delta: float = Field(0.0, ge=0)
    hflip: bool = False  # off by default: mirrored digits, text or scans change class
    crop_scale: float = Field(0.8, gt=0, le=1)  # smallest random-crop area kept, as a fraction
    color_jitter: float = Field(0.1, ge=0, le=1)  # brightness/contrast/saturation strength
    mixup: float = Field(0.0, ge=0)  # Beta(alpha, alpha) mixup; 0 = off
    randaugment: int = Field(0, ge=0)  # RandAugment operations per image (magnitude 9); 0 = off
    probe_levels: int = Field(3, ge=0)  # linear: also read the last N stages/blocks; 0 = final features only
    lora: LoraConfig = LoraConfig()
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # the device policy; auto resolves per model family, image size and device (components/policy.py)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype of forward passes
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    cudnn_benchmark: bool | Literal["auto"] = "auto"  # cuDNN autotuning, with fixed batch shapes
    fused_optimizer: bool | Literal["auto"] = "auto"  # AdamW's fused CUDA kernel
    compile: bool = False  # torch.compile the model (slow to start; pays off on long GPU runs)
    deterministic: bool = False  # deterministic kernels (slower on GPU)
    nproc: int = Field(1, ge=1)  # data-parallel processes (torchrun); batch_size stays the global batch
    dist_timeout_s: float = Field(300, gt=0)  # a collective waiting longer than this fails the run

    @model_validator(mode="before")
    @classmethod
    def _earlier_keys(cls, raw: Any) -> Any:
        """params.yaml files from before the device policy: bf16 and channels_last still read."""
        if isinstance(raw, dict) and ("bf16" in raw or "channels_last" in raw):
            raw = dict(raw)
            if raw.pop("bf16", True) is False:
                raw.setdefault("precision", "fp32")
            if raw.pop("channels_last", True) is False:
                raw.setdefault("memory_format", "contiguous")
        return raw

    @property
    def base_lr(self) -> float:
        """train.lr, or the method's default: LoRA's low-rank updates want a larger step."""
        return self.lr if self.lr is not None else {"full": 1e-3, "linear": 1e-3, "lora": 3e-3}[self.method]


class EvaluateConfig(Section):
    batch_size: int = Field(64, ge=1)
    top_k: int = Field(5, ge=1)  # top-k accuracy
    gallery: int = Field(24, ge=0)  # misclassified test images shown, most confident first


class ExportConfig(Section):
    opset: int = Field(17, ge=17)
    atol: float = Field(1e-4, gt=0)  # max abs logit difference (ORT vs torch) per unit of the largest logit
    quantize: Literal["none", "int8", "fp16"] = "none"  # an extra, smaller model beside the fp32 one
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)  # test accuracy the quantized model may lose
    calibration_images: int = Field(200, ge=1)  # train images that calibrate int8 activations
    license: str | None = Field(
        None,
        description="The Hub model card's license (a Hub license id: apache-2.0, mit, cc-by-4.0, "
        "other, ...); null: the license timm lists for the base weights, else `other`.",
    )


class RegisterConfig(Section):
    model_name: str = "visiontune-classifier"
    experiment: str = "visiontune"
    alias: str = "candidate"
    metric: str = "test_accuracy"  # promotion compares candidate and champion on this metric
    greater_is_better: bool = True
    min_improvement: float = Field(0.0, ge=0)  # the candidate must beat the champion by this much
    min_metrics: dict[str, float] = {}  # floors any champion must clear, e.g. {test_macro_f1: 0.9}
    auto_promote: bool = False  # promote right after registering when the gate passes
    use_stages: bool = True  # also move legacy registry stages (Staging → Production, Archived)


class FlowTimeouts(Section):
    """Minutes each stage may run as a Prefect task before it is stopped and the flow fails."""

    prepare: float = Field(120, gt=0)
    validate_: float = Field(120, gt=0, alias="validate")
    train: float = Field(24 * 60, gt=0)
    evaluate: float = Field(60, gt=0)
    export: float = Field(30, gt=0)
    register_: float = Field(15, gt=0, alias="register")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def seconds(self, stage: str) -> float:
        return 60 * self.model_dump(by_alias=True)[stage]


class FlowConfig(Section):
    """How the Prefect flow runs the stages; `dvc repro` ignores this section."""

    cache: bool = True  # skip a stage whose inputs (data, params section, code) are unchanged
    retries: int = Field(3, ge=0)  # I/O tasks only (registry, tracking); training never retries
    retry_delay_s: float = Field(10, ge=0)  # first retry delay, doubled at each further retry
    timeout_minutes: FlowTimeouts = FlowTimeouts()


class ServeConfig(Section):
    host: str = "127.0.0.1"  # loopback; 0.0.0.0 exposes the server to the network
    port: int = Field(8000, ge=1, le=65535)
    # an ONNX file or folder, models:/NAME@ALIAS (followed) or models:/NAME/VERSION (pinned)
    model: str = "data/prepared/export/model.onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when onnxruntime-gpu sees a GPU
    top_k: int = Field(5, ge=1)  # labels per image unless ?top_k= says otherwise
    max_batch: int = Field(1, ge=1)  # images per onnxruntime call; 1 = no dynamic batching
    max_wait_ms: float = Field(2.0, ge=0)  # how long a batch waits to fill up, after its first image
    max_images: int = Field(16, ge=1)  # images per request
    max_upload_mb: float = Field(20.0, gt=0)  # request body size, MiB
    poll_s: float = Field(10.0, gt=0)  # how often a models:/NAME@ALIAS alias is checked
    inference_threads: int = Field(1, ge=1)  # concurrent onnxruntime calls (each uses all cores)
    decode_threads: int = Field(4, ge=1)  # concurrent image decodes (Pillow releases the GIL)
    access_log: bool = False  # one log line per request (the /metrics counters always count)
    # bearer token for /v1/* and /metrics; VISIONTUNE_SERVE_TOKEN wins. Required off loopback
    token: str | None = None
    drift_window: int = Field(200, ge=0)  # served images per drift check (drift.alpha); 0 = no monitoring


class DriftConfig(Section):
    alpha: float = Field(0.05, gt=0, lt=1)  # a window is flagged when min p-value × 3 < alpha
    permutations: int = Field(500, ge=100)  # permutations behind the MMD and chi-squared p-values
    retrain: bool = False  # the drift-check flow starts retraining when shift persists
    persist: int = Field(2, ge=1)  # ... over this many checks in a row
    retrain_deployment: str = "training-pipeline/nightly-retrain"  # the deployment it runs


class Params(Section):
    base: BaseConfig = BaseConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    flow: FlowConfig = FlowConfig()
    serve: ServeConfig = ServeConfig()
    drift: DriftConfig = DriftConfig()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def flat(self) -> dict[str, Any]:
        """Every key as 'section.key', as MLflow params and DVC show them."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(by_alias=True).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


class ConfigError(VisiontuneError, ValueError):
    """params.yaml is missing, malformed, or holds an unknown or invalid key."""


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, missing_ok: bool = False
) -> Params:
    """Parse params.yaml into Params; `overrides` maps 'section.key' to a value."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        if not missing_ok:
            raise ConfigError(f"{path}: not found; run from the project root or pass --params") from None
        raw = {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections (base, data, model, ...), got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: write it as section.key, e.g. train.lr")
        raw.setdefault(section, {})[key] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"  {where}: unknown key; check its spelling against the README")
            else:
                lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"{path}: invalid params\n" + "\n".join(lines)) from None
