"""train stage: fine-tune a pretrained timm classifier on the manifest's train split.

Run as `visiontune train` (a dvc.yaml stage) or called by the flow and tests. Images are
decoded once into memory; every epoch augments them as batched tensor ops.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from tqdm import tqdm

from . import images, manifest
from . import model as models
from .config import BaseConfig, ModelConfig, TrainConfig
from .errors import VisiontuneError

HISTORY_FIELDS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "lr",
    "images_per_s",
    "seconds",
]


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    device: str
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    best_val_loss: float
    best_val_accuracy: float
    train_images: int
    images_per_s: float
    seconds: float


def pick_device(requested: str) -> torch.device:
    """cuda, then mps, then cpu for 'auto'; an explicit request that cannot be met is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[requested]:
        raise VisiontuneError(f"train.device: {requested!r} is not available here; use auto or cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, crop_scale: float, hflip: bool) -> torch.Tensor:
    """Random resized crop (area in [crop_scale, 1], aspect 3/4–4/3) and optional flip, batched."""
    n = x.shape[0]
    area = crop_scale + (1 - crop_scale) * torch.rand(n, generator=gen)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=gen) - 1)  # centre, in [-1, 1] grid units
    cy = (1 - h) * (2 * torch.rand(n, generator=gen) - 1)
    sx = w
    if hflip:
        sx = torch.where(torch.rand(n, generator=gen) < 0.5, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Head and backbone at their own lr; no weight decay on norms and biases (1-D tensors)."""
    head = {id(p) for p in models.head_parameters(model)}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim <= 1), []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.lr * (cfg.head_lr_scale if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _evaluate(model, x_u8, y, prep, device, batch_size) -> tuple[float, float, float]:
    model.eval()
    losses, preds = [], []
    for i in range(0, len(y), batch_size):
        x = torch.from_numpy(images.normalize(x_u8[i : i + batch_size], prep.mean, prep.std))
        logits = model(x.to(device)).float()
        target = torch.from_numpy(y[i : i + batch_size]).to(device)
        losses.append(F.cross_entropy(logits, target, reduction="sum").item())
        preds.append(logits.argmax(1).cpu().numpy())
    pred = np.concatenate(preds)
    f1 = f1_score(y, pred, average="macro", zero_division=0)
    return sum(losses) / len(y), float((pred == y).mean()), float(f1)


def train(
    cfg: TrainConfig, model_cfg: ModelConfig, base: BaseConfig, prepared: Path, out: Path
) -> TrainResult:
    """Fine-tune on prepared/manifest.csv; write the best checkpoint and history.csv to out."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    frame = manifest.read(prepared / "manifest.csv")
    class_names = manifest.class_names(frame)
    index = {name: i for i, name in enumerate(class_names)}
    device = pick_device(cfg.device)
    seed_everything(base.seed)
    model, prep = models.create(model_cfg, num_classes=len(class_names))
    model.to(device)

    splits = {}
    for split in ("train", "val"):
        rows = frame[frame["split"] == split]
        splits[split] = (
            images.load_batch(rows["path"].tolist(), prep.size),  # decoded once, reused each epoch
            np.array(rows["label"].map(index), dtype=np.int64),
        )
    x_train, y_train = splits["train"]
    x_val, y_val = splits["val"]
    n = len(y_train)

    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = max(1, n // cfg.batch_size + (n % cfg.batch_size > 1))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(base.seed)

    history, best_state = [], None
    best = {"val_loss": math.inf, "epoch": 0, "val_accuracy": 0.0}
    step, bad_epochs, stopped_early = 0, 0, False
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        perm = torch.randperm(n, generator=gen).numpy()
        bar = tqdm(total=n, unit="img", desc=f"epoch {epoch}/{cfg.epochs}", leave=False, mininterval=1.0)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single image
                continue
            x = torch.from_numpy(images.normalize(x_train[idx], prep.mean, prep.std)).to(device)
            x = augment(x, gen, cfg.crop_scale, cfg.hflip)
            y = torch.from_numpy(y_train[idx]).to(device)
            factor = lr_factor(step, warmup, total_steps)
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(idx)
            # recorded without smoothing, so that it compares with val loss
            loss_sum += F.cross_entropy(logits.detach(), y, reduction="sum").item()
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, val_f1 = _evaluate(model, x_val, y_val, prep, device, cfg.batch_size * 2)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "val_macro_f1": val_f1,
            "lr": base_lrs[0] * lr_factor(step - 1, warmup, total_steps),
            "images_per_s": seen / train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        tqdm.write(
            f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}"
            f"  val acc {val_acc:.4f}  {row['images_per_s']:.0f} img/s"
        )
        if val_loss < best["val_loss"] - cfg.min_delta:
            best = {"val_loss": val_loss, "epoch": epoch, "val_accuracy": val_acc}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                stopped_early = True
                tqdm.write(f"early stop: val loss has not improved for {cfg.patience} epochs")
                break

    if best_state is None:
        raise VisiontuneError(
            f"training diverged: val loss was {history[-1]['val_loss']} in every epoch; lower train.lr"
        )
    model.load_state_dict(best_state)
    config = {"model": model_cfg.model_dump(), "train": cfg.model_dump(), "seed": base.seed}
    meta = models.checkpoint_meta(model_cfg.name, class_names, prep, config)
    meta["best_epoch"] = best["epoch"]
    models.save_checkpoint(model, out, meta)
    with open(out / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    seconds = time.perf_counter() - started
    result = TrainResult(
        checkpoint=str(out),
        device=str(device),
        best_epoch=best["epoch"],
        epochs_run=len(history),
        stopped_early=stopped_early,
        best_val_loss=best["val_loss"],
        best_val_accuracy=best["val_accuracy"],
        train_images=n,
        images_per_s=float(np.mean([h["images_per_s"] for h in history])),
        seconds=seconds,
    )
    (out / "train.json").write_text(json.dumps(asdict(result), indent=2))
    return result
