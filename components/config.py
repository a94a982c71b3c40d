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

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)  # a default is typed too


class BaseConfig(Section):
    seed: int = Field(0, description="Seeds the splits, initialization, shuffling and augmentation.")


class DataConfig(Section):
    source: str = Field(
        "builtin:digits",
        description="What to train on: `builtin:digits`, an image folder `<root>/<class>/<image>`, a CSV "
        "`path,label[,split]`, or a Hugging Face dataset (a `save_to_disk` folder or parquet files).",
    )
    image_column: str = Field("image", description="a Hugging Face dataset source's image column")
    label_column: str = Field(
        "label", description="a Hugging Face dataset source's label column (ClassLabel names are used)"
    )
    allow_paths_under: str | None = Field(
        None,
        description="A folder that a CSV's or a Hugging Face dataset's image paths may also point into; by "
        "default a path that resolves (symlinks followed) outside the dataset's own folder is refused and "
        "its row listed as skipped.",
    )
    val_fraction: float = Field(
        0.15,
        ge=0.0,
        lt=1.0,
        description="Share of each class drawn into val; an image keeps its split once drawn "
        "(`splits.json`).",
    )
    test_fraction: float = Field(
        0.15, ge=0.0, lt=1.0, description="Share of each class drawn into test; val + test must stay below 1."
    )
    min_eval_per_class: int = Field(
        5,
        ge=0,
        description="At least this many val and test images per class, each capped at a sixth of the class.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 to leave training images")
        return self


class ValidateConfig(Section):
    min_per_class: int = Field(5, ge=1, description="Gate: every class needs at least this many images.")
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Decompression-bomb limit, pixels per image (Pillow's default); `serve` applies it too.",
    )
    max_imbalance_ratio: float = Field(
        20.0, ge=1, description="Gate: largest class / smallest class, in images."
    )
    max_label_issue_fraction: float = Field(
        0.1, ge=0, le=1, description="Gate: the largest share of images the label audit may flag."
    )
    allow_leakage: bool = Field(
        False,
        description="Gate: allow val/test images that have an exact or confirmed near duplicate in train.",
    )
    near_duplicate_distance: int = Field(
        6,
        ge=0,
        le=64,
        description="Candidates: bits in which two images' 64-bit perceptual hashes may differ (prepare "
        "searches with the same settings and keeps each confirmed group in one split).",
    )
    near_duplicate_pixel_distance: float = Field(
        0.08,
        ge=0,
        description="Confirmation: the largest mean absolute difference of a candidate pair's standardized "
        "16×16 grayscale thumbnails.",
    )
    label_audit: bool = Field(
        True,
        description="Run the label audit: pretrained features, K-fold cross-validated, with a fitted noise "
        "model.",
    )
    audit_flag_probability: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Beyond the estimated number of wrong labels, also flag any image whose label is wrong "
        "with at least this probability.",
    )
    audit_folds: int = Field(5, ge=2, description="Cross-validation folds of the label audit.")
    classes: list[str] | None = Field(
        None,
        description="The allowed labels, e.g. `[cat, dog]`; any other label is a schema error. null: any.",
    )
    on_fail: Literal["error", "warn"] = Field(
        "error", description="`error`: a failed gate stops the pipeline; `warn`: write the report and go on."
    )

    def duplicate_search(self) -> dict:
        """find_duplicates' settings: prepare searches with them (each group then stays in one split),
        and validate reports what that search found."""
        return {
            "max_distance": self.near_duplicate_distance,
            "threshold": self.near_duplicate_pixel_distance,
            "max_pixels": self.max_pixels,
        }


class ModelConfig(Section):
    name: str = Field(
        "tf_efficientnet_lite0",
        description="Any timm model name; the default's ImageNet weights are installed with visiontune.",
    )
    image_size: Annotated[int, Field(ge=16)] | Literal["auto"] | None = Field(
        "auto",
        description="Training and inference resolution: `auto` chooses from the data (the native size when "
        "the images' median short side reaches it, else that median rounded up to a multiple of 32, at least "
        "64); null: the model's pretrained size; or an integer.",
    )
    pretrained: bool = Field(
        True, description="Start from pretrained weights; false: random initialization (needs far more data)."
    )
    weights: str | None = Field(
        None,
        description="A local weights file for `model.name` (.safetensors, .pth or .bin holding its state "
        "dict).",
    )


class LoraConfig(Section):
    r: int = Field(
        4, ge=1, description="Rank of each low-rank update (Lite0 at r=4 trains 2.98 % of its weights)."
    )
    alpha: float = Field(8.0, gt=0, description="Update scale = alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None,
        description="Layer names to adapt; null: ViT attention `qkv` and `proj` (plus the MLP with "
        "`include_mlp`), CNNs' 1×1 convolutions and linear layers.",
    )
    include_mlp: bool = Field(False, description="ViT: also adapt the MLP (`fc1`, `fc2`).")


class TrainConfig(Section):
    method: Literal["full", "linear", "lora"] = Field(
        "full",
        description="`full`: every weight; `linear`: a linear probe on the frozen backbone; `lora`: peft "
        "adapters + head.",
    )
    epochs: int = Field(10, ge=1, description="Upper bound; early stopping may end sooner.")
    batch_size: int = Field(
        32, ge=1, description="Images per optimizer batch; with `nproc` > 1 still the global batch."
    )
    grad_accum: int = Field(
        1, ge=1, description="Optimizer step every N batches (effective batch N × batch_size)."
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Backbone learning rate (AdamW, linear warmup then cosine decay); null: the method's "
        "default, 1e-3 for full and linear, 3e-3 for lora.",
    )
    head_lr_scale: float = Field(3.0, gt=0, description="The new head's learning rate is lr × this.")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="e.g. 0.75: each depth group nearer the stem learns 0.75× slower than the next; null: "
        "off.",
    )
    freeze: int = Field(
        0,
        ge=0,
        description="`full` only: depth groups frozen from the stem (1 = stem, 2 = stem + first stage or ViT "
        "block, …), their norm statistics kept.",
    )
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay; not applied to norm weights and biases."
    )
    warmup_epochs: float = Field(1.0, ge=0, description="Linear learning-rate warmup, in epochs.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the training loss.")
    calibrate_confidence: bool = Field(
        True,
        description="Fit a temperature on the val split after training and fold it into the classifier, "
        "so that predicted probabilities match accuracy (label smoothing leaves them too low).",
    )
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient norm to this, e.g. 1.0; null: no clipping."
    )
    imbalance: Literal["none", "weights", "sampler"] = Field(
        "none",
        description="`weights`: inverse-frequency class weights in the loss; `sampler`: class-balanced "
        "batches.",
    )
    patience: int = Field(
        3,
        ge=1,
        description="Early stopping: epochs without a better val loss; the best-val-loss epoch is kept.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="Early stopping: the smallest val-loss decrease that counts as better."
    )
    hflip: bool | Literal["auto"] = Field(
        "auto",
        description="Random horizontal flips. `auto`: decided from the data before training, on when a "
        "linear probe on pretrained features, fitted on original training images, keeps at least 95 % of "
        "its accuracy on mirror images (pictures of objects, faces, textures), off when it does not "
        "(digits, text and other scans whose mirror images change class).",
    )
    crop_scale: float = Field(
        0.8, gt=0, le=1, description="Random resized crops keep at least this share of the image area."
    )
    color_jitter: float = Field(
        0.1, ge=0, le=1, description="Brightness, contrast and saturation ± this fraction."
    )
    mixup: float = Field(0.0, ge=0, description="Mixup with Beta(alpha, alpha); 0: off.")
    randaugment: int = Field(
        0, ge=0, description="RandAugment operations per image (torchvision, magnitude 9); 0: off."
    )
    probe_levels: int = Field(
        3,
        ge=0,
        description="`linear` only: the head also reads the pooled outputs of the last N feature stages (CNN "
        "stages, ViT blocks); 0: the final features only (the classic probe).",
    )
    lora: LoraConfig = Field(LoraConfig(), description="LoRA settings, used when `method: lora`.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="`auto`: cuda, then mps, then cpu."
    )
    # the device policy; auto resolves per model family, image size and device (components/policy.py)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Autocast dtype: `bf16`, `fp16` (CUDA, with loss scaling) or `fp32`; auto: the device "
        "policy (bf16 on CUDA; fp32 elsewhere and for depthwise CNNs under 128 px).",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="`channels_last` or `contiguous`; auto: the device policy (channels-last for CNNs).",
    )
    cudnn_benchmark: bool | Literal["auto"] = Field(
        "auto", description="cuDNN autotuning with fixed batch shapes; auto: on CUDA unless `deterministic`."
    )
    fused_optimizer: bool | Literal["auto"] = Field(
        "auto", description="AdamW's fused CUDA kernel; auto: on CUDA."
    )
    compile: bool = Field(
        False, description="`torch.compile` the model (long start-up; pays off on long GPU runs)."
    )
    deterministic: bool = Field(False, description="Deterministic kernels (slower on GPU).")
    nproc: int = Field(
        1,
        ge=1,
        description="Data-parallel processes under torchrun (one per GPU); `batch_size` stays the global "
        "batch.",
    )
    dist_timeout_s: float = Field(
        300, gt=0, description="A wait inside a collective longer than this many seconds fails the run."
    )

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
    batch_size: int = Field(64, ge=1, description="Images per batch when scoring.")
    top_k: int = Field(5, ge=1, description="The k of the top-k accuracy.")
    gallery: int = Field(
        24, ge=0, description="Misclassified test images shown in the report, most confident first."
    )


class ExportConfig(Section):
    opset: int = Field(17, ge=17, description="ONNX opset (17 or later).")
    atol: float = Field(
        1e-4,
        gt=0,
        description="Parity: the largest abs logit difference allowed between onnxruntime and PyTorch, per "
        "unit of the largest |logit| (logits within ±1: absolute).",
    )
    quantize: Literal["none", "int8", "fp16"] = Field(
        "none",
        description="`int8` (static, calibrated; CPU) or `fp16`: a smaller copy beside the fp32 "
        "`model.onnx`.",
    )
    max_accuracy_drop: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Test accuracy the quantized copy may lose; a larger drop refuses the copy.",
    )
    calibration_images: int = Field(
        200, ge=1, description="Train images that calibrate the int8 activation ranges."
    )
    license: str | None = Field(
        None,
        description="The Hub model card's license (a Hub license id: apache-2.0, mit, cc-by-4.0, "
        "other, ...); null: the license timm lists for the base weights, else `other`.",
    )


class RegisterConfig(Section):
    model_name: str = Field("visiontune-classifier", description="Registered model name in MLflow.")
    experiment: str = Field("visiontune", description="MLflow experiment of the runs.")
    alias: str = Field("candidate", description="Alias given to each newly registered version.")
    metric: str = Field(
        "test_accuracy", description="The metric promotion compares between candidate and champion."
    )
    greater_is_better: bool = Field(True, description="Direction of `register.metric`.")
    min_improvement: float = Field(
        0.0, ge=0, description="The candidate must beat the champion by at least this much."
    )
    min_metrics: dict[str, float] = Field(
        {}, description="Floors every champion must clear, e.g. `{test_macro_f1: 0.9}`."
    )
    auto_promote: bool = Field(
        False, description="Promote right after registering, when the promotion rule allows it."
    )
    use_stages: bool = Field(
        True, description="Also move legacy registry stages (Staging → Production, Archived)."
    )


class FlowTimeouts(Section):
    """Minutes each stage may run as a Prefect task before it is stopped and the flow fails."""

    prepare: float = Field(120, gt=0, description="Minutes the prepare stage may run.")
    validate_: float = Field(120, gt=0, alias="validate", description="Minutes the validate stage may run.")
    train: float = Field(24 * 60, gt=0, description="Minutes the train stage may run.")
    evaluate: float = Field(60, gt=0, description="Minutes the evaluate stage may run.")
    export: float = Field(30, gt=0, description="Minutes the export stage may run.")
    register_: float = Field(15, gt=0, alias="register", description="Minutes the register stage may run.")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def seconds(self, stage: str) -> float:
        return 60 * self.model_dump(by_alias=True)[stage]


class FlowConfig(Section):
    """How the Prefect flow runs the stages; `dvc repro` ignores this section."""

    cache: bool = Field(
        True, description="Skip a stage whose inputs (data hash, params section, code) are unchanged."
    )
    retries: int = Field(
        3, ge=0, description="Retries of I/O tasks (registry, tracking); training never retries."
    )
    retry_delay_s: float = Field(
        10, ge=0, description="First retry after this many seconds, doubled at each further retry."
    )
    timeout_minutes: FlowTimeouts = Field(
        FlowTimeouts(),
        description="Per-stage timeouts; a stage running longer is stopped and the flow fails.",
    )


class ServeConfig(Section):
    host: str = Field(
        "127.0.0.1",
        description="Address to bind: 127.0.0.1 is loopback only; 0.0.0.0 exposes the server (a token is "
        "then required).",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    model: str = Field(
        "data/prepared/export/model.onnx",
        description="An ONNX file or folder, `models:/NAME@ALIAS` (followed as the alias moves) or "
        "`models:/NAME/VERSION` (pinned).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: CUDA when onnxruntime-gpu sees a GPU; `cpu`; `cuda` (fails without it)."
    )
    top_k: int = Field(5, ge=1, description="Labels per image unless the request sets `?top_k=`.")
    max_batch: int = Field(
        1,
        ge=1,
        description="Dynamic batching: images per onnxruntime call; 1: no batching (best for Lite0 on CPU); "
        "16 pays for ResNet-50.",
    )
    max_wait_ms: float = Field(
        2.0, ge=0, description="How long a batch waits to fill up after its first image, in ms."
    )
    max_images: int = Field(16, ge=1, description="Images per request.")
    max_upload_mb: float = Field(20.0, gt=0, description="Request body size limit, MiB.")
    poll_s: float = Field(
        10.0, gt=0, description="How often a `models:/NAME@ALIAS` alias is checked, in seconds."
    )
    inference_threads: int = Field(
        1, ge=1, description="Concurrent onnxruntime calls (each already uses every core)."
    )
    decode_threads: int = Field(4, ge=1, description="Concurrent image decodes (Pillow releases the GIL).")
    max_decode_mb: float = Field(
        512.0,
        gt=0,
        description="Memory the image decodes in flight may hold together, MiB, computed from each image's "
        "header before any pixel is decoded; a decode waits for its share, and an image that alone needs "
        "more gets 413.",
    )
    access_log: bool = Field(
        False, description="One log line per request (the /metrics counters always count)."
    )
    token: str | None = Field(
        None,
        description="Bearer token for `/v1/*` and `/metrics`; `VISIONTUNE_SERVE_TOKEN` wins (keep secrets "
        "out of params.yaml). Required off loopback.",
    )
    drift_window: int = Field(
        200,
        ge=0,
        description="Served images per drift check against the model's val reference; 0: no monitoring.",
    )


class DriftConfig(Section):
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="A window is flagged when the smallest of the three p-values × 3 is below this.",
    )
    permutations: int = Field(
        500, ge=100, description="Permutations behind the MMD and chi-squared p-values ((k+1)/(B+1))."
    )
    retrain: bool = Field(
        False, description="The drift-check flow starts `retrain_deployment` when shift persists."
    )
    persist: int = Field(
        2, ge=1, description="With `retrain`: how many shifted checks in a row start the retraining."
    )
    retrain_deployment: str = Field(
        "training-pipeline/nightly-retrain", description="The Prefect deployment the drift-check flow starts."
    )


class Params(Section):
    base: BaseConfig = Field(BaseConfig(), description="Shared by the stages.")
    data: DataConfig = Field(
        DataConfig(), description="The prepare stage: where the images come from and how they are split."
    )
    validate_: ValidateConfig = Field(
        ValidateConfig(),
        alias="validate",
        description="The validate stage's checks and gate thresholds (`visiontune audit` reads them too).",
    )
    model: ModelConfig = Field(
        ModelConfig(),
        description="The backbone: the train stage, and the image size of validate's label audit.",
    )
    train: TrainConfig = Field(TrainConfig(), description="The train stage.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="The evaluate stage.")
    export: ExportConfig = Field(
        ExportConfig(),
        description="The export stage: ONNX, its parity check, optional quantized copies and the Hub folder.",
    )
    register_: RegisterConfig = Field(
        RegisterConfig(),
        alias="register",
        description="The register stage and promotion (`visiontune promote`, `rollback`).",
    )
    flow: FlowConfig = Field(
        FlowConfig(),
        description="How the Prefect flow runs the stages (`visiontune run`, deployments); `dvc repro` "
        "ignores it.",
    )
    serve: ServeConfig = Field(
        ServeConfig(), description="`visiontune serve`; `--model`, `--host` and `--port` override these."
    )
    drift: DriftConfig = Field(
        DriftConfig(),
        description="`visiontune drift` and the drift-check flow: new images against the model's val-split "
        "reference.",
    )

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


def _override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set 'section.key' (or 'section.sub.key') in the parsed YAML; an empty section counts as {}."""
    *parents, key = dotted.split(".")
    if not parents or not all(parents) or not key:
        raise ConfigError(f"override {dotted!r}: write it as section.key, e.g. train.lr or train.lora.r")
    node = raw
    for depth, name in enumerate(parents):
        child = node.get(name)
        if child is None:  # absent, or an empty section (`serve:` with nothing under it)
            child = node[name] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(
                f"override {dotted!r}: {where} is a value, not a section; set {where}=... instead"
            )
        node = child
    node[key] = value


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
    raw = {section: {} if values is None else values for section, values in raw.items()}  # `serve:` alone
    for dotted, value in (overrides or {}).items():
        _override(raw, dotted, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(
                    f"  {where}: unknown key; check its spelling against params.yaml and the docs' "
                    "parameter reference"
                )
            else:
                lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"{path}: invalid params\n" + "\n".join(lines)) from None
