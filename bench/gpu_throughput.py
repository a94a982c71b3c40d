"""Benchmark: the train stage's images/s on a GPU against the same model on data already there.

Run on a machine with a CUDA GPU: `python bench/gpu_throughput.py [--images 4096] [--batch 128]`.
Prints figures; asserts nothing. For each model (resnet18, vit_tiny_patch16_224,
tf_efficientnet_lite0) at 224 px in bf16:
  - stage: the train stage on a folder of JPEG photos (decoded store, read-ahead thread, augmentation
    and normalization on the GPU), images/s as history.csv records it, median of epochs 2..N (the
    first epoch pays for cuDNN's autotuning and the allocator's warm-up);
  - synthetic: the same model, optimizer, autocast and channels-last on random tensors already on
    the GPU, forward + loss + backward + AdamW step, nothing else;
  - ratio stage / synthetic (target ≥ 0.9: the data path is not the bottleneck), and how many
    times one training epoch made the host wait for the GPU (CUDA's sync debug mode; the epoch's
    end and validation read results back, so a few are expected).
Models start from random weights (the figures do not depend on them, and no hub is needed).
`--smoke` runs a tiny version on whatever device there is, to check the script itself.

The components import no orchestration. On a machine with torch, timm, peft, scikit-learn,
scikit-image and pandas but nothing else of visiontune's, carry wheels (Python 3.12, manylinux) of
pydantic, pydantic-core, annotated-types, typing-inspection, pandera, typeguard, ImageHash and
PyWavelets, install them, then `pip install --no-deps --no-build-isolation -e .` and run this.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from visiontune.components.config import BaseConfig, DataConfig, ModelConfig, TrainConfig
from visiontune.components.prepare import prepare
from visiontune.components.train import _build, param_groups, pick_device, train

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import jpeg_folder  # noqa: E402  (a sibling script, not a package)

MODELS = ("resnet18", "vit_tiny_patch16_224", "tf_efficientnet_lite0")


def synthetic(name: str, size: int, batch: int, steps: int, n_classes: int, device: torch.device) -> float:
    """Training images/s of `name` on random tensors already on the device."""
    cfg = TrainConfig(batch_size=batch)
    model, _, _ = _build(cfg, ModelConfig(name=name, pretrained=False, image_size=size), n_classes)
    model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(3, steps // 5)):  # warm-up: autotuning, allocator
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def stage(name: str, size: int, batch: int, epochs: int, prepared: Path, work: Path) -> tuple[float, int]:
    """(median images/s of epochs 2..N, host waits for the GPU during the last run's one epoch)."""
    model_cfg = ModelConfig(name=name, pretrained=False, image_size=size)
    cfg = TrainConfig(epochs=epochs, patience=epochs, batch_size=batch)
    result = train(cfg, model_cfg, BaseConfig(), prepared, work / name, work / "cache", resume="never")
    with open(work / name / "history.csv", newline="") as fh:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(fh)]
    waits = -1
    if torch.cuda.is_available():  # one more epoch, counting the synchronizing calls
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cfg.model_copy(update={"epochs": 1}), model_cfg, BaseConfig(), prepared, work / "sync",
                  work / "cache", resume="never")  # fmt: skip
        torch.cuda.set_sync_debug_mode("default")
        waits = sum("synchroniz" in str(w.message) for w in caught)
    del result
    return statistics.median(rates[1:] or rates), waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="timed synthetic steps")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.batch, args.images, args.epochs, args.steps = 32, 8, 48, 2, 3
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = pick_device("auto")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{device.type}, {os.cpu_count()} cores"
    print(f"device: {name}; {args.size} px, batch {args.batch}, bf16 on CUDA, channels-last")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        prepare(
            DataConfig(source=str(jpeg_folder(work / "jpegs", args.images))), BaseConfig(), 10**8, work / "p"
        )
        print(
            f"{args.images} JPEG photos (256–1024 px) made and prepared in {time.perf_counter() - t0:.0f} s"
        )
        print(f"{'model':<24}{'stage img/s':>13}{'synthetic img/s':>17}{'ratio':>7}{'host waits/epoch':>18}")
        for model in args.models.split(","):
            ours, waits = stage(model, args.size, args.batch, args.epochs, work / "p", work)
            ref = synthetic(model, args.size, args.batch, args.steps, 4, device)
            shown = str(waits) if waits >= 0 else "n/a"
            print(f"{model:<24}{ours:>13.1f}{ref:>17.1f}{ours / ref:>7.2f}{shown:>18}", flush=True)


if __name__ == "__main__":
    main()
