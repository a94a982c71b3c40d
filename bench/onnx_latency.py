"""Benchmark: onnxruntime against PyTorch eager for an exported model, on this machine's CPU.

Run: `python bench/onnx_latency.py [--checkpoint data/prepared/train] [--onnx data/prepared/export]`
(after `make run`), or with no files: the embedded EfficientNet-Lite0 at 224 px with a fresh
10-class head, exported here. Prints median latencies of repeated runs at batch 1 and 32 in one
process, and the ratio; asserts nothing. Also times the int8 and fp16 copies when they exist.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from visiontune.components import model as models
from visiontune.components.config import ModelConfig


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a train output folder")
    parser.add_argument("--onnx", type=Path, default=None, help="a folder with model.onnx (and copies)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint and args.onnx:
            model, meta = models.load_checkpoint(args.checkpoint)
            size, onnx_dir = meta["preprocessing"]["size"], args.onnx
        else:
            size, onnx_dir = 224, Path(tmp)
            model, _ = models.create(ModelConfig(image_size=size), num_classes=10)
            model.eval()
            torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(onnx_dir / "model.onnx"),
                              dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})  # fmt: skip
        print(f"{model.__class__.__name__} at {size} px, {torch.get_num_threads()} torch threads, "
              f"median of {args.repeats} runs (ms)")  # fmt: skip
        print(f"{'runtime':<28}{'batch 1':>10}{'batch 32':>10}{'speed-up b1':>13}{'speed-up b32':>14}")
        x1 = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        x32 = np.random.default_rng(1).standard_normal((32, 3, size, size)).astype(np.float32)
        with torch.inference_mode():
            t1 = median_ms(lambda: model(torch.from_numpy(x1)), args.repeats)
            t32 = median_ms(lambda: model(torch.from_numpy(x32)), max(5, args.repeats // 5))
        print(f"{'PyTorch eager':<28}{t1:>10.2f}{t32:>10.1f}")
        for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
            path = onnx_dir / name
            if not path.exists():
                continue
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            o1 = median_ms(lambda s=session, f=feed: s.run(None, {f: x1}), args.repeats)
            o32 = median_ms(lambda s=session, f=feed: s.run(None, {f: x32}), max(5, args.repeats // 5))
            print(f"{'onnxruntime ' + name:<28}{o1:>10.2f}{o32:>10.1f}{t1 / o1:>12.2f}×{t32 / o32:>13.2f}×")


if __name__ == "__main__":
    main()
