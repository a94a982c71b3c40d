"""train stage: fine-tune a pretrained timm classifier on the manifest's train split.

Run as `visiontune train` (a dvc.yaml stage) or called by the flow and tests. Images come from
the decoded store (decoded once per resolution); every epoch augments them as batched tensor ops
on the training device. The state after each epoch is kept, so a killed run resumes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import cache, distributed, images, manifest
from . import metrics as metrics_
from . import mirror as mirror_
from . import model as models
from . import policy as policy_
from .config import BaseConfig, ModelConfig, TrainConfig
from .errors import VisiontuneError, reading

HISTORY_FIELDS = [
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "images_per_s", "seconds"
]  # fmt: skip
RESUME = "resume"  # folder of the last finished epoch's state; removed when training completes


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    method: str
    device: str
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    temperature: float | None  # the logits were divided by it (folded into the classifier); None: not fitted
    train_images: int
    image_size: int  # px, as trained (model.image_size resolved)
    image_size_reason: str
    hflip: bool  # train.hflip resolved
    hflip_reason: str
    hflip_kept: float | None  # auto's probe: mirrored ÷ original accuracy; None when train.hflip was set
    device_policy: dict  # precision, memory_format, cudnn_benchmark, fused_optimizer as resolved; reason
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
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


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    crop_scale: float,
    hflip: bool,
    jitter: float = 0.0,
    part: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Random resized crop (area in [crop_scale, 1], aspect 3/4–4/3), optional flip and colour
    jitter, batched, on a float NCHW batch in [0, 1]; random numbers come from `gen` (CPU).

    part=(rank, world, global batch size): x is this rank's share of a global batch (every
    world-th image from rank); the random draws are made for the whole global batch, so each
    image is augmented as a single process would augment it.
    """
    n = x.shape[0] if part is None else part[2]
    pick = slice(None) if part is None else slice(part[0], None, part[1])
    area = crop_scale + (1 - crop_scale) * torch.rand(n, generator=gen)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=gen) - 1)  # centre, in [-1, 1] grid units
    cy = (1 - h) * (2 * torch.rand(n, generator=gen) - 1)
    sx = torch.where(torch.rand(n, generator=gen) < 0.5, -w, w) if hflip else w
    sx, cx, h, cy = sx[pick], cx[pick], h[pick], cy[pick]
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    # non_blocking: a blocking host-to-GPU copy would wait for the whole GPU queue every batch
    grid = F.affine_grid(theta.to(x.device, x.dtype, non_blocking=True), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        factors = 1 + jitter * (2 * torch.rand(3, n, 1, 1, 1, generator=gen) - 1)
        factors = factors[:, pick].to(x.device, x.dtype, non_blocking=True)
        x = x * factors[0]  # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factors[1] + mean  # contrast
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * factors[2] + gray  # saturation
        x = x.clamp(0, 1)
    return x


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by lr (head, backbone, optional layer decay by depth) and by
    weight decay (none on norms and biases, i.e. 1-D tensors)."""
    head = {id(p) for p in models.head_parameters(model)}
    depth: dict[str, int] = {}
    deepest = 0
    if cfg.layer_decay is not None:
        depth = models.depth_groups(model)
        deepest = max(depth.values())
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head:
            lr = cfg.base_lr * cfg.head_lr_scale
        elif cfg.layer_decay is not None:
            lr = cfg.base_lr * cfg.layer_decay ** (deepest - depth.get(name, deepest))
        else:
            lr = cfg.base_lr
        groups.setdefault((lr, p.ndim <= 1), []).append(p)
    return [
        {"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        for (lr, no_decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def epoch_order(labels: np.ndarray, gen: torch.Generator, balanced: bool) -> np.ndarray:
    """This epoch's order of training rows: a shuffle, or a class-balanced draw with replacement."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=gen).numpy()
    per_image = 1.0 / np.bincount(labels)[labels]
    return torch.multinomial(torch.tensor(per_image), n, replacement=True, generator=gen).numpy()


def _plain_batches(
    pixels, rows, prep, device, batch_size, memory_format=torch.contiguous_format, pad: bool = False
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice of rows, normalized un-augmented batch on the device), in order, read ahead. With
    pad, a short last batch is filled up with zero images to batch_size rows (one shape for
    cuDNN's autotuner); callers keep the first len(rows[span]) outputs."""
    spans = [slice(i, i + batch_size) for i in range(0, len(rows), batch_size)]
    reads = read_ahead(pixels, [rows[s] for s in spans], pin=device.type == "cuda")
    for span, host in zip(spans, reads, strict=True):
        if pad and len(host) < batch_size:
            host = torch.cat([host, host.new_zeros((batch_size - len(host), *host.shape[1:]))])
        x = images.normalize_tensor(host.to(device, non_blocking=True), prep.mean, prep.std)
        yield span, x.contiguous(memory_format=memory_format)


@torch.no_grad()
def _plain_logits(
    model, pixels, rows, prep, device, batch_size, autocast, **batching
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice of rows, float32 logits of those rows on the device) over un-augmented batches, in
    order, the model in eval mode (a padded batch's blank images left out)."""
    model.eval()
    for span, x in _plain_batches(pixels, rows, prep, device, batch_size, **batching):
        with autocast():
            logits = model(x).float()[: len(rows[span])]
        yield span, logits  # outside autocast: the caller's arithmetic is its own


@torch.no_grad()
def _evaluate(
    model, pixels, rows, y, prep, device, batch_size, autocast, n_classes, **batching
) -> np.ndarray:
    """[loss sum, confusion counts...] over these rows: sums, so that ranks can add theirs up."""
    loss, predicted = torch.zeros((), device=device), []  # kept on the device: one read at the end
    for span, logits in _plain_logits(model, pixels, rows, prep, device, batch_size, autocast, **batching):
        target = torch.from_numpy(y[span]).to(device, non_blocking=True)
        loss += F.cross_entropy(logits, target, reduction="sum")
        predicted.append(logits.argmax(1))
    confusion = np.zeros((n_classes, n_classes), dtype=np.float64)
    if predicted:
        np.add.at(confusion, (y, torch.cat(predicted).cpu().numpy()), 1)
    return np.concatenate([[float(loss)], confusion.ravel()])


def read_ahead(pixels: np.ndarray, row_batches: Sequence[np.ndarray], pin: bool) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches from the decoded store, each read by a helper thread while the one
    before it trains; pinned (for an asynchronous copy) when the model is on a GPU."""

    def read(rows: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels[rows])
        return batch.pin_memory() if pin else batch

    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        ahead = pool.submit(read, row_batches[0]) if len(row_batches) else None
        for i in range(len(row_batches)):
            batch = ahead.result()
            if i + 1 < len(row_batches):
                ahead = pool.submit(read, row_batches[i + 1])
            yield batch


@torch.no_grad()
def _probe_sums(probe, pixels, rows, prep, device, batch_size, autocast, **batching) -> np.ndarray:
    """[count, Σx…, Σx²…] of a LevelProbe's features over these (un-augmented) images."""
    probe.eval()
    width = probe.mean.numel()
    sums = np.zeros(1 + 2 * width)
    for span, x in _plain_batches(pixels, rows, prep, device, batch_size, **batching):
        with autocast():
            f = probe.features(x).float()[: len(rows[span])].cpu().double()
        sums += np.concatenate([[len(f)], f.sum(0).numpy(), (f * f).sum(0).numpy()])
    return sums


def _val_metrics(sums: np.ndarray, n_classes: int) -> tuple[float, float, float]:
    """(val loss, accuracy, macro F1 over the classes the split holds, as evaluate averages it)."""
    confusion = sums[1:].reshape(n_classes, n_classes)
    total = confusion.sum()
    tp, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0
    )
    present = actual > 0
    return float(sums[0] / total), float(tp.sum() / total), float(f1[present].mean())


def _fingerprint(cfg: TrainConfig, model_cfg: ModelConfig, base: BaseConfig, manifest_sha: str) -> str:
    blob = json.dumps(
        [cfg.model_dump(), model_cfg.model_dump(), base.model_dump(), manifest_sha], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_resume(run: _Run, progress: _Progress, folder: Path, epoch: int) -> None:
    """Everything needed to continue after this epoch, as safetensors + JSON (no pickle)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in (progress.best_state or {}).items()}
    opt = run.optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.gen"] = run.gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / "state.safetensors")
    info = {
        "fingerprint": run.fingerprint, "epoch": epoch, "step": progress.step, "history": progress.history,
        "best": progress.best, "bad_epochs": progress.bad_epochs, "scaler": run.scaler.state_dict(),
    }  # fmt: skip
    (tmp / "state.json").write_text(json.dumps({**info, "param_groups": opt["param_groups"]}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)  # the old state stays until the new one is complete


def _load_resume(run: _Run, folder: Path) -> _Progress:
    """The progress saved in folder; the model, optimizer, loss scale and random states as they were."""
    tensors = load_file(folder / "state.safetensors")
    info = json.loads((folder / "state.json").read_text())
    run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    run.optimizer.load_state_dict({"state": state, "param_groups": info.pop("param_groups")})
    if info.get("scaler"):
        run.scaler.load_state_dict(info["scaler"])
    run.gen.set_state(tensors["rng.gen"])
    torch.set_rng_state(tensors["rng.torch"])
    return _Progress(
        info["history"], info["best"], best_state, info["step"], info["bad_epochs"], info["epoch"]
    )


def _build(cfg: TrainConfig, model_cfg: ModelConfig, n_classes: int):
    """The model for train.method, its preprocessing, and the modules kept in eval mode."""
    model, prep = models.create(model_cfg, num_classes=n_classes)
    frozen: list[torch.nn.Module] = []
    if cfg.method == "linear":
        model, frozen = models.linear_probe(model, cfg.probe_levels, n_classes, prep.size)
    elif cfg.method == "lora":
        model = models.apply_lora(model, cfg.lora)
    elif cfg.freeze:
        frozen = models.freeze(model, cfg.freeze)
    return model, prep, frozen


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    base: BaseConfig,
    prepared: Path,
    out: Path,
    store: Path | None = None,
    resume: Literal["auto", "never", "must"] = "auto",
    on_epoch_end: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Fine-tune on prepared/manifest.csv; write the best checkpoint and history.csv to out.

    Under torchrun (train.nproc > 1, or several nodes) every process runs this: each trains on
    its share of every global batch, gradients are averaged across processes (DDP), and rank 0
    writes the files; the others return rank 0's result.
    """
    ctx, rank_device = distributed.init(cfg.device, cfg.dist_timeout_s)
    try:
        return _train(ctx, rank_device, cfg, model_cfg, base, prepared, out, store, resume, on_epoch_end)
    finally:
        distributed.shutdown()


@dataclass
class _Run:
    """What every epoch of one training run uses; fixed once set up."""

    ctx: distributed.Context
    cfg: TrainConfig
    device: torch.device
    policy: policy_.DevicePolicy
    memory_format: torch.memory_format
    autocast: Callable
    scaler: torch.amp.GradScaler
    model: torch.nn.Module  # the model itself (its state is what is saved)
    ddp: torch.nn.Module  # the model, DDP-wrapped under several processes
    forward: torch.nn.Module  # what the training step calls (ddp, compiled with train.compile)
    frozen: list[torch.nn.Module]
    prep: models.Preprocessing
    size: models.SizeChoice
    mirror: mirror_.MirrorChoice  # train.hflip resolved
    class_names: list[str]
    pixels: np.ndarray  # the decoded store
    x_train: np.ndarray  # store rows of the train split
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    loss_weights: torch.Tensor | None
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    gen: torch.Generator
    randaugment: Callable | None
    warmup: int
    total_steps: int
    fingerprint: str
    say: Callable[[str], None]


@dataclass
class _Progress:
    """What changes from epoch to epoch, saved after each one so that a killed run resumes."""

    history: list[dict]
    best: dict  # val_loss, epoch, val_accuracy of the best epoch so far
    best_state: dict | None  # its weights (rank 0 only)
    step: int  # optimizer steps taken
    bad_epochs: int  # epochs since the val loss last improved
    resumed_from: int  # the last epoch finished before this process started (0: a fresh run)


def _train(ctx, rank_device, cfg, model_cfg, base, prepared, out, store, resume, on_epoch_end) -> TrainResult:
    """Set up, then per epoch: train, validate, keep the best weights and the state to resume from,
    and stop once the val loss has not improved for train.patience epochs. Rank 0 then writes the
    checkpoint, history.csv and train.json."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    run = _setup(ctx, rank_device, cfg, model_cfg, base, prepared, out, store)
    progress = _resume_or_start(run, out / RESUME, resume)
    _ready_to_train(run, progress)
    history = progress.history
    # early stopping means fewer epochs than train.epochs, never merely a last epoch without progress
    stopped_early = (
        bool(history) and progress.bad_epochs >= cfg.patience and history[-1]["epoch"] < cfg.epochs
    )
    for epoch in range(progress.resumed_from + 1, cfg.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()
        seen, loss_sum = _train_one_epoch(run, progress, epoch)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, val_f1 = _validate(run)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "val_macro_f1": val_f1,
            "lr": cfg.base_lr * lr_factor(max(0, progress.step - 1), run.warmup, run.total_steps),
            "images_per_s": seen / train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        run.say(
            f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}"
            f"  val acc {val_acc:.4f}  {row['images_per_s']:.0f} img/s"
        )
        _keep_best(run, progress, epoch, val_loss, val_acc)
        if ctx.main:
            _save_resume(run, progress, out / RESUME, epoch)
            if on_epoch_end is not None:  # e.g. a benchmark scoring the test split; not part of training
                on_epoch_end(epoch, run.model)
        patience_spent = progress.bad_epochs >= cfg.patience
        if epoch < cfg.epochs and ctx.decide(patience_spent, run.device):  # rank 0 decides for all
            stopped_early = True
            run.say(f"early stop: val loss has not improved for {cfg.patience} epochs")
    if not ctx.main:  # rank 0 writes the checkpoint; the others take its result
        ctx.barrier()
        return TrainResult(**json.loads((out / "train.json").read_text()))
    result = _finish(run, progress, model_cfg, base, out, stopped_early, started)
    ctx.barrier()
    return result


def _setup(
    ctx, rank_device, cfg: TrainConfig, model_cfg: ModelConfig, base: BaseConfig, prepared, out, store
) -> _Run:
    """The model on its device under the device policy, the decoded store and the split's rows,
    the flips decided (train.hflip), the optimizer and the schedule's lengths."""
    say = tqdm.write if ctx.main else (lambda *_: None)
    manifest_path = prepared / "manifest.csv"
    frame = manifest.read(manifest_path)
    class_names = manifest.class_names(frame)
    index = {name: i for i, name in enumerate(class_names)}
    device = rank_device or pick_device(cfg.device)
    seed_everything(base.seed, cfg.deterministic)
    size = models.choose_image_size(model_cfg, frame["width"].to_numpy(), frame["height"].to_numpy())
    say(f"image size {size.size} px ({size.reason})")
    model, prep, frozen = _build(
        cfg, model_cfg.model_copy(update={"image_size": size.size}), len(class_names)
    )
    trainable, total = models.count_parameters(model)
    say(f"{cfg.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f} %)")
    if ctx.world > 1:
        say(f"data-parallel: {ctx.world} processes on {device.type}, global batch {cfg.batch_size}")
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    policy = policy_.resolve(cfg, models.family(model), size.size, device.type, bf16_ok)
    say(f"device policy: {policy.reason}")
    torch.backends.cudnn.benchmark = policy.cudnn_benchmark
    memory_format = (
        torch.channels_last if policy.memory_format == "channels_last" else torch.contiguous_format
    )
    model.to(device).to(memory_format=memory_format)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(policy.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext

    train_rows, val_rows = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
    pixels, rows = cache.decoded(
        store or out.parent / "cache",
        prep.size,
        frame["path"].tolist(),
        frame["sha256"].tolist(),
        shard=(ctx.local_rank, ctx.local_world),  # the processes of a machine decode a share each
        barrier=ctx.barrier,
    )  # decoded once per resolution; epochs read this memory map
    row_of = dict(zip(frame["path"], rows, strict=True))
    y_train = np.array(train_rows["label"].map(index), dtype=np.int64)
    x_train = np.array([row_of[p] for p in train_rows["path"]], dtype=np.int64)
    mirror = mirror_.choose_hflip(cfg.hflip, pixels, x_train, y_train, base.seed, str(device))
    if ctx.decide(mirror.on, device) != mirror.on:  # rank 0's choice holds on every rank
        mirror = mirror_.MirrorChoice(not mirror.on, f"rank 0's choice ({mirror.reason})", mirror.kept)
    say(f"horizontal flips {'on' if mirror.on else 'off'} ({mirror.reason})")
    weights = class_weights(y_train, len(class_names)).to(device) if cfg.imbalance == "weights" else None
    optimizer = torch.optim.AdamW(param_groups(model, cfg), fused=policy.fused_optimizer or None)
    steps_per_epoch = max(
        1, math.ceil(len(_batches(np.arange(len(y_train)), cfg.batch_size, policy)) / cfg.grad_accum)
    )
    randaugment = None
    if cfg.randaugment:
        from torchvision.transforms import v2

        randaugment = v2.RandAugment(num_ops=cfg.randaugment, magnitude=9)  # draws from torch's seeded RNG
    return _Run(
        ctx=ctx, cfg=cfg, device=device, policy=policy, memory_format=memory_format, autocast=autocast,
        scaler=torch.amp.GradScaler(device.type, enabled=policy.precision == "fp16"),
        model=model, ddp=model, forward=model, frozen=frozen, prep=prep, size=size, mirror=mirror,
        class_names=class_names, pixels=pixels, x_train=x_train, y_train=y_train,
        x_val=np.array([row_of[p] for p in val_rows["path"]], dtype=np.int64),
        y_val=np.array(val_rows["label"].map(index), dtype=np.int64),
        loss_weights=weights,
        optimizer=optimizer, base_lrs=[g["lr"] for g in optimizer.param_groups],
        gen=torch.Generator().manual_seed(base.seed), randaugment=randaugment,
        warmup=round(cfg.warmup_epochs * steps_per_epoch), total_steps=steps_per_epoch * cfg.epochs,
        fingerprint=_fingerprint(cfg, model_cfg, base, images.sha256_file(manifest_path)), say=say,
    )  # fmt: skip


def _batches(order: np.ndarray, batch_size: int, policy: policy_.DevicePolicy) -> list[np.ndarray]:
    """The epoch's global batches in `order`. With cuDNN autotuning every batch keeps one shape:
    a short last batch is left out (the next epoch's order puts other images there)."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if policy.cudnn_benchmark and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _resume_or_start(run: _Run, resume_dir: Path, resume: str) -> _Progress:
    """The progress saved after the last finished epoch of this same run (same params, same
    manifest), or a fresh start; resume='never' discards a saved state, 'must' requires one."""
    progress = _Progress([], {"val_loss": math.inf, "epoch": 0, "val_accuracy": 0.0}, None, 0, 0, 0)
    saved = resume_dir / "state.json"
    if resume == "never":
        if run.ctx.main:
            shutil.rmtree(resume_dir, ignore_errors=True)
    elif saved.exists() and _saved_fingerprint(saved) == run.fingerprint:
        with _torn(resume_dir):
            progress = _load_resume(run, resume_dir)
        run.say(f"resuming after epoch {progress.resumed_from} from {resume_dir}")
    elif resume == "must":
        raise VisiontuneError(f"{resume_dir}: no saved state of this run to resume; run without --resume")
    return progress


def _saved_fingerprint(saved: Path) -> str | None:
    with _torn(saved):
        return json.loads(saved.read_text()).get("fingerprint")


def _torn(where: Path):
    """Reading the resume state back: any failure is one line naming it and the way out."""
    folder = where if where.is_dir() else where.parent
    fix = f"start over with `visiontune train --fresh` (or delete {folder})"
    return reading(where, "saved state of the interrupted run", fix)


def _ready_to_train(run: _Run, progress: _Progress) -> None:
    """A fresh linear probe measures its feature statistics; then the model is wrapped for DDP
    (every rank starts from the same state) and compiled when train.compile asks."""
    if isinstance(run.model, models.LevelProbe) and not progress.resumed_from:  # resumed: they were saved
        sums = _probe_sums(
            run.model, run.pixels, run.ctx.shard(run.x_train), run.prep, run.device, run.cfg.batch_size,
            run.autocast, memory_format=run.memory_format, pad=run.policy.cudnn_benchmark,
        )  # fmt: skip
        sums = run.ctx.sum(sums, run.device)
        width = run.model.mean.numel()
        run.model.standardize(sums[0], sums[1 : 1 + width], sums[1 + width :])
    if run.ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [run.device.index] if run.device.type == "cuda" else None
        run.ddp = DistributedDataParallel(run.model, device_ids=ids)
    run.forward = torch.compile(run.ddp) if run.cfg.compile else run.ddp


def _train_one_epoch(run: _Run, progress: _Progress, epoch: int) -> tuple[float, float]:
    """One pass over the train split in a fresh seeded order: (images seen by all ranks, their
    summed cross-entropy without smoothing or weights, comparable with the val loss)."""
    ctx, cfg, device = run.ctx, run.cfg, run.device
    run.model.train()
    for module in run.frozen:
        module.eval()
    seen, loss_sum = 0, torch.zeros((), device=device)
    shown = time.perf_counter()
    order = epoch_order(run.y_train, run.gen, cfg.imbalance == "sampler")
    batches = _batches(order, cfg.batch_size, run.policy)
    shares = [ctx.shard(idx) for idx in batches]  # this rank's share of each global batch
    reads = read_ahead(run.pixels, [run.x_train[mine] for mine in shares], pin=device.type == "cuda")
    bar = tqdm(
        total=sum(map(len, batches)), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
        mininterval=1.0, disable=None if ctx.main else True,  # rank 0 shows every rank's images together
    )  # fmt: skip
    run.optimizer.zero_grad(set_to_none=True)
    for b, (idx, mine, host) in enumerate(zip(batches, shares, reads, strict=True)):
        if len(idx) < 2 * ctx.world:  # batch norm cannot train on a single image
            continue
        x, y = _training_batch(run, host, mine, len(idx))
        logits, loss = _forward_loss(run, x, y, len(idx))
        stepping = (b + 1) % cfg.grad_accum == 0 or b == len(batches) - 1
        # DDP averages gradients over ranks; this weight makes the average the global batch mean
        weight = ctx.world * len(mine) / len(idx) / cfg.grad_accum
        with run.ddp.no_sync() if ctx.world > 1 and not stepping else nullcontext():
            run.scaler.scale(loss * weight).backward()
        if stepping:
            _optimizer_step(run, progress)
        seen += len(mine)
        loss_sum += F.cross_entropy(logits.detach().float(), y, reduction="sum")  # on the device: no sync
        bar.update(len(idx))
        if time.perf_counter() - shown >= 1.0:  # reading the loss waits for the GPU: once a second
            bar.set_postfix(loss=f"{loss.item():.3f}")
            shown = time.perf_counter()
    bar.close()
    seen, loss_sum = ctx.sum([seen, float(loss_sum)], device)  # every rank's images
    return seen, loss_sum


def _training_batch(run: _Run, host: torch.Tensor, mine: np.ndarray, global_size: int):
    """(augmented, standardized images on the device, their labels) for this rank's share."""
    cfg, ctx = run.cfg, run.ctx
    batch = host.to(run.device, non_blocking=True)
    if run.randaugment is not None:  # per image on uint8 NCHW, then back to NHWC
        chw = batch.permute(0, 3, 1, 2)
        batch = torch.stack([run.randaugment(img) for img in chw]).permute(0, 2, 3, 1)
    part = None if ctx.world == 1 else (ctx.rank, ctx.world, global_size)
    x = augment(images.unit_tensor(batch), run.gen, cfg.crop_scale, run.mirror.on, cfg.color_jitter, part)
    x = images.standardize_tensor(x, run.prep.mean, run.prep.std).contiguous(memory_format=run.memory_format)
    return x, torch.from_numpy(run.y_train[mine]).to(run.device, non_blocking=True)


def _forward_loss(run: _Run, x: torch.Tensor, y: torch.Tensor, global_size: int):
    """(logits, training loss) under autocast: label-smoothed, class-weighted, mixed up with train.mixup."""
    cfg = run.cfg

    def loss_of(logits, target):
        return F.cross_entropy(logits, target, weight=run.loss_weights, label_smoothing=cfg.label_smoothing)

    with run.autocast():
        if cfg.mixup <= 0:
            logits = run.forward(x)
            return logits, loss_of(logits, y)
        lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
        perm = torch.randperm(global_size, generator=run.gen)  # drawn alike on every rank
        if run.ctx.world > 1:  # pairs within this rank's share
            perm = torch.argsort(perm[run.ctx.rank :: run.ctx.world])
        perm = perm.to(run.device, non_blocking=True)
        logits = run.forward(lam * x + (1 - lam) * x[perm])
        return logits, lam * loss_of(logits, y) + (1 - lam) * loss_of(logits, y[perm])


def _optimizer_step(run: _Run, progress: _Progress) -> None:
    """Clip (train.clip_grad_norm), set the scheduled learning rates, step, and count the step."""
    if run.cfg.clip_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients (a no-op unless fp16)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad_norm)
    factor = lr_factor(progress.step, run.warmup, run.total_steps)
    for group, lr in zip(run.optimizer.param_groups, run.base_lrs, strict=True):
        group["lr"] = lr * factor
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1


def _validate(run: _Run) -> tuple[float, float, float]:
    """(val loss, accuracy, macro F1) over the whole val split; each rank scores its share."""
    scorer = run.forward if run.ctx.world == 1 else run.model  # no DDP hooks outside training
    sums = _evaluate(
        scorer, run.pixels, run.ctx.shard(run.x_val), run.ctx.shard(run.y_val), run.prep, run.device,
        run.cfg.batch_size * 2, run.autocast, len(run.class_names),
        memory_format=run.memory_format, pad=run.policy.cudnn_benchmark,
    )  # fmt: skip
    return _val_metrics(run.ctx.sum(sums, run.device), len(run.class_names))


def _keep_best(run: _Run, progress: _Progress, epoch: int, val_loss: float, val_acc: float) -> None:
    """A val loss lower than the best by more than train.min_delta makes this epoch the best (its
    weights are copied on rank 0); anything else is one more epoch without improvement."""
    if val_loss < progress.best["val_loss"] - run.cfg.min_delta:
        progress.best = {"val_loss": val_loss, "epoch": epoch, "val_accuracy": val_acc}
        if run.ctx.main:
            progress.best_state = {
                k: v.detach().cpu().contiguous().clone() for k, v in run.model.state_dict().items()
            }
        progress.bad_epochs = 0
    else:
        progress.bad_epochs += 1


@torch.no_grad()
def _calibrate(run: _Run, model: torch.nn.Module) -> float | None:
    """Fit a temperature to the best weights' val logits (metrics.fit_temperature) and fold it into
    the classifier (models.scale_logits), so that the checkpoint's probabilities match its accuracy;
    the temperature, None when the val split is empty."""
    # in full precision: a temperature fitted to bf16 logits would carry their rounding
    logits = [
        z for _, z in _plain_logits(
            model, run.pixels, run.x_val, run.prep, run.device, run.cfg.batch_size * 2, nullcontext,
            memory_format=run.memory_format, pad=run.policy.cudnn_benchmark,
        )
    ]  # fmt: skip
    if not logits:
        run.say("confidence not calibrated: the val split is empty")
        return None
    z = torch.cat(logits).cpu().numpy()
    temperature = metrics_.fit_temperature(z, run.y_val)
    models.scale_logits(model, 1.0 / temperature)
    before, after = (metrics_.softmax(z / t).max(1).mean() for t in (1.0, temperature))
    run.say(
        f"confidence calibrated on {len(z)} val images: logits divided by temperature {temperature:.3f}"
        f" (mean top-1 probability {before:.3f} → {after:.3f};"
        f" val accuracy {(z.argmax(1) == run.y_val).mean():.3f})"
    )
    return temperature


ADAPTER = "adapter"  # under the train folder: the LoRA adapter in peft's format, or a note


def _finish(run: _Run, progress: _Progress, model_cfg, base, out: Path, stopped_early: bool, started: float):
    """The best epoch's weights, their confidence calibrated (train.calibrate_confidence), as the
    checkpoint (LoRA merged, its adapter kept beside), history.csv and train.json; the resume state
    is removed."""
    cfg, history, best = run.cfg, progress.history, progress.best
    if progress.best_state is None:
        raise VisiontuneError(
            f"training diverged: val loss was {history[-1]['val_loss']} in every epoch; lower train.lr"
        )
    model = run.model
    model.load_state_dict(progress.best_state)
    temperature = _calibrate(run, model) if cfg.calibrate_confidence else None
    shutil.rmtree(out / ADAPTER, ignore_errors=True)  # never an adapter from an earlier run
    if cfg.method == "lora":
        model.save_pretrained(out / ADAPTER)  # the small file: adapters and the new head only
        model = models.merge_lora(model)
    else:  # the folder is a declared output either way (export reads it for LoRA runs)
        (out / ADAPTER).mkdir(parents=True)
        (out / ADAPTER / "README.md").write_text(f"No LoRA adapter: train.method was {cfg.method}.\n")
    config = {"model": model_cfg.model_dump(), "train": cfg.model_dump(), "seed": base.seed}
    meta = models.checkpoint_meta(model_cfg.name, run.class_names, run.prep, config)
    meta["best_epoch"] = best["epoch"]
    meta["temperature"] = temperature
    meta["image_size_reason"] = run.size.reason
    meta["hflip"], meta["hflip_reason"] = run.mirror.on, run.mirror.reason
    meta["device_policy"] = run.policy.as_dict()
    if isinstance(model, models.LevelProbe):
        meta["probe_levels"] = model.levels
    models.save_checkpoint(model.to("cpu", memory_format=torch.contiguous_format), out, meta)
    with open(out / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    shutil.rmtree(out / RESUME, ignore_errors=True)  # finished: nothing left to resume
    trainable, total = models.count_parameters(run.model)
    result = TrainResult(
        checkpoint=str(out),
        method=cfg.method,
        device=str(run.device),
        best_epoch=best["epoch"],
        epochs_run=len(history),
        stopped_early=stopped_early,
        resumed_from_epoch=progress.resumed_from,
        best_val_loss=best["val_loss"],
        best_val_accuracy=best["val_accuracy"],
        temperature=temperature,
        train_images=len(run.y_train),
        image_size=run.size.size,
        image_size_reason=run.size.reason,
        hflip=run.mirror.on,
        hflip_reason=run.mirror.reason,
        hflip_kept=run.mirror.kept,
        device_policy=run.policy.as_dict(),
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_percent=round(100 * trainable / total, 3),
        images_per_s=float(np.mean([h["images_per_s"] for h in history])),
        seconds=time.perf_counter() - started,
    )
    (out / "train.json").write_text(json.dumps(asdict(result), indent=2))
    return result
