"""The headline CPU figures, rerun and compared with their recorded values (`make bench-check`).

    python bench/check.py                # rerun, compare with bench/results/check.json; exit 1 if worse
    python bench/check.py --record       # rerun and write bench/results/check.json, with its provenance
    python bench/check.py --only audit   # some parts: digits, loop, audit, duplicates, drift

About 8 minutes on 2 CPU cores. The parts:
- digits: the shipped params.yaml on the built-in digits, train.method full, lora and linear (seed 0):
  test accuracy; for full also the epoch at which test accuracy first reaches 0.98 (scored after
  every epoch, untimed) and the seconds to it from the start of the train stage;
- loop: the hand-written PyTorch loop of bench/train_throughput.py (ImageFolder, AdamW 1e-3, no
  schedule) on the same split, to 0.98: its seconds ÷ visiontune's (needs digits). Not 0.99: on
  some CPUs the shipped full run peaks at 0.9888 and never crosses it, which leaves no time to compare;
- audit: the label audit's precision and recall on seeded label flips: digits (5 %) and
  scikit-image's faces (10 %), as bench/label_audit.py measures them;
- duplicates: the near-duplicate search's precision and recall on 300 planted copies in digits
  (bench/duplicates.py);
- drift: the drift detector's false-alarm rate on digits, windows of 50 val ∪ test images
  reshuffled against a reference of the val split's size (bench/drift.py's "null resplit"), using
  the full model trained in the digits part.

Each figure has a direction, a tolerance and sometimes a target (FIGURES). A figure worse than its
recorded value by more than the tolerance, or on the wrong side of its target, is a regression:
the line names the figure, the value now, the recorded value and the commit it was recorded at.
The recorded file holds the command, the commit, the date, the machine and the sha256 of every
file the figures measure; the docs render the figures from it and say when that code has changed
since (docs/hooks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "check.json"
PARTS = ("digits", "loop", "audit", "duplicates", "drift")
BENCH_FILES = (
    "bench/check.py", "bench/train_throughput.py", "bench/label_audit.py", "bench/duplicates.py",
    "bench/drift.py", "bench/real_data.py", "bench/photo_folders.py", "params.yaml",
)  # fmt: skip
STAGES_MEASURED = ("prepare", "validate", "train", "evaluate", "export")


@dataclass(frozen=True)
class Figure:
    what: str
    part: str
    better: str  # "higher" or "lower"
    tolerance: float  # how much worse than recorded still passes (absolute, or relative when `relative`)
    target: float | None = None  # a promise of its own: the figure must be on the right side of it
    relative: bool = False
    fmt: str = ".4f"


TEST_IMAGES = 3  # accuracy tolerance, in digits' 269 test images: CPUs with other vector units round
# differently and the runs drift apart (1 to 3 images between two machines, the same code and seed)
ACC = round(TEST_IMAGES / 269 + 1e-4, 4)
TARGET = 0.98  # the accuracy whose first crossing times the run: both loops pass it on every run seen

FIGURES = {
    "digits.full.test_accuracy": Figure("digits, shipped params, full fine-tuning: test accuracy", "digits",
                                        "higher", ACC),
    "digits.lora.test_accuracy": Figure("digits, shipped params, LoRA: test accuracy", "digits",
                                        "higher", ACC),
    "digits.linear.test_accuracy": Figure("digits, shipped params, linear probe: test accuracy", "digits",
                                          "higher", ACC, 0.95),
    "digits.full.epochs_to_0.98": Figure("digits, full: first epoch with test accuracy ≥ 0.98", "digits",
                                         "lower", 1, fmt=".0f"),
    "digits.full.seconds_to_0.98": Figure("digits, full: train-stage seconds to test accuracy 0.98",
                                          "digits", "lower", 0.6, relative=True, fmt=".1f"),
    "loop.epochs_to_0.98": Figure("hand-written loop: first epoch with test accuracy ≥ 0.98", "loop",
                                  "lower", 99, fmt=".0f"),
    "loop.speedup_to_0.98": Figure("time to 0.98: hand-written loop's seconds ÷ visiontune's", "loop",
                                   "higher", 0.4, relative=True, fmt=".2f"),
    "audit.digits.precision": Figure("label audit, digits with 5 % of labels flipped: precision", "audit",
                                     "higher", 0.05, fmt=".3f"),
    "audit.digits.recall": Figure("label audit, digits with 5 % flipped: recall", "audit", "higher", 0.05,
                                  fmt=".3f"),
    "audit.faces.precision": Figure("label audit, faces with 10 % flipped: precision", "audit", "higher",
                                    0.1, fmt=".3f"),
    "audit.faces.recall": Figure("label audit, faces with 10 % flipped: recall", "audit", "higher", 0.1,
                                 fmt=".3f"),
    "duplicates.digits.precision": Figure("near duplicates, 300 copies planted in digits: precision",
                                          "duplicates", "higher", 0.02, fmt=".3f"),
    "duplicates.digits.recall": Figure("near duplicates, 300 copies planted in digits: recall",
                                       "duplicates", "higher", 0.02, fmt=".3f"),
    "drift.digits.false_alarms": Figure("drift, digits, 200 null windows of 50 images: false-alarm rate "
                                        "(alpha 0.05)", "drift", "lower", 0.05, 0.1, fmt=".3f"),
}  # fmt: skip


# ---- provenance ------------------------------------------------------------------------------------


def measured_files() -> list[str]:
    """The files whose code the figures measure: the benches, params.yaml and the stages' code."""
    from visiontune.pipelines import codedeps

    code = {f for stage in STAGES_MEASURED for f in codedeps.stage_code(stage)}
    return sorted(set(BENCH_FILES) | code)


def file_hashes(files: list[str], root: Path = ROOT) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def provenance(command: str, files: list[str] | None = None) -> dict:
    """Who measured what, where: the command, the commit (and whether the tree had changes), the
    date, the machine, and the sha256 of every measured file (`files`, else measured_files())."""
    import platform

    import torch

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    files = measured_files() if files is None else files
    dirty = bool(_git("status", "--porcelain", "--", *files))
    return {
        "command": command,
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "uncommitted_changes": dirty,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "files": file_hashes(files),
    }


# ---- the parts -------------------------------------------------------------------------------------


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def digits_part(work: Path) -> tuple[dict[str, float], dict]:
    """The shipped params on digits, three methods; the full run scored on the test split each epoch."""
    import torch
    from train_throughput import _test_scorer

    from visiontune.components import images, manifest
    from visiontune.components import model as models
    from visiontune.components.config import load_params
    from visiontune.components.train import train
    from visiontune.pipelines import stages

    params = load_params(ROOT / "params.yaml", {})
    layout = stages.Layout(work / "prepared")
    with _quiet():
        stages.prepare(params, layout)
        stages.validate(params, layout)
    frame = manifest.read(layout.prepare / "manifest.csv")
    test = frame[frame["split"] == "test"]
    figures: dict[str, float] = {}
    state: dict = {"layout": layout, "params": params}
    for method in ("full", "lora", "linear"):
        p = params.model_copy(update={"train": params.train.model_copy(update={"method": method})})
        marks: list[tuple[int, float, float]] = []
        hook = None
        if method == "full":  # scored after every epoch with the throughput bench's hook, never stopping
            size = stages.image_size(p, layout.prepare)
            _, prep = models.create(p.model.model_copy(update={"image_size": size, "pretrained": False}),
                                    num_classes=frame["label"].nunique())  # fmt: skip
            classes = manifest.class_names(frame)
            y = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
            x = torch.from_numpy(
                images.normalize(images.load_batch(test["path"].tolist(), size), prep.mean, prep.std)
            )
            hook, marks = _test_scorer(x, y, float("inf"))
        started = time.perf_counter()
        with _quiet():
            train(p.train, p.model, p.base, layout.prepare, layout.train, layout.cache, "never", hook)
            seconds = time.perf_counter() - started
            metrics = stages.evaluate(p, layout).metrics
        figures[f"digits.{method}.test_accuracy"] = metrics["test_accuracy"]
        print(f"  {method}: test accuracy {metrics['test_accuracy']:.4f} ({seconds:.0f} s)", flush=True)
        if method == "full":
            reached = next(((e, s) for e, s, a in marks if a >= TARGET), (float("inf"), float("inf")))
            figures["digits.full.epochs_to_0.98"], figures["digits.full.seconds_to_0.98"] = reached
            print(
                "  full, test accuracy by epoch: " + ", ".join(f"e{e} {a:.4f}@{s:.0f}s" for e, s, a in marks)
            )
            state["full_checkpoint"] = work / "full-checkpoint"
            shutil.copytree(layout.train, state["full_checkpoint"])
    return figures, state


def loop_part(work: Path, state: dict, figures: dict[str, float]) -> dict[str, float]:
    """The hand-written loop to TARGET on the digits split of the digits part."""
    from photo_folders import split_folders
    from train_throughput import reference

    folders = split_folders(state["layout"].prepare, work / "folders")
    ref = reference(folders, 64, 15, 32, 1e-3, 0, work / "loop.pt", target=TARGET)
    print(
        "  loop, test accuracy by epoch: " + ", ".join(f"e{e} {a:.4f}@{s:.0f}s" for e, s, a in ref["marks"])
    )
    reached = next((e for e, _, a in ref["marks"] if a >= TARGET), float("inf"))
    seconds = ref["reached"] if ref["reached"] is not None else float("inf")
    return {
        "loop.epochs_to_0.98": reached,
        "loop.speedup_to_0.98": seconds / figures["digits.full.seconds_to_0.98"],
    }


def audit_part(work: Path) -> dict[str, float]:
    from label_audit import _embedded, flip

    from visiontune.components.audit import find_issues

    out = {}
    for name, rate in (("digits", 0.05), ("faces", 0.10)):
        with _quiet():
            features, truth = _embedded(name, work / "audit")
        labels, flipped = flip(truth, rate, 0)
        found = find_issues(features, labels, folds=5, seed=0)
        hit = int(flipped[found.flagged].sum())
        out[f"audit.{name}.precision"] = hit / len(found.flagged) if len(found.flagged) else 0.0
        out[f"audit.{name}.recall"] = hit / int(flipped.sum())
    return out


def duplicates_part(work: Path) -> dict[str, float]:
    from duplicates import one_dataset

    with _quiet():
        found = one_dataset("digits", work / "dups", 300, use_embedding=False, seed=0)
    return {
        "duplicates.digits.precision": found["precision"],
        "duplicates.digits.recall": float(found["recall"]),
    }


def drift_part(state: dict) -> dict[str, float]:
    from drift import embed_all, rates

    from visiontune.components import images, manifest
    from visiontune.components import model as models

    model, meta = models.load_checkpoint(state["full_checkpoint"])
    prep = models.preprocessing_of(meta)
    frame = manifest.read(state["layout"].prepare / "manifest.csv")
    index = {c: i for i, c in enumerate(meta["class_names"])}
    data: dict = {"class_names": np.array(meta["class_names"], dtype=str)}
    for split in ("val", "test"):
        rows = frame[frame["split"] == split]
        data[f"{split}/y"] = rows["label"].map(index).to_numpy()
        data[f"{split}/emb"], data[f"{split}/probs"] = embed_all(
            model, prep, images.load_batch(rows["path"].tolist(), prep.size)
        )
    table = rates(data, None, ["null resplit"], [50], 200, 500, "split", None)
    return {"drift.digits.false_alarms": table["null resplit"][50]["ALL"]}


def measure(parts: set[str], work: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    state: dict = {}
    for part in PARTS:
        if part not in parts:
            continue
        t = time.perf_counter()
        print(f"{part} …", flush=True)
        if part == "digits":
            got, state = digits_part(work)
        elif part == "loop":
            got = loop_part(work, state, figures)
        elif part == "audit":
            got = audit_part(work)
        elif part == "duplicates":
            got = duplicates_part(work)
        else:
            got = drift_part(state)
        figures |= got
        print(f"{part}: {time.perf_counter() - t:.0f} s", flush=True)
    return figures


# ---- compare and record ------------------------------------------------------------------------------


def regressions(now: dict[str, float], recorded: dict) -> list[str]:
    """One line per figure that got worse than recorded beyond its tolerance, or missed its target."""
    lines = []
    commit = recorded.get("commit", "unknown")[:12]
    for name, value in now.items():
        fig = FIGURES[name]
        sign = 1 if fig.better == "higher" else -1
        shown = f"{value:{fig.fmt}}"
        if fig.target is not None and sign * (value - fig.target) < 0:
            lines.append(f"{name} = {shown}: misses its target {fig.target} ({fig.what})")
        was = recorded.get("figures", {}).get(name, {}).get("value")
        if was is None:
            continue
        allowed = fig.tolerance * abs(was) if fig.relative else fig.tolerance
        if sign * (value - was) < -allowed - 1e-12:
            tolerance = f"{fig.tolerance}{' (relative)' if fig.relative else ''}"
            lines.append(
                f"{name} = {shown}: worse than {was:{fig.fmt}} recorded at commit {commit} "
                f"by more than its tolerance {tolerance} ({fig.what})"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write bench/results/check.json")
    parser.add_argument("--only", default=",".join(PARTS), help="parts: " + ",".join(PARTS))
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    if parts & {"loop", "drift"} and "digits" not in parts:
        parser.error("loop and drift use the digits part's run: add digits to --only")
    if args.record and parts != set(PARTS):
        parser.error("--record measures every part")
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    recorded = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        now = measure(parts, Path(tmp))
    print(f"\n{'figure':<32}{'now':>10}{'recorded':>10}  target")
    for name, value in now.items():
        fig, was = FIGURES[name], recorded.get("figures", {}).get(name, {}).get("value")
        shown_was = "—" if was is None else f"{was:{fig.fmt}}"
        print(
            f"{name:<32}{value:>10{fig.fmt}}{shown_was:>10}  {fig.target if fig.target is not None else ''}"
        )
    failed = regressions(now, recorded)
    if args.record:
        command = "python bench/check.py --record"
        figures = {n: {"value": v, **asdict(FIGURES[n])} for n, v in now.items()}
        record = {**provenance(command), "seconds": round(time.perf_counter() - started), "figures": figures}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
        print(f"recorded in {RESULTS.relative_to(ROOT)} ({record['seconds']} s)")
        failed = [line for line in failed if "misses its target" in line]
    for line in failed:
        print(f"REGRESSION {line}")
    print(f"{len(now) - len(failed)} of {len(now)} figures hold ({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
