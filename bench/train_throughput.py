"""Benchmark: the train stage against a plain PyTorch loop, side by side in one run.

Run: `python bench/train_throughput.py [--epochs 3] [--jpegs 400] [--skip-methods]`
Prints figures; asserts nothing. The reference is what people write by hand: torchvision
ImageFolder, PIL decode every epoch, RandomResizedCrop + ToTensor + Normalize, a DataLoader with
2 worker processes, AdamW at one learning rate, no schedule. Both train the same model (the
embedded EfficientNet-Lite0 with a new head) with the same batch size, resolution and epochs on
the same split. Sections:
  1. throughput on the digits folder and on a folder of full-size JPEG photos (256–1024 px);
  2. time to 0.99 test accuracy on digits (visiontune: default params, whole train stage);
  3. each train.method on digits with default params: time, test accuracy, trainable share.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visiontune.components import manifest
from visiontune.components import model as models
from visiontune.components.config import BaseConfig, DataConfig, EvaluateConfig, ModelConfig, TrainConfig
from visiontune.components.evaluate import evaluate
from visiontune.components.prepare import materialize_digits, prepare
from visiontune.components.train import train


def jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEG photos of 256–1024 px: random crops of four scikit-image photos, one class each."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = {name: getattr(data, name)() for name in ("astronaut", "coffee", "rocket", "hubble_deep_field")}
    for i in range(n):
        name = list(sources)[i % len(sources)]
        photo = sources[name]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        side = int(rng.integers(256, 1025))
        crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((side, int(side * ch / cw)))
        (root / name).mkdir(parents=True, exist_ok=True)
        crop.save(root / name / f"{i:05d}.jpg", quality=90)
    return root


def split_folders(prepared: Path, out: Path) -> dict[str, Path]:
    """ImageFolder trees (symlinks) for the manifest's splits, so both loops see the same split."""
    frame = manifest.read(prepared / "manifest.csv")
    for row in frame.itertuples():
        link = out / row.split / row.label / f"{row.Index:06d}{Path(row.path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(row.path).absolute())
    return {s: out / s for s in ("train", "val", "test")}


def reference(folders: dict[str, Path], size: int, epochs: int, batch: int, lr: float, target=None):
    """The hand-written loop: (train images/s, test accuracy, seconds to target or None, train seconds)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    classes = sorted(p.name for p in folders["train"].iterdir())
    model, prep = models.create(ModelConfig(image_size=size), num_classes=len(classes))
    norm = transforms.Normalize(prep.mean, prep.std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size, scale=(0.8, 1.0)), transforms.ToTensor(), norm]
    )
    test_tf = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    train_ds = datasets.ImageFolder(folders["train"], transform=train_tf)
    test_ds = datasets.ImageFolder(folders["test"], transform=test_tf)
    loader = DataLoader(train_ds, batch_size=batch, shuffle=True, num_workers=2, persistent_workers=True)
    test_loader = DataLoader(test_ds, batch_size=64, num_workers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def test_accuracy() -> float:
        model.eval()
        hits = 0
        with torch.no_grad():
            for x, y in test_loader:
                hits += (model(x).argmax(1) == y).sum().item()
        return hits / len(test_ds)

    train_seconds, seen, reached, acc = 0.0, 0, None, 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        train_seconds += time.perf_counter() - t0
        if target is not None or _ == epochs - 1:
            acc = test_accuracy()  # not timed
            if target is not None and acc >= target and reached is None:
                reached = train_seconds
                break
    return seen / train_seconds, acc, reached, train_seconds


def ours(prepared: Path, work: Path, size: int, cfg: TrainConfig) -> tuple[float, float, float, object]:
    """The train stage. Returns (train images/s, test accuracy, stage wall seconds, result)."""
    t0 = time.perf_counter()
    result = train(cfg, ModelConfig(image_size=size), BaseConfig(), prepared, work / "train", work / "cache")
    seconds = time.perf_counter() - t0
    metrics = evaluate(EvaluateConfig(), prepared, work / "train", work / "eval").metrics
    return result.images_per_s, metrics["test_accuracy"], seconds, result


def time_to_accuracy(prepared: Path, work: Path, target: float) -> tuple[float | None, str]:
    """Seconds from the start of the train stage until test accuracy first reaches `target`."""
    from visiontune.components import images

    frame = manifest.read(prepared / "manifest.csv")
    test = frame[frame["split"] == "test"]
    classes = manifest.class_names(frame)
    y = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    pixels = images.load_batch(test["path"].tolist(), 64)
    _, prep = models.create(ModelConfig(image_size=64), num_classes=len(classes))
    marks: list[tuple[int, float, float]] = []
    start, excluded = time.perf_counter(), 0.0

    def score(epoch: int, model: torch.nn.Module) -> None:
        nonlocal excluded
        t = time.perf_counter()
        was_training = model.training
        model.eval()
        x = images.normalize(pixels, prep.mean, prep.std)
        with torch.no_grad():
            acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        model.train(was_training)
        marks.append((epoch, t - start - excluded, acc))
        excluded += time.perf_counter() - t

    train(
        TrainConfig(),
        ModelConfig(image_size=64),
        BaseConfig(),
        prepared,
        work,
        work / "cache",
        on_epoch_end=score,
    )
    trace = ", ".join(f"e{e} {a:.3f}@{s:.0f}s" for e, s, a in marks)
    return next((s for _, s, a in marks if a >= target), None), f"per epoch: {trace}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--jpegs", type=int, default=400)
    parser.add_argument("--sections", default="1,2,3", help="which sections to run, e.g. 2 or 1,3")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the figures
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(DataConfig(source=str(materialize_digits(work / "digits"))), BaseConfig(), 10**8, work / "pd")
        prepare(
            DataConfig(source=str(jpeg_folder(work / "jpegs", args.jpegs))), BaseConfig(), 10**8, work / "pj"
        )
        digits = split_folders(work / "pd", work / "ref_digits")
        photos = split_folders(work / "pj", work / "ref_jpegs")

        sections = {int(x) for x in args.sections.split(",")}
        if 1 in sections:
            throughput(args, work, digits, photos)
        if 2 in sections:
            tta(work, digits)
        if 3 in sections:
            methods(work)


def throughput(args, work: Path, digits: dict[str, Path], photos: dict[str, Path]) -> None:
    print(f"1. throughput, {args.epochs} epochs, batch 32, {os.cpu_count()} CPU cores")
    print(f"{'dataset':<30}{'loop':<12}{'train img/s':>12}{'wall s':>8}{'test acc':>10}{'ratio':>8}")
    for name, prepared, folders, size in (
        ("digits (64 px)", work / "pd", digits, 64),
        (f"JPEG photos ({args.jpegs}, 96 px)", work / "pj", photos, 96),
    ):
        cfg = TrainConfig(epochs=args.epochs, patience=args.epochs)
        our_ips, our_acc, our_wall, _ = ours(prepared, work / f"ours_{size}", size, cfg)
        ref_ips, ref_acc, _, ref_wall = reference(folders, size, args.epochs, 32, 1e-3)
        print(f"{name:<30}{'reference':<12}{ref_ips:>12.1f}{ref_wall:>8.1f}{ref_acc:>10.4f}")
        print(
            f"{'':<30}{'visiontune':<12}{our_ips:>12.1f}{our_wall:>8.1f}{our_acc:>10.4f}"
            f"{our_ips / ref_ips:>7.2f}×"
        )


def tta(work: Path, digits: dict[str, Path]) -> None:
    print("\n2. time to 0.99 test accuracy on digits (test scoring after each epoch is not timed)")
    reached_at, trace = time_to_accuracy(work / "pd", work / "tta", 0.99)
    shown = f"{reached_at:.1f} s" if reached_at is not None else "not reached"
    print(f"visiontune  default params, from the stage's start (decode included): {shown}")
    print(f"            {trace}")
    _, ref_acc, reached, _ = reference(digits, 64, 15, 32, 1e-3, target=0.99)
    shown = f"{reached:.1f} s" if reached is not None else "not reached in 15 epochs"
    print(f"reference   AdamW 1e-3, epochs only: {shown} (last test accuracy {ref_acc:.4f})")
    if reached and reached_at:
        print(f"ratio visiontune / reference: {reached_at / reached:.2f}")


def methods(work: Path) -> None:
    print("\n3. train.method on digits, default params (64 px, up to 10 epochs, early stopping)")
    print(f"{'method':<8}{'seconds':>9}{'test acc':>10}{'trainable %':>13}{'epochs':>8}")
    for method in ("full", "lora", "linear"):
        _, acc, seconds, result = ours(work / "pd", work / f"m_{method}", 64, TrainConfig(method=method))
        print(
            f"{method:<8}{seconds:>9.1f}{acc:>10.4f}{result.trainable_percent:>13.2f}{result.epochs_run:>8}"
        )


if __name__ == "__main__":
    main()
