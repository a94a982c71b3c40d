"""Benchmark: the shipped params.yaml beside other settings, on several real datasets.

    python bench/defaults.py                      # the datasets and variants below, seeds 0, 1, 2
    python bench/defaults.py --record             # and write bench/results/defaults.json (the docs' table)
    python bench/defaults.py --datasets faces --variants shipped,lora --seeds 0,1

Prints figures; asserts nothing. Each dataset of bench/real_data.py goes through prepare, validate
(audit off, gate warns), train and evaluate with the shipped params.yaml, only data.source
changed, then with each variant (a few keys overridden). base.seed changes the split and the
initialization, so the spread over seeds includes the split's. A dataset with more than
--max-per-class images in a class is cut to that many (drawn with a fixed seed) to keep the runs
short. A variant that only sets train.hflip to what the shipped `auto` chose for that seed is the
shipped run itself and is not run again. The last table names, per dataset, the best variant and
how many points of test accuracy and of macro F1 the shipped params lose to the best.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from real_data import DATASETS

from visiontune.components.config import load_params
from visiontune.pipelines import stages

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "defaults.json"
VARIANTS: dict[str, dict] = {
    "shipped": {},
    "no flips": {"train.hflip": False},
    "flips": {"train.hflip": True},
    "linear": {"train.method": "linear"},
    "lora": {"train.method": "lora"},
    "freeze2": {"train.freeze": 2},
    "lr3e-4": {"train.lr": 3e-4},
    "2x size": {"model.image_size": "double"},  # twice the size auto chooses
    "no early stop": {"train.patience": 10},  # every epoch, the schedule annealed to its end
    "no smoothing": {"train.label_smoothing": 0.0},
    "mixup": {"train.mixup": 0.2},
    "layer decay": {"train.layer_decay": 0.8},
    "batch 16": {"train.batch_size": 16},
    "15 epochs": {"train.epochs": 15},
}
SHOWN_VARIANTS = "shipped,no flips,flips,linear"
SHOWN_DATASETS = "digits,faces,textures,photos,blends,mnist,fashion,animals,emoji"
STAGES_RUN = ("prepare", "validate", "train", "evaluate")


@dataclass(frozen=True)
class Outcome:
    accuracy: float
    macro_f1: float
    seconds: float
    image_size: int
    epochs: int
    hflip: bool  # train.hflip as trained
    hflip_kept: float | None  # the mirror probe's kept share, when auto decided


def run(source: Path, work: Path, seed: int, overrides: dict) -> Outcome:
    """One pipeline run up to evaluate, scored on its test split."""
    overrides = {**overrides, "data.source": str(source), "base.seed": seed}
    overrides |= {"validate.label_audit": False, "validate.on_fail": "warn"}
    layout = stages.Layout(work)
    if overrides.get("model.image_size") == "double":
        params = load_params(ROOT / "params.yaml", {**overrides, "model.image_size": "auto"})
        stages.prepare(params, layout)
        overrides["model.image_size"] = 2 * stages.image_size(params, layout.prepare)
    params = load_params(ROOT / "params.yaml", overrides)
    started = time.perf_counter()
    for name in STAGES_RUN:
        stages.STAGES[name](params, layout)
    seconds = time.perf_counter() - started
    trained = json.loads((layout.train / "train.json").read_text())
    metrics = json.loads((layout.evaluate / "metrics.json").read_text())
    return Outcome(
        metrics["test_accuracy"],
        metrics["test_macro_f1"],
        seconds,
        trained["image_size"],
        trained["epochs_run"],
        trained["hflip"],
        trained["hflip_kept"],
    )


def capped(source: Path, dest: Path, per_class: int) -> Path:
    """`source` itself, or a copy with at most per_class images a class (a fixed draw)."""
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    if all(len(list(f.iterdir())) <= per_class for f in folders):
        return source
    rng = np.random.default_rng(0)
    for folder in folders:
        files = sorted(folder.iterdir())
        keep = sorted(rng.choice(len(files), min(per_class, len(files)), replace=False))
        (dest / folder.name).mkdir(parents=True)
        for i in keep:
            shutil.copy(files[i], dest / folder.name / files[i].name)
    return dest


def _same_as_shipped(variant: str, shipped: Outcome) -> bool:
    """Whether this variant only sets train.hflip to what the shipped run resolved it to."""
    keys = VARIANTS[variant]
    return set(keys) == {"train.hflip"} and keys["train.hflip"] == shipped.hflip


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def measure(name: str, source: Path, work: Path, seeds: list[int], variants: list[str], extra: dict) -> dict:
    """Every variant's outcomes on one dataset, seed by seed (the shipped run first)."""
    outcomes: dict[str, list[Outcome]] = {}
    for variant in ["shipped"] + [v for v in variants if v != "shipped"]:
        outcomes[variant] = []
        for seed in seeds:
            shipped = outcomes["shipped"][seeds.index(seed)] if variant != "shipped" else None
            if shipped is not None and _same_as_shipped(variant, shipped):
                outcomes[variant].append(shipped)
                continue
            overrides = {**extra, **VARIANTS[variant]}
            outcomes[variant].append(run(source, work / f"{name}-{variant}-{seed}", seed, overrides))
        got = outcomes[variant]
        print(
            f"{name:<9} {variant:<13} {got[0].image_size:>4} "
            f"acc {_cell([o.accuracy for o in got])}  F1 {_cell([o.macro_f1 for o in got])}  "
            f"epochs {statistics.mean(o.epochs for o in got):>4.1f}  "
            f"{statistics.mean(o.seconds for o in got):>6.1f} s"
            f"  flips {[o.hflip for o in got]}",
            flush=True,
        )
    return {v: outcomes[v] for v in variants if v in outcomes}


def table_row(name: str, images: int, outcomes: dict[str, list[Outcome]]) -> list[str]:
    """dataset, auto's decision, each variant's accuracy / macro F1, and the shipped params' gap."""
    shipped = outcomes["shipped"]
    kept = [o.hflip_kept for o in shipped if o.hflip_kept is not None]
    flips = sorted({"on" if o.hflip else "off" for o in shipped})
    decided = f"{'/'.join(flips)} (kept {min(kept):.2f}–{max(kept):.2f})" if kept else "/".join(flips)
    means = {v: (statistics.mean(o.accuracy for o in got), statistics.mean(o.macro_f1 for o in got))
             for v, got in outcomes.items()}  # fmt: skip
    best_acc = max(means, key=lambda v: means[v][0])
    best_f1 = max(means, key=lambda v: means[v][1])
    cells = [
        f"{_cell([o.accuracy for o in got])} / {statistics.mean(o.macro_f1 for o in got):.4f}"
        for got in outcomes.values()
    ]
    gap_acc = 100 * (means[best_acc][0] - means["shipped"][0])
    gap_f1 = 100 * (means[best_f1][1] - means["shipped"][1])
    return [
        f"{name} ({images:,} images, {shipped[0].image_size} px)",
        decided,
        *cells,
        f"{gap_acc:.1f} ({best_acc}) / {gap_f1:.1f} ({best_f1})",
    ]


def _provenance(datasets: str) -> dict:
    """bench/check.py's provenance for this bench: the stages' code, params.yaml and these files."""
    sys.path.insert(0, str(ROOT / "bench"))
    from check import measured_files, provenance

    command = "python bench/defaults.py --record"
    command += f" --datasets {datasets}" if datasets != SHOWN_DATASETS else ""
    return provenance(command, sorted(set(measured_files()) - {"bench/check.py"} | {"bench/defaults.py"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=SHOWN_DATASETS, help=f"from {','.join(DATASETS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=SHOWN_VARIANTS, help=f"from {','.join(VARIANTS)}")
    parser.add_argument("--max-per-class", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], help="extra override for every run, k=v")
    parser.add_argument("--record", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if args.record and (variants[0] != "shipped" or args.set):
        parser.error("--record needs the shipped variant first and no --set")
    extra = dict(kv.split("=", 1) for kv in args.set)
    extra = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v for k, v in extra.items()}
    started = time.perf_counter()
    recorded = _provenance(args.datasets) if args.record else {}  # the code as it was when the runs began
    columns = ["dataset", "flips (auto)", *(f"{v}: accuracy / macro F1" for v in variants), "best − shipped"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            full = DATASETS[name](Path(tmp) / "data" / name)
            source = capped(full, Path(tmp) / "data" / f"{name}-capped", args.max_per_class)
            images = sum(1 for p in source.rglob("*") if p.is_file())
            outcomes = measure(name, source, Path(tmp) / "runs", seeds, variants, extra)
            rows.append(table_row(name, images, outcomes))
            if args.record:  # after each dataset: a stopped run keeps the datasets it finished
                note = (
                    f"test accuracy mean ± sd over base.seed {args.seeds} (the seed draws the split too) / "
                    f"mean macro F1; at most {args.max_per_class} images a class; best − shipped in points "
                    "of accuracy / of macro F1, with the variant that scored best"
                )
                record = {
                    **recorded,
                    "seconds": round(time.perf_counter() - started),
                    "table": {"columns": columns, "rows": rows},
                    "note": note,
                }
                RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + " | ".join(columns))
    for row in rows:
        print(" | ".join(row))
    if args.record:
        print(f"recorded in {RESULTS.relative_to(ROOT)} ({round(time.perf_counter() - started)} s)")


if __name__ == "__main__":
    main()
