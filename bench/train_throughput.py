"""Benchmark: the train stage against a hand-written PyTorch loop, whole stage against whole stage.

Run: `python bench/train_throughput.py [--epochs 3] [--jpegs 400] [--repeats 3] [--sections 1,2,3]
[--ref-workers auto] [--threads 1] [--smoke]`. Prints figures; asserts nothing.

Both sides are timed by the wall clock from the start of their train stage to its end, decoding
included. visiontune: `train()` (manifest, model build, decoding every image once into a fresh
store, which is also timed on its own, epochs with a val pass each, checkpoint). The reference is
what people write by hand: torchvision ImageFolder, PIL decode every epoch, RandomResizedCrop +
ToTensor + Normalize, AdamW at one learning rate, no schedule, a val pass each epoch keeping the
best weights (as the stage does), and a DataLoader with the worker count (0, 1 or 2) that trained
fastest on this machine (measured first, or --ref-workers N). Both train the embedded
EfficientNet-Lite0 with a new head, with the same batch size, resolution, epochs, torch threads and
split; test accuracy is scored afterwards, untimed. Torch gets --threads intra-op threads (1 by
default: on 2 cores shared with other work, 2 threads stalled each other, 5-7 training images/s
against 40-60 with 1 thread at load average 3-4). The sides alternate (reference, visiontune,
reference, ...) for --repeats rounds, and each figure is the median with its min–max, because the
cores may be shared. Sections:
  1. whole-stage wall time, decode share and per-epoch images/s on the digits folder and on a
     folder of full-size JPEG photos (256–1024 px);
  2. time to 0.99 test accuracy on digits (visiontune: default params), whole stage on both sides;
  3. each train.method on digits with default params: time, test accuracy, trainable share.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from photo_folders import photo_folder, split_folders
from stage_timing import timed_decoding

from visiontune.components import images, manifest
from visiontune.components import model as models
from visiontune.components.config import BaseConfig, DataConfig, ModelConfig, TrainConfig, ValidateConfig
from visiontune.components.evaluate import batches
from visiontune.components.prepare import materialize_digits, prepare
from visiontune.components.train import train

WORKER_CHOICES = (0, 1, 2)


def reference(
    folders: dict[str, Path],
    size: int,
    epochs: int,
    batch: int,
    lr: float,
    workers: int,
    out: Path,
    target: float | None = None,
) -> dict:
    """The hand-written loop, timed from its first line to its saved weights (test scoring excluded).

    Returns wall seconds, mean per-epoch train images/s, test accuracy of the best-val-loss weights
    (or, with `target`, of the last epoch's) and the seconds at which test accuracy reached `target`.
    """
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    start, excluded = time.perf_counter(), 0.0
    torch.manual_seed(0)
    classes = sorted(p.name for p in folders["train"].iterdir())
    model, prep = models.create(ModelConfig(image_size=size), num_classes=len(classes))
    norm = transforms.Normalize(prep.mean, prep.std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size, scale=(0.8, 1.0)), transforms.ToTensor(), norm]
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    keep = workers > 0  # persistent_workers needs workers
    train_ds = datasets.ImageFolder(folders["train"], transform=train_tf)
    val_ds = datasets.ImageFolder(folders["val"], transform=eval_tf)
    loader = DataLoader(train_ds, batch, shuffle=True, num_workers=workers, persistent_workers=keep)
    val_loader = DataLoader(val_ds, 2 * batch, num_workers=workers, persistent_workers=keep)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def accuracy_and_loss(data) -> tuple[float, float]:
        model.eval()
        hits, loss, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in data:
                logits = model(x)
                hits += (logits.argmax(1) == y).sum().item()
                loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                n += len(y)
        return hits / n, loss / n

    def score_test() -> float:  # the reference's own test pipeline
        test_ds = datasets.ImageFolder(folders["test"], transform=eval_tf)
        return accuracy_and_loss(DataLoader(test_ds, batch_size=2 * batch, num_workers=workers))[0]

    rates, best_loss, best, reached, acc, marks = [], float("inf"), None, None, None, []
    for _ in range(epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - t0))
        _, val_loss = accuracy_and_loss(val_loader)
        if val_loss < best_loss:
            best_loss, best = val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if target is not None:
            t = time.perf_counter()
            elapsed = t - start - excluded
            acc = score_test()  # not timed
            excluded += time.perf_counter() - t
            marks.append((len(rates), elapsed, acc))
            if acc >= target:
                reached = elapsed
                break
    torch.save(best, out)  # the stage writes its checkpoint too
    wall = time.perf_counter() - start - excluded
    if target is None:
        model.load_state_dict(best)
        acc = score_test()
    result = {"wall": wall, "decode": None, "ips": float(np.mean(rates)), "acc": acc, "reached": reached}
    return {**result, "marks": marks}


def ours(
    prepared: Path, work: Path, size: int, cfg: TrainConfig, on_epoch_end=None, score: bool = True
) -> dict:
    """The train stage into a fresh folder and a fresh decoded store; test accuracy afterwards
    (untimed). Returns wall seconds, decode seconds, mean per-epoch images/s, accuracy."""
    with timed_decoding() as spent:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the stage's own progress lines
            result = train(
            cfg, ModelConfig(image_size=size), BaseConfig(), prepared, work / "train", work / "store",
            resume="never", on_epoch_end=on_epoch_end,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    with open(work / "train" / "history.csv") as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    acc = test_accuracy(prepared, work / "train") if score else None
    return {"wall": wall, "decode": sum(spent), "ips": float(np.mean(rates)), "acc": acc, "result": result}


def test_accuracy(prepared: Path, checkpoint: Path) -> float:
    """The checkpoint's test accuracy through the shared preprocessing (what `evaluate` reports)."""
    frame = manifest.read(prepared / "manifest.csv")
    test = frame[frame["split"] == "test"]
    model, meta = models.load_checkpoint(checkpoint)
    prep = models.preprocessing_of(meta)
    logits = models.predict_logits(model, batches(test["path"].tolist(), prep.size, prep.mean, prep.std, 64))
    index = {name: i for i, name in enumerate(meta["class_names"])}
    return float((logits.argmax(1) == test["label"].map(index).to_numpy()).mean())


def spread(values: list[float], fmt: str = ".1f") -> str:
    """median (min–max) of the values, or the one value."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:{fmt}}"
    return f"{med:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} on {torch.get_num_threads()} "
        f"threads, load average {load} at the start; the cores are shared with other work"
    )


def pick_workers(folders: dict[str, Path], size: int, work: Path, repeats: int) -> int:
    """The DataLoader worker count (0, 1, 2) with the shortest 1-epoch reference stage, rounds interleaved."""
    walls: dict[int, list[float]] = {w: [] for w in WORKER_CHOICES}
    for r in range(repeats):
        for w in WORKER_CHOICES:
            walls[w].append(reference(folders, size, 1, 32, 1e-3, w, work / f"pick_{w}_{r}.pt")["wall"])
        shown = ", ".join(f"{w}: {walls[w][-1]:.1f} s" for w in WORKER_CHOICES)
        print(f"   pick round {r + 1}, workers {shown}; load average {os.getloadavg()[0]:.1f}")
    best = min(WORKER_CHOICES, key=lambda w: statistics.median(walls[w]))
    shown = ", ".join(f"{w}: {spread(walls[w])} s" for w in WORKER_CHOICES)
    print(f"   reference DataLoader workers, 1-epoch stage wall over {repeats} rounds: {shown} → {best}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--jpegs", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per comparison")
    parser.add_argument("--sections", default="1,2,3", help="e.g. 2 or 1,3; 0: only the worker pick")
    parser.add_argument("--pick-repeats", type=int, default=2, help="rounds of the reference worker pick")
    parser.add_argument("--ref-workers", default="auto", help="reference DataLoader workers: auto, 0, 1, 2")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    parser.add_argument("--datasets", default="digits,photos", help="section 1's datasets: digits, photos")
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 48 photos, 1 round, section 1 only")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # lines as they come, also into a file
    if args.smoke:
        args.epochs, args.jpegs, args.repeats, args.sections, args.datasets = 1, 48, 1, "1", "photos"
        args.pick_repeats = 1
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the figures
    torch.set_num_threads(args.threads)  # both sides: the same torch threads
    sections = {int(x) for x in args.sections.split(",")}
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        datasets = {}
        wanted = set(args.datasets.split(","))
        if "digits" in wanted or sections & {2, 3}:
            source = materialize_digits(work / "digits")
            prepare(
                DataConfig(source=str(source)), BaseConfig(), ValidateConfig(max_pixels=10**8), work / "pd"
            )
            digits = split_folders(work / "pd", work / "ref_digits")
            datasets["digits"] = ("digits (64 px)", work / "pd", digits, 64)
        if sections & {0, 1} and "photos" in wanted:
            source = photo_folder(work / "jpegs", args.jpegs)
            prepare(
                DataConfig(source=str(source)), BaseConfig(), ValidateConfig(max_pixels=10**8), work / "pj"
            )
            photos = split_folders(work / "pj", work / "ref_jpegs")
            datasets["photos"] = (f"JPEG photos ({args.jpegs}, 96 px)", work / "pj", photos, 96)
        print(f"(prepare of the inputs, not timed below: {time.perf_counter() - t0:.1f} s)")

        chosen: dict[int, int] = {}
        if 0 in sections:
            for name, _, folders, size in (d for key, d in datasets.items() if key in wanted):
                print(f"\n0. reference DataLoader workers for {name}")
                warm_up(size)
                pick_workers(folders, size, work, args.pick_repeats)
        if 1 in sections:
            chosen = throughput(args, work, [d for key, d in datasets.items() if key in wanted])
        if 2 in sections:
            tta(args, work, datasets["digits"][2], chosen.get(64))
        if 3 in sections:
            methods(work)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def warm_up(size: int) -> None:
    """Untimed: the first model build and the first training step's kernels, before either side runs."""
    model, _ = models.create(ModelConfig(image_size=size), num_classes=10)
    for memory in (torch.contiguous_format, torch.channels_last):  # the reference's and the stage's
        x = torch.zeros(8, 3, size, size).contiguous(memory_format=memory)
        torch.nn.functional.cross_entropy(
            model.to(memory_format=memory)(x), torch.zeros(8, dtype=torch.long)
        ).backward()


def workers_for(args, folders: dict[str, Path], size: int, work: Path) -> int:
    if args.ref_workers != "auto":
        return int(args.ref_workers)
    return pick_workers(folders, size, work, args.pick_repeats)


def throughput(args, work: Path, datasets: list) -> dict[int, int]:
    print(
        f"\n1. whole train stage, {args.epochs} epochs, batch 32; {args.repeats} interleaved rounds, "
        "median (min–max)"
    )
    chosen = {}
    rows = []
    for name, prepared, folders, size in datasets:
        print(f"{name}:")
        warm_up(size)
        workers = chosen[size] = workers_for(args, folders, size, work)
        cfg = TrainConfig(epochs=args.epochs, patience=args.epochs)
        runs: dict[str, list[dict]] = {"reference": [], "visiontune": []}
        for r in range(args.repeats):  # A, B, A, B, ...
            out = work / f"ref_{size}_{r}.pt"
            runs["reference"].append(reference(folders, size, args.epochs, 32, 1e-3, workers, out))
            runs["visiontune"].append(ours(prepared, work / f"ours_{size}_{r}", size, cfg))
            ref, mine = runs["reference"][-1], runs["visiontune"][-1]
            print(
                f"   round {r + 1}: reference {ref['wall']:.1f} s, visiontune {mine['wall']:.1f} s "
                f"(decode {mine['decode']:.1f} s); load average {os.getloadavg()[0]:.1f}"
            )
        rows.append((name, workers, runs))
    print(
        f"\n{'dataset':<28}{'loop':<22}{'stage wall s':>22}{'of it decode s':>20}{'epoch img/s':>22}"
        f"{'test acc':>26}"
    )
    for name, workers, runs in rows:
        for loop, label in (("reference", f"reference ({workers} wkr)"), ("visiontune", "visiontune")):
            rs = runs[loop]
            decode = spread([r["decode"] for r in rs]) if rs[0]["decode"] is not None else "in epochs"
            print(
                f"{name:<28}{label:<22}{spread([r['wall'] for r in rs]):>22}{decode:>20}"
                f"{spread([r['ips'] for r in rs]):>22}{spread([r['acc'] for r in rs], '.4f'):>26}"
            )
            name = ""
        ref_wall = statistics.median(r["wall"] for r in runs["reference"])
        our_wall = statistics.median(r["wall"] for r in runs["visiontune"])
        paired = [a["wall"] / b["wall"] for a, b in zip(runs["reference"], runs["visiontune"], strict=True)]
        share = statistics.median(r["decode"] / r["wall"] for r in runs["visiontune"])
        print(
            f"{'':<28}reference / visiontune wall time: {ref_wall / our_wall:.2f}× (per round: "
            f"{', '.join(f'{p:.2f}' for p in paired)}); decode is {100 * share:.0f} % of visiontune's stage"
        )
    return chosen


class Reached(Exception):
    """Raised by the scoring hook to end a train stage once it reached the target accuracy."""


def _test_scorer(x_test: torch.Tensor, y: np.ndarray, target: float):
    """An on_epoch_end hook recording (epoch, stage seconds less scoring, test accuracy), and its list;
    the clock starts when the hook is made; it raises Reached at `target`."""
    marks: list[tuple[int, float, float]] = []
    start, excluded = time.perf_counter(), 0.0

    def score(epoch: int, model: torch.nn.Module) -> None:
        nonlocal excluded
        t = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1).numpy() == y).mean())
        model.train(was_training)
        marks.append((epoch, t - start - excluded, acc))
        excluded += time.perf_counter() - t
        if acc >= target:
            raise Reached

    return score, marks


def tta(args, work: Path, digits: dict[str, Path], workers: int | None) -> None:
    print(
        "\n2. time to 0.99 test accuracy on digits, from the start of the train stage on both sides "
        f"(decode included; test scoring after each epoch not timed); {args.repeats} interleaved rounds"
    )
    warm_up(64)
    if workers is None:
        workers = workers_for(args, digits, 64, work)
    frame = manifest.read(work / "pd" / "manifest.csv")
    test = frame[frame["split"] == "test"]
    classes = manifest.class_names(frame)
    y = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    pixels = images.load_batch(test["path"].tolist(), 64)
    _, prep = models.create(ModelConfig(image_size=64), num_classes=len(classes))
    x_test = torch.from_numpy(images.normalize(pixels, prep.mean, prep.std))
    ours_at, ref_at, traces, ref_traces = [], [], [], []
    for r in range(args.repeats):
        ref = reference(digits, 64, 15, 32, 1e-3, workers, work / f"tta_ref_{r}.pt", target=0.99)
        ref_at.append(ref["reached"])
        ref_traces.append(", ".join(f"e{e} {a:.3f}@{s:.0f}s" for e, s, a in ref["marks"]))
        score, marks = _test_scorer(x_test, y, 0.99)
        with contextlib.suppress(Reached):  # no need to train on once it is reached
            ours(work / "pd", work / f"tta_{r}", 64, TrainConfig(), on_epoch_end=score, score=False)
        ours_at.append(next((s for _, s, a in marks if a >= 0.99), None))
        traces.append(", ".join(f"e{e} {a:.3f}@{s:.0f}s" for e, s, a in marks))

    def shown(values: list) -> str:
        got = [v for v in values if v is not None]
        missed = len(values) - len(got)
        text = spread(got) + " s" if got else "not reached"
        return text + (f", not reached in {missed} of {len(values)} rounds" if missed else "")

    print(f"visiontune  default params: {shown(ours_at)}")
    for trace in traces:
        print(f"            {trace}")
    print(f"reference   AdamW 1e-3, {workers} DataLoader workers, up to 15 epochs: {shown(ref_at)}")
    for trace in ref_traces:
        print(f"            {trace}")
    if all(ours_at) and all(ref_at):
        print(f"ratio reference / visiontune: {statistics.median(ref_at) / statistics.median(ours_at):.2f}×")


def methods(work: Path) -> None:
    print("\n3. train.method on digits, default params (64 px, up to 10 epochs, early stopping)")
    print(f"{'method':<8}{'seconds':>9}{'test acc':>10}{'trainable %':>13}{'epochs':>8}")
    for method in ("full", "lora", "linear"):
        run = ours(work / "pd", work / f"m_{method}", 64, TrainConfig(method=method))
        result = run["result"]
        print(
            f"{method:<8}{run['wall']:>9.1f}{run['acc']:>10.4f}{result.trainable_percent:>13.2f}"
            f"{result.epochs_run:>8}"
        )


if __name__ == "__main__":
    main()
