"""Benchmark: data-parallel training throughput at 1, 2, 4, ... processes (torchrun, gloo on CPU).

Run: `python bench/ddp_scaling.py [--nproc 1 2 4 8] [--epochs 3] [--size 64] [--batch 64]`
Trains the embedded EfficientNet-Lite0 on the built-in digits with the same global batch at each
process count, as `train.nproc` does it (the stage launches torchrun), and prints images/s and the
scaling efficiency images/s ÷ (n × images/s at 1 process). Epoch 1 (decode, warm-up) is left out.
Each run gets cores ÷ n threads. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from visiontune.components.config import Params
from visiontune.pipelines import stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = Params.model_validate(
            {
                "validate": {"label_audit": False},
                "model": {"image_size": args.size},
                "train": {"epochs": args.epochs, "batch_size": args.batch, "patience": args.epochs},
            }
        )
        base = stages.Layout(Path(tmp) / "base")
        stages.prepare(params, base)
        stages.validate(params, base)
        (base.root / "cache").mkdir(exist_ok=True)  # one decoded store for every run
        print(f"{os.cpu_count()} cores; Lite0 at {args.size} px, global batch {args.batch}, digits")
        print(f"{'processes':>9}  {'images/s':>9}  {'efficiency':>10}  {'wall s':>7}")
        single = None
        for n in args.nproc:
            layout = stages.Layout(Path(tmp) / f"run{len(list(Path(tmp).glob('run*')))}-n{n}")
            layout.root.mkdir()
            for name in ("prepare", "validate", "cache"):
                os.symlink((base.root / name).absolute(), layout.root / name)
            run = params.model_copy(update={"train": params.train.model_copy(update={"nproc": n})})
            env = os.environ.get("OMP_NUM_THREADS")
            os.environ.pop("OMP_NUM_THREADS", None)  # the launcher gives each process cores ÷ n
            started = time.perf_counter()
            try:
                if n == 1:
                    import torch

                    torch.set_num_threads(os.cpu_count() or 1)
                stages.train(run, layout)
            finally:
                if env is not None:
                    os.environ["OMP_NUM_THREADS"] = env
            wall = time.perf_counter() - started
            history = (layout.train / "history.csv").read_text().splitlines()[2:]  # epochs 2..
            ips = [float(line.split(",")[6]) for line in history]
            rate = sum(ips) / len(ips)
            single = single or (rate if n == 1 else None)
            efficiency = f"{rate / (n * single):.2f}" if single else "n/a"
            print(f"{n:>9}  {rate:>9.1f}  {efficiency:>10}  {wall:>7.1f}")


if __name__ == "__main__":
    main()
